//! HTTP request handling: `web`'s connection service minus the socket (CORS, the route
//! table, method checks, query parsing, body limits, tokens, parameter checks, `Request`
//! building, rendering, metrics), with fuzzed method, target, headers and body (input
//! layout: `griddle_fuzz::HttpInput`), against a backend that checks every `Request` it is
//! handed and answers a fixed reply. Never a panic, never a 5xx but the backend's 503, and
//! every error a JSON `{"error": {"code", "message"}}`.
#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;

use bytes::Bytes;
use griddle_fuzz::{authorization, FixedBackend, HttpInput, SECRET};
use http_body_util::{BodyExt, Full};
use libfuzzer_sys::fuzz_target;
use web::WebConfig;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime"))
}

fn config(dev: bool) -> &'static WebConfig {
    static CONFIGS: OnceLock<[WebConfig; 2]> = OnceLock::new();
    let make = |dev| WebConfig {
        jwt_secret: SECRET.to_vec(),
        dev,
        cors_origins: vec!["https://app.example".into()],
        ..WebConfig::default()
    };
    &CONFIGS.get_or_init(|| [make(false), make(true)])[usize::from(dev)]
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = HttpInput::parse(data) else { return };
    let mut request = hyper::Request::builder().method(input.method).uri(input.target);
    let (mut user, mut seen_authorization) = (None, false);
    for (name, value) in &input.headers {
        if name.eq_ignore_ascii_case("authorization") {
            let (value, named) = authorization(value);
            // The first of several is the one read.
            if !seen_authorization {
                (user, seen_authorization) = (named, true);
            }
            request = request.header(*name, value);
        } else {
            request = request.header(*name, *value);
        }
    }
    // What hyper itself refuses to parse (a bad method, target or header) never reaches us.
    let Ok(request) = request.body(Full::new(Bytes::copy_from_slice(input.body))) else { return };

    let backend = FixedBackend { reply: input.reply, user };
    let calls = tokio::sync::Semaphore::new(4);
    let peer: SocketAddr = if input.loopback { ([127, 0, 0, 1], 5000).into() } else { ([192, 0, 2, 1], 5000).into() };
    let response = runtime().block_on(web::fuzzing::handle(&backend, config(input.dev), &calls, peer, request));

    let status = response.status().as_u16();
    let body = runtime().block_on(response.into_body().collect()).expect("a full body").to_bytes();
    assert!(status < 500 || status == 503, "status {status}: {body:?}");
    if status >= 400 {
        let error: serde_json::Value = serde_json::from_slice(&body).expect("errors are JSON");
        assert!(error["error"]["code"].is_string() && error["error"]["message"].is_string(), "{error}");
    }
});
