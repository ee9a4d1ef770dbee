//! The Agent gRPC service (releases on a node's disk) and its client.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt, TryStreamExt};
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use super::auth::{caller_of, check_fence, check_peers, Membership};
use super::pb::agent_client::AgentClient as PbClient;
use super::pb::agent_server::Agent as AgentRpc;
use super::pb::{self, ChunkData};
use super::status::{agent_status, from_status, refusal_status};
use super::{Channels, MAX_MESSAGE_BYTES};
use crate::api::agent::{AgentError, Fence, Mutation, PrepareOutcome, ReleasesView};
use crate::api::ApiError;
use crate::release::{Chunk, Manifest, ManifestAnswer, ManifestDelta};

/// The chunks of an upload, in the order the client sent them: (SHA-256, bytes).
pub type UploadChunks = Pin<Box<dyn Stream<Item = Result<(String, Vec<u8>), AgentError>> + Send>>;

/// What a node does for Agent requests; implemented by `agent`. A closed set of typed
/// operations on paths the agent computes itself.
pub trait AgentHandler: Send + Sync + 'static {
    /// A fenced change to the node's releases; the releases afterwards.
    fn mutate(
        &self,
        fence: Fence,
        mutation: Mutation,
    ) -> impl Future<Output = Result<ReleasesView, AgentError>> + Send;
    /// The releases the node holds.
    fn releases(&self) -> impl Future<Output = Result<ReleasesView, AgentError>> + Send;
    /// The manifest of a release the node holds, for a node that holds `held`: whole, or
    /// a delta against one of them.
    fn manifest(
        &self,
        hash: String,
        held: Vec<String>,
    ) -> impl Future<Output = Result<ManifestAnswer, AgentError>> + Send;
    /// The manifest of release `hash`, rebuilt from the held release `base` and `delta`.
    fn rebuild_manifest(
        &self,
        base: String,
        delta: ManifestDelta,
        hash: String,
    ) -> impl Future<Output = Result<Manifest, AgentError>> + Send;
    /// The chunks of `manifest` the node holds in no release, and their bytes.
    fn missing(
        &self,
        manifest: Manifest,
    ) -> impl Future<Output = Result<(Vec<Chunk>, u64), AgentError>> + Send;
    /// One chunk of content the node holds.
    fn read_chunk(
        &self,
        sha256: String,
    ) -> impl Future<Output = Result<Vec<u8>, AgentError>> + Send;
    /// Materializes `manifest`'s release from uploaded chunks (and local content).
    fn upload(
        &self,
        manifest: Manifest,
        chunks: UploadChunks,
    ) -> impl Future<Output = Result<PrepareOutcome, AgentError>> + Send;
    /// Materializes `manifest`'s release, fetching missing chunks from `peers`.
    fn prepare(
        &self,
        manifest: Manifest,
        peers: Vec<String>,
    ) -> impl Future<Output = Result<PrepareOutcome, AgentError>> + Send;
    /// Materializes release `hash`, its manifest held or fetched from `peers` too.
    fn prepare_release(
        &self,
        hash: String,
        peers: Vec<String>,
    ) -> impl Future<Output = Result<PrepareOutcome, AgentError>> + Send;
}

fn decode_manifest(bytes: &[u8]) -> Result<Manifest, AgentError> {
    serde_json::from_slice(bytes).map_err(AgentError::BadManifest)
}

fn encode_manifest(manifest: &Manifest) -> Vec<u8> {
    serde_json::to_vec(manifest).expect("manifests always serialize")
}

fn prepare_reply(outcome: PrepareOutcome) -> pb::PrepareReply {
    pb::PrepareReply {
        hash: outcome.hash,
        fetched_bytes: outcome.fetched_bytes,
        fetched_chunks: outcome.fetched_chunks,
        reused_bytes: outcome.reused_bytes,
        elapsed_ms: outcome.elapsed_ms,
        manifest_bytes: outcome.manifest_bytes,
    }
}

fn prepare_outcome(reply: pb::PrepareReply) -> PrepareOutcome {
    PrepareOutcome {
        hash: reply.hash,
        fetched_bytes: reply.fetched_bytes,
        fetched_chunks: reply.fetched_chunks,
        reused_bytes: reply.reused_bytes,
        elapsed_ms: reply.elapsed_ms,
        manifest_bytes: reply.manifest_bytes,
    }
}

pub(super) struct AgentService<A> {
    pub agent: Arc<A>,
    /// `None` on an insecure node: mutations are fenced by term only.
    pub membership: Option<Arc<dyn Membership>>,
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<ChunkData, Status>> + Send>>;

#[tonic::async_trait]
impl<A: AgentHandler> AgentRpc for AgentService<A> {
    async fn mutate(
        &self,
        request: Request<pb::MutateRequest>,
    ) -> Result<Response<pb::MutateReply>, Status> {
        let caller = caller_of(&request)?;
        let request = request.into_inner();
        let fence = request.fence.unwrap_or_default();
        check_fence(&caller, fence.term, self.membership.as_deref())
            .map_err(|r| refusal_status(&r))?;
        let op = pb::MutateOp::try_from(request.op)
            .map_err(|_| agent_status(AgentError::UnknownMutation { op: request.op }))?;
        let mutation = match op {
            pb::MutateOp::PinPrevious => Mutation::PinPrevious,
            pb::MutateOp::Activate => Mutation::Activate(request.hash),
            pb::MutateOp::Restore => Mutation::Restore(request.hash),
            pb::MutateOp::Commit => Mutation::Commit(request.hash),
            pb::MutateOp::Restart => Mutation::Restart,
        };
        let fence = Fence {
            generation: fence.generation,
            term: fence.term,
            seq: fence.seq,
        };
        let view = self
            .agent
            .mutate(fence, mutation)
            .await
            .map_err(agent_status)?;
        Ok(Response::new(pb::MutateReply {
            current: view.current.unwrap_or_default(),
            previous: view.previous.unwrap_or_default(),
        }))
    }

    async fn releases(
        &self,
        _: Request<pb::ReleasesRequest>,
    ) -> Result<Response<pb::ReleasesReply>, Status> {
        let view = self.agent.releases().await.map_err(agent_status)?;
        Ok(Response::new(pb::ReleasesReply {
            hashes: view.hashes,
            current: view.current.unwrap_or_default(),
            previous: view.previous.unwrap_or_default(),
            free_bytes: view.free_bytes,
            fetches_manifests: view.fetches_manifests,
        }))
    }

    async fn manifest(
        &self,
        request: Request<pb::ManifestRequest>,
    ) -> Result<Response<pb::ManifestReply>, Status> {
        let request = request.into_inner();
        let answer = self
            .agent
            .manifest(request.hash, request.held)
            .await
            .map_err(agent_status)?;
        Ok(Response::new(match answer {
            ManifestAnswer::Whole(manifest) => pb::ManifestReply {
                manifest: encode_manifest(&manifest),
                ..Default::default()
            },
            ManifestAnswer::Delta { base, delta } => pb::ManifestReply {
                base,
                delta: serde_json::to_vec(&delta).expect("deltas always serialize"),
                ..Default::default()
            },
        }))
    }

    async fn missing(
        &self,
        request: Request<pb::MissingRequest>,
    ) -> Result<Response<pb::MissingReply>, Status> {
        let request = request.into_inner();
        let manifest = if request.base.is_empty() {
            decode_manifest(&request.manifest).map_err(agent_status)?
        } else {
            let delta = serde_json::from_slice(&request.delta)
                .map_err(|e| agent_status(AgentError::BadManifest(e)))?;
            self.agent
                .rebuild_manifest(request.base, delta, request.hash)
                .await
                .map_err(agent_status)?
        };
        let (chunks, bytes) = self.agent.missing(manifest).await.map_err(agent_status)?;
        Ok(Response::new(pb::MissingReply {
            chunks: chunks.into_iter().map(|c| c.sha256).collect(),
            bytes,
        }))
    }

    type ReadChunksStream = ChunkStream;

    async fn read_chunks(
        &self,
        request: Request<pb::ChunksRequest>,
    ) -> Result<Response<Self::ReadChunksStream>, Status> {
        let agent = self.agent.clone();
        let wanted = request.into_inner().sha256;
        let stream = futures::stream::iter(wanted).then(move |sha256| {
            let agent = agent.clone();
            async move {
                let mut data = agent
                    .read_chunk(sha256.clone())
                    .await
                    .map_err(agent_status)?;
                crate::crash::corrupt_served(&mut data);
                Ok(ChunkData { sha256, data })
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn upload(
        &self,
        request: Request<Streaming<pb::UploadPart>>,
    ) -> Result<Response<pb::PrepareReply>, Status> {
        let mut parts = request.into_inner();
        let first = parts
            .message()
            .await
            .map_err(|status| agent_status(AgentError::UploadBroke(Box::new(status))))?
            .ok_or_else(|| agent_status(AgentError::UploadWithoutManifest))?;
        let manifest = decode_manifest(&first.manifest).map_err(agent_status)?;
        let chunks = parts
            .map_err(|status| AgentError::UploadBroke(Box::new(status)))
            .and_then(|part| async move {
                part.chunk
                    .map(|c| (c.sha256, c.data))
                    .ok_or(AgentError::UploadPartWithoutChunk)
            });
        let outcome = self
            .agent
            .upload(manifest, Box::pin(chunks))
            .await
            .map_err(agent_status)?;
        Ok(Response::new(prepare_reply(outcome)))
    }

    async fn prepare(
        &self,
        request: Request<pb::PrepareRequest>,
    ) -> Result<Response<pb::PrepareReply>, Status> {
        let request = request.into_inner();
        check_peers(&request.peers, self.membership.as_deref()).map_err(|r| refusal_status(&r))?;
        let outcome = if request.manifest.is_empty() && !request.hash.is_empty() {
            self.agent
                .prepare_release(request.hash, request.peers)
                .await
        } else {
            let manifest = decode_manifest(&request.manifest).map_err(agent_status)?;
            self.agent.prepare(manifest, request.peers).await
        }
        .map_err(agent_status)?;
        Ok(Response::new(prepare_reply(outcome)))
    }
}

/// A client for one node's Agent service.
#[derive(Clone)]
pub struct AgentClient {
    addr: String,
    client: PbClient<Channel>,
}

impl AgentClient {
    pub fn with_channels(channels: &Channels, addr: &str) -> Result<Self, ApiError> {
        let channel = channels.for_client(addr)?;
        Ok(Self {
            addr: addr.to_string(),
            client: PbClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        })
    }

    fn error(&self, status: Status) -> ApiError {
        from_status(&self.addr, status)
    }

    /// Applies a fenced mutation; returns (current, previous) after it.
    pub async fn mutate(
        &mut self,
        fence: Fence,
        mutation: Mutation,
    ) -> Result<(Option<String>, Option<String>), ApiError> {
        let (op, hash) = match mutation {
            Mutation::PinPrevious => (pb::MutateOp::PinPrevious, String::new()),
            Mutation::Activate(hash) => (pb::MutateOp::Activate, hash),
            Mutation::Restore(hash) => (pb::MutateOp::Restore, hash),
            Mutation::Commit(hash) => (pb::MutateOp::Commit, hash),
            Mutation::Restart => (pb::MutateOp::Restart, String::new()),
        };
        let reply = self
            .client
            .mutate(pb::MutateRequest {
                fence: Some(pb::Fence {
                    generation: fence.generation,
                    term: fence.term,
                    seq: fence.seq,
                }),
                op: op as i32,
                hash,
            })
            .await
            .map_err(|s| self.error(s))?
            .into_inner();
        let some = |s: String| (!s.is_empty()).then_some(s);
        Ok((some(reply.current), some(reply.previous)))
    }

    pub async fn releases(&mut self) -> Result<ReleasesView, ApiError> {
        let reply = self
            .client
            .releases(pb::ReleasesRequest {})
            .await
            .map_err(|s| self.error(s))?
            .into_inner();
        let some = |s: String| (!s.is_empty()).then_some(s);
        Ok(ReleasesView {
            hashes: reply.hashes,
            current: some(reply.current),
            previous: some(reply.previous),
            free_bytes: reply.free_bytes,
            fetches_manifests: reply.fetches_manifests,
        })
    }

    /// The whole manifest of a release the node holds.
    pub async fn manifest(&mut self, hash: &str) -> Result<Manifest, ApiError> {
        match self.manifest_for(hash, Vec::new()).await? {
            (ManifestAnswer::Whole(manifest), _) => Ok(manifest),
            (ManifestAnswer::Delta { base, .. }, _) => Err(ApiError::internal(format!(
                "{} answered with a delta against {base}, which was not asked for",
                self.addr
            ))),
        }
    }

    /// The manifest of release `hash` for a node that holds `held`, whole or as a delta
    /// against one of them (not yet applied), and the bytes it took. A node of an older
    /// build always answers whole.
    pub async fn manifest_for(
        &mut self,
        hash: &str,
        held: Vec<String>,
    ) -> Result<(ManifestAnswer, u64), ApiError> {
        let reply = self
            .client
            .manifest(pb::ManifestRequest {
                hash: hash.to_string(),
                held,
            })
            .await
            .map_err(|s| self.error(s))?
            .into_inner();
        if reply.base.is_empty() {
            let bytes = reply.manifest.len() as u64;
            return Ok((
                ManifestAnswer::Whole(decode_manifest(&reply.manifest)?),
                bytes,
            ));
        }
        let delta = serde_json::from_slice(&reply.delta).map_err(AgentError::BadManifest)?;
        Ok((
            ManifestAnswer::Delta {
                base: reply.base,
                delta,
            },
            reply.delta.len() as u64,
        ))
    }

    /// The chunk hashes of `manifest` the node lacks, and their total size.
    pub async fn missing(&mut self, manifest: &Manifest) -> Result<(Vec<String>, u64), ApiError> {
        self.ask_missing(pb::MissingRequest {
            manifest: encode_manifest(manifest),
            ..Default::default()
        })
        .await
    }

    /// [`AgentClient::missing`] for release `hash` whose manifest is sent as `delta`
    /// against `base`, a release the node holds. Only for nodes whose
    /// [`ReleasesView::fetches_manifests`] is true.
    pub async fn missing_by_delta(
        &mut self,
        hash: &str,
        base: &str,
        delta: &ManifestDelta,
    ) -> Result<(Vec<String>, u64), ApiError> {
        self.ask_missing(pb::MissingRequest {
            manifest: Vec::new(),
            base: base.to_string(),
            delta: serde_json::to_vec(delta).expect("deltas always serialize"),
            hash: hash.to_string(),
        })
        .await
    }

    async fn ask_missing(
        &mut self,
        request: pb::MissingRequest,
    ) -> Result<(Vec<String>, u64), ApiError> {
        let reply = self
            .client
            .missing(request)
            .await
            .map_err(|s| self.error(s))?
            .into_inner();
        Ok((reply.chunks, reply.bytes))
    }

    /// Streams the requested chunks from the node.
    pub async fn read_chunks(
        &mut self,
        sha256: Vec<String>,
    ) -> Result<
        impl Stream<Item = Result<(String, Vec<u8>), ApiError>> + Send + Unpin + use<>,
        ApiError,
    > {
        let addr = self.addr.clone();
        let stream = self
            .client
            .read_chunks(pb::ChunksRequest { sha256 })
            .await
            .map_err(|s| self.error(s))?
            .into_inner();
        Ok(stream
            .map_ok(|chunk| (chunk.sha256, chunk.data))
            .map_err(move |s| from_status(&addr, s)))
    }

    /// Uploads `manifest` and the chunks the node reported missing.
    pub async fn upload(
        &mut self,
        manifest: &Manifest,
        chunks: impl Stream<Item = Result<(String, Vec<u8>), ApiError>> + Send + 'static,
    ) -> Result<PrepareOutcome, ApiError> {
        let first = pb::UploadPart {
            manifest: encode_manifest(manifest),
            chunk: None,
        };
        // A chunk that cannot be read ends the stream; that error, not the node's
        // "chunks missing" reply, is what the caller needs to see.
        let broke: Arc<std::sync::Mutex<Option<ApiError>>> = Arc::default();
        let broke_in_stream = broke.clone();
        let rest = chunks
            .take_while(move |item| {
                if let Err(e) = item {
                    *broke_in_stream.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
                }
                futures::future::ready(item.is_ok())
            })
            .filter_map(|item| {
                futures::future::ready(item.ok().map(|(sha256, data)| pb::UploadPart {
                    manifest: Vec::new(),
                    chunk: Some(ChunkData { sha256, data }),
                }))
            });
        let parts = futures::stream::iter([first]).chain(rest);
        let reply = self.client.upload(parts).await;
        if let Some(error) = broke.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(error);
        }
        Ok(prepare_outcome(
            reply.map_err(|s| self.error(s))?.into_inner(),
        ))
    }

    /// Asks the node to materialize `manifest`, fetching missing chunks from `peers`.
    pub async fn prepare(
        &mut self,
        manifest: &Manifest,
        peers: Vec<String>,
    ) -> Result<PrepareOutcome, ApiError> {
        self.ask_prepare(pb::PrepareRequest {
            manifest: encode_manifest(manifest),
            peers,
            hash: String::new(),
        })
        .await
    }

    /// Asks the node to materialize release `hash`, taking the manifest from its own
    /// releases or from `peers` (as a delta when it can), and missing chunks from `peers`.
    /// Only for nodes whose [`ReleasesView::fetches_manifests`] is true.
    pub async fn prepare_release(
        &mut self,
        hash: &str,
        peers: Vec<String>,
    ) -> Result<PrepareOutcome, ApiError> {
        self.ask_prepare(pb::PrepareRequest {
            manifest: Vec::new(),
            peers,
            hash: hash.to_string(),
        })
        .await
    }

    async fn ask_prepare(
        &mut self,
        request: pb::PrepareRequest,
    ) -> Result<PrepareOutcome, ApiError> {
        let reply = self
            .client
            .prepare(request)
            .await
            .map_err(|s| self.error(s))?
            .into_inner();
        Ok(prepare_outcome(reply))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifest_of_a_release_at_the_default_limits_fits_one_message() {
        use crate::release::manifest::{Chunk, Entry, EntryKind};
        let limits = crate::release::Limits::default();
        let hex = "ab".repeat(32);
        let chunk = 64 * 1024;
        let file = |path: String, size: u64| Entry {
            path,
            kind: EntryKind::File {
                mode: 0o644,
                size,
                sha256: hex.clone(),
                chunks: (0..size.div_ceil(chunk))
                    .map(|_| Chunk {
                        sha256: hex.clone(),
                        size: chunk,
                    })
                    .collect(),
            },
        };
        // Most entries are small files; a few large ones hold the rest of the bytes.
        let small = limits.max_entries - 8;
        let mut entries: Vec<Entry> = (0..small)
            .map(|i| file(format!("share/assets/{i:06}/file.dat"), 4096))
            .collect();
        let rest = limits.max_total_bytes - small as u64 * 4096;
        entries.extend((0..8).map(|i| file(format!("lib/big-{i}.bin"), rest / 8)));
        let manifest = Manifest {
            entries,
            ..Default::default()
        };
        let bytes = encode_manifest(&manifest).len();
        assert!(
            bytes < MAX_MESSAGE_BYTES * 3 / 4,
            "a manifest at the default limits takes {} MiB: too little room under {} MiB",
            bytes >> 20,
            MAX_MESSAGE_BYTES >> 20
        );
    }
    use crate::agent::Agent;
    use crate::api::ErrorKind;
    use futures::StreamExt;

    /// Serves the Agent service of a fresh data dir on an OS-assigned port until the test's
    /// runtime ends; returns the address and the data dir (deleted when dropped).
    async fn serve_agent() -> (String, tempfile::TempDir) {
        let data = tempfile::tempdir().unwrap();
        let agent = Agent::open(
            data.path(),
            Channels::new(&crate::tls::Security::Insecure),
            Arc::new(|| 1),
            Arc::default(),
            "dev".into(),
            crate::release::TrustedKeys::default(),
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let service = super::super::pb::agent_server::AgentServer::new(AgentService {
            agent: Arc::new(agent),
            membership: None,
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        (addr, data)
    }

    #[tokio::test]
    async fn a_client_sees_not_found_for_what_the_node_does_not_hold() {
        let (addr, _data) = serve_agent().await;
        let channels = Channels::new(&crate::tls::Security::Insecure);
        let mut client = AgentClient::with_channels(&channels, &addr).unwrap();
        let unknown = "0".repeat(64);

        let error = client.manifest(&unknown).await.unwrap_err();
        assert_eq!(error.kind, ErrorKind::NotFound, "{error}");
        assert!(
            error.message.contains(&unknown) && error.message.contains("install it first"),
            "{error}"
        );

        let mut chunks = client.read_chunks(vec!["c".repeat(64)]).await.unwrap();
        let error = chunks.next().await.unwrap().unwrap_err();
        assert_eq!(error.kind, ErrorKind::NotFound, "{error}");

        let error = client.manifest("../etc").await.unwrap_err();
        assert_eq!(error.kind, ErrorKind::InvalidArgument, "{error}");
    }
}
