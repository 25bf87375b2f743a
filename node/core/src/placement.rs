//! Partitions and placement: which partition a stream falls in, and which members hold it.
//!
//! A stream's partition comes from its *partition key*: a user's own streams (`inbox:{u}`,
//! `feed:{u}`) share the key `u`, so one primary serves everything a user's `sync` reads;
//! every other stream is keyed by its whole name. Replicas are ranked by weighted rendezvous
//! hashing (highest random weight with the logarithmic method: score = weight / -ln(hash)),
//! so adding or removing a member moves only the partitions it wins or held, and a member's
//! share grows in proportion to its weight (0 = never placed: a ghost).
//!
//! The hashes are spelled out here (FNV-1a, then a SplitMix64 finaliser), never taken from
//! `std`, so every build of every node agrees on them.

/// A partition number, `0..partitions`.
pub type Partition = u32;

/// The default partition count, fixed when a cluster is created.
pub const PARTITIONS_DEFAULT: u32 = 1024;

fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325 ^ seed;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x100_0000_01b3);
    }
    hash
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The part of a stream name that picks its partition.
pub fn partition_key(stream: &str) -> &str {
    for prefix in ["inbox:", "feed:"] {
        if let Some(user) = stream.strip_prefix(prefix) {
            return user;
        }
    }
    stream
}

/// The partition of a stream (through its key).
pub fn partition_of(stream: &str, partitions: u32) -> Partition {
    assert!(partitions > 0);
    (mix(fnv1a(0, partition_key(stream).as_bytes())) % u64::from(partitions)) as Partition
}

/// The rendezvous score of `node` for `partition`; higher wins. `weight_milli` is the
/// member's weight in thousandths (1000 = a full member, 0 = never chosen).
pub fn score(partition: Partition, node: &str, weight_milli: u32) -> f64 {
    if weight_milli == 0 {
        return 0.0;
    }
    let hash = mix(fnv1a(u64::from(partition).wrapping_mul(0x9e37_79b9_7f4a_7c15), node.as_bytes()));
    // A uniform value in (0, 1), never 0 or 1, so the logarithm is finite and negative.
    let unit = ((hash >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    f64::from(weight_milli) / 1000.0 / -unit.ln()
}

/// `members` (node id, weight) ranked for `partition`, best first; ties (equal scores) go to
/// the smaller node id so every node ranks alike. Members of weight 0 are left out.
pub fn rank<'a>(partition: Partition, members: impl IntoIterator<Item = (&'a str, u32)>) -> Vec<&'a str> {
    let mut scored: Vec<(f64, &str)> =
        members.into_iter().filter(|(_, w)| *w > 0).map(|(node, w)| (score(partition, node, w), node)).collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    scored.dedup_by(|a, b| a.1 == b.1);
    scored.into_iter().map(|(_, node)| node).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_streams_share_a_partition() {
        assert_eq!(partition_of("inbox:alice", 1024), partition_of("feed:alice", 1024));
        assert_eq!(partition_key("chat:alice:bob"), "chat:alice:bob");
        assert!(partition_of("chat:alice:bob", 1024) < 1024);
    }

    #[test]
    fn partitions_spread_evenly() {
        let mut counts = vec![0u32; 16];
        for i in 0..16_000 {
            counts[partition_of(&format!("chat:u{i}:v{i}"), 16) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
    }

    fn owners(nodes: &[(&str, u32)], partitions: u32) -> Vec<String> {
        (0..partitions).map(|p| rank(p, nodes.iter().copied())[0].to_string()).collect()
    }

    #[test]
    fn a_new_member_takes_only_what_it_wins() {
        let before = owners(&[("a", 1000), ("b", 1000), ("c", 1000), ("d", 1000), ("e", 1000)], 1024);
        let after = owners(&[("a", 1000), ("b", 1000), ("c", 1000), ("d", 1000), ("e", 1000), ("f", 1000)], 1024);
        let moved: Vec<usize> = (0..1024).filter(|p| before[*p] != after[*p]).collect();
        assert!(moved.iter().all(|p| after[*p] == "f"), "only the newcomer gains partitions");
        assert!((120..220).contains(&moved.len()), "about a sixth moves: {}", moved.len());
    }

    #[test]
    fn weight_scales_the_share_and_zero_is_never_placed() {
        let nodes = [("a", 1000), ("b", 1000), ("half", 500), ("ghost", 0)];
        let owned = owners(&nodes, 4096);
        let count = |n: &str| owned.iter().filter(|o| *o == n).count();
        assert_eq!(count("ghost"), 0);
        // Shares are proportional to weight: 2/5, 2/5, 1/5 of 4096.
        assert!((700..950).contains(&count("half")), "{}", count("half"));
        assert!(!rank(7, nodes.iter().copied()).contains(&"ghost"));
    }

    #[test]
    fn ranking_is_total_and_stable() {
        let a = rank(42, [("x", 1000), ("y", 1000), ("z", 1000)]);
        let b = rank(42, [("z", 1000), ("x", 1000), ("y", 1000)]);
        assert_eq!(a, b);
        assert_eq!(a.len(), 3);
    }

    /// SplitMix64: a seeded generator for the property tests below (no dependency, and the
    /// same cases on every machine).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            mix(self.0)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// 2-8 distinct members with weights in 0..=1000 (about one in six a ghost, weight 0).
    fn random_members(rng: &mut Rng) -> Vec<(String, u32)> {
        let count = 2 + rng.below(7) as usize;
        let mut members: Vec<(String, u32)> = Vec::new();
        while members.len() < count {
            let node = format!("node-{}", rng.below(1000));
            let weight = if rng.below(6) == 0 { 0 } else { 1 + rng.below(1000) as u32 };
            if !members.iter().any(|(n, _)| *n == node) {
                members.push((node, weight));
            }
        }
        members
    }

    fn ranked(partition: Partition, members: &[(String, u32)]) -> Vec<String> {
        rank(partition, members.iter().map(|(n, w)| (n.as_str(), *w))).into_iter().map(String::from).collect()
    }

    #[test]
    fn property_ranking_is_deterministic_complete_and_order_free() {
        let mut rng = Rng(1);
        for _ in 0..500 {
            let members = random_members(&mut rng);
            let partition = rng.below(1 << 20) as Partition;
            let ranking = ranked(partition, &members);
            let mut shuffled = members.clone();
            for i in (1..shuffled.len()).rev() {
                shuffled.swap(i, rng.below(i as u64 + 1) as usize);
            }
            assert_eq!(ranked(partition, &shuffled), ranking, "the members' order does not matter");
            assert_eq!(ranked(partition, &members), ranking, "the same input ranks the same");
            let mut placed: Vec<&String> = members.iter().filter(|(_, w)| *w > 0).map(|(n, _)| n).collect();
            let mut got: Vec<&String> = ranking.iter().collect();
            placed.sort();
            got.sort();
            assert_eq!(got, placed, "every member of weight > 0 exactly once, no ghost: {members:?}");
        }
    }

    #[test]
    fn property_a_members_change_leaves_the_others_order_alone() {
        // Scores are per (partition, member), so removing, adding or reweighting one member
        // keeps the others' relative order: only what that member held or wins moves.
        let mut rng = Rng(2);
        for _ in 0..300 {
            let members = random_members(&mut rng);
            let changed = rng.below(members.len() as u64) as usize;
            let name = members[changed].0.clone();
            let without: Vec<(String, u32)> = members.iter().filter(|(n, _)| *n != name).cloned().collect();
            let mut reweighted = members.clone();
            reweighted[changed].1 = rng.below(1001) as u32;
            for partition in 0..64 {
                let others =
                    |ranking: Vec<String>| -> Vec<String> { ranking.into_iter().filter(|n| *n != name).collect() };
                let before = ranked(partition, &members);
                assert_eq!(others(before.clone()), ranked(partition, &without), "removing {name}");
                assert_eq!(others(before.clone()), others(ranked(partition, &reweighted)), "reweighting {name}");
                // Removal moves a partition's primary only where the removed member was it.
                if before.first() != Some(&name) {
                    assert_eq!(before.first(), ranked(partition, &without).first());
                }
            }
        }
    }

    #[test]
    fn property_more_weight_never_loses_a_partition() {
        let mut rng = Rng(3);
        for _ in 0..300 {
            let mut members = random_members(&mut rng);
            let i = rng.below(members.len() as u64) as usize;
            let name = members[i].0.clone();
            let partitions: Vec<Partition> = (0..64).map(|_| rng.below(1 << 20) as Partition).collect();
            let primary_of = |members: &[(String, u32)]| -> Vec<bool> {
                partitions.iter().map(|p| ranked(*p, members).first() == Some(&name)).collect()
            };
            let before = primary_of(&members);
            members[i].1 = (members[i].1 + 1 + rng.below(1000) as u32).min(1000);
            let after = primary_of(&members);
            assert!(before.iter().zip(&after).all(|(b, a)| !b || *a), "{name} lost a partition by gaining weight");
        }
    }

    #[test]
    fn property_shares_follow_weights() {
        let mut rng = Rng(4);
        const PARTITIONS: u32 = 8192;
        for _ in 0..20 {
            // Weights 100..=1000: no ghosts here, and shares large enough to measure.
            let members: Vec<(String, u32)> =
                random_members(&mut rng).into_iter().map(|(n, w)| (n, 100 + w % 901)).collect();
            let total: f64 = members.iter().map(|(_, w)| f64::from(*w)).sum();
            let owned = (0..PARTITIONS).map(|p| ranked(p, &members)[0].clone()).collect::<Vec<_>>();
            for (node, weight) in &members {
                let share = f64::from(*weight) / total;
                let expected = share * f64::from(PARTITIONS);
                let got = owned.iter().filter(|o| *o == node).count() as f64;
                // Five standard deviations of a binomial count.
                let slack = 5.0 * (expected * (1.0 - share)).sqrt() + 5.0;
                assert!(
                    (got - expected).abs() <= slack,
                    "{node} (weight {weight}): {got} partitions, expected {expected:.0}"
                );
            }
        }
    }

    #[test]
    fn property_partition_of_is_stable() {
        // Pinned: every build of every node must agree, so a change here is a format change.
        let check = |stream: &str, partitions: u32, expected: Partition| {
            assert_eq!(partition_of(stream, partitions), expected, "{stream} of {partitions}");
        };
        check("chat:alice:bob", 1024, 434);
        check("inbox:alice", 1024, 604);
        check("feed:alice", 1024, 604);
        check("sys:flags", 1024, 536);
        check("orders:42", 16, 13);
        let ranking = |p| rank(p, [("n1", 1000), ("n2", 1000), ("n3", 500), ("n4", 1000), ("n5", 1000)]);
        assert_eq!(ranking(0), ["n1", "n2", "n4", "n5", "n3"]);
        assert_eq!(ranking(7), ["n3", "n5", "n4", "n2", "n1"]);
        assert_eq!(ranking(1023), ["n5", "n2", "n1", "n4", "n3"]);

        let mut rng = Rng(5);
        for _ in 0..2000 {
            let user = format!("u{}", rng.next());
            let partitions = 1 + rng.below(4096) as u32;
            let p = partition_of(&format!("inbox:{user}"), partitions);
            assert!(p < partitions);
            assert_eq!(p, partition_of(&format!("inbox:{user}"), partitions));
            assert_eq!(p, partition_of(&format!("feed:{user}"), partitions), "a user's streams share one");
            assert_eq!(p, partition_of(&user, partitions), "keyed by the user");
        }
    }
}
