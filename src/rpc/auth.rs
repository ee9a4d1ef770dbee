//! Who may call what: the role table, and the layer that enforces it before any service
//! sees a request.
//!
//! Identity comes only from the peer's TLS certificate (verified against the cluster CA
//! during the handshake), never from a field of the request. The layer refuses a method
//! the table does not list, a role the table does not allow, and a node certificate whose
//! id is not a member here (a node that is still joining accepts any node: it has no
//! membership yet). What a request claims inside itself (a vote's candidate, a join's
//! id, a self-report's node, an agent fence's term) is checked against the same identity
//! by the functions below, called by the services.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::body::Body;
use tonic::codegen::{http, Service};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower_layer::Layer;

use crate::api::{Operation, UpdateOptions};
use crate::state::{Command, Starter};
use crate::tls::{Identity, Role, TlsError};

/// What a node knows about its cluster's members, for authorization.
pub trait Membership: Send + Sync + 'static {
    /// Whether node `id` is a voter or learner in this node's membership. True for every
    /// id while this node has no membership yet (it is joining).
    fn admits(&self, id: u64) -> bool;
    /// The node this node knows to lead `term`, if any.
    fn leader_of(&self, term: u64) -> Option<u64>;
    /// Whether `addr` is the address of a voter or learner in this node's membership.
    fn has_addr(&self, addr: &str) -> bool;
}

/// Who made a request, as its certificate proves. `identity` is `None` only on a node
/// started with `--insecure`, where nobody is authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub identity: Option<Identity>,
}

impl Caller {
    /// The caller of a node that authenticates nobody.
    pub fn unauthenticated() -> Caller {
        Caller { identity: None }
    }

    /// Whether the request may speak for node `id`: that node's certificate does, and on
    /// an insecure node anyone does.
    pub fn may_speak_for(&self, id: u64) -> bool {
        match &self.identity {
            None => true,
            Some(identity) => identity.node_id() == Some(id),
        }
    }

    /// The node id the caller's certificate names; `None` for people and on insecure nodes.
    pub fn node_id(&self) -> Option<u64> {
        self.identity.as_ref().and_then(Identity::node_id)
    }
}

const NODE: &[Role] = &[Role::Node];
/// Operators, and members forwarding an operator's request to the leader.
const OPERATE: &[Role] = &[Role::Operator, Role::Node];
const VIEW: &[Role] = &[Role::Viewer, Role::Operator, Role::Node];

/// Every RPC and the roles that may call it. A method missing here is refused.
pub const TABLE: &[(&str, &[Role])] = &[
    ("/cluster.v1.Raft/AppendEntries", NODE),
    ("/cluster.v1.Raft/Vote", NODE),
    ("/cluster.v1.Raft/PreVote", NODE),
    ("/cluster.v1.Raft/InstallSnapshot", NODE),
    ("/cluster.v1.Raft/TransferLeader", NODE),
    ("/cluster.v1.Control/Update", OPERATE),
    ("/cluster.v1.Control/Rollout", VIEW),
    ("/cluster.v1.Control/Operate", OPERATE),
    ("/cluster.v1.Control/Status", VIEW),
    ("/cluster.v1.Control/Write", OPERATE),
    ("/cluster.v1.Control/KvGet", VIEW),
    ("/cluster.v1.Control/Join", NODE),
    ("/cluster.v1.Control/TransferLeader", OPERATE),
    ("/cluster.v1.Control/Members", VIEW),
    ("/cluster.v1.Control/RemoveMember", OPERATE),
    // Mutations: only the node that leads the fence's term (`check_fence`).
    ("/cluster.v1.Agent/Mutate", NODE),
    ("/cluster.v1.Agent/Releases", VIEW),
    ("/cluster.v1.Agent/Manifest", OPERATE),
    ("/cluster.v1.Agent/Missing", OPERATE),
    // Release content: members only.
    ("/cluster.v1.Agent/ReadChunks", NODE),
    ("/cluster.v1.Agent/Upload", OPERATE),
    ("/cluster.v1.Agent/Prepare", OPERATE),
    // The standard gRPC health service: probes hold a viewer certificate.
    ("/grpc.health.v1.Health/Check", VIEW),
    ("/grpc.health.v1.Health/Watch", VIEW),
];

/// The one method a node that is not (yet) a member may call.
const JOIN: &str = "/cluster.v1.Control/Join";

/// The roles that may call `path`, if it is a method at all.
pub fn allowed(path: &str) -> Option<&'static [Role]> {
    TABLE
        .iter()
        .find(|(method, _)| *method == path)
        .map(|(_, roles)| *roles)
}

#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("no such method {0}")]
    UnknownMethod(String),
    #[error("no client certificate: connect with the credentials `cluster tls issue` made (--tls <dir> or CLUSTER_TLS)")]
    NoCertificate,
    #[error("unusable client certificate: {0}")]
    BadCertificate(#[source] TlsError),
    #[error(
        "{identity} may not call {method}: it needs the {} role",
        names(allowed)
    )]
    Role {
        method: String,
        identity: Identity,
        allowed: &'static [Role],
    },
    #[error("node {id} is not a member of this cluster: only members may call {method}")]
    NotAMember { id: u64, method: String },
    #[error("{caller} may not speak for node {claimed}")]
    Impersonation { caller: String, claimed: u64 },
    #[error("{caller} does not lead term {term}: only the leader of a fence's term may change a node's releases (this node knows the leader of term {term} as {known})")]
    NotTheLeader {
        caller: String,
        term: u64,
        known: String,
    },
    #[error("{0}: deployment, phase, fleet and membership records are written by the leader's own code; use `cluster update`, `cluster rollout` and `cluster member`")]
    InternalCommand(&'static str),
    #[error("{identity} has {MAX_IN_FLIGHT_PER_CLIENT} requests in flight on this node, its limit: wait for one to finish")]
    TooManyInFlight { identity: Identity },
    #[error("{addr} is not the address of a member: a node fetches releases only from members (see `cluster member list`)")]
    NotAMemberAddr { addr: String },
}

impl Refusal {
    /// Whether the caller failed to prove who it is (as opposed to lacking permission).
    pub fn is_unauthenticated(&self) -> bool {
        matches!(self, Refusal::NoCertificate | Refusal::BadCertificate(_))
    }
}

fn names(roles: &[Role]) -> String {
    roles
        .iter()
        .map(Role::to_string)
        .collect::<Vec<_>>()
        .join(" or ")
}

/// Decides whether `identity` may call `path` on this node.
pub fn authorize(
    path: &str,
    identity: Result<Identity, Refusal>,
    membership: &dyn Membership,
) -> Result<Caller, Refusal> {
    let roles = allowed(path).ok_or_else(|| Refusal::UnknownMethod(path.to_string()))?;
    let identity = identity?;
    if !roles.contains(&identity.role()) {
        return Err(Refusal::Role {
            method: path.to_string(),
            identity,
            allowed: roles,
        });
    }
    if let Identity::Node(id) = identity {
        if path != JOIN && !membership.admits(id) {
            return Err(Refusal::NotAMember {
                id,
                method: path.to_string(),
            });
        }
    }
    Ok(Caller {
        identity: Some(identity),
    })
}

/// Refuses a request that claims to come from node `claimed` when its certificate is
/// another's.
pub fn check_speaks_for(caller: &Caller, claimed: u64) -> Result<(), Refusal> {
    if caller.may_speak_for(claimed) {
        Ok(())
    } else {
        Err(Refusal::Impersonation {
            caller: describe(caller),
            claimed,
        })
    }
}

/// Refuses an agent mutation unless the caller leads the fence's term, as this node knows.
pub fn check_fence(
    caller: &Caller,
    term: u64,
    membership: Option<&dyn Membership>,
) -> Result<(), Refusal> {
    let Some(membership) = membership else {
        return Ok(());
    };
    let leader = membership.leader_of(term);
    match (caller.node_id(), leader) {
        (Some(id), Some(leader)) if id == leader => Ok(()),
        _ => Err(Refusal::NotTheLeader {
            caller: describe(caller),
            term,
            known: leader.map_or("nobody yet".to_string(), |l| format!("node {l}")),
        }),
    }
}

/// The update options as the leader may trust them. A member forwarding a request speaks
/// for the operator who sent it to that member, and on an insecure node nobody is
/// authenticated, so there they pass as they are. From a person, who started the rollout
/// and why is the node's to say: the operator its certificate names, never a claim inside
/// the request.
pub fn vouch_for_options(caller: &Caller, mut options: UpdateOptions) -> UpdateOptions {
    let Some(identity) = &caller.identity else {
        return options;
    };
    if let Identity::Operator(name) | Identity::Viewer(name) = identity {
        options.started_by = Starter::Operator;
        options.trigger = None;
        options.operator = Some(name.clone());
    }
    options
}

/// A rollout operation as the leader may trust it: like [`vouch_for_options`], the
/// operator an undo names is the one the caller's certificate names (a forwarding member
/// passes on what its own caller's certificate said).
pub fn vouch_for_operation(caller: &Caller, mut operation: Operation) -> Operation {
    if let (Some(Identity::Operator(name) | Identity::Viewer(name)), Operation::Undo { by, .. }) =
        (&caller.identity, &mut operation)
    {
        *by = Some(name.clone());
    }
    operation
}

/// Refuses a replicated command a client may not propose: only kv commands come from the
/// wire, plus a node's own naming of the cluster and its own self-report.
pub fn check_write(caller: &Caller, command: &Command) -> Result<(), Refusal> {
    match command {
        Command::KvPut { .. } | Command::KvDelete { .. } => Ok(()),
        Command::InitCluster { .. } => match &caller.identity {
            None | Some(Identity::Node(_)) => Ok(()),
            Some(_) => Err(Refusal::InternalCommand("the cluster names itself")),
        },
        Command::RegisterNode { id, .. } => check_speaks_for(caller, *id),
        Command::BeginDeployment { .. } => Err(Refusal::InternalCommand("begin_deployment")),
        Command::SetNodePhase { .. } => Err(Refusal::InternalCommand("set_node_phase")),
        Command::SetDeploymentState { .. } => Err(Refusal::InternalCommand("set_deployment_state")),
        Command::RecordHandoff { .. } => Err(Refusal::InternalCommand("record_handoff")),
        Command::SetAutoRollout { .. } => Err(Refusal::InternalCommand("set_auto_rollout")),
        Command::AbortDeployment { .. } => Err(Refusal::InternalCommand("abort_deployment")),
        Command::ForgetNode { .. } => Err(Refusal::InternalCommand("forget_node")),
        Command::RecordEvaluation { .. } => Err(Refusal::InternalCommand("record_evaluation")),
        Command::PromoteStep { .. } => Err(Refusal::InternalCommand("promote_step")),
    }
}

/// A prepare may name only members as the peers to fetch from: a node never opens a
/// connection to an address a caller picks. `None` (an insecure node) checks nothing.
pub fn check_peers(peers: &[String], membership: Option<&dyn Membership>) -> Result<(), Refusal> {
    let Some(membership) = membership else {
        return Ok(());
    };
    match peers.iter().find(|peer| !membership.has_addr(peer)) {
        Some(addr) => Err(Refusal::NotAMemberAddr { addr: addr.clone() }),
        None => Ok(()),
    }
}

fn describe(caller: &Caller) -> String {
    match &caller.identity {
        Some(identity) => identity.to_string(),
        None => "an unauthenticated caller".to_string(),
    }
}

/// How many requests one operator or viewer may have in flight on a node at once, over
/// all its connections. With the message limit this bounds what one client's requests
/// can hold in memory (16 x 64 MiB). Members are not counted: a node forwards its own
/// clients' requests, and those were counted where they arrived.
pub const MAX_IN_FLIGHT_PER_CLIENT: usize = 16;

/// Requests in flight per client identity.
#[derive(Clone, Default)]
pub(super) struct InFlight {
    counts: Arc<std::sync::Mutex<std::collections::HashMap<Identity, usize>>>,
}

/// One counted request; the count drops with it.
pub(super) struct Ticket {
    counts: Arc<std::sync::Mutex<std::collections::HashMap<Identity, usize>>>,
    identity: Identity,
}

impl InFlight {
    /// Counts a request of `caller`, or refuses it when the caller is at its limit.
    fn admit(&self, caller: &Caller) -> Result<Option<Ticket>, Refusal> {
        let identity = match &caller.identity {
            None | Some(Identity::Node(_)) => return Ok(None),
            Some(identity) => identity.clone(),
        };
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(identity.clone()).or_default();
        if *count >= MAX_IN_FLIGHT_PER_CLIENT {
            return Err(Refusal::TooManyInFlight { identity });
        }
        *count += 1;
        Ok(Some(Ticket {
            counts: self.counts.clone(),
            identity,
        }))
    }

    #[cfg(test)]
    fn count(&self, identity: &Identity) -> usize {
        let counts = self.counts.lock().unwrap();
        counts.get(identity).copied().unwrap_or(0)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.identity) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.identity);
            }
        }
    }
}

/// The layer every gRPC request passes first. `membership` is `None` on an insecure node,
/// where every request passes with an unauthenticated `Caller`.
#[derive(Clone)]
pub(super) struct AuthLayer {
    pub membership: Option<Arc<dyn Membership>>,
    pub in_flight: InFlight,
}

impl<S> Layer<S> for AuthLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize {
            inner,
            membership: self.membership.clone(),
            in_flight: self.in_flight.clone(),
        }
    }
}

#[derive(Clone)]
pub(super) struct Authorize<S> {
    inner: S,
    membership: Option<Arc<dyn Membership>>,
    in_flight: InFlight,
}

impl<S> Service<http::Request<Body>> for Authorize<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let decision = match &self.membership {
            None => Ok(Caller::unauthenticated()),
            Some(membership) => {
                let identity = request
                    .extensions()
                    .get::<TlsConnectInfo<TcpConnectInfo>>()
                    .and_then(|info| info.peer_certs())
                    .ok_or(Refusal::NoCertificate)
                    .and_then(|certs| {
                        let leaf = certs.first().ok_or(Refusal::NoCertificate)?;
                        crate::tls::identity_of(leaf).map_err(Refusal::BadCertificate)
                    });
                authorize(request.uri().path(), identity, membership.as_ref())
            }
        };
        let decision = decision.and_then(|caller| {
            let ticket = self.in_flight.admit(&caller)?;
            Ok((caller, ticket))
        });
        match decision {
            Ok((caller, ticket)) => {
                request.extensions_mut().insert(caller);
                // The clone that was polled ready serves this request.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                let response = inner.call(request);
                Box::pin(async move {
                    let _counted = ticket;
                    response.await
                })
            }
            Err(refusal) => {
                let remote = request
                    .extensions()
                    .get::<TlsConnectInfo<TcpConnectInfo>>()
                    .and_then(|info| info.get_ref().remote_addr());
                tracing::warn!(
                    method = request.uri().path(),
                    remote = ?remote,
                    "refused: {refusal}"
                );
                let status = super::status::refusal_status(&refusal);
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// The caller the layer put on a request.
pub(super) fn caller_of<T>(request: &tonic::Request<T>) -> Result<Caller, tonic::Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| tonic::Status::internal("request reached a service without authorization"))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Members(Vec<u64>);

    impl Membership for Members {
        fn admits(&self, id: u64) -> bool {
            self.0.is_empty() || self.0.contains(&id)
        }
        fn leader_of(&self, term: u64) -> Option<u64> {
            (term == 5).then_some(1)
        }
        fn has_addr(&self, addr: &str) -> bool {
            self.0.iter().any(|id| addr == format!("10.0.0.{id}:7000"))
        }
    }

    #[test]
    fn a_client_may_have_only_so_many_requests_in_flight() {
        let in_flight = InFlight::default();
        let alice = Caller {
            identity: Some(Identity::Operator("alice".into())),
        };
        let bob = Caller {
            identity: Some(Identity::Viewer("bob".into())),
        };
        let tickets: Vec<_> = (0..MAX_IN_FLIGHT_PER_CLIENT)
            .map(|_| in_flight.admit(&alice).unwrap())
            .collect();
        let refused = in_flight.admit(&alice).err().unwrap();
        assert!(matches!(refused, Refusal::TooManyInFlight { .. }));
        assert!(refused
            .to_string()
            .contains("operator \"alice\" has 16 requests in flight"));
        assert!(
            in_flight.admit(&bob).unwrap().is_some(),
            "others are counted apart"
        );
        for _ in 0..100 {
            let node = Caller {
                identity: Some(Identity::Node(2)),
            };
            assert!(
                in_flight.admit(&node).unwrap().is_none(),
                "members are not counted"
            );
        }
        drop(tickets);
        assert_eq!(in_flight.count(&Identity::Operator("alice".into())), 0);
        assert!(
            in_flight.admit(&alice).is_ok(),
            "finished requests free the count"
        );
    }

    #[test]
    fn a_prepare_fetches_only_from_members() {
        let members = Members(vec![1, 2]);
        let ok = vec!["10.0.0.1:7000".to_string(), "10.0.0.2:7000".to_string()];
        assert!(check_peers(&ok, Some(&members)).is_ok());
        let mut bad = ok.clone();
        bad.push("169.254.169.254:80".into());
        let err = check_peers(&bad, Some(&members)).unwrap_err();
        assert!(
            matches!(err, Refusal::NotAMemberAddr { ref addr } if addr == "169.254.169.254:80")
        );
        assert!(err.to_string().contains("not the address of a member"));
        assert!(
            check_peers(&bad, None).is_ok(),
            "an insecure node checks nothing"
        );
    }

    fn identities() -> Vec<Identity> {
        vec![
            Identity::Node(1),
            Identity::Operator("alice".into()),
            Identity::Viewer("grafana".into()),
        ]
    }

    /// The whole table, written out a second time as the expected answer: a change to
    /// the table must change this test too.
    #[test]
    fn every_rpc_against_every_role() {
        let expected: &[(&str, [bool; 3])] = &[
            // method:                              node   operator viewer
            ("/cluster.v1.Raft/AppendEntries", [true, false, false]),
            ("/cluster.v1.Raft/Vote", [true, false, false]),
            ("/cluster.v1.Raft/PreVote", [true, false, false]),
            ("/cluster.v1.Raft/InstallSnapshot", [true, false, false]),
            ("/cluster.v1.Raft/TransferLeader", [true, false, false]),
            ("/cluster.v1.Control/Update", [true, true, false]),
            ("/cluster.v1.Control/Rollout", [true, true, true]),
            ("/cluster.v1.Control/Operate", [true, true, false]),
            ("/cluster.v1.Control/Status", [true, true, true]),
            ("/cluster.v1.Control/Write", [true, true, false]),
            ("/cluster.v1.Control/KvGet", [true, true, true]),
            ("/cluster.v1.Control/Join", [true, false, false]),
            ("/cluster.v1.Control/TransferLeader", [true, true, false]),
            ("/cluster.v1.Control/Members", [true, true, true]),
            ("/cluster.v1.Control/RemoveMember", [true, true, false]),
            ("/cluster.v1.Agent/Mutate", [true, false, false]),
            ("/cluster.v1.Agent/Releases", [true, true, true]),
            ("/cluster.v1.Agent/Manifest", [true, true, false]),
            ("/cluster.v1.Agent/Missing", [true, true, false]),
            ("/cluster.v1.Agent/ReadChunks", [true, false, false]),
            ("/cluster.v1.Agent/Upload", [true, true, false]),
            ("/cluster.v1.Agent/Prepare", [true, true, false]),
            ("/grpc.health.v1.Health/Check", [true, true, true]),
            ("/grpc.health.v1.Health/Watch", [true, true, true]),
        ];
        assert_eq!(
            expected.len(),
            TABLE.len(),
            "a method of the table is untested"
        );
        let members = Members(vec![1, 2, 3]);
        for (method, row) in expected {
            for (identity, allowed) in identities().into_iter().zip(row) {
                let decision = authorize(method, Ok(identity.clone()), &members);
                assert_eq!(decision.is_ok(), *allowed, "{identity} calling {method}");
                if let Err(refusal) = decision {
                    assert!(matches!(refusal, Refusal::Role { .. }), "{refusal}");
                    assert!(refusal.to_string().contains("may not call"), "{refusal}");
                }
            }
            // Without a certificate nothing passes.
            let none = authorize(method, Err(Refusal::NoCertificate), &members);
            assert!(matches!(none, Err(Refusal::NoCertificate)), "{method}");
        }
    }

    /// Every `rpc` line of the proto has a row: a new method must choose its roles.
    #[test]
    fn the_table_covers_the_proto() {
        let proto = include_str!("../../proto/cluster.proto");
        let mut service = "";
        let mut methods = Vec::new();
        for line in proto.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("service ") {
                service = rest.trim_end_matches('{').trim();
            } else if let Some(rest) = line.strip_prefix("rpc ") {
                let name = rest.split('(').next().unwrap().trim();
                methods.push(format!("/cluster.v1.{service}/{name}"));
            }
        }
        assert!(methods.len() >= 20, "{methods:?}");
        for method in &methods {
            assert!(
                allowed(method).is_some(),
                "{method} has no row in auth::TABLE"
            );
        }
        let ours = TABLE
            .iter()
            .filter(|(method, _)| method.starts_with("/cluster.v1."))
            .count();
        assert_eq!(
            methods.len(),
            ours,
            "the table lists a method the proto lacks"
        );
        assert!(matches!(
            authorize(
                "/cluster.v1.Control/Nope",
                Ok(Identity::Node(1)),
                &Members(vec![1])
            ),
            Err(Refusal::UnknownMethod(_))
        ));
    }

    #[test]
    fn nodes_must_be_members_except_to_join_or_while_joining() {
        let members = Members(vec![1, 2]);
        let stranger = Identity::Node(9);
        let refused = authorize("/cluster.v1.Raft/Vote", Ok(stranger.clone()), &members);
        assert!(matches!(refused, Err(Refusal::NotAMember { id: 9, .. })));
        assert!(authorize(JOIN, Ok(stranger.clone()), &members).is_ok());
        let joining = Members(vec![]);
        assert!(authorize("/cluster.v1.Raft/AppendEntries", Ok(stranger), &joining).is_ok());
    }

    #[test]
    fn claims_inside_requests_must_match_the_certificate() {
        let node2 = Caller {
            identity: Some(Identity::Node(2)),
        };
        let operator = Caller {
            identity: Some(Identity::Operator("a".into())),
        };
        assert!(check_speaks_for(&node2, 2).is_ok());
        assert!(check_speaks_for(&node2, 3).is_err());
        assert!(check_speaks_for(&operator, 2).is_err());
        assert!(check_speaks_for(&Caller::unauthenticated(), 3).is_ok());

        let members = Members(vec![1, 2]);
        let leader = Caller {
            identity: Some(Identity::Node(1)),
        };
        assert!(check_fence(&leader, 5, Some(&members)).is_ok());
        let wrong_term = check_fence(&leader, 6, Some(&members)).unwrap_err();
        assert!(
            wrong_term.to_string().contains("does not lead term 6"),
            "{wrong_term}"
        );
        assert!(check_fence(&node2, 5, Some(&members)).is_err());
        assert!(
            check_fence(&node2, 5, None).is_ok(),
            "insecure nodes fence by term only"
        );
    }

    #[test]
    fn only_kv_commands_and_self_reports_come_from_the_wire() {
        let operator = Caller {
            identity: Some(Identity::Operator("a".into())),
        };
        let node3 = Caller {
            identity: Some(Identity::Node(3)),
        };
        let put = Command::KvPut {
            key: "k".into(),
            value: "v".into(),
        };
        assert!(check_write(&operator, &put).is_ok());
        let report = |id| Command::RegisterNode {
            id,
            info: Default::default(),
        };
        assert!(check_write(&node3, &report(3)).is_ok());
        assert!(check_write(&node3, &report(1)).is_err());
        assert!(check_write(&operator, &report(3)).is_err());
        let auto_off = Command::SetAutoRollout {
            enabled: false,
            at_ms: 0,
        };
        let forget = Command::ForgetNode { id: 3 };
        for caller in [&operator, &node3, &Caller::unauthenticated()] {
            let err = check_write(caller, &auto_off).unwrap_err().to_string();
            assert!(err.contains("set_auto_rollout"), "{err}");
            let err = check_write(caller, &forget).unwrap_err().to_string();
            assert!(err.contains("forget_node"), "{err}");
        }
    }

    #[test]
    fn who_started_an_update_comes_from_the_certificate_not_the_request() {
        let forged = UpdateOptions {
            started_by: Starter::Automatic,
            trigger: Some("new build in watched directory".into()),
            operator: Some("mallory".into()),
            dist_label: "./dist".into(),
            ..UpdateOptions::default()
        };
        let as_caller = |identity| {
            let caller = Caller { identity };
            vouch_for_options(&caller, forged.clone())
        };
        let by_alice = as_caller(Some(Identity::Operator("alice".into())));
        assert_eq!(by_alice.operator.as_deref(), Some("alice"));
        assert_eq!(by_alice.started_by, Starter::Operator);
        assert_eq!(by_alice.trigger, None);
        assert_eq!(by_alice.dist_label, "./dist");
        // A member forwarding a request, and anyone on an insecure node, pass it as sent.
        assert_eq!(as_caller(Some(Identity::Node(2))), forged);
        assert_eq!(as_caller(None), forged);
    }

    #[test]
    fn who_asked_for_an_undo_comes_from_the_certificate_not_the_request() {
        let forged = Operation::Undo {
            to: Some("4".into()),
            by: Some("mallory".into()),
        };
        let as_caller = |identity| vouch_for_operation(&Caller { identity }, forged.clone());
        assert_eq!(
            as_caller(Some(Identity::Operator("alice".into()))),
            Operation::Undo {
                to: Some("4".into()),
                by: Some("alice".into())
            }
        );
        assert_eq!(as_caller(Some(Identity::Node(2))), forged);
        assert_eq!(
            vouch_for_operation(
                &Caller {
                    identity: Some(Identity::Operator("alice".into()))
                },
                Operation::Pause
            ),
            Operation::Pause
        );
    }
}
