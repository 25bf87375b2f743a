//! Shared by the fuzz targets and the seed writer (`src/bin/seeds.rs`): the mesh identities
//! the gossip target talks as, the sample values seeds are encoded from, and the HTTP
//! target's input shape and backend.
//!
//! Every target calls the real decoder or handler; where an encoder exists it asserts the
//! round trip. A target panics only on a broken promise, which is what libFuzzer reports.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use gossip::{Identity, NodeId};
use node_core::api::{CoreError, Reply, Request, SyncReply, Unread, PAGE_LEN_MAX};
use store::{Event, EventId, StreamName, Version};

/// The cluster secret of the cursor and token targets.
pub const SECRET: &[u8] = b"fuzzing-secret-of-enough-bytes";
/// The clock of the token and HTTP targets, seconds since the Unix epoch.
pub const NOW_SECS: u64 = 1_763_776_800;

/// The node a gossip target's machine runs as (`n1`) and the peer its packets come from.
pub fn identity(id: &str, port: u16) -> Identity {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    Identity {
        id: NodeId::new(id).expect("valid id"),
        mesh_addr: addr,
        http_addr: addr,
        weight_milli: 1000,
        bump: Identity::first_bump(1_000),
    }
}

pub fn event(stream: &str, version: u64, kind: &str, data: &str) -> Event {
    Event {
        id: EventId(0x0198_0000_0000_0000_0000_0000_0000_0000 | u128::from(version)),
        stream: StreamName::new(stream).expect("valid stream"),
        version: Version(version),
        kind: kind.into(),
        from: "alice".into(),
        time_ms: NOW_SECS * 1000,
        data: data.into(),
    }
}

/// One HTTP request as the HTTP target reads it from fuzzed bytes: a flags byte (bit 0:
/// from loopback, inside `ops_allow`; bit 1: `dev`; bits 2..: which reply the backend gives),
/// then the request in HTTP/1.1's own shape, `\n` for line ends:
/// `METHOD TARGET\nname: value\n...\n\nbody`. An `authorization` value `Bearer @user` or
/// `Bearer @svc:user` becomes a valid token for that user (a fuzzer cannot sign one), and
/// `Bearer @expired` an expired one.
#[derive(Debug, PartialEq)]
pub struct HttpInput<'a> {
    pub loopback: bool,
    pub dev: bool,
    pub reply: u8,
    pub method: &'a str,
    pub target: &'a str,
    pub headers: Vec<(&'a str, &'a str)>,
    pub body: &'a [u8],
}

impl<'a> HttpInput<'a> {
    pub fn parse(data: &'a [u8]) -> Option<HttpInput<'a>> {
        let (&flags, rest) = data.split_first()?;
        let head_len = rest.windows(2).position(|w| w == b"\n\n").unwrap_or(rest.len());
        let head = std::str::from_utf8(&rest[..head_len]).ok()?;
        let body = rest.get(head_len + 2..).unwrap_or_default();
        let mut lines = head.split('\n');
        let (method, target) = lines.next()?.split_once(' ')?;
        let headers = lines.filter_map(|line| line.split_once(':').map(|(n, v)| (n, v.trim_start()))).collect();
        Some(HttpInput {
            loopback: flags & 1 != 0,
            dev: flags & 2 != 0,
            reply: flags >> 2,
            method,
            target,
            headers,
            body,
        })
    }

    pub fn write(&self) -> Vec<u8> {
        let flags = u8::from(self.loopback) | u8::from(self.dev) << 1 | self.reply << 2;
        let mut out = vec![flags];
        out.extend_from_slice(format!("{} {}\n", self.method, self.target).as_bytes());
        for (name, value) in &self.headers {
            out.extend_from_slice(format!("{name}: {value}\n").as_bytes());
        }
        out.extend_from_slice(b"\n");
        out.extend_from_slice(self.body);
        out
    }
}

/// The user of a `Bearer @…` token whose user is not a valid id.
pub const DEFAULT_USER: &str = "alice";

/// What an `authorization` value of [`HttpInput`] stands for: the header to send, and the
/// user a valid token names.
pub fn authorization(value: &str) -> (String, Option<String>) {
    use web::auth::{mint, Claims};
    let Some(wanted) = value.strip_prefix("Bearer @") else { return (value.to_owned(), None) };
    let (sub, exp, svc) = match wanted {
        "expired" => ("bob", NOW_SECS, true),
        _ => match wanted.strip_prefix("svc:") {
            Some(user) => (user, NOW_SECS + 60, true),
            None => (wanted, NOW_SECS + 60, false),
        },
    };
    let sub = if node_core::social::valid_user(sub) { sub } else { DEFAULT_USER };
    let token = mint(SECRET, &Claims { sub: sub.into(), exp, svc });
    (format!("Bearer {token}"), (exp > NOW_SECS).then(|| sub.to_owned()))
}

/// Splits the gossip target's input into packets: each `[flags][len: u16 BE][bytes]`, flags
/// bit 0 = from `n2` (else from `n3`), the rest = milliseconds to let pass after it / 16.
pub fn packets(mut data: &[u8]) -> Vec<(bool, u64, &[u8])> {
    let mut out = Vec::new();
    while let [flags, hi, lo, rest @ ..] = data {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(rest.len());
        out.push((flags & 1 != 0, u64::from(flags >> 1) * 16, &rest[..len]));
        data = &rest[len..];
    }
    out
}

pub fn write_packets(packets: &[(bool, u64, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (from_n2, wait_ms, bytes) in packets {
        let flags = u8::from(*from_n2) | u8::try_from(wait_ms / 16).expect("short waits") << 1;
        out.push(flags);
        out.extend_from_slice(&u16::try_from(bytes.len()).expect("small packets").to_be_bytes());
        out.extend_from_slice(bytes);
    }
    out
}

/// A backend with fixed answers that checks what the HTTP layer hands it: the promises of
/// `web` are that parameters reach the core in range, never clamped, and from the token's user.
pub struct FixedBackend {
    pub reply: u8,
    /// The user the request's token names, if it is valid.
    pub user: Option<String>,
}

impl FixedBackend {
    fn check(&self, request: &Request) {
        use node_core::social::valid_user;
        let user_ok = |user: &str| Some(user) == self.user.as_deref();
        match request {
            Request::PostMessage { user, peer, .. }
            | Request::Typing { user, peer }
            | Request::MarkRead { user, peer, .. } => assert!(user_ok(user) && valid_user(peer), "{request:?}"),
            Request::Messages { user, peer, limit, before } => {
                assert!(user_ok(user) && valid_user(peer) && (1..=PAGE_LEN_MAX).contains(limit), "{request:?}");
                assert_ne!(*before, Some(Version(0)), "before starts at 1");
            }
            Request::Chats { user, limit, .. } | Request::Feed { user, limit, .. } => {
                assert!(user_ok(user) && (1..=PAGE_LEN_MAX).contains(limit), "{request:?}")
            }
            Request::PostFeed { user, target, .. } => assert!(user_ok(user) && valid_user(target), "{request:?}"),
            Request::Sync { user, timeout_ms, .. } => assert!(user_ok(user) && *timeout_ms <= 60_000, "{request:?}"),
            Request::Online { limit } => assert!((1..=PAGE_LEN_MAX).contains(limit), "{request:?}"),
            Request::Flags { user } => assert!(user_ok(user), "{request:?}"),
            Request::SetFlag { percent, from, .. } => assert!(*percent <= 100 && user_ok(from), "{request:?}"),
            Request::StreamAppend { events, from, .. } => {
                assert!(user_ok(from) && (1..=PAGE_LEN_MAX).contains(&events.len()), "{request:?}");
                for e in events {
                    assert!(serde_json::from_str::<serde_json::Value>(&e.data).is_ok(), "data is JSON: {e:?}");
                }
            }
            Request::StreamRead { after, before, limit, wait_ms, local, .. } => {
                assert!(after.is_none() || before.is_none(), "{request:?}");
                assert!((1..=PAGE_LEN_MAX).contains(limit) && *wait_ms <= 60_000, "{request:?}");
                assert!(!(*local && *wait_ms > 0), "{request:?}");
            }
            Request::Deliver { .. } => panic!("no route builds Deliver: {request:?}"),
        }
    }

    fn answer(&self) -> Reply {
        let feed = || event("feed:alice", 3, "feed.flirt", r#"{"from":"bob"}"#);
        match self.reply % 6 {
            0 => Reply::Done,
            1 => Reply::Appended {
                event: event("chat:alice:bob", 7, "message", r#"{"text":"hi \u00fc"}"#),
                created: true,
            },
            2 => Reply::Page { events: vec![feed()], head: Version(3) },
            3 => Reply::Sync(SyncReply {
                cursor: "abc".into(),
                items: vec![node_core::api::SyncItem::Event(feed())],
                unread: Unread { total: 1, by_peer: BTreeMap::from([("bob".into(), 1)]) },
                snapshot: None,
                reset: false,
            }),
            4 => Reply::Error(CoreError::Overloaded("busy".into())),
            _ => Reply::Error(CoreError::NotFound("no such thing".into())),
        }
    }
}

impl web::Backend for FixedBackend {
    async fn call(&self, request: Request) -> Reply {
        self.check(&request);
        self.answer()
    }
    fn now_ms(&self) -> u64 {
        NOW_SECS * 1000
    }
    fn ready(&self) -> bool {
        self.reply.is_multiple_of(2)
    }
    fn cluster(&self) -> web::ClusterView {
        web::ClusterView {
            node: "n1".into(),
            members: Vec::new(),
            partitions: web::PartitionView {
                count: 16,
                replicas: 1,
                primary_here: 16,
                replica_here: 16,
                learner_here: 0,
                lagging: 0,
                lag_max: 0,
                under_replicated: 0,
            },
        }
    }
    fn metrics(&self) -> String {
        "# EOF\n".into()
    }
    async fn admin(&self, call: web::AdminCall) -> Result<serde_json::Value, web::ApiError> {
        match call {
            web::AdminCall::Backup { name } => {
                assert!(!name.is_empty() && !name.contains('/') && !name.starts_with('.'), "{name:?}");
            }
            web::AdminCall::Weight { weight } => assert!((0.0..=1.0).contains(&weight), "{weight}"),
        }
        Ok(serde_json::json!({}))
    }
}
