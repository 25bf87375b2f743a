//! The deterministic simulator: a whole cluster on one thread from one `u64` seed.
//!
//! Each simulated node runs the membership machine that ships (`gossip::Membership`, foca
//! inside) and the node core that ships (`node_core::NodeCore`) on a simulated disk
//! (`store::mem::MemStore` in manual-sync mode). Around them: a network that delays, drops,
//! duplicates, reorders and partitions ([`net`]), clocks that drift and jump, disks that
//! lose unsynced writes on a crash, fail a sync with EIO or get wiped, and processes that
//! crash, restart (a new incarnation) and freeze. Nothing reads a clock or OS randomness:
//! time is a counter, randomness a `SmallRng` seeded from the seed.
//!
//! A seed runs a safety phase (faults on, checks after every step) and a liveness phase
//! (faults off, everything healed; membership and browsers must converge within a bound).
//! Checks: the per-node promises in [`app`]; no long-poll outlives its deadline; waiting lists
//! and the network stay within their bounds; a node whose disk failed stops; after the heal,
//! every node sees every node alive (membership converges; no node stalls for good).
//!
//! Each node also runs the replicated log ([`cluster`]: `node_core::repl`, on a disk of its
//! own) under writers that retry ids until acknowledged; its checks are the contract's
//! promises 1, 2, 3 and 7 after every step, and convergence plus writability after the heal.
//!
//! Planted bugs ([`Bug`]) break one rule on purpose so we know the checks can fail. The
//! trace hash folds in every packet and reply, so the same seed gives the same hash.

mod app;
mod cluster;
pub mod net;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use gossip::{Identity, MemberState, Membership, NodeId, Profile};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use store::mem::MemStore;
use store::Store;

use crate::app::App;
use crate::cluster::{LogNode, Submit, Writers};
use crate::net::{Network, Packet, Rates};

const START_MS: u64 = 1_763_776_800_000;
const STEP_MS: u64 = 10;
const SAFETY_MS: u64 = 20_000;
/// The end of the safety phase in which writers only retry.
const QUIET_MS: u64 = 4_000;
/// After the heal, membership and browsers must converge within this.
const LIVENESS_MS_MAX: u64 = 40_000;

/// Rules broken on purpose, to prove that the checks catch them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bug {
    ForgetReannounce,
    AckBeforeSync,
    SkipInboxRepair,
    AckAfterOne,
    SkipEpochCheck,
    AdoptLongest,
    WipedVotes,
    ServeBeforeCommit,
    SkipReadIndex,
    SkipProbe,
}

impl Bug {
    pub const ALL: [(Bug, &'static str, &'static str); 10] = [
        (Bug::ForgetReannounce, "forget-reannounce", "the membership watchdog never re-announces once joined"),
        (Bug::AckBeforeSync, "ack-before-sync", "appends are acknowledged before the disk synced them"),
        (Bug::SkipInboxRepair, "skip-inbox-repair", "a restart does not finish inbox copies a crash interrupted"),
        (Bug::AckAfterOne, "ack-after-one", "a replicated append commits once the primary alone synced it"),
        (Bug::SkipEpochCheck, "skip-epoch-check", "replicas accept entries from epochs older than they promised"),
        (Bug::AdoptLongest, "adopt-longest", "a new primary adopts the longest log, not the highest (epoch, index)"),
        (Bug::WipedVotes, "wiped-votes", "a replica with a wiped disk promises and acknowledges as if intact"),
        (Bug::ServeBeforeCommit, "serve-before-commit", "replicas apply (and so serve) entries before they commit"),
        (Bug::SkipReadIndex, "skip-read-index", "a primary serves reads without confirming it still leads"),
        (
            Bug::SkipProbe,
            "skip-probe",
            "a primary never asks a returning member whether its disk is still the one it knew",
        ),
    ];

    pub fn parse(name: &str) -> Option<Bug> {
        Bug::ALL.iter().find(|(_, n, _)| *n == name).map(|(b, _, _)| *b)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub invariant: &'static str,
    pub detail: String,
}

impl Failure {
    pub fn new(invariant: &'static str, detail: impl Into<String>) -> Failure {
        Failure { invariant, detail: detail.into() }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    Crash,
    Wipe,
    Freeze,
    Partition,
    ClockJump,
    DiskError,
    ConnectionReset,
    /// A node's placement weight set to 0 (a ghost: learner only) or back to full, live.
    Weight,
    /// A node's disk holds a record that fails its checksum: when the node reads it, it stops,
    /// sets the copy aside and comes straight back (in-process, ~100 ms) with a fresh disk
    /// for the replicas to rebuild (`node::damage`).
    Damage,
    Drop,
    Duplicate,
}

pub struct Outcome {
    pub seed: u64,
    pub trace: u64,
    pub result: Result<(), Failure>,
    pub simulated_ms: u64,
    pub faults: BTreeMap<Fault, u64>,
    /// Time from the heal until every node saw every node alive.
    pub convergence_ms: Option<u64>,
}

struct Node {
    membership: Membership,
    app: App,
    up: bool,
    frozen_until: u64,
    restart_at: u64,
    /// Local clock: global time + offset + drift.
    offset_ms: i64,
    drift_ppm: i64,
    /// Its disk was wiped in the last crash: it comes back empty.
    wiped: bool,
    /// Its replication side, on a disk of its own.
    log: LogNode,
    /// The membership view last given to `log`.
    view: Vec<node_core::repl::View>,
    /// When its disk was last wiped (global time).
    wiped_ms: u64,
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, i as u8 + 1], 7800))
}

fn node_index(addr: SocketAddr) -> Option<usize> {
    match addr.ip() {
        std::net::IpAddr::V4(v4) => Some(usize::from(v4.octets()[3]) - 1),
        _ => None,
    }
}

struct World {
    rng: SmallRng,
    now_ms: u64,
    nodes: Vec<Node>,
    net: Network,
    rates: Rates,
    bug: Option<Bug>,
    faults: BTreeMap<Fault, u64>,
    trace: u64,
    heal_at: u64,
    /// Print faults and membership events as they happen (replaying one seed).
    verbose: bool,
    writers: Writers,
    /// Every event any disk ever showed: (stream, version) -> id.
    truth: HashMap<(store::StreamName, store::Version), store::EventId>,
    /// Disks wiped so far (at most W - 1 may be: the contract holds only then).
    wipes: usize,
    /// The node at weight 0 (one at most, so placement always finds R weighted nodes).
    ghost: Option<usize>,
    nodes_total: usize,
}

impl World {
    fn new(seed: u64, count: usize, bug: Option<Bug>) -> World {
        let mut rng = SmallRng::seed_from_u64(seed);
        let rates = Rates {
            drop: rng.gen_range(0.0..0.2),
            duplicate: rng.gen_range(0.0..0.05),
            delay_ms_max: rng.gen_range(1..80),
        };
        let mut world = World {
            rng,
            now_ms: START_MS,
            nodes: Vec::new(),
            net: Network::default(),
            rates,
            bug,
            faults: BTreeMap::new(),
            trace: 0xcbf2_9ce4_8422_2325,
            heal_at: 0,
            verbose: false,
            writers: Writers::default(),
            truth: HashMap::new(),
            wipes: 0,
            ghost: None,
            nodes_total: count,
        };
        for i in 0..count {
            let drift_ppm = world.rng.gen_range(-20_000..20_000);
            let log = world.log_node(i, Arc::new(MemStore::manual()), START_MS).expect("a new disk reads");
            let node = Node {
                membership: world.membership(i, START_MS, 1),
                app: App::new(world.core_config(), START_MS),
                up: true,
                frozen_until: 0,
                restart_at: 0,
                offset_ms: world.rng.gen_range(-500..500),
                drift_ppm,
                wiped: false,
                log,
                view: Vec::new(),
                wiped_ms: 0,
            };
            world.nodes.push(node);
        }
        world
    }

    fn core_config(&mut self) -> node_core::Config {
        node_core::Config {
            seed: self.rng.gen(),
            waiters_max: app::WAITERS_MAX,
            bug: match self.bug {
                Some(Bug::AckBeforeSync) => Some(node_core::PlantedBug::AckBeforeSync),
                Some(Bug::SkipInboxRepair) => Some(node_core::PlantedBug::SkipInboxRepair),
                _ => None,
            },
            ..node_core::Config::default()
        }
    }

    fn log_node(&mut self, i: usize, disk: Arc<MemStore>, local_ms: u64) -> Result<LogNode, Failure> {
        let config = node_core::repl::Config {
            partitions: cluster::PARTITIONS,
            write_quorum: cluster::W,
            bootstrap_expect: self.nodes_total,
            seed: self.rng.gen(),
            bug: match self.bug {
                Some(Bug::AckAfterOne) => Some(node_core::repl::ReplBug::AckAfterOne),
                Some(Bug::SkipEpochCheck) => Some(node_core::repl::ReplBug::SkipEpochCheck),
                Some(Bug::AdoptLongest) => Some(node_core::repl::ReplBug::AdoptLongest),
                Some(Bug::WipedVotes) => Some(node_core::repl::ReplBug::WipedVotes),
                Some(Bug::ServeBeforeCommit) => Some(node_core::repl::ReplBug::ServeBeforeCommit),
                Some(Bug::SkipReadIndex) => Some(node_core::repl::ReplBug::SkipReadIndex),
                Some(Bug::SkipProbe) => Some(node_core::repl::ReplBug::SkipProbe),
                _ => None,
            },
            ..node_core::repl::Config::new(format!("n{i}"))
        };
        let mut node = LogNode::new(&format!("n{i}"), config, disk, local_ms)?;
        node.verbose = self.verbose;
        node.global_ms = self.now_ms;
        Ok(node)
    }

    fn membership(&mut self, i: usize, local_ms: u64, bump: u64) -> Membership {
        let identity = Identity {
            id: NodeId::new(format!("n{i}")).expect("valid"),
            mesh_addr: addr(i),
            http_addr: addr(i),
            weight_milli: 1000,
            bump,
        };
        let profile = Profile { bug_forget_reannounce: self.bug == Some(Bug::ForgetReannounce), ..Profile::default() };
        Membership::new(identity, vec![addr(0)], profile, self.rng.gen(), local_ms)
    }

    fn local_ms(&self, i: usize) -> u64 {
        let node = &self.nodes[i];
        let elapsed = (self.now_ms - START_MS) as i64;
        (self.now_ms as i64 + node.offset_ms + elapsed * node.drift_ppm / 1_000_000) as u64
    }

    fn record(&mut self, values: &[u64]) {
        for value in values {
            for byte in value.to_le_bytes() {
                self.trace ^= u64::from(byte);
                self.trace = self.trace.wrapping_mul(0x100_0000_01b3);
            }
        }
    }

    fn fault(&mut self, fault: Fault, node: usize) {
        *self.faults.entry(fault).or_default() += 1;
        self.record(&[fault as u64 + 1000]);
        self.say(format_args!("fault {fault:?} at n{node}"));
    }

    fn say(&self, what: std::fmt::Arguments<'_>) {
        if self.verbose {
            println!("{:>8.3}s {what}", (self.now_ms - START_MS) as f64 / 1000.0);
        }
    }

    fn step(&mut self, faults: bool) -> Result<(), Failure> {
        self.now_ms += STEP_MS;
        for node in &mut self.nodes {
            node.log.global_ms = self.now_ms;
        }
        if faults {
            self.inject();
        }
        self.restart_due()?;
        self.deliver();
        self.write(faults)?;
        self.read();
        for i in 0..self.nodes.len() {
            self.run_node(i, faults)?;
        }
        self.check_replicas()?;
        self.check_bounds()
    }

    fn runs(&self, i: usize) -> bool {
        self.nodes[i].up && self.nodes[i].frozen_until <= self.now_ms
    }

    /// A writer sends one append (new, or a retry) to a random node that runs.
    /// The node that gets it forwards it to the primary it believes in (one hop, as the
    /// real gateway does).
    fn write(&mut self, new: bool) -> Result<(), Failure> {
        for _ in 0..4 {
            // The last seconds of the safety phase are quiet (retries only) while faults go on:
            // partitions idle at the heal, as at night on a social site.
            let new = new && self.now_ms - START_MS < SAFETY_MS - QUIET_MS;
            let Some((stream, id)) = self.writers.next(&mut self.rng, self.now_ms, new) else { return Ok(()) };
            let mut i = self.rng.gen_range(0..self.nodes.len());
            if !self.runs(i) {
                continue;
            }
            let part = node_core::placement::partition_of(stream.as_str(), cluster::PARTITIONS);
            if !self.nodes[i].log.repl.is_serving(part) {
                let local = self.local_ms(i);
                self.nodes[i].log.activate(local, part);
                let hint = self.nodes[i].log.repl.primary_hint(part);
                match hint.and_then(|h| h.strip_prefix('n').and_then(|n| n.parse::<usize>().ok())) {
                    Some(j) if j < self.nodes.len() && self.runs(j) && !self.net.is_blocked(i, j) => i = j,
                    _ => {}
                }
            }
            let local = self.local_ms(i);
            if let Submit::Acked(version) = self.nodes[i].log.submit(local, &stream, id) {
                self.writers.ack(&stream, id, version)?;
            }
        }
        Ok(())
    }

    /// A reader reads a stream with acknowledged writes, through a random node that sends
    /// it to the primary it believes in; the read must show every write acknowledged before.
    fn read(&mut self) {
        if !self.rng.gen_bool(0.3) {
            return;
        }
        let acked: Vec<&cluster::Write> = self.writers.writes.iter().filter(|w| w.acked.is_some()).collect();
        if acked.is_empty() {
            return;
        }
        let stream = acked[self.rng.gen_range(0..acked.len())].stream.clone();
        let expect: Vec<(store::EventId, store::Version)> = self
            .writers
            .writes
            .iter()
            .filter(|w| w.stream == stream)
            .filter_map(|w| w.acked.map(|v| (w.id, v)))
            .collect();
        let mut i = self.rng.gen_range(0..self.nodes.len());
        if !self.runs(i) {
            return;
        }
        let part = node_core::placement::partition_of(stream.as_str(), cluster::PARTITIONS);
        if !self.nodes[i].log.repl.is_serving(part) {
            let hint = self.nodes[i].log.repl.primary_hint(part);
            match hint.and_then(|h| h.strip_prefix('n').and_then(|n| n.parse::<usize>().ok())) {
                Some(j) if j < self.nodes.len() && self.runs(j) && !self.net.is_blocked(i, j) => i = j,
                _ => return,
            }
        }
        let local = self.local_ms(i);
        self.nodes[i].log.read(local, &stream, expect);
    }

    /// Acknowledgements are checked for durability on W disks; what disks show, against
    /// what every disk ever showed.
    fn check_replicas(&mut self) -> Result<(), Failure> {
        for i in 0..self.nodes.len() {
            let acked = std::mem::take(&mut self.nodes[i].log.acked);
            for (stream, id, version, part, index, proposed_ms) in acked {
                let Some(entry) = self.nodes[i].log.durable_entry(part, index) else {
                    return Err(Failure::new("an acknowledged append is durable", format!("n{i} p{part} #{index}")));
                };
                let copies =
                    self.nodes.iter().filter(|n| n.log.durable_entry(part, index).as_ref() == Some(&entry)).count();
                // A disk wiped since the proposal may have held a copy when it committed.
                let wiped = self.nodes.iter().filter(|n| n.wiped_ms >= proposed_ms).count();
                if copies + wiped < cluster::W {
                    return Err(Failure::new(
                        "an append is acknowledged only once W replicas synced it",
                        format!("n{i}: {stream} v{version} ({id}) at p{part} #{index} is on {copies} disk(s)"),
                    ));
                }
                self.record(&[version.0, index]);
                self.writers.ack(&stream, id, version)?;
            }
            if let Some(stale) = self.nodes[i].log.stale_reads.first() {
                return Err(Failure::new("a writer reads its own acknowledged writes from any node", stale.clone()));
            }
            if self.nodes[i].up {
                self.nodes[i].log.check_visible(&mut self.truth)?;
            }
        }
        Ok(())
    }

    fn inject(&mut self) {
        let count = self.nodes.len();
        let i = self.rng.gen_range(0..count);
        match self.rng.gen_range(0..10_000) {
            0..=14 if self.nodes[i].up => {
                let wipe = self.rng.gen_bool(0.3) && self.wipes + 1 < cluster::W;
                self.wipes += usize::from(wipe);
                self.fault(if wipe { Fault::Wipe } else { Fault::Crash }, i);
                self.crash(i, wipe);
            }
            15..=29 if self.nodes[i].up && self.nodes[i].frozen_until <= self.now_ms => {
                self.fault(Fault::Freeze, i);
                self.nodes[i].frozen_until = self.now_ms + self.rng.gen_range(200..3000);
            }
            30..=39 if !self.net.is_partitioned() => {
                self.fault(Fault::Partition, i);
                match self.rng.gen_range(0..3) {
                    0 => (0..count).filter(|j| *j != i).for_each(|j| {
                        self.net.block(i, j);
                        self.net.block(j, i);
                    }),
                    1 => {
                        let j = (i + 1 + self.rng.gen_range(0..count - 1)) % count;
                        self.net.block(i, j); // One way only.
                    }
                    _ => {
                        let side: Vec<bool> = (0..count).map(|_| self.rng.gen_bool(0.5)).collect();
                        for a in 0..count {
                            for b in 0..count {
                                if side[a] != side[b] {
                                    self.net.block(a, b);
                                }
                            }
                        }
                    }
                }
                self.heal_at = self.now_ms + self.rng.gen_range(500..8000);
            }
            40..=49 => {
                self.fault(Fault::ClockJump, i);
                self.nodes[i].offset_ms += self.rng.gen_range(-3000..3000);
            }
            50..=54 if self.nodes[i].up => {
                self.fault(Fault::DiskError, i);
                let applied = self.rng.gen_bool(0.5);
                // The disk answers EIO; the node must stop and restart from what is on disk.
                let _ = self.nodes[i].app.fail_sync(applied);
                self.nodes[i].log.disk.fail_sync(applied);
            }
            55..=64 => {
                let j = self.rng.gen_range(0..count);
                self.fault(Fault::ConnectionReset, i);
                self.net.reset(i, j);
            }
            70..=74 if self.nodes[i].up && self.wipes + 1 < cluster::W => {
                // At the moment a read finds it: the node stops (modelled as a crash, which
                // loses more than a graceful stop) and its disk starts over.
                self.fault(Fault::Damage, i);
                self.wipes += 1;
                self.crash(i, true);
                self.nodes[i].restart_at = self.now_ms + self.rng.gen_range(50..300);
            }
            65..=69 if self.nodes[i].up && self.ghost.is_none_or(|g| g == i) => {
                self.fault(Fault::Weight, i);
                let local = self.local_ms(i);
                let weight = if self.ghost.is_some() { 1000 } else { 0 };
                self.ghost = (weight == 0).then_some(i);
                self.nodes[i].membership.set_weight(local, weight);
            }
            _ => {}
        }
        if self.net.is_partitioned() && self.now_ms >= self.heal_at {
            self.net.heal();
        }
    }

    fn crash(&mut self, i: usize, wipe: bool) {
        let node = &mut self.nodes[i];
        node.up = false;
        node.restart_at = self.now_ms + self.rng.gen_range(100..4000);
        node.wiped |= wipe;
        if wipe {
            node.wiped_ms = self.now_ms;
            node.app.disk.wipe();
            node.log.disk.wipe();
        }
        let kept = self.rng.gen_range(0..=node.app.disk.unsynced());
        node.app.disk.crash_keeping(kept);
        let kept = self.rng.gen_range(0..=node.log.disk.unsynced());
        node.log.disk.crash_keeping(kept);
    }

    fn restart_due(&mut self) -> Result<(), Failure> {
        for i in 0..self.nodes.len() {
            if self.nodes[i].up || self.nodes[i].restart_at > self.now_ms {
                continue;
            }
            let local = self.local_ms(i);
            // A restart's identity outranks every earlier life, renewals included: like the
            // real node, it takes its start time (here the global one, so it is unique).
            let membership = self.membership(i, local, Identity::first_bump(self.now_ms));
            if self.ghost == Some(i) {
                self.ghost = None; // It restarts at full weight.
            }
            let seed = self.rng.gen();
            let disk = self.nodes[i].log.disk.clone();
            let log = self.log_node(i, disk, local)?;
            let node = &mut self.nodes[i];
            node.log = log;
            node.view = Vec::new();
            node.membership = membership;
            node.app.restart(local, std::mem::take(&mut node.wiped), seed)?;
            node.up = true;
            node.frozen_until = 0;
        }
        Ok(())
    }

    fn deliver(&mut self) {
        while let Some(packet) = self.net.due(self.now_ms) {
            let to = packet.to;
            if !self.nodes[to].up {
                continue;
            }
            if self.nodes[to].frozen_until > self.now_ms {
                let until = self.nodes[to].frozen_until;
                self.net.hold(until, packet);
                continue;
            }
            self.record(&[packet.from as u64, to as u64, packet.bytes.len() as u64]);
            let local = self.local_ms(to);
            if packet.kind == net::REPLICATION {
                let from = format!("n{}", packet.from);
                self.nodes[to].log.handle(local, &from, &packet.bytes);
                continue;
            }
            let from = NodeId::new(format!("n{}", packet.from)).expect("valid");
            let _ = self.nodes[to].membership.handle_packet(local, &from, &packet.bytes);
        }
    }

    fn run_node(&mut self, i: usize, faults: bool) -> Result<(), Failure> {
        if !self.nodes[i].up || self.nodes[i].frozen_until > self.now_ms {
            return Ok(());
        }
        let local = self.local_ms(i);
        let node = &mut self.nodes[i];
        node.membership.tick(local);
        if faults {
            node.app.act(&mut self.rng, local)?;
        } else {
            node.app.settle(local)?;
        }
        let view: Vec<node_core::repl::View> = node
            .membership
            .members()
            .into_iter()
            .map(|(m, state)| node_core::repl::View {
                node: m.id.to_string(),
                weight_milli: u32::from(m.weight_milli),
                down: state == MemberState::Down,
                incarnation: m.life(),
            })
            .collect();
        if view != node.view {
            node.view = view.clone();
            node.log.set_view(local, view);
        }
        node.log.tick(local);
        if self.rng.gen_bool(0.6) {
            node.log.sync(local);
        }
        let node = &mut self.nodes[i];
        let replies = std::mem::take(&mut node.app.trace);
        if node.log.failed {
            self.crash(i, false);
        }
        let node = &mut self.nodes[i];
        if node.app.failed_storage {
            // The core reported a failed sync: the process stops instead of carrying on.
            self.crash(i, false);
        }
        let mut outgoing = Vec::new();
        while let Some(transmit) = self.nodes[i].membership.poll_transmit() {
            outgoing.push(transmit);
        }
        while let Some(event) = self.nodes[i].membership.poll_event() {
            self.say(format_args!("n{i}: {event:?}"));
        }
        self.record(&replies);
        let rates = faults.then(|| self.rates.clone());
        let rates = rates.as_ref();
        for transmit in outgoing {
            let Some(to) = node_index(transmit.to) else { continue };
            let packet = Packet { kind: net::SWIM, from: i, to, bytes: transmit.bytes };
            self.net.send(&mut self.rng, rates, self.now_ms, packet);
        }
        for (to, msgs) in self.nodes[i].log.take_outbox() {
            let Some(to) = to.strip_prefix('n').and_then(|n| n.parse::<usize>().ok()) else { continue };
            let bytes = node_core::repl::encode_msgs(&msgs);
            self.record(&[to as u64, bytes.len() as u64]);
            let packet = Packet { kind: net::REPLICATION, from: i, to, bytes };
            self.net.send(&mut self.rng, rates, self.now_ms, packet);
        }
        Ok(())
    }

    fn check_bounds(&self) -> Result<(), Failure> {
        for (i, node) in self.nodes.iter().enumerate() {
            if node.up && node.frozen_until <= self.now_ms && node.app.overdue(self.local_ms(i)) {
                return Err(Failure::new("no long-poll outlives its deadline", format!("n{i}")));
            }
            if node.app.waiting() > app::WAITERS_MAX {
                return Err(Failure::new("waiting lists stay bounded", format!("n{i}: {}", node.app.waiting())));
            }
        }
        if self.net.in_flight() > net::PACKETS_IN_FLIGHT_MAX {
            return Err(Failure::new("the network stays bounded", self.net.in_flight().to_string()));
        }
        Ok(())
    }

    fn converged(&self) -> bool {
        self.members_converged() && self.log_converged(false).is_ok()
    }

    fn members_converged(&self) -> bool {
        let count = self.nodes.len();
        self.nodes.iter().all(|node| {
            let members = node.membership.members();
            let alive = members.iter().filter(|(_, s)| *s == MemberState::Alive).count();
            node.up && alive == count
        })
    }

    /// Each node's view of one partition, a line each (for failure reports).
    fn partition_states(&self, part: u32) -> String {
        let states = self.nodes.iter().enumerate();
        states.map(|(i, n)| format!("\n    n{i} (up {}): {}", n.up, n.log.repl.describe(part))).collect()
    }

    /// Every write is acknowledged; every partition started anywhere has one primary, and
    /// each voter of its conf has applied all of its log and holds the same streams. `idle`:
    /// only the partitions that have one primary now, whatever is unacknowledged (writes
    /// wake the others).
    fn log_converged(&self, idle: bool) -> Result<(), String> {
        if let Some(w) = self.writers.writes.iter().find(|w| w.acked.is_none()).filter(|_| !idle) {
            let part = node_core::placement::partition_of(w.stream.as_str(), cluster::PARTITIONS);
            return Err(format!(
                "{} writes unacknowledged, e.g. to {} (p{part}):{}",
                self.writers.unacknowledged(),
                w.stream,
                self.partition_states(part)
            ));
        }
        for part in 0..cluster::PARTITIONS {
            let started = self.nodes.iter().any(|n| n.log.repl.conf(part).is_some_and(|c| !c.members.is_empty()));
            if !started {
                continue;
            }
            let serving: Vec<usize> =
                (0..self.nodes.len()).filter(|i| self.nodes[*i].log.repl.is_serving(part)).collect();
            let [primary] = serving[..] else {
                if idle {
                    continue;
                }
                return Err(format!("p{part} served by {serving:?}:{}", self.partition_states(part)));
            };
            let lead = &self.nodes[primary].log;
            let (last, commit, applied) = lead.repl.position(part).expect("serving");
            if commit != last.index || applied != last.index {
                return Err(format!("p{part}: primary n{primary} at {last:?} commit {commit} applied {applied}"));
            }
            let streams = lead.streams();
            for m in lead.repl.conf(part).expect("serving").voters() {
                let Some(j) = m.node.strip_prefix('n').and_then(|n| n.parse::<usize>().ok()) else { continue };
                let node = &self.nodes[j].log;
                if idle {
                    // Holding the log is what durability needs; a follower learns the commit
                    // index (and so applies the tail) from the next message.
                    let held = node.repl.position(part).map(|p| p.0);
                    if held.as_ref() != Some(&last) {
                        return Err(format!("p{part}: voter n{j} holds {held:?} of {last:?}"));
                    }
                    continue;
                }
                let applied_there = node.repl.position(part).map(|p| p.2);
                if applied_there != Some(applied) {
                    return Err(format!("p{part}: voter n{j} applied {applied_there:?} of {applied}"));
                }
                let theirs = node.streams();
                for k in 0..streams.len() {
                    let name = cluster::stream(k);
                    if node_core::placement::partition_of(name.as_str(), cluster::PARTITIONS) == part
                        && theirs[k] != streams[k]
                    {
                        return Err(format!("p{part}: {name} differs on n{j} and n{primary}"));
                    }
                }
            }
        }
        Ok(())
    }

    /// After convergence: every acknowledged write is where it was acknowledged, on the
    /// primary of its stream (and so, by `log_converged`, on every voter).
    fn check_writes(&self) -> Result<(), Failure> {
        for write in &self.writers.writes {
            let part = node_core::placement::partition_of(write.stream.as_str(), cluster::PARTITIONS);
            let Some(primary) = self.nodes.iter().find(|n| n.log.repl.is_serving(part)) else {
                return Err(Failure::new("every partition is writable after the heal", format!("p{part}")));
            };
            let version = write.acked.expect("converged means all acknowledged");
            let found = primary.log.disk.find(&write.stream, write.id).ok().flatten().map(|e| e.version);
            if found != Some(version) {
                return Err(Failure::new(
                    "an acknowledged append is never lost",
                    format!(
                        "{} {} acked at v{version}, found {found:?} on {}",
                        write.stream,
                        write.id,
                        primary.log.name()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Faults off: heal, restart and unfreeze everyone, and wait for convergence.
    fn heal(&mut self) -> Result<u64, Failure> {
        self.net.heal();
        for node in &mut self.nodes {
            node.frozen_until = 0;
            node.restart_at = node.restart_at.min(self.now_ms);
        }
        let healed = self.now_ms;
        self.say(format_args!("heal: faults off"));
        // First with no new writes: where a partition has a primary, its voters must come to
        // hold its whole log without traffic to prompt them (a member back with a wiped disk
        // is asked, re-added and caught up; found by the damage test with real processes).
        loop {
            self.step(false)?;
            if self.members_converged() && self.log_converged(true).is_ok() {
                break;
            }
            if self.now_ms - healed >= LIVENESS_MS_MAX / 2 {
                let log = self.log_converged(true).err().unwrap_or_else(|| "membership".into());
                return Err(Failure::new("voters converge while their partitions are idle after the heal", log));
            }
        }
        self.writers.probe(self.now_ms, &mut self.rng);
        while self.now_ms - healed < LIVENESS_MS_MAX {
            self.step(false)?;
            if self.converged() {
                let took = self.now_ms - healed;
                for i in 0..self.nodes.len() {
                    let local = self.local_ms(i);
                    for _ in 0..3 {
                        self.nodes[i].app.settle(local)?;
                    }
                    self.nodes[i].app.check_final()?;
                }
                self.check_writes()?;
                return Ok(took);
            }
        }
        let views: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let members = n.membership.members();
                let alive = members.iter().filter(|(_, s)| *s == MemberState::Alive).count();
                let view: Vec<String> = members.iter().map(|(m, s)| format!("{}@{}:{s:?}", m.id, m.bump)).collect();
                let local = self.local_ms(i);
                let next = n.membership.poll_timeout().map_or(0, |t| t as i64 - local as i64);
                format!(
                    "n{i} (up {}, active {}, next timer in {next} ms) sees {alive} alive [{}]",
                    n.up,
                    n.membership.is_active(),
                    view.join(" ")
                )
            })
            .collect();
        if let Err(log) = self.log_converged(false) {
            return Err(Failure::new("replicas converge and every stream is writable after the heal", log));
        }
        Err(Failure::new("membership converges after the heal", views.join(", ")))
    }
}

/// Runs one seed with `nodes` nodes; `verbose` prints every fault and membership event.
pub fn run_seed(seed: u64, nodes: usize, bug: Option<Bug>, verbose: bool) -> Outcome {
    let mut world = World::new(seed, nodes.max(2), bug);
    world.verbose = verbose;
    for node in &mut world.nodes {
        node.log.verbose = verbose;
    }
    let mut convergence_ms = None;
    // A panic (an assertion in a node or its disk) fails the seed like any broken promise.
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        while world.now_ms - START_MS < SAFETY_MS {
            world.step(true)?;
        }
        world.heal().map(|took| convergence_ms = Some(took))
    }));
    let result = match run {
        Ok(result) => result,
        Err(panic) => {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(Failure::new("no node panics", text))
        }
    };
    let mut faults = world.faults.clone();
    faults.insert(Fault::Drop, world.net.dropped);
    faults.insert(Fault::Duplicate, world.net.duplicated);
    Outcome { seed, trace: world.trace, result, simulated_ms: world.now_ms - START_MS, faults, convergence_ms }
}
