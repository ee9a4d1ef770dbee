//! The node as the rollout runtime sees it: [`Cluster`] over this node's Raft handle,
//! state machine, agent and gRPC clients.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::ReadPolicy;

use super::NodeHandle;
use crate::agent::{Fence, Mutation};
use crate::api::{ApiError, NodeStatus};
use crate::raft;
use crate::release::{Limits, Manifest};
use crate::rollout::{AgentOp, Cluster, DiskNeeds, Issuer, MemberView, RaftView};
use crate::rpc::{AgentClient, ControlClient};
use crate::state::{Command, Response, Role, State};

impl NodeHandle {
    /// Every member with its role and, on the leader, its replication: the one place
    /// that derives roles from the membership.
    pub(super) fn members(&self) -> Vec<MemberView> {
        let metrics = raft::metrics(&self.raft);
        let replication = raft::replication(&self.raft);
        let membership = metrics.membership_config.membership();
        let voters: Vec<u64> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, node)| {
                let repl = replication.get(id).copied().unwrap_or_default();
                MemberView {
                    id: *id,
                    addr: node.addr.clone(),
                    role: if voters.contains(id) {
                        Role::Voter
                    } else {
                        Role::Learner
                    },
                    last_ack_ms: repl.last_ack.map(|age| age.as_millis() as u64),
                    matched_index: repl.matched_index,
                }
            })
            .collect()
    }
}

impl Cluster for NodeHandle {
    fn id(&self) -> u64 {
        self.id
    }

    fn addr(&self) -> String {
        self.addr.clone()
    }

    fn build_hash(&self) -> String {
        self.info().build_hash
    }

    fn release_keys(&self) -> Arc<crate::release::TrustedKeys> {
        self.agent.release_keys()
    }

    fn incarnation(&self) -> u64 {
        self.incarnation
    }

    fn heartbeat_ms(&self) -> u64 {
        self.timing.heartbeat.as_millis() as u64
    }

    fn raft_view(&self) -> RaftView {
        let metrics = raft::metrics(&self.raft);
        RaftView {
            term: metrics.current_term,
            leading: self.raft.is_leader(),
            last_log_index: metrics.last_log_index.unwrap_or(0),
            commit_index: metrics.cluster_committed.map(|l| l.index).unwrap_or(0),
            members: self.members(),
        }
    }

    fn read<R>(&self, read: impl FnOnce(&State) -> R) -> R {
        self.sm.read(read)
    }

    async fn confirm_leadership(&self) -> Result<(), String> {
        self.raft
            .ensure_linearizable(ReadPolicy::ReadIndex)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// The leader's own commands are proposed here or not at all: another node's Write
    /// RPC refuses them (they are the leader's to write), and a node that no longer
    /// leads must not act as if it did.
    async fn propose(&self, command: Command) -> Result<Response, ApiError> {
        match self.write_here(command).await? {
            Some(outcome) => Ok(outcome.response),
            None => Err(ApiError::unavailable(format!(
                "node {} no longer leads: nothing was proposed; ask the new leader",
                self.id
            ))),
        }
    }

    async fn transfer_leader(&self, to: u64) -> Result<(), ApiError> {
        NodeHandle::transfer_leader(self, to, 0).await.map(|_| ())
    }

    async fn node_status(
        &self,
        target: u64,
        addr: &str,
        timeout: Duration,
    ) -> Result<NodeStatus, ApiError> {
        let status = if target == self.id {
            self.local_status()
        } else {
            ControlClient::with_channels(&self.channels, addr)?
                .timeout(timeout)
                .status(true)
                .await?
        };
        status
            .nodes
            .into_iter()
            .find(|n| n.id == target)
            .ok_or_else(|| {
                ApiError::unavailable(format!(
                    "node {target} at {addr} does not list itself as a member"
                ))
            })
    }

    async fn disk_needs(
        &self,
        target: u64,
        addr: &str,
        manifest: &Manifest,
    ) -> Result<DiskNeeds, ApiError> {
        if target == self.id {
            let view = self.agent.releases().await?;
            let (_, needed_bytes) = self.agent.missing(manifest.clone()).await?;
            return Ok(DiskNeeds {
                free_bytes: view.free_bytes,
                needed_bytes,
            });
        }
        let mut agent = AgentClient::with_channels(&self.channels, addr)?;
        let view = agent.releases().await?;
        // A node of this build takes the manifest as a delta against the release it runs,
        // when this node holds that one too.
        let base = match &view.current {
            Some(current) if view.fetches_manifests && self.agent.has(current).await? => {
                Some((current.clone(), self.agent.manifest(current).await?))
            }
            _ => None,
        };
        let (_, needed_bytes) = match base {
            Some((hash, base)) => {
                let delta = manifest.delta_from(&base);
                agent
                    .missing_by_delta(&manifest.build_hash(), &hash, &delta)
                    .await?
            }
            None => agent.missing(manifest).await?,
        };
        Ok(DiskNeeds {
            free_bytes: view.free_bytes,
            needed_bytes,
        })
    }

    async fn prepare(
        &self,
        target: u64,
        addr: &str,
        manifest: Arc<Manifest>,
        peers: Vec<String>,
    ) -> Result<(), ApiError> {
        if target == self.id {
            self.agent
                .prepare(Manifest::clone(&manifest), peers)
                .await?;
        } else {
            // A node of this build fetches the manifest itself, as a delta against the
            // release it runs, from the same peers as the chunks: the leader sends none.
            let mut agent = AgentClient::with_channels(&self.channels, addr)?;
            if agent.releases().await?.fetches_manifests {
                agent.prepare_release(&manifest.build_hash(), peers).await?;
            } else {
                agent.prepare(&manifest, peers).await?;
            }
        }
        Ok(())
    }

    async fn mutate(
        &self,
        target: u64,
        addr: &str,
        issuer: Issuer,
        op: AgentOp,
    ) -> Result<(), ApiError> {
        let mutation = match op {
            AgentOp::PinPrevious { .. } => Mutation::PinPrevious,
            AgentOp::Activate { hash } => Mutation::Activate(hash),
            AgentOp::Restart => Mutation::Restart,
            AgentOp::Restore { hash } => Mutation::Restore(hash),
            AgentOp::Commit { hash } => Mutation::Commit(hash),
            AgentOp::Prepare { .. } => {
                return Err(ApiError::internal(
                    "prepare is not a fenced mutation: use Cluster::prepare",
                ))
            }
        };
        let fence = Fence {
            generation: issuer.generation,
            term: issuer.term,
            seq: issuer.seq,
        };
        if target == self.id {
            self.agent.mutate(fence, mutation).await?;
        } else {
            AgentClient::with_channels(&self.channels, addr)?
                .mutate(fence, mutation)
                .await?;
        }
        Ok(())
    }

    async fn holds_release(&self, hash: &str) -> bool {
        self.agent.has(hash).await.unwrap_or(false)
    }

    async fn version_of(&self, hash: &str) -> Result<String, String> {
        /// Longer than any binary needs to print its version on a loaded host.
        const LIMIT: std::time::Duration = std::time::Duration::from_secs(20);
        let binary = self.agent.store().release_dir(hash).join("bin/cluster");
        let mut command = tokio::process::Command::new(&binary);
        command
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .env_clear()
            .kill_on_drop(true);
        let out = match tokio::time::timeout(LIMIT, command.output()).await {
            Err(_) => {
                return Err(format!(
                    "`bin/cluster --version` did not end within {LIMIT:?}"
                ))
            }
            Ok(Err(e)) => return Err(format!("`bin/cluster --version` cannot start: {e}")),
            Ok(Ok(out)) => out,
        };
        let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.lines().rev().take(3).collect();
            return Err(format!(
                "`bin/cluster --version` exited with {}{}",
                out.status,
                match tail.is_empty() {
                    true => String::new(),
                    false => format!(
                        ": {}",
                        tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
                    ),
                }
            ));
        }
        Ok(said)
    }

    async fn runs_binary_of(&self, hash: &str) -> bool {
        self.agent.runs_binary_of(hash).await
    }

    async fn services_of(&self, hash: &str) -> Result<Vec<String>, String> {
        let dir = self.agent.store().release_dir(hash);
        tokio::task::spawn_blocking(move || crate::service::definitions_of(&dir))
            .await
            .map_err(|e| e.to_string())?
            .map(|defs| {
                defs.into_iter()
                    .map(|d| match d.socket_activation {
                        true => d.name,
                        false => format!(
                            "{} (binds {} itself, not socket-activated: its port refuses \
                             connections while its instance is replaced)",
                            d.name, d.listen
                        ),
                    })
                    .collect()
            })
            .map_err(|e| e.to_string())
    }

    async fn release_manifest(&self, hash: &str) -> Result<Manifest, String> {
        self.agent
            .manifest(hash)
            .await
            .map_err(|e| crate::error::Chain(&e).to_string())
    }

    async fn install_dist(&self, dir: PathBuf) -> Result<String, String> {
        let agent = self.agent.clone();
        tokio::task::spawn_blocking(move || agent.store().install_dir(&dir, &Limits::default()))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| crate::error::Chain(&e).to_string())
    }

    fn request_restart(&self) {
        self.agent.request_restart();
    }
}
