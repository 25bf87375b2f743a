//! The mesh: who is in it and how nodes talk.
//!
//! - [`membership`]: the sans-IO SWIM state machine around foca, with its timer queue,
//!   announce retry and watchdog; driven by `(now, input)`, so the simulator runs it as is.
//! - [`identity`]: node ids and the identity gossiped about each node.
//! - [`wire`]: the versioned framing of every mesh packet.
//! - [`tls`]: the cluster CA, node certificates naming node ids, and the mutual-TLS configs.
//! - [`quic`]: the quinn shell: one endpoint, datagrams for SWIM (a uni stream for anything
//!   larger), connections authenticated both ways, and the task that drives [`membership`].
//!
//! `gossip` knows nothing of events or streams.

pub mod identity;
pub mod membership;
#[cfg(feature = "quic")]
pub mod quic;
#[cfg(feature = "quic")]
pub mod tls;
pub mod wire;

pub use identity::{Identity, NodeId};
pub use membership::{MemberEvent, MemberState, Membership, Profile, Transmit};
