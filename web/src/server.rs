//! The hyper shell: accept connections, apply limits and CORS, call the routes.
//!
//! [`run`] takes an already bound listener (tests bind port 0) and a shutdown future.
//! Connections are capped (`connections_max`, below the file-descriptor limit); a slow client
//! gets `header_read_timeout` to send its headers; headers are capped by `header_bytes_max`;
//! bodies over `body_bytes_max` are refused with 413 from their `Content-Length` or as soon
//! as they grow past it.
//!
//! Slow readers: hyper holds at most one answer per connection, but a client that asks for a
//! large page and never reads it pins that answer. So every answer to a read (GET) takes its
//! size from one budget, `response_bytes_max`, until its last chunk has been handed to the
//! socket; a read answered when the budget is spent gets 429 instead. And a connection whose
//! writes make no progress for `send_timeout` is closed, which gives its budget back.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::{Frame, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::HttpMetrics;
use crate::routes::{self, Answer, Call};
use crate::{ApiError, Backend};

#[derive(Clone, Debug)]
pub struct WebConfig {
    pub jwt_secret: Vec<u8>,
    /// Enables `/v1/dev/token` and answers CORS for any loopback origin.
    pub dev: bool,
    /// Origins answered for cross-origin requests (exact `scheme://host:port`).
    pub cors_origins: Vec<String>,
    /// Networks that may read `/metrics` and `/v1/cluster` without a token.
    pub ops_allow: Vec<AllowNet>,
    pub body_bytes_max: usize,
    pub header_bytes_max: usize,
    pub connections_max: usize,
    /// API calls answered at once (long-polls aside); more get 429 at once.
    pub requests_in_flight_max: usize,
    pub header_read_timeout: Duration,
    /// A connection whose answer makes no progress this long (the client stopped reading)
    /// is closed.
    pub send_timeout: Duration,
    /// Bytes of answers to reads that may wait to be sent, over all connections; past it,
    /// reads get 429.
    pub response_bytes_max: usize,
    /// Where requests are counted; the node registers it in its registry.
    pub metrics: Arc<HttpMetrics>,
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            jwt_secret: Vec::new(),
            dev: false,
            cors_origins: Vec::new(),
            ops_allow: vec![AllowNet::parse("127.0.0.0/8").expect("valid"), AllowNet::parse("::1/128").expect("valid")],
            body_bytes_max: 64 * 1024,
            header_bytes_max: 16 * 1024,
            connections_max: 19_500,
            requests_in_flight_max: 256,
            header_read_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(30),
            response_bytes_max: 256 << 20,
            metrics: Arc::default(),
        }
    }
}

/// An address and prefix length, such as `127.0.0.0/8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllowNet {
    addr: IpAddr,
    prefix: u8,
}

impl AllowNet {
    pub fn parse(text: &str) -> Option<AllowNet> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr.parse().ok()?, prefix.parse().ok()?),
            None => {
                let addr: IpAddr = text.parse().ok()?;
                (addr, if addr.is_ipv4() { 32 } else { 128 })
            }
        };
        let bits = if matches!(addr, IpAddr::V4(_)) { 32 } else { 128 };
        (prefix <= bits).then_some(AllowNet { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                masked(u32::from(net).into(), 32, self.prefix) == masked(u32::from(ip).into(), 32, self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                masked(u128::from(net), 128, self.prefix) == masked(u128::from(ip), 128, self.prefix)
            }
            _ => false,
        }
    }
}

fn masked(bits: u128, width: u8, prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        bits >> (width - prefix)
    }
}

/// Serves HTTP on `listener` until `shutdown` completes.
pub async fn run<B: Backend>(
    listener: TcpListener,
    backend: Arc<B>,
    config: WebConfig,
    shutdown: impl Future<Output = ()>,
) {
    let config = Arc::new(config);
    let permits = Arc::new(Semaphore::new(config.connections_max));
    let calls = Arc::new(Semaphore::new(config.requests_in_flight_max.max(1)));
    let budget = Arc::new(Semaphore::new(kib(config.response_bytes_max).min(Semaphore::MAX_PERMITS)));
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors or similar: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(stream); // Over the connection cap: close at once.
            config.metrics.refused("connections");
            continue;
        };
        config.metrics.connections.inc();
        let _ = stream.set_nodelay(true);
        let (backend, config, calls, budget) = (backend.clone(), config.clone(), calls.clone(), budget.clone());
        let (header_read_timeout, header_bytes_max) = (config.header_read_timeout, config.header_bytes_max);
        let socket = Shared(Arc::new(stream));
        let stream = SendTimeout { inner: socket.clone(), limit: config.send_timeout, stalled: None };
        tokio::spawn(async move {
            let config_for_service = config.clone();
            let service = hyper::service::service_fn(move |request| {
                let (backend, config, calls) = (backend.clone(), config_for_service.clone(), calls.clone());
                let (budget, socket) = (budget.clone(), socket.clone());
                async move {
                    let answered = handle(&*backend, &config, &calls, &budget, Some(&socket), peer, request).await;
                    Ok::<_, Infallible>(answered)
                }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .max_buf_size(header_bytes_max.max(8192))
                .serve_connection(TokioIo::new(stream), service);
            let _ = connection.await;
            config.metrics.connections.dec();
            drop(permit);
        });
    }
}

/// What a request body must be: hyper's `Incoming` on a connection, a whole `Full` body in
/// the fuzz targets (`crate::fuzzing`).
pub(crate) trait RequestBody:
    hyper::body::Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
{
}

impl<T: hyper::body::Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>> RequestBody for T {}

/// Answers one request: CORS, routing, limits and the call. Never panics, whatever the input.
pub(crate) async fn handle<B: Backend>(
    backend: &B,
    config: &WebConfig,
    calls: &Semaphore,
    budget: &Arc<Semaphore>,
    socket: Option<&Shared>,
    peer: SocketAddr,
    request: Request<impl RequestBody>,
) -> Response<Body> {
    let reads = matches!(*request.method(), Method::GET | Method::HEAD);
    let origin = request
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .filter(|o| allowed_origin(config, o))
        .map(str::to_owned);
    let started = tokio::time::Instant::now();
    let mut route = "unknown";
    let responding = respond(backend, config, calls, peer, request, &mut route);
    // A read (a long-poll above all) whose client has gone is dropped at once, which takes it
    // out of the core's waiters; writes run to their end either way.
    let responded = match socket {
        Some(socket) if reads => tokio::select! {
            responded = responding => Some(responded),
            () = client_gone(&socket.0) => None,
        },
        _ => Some(responding.await),
    };
    let Some(responded) = responded else {
        config.metrics.answered(route, CLIENT_GONE, started.elapsed().as_secs_f64());
        return with_status(CLIENT_GONE, Bytes::new()).map(|rest| Body { rest, _budget: None });
    };
    let mut response = match responded {
        Ok(response) => response,
        Err(error) => error_response(&error),
    };
    // Assets are static (no heap to pin); answers to writes are bounded per connection by the
    // body limit, and refusing them after the write happened would mislead the client; the
    // operators' routes (small) must keep answering while slow readers hold the budget.
    let mut permit = None;
    if reads && !matches!(route, "asset" | "healthz" | "readyz" | "metrics") {
        match budget.clone().try_acquire_many_owned(kib(response.body().len()) as u32) {
            Ok(taken) => permit = Some(taken),
            Err(_) => {
                config.metrics.refused("response_bytes");
                response = error_response(&ApiError::overloaded("too many answers are waiting for slow clients"));
            }
        }
    }
    config.metrics.answered(route, response.status().as_u16(), started.elapsed().as_secs_f64());
    if let Some(origin) = origin {
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_str(&origin).expect("checked origin"));
        headers.insert(header::VARY, HeaderValue::from_static("origin"));
        headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static("retry-after"));
    }
    response.map(|rest| Body { rest, _budget: permit })
}

/// The status counted for a read whose client closed its connection first (nginx's): never
/// sent, there is nobody to send it to.
const CLIENT_GONE: u16 = 499;

/// Resolves once the client has closed its end of the connection (end of file, or an
/// error), never while it is there. hyper itself notices an end of file while an answer is
/// pending only when nothing else is buffered: a client that pipelined another request behind
/// a long-poll and then closed would hold its waiter slot until the wait ran out. This looks at
/// the socket itself. Data waiting in the socket (more pipelining) hides an end of file from a
/// peek, so then it looks again every second.
async fn client_gone(socket: &TcpStream) {
    let mut byte = [0u8; 1];
    loop {
        match socket.peek(&mut byte).await {
            Ok(0) | Err(_) => return,
            Ok(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

/// A connection's socket, shared by hyper (which reads and writes it through this) and the
/// requests on it (which watch it with [`client_gone`]). Both run on the connection's one
/// task, so the readiness either registers wakes the same task.
#[derive(Clone)]
pub(crate) struct Shared(Arc<TcpStream>);

impl AsyncRead for Shared {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            match self.0.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
    }
}

impl AsyncWrite for Shared {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write(buf) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                written => return Poll::Ready(written),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write_vectored(bufs) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                written => return Poll::Ready(written),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(())) // A socket has nothing of ours to flush.
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // tokio shuts a shared stream's writing down only through `&mut`: do it on a duplicate
        // of the descriptor (the socket is one; the duplicate closes at once). Out of
        // descriptors, skip it: closing the socket, next, ends the connection anyway.
        use std::os::fd::AsFd;
        if let Ok(fd) = self.0.as_fd().try_clone_to_owned() {
            let _ = std::net::TcpStream::from(fd).shutdown(std::net::Shutdown::Write);
        }
        Poll::Ready(Ok(()))
    }
}

/// Whole KiB, rounded up: the budget's unit, so a semaphore's permits cover any size.
fn kib(bytes: usize) -> usize {
    bytes.div_ceil(1024)
}

/// Bytes handed to hyper per frame: hyper asks for the next one only once its write buffer
/// has room, so an answer stays here, counted, until the client has read most of it.
const CHUNK_BYTES: usize = 16 * 1024;

/// An answer, sent in chunks, holding its share of the answer budget until the last chunk
/// is taken (or the connection is dropped).
pub(crate) struct Body {
    pub(crate) rest: Bytes,
    _budget: Option<OwnedSemaphorePermit>,
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.rest.is_empty() {
            return Poll::Ready(None);
        }
        let chunk = this.rest.split_to(this.rest.len().min(CHUNK_BYTES));
        if this.rest.is_empty() {
            this._budget = None;
        }
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.rest.len() as u64)
    }
}

/// A connection's socket whose writes fail with `TimedOut` once one has made no progress for
/// `limit`: hyper then closes the connection. Only a client that stopped reading (a full
/// socket buffer) makes a write wait; reads are untouched (the header timeout and the
/// long-poll waits bound those).
struct SendTimeout<S> {
    inner: S,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> SendTimeout<S> {
    fn watch<T>(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let limit = self.limit;
        let stalled = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading"))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SendTimeout<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SendTimeout<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

async fn respond<B: Backend>(
    backend: &B,
    config: &WebConfig,
    calls: &Semaphore,
    peer: SocketAddr,
    request: Request<impl RequestBody>,
    name: &mut &'static str,
) -> Result<Response<Bytes>, ApiError> {
    let (route, methods) = routes::resolve(request.uri().path()).ok_or_else(ApiError::not_found)?;
    *name = route.name();
    let method = request.method().clone();
    if method == Method::OPTIONS {
        return Ok(preflight(methods));
    }
    let method_ok = methods.contains(&method) || (method == Method::HEAD && methods.contains(&Method::GET));
    if !method_ok {
        return Err(ApiError::not_found());
    }
    let query = routes::parse_query(request.uri().query())?;
    let authorization = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = read_body(config, request).await?;
    let call =
        Call { backend, config, calls, peer: peer.ip(), method, query, authorization: authorization.as_deref(), body };
    Ok(match call.run(route).await? {
        Answer::Json(status, body) => with_type(status, "application/json", Bytes::from(body)),
        Answer::Text(kind, body) => with_type(200, kind, Bytes::from(body)),
        Answer::Static(kind, body) => with_type(200, kind, Bytes::from_static(body.as_bytes())),
        Answer::NoContent => with_status(204, Bytes::new()),
    })
}

/// Largest oversized body we read to the end before answering 413.
const DRAIN_BYTES_MAX: u64 = 1024 * 1024;

async fn read_body(config: &WebConfig, request: Request<impl RequestBody>) -> Result<Bytes, ApiError> {
    let declared =
        request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > config.body_bytes_max as u64) {
        // Read (and drop) a moderately oversized body so the client, still sending it, gets
        // to read our 413 instead of a broken pipe; a huge one is refused at once.
        if declared.is_some_and(|len| len <= DRAIN_BYTES_MAX) {
            let drain = Limited::new(request.into_body(), DRAIN_BYTES_MAX as usize).collect();
            let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
        }
        return Err(ApiError::too_large());
    }
    let limited = Limited::new(request.into_body(), config.body_bytes_max);
    // A client that trickles its body does not hold a connection slot for long.
    let Ok(collected) = tokio::time::timeout(config.header_read_timeout, limited.collect()).await else {
        return Err(ApiError::bad_request("the request body did not arrive in time"));
    };
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => Err(ApiError::too_large()),
        Err(_) => Err(ApiError::bad_request("the request body could not be read")),
    }
}

fn preflight(methods: &[Method]) -> Response<Bytes> {
    let mut response = with_status(204, Bytes::new());
    let allow: Vec<&str> = methods.iter().map(Method::as_str).chain(["OPTIONS"]).collect();
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_str(&allow.join(", ")).expect("ascii"));
    headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("authorization, content-type"));
    headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    response
}

fn allowed_origin(config: &WebConfig, origin: &str) -> bool {
    if config.cors_origins.iter().any(|o| o == origin) {
        return true;
    }
    config.dev && loopback_origin(origin)
}

/// `http(s)://localhost[:port]`, `http(s)://127.x.y.z[:port]` or `http(s)://[::1][:port]`.
fn loopback_origin(origin: &str) -> bool {
    let Some(rest) = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://")) else { return false };
    let host = match rest.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((host, port)) if port.is_empty() || port.starts_with(':') => host,
            _ => return false,
        },
        None => rest.rsplit_once(':').map_or(rest, |(host, _)| host),
    };
    let port_ok = rest.rsplit_once(':').is_none_or(|(_, p)| p.ends_with(']') || p.chars().all(|c| c.is_ascii_digit()));
    port_ok && (host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()))
}

fn with_status(status: u16, body: Bytes) -> Response<Bytes> {
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::from_u16(status).expect("valid status");
    response
}

fn with_type(status: u16, kind: &'static str, body: Bytes) -> Response<Bytes> {
    let mut response = with_status(status, body);
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn error_response(error: &ApiError) -> Response<Bytes> {
    let body = serde_json::json!({ "error": { "code": error.code, "message": error.message } });
    let mut response = with_type(error.status, "application/json", Bytes::from(body.to_string()));
    if let Some(seconds) = error.retry_after() {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_origins() {
        let check = |origin: &str, ok: bool| assert_eq!(loopback_origin(origin), ok, "{origin}");
        check("http://localhost:8080", true);
        check("http://127.0.0.2:1", true);
        check("http://[::1]:3000", true);
        check("http://localhost", true);
        check("http://example.com:80", false);
        check("http://localhost.evil.com:80", false);
        check("http://10.0.0.1:80", false);
        check("file://", false);
    }

    /// The `Backend` methods these tests never reach (or need only a fixed answer from).
    macro_rules! not_asked {
        () => {
            fn now_ms(&self) -> u64 {
                1_000_000
            }
            fn ready(&self) -> bool {
                true
            }
            fn cluster(&self) -> crate::ClusterView {
                unreachable!("not asked")
            }
            fn metrics(&self) -> String {
                String::new()
            }
            async fn admin(&self, _call: crate::AdminCall) -> Result<serde_json::Value, ApiError> {
                unreachable!("not asked")
            }
        };
    }

    /// Answers `/v1/online` only when released, so calls pile up in flight.
    struct Held {
        release: tokio::sync::Semaphore,
        entered: std::sync::atomic::AtomicUsize,
    }

    impl Backend for Held {
        async fn call(&self, _request: node_core::api::Request) -> node_core::api::Reply {
            self.entered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _released = self.release.acquire().await.expect("never closed");
            node_core::api::Reply::Online { users: Vec::new(), total: 0 }
        }
        not_asked!();
    }

    async fn get(addr: SocketAddr, token: String) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request =
            format!("GET /v1/online HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn calls_past_the_in_flight_cap_are_refused_at_once_with_retry_after() {
        let secret = b"a-test-secret-of-enough-bytes".to_vec();
        let config = WebConfig { jwt_secret: secret.clone(), requests_in_flight_max: 2, ..WebConfig::default() };
        let token = crate::auth::mint(&secret, &crate::auth::Claims { sub: "alice".into(), exp: 2_000, svc: false });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backend = Arc::new(Held { release: tokio::sync::Semaphore::new(0), entered: Default::default() });
        tokio::spawn(run(listener, backend.clone(), config, std::future::pending()));

        let held: Vec<_> = (0..2).map(|_| tokio::spawn(get(addr, token.clone()))).collect();
        while backend.entered.load(std::sync::atomic::Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let refused = get(addr, token.clone()).await;
        assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
        assert!(refused.to_ascii_lowercase().contains("retry-after: 1"), "{refused}");
        assert!(refused.contains("overloaded"), "{refused}");
        backend.release.add_permits(2);
        for call in held {
            assert!(call.await.unwrap().starts_with("HTTP/1.1 200"));
        }
    }

    /// Answers `/v1/online` at once with `0` users: an answer of about 20 bytes a user.
    struct Many(usize);

    impl Backend for Many {
        async fn call(&self, _request: node_core::api::Request) -> node_core::api::Reply {
            let users = (0..self.0).map(|i| format!("user-{i:08}")).collect();
            node_core::api::Reply::Online { users, total: self.0 }
        }
        not_asked!();
    }

    async fn serve_many(users: usize, config: WebConfig) -> (SocketAddr, String) {
        let secret = b"a-test-secret-of-enough-bytes".to_vec();
        let token = crate::auth::mint(&secret, &crate::auth::Claims { sub: "alice".into(), exp: 2_000, svc: false });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = WebConfig { jwt_secret: secret, ..config };
        tokio::spawn(run(listener, Arc::new(Many(users)), config, std::future::pending()));
        (addr, token)
    }

    #[tokio::test]
    async fn reads_past_the_answer_budget_are_refused_with_retry_after() {
        let config = WebConfig { response_bytes_max: 8 * 1024, ..WebConfig::default() };
        let (addr, token) = serve_many(1000, config).await;
        let refused = get(addr, token).await;
        assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
        assert!(refused.to_ascii_lowercase().contains("retry-after: 1"), "{refused}");
        assert!(refused.contains("slow clients"), "{refused}");
        let config = WebConfig { response_bytes_max: 8 * 1024, ..WebConfig::default() };
        let (addr, token) = serve_many(10, config).await;
        assert!(get(addr, token).await.starts_with("HTTP/1.1 200"), "a small answer fits");
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_is_closed_after_the_send_timeout_and_its_budget_returns() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // About 8 MB an answer, in a budget of 12 MiB: one slow reader holds most of it. (On
        // loopback the kernel takes up to 4 MB of an answer into its socket buffers, from
        // the large MSS; the rest stays here, counted.)
        let config = WebConfig {
            response_bytes_max: 12 << 20,
            send_timeout: Duration::from_millis(300),
            ..WebConfig::default()
        };
        let (addr, token) = serve_many(500_000, config).await;
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut slow = socket.connect(addr).await.unwrap();
        let request = format!("GET /v1/online HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n");
        slow.write_all(request.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let meanwhile = get(addr, token.clone()).await;
        assert!(
            meanwhile.starts_with("HTTP/1.1 429"),
            "the budget is held by the slow reader: {}",
            &meanwhile[..meanwhile.len().min(300)]
        );
        // It stops reading for longer than the send timeout: the node closes the connection,
        // so reading now ends before the whole answer did.
        tokio::time::sleep(Duration::from_millis(800)).await;
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut got)).await.unwrap();
        assert!(read.is_err() || got.len() < 6_000_000, "the slow reader was cut off ({} bytes)", got.len());
        assert!(get(addr, token).await.starts_with("HTTP/1.1 200"), "its budget came back");
    }

    #[test]
    fn allow_nets() {
        let net = AllowNet::parse("127.0.0.0/8").unwrap();
        assert!(net.contains("127.1.2.3".parse().unwrap()));
        assert!(net.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!net.contains("10.0.0.1".parse().unwrap()));
        assert!(AllowNet::parse("0.0.0.0/0").unwrap().contains("8.8.8.8".parse().unwrap()));
        assert_eq!(AllowNet::parse("1.2.3.4/33"), None);
    }
}
