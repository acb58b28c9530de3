//! Routing decisions for a queue's jobs, as pure code: which worker of the consuming program
//! gets the next job (SPEC §4, "Routing").
//!
//! - [`Ring`]: `route = "key"`. A consistent hash ring with [`VNODES`] virtual nodes per worker
//!   id. A key goes to the first point clockwise from its hash; a key whose worker is down goes
//!   on clockwise to the next point of a live worker, and comes back once its worker is up
//!   again. Adding worker N+1 to N moves about 1/(N+1) of the keys, all of them to the new
//!   worker.
//! - [`least_loaded`]: `route = "least-loaded"` (the default), over the workers' jobs in flight
//!   and their `prefetch`.
//! - [`RoundRobin`]: `route = "round-robin"`, a cursor that survives workers coming and going.
//!
//! Nothing here reads a clock, touches a worker or allocates per decision; the master passes in
//! what it knows (which workers are live, how many jobs each holds) and carries out the choice.
//!
//! The hash ([`hash64`]) is written out here rather than taken from `std`, whose hashers are
//! neither specified nor stable across Rust releases: a key must land on the same worker after
//! plumule is rebuilt or upgraded, or keyed state that workers keep would scatter. A test pins
//! its values.

/// Virtual nodes per worker. A worker's share of the ring varies by about 1/√VNODES: with 512,
/// 100 000 keys over 2 to 16 workers stay within a max/min load ratio of 1.2 (256 already
/// reached 1.32 with 5 workers; see the `balance` test for the figures). Each worker costs 512
/// points of 8 bytes, 4 KiB.
pub const VNODES: u32 = 512;

/// 64-bit FNV-1a over `bytes`, then the MurmurHash3 64-bit finaliser.
///
/// FNV-1a alone mixes its last bytes poorly into the high bits, and the ring orders points by
/// the whole value; the finaliser spreads every input bit over the result. Stable by
/// construction: the same bytes give the same value on every build and platform.
pub fn hash64(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(PRIME);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// Where `key` lands on the ring: the high half of its hash. 32 bits are plenty to place a few
/// thousand points, and halve the ring's memory.
fn position(key: &[u8]) -> u32 {
    (hash64(key) >> 32) as u32
}

/// The ring position of virtual node `vnode` of worker `id`. The bytes are spelled out
/// (little-endian) so the position does not depend on the platform.
fn point_hash(id: u32, vnode: u32) -> u32 {
    let mut bytes = [0u8; 12];
    bytes[..4].copy_from_slice(b"pvn\0");
    bytes[4..8].copy_from_slice(&id.to_le_bytes());
    bytes[8..].copy_from_slice(&vnode.to_le_bytes());
    position(&bytes)
}

/// A consistent hash ring over a program's worker ids.
///
/// Invariant: `points` is sorted by `(hash, id)` and holds exactly [`VNODES`] points for each
/// worker in the ring. Two points at the same position (rare, but possible with 32 bits) are
/// ordered by id, so the order never depends on insertion order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ring {
    points: Vec<(u32, u32)>,
}

impl Ring {
    /// A ring over these worker ids; repeated ids count once.
    pub fn new(workers: impl IntoIterator<Item = u32>) -> Self {
        let mut ids: Vec<u32> = workers.into_iter().collect();
        ids.sort_unstable();
        ids.dedup();
        let mut points = Vec::with_capacity(ids.len() * VNODES as usize);
        for id in ids {
            points.extend((0..VNODES).map(|v| (point_hash(id, v), id)));
        }
        points.sort_unstable();
        Ring { points }
    }

    /// Whether worker `id` is in the ring (live or not).
    pub fn contains(&self, id: u32) -> bool {
        // Every worker has a point at its vnode 0's hash: one binary search, not a scan.
        self.points.binary_search(&(point_hash(id, 0), id)).is_ok()
    }

    /// Puts worker `id` in the ring (scaling up); nothing happens if it is there already. Only
    /// keys that now land on `id` move.
    pub fn add(&mut self, id: u32) {
        if self.contains(id) {
            return;
        }
        self.points
            .extend((0..VNODES).map(|v| (point_hash(id, v), id)));
        self.points.sort_unstable();
    }

    /// Takes worker `id` out of the ring (scaling down); its keys move to the workers that
    /// follow its points. A worker that is merely down should stay in the ring and be reported
    /// by `live` in [`Ring::route`] instead, so that its keys come back when it does.
    pub fn remove(&mut self, id: u32) {
        self.points.retain(|&(_, w)| w != id);
    }

    /// How many workers the ring holds.
    pub fn len(&self) -> usize {
        self.points.len() / VNODES as usize
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// The worker for `key`: the owner of the first point at or after the key's hash, going
    /// round the ring, whose worker `live` says is up. `None` when the ring is empty or no
    /// worker in it is live.
    ///
    /// Cost: one binary search, then a walk past the points of down workers (all points, once,
    /// when every worker is down). `live` is asked at most once per run of points of one worker.
    pub fn route(&self, key: &[u8], live: impl Fn(u32) -> bool) -> Option<u32> {
        let n = self.points.len();
        if n == 0 {
            return None;
        }
        let h = position(key);
        let start = self.points.partition_point(|&(p, _)| p < h);
        let mut last_dead = None;
        for i in 0..n {
            let id = self.points[(start + i) % n].1;
            if last_dead == Some(id) {
                continue;
            }
            if live(id) {
                return Some(id);
            }
            last_dead = Some(id);
        }
        None
    }
}

/// What [`least_loaded`] knows about one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerLoad {
    pub id: u32,
    /// Jobs sent to the worker and not answered yet.
    pub in_flight: usize,
    /// The most jobs it may hold at once (the queue's `prefetch`).
    pub prefetch: usize,
}

/// The worker that should get the next job under `least-loaded`: among the workers with room
/// (`in_flight < prefetch`), the one with the fewest jobs in flight; on a tie, the one with the
/// most room left, then the first in `loads`. `None` when every worker is full (the job stays
/// pending).
///
/// Ties go to the first in `loads`, so a caller that wants idle workers to take turns can start
/// the slice where it left off (or use [`RoundRobin`] among the tied ones).
pub fn least_loaded(loads: &[WorkerLoad]) -> Option<u32> {
    let mut best: Option<&WorkerLoad> = None;
    for w in loads.iter().filter(|w| w.in_flight < w.prefetch) {
        let better = match best {
            None => true,
            Some(b) => {
                w.in_flight < b.in_flight
                    || (w.in_flight == b.in_flight
                        && w.prefetch - w.in_flight > b.prefetch - b.in_flight)
            }
        };
        if better {
            best = Some(w);
        }
    }
    best.map(|w| w.id)
}

/// A round-robin cursor over worker ids.
///
/// It remembers the last id chosen rather than a position in a list, so workers that come,
/// go or are full for a while neither make it skip a worker nor serve one twice in a row while
/// others are eligible: the next choice is the smallest eligible id above the last one, wrapping
/// round to the smallest eligible id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoundRobin {
    last: Option<u32>,
}

impl RoundRobin {
    pub fn new() -> Self {
        RoundRobin::default()
    }

    /// The next worker among `ids` (in any order) for which `eligible` holds (live, with room),
    /// and moves the cursor to it. `None`, cursor unmoved, when no worker is eligible.
    pub fn next(&mut self, ids: &[u32], eligible: impl Fn(u32) -> bool) -> Option<u32> {
        let mut after: Option<u32> = None; // smallest eligible id above `last`
        let mut lowest: Option<u32> = None; // smallest eligible id
        for &id in ids {
            if !eligible(id) {
                continue;
            }
            lowest = Some(lowest.map_or(id, |l| l.min(id)));
            if self.last.is_none_or(|last| id > last) {
                after = Some(after.map_or(id, |a| a.min(id)));
            }
        }
        let chosen = after.or(lowest)?;
        self.last = Some(chosen);
        Some(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const KEYS: u32 = 100_000;

    fn key(i: u32) -> Vec<u8> {
        format!("customer-{i}").into_bytes()
    }

    fn assign(ring: &Ring, live: impl Fn(u32) -> bool + Copy) -> Vec<Option<u32>> {
        (0..KEYS).map(|i| ring.route(&key(i), live)).collect()
    }

    #[test]
    fn hash_values_are_pinned() {
        // Changing these moves every key of every keyed queue after an upgrade. The values were
        // computed by a separate implementation (a few lines of Python) of the same definition.
        assert_eq!(hash64(b""), 0xefd0_1f60_ba99_2926);
        assert_eq!(hash64(b"a"), hash64(b"a"));
        let pinned: Vec<u64> = [&b"job"[..], b"customer-42", b"\xff\x00"]
            .iter()
            .map(|k| hash64(k))
            .collect();
        assert_eq!(
            pinned,
            [
                0x562c_153e_174e_b750,
                0xe5c7_993d_f9de_03b9,
                0x6697_e696_89e5_177a
            ]
        );
        // And the routing that follows from them.
        let ring = Ring::new(0..4);
        let routes: Vec<u32> = (0..8)
            .map(|i| ring.route(&key(i), |_| true).unwrap())
            .collect();
        assert_eq!(routes, [2, 0, 0, 2, 3, 0, 3, 1]);
    }

    #[test]
    fn balance_over_2_to_16_workers() {
        for n in 2..=16u32 {
            let ring = Ring::new(0..n);
            let mut counts = vec![0u32; n as usize];
            for w in assign(&ring, |_| true) {
                counts[w.unwrap() as usize] += 1;
            }
            let max = *counts.iter().max().unwrap();
            let min = *counts.iter().min().unwrap();
            let ratio = f64::from(max) / f64::from(min);
            println!("balance: {n:2} workers, {KEYS} keys: max {max}, min {min}, ratio {ratio:.3}");
            assert!(
                ratio <= 1.2,
                "{n} workers: max/min = {ratio:.3} ({counts:?})"
            );
        }
    }

    #[test]
    fn growing_by_one_moves_about_one_in_n_plus_one_keys_all_to_the_new_worker() {
        for n in 1..=16u32 {
            let before = Ring::new(0..n);
            let mut after = before.clone();
            after.add(n);
            assert_eq!(after, Ring::new(0..=n), "add is the same as building anew");
            let (a, b) = (assign(&before, |_| true), assign(&after, |_| true));
            let mut moved = 0;
            for (x, y) in a.iter().zip(&b) {
                if x != y {
                    moved += 1;
                    assert_eq!(*y, Some(n), "a key moved between two old workers");
                }
            }
            let share = f64::from(moved) / f64::from(KEYS);
            let ideal = 1.0 / f64::from(n + 1);
            println!(
                "movement: {n:2} -> {:2}: {share:.4} of keys moved, ideal {ideal:.4}",
                n + 1
            );
            assert!(
                (share - ideal).abs() <= 0.15 * ideal,
                "{n} -> {}: moved {share:.4}, ideal {ideal:.4}",
                n + 1
            );
            // Shrinking back restores every key.
            let mut back = after.clone();
            back.remove(n);
            assert_eq!(assign(&back, |_| true), a);
        }
    }

    #[test]
    fn a_down_workers_keys_go_to_the_next_live_one_and_come_back() {
        let ring = Ring::new(0..5);
        let all = assign(&ring, |_| true);
        let down = 2;
        let without = assign(&ring, |id| id != down);
        let mut went_to: HashMap<u32, u32> = HashMap::new();
        for (i, (x, y)) in all.iter().zip(&without).enumerate() {
            let (x, y) = (x.unwrap(), y.unwrap());
            if x == down {
                assert_ne!(y, down);
                // The next live point clockwise is where a ring without the worker sends it.
                let mut removed = ring.clone();
                removed.remove(down);
                assert_eq!(Some(y), removed.route(&key(i as u32), |_| true));
                *went_to.entry(y).or_default() += 1;
            } else {
                assert_eq!(x, y, "a key of a live worker moved");
            }
        }
        // Its keys spread over the others rather than piling onto one neighbour.
        assert_eq!(went_to.len(), 4, "{went_to:?}");
        println!("keys of down worker {down} went to {went_to:?}");
        // Once it is back, every key is where it was.
        assert_eq!(assign(&ring, |_| true), all);
        // Down workers are skipped even when several points in a row are theirs.
        assert_eq!(ring.route(b"k", |id| id == 4), Some(4));
        assert_eq!(ring.route(b"k", |_| false), None);
        assert_eq!(Ring::new([]).route(b"k", |_| true), None);
    }

    #[test]
    fn stable_across_calls_and_rings_built_alike() {
        let ring = Ring::new([3, 1, 7, 1, 5]);
        assert_eq!(ring.len(), 4);
        let other = Ring::new([5, 7, 1, 3]);
        assert_eq!(ring, other, "the order of ids does not matter");
        for i in 0..1000 {
            let k = key(i);
            let first = ring.route(&k, |_| true);
            assert_eq!(first, ring.route(&k, |_| true));
            assert_eq!(first, other.route(&k, |_| true));
        }
    }

    #[test]
    fn add_and_remove_keep_the_membership() {
        let mut ring = Ring::new(0..3);
        ring.add(1);
        assert_eq!(ring.len(), 3);
        ring.add(9);
        assert!(ring.contains(9) && ring.len() == 4);
        ring.remove(9);
        ring.remove(42);
        assert!(!ring.contains(9));
        assert_eq!(ring, Ring::new(0..3));
        ring.remove(0);
        ring.remove(1);
        ring.remove(2);
        assert!(ring.is_empty());
    }

    fn load(id: u32, in_flight: usize, prefetch: usize) -> WorkerLoad {
        WorkerLoad {
            id,
            in_flight,
            prefetch,
        }
    }

    #[test]
    fn least_loaded_picks_the_fewest_in_flight_with_room() {
        let table: &[(&[WorkerLoad], Option<u32>)] = &[
            (&[], None),
            (&[load(0, 1, 1), load(1, 1, 1)], None),
            (&[load(0, 1, 1), load(1, 0, 1)], Some(1)),
            (&[load(0, 2, 4), load(1, 1, 4), load(2, 3, 4)], Some(1)),
            // Tie on in flight: the most room left wins, then the first.
            (&[load(0, 1, 2), load(1, 1, 4)], Some(1)),
            (&[load(5, 0, 1), load(3, 0, 1)], Some(5)),
            // Full workers are never chosen, even with fewer jobs than others.
            (&[load(0, 0, 0), load(1, 3, 4)], Some(1)),
        ];
        for (loads, want) in table {
            assert_eq!(least_loaded(loads), *want, "{loads:?}");
        }
    }

    #[test]
    fn round_robin_takes_turns_and_survives_changes() {
        let mut rr = RoundRobin::new();
        let ids = [2, 0, 1];
        let picks: Vec<_> = (0..6).map(|_| rr.next(&ids, |_| true).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        // Worker 1 is full: skipped, without serving 0 twice in a row.
        assert_eq!(rr.next(&ids, |id| id != 1), Some(0));
        assert_eq!(rr.next(&ids, |id| id != 1), Some(2));
        // Worker 3 appears; the turn goes on from where it was.
        assert_eq!(rr.next(&[0, 1, 2, 3], |_| true), Some(3));
        assert_eq!(rr.next(&[0, 1, 2, 3], |_| true), Some(0));
        // Nobody eligible: no choice, and the cursor stays.
        assert_eq!(rr.next(&ids, |_| false), None);
        assert_eq!(rr.next(&ids, |_| true), Some(1));
        // The last chosen worker went away: the next one above it still gets its turn.
        assert_eq!(rr.next(&[0, 2], |_| true), Some(2));
        assert_eq!(rr.next(&[], |_| true), None);
    }
}
