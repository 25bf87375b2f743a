//! The membership state machine: foca (SWIM) plus what foca leaves to its user, sans-IO.
//!
//! Inputs, each with `now_ms`: [`Membership::handle_packet`] (a packet from an authenticated
//! peer), [`Membership::tick`] (time passed), [`Membership::leave`]. Outputs:
//! [`Membership::poll_transmit`] (send these bytes to that address, expecting that node),
//! [`Membership::poll_event`] (a member came up, became suspect, went down or left),
//! [`Membership::poll_timeout`] (call `tick` by then). It never reads a clock or the OS's
//! randomness: both are passed in.
//!
//! What it adds to foca:
//! - one timer queue ordered by (deadline, sequence) for foca's timers (foca issue #26);
//! - the first announce is retried every `announce_interval_ms` until foca says we are
//!   active, and a watchdog re-announces, one target per interval, to seeds that are not
//!   alive members and to members known as down: a foca cluster can otherwise stay split
//!   for good after a partition heals;
//! - a packet whose SWIM header names a different node than the peer's certificate is
//!   refused;
//! - events for every state change, including `Suspect` (foca only notifies up and down)
//!   and `Left` (a node that said it was leaving before it went down);
//! - a suspicion that outlives `suspect_to_down_ms` by a probe period is made final (down):
//!   foca drops its pending suspect-to-down timers whenever its own identity changes (a
//!   renewal after being declared down), and a member whose refutation never arrives then
//!   stays suspect for good. The simulator found this (seed 29 in `sim/regressions.txt`).
//!
//! Invariants: timers are delivered in deadline order, each exactly once; every queue here
//! is bounded (`outbox_len_max`, `events_len_max`: overflow drops the oldest, and SWIM
//! tolerates loss).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use foca::{AccumulatingRuntime, Codec, Foca, NoCustomBroadcast, OwnedNotification, PostcardCodec, State, Timer};
use rand::rngs::SmallRng;
use rand::SeedableRng;

use crate::identity::{Identity, NodeId};
use crate::wire::{self, Kind, WireError};

/// How fast the mesh notices a dead node. The default finds one in about 2 s.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    pub probe_period_ms: u64,
    pub probe_rtt_ms: u64,
    pub suspect_to_down_ms: u64,
    pub gossip_period_ms: u64,
    pub announce_interval_ms: u64,
    /// Largest SWIM packet, sized to fit a QUIC datagram.
    pub packet_bytes_max: usize,
    /// Planted bug: the watchdog never re-announces once active.
    #[cfg(feature = "planted-bugs")]
    pub bug_forget_reannounce: bool,
}

impl Default for Profile {
    fn default() -> Self {
        Profile {
            probe_period_ms: 400,
            probe_rtt_ms: 150,
            suspect_to_down_ms: 1200,
            gossip_period_ms: 200,
            announce_interval_ms: 1000,
            packet_bytes_max: 1100,
            #[cfg(feature = "planted-bugs")]
            bug_forget_reannounce: false,
        }
    }
}

impl Profile {
    fn foca_config(&self) -> foca::Config {
        let mut config = foca::Config::new_lan(NonZeroU32::new(16).expect("non-zero"));
        config.probe_period = Duration::from_millis(self.probe_period_ms);
        config.probe_rtt = Duration::from_millis(self.probe_rtt_ms);
        config.suspect_to_down_after = Duration::from_millis(self.suspect_to_down_ms);
        config.max_packet_size = NonZeroUsize::new(self.packet_bytes_max).expect("packets have room");
        config.periodic_gossip = Some(foca::PeriodicParams {
            frequency: Duration::from_millis(self.gossip_period_ms),
            num_members: NonZeroUsize::new(3).expect("non-zero"),
        });
        config
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberState {
    Alive,
    Suspect,
    Down,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberEvent {
    Up(Identity),
    Suspect(Identity),
    Down(Identity),
    /// Down after saying it was leaving.
    Left(Identity),
}

/// Bytes to send to `to`; `expect` is the node the certificate there must name (`None` for
/// a seed known only by address).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub to: SocketAddr,
    pub expect: Option<NodeId>,
    pub bytes: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("peer {peer} sent a packet claiming to be {claimed}")]
    IdentityMismatch { peer: NodeId, claimed: NodeId },
    #[error("SWIM packet refused: {0}")]
    Swim(String),
}

const OUTBOX_LEN_MAX: usize = 4096;
const EVENTS_LEN_MAX: usize = 4096;

pub struct Membership {
    foca: Foca<Identity, PostcardCodec, SmallRng, NoCustomBroadcast>,
    runtime: AccumulatingRuntime<Identity>,
    profile: Profile,
    timers: BTreeMap<(u64, u64), Timer<Identity>>,
    timer_seq: u64,
    outbox: VecDeque<Transmit>,
    events: VecDeque<MemberEvent>,
    seeds: Vec<SocketAddr>,
    active: bool,
    next_announce_ms: u64,
    announce_turn: usize,
    /// Last state reported per node, to turn foca's state into events.
    known: HashMap<NodeId, (Identity, MemberState)>,
    leaving: HashSet<NodeId>,
    /// Members under suspicion: since when (local ms), at which incarnation.
    suspected: HashMap<NodeId, (u64, foca::Incarnation)>,
}

impl Membership {
    pub fn new(identity: Identity, seeds: Vec<SocketAddr>, profile: Profile, seed: u64, now_ms: u64) -> Membership {
        let seeds = seeds.into_iter().filter(|s| *s != identity.mesh_addr).collect();
        let foca = Foca::new(identity, profile.foca_config(), SmallRng::seed_from_u64(seed), PostcardCodec);
        let mut membership = Membership {
            foca,
            runtime: AccumulatingRuntime::new(),
            profile,
            timers: BTreeMap::new(),
            timer_seq: 0,
            outbox: VecDeque::new(),
            events: VecDeque::new(),
            seeds,
            active: false,
            next_announce_ms: now_ms,
            announce_turn: 0,
            known: HashMap::new(),
            leaving: HashSet::new(),
            suspected: HashMap::new(),
        };
        membership.tick(now_ms);
        membership
    }

    pub fn identity(&self) -> &Identity {
        self.foca.identity()
    }

    /// Whether at least one other member knows us.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// A packet from `peer`, whose certificate the transport checked.
    pub fn handle_packet(&mut self, now_ms: u64, peer: &NodeId, packet: &[u8]) -> Result<(), PacketError> {
        let (kind, payload) = wire::unframe(packet)?;
        match kind {
            Kind::Swim => {
                let header: foca::Header<Identity> =
                    PostcardCodec.decode_header(payload).map_err(|e| PacketError::Swim(e.to_string()))?;
                if header.src.id != *peer {
                    return Err(PacketError::IdentityMismatch { peer: peer.clone(), claimed: header.src.id });
                }
                let result = self.foca.handle_data(payload, &mut self.runtime);
                self.collect(now_ms);
                result.map_err(|e| PacketError::Swim(e.to_string()))
            }
            Kind::Leave => {
                self.leaving.insert(peer.clone());
                Ok(())
            }
        }
    }

    /// Delivers due timers and runs the announce retry and the watchdog.
    pub fn tick(&mut self, now_ms: u64) {
        while let Some(entry) = self.timers.first_entry() {
            if entry.key().0 > now_ms {
                break;
            }
            let timer = entry.remove();
            let result = self.foca.handle_timer(timer, &mut self.runtime);
            if let Err(error) = result {
                tracing::debug!(%error, "foca timer");
            }
            self.collect(now_ms);
        }
        self.expire_suspicions(now_ms);
        if now_ms >= self.next_announce_ms {
            self.next_announce_ms = now_ms + self.profile.announce_interval_ms;
            self.announce(now_ms);
        }
    }

    fn announce(&mut self, now_ms: u64) {
        let mut targets: Vec<Identity> =
            if self.active { self.missing() } else { self.seeds.iter().map(|s| Identity::seed(*s)).collect() };
        if targets.is_empty() && !self.active {
            return; // The first node of a mesh: nobody to announce to.
        }
        #[cfg(feature = "planted-bugs")]
        if self.active && self.profile.bug_forget_reannounce {
            return;
        }
        if self.active {
            // The watchdog: one target per interval, in turn. With nothing missing, every
            // fifth interval it announces to a seed anyway: a node whose members all look
            // alive to it (old incarnations answering for themselves) while the others have
            // forgotten it would otherwise never be noticed again (simulator seed 199).
            if targets.is_empty() && self.announce_turn % 5 == 4 && !self.seeds.is_empty() {
                let seed = self.seeds[(self.announce_turn / 5) % self.seeds.len()];
                targets.push(Identity::seed(seed));
            }
            if targets.is_empty() {
                self.announce_turn = self.announce_turn.wrapping_add(1);
                return;
            }
            let target = targets.swap_remove(self.announce_turn % targets.len());
            self.announce_turn = self.announce_turn.wrapping_add(1);
            targets = vec![target];
        }
        for target in targets {
            if let Err(error) = self.foca.announce(target, &mut self.runtime) {
                tracing::debug!(%error, "announce");
            }
        }
        self.collect(now_ms);
    }

    /// Declares down the members whose suspicion outlived its timer (see the module doc).
    fn expire_suspicions(&mut self, now_ms: u64) {
        let grace = self.profile.suspect_to_down_ms + self.profile.probe_period_ms;
        let expired: Vec<foca::Member<Identity>> = self
            .foca
            .iter_membership_state()
            .filter(|m| m.state() == State::Suspect)
            .filter(|m| {
                self.suspected.get(&m.id().id).is_some_and(|(since, incarnation)| {
                    *incarnation == m.incarnation() && now_ms.saturating_sub(*since) > grace
                })
            })
            .map(|m| foca::Member::new(m.id().clone(), m.incarnation(), State::Down))
            .collect();
        if expired.is_empty() {
            return;
        }
        tracing::debug!(count = expired.len(), "suspicions outlived their timers; declaring down");
        if let Err(error) = self.foca.apply_many(expired.into_iter(), true, &mut self.runtime) {
            tracing::debug!(%error, "expire suspicions");
        }
        self.collect(now_ms);
    }

    /// Seeds that are not alive members, and members known as down.
    fn missing(&self) -> Vec<Identity> {
        let alive: HashSet<SocketAddr> =
            self.foca.iter_membership_state().filter(|m| m.state() != State::Down).map(|m| m.id().mesh_addr).collect();
        let mut missing: Vec<Identity> =
            self.seeds.iter().filter(|s| !alive.contains(s)).map(|s| Identity::seed(*s)).collect();
        missing.extend(self.foca.iter_membership_state().filter(|m| m.state() == State::Down).map(|m| m.id().clone()));
        missing
    }

    /// Changes this node's placement weight, live: the identity is renewed with the new
    /// weight (a higher `bump`, so it replaces the old one everywhere, as a restart would)
    /// and gossiped at once.
    pub fn set_weight(&mut self, now_ms: u64, weight_milli: u16) {
        let old = self.identity().clone();
        if old.weight_milli == weight_milli {
            return;
        }
        let renewed = Identity { weight_milli, bump: old.bump + 1, ..old };
        if let Err(error) = self.foca.change_identity(renewed, &mut self.runtime) {
            tracing::warn!(%error, "changing the weight");
        }
        self.collect(now_ms);
    }

    /// Leaves the mesh on purpose: tells the members, then stops answering.
    pub fn leave(&mut self, now_ms: u64) {
        let notice = wire::frame(Kind::Leave, self.identity().id.as_str().as_bytes());
        let members: Vec<Identity> = self.foca.iter_members().map(|m| m.id().clone()).collect();
        for member in members {
            self.push_transmit(Transmit { to: member.mesh_addr, expect: Some(member.id), bytes: notice.clone() });
        }
        if let Err(error) = self.foca.leave_cluster(&mut self.runtime) {
            tracing::debug!(%error, "leave");
        }
        self.collect(now_ms);
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.outbox.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<MemberEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<u64> {
        let timer = self.timers.first_key_value().map(|((deadline, _), _)| *deadline);
        Some(timer.map_or(self.next_announce_ms, |t| t.min(self.next_announce_ms)))
    }

    /// Every node this one knows of, itself included, with its state.
    pub fn members(&self) -> Vec<(Identity, MemberState)> {
        let mut members = vec![(self.identity().clone(), MemberState::Alive)];
        members.extend(self.foca.iter_membership_state().map(|m| (m.id().clone(), state(m.state()))));
        members.sort_by(|a, b| a.0.id.cmp(&b.0.id));
        members
    }

    fn push_transmit(&mut self, transmit: Transmit) {
        if self.outbox.len() == OUTBOX_LEN_MAX {
            self.outbox.pop_front();
        }
        self.outbox.push_back(transmit);
    }

    /// Moves what foca produced into our queues and turns state changes into events.
    fn collect(&mut self, now_ms: u64) {
        while let Some((to, bytes)) = self.runtime.to_send() {
            // Bump 0 marks a seed known only by its address.
            let expect = (to.bump != 0).then(|| to.id.clone());
            self.push_transmit(Transmit { to: to.mesh_addr, expect, bytes: wire::frame(Kind::Swim, &bytes) });
        }
        while let Some((after, timer)) = self.runtime.to_schedule() {
            self.timer_seq += 1;
            self.timers.insert((now_ms + after.as_millis() as u64, self.timer_seq), timer);
        }
        while let Some(notification) = self.runtime.to_notify() {
            match notification {
                OwnedNotification::Active | OwnedNotification::Rejoin(_) => self.active = true,
                OwnedNotification::Idle | OwnedNotification::Defunct => self.active = false,
                _ => {}
            }
        }
        self.diff_states(now_ms);
    }

    fn diff_states(&mut self, now_ms: u64) {
        let current: Vec<(Identity, MemberState, foca::Incarnation)> =
            self.foca.iter_membership_state().map(|m| (m.id().clone(), state(m.state()), m.incarnation())).collect();
        for (identity, state, incarnation) in current {
            if state == MemberState::Suspect {
                let since = self.suspected.entry(identity.id.clone()).or_insert((now_ms, incarnation));
                if since.1 != incarnation {
                    *since = (now_ms, incarnation);
                }
            } else {
                self.suspected.remove(&identity.id);
            }
            let changed = match self.known.get(&identity.id) {
                Some((known, known_state)) => known.bump != identity.bump || *known_state != state,
                None => state != MemberState::Down,
            };
            if !changed {
                continue;
            }
            let event = match state {
                MemberState::Alive => Some(MemberEvent::Up(identity.clone())),
                MemberState::Suspect => Some(MemberEvent::Suspect(identity.clone())),
                MemberState::Down if self.leaving.remove(&identity.id) => Some(MemberEvent::Left(identity.clone())),
                MemberState::Down => Some(MemberEvent::Down(identity.clone())),
            };
            self.known.insert(identity.id.clone(), (identity, state));
            if let Some(event) = event {
                if self.events.len() == EVENTS_LEN_MAX {
                    self.events.pop_front();
                }
                self.events.push_back(event);
            }
        }
    }
}

fn state(state: State) -> MemberState {
    match state {
        State::Alive => MemberState::Alive,
        State::Suspect => MemberState::Suspect,
        State::Down => MemberState::Down,
    }
}
