//! Routes: matching a path (before auth, so an unknown route is 404 with or without a token),
//! checking the caller and the parameters, and turning the request into a core `Request`.

use std::collections::HashMap;
use std::net::IpAddr;

use bytes::Bytes;
use hyper::Method;
use serde::Deserialize;
use serde_json::{json, value::RawValue, Value};

use node_core::api::{FeedKind, NewEvent, Reply, Request, PAGE_LEN_MAX};
use node_core::social::valid_user;
use store::{EventId, StreamName, Version};

use crate::auth::{self, Claims};
use crate::{render, AdminCall, ApiError, Backend, WebConfig};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    Asset(&'static str, &'static str),
    Healthz,
    Readyz,
    Metrics,
    Cluster,
    /// Operations on this node (`backup`, `weight`): a service token, always.
    Admin(&'static str),
    DevToken,
    Messages(String),
    Typing(String),
    Read(String),
    Chats,
    Flirts(String),
    Visits(String),
    Feed,
    Sync,
    Online,
    Flags,
    Flag(String),
    Stream(String),
}

const GET: &[Method] = &[Method::GET];
const POST: &[Method] = &[Method::POST];
const GET_POST: &[Method] = &[Method::GET, Method::POST];
const PUT: &[Method] = &[Method::PUT];

/// The route a path names and the methods it takes, or `None` for an unknown route.
pub fn resolve(path: &str) -> Option<(Route, &'static [Method])> {
    if let Some((kind, body)) = crate::assets::find(path) {
        return Some((Route::Asset(kind, body), GET));
    }
    let segments: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
    let own = |s: &str| s.to_owned();
    Some(match segments.as_slice() {
        ["healthz"] => (Route::Healthz, GET),
        ["readyz"] => (Route::Readyz, GET),
        ["metrics"] => (Route::Metrics, GET),
        ["v1", "cluster"] => (Route::Cluster, GET),
        ["v1", "admin", "backup"] => (Route::Admin("backup"), POST),
        ["v1", "admin", "weight"] => (Route::Admin("weight"), PUT),
        ["v1", "dev", "token"] => (Route::DevToken, POST),
        ["v1", "chats"] => (Route::Chats, GET),
        ["v1", "chats", peer, "messages"] => (Route::Messages(own(peer)), GET_POST),
        ["v1", "chats", peer, "typing"] => (Route::Typing(own(peer)), POST),
        ["v1", "chats", peer, "read"] => (Route::Read(own(peer)), POST),
        ["v1", "users", target, "flirts"] => (Route::Flirts(own(target)), POST),
        ["v1", "users", target, "visits"] => (Route::Visits(own(target)), POST),
        ["v1", "feed"] => (Route::Feed, GET),
        ["v1", "sync"] => (Route::Sync, GET),
        ["v1", "online"] => (Route::Online, GET),
        ["v1", "flags"] => (Route::Flags, GET),
        ["v1", "flags", name] => (Route::Flag(own(name)), PUT),
        ["v1", "streams", stream, "events"] => (Route::Stream(own(stream)), GET_POST),
        _ => return None,
    })
}

/// What a handler answers with, before headers are added.
pub enum Answer {
    Json(u16, Vec<u8>),
    Text(&'static str, String),
    Static(&'static str, &'static str),
    NoContent,
}

fn json(status: u16, value: &Value) -> Answer {
    Answer::Json(status, serde_json::to_vec(value).expect("values serialize"))
}

pub struct Call<'a, B> {
    pub backend: &'a B,
    pub config: &'a WebConfig,
    /// Calls in flight on this node (long-polls aside); none free means 429 at once.
    pub calls: &'a tokio::sync::Semaphore,
    pub peer: IpAddr,
    pub method: Method,
    pub query: HashMap<String, String>,
    pub authorization: Option<&'a str>,
    pub body: Bytes,
}

impl<B: Backend> Call<'_, B> {
    pub async fn run(self, route: Route) -> Result<Answer, ApiError> {
        match route {
            Route::Asset(kind, body) => Ok(Answer::Static(kind, body)),
            Route::Healthz => Ok(json(200, &json!({"status": "ok"}))),
            Route::Readyz if self.backend.ready() => Ok(json(200, &json!({"status": "ready"}))),
            Route::Readyz => Err(ApiError::unavailable("not ready")),
            Route::Metrics => {
                self.ops(true)?;
                Ok(Answer::Text("application/openmetrics-text; version=1.0.0; charset=utf-8", self.backend.metrics()))
            }
            Route::Admin(action) => {
                // These change the node or write files on it: only from `ops_allow`
                // networks, and with a service token even there.
                if !self.config.ops_allow.iter().any(|net| net.contains(self.peer)) {
                    return Err(ApiError::forbidden("operations on a node are open to ops_allow networks only"));
                }
                service(&self.claims()?)?;
                let call = match action {
                    "backup" => {
                        #[derive(Deserialize)]
                        struct Body {
                            name: String,
                        }
                        let body: Body = parse_body(&self.body)?;
                        let name_ok = (1..=64).contains(&body.name.len())
                            && !body.name.starts_with('.')
                            && body.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
                        if !name_ok {
                            return Err(ApiError::bad_request(
                                "name is 1-64 of A-Z a-z 0-9 _ . - not starting with a dot",
                            ));
                        }
                        AdminCall::Backup { name: body.name }
                    }
                    _ => {
                        #[derive(Deserialize)]
                        struct Body {
                            weight: f64,
                        }
                        let body: Body = parse_body(&self.body)?;
                        if !(0.0..=1.0).contains(&body.weight) {
                            return Err(ApiError::bad_request("weight is 0..1"));
                        }
                        AdminCall::Weight { weight: body.weight }
                    }
                };
                Ok(json(200, &self.backend.admin(call).await?))
            }
            Route::Cluster => {
                self.ops(false)?;
                Ok(json(200, &serde_json::to_value(self.backend.cluster()).expect("views serialize")))
            }
            Route::DevToken => self.dev_token(),
            route => {
                let claims = self.claims()?;
                let request = self.request(route, &claims)?;
                // Past the cap, refuse at once rather than queue: a queue only adds latency
                // to every call behind it, and the client's retry (after Retry-After) may
                // land on a node with room.
                let _permit = if request.holds() {
                    None
                } else {
                    let Ok(permit) = self.calls.try_acquire() else {
                        self.config.metrics.refused("in_flight");
                        return Err(ApiError::overloaded("too many requests in flight on this node"));
                    };
                    Some(InFlight::new(permit, &self.config.metrics.in_flight))
                };
                let reply = self.backend.call(request).await;
                answer(reply)
            }
        }
    }

    fn now_secs(&self) -> u64 {
        self.backend.now_ms() / 1000
    }

    fn claims(&self) -> Result<Claims, ApiError> {
        let header =
            self.authorization.ok_or_else(|| ApiError::unauthorized("an Authorization: Bearer token is required"))?;
        let token = header
            .strip_prefix("Bearer ")
            .ok_or_else(|| ApiError::unauthorized("use Authorization: Bearer <token>"))?;
        Ok(auth::verify(&self.config.jwt_secret, token.trim(), self.now_secs())?)
    }

    /// Operations endpoints: open to `ops_allow`, otherwise a token (a service token if `svc`).
    fn ops(&self, svc: bool) -> Result<(), ApiError> {
        if self.config.ops_allow.iter().any(|net| net.contains(self.peer)) {
            return Ok(());
        }
        let claims = self.claims()?;
        if svc && !claims.svc {
            return Err(ApiError::forbidden("a service token is required"));
        }
        Ok(())
    }

    fn dev_token(&self) -> Result<Answer, ApiError> {
        if !self.config.dev {
            return Err(ApiError::not_found());
        }
        #[derive(Deserialize)]
        struct Body {
            user: String,
        }
        let body: Body = parse_body(&self.body)?;
        if !valid_user(&body.user) {
            return Err(ApiError::bad_request("user ids are 1-64 of A-Z a-z 0-9 _ -"));
        }
        let claims = Claims { sub: body.user, exp: self.now_secs() + DEV_TOKEN_TTL_SECS, svc: false };
        Ok(json(200, &json!({ "token": auth::mint(&self.config.jwt_secret, &claims) })))
    }

    fn request(&self, route: Route, claims: &Claims) -> Result<Request, ApiError> {
        let user = claims.sub.clone();
        let q = &self.query;
        Ok(match (route, &self.method) {
            (Route::Messages(peer), &Method::POST) => {
                #[derive(Deserialize)]
                struct Body {
                    id: Option<String>,
                    // Optional so that a retry of a known id is answered whatever its body.
                    #[serde(default)]
                    text: String,
                }
                let body: Body = parse_body(&self.body)?;
                Request::PostMessage { user, peer: user_segment(peer)?, id: event_id(body.id)?, text: body.text }
            }
            (Route::Messages(peer), _) => {
                Request::Messages { user, peer: user_segment(peer)?, before: before(q)?, limit: limit(q, "limit")? }
            }
            (Route::Typing(peer), _) => Request::Typing { user, peer: user_segment(peer)? },
            (Route::Read(peer), _) => {
                #[derive(Deserialize)]
                struct Body {
                    version: u64,
                }
                let body: Body = parse_body(&self.body)?;
                Request::MarkRead { user, peer: user_segment(peer)?, version: Version(body.version) }
            }
            (Route::Chats, _) => {
                Request::Chats { user, before_ms: number(q, "before", 0, u64::MAX)?, limit: limit(q, "limit")? }
            }
            (Route::Flirts(target), _) => self.feed_post(user, target, FeedKind::Flirt)?,
            (Route::Visits(target), _) => self.feed_post(user, target, FeedKind::Visit)?,
            (Route::Feed, _) => Request::Feed { user, before: before(q)?, limit: limit(q, "limit")? },
            (Route::Sync, _) => {
                let timeout = number(q, "timeout", 0, SYNC_TIMEOUT_SECS_MAX)?.unwrap_or(SYNC_TIMEOUT_SECS_DEFAULT);
                Request::Sync { user, since: q.get("since").cloned(), timeout_ms: timeout * 1000 }
            }
            (Route::Online, _) => Request::Online { limit: limit(q, "limit")? },
            (Route::Flags, _) => Request::Flags { user },
            (Route::Flag(name), _) => {
                service(claims)?;
                #[derive(Deserialize)]
                struct Body {
                    percent: u8,
                }
                let body: Body = parse_body(&self.body)?;
                if body.percent > 100 {
                    return Err(ApiError::bad_request("percent is 0..100"));
                }
                Request::SetFlag { name, percent: body.percent, from: user }
            }
            (Route::Stream(name), method) => {
                service(claims)?;
                let stream = StreamName::new(name).map_err(|e| ApiError::bad_request(e.to_string()))?;
                if method == Method::POST {
                    Request::StreamAppend { stream, events: new_events(&self.body)?, from: user }
                } else {
                    stream_read(stream, q)?
                }
            }
            (route, _) => unreachable!("{route:?} is answered before auth"),
        })
    }
}

impl<B> Call<'_, B> {
    fn feed_post(&self, user: String, target: String, kind: FeedKind) -> Result<Request, ApiError> {
        #[derive(Deserialize, Default)]
        struct Body {
            id: Option<String>,
        }
        let body: Body = if self.body.is_empty() { Body::default() } else { parse_body(&self.body)? };
        Ok(Request::PostFeed { user, target: user_segment(target)?, id: event_id(body.id)?, kind })
    }
}

/// A call counted in flight until it is answered or dropped.
struct InFlight<'a> {
    _permit: tokio::sync::SemaphorePermit<'a>,
    gauge: &'a prometheus_client::metrics::gauge::Gauge,
}

impl<'a> InFlight<'a> {
    fn new(permit: tokio::sync::SemaphorePermit<'a>, gauge: &'a prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        InFlight { _permit: permit, gauge }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

pub const DEV_TOKEN_TTL_SECS: u64 = 24 * 3600;
const SYNC_TIMEOUT_SECS_DEFAULT: u64 = 30;
const SYNC_TIMEOUT_SECS_MAX: u64 = 60;
const WAIT_SECS_MAX: u64 = 60;

fn service(claims: &Claims) -> Result<(), ApiError> {
    if claims.svc {
        Ok(())
    } else {
        Err(ApiError::forbidden("this route needs a service token"))
    }
}

fn answer(reply: Reply) -> Result<Answer, ApiError> {
    Ok(match reply {
        Reply::Appended { event, created } => {
            json(if created { 201 } else { 200 }, &json!({ "event": render::event(&event) }))
        }
        Reply::AppendedAll { events, created } => json(
            if created { 201 } else { 200 },
            &json!({ "events": events.iter().map(render::event).collect::<Vec<_>>() }),
        ),
        Reply::Page { events, head } => Answer::Json(200, render::page(&events, head.0)),
        Reply::Chats(chats) => json(200, &json!({ "chats": render::chats(&chats) })),
        Reply::Sync(sync) => json(200, &render::sync(&sync)),
        Reply::Online { users, total } => json(200, &json!({ "users": users, "total": total })),
        Reply::Flags(flags) => json(200, &json!({ "flags": flags })),
        Reply::Done => Answer::NoContent,
        Reply::Error(error) => return Err(error.into()),
    })
}

fn parse_body<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))
}

fn user_segment(user: String) -> Result<String, ApiError> {
    if valid_user(&user) {
        Ok(user)
    } else {
        Err(ApiError::bad_request("user ids are 1-64 of A-Z a-z 0-9 _ -"))
    }
}

fn event_id(id: Option<String>) -> Result<Option<EventId>, ApiError> {
    id.map(|id| EventId::parse(&id).ok_or_else(|| ApiError::bad_request("id must be a ULID"))).transpose()
}

fn number(q: &HashMap<String, String>, name: &str, min: u64, max: u64) -> Result<Option<u64>, ApiError> {
    let Some(text) = q.get(name) else { return Ok(None) };
    match text.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) && !text.starts_with('+') => Ok(Some(n)),
        _ => Err(ApiError::bad_request(format!("{name} must be an integer from {min} to {max}"))),
    }
}

fn limit(q: &HashMap<String, String>, name: &str) -> Result<usize, ApiError> {
    Ok(number(q, name, 1, PAGE_LEN_MAX as u64)?.unwrap_or(50) as usize)
}

fn before(q: &HashMap<String, String>) -> Result<Option<Version>, ApiError> {
    Ok(number(q, "before", 1, u64::MAX)?.map(Version))
}

fn stream_read(stream: StreamName, q: &HashMap<String, String>) -> Result<Request, ApiError> {
    let after = number(q, "after", 0, u64::MAX - 1)?.map(Version);
    let before = before(q)?;
    if after.is_some() && before.is_some() {
        return Err(ApiError::bad_request("give after or before, not both"));
    }
    let wait = number(q, "wait", 0, WAIT_SECS_MAX)?.unwrap_or(0);
    if wait > 0 && after.is_none() {
        return Err(ApiError::bad_request("wait needs after"));
    }
    let local = match q.get("local").map(String::as_str) {
        None | Some("false") => false,
        Some("true") if wait == 0 => true,
        Some("true") => return Err(ApiError::bad_request("local reads do not wait")),
        Some(_) => return Err(ApiError::bad_request("local is true or false")),
    };
    Ok(Request::StreamRead { stream, after, before, limit: limit(q, "limit")?, wait_ms: wait * 1000, local })
}

fn new_events(body: &Bytes) -> Result<Vec<NewEvent>, ApiError> {
    #[derive(Deserialize)]
    struct Body<'a> {
        id: Option<String>,
        #[serde(rename = "type")]
        kind: String,
        #[serde(borrow)]
        data: Option<&'a RawValue>,
    }
    let events: Vec<Body> = parse_body_borrowed(body)?;
    if events.is_empty() || events.len() > PAGE_LEN_MAX {
        return Err(ApiError::bad_request(format!("append 1 to {PAGE_LEN_MAX} events")));
    }
    events
        .into_iter()
        .map(|e| {
            let data = e.data.map_or_else(|| "{}".to_owned(), |d| d.get().to_owned());
            Ok(NewEvent { id: event_id(e.id)?, kind: e.kind, data })
        })
        .collect()
}

fn parse_body_borrowed<'a, T: Deserialize<'a>>(body: &'a Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))
}

/// Query parameters; `%XX` and `+` are decoded. A repeated name keeps its last value.
pub fn parse_query(query: Option<&str>) -> Result<HashMap<String, String>, ApiError> {
    let mut params = HashMap::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        params.insert(decode(name)?, decode(value)?);
    }
    Ok(params)
}

fn decode(text: &str) -> Result<String, ApiError> {
    let bad = || ApiError::bad_request("malformed query string");
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        out.push(match b {
            b'+' => b' ',
            b'%' => {
                let hex = [bytes.next().ok_or_else(bad)?, bytes.next().ok_or_else(bad)?];
                u8::from_str_radix(std::str::from_utf8(&hex).map_err(|_| bad())?, 16).map_err(|_| bad())?
            }
            b => b,
        });
    }
    String::from_utf8(out).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_table() {
        let check = |path: &str, expected: Option<Route>| assert_eq!(resolve(path).map(|(r, _)| r), expected, "{path}");
        check("/v1/chats/bob/messages", Some(Route::Messages("bob".into())));
        check("/v1/chats", Some(Route::Chats));
        check("/v1/chats/", None);
        check("/v1/nope", None);
        check("/v1/streams/orders:1/events", Some(Route::Stream("orders:1".into())));
        check("/healthz", Some(Route::Healthz));
        check("", None);
    }

    #[test]
    fn query_table() {
        let q = parse_query(Some("a=1&b=x%2By&c=&d")).unwrap();
        assert_eq!(q["a"], "1");
        assert_eq!(q["b"], "x+y");
        assert_eq!(q["c"], "");
        assert_eq!(q["d"], "");
        assert!(parse_query(Some("a=%zz")).is_err());
        assert!(parse_query(Some("a=%f")).is_err());
        let check = |value: &str, ok: bool| {
            let q = parse_query(Some(&format!("limit={value}"))).unwrap();
            assert_eq!(limit(&q, "limit").is_ok(), ok, "{value}");
        };
        check("1", true);
        check("100", true);
        check("0", false);
        check("101", false);
        check("-1", false);
        check("+5", false);
        check("abc", false);
        check("", false);
    }
}
