//! The mesh's wire framing: one place, versioned.
//!
//! Every datagram (and every uni stream, for packets too large for a datagram) is
//! `[version][kind][payload]`. A node sends [`WIRE_VERSION`] and accepts it and the version
//! before, so a rolling upgrade never splits the mesh.

pub const WIRE_VERSION: u8 = 1;
/// The oldest version this build still accepts.
pub const WIRE_VERSION_MIN: u8 = if WIRE_VERSION > 1 { WIRE_VERSION - 1 } else { 1 };
/// ALPN protocol of mesh connections.
pub const ALPN: &[u8] = b"griddle-mesh";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A foca (SWIM) packet.
    Swim = 1,
    /// The sender is leaving the mesh on purpose; payload: its node id.
    Leave = 2,
}

pub fn frame(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + payload.len());
    out.push(WIRE_VERSION);
    out.push(kind as u8);
    out.extend_from_slice(payload);
    out
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("packet too short")]
    Short,
    #[error("wire version {0} is not spoken here ({WIRE_VERSION_MIN}..={WIRE_VERSION})")]
    Version(u8),
    #[error("unknown packet kind {0}")]
    Kind(u8),
}

pub fn unframe(packet: &[u8]) -> Result<(Kind, &[u8]), WireError> {
    let [version, kind, payload @ ..] = packet else { return Err(WireError::Short) };
    if !(WIRE_VERSION_MIN..=WIRE_VERSION).contains(version) {
        return Err(WireError::Version(*version));
    }
    let kind = match kind {
        1 => Kind::Swim,
        2 => Kind::Leave,
        other => return Err(WireError::Kind(*other)),
    };
    Ok((kind, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames() {
        assert_eq!(unframe(&frame(Kind::Swim, b"abc")), Ok((Kind::Swim, &b"abc"[..])));
        assert_eq!(unframe(&[]), Err(WireError::Short));
        assert_eq!(unframe(&[WIRE_VERSION]), Err(WireError::Short));
        assert_eq!(unframe(&[99, 1]), Err(WireError::Version(99)));
        assert_eq!(unframe(&[WIRE_VERSION, 9]), Err(WireError::Kind(9)));
    }
}
