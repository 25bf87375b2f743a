//! The tokio shell around [`NodeCore`]: it moves requests in, batches to the store, store
//! completions back, and replies out, and keeps one timer for all of the core's deadlines.
//!
//! The core sits behind one mutex. Whoever holds it drains the core's outputs in order
//! ([`Driver::pump`]): persists are handed to the store while the lock is held, so batches
//! reach the store in the order the core sequenced them. Store completions arrive on a channel
//! that one task feeds back into the core, so the store's writer thread never waits for the
//! core. Read-only requests (history pages) do not take the lock at all.
//!
//! With `replicas > 1` the driver also runs the partition replication machine
//! (`node_core::repl::Replicas`) under the same lock: the core's batches become proposals to
//! the partition's log (`Committed` then reports them durable to the core, `Abandoned` fails
//! their requests with 503), its messages travel over the mesh (`[TAG_REPL]` frames), and a
//! request whose partition another node serves is forwarded there (`[TAG_FORWARD]`, the
//! request as JSON) and answered from there. A forwarded request is never forwarded again.
//!
//! With a shared store (FoundationDB, [`Routing::Shared`]) nothing is replicated here: the
//! store keeps the copies. Each partition's primary is simply the top live member by
//! rendezvous rank in this node's view of the mesh (recomputed when the view changes); it
//! sequences the partition's streams and commits straight to the store, and requests are
//! forwarded to it exactly as with replication, so long-polls still wait, and are woken, at
//! the node that sequences their streams. Reads need no barrier: every store read is a fresh
//! FoundationDB transaction. A node that was told to join serves no partition until it has
//! joined. Two nodes whose views disagree may still both sequence a stream for a moment; the
//! store then refuses the one whose head is stale (never a gap or an overwrite, a definite
//! `Failed`), and that node abandons its batches in flight for the partition (503: clients
//! retry with the same ids) and reads the heads afresh. A write whose outcome is unknown
//! (`Uncertain`) still stops the node, as with any store.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use gossip::quic::Mesh;
use gossip::{MemberState, NodeId};
use node_core::api::{CoreError, Reply, Request, RequestId};
use node_core::placement::{self, Partition};
use node_core::repl::{self, Msg, Replicas};
use node_core::{BatchId, NodeCore, Output};
use parking_lot::{Mutex, MutexGuard};
use store::{Store, StoreError, WriteBatch};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::clock::now_ms;

/// First byte of a mesh request: replication messages (answered with nothing).
pub const TAG_REPL: u8 = 1;
/// First byte of a mesh request: a forwarded API request as JSON (answered with the reply).
pub const TAG_FORWARD: u8 = 2;

/// How long a request waits for its partition to get a primary before it is refused.
const PRIMARY_WAIT_MS: u64 = 2_000;

enum Completed {
    Core(BatchId, Result<(), StoreError>),
    Repl(u64, Result<(), StoreError>),
}

/// How long one long-poll of `sys:flags` (by [`Driver::follow_flags`]) waits.
const FLAGS_POLL_MS: u64 = 25_000;

pub struct Driver {
    inner: Mutex<Inner>,
    store: Arc<dyn Store>,
    completions: mpsc::UnboundedSender<Completed>,
    /// Set once the mesh runs (replication sends through it).
    mesh: OnceLock<Arc<Mesh>>,
    /// This driver, for tasks it spawns itself.
    me: OnceLock<std::sync::Weak<Driver>>,
    stopped: std::sync::atomic::AtomicBool,
    node_id: String,
    /// Wakes the timer task when a deadline earlier than the one it sleeps to appears.
    timer: Notify,
    armed_ms: AtomicU64,
    /// Notified once when storage failed and the process must restart from disk.
    pub fatal: Notify,
}

struct Inner {
    core: NodeCore,
    replies: HashMap<RequestId, oneshot::Sender<Reply>>,
    next_request: u64,
    repl: Option<Replication>,
    shared: Option<Shared>,
}

/// How a node's partitions are kept.
pub enum Routing {
    /// Every node keeps its own data; nothing is partitioned or forwarded (`--replicas 1` on a
    /// store of its own).
    Local,
    /// Partitions replicated by the nodes themselves (`--replicas` above 1).
    Replicated(Box<Replicas>),
    /// Partitions whose data a store shared by every node keeps (FoundationDB): the top live
    /// member by rendezvous rank sequences each, and commits straight to the store. `joins`:
    /// this node was told to join a mesh (it places nothing before it has).
    Shared { joins: bool },
}

/// Placement without replication, for a shared store.
struct Shared {
    partitions: u32,
    /// This node was told to join a mesh: it places nothing until it has joined, or it would
    /// take itself for the primary of every partition.
    joins: bool,
    /// Live members (node id, weight) as last seen; the primaries below follow from it.
    view: Vec<(String, u32)>,
    /// Each partition's primary in that view (`None`: no live member of weight above 0).
    primaries: Vec<Option<String>>,
    /// Partitions sequenced here: those whose primary is this node.
    served: BTreeSet<Partition>,
    /// The core's batches handed to the store and not yet completed, with their partition.
    in_flight: BTreeMap<BatchId, Option<Partition>>,
    /// Batches already abandoned in the core: their completions are dropped.
    dropped: BTreeSet<BatchId>,
}

impl Shared {
    fn new(partitions: u32, joins: bool) -> Shared {
        Shared {
            partitions,
            joins,
            view: Vec::new(),
            primaries: vec![None; partitions as usize],
            served: BTreeSet::new(),
            in_flight: BTreeMap::new(),
            dropped: BTreeSet::new(),
        }
    }

    /// Takes the mesh's current view; tells the core about every partition it gained or lost.
    /// Connections to members now down are closed, so requests forwarded to them fail at once
    /// instead of waiting for QUIC's idle timeout (as with replication).
    fn refresh(&mut self, mesh: &Arc<Mesh>, me: &str, core: &mut NodeCore) {
        let joined = !self.joins || mesh.is_active();
        let members = mesh.members();
        let mut view: Vec<(String, u32)> = members
            .iter()
            .filter(|(_, state)| joined && *state != MemberState::Down)
            .map(|(member, _)| (member.id.to_string(), u32::from(member.weight_milli)))
            .collect();
        view.sort();
        view.dedup_by(|a, b| a.0 == b.0);
        if view == self.view {
            return;
        }
        let was_live = |id: &str| self.view.iter().any(|(node, _)| node == id);
        for (member, _) in members.iter().filter(|(m, state)| *state == MemberState::Down && was_live(m.id.as_str())) {
            if !view.iter().any(|(node, _)| *node == member.id.as_str()) {
                let (mesh, id) = (mesh.clone(), member.id.clone());
                tokio::spawn(async move { mesh.close_connection(&id).await });
            }
        }
        for part in 0..self.partitions {
            let ranked = placement::rank(part, view.iter().map(|(node, weight)| (node.as_str(), *weight)));
            let primary = ranked.first().map(|node| node.to_string());
            let here = primary.as_deref() == Some(me);
            if here != self.served.contains(&part) {
                tracing::debug!(part, serving = here, "primary (shared store)");
                core.serving(part, here);
                if here {
                    self.served.insert(part);
                } else {
                    self.served.remove(&part);
                }
            }
            self.primaries[part as usize] = primary;
        }
        self.view = view;
    }

    /// A batch of the core's is durable, or failed. A definite failure (the store refused it:
    /// another node moved its stream, or it could not be written at all) abandons it and every
    /// later batch of its partition still in flight, whose versions may continue it; anything
    /// else goes to the core as it is (an uncertain write stops the node).
    fn completed(&mut self, now: u64, core: &mut NodeCore, batch: BatchId, result: Result<(), StoreError>) {
        let part = self.in_flight.remove(&batch).flatten();
        if self.dropped.remove(&batch) {
            return;
        }
        let (Err(StoreError::Failed(reason)), Some(part)) = (&result, part) else {
            core.persisted(now, batch, result);
            return;
        };
        tracing::warn!(part, %reason, "the shared store refused a batch; abandoning the partition's batches in flight");
        core.abandoned(now, batch);
        let later: Vec<BatchId> =
            self.in_flight.range(batch..).filter(|(_, p)| **p == Some(part)).map(|(b, _)| *b).collect();
        for later in later {
            core.abandoned(now, later);
            self.dropped.insert(later);
        }
    }
}

struct Replication {
    machine: Replicas,
    partitions: u32,
    /// Proposal token -> the core's batch.
    tokens: HashMap<u64, BatchId>,
    view: Vec<repl::View>,
    outbox: BTreeMap<String, Vec<Msg>>,
    /// Read barriers waiting for their heartbeat round.
    reads: HashMap<u64, oneshot::Sender<bool>>,
}

impl Driver {
    /// Starts the driver's two tasks (store completions, timer) on the current runtime.
    /// `routing`: how partitions are kept (with `Replicated`, the replication machine).
    pub fn start(
        core: NodeCore,
        store: Arc<dyn Store>,
        routing: Routing,
        node_id: String,
        partitions: u32,
    ) -> Arc<Driver> {
        let (completions, mut completed) = mpsc::unbounded_channel();
        let shared = match routing {
            Routing::Shared { joins } => Some(Shared::new(partitions, joins)),
            Routing::Local | Routing::Replicated(_) => None,
        };
        let replicas = match routing {
            Routing::Replicated(machine) => Some(*machine),
            Routing::Local | Routing::Shared { .. } => None,
        };
        let repl = replicas.map(|machine| Replication {
            machine,
            partitions,
            tokens: HashMap::new(),
            view: Vec::new(),
            outbox: BTreeMap::new(),
            reads: HashMap::new(),
        });
        let driver = Arc::new(Driver {
            inner: Mutex::new(Inner { core, replies: HashMap::new(), next_request: 0, repl, shared }),
            store,
            completions,
            mesh: OnceLock::new(),
            me: OnceLock::new(),
            stopped: std::sync::atomic::AtomicBool::new(false),
            node_id,
            timer: Notify::new(),
            armed_ms: AtomicU64::new(u64::MAX),
            fatal: Notify::new(),
        });
        let _ = driver.me.set(Arc::downgrade(&driver));
        driver.pump(driver.inner.lock()); // Outputs of recovery.
        let weak = Arc::downgrade(&driver);
        tokio::spawn(async move {
            while let Some(done) = completed.recv().await {
                let Some(driver) = weak.upgrade() else { return };
                let mut inner = driver.inner.lock();
                let now = now_ms();
                inner.completed(now, done);
                // Take whatever else completed meanwhile under the same lock.
                while let Ok(done) = completed.try_recv() {
                    inner.completed(now, done);
                }
                driver.pump(inner);
            }
        });
        let weak = Arc::downgrade(&driver);
        tokio::spawn(async move {
            loop {
                let Some(driver) = weak.upgrade() else { return };
                let now = now_ms();
                let deadline = {
                    // Armed under the lock, so a request that adds an earlier deadline after
                    // this sees it and wakes us.
                    let inner = driver.inner.lock();
                    let repl = inner.repl.as_ref().and_then(|r| r.machine.poll_timeout(now));
                    let deadline =
                        inner.core.poll_timeout().unwrap_or(u64::MAX).min(repl.unwrap_or(u64::MAX)).min(now + 1000);
                    driver.armed_ms.store(deadline, Ordering::Relaxed);
                    deadline
                };
                let sleep = Duration::from_millis(deadline.saturating_sub(now));
                tokio::select! {
                    _ = tokio::time::sleep(sleep) => {}
                    _ = driver.timer.notified() => {}
                }
                let mut inner = driver.inner.lock();
                let now = now_ms();
                inner.core.tick(now);
                let Inner { core, shared, .. } = &mut *inner;
                if let (Some(shared), Some(mesh)) = (shared, driver.mesh.get()) {
                    shared.refresh(mesh, &driver.node_id, core);
                }
                if let Some(repl) = &mut inner.repl {
                    if let Some(mesh) = driver.mesh.get() {
                        let view = view_of(mesh);
                        if view != repl.view {
                            for gone in
                                view.iter().filter(|v| v.down && !repl.view.iter().any(|o| o.node == v.node && o.down))
                            {
                                if let Some(id) = NodeId::new(gone.node.clone()) {
                                    let mesh = mesh.clone();
                                    tokio::spawn(async move { mesh.close_connection(&id).await });
                                }
                            }
                            repl.view = view.clone();
                            repl.machine.set_view(now, view);
                        }
                    }
                    repl.machine.tick(now);
                }
                driver.pump(inner);
            }
        });
        driver
    }

    /// The mesh is up: replication can send, and members can be seen.
    pub fn attach_mesh(&self, mesh: Arc<Mesh>) {
        let _ = self.mesh.set(mesh);
        self.timer.notify_one();
    }

    /// Answers a request from another member: replication messages, or a forwarded request.
    pub async fn answer(self: &Arc<Self>, from: NodeId, body: Vec<u8>) -> Vec<u8> {
        match body.split_first() {
            Some((&TAG_REPL, msgs)) => {
                let Ok(msgs) = repl::decode_msgs(msgs) else { return Vec::new() };
                let mut inner = self.inner.lock();
                let now = now_ms();
                if let Some(repl) = &mut inner.repl {
                    for msg in msgs {
                        repl.machine.handle(now, from.as_str(), msg);
                    }
                }
                self.pump(inner);
                Vec::new()
            }
            Some((&TAG_FORWARD, json)) => {
                let reply = match serde_json::from_slice::<Request>(json) {
                    Ok(request) => self.call_here(request).await,
                    Err(error) => Reply::Error(CoreError::BadRequest(format!("forwarded request: {error}"))),
                };
                serde_json::to_vec(&reply).unwrap_or_default()
            }
            _ => Vec::new(),
        }
    }

    /// Runs one request to its reply, here or at its partition's primary. Dropping the future
    /// cancels a long-poll.
    pub async fn call(self: &Arc<Self>, request: Request) -> Reply {
        if let (Request::Online { limit }, true) = (&request, self.partition_counts().is_some()) {
            return self.online_everywhere(*limit).await;
        }
        self.route(request, true).await
    }

    /// Who is online, cluster-wide: presence is kept where each user's `sync` runs (their
    /// inbox's primary), so every member is asked and the answers merged.
    async fn online_everywhere(self: &Arc<Self>, limit: usize) -> Reply {
        let request = Request::Online { limit: node_core::api::PAGE_LEN_MAX };
        let mut users: Vec<String> = Vec::new();
        if let Reply::Online { users: here, .. } = self.run(request.clone()).await {
            users.extend(here);
        }
        if let Some(mesh) = self.mesh.get() {
            let others: Vec<String> = mesh
                .members()
                .into_iter()
                .filter(|(m, state)| *state != MemberState::Down && m.id.as_str() != self.node_id)
                .map(|(m, _)| m.id.to_string())
                .collect();
            let mut asks = tokio::task::JoinSet::new();
            for to in others {
                let (mesh, request) = (mesh.clone(), request.clone());
                asks.spawn(async move {
                    let ask = forward(&mesh, &to, &request);
                    tokio::time::timeout(Duration::from_secs(2), ask).await.ok().flatten()
                });
            }
            while let Some(answer) = asks.join_next().await {
                if let Ok(Some(Reply::Online { users: there, .. })) = answer {
                    users.extend(there);
                }
            }
        }
        users.sort();
        users.dedup();
        let total = users.len();
        users.truncate(limit);
        Reply::Online { users, total }
    }

    /// Runs a request forwarded by another member: here, or refused.
    async fn call_here(self: &Arc<Self>, request: Request) -> Reply {
        self.route(request, false).await
    }

    async fn route(self: &Arc<Self>, request: Request, may_forward: bool) -> Reply {
        if matches!(request, Request::StreamRead { local: true, .. }) {
            return self.run(request).await; // This node's copy, whoever leads.
        }
        let Some(part) = self.partition_of(&request) else { return self.run(request).await };
        let waited = now_ms() + PRIMARY_WAIT_MS;
        let mut forward_failed = false;
        loop {
            let (serving, hint) = if let Some(placed) = self.shared_primary(part) {
                placed
            } else {
                let mut inner = self.inner.lock();
                let repl = inner.repl.as_mut().expect("partition_of is Some only when partitioned");
                let serving = repl.machine.is_serving(part);
                let mut hint = repl.machine.primary_hint(part);
                // Ask for a primary here only when nobody else is known to lead, the one
                // believed to did not answer, or a gateway sent it here: a gateway that merely
                // forwards must not start candidacies against a healthy, idle primary.
                let here = hint.is_none() || hint.as_deref() == Some(self.node_id.as_str());
                if !serving && (forward_failed || !may_forward || here) {
                    repl.machine.activate(now_ms(), part);
                    hint = repl.machine.primary_hint(part);
                }
                self.pump(inner);
                (serving, hint)
            };
            // A read is served once a heartbeat round confirmed this node still leads the
            // partition (ReadIndex): a deposed primary never answers from stale data. A shared
            // store needs no barrier: each of its reads sees everything committed before it.
            let shared = self.inner.lock().shared.is_some();
            if serving && (shared || !is_read(&request) || self.read_barrier(part).await) {
                return self.run(request).await;
            }
            let mesh = self.mesh.get().cloned();
            if let (true, Some(hint), Some(mesh)) = (may_forward, hint, mesh) {
                if hint != self.node_id {
                    if let Some(reply) = forward(&mesh, &hint, &request).await {
                        return reply;
                    }
                    forward_failed = true;
                }
            }
            if now_ms() >= waited {
                return Reply::Error(CoreError::Unavailable(format!("partition {part} has no primary yet; retry")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// With a shared store: whether this node sequences `part`, and its primary (`None` for a
    /// node that is not partitioned that way). Takes a fresh look at the mesh when no primary
    /// is known yet (just started).
    fn shared_primary(&self, part: Partition) -> Option<(bool, Option<String>)> {
        let mut inner = self.inner.lock();
        let Inner { core, shared, .. } = &mut *inner;
        let shared = shared.as_mut()?;
        if shared.primaries[part as usize].is_none() {
            if let Some(mesh) = self.mesh.get() {
                shared.refresh(mesh, &self.node_id, core);
            }
        }
        let placed = (shared.served.contains(&part), shared.primaries[part as usize].clone());
        self.pump(inner);
        Some(placed)
    }

    /// Waits for a read barrier on `part`; false if this node stopped leading it first.
    async fn read_barrier(&self, part: Partition) -> bool {
        let rx = {
            let mut inner = self.inner.lock();
            let repl = inner.repl.as_mut().expect("only with replication");
            let Ok(token) = repl.machine.read_barrier(now_ms(), part) else { return false };
            let (tx, rx) = oneshot::channel();
            repl.reads.insert(token, tx);
            self.pump(inner);
            rx
        };
        matches!(tokio::time::timeout(Duration::from_millis(PRIMARY_WAIT_MS), rx).await, Ok(Ok(true)))
    }

    /// The partition a request belongs to (`None` when nothing is partitioned, or for
    /// requests any node answers).
    fn partition_of(&self, request: &Request) -> Option<Partition> {
        let partitions = {
            let inner = self.inner.lock();
            match (&inner.repl, &inner.shared) {
                (Some(repl), _) => repl.partitions,
                (None, Some(shared)) => shared.partitions,
                (None, None) => return None,
            }
        };
        Some(placement::partition_of(&request.route()?, partitions))
    }

    async fn run(self: &Arc<Self>, request: Request) -> Reply {
        if let Some(reply) = node_core::read_only(&*self.store, &request) {
            return reply;
        }
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut inner = self.inner.lock();
            let id = RequestId(inner.next_request);
            inner.next_request += 1;
            inner.replies.insert(id, tx);
            inner.core.request(now_ms(), id, request);
            self.pump(inner);
            id
        };
        let mut pending = Pending { driver: self, id, answered: false };
        let reply = rx
            .await
            .unwrap_or_else(|_| Reply::Error(node_core::api::CoreError::Unavailable("node is stopping".into())));
        pending.answered = true;
        reply
    }

    /// Drains the core's and the replication machine's outputs in order (each may feed the
    /// other), sends what replication wants sent, then releases the lock.
    fn pump(&self, mut inner: MutexGuard<'_, Inner>) {
        loop {
            let mut progress = false;
            while let Some(output) = inner.core.poll_output() {
                progress = true;
                match output {
                    Output::Persist(batch, writes) => inner.persist_core(self, batch, writes),
                    Output::Reply(id, reply) => {
                        if let Some(tx) = inner.replies.remove(&id) {
                            let _ = tx.send(reply);
                        }
                    }
                    Output::Fatal(error) => {
                        tracing::error!(%error, "storage failed; stopping so the node restarts from what is on disk");
                        self.fatal.notify_one();
                    }
                    Output::Forward(forward, request) => self.deliver(forward, request),
                }
            }
            let Inner { core, repl, .. } = &mut *inner;
            if let Some(repl) = repl {
                let now = now_ms();
                while let Some(output) = repl.machine.poll_output() {
                    progress = true;
                    match output {
                        repl::Output::Send { to, msg } => repl.outbox.entry(to).or_default().push(msg),
                        repl::Output::Persist { id, batch } => {
                            let completions = self.completions.clone();
                            let done = move |r| drop(completions.send(Completed::Repl(id, r)));
                            self.store.append(batch, Box::new(done));
                        }
                        repl::Output::Committed { token, .. } => {
                            if let Some(batch) = repl.tokens.remove(&token) {
                                core.persisted(now, batch, Ok(()));
                            }
                        }
                        repl::Output::Abandoned { token, .. } => {
                            if let Some(batch) = repl.tokens.remove(&token) {
                                core.abandoned(now, batch);
                            }
                        }
                        repl::Output::Serving { part, serving } => {
                            tracing::debug!(part, serving, "primary");
                            core.serving(part, serving);
                        }
                        repl::Output::Read { token, ok } => {
                            if let Some(tx) = repl.reads.remove(&token) {
                                let _ = tx.send(ok);
                            }
                        }
                        repl::Output::Fatal(error) => {
                            tracing::error!(%error, "storage failed; stopping so the node restarts from what is on disk");
                            self.fatal.notify_one();
                        }
                    }
                }
            }
            if !progress {
                break;
            }
        }
        if let (Some(repl), Some(mesh)) = (&mut inner.repl, self.mesh.get()) {
            for (to, msgs) in std::mem::take(&mut repl.outbox) {
                let Some(to) = NodeId::new(to) else { continue };
                let mut body = vec![TAG_REPL];
                body.extend(repl::encode_msgs(&msgs));
                let mesh = mesh.clone();
                tokio::spawn(async move {
                    if let Err(error) = mesh.request(&to, &body).await {
                        tracing::debug!(%error, "replication send");
                    }
                });
            }
        }
        let repl_deadline = inner.repl.as_ref().and_then(|r| r.machine.poll_timeout(now_ms()));
        let deadline = inner.core.poll_timeout().unwrap_or(u64::MAX).min(repl_deadline.unwrap_or(u64::MAX));
        if deadline < self.armed_ms.load(Ordering::Relaxed) {
            self.timer.notify_one();
        }
    }

    /// Runs a delivery the core asked for (inbox copies to another primary) until it
    /// succeeds, with backoff; the answer goes back to the core. Deliveries are idempotent
    /// (the ids are fixed), so retrying after an unclear failure is safe.
    fn deliver(&self, forward: node_core::ForwardId, request: Request) {
        let Some(driver) = self.mesh.get().and(self.me.get()).and_then(|weak| weak.upgrade()) else {
            // No mesh yet (recovery at start): try again shortly from a task.
            let me = self.me.get().cloned();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if let Some(driver) = me.and_then(|weak| weak.upgrade()) {
                    driver.deliver(forward, request);
                }
            });
            return;
        };
        tokio::spawn(async move {
            let mut backoff_ms = 20;
            loop {
                let reply = driver.route(request.clone(), true).await;
                let retry = matches!(&reply, Reply::Error(CoreError::Unavailable(_) | CoreError::Overloaded(_)));
                if !retry || driver.stopped.load(Ordering::Relaxed) {
                    let mut inner = driver.inner.lock();
                    inner.core.forwarded(now_ms(), forward, reply);
                    driver.pump(inner);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                backoff_ms = (backoff_ms * 2).min(1_000);
            }
        });
    }

    /// Answers every long-poll (with its cursor) and refuses new requests.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        let mut inner = self.inner.lock();
        inner.core.stop(now_ms());
        self.pump(inner);
    }

    /// With replication: keeps this node's flags current by long-polling `sys:flags` at its
    /// primary, and wakes the syncs held here when a flag changes. A flag set anywhere
    /// reaches every node (and every open tab) within one round trip.
    pub fn follow_flags(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(driver) = weak.upgrade() else { return };
                if driver.is_stopped() {
                    return;
                }
                let known = driver.inner.lock().core.flags_version();
                let Ok(after) = known else {
                    drop(driver);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                };
                let read = Request::StreamRead {
                    stream: node_core::social::flags_stream(),
                    after: Some(after),
                    before: None,
                    limit: node_core::api::PAGE_LEN_MAX,
                    wait_ms: FLAGS_POLL_MS,
                    local: false,
                };
                match driver.route(read, true).await {
                    Reply::Page { events, .. } => {
                        if !events.is_empty() {
                            let mut inner = driver.inner.lock();
                            inner.core.learn_flags(now_ms(), &events);
                            driver.pump(inner);
                        }
                    }
                    _ => {
                        drop(driver);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
    }

    /// After [`Driver::stop`]: waits until every request in flight here is answered (its
    /// append committed or abandoned), or until `deadline` passes. Returns how many remain.
    pub async fn drain(&self, deadline: Duration) -> usize {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let left = self.inner.lock().replies.len();
            if left == 0 || tokio::time::Instant::now() >= until {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    /// Partitions served here as primary, voted in and learned here (`None` when nothing
    /// is partitioned; with a shared store the first two are the partitions this node
    /// sequences).
    pub fn partition_counts(&self) -> Option<(usize, usize, usize)> {
        let inner = self.inner.lock();
        match (&inner.repl, &inner.shared) {
            (Some(repl), _) => Some(repl.machine.counts()),
            (None, Some(shared)) => Some((shared.served.len(), shared.served.len(), 0)),
            (None, None) => None,
        }
    }

    pub fn long_polls_held(&self) -> usize {
        self.inner.lock().core.waiting()
    }

    /// Users with a `sync` held here, and streams with a long-poll held here.
    pub fn subscriptions(&self) -> (usize, usize) {
        self.inner.lock().core.subscriptions()
    }

    /// Replication lag of each partition led here (`None` without replication).
    pub fn replication_lags(&self) -> Option<Vec<(node_core::placement::Partition, u64)>> {
        self.inner.lock().repl.as_ref().map(|r| r.machine.lags())
    }

    /// Partitions led here with fewer whole voters than R (`None` without replication).
    pub fn under_replicated(&self) -> Option<usize> {
        self.inner.lock().repl.as_ref().map(|r| r.machine.under_replicated())
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
}

/// Cancels its request in the core if dropped before the reply came.
struct Pending<'a> {
    driver: &'a Driver,
    id: RequestId,
    answered: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let mut inner = self.driver.inner.lock();
        inner.replies.remove(&self.id);
        inner.core.cancel(now_ms(), self.id);
        self.driver.pump(inner);
    }
}

impl Inner {
    fn completed(&mut self, now: u64, done: Completed) {
        match done {
            Completed::Core(batch, result) => match &mut self.shared {
                Some(shared) => shared.completed(now, &mut self.core, batch, result),
                None => self.core.persisted(now, batch, result),
            },
            Completed::Repl(id, result) => {
                if let Some(repl) = &mut self.repl {
                    repl.machine.persisted(now, id, result);
                }
            }
        }
    }

    /// A batch the core sequenced: straight to the store, or proposed to its partition's log.
    fn persist_core(&mut self, driver: &Driver, batch: BatchId, writes: WriteBatch) {
        let Some(repl) = &mut self.repl else {
            if let Some(shared) = &mut self.shared {
                shared.in_flight.insert(batch, batch_partition(&writes, shared.partitions));
            }
            let completions = driver.completions.clone();
            driver.store.append(writes, Box::new(move |r| drop(completions.send(Completed::Core(batch, r)))));
            return;
        };
        let now = now_ms();
        let Some(part) = batch_partition(&writes, repl.partitions) else {
            // Streams of several partitions in one batch (a chat message's inbox copies on
            // other primaries): not yet supported across primaries.
            self.core.abandoned(now, batch);
            return;
        };
        match repl.machine.propose(now, part, writes) {
            Ok(token) => {
                repl.tokens.insert(token, batch);
            }
            Err(_) => self.core.abandoned(now, batch),
        }
    }
}

/// The one partition every stream a batch writes falls in (copy markers name their stream).
fn batch_partition(batch: &WriteBatch, partitions: u32) -> Option<Partition> {
    let streams =
        batch.events.iter().map(|e| e.stream.as_str().to_owned()).chain(batch.meta.iter().filter_map(|(key, _)| {
            let rest = key.strip_prefix(b"copy:")?;
            let end = rest.iter().position(|b| *b == 0)?;
            String::from_utf8(rest[..end].to_vec()).ok()
        }));
    let mut parts = streams.map(|s| placement::partition_of(&s, partitions));
    let first = parts.next()?;
    parts.all(|p| p == first).then_some(first)
}

/// Requests that only read a partition (they need a read barrier where it is replicated).
fn is_read(request: &Request) -> bool {
    matches!(
        request,
        Request::Messages { .. }
            | Request::Feed { .. }
            | Request::Chats { .. }
            | Request::Sync { .. }
            | Request::Flags { .. }
            | Request::StreamRead { .. }
    )
}

/// The membership as the replication machine sees it.
fn view_of(mesh: &Mesh) -> Vec<repl::View> {
    mesh.members()
        .into_iter()
        .map(|(member, state)| repl::View {
            node: member.id.to_string(),
            weight_milli: u32::from(member.weight_milli),
            down: state == MemberState::Down,
            incarnation: member.life(),
        })
        .collect()
}

/// Sends `request` to `to` and returns its reply; `None` when `to` could not be reached.
async fn forward(mesh: &Mesh, to: &str, request: &Request) -> Option<Reply> {
    let to = NodeId::new(to)?;
    let mut body = vec![TAG_FORWARD];
    body.extend(serde_json::to_vec(request).ok()?);
    match mesh.request(&to, &body).await {
        Ok(answer) => serde_json::from_slice(&answer).ok(),
        Err(error) => {
            tracing::debug!(%error, "forward");
            None
        }
    }
}
