//! The attacks a process that can reach a node's port might try, each refused: a
//! plaintext client, a TLS client with no certificate or another CA's, a viewer, an
//! operator calling what only members may, a member claiming another's identity, a node
//! certificate that is not a member, and a follower forging a leader's mutation. After
//! every attack the cluster keeps its leader and term, accepts operator writes, and no
//! node's agent fence moved.
//!
//! The hostile client speaks raw gRPC (its own message types, any method path), which no
//! client in `src/rpc` can do by design: this file is the one test that may use tonic
//! and prost directly.

use std::time::Duration;

use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

use crate::harness::{cli, creds, Cluster};

#[derive(Clone, PartialEq, prost::Message)]
struct RaftRequest {
    #[prost(bytes = "vec", tag = "1")]
    payload: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    data: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RaftReply {
    #[prost(bytes = "vec", tag = "1")]
    payload: Vec<u8>,
    #[prost(string, tag = "2")]
    error: String,
}

/// Any reply whose fields do not matter here (prost skips unknown fields).
#[derive(Clone, PartialEq, prost::Message)]
struct Ignored {}

#[derive(Clone, PartialEq, prost::Message)]
struct StatusRequest {
    #[prost(bool, tag = "1")]
    local_only: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
struct WriteRequest {
    #[prost(bytes = "vec", tag = "1")]
    command: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct JoinRequest {
    #[prost(uint64, tag = "1")]
    id: u64,
    #[prost(string, tag = "2")]
    addr: String,
    #[prost(string, tag = "3")]
    cluster_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Fence {
    #[prost(uint64, tag = "1")]
    generation: u64,
    #[prost(uint64, tag = "2")]
    term: u64,
    #[prost(uint64, tag = "3")]
    seq: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct MutateRequest {
    #[prost(message, optional, tag = "1")]
    fence: Option<Fence>,
    /// 1 = ACTIVATE, 4 = RESTART.
    #[prost(int32, tag = "2")]
    op: i32,
    #[prost(string, tag = "3")]
    hash: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ChunksRequest {
    #[prost(string, repeated, tag = "1")]
    sha256: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PrepareRequest {
    #[prost(bytes = "vec", tag = "1")]
    manifest: Vec<u8>,
    #[prost(string, repeated, tag = "2")]
    peers: Vec<String>,
}

/// How the hostile client connects.
enum As<'a> {
    Plaintext,
    /// TLS that trusts the cluster CA but presents no certificate.
    NoCertificate,
    /// TLS with the credentials directory `name` of the test CA (or `stranger`, another CA's).
    Creds(&'a str),
}

async fn channel(addr: &str, who: As<'_>) -> Result<Channel, String> {
    let ca = std::fs::read_to_string(creds("operator").join("ca.pem")).unwrap();
    let endpoint = match who {
        As::Plaintext => Endpoint::from_shared(format!("http://{addr}")).unwrap(),
        As::NoCertificate => Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&ca))
                    .domain_name("cluster-node"),
            )
            .unwrap(),
        As::Creds(name) => {
            let dir = creds(name);
            let read = |file: &str| std::fs::read_to_string(dir.join(file)).unwrap();
            Endpoint::from_shared(format!("https://{addr}"))
                .unwrap()
                .tls_config(
                    ClientTlsConfig::new()
                        // Trust the real cluster CA, so only the client side is foreign.
                        .ca_certificate(Certificate::from_pem(&ca))
                        .identity(Identity::from_pem(read("cert.pem"), read("key.pem")))
                        .domain_name("cluster-node"),
                )
                .unwrap()
        }
    };
    endpoint
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

/// One raw unary call. `Err` carries a transport failure as an UNAVAILABLE status.
async fn call<Req, Reply>(
    addr: &str,
    who: As<'_>,
    path: &'static str,
    request: Req,
) -> Result<Reply, Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Reply: prost::Message + Default + Send + Sync + 'static,
{
    let channel = channel(addr, who).await.map_err(Status::unavailable)?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<Req, Reply>::default();
    grpc.unary(
        tonic::Request::new(request),
        PathAndQuery::from_static(path),
        codec,
    )
    .await
    .map(tonic::Response::into_inner)
}

/// A server-streaming call, read to its first message or error.
async fn call_stream(
    addr: &str,
    who: As<'_>,
    path: &'static str,
    request: ChunksRequest,
) -> Result<(), Status> {
    let channel = channel(addr, who).await.map_err(Status::unavailable)?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<ChunksRequest, Ignored>::default();
    let mut stream = grpc
        .server_streaming(
            tonic::Request::new(request),
            PathAndQuery::from_static(path),
            codec,
        )
        .await?
        .into_inner();
    stream.message().await.map(|_| ())
}

/// A vote request for `candidate` in the highest term there is: accepted, it would leave
/// the cluster with no leader for good.
fn doomsday_vote(candidate: u64) -> RaftRequest {
    let payload = serde_json::json!({
        "vote": {"leader_id": {"term": u64::MAX, "node_id": candidate}, "committed": false},
        "last_log_id": null,
        "leadership_transfer": true,
    });
    RaftRequest {
        payload: serde_json::to_vec(&payload).unwrap(),
        data: Vec::new(),
    }
}

fn write(command: serde_json::Value) -> WriteRequest {
    WriteRequest {
        command: serde_json::to_vec(&command).unwrap(),
    }
}

#[track_caller]
fn refused<T: std::fmt::Debug>(what: &str, result: Result<T, Status>, codes: &[Code], says: &str) {
    match result {
        Ok(reply) => panic!("{what}: accepted ({reply:?})"),
        Err(status) => {
            assert!(
                codes.contains(&status.code()),
                "{what}: refused with {:?}, expected one of {codes:?}: {}",
                status.code(),
                status.message()
            );
            assert!(
                status.message().contains(says),
                "{what}: {:?} does not say {says:?}",
                status.message()
            );
        }
    }
}

const DENIED: &[Code] = &[Code::PermissionDenied];
/// The handshake fails: the client sees a broken or refused connection.
const NO_HANDSHAKE: &[Code] = &[
    Code::Unavailable,
    Code::Unknown,
    Code::Internal,
    Code::Cancelled,
];

fn fences(cluster: &Cluster) -> Vec<Option<Vec<u8>>> {
    cluster
        .nodes
        .values()
        .map(|n| std::fs::read(n.data_dir.join("agent-fence.json")).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attack_is_refused_and_the_cluster_keeps_its_leader() {
    let cluster = Cluster::start(3).await;
    let before = cluster.leader_status().await;
    let leader = before.leader.unwrap();
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let addr = cluster.addr(follower);
    let leader_addr = cluster.addr(leader);
    let fences_before = fences(&cluster);

    // Anyone can still try the port: without the CA's certificate nothing gets through.
    for (who, name) in [
        (As::Plaintext, "plaintext"),
        (As::NoCertificate, "TLS without a certificate"),
        (As::Creds("stranger"), "a certificate of another CA"),
    ] {
        let status = call::<_, Ignored>(
            &addr,
            who,
            "/cluster.v1.Control/Status",
            StatusRequest::default(),
        )
        .await;
        refused(&format!("status over {name}"), status, NO_HANDSHAKE, "");
    }
    for who in [As::Plaintext, As::NoCertificate, As::Creds("stranger")] {
        let vote =
            call::<_, RaftReply>(&addr, who, "/cluster.v1.Raft/Vote", doomsday_vote(follower))
                .await;
        refused(
            "a forged vote without a cluster certificate",
            vote,
            NO_HANDSHAKE,
            "",
        );
    }
    // The CLI says what went wrong.
    let plaintext = cli(&["status", "--insecure", "--node", &addr]);
    assert!(!plaintext.status.success());
    let stranger = cli(&[
        "status",
        "--tls",
        creds("stranger").to_str().unwrap(),
        "--node",
        &addr,
    ]);
    let said = String::from_utf8_lossy(&stranger.stderr);
    assert!(
        !stranger.status.success() && said.contains("TLS with node"),
        "{said}"
    );

    // A viewer reads, and changes nothing.
    call::<_, Ignored>(
        &addr,
        As::Creds("viewer"),
        "/cluster.v1.Control/Status",
        StatusRequest::default(),
    )
    .await
    .expect("a viewer reads the status");
    let put = write(serde_json::json!({"kv_put": {"key": "k", "value": "v"}}));
    refused(
        "a viewer's kv put",
        call::<_, Ignored>(
            &addr,
            As::Creds("viewer"),
            "/cluster.v1.Control/Write",
            put.clone(),
        )
        .await,
        DENIED,
        "needs the operator or node role",
    );
    refused(
        "a viewer's leader transfer",
        call::<_, Ignored>(
            &addr,
            As::Creds("viewer"),
            "/cluster.v1.Control/TransferLeader",
            Ignored {},
        )
        .await,
        DENIED,
        "may not call",
    );

    // An operator operates, but is not a member: no Raft, no agent mutation, no content.
    for path in [
        "/cluster.v1.Raft/Vote",
        "/cluster.v1.Raft/AppendEntries",
        "/cluster.v1.Raft/TransferLeader",
    ] {
        let path: &'static str = path;
        refused(
            path,
            call::<_, RaftReply>(&addr, As::Creds("operator"), path, doomsday_vote(follower)).await,
            DENIED,
            "needs the node role",
        );
    }
    let activate = MutateRequest {
        fence: Some(Fence {
            generation: u64::MAX,
            term: u64::MAX,
            seq: 0,
        }),
        op: 1,
        hash: "0".repeat(64),
    };
    refused(
        "an operator's agent mutation",
        call::<_, Ignored>(
            &addr,
            As::Creds("operator"),
            "/cluster.v1.Agent/Mutate",
            activate.clone(),
        )
        .await,
        DENIED,
        "needs the node role",
    );
    refused(
        "an operator reading release content",
        call_stream(
            &addr,
            As::Creds("operator"),
            "/cluster.v1.Agent/ReadChunks",
            ChunksRequest {
                sha256: vec!["0".repeat(64)],
            },
        )
        .await,
        DENIED,
        "needs the node role",
    );
    refused(
        "an operator joining a node",
        call::<_, Ignored>(
            &addr,
            As::Creds("operator"),
            "/cluster.v1.Control/Join",
            JoinRequest {
                id: 7,
                addr: "127.0.0.1:1".into(),
                cluster_id: String::new(),
            },
        )
        .await,
        DENIED,
        "needs the node role",
    );
    // Internal commands never come from the wire, whoever sends them.
    for (who, command, says) in [
        (
            "operator",
            serde_json::json!({"set_auto_rollout": {"enabled": false}}),
            "set_auto_rollout",
        ),
        (
            "operator",
            serde_json::json!({"register_node": {"id": follower, "info": {"addr": "h:1", "build_hash": "forged"}}}),
            "may not speak for",
        ),
        (
            "n1",
            serde_json::json!({"abort_deployment": {"generation": 1, "revert": false, "reason": "x"}}),
            "abort_deployment",
        ),
    ] {
        refused(
            &format!("{who} proposing {command}"),
            call::<_, Ignored>(
                &addr,
                As::Creds(who),
                "/cluster.v1.Control/Write",
                write(command),
            )
            .await,
            DENIED,
            says,
        );
    }

    // A member may not claim to be another member.
    let other = (1..=3).find(|id| *id != follower && *id != leader).unwrap();
    let impostor = format!("n{other}");
    let forged = call::<_, RaftReply>(
        &addr,
        As::Creds(&impostor),
        "/cluster.v1.Raft/Vote",
        doomsday_vote(leader),
    )
    .await
    .expect("the Raft service answers members");
    assert!(
        forged
            .error
            .contains(&format!("carrying node {leader}'s vote")),
        "a vote claiming another candidate: {forged:?}"
    );
    refused(
        "a self-report for another node",
        call::<_, Ignored>(
            &addr,
            As::Creds(&impostor),
            "/cluster.v1.Control/Write",
            write(serde_json::json!({"register_node": {"id": leader, "info": {"addr": "h:1"}}})),
        )
        .await,
        DENIED,
        "may not speak for",
    );
    refused(
        "a join under another node's id",
        call::<_, Ignored>(
            &addr,
            As::Creds(&impostor),
            "/cluster.v1.Control/Join",
            JoinRequest {
                id: 9,
                addr: "127.0.0.1:1".into(),
                cluster_id: String::new(),
            },
        )
        .await,
        DENIED,
        "may not speak for node 9",
    );

    // A node certificate of the CA that is not a member gets nothing but a join.
    refused(
        "a non-member's vote",
        call::<_, RaftReply>(
            &addr,
            As::Creds("n9"),
            "/cluster.v1.Raft/Vote",
            doomsday_vote(9),
        )
        .await,
        DENIED,
        "node 9 is not a member",
    );
    refused(
        "a non-member's mutation",
        call::<_, Ignored>(
            &addr,
            As::Creds("n9"),
            "/cluster.v1.Agent/Mutate",
            activate.clone(),
        )
        .await,
        DENIED,
        "not a member",
    );

    // A member that does not lead may not act on an agent, even with a fence that would
    // poison it (u64::MAX): the fence stays where it was.
    let term = before.term;
    for fence_term in [term, u64::MAX] {
        let mut mutation = activate.clone();
        mutation.fence = Some(Fence {
            generation: u64::MAX,
            term: fence_term,
            seq: 0,
        });
        refused(
            "a follower's mutation",
            call::<_, Ignored>(
                &leader_addr,
                As::Creds(&format!("n{follower}")),
                "/cluster.v1.Agent/Mutate",
                mutation,
            )
            .await,
            DENIED,
            "does not lead term",
        );
    }

    // Bounds: a kv value over the limit is refused before it is proposed; a message over
    // the Control limit is refused whole; a prepare may fetch only from members.
    let huge = "x".repeat(1024 * 1024 + 1);
    refused(
        "an operator's kv value over the limit",
        call::<_, Ignored>(
            &addr,
            As::Creds("operator"),
            "/cluster.v1.Control/Write",
            write(serde_json::json!({"kv_put": {"key": "big", "value": huge}})),
        )
        .await,
        &[Code::InvalidArgument],
        "over the limit of 1048576 bytes",
    );
    let too_long = WriteRequest {
        command: vec![b' '; 65 * 1024 * 1024],
    };
    refused(
        "a 65 MiB Control message",
        call::<_, Ignored>(
            &addr,
            As::Creds("operator"),
            "/cluster.v1.Control/Write",
            too_long,
        )
        .await,
        &[Code::OutOfRange, Code::ResourceExhausted],
        "",
    );
    refused(
        "a prepare fetching from an address that is not a member's",
        call::<_, Ignored>(
            &addr,
            As::Creds("operator"),
            "/cluster.v1.Agent/Prepare",
            PrepareRequest {
                manifest: b"{}".to_vec(),
                peers: vec![leader_addr.clone(), "169.254.169.254:80".into()],
            },
        )
        .await,
        DENIED,
        "169.254.169.254:80 is not the address of a member",
    );

    // Nothing moved: same leader, same term, writes work, fences unchanged.
    let after = cluster.leader_status().await;
    assert_eq!(
        (after.leader, after.term),
        (before.leader, before.term),
        "the cluster kept its leader"
    );
    let put = cli(&["kv", "put", "after-attacks", "ok", "--node", &addr]);
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    assert_eq!(fences(&cluster), fences_before, "no agent fence moved");
    let big = cli(&["kv", "get", "big", "--node", &addr]);
    assert!(!big.status.success(), "the oversize value was not stored");
    let node = after.nodes.iter().find(|n| n.id == follower).unwrap();
    assert_ne!(node.build_hash, "forged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_to_start_with_another_nodes_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let out = cli(&[
        "node",
        "run",
        "--id",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        dir.path().join("n1").to_str().unwrap(),
        "--bootstrap",
        "--tls",
        creds("n2").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("is for node 2, and this is node 1"), "{said}");
    let none = cli(&[
        "node",
        "run",
        "--id",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        "/tmp/x",
    ]);
    let said = String::from_utf8_lossy(&none.stderr);
    assert!(
        !none.status.success() && said.contains("a node needs --tls <dir>"),
        "{said}"
    );
    // A client without credentials is told how to get them.
    let client = std::process::Command::new(crate::harness::BIN)
        .args(["status", "--node", "127.0.0.1:1"])
        .env_remove("CLUSTER_TLS")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&client.stderr);
    assert!(
        !client.status.success() && said.contains("no credentials"),
        "{said}"
    );
}
