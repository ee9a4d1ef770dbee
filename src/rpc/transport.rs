//! Connections to peers: one lazily connected, reused HTTP/2 channel per address, and the
//! byte-level Raft RPC client (openraft's types are encoded by `raft::network`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::pb::raft_client::RaftClient;
use super::pb::RaftRequest;
use super::status::raft_call_error;
use super::RAFT_MESSAGE_BYTES;
use crate::tls::{Security, SERVER_NAME};

/// How long to wait for a TCP connection to a peer. Short: a dead peer must not hold
/// up heartbeats to the others, and openraft backs off on `Unreachable` by itself.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// HTTP/2 keepalive: a silently dropped link is noticed within interval + timeout.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a TLS handshake may take, on either side.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The channel pool shared by the Raft network and Control forwarding. Every channel
/// of a pool speaks TLS with the pool's credentials, or none does (`--insecure`).
#[derive(Clone)]
pub struct Channels {
    by_addr: Arc<Mutex<HashMap<String, Channel>>>,
    /// `None`: plaintext.
    tls: Option<ClientTlsConfig>,
}

impl Channels {
    /// A pool whose channels present `security`'s certificate and trust only its CA.
    pub fn new(security: &Security) -> Channels {
        let tls = match security {
            Security::Insecure => None,
            Security::Tls(credentials) => Some(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&credentials.ca_pem))
                    .identity(Identity::from_pem(
                        &credentials.cert_pem,
                        &credentials.key_pem,
                    ))
                    .domain_name(SERVER_NAME)
                    .timeout(HANDSHAKE_TIMEOUT),
            ),
        };
        Channels {
            by_addr: Arc::default(),
            tls,
        }
    }

    /// The channel to `addr`, created on first use. Connecting is lazy, so this never blocks.
    pub fn get(&self, addr: &str) -> Result<Channel, TransportError> {
        let mut by_addr = self.by_addr.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(channel) = by_addr.get(addr) {
            return Ok(channel.clone());
        }
        let bad_address = |source: tonic::transport::Error| TransportError::BadAddress {
            addr: addr.to_string(),
            source: Box::new(source),
        };
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(bad_address)?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).map_err(bad_address)?;
        }
        let channel = endpoint.connect_lazy();
        by_addr.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }
}

impl Channels {
    /// The channel for a client of `addr`, with an error that tells the user the format.
    pub(super) fn for_client(&self, addr: &str) -> Result<Channel, crate::api::ApiError> {
        Ok(self.get(addr)?)
    }
}

/// The Raft RPCs, each a method of the `Raft` gRPC service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RaftRpc {
    AppendEntries,
    Vote,
    PreVote,
    InstallSnapshot,
    TransferLeader,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// `addr` is not an address a channel can be made for.
    #[error("bad address {addr:?}: expected host:port, e.g. 127.0.0.1:7100")]
    BadAddress {
        addr: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// No answer: connection refused, reset, or not established in time.
    #[error("unreachable: {0}")]
    Unreachable(String),
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The peer answered with an error (it is shutting down, or hit a fatal error).
    #[error("peer error: {0}")]
    Remote(String),
}

/// A Raft client for one peer over its pooled channel.
#[derive(Clone)]
pub struct RaftPeer {
    client: RaftClient<Channel>,
}

impl RaftPeer {
    pub fn new(channels: &Channels, addr: &str) -> Result<Self, TransportError> {
        let client = RaftClient::new(channels.get(addr)?)
            .max_decoding_message_size(RAFT_MESSAGE_BYTES)
            .max_encoding_message_size(RAFT_MESSAGE_BYTES);
        Ok(Self { client })
    }

    /// Sends one encoded request and returns the encoded reply.
    pub async fn call(
        &mut self,
        rpc: RaftRpc,
        payload: Vec<u8>,
        data: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        let mut request = tonic::Request::new(RaftRequest { payload, data });
        request.set_timeout(timeout);
        let call = async {
            match rpc {
                RaftRpc::AppendEntries => self.client.append_entries(request).await,
                RaftRpc::Vote => self.client.vote(request).await,
                RaftRpc::PreVote => self.client.pre_vote(request).await,
                RaftRpc::InstallSnapshot => self.client.install_snapshot(request).await,
                RaftRpc::TransferLeader => self.client.transfer_leader(request).await,
            }
        };
        // The gRPC deadline covers the server; this covers a connection that never completes.
        let reply = tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| TransportError::Timeout(timeout))?
            .map_err(|status| raft_call_error(status, timeout))?
            .into_inner();
        if !reply.error.is_empty() {
            return Err(TransportError::Remote(reply.error));
        }
        Ok(reply.payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    /// A gRPC server on `addr` in a runtime of its own: shutting the runtime down drops
    /// every connection at once, as a killed process would (see [`stop`]).
    fn serve(addr: SocketAddr) -> tokio::runtime::Runtime {
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let (reporter, service) = tonic_health::server::health_reporter();
                reporter
                    .set_service_status("", tonic_health::ServingStatus::Serving)
                    .await;
                // The previous server's runtime closes its listener in the background.
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                let listener = loop {
                    match tokio::net::TcpListener::bind(addr).await {
                        Ok(listener) => break listener,
                        Err(_) if std::time::Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Err(e) => panic!("{addr} stays in use: {e}"),
                    }
                };
                tokio::spawn(
                    tonic::transport::Server::builder()
                        .add_service(service)
                        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
                );
            });
            runtime
        })
        .join()
        .unwrap()
    }

    async fn check(channels: &Channels, addr: SocketAddr) -> Result<(), String> {
        let channel = channels.get(&addr.to_string()).unwrap();
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .map(|_| ())
            .map_err(|status| status.message().to_string())
    }

    /// A node's peers restart on the same address; the pooled channel must reach the
    /// new process once it listens, failed requests or none between. (The first request
    /// after a restart may still go out on the old connection, if the client has not yet
    /// read its close: that one fails, and the next connects anew. What must not happen,
    /// and did, is a channel that fails every request from then on.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pooled_channel_reaches_a_peer_restarted_on_the_same_address() {
        let channels = Channels::new(&Security::Insecure);
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = free.local_addr().unwrap();
        drop(free);
        let server = serve(addr);
        assert_eq!(check(&channels, addr).await, Ok(()));
        stop(server).await;
        assert!(check(&channels, addr).await.is_err(), "nobody listens");
        let server = serve(addr);
        assert_eq!(reaches(&channels, addr).await, Ok(()));
        stop(server).await;
        let server = serve(addr);
        assert_eq!(
            reaches(&channels, addr).await,
            Ok(()),
            "restarted with no request between"
        );
        stop(server).await;
    }

    /// Health checks through the pooled channel until one succeeds, for up to 10 s; the
    /// last error if none does.
    async fn reaches(channels: &Channels, addr: SocketAddr) -> Result<(), String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match check(channels, addr).await {
                Err(_) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                result => return result,
            }
        }
    }

    /// Stops a server as a killed process stops: every socket closed before anything
    /// else can start. (In the background, a new server could bind while the old one's
    /// connections were still open, and a request would reach the dying process.)
    async fn stop(server: tokio::runtime::Runtime) {
        tokio::task::spawn_blocking(move || server.shutdown_timeout(Duration::from_secs(10)))
            .await
            .unwrap();
    }
}
