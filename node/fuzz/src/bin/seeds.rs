//! Writes the seed corpora (`seeds/<target>/`): a few valid inputs per target, made by the
//! real encoders, so the fuzzer starts past the first checks. Run from `node/fuzz`:
//! `cargo run --features seeds --bin seeds`.

use std::fs;
use std::path::Path;

use gossip::wire::{frame, Kind};
use gossip::{Membership, NodeId, Profile};
use griddle_fuzz::{event, identity, write_packets, HttpInput, NOW_SECS, SECRET};
use node_core::api::{CoreError, FeedKind, NewEvent, Reply, Request};
use node_core::repl::{encode_msgs, Conf, Entry, Epoch, LogId, Member, Msg, Payload};
use store::cursor::SyncCursor;
use store::{encode_event, EventId, StreamName, Version, WriteBatch};
use web::auth::{mint, Claims};

fn write(target: &str, seeds: Vec<Vec<u8>>) {
    let dir = Path::new("seeds").join(target);
    fs::create_dir_all(&dir).expect("corpus dir");
    for (i, seed) in seeds.iter().enumerate() {
        fs::write(dir.join(format!("seed-{i:02}")), seed).expect("write seed");
    }
}

fn epoch(counter: u64, node: &str) -> Epoch {
    Epoch { counter, node: node.into() }
}

fn repl_wire() -> Vec<Vec<u8>> {
    let conf = Conf {
        members: vec![
            Member { node: "n1".into(), storage: 9, voter: true },
            Member { node: "n2".into(), storage: 4, voter: true },
            Member { node: "n4".into(), storage: 0, voter: false },
        ],
    };
    let start = Entry { epoch: epoch(4, "n2"), payload: Payload::Conf { conf, start: true } };
    let batch = WriteBatch {
        events: vec![event("chat:alice:bob", 7, "message", r#"{"text":"hi"}"#), event("inbox:bob", 3, "copy", "{}")],
        meta: vec![(b"copy:x".to_vec(), Some(b"1".to_vec())), (b"gone".to_vec(), None)],
    };
    let data = Entry { epoch: epoch(4, "n2"), payload: Payload::Data(batch) };
    let last = LogId { epoch: epoch(4, "n2"), index: 12 };
    let e = || epoch(5, "n3");
    vec![
        encode_msgs(&[Msg::Prepare { part: 1, epoch: e() }]),
        encode_msgs(&[Msg::Promise {
            part: 1,
            epoch: e(),
            storage: 77,
            last: last.clone(),
            commit: 11,
            established: true,
            seen: vec!["n1".into(), "n4".into()],
        }]),
        encode_msgs(&[Msg::Refuse { part: 2, promised: epoch(6, "n1"), outsider: true }]),
        encode_msgs(&[
            Msg::Fetch { part: 3, epoch: e(), from: 4 },
            Msg::Entries { part: 3, epoch: e(), from: 4, entries: vec![start.clone(), data.clone()], last },
        ]),
        encode_msgs(&[Msg::Append {
            part: 4,
            epoch: e(),
            prev: LogId::default(),
            entries: vec![start, data],
            commit: 0,
        }]),
        encode_msgs(&[
            Msg::Ack { part: 4, epoch: e(), storage: 77, matched: 1 },
            Msg::Nack { part: 4, epoch: e(), storage: 77, commit: 0 },
            Msg::Heartbeat { part: 4, epoch: e(), round: 9 },
            Msg::HeartbeatAck { part: 4, epoch: e(), storage: 77, round: 9 },
        ]),
    ]
}

fn event_codec() -> Vec<Vec<u8>> {
    vec![
        encode_event(&event("chat:alice:bob", 1, "message", r#"{"text":"hi \u00fc"}"#)),
        encode_event(&event("chat:alice:bob", 9, "", "")),
        encode_event(&event("chat:alice:bob", u64::MAX, "feed.flirt", r#"{"from":"bob"}"#)),
    ]
}

fn cursor() -> Vec<Vec<u8>> {
    let cursor = SyncCursor {
        user: "alice".into(),
        generation: 1,
        inbox: Version(5),
        feed: Version(9),
        flags: Version(0),
        signals_after: NOW_SECS * 1_000_000,
    };
    let mut fields = vec![1];
    for n in [1u64, 5, 9, 0, NOW_SECS * 1_000_000] {
        fields.extend_from_slice(&n.to_be_bytes());
    }
    fields.extend_from_slice(b"alice");
    let mut text = vec![0];
    text.extend_from_slice(cursor.seal(SECRET).as_bytes());
    vec![text, fields]
}

fn token() -> Vec<Vec<u8>> {
    let mut raw = vec![0];
    raw.extend_from_slice(mint(SECRET, &Claims { sub: "alice".into(), exp: NOW_SECS + 60, svc: false }).as_bytes());
    let signed = |header: &str, payload: &str| [&[1][..], header.as_bytes(), &[0xff], payload.as_bytes()].concat();
    let mut minted = vec![2];
    minted.extend_from_slice(&(NOW_SECS + 60).to_be_bytes());
    minted.push(1);
    minted.extend_from_slice(b"backend");
    vec![
        raw,
        signed(r#"{"alg":"HS256","typ":"JWT"}"#, r#"{"sub":"alice","exp":1863776800}"#),
        signed(r#"{"alg":"HS256"}"#, r#"{"sub":"svc-1","exp":1863776800.5,"svc":true}"#),
        signed(r#"{"alg":"none"}"#, r#"{"sub":"alice","exp":1}"#),
        minted,
    ]
}

fn forward() -> Vec<Vec<u8>> {
    let stream = StreamName::new("orders:42").expect("valid");
    let requests = [
        Request::PostMessage { user: "alice".into(), peer: "bob".into(), id: Some(EventId(7)), text: "hi".into() },
        Request::Sync { user: "alice".into(), since: Some("AQAB".into()), timeout_ms: 30_000 },
        Request::PostFeed { user: "bob".into(), target: "alice".into(), id: None, kind: FeedKind::Flirt },
        Request::StreamAppend {
            stream: stream.clone(),
            events: vec![NewEvent { id: None, kind: "order.placed".into(), data: r#"{"n":1}"#.into() }],
            from: "backend".into(),
        },
        Request::StreamRead { stream, after: Some(Version(3)), before: None, limit: 50, wait_ms: 0, local: true },
    ];
    let replies = [
        Reply::Appended { event: event("chat:alice:bob", 7, "message", r#"{"text":"hi"}"#), created: true },
        Reply::Page { events: vec![event("feed:alice", 3, "feed.flirt", "{}")], head: Version(3) },
        Reply::Online { users: vec!["alice".into()], total: 1 },
        Reply::Error(CoreError::Overloaded("busy".into())),
    ];
    let json = |tag: u8, value: Vec<u8>| [vec![tag], value].concat();
    let mut seeds: Vec<Vec<u8>> =
        requests.iter().map(|r| json(0, serde_json::to_vec(r).expect("serializes"))).collect();
    seeds.extend(replies.iter().map(|r| json(1, serde_json::to_vec(r).expect("serializes"))));
    seeds
}

/// Real SWIM traffic: `n2` joins `n1` (the target's machine) and they talk for a while; the
/// packets `n2` sent, in order, make one seed, and a leave another.
fn gossip_wire() -> Vec<Vec<u8>> {
    let mut now = 10_000;
    let me = identity("n1", 7001);
    let peer = identity("n2", 7002);
    let mut n1 = Membership::new(me.clone(), vec![peer.mesh_addr], Profile::default(), 1, now);
    let mut n2 = Membership::new(peer.clone(), vec![me.mesh_addr], Profile::default(), 2, now);
    let (id1, id2) = (NodeId::new("n1").expect("valid"), NodeId::new("n2").expect("valid"));
    let mut sent: Vec<Vec<u8>> = Vec::new();
    for _ in 0..12 {
        while let Some(t) = n2.poll_transmit() {
            if t.to == me.mesh_addr {
                let _ = n1.handle_packet(now, &id2, &t.bytes);
                sent.push(t.bytes);
            }
        }
        while let Some(t) = n1.poll_transmit() {
            if t.to == peer.mesh_addr {
                let _ = n2.handle_packet(now, &id1, &t.bytes);
            }
        }
        now += 400;
        n1.tick(now);
        n2.tick(now);
    }
    assert!(!sent.is_empty(), "n2 talked to n1");
    let talk: Vec<(bool, u64, &[u8])> = sent.iter().take(10).map(|b| (true, 400, b.as_slice())).collect();
    let first: Vec<(bool, u64, &[u8])> = sent.iter().take(1).map(|b| (true, 0, b.as_slice())).collect();
    let leave = frame(Kind::Leave, b"n2");
    vec![write_packets(&first), write_packets(&talk), write_packets(&[(true, 1600, &leave)])]
}

fn http() -> Vec<Vec<u8>> {
    let request = |method, target, headers: &[(&'static str, &'static str)], body: &'static [u8]| {
        HttpInput { loopback: false, dev: false, reply: 1, method, target, headers: headers.to_vec(), body }.write()
    };
    let user = [("authorization", "Bearer @alice")];
    let svc = [("authorization", "Bearer @svc:backend"), ("content-type", "application/json")];
    let mut dev = request("POST", "/v1/dev/token", &[], br#"{"user":"alice"}"#);
    dev[0] |= 2;
    let mut ops = request("GET", "/metrics", &[], b"");
    ops[0] |= 1;
    vec![
        request("GET", "/v1/chats/bob/messages?before=10&limit=20", &user, b""),
        request("POST", "/v1/chats/bob/messages", &user, br#"{"id":"01JD0000000000000000000000","text":"hi"}"#),
        request("POST", "/v1/chats/bob/read", &user, br#"{"version":3}"#),
        request(
            "POST",
            "/v1/users/bob/flirts",
            &[("authorization", "Bearer @alice"), ("origin", "https://app.example")],
            b"",
        ),
        request("GET", "/v1/sync?since=AQAB&timeout=5", &user, b""),
        request("GET", "/v1/feed?limit=5", &[("authorization", "Bearer @expired")], b""),
        request("PUT", "/v1/flags/new_ui", &svc, br#"{"percent":50}"#),
        request("POST", "/v1/streams/orders:42/events", &svc, br#"[{"id":null,"type":"order","data":{"n":1}}]"#),
        request("GET", "/v1/streams/orders:42/events?after=3&wait=0&local=true", &svc, b""),
        request("OPTIONS", "/v1/chats", &[("origin", "http://localhost:8080")], b""),
        request("PUT", "/v1/admin/weight", &svc, br#"{"weight":0.5}"#),
        request("GET", "/v1/online?limit=100", &user, b""),
        request("POST", "/v1/chats/bob/typing", &[("authorization", "Bearer not.a.token")], b""),
        dev,
        ops,
    ]
}

fn main() {
    write("repl_wire", repl_wire());
    write("event_codec", event_codec());
    write("cursor", cursor());
    write("token", token());
    write("forward", forward());
    write("gossip_wire", gossip_wire());
    write("http", http());
}
