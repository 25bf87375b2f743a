//! Who a node is in the mesh: the identity SWIM gossips about, and its wire form.
//!
//! A node's `Addr` (in foca's sense) is its advertised mesh address: two identities with the
//! same address are the same node at different times, and the one with the higher `bump`
//! wins. A restart takes a new `bump` (its start time), so a restarted node rejoins at once
//! instead of waiting for the cluster to forget its old, dead identity.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// A node's id: 1-64 of `[A-Za-z0-9_-]`, named by its certificate.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(String);

impl NodeId {
    pub fn new(id: impl Into<String>) -> Option<NodeId> {
        let id = id.into();
        let valid =
            (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        valid.then_some(NodeId(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// What the mesh knows about a node. Serialized with postcard inside foca's packets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub id: NodeId,
    /// Where the node's mesh endpoint is reached (it may be a proxy in front of it).
    pub mesh_addr: SocketAddr,
    /// Where the node serves HTTP; opaque to the mesh, shown to operators and browsers.
    pub http_addr: SocketAddr,
    /// Placement weight in thousandths (1000 = full weight, 0 = ghost).
    pub weight_milli: u16,
    /// Larger for later lives of the same node: its start time in milliseconds shifted left
    /// by 16, then +1 per renewal (a conflict, or a weight change). 0 is reserved for
    /// [`Identity::seed`].
    pub bump: u64,
}

impl Identity {
    /// The `bump` of a node started at `start_ms`.
    pub fn first_bump(start_ms: u64) -> u64 {
        start_ms << 16
    }

    /// Which life of the node this is: changes when the process restarts (its disk may have
    /// changed), not when it renews its identity to change its weight.
    pub fn life(&self) -> u64 {
        self.bump >> 16
    }

    /// A stand-in for a seed we know only by address: foca accepts an announce addressed to
    /// any identity with the receiver's address.
    pub fn seed(mesh_addr: SocketAddr) -> Identity {
        Identity { id: NodeId("seed".into()), mesh_addr, http_addr: mesh_addr, weight_milli: 0, bump: 0 }
    }
}

impl foca::Identity for Identity {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(Identity { bump: self.bump + 1, ..self.clone() })
    }

    fn addr(&self) -> SocketAddr {
        self.mesh_addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.bump > adversary.bump
    }
}
