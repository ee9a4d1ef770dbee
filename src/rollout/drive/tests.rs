//! The runtime against a fake cluster: `update` starts a deployment and `drive` runs on
//! every node as it would on real ones, over one shared in-memory world (the replicated
//! state applied with the real `State::apply`, hosts that switch releases and restart,
//! leadership that moves). Time is tokio's paused clock, so a rollout with seconds of
//! stabilization takes milliseconds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::*;
use crate::api::UpdateOptions;
use crate::release::signature::{sign, Subject};
use crate::release::{Chunk, Entry, EntryKind, TrustedKeys};
use crate::rollout::cluster::{DiskNeeds, MemberView, RaftView};
use crate::rollout::update::update;
use crate::state::{
    Command, DeploymentState, HistoryEntry, Phase, Role, State, Strategy, PROTOCOL,
};

const OLD: &str = "old";

/// A dist whose only file is an executable `bin/cluster` holding `content`.
fn manifest(content: &str) -> Manifest {
    let sha256 = hex::encode(Sha256::digest(content.as_bytes()));
    Manifest::from_unsorted(vec![
        Entry {
            path: "bin".into(),
            kind: EntryKind::Dir { mode: 0o755 },
        },
        Entry {
            path: "bin/cluster".into(),
            kind: EntryKind::File {
                mode: 0o755,
                size: content.len() as u64,
                sha256: sha256.clone(),
                chunks: vec![Chunk {
                    sha256,
                    size: content.len() as u64,
                }],
            },
        },
    ])
}

/// One host of the fake world.
#[derive(Debug, Default)]
struct Host {
    /// The release `current` points at.
    current: String,
    /// The release the process runs.
    running: String,
    pinned: Option<String>,
    prepared: BTreeSet<String>,
    /// Counts process starts.
    boot: u64,
    /// Newest (generation, term, seq) obeyed.
    fence: (u64, u64, u64),
}

#[derive(Default)]
struct World {
    state: State,
    hosts: BTreeMap<u64, Host>,
    leader: Option<u64>,
    term: u64,
    log_index: u64,
    /// (host, build) pairs whose health check fails.
    unhealthy: BTreeSet<(u64, String)>,
    /// Hosts in the order they were restarted.
    restarts: Vec<u64>,
    /// Leadership hand-offs, (from, to).
    transfers: Vec<(u64, u64)>,
    /// The release keys every node trusts (none: any release).
    release_keys: Arc<TrustedKeys>,
}

impl World {
    fn restart(&mut self, id: u64) {
        let host = self.hosts.get_mut(&id).expect("host");
        host.running = host.current.clone();
        host.boot += 1;
        self.restarts.push(id);
        if self.leader == Some(id) {
            // A restarting leader loses leadership to another voter.
            self.leader = self.hosts.keys().copied().find(|other| *other != id);
            self.term += 1;
        }
    }
}

/// One node's view of the shared world.
#[derive(Clone)]
struct Fake {
    id: u64,
    world: Arc<Mutex<World>>,
}

impl Fake {
    fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().expect("world lock")
    }
}

impl Cluster for Fake {
    fn id(&self) -> u64 {
        self.id
    }
    fn addr(&self) -> String {
        format!("fake-{}", self.id)
    }
    fn build_hash(&self) -> String {
        self.world().hosts[&self.id].running.clone()
    }
    fn incarnation(&self) -> u64 {
        self.world().hosts[&self.id].boot
    }
    fn heartbeat_ms(&self) -> u64 {
        100
    }
    fn release_keys(&self) -> Arc<TrustedKeys> {
        self.world().release_keys.clone()
    }
    fn raft_view(&self) -> RaftView {
        let world = self.world();
        RaftView {
            term: world.term,
            leading: world.leader == Some(self.id),
            last_log_index: world.log_index,
            commit_index: world.log_index,
            members: world
                .hosts
                .keys()
                .map(|id| MemberView {
                    id: *id,
                    addr: format!("fake-{id}"),
                    role: Role::Voter,
                    last_ack_ms: Some(1),
                    matched_index: Some(world.log_index),
                })
                .collect(),
        }
    }
    fn read<R>(&self, read: impl FnOnce(&State) -> R) -> R {
        read(&self.world().state)
    }
    async fn confirm_leadership(&self) -> Result<(), String> {
        match self.world().leader == Some(self.id) {
            true => Ok(()),
            false => Err("not the leader".into()),
        }
    }
    async fn propose(&self, command: Command) -> Result<Response, ApiError> {
        let mut world = self.world();
        if world.leader != Some(self.id) {
            return Err(ApiError::unavailable("not the leader"));
        }
        world.log_index += 1;
        Ok(world.state.apply(&command).0)
    }
    async fn transfer_leader(&self, to: u64) -> Result<(), ApiError> {
        let mut world = self.world();
        if world.leader != Some(self.id) {
            return Err(ApiError::unavailable("not the leader"));
        }
        world.leader = Some(to);
        world.term += 1;
        world.transfers.push((self.id, to));
        Ok(())
    }
    async fn node_status(
        &self,
        target: u64,
        addr: &str,
        _timeout: Duration,
    ) -> Result<NodeStatus, ApiError> {
        let world = self.world();
        let host = world
            .hosts
            .get(&target)
            .ok_or_else(|| ApiError::unavailable(format!("no node at {addr}")))?;
        Ok(NodeStatus {
            id: target,
            addr: addr.to_string(),
            role: "voter".into(),
            state: if world.leader == Some(target) {
                "leader"
            } else {
                "follower"
            }
            .into(),
            build_hash: host.running.clone(),
            last_ack_ms: Some(1),
            matched_index: Some(world.log_index),
            applied_index: Some(world.log_index),
            protocol: PROTOCOL,
            boot_id: format!("boot-{}", host.boot),
            started_at_ms: 0,
            health_problem: world
                .unhealthy
                .contains(&(target, host.running.clone()))
                .then(|| "health check exited 1".to_string()),
            supervision: "supervise".into(),
            last_auto_restore: None,
            insecure: false,
            services: Vec::new(),
            labels: Default::default(),
        })
    }
    async fn disk_needs(
        &self,
        _target: u64,
        _addr: &str,
        manifest: &Manifest,
    ) -> Result<DiskNeeds, ApiError> {
        Ok(DiskNeeds {
            free_bytes: 10 << 30,
            needed_bytes: manifest.total_bytes(),
        })
    }
    async fn prepare(
        &self,
        target: u64,
        _addr: &str,
        manifest: Arc<Manifest>,
        _peers: Vec<String>,
    ) -> Result<(), ApiError> {
        let mut world = self.world();
        let host = world.hosts.get_mut(&target).expect("host");
        host.prepared.insert(manifest.build_hash());
        Ok(())
    }
    async fn mutate(
        &self,
        target: u64,
        _addr: &str,
        issuer: Issuer,
        op: AgentOp,
    ) -> Result<(), ApiError> {
        let mut world = self.world();
        let host = world.hosts.get_mut(&target).expect("host");
        let fence = (issuer.generation, issuer.term, issuer.seq);
        if fence < host.fence {
            return Err(ApiError::precondition(format!(
                "fence {fence:?} is older than {:?}",
                host.fence
            )));
        }
        host.fence = fence;
        match op {
            AgentOp::PinPrevious { .. } => host.pinned = Some(host.current.clone()),
            AgentOp::Activate { hash } => {
                if !host.prepared.contains(&hash) {
                    return Err(ApiError::precondition(format!("{hash} is not prepared")));
                }
                host.current = hash;
            }
            AgentOp::Restart => world.restart(target),
            AgentOp::Restore { hash } => {
                host.current = hash.clone();
                if host.running != hash {
                    world.restart(target);
                }
            }
            AgentOp::Commit { hash } => {
                if host.running != hash {
                    return Err(ApiError::precondition(format!(
                        "refused to commit {hash}: node runs {}",
                        host.running
                    )));
                }
            }
            AgentOp::Prepare { .. } => unreachable!("prepare is not a mutation"),
        }
        Ok(())
    }
    async fn holds_release(&self, _hash: &str) -> bool {
        true
    }
    async fn version_of(&self, hash: &str) -> Result<String, String> {
        Ok(format!(
            "cluster 0.1.0 (build {hash}, protocol {})",
            crate::state::PROTOCOL
        ))
    }
    async fn runs_binary_of(&self, _hash: &str) -> bool {
        false
    }
    async fn services_of(&self, _hash: &str) -> Result<Vec<String>, String> {
        Ok(Vec::new())
    }
    async fn release_manifest(&self, hash: &str) -> Result<Manifest, String> {
        Err(format!("the fake holds no manifest for {hash}"))
    }
    async fn install_dist(&self, dir: PathBuf) -> Result<String, String> {
        Err(format!("the fake installs nothing from {}", dir.display()))
    }
    fn request_restart(&self) {
        self.world().restart(self.id);
    }
}

/// Three voters on `OLD`, node 1 leading, each running `drive` until the test ends.
struct Harness {
    world: Arc<Mutex<World>>,
    stop: watch::Sender<bool>,
    drivers: BTreeMap<u64, tokio::task::JoinHandle<()>>,
}

impl Harness {
    fn start(voters: &[u64]) -> Self {
        let mut world = World {
            leader: Some(voters[0]),
            term: 1,
            ..World::default()
        };
        for id in voters {
            world.hosts.insert(
                *id,
                Host {
                    current: OLD.into(),
                    running: OLD.into(),
                    ..Host::default()
                },
            );
            world.state.apply(&Command::RegisterNode {
                id: *id,
                info: crate::state::NodeInfo {
                    addr: format!("fake-{id}"),
                    build_hash: OLD.into(),
                    protocol: PROTOCOL,
                    ..Default::default()
                },
            });
        }
        let world = Arc::new(Mutex::new(world));
        let (stop, stop_rx) = watch::channel(false);
        let drivers = voters
            .iter()
            .map(|id| {
                let fake = Arc::new(Fake {
                    id: *id,
                    world: world.clone(),
                });
                (
                    *id,
                    tokio::spawn(drive(fake, Notes::default(), stop_rx.clone())),
                )
            })
            .collect();
        Self {
            world,
            stop,
            drivers,
        }
    }

    /// The leader's process dies and its supervisor starts it again at once, and it leads
    /// again in the same term (as where openraft restores its vote; `raft::config` turns
    /// that off, and the fence must hold either way), with a fresh `drive` in its next
    /// incarnation.
    fn restart_leader_in_the_same_term(&mut self) {
        let id = {
            let mut world = self.world.lock().unwrap();
            let id = world.leader.expect("a leader");
            world.hosts.get_mut(&id).expect("host").boot += 1;
            id
        };
        self.drivers
            .remove(&id)
            .expect("the leader's driver")
            .abort();
        let fake = Arc::new(Fake {
            id,
            world: self.world.clone(),
        });
        let driver = tokio::spawn(drive(fake, Notes::default(), self.stop.subscribe()));
        self.drivers.insert(id, driver);
    }

    fn leader(&self) -> Fake {
        let id = self.world.lock().unwrap().leader.expect("a leader");
        Fake {
            id,
            world: self.world.clone(),
        }
    }

    /// Waits (on the paused clock) until `done` holds of the world.
    async fn until(&self, what: &str, done: impl Fn(&World) -> bool) {
        let waited = tokio::time::timeout(Duration::from_secs(600), async {
            while !done(&self.world.lock().unwrap()) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "timed out waiting for {what}");
    }

    /// Waits for the deployment to finish and returns its history entry.
    async fn finished(&self) -> HistoryEntry {
        self.until("the rollout to finish", |w| {
            w.state.deployment.is_none() && !w.state.history.is_empty()
        })
        .await;
        self.world
            .lock()
            .unwrap()
            .state
            .history
            .last()
            .cloned()
            .unwrap()
    }

    fn running(&self) -> BTreeMap<u64, String> {
        let world = self.world.lock().unwrap();
        world
            .hosts
            .iter()
            .map(|(id, h)| (*id, h.running.clone()))
            .collect()
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        for driver in self.drivers.into_values() {
            driver.await.expect("drive task");
        }
    }
}

/// Starts an update of every node to a new build through the leader; its build hash.
async fn start_update(cluster: &Harness) -> String {
    let new = manifest("new build");
    let target = new.build_hash();
    update(&cluster.leader(), new, options(), false)
        .await
        .expect("update starts");
    target
}

fn options() -> UpdateOptions {
    UpdateOptions {
        strategy: Strategy {
            health_deadline_ms: 2_000,
            poll_interval_ms: 100,
            stabilize_ms: 500,
            soak_ms: 0,
            ..Strategy::default()
        },
        dist_label: "./dist".into(),
        ..UpdateOptions::default()
    }
}

#[tokio::test(start_paused = true)]
async fn an_update_rolls_every_node_followers_first_and_the_leader_last() {
    let cluster = Harness::start(&[1, 2, 3]);
    let new = manifest("new build");
    let target = new.build_hash();
    let outcome = update(&cluster.leader(), new, options(), false)
        .await
        .expect("update starts");
    assert!(outcome.report.proceed, "{:?}", outcome.report);
    assert_eq!(outcome.generation, 1);

    let entry = cluster.finished().await;
    assert_eq!(entry.outcome, DeploymentState::Completed, "{entry:?}");
    assert!(cluster.running().values().all(|build| *build == target));
    {
        let world = cluster.world.lock().unwrap();
        // Followers one at a time, then the old leader after it handed over.
        assert_eq!(world.restarts.len(), 3, "{:?}", world.restarts);
        assert_eq!(world.restarts.last(), Some(&1), "{:?}", world.restarts);
        assert_eq!(world.transfers.len(), 1, "{:?}", world.transfers);
        assert_eq!(world.transfers[0].0, 1);
        assert!(entry
            .nodes
            .values()
            .all(|step| step.phase == Phase::Committed));
    }
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_leader_restarted_in_the_same_term_finishes_the_rollout() {
    let mut cluster = Harness::start(&[1, 2, 3]);
    let target = start_update(&cluster).await;
    // The second follower runs the new build and soaks: its fence holds a request number
    // above all the first follower's polls, more than a new engine counting from 0 would
    // send before it commits.
    cluster
        .until("the second follower stabilizing", |w| {
            w.state.deployment.as_ref().is_some_and(|d| {
                let phase = |id| d.nodes[&id].phase;
                (phase(2) == Phase::Committed && phase(3) == Phase::Stabilize)
                    || (phase(3) == Phase::Committed && phase(2) == Phase::Stabilize)
            })
        })
        .await;
    let term = cluster.world.lock().unwrap().term;
    cluster.restart_leader_in_the_same_term();

    let entry = cluster.finished().await;
    assert_eq!(entry.outcome, DeploymentState::Completed, "{entry:?}");
    assert!(cluster.running().values().all(|build| *build == target));
    {
        let world = cluster.world.lock().unwrap();
        // Only the final hand-off changed the term.
        assert_eq!(world.term, term + 1, "{:?}", world.transfers);
        assert_eq!(world.restarts.len(), 3, "{:?}", world.restarts);
    }
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_dry_run_plans_and_changes_nothing() {
    let cluster = Harness::start(&[1, 2, 3]);
    let outcome = update(&cluster.leader(), manifest("new build"), options(), true)
        .await
        .expect("dry run");
    assert!(outcome.report.proceed, "{:?}", outcome.report);
    assert_eq!(outcome.generation, 0);
    assert_eq!(outcome.plan.waves.last(), Some(&vec![1]), "leader last");
    {
        let world = cluster.world.lock().unwrap();
        assert!(world.state.deployment.is_none());
        assert_eq!(world.log_index, 0, "nothing proposed");
    }
    cluster.stop().await;
}

/// `manifest` signed by `key`, as `cluster dist stamp --sign` signs a dist.
fn signed(mut manifest: Manifest, key: &ed25519_dalek::SigningKey) -> Manifest {
    let build_hash = manifest.build_hash();
    manifest.signature = Some(Box::new(sign(
        key,
        &Subject {
            build_hash: &build_hash,
            built_at: "2024-05-01T12:00:00Z",
            git_commit: "unknown",
            files: manifest.file_count(),
        },
    )));
    manifest
}

#[tokio::test(start_paused = true)]
async fn a_leader_that_trusts_a_key_refuses_in_preflight_what_it_did_not_sign() {
    let cluster = Harness::start(&[1, 2, 3]);
    let trusted = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
    let foreign = ed25519_dalek::SigningKey::from_bytes(&[2; 32]);
    let trusted_id = crate::release::signature::key_id(&trusted.verifying_key());
    let foreign_id = crate::release::signature::key_id(&foreign.verifying_key());
    cluster.world.lock().unwrap().release_keys =
        Arc::new(TrustedKeys::new([trusted.verifying_key()]));
    let refused = [
        (manifest("unsigned build"), "is unsigned".to_owned()),
        (
            signed(manifest("foreign build"), &foreign),
            format!("signed by key {foreign_id}"),
        ),
    ];
    for (release, expected) in refused {
        for dry_run in [true, false] {
            let outcome = update(&cluster.leader(), release.clone(), options(), dry_run)
                .await
                .expect("preflight answers");
            assert!(!outcome.report.proceed, "{:?}", outcome.report);
            assert_eq!(outcome.generation, 0);
            let dist = outcome
                .report
                .checks
                .iter()
                .find(|check| check.name == "dist")
                .expect("a dist check");
            assert!(
                !dist.passed
                    && dist.detail.contains(&expected)
                    && dist.detail.contains(&trusted_id),
                "{dist:?}"
            );
        }
    }
    {
        let world = cluster.world.lock().unwrap();
        assert!(world.state.deployment.is_none(), "no deployment started");
        assert_eq!(world.log_index, 0, "nothing proposed");
        assert!(world
            .hosts
            .values()
            .all(|host| host.current == OLD && host.prepared.is_empty()));
    }
    let outcome = update(
        &cluster.leader(),
        signed(manifest("signed build"), &trusted),
        options(),
        false,
    )
    .await
    .expect("update starts");
    assert!(outcome.report.proceed, "{:?}", outcome.report);
    assert_eq!(outcome.generation, 1);
    cluster.finished().await;
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_node_that_fails_health_is_restored_and_updated_nodes_are_reverted() {
    let cluster = Harness::start(&[1, 2, 3]);
    let new = manifest("new build");
    let target = new.build_hash();
    // The second follower updated fails its health check on the new build.
    let second = update(&cluster.leader(), new.clone(), options(), true)
        .await
        .unwrap()
        .plan
        .waves[1][0];
    cluster
        .world
        .lock()
        .unwrap()
        .unhealthy
        .insert((second, target.clone()));
    update(&cluster.leader(), new, options(), false)
        .await
        .expect("update starts");

    let entry = cluster.finished().await;
    assert_eq!(entry.outcome, DeploymentState::Reverted, "{entry:?}");
    assert!(
        cluster.running().values().all(|build| build == OLD),
        "every node back on the old build: {:?}",
        cluster.running()
    );
    assert!(
        entry
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("health check"),
        "{:?}",
        entry.reason
    );
    {
        let world = cluster.world.lock().unwrap();
        assert!(
            world.transfers.is_empty(),
            "the leader was never handed over"
        );
        assert_eq!(world.hosts[&1].boot, 0, "the leader never restarted");
    }
    cluster.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_new_leader_resumes_the_rollout_from_the_replicated_record() {
    let cluster = Harness::start(&[1, 2, 3]);
    let target = start_update(&cluster).await;
    // Once the first follower committed, leadership moves to the other follower.
    cluster
        .until("a follower to commit", |w| {
            w.state.deployment.as_ref().is_some_and(|d| {
                d.nodes
                    .iter()
                    .any(|(id, step)| *id != 1 && step.phase == Phase::Committed)
            })
        })
        .await;
    {
        let mut world = cluster.world.lock().unwrap();
        let committed: Vec<u64> = world
            .state
            .deployment
            .as_ref()
            .unwrap()
            .nodes
            .iter()
            .filter(|(_, s)| s.phase == Phase::Committed)
            .map(|(id, _)| *id)
            .collect();
        let next = [2, 3]
            .into_iter()
            .find(|id| !committed.contains(id))
            .unwrap();
        world.leader = Some(next);
        world.term += 1;
    }

    let entry = cluster.finished().await;
    assert_eq!(entry.outcome, DeploymentState::Completed, "{entry:?}");
    assert!(cluster.running().values().all(|build| *build == target));
    {
        let world = cluster.world.lock().unwrap();
        let mut restarted = world.restarts.clone();
        restarted.sort();
        assert_eq!(restarted, vec![1, 2, 3], "each node restarted exactly once");
    }
    cluster.stop().await;
}
