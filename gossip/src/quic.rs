//! The QUIC shell of the mesh: a quinn endpoint, mutually authenticated connections, and one
//! task that drives [`Membership`] with the packets they carry.
//!
//! - One endpoint serves and connects. Every connection is TLS 1.3 with client certificates
//!   checked against the cluster CA both ways; the peer's node id comes from its certificate
//!   and every SWIM packet on that connection must claim to be that node.
//! - SWIM packets travel as QUIC datagrams; a packet larger than the connection's datagram
//!   limit goes on a uni stream instead.
//! - A node sends on the connection it opened to the peer's address (opened on first use,
//!   re-opened when it closed: a restarted peer resets the old one) and reads from every
//!   connection, its own and the peer's.
//! - The driver task owns the membership machine; it reads the clock through the function
//!   it is given, keeps one deadline (the machine's `poll_timeout`), and publishes a view.
//! - Requests: [`Mesh::request`] sends bytes to a member by node id on a bidirectional
//!   stream and returns the answer that member's [`Handler`] gave; the later issues
//!   (forwarding, replication, live push) build on it. Requests use their own cached
//!   connection per member, checked to be that member by its certificate.
//!
//! Bounds: the incoming packet queue (`INCOMING_LEN_MAX`, overflow dropped: SWIM tolerates
//! loss), packets waiting for a connection (`PENDING_LEN_MAX` per peer), stream packets
//! (`STREAM_BYTES_MAX`).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, TransportConfig};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::identity::{Identity, NodeId};
use crate::membership::{MemberEvent, MemberState, Membership, Profile, Transmit};
use crate::tls::{self, Credentials, TlsError};

const INCOMING_LEN_MAX: usize = 4096;
const PENDING_LEN_MAX: usize = 16;
const STREAM_BYTES_MAX: usize = 64 * 1024;
/// Largest request or response body on a request stream.
pub const REQUEST_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Answers requests from other members: (who asked, what) to the response bytes.
pub type Handler =
    Arc<dyn Fn(NodeId, Vec<u8>) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<u8>> + Send>> + Send + Sync>;

/// Milliseconds since the Unix epoch; the node owns the clock.
pub type Clock = fn() -> u64;

pub struct MeshConfig {
    /// Our identity; `mesh_addr` is what others dial (it may be a proxy), `bind` what we bind.
    pub identity: Identity,
    pub bind: SocketAddr,
    pub seeds: Vec<SocketAddr>,
    pub profile: Profile,
    pub credentials: Credentials,
    pub clock: Clock,
    /// Seeds the membership machine's randomness.
    pub seed: u64,
    /// Answers [`Mesh::request`]s from other members; `None` refuses them.
    pub handler: Option<Handler>,
}

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("the certificate names node {cert}, but this node is {configured}")]
    WrongCertificate { cert: NodeId, configured: NodeId },
    #[error("bind {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("QUIC configuration: {0}")]
    Config(String),
    #[error("no live member {0}")]
    NoSuchMember(NodeId),
    #[error("request to {to}: {reason}")]
    Request { to: NodeId, reason: String },
}

/// A running mesh endpoint. Dropping it stops nothing: call [`Mesh::leave`] to leave.
pub struct Mesh {
    commands: mpsc::Sender<Command>,
    endpoint: Endpoint,
    /// Connections used for requests, by member.
    request_connections: tokio::sync::Mutex<HashMap<NodeId, Connection>>,
    active: Arc<std::sync::atomic::AtomicBool>,
    view: Arc<parking_lot::Mutex<Vec<(Identity, MemberState)>>>,
    events: broadcast::Sender<MemberEvent>,
    local_addr: SocketAddr,
    links: Links,
}

/// Every mesh connection, either way, for [`Mesh::link_stats`].
#[derive(Clone, Default)]
struct Links(Arc<parking_lot::Mutex<LinkBook>>);

#[derive(Default)]
struct LinkBook {
    open: Vec<(NodeId, Connection)>,
    /// Bytes sent and received on connections that have closed, by peer.
    closed: HashMap<NodeId, (u64, u64)>,
}

impl Links {
    fn add(&self, peer: &NodeId, connection: &Connection) {
        let mut book = self.0.lock();
        book.prune();
        book.open.push((peer.clone(), connection.clone()));
    }
}

impl LinkBook {
    /// Moves closed connections' final byte counts into `closed`, so `open` stays small.
    fn prune(&mut self) {
        let closed = &mut self.closed;
        self.open.retain(|(peer, connection)| {
            if connection.close_reason().is_none() {
                return true;
            }
            let stats = connection.stats();
            let total = closed.entry(peer.clone()).or_default();
            total.0 += stats.udp_tx.bytes;
            total.1 += stats.udp_rx.bytes;
            false
        });
    }
}

/// One peer's QUIC links as seen from here: every connection either way, summed.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkStats {
    pub peer: NodeId,
    /// Connections open now.
    pub connections: usize,
    /// The smallest round-trip estimate of the open connections.
    pub rtt: Option<Duration>,
    /// UDP payload bytes, over every connection this process ever had with the peer.
    pub sent_bytes: u64,
    pub received_bytes: u64,
}

enum Command {
    Leave(oneshot::Sender<()>),
    SetWeight(u16),
}

/// What the reader tasks and connect tasks tell the driver.
enum Incoming {
    Packet(NodeId, Bytes),
    Connected(SocketAddr, Connection, NodeId),
    ConnectFailed(SocketAddr),
}

impl Mesh {
    pub async fn start(config: MeshConfig) -> Result<Mesh, MeshError> {
        let cert_id = config.credentials.node_id()?;
        if cert_id != config.identity.id {
            return Err(MeshError::WrongCertificate { cert: cert_id, configured: config.identity.id });
        }
        let endpoint = endpoint(&config)?;
        let local_addr = endpoint.local_addr().map_err(|source| MeshError::Bind { addr: config.bind, source })?;
        let (incoming_tx, incoming_rx) = mpsc::channel(INCOMING_LEN_MAX);
        let (commands, command_rx) = mpsc::channel(16);
        let view = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let active = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (events, _) = broadcast::channel(1024);
        let links = Links::default();
        tokio::spawn(accept(endpoint.clone(), incoming_tx.clone(), config.handler.clone(), links.clone()));
        let membership = Membership::new(config.identity, config.seeds, config.profile, config.seed, (config.clock)());
        let driver = Driver {
            membership,
            endpoint: endpoint.clone(),
            handler: config.handler,
            clock: config.clock,
            peers: HashMap::new(),
            incoming_tx,
            view: view.clone(),
            active: active.clone(),
            events: events.clone(),
            links: links.clone(),
            up_bumps: HashMap::new(),
        };
        tokio::spawn(driver.run(incoming_rx, command_rx));
        Ok(Mesh {
            commands,
            endpoint,
            request_connections: Default::default(),
            active,
            view,
            events,
            local_addr,
            links,
        })
    }

    /// The address the endpoint is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Whether another member knows us (we have joined).
    pub fn is_active(&self) -> bool {
        self.active.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every node we know of, ourselves included, with its state.
    pub fn members(&self) -> Vec<(Identity, MemberState)> {
        self.view.lock().clone()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<MemberEvent> {
        self.events.subscribe()
    }

    /// Sends `body` to the member `to` and returns its answer.
    pub async fn request(&self, to: &NodeId, body: &[u8]) -> Result<Vec<u8>, MeshError> {
        let failed = |reason: String| MeshError::Request { to: to.clone(), reason };
        let connection = self.request_connection(to).await?;
        let (mut send, mut receive) = connection.open_bi().await.map_err(|e| failed(e.to_string()))?;
        send.write_all(body).await.map_err(|e| failed(e.to_string()))?;
        send.finish().map_err(|e| failed(e.to_string()))?;
        receive.read_to_end(REQUEST_BYTES_MAX).await.map_err(|e| failed(e.to_string()))
    }

    async fn request_connection(&self, to: &NodeId) -> Result<Connection, MeshError> {
        let mut connections = self.request_connections.lock().await;
        if let Some(connection) = connections.get(to).filter(|c| c.close_reason().is_none()) {
            return Ok(connection.clone());
        }
        let addr = self
            .members()
            .into_iter()
            .find(|(m, state)| m.id == *to && *state != MemberState::Down)
            .map(|(m, _)| m.mesh_addr)
            .ok_or_else(|| MeshError::NoSuchMember(to.clone()))?;
        let failed = |reason: String| MeshError::Request { to: to.clone(), reason };
        let connecting = self.endpoint.connect(addr, tls::SERVER_NAME).map_err(|e| failed(e.to_string()))?;
        let connection = connecting.await.map_err(|e| failed(e.to_string()))?;
        if peer_id(&connection).as_ref() != Some(to) {
            connection.close(0u32.into(), b"unexpected node");
            return Err(failed(format!("the node at {addr} is not {to}")));
        }
        connections.insert(to.clone(), connection.clone());
        self.links.add(to, &connection);
        Ok(connection)
    }

    /// Bytes and round-trip times per peer, over every mesh connection either way.
    pub fn link_stats(&self) -> Vec<LinkStats> {
        let mut book = self.links.0.lock();
        book.prune();
        let LinkBook { open, closed } = &mut *book;
        let mut by_peer: BTreeMap<NodeId, LinkStats> = closed
            .iter()
            .map(|(peer, (sent, received))| {
                let stats = LinkStats {
                    peer: peer.clone(),
                    connections: 0,
                    rtt: None,
                    sent_bytes: *sent,
                    received_bytes: *received,
                };
                (peer.clone(), stats)
            })
            .collect();
        for (peer, connection) in open.iter() {
            let link = by_peer.entry(peer.clone()).or_insert_with(|| LinkStats {
                peer: peer.clone(),
                connections: 0,
                rtt: None,
                sent_bytes: 0,
                received_bytes: 0,
            });
            let stats = connection.stats();
            link.connections += 1;
            link.sent_bytes += stats.udp_tx.bytes;
            link.received_bytes += stats.udp_rx.bytes;
            let rtt = connection.rtt();
            link.rtt = Some(link.rtt.map_or(rtt, |r| r.min(rtt)));
        }
        by_peer.into_values().collect()
    }

    /// Closes the request connection to `to` (a member seen down): requests waiting on it
    /// fail at once instead of at the idle timeout, and the next request connects afresh.
    pub async fn close_connection(&self, to: &NodeId) {
        if let Some(connection) = self.request_connections.lock().await.remove(to) {
            connection.close(0u32.into(), b"member down");
        }
    }

    /// Sets this node's placement weight (thousandths), gossiped at once.
    pub async fn set_weight(&self, weight_milli: u16) {
        let _ = self.commands.send(Command::SetWeight(weight_milli)).await;
    }

    /// Tells the mesh we are leaving, and waits briefly for that to be sent.
    pub async fn leave(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Leave(tx)).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), rx).await;
        }
    }
}

fn transport() -> Result<Arc<TransportConfig>, MeshError> {
    let mut transport = TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(Duration::from_secs(5)).map_err(|e| MeshError::Config(e.to_string()))?;
    transport.max_idle_timeout(Some(idle));
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    // Forwarded long-polls each hold a request stream while they wait.
    transport.max_concurrent_bidi_streams(20_000u32.into());
    transport.datagram_receive_buffer_size(Some(1 << 20));
    Ok(Arc::new(transport))
}

fn endpoint(config: &MeshConfig) -> Result<Endpoint, MeshError> {
    let server_crypto = QuicServerConfig::try_from(config.credentials.server_config()?)
        .map_err(|e| MeshError::Config(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server.transport_config(transport()?);
    let client_crypto = QuicClientConfig::try_from(config.credentials.client_config()?)
        .map_err(|e| MeshError::Config(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
    client.transport_config(transport()?);
    let mut endpoint =
        Endpoint::server(server, config.bind).map_err(|source| MeshError::Bind { addr: config.bind, source })?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// The node id in the certificate the peer of `connection` presented.
fn peer_id(connection: &Connection) -> Option<NodeId> {
    let identity = connection.peer_identity()?;
    let chain = identity.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok()?;
    tls::node_id_of(chain.first()?)
}

async fn accept(endpoint: Endpoint, incoming: mpsc::Sender<Incoming>, handler: Option<Handler>, links: Links) {
    while let Some(connecting) = endpoint.accept().await {
        let (incoming, handler, links) = (incoming.clone(), handler.clone(), links.clone());
        tokio::spawn(async move {
            let remote = connecting.remote_address();
            match connecting.await {
                Ok(connection) => match peer_id(&connection) {
                    Some(peer) => {
                        links.add(&peer, &connection);
                        read(connection, peer, incoming, handler).await
                    }
                    None => tracing::warn!(%remote, "refused a mesh peer whose certificate names no node id"),
                },
                Err(error) => {
                    tracing::warn!(%remote, %error, "refused a mesh connection (is it from another cluster's CA?)")
                }
            }
        });
    }
}

/// Forwards every packet a connection carries, datagram or stream, and answers its
/// requests, until it closes.
async fn read(connection: Connection, peer: NodeId, incoming: mpsc::Sender<Incoming>, handler: Option<Handler>) {
    loop {
        let packet = tokio::select! {
            datagram = connection.read_datagram() => match datagram {
                Ok(bytes) => bytes,
                Err(_) => return,
            },
            request = connection.accept_bi() => match request {
                Ok((send, receive)) => {
                    tokio::spawn(answer(peer.clone(), send, receive, handler.clone()));
                    continue;
                }
                Err(_) => return,
            },
            stream = connection.accept_uni() => match stream {
                Ok(mut stream) => match stream.read_to_end(STREAM_BYTES_MAX).await {
                    Ok(bytes) => Bytes::from(bytes),
                    Err(_) => continue,
                },
                Err(_) => return,
            },
        };
        // A full queue drops the packet: SWIM tolerates loss, and the driver must not block.
        let _ = incoming.try_send(Incoming::Packet(peer.clone(), packet));
    }
}

/// Answers one request stream with the handler (an empty answer when there is none).
async fn answer(peer: NodeId, mut send: quinn::SendStream, mut receive: quinn::RecvStream, handler: Option<Handler>) {
    let Ok(body) = receive.read_to_end(REQUEST_BYTES_MAX).await else { return };
    let response = match handler {
        Some(handler) => handler(peer, body).await,
        None => Vec::new(),
    };
    let _ = send.write_all(&response).await;
    let _ = send.finish();
}

enum Peer {
    Connecting(Vec<Transmit>),
    Connected(Connection, NodeId),
}

struct Driver {
    membership: Membership,
    endpoint: Endpoint,
    handler: Option<Handler>,
    clock: Clock,
    peers: HashMap<SocketAddr, Peer>,
    incoming_tx: mpsc::Sender<Incoming>,
    view: Arc<parking_lot::Mutex<Vec<(Identity, MemberState)>>>,
    active: Arc<std::sync::atomic::AtomicBool>,
    events: broadcast::Sender<MemberEvent>,
    links: Links,
    /// The life (`Identity::life`) each member was last seen up in.
    up_bumps: HashMap<NodeId, u64>,
}

impl Driver {
    async fn run(mut self, mut incoming: mpsc::Receiver<Incoming>, mut commands: mpsc::Receiver<Command>) {
        loop {
            self.flush();
            let now = (self.clock)();
            let wait = self.membership.poll_timeout().map_or(1000, |deadline| deadline.saturating_sub(now).min(1000));
            tokio::select! {
                message = incoming.recv() => match message {
                    Some(message) => self.handle(message),
                    None => return,
                },
                command = commands.recv() => match command {
                    Some(Command::Leave(done)) => {
                        self.membership.leave((self.clock)());
                        self.flush();
                        // Give the datagrams a moment to leave before the process does.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        let _ = done.send(());
                    }
                    Some(Command::SetWeight(weight_milli)) => {
                        self.membership.set_weight((self.clock)(), weight_milli);
                    }
                    None => return,
                },
                _ = tokio::time::sleep(Duration::from_millis(wait)) => self.membership.tick((self.clock)()),
            }
        }
    }

    fn handle(&mut self, message: Incoming) {
        match message {
            Incoming::Packet(peer, bytes) => {
                if let Err(error) = self.membership.handle_packet((self.clock)(), &peer, &bytes) {
                    tracing::debug!(%peer, %error, "mesh packet dropped");
                    if matches!(error, crate::membership::PacketError::IdentityMismatch { .. }) {
                        tracing::warn!(%peer, %error, "refused a mesh peer gossiping another node's identity");
                    }
                }
            }
            Incoming::Connected(addr, connection, peer) => {
                self.links.add(&peer, &connection);
                tokio::spawn(read(connection.clone(), peer.clone(), self.incoming_tx.clone(), self.handler.clone()));
                let previous = self.peers.insert(addr, Peer::Connected(connection, peer));
                if let Some(Peer::Connected(old, _)) = &previous {
                    old.close(0u32.into(), b"replaced");
                }
                let pending = match previous {
                    Some(Peer::Connecting(pending)) => pending,
                    _ => Vec::new(),
                };
                for transmit in pending {
                    self.send(transmit);
                }
            }
            Incoming::ConnectFailed(addr) => {
                self.peers.remove(&addr);
            }
        }
    }

    /// Publishes the machine's events and view, and sends what it produced. Events go first:
    /// a member that left, died or restarted loses its connection here before anything is
    /// sent to it, so the answer to a restarted node's announce goes out on a fresh
    /// connection instead of the dead one (lost until the 5 s idle timeout closed it).
    fn flush(&mut self) {
        while let Some(event) = self.membership.poll_event() {
            match &event {
                MemberEvent::Up(m) => {
                    tracing::info!(member = %m.id, addr = %m.mesh_addr, "mesh member up");
                    if self.up_bumps.insert(m.id.clone(), m.life()).is_some_and(|life| life != m.life()) {
                        self.drop_peer(m.mesh_addr, "member restarted");
                    }
                }
                MemberEvent::Suspect(m) => tracing::info!(member = %m.id, "mesh member suspect"),
                MemberEvent::Down(m) => {
                    tracing::info!(member = %m.id, "mesh member down");
                    self.drop_peer(m.mesh_addr, "member down");
                }
                MemberEvent::Left(m) => {
                    tracing::info!(member = %m.id, "mesh member left");
                    self.drop_peer(m.mesh_addr, "member left");
                }
            }
            let _ = self.events.send(event);
        }
        while let Some(transmit) = self.membership.poll_transmit() {
            self.send(transmit);
        }
        *self.view.lock() = self.membership.members();
        self.active.store(self.membership.is_active(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Closes and forgets the connection to `addr`; the next packet there connects afresh.
    fn drop_peer(&mut self, addr: SocketAddr, why: &'static str) {
        if let Some(Peer::Connected(connection, _)) = self.peers.remove(&addr) {
            connection.close(0u32.into(), why.as_bytes());
        }
    }

    fn send(&mut self, transmit: Transmit) {
        match self.peers.get_mut(&transmit.to) {
            Some(Peer::Connected(connection, peer)) if connection.close_reason().is_none() => {
                if transmit.expect.as_ref().is_some_and(|expect| expect != peer) {
                    // Another node now answers at this address: a packet for the old one is
                    // pointless there (and reconnecting would only find the same node).
                    tracing::debug!(to = %transmit.to, %peer, "dropped a packet for a node no longer at this address");
                    return;
                }
                send_on(connection, transmit.bytes);
            }
            Some(Peer::Connecting(pending)) => {
                if pending.len() < PENDING_LEN_MAX {
                    pending.push(transmit);
                }
            }
            _ => self.connect(transmit),
        }
    }

    fn connect(&mut self, transmit: Transmit) {
        let addr = transmit.to;
        let connecting = match self.endpoint.connect(addr, tls::SERVER_NAME) {
            Ok(connecting) => connecting,
            Err(error) => return tracing::debug!(%addr, %error, "mesh connect"),
        };
        self.peers.insert(addr, Peer::Connecting(vec![transmit]));
        let incoming = self.incoming_tx.clone();
        tokio::spawn(async move {
            let message = match connecting.await {
                Ok(connection) => match peer_id(&connection) {
                    Some(peer) => Incoming::Connected(addr, connection, peer),
                    None => {
                        tracing::warn!(%addr, "refused a mesh peer whose certificate names no node id");
                        Incoming::ConnectFailed(addr)
                    }
                },
                Err(error) => {
                    let refused = matches!(
                        error,
                        quinn::ConnectionError::TransportError(_) | quinn::ConnectionError::ConnectionClosed(_)
                    );
                    if refused {
                        tracing::warn!(%addr, %error, "mesh handshake refused (is it from another cluster's CA?)");
                    } else {
                        tracing::debug!(%addr, %error, "mesh connect failed");
                    }
                    Incoming::ConnectFailed(addr)
                }
            };
            // The driver may be gone (shutting down); nothing else to do then.
            let _ = incoming.send(message).await;
        });
    }
}

fn send_on(connection: &Connection, bytes: Vec<u8>) {
    let fits = connection.max_datagram_size().is_some_and(|max| bytes.len() <= max);
    if fits {
        let _ = connection.send_datagram(Bytes::from(bytes));
        return;
    }
    let connection = connection.clone();
    tokio::spawn(async move {
        if let Ok(mut stream) = connection.open_uni().await {
            let _ = stream.write_all(&bytes).await;
            let _ = stream.finish();
        }
    });
}
