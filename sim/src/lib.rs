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
//! Planted bugs ([`Bug`]) break one rule on purpose so we know the checks can fail. The
//! trace hash folds in every packet and reply, so the same seed gives the same hash.

mod app;
pub mod net;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use gossip::{Identity, MemberState, Membership, NodeId, Profile};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::app::App;
use crate::net::{Network, Packet, Rates};

const START_MS: u64 = 1_763_776_800_000;
const STEP_MS: u64 = 10;
const SAFETY_MS: u64 = 20_000;
/// After the heal, membership and browsers must converge within this.
const LIVENESS_MS_MAX: u64 = 40_000;

/// Rules broken on purpose, to prove that the checks catch them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bug {
    ForgetReannounce,
    AckBeforeSync,
    SkipInboxRepair,
}

impl Bug {
    pub const ALL: [(Bug, &'static str, &'static str); 3] = [
        (Bug::ForgetReannounce, "forget-reannounce", "the membership watchdog never re-announces once joined"),
        (Bug::AckBeforeSync, "ack-before-sync", "appends are acknowledged before the disk synced them"),
        (Bug::SkipInboxRepair, "skip-inbox-repair", "a restart does not finish inbox copies a crash interrupted"),
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
        };
        for i in 0..count {
            let drift_ppm = world.rng.gen_range(-20_000..20_000);
            let node = Node {
                membership: world.membership(i, START_MS, 1),
                app: App::new(world.core_config(), START_MS),
                up: true,
                frozen_until: 0,
                restart_at: 0,
                offset_ms: world.rng.gen_range(-500..500),
                drift_ppm,
                wiped: false,
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
        if faults {
            self.inject();
        }
        self.restart_due()?;
        self.deliver();
        for i in 0..self.nodes.len() {
            self.run_node(i, faults)?;
        }
        self.check_bounds()
    }

    fn inject(&mut self) {
        let count = self.nodes.len();
        let i = self.rng.gen_range(0..count);
        match self.rng.gen_range(0..10_000) {
            0..=14 if self.nodes[i].up => {
                let wipe = self.rng.gen_bool(0.1);
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
            }
            55..=64 => {
                let j = self.rng.gen_range(0..count);
                self.fault(Fault::ConnectionReset, i);
                self.net.reset(i, j);
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
            node.app.disk.wipe();
        }
        let kept = self.rng.gen_range(0..=node.app.disk.unsynced());
        node.app.disk.crash_keeping(kept);
    }

    fn restart_due(&mut self) -> Result<(), Failure> {
        for i in 0..self.nodes.len() {
            if self.nodes[i].up || self.nodes[i].restart_at > self.now_ms {
                continue;
            }
            let local = self.local_ms(i);
            // A restart's identity outranks every earlier life, renewals included: like the
            // real node, it takes its start time (here the global one, so it is unique).
            let membership = self.membership(i, local, self.now_ms);
            let seed = self.rng.gen();
            let node = &mut self.nodes[i];
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
        let replies = std::mem::take(&mut node.app.trace);
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
        for transmit in outgoing {
            let Some(to) = node_index(transmit.to) else { continue };
            let rates = faults.then_some(&self.rates);
            let packet = Packet { from: i, to, bytes: transmit.bytes };
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
        let count = self.nodes.len();
        self.nodes.iter().all(|node| {
            let members = node.membership.members();
            let alive = members.iter().filter(|(_, s)| *s == MemberState::Alive).count();
            node.up && alive == count
        })
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
        Err(Failure::new("membership converges after the heal", views.join(", ")))
    }
}

/// Runs one seed with `nodes` nodes; `verbose` prints every fault and membership event.
pub fn run_seed(seed: u64, nodes: usize, bug: Option<Bug>, verbose: bool) -> Outcome {
    let mut world = World::new(seed, nodes.max(2), bug);
    world.verbose = verbose;
    let mut result = Ok(());
    while world.now_ms - START_MS < SAFETY_MS {
        if let Err(failure) = world.step(true) {
            result = Err(failure);
            break;
        }
    }
    let mut convergence_ms = None;
    if result.is_ok() {
        match world.heal() {
            Ok(took) => convergence_ms = Some(took),
            Err(failure) => result = Err(failure),
        }
    }
    let mut faults = world.faults.clone();
    faults.insert(Fault::Drop, world.net.dropped);
    faults.insert(Fault::Duplicate, world.net.duplicated);
    Outcome { seed, trace: world.trace, result, simulated_ms: world.now_ms - START_MS, faults, convergence_ms }
}
