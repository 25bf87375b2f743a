//! The social rules: who may touch which stream, how a chat message is copied into both
//! users' inboxes, and what the chat list, unread counts and flags are, folded from streams.
//!
//! Everything here is derived state: it can be dropped at any time and rebuilt by folding the
//! user's `inbox:{u}` (or `sys:flags`) from version 1, which is what a cache miss does.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{json, Value};
use store::{Event, EventId, StreamName, Version};

use crate::api::{ChatSummary, Unread};

pub const USER_ID_LEN_MAX: usize = 64;
pub const FLAG_NAME_LEN_MAX: usize = 64;

/// `sub` claims and path segments naming users: 1-64 of `[A-Za-z0-9_-]`.
pub fn valid_user(user: &str) -> bool {
    (1..=USER_ID_LEN_MAX).contains(&user.len())
        && user.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

pub fn valid_flag_name(name: &str) -> bool {
    (1..=FLAG_NAME_LEN_MAX).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

fn named(name: String) -> StreamName {
    StreamName::new(name).expect("built from validated user ids")
}

/// The conversation of two users: `chat:{a}:{b}` with the names in byte order.
pub fn chat_stream(a: &str, b: &str) -> StreamName {
    let (first, second) = if a <= b { (a, b) } else { (b, a) };
    named(format!("chat:{first}:{second}"))
}

pub fn inbox_stream(user: &str) -> StreamName {
    named(format!("inbox:{user}"))
}

pub fn feed_stream(user: &str) -> StreamName {
    named(format!("feed:{user}"))
}

pub fn flags_stream() -> StreamName {
    named("sys:flags".into())
}

/// The two users of a `chat:` stream.
pub fn chat_members(stream: &StreamName) -> Option<(&str, &str)> {
    let mut parts = stream.as_str().strip_prefix("chat:")?.split(':');
    Some((parts.next()?, parts.next()?))
}

/// Stream kinds that change only through the social routes, never the generic stream API.
pub fn reserved_kind(stream: &StreamName) -> bool {
    matches!(stream.kind(), "chat" | "inbox" | "feed" | "sys")
}

pub const TYPE_MESSAGE: &str = "chat.message";
pub const TYPE_READ: &str = "chat.read";
pub const TYPE_FLAG_SET: &str = "flag.set";

/// The id of a message's copy in `user`'s inbox: derived, so every retry writes the same copy.
pub fn inbox_copy_id(message: EventId, user: &str) -> EventId {
    message.derive(&format!("inbox:{user}"))
}

/// The data of an inbox copy: the whole message, so `sync` can hand it out as it is stored.
pub fn inbox_copy_data(message: &Event) -> String {
    json!({
        "stream": message.stream.as_str(),
        "version": message.version.0,
        "id": message.id.to_string(),
        "type": message.kind,
        "from": message.from,
        "time": message.time_ms,
        "data": serde_json::from_str::<Value>(&message.data).unwrap_or(Value::Null),
    })
    .to_string()
}

/// The message an inbox copy carries.
pub fn unwrap_inbox_copy(copy: &Event) -> Option<Event> {
    let value: Value = serde_json::from_str(&copy.data).ok()?;
    Some(Event {
        id: EventId::parse(value.get("id")?.as_str()?)?,
        stream: StreamName::new(value.get("stream")?.as_str()?).ok()?,
        version: Version(value.get("version")?.as_u64()?),
        kind: value.get("type")?.as_str()?.to_owned(),
        from: value.get("from")?.as_str()?.to_owned(),
        time_ms: value.get("time")?.as_u64()?,
        data: value.get("data")?.to_string(),
    })
}

pub fn read_marker_data(peer: &str, version: Version) -> String {
    json!({"peer": peer, "version": version.0}).to_string()
}

pub fn parse_read_marker(event: &Event) -> Option<(String, Version)> {
    let value: Value = serde_json::from_str(&event.data).ok()?;
    Some((value.get("peer")?.as_str()?.to_owned(), Version(value.get("version")?.as_u64()?)))
}

/// What one user's inbox says about their conversations, folded up to `applied`.
#[derive(Clone, Debug, Default)]
pub struct InboxSummary {
    pub applied: Version,
    peers: HashMap<String, PeerSummary>,
    /// The user's own read marker per conversation. Kept apart from `peers` because a marker
    /// can be folded before the message it marks has its inbox copy.
    markers: HashMap<String, Version>,
}

#[derive(Clone, Debug)]
struct PeerSummary {
    last: Event,
    /// Versions of the peer's messages above the user's marker.
    unread: BTreeSet<u64>,
}

impl InboxSummary {
    /// Folds the next inbox event of `user`. Events must come in inbox order.
    pub fn apply(&mut self, user: &str, event: &Event) {
        assert_eq!(event.version, self.applied.next(), "inbox events are folded in order");
        self.applied = event.version;
        match event.kind.as_str() {
            TYPE_MESSAGE => {
                let Some(message) = unwrap_inbox_copy(event) else { return };
                let Some((a, b)) = chat_members(&message.stream) else { return };
                let peer = if a == user { b } else { a }.to_owned();
                let (from_me, version) = (message.from == user, message.version);
                let marker = self.marker(&peer);
                let summary = self
                    .peers
                    .entry(peer.clone())
                    .or_insert_with(|| PeerSummary { last: message.clone(), unread: BTreeSet::new() });
                if message.version >= summary.last.version {
                    summary.last = message;
                }
                if from_me {
                    self.mark_read(&peer, version);
                } else if version > marker {
                    summary.unread.insert(version.0);
                }
            }
            TYPE_READ => {
                if let Some((peer, version)) = parse_read_marker(event) {
                    self.mark_read(&peer, version);
                }
            }
            _ => {}
        }
    }

    fn mark_read(&mut self, peer: &str, version: Version) {
        let marker = self.markers.entry(peer.to_owned()).or_default();
        if version <= *marker {
            return;
        }
        *marker = version;
        if let Some(summary) = self.peers.get_mut(peer) {
            summary.unread = summary.unread.split_off(&(version.0 + 1));
        }
    }

    pub fn marker(&self, peer: &str) -> Version {
        self.markers.get(peer).copied().unwrap_or_default()
    }

    pub fn unread(&self) -> Unread {
        let by_peer: BTreeMap<String, u64> = self
            .peers
            .iter()
            .filter(|(_, p)| !p.unread.is_empty())
            .map(|(peer, p)| (peer.clone(), p.unread.len() as u64))
            .collect();
        Unread { total: by_peer.values().sum(), by_peer }
    }

    /// Conversations, most recent first, whose last event is older than `before_ms`.
    pub fn chats(&self, before_ms: Option<u64>, limit: usize) -> Vec<ChatSummary> {
        let mut chats: Vec<ChatSummary> = self
            .peers
            .iter()
            .filter(|(_, p)| before_ms.is_none_or(|before| p.last.time_ms < before))
            .map(|(peer, p)| ChatSummary { peer: peer.clone(), last: p.last.clone(), unread: p.unread.len() as u64 })
            .collect();
        chats.sort_by(|a, b| b.last.time_ms.cmp(&a.last.time_ms).then_with(|| a.peer.cmp(&b.peer)));
        chats.truncate(limit);
        chats
    }
}

/// Cluster-wide flags folded from `sys:flags`.
#[derive(Clone, Debug, Default)]
pub struct Flags {
    pub applied: Version,
    percent: BTreeMap<String, u8>,
}

impl Flags {
    pub fn apply(&mut self, event: &Event) {
        assert_eq!(event.version, self.applied.next(), "flag events are folded in order");
        self.applied = event.version;
        if event.kind != TYPE_FLAG_SET {
            return;
        }
        let Ok(value) = serde_json::from_str::<Value>(&event.data) else { return };
        let (Some(name), Some(percent)) =
            (value.get("name").and_then(Value::as_str), value.get("percent").and_then(Value::as_u64))
        else {
            return;
        };
        self.percent.insert(name.to_owned(), percent.min(100) as u8);
    }

    /// Every flag, evaluated for `user`: on when the user's stable bucket is below the percentage.
    pub fn evaluate(&self, user: &str) -> BTreeMap<String, bool> {
        self.percent.iter().map(|(name, percent)| (name.clone(), bucket(user, name) < u64::from(*percent))).collect()
    }
}

pub fn flag_set_data(name: &str, percent: u8) -> String {
    json!({"name": name, "percent": percent}).to_string()
}

/// A user's bucket 0..100 for a flag: FNV-1a, stable across versions and platforms.
pub fn bucket(user: &str, flag: &str) -> u64 {
    let mut hash: u64 = 0xcbf29ce484222325;
    for byte in user.bytes().chain([b'/']).chain(flag.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x100000001b3);
    }
    hash % 100
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(a: &str, b: &str, version: u64, from: &str, time_ms: u64) -> Event {
        Event {
            id: EventId(u128::from(version) + 1000),
            stream: chat_stream(a, b),
            version: Version(version),
            kind: TYPE_MESSAGE.into(),
            from: from.into(),
            time_ms,
            data: r#"{"text":"hi"}"#.into(),
        }
    }

    fn copy(inbox_version: u64, message: &Event) -> Event {
        Event {
            id: inbox_copy_id(message.id, "alice"),
            stream: inbox_stream("alice"),
            version: Version(inbox_version),
            kind: TYPE_MESSAGE.into(),
            from: message.from.clone(),
            time_ms: message.time_ms,
            data: inbox_copy_data(message),
        }
    }

    /// Alice's read marker for her conversation with `peer`, at `inbox_version` of her inbox.
    fn read(inbox_version: u64, peer: &str, up_to: u64) -> Event {
        Event {
            id: EventId(u128::from(inbox_version)),
            stream: inbox_stream("alice"),
            version: Version(inbox_version),
            kind: TYPE_READ.into(),
            from: "alice".into(),
            time_ms: 9,
            data: read_marker_data(peer, Version(up_to)),
        }
    }

    #[test]
    fn copies_unwrap_to_the_message() {
        let m = message("alice", "bob", 3, "bob", 10);
        assert_eq!(unwrap_inbox_copy(&copy(1, &m)), Some(m));
    }

    #[test]
    fn unread_counts_follow_messages_and_markers() {
        let mut summary = InboxSummary::default();
        let events = [
            copy(1, &message("alice", "bob", 1, "bob", 10)),
            copy(2, &message("alice", "bob", 2, "bob", 11)),
            copy(3, &message("alice", "carol", 1, "carol", 12)),
        ];
        for e in &events {
            summary.apply("alice", e);
        }
        assert_eq!(summary.unread().total, 3);
        assert_eq!(summary.unread().by_peer["bob"], 2);
        summary.apply("alice", &read(4, "bob", 1));
        assert_eq!(summary.unread().by_peer["bob"], 1);
        // Alice's own message moves her marker past everything before it.
        summary.apply("alice", &copy(5, &message("alice", "carol", 2, "alice", 14)));
        assert_eq!(summary.unread().by_peer.get("carol"), None);
        assert_eq!(summary.unread().total, 1);
        let chats = summary.chats(None, 10);
        assert_eq!(chats.iter().map(|c| c.peer.as_str()).collect::<Vec<_>>(), ["carol", "bob"]);
        assert_eq!(summary.chats(Some(14), 10).len(), 1);
        assert_eq!(summary.marker("carol"), Version(2));
    }

    #[test]
    fn a_marker_folded_before_its_message_still_counts() {
        let mut summary = InboxSummary::default();
        summary.apply("alice", &read(1, "bob", 1));
        summary.apply("alice", &copy(2, &message("alice", "bob", 1, "bob", 10)));
        assert_eq!(summary.unread().total, 0);
        summary.apply("alice", &copy(3, &message("alice", "bob", 2, "bob", 11)));
        assert_eq!(summary.unread().total, 1);
    }

    #[test]
    fn flags_bucket_users_stably() {
        let mut flags = Flags::default();
        let set = |version: u64, percent: u8| Event {
            id: EventId(u128::from(version)),
            stream: flags_stream(),
            version: Version(version),
            kind: TYPE_FLAG_SET.into(),
            from: "svc".into(),
            time_ms: 1,
            data: flag_set_data("new-inbox", percent),
        };
        flags.apply(&set(1, 0));
        assert!(!flags.evaluate("alice")["new-inbox"]);
        flags.apply(&set(2, 100));
        assert!(flags.evaluate("alice")["new-inbox"]);
        let on = (0..1000).filter(|i| bucket(&format!("u{i}"), "x") < 30).count();
        assert!((230..370).contains(&on), "{on} of 1000 users in a 30% bucket");
    }
}
