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
}
