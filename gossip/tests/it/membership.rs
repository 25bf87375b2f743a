//! The membership machine driven with a fake clock: packets are delivered after 1 ms, time
//! moves in 10 ms steps, and a "killed" node simply stops receiving and sending.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;

use gossip::{Identity, MemberEvent, MemberState, Membership, NodeId, Profile};

const START_MS: u64 = 1_763_776_800_000;

struct World {
    now_ms: u64,
    nodes: Vec<Option<Membership>>,
    /// (deliver at, to, from, bytes).
    wire: VecDeque<(u64, SocketAddr, NodeId, Vec<u8>)>,
    events: Vec<(u64, usize, MemberEvent)>,
    /// Pairs of node indexes that cannot reach each other.
    cut: HashSet<(usize, usize)>,
    /// Drop every n-th packet (0: none); deterministic loss.
    loss_every: u64,
    sent: u64,
}

fn addr(i: usize) -> SocketAddr {
    format!("127.0.0.1:{}", 9000 + i).parse().unwrap()
}

fn identity(i: usize, bump: u64) -> Identity {
    Identity {
        id: NodeId::new(format!("n{i}")).unwrap(),
        mesh_addr: addr(i),
        http_addr: addr(100 + i),
        weight_milli: 1000,
        bump,
    }
}

impl World {
    fn new(count: usize) -> World {
        let mut world = World {
            now_ms: START_MS,
            nodes: Vec::new(),
            wire: VecDeque::new(),
            events: Vec::new(),
            cut: HashSet::new(),
            loss_every: 0,
            sent: 0,
        };
        for i in 0..count {
            world.nodes.push(None);
            world.start(i);
        }
        world
    }

    /// Starts (or restarts) node `i`, joining through node 0.
    fn start(&mut self, i: usize) {
        let seeds = vec![addr(0)];
        self.nodes[i] = Some(Membership::new(
            identity(i, self.now_ms),
            seeds,
            Profile::default(),
            i as u64 + self.now_ms,
            self.now_ms,
        ));
    }

    fn index(addr: SocketAddr) -> usize {
        usize::from(addr.port() - 9000)
    }

    fn step(&mut self) {
        self.now_ms += 10;
        while self.wire.front().is_some_and(|(at, ..)| *at <= self.now_ms) {
            let (_, to, from, bytes) = self.wire.pop_front().unwrap();
            let from_index: usize = from.as_str()[1..].parse().unwrap();
            let to_index = World::index(to);
            if self.cut.contains(&(from_index, to_index)) || self.cut.contains(&(to_index, from_index)) {
                continue;
            }
            self.sent += 1;
            if self.loss_every > 0 && !self.sent.is_multiple_of(self.loss_every) {
                continue; // Keep only one packet in `loss_every`.
            }
            if let Some(node) = self.nodes[to_index].as_mut() {
                let _ = node.handle_packet(self.now_ms, &from, &bytes);
            }
        }
        for i in 0..self.nodes.len() {
            let Some(node) = self.nodes[i].as_mut() else { continue };
            node.tick(self.now_ms);
            let from = node.identity().id.clone();
            while let Some(transmit) = node.poll_transmit() {
                self.wire.push_back((self.now_ms + 1, transmit.to, from.clone(), transmit.bytes));
            }
            while let Some(event) = node.poll_event() {
                self.events.push((self.now_ms, i, event));
            }
        }
    }

    fn run_ms(&mut self, ms: u64) {
        for _ in 0..ms / 10 {
            self.step();
        }
    }

    /// Runs until `done` holds, at most `limit_ms`; returns the time it took.
    fn run_until(&mut self, limit_ms: u64, done: impl Fn(&World) -> bool) -> Option<u64> {
        let start = self.now_ms;
        while self.now_ms - start < limit_ms {
            if done(self) {
                return Some(self.now_ms - start);
            }
            self.step();
        }
        None
    }

    fn state_of(&self, observer: usize, node: usize) -> Option<MemberState> {
        let members = self.nodes[observer].as_ref()?.members();
        members.into_iter().find(|(m, _)| m.mesh_addr == addr(node)).map(|(_, s)| s)
    }

    fn alive_count(&self, observer: usize) -> usize {
        self.nodes[observer]
            .as_ref()
            .map_or(0, |n| n.members().iter().filter(|(_, s)| *s == MemberState::Alive).count())
    }

    fn all_see(&self, count: usize) -> bool {
        (0..self.nodes.len()).filter(|i| self.nodes[*i].is_some()).all(|i| self.alive_count(i) == count)
    }
}

#[test]
fn five_nodes_join_through_one_seed() {
    let mut world = World::new(5);
    let took = world.run_until(5_000, |w| w.all_see(5)).expect("all five see five alive members");
    assert!(took < 3_000, "joining took {took} ms");
    assert!(world.nodes.iter().all(|n| n.as_ref().unwrap().is_active()));
}

#[test]
fn a_dead_node_is_down_everywhere_within_3_seconds_and_rejoins_after_restart() {
    let mut world = World::new(5);
    world.run_until(5_000, |w| w.all_see(5)).unwrap();
    world.run_ms(1_000);
    world.nodes[3] = None; // kill -9
    let took = world
        .run_until(5_000, |w| [0, 1, 2, 4].iter().all(|i| w.state_of(*i, 3) == Some(MemberState::Down)))
        .expect("every survivor declares the dead node down");
    assert!(took <= 3_000, "detection took {took} ms");
    assert!(world.events.iter().any(|(_, _, e)| matches!(e, MemberEvent::Down(m) if m.id.as_str() == "n3")));
    world.start(3);
    let took = world.run_until(5_000, |w| w.all_see(5)).expect("the restarted node rejoins");
    assert!(took < 3_000, "rejoin took {took} ms");
}

#[test]
fn no_false_suspicion_on_a_quiet_healthy_mesh() {
    let mut world = World::new(5);
    world.run_until(5_000, |w| w.all_see(5)).unwrap();
    let joined = world.now_ms;
    world.run_ms(60_000);
    let suspicions = world.events.iter().filter(|(at, _, e)| *at > joined && !matches!(e, MemberEvent::Up(_))).count();
    assert_eq!(suspicions, 0, "{:?}", world.events.iter().filter(|(at, ..)| *at > joined).collect::<Vec<_>>());
}

#[test]
fn a_partition_heals() {
    let mut world = World::new(4);
    world.run_until(5_000, |w| w.all_see(4)).unwrap();
    // Split {0, 1} from {2, 3} long enough for each side to declare the other down.
    for a in [0, 1] {
        for b in [2, 3] {
            world.cut.insert((a, b));
        }
    }
    world.run_until(10_000, |w| w.alive_count(0) == 2 && w.alive_count(2) == 2).expect("each side sees the other down");
    world.cut.clear();
    let took = world.run_until(10_000, |w| w.all_see(4)).expect("the mesh heals after the partition");
    assert!(took < 5_000, "healing took {took} ms");
}

#[test]
fn the_watchdog_heals_a_mesh_after_heavy_loss() {
    // The case that stalls a plain foca cluster for good: 10 nodes, most packets lost for a
    // while, so members declare each other down all over; then the network heals.
    let mut world = World::new(10);
    world.run_until(10_000, |w| w.all_see(10)).unwrap();
    world.loss_every = 2; // Keep one packet in two: 50 % loss.
    world.run_ms(20_000);
    world.loss_every = 0;
    let took = world.run_until(20_000, |w| w.all_see(10)).expect("every node sees all ten alive again");
    assert!(took < 10_000, "healing took {took} ms");
}

#[test]
fn a_graceful_leave_is_reported_as_left() {
    let mut world = World::new(3);
    world.run_until(5_000, |w| w.all_see(3)).unwrap();
    let now = world.now_ms;
    world.nodes[2].as_mut().unwrap().leave(now);
    let from = world.nodes[2].as_ref().unwrap().identity().id.clone();
    while let Some(t) = world.nodes[2].as_mut().unwrap().poll_transmit() {
        world.wire.push_back((now + 1, t.to, from.clone(), t.bytes));
    }
    world.nodes[2] = None;
    world
        .run_until(1_000, |w| (0..2).all(|i| w.state_of(i, 2) == Some(MemberState::Down)))
        .expect("left members are down at once");
    let left =
        world.events.iter().filter(|(_, _, e)| matches!(e, MemberEvent::Left(m) if m.id.as_str() == "n2")).count();
    assert_eq!(left, 2, "both survivors report n2 as left");
}

#[test]
fn a_packet_claiming_another_identity_is_refused() {
    let mut world = World::new(2);
    world.run_until(5_000, |w| w.all_see(2)).unwrap();
    let now = world.now_ms;
    world.nodes[0].as_mut().unwrap().tick(now + 10_000);
    let transmit = world.nodes[0].as_mut().unwrap().poll_transmit().expect("node 0 has something to send");
    let impostor = NodeId::new("impostor").unwrap();
    let refused = world.nodes[1].as_mut().unwrap().handle_packet(now, &impostor, &transmit.bytes);
    assert!(matches!(refused, Err(gossip::membership::PacketError::IdentityMismatch { .. })), "{refused:?}");
}
