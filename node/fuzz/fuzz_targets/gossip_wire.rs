//! The gossip wire (`gossip::wire::unframe`, then foca's postcard packets with our
//! `Identity` inside) as the membership machine receives it from peers, several packets in
//! a row with time passing (input layout: `griddle_fuzz::packets`). Never a panic; nothing
//! it learns names an invalid node id.
#![no_main]

use gossip::wire::{frame, unframe};
use gossip::{Membership, NodeId, Profile};
use griddle_fuzz::{identity, packets};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut now = 10_000;
    let me = identity("n1", 7001);
    let mut machine = Membership::new(me.clone(), vec![identity("n2", 7002).mesh_addr], Profile::default(), 1, now);
    let (n2, n3) = (NodeId::new("n2").expect("valid"), NodeId::new("n3").expect("valid"));
    for (from_n2, wait_ms, bytes) in packets(data).into_iter().take(16) {
        if let Ok((kind, payload)) = unframe(bytes) {
            assert_eq!(unframe(&frame(kind, payload)), Ok((kind, payload)));
        }
        let _ = machine.handle_packet(now, if from_n2 { &n2 } else { &n3 }, bytes);
        now += wait_ms;
        machine.tick(now);
        while machine.poll_transmit().is_some() {}
        while machine.poll_event().is_some() {}
        let members = machine.members();
        // A node may renew its identity (a higher bump, after being suspected), never
        // become another node.
        let now_me = machine.identity();
        assert!(now_me.id == me.id && now_me.mesh_addr == me.mesh_addr && now_me.bump >= me.bump, "{now_me:?}");
        for (member, _) in &members {
            assert!(NodeId::new(member.id.as_str()).is_some(), "gossip taught an invalid node id: {member:?}");
        }
    }
});
