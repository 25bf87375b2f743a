//! The HTTP contract of `shared/API.md`, against one real node.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{header, mint, ulid, Node};

fn node() -> (tempfile::TempDir, Node) {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    (dir, node)
}

fn send(node: &Node, token: &str, peer: &str, text: &str) -> Value {
    let (status, body) =
        node.post(&format!("/v1/chats/{peer}/messages"), Some(token), &json!({ "text": text }).to_string());
    assert_eq!(status, 201, "{body}");
    body["event"].clone()
}

fn sync(node: &Node, token: &str, since: Option<&str>, timeout: u64) -> Value {
    let path = match since {
        Some(cursor) => format!("/v1/sync?since={cursor}&timeout={timeout}"),
        None => "/v1/sync".to_owned(),
    };
    let (status, body) = node.get(&path, Some(token));
    assert_eq!(status, 200, "{body}");
    body
}

/// A long-poll on another thread; join it for the answer.
fn get_in_background(node: &Node, path: &str, token: &str) -> std::thread::JoinHandle<Value> {
    let (url, token) = (format!("{}{path}", node.url), token.to_owned());
    std::thread::spawn(move || {
        ureq::get(&url).set("Authorization", &format!("Bearer {token}")).call().unwrap().into_json::<Value>().unwrap()
    })
}

#[test]
fn chat_messages_unread_counts_and_read_markers() {
    let (_dir, node) = node();
    let (alice, bob) = (node.token("alice"), node.token("bob"));
    let fresh = sync(&node, &bob, None, 0);
    assert_eq!(fresh["events"], json!([]));
    assert_eq!(fresh["unread"], json!({ "total": 0, "by_peer": {} }));
    assert_eq!(fresh["feed"], json!({ "events": [], "head": 0 }));
    assert_eq!(fresh["chats"], json!([]));

    let id = ulid();
    let body = json!({ "id": id, "text": "hi bob" }).to_string();
    let (status, first) = node.post("/v1/chats/bob/messages", Some(&alice), &body);
    assert_eq!(status, 201, "{first}");
    let event = &first["event"];
    assert_eq!(
        (event["id"].as_str(), event["stream"].as_str(), event["version"].as_u64()),
        (Some(id.as_str()), Some("chat:alice:bob"), Some(1))
    );
    assert_eq!((event["type"].as_str(), event["from"].as_str()), (Some("chat.message"), Some("alice")));
    assert_eq!(event["data"], json!({ "text": "hi bob" }));
    // The same id again, whatever the body: 200 with the stored event.
    let (status, again) =
        node.post("/v1/chats/bob/messages", Some(&alice), &json!({ "id": id, "text": "other" }).to_string());
    assert_eq!((status, &again["event"]), (200, event));
    let (status, again) = node.post("/v1/chats/bob/messages", Some(&alice), &json!({ "id": id }).to_string());
    assert_eq!((status, &again["event"]), (200, event), "even without a text");

    let next = sync(&node, &bob, fresh["cursor"].as_str(), 5);
    assert_eq!(next["events"], json!([event]), "sync unwraps the inbox copy to the message itself");
    assert_eq!(next["unread"], json!({ "total": 1, "by_peer": { "alice": 1 } }));
    let (_, chats) = node.get("/v1/chats", Some(&bob));
    assert_eq!(chats["chats"], json!([{ "peer": "alice", "last": event, "unread": 1 }]));
    // The sender's own read marker moved to their message.
    let (_, chats) = node.get("/v1/chats", Some(&alice));
    assert_eq!(chats["chats"][0]["unread"], 0);

    send(&node, &alice, "bob", "second");
    let (status, page) = node.get("/v1/chats/alice/messages?limit=1", Some(&bob));
    assert_eq!((status, page["head"].as_u64(), page["events"][0]["version"].as_u64()), (200, Some(2), Some(2)));
    let (_, older) = node.get("/v1/chats/alice/messages?before=2", Some(&bob));
    assert_eq!(older["events"], json!([event]));

    assert_eq!(node.post("/v1/chats/alice/read", Some(&bob), r#"{"version": 2}"#).0, 204);
    let (_, chats) = node.get("/v1/chats", Some(&bob));
    assert_eq!(chats["chats"][0]["unread"], 0);
    let after_read = sync(&node, &bob, next["cursor"].as_str(), 5);
    let items = after_read["events"].as_array().unwrap();
    assert_eq!(items.last().unwrap(), &json!({ "type": "chat.read", "peer": "alice", "version": 2 }));
    assert_eq!(after_read["unread"]["total"], 0);
    // Markers only move forward; above the head is an error.
    assert_eq!(node.post("/v1/chats/alice/read", Some(&bob), r#"{"version": 1}"#).0, 204);
    assert_eq!(node.post("/v1/chats/alice/read", Some(&bob), r#"{"version": 3}"#).0, 400);
}

#[test]
fn sync_wakes_within_50ms_of_an_append_and_carries_typing() {
    let (_dir, node) = node();
    let (alice, bob) = (node.token("alice"), node.token("bob"));
    let cursor = sync(&node, &bob, None, 0)["cursor"].as_str().unwrap().to_owned();
    let waiting = {
        let (node_url, bob, cursor) = (node.url.clone(), bob.clone(), cursor.clone());
        std::thread::spawn(move || {
            let response = ureq::get(&format!("{node_url}/v1/sync?since={cursor}&timeout=30"))
                .set("Authorization", &format!("Bearer {bob}"))
                .call()
                .unwrap();
            (Instant::now(), response.into_json::<Value>().unwrap())
        })
    };
    std::thread::sleep(Duration::from_millis(300)); // Let the long-poll settle in.
    let event = send(&node, &alice, "bob", "are you there?");
    let acknowledged = Instant::now();
    let (answered, body) = waiting.join().unwrap();
    let late = answered.saturating_duration_since(acknowledged);
    println!("sync answered {late:?} after the append was acknowledged");
    assert!(late < Duration::from_millis(50), "sync answered {late:?} after the append");
    assert_eq!(body["events"][0]["id"], event["id"]);

    // Typing: a signal, delivered to a waiting sync, never stored.
    let cursor = body["cursor"].as_str().unwrap().to_owned();
    let waiting = get_in_background(&node, &format!("/v1/sync?since={cursor}&timeout=10"), &bob);
    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    assert_eq!(node.post("/v1/chats/bob/typing", Some(&alice), "").0, 204);
    let typed = waiting.join().unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
    let item = &typed["events"][0];
    assert_eq!(
        (item["type"].as_str(), item["from"].as_str(), item.get("version")),
        (Some("chat.typing"), Some("alice"), None)
    );
    let (_, history) = node.get("/v1/chats/alice/messages", Some(&bob));
    assert_eq!(history["head"], 1, "typing is never stored");
    // The signal is not delivered twice from the cursor that carried it.
    let again = sync(&node, &bob, typed["cursor"].as_str(), 0);
    assert_eq!(again["events"], json!([]));
}

#[test]
fn feed_presence_and_flags() {
    let (_dir, node) = node();
    let (alice, bob) = (node.token("alice"), node.token("bob"));
    let (status, flirt) = node.post("/v1/users/bob/flirts", Some(&alice), "{}");
    assert_eq!(status, 201, "{flirt}");
    assert_eq!(
        (flirt["event"]["type"].as_str(), flirt["event"]["stream"].as_str()),
        (Some("feed.flirt"), Some("feed:bob"))
    );
    let id = ulid();
    assert_eq!(node.post("/v1/users/bob/visits", Some(&alice), &json!({ "id": id }).to_string()).0, 201);
    assert_eq!(node.post("/v1/users/bob/visits", Some(&alice), &json!({ "id": id }).to_string()).0, 200);
    let (_, feed) = node.get("/v1/feed", Some(&bob));
    assert_eq!(feed["head"], 2);
    assert_eq!(
        feed["events"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect::<Vec<_>>(),
        ["feed.flirt", "feed.visit"]
    );
    let (_, older) = node.get("/v1/feed?before=2&limit=1", Some(&bob));
    assert_eq!(older["events"][0]["version"], 1);
    let fresh = sync(&node, &bob, None, 0);
    assert_eq!(fresh["feed"], feed);

    let (_, online) = node.get("/v1/online", Some(&alice));
    assert_eq!(online, json!({ "users": ["bob"], "total": 1 }));

    let service = mint("backend", 60, true);
    assert_eq!(node.call("PUT", "/v1/flags/new-inbox", Some(&alice), Some(r#"{"percent": 100}"#)).0, 403);
    assert_eq!(node.call("PUT", "/v1/flags/new-inbox", Some(&service), Some(r#"{"percent": 101}"#)).0, 400);
    assert_eq!(node.call("PUT", "/v1/flags/new-inbox", Some(&service), Some(r#"{"percent": 100}"#)).0, 204);
    assert_eq!(node.call("PUT", "/v1/flags/video-chat", Some(&service), Some(r#"{"percent": 0}"#)).0, 204);
    let (_, flags) = node.get("/v1/flags", Some(&bob));
    assert_eq!(flags, json!({ "flags": { "new-inbox": true, "video-chat": false } }));
    let changed = sync(&node, &bob, fresh["cursor"].as_str(), 0);
    assert_eq!(changed["events"], json!([{ "type": "flags", "flags": { "new-inbox": true, "video-chat": false } }]));
}

#[test]
fn generic_streams_for_services() {
    let (_dir, node) = node();
    let service = mint("backend", 60, true);
    let user = node.token("alice");
    let ids = [ulid(), ulid()];
    let body =
        json!([{ "id": ids[0], "type": "order.placed", "data": { "n": 1 } }, { "id": ids[1], "type": "order.paid" }])
            .to_string();
    let (status, appended) = node.post("/v1/streams/orders:7/events", Some(&service), &body);
    assert_eq!(status, 201, "{appended}");
    assert_eq!(appended["events"][1]["version"], 2);
    assert_eq!(appended["events"][0]["data"], json!({ "n": 1 }));
    assert_eq!(node.post("/v1/streams/orders:7/events", Some(&service), &body).0, 200, "all known: 200");
    // The same known id twice in one request: both answers are the stored event.
    let twice = json!([{ "id": ids[0], "type": "x" }, { "id": ids[0], "type": "x" }]).to_string();
    let (status, both) = node.post("/v1/streams/orders:7/events", Some(&service), &twice);
    assert_eq!((status, &both["events"][0], &both["events"][1]), (200, &appended["events"][0], &appended["events"][0]));
    assert_eq!(node.post("/v1/streams/orders:7/events", Some(&user), &body).0, 403);
    for reserved in ["chat:a:b", "inbox:a", "feed:a", "sys:flags"] {
        assert_eq!(node.post(&format!("/v1/streams/{reserved}/events"), Some(&service), &body).0, 403, "{reserved}");
    }
    let (_, page) = node.get("/v1/streams/orders:7/events?after=1", Some(&service));
    assert_eq!((page["events"][0]["version"].as_u64(), page["head"].as_u64()), (Some(2), Some(2)));
    assert_eq!(node.get("/v1/streams/orders:7/events?after=1&before=2", Some(&service)).0, 400);

    let waiting = get_in_background(&node, "/v1/streams/orders:7/events?after=2&wait=10", &service);
    std::thread::sleep(Duration::from_millis(200));
    node.post("/v1/streams/orders:7/events", Some(&service), r#"[{"type": "order.shipped"}]"#);
    let woke = waiting.join().unwrap();
    assert_eq!(woke["events"][0]["type"], "order.shipped");
}

#[test]
fn every_error_case_of_the_contract() {
    let (_dir, node) = node();
    let alice = node.token("alice");
    let bob = node.token("bob");
    let check = |method: &str, path: &str, token: Option<&str>, body: Option<&str>, status: u16, code: &str| {
        let (got, body) = node.call(method, path, token, body);
        assert_eq!((got, body["error"]["code"].as_str().unwrap_or("")), (status, code), "{method} {path}: {body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    };
    let expired = mint("alice", -1, false);
    let forged = web::auth::mint(
        b"not the secret at all",
        &web::auth::Claims { sub: "alice".into(), exp: u64::MAX / 2, svc: true },
    );
    check("POST", "/v1/chats/bob/messages", Some(&alice), Some("{not json"), 400, "bad_request");
    check("POST", "/v1/chats/bob/messages", Some(&alice), Some(r#"{"text": 5}"#), 400, "bad_request");
    check("POST", "/v1/chats/bob/messages", Some(&alice), Some(r#"{"id": "nope", "text": "x"}"#), 400, "bad_request");
    check("GET", "/v1/chats", None, None, 401, "unauthorized");
    check("GET", "/v1/chats", Some("garbage"), None, 401, "unauthorized");
    check("GET", "/v1/chats", Some(&expired), None, 401, "unauthorized");
    check("GET", "/v1/chats", Some(&forged), None, 401, "unauthorized");
    check("POST", "/v1/chats/alice/messages", Some(&alice), Some(r#"{"text": "me"}"#), 400, "bad_request");
    check(
        "POST",
        "/v1/chats/bob/messages",
        Some(&alice),
        Some(&json!({ "text": "x".repeat(2001) }).to_string()),
        400,
        "bad_request",
    );
    check("POST", "/v1/chats/bob/messages", Some(&alice), Some(r#"{"text": ""}"#), 400, "bad_request");
    // 2000 characters of four bytes each: counted in characters, not bytes.
    assert_eq!(
        node.post("/v1/chats/bob/messages", Some(&alice), &json!({ "text": "😀".repeat(2000) }).to_string()).0,
        201
    );
    check(
        "POST",
        "/v1/chats/bob/messages",
        Some(&alice),
        Some(&json!({ "text": "y".repeat(70_000) }).to_string()),
        413,
        "too_large",
    );
    check("GET", "/v1/nowhere", None, None, 404, "not_found");
    check("GET", "/v1/nowhere", Some(&alice), None, 404, "not_found");
    check("DELETE", "/v1/chats", Some(&alice), None, 404, "not_found");
    check("GET", "/v1/chats?limit=0", Some(&alice), None, 400, "bad_request");
    check("GET", "/v1/chats?limit=101", Some(&alice), None, 400, "bad_request");
    check("GET", "/v1/feed?before=0", Some(&alice), None, 400, "bad_request");
    check("GET", "/v1/feed?before=2", Some(&alice), None, 400, "bad_request"); // The feed is empty.
    assert_eq!(node.get("/v1/feed?before=1", Some(&alice)).0, 200, "before = head + 1 is the newest page");
    let service = mint("backend", 60, true);
    check("GET", "/v1/streams/empty/events?after=1&wait=1", Some(&service), None, 400, "bad_request");
    check("GET", "/v1/sync?timeout=61", Some(&alice), None, 400, "bad_request");
    check("GET", "/v1/chats/bo%20b/messages", Some(&alice), None, 400, "bad_request");
    check("GET", "/v1/streams/x/events", Some(&alice), None, 403, "forbidden");
    check("POST", "/v1/dev/token", None, Some(r#"{"user": "no spaces"}"#), 400, "bad_request");
    // Another user's valid cursor: 403, never their data.
    let bobs = sync(&node, &bob, None, 0)["cursor"].as_str().unwrap().to_owned();
    check("GET", &format!("/v1/sync?since={bobs}"), Some(&alice), None, 403, "forbidden");
    // A cursor that does not decode: 200 with reset.
    let reset = sync(&node, &alice, Some("AAAAbogus"), 0);
    assert_eq!(reset["reset"], true);
    assert!(reset["cursor"].is_string() && reset["feed"].is_object() && reset["chats"].is_array());
    // Nothing above panicked the node.
    assert_eq!(node.get("/healthz", None).0, 200);
}

#[test]
fn long_polls_are_capped_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("griddle.toml");
    std::fs::write(&config, "long_polls_max = 2\n").unwrap();
    let node = Node::start_with(&dir.path().join("data"), &["--config", config.to_str().unwrap()]);
    let token = node.token("alice");
    let cursor = sync(&node, &token, None, 0)["cursor"].as_str().unwrap().to_owned();
    let holders: Vec<_> = (0..2)
        .map(|_| {
            let (url, token, cursor) = (node.url.clone(), token.clone(), cursor.clone());
            std::thread::spawn(move || {
                ureq::get(&format!("{url}/v1/sync?since={cursor}&timeout=3"))
                    .set("Authorization", &format!("Bearer {token}"))
                    .call()
                    .map(|r| r.status())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let (status, headers, _) = node.raw("GET", &format!("/v1/sync?since={cursor}&timeout=3"), Some(&token), None, &[]);
    assert_eq!(status, 429);
    assert_eq!(header(&headers, "retry-after"), Some("1"));
    for holder in holders {
        assert_eq!(holder.join().unwrap().unwrap(), 200, "held long-polls time out normally");
    }
}

#[test]
fn cors_for_loopback_origins_in_dev() {
    let (_dir, node) = node();
    let (status, headers, _) = node.raw(
        "OPTIONS",
        "/v1/chats/bob/messages",
        None,
        None,
        &[("Origin", "http://127.0.0.1:5173"), ("Access-Control-Request-Method", "POST")],
    );
    assert_eq!(status, 204);
    assert_eq!(header(&headers, "access-control-allow-origin"), Some("http://127.0.0.1:5173"));
    assert!(header(&headers, "access-control-allow-methods").unwrap().contains("POST"));
    assert!(header(&headers, "access-control-allow-headers").unwrap().contains("authorization"));
    let (_, headers, _) = node.raw("GET", "/healthz", None, None, &[("Origin", "http://evil.example")]);
    assert_eq!(header(&headers, "access-control-allow-origin"), None);
    let (status, headers, body) = node.raw("GET", "/", None, None, &[]);
    assert_eq!(status, 200);
    assert!(header(&headers, "content-type").unwrap().starts_with("text/html"));
    assert!(body.contains("app.js"));
}

#[test]
fn griddle_token_mints_tokens_the_node_accepts() {
    let (_dir, node) = node();
    let mint = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_griddle")).arg("token").args(args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let user = mint(&["--dev", "--user", "carol", "--ttl", "5m"]);
    assert_eq!(node.get("/v1/chats", Some(&user)).0, 200);
    assert_eq!(node.get("/v1/streams/s/events", Some(&user)).0, 403);
    let service = mint(&["--dev", "--user", "backend", "--svc"]);
    assert_eq!(node.get("/v1/streams/s/events", Some(&service)).0, 200);
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_griddle"))
        .args(["token", "--user", "x"])
        .env_remove("GRIDDLE_JWT_SECRET")
        .output()
        .unwrap();
    assert!(!refused.status.success(), "without --dev a secret must be configured");
}
