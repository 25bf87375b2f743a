//! What the outside asks of a node and what it answers: plain values, no HTTP.
//!
//! `web` turns HTTP requests into [`Request`]s and [`Reply`]s into JSON; the simulator builds
//! them directly. Inputs here are already shaped (ids parsed, numbers in range); the core
//! still checks everything that depends on state (heads, ownership, cursors).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use store::{Event, EventId, StreamName, Version};

/// A request's handle, chosen by the driver; the reply carries it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// Longest chat message, in Unicode scalar values.
pub const TEXT_CHARS_MAX: usize = 2000;
/// Most events in one page or one sync answer.
pub const PAGE_LEN_MAX: usize = 100;
/// Events in the feed page that a fresh `sync` returns.
pub const SYNC_FEED_PAGE_LEN: usize = 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FeedKind {
    Flirt,
    Visit,
}

impl FeedKind {
    pub fn event_type(self) -> &'static str {
        match self {
            FeedKind::Flirt => "feed.flirt",
            FeedKind::Visit => "feed.visit",
        }
    }
}

/// An event handed in through the generic stream API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewEvent {
    pub id: Option<EventId>,
    pub kind: String,
    /// JSON text.
    pub data: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    PostMessage {
        user: String,
        peer: String,
        id: Option<EventId>,
        text: String,
    },
    Messages {
        user: String,
        peer: String,
        before: Option<Version>,
        limit: usize,
    },
    Typing {
        user: String,
        peer: String,
    },
    MarkRead {
        user: String,
        peer: String,
        version: Version,
    },
    Chats {
        user: String,
        before_ms: Option<u64>,
        limit: usize,
    },
    PostFeed {
        user: String,
        target: String,
        id: Option<EventId>,
        kind: FeedKind,
    },
    Feed {
        user: String,
        before: Option<Version>,
        limit: usize,
    },
    /// `since` is the cursor text as the client sent it.
    Sync {
        user: String,
        since: Option<String>,
        timeout_ms: u64,
    },
    Online {
        limit: usize,
    },
    Flags {
        user: String,
    },
    SetFlag {
        name: String,
        percent: u8,
        from: String,
    },
    StreamAppend {
        stream: StreamName,
        events: Vec<NewEvent>,
        from: String,
    },
    StreamRead {
        stream: StreamName,
        after: Option<Version>,
        before: Option<Version>,
        limit: usize,
        wait_ms: u64,
        /// Answer from this node's own copy, without going to the partition's primary: a
        /// ghost's (or any replica's) view, for comparison. It may lag the primary.
        #[serde(default)]
        local: bool,
    },
    /// Between nodes only (no route builds it): appends with ids the sender chose, to any
    /// stream, reserved kinds included. A chat message's primary delivers its inbox copies
    /// this way to the inboxes' primaries, retrying until they answer.
    Deliver {
        stream: StreamName,
        events: Vec<NewEvent>,
        from: String,
    },
}

impl Request {
    /// A long-poll: it may wait for data to arrive (a `sync` from a cursor, a stream read
    /// with `wait`). Those are capped by the long-polls a node holds, not as calls in flight.
    pub fn holds(&self) -> bool {
        match self {
            Request::Sync { since, timeout_ms, .. } => since.is_some() && *timeout_ms > 0,
            Request::StreamRead { wait_ms, .. } => *wait_ms > 0,
            _ => false,
        }
    }

    /// The stream whose partition's primary serves this request (so its partition decides
    /// where a gateway forwards it); `None` for what any node answers itself.
    ///
    /// A user's `sync`, chat list, read markers and flags go where `inbox:{user}` lives (the
    /// same partition as `feed:{user}`); typing goes where the *peer's* inbox lives, because
    /// that is where the peer's `sync` waits.
    pub fn route(&self) -> Option<String> {
        let chat = |a: &str, b: &str| if a <= b { format!("chat:{a}:{b}") } else { format!("chat:{b}:{a}") };
        Some(match self {
            Request::PostMessage { user, peer, .. } | Request::Messages { user, peer, .. } => chat(user, peer),
            Request::Typing { peer, .. } => format!("inbox:{peer}"),
            Request::MarkRead { user, .. } | Request::Chats { user, .. } | Request::Sync { user, .. } => {
                format!("inbox:{user}")
            }
            Request::Feed { user, .. } => format!("feed:{user}"),
            Request::PostFeed { target, .. } => format!("feed:{target}"),
            Request::Flags { .. } | Request::SetFlag { .. } => "sys:flags".into(),
            Request::StreamAppend { stream, .. }
            | Request::StreamRead { stream, .. }
            | Request::Deliver { stream, .. } => stream.as_str().into(),
            Request::Online { .. } => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// One event appended (`created`) or found by its id (not `created`).
    Appended {
        event: Event,
        created: bool,
    },
    /// Many events appended as a whole; `created` if any of them was new.
    AppendedAll {
        events: Vec<Event>,
        created: bool,
    },
    Page {
        events: Vec<Event>,
        head: Version,
    },
    Chats(Vec<ChatSummary>),
    Sync(SyncReply),
    Online {
        users: Vec<String>,
        total: usize,
    },
    Flags(BTreeMap<String, bool>),
    Done,
    Error(CoreError),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum CoreError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// This node's own caps are reached; retry later.
    #[error("{0}")]
    Overloaded(String),
    /// Not ready, stopping, or storage failed; retry later, perhaps elsewhere.
    #[error("{0}")]
    Unavailable(String),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatSummary {
    pub peer: String,
    pub last: Event,
    pub unread: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unread {
    pub total: u64,
    /// Only peers with a non-zero count.
    pub by_peer: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SyncItem {
    /// A stored event: a chat message (unwrapped from its inbox copy), a feed event, ...
    Event(Event),
    /// The user read their conversation with `peer` up to `version`.
    Read { peer: String, version: Version },
    /// A typing signal from `from`; never stored.
    Typing { from: String, time_ms: u64 },
    /// The user's flags changed; all of them, evaluated for the user.
    Flags(BTreeMap<String, bool>),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SyncReply {
    pub cursor: String,
    pub items: Vec<SyncItem>,
    pub unread: Unread,
    /// Present on a fresh sync (no `since`) and on a reset.
    pub snapshot: Option<Snapshot>,
    pub reset: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub feed: Vec<Event>,
    pub feed_head: Version,
    pub chats: Vec<ChatSummary>,
}
