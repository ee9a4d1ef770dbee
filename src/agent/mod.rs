//! What a node does with releases on its own disk: report what it holds, serve release
//! content to peers, and materialize a release from a manifest, fetching only the chunks
//! it holds in no release from peers that have them.
//!
//! Architecture invariant: no remote shell. Every operation is typed and works on paths the
//! release store computes from a validated manifest.

pub mod guard;
#[cfg(test)]
mod testing;
pub mod upload;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tokio::sync::Notify;

use crate::api::agent::{AgentError, FenceRefusal, PrepareOutcome, ReleasesView};
pub use crate::api::agent::{Fence, FenceError, Mutation};
use crate::api::ApiError;
use crate::error::Chain;
use crate::release::{
    signature, Chunk, Limits, Manifest, ManifestAnswer, ManifestDelta, StoreError, SyncError,
    TrustedKeys,
};
use crate::release::{ReleaseStore, Staging};
use crate::rpc::{AgentClient, AgentHandler, Channels, UploadChunks};

/// The current Raft term of this node, for fencing mutations.
pub type TermSource = Arc<dyn Fn() -> u64 + Send + Sync>;

impl Fence {
    /// Why a request with this fence must be refused, given the newest one accepted.
    pub fn refusal(&self, accepted: &Fence, node_term: u64) -> Option<FenceRefusal> {
        if self.term < node_term {
            return Some(FenceRefusal::StaleTerm {
                term: self.term,
                node_term,
            });
        }
        if self.generation < accepted.generation {
            return Some(FenceRefusal::StaleGeneration {
                generation: self.generation,
                accepted: accepted.generation,
            });
        }
        if self.generation == accepted.generation
            && (self.term, self.seq) < (accepted.term, accepted.seq)
        {
            return Some(FenceRefusal::StaleSequence {
                term: self.term,
                seq: self.seq,
                accepted_term: accepted.term,
                accepted_seq: accepted.seq,
            });
        }
        None
    }
}

/// The release side of a node. Filesystem work runs on blocking threads.
#[derive(Clone)]
pub struct Agent {
    store: Arc<ReleaseStore>,
    /// Where `free_bytes` is measured: the data dir's filesystem.
    data_dir: std::path::PathBuf,
    channels: Channels,
    limits: Limits,
    term: TermSource,
    /// Notified by `Mutation::Restart`; the node shuts down gracefully and exits.
    restart: Arc<Notify>,
    /// Build hash of the release the node runs ("dev" outside a release). It changes
    /// without a process restart when a release's `bin/cluster` is the running one's
    /// (only its other files, services above all, changed): the node follows it.
    running: Arc<tokio::sync::watch::Sender<String>>,
    /// Serializes mutations and guards the persisted highest generation.
    fence_lock: Arc<tokio::sync::Mutex<()>>,
    /// The keys releases must be signed with to be installed or activated here; empty:
    /// any release is accepted.
    release_keys: Arc<TrustedKeys>,
}

/// A boot-guard error as the agent answers it: the release store's own errors keep their
/// codes, a record that cannot be written is an I/O error, the rest is the guard's.
fn guard_error(e: guard::GuardError) -> AgentError {
    match e {
        guard::GuardError::Releases(e) => AgentError::Store(e),
        guard::GuardError::Write(e) => AgentError::GuardNotRecorded(e),
        other => AgentError::Guard(Box::new(other)),
    }
}

/// Rounds of asking the peers for the chunks a sync still lacks (a damaged chunk is
/// refused and asked for again in the next round), and the pause before the second
/// (the third waits twice as long).
const SYNC_ROUNDS: u32 = 3;
const SYNC_ROUND_PAUSE: Duration = Duration::from_millis(300);

/// Where the agent persists the newest fence it obeyed, in the data dir.
const FENCE_FILE: &str = "agent-fence.json";

/// The newest fence this node obeyed; the default when none was ever recorded.
pub fn read_fence(data_dir: &Path) -> Result<Fence, FenceError> {
    let path = data_dir.join(FENCE_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Fence::default()),
        Err(source) => return Err(FenceError::Read { path, source }),
    };
    serde_json::from_slice(&bytes).map_err(|source| FenceError::Corrupt { path, source })
}

/// Checks the held release `hash` byte for byte; a damaged one is removed (unless it is
/// `current`), so that the next sync or install fetches it whole, and the damage is the
/// error.
fn check_held(store: &ReleaseStore, hash: &str, limits: &Limits) -> Result<(), StoreError> {
    let started = std::time::Instant::now();
    let checked = store.check(hash, limits);
    crate::metrics::recorder().verified(started.elapsed().as_secs_f64());
    match checked {
        Err(damage @ StoreError::Damaged { .. }) => {
            tracing::error!(release = %hash, error = %damage, "a held release is damaged on disk");
            match store.quarantine(hash) {
                Ok(()) => tracing::warn!(release = %hash, "removed the damaged release"),
                Err(e) => tracing::error!(release = %hash, error = %e, "the damaged release stays"),
            }
            Err(damage)
        }
        other => other,
    }
}

/// What a mutation asks of the node process once its disk work is done.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Then {
    Nothing,
    /// Exit gracefully: the supervisor starts `current`.
    RestartProcess,
    /// `current` is now this release, whose `bin/cluster` is the one running: the node
    /// takes it as its build without a restart (its services cut over).
    RunInPlace(String),
}

/// The disk side of [`Agent::mutate`], on a blocking thread: check the fence and the
/// request, then record the fence and act. Returns what the node must do then.
fn apply_mutation(
    store: &ReleaseStore,
    limits: &Limits,
    release_keys: &TrustedKeys,
    fence: Fence,
    node_term: u64,
    running_build: &str,
    mutation: &Mutation,
) -> Result<Then, AgentError> {
    let data_dir = store.data_dir();
    let accepted = read_fence(data_dir).map_err(|source| AgentError::FenceUnreadable {
        mutation: format!("{mutation:?}"),
        source,
    })?;
    if let Some(refusal) = fence.refusal(&accepted, node_term) {
        return Err(AgentError::Refused {
            mutation: format!("{mutation:?}"),
            refusal,
        });
    }
    // Check, then act: a refused commit leaves the guard armed and every release held,
    // a refused activation leaves `current` and the fence as they were.
    match mutation {
        Mutation::Commit(hash) if hash != running_build => {
            return Err(AgentError::CommitNotRunning {
                hash: hash.clone(),
                running: running_build.to_owned(),
            });
        }
        // What the next boot starts must still be what was checked at activation: a
        // release damaged since is not committed, and the rollout restores this node.
        Mutation::Commit(hash) => store.check(hash, limits)?,
        // Restore is not checked: it puts back what this node ran before the rollout.
        Mutation::Activate(hash) => {
            if !release_keys.is_empty() {
                signature::check(release_keys, &store.manifest(hash)?)?
            }
            // No byte of a release runs before every byte of it is checked, held
            // releases included: synced and verified once is not proof it is intact now.
            check_held(store, hash, limits)?;
            // Nor does a release whose services cannot run (one held from before the
            // check existed).
            if let Err(e) = crate::service::definitions_of(&store.release_dir(hash)) {
                return Err(AgentError::Services {
                    hash: hash.clone(),
                    reason: e.to_string(),
                });
            }
        }
        _ => {}
    }
    if fence != accepted {
        let bytes = serde_json::to_vec(&fence).expect("a fence always serializes");
        crate::fs::write_atomically(data_dir, FENCE_FILE, &bytes)
            .map_err(AgentError::FenceNotRecorded)?;
    }
    match mutation {
        Mutation::PinPrevious => {
            store.pin_previous()?;
            crate::crash::point("agent-pinned");
        }
        Mutation::Activate(hash) => {
            // Arm the guard first: if the new release never comes up, the
            // supervisor puts back what runs now, with no leader involved.
            let from = store.current()?.unwrap_or_default();
            if from != *hash {
                let pending = guard::PendingBoot {
                    generation: fence.generation,
                    from,
                    to: hash.clone(),
                    tries_left: guard::DEFAULT_TRIES,
                };
                guard::arm(data_dir, &pending).map_err(guard_error)?;
                crate::crash::point("guard-armed");
            }
            store.activate(hash)?
        }
        Mutation::Restore(hash) => {
            store.activate(hash)?;
            guard::disarm(data_dir).map_err(guard_error)?;
        }
        Mutation::Commit(_) => {
            guard::disarm(data_dir).map_err(guard_error)?;
            crate::crash::point("commit-disarmed");
            // Old releases go now; current and the pinned previous always stay.
            let deleted = store.prune(crate::release::DEFAULT_KEEP_OLD)?;
            if !deleted.is_empty() {
                tracing::info!(?deleted, "removed old releases");
            }
        }
        Mutation::Restart => {}
    }
    let into = match mutation {
        Mutation::Restart => store.current()?,
        Mutation::Restore(hash) if hash != running_build => Some(hash.clone()),
        _ => return Ok(Then::Nothing),
    };
    Ok(match into {
        Some(into) if into != running_build && same_binary(store, running_build, &into) => {
            Then::RunInPlace(into)
        }
        _ => Then::RestartProcess,
    })
}

/// Whether releases `a` and `b` (both held) ship the same `bin/cluster`: then switching
/// between them needs no new process.
fn same_binary(store: &ReleaseStore, a: &str, b: &str) -> bool {
    store.same_entry(a, b, "bin/cluster")
}

impl Agent {
    /// Opens the release store under `data_dir` (discarding partial staging from a crash).
    pub fn open(
        data_dir: &Path,
        channels: Channels,
        term: TermSource,
        restart: Arc<Notify>,
        running_build: String,
        release_keys: TrustedKeys,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            store: Arc::new(ReleaseStore::open(data_dir)?),
            data_dir: data_dir.to_path_buf(),
            channels,
            limits: Limits::default(),
            term,
            restart,
            running: Arc::new(tokio::sync::watch::channel(running_build).0),
            fence_lock: Arc::default(),
            release_keys: Arc::new(release_keys),
        })
    }

    /// The keys releases must be signed with here (empty: any release is accepted).
    pub fn release_keys(&self) -> Arc<TrustedKeys> {
        self.release_keys.clone()
    }

    /// Refuses `manifest` unless it is signed by a key this node trusts (any manifest,
    /// with none). A release already held takes the signature just checked, so that one
    /// installed unsigned (before this node trusted keys) can be activated once it
    /// arrives signed.
    async fn admit(&self, manifest: &Manifest) -> Result<(), AgentError> {
        signature::check(&self.release_keys, manifest)?;
        let (Some(signature), false) = (&manifest.signature, self.release_keys.is_empty()) else {
            return Ok(());
        };
        let (hash, signature) = (manifest.build_hash(), signature.clone());
        self.blocking(move |store| {
            if store.has(&hash) {
                store.record_signature(&hash, &signature)?;
            }
            Ok(())
        })
        .await
    }

    /// Whether release `hash` ships the `bin/cluster` this node runs (both held here).
    pub async fn runs_binary_of(&self, hash: &str) -> bool {
        let running = self.running.borrow().clone();
        let hash = hash.to_string();
        self.blocking(move |store| Ok(same_binary(store, &running, &hash)))
            .await
            .unwrap_or(false)
    }

    /// The build the node runs, as it changes (see `running`).
    pub fn running_build(&self) -> tokio::sync::watch::Receiver<String> {
        self.running.subscribe()
    }

    /// Asks the node to exit gracefully so its supervisor starts it again.
    pub fn request_restart(&self) {
        self.restart.notify_one();
    }

    /// Applies `mutation` if `fence` is current: its term is not below this node's term and
    /// its generation not below the highest this node has accepted (persisted, so a restart
    /// does not forget it). Idempotent: repeating a mutation gives the same result. A
    /// refused mutation changes nothing on disk, except that an activation refused
    /// because the release is damaged removes that release (see [`check_held`]).
    pub async fn mutate(
        &self,
        fence: Fence,
        mutation: Mutation,
    ) -> Result<ReleasesView, AgentError> {
        let serialized = self.fence_lock.clone().lock_owned().await;
        let node_term = (self.term)();
        let store = self.store.clone();
        let release_keys = self.release_keys.clone();
        let running = self.running.clone();
        let limits = self.limits;
        let restart = self.restart.clone();
        tokio::task::spawn_blocking(move || {
            // The lock goes with the work, not with this future: a caller that gives up
            // (a timeout cancels the request) must not let the next mutation in while
            // this one is still changing the disk, or a restore could run before the
            // activation it undoes and leave `current` on the new release.
            let _serialized = serialized;
            let running_build = running.borrow().clone();
            let then = apply_mutation(
                &store,
                &limits,
                &release_keys,
                fence,
                node_term,
                &running_build,
                &mutation,
            )?;
            match then {
                Then::Nothing => {}
                Then::RestartProcess => {
                    tracing::info!(
                        generation = fence.generation,
                        "restart requested by the rollout"
                    );
                    restart.notify_one();
                }
                Then::RunInPlace(hash) => {
                    tracing::info!(
                        generation = fence.generation,
                        release = %hash,
                        "the release ships the running bin/cluster: running it in place, no restart"
                    );
                    running.send_replace(hash);
                }
            }
            Ok::<_, AgentError>(())
        })
        .await
        .map_err(AgentError::TaskFailed)??;
        self.releases().await
    }

    pub fn store(&self) -> &ReleaseStore {
        &self.store
    }

    /// Runs release-store work off the async threads.
    /// Refuses the release `hash` just installed if its services cannot run, removing it
    /// again: a bad `service.toml` changes nothing on this node.
    async fn admit_services(&self, hash: String) -> Result<String, AgentError> {
        self.blocking(move |store| {
            match crate::service::definitions_of(&store.release_dir(&hash)) {
                Ok(_) => Ok(hash),
                Err(e) => {
                    if let Err(removed) = store.quarantine(&hash) {
                        tracing::warn!(release = %hash, error = %Chain(&removed), "cannot remove a refused release");
                    }
                    Err(AgentError::Services {
                        hash,
                        reason: e.to_string(),
                    })
                }
            }
        })
        .await
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&ReleaseStore) -> Result<T, AgentError> + Send + 'static,
    ) -> Result<T, AgentError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || work(&store))
            .await
            .map_err(AgentError::TaskFailed)?
    }

    pub async fn releases(&self) -> Result<ReleasesView, AgentError> {
        let data_dir = self.data_dir.clone();
        self.blocking(move |store| {
            Ok(ReleasesView {
                hashes: store.releases()?,
                current: store.current()?,
                previous: store.previous()?,
                free_bytes: free_bytes(&data_dir).unwrap_or(0),
                fetches_manifests: true,
            })
        })
        .await
    }

    /// Whether release `hash` is held here (async callers: not `store().has`, which
    /// reads the disk on the calling thread).
    pub async fn has(&self, hash: &str) -> Result<bool, AgentError> {
        let hash = hash.to_string();
        self.blocking(move |store| Ok(store.has(&hash))).await
    }

    /// Whether release `hash` is held here and intact. A damaged copy is removed (see
    /// [`check_held`]) and counts as not held, so that it is fetched again whole; one that
    /// cannot be removed, because it is `current`, is the error.
    async fn holds_intact(&self, hash: &str) -> Result<bool, AgentError> {
        let hash = hash.to_string();
        let limits = self.limits;
        self.blocking(move |store| {
            if !store.has(&hash) {
                return Ok(false);
            }
            match check_held(store, &hash, &limits) {
                Ok(()) => Ok(true),
                Err(StoreError::Damaged { .. }) if !store.has(&hash) => Ok(false),
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    pub async fn manifest(&self, hash: &str) -> Result<Manifest, AgentError> {
        let hash = hash.to_string();
        self.blocking(move |store| Ok(store.manifest(&hash)?)).await
    }

    /// The manifest of release `hash` rebuilt from release `base`, held here, and `delta`;
    /// refused unless it has that build hash.
    pub async fn rebuild_manifest(
        &self,
        base: &str,
        delta: ManifestDelta,
        hash: &str,
    ) -> Result<Manifest, AgentError> {
        let bad = |problem: String| AgentError::BadDelta {
            base: base.to_string(),
            hash: hash.to_string(),
            problem,
        };
        let manifest = delta
            .apply(&self.manifest(base).await?)
            .map_err(|e| bad(e.to_string()))?;
        let rebuilt = manifest.build_hash();
        if rebuilt != hash {
            return Err(bad(format!("it rebuilds to {rebuilt}")));
        }
        Ok(manifest)
    }

    /// Release `hash`'s manifest for a node that holds `held`: a delta against one of them
    /// this node holds too, else whole.
    pub async fn manifest_for(
        &self,
        hash: &str,
        held: Vec<String>,
    ) -> Result<ManifestAnswer, AgentError> {
        let hash = hash.to_string();
        self.blocking(move |store| Ok(store.manifest_for(&hash, &held)?))
            .await
    }

    /// The manifest of release `hash` and the bytes fetched for it: this node's own copy,
    /// else the first of `peers` that sends one that rebuilds to `hash`, asked for as a
    /// delta against the releases held here (current first: the likeliest base).
    async fn fetch_manifest(
        &self,
        hash: &str,
        peers: &[String],
    ) -> Result<(Manifest, u64), AgentError> {
        if self.has(hash).await? {
            let local = self.manifest(hash).await?;
            // A copy held unsigned, from before this node trusted keys, takes a peer's
            // signed manifest (which `admit` then records).
            if signature::check(&self.release_keys, &local).is_ok() {
                return Ok((local, 0));
            }
        }
        let view = self.releases().await?;
        let mut held: Vec<String> = view.current.into_iter().chain(view.previous).collect();
        for h in view.hashes {
            if !held.contains(&h) {
                held.push(h);
            }
        }
        let mut last = String::from("no peer was named");
        // As for chunks: every peer in turn, and again after a pause, `SYNC_ROUNDS` times.
        for round in 0..SYNC_ROUNDS {
            if round > 0 {
                tokio::time::sleep(SYNC_ROUND_PAUSE * round).await;
            }
            for peer in peers {
                match self.manifest_from(peer, hash, &held).await {
                    Ok(found) => return Ok(found),
                    Err(e) => {
                        tracing::warn!(%peer, release = %hash, error = %e, "fetching the manifest failed; trying the next peer");
                        last = format!("{peer}: {e}");
                    }
                }
            }
        }
        Err(SyncError::ManifestNotFetched {
            release: hash.to_string(),
            peers: peers.to_vec(),
            last,
        }
        .into())
    }

    /// One peer's answer for [`Agent::fetch_manifest`], rebuilt and checked; the error in
    /// words, for the next peer's turn.
    async fn manifest_from(
        &self,
        peer: &str,
        hash: &str,
        held: &[String],
    ) -> Result<(Manifest, u64), String> {
        let mut client =
            AgentClient::with_channels(&self.channels, peer).map_err(|e| Chain(&e).to_string())?;
        let (answer, bytes) = client
            .manifest_for(hash, held.to_vec())
            .await
            .map_err(|e| Chain(&e).to_string())?;
        let manifest = match answer {
            ManifestAnswer::Whole(manifest) => manifest,
            ManifestAnswer::Delta { base, delta } => {
                if !held.contains(&base) {
                    return Err(format!(
                        "sent a delta against release {base}, which this node did not name"
                    ));
                }
                self.rebuild_manifest(&base, delta, hash)
                    .await
                    .map_err(|e| Chain(&e).to_string())?
            }
        };
        let rebuilt = manifest.build_hash();
        if rebuilt != hash {
            return Err(format!(
                "sent the manifest of release {rebuilt}, not of {hash}"
            ));
        }
        // The signature is outside the build hash: a peer holding the release unsigned
        // (it trusts no keys) is passed over for one whose copy this node can admit.
        signature::check(&self.release_keys, &manifest).map_err(|e| e.to_string())?;
        Ok((manifest, bytes))
    }

    /// Materializes release `hash`, whose manifest is held here or fetched from `peers`
    /// (see [`Agent::fetch_manifest`]), as [`Agent::prepare`] does.
    pub async fn prepare_release(
        &self,
        hash: String,
        peers: Vec<String>,
    ) -> Result<PrepareOutcome, AgentError> {
        // Refused before any peer is asked (three rounds would only delay the answer).
        if !crate::release::manifest::is_sha256_hex(&hash) {
            return Err(StoreError::NotABuildHash { hash }.into());
        }
        let started = Instant::now();
        let (manifest, manifest_bytes) = self.fetch_manifest(&hash, &peers).await?;
        let mut outcome = self.prepare(manifest, peers).await?;
        outcome.manifest_bytes = manifest_bytes;
        outcome.elapsed_ms = started.elapsed().as_millis() as u64;
        Ok(outcome)
    }

    /// The chunks of `manifest` this node would have to fetch, and their total size.
    pub async fn missing(&self, manifest: Manifest) -> Result<(Vec<Chunk>, u64), AgentError> {
        self.blocking(move |store| {
            let missing = store.missing_chunks(&manifest)?;
            let bytes = missing.iter().map(|c| c.size).sum();
            Ok((missing, bytes))
        })
        .await
    }

    /// One chunk's bytes from any release held here (verified before it is served).
    pub async fn read_chunk(&self, sha256: String) -> Result<Vec<u8>, AgentError> {
        self.blocking(move |store| Ok(store.read_chunk(&sha256)?))
            .await
    }

    /// Materializes `manifest` as a release: local content is reused, missing chunks are
    /// fetched from `peers` (first peer that has a chunk wins), every byte is verified.
    /// A release not signed by a key this node trusts is refused before anything is
    /// fetched or written.
    pub async fn prepare(
        &self,
        manifest: Manifest,
        peers: Vec<String>,
    ) -> Result<PrepareOutcome, AgentError> {
        self.admit(&manifest).await?;
        let started = Instant::now();
        let total = manifest.total_bytes();
        let limits = self.limits;
        let hash = manifest.build_hash();
        if self.holds_intact(&hash).await? {
            return Ok(PrepareOutcome {
                hash,
                fetched_bytes: 0,
                fetched_chunks: 0,
                reused_bytes: total,
                elapsed_ms: started.elapsed().as_millis() as u64,
                manifest_bytes: 0,
            });
        }
        let mut staging = self
            .blocking(move |store| Ok(store.begin(&manifest, &limits)?))
            .await?;
        let mut fetched_bytes = 0;
        let mut fetched_chunks = 0;
        // A chunk can arrive damaged (a bad link, a bad copy on one peer): it is refused,
        // the peer's stream ends, and the next peer is asked. Whatever is still missing
        // after a round is asked for again, after a pause, up to `SYNC_ROUNDS` times.
        let mut last = None;
        let mut round = 0;
        while !staging.missing().is_empty() && round < SYNC_ROUNDS {
            if round > 0 {
                tokio::time::sleep(SYNC_ROUND_PAUSE * round).await;
            }
            round += 1;
            for peer in &peers {
                let wanted: Vec<String> =
                    staging.missing().iter().map(|c| c.sha256.clone()).collect();
                if wanted.is_empty() {
                    break;
                }
                let unreachable = |source: ApiError| SyncError::PeerUnreachable {
                    peer: peer.clone(),
                    source: Box::new(source),
                };
                let mut client =
                    AgentClient::with_channels(&self.channels, peer).map_err(unreachable)?;
                let chunks = match client.read_chunks(wanted).await {
                    Ok(chunks) => chunks.map(move |item| {
                        item.map_err(|source| AgentError::Sync(unreachable(source)))
                    }),
                    Err(e) => {
                        let e = unreachable(e);
                        tracing::warn!(error = %Chain(&e), "fetching chunks failed; trying the next peer");
                        last = Some(Chain(&e).to_string());
                        continue;
                    }
                };
                let fed = feed(staging, chunks).await;
                staging = fed.staging;
                fetched_bytes += fed.bytes;
                fetched_chunks += fed.chunks;
                if let Some(e) = fed.error {
                    tracing::warn!(%peer, error = %Chain(&e), "a peer's chunk stream broke; trying the next peer");
                    last = Some(format!("{peer}: {}", Chain(&e)));
                }
            }
        }
        if !staging.missing().is_empty() {
            return Err(SyncError::NotHeldByPeers {
                release: hash,
                count: staging.missing().len(),
                bytes: staging.missing().iter().map(|c| c.size).sum(),
                peers,
                rounds: round,
                last: last.unwrap_or_else(|| "none of them held the chunks".into()),
            }
            .into());
        }
        let hash = finish(staging).await?;
        let hash = self.admit_services(hash).await?;
        let reused = total.saturating_sub(fetched_bytes);
        crate::metrics::recorder().fetched(fetched_bytes, fetched_chunks, reused);
        Ok(PrepareOutcome {
            hash,
            fetched_bytes,
            fetched_chunks,
            reused_bytes: total.saturating_sub(fetched_bytes),
            elapsed_ms: started.elapsed().as_millis() as u64,
            manifest_bytes: 0,
        })
    }

    /// Materializes `manifest` from chunks a client streams (an operator uploading a dist).
    /// Chunks are written to staging as they arrive, never buffered whole. A release not
    /// signed by a key this node trusts is refused before any chunk is read.
    pub async fn upload(
        &self,
        manifest: Manifest,
        chunks: impl Stream<Item = Result<(String, Vec<u8>), AgentError>> + Send + Unpin,
    ) -> Result<PrepareOutcome, AgentError> {
        self.admit(&manifest).await?;
        let started = Instant::now();
        let total = manifest.total_bytes();
        let limits = self.limits;
        // A damaged copy held here is removed first, so the upload replaces it.
        self.holds_intact(&manifest.build_hash()).await?;
        let staging = self
            .blocking(move |store| Ok(store.begin(&manifest, &limits)?))
            .await?;
        let fed = feed(staging, chunks).await;
        if let Some(e) = fed.error {
            return Err(e);
        }
        if !fed.staging.missing().is_empty() {
            return Err(AgentError::UploadIncomplete {
                missing: fed.staging.missing().len(),
            });
        }
        let hash = finish(fed.staging).await?;
        let hash = self.admit_services(hash).await?;
        crate::metrics::recorder().fetched(fed.bytes, fed.chunks, total.saturating_sub(fed.bytes));
        Ok(PrepareOutcome {
            hash,
            fetched_bytes: fed.bytes,
            fetched_chunks: fed.chunks,
            reused_bytes: total.saturating_sub(fed.bytes),
            elapsed_ms: started.elapsed().as_millis() as u64,
            manifest_bytes: 0,
        })
    }
}

/// What feeding a chunk stream into staging achieved.
struct Fed {
    staging: Staging,
    bytes: u64,
    chunks: u64,
    /// Why the stream stopped early, if it did.
    error: Option<AgentError>,
}

/// Writes every chunk of `chunks` into `staging` (verifying each) on a blocking thread.
async fn feed(
    mut staging: Staging,
    mut chunks: impl Stream<Item = Result<(String, Vec<u8>), AgentError>> + Unpin,
) -> Fed {
    let (mut bytes, mut count) = (0, 0);
    while let Some(item) = chunks.next().await {
        let (sha256, data) = match item {
            Ok(chunk) => chunk,
            Err(error) => {
                return Fed {
                    staging,
                    bytes,
                    chunks: count,
                    error: Some(error),
                }
            }
        };
        let size = data.len() as u64;
        let joined = tokio::task::spawn_blocking(move || {
            let result = staging.put_chunk(&sha256, &data);
            (staging, result)
        })
        .await;
        let (back, result) = match joined {
            Ok(pair) => pair,
            Err(e) => panic!("release store task failed: {e}"),
        };
        staging = back;
        if let Err(e) = result {
            return Fed {
                staging,
                bytes,
                chunks: count,
                error: Some(e.into()),
            };
        }
        bytes += size;
        count += 1;
    }
    Fed {
        staging,
        bytes,
        chunks: count,
        error: None,
    }
}

async fn finish(staging: Staging) -> Result<String, AgentError> {
    Ok(tokio::task::spawn_blocking(move || staging.finish())
        .await
        .map_err(AgentError::TaskFailed)??)
}

impl AgentHandler for Agent {
    async fn mutate(&self, fence: Fence, mutation: Mutation) -> Result<ReleasesView, AgentError> {
        Agent::mutate(self, fence, mutation).await
    }

    async fn releases(&self) -> Result<ReleasesView, AgentError> {
        Agent::releases(self).await
    }

    async fn manifest(
        &self,
        hash: String,
        held: Vec<String>,
    ) -> Result<ManifestAnswer, AgentError> {
        Agent::manifest_for(self, &hash, held).await
    }

    async fn rebuild_manifest(
        &self,
        base: String,
        delta: ManifestDelta,
        hash: String,
    ) -> Result<Manifest, AgentError> {
        Agent::rebuild_manifest(self, &base, delta, &hash).await
    }

    async fn missing(&self, manifest: Manifest) -> Result<(Vec<Chunk>, u64), AgentError> {
        Agent::missing(self, manifest).await
    }

    async fn read_chunk(&self, sha256: String) -> Result<Vec<u8>, AgentError> {
        Agent::read_chunk(self, sha256).await
    }

    async fn upload(
        &self,
        manifest: Manifest,
        chunks: UploadChunks,
    ) -> Result<PrepareOutcome, AgentError> {
        Agent::upload(self, manifest, chunks).await
    }

    async fn prepare(
        &self,
        manifest: Manifest,
        peers: Vec<String>,
    ) -> Result<PrepareOutcome, AgentError> {
        Agent::prepare(self, manifest, peers).await
    }

    async fn prepare_release(
        &self,
        hash: String,
        peers: Vec<String>,
    ) -> Result<PrepareOutcome, AgentError> {
        Agent::prepare_release(self, hash, peers).await
    }
}

pub use crate::fs::free_bytes;

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::Notify;

    use super::testing::{install, tree};
    use super::{Agent, AgentError, Fence, Mutation};
    use crate::release::signature::{key_id, sign, Subject};
    use crate::release::{Manifest, SignatureError, TrustedKeys};
    use crate::rpc::Channels;

    fn key(seed: u8) -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
    }

    fn signed(mut manifest: Manifest, key: &ed25519_dalek::SigningKey) -> Manifest {
        let build_hash = manifest.build_hash();
        manifest.signature = Some(Box::new(sign(
            key,
            &Subject {
                build_hash: &build_hash,
                built_at: "2024-05-01T12:00:00Z",
                git_commit: "abc1234",
                files: manifest.file_count(),
            },
        )));
        manifest
    }

    #[tokio::test]
    async fn a_node_that_trusts_a_key_activates_only_releases_signed_by_it() {
        let trusted = key(1);
        let (dir, agent, _old, new) =
            agent_trusting("dev", TrustedKeys::new([trusted.verifying_key()]));
        let data = dir.path().join("data");
        let before = tree(&data);
        let err = agent
            .mutate(fence(1, 1, 1), Mutation::Activate(new.clone()))
            .await
            .unwrap_err();
        let message = crate::error::Chain(&err).to_string();
        assert!(
            matches!(err, AgentError::Signature(SignatureError::Unsigned { .. }))
                && message.contains("unsigned")
                && message.contains(&key_id(&trusted.verifying_key())),
            "{message}"
        );
        // current, the guard and the fence are as they were.
        assert_eq!(tree(&data), before);

        // Signed by another key: refused, naming that key, before anything is written.
        let foreign = signed(agent.manifest(&new).await.unwrap(), &key(2));
        let err = agent.prepare(foreign, vec![]).await.unwrap_err();
        let message = crate::error::Chain(&err).to_string();
        assert!(
            matches!(
                err,
                AgentError::Signature(SignatureError::UntrustedKey { .. })
            ) && message.contains(&key_id(&key(2).verifying_key())),
            "{message}"
        );
        assert_eq!(tree(&data), before);

        // The same release arriving signed by the trusted key takes that signature and
        // can then be activated.
        let good = signed(agent.manifest(&new).await.unwrap(), &trusted);
        agent.prepare(good.clone(), vec![]).await.unwrap();
        assert_eq!(agent.manifest(&new).await.unwrap(), good);
        agent
            .mutate(fence(1, 1, 2), Mutation::Activate(new.clone()))
            .await
            .unwrap();
        assert_eq!(agent.store().current().unwrap(), Some(new.clone()));
        // A node reopening the store reads the recorded signature back.
        drop(agent);
        let store = crate::release::ReleaseStore::open(&data).unwrap();
        assert_eq!(store.manifest(&new).unwrap(), good);
    }

    #[tokio::test]
    async fn a_node_that_trusts_a_key_refuses_to_install_an_unsigned_release_and_writes_nothing() {
        let (dir, agent, _old, _new) =
            agent_trusting("dev", TrustedKeys::new([key(1).verifying_key()]));
        let data = dir.path().join("data");
        let work = tempfile::tempdir().unwrap();
        let other_data = work.path().join("other");
        let third = install(&other_data, work.path(), "third");
        let manifest = crate::release::ReleaseStore::open(&other_data)
            .unwrap()
            .manifest(&third)
            .unwrap();
        let before = tree(&data);
        let err = agent
            .upload(manifest.clone(), futures::stream::empty())
            .await
            .unwrap_err();
        assert!(
            matches!(err, AgentError::Signature(SignatureError::Unsigned { .. })),
            "{err}"
        );
        let err = agent.prepare(manifest, vec![]).await.unwrap_err();
        assert!(
            matches!(err, AgentError::Signature(SignatureError::Unsigned { .. })),
            "{err}"
        );
        assert_eq!(tree(&data), before, "nothing staged, nothing held");
        assert!(!agent.has(&third).await.unwrap());
    }

    #[tokio::test]
    async fn a_damaged_held_release_is_not_activated_but_removed_and_an_upload_repairs_it() {
        let (dir, agent, old, new) = agent_with_two_releases("dev");
        let data = dir.path().join("data");
        // One byte of the held release changes on disk after it was verified.
        let binary = data.join("releases").join(&new).join("bin/cluster");
        let mut bytes = std::fs::read(&binary).unwrap();
        bytes[12] ^= 1;
        std::fs::write(&binary, &bytes).unwrap();

        let err = agent
            .mutate(fence(1, 1, 1), Mutation::Activate(new.clone()))
            .await
            .unwrap_err();
        let message = crate::error::Chain(&err).to_string();
        assert!(
            message.contains(&format!("release {new} is damaged on disk"))
                && message.contains("bin/cluster"),
            "{message}"
        );
        assert_eq!(agent.store().current().unwrap(), Some(old.clone()));
        assert!(!data.join("boot.json").exists(), "the guard is not armed");
        assert_eq!(super::read_fence(&data).unwrap(), Fence::default());
        assert!(
            !agent.has(&new).await.unwrap(),
            "the damaged copy is removed"
        );

        // Uploading the release again puts it back whole, and it activates.
        let work = tempfile::tempdir().unwrap();
        let source_data = work.path().join("source");
        assert_eq!(install(&source_data, work.path(), "new"), new);
        let source = crate::release::ReleaseStore::open(&source_data).unwrap();
        let manifest = source.manifest(&new).unwrap();
        let chunks: Vec<Result<(String, Vec<u8>), AgentError>> = manifest
            .entries
            .iter()
            .filter_map(|entry| match &entry.kind {
                crate::release::EntryKind::File { chunks, .. } => Some(chunks.clone()),
                _ => None,
            })
            .flatten()
            .map(|chunk| {
                Ok((
                    chunk.sha256.clone(),
                    source.read_chunk(&chunk.sha256).unwrap(),
                ))
            })
            .collect();
        let outcome = agent
            .upload(manifest, futures::stream::iter(chunks))
            .await
            .unwrap();
        assert!(outcome.fetched_bytes > 0, "{outcome:?}");
        agent
            .mutate(fence(1, 1, 2), Mutation::Activate(new.clone()))
            .await
            .unwrap();
        assert_eq!(agent.store().current().unwrap(), Some(new));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_mutation_whose_caller_gave_up_still_finishes_before_the_next_one_starts() {
        use futures::FutureExt;
        let (dir, agent, old, _) = agent_with_two_releases("dev");
        // A release large enough that checking it before activation takes a while.
        let dist = dir.path().join("large");
        std::fs::create_dir_all(dist.join("bin")).unwrap();
        std::fs::write(dist.join("bin/cluster"), "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        let executable = std::fs::Permissions::from_mode(0o755);
        std::fs::set_permissions(dist.join("bin/cluster"), executable).unwrap();
        std::fs::write(dist.join("big"), vec![7u8; 96 << 20]).unwrap();
        let new = agent
            .store()
            .install_dir(&dist, &crate::release::Limits::default())
            .unwrap();
        // The activation starts (its disk work is under way) and its caller gives up, as
        // a leader's timeout cancels a request to a node that is slow to answer.
        let started = agent
            .mutate(fence(1, 1, 1), Mutation::Activate(new.clone()))
            .now_or_never();
        assert!(started.is_none(), "the activation is still running");
        // The leader restores the node: it runs after the activation, and undoes it.
        agent
            .mutate(fence(1, 1, 2), Mutation::Restore(old.clone()))
            .await
            .unwrap();
        // Were the two interleaved, the activation would swap `current` after the
        // restore returned, within the time it takes to check the release.
        let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while std::time::Instant::now() < until {
            assert_eq!(agent.store().current().unwrap(), Some(old.clone()));
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(
            super::read_fence(dir.path().join("data").as_path()).unwrap(),
            fence(1, 1, 2)
        );
    }

    #[tokio::test]
    async fn a_node_with_no_trusted_keys_accepts_unsigned_releases() {
        let (_dir, agent, _old, new) = agent_with_two_releases("dev");
        agent
            .mutate(fence(1, 1, 1), Mutation::Activate(new.clone()))
            .await
            .unwrap();
        assert_eq!(agent.store().current().unwrap(), Some(new));
    }

    #[test]
    fn fencing_table() {
        let accepted = fence(2, 5, 10);
        let cases = [
            ("same request again", fence(2, 5, 10), 5, true),
            ("next request", fence(2, 5, 11), 5, true),
            ("newer leader", fence(2, 6, 0), 6, true),
            ("newer generation", fence(3, 5, 0), 5, true),
            ("late answer of the same leader", fence(2, 5, 9), 5, false),
            ("older leader", fence(2, 4, 99), 5, false),
            ("term below the node's", fence(2, 5, 11), 6, false),
            ("older generation", fence(1, 9, 0), 5, false),
        ];
        for (name, request, node_term, allowed) in cases {
            let refusal = request.refusal(&accepted, node_term);
            assert_eq!(refusal.is_none(), allowed, "{name}: {refusal:?}");
        }
    }

    fn fence(generation: u64, term: u64, seq: u64) -> Fence {
        Fence {
            generation,
            term,
            seq,
        }
    }

    /// An agent on a data dir holding releases `old` (current, pinned as previous) and
    /// `new`, running build `running`, in term 1.
    fn agent_with_two_releases(running: &str) -> (tempfile::TempDir, Agent, String, String) {
        agent_trusting(running, TrustedKeys::default())
    }

    /// [`agent_with_two_releases`] (both installed unsigned) on a node that trusts `keys`.
    fn agent_trusting(
        running: &str,
        keys: TrustedKeys,
    ) -> (tempfile::TempDir, Agent, String, String) {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let old = install(&data, dir.path(), "old");
        let new = install(&data, dir.path(), "new");
        let store = crate::release::ReleaseStore::open(&data).unwrap();
        store.activate(&old).unwrap();
        store.pin_previous().unwrap();
        drop(store);
        let agent = Agent::open(
            &data,
            Channels::new(&crate::tls::Security::Insecure),
            Arc::new(|| 1),
            Arc::new(Notify::new()),
            running.to_string(),
            keys,
        )
        .unwrap();
        (dir, agent, old, new)
    }

    #[tokio::test]
    async fn a_commit_of_a_release_this_node_does_not_run_is_refused_and_changes_nothing() {
        let (dir, agent, old, new) = agent_with_two_releases("dev");
        let data = dir.path().join("data");
        agent
            .mutate(fence(1, 1, 1), Mutation::Activate(new.clone()))
            .await
            .unwrap();
        assert!(data.join("boot.json").exists(), "activation arms the guard");
        let before = tree(&data);
        let err = agent
            .mutate(fence(1, 1, 2), Mutation::Commit(new.clone()))
            .await
            .unwrap_err();
        let message = crate::error::Chain(&err).to_string();
        assert!(
            matches!(err, AgentError::CommitNotRunning { .. })
                && message.contains("refused to commit")
                && message.contains("runs dev"),
            "{message}"
        );
        // The guard stays armed, no release is pruned and the fence is not advanced.
        assert_eq!(tree(&data), before);
        let held = agent.store().releases().unwrap();
        assert!(held.contains(&old) && held.contains(&new), "{held:?}");
    }

    #[tokio::test]
    async fn a_running_release_damaged_after_activation_is_not_committed() {
        // Releases install to the same hash in any data dir: learn it, then run it.
        let (_, _, _, new) = agent_with_two_releases("dev");
        let (dir, agent, _, same) = agent_with_two_releases(&new);
        assert_eq!(same, new);
        let data = dir.path().join("data");
        agent
            .mutate(fence(1, 1, 1), Mutation::Activate(new.clone()))
            .await
            .unwrap();
        let binary = data.join("releases").join(&new).join("bin/cluster");
        let mut bytes = std::fs::read(&binary).unwrap();
        bytes[0] ^= 0x20;
        std::fs::write(&binary, &bytes).unwrap();
        let before = tree(&data);

        let err = agent
            .mutate(fence(1, 1, 2), Mutation::Commit(new.clone()))
            .await
            .unwrap_err();
        let message = crate::error::Chain(&err).to_string();
        assert!(
            message.contains(&format!("release {new} is damaged on disk"))
                && message.contains("bin/cluster"),
            "{message}"
        );
        // The guard stays armed (a reboot puts back what ran before) and nothing moved.
        assert!(data.join("boot.json").exists());
        assert_eq!(tree(&data), before);
        assert_eq!(agent.store().current().unwrap(), Some(new));
    }

    #[tokio::test]
    async fn a_corrupt_fence_record_refuses_every_mutation_and_a_missing_one_is_the_default() {
        let (dir, agent, _, new) = agent_with_two_releases("dev");
        let data = dir.path().join("data");
        std::fs::write(data.join("agent-fence.json"), b"{\"generation\": 7,").unwrap();
        let before = tree(&data);
        for mutation in [Mutation::PinPrevious, Mutation::Activate(new.clone())] {
            let err = agent
                .mutate(fence(1, 1, 1), mutation.clone())
                .await
                .unwrap_err();
            let message = crate::error::Chain(&err).to_string();
            assert!(
                matches!(err, AgentError::FenceUnreadable { .. })
                    && message.contains("agent-fence.json is corrupt")
                    && message.contains("remove the file"),
                "{mutation:?}: {message}"
            );
            assert_eq!(tree(&data), before, "{mutation:?}");
        }
        std::fs::remove_file(data.join("agent-fence.json")).unwrap();
        agent
            .mutate(fence(1, 1, 1), Mutation::Activate(new.clone()))
            .await
            .expect("with no record, the default fence accepts the current leader");
        assert_eq!(super::read_fence(&data).unwrap(), fence(1, 1, 1));
    }
}
