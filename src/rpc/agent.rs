//! The Agent gRPC service (releases on a node's disk) and its client.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt, TryStreamExt};
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use super::pb::agent_client::AgentClient as PbClient;
use super::pb::agent_server::Agent as AgentRpc;
use super::pb::{self, ChunkData};
use super::status::{from_status, to_status};
use super::{Channels, MAX_MESSAGE_BYTES};
use crate::agent::{Agent, Fence, Mutation};
use crate::api::{ApiError, ErrorKind, PrepareOutcome, ReleasesView};
use crate::release::Manifest;

fn decode_manifest(bytes: &[u8]) -> Result<Manifest, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            ErrorKind::InvalidArgument,
            format!("undecodable manifest: {e}"),
        )
    })
}

fn encode_manifest(manifest: &Manifest) -> Result<Vec<u8>, ApiError> {
    serde_json::to_vec(manifest).map_err(|e| ApiError::internal(e.to_string()))
}

fn prepare_reply(outcome: PrepareOutcome) -> pb::PrepareReply {
    pb::PrepareReply {
        hash: outcome.hash,
        fetched_bytes: outcome.fetched_bytes,
        fetched_chunks: outcome.fetched_chunks,
        reused_bytes: outcome.reused_bytes,
        elapsed_ms: outcome.elapsed_ms,
    }
}

fn prepare_outcome(reply: pb::PrepareReply) -> PrepareOutcome {
    PrepareOutcome {
        hash: reply.hash,
        fetched_bytes: reply.fetched_bytes,
        fetched_chunks: reply.fetched_chunks,
        reused_bytes: reply.reused_bytes,
        elapsed_ms: reply.elapsed_ms,
    }
}

pub(super) struct AgentService {
    pub agent: Arc<Agent>,
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<ChunkData, Status>> + Send>>;

#[tonic::async_trait]
impl AgentRpc for AgentService {
    async fn mutate(
        &self,
        request: Request<pb::MutateRequest>,
    ) -> Result<Response<pb::MutateReply>, Status> {
        let request = request.into_inner();
        let fence = request.fence.unwrap_or_default();
        let op = pb::MutateOp::try_from(request.op)
            .map_err(|_| Status::invalid_argument(format!("unknown mutation {}", request.op)))?;
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
            .map_err(to_status)?;
        Ok(Response::new(pb::MutateReply {
            current: view.current.unwrap_or_default(),
            previous: view.previous.unwrap_or_default(),
        }))
    }

    async fn releases(
        &self,
        _: Request<pb::ReleasesRequest>,
    ) -> Result<Response<pb::ReleasesReply>, Status> {
        let view = self.agent.releases().await.map_err(to_status)?;
        Ok(Response::new(pb::ReleasesReply {
            hashes: view.hashes,
            current: view.current.unwrap_or_default(),
            previous: view.previous.unwrap_or_default(),
            free_bytes: view.free_bytes,
        }))
    }

    async fn manifest(
        &self,
        request: Request<pb::ManifestRequest>,
    ) -> Result<Response<pb::ManifestReply>, Status> {
        let manifest = self
            .agent
            .manifest(&request.into_inner().hash)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ManifestReply {
            manifest: encode_manifest(&manifest).map_err(to_status)?,
        }))
    }

    async fn missing(
        &self,
        request: Request<pb::MissingRequest>,
    ) -> Result<Response<pb::MissingReply>, Status> {
        let manifest = decode_manifest(&request.into_inner().manifest).map_err(to_status)?;
        let (chunks, bytes) = self.agent.missing(manifest).await.map_err(to_status)?;
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
                let data = agent.read_chunk(sha256.clone()).await.map_err(to_status)?;
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
        let first = parts.message().await?.ok_or_else(|| {
            Status::invalid_argument("an upload starts with a part carrying the manifest")
        })?;
        let manifest = decode_manifest(&first.manifest).map_err(to_status)?;
        let chunks = parts
            .map_err(|status| ApiError::unavailable(format!("upload stream broke: {status}")))
            .and_then(|part| async move {
                part.chunk.map(|c| (c.sha256, c.data)).ok_or_else(|| {
                    ApiError::new(ErrorKind::InvalidArgument, "upload part without a chunk")
                })
            });
        let outcome = self
            .agent
            .upload(manifest, Box::pin(chunks))
            .await
            .map_err(to_status)?;
        Ok(Response::new(prepare_reply(outcome)))
    }

    async fn prepare(
        &self,
        request: Request<pb::PrepareRequest>,
    ) -> Result<Response<pb::PrepareReply>, Status> {
        let request = request.into_inner();
        let manifest = decode_manifest(&request.manifest).map_err(to_status)?;
        let outcome = self
            .agent
            .prepare(manifest, request.peers)
            .await
            .map_err(to_status)?;
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
    pub fn new(addr: &str) -> Result<Self, ApiError> {
        Self::with_channels(&Channels::default(), addr)
    }

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
        })
    }

    pub async fn manifest(&mut self, hash: &str) -> Result<Manifest, ApiError> {
        let reply = self
            .client
            .manifest(pb::ManifestRequest {
                hash: hash.to_string(),
            })
            .await
            .map_err(|s| self.error(s))?
            .into_inner();
        decode_manifest(&reply.manifest)
    }

    /// The chunk hashes of `manifest` the node lacks, and their total size.
    pub async fn missing(&mut self, manifest: &Manifest) -> Result<(Vec<String>, u64), ApiError> {
        let reply = self
            .client
            .missing(pb::MissingRequest {
                manifest: encode_manifest(manifest)?,
            })
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
            manifest: encode_manifest(manifest)?,
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
        let reply = self
            .client
            .prepare(pb::PrepareRequest {
                manifest: encode_manifest(manifest)?,
                peers,
            })
            .await
            .map_err(|s| self.error(s))?
            .into_inner();
        Ok(prepare_outcome(reply))
    }
}
