//! Cluster membership, cluster-wide locks and key partitions through etcd (SPEC §10).
//!
//! - [`etcd`]: a small blocking client of etcd's v3 JSON gateway;
//! - this module: the pure parts, unit-tested without etcd: the member record, the lock
//!   recipe (who holds, whom a waiter watches), the lease arithmetic (when holders must be
//!   dead), the environment name of a lock's fencing token;
//! - [`partition`]: keys to partitions, partitions to members (rendezvous hashing);
//! - [`helper`]: the process the master forks that does all the etcd I/O, keeps the lease
//!   alive, takes locks for workers and kills the holders when the lease may be lost;
//! - [`script`]: `plumule lock --cluster NAME -- CMD`.
//!
//! # Keys
//!
//! - `plumule/members/<node>`: the member record (JSON [`Member`]) under the master's lease;
//! - `plumule/locks/<NAME>/<lease>-<pid>`: one waiter or holder of lock NAME, under the lease
//!   of its master (or of `plumule lock --cluster`). The holder is the key with the lowest
//!   create revision; each other waiter watches only the key just before its own, so a
//!   release wakes one waiter (no herd) and waiters are served in order of arrival.

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod etcd;
pub mod helper;
pub mod partition;
pub mod script;

/// Where member records live.
pub const MEMBERS_PREFIX: &str = "plumule/members/";
/// Where lock keys live.
pub const LOCKS_PREFIX: &str = "plumule/locks/";

/// What a master says of itself in etcd, and what `plumule members` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub node: String,
    pub host: String,
    pub pid: u32,
    /// When the master started, in seconds since the epoch.
    pub since: u64,
    /// The programs it runs.
    pub programs: Vec<String>,
    /// The queues its programs consume (a record without them consumes none).
    #[serde(default)]
    pub queues: Vec<String>,
}

/// The prefix of lock `name`'s keys (with its trailing slash).
pub fn lock_prefix(name: &str) -> String {
    format!("{LOCKS_PREFIX}{name}/")
}

/// The key of one waiter of lock `name`: its lease and the waiting process, so that two
/// workers of one master waiting for the same lock have keys of their own.
pub fn lock_key(name: &str, lease: i64, pid: u32) -> String {
    format!("{}{lease:016x}-{pid}", lock_prefix(name))
}

/// Where a waiter stands among the keys of its lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Turn {
    /// Ours is the oldest key: we hold the lock.
    Holder,
    /// Wait for the deletion of this key (the one just before ours), seen at this revision.
    After { key: String, revision: i64 },
    /// Our key is not there (its lease expired, or it was deleted).
    Gone,
}

/// The recipe: `keys` are the lock's keys as `(key, create_revision)`, in any order.
pub fn turn(keys: &[(String, i64)], ours: &str) -> Turn {
    let Some(mine) = keys.iter().find(|(k, _)| k == ours).map(|(_, r)| *r) else {
        return Turn::Gone;
    };
    match keys
        .iter()
        .filter(|(_, r)| *r < mine)
        .max_by_key(|(_, r)| *r)
    {
        None => Turn::Holder,
        Some((key, revision)) => Turn::After {
            key: key.clone(),
            revision: *revision,
        },
    }
}

/// `PLUMULE_LOCK_REVISION_<NAME>`: the name upper-cased, every other character than A-Z and
/// 0-9 made `_`.
pub fn revision_var(lock: &str) -> String {
    let name: String = lock
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("PLUMULE_LOCK_REVISION_{name}")
}

/// The lease's clock arithmetic. Times are on CLOCK_BOOTTIME (a suspend counts), as
/// durations since boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The lease as configured (etcd may grant more; never less).
    pub ttl: Duration,
}

impl Lease {
    /// How much before the earliest possible expiry on the server the holders are killed:
    /// a quarter of the lease, between 250 ms and 2 s (the time a SIGKILL takes to land and
    /// the clocks of two hosts to differ in rate).
    pub fn margin(&self) -> Duration {
        (self.ttl / 4).clamp(Duration::from_millis(250), Duration::from_secs(2))
    }

    /// How often it is renewed: three times per lease, so two renewals may fail in a row
    /// before the holders are killed.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    /// When holders must be dead, given when the last renewal that succeeded was *sent*:
    /// etcd counts the lease from the moment it got that renewal, which is later, so its
    /// expiry is never before `sent + ttl`.
    pub fn kill_at(&self, sent: Duration) -> Duration {
        (sent + self.ttl).saturating_sub(self.margin())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(list: &[(&str, i64)]) -> Vec<(String, i64)> {
        list.iter().map(|(k, r)| (k.to_string(), *r)).collect()
    }

    #[test]
    fn the_oldest_key_holds_and_each_waiter_watches_only_its_predecessor() {
        let k = keys(&[("c", 30), ("a", 10), ("b", 20)]);
        assert_eq!(turn(&k, "a"), Turn::Holder);
        assert_eq!(
            turn(&k, "b"),
            Turn::After {
                key: "a".into(),
                revision: 10
            }
        );
        assert_eq!(
            turn(&k, "c"),
            Turn::After {
                key: "b".into(),
                revision: 20
            }
        );
        assert_eq!(turn(&k, "d"), Turn::Gone);
        // The predecessor left: the next one up is watched, not the holder's successor.
        let k = keys(&[("c", 30), ("a", 10)]);
        assert_eq!(
            turn(&k, "c"),
            Turn::After {
                key: "a".into(),
                revision: 10
            }
        );
    }

    #[test]
    fn lock_names_become_environment_names() {
        assert_eq!(
            revision_var("db-migrate.v2"),
            "PLUMULE_LOCK_REVISION_DB_MIGRATE_V2"
        );
        assert_eq!(lock_key("x", 255, 7), "plumule/locks/x/00000000000000ff-7");
    }

    #[test]
    fn holders_die_a_margin_before_the_lease_can_expire() {
        // (lease s, margin ms, kill ms after a renewal sent at 1 s, renewal period ms)
        let table = [
            (1, 250, 1750, 333),
            (2, 500, 2500, 666),
            (10, 2000, 9000, 3333),
            (60, 2000, 59_000, 20_000),
        ];
        for (ttl, margin, kill, renew) in table {
            let l = Lease {
                ttl: Duration::from_secs(ttl),
            };
            assert_eq!(l.margin().as_millis(), margin, "lease {ttl}s");
            assert_eq!(l.kill_at(Duration::from_secs(1)).as_millis(), kill);
            assert_eq!(l.renew_every().as_millis(), renew);
            // Two renewals may fail before the kill is due.
            assert!(l.renew_every() * 2 < l.ttl - l.margin());
        }
    }
}
