//! The one place where domain errors become gRPC statuses and gRPC statuses become errors.

use tonic::{Code, Status};

use crate::api::{ApiError, ErrorKind};

pub fn to_status(error: ApiError) -> Status {
    let code = match error.kind {
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
        ErrorKind::Internal => Code::Internal,
    };
    Status::new(code, error.message)
}

/// Turns a status from node `addr` into an error a user can act on.
pub fn from_status(addr: &str, status: Status) -> ApiError {
    let kind = match status.code() {
        Code::Unavailable | Code::Cancelled | Code::Unknown if is_transport(&status) => {
            return ApiError::unavailable(format!(
                "cannot reach node {addr}: {}: is it running? (choose a node with --node or CLUSTER_NODE)",
                transport_reason(&status)
            ));
        }
        Code::Unavailable => ErrorKind::Unavailable,
        Code::InvalidArgument => ErrorKind::InvalidArgument,
        Code::NotFound => ErrorKind::NotFound,
        Code::FailedPrecondition => ErrorKind::FailedPrecondition,
        Code::AlreadyExists => ErrorKind::AlreadyExists,
        Code::DeadlineExceeded => {
            return ApiError::new(
                ErrorKind::DeadlineExceeded,
                format!("node {addr} did not answer in time: {}", status.message()),
            )
        }
        _ => ErrorKind::Internal,
    };
    ApiError::new(kind, status.message().to_string())
}

/// A status that tonic made up because the connection failed (the server never answered).
fn is_transport(status: &Status) -> bool {
    status.metadata().is_empty() && std::error::Error::source(status).is_some()
        || status.message().contains("transport error")
        || status.message().contains("tcp connect error")
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
