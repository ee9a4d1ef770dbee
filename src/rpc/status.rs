//! The one place where errors become gRPC statuses and gRPC statuses become errors.
//!
//! Every error type a service answers with gets its code from one exhaustive `match` in
//! [`WireCode`] (no `_` arm), so a new variant does not compile until it chooses its code.
//! A status carries the error with its causes ([`Chain`]) as its message. A client turns a
//! code back into an [`ErrorKind`] with [`kind_of`]; the leader acting on itself goes
//! through the same code (`From<AgentError> for ApiError`), so a local and a remote call
//! report a failure alike.

use std::time::Duration;

use tonic::{Code, Status};

use super::transport::TransportError;
use crate::api::agent::{AgentError, FenceRefusal};
use crate::api::{ApiError, ErrorKind};
use crate::error::Chain;
use crate::fs::IoError;
use crate::release::{DistError, ManifestError, SignatureError, StoreError, SyncError};

/// The gRPC code an error is answered with.
pub(super) trait WireCode {
    fn code(&self) -> Code;
}

impl WireCode for IoError {
    fn code(&self) -> Code {
        if self.is_out_of_space() {
            Code::ResourceExhausted
        } else {
            Code::Internal
        }
    }
}

impl WireCode for ManifestError {
    fn code(&self) -> Code {
        // An invalid manifest is the caller's to fix, whichever rule it breaks.
        match self {
            ManifestError::BadPath { .. }
            | ManifestError::DuplicatePath { .. }
            | ManifestError::Unsorted { .. }
            | ManifestError::MissingParent { .. }
            | ManifestError::ParentNotDir { .. }
            | ManifestError::BadSymlink { .. }
            | ManifestError::SymlinkEscapes { .. }
            | ManifestError::BadMode { .. }
            | ManifestError::ChunkSizeMismatch { .. }
            | ManifestError::BadChunkSize { .. }
            | ManifestError::BadHash { .. }
            | ManifestError::TooLarge { .. }
            | ManifestError::TooManyEntries { .. }
            | ManifestError::MissingBinary
            | ManifestError::BinaryNotFile
            | ManifestError::BinaryNotExecutable { .. }
            | ManifestError::VersionFileInManifest => Code::InvalidArgument,
        }
    }
}

impl WireCode for DistError {
    fn code(&self) -> Code {
        match self {
            DistError::InDist { error, .. } => error.code(),
            DistError::Io(error) => error.code(),
            DistError::Invalid(error) => error.code(),
            DistError::DirMissing { .. } => Code::NotFound,
            DistError::NotADirectory { .. }
            | DistError::NonUtf8Path { .. }
            | DistError::UnsupportedFileType { .. }
            | DistError::VersionFileNotRegular
            | DistError::BadVersionFile { .. } => Code::InvalidArgument,
            // Someone was writing to the dist: trying again can succeed.
            DistError::ChangedWhileReading { .. } => Code::Aborted,
            DistError::NotStamped
            | DistError::EntryMissing { .. }
            | DistError::EntryExtra { .. }
            | DistError::EntryChanged { .. }
            | DistError::HashMismatch { .. } => Code::FailedPrecondition,
        }
    }
}

impl WireCode for StoreError {
    fn code(&self) -> Code {
        match self {
            StoreError::Io(error) => error.code(),
            StoreError::UnknownRelease { .. } | StoreError::ChunkNotHeld { .. } => Code::NotFound,
            StoreError::NotABuildHash { .. } => Code::InvalidArgument,
            // Another process must stop first; retrying alone does not help.
            StoreError::Locked { .. }
            | StoreError::NoCurrent { .. }
            | StoreError::NoPrevious { .. } => Code::FailedPrecondition,
            StoreError::BadLink { .. }
            | StoreError::BadManifestFile { .. }
            | StoreError::ChunkCorrupt { .. }
            | StoreError::Damaged { .. }
            | StoreError::DamagedCurrent { .. } => Code::DataLoss,
        }
    }
}

impl WireCode for SyncError {
    fn code(&self) -> Code {
        match self {
            SyncError::Store(error) => error.code(),
            SyncError::Invalid(error) => error.code(),
            SyncError::Dist(error) => error.code(),
            SyncError::Io(error) => error.code(),
            SyncError::UnknownChunk { .. }
            | SyncError::ChunkMismatch { .. }
            | SyncError::BadOrigin { .. } => Code::InvalidArgument,
            SyncError::ChunksMissing { .. } | SyncError::FileMismatch { .. } => {
                Code::FailedPrecondition
            }
            // A source changed while the release was assembled: trying again can succeed.
            SyncError::StagedMismatch { .. } => Code::Aborted,
            SyncError::PeerUnreachable { .. }
            | SyncError::NotHeldByPeers { .. }
            | SyncError::ManifestNotFetched { .. } => Code::Unavailable,
        }
    }
}

impl WireCode for SignatureError {
    fn code(&self) -> Code {
        // The release lacks the authority this node requires; retrying cannot help, only
        // a release signed by a trusted key (or another key configured) can.
        match self {
            SignatureError::Unsigned { .. }
            | SignatureError::UntrustedKey { .. }
            | SignatureError::Malformed { .. }
            | SignatureError::Mismatch { .. } => Code::PermissionDenied,
        }
    }
}

impl WireCode for FenceRefusal {
    fn code(&self) -> Code {
        // A sequencer check that failed: the caller lost a race to a newer leader or
        // rollout, and must re-read the state rather than retry.
        match self {
            FenceRefusal::StaleTerm { .. }
            | FenceRefusal::StaleGeneration { .. }
            | FenceRefusal::StaleSequence { .. } => Code::Aborted,
        }
    }
}

impl WireCode for AgentError {
    fn code(&self) -> Code {
        match self {
            AgentError::Refused { refusal, .. } => refusal.code(),
            AgentError::Store(error) => error.code(),
            AgentError::Sync(error) => error.code(),
            AgentError::Signature(error) => error.code(),
            AgentError::FenceNotRecorded(error) | AgentError::GuardNotRecorded(error) => {
                error.code()
            }
            // The record must be repaired by hand before this node obeys anyone again.
            AgentError::FenceUnreadable { .. } | AgentError::CommitNotRunning { .. } => {
                Code::FailedPrecondition
            }
            AgentError::BadManifest(_)
            | AgentError::BadDelta { .. }
            | AgentError::UnknownMutation { .. }
            | AgentError::UploadWithoutManifest
            | AgentError::UploadPartWithoutChunk
            | AgentError::UploadIncomplete { .. }
            | AgentError::Services { .. } => Code::InvalidArgument,
            AgentError::UploadBroke(_) => Code::Unavailable,
            AgentError::Guard(_) | AgentError::TaskFailed(_) => Code::Internal,
        }
    }
}

impl WireCode for ErrorKind {
    fn code(&self) -> Code {
        match self {
            ErrorKind::Unavailable => Code::Unavailable,
            ErrorKind::InvalidArgument => Code::InvalidArgument,
            ErrorKind::NotFound => Code::NotFound,
            ErrorKind::FailedPrecondition => Code::FailedPrecondition,
            ErrorKind::PermissionDenied => Code::PermissionDenied,
            ErrorKind::AlreadyExists => Code::AlreadyExists,
            ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
            ErrorKind::Unauthenticated => Code::Unauthenticated,
            ErrorKind::Internal => Code::Internal,
        }
    }
}

/// The status a Control call answers with.
pub fn to_status(error: ApiError) -> Status {
    Status::new(error.kind.code(), error.message)
}

/// The status of a request the authorization layer or a service's identity check refused.
pub(super) fn refusal_status(refusal: &super::auth::Refusal) -> Status {
    let code = if refusal.is_unauthenticated() {
        Code::Unauthenticated
    } else if matches!(refusal, super::auth::Refusal::TooManyInFlight { .. }) {
        Code::ResourceExhausted
    } else {
        Code::PermissionDenied
    };
    Status::new(code, Chain(refusal).to_string())
}

/// The status an Agent call answers with.
pub(super) fn agent_status(error: AgentError) -> Status {
    Status::new(error.code(), Chain(&error).to_string())
}

/// What the caller can do about a code: the [`ErrorKind`] a client reports it as.
pub(super) fn kind_of(code: Code) -> ErrorKind {
    match code {
        Code::Unavailable => ErrorKind::Unavailable,
        Code::InvalidArgument | Code::OutOfRange => ErrorKind::InvalidArgument,
        Code::NotFound => ErrorKind::NotFound,
        // A fence refusal or a full disk: the node's state must change before a retry.
        Code::FailedPrecondition | Code::Aborted | Code::ResourceExhausted => {
            ErrorKind::FailedPrecondition
        }
        Code::AlreadyExists => ErrorKind::AlreadyExists,
        Code::DeadlineExceeded => ErrorKind::DeadlineExceeded,
        // A release this node will not run: it needs another signature, not a retry.
        Code::PermissionDenied => ErrorKind::PermissionDenied,
        Code::Unauthenticated => ErrorKind::Unauthenticated,
        Code::Ok
        | Code::Cancelled
        | Code::Unknown
        | Code::Unimplemented
        | Code::Internal
        | Code::DataLoss => ErrorKind::Internal,
    }
}

/// An agent error as a Control-style error: what the leader reports when it acted on
/// itself, coded exactly as a remote agent's answer would be.
impl From<AgentError> for ApiError {
    fn from(error: AgentError) -> ApiError {
        ApiError::new(kind_of(error.code()), Chain(&error).to_string())
    }
}

/// A channel that cannot be set up or a Raft call that failed, for a client's caller.
impl From<TransportError> for ApiError {
    fn from(error: TransportError) -> ApiError {
        let kind = match &error {
            TransportError::BadAddress { .. } => ErrorKind::InvalidArgument,
            TransportError::Unreachable(_) | TransportError::Remote(_) => ErrorKind::Unavailable,
            TransportError::Timeout(_) => ErrorKind::DeadlineExceeded,
        };
        ApiError::new(kind, Chain(&error).to_string())
    }
}

/// Turns a status from node `addr` into an error a user can act on.
pub fn from_status(addr: &str, status: Status) -> ApiError {
    match status.code() {
        Code::Unavailable | Code::Cancelled | Code::Unknown
            if is_transport(&status) && is_tls(&transport_reason(&status)) =>
        {
            ApiError::new(
                ErrorKind::Unauthenticated,
                format!(
                    "TLS with node {addr} failed: {}: the node and this client need \
                     certificates from the same cluster CA (--tls <dir> or CLUSTER_TLS; \
                     --insecure only against a node started with --insecure)",
                    transport_reason(&status)
                ),
            )
        }
        Code::Unavailable | Code::Cancelled | Code::Unknown if is_transport(&status) => {
            ApiError::unavailable(format!(
                "cannot reach node {addr}: {}: is it running? (choose a node with --node or CLUSTER_NODE)",
                transport_reason(&status)
            ))
        }
        Code::DeadlineExceeded => ApiError::new(
            ErrorKind::DeadlineExceeded,
            format!("node {addr} did not answer in time: {}", status.message()),
        ),
        code => ApiError::new(kind_of(code), status.message().to_string()),
    }
}

/// A failed Raft call, as the Raft network handles it: a deadline, or an unreachable peer.
pub(super) fn raft_call_error(status: Status, timeout: Duration) -> TransportError {
    match status.code() {
        Code::DeadlineExceeded | Code::Cancelled => TransportError::Timeout(timeout),
        _ => TransportError::Unreachable(message_and_causes(&status)),
    }
}

/// The status's message followed by each cause (a connection error, say) not already in it.
fn message_and_causes(status: &Status) -> String {
    let mut reason = status.message().to_string();
    if let Some(cause) = std::error::Error::source(status) {
        let causes = Chain(cause).to_string();
        if !reason.contains(&causes) {
            reason = if reason.is_empty() {
                causes
            } else {
                format!("{reason}: {causes}")
            };
        }
    }
    reason
}

/// A status that tonic made up because the connection failed (the server never answered).
fn is_transport(status: &Status) -> bool {
    status.metadata().is_empty() && std::error::Error::source(status).is_some()
        || status.message().contains("transport error")
        || status.message().contains("tcp connect error")
}

/// Whether a connection failed in the TLS handshake (rather than to connect at all).
fn is_tls(reason: &str) -> bool {
    let reason = reason.to_ascii_lowercase();
    // An established session the peer dropped (it died or closed the connection): a
    // broken link, not a credential problem, whatever the words around it say. A peer
    // that refuses credentials sends an alert.
    if reason.contains("close_notify") {
        return false;
    }
    ["certificate", "alert", "handshake", "tls", "invalid peer"]
        .iter()
        .any(|word| reason.contains(word))
}

fn transport_reason(status: &Status) -> String {
    let mut reason = status.message().to_string();
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        reason = err.to_string();
        source = err.source();
    }
    reason
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::agent::FenceError;
    use std::path::PathBuf;

    fn io(errno: i32) -> IoError {
        IoError::new("write", "/data/x", std::io::Error::from_raw_os_error(errno))
    }

    fn parse_error() -> serde_json::Error {
        serde_json::from_str::<u8>("x").unwrap_err()
    }

    fn join_error() -> tokio::task::JoinError {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let task = runtime.spawn(std::future::pending::<()>());
        task.abort();
        runtime.block_on(task).unwrap_err()
    }

    fn path() -> PathBuf {
        PathBuf::from("/data")
    }

    fn s(text: &str) -> String {
        text.to_owned()
    }

    /// One value of every variant of every error a service answers with, and its code.
    #[rustfmt::skip]
    fn table() -> Vec<(Box<dyn WireCode>, Code)> {
        let manifest = |error: ManifestError| -> Box<dyn WireCode> { Box::new(error) };
        let dist = |error: DistError| -> Box<dyn WireCode> { Box::new(error) };
        let store = |error: StoreError| -> Box<dyn WireCode> { Box::new(error) };
        let sync = |error: SyncError| -> Box<dyn WireCode> { Box::new(error) };
        let agent = |error: AgentError| -> Box<dyn WireCode> { Box::new(error) };
        let stale_term = FenceRefusal::StaleTerm { term: 4, node_term: 5 };
        vec![
            (Box::new(io(libc::EACCES)), Code::Internal),
            (Box::new(io(libc::ENOSPC)), Code::ResourceExhausted),
            (Box::new(io(libc::EDQUOT)), Code::ResourceExhausted),
            // ManifestError
            (manifest(ManifestError::BadPath { path: s("a/../b"), problem: "`..`" }), Code::InvalidArgument),
            (manifest(ManifestError::DuplicatePath { path: s("bin") }), Code::InvalidArgument),
            (manifest(ManifestError::Unsorted { path: s("a"), previous: s("b") }), Code::InvalidArgument),
            (manifest(ManifestError::MissingParent { path: s("a/b"), parent: s("a") }), Code::InvalidArgument),
            (manifest(ManifestError::ParentNotDir { path: s("a/b"), parent: s("a") }), Code::InvalidArgument),
            (manifest(ManifestError::BadSymlink { path: s("l"), target: s("/etc"), problem: "absolute" }), Code::InvalidArgument),
            (manifest(ManifestError::SymlinkEscapes { path: s("l"), target: s("../..") }), Code::InvalidArgument),
            (manifest(ManifestError::BadMode { path: s("f"), mode: 0o4755, problem: "setuid" }), Code::InvalidArgument),
            (manifest(ManifestError::ChunkSizeMismatch { path: s("f"), size: 2, chunk_total: 1 }), Code::InvalidArgument),
            (manifest(ManifestError::BadChunkSize { path: s("f"), index: 0, size: 0, max: 9 }), Code::InvalidArgument),
            (manifest(ManifestError::BadHash { path: s("f"), what: s("content hash"), hash: s("x") }), Code::InvalidArgument),
            (manifest(ManifestError::TooLarge { total: 2, limit: 1 }), Code::InvalidArgument),
            (manifest(ManifestError::TooManyEntries { limit: 1 }), Code::InvalidArgument),
            (manifest(ManifestError::MissingBinary), Code::InvalidArgument),
            (manifest(ManifestError::BinaryNotFile), Code::InvalidArgument),
            (manifest(ManifestError::BinaryNotExecutable { mode: 0o644 }), Code::InvalidArgument),
            (manifest(ManifestError::VersionFileInManifest), Code::InvalidArgument),
            // DistError
            (dist(DistError::DirMissing { dir: path() }.in_dist(&path())), Code::NotFound),
            (dist(DistError::DirMissing { dir: path() }), Code::NotFound),
            (dist(DistError::NotADirectory { dir: path() }), Code::InvalidArgument),
            (dist(DistError::Io(io(libc::ENOSPC))), Code::ResourceExhausted),
            (dist(DistError::NonUtf8Path { path: path() }), Code::InvalidArgument),
            (dist(DistError::UnsupportedFileType { path: s("p"), kind: "FIFO" }), Code::InvalidArgument),
            (dist(DistError::ChangedWhileReading { path: s("f"), change: s("grew") }), Code::Aborted),
            (dist(DistError::VersionFileNotRegular), Code::InvalidArgument),
            (dist(DistError::Invalid(ManifestError::MissingBinary)), Code::InvalidArgument),
            (dist(DistError::NotStamped), Code::FailedPrecondition),
            (dist(DistError::BadVersionFile { source: parse_error() }), Code::InvalidArgument),
            (dist(DistError::EntryMissing { path: s("f") }), Code::FailedPrecondition),
            (dist(DistError::EntryExtra { path: s("f") }), Code::FailedPrecondition),
            (dist(DistError::EntryChanged { path: s("f"), change: s("content") }), Code::FailedPrecondition),
            (dist(DistError::HashMismatch { recorded: s("a"), actual: s("b") }), Code::FailedPrecondition),
            // StoreError
            (store(StoreError::Io(io(libc::EIO))), Code::Internal),
            (store(StoreError::Locked { data_dir: path() }), Code::FailedPrecondition),
            (store(StoreError::NotABuildHash { hash: s("../x") }), Code::InvalidArgument),
            (store(StoreError::UnknownRelease { hash: s("a"), data_dir: path() }), Code::NotFound),
            (store(StoreError::NoCurrent { path: path() }), Code::FailedPrecondition),
            (store(StoreError::NoPrevious { path: path() }), Code::FailedPrecondition),
            (store(StoreError::BadLink { path: path(), found: s("x") }), Code::DataLoss),
            (store(StoreError::BadManifestFile { path: path(), hash: s("a"), source: parse_error() }), Code::DataLoss),
            (store(StoreError::ChunkNotHeld { sha256: s("c"), data_dir: path() }), Code::NotFound),
            (store(StoreError::ChunkCorrupt { sha256: s("c"), path: path(), offset: 0 }), Code::DataLoss),
            // SyncError
            (sync(SyncError::Store(StoreError::UnknownRelease { hash: s("a"), data_dir: path() })), Code::NotFound),
            (sync(SyncError::Invalid(ManifestError::MissingBinary)), Code::InvalidArgument),
            (sync(SyncError::Dist(DistError::ChangedWhileReading { path: s("f"), change: s("grew") })), Code::Aborted),
            (sync(SyncError::Io(io(libc::ENOSPC))), Code::ResourceExhausted),
            (sync(SyncError::UnknownChunk { sha256: s("c"), release: s("r") }), Code::InvalidArgument),
            (sync(SyncError::ChunkMismatch { sha256: s("c"), problem: s("short") }), Code::InvalidArgument),
            (sync(SyncError::ChunksMissing { release: s("r"), count: 1 }), Code::FailedPrecondition),
            (sync(SyncError::StagedMismatch { expected: s("a"), actual: s("b") }), Code::Aborted),
            (sync(SyncError::FileMismatch { path: s("f") }), Code::FailedPrecondition),
            (sync(SyncError::BadOrigin { field: "builtAt", value: s("x") }), Code::InvalidArgument),
            (sync(SyncError::PeerUnreachable { peer: s("127.0.0.1:1"), source: "refused".into() }), Code::Unavailable),
            (sync(SyncError::NotHeldByPeers { release: s("r"), count: 1, bytes: 1, peers: vec![], rounds: 1, last: s("none") }), Code::Unavailable),
            (sync(SyncError::ManifestNotFetched { release: s("r"), peers: vec![], last: s("none") }), Code::Unavailable),
            // FenceRefusal and AgentError
            (Box::new(stale_term.clone()), Code::Aborted),
            (Box::new(FenceRefusal::StaleGeneration { generation: 1, accepted: 2 }), Code::Aborted),
            (Box::new(FenceRefusal::StaleSequence { term: 1, seq: 1, accepted_term: 1, accepted_seq: 2 }), Code::Aborted),
            (agent(AgentError::Refused { mutation: s("Restart"), refusal: stale_term }), Code::Aborted),
            (agent(AgentError::CommitNotRunning { hash: s("a"), running: s("b") }), Code::FailedPrecondition),
            (agent(AgentError::FenceNotRecorded(io(libc::ENOSPC))), Code::ResourceExhausted),
            (agent(AgentError::FenceUnreadable { mutation: s("Restart"), source: FenceError::Corrupt { path: path(), source: parse_error() } }), Code::FailedPrecondition),
            (agent(AgentError::GuardNotRecorded(io(libc::EIO))), Code::Internal),
            (agent(AgentError::Guard("boot.json is corrupt".into())), Code::Internal),
            (agent(AgentError::Store(StoreError::ChunkNotHeld { sha256: s("c"), data_dir: path() })), Code::NotFound),
            (agent(AgentError::Sync(SyncError::UnknownChunk { sha256: s("c"), release: s("r") })), Code::InvalidArgument),
            (agent(AgentError::BadManifest(parse_error())), Code::InvalidArgument),
            (agent(AgentError::BadDelta { base: s("a"), hash: s("b"), problem: s("c") }), Code::InvalidArgument),
            (agent(AgentError::UnknownMutation { op: 99 }), Code::InvalidArgument),
            (agent(AgentError::UploadWithoutManifest), Code::InvalidArgument),
            (agent(AgentError::UploadPartWithoutChunk), Code::InvalidArgument),
            (agent(AgentError::UploadBroke("reset".into())), Code::Unavailable),
            (agent(AgentError::UploadIncomplete { missing: 3 }), Code::InvalidArgument),
            (agent(AgentError::Services { hash: s("a"), reason: s("bad listen") }), Code::InvalidArgument),
            (agent(AgentError::TaskFailed(join_error())), Code::Internal),
            // SignatureError, alone and as an agent answers it
            (Box::new(SignatureError::Unsigned { release: s("a"), trusted: s("k") }), Code::PermissionDenied),
            (Box::new(SignatureError::UntrustedKey { release: s("a"), key_id: s("f"), trusted: s("k") }), Code::PermissionDenied),
            (Box::new(SignatureError::Malformed { release: s("a"), key_id: s("k"), problem: s("short") }), Code::PermissionDenied),
            (Box::new(SignatureError::Mismatch { release: s("a"), key_id: s("k") }), Code::PermissionDenied),
            (agent(AgentError::Signature(SignatureError::Unsigned { release: s("a"), trusted: s("k") })), Code::PermissionDenied),
        ]
    }

    #[test]
    fn every_variant_has_its_code() {
        for (index, (error, expected)) in table().into_iter().enumerate() {
            assert_eq!(error.code(), expected, "row {index}");
        }
    }

    #[test]
    fn a_status_carries_the_causes_and_a_client_gets_an_actionable_kind() {
        let error = AgentError::Store(StoreError::Io(io(libc::ENOSPC)));
        let status = agent_status(error);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(
            status
                .message()
                .starts_with("cannot write /data/x: free space")
                && status.message().contains("No space left on device"),
            "{}",
            status.message()
        );
        let back = from_status("127.0.0.1:7100", status);
        assert_eq!(back.kind, ErrorKind::FailedPrecondition, "{back}");

        let unknown = AgentError::Store(StoreError::UnknownRelease {
            hash: s("a"),
            data_dir: path(),
        });
        let message = Chain(&unknown).to_string();
        let remote = from_status("127.0.0.1:7100", agent_status(unknown));
        assert_eq!(
            (remote.kind, remote.message),
            (ErrorKind::NotFound, message)
        );
    }

    #[test]
    fn a_local_agent_error_is_reported_as_a_remote_one_would_be() {
        let refused = || AgentError::Refused {
            mutation: s("Activate(\"a\")"),
            refusal: FenceRefusal::StaleTerm {
                term: 4,
                node_term: 5,
            },
        };
        let local = ApiError::from(refused());
        let remote = from_status("127.0.0.1:7100", agent_status(refused()));
        assert_eq!(local, remote);
        assert_eq!(local.kind, ErrorKind::FailedPrecondition);
        assert_eq!(
            local.message,
            "refused Activate(\"a\"): issued in term 4 but this node is in term 5: a newer leader exists"
        );
    }

    #[test]
    fn every_code_maps_back_to_a_kind_and_kinds_round_trip() {
        for kind in [
            ErrorKind::Unavailable,
            ErrorKind::InvalidArgument,
            ErrorKind::NotFound,
            ErrorKind::FailedPrecondition,
            ErrorKind::PermissionDenied,
            ErrorKind::AlreadyExists,
            ErrorKind::DeadlineExceeded,
            ErrorKind::Internal,
        ] {
            assert_eq!(kind_of(kind.code()), kind);
        }
    }

    #[test]
    fn a_dropped_tls_session_is_a_broken_link_and_a_refused_certificate_is_not() {
        let dropped = "peer closed connection without sending TLS close_notify: \
                       https://docs.rs/rustls/latest/rustls/manual/_03_howto/index.html#unexpected-eof";
        assert!(
            !is_tls(dropped),
            "retryable: the peer died or closed the link"
        );
        assert!(is_tls("received fatal alert: UnknownCA"));
        assert!(is_tls("invalid peer certificate: UnknownIssuer"));
    }
}
