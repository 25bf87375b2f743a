//! The sans-IO core of a Griddle node.
//!
//! [`NodeCore`] is a state machine. Its inputs are method calls that each take `now_ms`:
//! [`NodeCore::request`] (a client asks something), [`NodeCore::persisted`] (a batch it asked
//! to persist is durable, or failed), [`NodeCore::tick`] (time passed), [`NodeCore::cancel`]
//! (a client went away) and [`NodeCore::stop`]. Its outputs come from
//! [`NodeCore::poll_output`] (persist this batch, reply to that request, storage failed) and
//! [`NodeCore::poll_timeout`] (call `tick` by then). It never reads a clock, never draws OS
//! randomness, never spawns and never touches a socket. It does read the store through the
//! [`store::Store`] trait, synchronously: with the `mem` backend those reads are as
//! deterministic as the rest, which is what the simulator needs. Writes are outputs.
//!
//! ```text
//!   request ──► validate ──► sequence (per-stream head, pending ids) ──► Persist(batch)
//!                                 │                                          │
//!                                 ▼                                   persisted(batch)
//!                          wait on a pending batch ◄──────────────────────────┤
//!                                                                             ▼
//!                 Reply ◄── job done (all its batches durable) ◄── apply: heads move,
//!                   ▲         (a chat message then appends its           wake sync and
//!                   │          two inbox copies, then replies)           stream waiters
//!   sync / wait ──► answer now if anything is newer than the cursor, else wait until a
//!                   commit or signal for that user, or the deadline
//! ```
//!
//! Invariants (asserted):
//! - per stream, versions are handed out densely and become durable in order; the head only
//!   moves forward, one version at a time;
//! - an event id is sequenced at most once per stream: a retry finds it pending or durable;
//! - nothing is replied, woken or counted before the batch holding it is durable;
//! - every waiting list and cache has a bound from [`Config`].

pub mod api;
mod core;
pub mod social;

#[cfg(feature = "planted-bugs")]
pub use crate::core::PlantedBug;
pub use crate::core::{page, read_only, BatchId, Config, ForwardId, NodeCore, Output};
pub mod placement;
pub mod repl;
