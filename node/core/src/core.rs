//! [`NodeCore`]: sequencing, jobs, waiters, presence and signals. See the crate doc for the
//! state machine and its invariants.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use store::cursor::SyncCursor;
use store::{Event, EventId, ReadRange, Store, StoreError, StreamName, Version, WriteBatch};

use crate::api::*;
use crate::social::{self, Flags, InboxSummary};

#[derive(Clone, Debug)]
pub struct Config {
    /// Keys the MAC of sync cursors; the same on every node of a cluster.
    pub cursor_key: Vec<u8>,
    /// The history generation cursors carry; bumped when history is forcibly rewritten.
    pub generation: u64,
    /// Long-polls (sync and stream waits) held at once; more are refused as overloaded.
    pub waiters_max: usize,
    /// Batches handed to the store and not yet durable; more appends are refused.
    pub batches_in_flight_max: usize,
    /// Streams whose head and pending ids are cached.
    pub streams_cached_max: usize,
    /// Users whose inbox summary (chat list, unread counts) is cached.
    pub summaries_cached_max: usize,
    pub presence_window_ms: u64,
    pub signal_ttl_ms: u64,
    pub signals_per_user_max: usize,
    /// Seeds the generator of event ids.
    pub seed: u64,
    /// With replication, the partition count: then this core sequences only streams of the
    /// partitions it was told it serves ([`NodeCore::serving`]) and delivers the rest (inbox
    /// copies) to their primaries through `Output::Forward`. `None`: every stream is local.
    pub partitions: Option<u32>,
    /// A rule broken on purpose (simulator only).
    #[cfg(feature = "planted-bugs")]
    pub bug: Option<PlantedBug>,
}

/// Rules the simulator can break on purpose, to show that its checkers catch them.
#[cfg(feature = "planted-bugs")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlantedBug {
    /// Acknowledge appends when they are handed to the store, before they are durable.
    AckBeforeSync,
    /// Skip re-appending the inbox copies a crash interrupted.
    SkipInboxRepair,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cursor_key: b"griddle-dev-cursor-key".to_vec(),
            generation: 1,
            waiters_max: 19_000,
            batches_in_flight_max: 4096,
            streams_cached_max: 200_000,
            summaries_cached_max: 100_000,
            presence_window_ms: 60_000,
            signal_ttl_ms: 5_000,
            signals_per_user_max: 16,
            seed: 0x0067_7269_6464_6c65,
            partitions: None,
            #[cfg(feature = "planted-bugs")]
            bug: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BatchId(pub u64);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ForwardId(pub u64);

#[derive(Debug)]
pub enum Output {
    /// Make this batch durable, in the order these outputs come, then call `persisted`.
    Persist(BatchId, WriteBatch),
    Reply(RequestId, Reply),
    /// Storage failed in a way that may have changed it: stop serving and restart from disk.
    Fatal(StoreError),
    /// Run this request (a `Deliver`) at its stream's primary, retrying until it succeeds,
    /// then call `forwarded` with the answer.
    Forward(ForwardId, Request),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct JobId(u64);

struct StreamState {
    /// Latest durable version.
    head: Version,
    /// Latest version handed out (durable or pending).
    assigned: Version,
    /// Ids sequenced but not yet durable, and the batch that holds them.
    pending: HashMap<EventId, BatchId>,
}

struct Batch {
    events: Vec<Event>,
    jobs: Vec<JobId>,
}

/// One event a job wants in a stream.
struct Item {
    stream: StreamName,
    id: EventId,
    kind: String,
    from: String,
    data: String,
}

/// Appends that finish together and then do `then`.
struct Job {
    /// Per item: the stored event once known.
    slots: Vec<(StreamName, EventId, Option<Event>)>,
    waiting: HashSet<BatchId>,
    /// Deliveries to other primaries not answered yet.
    forwards: HashSet<ForwardId>,
    created: bool,
    then: Then,
}

enum Then {
    ReplyOne(RequestId),
    ReplyAll(RequestId),
    ReplyDone(RequestId),
    /// The message is durable: append its inbox copies, then reply.
    CopyToInboxes(RequestId),
    /// The inbox copies are durable: reply with the message (if anyone asked).
    Copied {
        request: Option<RequestId>,
        message: Event,
        created: bool,
    },
}

enum Wait {
    Sync { user: String, cursor: SyncCursor, text: String },
    Stream { stream: StreamName, after: Version, limit: usize },
}

struct Seen {
    open: usize,
    last_ms: u64,
}

struct Signal {
    stamp: u64,
    from: String,
    time_ms: u64,
}

pub struct NodeCore {
    config: Config,
    store: Arc<dyn Store>,
    rng: u64,
    outputs: VecDeque<Output>,
    streams: HashMap<StreamName, StreamState>,
    batches: HashMap<BatchId, Batch>,
    jobs: HashMap<JobId, Job>,
    next_batch: u64,
    next_job: u64,
    waits: HashMap<RequestId, (Wait, u64)>,
    sync_waits: HashMap<String, BTreeSet<RequestId>>,
    stream_waits: HashMap<StreamName, BTreeSet<RequestId>>,
    deadlines: BTreeSet<(u64, RequestId)>,
    summaries: HashMap<String, InboxSummary>,
    flags: Flags,
    signals: HashMap<String, VecDeque<Signal>>,
    signal_stamp: u64,
    presence: HashMap<String, Seen>,
    failed: bool,
    stopping: bool,
    /// Partitions served here (with `Config::partitions`).
    served: BTreeSet<u32>,
    forwards: HashMap<ForwardId, JobId>,
    next_forward: u64,
}

type Answer = Result<Option<Reply>, CoreError>;

fn unavailable(error: StoreError) -> CoreError {
    CoreError::Unavailable(format!("storage: {error}"))
}

impl NodeCore {
    /// A core over `store`. Messages whose inbox copies a crash interrupted get them now:
    /// the copies are the first outputs, before anything this core is asked later.
    pub fn new(config: Config, store: Arc<dyn Store>, now_ms: u64) -> Result<NodeCore, StoreError> {
        let mut core = NodeCore::empty(config, store);
        #[cfg_attr(not(feature = "planted-bugs"), allow(unused_mut))]
        let mut markers = core.store.meta_scan(COPY_MARKER, usize::MAX)?;
        #[cfg(feature = "planted-bugs")]
        if core.config.bug == Some(PlantedBug::SkipInboxRepair) {
            markers.clear();
        }
        for (key, _) in markers {
            let (stream, version) = parse_copy_marker(&key).ok_or_else(|| StoreError::Corrupt("copy marker".into()))?;
            let range = ReadRange::After { after: Version(version.0 - 1), limit: 1 };
            let message = core
                .store
                .read(&stream, range)?
                .pop()
                .ok_or_else(|| StoreError::Corrupt(format!("marker for missing {stream}/{version}")))?;
            core.copy_to_inboxes(now_ms, None, message, false);
        }
        Ok(core)
    }

    fn empty(config: Config, store: Arc<dyn Store>) -> NodeCore {
        assert!(config.waiters_max > 0 && config.batches_in_flight_max > 0);
        NodeCore {
            rng: config.seed | 1,
            config,
            store,
            outputs: VecDeque::new(),
            streams: HashMap::new(),
            batches: HashMap::new(),
            jobs: HashMap::new(),
            next_batch: 0,
            next_job: 0,
            waits: HashMap::new(),
            sync_waits: HashMap::new(),
            stream_waits: HashMap::new(),
            deadlines: BTreeSet::new(),
            summaries: HashMap::new(),
            flags: Flags::default(),
            signals: HashMap::new(),
            signal_stamp: 0,
            presence: HashMap::new(),
            failed: false,
            stopping: false,
            served: BTreeSet::new(),
            forwards: HashMap::new(),
            next_forward: 0,
        }
    }

    /// The replication layer says this node started or stopped serving `part`.
    pub fn serving(&mut self, part: u32, serving: bool) {
        if serving {
            self.served.insert(part);
        } else {
            self.served.remove(&part);
        }
        let partitions = self.config.partitions.unwrap_or(1);
        self.forget(|stream| crate::placement::partition_of(stream, partitions) == part);
    }

    /// The partition of `stream` when partitions are replicated.
    fn partition(&self, stream: &StreamName) -> Option<u32> {
        Some(crate::placement::partition_of(stream.as_str(), self.config.partitions?))
    }

    /// Whether this core sequences `stream` (its partition is served here, or nothing is
    /// replicated).
    fn is_local(&self, stream: &StreamName) -> bool {
        self.partition(stream).is_none_or(|p| self.served.contains(&p))
    }

    /// The answer to an `Output::Forward`: the delivered events (or, once the node stops, an
    /// error).
    pub fn forwarded(&mut self, now_ms: u64, forward: ForwardId, reply: Reply) {
        let Some(job_id) = self.forwards.remove(&forward) else { return };
        let Some(job) = self.jobs.get_mut(&job_id) else { return };
        job.forwards.remove(&forward);
        match reply {
            Reply::AppendedAll { events, created } => {
                job.created |= created;
                for (stream, id, slot) in &mut job.slots {
                    if slot.is_none() {
                        *slot = events.iter().find(|e| e.stream == *stream && e.id == *id).cloned();
                    }
                }
            }
            other => {
                // Only a stopping node gives up on a delivery; its request gets the error.
                let job = self.jobs.remove(&job_id).expect("present");
                let error = match other {
                    Reply::Error(error) => error,
                    _ => CoreError::Unavailable("unexpected answer to a delivery".into()),
                };
                if let Some(request) = job_request(&job.then) {
                    self.reply(request, Reply::Error(error));
                }
                return;
            }
        }
        if job.waiting.is_empty() && job.forwards.is_empty() {
            let job = self.jobs.remove(&job_id).expect("present");
            self.finish(now_ms, job);
        }
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When `tick` must be called next, at the latest.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.deadlines.first().map(|(deadline, _)| *deadline)
    }

    /// Long-polls held now.
    pub fn waiting(&self) -> usize {
        self.waits.len()
    }

    /// The version of `sys:flags` this core knows (from its store, or learned).
    pub fn flags_version(&mut self) -> Result<Version, CoreError> {
        Ok(self.flags()?.applied)
    }

    /// Flag events read from the primary of `sys:flags` on another node (with replication
    /// a node may hold no copy of that stream, or hold it without its core hearing of
    /// appends): folds the new ones in order and wakes every held `sync`, which then
    /// carries a `flags` item.
    pub fn learn_flags(&mut self, now_ms: u64, events: &[Event]) {
        let before = self.flags.applied;
        for event in events {
            if event.version == self.flags.applied.next() {
                self.flags.apply(event);
            }
        }
        if self.flags.applied > before {
            let users: Vec<String> = self.sync_waits.keys().cloned().collect();
            for user in users {
                self.wake_user(now_ms, &user);
            }
        }
    }

    /// What the held long-polls watch: users with a `sync` waiting, streams with a wait.
    pub fn subscriptions(&self) -> (usize, usize) {
        (self.sync_waits.len(), self.stream_waits.len())
    }

    pub fn request(&mut self, now_ms: u64, request: RequestId, input: Request) {
        let answer = if self.failed || self.stopping {
            Err(CoreError::Unavailable("node is stopping".into()))
        } else {
            self.handle(now_ms, request, input)
        };
        match answer {
            Ok(Some(reply)) => self.reply(request, reply),
            Ok(None) => {}
            Err(error) => self.reply(request, Reply::Error(error)),
        }
    }

    fn handle(&mut self, now_ms: u64, request: RequestId, input: Request) -> Answer {
        match input {
            Request::PostMessage { user, peer, id, text } => self.post_message(now_ms, request, user, peer, id, text),
            read @ (Request::Messages { .. } | Request::Feed { .. }) => Ok(read_only(&*self.store, &read)),
            Request::Typing { user, peer } => {
                check_peer(&user, &peer)?;
                self.signal(now_ms, &peer, user);
                Ok(Some(Reply::Done))
            }
            Request::MarkRead { user, peer, version } => self.mark_read(now_ms, request, user, peer, version),
            Request::Chats { user, before_ms, limit } => {
                Ok(Some(Reply::Chats(self.summary(&user)?.chats(before_ms, limit))))
            }
            Request::PostFeed { user, target, id, kind } => {
                check_user(&target)?;
                let item = self.item(now_ms, social::feed_stream(&target), id, kind.event_type(), &user, "{}".into());
                self.submit(now_ms, vec![item], Then::ReplyOne(request))
            }
            Request::Sync { user, since, timeout_ms } => self.sync(now_ms, request, user, since, timeout_ms),
            Request::Online { limit } => Ok(Some(self.online(now_ms, limit))),
            Request::Flags { user } => Ok(Some(Reply::Flags(self.flags()?.evaluate(&user)))),
            Request::SetFlag { name, percent, from } => {
                if !social::valid_flag_name(&name) || percent > 100 {
                    return Err(CoreError::BadRequest(
                        "flag names are 1-64 of A-Z a-z 0-9 _ - . and percent 0..100".into(),
                    ));
                }
                let item = self.item(
                    now_ms,
                    social::flags_stream(),
                    None,
                    social::TYPE_FLAG_SET,
                    &from,
                    social::flag_set_data(&name, percent),
                );
                self.submit(now_ms, vec![item], Then::ReplyDone(request))
            }
            Request::StreamAppend { stream, events, from } => self.stream_append(now_ms, request, stream, events, from),
            Request::Deliver { stream, events, from } => {
                let items = events
                    .into_iter()
                    .map(|e| self.item(now_ms, stream.clone(), e.id, &e.kind, &from, e.data))
                    .collect();
                self.submit(now_ms, items, Then::ReplyAll(request))
            }
            Request::StreamRead { stream, after, before, limit, wait_ms, .. } => {
                let reply = page(&*self.store, &stream, after, before, limit)?;
                match (&reply, after) {
                    (Reply::Page { events, .. }, Some(after)) if events.is_empty() && wait_ms > 0 => {
                        self.wait(request, Wait::Stream { stream, after, limit }, now_ms + wait_ms)?;
                        Ok(None)
                    }
                    _ => Ok(Some(reply)),
                }
            }
        }
    }

    fn post_message(
        &mut self,
        now_ms: u64,
        request: RequestId,
        user: String,
        peer: String,
        id: Option<EventId>,
        text: String,
    ) -> Answer {
        check_peer(&user, &peer)?;
        let stream = social::chat_stream(&user, &peer);
        if let Some(id) = id {
            // A known id is answered with the stored message, whatever the body.
            self.cache_stream(&stream)?;
            let known = self.streams[&stream].pending.contains_key(&id)
                || self.store.find(&stream, id).map_err(unavailable)?.is_some();
            if known {
                let item = self.item(now_ms, stream, Some(id), social::TYPE_MESSAGE, &user, String::new());
                return self.submit(now_ms, vec![item], Then::CopyToInboxes(request));
            }
        }
        let chars = text.chars().count();
        if chars == 0 || chars > TEXT_CHARS_MAX {
            return Err(CoreError::BadRequest(format!("text must be 1 to {TEXT_CHARS_MAX} characters")));
        }
        let data = serde_json::json!({ "text": text }).to_string();
        let item = self.item(now_ms, stream, id, social::TYPE_MESSAGE, &user, data);
        self.submit(now_ms, vec![item], Then::CopyToInboxes(request))
    }

    fn mark_read(&mut self, now_ms: u64, request: RequestId, user: String, peer: String, version: Version) -> Answer {
        check_peer(&user, &peer)?;
        let chat = social::chat_stream(&user, &peer);
        // The conversation's head is known here only where its partition is served.
        let head = if self.is_local(&chat) { self.head(&chat)? } else { Version(u64::MAX) };
        if version > head {
            return Err(CoreError::BadRequest(format!("version {version} is above the conversation's head {head}")));
        }
        if version <= self.summary(&user)?.marker(&peer) {
            return Ok(Some(Reply::Done)); // Markers only move forward.
        }
        let data = social::read_marker_data(&peer, version);
        let item = self.item(now_ms, social::inbox_stream(&user), None, social::TYPE_READ, &user, data);
        self.submit(now_ms, vec![item], Then::ReplyDone(request))
    }

    fn stream_append(
        &mut self,
        now_ms: u64,
        request: RequestId,
        stream: StreamName,
        events: Vec<NewEvent>,
        from: String,
    ) -> Answer {
        if social::reserved_kind(&stream) {
            return Err(CoreError::Forbidden(format!("{stream} changes only through its own routes")));
        }
        if events.is_empty() || events.len() > PAGE_LEN_MAX {
            return Err(CoreError::BadRequest(format!("append 1 to {PAGE_LEN_MAX} events")));
        }
        if events.iter().any(|e| e.kind.is_empty() || e.kind.chars().count() > 64) {
            return Err(CoreError::BadRequest("event types are 1 to 64 characters".into()));
        }
        let items =
            events.into_iter().map(|e| self.item(now_ms, stream.clone(), e.id, &e.kind, &from, e.data)).collect();
        self.submit(now_ms, items, Then::ReplyAll(request))
    }

    fn item(
        &mut self,
        now_ms: u64,
        stream: StreamName,
        id: Option<EventId>,
        kind: &str,
        from: &str,
        data: String,
    ) -> Item {
        let id = id.unwrap_or_else(|| EventId::from_parts(now_ms, self.random_u128()));
        Item { stream, id, kind: kind.into(), from: from.into(), data }
    }

    fn random_u128(&mut self) -> u128 {
        let mut next = || {
            // xorshift64*: cheap, seeded, deterministic.
            self.rng ^= self.rng >> 12;
            self.rng ^= self.rng << 25;
            self.rng ^= self.rng >> 27;
            self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        (u128::from(next()) << 64) | u128::from(next())
    }

    /// Sequences `items` (idempotently by id), hands new events to the store as one batch,
    /// and runs `then` once every item is durable.
    fn submit(&mut self, now_ms: u64, items: Vec<Item>, then: Then) -> Answer {
        if self.batches.len() >= self.config.batches_in_flight_max && !matches!(then, Then::Copied { .. }) {
            return Err(CoreError::Overloaded("too many appends in flight".into()));
        }
        self.trim_stream_cache();
        // First every fallible read, so that a storage error leaves nothing half-sequenced.
        // Items of partitions served elsewhere are delivered there instead (no reads here).
        let local: Vec<bool> = items.iter().map(|item| self.is_local(&item.stream)).collect();
        let mut found: Vec<Option<Event>> = Vec::with_capacity(items.len());
        for (item, local) in items.iter().zip(&local) {
            if !local {
                found.push(None);
                continue;
            }
            self.cache_stream(&item.stream)?;
            let pending = self.streams[&item.stream].pending.contains_key(&item.id);
            found.push(if pending { None } else { self.store.find(&item.stream, item.id).map_err(unavailable)? });
        }
        let mut job = Job {
            slots: Vec::with_capacity(items.len()),
            waiting: HashSet::new(),
            forwards: HashSet::new(),
            created: false,
            then,
        };
        // New events, one batch per partition (a replicated log takes one partition's).
        let mut fresh: BTreeMap<Option<u32>, (BatchId, Vec<Event>)> = BTreeMap::new();
        let mut remote: BTreeMap<(StreamName, String), Vec<NewEvent>> = BTreeMap::new();
        for ((item, stored), local) in items.into_iter().zip(found).zip(local) {
            let slot = (item.stream.clone(), item.id, None);
            if let Some(earlier) = job.slots.iter().find(|(s, id, _)| *s == item.stream && *id == item.id) {
                let earlier = earlier.2.clone(); // The same id twice in one request: one event.
                job.slots.push((item.stream, item.id, earlier));
                continue;
            }
            if !local {
                let event = NewEvent { id: Some(item.id), kind: item.kind, data: item.data };
                remote.entry((item.stream, item.from)).or_default().push(event);
                job.slots.push(slot);
                continue;
            }
            let group = self.partition(&item.stream);
            let state = self.streams.get_mut(&item.stream).expect("cached above");
            if let Some(batch) = state.pending.get(&item.id) {
                job.waiting.insert(*batch); // A retry overtook its first attempt: wait for it.
                job.slots.push(slot);
                continue;
            }
            if let Some(stored) = stored {
                job.slots.push((item.stream, item.id, Some(stored)));
                continue;
            }
            let next_batch = &mut self.next_batch;
            let (batch_id, events) = fresh.entry(group).or_insert_with(|| {
                *next_batch += 1;
                (BatchId(*next_batch - 1), Vec::new())
            });
            state.assigned = state.assigned.next();
            state.pending.insert(item.id, *batch_id);
            events.push(Event {
                id: item.id,
                stream: item.stream,
                version: state.assigned,
                kind: item.kind,
                from: item.from,
                time_ms: now_ms,
                data: item.data,
            });
            job.slots.push(slot);
        }
        let job_id = JobId(self.next_job);
        self.next_job += 1;
        for (batch_id, events) in fresh.into_values() {
            job.created = true;
            job.waiting.insert(batch_id);
            let meta = match &job.then {
                Then::CopyToInboxes(_) => {
                    events.iter().map(|m| (copy_marker(&m.stream, m.version), Some(Vec::new()))).collect()
                }
                // Without replication the marker goes with the copies, atomically; with it, the
                // copies may live in other partitions, so `finish` removes it afterwards.
                Then::Copied { message, .. } if self.config.partitions.is_none() => {
                    vec![(copy_marker(&message.stream, message.version), None)]
                }
                _ => Vec::new(),
            };
            let batch = WriteBatch { events: events.clone(), meta };
            self.batches.insert(batch_id, Batch { events, jobs: Vec::new() });
            self.outputs.push_back(Output::Persist(batch_id, batch));
        }
        for ((stream, from), events) in remote {
            let forward = ForwardId(self.next_forward);
            self.next_forward += 1;
            self.forwards.insert(forward, job_id);
            job.forwards.insert(forward);
            self.outputs.push_back(Output::Forward(forward, Request::Deliver { stream, events, from }));
        }
        #[cfg(feature = "planted-bugs")]
        if self.config.bug == Some(PlantedBug::AckBeforeSync) && !job.waiting.is_empty() {
            let fresh: Vec<Event> =
                job.waiting.iter().filter_map(|b| self.batches.get(b)).flat_map(|b| b.events.clone()).collect();
            for (stream, id, slot) in &mut job.slots {
                if slot.is_none() {
                    *slot = fresh.iter().find(|e| e.stream == *stream && e.id == *id).cloned();
                }
            }
            if job.slots.iter().all(|(_, _, slot)| slot.is_some()) {
                job.waiting.clear();
            }
        }
        for batch in &job.waiting {
            self.batches.get_mut(batch).expect("pending ids point at batches in flight").jobs.push(job_id);
        }
        if job.waiting.is_empty() && job.forwards.is_empty() {
            self.finish(now_ms, job);
        } else {
            self.jobs.insert(job_id, job);
        }
        Ok(None)
    }

    fn cache_stream(&mut self, stream: &StreamName) -> Result<(), CoreError> {
        if self.streams.contains_key(stream) {
            return Ok(());
        }
        let head = self.store.head(stream).map_err(unavailable)?;
        self.streams.insert(stream.clone(), StreamState { head, assigned: head, pending: HashMap::new() });
        Ok(())
    }

    /// Forgets idle streams (their heads are on disk) when the cache is over its bound.
    fn trim_stream_cache(&mut self) {
        if self.streams.len() <= self.config.streams_cached_max {
            return;
        }
        let idle: Vec<StreamName> = self
            .streams
            .iter()
            .filter(|(_, s)| s.pending.is_empty())
            .map(|(n, _)| n.clone())
            .take(self.streams.len() - self.config.streams_cached_max * 3 / 4)
            .collect();
        for name in idle {
            self.streams.remove(&name);
        }
    }

    /// The durable head, as readers see it. (The cached head in `streams` can trail it for
    /// the moment between a batch becoming durable and `persisted`; a cursor or read marker
    /// built from what a reader saw must not be judged against that.)
    fn head(&self, stream: &StreamName) -> Result<Version, CoreError> {
        self.store.head(stream).map_err(unavailable)
    }

    /// A batch handed out by `Output::Persist` is durable (or failed).
    pub fn persisted(&mut self, now_ms: u64, batch_id: BatchId, result: Result<(), StoreError>) {
        let batch = self.batches.remove(&batch_id).expect("persisted reports a batch in flight");
        if self.failed {
            return; // After a failed write nothing more is applied: the node restarts from disk.
        }
        if let Err(error) = result {
            // Whether it is on disk is unknown, and later batches may depend on it: stop.
            self.failed = true;
            self.outputs.push_back(Output::Fatal(error));
            return;
        }
        let mut users: BTreeSet<String> = BTreeSet::new();
        let mut streams: BTreeSet<StreamName> = BTreeSet::new();
        for event in &batch.events {
            let state = self.streams.get_mut(&event.stream).expect("streams with pending events stay cached");
            assert_eq!(event.version, state.head.next(), "{} becomes durable in order", event.stream);
            state.head = event.version;
            state.pending.remove(&event.id);
            match event.stream.kind() {
                "inbox" | "feed" => {
                    users.insert(event.stream.as_str().split_once(':').expect("kind has a colon").1.to_owned());
                }
                "sys" => users.extend(self.sync_waits.keys().cloned()),
                _ => {}
            }
            streams.insert(event.stream.clone());
        }
        for job_id in batch.jobs {
            let Some(job) = self.jobs.get_mut(&job_id) else { continue };
            for (stream, id, slot) in &mut job.slots {
                if slot.is_none() {
                    *slot = batch.events.iter().find(|e| e.stream == *stream && e.id == *id).cloned();
                }
            }
            job.waiting.remove(&batch_id);
            if job.waiting.is_empty() && job.forwards.is_empty() {
                let job = self.jobs.remove(&job_id).expect("present");
                self.finish(now_ms, job);
            }
        }
        for user in users {
            self.wake_user(now_ms, &user);
        }
        for stream in streams {
            self.wake_stream(&stream);
        }
    }

    /// A batch handed out by `Output::Persist` will not be made durable by this node (it is
    /// not, or no longer, the primary of its partition): whether it commits later under
    /// another primary is unknown. Its requests get 503 (clients retry with the same ids,
    /// which makes that safe), and what was cached about its streams is dropped.
    pub fn abandoned(&mut self, _now_ms: u64, batch_id: BatchId) {
        let Some(batch) = self.batches.remove(&batch_id) else { return };
        for event in &batch.events {
            self.streams.remove(&event.stream);
        }
        for job_id in batch.jobs {
            let Some(job) = self.jobs.remove(&job_id) else { continue };
            if let Some(request) = job_request(&job.then) {
                let error = CoreError::Unavailable("the primary of this stream changed; retry".into());
                self.reply(request, Reply::Error(error));
            }
        }
    }

    /// This node started or stopped serving partitions through which `in_partition` says a
    /// stream falls: everything cached from those streams (heads, chat lists, flags) is
    /// dropped, because another primary may have moved them meanwhile.
    fn forget(&mut self, in_partition: impl Fn(&str) -> bool) {
        self.streams.retain(|name, state| !state.pending.is_empty() || !in_partition(name.as_str()));
        self.summaries.retain(|user, _| !in_partition(&format!("inbox:{user}")));
        if in_partition("sys:flags") {
            self.flags = Flags::default();
        }
    }

    fn finish(&mut self, now_ms: u64, job: Job) {
        let created = job.created;
        let mut events: Vec<Event> =
            job.slots.into_iter().map(|(_, _, e)| e.expect("every slot of a finished job is durable")).collect();
        match job.then {
            Then::ReplyOne(request) => self.reply(request, Reply::Appended { event: events.remove(0), created }),
            Then::ReplyAll(request) => self.reply(request, Reply::AppendedAll { events, created }),
            Then::ReplyDone(request) => self.reply(request, Reply::Done),
            Then::CopyToInboxes(request) => {
                let message = events.remove(0);
                self.copy_to_inboxes(now_ms, Some(request), message, created);
            }
            Then::Copied { request, message, created } => {
                if self.config.partitions.is_some() {
                    // The copies are durable (wherever they live): drop the marker.
                    let marker = copy_marker(&message.stream, message.version);
                    let batch_id = BatchId(self.next_batch);
                    self.next_batch += 1;
                    self.batches.insert(batch_id, Batch { events: Vec::new(), jobs: Vec::new() });
                    let batch = WriteBatch { events: Vec::new(), meta: vec![(marker, None)] };
                    self.outputs.push_back(Output::Persist(batch_id, batch));
                }
                if let Some(request) = request {
                    self.reply(request, Reply::Appended { event: message, created });
                }
            }
        }
    }

    /// Appends a durable message's copies to both users' inboxes (idempotent: the copies' ids
    /// derive from the message's). The message's batch left a marker that this one removes,
    /// so a crash between the two is repaired by [`NodeCore::new`].
    fn copy_to_inboxes(&mut self, now_ms: u64, request: Option<RequestId>, message: Event, created: bool) {
        let (a, b) = social::chat_members(&message.stream).expect("messages live in chat streams");
        let copies = [a, b].map(|user| Item {
            stream: social::inbox_stream(user),
            id: social::inbox_copy_id(message.id, user),
            kind: social::TYPE_MESSAGE.into(),
            from: message.from.clone(),
            data: social::inbox_copy_data(&message),
        });
        if let Err(error) = self.submit(now_ms, copies.into(), Then::Copied { request, message, created }) {
            if let Some(request) = request {
                self.reply(request, Reply::Error(error));
            }
        }
    }

    fn reply(&mut self, request: RequestId, reply: Reply) {
        self.outputs.push_back(Output::Reply(request, reply));
    }

    // ---- sync ----

    fn sync(
        &mut self,
        now_ms: u64,
        request: RequestId,
        user: String,
        since: Option<String>,
        timeout_ms: u64,
    ) -> Answer {
        self.seen(&user, now_ms);
        let Some(text) = since else { return self.fresh_sync(now_ms, &user, false).map(Some) };
        let Some(cursor) = SyncCursor::open(&self.config.cursor_key, &text) else {
            return self.fresh_sync(now_ms, &user, true).map(Some);
        };
        if cursor.user != user {
            return Err(CoreError::Forbidden("this cursor belongs to another user".into()));
        }
        // A cursor ahead of the streams here was made by another life of them: start over.
        // Not for flags: a node learns them from their primary a moment after it starts, and
        // a cursor ahead only means this node has not caught up yet (it sends flags once
        // newer than the cursor's).
        let behind = |mine: Version, head: Version| mine > head;
        if cursor.generation != self.config.generation
            || behind(cursor.inbox, self.head(&social::inbox_stream(&user))?)
            || behind(cursor.feed, self.head(&social::feed_stream(&user))?)
        {
            return self.fresh_sync(now_ms, &user, true).map(Some);
        }
        if let Some(reply) = self.sync_answer(now_ms, &user, &cursor)? {
            return Ok(Some(reply));
        }
        if timeout_ms == 0 {
            return self.sync_timeout(&user, text).map(Some);
        }
        self.wait(request, Wait::Sync { user: user.clone(), cursor, text }, now_ms + timeout_ms)?;
        self.presence.get_mut(&user).expect("seen above").open += 1;
        Ok(None)
    }

    fn fresh_sync(&mut self, now_ms: u64, user: &str, reset: bool) -> Result<Reply, CoreError> {
        let cursor = SyncCursor {
            user: user.into(),
            generation: self.config.generation,
            inbox: self.head(&social::inbox_stream(user))?,
            feed: self.head(&social::feed_stream(user))?,
            flags: self.flags()?.applied,
            signals_after: {
                // Later signals, even in this millisecond, get larger stamps.
                self.signal_stamp = self.signal_stamp.max(now_ms * 1000);
                self.signal_stamp
            },
        };
        let Reply::Page { events: feed, head: feed_head } =
            page(&*self.store, &social::feed_stream(user), None, None, SYNC_FEED_PAGE_LEN)?
        else {
            unreachable!("page answers with a page")
        };
        let cursor = cursor.seal(&self.config.cursor_key);
        let summary = self.summary(user)?;
        let snapshot = Snapshot { feed, feed_head, chats: summary.chats(None, 50) };
        Ok(Reply::Sync(SyncReply { cursor, items: vec![], unread: summary.unread(), snapshot: Some(snapshot), reset }))
    }

    fn sync_timeout(&mut self, user: &str, text: String) -> Result<Reply, CoreError> {
        let unread = self.summary(user)?.unread();
        Ok(Reply::Sync(SyncReply { cursor: text, items: vec![], unread, snapshot: None, reset: false }))
    }

    /// Everything newer than `cursor` for `user`, or `None` if there is nothing yet.
    fn sync_answer(&mut self, now_ms: u64, user: &str, cursor: &SyncCursor) -> Result<Option<Reply>, CoreError> {
        let mut next = cursor.clone();
        let mut items = Vec::new();
        let inbox = self
            .store
            .read(&social::inbox_stream(user), ReadRange::After { after: cursor.inbox, limit: PAGE_LEN_MAX })
            .map_err(unavailable)?;
        for event in inbox {
            next.inbox = event.version;
            match event.kind.as_str() {
                social::TYPE_MESSAGE => items.extend(social::unwrap_inbox_copy(&event).map(SyncItem::Event)),
                social::TYPE_READ => items
                    .extend(social::parse_read_marker(&event).map(|(peer, version)| SyncItem::Read { peer, version })),
                _ => items.push(SyncItem::Event(event)),
            }
        }
        let room = PAGE_LEN_MAX - items.len().min(PAGE_LEN_MAX);
        if room > 0 {
            let feed = self
                .store
                .read(&social::feed_stream(user), ReadRange::After { after: cursor.feed, limit: room })
                .map_err(unavailable)?;
            if let Some(last) = feed.last() {
                next.feed = last.version;
            }
            items.extend(feed.into_iter().map(SyncItem::Event));
        }
        let flags = self.flags()?;
        if flags.applied > cursor.flags && items.len() < PAGE_LEN_MAX {
            next.flags = flags.applied;
            items.push(SyncItem::Flags(flags.evaluate(user)));
        }
        let ttl = self.config.signal_ttl_ms;
        for signal in self.signals.get(user).into_iter().flatten() {
            if items.len() == PAGE_LEN_MAX {
                break; // At most 100 items per answer; the rest come in the next one.
            }
            if signal.stamp > cursor.signals_after && signal.time_ms + ttl > now_ms {
                next.signals_after = signal.stamp;
                items.push(SyncItem::Typing { from: signal.from.clone(), time_ms: signal.time_ms });
            }
        }
        if items.is_empty() {
            return Ok(None);
        }
        let unread = self.summary(user)?.unread();
        let cursor = next.seal(&self.config.cursor_key);
        Ok(Some(Reply::Sync(SyncReply { cursor, items, unread, snapshot: None, reset: false })))
    }

    fn wait(&mut self, request: RequestId, wait: Wait, deadline_ms: u64) -> Result<(), CoreError> {
        if self.waits.len() >= self.config.waiters_max {
            return Err(CoreError::Overloaded("too many long-polls held on this node".into()));
        }
        match &wait {
            Wait::Sync { user, .. } => self.sync_waits.entry(user.clone()).or_default().insert(request),
            Wait::Stream { stream, .. } => self.stream_waits.entry(stream.clone()).or_default().insert(request),
        };
        self.deadlines.insert((deadline_ms, request));
        let previous = self.waits.insert(request, (wait, deadline_ms));
        assert!(previous.is_none(), "request ids are unique");
        Ok(())
    }

    /// Stops waiting for `request` and returns what it waited for.
    fn unwait(&mut self, now_ms: u64, request: RequestId) -> Option<Wait> {
        let (wait, deadline) = self.waits.remove(&request)?;
        self.deadlines.remove(&(deadline, request));
        match &wait {
            Wait::Sync { user, .. } => {
                remove_from(&mut self.sync_waits, user, request);
                let seen = self.presence.get_mut(user).expect("a waiting user is present");
                seen.open -= 1;
                seen.last_ms = seen.last_ms.max(now_ms);
            }
            Wait::Stream { stream, .. } => remove_from(&mut self.stream_waits, stream, request),
        }
        Some(wait)
    }

    fn wake_user(&mut self, now_ms: u64, user: &str) {
        let waiting: Vec<RequestId> = self.sync_waits.get(user).into_iter().flatten().copied().collect();
        for request in waiting {
            let Some((Wait::Sync { cursor, .. }, _)) = self.waits.get(&request) else { continue };
            let cursor = cursor.clone();
            let answer = match self.sync_answer(now_ms, user, &cursor) {
                Ok(None) => continue,
                Ok(Some(reply)) => reply,
                Err(error) => Reply::Error(error),
            };
            self.unwait(now_ms, request);
            self.reply(request, answer);
        }
    }

    fn wake_stream(&mut self, stream: &StreamName) {
        let waiting: Vec<RequestId> = self.stream_waits.get(stream).into_iter().flatten().copied().collect();
        for request in waiting {
            let Some((Wait::Stream { after, limit, .. }, _)) = self.waits.get(&request) else { continue };
            let answer = page(&*self.store, stream, Some(*after), None, *limit).unwrap_or_else(Reply::Error);
            if matches!(&answer, Reply::Page { events, .. } if events.is_empty()) {
                continue; // Nothing after `after` yet: keep waiting.
            }
            self.unwait(0, request);
            self.reply(request, answer);
        }
    }

    /// The client of `request` went away: forget its long-poll.
    pub fn cancel(&mut self, now_ms: u64, request: RequestId) {
        self.unwait(now_ms, request);
    }

    /// Time passed: answer long-polls whose time is up, forget old signals and presence.
    pub fn tick(&mut self, now_ms: u64) {
        while let Some(&(deadline, request)) = self.deadlines.first() {
            if deadline > now_ms {
                break;
            }
            self.expire(now_ms, request);
        }
        let ttl = self.config.signal_ttl_ms;
        self.signals.retain(|_, signals| {
            signals.retain(|s| s.time_ms + ttl > now_ms);
            !signals.is_empty()
        });
        let window = self.config.presence_window_ms;
        self.presence.retain(|_, seen| seen.open > 0 || seen.last_ms + window > now_ms);
    }

    fn expire(&mut self, now_ms: u64, request: RequestId) {
        let reply = match self.unwait(now_ms, request).expect("deadlines belong to waits") {
            Wait::Sync { user, text, .. } => self.sync_timeout(&user, text).unwrap_or_else(Reply::Error),
            Wait::Stream { stream, after, limit } => {
                page(&*self.store, &stream, Some(after), None, limit).unwrap_or_else(Reply::Error)
            }
        };
        self.reply(request, reply);
    }

    /// Stopping: answer every long-poll now (with its cursor, so clients resume elsewhere)
    /// and refuse new requests.
    pub fn stop(&mut self, now_ms: u64) {
        self.stopping = true;
        let waiting: Vec<RequestId> = self.waits.keys().copied().collect();
        for request in waiting {
            self.expire(now_ms, request);
        }
    }

    // ---- signals, presence, derived state ----

    fn signal(&mut self, now_ms: u64, to: &str, from: String) {
        self.signal_stamp = (self.signal_stamp + 1).max(now_ms * 1000);
        let signals = self.signals.entry(to.to_owned()).or_default();
        if signals.len() == self.config.signals_per_user_max {
            signals.pop_front();
        }
        signals.push_back(Signal { stamp: self.signal_stamp, from, time_ms: now_ms });
        self.wake_user(now_ms, to);
    }

    fn seen(&mut self, user: &str, now_ms: u64) {
        let seen = self.presence.entry(user.to_owned()).or_insert(Seen { open: 0, last_ms: now_ms });
        seen.last_ms = seen.last_ms.max(now_ms);
    }

    fn online(&self, now_ms: u64, limit: usize) -> Reply {
        let window = self.config.presence_window_ms;
        let mut users: Vec<(u64, &String)> = self
            .presence
            .iter()
            .filter(|(_, seen)| seen.open > 0 || seen.last_ms + window > now_ms)
            .map(|(user, seen)| (if seen.open > 0 { u64::MAX } else { seen.last_ms }, user))
            .collect();
        users.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
        let total = users.len();
        Reply::Online { users: users.into_iter().take(limit).map(|(_, user)| user.clone()).collect(), total }
    }

    /// The user's inbox summary, folded up to the inbox's durable head.
    fn summary(&mut self, user: &str) -> Result<&InboxSummary, CoreError> {
        if !self.summaries.contains_key(user) && self.summaries.len() >= self.config.summaries_cached_max {
            let evict: Vec<String> = self.summaries.keys().take(self.summaries.len() / 4 + 1).cloned().collect();
            for user in evict {
                self.summaries.remove(&user);
            }
        }
        let summary = self.summaries.entry(user.to_owned()).or_default();
        let inbox = social::inbox_stream(user);
        loop {
            let events = self
                .store
                .read(&inbox, ReadRange::After { after: summary.applied, limit: PAGE_LEN_MAX })
                .map_err(unavailable)?;
            if events.is_empty() {
                break;
            }
            for event in &events {
                summary.apply(user, event);
            }
        }
        Ok(summary)
    }

    fn flags(&mut self) -> Result<&Flags, CoreError> {
        loop {
            let range = ReadRange::After { after: self.flags.applied, limit: PAGE_LEN_MAX };
            let events = self.store.read(&social::flags_stream(), range).map_err(unavailable)?;
            if events.is_empty() {
                return Ok(&self.flags);
            }
            events.iter().for_each(|event| self.flags.apply(event));
        }
    }
}

/// The request a job answers, if any.
fn job_request(then: &Then) -> Option<RequestId> {
    match then {
        Then::ReplyOne(r) | Then::ReplyAll(r) | Then::ReplyDone(r) | Then::CopyToInboxes(r) => Some(*r),
        Then::Copied { request, .. } => *request,
    }
}

/// Prefix of the markers of messages whose inbox copies are not durable yet.
const COPY_MARKER: &[u8] = b"copy:";

fn copy_marker(stream: &StreamName, version: Version) -> Vec<u8> {
    let mut key = COPY_MARKER.to_vec();
    key.extend_from_slice(stream.as_str().as_bytes());
    key.push(0);
    key.extend_from_slice(&version.0.to_be_bytes());
    key
}

fn parse_copy_marker(key: &[u8]) -> Option<(StreamName, Version)> {
    let rest = key.strip_prefix(COPY_MARKER)?;
    let (name, version) = rest.split_at(rest.len().checked_sub(9)?);
    let version = u64::from_be_bytes(version.strip_prefix(&[0])?.try_into().ok()?);
    Some((StreamName::new(std::str::from_utf8(name).ok()?).ok()?, Version(version)))
}

fn remove_from<K: std::hash::Hash + Eq>(map: &mut HashMap<K, BTreeSet<RequestId>>, key: &K, request: RequestId) {
    if let Some(set) = map.get_mut(key) {
        set.remove(&request);
        if set.is_empty() {
            map.remove(key);
        }
    }
}

fn check_user(user: &str) -> Result<(), CoreError> {
    if social::valid_user(user) {
        Ok(())
    } else {
        Err(CoreError::BadRequest("user ids are 1-64 of A-Z a-z 0-9 _ -".into()))
    }
}

fn check_peer(user: &str, peer: &str) -> Result<(), CoreError> {
    check_user(peer)?;
    if user == peer {
        return Err(CoreError::BadRequest("a conversation needs two different users".into()));
    }
    Ok(())
}

/// Requests that only read committed history, answered from the store alone, so a driver
/// may answer them without holding the core. (On one node, durable is committed; replication
/// will answer these at a confirmed commit index instead.)
pub fn read_only(store: &dyn Store, request: &Request) -> Option<Reply> {
    let answer = match request {
        Request::Messages { user, peer, before, limit } => {
            check_peer(user, peer).and_then(|()| page(store, &social::chat_stream(user, peer), None, *before, *limit))
        }
        Request::Feed { user, before, limit } => page(store, &social::feed_stream(user), None, *before, *limit),
        Request::StreamRead { stream, after, before, limit, wait_ms: 0, .. } => {
            page(store, stream, *after, *before, *limit)
        }
        _ => return None,
    };
    Some(answer.unwrap_or_else(Reply::Error))
}

/// A page of committed events: after `after`, or before `before` (the newest page when
/// neither is given). Pure over the store, so the driver may also call it outside the core.
pub fn page(
    store: &dyn Store,
    stream: &StreamName,
    after: Option<Version>,
    before: Option<Version>,
    limit: usize,
) -> Result<Reply, CoreError> {
    let range = match after {
        Some(after) => ReadRange::After { after, limit },
        None => ReadRange::Before { before, limit },
    };
    let head = store.head(stream).map_err(unavailable)?;
    if after.is_some_and(|after| after > head) || before.is_some_and(|before| before.0 > head.0 + 1) {
        return Err(CoreError::BadRequest(format!("{stream} has {head} events: after and before must be within it")));
    }
    let events = store.read(stream, range).map_err(unavailable)?;
    Ok(Reply::Page { events, head })
}
