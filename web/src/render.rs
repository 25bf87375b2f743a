//! JSON renderings of the core's replies, as `shared/API.md` spells them.

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use node_core::api::{ChatSummary, SyncItem, SyncReply, Unread};
use store::Event;

/// An event as the API shows it; `data` is embedded as stored, without re-parsing into a tree.
#[derive(Serialize)]
pub struct EventJson<'a> {
    id: String,
    stream: &'a str,
    version: u64,
    #[serde(rename = "type")]
    kind: &'a str,
    from: &'a str,
    time: u64,
    data: &'a RawValue,
}

const NULL: &str = "null";

impl<'a> From<&'a Event> for EventJson<'a> {
    fn from(event: &'a Event) -> Self {
        // Stored data was validated as JSON when it was accepted; fall back to null if not.
        let data = serde_json::from_str::<&RawValue>(&event.data)
            .unwrap_or_else(|_| serde_json::from_str(NULL).expect("null is JSON"));
        EventJson {
            id: event.id.to_string(),
            stream: event.stream.as_str(),
            version: event.version.0,
            kind: &event.kind,
            from: &event.from,
            time: event.time_ms,
            data,
        }
    }
}

pub fn event(event: &Event) -> Value {
    serde_json::to_value(EventJson::from(event)).expect("events serialize")
}

#[derive(Serialize)]
pub struct PageJson<'a> {
    pub events: Vec<EventJson<'a>>,
    pub head: u64,
}

pub fn page(events: &[Event], head: u64) -> Vec<u8> {
    let page = PageJson { events: events.iter().map(EventJson::from).collect(), head };
    serde_json::to_vec(&page).expect("pages serialize")
}

pub fn chats(chats: &[ChatSummary]) -> Value {
    chats.iter().map(|c| json!({ "peer": c.peer, "last": event(&c.last), "unread": c.unread })).collect()
}

pub fn unread(unread: &Unread) -> Value {
    json!({ "total": unread.total, "by_peer": unread.by_peer })
}

fn item(item: &SyncItem) -> Value {
    match item {
        SyncItem::Event(e) => event(e),
        SyncItem::Read { peer, version } => json!({ "type": "chat.read", "peer": peer, "version": version.0 }),
        SyncItem::Typing { from, time_ms } => json!({ "type": "chat.typing", "from": from, "time": time_ms }),
        SyncItem::Flags(flags) => json!({ "type": "flags", "flags": flags }),
    }
}

pub fn sync(reply: &SyncReply) -> Value {
    let mut body = json!({
        "cursor": reply.cursor,
        "events": reply.items.iter().map(item).collect::<Vec<_>>(),
        "unread": unread(&reply.unread),
    });
    if let Some(snapshot) = &reply.snapshot {
        body["feed"] =
            json!({ "events": snapshot.feed.iter().map(event).collect::<Vec<_>>(), "head": snapshot.feed_head.0 });
        body["chats"] = chats(&snapshot.chats);
    }
    if reply.reset {
        body["reset"] = true.into();
    }
    body
}
