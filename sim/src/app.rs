//! One node's application side in the simulator: its node core on a simulated disk, users
//! who send messages (retrying ids), type and long-poll `sync` from their cursors, and the
//! checks of what they were promised.
//!
//! The chat core still keeps each node's own data (the replicated log runs beside it in
//! `cluster.rs` until it is wired under the core), so these checks are per node:
//! - every acknowledged message is stored once in its conversation and both inboxes, and
//!   stays there across crashes (not across a wiped disk, which today has no replica);
//! - every browser sees each of its conversations in version order, with no gap, across
//!   crashes, resuming from its cursor (promise 5 of DESIGN.md).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use node_core::api::{Reply, Request, RequestId, SyncItem};
use node_core::{BatchId, Config, NodeCore, Output};
use rand::rngs::SmallRng;
use rand::Rng;
use store::mem::MemStore;
use store::{EventId, Store, StoreError, StreamName, Version};

use crate::Failure;

const USERS: [&str; 4] = ["ann", "ben", "cat", "dan"];
pub const WAITERS_MAX: usize = 64;

type Completions = Arc<Mutex<Vec<(BatchId, Result<(), StoreError>)>>>;

struct Browser {
    user: &'static str,
    cursor: Option<String>,
    waiting: bool,
    /// Per conversation stream: the last version this browser was shown.
    seen: HashMap<StreamName, u64>,
}

enum Pending {
    Post { user: &'static str, peer: &'static str, id: EventId },
    Sync { browser: usize },
    Other,
}

pub struct App {
    pub disk: Arc<MemStore>,
    core: NodeCore,
    config: Config,
    completions: Completions,
    next_request: u64,
    pending: HashMap<RequestId, Pending>,
    browsers: Vec<Browser>,
    acknowledged: Vec<(StreamName, EventId, Version)>,
    unacknowledged: Vec<(&'static str, &'static str, EventId)>,
    pub failed_storage: bool,
    pub trace: Vec<u64>,
    now_ms: u64,
}

impl App {
    pub fn new(config: Config, now_ms: u64) -> App {
        let disk = Arc::new(MemStore::manual());
        let core = NodeCore::new(config.clone(), disk.clone(), now_ms).expect("a new disk reads");
        let mut app = App {
            disk,
            core,
            config,
            completions: Arc::default(),
            next_request: 0,
            pending: HashMap::new(),
            browsers: USERS
                .iter()
                .map(|user| Browser { user, cursor: None, waiting: false, seen: HashMap::new() })
                .collect(),
            acknowledged: Vec::new(),
            unacknowledged: Vec::new(),
            failed_storage: false,
            trace: Vec::new(),
            now_ms,
        };
        app.fresh_syncs();
        app
    }

    /// Every browser starts over with a fresh sync (a new app, or a wiped disk).
    fn fresh_syncs(&mut self) {
        for browser in 0..self.browsers.len() {
            self.browsers[browser] =
                Browser { user: USERS[browser], cursor: None, waiting: false, seen: HashMap::new() };
            let request = Request::Sync { user: USERS[browser].into(), since: None, timeout_ms: 0 };
            self.request(Pending::Sync { browser }, request);
        }
    }

    fn request(&mut self, pending: Pending, request: Request) {
        let id = RequestId(self.next_request);
        self.next_request += 1;
        if let Pending::Sync { browser } = pending {
            self.browsers[browser].waiting = true;
        }
        self.pending.insert(id, pending);
        self.core.request(self.now_ms, id, request);
    }

    /// The process dies: unsynced writes are lost, requests in flight get no answer. It
    /// restarts from its disk (or an empty one, if `wipe`) with a new core.
    pub fn restart(&mut self, now_ms: u64, wipe: bool, seed: u64) -> Result<(), Failure> {
        self.disk.crash();
        if wipe {
            self.disk.wipe();
            self.acknowledged.clear();
            self.unacknowledged.clear();
        }
        self.completions.lock().unwrap().clear();
        self.pending.clear();
        for browser in &mut self.browsers {
            browser.waiting = false;
        }
        self.failed_storage = false;
        self.core = NodeCore::new(Config { seed, ..self.config.clone() }, self.disk.clone(), now_ms)
            .map_err(|e| Failure::new("restart reads the disk", e.to_string()))?;
        self.now_ms = now_ms;
        if wipe {
            self.fresh_syncs();
        }
        self.drain()
    }

    /// One random thing a user does, or a disk sync, or nothing.
    pub fn act(&mut self, rng: &mut SmallRng, now_ms: u64) -> Result<(), Failure> {
        self.now_ms = now_ms;
        self.core.tick(now_ms);
        let user = USERS[rng.gen_range(0..USERS.len())];
        let peer = USERS[rng.gen_range(0..USERS.len())];
        match rng.gen_range(0..100) {
            0..=9 if user != peer => {
                let retry = rng.gen_bool(0.3) && !self.unacknowledged.is_empty();
                let (user, peer, id) = if retry {
                    self.unacknowledged[rng.gen_range(0..self.unacknowledged.len())]
                } else {
                    let id = EventId::from_parts(now_ms, rng.gen());
                    self.unacknowledged.push((user, peer, id));
                    (user, peer, id)
                };
                let request =
                    Request::PostMessage { user: user.into(), peer: peer.into(), id: Some(id), text: "hello".into() };
                self.request(Pending::Post { user, peer, id }, request);
            }
            10..=13 => self.request(Pending::Other, Request::Typing { user: user.into(), peer: peer.into() }),
            14..=29 => self.poll(rng.gen_range(0..self.browsers.len()), rng.gen_range(0..5) * 1000),
            30..=49 => self.disk.sync(),
            _ => {}
        }
        self.drain()
    }

    fn poll(&mut self, browser: usize, timeout_ms: u64) {
        if !self.browsers[browser].waiting {
            let since = self.browsers[browser].cursor.clone();
            let request = Request::Sync { user: self.browsers[browser].user.into(), since, timeout_ms };
            self.request(Pending::Sync { browser }, request);
        }
    }

    /// The disk's next sync fails with EIO; the node must then stop (the caller restarts it).
    pub fn fail_sync(&mut self, applied: bool) -> Result<(), Failure> {
        self.disk.fail_sync(applied);
        self.drain()
    }

    /// Moves the core's outputs: batches to the disk, replies to their askers.
    fn drain(&mut self) -> Result<(), Failure> {
        loop {
            while let Some(output) = self.core.poll_output() {
                match output {
                    Output::Persist(batch, writes) => {
                        let completions = self.completions.clone();
                        self.disk.append(writes, Box::new(move |r| completions.lock().unwrap().push((batch, r))));
                    }
                    Output::Reply(id, reply) => self.replied(id, reply)?,
                    Output::Fatal(_) => self.failed_storage = true,
                    Output::Forward(..) => unreachable!("this core is not replicated"),
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

    fn replied(&mut self, id: RequestId, reply: Reply) -> Result<(), Failure> {
        self.trace.push(id.0);
        match (self.pending.remove(&id), reply) {
            (Some(Pending::Post { user, peer, id }), Reply::Appended { event, .. }) => {
                self.unacknowledged.retain(|(u, p, i)| (*u, *p, *i) != (user, peer, id));
                self.acknowledged.push((event.stream, event.id, event.version));
            }
            (Some(Pending::Sync { browser }), Reply::Sync(sync)) => {
                let b = &mut self.browsers[browser];
                b.waiting = false;
                if sync.reset && b.cursor.is_some() {
                    return Err(Failure::new("no reset from a valid cursor", format!("{} was reset", b.user)));
                }
                b.cursor = Some(sync.cursor);
                // A fresh sync (first, or after a reset) hands over history up to its cursor,
                // as the chat list's last messages: the browser continues from there.
                for chat in sync.snapshot.iter().flat_map(|s| &s.chats) {
                    let last = b.seen.entry(chat.last.stream.clone()).or_insert(0);
                    *last = (*last).max(chat.last.version.0);
                }
                for item in sync.items {
                    let SyncItem::Event(event) = item else { continue };
                    if !event.stream.as_str().starts_with("chat:") {
                        continue;
                    }
                    let last = b.seen.entry(event.stream.clone()).or_insert(0);
                    if event.version.0 > *last + 1 {
                        let detail = format!("{} got {}/{} after {}", b.user, event.stream, event.version, last);
                        return Err(Failure::new("sync delivers every version in order", detail));
                    }
                    *last = (*last).max(event.version.0);
                }
            }
            (Some(Pending::Sync { browser }), Reply::Error(_)) => self.browsers[browser].waiting = false,
            (Some(_), _) => {}
            (None, reply) => return Err(Failure::new("replies answer requests", format!("{reply:?}"))),
        }
        Ok(())
    }

    pub fn waiting(&self) -> usize {
        self.core.waiting()
    }

    pub fn overdue(&self, now_ms: u64) -> bool {
        self.core.poll_timeout().is_some_and(|deadline| deadline + 1000 < now_ms)
    }

    /// Faults are off: sync, let browsers catch up, and check everything that was promised.
    pub fn settle(&mut self, now_ms: u64) -> Result<(), Failure> {
        self.now_ms = now_ms;
        self.disk.sync();
        self.core.tick(now_ms);
        self.drain()?;
        for browser in 0..self.browsers.len() {
            self.poll(browser, 0);
        }
        self.drain()
    }

    pub fn check_final(&self) -> Result<(), Failure> {
        let lost = |detail: String| Failure::new("acknowledged messages are durable", detail);
        let mut heads: HashMap<StreamName, Version> = HashMap::new();
        for (stream, id, version) in &self.acknowledged {
            let stored = self.disk.find(stream, *id).map_err(|e| lost(e.to_string()))?;
            if stored.map(|e| e.version) != Some(*version) {
                return Err(lost(format!("{id} at {stream}/{version}")));
            }
            let (a, b) = node_core::social::chat_members(stream).expect("chat stream");
            for user in [a, b] {
                let copy = node_core::social::inbox_copy_id(*id, user);
                if self
                    .disk
                    .find(&node_core::social::inbox_stream(user), copy)
                    .map_err(|e| lost(e.to_string()))?
                    .is_none()
                {
                    return Err(Failure::new("messages reach both inboxes", format!("{id} missing from inbox:{user}")));
                }
            }
            heads.insert(stream.clone(), self.disk.head(stream).map_err(|e| lost(e.to_string()))?);
        }
        for browser in &self.browsers {
            for (stream, head) in &heads {
                let (a, b) = node_core::social::chat_members(stream).expect("chat stream");
                let seen = browser.seen.get(stream).copied().unwrap_or(0);
                if (a == browser.user || b == browser.user) && seen != head.0 {
                    let detail = format!("{} saw {stream} up to {seen} of {head}", browser.user);
                    return Err(Failure::new("browsers catch up after faults", detail));
                }
            }
        }
        Ok(())
    }
}
