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
///
/// Decoding checks it too (the wire form is the plain string): a gossiped member list names
/// nodes whose certificates nobody here has seen, and an id that breaks the rule must not
/// get in that way (found by the `gossip_wire` fuzz target).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);

impl TryFrom<String> for NodeId {
    type Error = String;
    fn try_from(id: String) -> Result<NodeId, String> {
        NodeId::new(id).ok_or_else(|| "a node id is 1-64 of A-Z a-z 0-9 _ -".to_owned())
    }
}

impl From<NodeId> for String {
    fn from(id: NodeId) -> String {
        id.0
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Membership, Profile};

    fn identity(id: &str, port: u16) -> Identity {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        Identity {
            id: NodeId::new(id).unwrap(),
            mesh_addr: addr,
            http_addr: addr,
            weight_milli: 1000,
            bump: Identity::first_bump(1_000),
        }
    }

    /// A SWIM packet from `n2` whose member list names a node `"n\u{3}"` (the `gossip_wire`
    /// fuzz target's input `minimized-from-b77b9a83…`, less its 3-byte packet header): before
    /// `NodeId` checked its ids on decoding, `n1` took that node in as a member.
    const INVALID_MEMBER_ID: &[u8] = &[
        0x01, 0x01, 0x02, 0x6e, 0x32, 0x00, 0x7f, 0x00, 0x00, 0xda, 0x36, 0x00, 0x7f, 0x00, 0x00, 0x01, 0x36, 0xe8,
        0x07, 0x80, 0x80, 0xa0, 0x1f, 0x00, 0x02, 0x6e, 0x31, 0x00, 0x7f, 0x00, 0x00, 0x01, 0xd9, 0x36, 0x00, 0x7f,
        0x00, 0x00, 0x01, 0xd9, 0x36, 0xe8, 0x07, 0x80, 0x80, 0xa0, 0x1f, 0x00, 0x01, 0x00, 0x01, 0x02, 0x6e, 0x03,
        0x00, 0x7f, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0xd9, 0x33, 0x00, 0x00, 0x00, 0x01, 0x00,
    ];

    #[test]
    fn fuzz_regression_gossip_never_teaches_an_invalid_node_id() {
        let me = identity("n1", 7001);
        let mut machine = Membership::new(me, vec![identity("n2", 7002).mesh_addr], Profile::default(), 1, 10_000);
        let _ = machine.handle_packet(10_000, &NodeId::new("n2").unwrap(), INVALID_MEMBER_ID);
        machine.tick(10_048);
        for (member, _) in machine.members() {
            assert!(NodeId::new(member.id.as_str()).is_some(), "{member:?}");
        }
    }

    #[test]
    fn node_ids_are_checked_when_decoded() {
        use foca::Codec as _;
        // A member encoded under a valid id, then the id's bytes swapped for one of the same
        // length, decoded as foca decodes a packet's members.
        let check = |id: &str, ok: bool| {
            let twin = "x".repeat(id.len());
            let member = foca::Member::alive(identity(&twin, 7003));
            let mut bytes = Vec::new();
            foca::PostcardCodec.encode_member(&member, &mut bytes).unwrap();
            let at = bytes.windows(twin.len()).position(|w| w == twin.as_bytes()).unwrap();
            bytes[at..at + id.len()].copy_from_slice(id.as_bytes());
            let decoded = foca::PostcardCodec.decode_member(&bytes[..]).map(|m: foca::Member<Identity>| m.id().clone());
            assert_eq!(decoded.is_ok(), ok, "{id:?}: {decoded:?}");
        };
        check("n1", true);
        check("node_A-9", true);
        check("n\u{3}", false);
        check("a.b", false);
        check("n 1", false);
        check(&"é".repeat(32), false);
    }
}
