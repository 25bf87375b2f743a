//! The deterministic simulator: a whole node (today one; the mesh and replication issues make
//! it many) run on one thread from one `u64` seed, with simulated time, a simulated disk that
//! loses unsynced writes on a crash, simulated writers and browsers, and checkers.
//!
//! One seed runs a safety phase (random requests, disk syncs at random moments, time jumps,
//! crashes and restarts of the node) and then a liveness phase (no faults; every browser must
//! catch up). Checked after every step and at the end:
//! - every acknowledged message is in its conversation and in both users' inboxes, once;
//! - every browser sees each conversation's messages in version order with no gap, across
//!   crashes, resuming from its cursor (promise 5 of DESIGN.md);
//! - no long-poll waits past its deadline; waiting lists stay within their bounds.
//!
//! The same seed gives the same trace hash, run after run.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use node_core::api::{Reply, Request, RequestId, SyncItem};
use node_core::{BatchId, Config, NodeCore, Output};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use store::mem::MemStore;
use store::{EventId, ReadRange, Store, StoreError, StreamName, Version};

const USERS: [&str; 4] = ["ann", "ben", "cat", "dan"];
const START_MS: u64 = 1_763_776_800_000;

pub struct Outcome {
    pub seed: u64,
    pub trace_hash: u64,
    pub acknowledged: usize,
    pub crashes: usize,
    pub delivered: usize,
}

type Completions = Arc<Mutex<Vec<(BatchId, Result<(), StoreError>)>>>;

struct Browser {
    user: &'static str,
    cursor: Option<String>,
    waiting: Option<RequestId>,
    /// Per conversation stream: the last version this browser was shown.
    seen: HashMap<StreamName, u64>,
}

struct World {
    rng: SmallRng,
    now_ms: u64,
    disk: Arc<MemStore>,
    core: NodeCore,
    completions: Completions,
    next_request: u64,
    /// Requests in flight: who asked what.
    pending: HashMap<RequestId, Pending>,
    browsers: Vec<Browser>,
    /// Acknowledged messages: (stream, id, version).
    acknowledged: Vec<(StreamName, EventId, Version)>,
    /// Message ids sent and not acknowledged yet, for retries.
    unacknowledged: Vec<(&'static str, &'static str, EventId)>,
    trace: u64,
    crashes: usize,
    delivered: usize,
}

enum Pending {
    Post { user: &'static str, peer: &'static str, id: EventId },
    Sync { browser: usize },
    Other,
}

fn core_config(seed: u64) -> Config {
    Config { seed, waiters_max: 64, ..Config::default() }
}

impl World {
    fn new(seed: u64) -> World {
        let disk = Arc::new(MemStore::manual());
        World {
            rng: SmallRng::seed_from_u64(seed),
            now_ms: START_MS,
            core: NodeCore::new(core_config(seed), disk.clone(), START_MS).expect("a new disk reads"),
            disk,
            completions: Arc::default(),
            next_request: 0,
            pending: HashMap::new(),
            browsers: USERS
                .iter()
                .map(|user| Browser { user, cursor: None, waiting: None, seen: HashMap::new() })
                .collect(),
            acknowledged: Vec::new(),
            unacknowledged: Vec::new(),
            trace: 0xcbf29ce484222325,
            crashes: 0,
            delivered: 0,
        }
    }

    fn record(&mut self, text: &str) {
        for byte in text.bytes() {
            self.trace ^= u64::from(byte);
            self.trace = self.trace.wrapping_mul(0x100000001b3);
        }
    }

    fn request(&mut self, pending: Pending, request: Request) {
        let id = RequestId(self.next_request);
        self.next_request += 1;
        self.record(&format!("{:?}", request));
        self.pending.insert(id, pending);
        if let Pending::Sync { browser } = self.pending[&id] {
            self.browsers[browser].waiting = Some(id);
        }
        self.core.request(self.now_ms, id, request);
    }

    /// Moves the core's outputs: batches to the disk, replies to their askers.
    fn drain(&mut self) -> Result<(), String> {
        loop {
            while let Some(output) = self.core.poll_output() {
                match output {
                    Output::Persist(batch, writes) => {
                        let completions = self.completions.clone();
                        self.disk.append(writes, Box::new(move |r| completions.lock().unwrap().push((batch, r))));
                    }
                    Output::Reply(id, reply) => self.replied(id, reply)?,
                    Output::Fatal(error) => return Err(format!("fatal: {error}")),
                }
            }
            let done = std::mem::take(&mut *self.completions.lock().unwrap());
            if done.is_empty() {
                return Ok(());
            }
            for (batch, result) in done {
                self.core.persisted(self.now_ms, batch, result);
            }
        }
    }

    fn replied(&mut self, id: RequestId, reply: Reply) -> Result<(), String> {
        self.record(&format!("{id:?}"));
        match (self.pending.remove(&id), reply) {
            (Some(Pending::Post { user, peer, id }), Reply::Appended { event, .. }) => {
                self.unacknowledged.retain(|(u, p, i)| (*u, *p, *i) != (user, peer, id));
                self.acknowledged.push((event.stream, event.id, event.version));
            }
            (Some(Pending::Sync { browser }), Reply::Sync(sync)) => {
                let b = &mut self.browsers[browser];
                b.waiting = None;
                if sync.reset && b.cursor.is_some() {
                    return Err(format!("{}: reset from a valid cursor", b.user));
                }
                b.cursor = Some(sync.cursor);
                for item in sync.items {
                    let SyncItem::Event(event) = item else { continue };
                    if !event.stream.as_str().starts_with("chat:") {
                        continue;
                    }
                    let last = b.seen.entry(event.stream.clone()).or_insert(0);
                    if event.version.0 > *last + 1 {
                        return Err(format!("{}: gap in {}: {} after {}", b.user, event.stream, event.version, last));
                    }
                    *last = (*last).max(event.version.0);
                    self.delivered += 1;
                }
            }
            (Some(_), Reply::Error(error)) => self.record(&error.to_string()),
            (Some(_), _) => {}
            (None, reply) => return Err(format!("reply to an unknown request: {reply:?}")),
        }
        Ok(())
    }

    fn step(&mut self, faults: bool) -> Result<(), String> {
        let roll = self.rng.gen_range(0..100);
        let user = USERS[self.rng.gen_range(0..USERS.len())];
        let peer = USERS[self.rng.gen_range(0..USERS.len())];
        match roll {
            0..=24 if user != peer => {
                let retry = self.rng.gen_bool(0.3) && !self.unacknowledged.is_empty();
                let (user, peer, id) = if retry {
                    self.unacknowledged[self.rng.gen_range(0..self.unacknowledged.len())]
                } else {
                    let id = EventId::from_parts(self.now_ms, self.rng.gen());
                    self.unacknowledged.push((user, peer, id));
                    (user, peer, id)
                };
                let request =
                    Request::PostMessage { user: user.into(), peer: peer.into(), id: Some(id), text: "hello".into() };
                self.request(Pending::Post { user, peer, id }, request);
            }
            25..=34 => {
                let request = Request::Typing { user: user.into(), peer: peer.into() };
                self.request(Pending::Other, request);
            }
            35..=64 => {
                let browser = self.rng.gen_range(0..self.browsers.len());
                if self.browsers[browser].waiting.is_none() {
                    let timeout_ms = self.rng.gen_range(0..5) * 1000;
                    let since = self.browsers[browser].cursor.clone();
                    let request = Request::Sync { user: self.browsers[browser].user.into(), since, timeout_ms };
                    self.request(Pending::Sync { browser }, request);
                }
            }
            65..=84 => self.disk.sync(),
            85..=96 => {
                self.now_ms += self.rng.gen_range(1..800);
                self.core.tick(self.now_ms);
            }
            97..=99 if faults => self.crash(),
            _ => {}
        }
        self.drain()?;
        self.check_deadlines()
    }

    /// The process dies: unsynced writes are lost, requests in flight get no answer.
    fn crash(&mut self) {
        self.crashes += 1;
        self.record("crash");
        self.disk.crash();
        self.completions.lock().unwrap().clear();
        self.pending.clear();
        for browser in &mut self.browsers {
            browser.waiting = None;
        }
        self.core =
            NodeCore::new(core_config(self.rng.gen()), self.disk.clone(), self.now_ms).expect("the mem disk reads");
    }

    fn check_deadlines(&self) -> Result<(), String> {
        match self.core.poll_timeout() {
            Some(deadline) if deadline + 1000 < self.now_ms => {
                Err(format!("a long-poll waited past its deadline {deadline}"))
            }
            _ if self.core.waiting() > 64 => Err("more long-polls than the cap".into()),
            _ => Ok(()),
        }
    }

    /// Faults off: sync the disk, let time pass, and let every browser catch up.
    fn converge(&mut self) -> Result<(), String> {
        for _ in 0..200 {
            self.disk.sync();
            self.now_ms += 1000;
            self.core.tick(self.now_ms);
            self.drain()?;
            for browser in 0..self.browsers.len() {
                if self.browsers[browser].waiting.is_none() {
                    let since = self.browsers[browser].cursor.clone();
                    let request = Request::Sync { user: self.browsers[browser].user.into(), since, timeout_ms: 0 };
                    self.request(Pending::Sync { browser }, request);
                }
            }
            self.drain()?;
        }
        self.check_final()
    }

    fn check_final(&self) -> Result<(), String> {
        let mut heads: BTreeMap<StreamName, Version> = BTreeMap::new();
        for (stream, id, version) in &self.acknowledged {
            let stored = self.disk.find(stream, *id).map_err(|e| e.to_string())?;
            if stored.map(|e| e.version) != Some(*version) {
                return Err(format!("acknowledged {id} at {stream}/{version} is not stored there"));
            }
            let (a, b) = node_core::social::chat_members(stream).expect("chat stream");
            for user in [a, b] {
                let copy = node_core::social::inbox_copy_id(*id, user);
                if self.disk.find(&node_core::social::inbox_stream(user), copy).map_err(|e| e.to_string())?.is_none() {
                    return Err(format!("acknowledged {id} is missing from inbox:{user}"));
                }
            }
            heads.insert(stream.clone(), self.disk.head(stream).map_err(|e| e.to_string())?);
        }
        for browser in &self.browsers {
            for (stream, head) in &heads {
                let (a, b) = node_core::social::chat_members(stream).expect("chat stream");
                let mine = a == browser.user || b == browser.user;
                let seen = browser.seen.get(stream).copied().unwrap_or(0);
                if mine && seen != head.0 {
                    let all = self
                        .disk
                        .read(stream, ReadRange::After { after: Version(0), limit: 1000 })
                        .map_err(|e| e.to_string())?;
                    return Err(format!(
                        "{} saw {stream} up to {seen} of {} ({} events)",
                        browser.user,
                        head,
                        all.len()
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Runs one seed; `Err` names the broken promise.
pub fn run_seed(seed: u64, steps: usize) -> Result<Outcome, String> {
    let mut world = World::new(seed);
    // Every browser starts with a fresh sync, before anything is written.
    for browser in 0..world.browsers.len() {
        let request = Request::Sync { user: world.browsers[browser].user.into(), since: None, timeout_ms: 0 };
        world.request(Pending::Sync { browser }, request);
    }
    world.drain()?;
    for _ in 0..steps {
        world.step(true)?;
    }
    world.converge()?;
    Ok(Outcome {
        seed,
        trace_hash: world.trace,
        acknowledged: world.acknowledged.len(),
        crashes: world.crashes,
        delivered: world.delivered,
    })
}
