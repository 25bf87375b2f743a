//! The data model every crate shares: stream names, versions, event ids and events.
//!
//! These are plain values. Their serde form is only for requests forwarded between nodes;
//! the on-disk format lives in [`crate::codec`], the wire format of the HTTP API in `web`.

use std::fmt;

/// Longest stream name we accept, in bytes (names are ASCII).
pub const STREAM_NAME_LEN_MAX: usize = 160;

/// A stream's name, such as `chat:alice:bob`, `feed:alice` or `orders:42`.
///
/// Valid names are 1..=160 bytes of `[A-Za-z0-9_:.-]`; in particular they never contain the
/// zero byte, which the RocksDB backend uses as the separator in its keys.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StreamName(String);

impl TryFrom<String> for StreamName {
    type Error = InvalidName;
    fn try_from(name: String) -> Result<StreamName, InvalidName> {
        StreamName::new(name)
    }
}

impl From<StreamName> for String {
    fn from(name: StreamName) -> String {
        name.0
    }
}

impl StreamName {
    pub fn new(name: impl Into<String>) -> Result<StreamName, InvalidName> {
        let name = name.into();
        let valid_byte = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'.' | b'-');
        if name.is_empty() || name.len() > STREAM_NAME_LEN_MAX || !name.bytes().all(valid_byte) {
            return Err(InvalidName(name));
        }
        Ok(StreamName(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part before the first `:` (`chat`, `inbox`, `feed`, `sys`, ...), or the whole name.
    pub fn kind(&self) -> &str {
        self.0.split(':').next().unwrap_or(&self.0)
    }
}

impl fmt::Display for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid stream name {0:?}: 1-160 characters of A-Z a-z 0-9 _ : . -")]
pub struct InvalidName(pub String);

/// A position in a stream. Versions are dense: the first event is 1, an empty stream's head is 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Version(pub u64);

impl Version {
    pub const ZERO: Version = Version(0);

    pub fn next(self) -> Version {
        Version(self.0 + 1)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A 128-bit event id, written as a ULID. Appends are idempotent by id within a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct EventId(pub u128);

impl EventId {
    /// Parses the 26-character Crockford base32 form.
    pub fn parse(text: &str) -> Option<EventId> {
        ulid::Ulid::from_string(text).ok().map(|u| EventId(u.0))
    }

    /// An id from a millisecond timestamp and 80 random bits, as ULIDs are made. The caller
    /// supplies both, so a sans-IO core stays deterministic.
    pub fn from_parts(time_ms: u64, random: u128) -> EventId {
        EventId(ulid::Ulid::from_parts(time_ms, random).0)
    }

    /// A deterministic id derived from this one and a tag, keeping this id's timestamp so
    /// derived ids sort like their origin. Used for the inbox copies of a chat message.
    pub fn derive(self, tag: &str) -> EventId {
        // FNV-1a over the tag, folded into the 80 random bits: stable across versions and
        // platforms, which `std`'s hasher does not promise.
        let mut hash: u128 = 0x6c62272e07bb014262b821756295c58d;
        for byte in self.0.to_be_bytes().iter().chain(tag.as_bytes()) {
            hash ^= u128::from(*byte);
            hash = hash.wrapping_mul(0x0000000001000000000000000000013B);
        }
        let time_bits = self.0 & !((1u128 << 80) - 1);
        EventId(time_bits | (hash & ((1u128 << 80) - 1)))
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", ulid::Ulid(self.0))
    }
}

/// One stored event. `data` is JSON text, validated by whoever accepted it from outside.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Event {
    pub id: EventId,
    pub stream: StreamName,
    pub version: Version,
    /// The event's type, such as `chat.message` (`type` is a keyword in Rust).
    pub kind: String,
    /// The user (or service) that caused the event.
    pub from: String,
    /// Milliseconds since the Unix epoch, set by the node that sequenced the event.
    pub time_ms: u64,
    pub data: String,
}

/// Which part of a stream to read. Results always come oldest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadRange {
    /// Versions after `after` (exclusive), the oldest `limit` of them.
    After { after: Version, limit: usize },
    /// Versions before `before` (exclusive; `None` means from the head), the newest `limit`.
    Before { before: Option<Version>, limit: usize },
}

/// A batch of writes that becomes durable as a whole. Events carry the versions their
/// sequencer gave them; per stream they must continue the stream's head without a gap.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteBatch {
    pub events: Vec<Event>,
    /// Small metadata: key and value (`None` deletes).
    pub meta: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl WriteBatch {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.meta.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names() {
        let check = |name: &str, valid: bool| assert_eq!(StreamName::new(name).is_ok(), valid, "{name:?}");
        check("chat:alice:bob", true);
        check("a", true);
        check("orders.eu-1_x", true);
        check("", false);
        check("has space", false);
        check("nul\0byte", false);
        check("ünicode", false);
        check(&"x".repeat(160), true);
        check(&"x".repeat(161), false);
    }

    #[test]
    fn derived_ids_are_stable_and_keep_time() {
        let id = EventId::from_parts(1_763_776_800_123, 42);
        let a = id.derive("inbox:alice");
        assert_eq!(a, id.derive("inbox:alice"));
        assert_ne!(a, id.derive("inbox:bob"));
        assert_eq!(ulid::Ulid(a.0).timestamp_ms(), 1_763_776_800_123);
        assert_eq!(EventId::parse(&a.to_string()), Some(a));
    }
}
