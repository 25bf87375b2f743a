//! Authorization across every route of `API.md`, against a real node: without a token, with
//! an expired, forged, unsigned (`alg: none`) or wrong-algorithm one, every authenticated
//! route answers 401; a user's token on a service or operations route answers 403; and
//! nothing of another user's is ever given out. (Issue 9's sweep; the mesh's foreign-CA case
//! is in `mesh.rs`.)

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use crate::harness::{mint, Node, SECRET};

/// Every authenticated route with a request that would succeed for the right caller.
const ROUTES: &[(&str, &str, Option<&str>)] = &[
    ("GET", "/v1/chats", None),
    ("GET", "/v1/chats/bob/messages", None),
    ("POST", "/v1/chats/bob/messages", Some(r#"{"text":"hi"}"#)),
    ("POST", "/v1/chats/bob/typing", Some("{}")),
    ("POST", "/v1/chats/bob/read", Some(r#"{"version":1}"#)),
    ("POST", "/v1/users/bob/flirts", Some("{}")),
    ("POST", "/v1/users/bob/visits", Some("{}")),
    ("GET", "/v1/feed", None),
    ("GET", "/v1/sync?timeout=0", None),
    ("GET", "/v1/online", None),
    ("GET", "/v1/flags", None),
    ("PUT", "/v1/flags/new-inbox", Some(r#"{"percent":10}"#)),
    ("GET", "/v1/streams/orders/events?after=0", None),
    ("POST", "/v1/streams/orders/events", Some(r#"[{"type":"o"}]"#)),
    ("POST", "/v1/admin/backup", Some(r#"{"name":"authz"}"#)),
    ("PUT", "/v1/admin/weight", Some(r#"{"weight":1}"#)),
];

/// Routes only a service token may use.
fn service_only(path: &str) -> bool {
    path.starts_with("/v1/streams/") || path.starts_with("/v1/admin/") || path.starts_with("/v1/flags/")
}

/// A token with any header, signed with `secret` as HS256 (or unsigned).
fn forge(header: &str, claims: &str, secret: Option<&[u8]>) -> String {
    let signing = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims));
    let signature = secret.map_or(String::new(), |secret| {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(signing.as_bytes());
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    });
    format!("{signing}.{signature}")
}

#[test]
fn every_route_refuses_bad_tokens_and_users_on_service_routes() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let far = 4_000_000_000u64;
    let claims = format!(r#"{{"sub":"alice","exp":{far},"svc":true}}"#);
    let bad: Vec<(&str, String)> = vec![
        ("expired", mint("alice", -10, true)),
        ("forged", forge(r#"{"alg":"HS256","typ":"JWT"}"#, &claims, Some(b"another secret, not ours"))),
        ("alg none", forge(r#"{"alg":"none","typ":"JWT"}"#, &claims, None)),
        ("HS512 header", forge(r#"{"alg":"HS512","typ":"JWT"}"#, &claims, Some(SECRET))),
        ("no exp", forge(r#"{"alg":"HS256","typ":"JWT"}"#, r#"{"sub":"alice","svc":true}"#, Some(SECRET))),
        ("garbage", "not.a.token".into()),
    ];
    let mut checked = 0;
    for (method, path, body) in ROUTES {
        let (status, answer) = node.call(method, path, None, *body);
        assert_eq!(status, 401, "{method} {path} without a token: {answer}");
        for (what, token) in &bad {
            let (status, answer) = node.call(method, path, Some(token), *body);
            assert_eq!(status, 401, "{method} {path} with a {what} token: {answer}");
            checked += 1;
        }
        if service_only(path) {
            let (status, answer) = node.call(method, path, Some(&mint("alice", 600, false)), *body);
            assert_eq!(status, 403, "{method} {path} with a user's token: {answer}");
        }
    }
    // The right callers get through (so the refusals above were about the tokens).
    for (method, path, body) in ROUTES {
        let token = mint("alice", 600, service_only(path));
        let (status, answer) = node.call(method, path, Some(&token), *body);
        assert!((200..300).contains(&status), "{method} {path} for its caller: {status} {answer}");
    }
    println!("{checked} bad-token requests refused with 401 over {} routes", ROUTES.len());
    assert_eq!(node.get("/healthz", None).0, 200);
}

#[test]
fn nothing_of_another_user_is_given_out() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let (alice, bob, carol) = (mint("alice", 600, false), mint("bob", 600, false), mint("carol", 600, false));
    assert_eq!(node.post("/v1/chats/bob/messages", Some(&alice), r#"{"text":"for bob only"}"#).0, 201);
    assert_eq!(node.post("/v1/users/bob/flirts", Some(&alice), "{}").0, 201);
    // Carol sees no trace of Alice and Bob's conversation or Bob's feed, whatever she asks.
    for path in ["/v1/chats", "/v1/feed", "/v1/sync?timeout=0", "/v1/chats/alice/messages", "/v1/chats/bob/messages"] {
        let (status, answer) = node.get(path, Some(&carol));
        assert_eq!(status, 200, "{path}: {answer}");
        let text = answer.to_string();
        assert!(!text.contains("for bob only") && !text.contains("flirt"), "{path} leaked: {text}");
    }
    // Bob's cursor in Carol's hands: 403, not his data.
    let (_, fresh) = node.get("/v1/sync?timeout=0", Some(&bob));
    let cursor = fresh["cursor"].as_str().unwrap();
    let (status, answer) = node.get(&format!("/v1/sync?since={cursor}&timeout=0"), Some(&carol));
    assert_eq!(status, 403, "{answer}");
    // A user cannot read or write the reserved streams through the service routes either.
    let service = mint("backend", 600, true);
    for stream in ["inbox:bob", "chat:alice:bob", "feed:bob", "sys:flags"] {
        let (status, _) = node.call("GET", &format!("/v1/streams/{stream}/events?after=0"), Some(&alice), None);
        assert_eq!(status, 403, "a user reading {stream}");
        let body = r#"[{"type":"chat.message","data":{"text":"spoof"}}]"#;
        let (status, answer): (u16, Value) =
            node.call("POST", &format!("/v1/streams/{stream}/events"), Some(&service), Some(body));
        assert!(status == 400 || status == 403, "a service writing {stream}: {status} {answer}");
    }
}
