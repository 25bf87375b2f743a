//! The replicated log in the simulator: each node runs `node_core::repl::Replicas` (the
//! machine that ships) on its own simulated disk, with a small sequencer in front that gives
//! each stream dense versions while the node serves the stream's partition, the way the
//! node core does. Writers (global, like browsers behind a load balancer) send appends with
//! ids they retry until acknowledged, to any node.
//!
//! Checks (DESIGN.md, "Replication and its contract"):
//! - at acknowledgement, the entry is durable on at least W disks (promises 1 and 7);
//! - every event any disk ever shows stays at its stream and version on every disk (2);
//! - an id appears at most once per stream on every disk, and is acknowledged at one
//!   version only (3);
//! - after the heal: every write ever issued is acknowledged, and every voter of every
//!   partition holds exactly what its primary holds (1, 2, 6: everything writable again).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use node_core::repl::{self, keys, Msg, Output, ProposeError, Replicas, View};
use rand::rngs::SmallRng;
use rand::Rng;
use store::mem::MemStore;
use store::{Event, EventId, ReadRange, Store, StoreError, StreamName, Version, WriteBatch};

use crate::Failure;

pub const PARTITIONS: u32 = 8;
const STREAMS: usize = 12;
pub const W: usize = 2;

type Completions = Arc<Mutex<Vec<(u64, Result<(), StoreError>)>>>;

pub fn stream(k: usize) -> StreamName {
    StreamName::new(format!("s:{k}")).expect("valid")
}

/// One node's replication side.
pub struct LogNode {
    pub disk: Arc<MemStore>,
    pub repl: Replicas,
    name: String,
    completions: Completions,
    /// Per stream of a served partition: the last version handed out.
    assigned: HashMap<StreamName, Version>,
    /// Ids proposed and not yet committed, with their version.
    pending: HashMap<(StreamName, EventId), Version>,
    tokens: HashMap<u64, (StreamName, EventId, Version)>,
    /// Acknowledgements this step: (stream, id, version, partition, log index, proposed at).
    pub acked: Vec<(StreamName, EventId, Version, u32, u64, u64)>,
    pub failed: bool,
    /// Per stream, the durable head already checked.
    checked: HashMap<StreamName, Version>,
    outbox: BTreeMap<String, Vec<Msg>>,
    /// Print what the replication machine decides (replaying one seed).
    pub verbose: bool,
    /// The simulation's global time, set by the world before each call.
    pub global_ms: u64,
    /// When each proposal in flight was made (global time).
    proposed: HashMap<u64, u64>,
    /// Reads waiting for their barrier: what each must find (writes acknowledged before it).
    reads: HashMap<u64, (StreamName, Vec<(EventId, Version)>)>,
    /// Reads that missed an acknowledged write.
    pub stale_reads: Vec<String>,
}

pub enum Submit {
    Acked(Version),
    Pending,
    Refused,
}

impl LogNode {
    pub fn new(name: &str, config: repl::Config, disk: Arc<MemStore>, now_ms: u64) -> Result<LogNode, Failure> {
        let repl = Replicas::new(config, disk.clone(), now_ms)
            .map_err(|e| Failure::new("restart reads the disk", e.to_string()))?;
        let mut node = LogNode {
            disk,
            repl,
            name: name.to_string(),
            completions: Arc::default(),
            assigned: HashMap::new(),
            pending: HashMap::new(),
            tokens: HashMap::new(),
            acked: Vec::new(),
            failed: false,
            checked: HashMap::new(),
            outbox: BTreeMap::new(),
            verbose: false,
            global_ms: 0,
            proposed: HashMap::new(),
            reads: HashMap::new(),
            stale_reads: Vec::new(),
        };
        node.drain(now_ms);
        Ok(node)
    }

    pub fn set_view(&mut self, now_ms: u64, view: Vec<View>) {
        self.repl.set_view(now_ms, view);
        self.drain(now_ms);
    }

    pub fn activate(&mut self, now_ms: u64, part: u32) {
        self.repl.activate(now_ms, part);
        self.drain(now_ms);
    }

    pub fn tick(&mut self, now_ms: u64) {
        self.repl.tick(now_ms);
        self.drain(now_ms);
    }

    pub fn handle(&mut self, now_ms: u64, from: &str, bytes: &[u8]) {
        let Ok(msgs) = repl::decode_msgs(bytes) else { return };
        for msg in msgs {
            self.repl.handle(now_ms, from, msg);
        }
        self.drain(now_ms);
    }

    /// Syncs the disk (sometimes) and feeds the completions back.
    pub fn sync(&mut self, now_ms: u64) {
        self.disk.sync();
        self.drain(now_ms);
    }

    /// A writer's append of one event.
    pub fn submit(&mut self, now_ms: u64, stream: &StreamName, id: EventId) -> Submit {
        if self.failed {
            return Submit::Refused;
        }
        let part = self.repl.partition_of(stream.as_str());
        if !self.repl.is_serving(part) {
            self.repl.activate(now_ms, part);
            self.drain(now_ms);
            return Submit::Refused;
        }
        if self.pending.contains_key(&(stream.clone(), id)) {
            return Submit::Pending; // Its first attempt is in flight: the ack will come.
        }
        match self.disk.find(stream, id) {
            Ok(Some(event)) => return Submit::Acked(event.version),
            Ok(None) => {}
            Err(_) => return Submit::Refused,
        }
        let head = match self.assigned.get(stream) {
            Some(v) => *v,
            None => match self.disk.head(stream) {
                Ok(v) => v,
                Err(_) => return Submit::Refused,
            },
        };
        let version = head.next();
        let event = Event {
            id,
            stream: stream.clone(),
            version,
            kind: "e".into(),
            from: "w".into(),
            time_ms: now_ms,
            data: "{}".into(),
        };
        let batch = WriteBatch { events: vec![event], meta: Vec::new() };
        match self.repl.propose(now_ms, part, batch) {
            Ok(token) => {
                self.assigned.insert(stream.clone(), version);
                self.pending.insert((stream.clone(), id), version);
                self.tokens.insert(token, (stream.clone(), id, version));
                self.proposed.insert(token, self.global_ms);
                self.drain(now_ms);
                Submit::Pending
            }
            Err(ProposeError::NotServing { .. } | ProposeError::Overloaded) => {
                self.drain(now_ms);
                Submit::Refused
            }
        }
    }

    /// A reader's read of `stream`, which must show every write in `expect` (acknowledged
    /// before the read was sent) once its barrier passes.
    pub fn read(&mut self, now_ms: u64, stream: &StreamName, expect: Vec<(EventId, Version)>) {
        if self.failed {
            return;
        }
        let part = self.repl.partition_of(stream.as_str());
        if let Ok(token) = self.repl.read_barrier(now_ms, part) {
            self.reads.insert(token, (stream.clone(), expect));
        }
        self.drain(now_ms);
    }

    /// Runs outputs until there are none: persists go to the disk in order, sends to the
    /// outbox, completions back in.
    fn drain(&mut self, now_ms: u64) {
        loop {
            let done: Vec<_> = std::mem::take(&mut *self.completions.lock().unwrap());
            let had = !done.is_empty();
            for (id, result) in done {
                self.repl.persisted(now_ms, id, result);
            }
            let mut any = had;
            while let Some(output) = self.repl.poll_output() {
                any = true;
                match output {
                    Output::Send { to, msg } => {
                        if self.verbose {
                            println!("          {} -> {to}: {}", self.name, brief(&msg));
                        }
                        self.outbox.entry(to).or_default().push(msg)
                    }
                    Output::Persist { id, batch } => {
                        if self.verbose && !batch.events.is_empty() {
                            let events: Vec<String> =
                                batch.events.iter().map(|e| format!("{}v{}", e.stream, e.version)).collect();
                            println!("          {} applies {}", self.name, events.join(" "));
                        }
                        let completions = self.completions.clone();
                        self.disk.append(batch, Box::new(move |r| completions.lock().unwrap().push((id, r))));
                    }
                    Output::Committed { token, part, index } => {
                        if let Some((stream, id, version)) = self.tokens.remove(&token) {
                            self.pending.remove(&(stream.clone(), id));
                            let at = self.proposed.remove(&token).unwrap_or_default();
                            self.acked.push((stream, id, version, part, index, at));
                        }
                    }
                    Output::Abandoned { token, part } => {
                        if let Some((stream, id, _)) = self.tokens.remove(&token) {
                            self.pending.remove(&(stream, id));
                        }
                        self.proposed.remove(&token);
                        self.forget_partition(part);
                    }
                    Output::Serving { part, serving } => {
                        if self.verbose {
                            let conf = self.repl.conf(part).map(|c| {
                                format!("{:?}", c.members.iter().map(|m| (&m.node, m.voter)).collect::<Vec<_>>())
                            });
                            println!(
                                "          {} serving p{part}: {serving} {:?} {conf:?}",
                                self.name,
                                self.repl.position(part)
                            );
                        }
                        self.forget_partition(part)
                    }
                    Output::Fatal(_) => self.failed = true,
                    Output::Read { token, ok } => {
                        let Some((stream, expect)) = self.reads.remove(&token) else { continue };
                        if !ok {
                            continue;
                        }
                        for (id, version) in expect {
                            let found = self.disk.find(&stream, id).ok().flatten().map(|e| e.version);
                            if found != Some(version) {
                                self.stale_reads.push(format!("{}: {stream} read misses {id} (v{version})", self.name));
                            }
                        }
                    }
                }
            }
            if !any {
                return;
            }
        }
    }

    fn forget_partition(&mut self, part: u32) {
        self.assigned.retain(|s, _| node_core::placement::partition_of(s.as_str(), PARTITIONS) != part);
    }

    pub fn take_outbox(&mut self) -> BTreeMap<String, Vec<Msg>> {
        std::mem::take(&mut self.outbox)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The durable entry at `index` of `part`, encoded (for comparing across disks).
    pub fn durable_entry(&self, part: u32, index: u64) -> Option<Vec<u8>> {
        self.disk.meta(&keys::log(part, index)).ok().flatten()
    }

    /// Checks what became durable on this disk since the last call against `truth`
    /// ((stream, version) → id, from every disk ever).
    pub fn check_visible(&mut self, truth: &mut HashMap<(StreamName, Version), EventId>) -> Result<(), Failure> {
        for k in 0..STREAMS {
            let stream = stream(k);
            let from = self.checked.get(&stream).copied().unwrap_or_default();
            let events = self
                .disk
                .read(&stream, ReadRange::After { after: from, limit: 1 << 20 })
                .map_err(|e| Failure::new("disks read", e.to_string()))?;
            for event in events {
                let known = truth.entry((stream.clone(), event.version)).or_insert(event.id);
                if *known != event.id {
                    return Err(Failure::new(
                        "every replica holds the same event at the same version",
                        format!("{}: {stream} v{} is {} here, {} elsewhere", self.name, event.version, event.id, known),
                    ));
                }
                self.checked.insert(stream.clone(), event.version);
            }
        }
        Ok(())
    }

    /// The whole durable content of the streams, for comparing replicas.
    pub fn streams(&self) -> Vec<Vec<EventId>> {
        (0..STREAMS)
            .map(|k| {
                let events = self.disk.read(&stream(k), ReadRange::After { after: Version(0), limit: 1 << 20 });
                events.unwrap_or_default().into_iter().map(|e| e.id).collect()
            })
            .collect()
    }
}

/// One write a writer wants acknowledged, retried (same id) until it is.
pub struct Write {
    pub stream: StreamName,
    pub id: EventId,
    pub acked: Option<Version>,
}

/// Writers: new writes now and then, retries of what is unacknowledged.
#[derive(Default)]
pub struct Writers {
    pub writes: Vec<Write>,
    pub by_id: HashMap<EventId, usize>,
}

impl Writers {
    /// A write to send this step, if any: new (rarely, and only in the safety phase) or a
    /// retry of an unacknowledged one.
    pub fn next(&mut self, rng: &mut SmallRng, now_ms: u64, new: bool) -> Option<(StreamName, EventId)> {
        if new && rng.gen_bool(0.3) {
            let stream = stream(rng.gen_range(0..STREAMS));
            let id = EventId::from_parts(now_ms, rng.gen());
            self.by_id.insert(id, self.writes.len());
            self.writes.push(Write { stream: stream.clone(), id, acked: None });
            return Some((stream, id));
        }
        let open: Vec<usize> = (0..self.writes.len()).filter(|i| self.writes[*i].acked.is_none()).collect();
        if open.is_empty() || !rng.gen_bool(0.5) {
            return None;
        }
        let w = &self.writes[open[rng.gen_range(0..open.len())]];
        Some((w.stream.clone(), w.id))
    }

    /// Records an acknowledgement; an id acknowledged at two versions breaks promise 3.
    pub fn ack(&mut self, stream: &StreamName, id: EventId, version: Version) -> Result<(), Failure> {
        let Some(&i) = self.by_id.get(&id) else { return Ok(()) };
        let write = &mut self.writes[i];
        match write.acked {
            Some(v) if v != version => Err(Failure::new(
                "an event id appears at most once per stream",
                format!("{id} in {stream} acknowledged at v{v} and v{version}"),
            )),
            _ => {
                write.acked = Some(version);
                Ok(())
            }
        }
    }

    /// One new write per stream: after the heal, every stream must take a write again.
    pub fn probe(&mut self, now_ms: u64, rng: &mut SmallRng) {
        for k in 0..STREAMS {
            let id = EventId::from_parts(now_ms, rng.gen());
            self.by_id.insert(id, self.writes.len());
            self.writes.push(Write { stream: stream(k), id, acked: None });
        }
    }

    pub fn unacknowledged(&self) -> usize {
        self.writes.iter().filter(|w| w.acked.is_none()).count()
    }
}

fn brief(msg: &Msg) -> String {
    let e = |e: &node_core::repl::Epoch| format!("{}.{}", e.counter, e.node);
    let l = |l: &node_core::repl::LogId| format!("{}@{}", l.index, e(&l.epoch));
    match msg {
        Msg::Prepare { part, epoch } => format!("p{part} prepare {}", e(epoch)),
        Msg::Promise { part, epoch, last, commit, .. } => {
            format!("p{part} promise {} last {} commit {commit}", e(epoch), l(last))
        }
        Msg::Refuse { part, promised, outsider } => {
            format!("p{part} refuse, promised {}{}", e(promised), if *outsider { ", outsider" } else { "" })
        }
        Msg::Fetch { part, epoch, from } => format!("p{part} fetch {} from {from}", e(epoch)),
        Msg::Entries { part, epoch, from, entries, last } => {
            format!("p{part} entries {} from {from} n {} last {}", e(epoch), entries.len(), l(last))
        }
        Msg::Append { part, epoch, prev, entries, commit } => {
            format!("p{part} append {} prev {} n {} commit {commit}", e(epoch), l(prev), entries.len())
        }
        Msg::Ack { part, epoch, matched, .. } => format!("p{part} ack {} matched {matched}", e(epoch)),
        Msg::Nack { part, epoch, commit, .. } => format!("p{part} nack {} commit {commit}", e(epoch)),
        Msg::Heartbeat { part, epoch, round } => format!("p{part} heartbeat {} round {round}", e(epoch)),
        Msg::HeartbeatAck { part, epoch, round, .. } => format!("p{part} heartbeat-ack {} round {round}", e(epoch)),
    }
}
