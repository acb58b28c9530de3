//! Key partitions of a queue with `route = "key"` (SPEC §10), pure: a key maps to one of
//! `partitions` by a fixed hash, and each partition to one live member by rendezvous
//! (highest random weight) hashing: every member scores each partition, the highest score
//! owns it. A member that joins takes from each other member only the partitions it now
//! scores highest on (about 1/N of them in all); one that leaves gives away only its own.
//! Every master computes the same answer from the same membership, without talking.
//!
//! The hash is FNV-1a (64 bits) with a final avalanche (splitmix64's), fixed here so that
//! every version of plumule on every host agrees.

/// FNV-1a over `parts`, each followed by a 0xff separator, then avalanched.
fn hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.iter().chain(std::iter::once(&0xff)) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The partition of `key` among `partitions` (at least 1).
pub fn partition_of(key: &[u8], partitions: u32) -> u32 {
    (hash(&[key]) % u64::from(partitions.max(1))) as u32
}

/// The member that owns `partition` of `queue` among `members` (node names of the live
/// members that declare the queue); `None` when there is none.
pub fn owner<'a>(queue: &str, partition: u32, members: &[&'a str]) -> Option<&'a str> {
    let p = partition.to_le_bytes();
    members
        .iter()
        .max_by_key(|m| (hash(&[queue.as_bytes(), &p, m.as_bytes()]), **m))
        .copied()
}

/// The partitions of `queue` that `node` owns.
pub fn owned_by(queue: &str, partitions: u32, members: &[&str], node: &str) -> Vec<u32> {
    (0..partitions)
        .filter(|&p| owner(queue, p, members) == Some(node))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("host-{i}")).collect()
    }

    fn assignment(members: &[String], partitions: u32) -> Vec<String> {
        let m: Vec<&str> = members.iter().map(String::as_str).collect();
        (0..partitions)
            .map(|p| owner("jobs", p, &m).unwrap().to_string())
            .collect()
    }

    #[test]
    fn keys_spread_over_partitions_and_always_land_in_the_same_one() {
        let partitions = 64;
        let mut counts = vec![0u32; partitions as usize];
        for i in 0..64_000 {
            let key = format!("user-{i}");
            let p = partition_of(key.as_bytes(), partitions);
            assert_eq!(p, partition_of(key.as_bytes(), partitions));
            counts[p as usize] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        eprintln!("64000 keys over 64 partitions: {min}..{max} per partition (ideal 1000)");
        assert!(*min > 850 && *max < 1150, "{min}..{max}");
        assert_eq!(partition_of(b"anything", 1), 0);
    }

    #[test]
    fn partitions_balance_over_members_and_about_one_in_n_moves_when_one_joins() {
        let partitions = 1024;
        for n in [2usize, 3, 5, 8] {
            let before = assignment(&nodes(n), partitions);
            let mut per: std::collections::BTreeMap<&str, u32> = Default::default();
            for o in &before {
                *per.entry(o).or_default() += 1;
            }
            let ideal = partitions as f64 / n as f64;
            let worst = per
                .values()
                .map(|&c| (c as f64 - ideal).abs() / ideal)
                .fold(0.0, f64::max);
            let after = assignment(&nodes(n + 1), partitions);
            let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
            let newcomer = format!("host-{}", n + 1);
            // Everything that moved went to the newcomer: nothing moved between old members.
            assert!(before
                .iter()
                .zip(&after)
                .all(|(a, b)| a == b || *b == newcomer));
            let share = moved as f64 / partitions as f64;
            let expected = 1.0 / (n + 1) as f64;
            eprintln!(
                "{n} members: worst imbalance {:.1}%; one joins: {moved}/{partitions} moved \
                 ({:.1}%, ideal {:.1}%)",
                worst * 100.0,
                share * 100.0,
                expected * 100.0
            );
            assert!(worst < 0.2, "imbalance {worst}");
            assert!(
                (share - expected).abs() < 0.05,
                "moved {share}, ideal {expected}"
            );
            // The one that leaves gives away only its own.
            let left = assignment(&nodes(n + 1)[1..], partitions);
            assert!(after
                .iter()
                .zip(&left)
                .all(|(a, b)| a == b || a == "host-1"));
        }
    }

    #[test]
    fn owners_agree_whatever_the_order_of_the_member_list() {
        let a = ["b", "a", "c"];
        let b = ["c", "b", "a"];
        for p in 0..100 {
            assert_eq!(owner("q", p, &a), owner("q", p, &b));
        }
        assert_eq!(owner("q", 0, &[]), None);
        let mine: usize = ["a", "b", "c"]
            .iter()
            .map(|n| owned_by("q", 100, &a, n).len())
            .sum();
        assert_eq!(mine, 100);
    }
}
