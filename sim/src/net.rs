//! The simulated network: delays, drops, duplicates and reorders packets, and partitions
//! (symmetric, one way, or one node cut off). Packets are delivered in `deliver_at` order,
//! so a longer delay reorders. Bounded: beyond `PACKETS_IN_FLIGHT_MAX` packets are dropped,
//! as a full socket buffer would.

use std::collections::{BTreeMap, HashSet};

use rand::rngs::SmallRng;
use rand::Rng;

pub const PACKETS_IN_FLIGHT_MAX: usize = 100_000;
pub const SWIM: u8 = 0;
pub const REPLICATION: u8 = 1;

/// Per-seed network behaviour (drawn once per seed).
#[derive(Clone, Debug)]
pub struct Rates {
    pub drop: f64,
    pub duplicate: f64,
    pub delay_ms_max: u64,
}

pub struct Packet {
    /// What the bytes are for: [`SWIM`] or [`REPLICATION`].
    pub kind: u8,
    pub from: usize,
    pub to: usize,
    pub bytes: Vec<u8>,
}

#[derive(Default)]
pub struct Network {
    /// (deliver at, sequence) -> packet.
    in_flight: BTreeMap<(u64, u64), Packet>,
    seq: u64,
    /// (from, to) pairs that cannot reach each other, one way.
    blocked: HashSet<(usize, usize)>,
    pub dropped: u64,
    pub duplicated: u64,
}

impl Network {
    pub fn send(&mut self, rng: &mut SmallRng, rates: Option<&Rates>, now_ms: u64, packet: Packet) {
        if self.blocked.contains(&(packet.from, packet.to)) || self.in_flight.len() >= PACKETS_IN_FLIGHT_MAX {
            self.dropped += 1;
            return;
        }
        let (copies, delay_max) = match rates {
            Some(r) if rng.gen_bool(r.drop) => {
                self.dropped += 1;
                return;
            }
            Some(r) if rng.gen_bool(r.duplicate) => {
                self.duplicated += 1;
                (2, r.delay_ms_max)
            }
            Some(r) => (1, r.delay_ms_max),
            None => (1, 2),
        };
        for _ in 0..copies {
            let at = now_ms + 1 + rng.gen_range(0..=delay_max);
            self.seq += 1;
            self.in_flight.insert(
                (at, self.seq),
                Packet { kind: packet.kind, from: packet.from, to: packet.to, bytes: packet.bytes.clone() },
            );
        }
    }

    /// The next packet due by `now_ms`.
    pub fn due(&mut self, now_ms: u64) -> Option<Packet> {
        let entry = self.in_flight.first_entry()?;
        if entry.key().0 > now_ms {
            return None;
        }
        Some(entry.remove())
    }

    /// Puts a packet back for later (its receiver is frozen).
    pub fn hold(&mut self, until_ms: u64, packet: Packet) {
        self.seq += 1;
        self.in_flight.insert((until_ms, self.seq), packet);
    }

    pub fn block(&mut self, from: usize, to: usize) {
        self.blocked.insert((from, to));
    }

    pub fn heal(&mut self) {
        self.blocked.clear();
    }

    pub fn is_blocked(&self, from: usize, to: usize) -> bool {
        self.blocked.contains(&(from, to))
    }

    pub fn is_partitioned(&self) -> bool {
        !self.blocked.is_empty()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// A connection reset between two nodes: what is in flight between them is lost.
    pub fn reset(&mut self, a: usize, b: usize) -> usize {
        let before = self.in_flight.len();
        self.in_flight.retain(|_, p| !((p.from == a && p.to == b) || (p.from == b && p.to == a)));
        before - self.in_flight.len()
    }
}
