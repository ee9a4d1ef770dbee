//! openraft glue: type declarations, the gRPC network, the Raft configuration, and the
//! per-member replication view (acknowledgement ages, matched indexes) read from metrics.

pub mod network;
pub mod typ;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::Instant as _;
use openraft::{Config, SnapshotPolicy};

pub use typ::{Raft, TypeConfig};

/// Timing of one node. Every member of a cluster should use the same values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Leader heartbeat period.
    pub heartbeat: Duration,
    /// How long a follower hears nothing from its leader before it campaigns: at least
    /// this, at most 1.2 x this (randomized, so two followers rarely campaign together).
    /// See [`config`] for how it maps onto openraft's lease and timeouts.
    pub election_timeout: Duration,
}

impl Timing {
    /// openraft's `(election_timeout_min, election_timeout_max)` in ms for this timing.
    ///
    /// An openraft follower campaigns once `now > last contact + lease + t`, where the lease
    /// (during which it also refuses to vote for anyone else) is `election_timeout_max` and
    /// `t` is drawn from `[min, max)`. Taking min = 2/5 and max = 3/5 of the election timeout
    /// `T` puts the campaign in `[T, 1.2 T)` after the last contact, and the lease at 0.6 T.
    /// (etcd, with the same `--election-timeout`, campaigns in `[T, 2 T)`.)
    pub fn openraft_timeouts(&self) -> (u64, u64) {
        let t = self.election_timeout.as_millis() as u64;
        // openraft needs min above the heartbeat (not so below 2.5 heartbeats, or by rounding)
        // and max above min: raising them only lengthens the wait.
        let min = (t * 2 / 5).max(self.heartbeat.as_millis() as u64 + 1);
        (min, (t * 3 / 5).max(min + 1))
    }

    /// The least election timeout for `heartbeat`: a follower must be able to miss a
    /// heartbeat before it gives up on its leader. (Below 2.5 heartbeats openraft's minimum
    /// would not exceed the heartbeat; [`Self::openraft_timeouts`] raises it, which only
    /// makes the wait longer.)
    pub fn least_election_timeout(heartbeat: Duration) -> Duration {
        heartbeat * 2
    }
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(100),
            election_timeout: Duration::from_millis(300),
        }
    }
}

/// The most log entries one AppendEntries carries (see [`crate::rpc::RAFT_MESSAGE_BYTES`]).
pub const MAX_PAYLOAD_ENTRIES: u64 = 32;

/// Builds and validates openraft's configuration for `timing`.
pub fn config(timing: Timing) -> Result<Arc<Config>, openraft::ConfigError> {
    let heartbeat_ms = timing.heartbeat.as_millis() as u64;
    let (election_min, election_max) = timing.openraft_timeouts();
    let config = Config {
        cluster_name: "cluster".to_string(),
        heartbeat_interval: heartbeat_ms,
        election_timeout_min: election_min,
        election_timeout_max: election_max,
        // A follower that was paused or partitioned must not depose a healthy leader.
        enable_pre_vote: Some(true),
        // A leader that restarts wins a new election before it leads again. Resuming its
        // old term (openraft's default) is safe only with the commit index and the state
        // machine flushed before each answer; this store flushes neither (the log is
        // durable and replayed), so a resumed leader could serve a linearizable read from
        // a state machine missing writes it had acknowledged.
        enable_leader_restore: Some(false),
        snapshot_policy: SnapshotPolicy::LogsSinceLast(10_000),
        max_in_snapshot_log_to_keep: 1_000,
        // Sized so a payload fits the Raft message limit: 32 entries of a kv value at its
        // limit (1 MiB, at most 6 MiB as escaped JSON) and a large deployment's manifest.
        max_payload_entries: MAX_PAYLOAD_ENTRIES,
        ..Default::default()
    };
    Ok(Arc::new(config.validate()?))
}

/// What the leader knows about one member's replication.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Replication {
    /// Time since the member acknowledged the last heartbeat or append it answered, on the
    /// leader's monotonic clock. `None`: never acknowledged (or this node is not leader).
    pub last_ack: Option<Duration>,
    /// Highest log index known to be stored on the member.
    pub matched_index: Option<u64>,
}

/// The leader's replication view of every member; empty on a non-leader.
pub fn replication(raft: &Raft) -> BTreeMap<u64, Replication> {
    let metrics = raft.metrics();
    let metrics = metrics.borrow_watched();
    let mut view = BTreeMap::new();
    if let Some(heartbeat) = &metrics.heartbeat {
        for (id, instant) in heartbeat {
            view.entry(*id)
                .or_insert_with(Replication::default)
                .last_ack = instant.as_ref().map(|t| t.elapsed());
        }
    }
    if let Some(replication) = &metrics.replication {
        for (id, matched) in replication {
            view.entry(*id)
                .or_insert_with(Replication::default)
                .matched_index = matched.as_ref().map(|log_id| log_id.index);
        }
    }
    view
}

/// Returns once the Raft core runs and has published the state it restored from the
/// store (its metrics are flushed before it takes its first request). Until then its
/// metrics are the defaults of an empty node: no membership, so a restarted member would
/// think it must join, and the authorization layer would take it for a node still joining
/// that admits any node certificate.
pub async fn restored(raft: &Raft) -> Result<(), String> {
    raft.with_raft_state(|_| ())
        .await
        .map_err(|fatal| fatal.to_string())
}

/// Returns once the Raft core has stopped (a storage error, a panic, or a shutdown),
/// with why. A node whose core stopped cannot vote, replicate or apply, yet its last
/// metrics still say what it was (a leader, say): it must not go on answering as a member.
pub async fn core_stopped(raft: &Raft) -> String {
    let mut rx = raft.metrics();
    loop {
        let stopped = match &rx.borrow_watched().running_state {
            Ok(()) => None,
            Err(fatal) => Some(fatal.to_string()),
        };
        if let Some(why) = stopped {
            return why;
        }
        // `changed` fails only when the core's task has ended, panics included.
        if rx.changed().await.is_err() {
            return "the Raft core's task ended".into();
        }
    }
}

/// When this node last heard from a leader that it accepted as one: an AppendEntries
/// (heartbeats included) answered with anything but "my vote is higher". What a follower
/// knows of its leader's liveness (its metrics keep naming a leader that has died).
#[derive(Debug)]
pub struct LeaderContact {
    epoch: std::time::Instant,
    /// Milliseconds after `epoch` plus one; 0: never.
    last: std::sync::atomic::AtomicU64,
}

impl Default for LeaderContact {
    fn default() -> Self {
        LeaderContact {
            epoch: std::time::Instant::now(),
            last: Default::default(),
        }
    }
}

impl LeaderContact {
    pub fn record(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64 + 1;
        self.last.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Time since the last contact; `None` if there was none.
    pub fn age(&self) -> Option<Duration> {
        match self.last.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            ms => Some(
                self.epoch
                    .elapsed()
                    .saturating_sub(Duration::from_millis(ms - 1)),
            ),
        }
    }
}

/// Whether node `id` is a member of a cluster whose leader is alive as far as it can
/// tell within `lease`: as leader, a quorum acknowledged it that recently; as anything
/// else, it names a leader and heard from one that recently. A stopped core never is.
pub fn has_live_leader(
    metrics: &typ::RaftMetrics,
    id: u64,
    contact: Option<Duration>,
    lease: Duration,
) -> bool {
    let fresh = |age: Option<Duration>| age.is_some_and(|age| age <= lease);
    let member = metrics
        .membership_config
        .membership()
        .get_node(&id)
        .is_some();
    let led = match metrics.state {
        // A sole voter is its own quorum: nobody has to acknowledge it.
        openraft::ServerState::Leader => {
            metrics.membership_config.membership().voter_ids().count() == 1
                || fresh(metrics.last_quorum_acked.as_ref().map(|t| t.elapsed()))
        }
        _ => metrics.current_leader.is_some() && fresh(contact),
    };
    member && led && metrics.running_state.is_ok()
}

/// A copy of the current metrics (the watch guard is not `Send`; never hold it across awaits).
pub fn metrics(raft: &Raft) -> typ::RaftMetrics {
    raft.metrics().borrow_watched().clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follower_campaigns_within_one_to_one_point_two_election_timeouts() {
        let timing = Timing::default();
        assert_eq!(timing.openraft_timeouts(), (120, 180));
        // Campaign after lease (max) + t, t in [min, max): [300, 360) ms.
        let (min, max) = timing.openraft_timeouts();
        assert_eq!(max + min, 300);
        assert_eq!(max + max, 360);
        config(timing).expect("the defaults are a valid openraft configuration");
    }

    #[test]
    fn every_timing_the_cli_accepts_is_a_valid_openraft_configuration() {
        for heartbeat in [1u64, 2, 5, 10, 50, 100, 333, 1000] {
            let heartbeat = Duration::from_millis(heartbeat);
            let least = Timing::least_election_timeout(heartbeat);
            for election in [least, least + Duration::from_millis(1), least * 10] {
                let timing = Timing {
                    heartbeat,
                    election_timeout: election,
                };
                config(timing).unwrap_or_else(|e| panic!("{timing:?}: {e}"));
            }
        }
    }
}
