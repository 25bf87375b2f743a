//! Replication: one replicated log per partition, sans-IO.
//!
//! Viewstamped Replication with Raft's log matching, the primary named by rendezvous rank
//! instead of an election campaign (`shared/DESIGN.md`, "Replication and its contract").
//!
//! ```text
//!              Prepare(e) to the voters of the best conf known         quorum of promises
//!  Follower ──(top-ranked live voter; tick)──► Candidate ─────────────────────────────────┐
//!     ▲  ▲                                        │ adopt the log with the highest         │
//!     │  └──── Refuse / higher epoch seen ────────┘ (epoch, index): Fetch/Entries         ▼
//!     └────────────── higher epoch seen ─────────────────────────────── Primary(e): Start record
//!                                                                        committed and applied
//!                                                                        ⇒ serving proposals
//! ```
//!
//! Inputs (each with `now_ms`): [`Replicas::propose`], [`Replicas::handle`] (a message from
//! a peer), [`Replicas::persisted`] (a persist this machine asked for is durable),
//! [`Replicas::set_view`] (the membership view, from SWIM), [`Replicas::tick`].
//! Outputs: [`Output`] from [`Replicas::poll_output`] (send, persist in order, a proposal
//! committed or abandoned, serving started or stopped) and [`Replicas::poll_timeout`].
//! It reads the store synchronously (durable log entries, at start and for catch-up) and never
//! writes it: writes are `Persist` outputs, applied by the caller in the order given.
//!
//! Durable state per partition `p` (metadata keys, see [`keys`]): the highest promised epoch,
//! the log entries, the last applied `(epoch, index)` and the conf as of that index. The
//! streams themselves hold only *applied* entries, and entries are applied only once
//! committed, so nothing a reader can see is ever rolled back.
//!
//! Invariants (the simulator checks the user-facing ones after every step):
//! - a replica promises only epochs higher than any it promised, durably, before answering;
//!   it accepts entries only from the epoch it promised last (or a higher one, which it then
//!   promises);
//! - a candidate starts serving only after promises from a quorum of the voters of the conf
//!   in the best log it saw, adopting the log with the highest `(epoch, index)` (never the
//!   longest), and after its Start record is committed and applied;
//! - an entry is committed once `quorum_commit(voters)` voters whose storage ids match the
//!   conf synced it, in the current epoch at or after its Start record; only then is it
//!   applied, acknowledged (`Committed`) or visible;
//! - the conf changes one voter per entry, and only once the previous conf entry committed;
//!   learners become voters only after they caught up;
//! - every queue is bounded: proposals in flight per partition, entries per message.

mod wire;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use store::{Store, StoreError, WriteBatch};

use crate::placement::{self, Partition};

pub use wire::{decode_msgs, encode_msgs, Malformed};

/// `(counter, node id)`, totally ordered; the default (0, "") precedes every real epoch.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch {
    pub counter: u64,
    pub node: String,
}

/// A log position: the epoch that wrote the entry, and its index (from 1).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogId {
    pub epoch: Epoch,
    pub index: u64,
}

/// A member of a partition's replica set, with the storage id of its data directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub node: String,
    pub storage: u64,
    pub voter: bool,
}

/// A partition's recorded replica set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Conf {
    pub members: Vec<Member>,
}

impl Conf {
    pub fn voters(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().filter(|m| m.voter)
    }
    fn member(&self, node: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.node == node)
    }
    fn is_voter(&self, node: &str, storage: u64) -> bool {
        self.member(node).is_some_and(|m| m.voter && m.storage == storage)
    }
    fn voter_count(&self) -> usize {
        self.voters().count()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    /// A replica set; `start` marks the first entry of an epoch.
    Conf { conf: Conf, start: bool },
    /// Events and metadata, applied to the store together once committed.
    Data(WriteBatch),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub epoch: Epoch,
    pub payload: Payload,
}

/// What replicas say to each other. Every message names its partition and an epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    Prepare {
        part: Partition,
        epoch: Epoch,
    },
    /// `established`: a conf the promiser holds names it with its storage id (it is not a
    /// fresh or wiped disk). `seen`: every node the promiser ever saw, when it holds no log of
    /// the partition (a first start needs all of them).
    Promise {
        part: Partition,
        epoch: Epoch,
        storage: u64,
        last: LogId,
        commit: u64,
        established: bool,
        seen: Vec<String>,
    },
    /// `outsider`: the refuser's conf does not name the candidate at all (it was removed).
    Refuse {
        part: Partition,
        promised: Epoch,
        outsider: bool,
    },
    Fetch {
        part: Partition,
        epoch: Epoch,
        from: u64,
    },
    Entries {
        part: Partition,
        epoch: Epoch,
        from: u64,
        entries: Vec<Entry>,
        last: LogId,
    },
    Append {
        part: Partition,
        epoch: Epoch,
        prev: LogId,
        entries: Vec<Entry>,
        commit: u64,
    },
    /// ReadIndex: "am I still your primary?", one round for every read waiting.
    Heartbeat {
        part: Partition,
        epoch: Epoch,
        round: u64,
    },
    /// The answer: this replica promised nothing above `epoch` (else it sends Refuse).
    HeartbeatAck {
        part: Partition,
        epoch: Epoch,
        storage: u64,
        round: u64,
    },
    Ack {
        part: Partition,
        epoch: Epoch,
        storage: u64,
        matched: u64,
    },
    Nack {
        part: Partition,
        epoch: Epoch,
        storage: u64,
        commit: u64,
    },
}

/// Rules the simulator can break on purpose, to show its checkers catch them (only with the
/// `planted-bugs` feature can a config name one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplBug {
    /// Commit once the primary itself synced, without any other replica.
    AckAfterOne,
    /// Followers accept entries from any epoch, not only the one they promised.
    SkipEpochCheck,
    /// A candidate adopts the longest log instead of the one with the highest (epoch, index).
    AdoptLongest,
    /// Promises and acks count whatever storage id they carry.
    WipedVotes,
    /// Followers apply entries as they arrive, before they are committed.
    ServeBeforeCommit,
    /// A primary serves reads without confirming it still leads (no ReadIndex round).
    SkipReadIndex,
    /// A primary never asks a member that comes back (in a new life, or after being down)
    /// for its storage id; it learns of a wiped disk only from the next write's answer.
    SkipProbe,
}

#[derive(Clone, Debug)]
pub struct Config {
    /// This node's id.
    pub node: String,
    pub partitions: u32,
    /// R: replicas per partition.
    pub replicas: usize,
    /// W: replicas (the primary included) that must sync an entry before it commits.
    pub write_quorum: usize,
    /// Unanswered messages are sent again after this long.
    pub resend_ms: u64,
    /// A candidacy that has not finished by then starts over with a higher epoch.
    pub candidacy_ms: u64,
    /// Entries per Append or Entries message (catch-up bandwidth per round trip).
    pub entries_per_msg: usize,
    /// Proposals not yet committed, per partition; more are refused.
    pub proposals_max: usize,
    /// Partitions whose candidacy a tick may start (spreads a failover's work).
    pub candidacies_per_tick: usize,
    /// The cluster's size at creation: a partition is first started only by a candidate that
    /// knows at least this many nodes (all of which must answer), so two parts of a cluster
    /// still forming, each with a partial view, cannot both start it.
    pub bootstrap_expect: usize,
    pub seed: u64,
    #[cfg(feature = "planted-bugs")]
    pub bug: Option<ReplBug>,
}

impl Config {
    pub fn new(node: impl Into<String>) -> Config {
        Config {
            node: node.into(),
            partitions: placement::PARTITIONS_DEFAULT,
            replicas: 3,
            write_quorum: 2,
            resend_ms: 150,
            candidacy_ms: 1_000,
            entries_per_msg: 64,
            proposals_max: 4096,
            candidacies_per_tick: 64,
            bootstrap_expect: 3,
            seed: 0x7265_706c,
            #[cfg(feature = "planted-bugs")]
            bug: None,
        }
    }
}

/// Voters that must sync an entry for it to commit, for a set of `voters`.
pub fn quorum_commit(voters: usize, write_quorum: usize) -> usize {
    write_quorum.max(voters / 2 + 1)
}

/// Voters whose promises a new epoch needs: enough to meet every commit quorum and every
/// majority of a conf one voter away.
pub fn quorum_promise(voters: usize, write_quorum: usize) -> usize {
    (voters + 1).saturating_sub(quorum_commit(voters, write_quorum)).max(voters / 2 + 1)
}

/// Metadata keys of the replicated state.
pub mod keys {
    use super::Partition;

    pub const STORAGE: &[u8] = b"r/storage";
    /// `r/nodes/{id}`: every node this disk has seen in the mesh.
    pub const NODES: &[u8] = b"r/nodes/";

    fn part(p: Partition, rest: &str) -> Vec<u8> {
        format!("r/{p:04x}/{rest}").into_bytes()
    }
    pub fn promised(p: Partition) -> Vec<u8> {
        part(p, "promised")
    }
    pub fn applied(p: Partition) -> Vec<u8> {
        part(p, "applied")
    }
    pub fn conf(p: Partition) -> Vec<u8> {
        part(p, "conf")
    }
    pub fn log_prefix(p: Partition) -> Vec<u8> {
        part(p, "l/")
    }
    pub fn log(p: Partition, index: u64) -> Vec<u8> {
        part(p, &format!("l/{index:016x}"))
    }
    /// The partition and index of a log key, if it is one.
    pub fn parse_log(key: &[u8]) -> Option<(Partition, u64)> {
        let text = std::str::from_utf8(key).ok()?.strip_prefix("r/")?;
        let (p, rest) = text.split_once('/')?;
        let index = rest.strip_prefix("l/")?;
        Some((Partition::from_str_radix(p, 16).ok()?, u64::from_str_radix(index, 16).ok()?))
    }
}

/// The membership view a node has of one member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    pub node: String,
    pub weight_milli: u32,
    /// SWIM says down (suspects still count as up).
    pub down: bool,
    /// Changes when the member restarts (its start time): its disk may be new or wiped.
    pub incarnation: u64,
}

#[derive(Debug)]
pub enum Output {
    Send {
        to: String,
        msg: Msg,
    },
    /// Make this batch durable, in the order these outputs come, then call `persisted`.
    Persist {
        id: u64,
        batch: WriteBatch,
    },
    /// The proposal is committed and applied to this node's store.
    Committed {
        token: u64,
        part: Partition,
        index: u64,
    },
    /// This node stopped being primary before the proposal committed: it may or may not
    /// commit later (under the next primary). Retry it idempotently.
    Abandoned {
        token: u64,
        part: Partition,
    },
    /// This node started (`true`) or stopped serving the partition as its primary. On start,
    /// everything committed before is applied: state derived from the store may be rebuilt.
    Serving {
        part: Partition,
        serving: bool,
    },
    /// Storage failed in a way that may have changed it: stop and restart from disk.
    Fatal(StoreError),
    /// A read barrier: `ok` once a quorum confirmed this node still leads the partition and
    /// everything committed before the barrier is applied here (serve the read now); not
    /// `ok` if it stopped leading first (refuse or forward the read).
    Read {
        token: u64,
        ok: bool,
    },
}

#[derive(Debug, PartialEq, Eq)]
pub enum ProposeError {
    /// This node is not serving the partition; the hint is who it believes is primary.
    NotServing { primary: Option<String> },
    /// Too many proposals in flight.
    Overloaded,
}

struct Slot {
    entry: Entry,
    /// Which persist wrote it, and whether that persist is durable.
    write: u64,
    synced: bool,
}

struct Promise {
    storage: u64,
    last: LogId,
    established: bool,
    seen: Vec<String>,
}

struct Candidacy {
    epoch: Epoch,
    since_ms: u64,
    promises: BTreeMap<String, Promise>,
    /// Own promise is durable.
    self_promised: bool,
    /// Fetching the best log from this node, from this index.
    fetching: Option<(String, u64, LogId)>,
    sent_ms: u64,
}

struct Progress {
    storage: Option<u64>,
    next: u64,
    matched: u64,
    sent_ms: u64,
    /// The commit index last sent.
    told: u64,
}

struct Primacy {
    epoch: Epoch,
    start: u64,
    progress: BTreeMap<String, Progress>,
    /// Proposals by index, waiting to commit and apply.
    tokens: BTreeMap<u64, u64>,
    serving: bool,
    /// Members whose acks carried a storage id other than the recorded one: wiped.
    wiped: BTreeSet<String>,
    /// ReadIndex: the round in flight (0: none), who confirmed it, when it was sent, and
    /// the reads it serves with their read index; reads that came later wait for the next.
    round: u64,
    round_acks: BTreeSet<String>,
    round_sent_ms: u64,
    round_reads: Vec<(u64, u64)>,
    next_reads: Vec<u64>,
    /// Confirmed reads waiting for their read index to be applied.
    confirmed_reads: Vec<(u64, u64)>,
    rounds: u64,
}

enum Role {
    Follower,
    Candidate(Candidacy),
    Primary(Primacy),
}

enum Done {
    Storage,
    Promised { part: Partition, epoch: Epoch, reply_to: Option<String> },
    Logged { part: Partition, write: u64, from: u64, upto: u64, ack: Option<(String, Epoch, u64)> },
    Applied { part: Partition, upto: u64 },
}

struct Part {
    promised: Epoch,
    /// Entries above `durable_applied`, in memory.
    log: BTreeMap<u64, Slot>,
    last: LogId,
    /// Every entry up to here is durable here.
    synced: u64,
    commit: u64,
    /// Applied (handed to the store) and applied durably.
    applied: LogId,
    durable_applied: u64,
    /// The conf as of `applied`, and the latest in the log.
    applied_conf: Conf,
    conf: Conf,
    role: Role,
    /// The highest epoch counter heard of (a refusal's), so the next candidacy outbids it.
    seen: u64,
    retry_at: u64,
    /// A caller asked for it here and no primary has been heard of since.
    wanted: bool,
    /// When this node last heard from a primary of the epoch it promised (or stopped
    /// leading): the fallback candidacies wait for this to go quiet.
    heard_ms: u64,
}

impl Part {
    fn new() -> Part {
        Part {
            promised: Epoch::default(),
            log: BTreeMap::new(),
            last: LogId::default(),
            synced: 0,
            commit: 0,
            applied: LogId::default(),
            durable_applied: 0,
            applied_conf: Conf::default(),
            conf: Conf::default(),
            role: Role::Follower,
            seen: 0,
            retry_at: 0,
            wanted: false,
            heard_ms: 0,
        }
    }

    fn serving(&self) -> bool {
        matches!(&self.role, Role::Primary(p) if p.serving)
    }

    fn recompute_conf(&mut self) {
        self.conf = self
            .log
            .values()
            .rev()
            .find_map(|s| match &s.entry.payload {
                Payload::Conf { conf, .. } => Some(conf.clone()),
                Payload::Data(_) => None,
            })
            .unwrap_or_else(|| self.applied_conf.clone());
    }
}

pub struct Replicas {
    config: Config,
    store: Arc<dyn Store>,
    storage: u64,
    rng: u64,
    parts: BTreeMap<Partition, Part>,
    view: BTreeMap<String, View>,
    /// Every node ever seen (durable): a partition starts afresh only if all of them say
    /// they hold no log of it, so a partial view after a restart cannot fork it.
    seen_nodes: BTreeSet<String>,
    outputs: VecDeque<Output>,
    persists: HashMap<u64, Done>,
    next_persist: u64,
    next_write: u64,
    next_token: u64,
    failed: bool,
}

impl Replicas {
    /// Loads the replicated state from `store`. A store without a storage id (new or wiped)
    /// gets a fresh one, persisted before anything else.
    pub fn new(config: Config, store: Arc<dyn Store>, now_ms: u64) -> Result<Replicas, StoreError> {
        let mut this = Replicas {
            rng: config.seed | 1,
            config,
            store,
            storage: 0,
            parts: BTreeMap::new(),
            view: BTreeMap::new(),
            seen_nodes: BTreeSet::new(),
            outputs: VecDeque::new(),
            persists: HashMap::new(),
            next_persist: 0,
            next_write: 0,
            next_token: 0,
            failed: false,
        };
        match this.store.meta(keys::STORAGE)? {
            Some(bytes) if bytes.len() == 8 => this.storage = u64::from_be_bytes(bytes.try_into().expect("8 bytes")),
            Some(_) => return Err(StoreError::Corrupt("storage id".into())),
            None => {
                this.storage = this.random() | 1;
                let batch = WriteBatch {
                    events: Vec::new(),
                    meta: vec![(keys::STORAGE.to_vec(), Some(this.storage.to_be_bytes().to_vec()))],
                };
                this.persist(batch, Done::Storage);
            }
        }
        for (key, _) in this.store.meta_scan(keys::NODES, usize::MAX)? {
            this.seen_nodes.insert(String::from_utf8_lossy(&key[keys::NODES.len()..]).into_owned());
        }
        for (key, value) in this.store.meta_scan(b"r/", usize::MAX)? {
            let corrupt = |what: &str| StoreError::Corrupt(format!("replication {what}"));
            let text = String::from_utf8_lossy(&key).into_owned();
            let Some((p, rest)) = text.strip_prefix("r/").and_then(|t| t.split_once('/')) else { continue };
            let Ok(p) = Partition::from_str_radix(p, 16) else { continue };
            let part = this.parts.entry(p).or_insert_with(Part::new);
            match rest {
                "promised" => part.promised = wire::decode_epoch(&value).map_err(|_| corrupt("promise"))?,
                "applied" => part.applied = wire::decode_log_id(&value).map_err(|_| corrupt("applied"))?,
                "conf" => part.applied_conf = wire::decode_conf(&value).map_err(|_| corrupt("conf"))?,
                _ => {
                    let Some((_, index)) = keys::parse_log(&key) else { continue };
                    let entry = wire::decode_entry(&value).map_err(|_| corrupt("entry"))?;
                    part.log.insert(index, Slot { entry, write: 0, synced: true });
                }
            }
        }
        for part in this.parts.values_mut() {
            let applied = part.applied.index;
            part.log.retain(|index, _| *index > applied);
            part.durable_applied = applied;
            part.commit = applied;
            part.last = part
                .log
                .iter()
                .next_back()
                .map_or(part.applied.clone(), |(index, slot)| LogId { epoch: slot.entry.epoch.clone(), index: *index });
            part.synced = part.last.index;
            part.recompute_conf();
        }
        for part in this.parts.values_mut() {
            part.heard_ms = now_ms;
        }
        Ok(this)
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When `tick` must be called next, at the latest: resends, candidacy timeouts and the
    /// fallback candidacies of followers all run from `tick`.
    pub fn poll_timeout(&self, now_ms: u64) -> Option<u64> {
        (!self.parts.is_empty()).then_some(now_ms + self.config.resend_ms / 3)
    }

    pub fn partition_of(&self, stream: &str) -> Partition {
        placement::partition_of(stream, self.config.partitions)
    }

    pub fn is_serving(&self, part: Partition) -> bool {
        self.parts.get(&part).is_some_and(Part::serving)
    }

    /// Who this node believes is the partition's primary (itself included).
    pub fn primary_hint(&self, part: Partition) -> Option<String> {
        let p = self.parts.get(&part);
        if p.is_some_and(Part::serving) {
            return Some(self.config.node.clone());
        }
        let mut conf = p.map(|p| p.conf.clone()).unwrap_or_default();
        let me = &self.config.node;
        if !conf.members.is_empty() && !conf.is_voter(me, self.storage) {
            conf.members.retain(|m| m.node != *me); // Not a valid voter here: point elsewhere.
        }
        self.top_voter(part, &conf)
    }

    /// The partition's log position, commit and applied index here (for status and tests).
    pub fn position(&self, part: Partition) -> Option<(LogId, u64, u64)> {
        self.parts.get(&part).map(|p| (p.last.clone(), p.commit, p.applied.index))
    }

    /// One line on the partition's state here, for traces and `griddle status`.
    pub fn describe(&self, part: Partition) -> String {
        let Some(p) = self.parts.get(&part) else { return "-".into() };
        let role = match &p.role {
            Role::Follower => "follower".to_string(),
            Role::Candidate(c) => format!(
                "candidate {}.{} fetching {:?} promises {:?}",
                c.epoch.counter,
                c.epoch.node,
                c.fetching.as_ref().map(|f| (&f.0, f.1)),
                c.promises.keys().collect::<Vec<_>>()
            ),
            Role::Primary(pr) => {
                format!("primary {}.{} start {} serving {}", pr.epoch.counter, pr.epoch.node, pr.start, pr.serving)
            }
        };
        let conf: Vec<String> =
            p.conf.members.iter().map(|m| format!("{}{}", m.node, if m.voter { "" } else { "(l)" })).collect();
        let top = self.top_voter(part, &p.conf).unwrap_or_default();
        let down: Vec<&String> = self.view.values().filter(|v| v.down).map(|v| &v.node).collect();
        let top = format!("{top} (down in view: {down:?}, {} in view)", self.view.len());
        format!(
            "{role}; top {top} voter {} wanted {} promised {}.{} last {}@{}.{} synced {} commit {} applied {} conf [{}] retry_at {}",
            p.conf.is_voter(&self.config.node, self.storage),
            p.wanted,
            p.promised.counter,
            p.promised.node,
            p.last.index,
            p.last.epoch.counter,
            p.last.epoch.node,
            p.synced,
            p.commit,
            p.applied.index,
            conf.join(" "),
            p.retry_at
        )
    }

    /// For each partition this node leads: how many log entries its slowest other voter
    /// still lacks (replication lag, for `/metrics` and `griddle status`).
    pub fn lags(&self) -> Vec<(Partition, u64)> {
        let me = self.config.node.as_str();
        let mut lags = Vec::new();
        for (part, p) in &self.parts {
            let Role::Primary(primacy) = &p.role else { continue };
            let slowest = p
                .conf
                .voters()
                .filter(|m| m.node != me)
                .map(|m| primacy.progress.get(&m.node).map_or(0, |progress| progress.matched))
                .min();
            lags.push((*part, slowest.map_or(0, |matched| p.last.index.saturating_sub(matched))));
        }
        lags
    }

    /// The recorded conf of a partition as this node knows it.
    pub fn conf(&self, part: Partition) -> Option<&Conf> {
        self.parts.get(&part).map(|p| &p.conf)
    }

    /// How many partitions this node serves as primary, votes in, and learns (a ghost's
    /// partitions, or a newcomer's before it caught up).
    /// Partitions led here with fewer whole voters than R: too few voters in the conf, a
    /// learner still catching up, or a voter whose disk was found wiped (Kafka's
    /// under-replicated partitions).
    pub fn under_replicated(&self) -> usize {
        let replicas = self.config.replicas;
        let short = |p: &Part| match &p.role {
            Role::Primary(pr) if pr.serving => {
                p.conf.voter_count() < replicas || p.conf.members.iter().any(|m| !m.voter) || !pr.wiped.is_empty()
            }
            _ => false,
        };
        self.parts.values().filter(|p| short(p)).count()
    }

    pub fn counts(&self) -> (usize, usize, usize) {
        let me = self.config.node.as_str();
        let serving = self.parts.values().filter(|p| p.serving()).count();
        let voter = self.parts.values().filter(|p| p.conf.member(me).is_some_and(|m| m.voter)).count();
        let learner = self.parts.values().filter(|p| p.conf.member(me).is_some_and(|m| !m.voter)).count();
        (serving, voter, learner)
    }

    /// Replaces the membership view (this node included).
    pub fn set_view(&mut self, now_ms: u64, view: Vec<View>) {
        // A member listed twice (an old incarnation beside the new) counts as up if any entry
        // is; this node is always up to itself.
        let mut merged: BTreeMap<String, View> = BTreeMap::new();
        for v in view {
            match merged.get(&v.node) {
                Some(seen) if !seen.down => {}
                _ => {
                    merged.insert(v.node.clone(), v);
                }
            }
        }
        if let Some(me) = merged.get_mut(&self.config.node) {
            me.down = false;
        }
        let view = merged;
        let restarted: Vec<String> = view
            .values()
            .filter(|v| self.view.get(&v.node).is_some_and(|old| old.incarnation != v.incarnation))
            .map(|v| v.node.clone())
            .collect();
        // Members up now that were down, absent (a member that left is dropped from the view)
        // or in another life: their disk may be new, so the partitions led here ask them.
        let returned: Vec<String> = view
            .values()
            .filter(|v| {
                !v.down && self.view.get(&v.node).is_none_or(|old| old.down || old.incarnation != v.incarnation)
            })
            .map(|v| v.node.clone())
            .collect();
        self.view = view;
        if !self.bug(ReplBug::SkipProbe) {
            self.probe(now_ms, &returned);
        }
        // A restarted member may have lost its disk, and an idle partition has no primary to
        // notice: each partition that names it wants a primary again (which re-checks every
        // member's storage id and re-adds a wiped one). The top voter starts one at once;
        // the others only if it does not (it may be the restarted one).
        if !restarted.is_empty() {
            for p in self.parts.values_mut() {
                if restarted.iter().any(|n| p.conf.member(n).is_some()) && !p.serving() {
                    p.wanted = true;
                }
            }
        }
        let new: Vec<String> = self.view.keys().filter(|n| !self.seen_nodes.contains(*n)).cloned().collect();
        if !new.is_empty() {
            let meta = new.iter().map(|n| ([keys::NODES, n.as_bytes()].concat(), Some(Vec::new()))).collect();
            self.seen_nodes.extend(new);
            self.persist(WriteBatch { events: Vec::new(), meta }, Done::Storage);
        }
        self.tick(now_ms);
    }

    /// Where this node leads a partition that names one of `nodes`, asks them at once (an
    /// empty Append at their last known position): the answer carries their storage id, so a
    /// wiped disk is found and re-added even while the partition is idle (a primary sends
    /// nothing to members with nothing to learn). Until they answer they count towards no
    /// commit.
    fn probe(&mut self, now_ms: u64, nodes: &[String]) {
        if nodes.is_empty() {
            return;
        }
        let mut probed = Vec::new();
        for (part, p) in self.parts.iter_mut() {
            let Role::Primary(pr) = &mut p.role else { continue };
            if !pr.serving {
                continue;
            }
            let mut any = false;
            for node in nodes {
                if let Some(progress) = pr.progress.get_mut(node) {
                    progress.storage = None;
                    progress.sent_ms = 0;
                    progress.told = 0;
                    any = true;
                }
            }
            if any {
                probed.push(*part);
            }
        }
        for part in probed {
            self.replicate(now_ms, part, true);
        }
    }

    fn random(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn bug(&self, _bug: ReplBug) -> bool {
        #[cfg(feature = "planted-bugs")]
        return self.config.bug == Some(_bug);
        #[cfg(not(feature = "planted-bugs"))]
        false
    }

    fn up(&self, node: &str) -> bool {
        self.view.get(node).is_some_and(|v| !v.down)
    }

    fn weight(&self, node: &str) -> u32 {
        // A member the view does not know (yet) still ranks, at full weight.
        self.view.get(node).map_or(1000, |v| v.weight_milli.max(1))
    }

    /// The highest-ranked voter of `conf` that is up; with no conf, the highest-ranked live
    /// member (a partition that was never started).
    fn top_voter(&self, part: Partition, conf: &Conf) -> Option<String> {
        if conf.members.is_empty() {
            let live = self.view.values().filter(|v| !v.down).map(|v| (v.node.as_str(), v.weight_milli));
            return placement::rank(part, live).first().map(|n| n.to_string());
        }
        let voters = conf.voters().filter(|m| self.up(&m.node)).map(|m| (m.node.as_str(), self.weight(&m.node)));
        placement::rank(part, voters).first().map(|n| n.to_string())
    }

    /// The members placement wants for `part`: the top R live members by weight.
    fn desired(&self, part: Partition) -> Vec<String> {
        let live = self.view.values().filter(|v| !v.down).map(|v| (v.node.as_str(), v.weight_milli));
        placement::rank(part, live).into_iter().take(self.config.replicas).map(String::from).collect()
    }

    /// Ghosts (live members at weight 0) that would hold `part` at full weight: they follow
    /// its log as learners, never vote, and are promoted like any learner once their weight
    /// rises and placement wants them.
    fn ghosts_for(&self, part: Partition) -> Vec<String> {
        let full = |weight: u32| if weight == 0 { 1000 } else { weight };
        let live = self.view.values().filter(|v| !v.down).map(|v| (v.node.as_str(), full(v.weight_milli)));
        let ranked = placement::rank(part, live);
        ranked
            .into_iter()
            .take(self.config.replicas)
            .filter(|n| self.view.get(*n).is_some_and(|v| v.weight_milli == 0))
            .map(String::from)
            .collect()
    }

    fn persist(&mut self, batch: WriteBatch, done: Done) {
        let id = self.next_persist;
        self.next_persist += 1;
        self.persists.insert(id, done);
        self.outputs.push_back(Output::Persist { id, batch });
    }

    fn send(&mut self, to: &str, msg: Msg) {
        if to != self.config.node {
            self.outputs.push_back(Output::Send { to: to.to_string(), msg });
        }
    }

    /// Asks for `part` to be served: starts a candidacy here if this node should lead it.
    pub fn activate(&mut self, now_ms: u64, part: Partition) {
        self.parts.entry(part).or_insert_with(Part::new).wanted = true;
        self.maybe_candidate(now_ms, part);
    }

    /// A read barrier (ReadIndex): `Output::Read` with the returned token says when a read
    /// of the partition may be served here. Reads share heartbeat rounds.
    pub fn read_barrier(&mut self, now_ms: u64, part: Partition) -> Result<u64, ProposeError> {
        if self.failed || !self.parts.get(&part).is_some_and(Part::serving) {
            self.activate(now_ms, part);
            return Err(ProposeError::NotServing { primary: self.primary_hint(part) });
        }
        let token = self.next_token;
        self.next_token += 1;
        let skip = self.bug(ReplBug::SkipReadIndex);
        let p = self.parts.get_mut(&part).expect("serving");
        let Role::Primary(pr) = &mut p.role else { unreachable!("serving means primary") };
        if skip {
            pr.confirmed_reads.push((token, p.commit));
            self.finish_reads(part);
            return Ok(token);
        }
        pr.next_reads.push(token);
        if pr.round == 0 {
            self.start_round(now_ms, part);
        }
        Ok(token)
    }

    /// Sends a heartbeat round for the reads waiting, at the current commit index.
    fn start_round(&mut self, now_ms: u64, part: Partition) {
        let p = self.parts.get_mut(&part).expect("exists");
        let commit = p.commit;
        let Role::Primary(pr) = &mut p.role else { return };
        if pr.next_reads.is_empty() {
            pr.round = 0;
            return;
        }
        pr.rounds += 1;
        pr.round = pr.rounds;
        pr.round_acks.clear();
        pr.round_sent_ms = now_ms;
        pr.round_reads = pr.next_reads.drain(..).map(|token| (token, commit)).collect();
        let (epoch, round) = (pr.epoch.clone(), pr.round);
        let voters: Vec<String> = p.conf.voters().map(|m| m.node.clone()).collect();
        for to in voters {
            self.send(&to, Msg::Heartbeat { part, epoch: epoch.clone(), round });
        }
        self.check_round(now_ms, part);
    }

    fn on_heartbeat_ack(&mut self, now_ms: u64, from: &str, part: Partition, epoch: Epoch, storage: u64, round: u64) {
        let Some(p) = self.parts.get_mut(&part) else { return };
        let valid = p.conf.is_voter(from, storage);
        let Role::Primary(pr) = &mut p.role else { return };
        if pr.epoch != epoch || pr.round != round || !valid {
            return;
        }
        pr.round_acks.insert(from.to_string());
        self.check_round(now_ms, part);
    }

    /// A round confirmed by a commit quorum (this node included) releases its reads.
    fn check_round(&mut self, now_ms: u64, part: Partition) {
        let me = self.config.node.clone();
        let w = self.config.write_quorum;
        let storage = self.storage;
        let p = self.parts.get_mut(&part).expect("exists");
        let need = quorum_commit(p.conf.voter_count(), w);
        let self_counts = usize::from(p.conf.is_voter(&me, storage));
        let Role::Primary(pr) = &mut p.role else { return };
        if pr.round == 0 || pr.round_acks.len() + self_counts < need {
            return;
        }
        let reads = std::mem::take(&mut pr.round_reads);
        pr.confirmed_reads.extend(reads);
        pr.round = 0;
        self.finish_reads(part);
        self.start_round(now_ms, part);
    }

    /// Confirmed reads whose read index is applied (durably) here may be served.
    fn finish_reads(&mut self, part: Partition) {
        let p = self.parts.get_mut(&part).expect("exists");
        let applied = p.durable_applied;
        let Role::Primary(pr) = &mut p.role else { return };
        let (ready, waiting): (Vec<_>, Vec<_>) = pr.confirmed_reads.drain(..).partition(|(_, index)| *index <= applied);
        pr.confirmed_reads = waiting;
        for (token, _) in ready {
            self.outputs.push_back(Output::Read { token, ok: true });
        }
    }

    /// Appends `batch` to the partition's log as this primary; `Committed` with the returned
    /// token follows once it is committed and applied here.
    pub fn propose(&mut self, now_ms: u64, part: Partition, batch: WriteBatch) -> Result<u64, ProposeError> {
        if self.failed {
            return Err(ProposeError::NotServing { primary: None });
        }
        let serving = self.parts.get(&part).is_some_and(Part::serving);
        if !serving {
            self.activate(now_ms, part);
            return Err(ProposeError::NotServing { primary: self.primary_hint(part) });
        }
        let p = self.parts.get_mut(&part).expect("serving");
        let Role::Primary(primacy) = &p.role else { unreachable!("serving means primary") };
        if primacy.tokens.len() >= self.config.proposals_max {
            return Err(ProposeError::Overloaded);
        }
        let token = self.next_token;
        self.next_token += 1;
        let epoch = primacy.epoch.clone();
        let index = self.append_own(part, Entry { epoch, payload: Payload::Data(batch) });
        if let Role::Primary(primacy) = &mut self.parts.get_mut(&part).expect("exists").role {
            primacy.tokens.insert(index, token);
        }
        self.replicate(now_ms, part, false);
        Ok(token)
    }

    /// The primary appends one entry to its own log and persists it.
    fn append_own(&mut self, part: Partition, entry: Entry) -> u64 {
        let write = self.next_write;
        self.next_write += 1;
        let p = self.parts.get_mut(&part).expect("exists");
        let index = p.last.index + 1;
        let batch =
            WriteBatch { events: Vec::new(), meta: vec![(keys::log(part, index), Some(wire::encode_entry(&entry)))] };
        p.last = LogId { epoch: entry.epoch.clone(), index };
        if let Payload::Conf { conf, .. } = &entry.payload {
            p.conf = conf.clone();
        }
        p.log.insert(index, Slot { entry, write, synced: false });
        self.persist(batch, Done::Logged { part, write, from: index, upto: index, ack: None });
        index
    }

    /// The entry at `index` of this node's log (memory first, then the durable store).
    fn entry_at(&self, part: Partition, index: u64) -> Option<Entry> {
        let p = self.parts.get(&part)?;
        if let Some(slot) = p.log.get(&index) {
            return Some(slot.entry.clone());
        }
        let bytes = self.store.meta(&keys::log(part, index)).ok()??;
        wire::decode_entry(&bytes).ok()
    }

    /// The epoch of the entry at `index`; `None` when it is applied here and older than the
    /// applied position (committed, so it matches every primary's).
    fn epoch_at(&self, part: Partition, index: u64) -> Option<Epoch> {
        let p = self.parts.get(&part)?;
        if index == 0 {
            return Some(Epoch::default());
        }
        if let Some(slot) = p.log.get(&index) {
            return Some(slot.entry.epoch.clone());
        }
        if index == p.applied.index {
            return Some(p.applied.epoch.clone());
        }
        self.entry_at(part, index).map(|e| e.epoch)
    }

    pub fn tick(&mut self, now_ms: u64) {
        if self.failed {
            return;
        }
        let parts: Vec<Partition> = self.parts.keys().copied().collect();
        let mut candidacies = 0;
        for part in parts {
            let p = &self.parts[&part];
            match &p.role {
                Role::Follower => {
                    if candidacies < self.config.candidacies_per_tick && self.maybe_candidate(now_ms, part) {
                        candidacies += 1;
                    }
                }
                Role::Candidate(c) => {
                    if now_ms.saturating_sub(c.since_ms) >= self.config.candidacy_ms {
                        self.step_down(part, now_ms);
                    } else if now_ms.saturating_sub(c.sent_ms) >= self.config.resend_ms {
                        self.resend_candidacy(now_ms, part);
                    }
                }
                Role::Primary(_) => {
                    if self.should_yield(part) {
                        self.step_down(part, now_ms);
                        continue;
                    }
                    self.replicate(now_ms, part, true);
                    self.resend_round(now_ms, part);
                    self.rebalance(now_ms, part);
                }
            }
        }
    }

    /// Sends a heartbeat round again to voters that have not confirmed it.
    fn resend_round(&mut self, now_ms: u64, part: Partition) {
        let resend_ms = self.config.resend_ms;
        let p = self.parts.get_mut(&part).expect("exists");
        let voters: Vec<String> = p.conf.voters().map(|m| m.node.clone()).collect();
        let Role::Primary(pr) = &mut p.role else { return };
        if pr.round == 0 || now_ms.saturating_sub(pr.round_sent_ms) < resend_ms {
            return;
        }
        pr.round_sent_ms = now_ms;
        let (epoch, round) = (pr.epoch.clone(), pr.round);
        let missing: Vec<String> = voters.into_iter().filter(|v| !pr.round_acks.contains(v)).collect();
        for to in missing {
            self.send(&to, Msg::Heartbeat { part, epoch: epoch.clone(), round });
        }
    }

    /// A serving primary yields to a higher-ranked voter that is up and has every committed
    /// entry (it will take over as the top voter, without waiting for a catch-up).
    fn should_yield(&self, part: Partition) -> bool {
        let p = &self.parts[&part];
        let Role::Primary(pr) = &p.role else { return false };
        let Some(top) = self.top_voter(part, &p.conf) else { return false };
        let recorded = p.conf.member(&top).map(|m| m.storage);
        pr.serving
            && top != self.config.node
            && !pr.wiped.contains(&top)
            && pr.progress.get(&top).is_some_and(|g| g.matched >= p.commit && g.storage == recorded)
    }

    /// Whether this node should start a candidacy for `part` now:
    /// - the top live voter of its conf does at once (for a partition never started: the top
    ///   live member, and only when wanted);
    /// - otherwise a valid voter that was asked for the partition (`wanted`) or holds entries
    ///   not known committed, and has heard no primary for `rank × candidacy_ms` (rank among
    ///   the live voters and itself), starts one anyway: confs can differ between nodes (a
    ///   promotion not yet seen, a wiped top voter), and candidacies are always safe.
    fn should_campaign(&self, now_ms: u64, part: Partition) -> bool {
        let me = self.config.node.as_str();
        let Some(p) = self.parts.get(&part) else { return false };
        if !matches!(p.role, Role::Follower) || now_ms < p.retry_at {
            return false;
        }
        if p.conf.members.is_empty() {
            // Never started here: the top live member starts it when wanted; others after a
            // rank-long quiet (the top one may be a fresh disk, which leaves first starts to
            // established ones).
            if !p.wanted {
                return false;
            }
            let live = self.view.values().filter(|v| !v.down).map(|v| (v.node.as_str(), v.weight_milli));
            let rank = placement::rank(part, live).iter().position(|n| *n == me).unwrap_or(usize::MAX) as u64;
            return rank == 0 || now_ms.saturating_sub(p.heard_ms) >= rank.saturating_mul(self.config.candidacy_ms);
        }
        let voter = p.conf.is_voter(me, self.storage);
        if voter && self.top_voter(part, &p.conf).as_deref() == Some(me) {
            return true;
        }
        // Only a valid voter may: a learner's or a wiped voter's candidacy can never finish
        // (the adopted conf does not count it), and would only outbid those that can.
        if !(p.wanted || p.last.index > p.commit) || !voter {
            return false;
        }
        let others = p.conf.voters().filter(|m| m.node != me && self.up(&m.node));
        let ranked = placement::rank(part, others.map(|m| (m.node.as_str(), self.weight(&m.node))).chain([(me, 1000)]));
        let rank = ranked.iter().position(|n| *n == me).unwrap_or(ranked.len()) as u64;
        now_ms.saturating_sub(p.heard_ms) >= rank.max(1) * self.config.candidacy_ms
    }

    fn maybe_candidate(&mut self, now_ms: u64, part: Partition) -> bool {
        if !self.should_campaign(now_ms, part) {
            return false;
        }
        let me = self.config.node.clone();
        let p = &self.parts[&part];
        let counter = p.promised.counter.max(p.last.epoch.counter).max(p.seen) + 1;
        let epoch = Epoch { counter, node: me.clone() };
        let p = self.parts.get_mut(&part).expect("exists");
        p.promised = epoch.clone();
        p.role = Role::Candidate(Candidacy {
            epoch: epoch.clone(),
            since_ms: now_ms,
            promises: BTreeMap::new(),
            self_promised: false,
            fetching: None,
            sent_ms: now_ms,
        });
        let batch =
            WriteBatch { events: Vec::new(), meta: vec![(keys::promised(part), Some(wire::encode_epoch(&epoch)))] };
        self.persist(batch, Done::Promised { part, epoch: epoch.clone(), reply_to: None });
        self.resend_candidacy(now_ms, part);
        true
    }

    /// Who must say it holds no log before a partition is started afresh: every member of
    /// the view, every node this disk ever saw, and every node those who answered ever saw
    /// (a wiped disk, or a view still partial after a restart, knows too few).
    fn bootstrap_members(&self, part: Partition) -> BTreeSet<String> {
        let mut members: BTreeSet<String> = self.view.keys().chain(self.seen_nodes.iter()).cloned().collect();
        if let Some(Role::Candidate(c)) = self.parts.get(&part).map(|p| &p.role) {
            members.extend(c.promises.values().flat_map(|pr| pr.seen.iter().cloned()));
        }
        members
    }

    fn resend_candidacy(&mut self, now_ms: u64, part: Partition) {
        let conf = self.parts[&part].conf.clone();
        let p = self.parts.get_mut(&part).expect("exists");
        let Role::Candidate(c) = &mut p.role else { return };
        c.sent_ms = now_ms;
        let epoch = c.epoch.clone();
        if let Some((from_node, from, _)) = c.fetching.clone() {
            self.send(&from_node, Msg::Fetch { part, epoch, from });
            return;
        }
        let asked: Vec<String> = c.promises.keys().cloned().collect();
        let targets: Vec<String> = if conf.members.is_empty() {
            self.bootstrap_members(part).into_iter().collect()
        } else {
            conf.voters().map(|m| m.node.clone()).collect()
        };
        for to in targets {
            if !asked.contains(&to) {
                self.send(&to, Msg::Prepare { part, epoch: epoch.clone() });
            }
        }
    }

    /// A message from `from`.
    pub fn handle(&mut self, now_ms: u64, from: &str, msg: Msg) {
        if self.failed {
            return;
        }
        match msg {
            Msg::Prepare { part, epoch } => self.on_prepare(now_ms, from, part, epoch),
            Msg::Promise { part, epoch, storage, last, commit: _, established, seen } => {
                self.on_promise(now_ms, from, part, epoch, Promise { storage, last, established, seen })
            }
            Msg::Refuse { part, promised, outsider } => self.on_refuse(now_ms, part, promised, outsider),
            Msg::Fetch { part, epoch, from: index } => self.on_fetch(from, part, epoch, index),
            Msg::Entries { part, epoch, from: index, entries, last } => {
                self.on_entries(now_ms, from, part, epoch, index, entries, last)
            }
            Msg::Append { part, epoch, prev, entries, commit } => {
                self.on_append(now_ms, from, part, epoch, prev, entries, commit)
            }
            Msg::Ack { part, epoch, storage, matched } => self.on_ack(now_ms, from, part, epoch, storage, matched),
            Msg::Heartbeat { part, epoch, round } => {
                let p = self.parts.entry(part).or_insert_with(Part::new);
                if epoch < p.promised {
                    let promised = p.promised.clone();
                    self.send(from, Msg::Refuse { part, promised, outsider: false });
                } else {
                    if epoch == p.promised {
                        // Its primary is alive: no fallback candidacy needed here.
                        p.heard_ms = now_ms;
                        p.wanted = false;
                    }
                    let storage = self.storage;
                    self.send(from, Msg::HeartbeatAck { part, epoch, storage, round });
                }
            }
            Msg::HeartbeatAck { part, epoch, storage, round } => {
                self.on_heartbeat_ack(now_ms, from, part, epoch, storage, round)
            }
            Msg::Nack { part, epoch, storage, commit } => self.on_nack(now_ms, from, part, epoch, storage, commit),
        }
    }

    fn on_prepare(&mut self, now_ms: u64, from: &str, part: Partition, epoch: Epoch) {
        let p = self.parts.entry(part).or_insert_with(Part::new);
        // A node outside the recorded conf cannot lead it (it would adopt a log without the
        // conf's quorum); refusing keeps it from deposing the primary over and over.
        let outsider = !p.conf.members.is_empty() && p.conf.member(from).is_none();
        if epoch < p.promised || outsider {
            let promised = p.promised.clone();
            self.send(from, Msg::Refuse { part, promised, outsider });
            return;
        }
        if epoch == p.promised {
            // A repeated Prepare: answer again once the promise is durable (it is, unless a
            // persist of it is still in flight, which will answer).
            let in_flight = self
                .persists
                .values()
                .any(|d| matches!(d, Done::Promised { part: q, epoch: e, .. } if *q == part && *e == epoch));
            if !in_flight {
                let msg = self.promise_msg(part, epoch);
                self.send(from, msg);
            }
            return;
        }
        self.step_down(part, now_ms);
        let p = self.parts.get_mut(&part).expect("exists");
        p.promised = epoch.clone();
        let batch =
            WriteBatch { events: Vec::new(), meta: vec![(keys::promised(part), Some(wire::encode_epoch(&epoch)))] };
        self.persist(batch, Done::Promised { part, epoch, reply_to: Some(from.to_string()) });
    }

    /// Whether this disk was ever admitted as a voter: some conf it holds names it, with its
    /// storage id. A new or wiped disk is not (it may hold others' confs already, naming its
    /// previous storage id, from catching up).
    fn established(&self) -> bool {
        let me = self.config.node.as_str();
        self.parts.values().any(|p| p.conf.is_voter(me, self.storage) || p.applied_conf.is_voter(me, self.storage))
    }

    fn promise_msg(&self, part: Partition, epoch: Epoch) -> Msg {
        let p = &self.parts[&part];
        Msg::Promise {
            part,
            epoch,
            storage: self.storage,
            last: p.last.clone(),
            commit: p.commit,
            established: self.established(),
            seen: if p.conf.members.is_empty() { self.seen_nodes.iter().cloned().collect() } else { Vec::new() },
        }
    }

    fn on_refuse(&mut self, now_ms: u64, part: Partition, promised: Epoch, outsider: bool) {
        let backoff = self.config.candidacy_ms * 5;
        let Some(p) = self.parts.get_mut(&part) else { return };
        let ours = match &p.role {
            Role::Candidate(c) => c.epoch.clone(),
            Role::Primary(pr) => pr.epoch.clone(),
            Role::Follower => return,
        };
        if outsider && matches!(p.role, Role::Candidate(_)) {
            // Our conf is stale: a newer one left us out. Stand back long enough for its
            // voters to elect a primary and pass the new conf on to those who still hold
            // ours, after which they refuse us too and we stop disturbing them.
            self.step_down(part, now_ms);
            let p = self.parts.get_mut(&part).expect("exists");
            p.retry_at = now_ms + backoff;
            return;
        }
        if promised > ours {
            p.seen = p.seen.max(promised.counter);
            self.step_down(part, now_ms);
        }
    }

    fn on_promise(&mut self, now_ms: u64, from: &str, part: Partition, epoch: Epoch, promise: Promise) {
        let Some(p) = self.parts.get_mut(&part) else { return };
        let Role::Candidate(c) = &mut p.role else { return };
        if c.epoch != epoch {
            return;
        }
        c.promises.insert(from.to_string(), promise);
        self.advance_candidacy(now_ms, part);
    }

    /// Checks whether the candidacy has its quorum, fetches the best log, then starts the epoch.
    fn advance_candidacy(&mut self, now_ms: u64, part: Partition) {
        let me = self.config.node.clone();
        let storage = self.storage;
        let longest = self.bug(ReplBug::AdoptLongest);
        let wiped_vote = self.bug(ReplBug::WipedVotes);
        let w = self.config.write_quorum;
        let members = self.bootstrap_members(part);
        let established = self.established();
        let p = self.parts.get_mut(&part).expect("exists");
        let Role::Candidate(c) = &p.role else { return };
        if !c.self_promised || c.fetching.is_some() {
            return;
        }
        // Everyone who promised, this node included, with their last log positions.
        let mut all: Vec<(String, u64, LogId)> =
            c.promises.iter().map(|(n, pr)| (n.clone(), pr.storage, pr.last.clone())).collect();
        all.push((me.clone(), storage, p.last.clone()));
        let best = all
            .iter()
            .max_by(|a, b| {
                if longest {
                    a.2.index.cmp(&b.2.index).then_with(|| a.2.epoch.cmp(&b.2.epoch))
                } else {
                    a.2.cmp(&b.2)
                }
            })
            .cloned()
            .expect("self is in");
        // The quorum is judged against the conf of this node's log; if a better log exists,
        // fetch it first: its conf may name other voters.
        let conf = p.conf.clone();
        let counts = |node: &str, st: u64| wiped_vote || conf.is_voter(node, st);
        let enough = if conf.members.is_empty() {
            // Never started anywhere we heard of: every member of the view, down ones too,
            // and every node this disk ever saw must say it holds no log, so that a partition
            // whose data lives elsewhere (this disk may be wiped, the view partial after a
            // restart) is never started afresh.
            // A disk that holds nothing while others hold something may have been wiped: it
            // leaves first starts to them. And a first start needs R members.
            let fresh_among_established = !established && c.promises.values().any(|pr| pr.established);
            members.iter().all(|m| all.iter().any(|(n, _, _)| n == m))
                && members.len() >= self.config.bootstrap_expect
                && all.len() >= w.max(self.config.replicas)
                && !fresh_among_established
        } else {
            let n = conf.voter_count();
            all.iter().filter(|(node, st, _)| counts(node, *st)).count() >= quorum_promise(n, w)
        };
        if best.2 != p.last {
            // Adopt the best log: fetch from above our commit (identical everywhere below), and
            // at least its last entry.
            let from = (p.commit + 1).min(best.2.index).max(1);
            if let Role::Candidate(c) = &mut p.role {
                c.fetching = Some((best.0.clone(), from, best.2.clone()));
                c.sent_ms = now_ms;
                let epoch = c.epoch.clone();
                self.send(&best.0, Msg::Fetch { part, epoch, from });
            }
            return;
        }
        if !enough {
            return;
        }
        let conf_known = !p.conf.members.is_empty();
        if conf_known && !p.conf.is_voter(&me, storage) {
            self.step_down(part, now_ms); // The adopted conf does not count this node.
            return;
        }
        let weights: BTreeMap<&str, u32> = all.iter().map(|(n, _, _)| (n.as_str(), self.weight(n))).collect();
        let p = self.parts.get_mut(&part).expect("exists");
        let Role::Candidate(c) = std::mem::replace(&mut p.role, Role::Follower) else { unreachable!() };
        let epoch = c.epoch;
        let mut conf = p.conf.clone();
        if conf.members.is_empty() {
            // A partition's first epoch: the top R of those who promised become its voters,
            // by weight (a ghost only if too few others promised; rebalancing moves it out).
            let ranked = placement::rank(part, weights.iter().map(|(n, w)| (*n, *w)));
            conf.members = ranked
                .into_iter()
                .take(self.config.replicas)
                .map(|n| {
                    let st = all.iter().find(|(m, _, _)| m == n).map(|(_, s, _)| *s).expect("ranked from all");
                    Member { node: n.to_string(), storage: st, voter: true }
                })
                .collect();
        }
        let progress = conf
            .members
            .iter()
            .filter(|m| m.node != me)
            .map(|m| {
                let storage = all.iter().find(|(n, _, _)| *n == m.node).map(|(_, s, _)| *s);
                (m.node.clone(), Progress { storage, next: p.last.index + 1, matched: 0, sent_ms: 0, told: 0 })
            })
            .collect();
        let start = p.last.index + 1;
        p.role = Role::Primary(Primacy {
            epoch: epoch.clone(),
            start,
            progress,
            tokens: BTreeMap::new(),
            serving: false,
            wiped: BTreeSet::new(),
            round: 0,
            round_acks: BTreeSet::new(),
            round_sent_ms: 0,
            round_reads: Vec::new(),
            next_reads: Vec::new(),
            confirmed_reads: Vec::new(),
            rounds: 0,
        });
        self.append_own(part, Entry { epoch, payload: Payload::Conf { conf, start: true } });
        self.replicate(now_ms, part, true);
    }

    fn on_fetch(&mut self, from: &str, part: Partition, epoch: Epoch, index: u64) {
        let Some(p) = self.parts.get(&part) else { return };
        if p.promised != epoch {
            return;
        }
        let last = p.last.clone();
        let upto = last.index.min(index + self.config.entries_per_msg as u64 - 1);
        let entries: Option<Vec<Entry>> = (index..=upto).map(|i| self.entry_at(part, i)).collect();
        let Some(entries) = entries else { return };
        self.send(from, Msg::Entries { part, epoch, from: index, entries, last });
    }

    #[allow(clippy::too_many_arguments)]
    fn on_entries(
        &mut self,
        now_ms: u64,
        from_node: &str,
        part: Partition,
        epoch: Epoch,
        from: u64,
        entries: Vec<Entry>,
        last: LogId,
    ) {
        let Some(p) = self.parts.get_mut(&part) else { return };
        let Role::Candidate(c) = &mut p.role else { return };
        let Some((node, want_from, best)) = c.fetching.clone() else { return };
        if c.epoch != epoch || node != from_node || want_from != from || best != last {
            return;
        }
        let upto = from + entries.len() as u64 - 1;
        if entries.is_empty() || upto > last.index {
            c.fetching = None;
            return;
        }
        self.write_entries(part, from, entries, true, None);
        let p = self.parts.get_mut(&part).expect("exists");
        let Role::Candidate(c) = &mut p.role else { return };
        if upto < last.index {
            c.fetching = Some((node.clone(), upto + 1, last));
            c.sent_ms = now_ms;
            let epoch = c.epoch.clone();
            self.send(&node, Msg::Fetch { part, epoch, from: upto + 1 });
            return;
        }
        c.fetching = None;
        // Adopted. Promises so far stand; the conf may have changed with the adopted log.
        self.advance_candidacy(now_ms, part);
        self.resend_candidacy(now_ms, part);
    }

    /// Writes `entries` at `from..`, replacing whatever differs from there on; with `truncate`,
    /// also drops every entry after them. Returns the index of the last one.
    fn write_entries(
        &mut self,
        part: Partition,
        from: u64,
        entries: Vec<Entry>,
        truncate: bool,
        ack: Option<(String, Epoch, u64)>,
    ) {
        let write = self.next_write;
        self.next_write += 1;
        let p = self.parts.get_mut(&part).expect("exists");
        let mut meta = Vec::new();
        let upto = from + entries.len() as u64 - 1;
        let promise_only = entries.is_empty() && ack.is_some();
        let mut first_new = None;
        for (i, entry) in entries.into_iter().enumerate() {
            let index = from + i as u64;
            if index <= p.applied.index {
                continue; // Applied here: committed, identical.
            }
            let same = p.log.get(&index).is_some_and(|s| s.entry.epoch == entry.epoch);
            if same && first_new.is_none() {
                continue;
            }
            if first_new.is_none() {
                first_new = Some(index);
                // Everything from here on is replaced.
                let stale: Vec<u64> = p.log.range(index..).map(|(i, _)| *i).collect();
                for i in stale {
                    if i > upto {
                        meta.push((keys::log(part, i), None));
                    }
                    p.log.remove(&i);
                }
                p.synced = p.synced.min(index - 1);
            }
            meta.push((keys::log(part, index), Some(wire::encode_entry(&entry))));
            p.log.insert(index, Slot { entry, write, synced: false });
        }
        if truncate && first_new.is_none() {
            let stale: Vec<u64> = p.log.range(upto + 1..).map(|(i, _)| *i).collect();
            if !stale.is_empty() {
                p.synced = p.synced.min(upto);
            }
            for i in stale {
                meta.push((keys::log(part, i), None));
                p.log.remove(&i);
            }
        }
        p.last = p
            .log
            .iter()
            .next_back()
            .map_or(p.applied.clone(), |(index, slot)| LogId { epoch: slot.entry.epoch.clone(), index: *index });
        p.recompute_conf();
        p.commit = p.commit.min(p.last.index).max(p.applied.index);
        if meta.is_empty() && !promise_only {
            if let Some((to, epoch, matched)) = ack {
                let matched = matched.min(p.synced);
                let storage = self.storage;
                self.send(&to, Msg::Ack { part, epoch, storage, matched });
            }
            return;
        }
        let promise = p.promised.clone();
        meta.push((keys::promised(part), Some(wire::encode_epoch(&promise))));
        let from = first_new.unwrap_or(upto + 1);
        self.persist(WriteBatch { events: Vec::new(), meta }, Done::Logged { part, write, from, upto, ack });
    }

    #[allow(clippy::too_many_arguments)]
    fn on_append(
        &mut self,
        now_ms: u64,
        from: &str,
        part: Partition,
        epoch: Epoch,
        prev: LogId,
        entries: Vec<Entry>,
        commit: u64,
    ) {
        let skip_check = self.bug(ReplBug::SkipEpochCheck);
        let p = self.parts.entry(part).or_insert_with(Part::new);
        if epoch < p.promised && !skip_check {
            let promised = p.promised.clone();
            self.send(from, Msg::Refuse { part, promised, outsider: false });
            return;
        }
        let ours = match &p.role {
            Role::Primary(pr) => Some(pr.epoch.clone()),
            Role::Candidate(c) => Some(c.epoch.clone()),
            Role::Follower => None,
        };
        if ours.is_some_and(|e| e != epoch) {
            self.step_down(part, now_ms);
        }
        let p = self.parts.get_mut(&part).expect("exists");
        let raised = epoch > p.promised;
        if raised {
            p.promised = epoch.clone(); // Persisted with the entries below, before any ack.
        }
        let storage = self.storage;
        // Log matching: our entry at prev must be from prev's epoch.
        let matches = prev.index <= p.last.index
            && (prev.index <= p.applied.index || self.epoch_at(part, prev.index).as_ref() == Some(&prev.epoch));
        if !matches {
            let commit = self.parts[&part].commit;
            self.send(from, Msg::Nack { part, epoch, storage, commit });
            return;
        }
        let matched = prev.index + entries.len() as u64;
        let p = self.parts.get_mut(&part).expect("exists");
        p.heard_ms = now_ms;
        p.wanted = false;
        p.commit = p.commit.max(commit.min(matched)).min(p.last.index.max(matched));
        if entries.is_empty() && !raised {
            let p = self.parts.get_mut(&part).expect("exists");
            let matched = matched.min(p.synced);
            if p.promised == epoch {
                self.send(from, Msg::Ack { part, epoch, storage, matched });
            }
        } else {
            self.write_entries(part, prev.index + 1, entries, false, Some((from.to_string(), epoch, matched)));
            let p = self.parts.get_mut(&part).expect("exists");
            p.commit = p.commit.max(commit.min(matched)).min(p.last.index);
        }
        if self.bug(ReplBug::ServeBeforeCommit) {
            let p = self.parts.get_mut(&part).expect("exists");
            p.commit = p.commit.max(matched.min(p.last.index));
        }
        self.apply(part);
    }

    fn on_ack(&mut self, now_ms: u64, from: &str, part: Partition, epoch: Epoch, storage: u64, matched: u64) {
        let wiped_vote = self.bug(ReplBug::WipedVotes);
        let Some(p) = self.parts.get_mut(&part) else { return };
        let conf = p.conf.clone();
        let Role::Primary(pr) = &mut p.role else { return };
        if pr.epoch != epoch {
            return;
        }
        let Some(progress) = pr.progress.get_mut(from) else { return };
        let recorded = conf.member(from).map(|m| m.storage);
        if !wiped_vote && recorded.is_some_and(|s| s != 0 && s != storage) {
            pr.wiped.insert(from.to_string());
            return;
        }
        progress.storage = Some(storage);
        if matched > progress.matched {
            progress.matched = matched;
            progress.sent_ms = 0; // Send what follows at once.
        }
        progress.next = progress.next.max(matched + 1);
        self.try_commit(part);
        self.replicate(now_ms, part, false);
    }

    /// The member's log does not match at the `prev` we sent: go back to its commit index
    /// (everything up to it is committed, so identical). At most one resend per nack that
    /// moved `next`, so duplicated nacks cannot multiply messages.
    fn on_nack(&mut self, now_ms: u64, from: &str, part: Partition, epoch: Epoch, storage: u64, commit: u64) {
        let Some(p) = self.parts.get_mut(&part) else { return };
        let recorded = p.conf.member(from).map(|m| m.storage);
        let Role::Primary(pr) = &mut p.role else { return };
        if pr.epoch != epoch {
            return;
        }
        if recorded.is_some_and(|s| s != 0 && s != storage) {
            pr.wiped.insert(from.to_string());
        }
        let Some(progress) = pr.progress.get_mut(from) else { return };
        progress.matched = progress.matched.min(commit); // A wiped or rolled-back member.
        let next = commit + 1;
        if progress.next != next {
            progress.next = next;
            progress.sent_ms = 0;
            self.replicate(now_ms, part, false);
        }
    }

    /// Sends each member what it lacks: new entries to those in step, and (with `resend`)
    /// everything unacknowledged or a commit update to those quiet for `resend_ms`.
    ///
    /// `sent_ms` marks an Append whose answer we wait for (at most one per member). A bare
    /// commit update to a member that holds everything waits for nothing: it must not hold
    /// back the next entry until the resend timer (that cost every sequential write on a
    /// stream 150 ms). Nothing at all is sent to a member with nothing to learn.
    fn replicate(&mut self, now_ms: u64, part: Partition, resend: bool) {
        let resend_ms = self.config.resend_ms;
        let per_msg = self.config.entries_per_msg as u64;
        let skip_probe = self.bug(ReplBug::SkipProbe);
        let p = &self.parts[&part];
        let Role::Primary(pr) = &p.role else { return };
        let last = p.last.index;
        let commit = p.commit;
        let epoch = pr.epoch.clone();
        let mut plan = Vec::new();
        for (node, progress) in &pr.progress {
            let quiet = now_ms.saturating_sub(progress.sent_ms) >= resend_ms;
            let lagging = progress.matched < last;
            // A member that has not answered in this epoch (or since it came back) is asked
            // until it does: its answer names its storage, and a probe can be lost.
            let unknown = progress.storage.is_none() && !skip_probe;
            if progress.sent_ms == 0 || (resend && ((quiet && (lagging || unknown)) || progress.told < commit)) {
                // Quiet after a send: what was sent may be lost, so go back to what was acked.
                let from = if quiet && progress.sent_ms != 0 { progress.matched + 1 } else { progress.next };
                let from = from.min(last + 1);
                if from > last && progress.matched >= last && progress.told >= commit && !unknown {
                    continue;
                }
                plan.push((node.clone(), from));
            }
        }
        for (node, from) in plan {
            let upto = last.min(from + per_msg - 1);
            let entries: Option<Vec<Entry>> = (from..=upto).map(|i| self.entry_at(part, i)).collect();
            let prev_epoch = self.epoch_at(part, from - 1);
            let (Some(entries), Some(prev_epoch)) = (entries, prev_epoch) else { continue };
            let count = entries.len() as u64;
            let prev = LogId { epoch: prev_epoch, index: from - 1 };
            self.send(&node, Msg::Append { part, epoch: epoch.clone(), prev, entries, commit });
            if let Role::Primary(pr) = &mut self.parts.get_mut(&part).expect("exists").role {
                let progress = pr.progress.get_mut(&node).expect("planned from it");
                progress.next = from + count;
                if count > 0 || progress.matched < last || progress.storage.is_none() {
                    progress.sent_ms = now_ms.max(1);
                }
                progress.told = commit;
            }
        }
    }

    /// Moves the commit index to the highest entry of this epoch that a commit quorum of
    /// voters (with matching storage ids) has synced, then applies.
    fn try_commit(&mut self, part: Partition) {
        let me = self.config.node.clone();
        let w = if self.bug(ReplBug::AckAfterOne) { 1 } else { self.config.write_quorum };
        let wiped_vote = self.bug(ReplBug::WipedVotes);
        let storage = self.storage;
        let p = self.parts.get_mut(&part).expect("exists");
        let Role::Primary(pr) = &p.role else { return };
        let voters: Vec<&Member> = p.conf.voters().collect();
        let need = if w == 1 { 1 } else { quorum_commit(voters.len(), w) };
        let mut matched: Vec<u64> = voters
            .iter()
            .map(|m| {
                if m.node == me {
                    if m.storage == storage {
                        p.synced
                    } else {
                        0
                    }
                } else {
                    pr.progress.get(&m.node).map_or(0, |g| {
                        let ok = wiped_vote || m.storage == 0 || g.storage == Some(m.storage);
                        if ok {
                            g.matched
                        } else {
                            0
                        }
                    })
                }
            })
            .collect();
        matched.sort_unstable_by(|a, b| b.cmp(a));
        let Some(candidate) = matched.get(need.saturating_sub(1)).copied() else { return };
        if candidate >= pr.start && candidate > p.commit {
            p.commit = candidate.min(p.last.index);
            self.apply(part);
        }
    }

    /// Applies committed entries (up to the commit index) to the store, in one batch.
    fn apply(&mut self, part: Partition) {
        let p = self.parts.get_mut(&part).expect("exists");
        let upto = p.commit.min(p.last.index);
        if upto <= p.applied.index {
            return;
        }
        let mut batch = WriteBatch::default();
        let mut last = p.applied.clone();
        for index in p.applied.index + 1..=upto {
            let Some(slot) = p.log.get(&index) else { break };
            match &slot.entry.payload {
                Payload::Data(data) => {
                    batch.events.extend(data.events.iter().cloned());
                    batch.meta.extend(data.meta.iter().cloned());
                }
                Payload::Conf { conf, .. } => {
                    p.applied_conf = conf.clone();
                    batch.meta.push((keys::conf(part), Some(wire::encode_conf(conf))));
                }
            }
            last = LogId { epoch: slot.entry.epoch.clone(), index };
        }
        if last.index == p.applied.index {
            return;
        }
        batch.meta.push((keys::applied(part), Some(wire::encode_log_id(&last))));
        let upto = last.index;
        p.applied = last;
        self.persist(batch, Done::Applied { part, upto });
    }

    /// The caller made a persist durable (or it failed).
    pub fn persisted(&mut self, now_ms: u64, id: u64, result: Result<(), StoreError>) {
        let Some(done) = self.persists.remove(&id) else { return };
        if self.failed {
            return;
        }
        if let Err(error) = result {
            self.failed = true;
            self.outputs.push_back(Output::Fatal(error));
            return;
        }
        match done {
            Done::Storage => {}
            Done::Promised { part, epoch, reply_to } => {
                let p = self.parts.get_mut(&part).expect("exists");
                if p.promised != epoch {
                    return;
                }
                match reply_to {
                    Some(to) => {
                        let msg = self.promise_msg(part, epoch);
                        self.send(&to, msg);
                    }
                    None => {
                        if let Role::Candidate(c) = &mut p.role {
                            if c.epoch == epoch {
                                c.self_promised = true;
                                self.advance_candidacy(now_ms, part);
                            }
                        }
                    }
                }
            }
            Done::Logged { part, write, from, upto, ack } => {
                let p = self.parts.get_mut(&part).expect("exists");
                for index in from..=upto {
                    if let Some(slot) = p.log.get_mut(&index) {
                        if slot.write == write {
                            slot.synced = true;
                        }
                    }
                }
                while p.log.get(&(p.synced + 1)).is_some_and(|s| s.synced) {
                    p.synced += 1;
                }
                if p.synced < p.applied.index {
                    p.synced = p.applied.index.max(p.synced);
                }
                if let Some((to, epoch, matched)) = ack {
                    if p.promised == epoch {
                        let matched = matched.min(p.synced);
                        let storage = self.storage;
                        self.send(&to, Msg::Ack { part, epoch, storage, matched });
                    }
                }
                self.try_commit(part);
                self.apply(part);
            }
            Done::Applied { part, upto } => {
                let p = self.parts.get_mut(&part).expect("exists");
                p.durable_applied = p.durable_applied.max(upto);
                let durable = p.durable_applied;
                p.log.retain(|index, _| *index > durable);
                let mut committed = Vec::new();
                let mut became_serving = false;
                if let Role::Primary(pr) = &mut p.role {
                    while let Some((&index, &token)) = pr.tokens.first_key_value() {
                        if index > upto {
                            break;
                        }
                        pr.tokens.remove(&index);
                        committed.push((token, index));
                    }
                    if !pr.serving && upto >= pr.start {
                        pr.serving = true;
                        became_serving = true;
                    }
                }
                if became_serving {
                    p.wanted = false;
                    self.outputs.push_back(Output::Serving { part, serving: true });
                }
                self.finish_reads(part);
                for (token, index) in committed {
                    self.outputs.push_back(Output::Committed { token, part, index });
                }
            }
        }
    }

    /// Leaves any candidacy or primacy of `part`: proposals not yet committed are abandoned.
    fn step_down(&mut self, part: Partition, now_ms: u64) {
        let jitter = self.random() % self.config.resend_ms.max(1);
        let Some(p) = self.parts.get_mut(&part) else { return };
        let role = std::mem::replace(&mut p.role, Role::Follower);
        p.retry_at = now_ms + self.config.resend_ms / 2 + jitter;
        p.heard_ms = now_ms;
        if let Role::Primary(pr) = role {
            if pr.serving {
                self.outputs.push_back(Output::Serving { part, serving: false });
            }
            for token in pr.tokens.into_values() {
                self.outputs.push_back(Output::Abandoned { token, part });
            }
            let reads = pr.round_reads.iter().chain(&pr.confirmed_reads).map(|(t, _)| *t).chain(pr.next_reads);
            for token in reads.collect::<Vec<_>>() {
                self.outputs.push_back(Output::Read { token, ok: false });
            }
        }
    }

    /// One conf change at a time, once the previous one committed: promote a caught-up
    /// learner, drop a surplus, wiped or unwanted voter, drop a stale learner, add the
    /// member placement wants as a learner (it streams the log before it may vote), or add
    /// a ghost as a learner that stays one.
    fn rebalance(&mut self, now_ms: u64, part: Partition) {
        let me = self.config.node.clone();
        let desired = self.desired(part);
        let ghosts = self.ghosts_for(part);
        let replicas = self.config.replicas;
        let w = self.config.write_quorum;
        let p = &self.parts[&part];
        let Role::Primary(pr) = &p.role else { return };
        if !pr.serving || p.log.range(p.commit + 1..).any(|(_, s)| matches!(s.entry.payload, Payload::Conf { .. })) {
            return;
        }
        let up = |node: &str| self.up(node);
        let wiped = |m: &Member| pr.wiped.contains(&m.node);
        let bad = |m: &Member| m.node != me && (!up(&m.node) || wiped(m));
        let unwanted = |m: &Member| !desired.contains(&m.node);
        let ghost = |m: &Member| ghosts.contains(&m.node);
        let voters: Vec<&Member> = p.conf.voters().collect();
        let learners: Vec<&Member> = p.conf.members.iter().filter(|m| !m.voter).collect();
        let needs_voter = voters.len() < replicas || voters.iter().any(|m| bad(m) || unwanted(m));
        let caught_up = |m: &Member| {
            up(&m.node) && pr.progress.get(&m.node).is_some_and(|g| g.storage.is_some() && g.matched >= p.commit)
        };
        let mut conf = p.conf.clone();
        let mut next = conf.clone();
        let removable = |next: &Conf| {
            let rest = next.voters().filter(|m| up(&m.node)).count();
            rest >= quorum_commit(next.voter_count(), w)
        };
        if let Some(learner) = learners.iter().find(|m| caught_up(m) && !unwanted(m)).filter(|_| needs_voter) {
            let storage = pr.progress[&learner.node].storage.expect("caught up");
            next.members.retain(|m| m.node != learner.node);
            next.members.push(Member { node: learner.node.clone(), storage, voter: true });
        } else if let Some(gone) = voters
            .iter()
            .filter(|m| m.node != me)
            .find(|m| wiped(m) || (voters.len() > replicas && (bad(m) || unwanted(m))))
        {
            next.members.retain(|m| m.node != gone.node);
            if !removable(&next) {
                return;
            }
        } else if let Some(stale) = learners.iter().find(|m| bad(m) || (unwanted(m) && !ghost(m))) {
            next.members.retain(|m| m.node != stale.node);
        } else if needs_voter && learners.iter().all(|m| ghost(m)) {
            let Some(node) = desired.iter().find(|n| conf.member(n).is_none()) else { return };
            next.members.push(Member { node: node.clone(), storage: 0, voter: false });
        } else if let Some(node) = ghosts.iter().find(|n| conf.member(n).is_none()) {
            next.members.push(Member { node: node.clone(), storage: 0, voter: false });
        } else {
            return;
        }
        next.members.sort_by(|a, b| a.node.cmp(&b.node));
        std::mem::swap(&mut conf, &mut next);
        let start_next = p.last.index + 1;
        let epoch = pr.epoch.clone();
        if let Role::Primary(pr) = &mut self.parts.get_mut(&part).expect("exists").role {
            for m in conf.members.iter().filter(|m| m.node != me) {
                let fresh = Progress { storage: None, next: start_next, matched: 0, sent_ms: 0, told: 0 };
                pr.progress.entry(m.node.clone()).or_insert(fresh);
            }
            pr.progress.retain(|node, _| conf.member(node).is_some());
            pr.wiped.retain(|node| conf.member(node).is_some());
        }
        self.append_own(part, Entry { epoch, payload: Payload::Conf { conf, start: false } });
        self.replicate(now_ms, part, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorums_intersect_and_survive_one_voter_change() {
        for w in 1..=3 {
            for n in w..=7 {
                let (c, p) = (quorum_commit(n, w), quorum_promise(n, w));
                assert!(c >= w && c <= n && p <= n, "n {n} w {w}");
                assert!(c + p > n, "a new epoch's promises meet every commit: n {n} w {w}");
                // Quorums of confs one voter apart intersect (majorities of each).
                assert!(c > n / 2 && p > n / 2, "n {n} w {w}");
            }
        }
        assert_eq!((quorum_commit(3, 2), quorum_promise(3, 2)), (2, 2));
        assert_eq!((quorum_commit(4, 2), quorum_promise(4, 2)), (3, 3));
    }

    #[test]
    fn log_keys_parse_back() {
        assert_eq!(keys::parse_log(&keys::log(0x3ff, 0x1234)), Some((0x3ff, 0x1234)));
        assert_eq!(keys::parse_log(&keys::promised(3)), None);
    }
}
