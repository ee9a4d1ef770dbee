//! A client of the standard gRPC health protocol (`grpc.health.v1.Health/Check`), for
//! checking the operator's services: plaintext HTTP/2 to an instance's own check socket.

use std::net::SocketAddr;
use std::time::Duration;

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Asks `addr` whether `service` ("" for the server as a whole) is SERVING; otherwise
/// says what it answered, or why nothing answered.
pub async fn grpc_health(addr: SocketAddr, service: &str, timeout: Duration) -> Result<(), String> {
    let what = if service.is_empty() {
        "grpc health".to_string()
    } else {
        format!("grpc health of {service}")
    };
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("{what}: {e}"))?
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await
        .map_err(|e| format!("{what}: connect {addr}: {e}"))?;
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .map_err(|status| format!("{what}: {:?}: {}", status.code(), status.message()))?;
    match reply.into_inner().status() {
        ServingStatus::Serving => Ok(()),
        other => Err(format!("{what}: {}", other.as_str_name())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serving_passes_and_anything_else_says_what_it_answered() {
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("web", tonic_health::ServingStatus::Serving)
            .await;
        reporter
            .set_service_status("db", tonic_health::ServingStatus::NotServing)
            .await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let limit = Duration::from_secs(5);
        assert_eq!(grpc_health(addr, "web", limit).await, Ok(()));
        let not = grpc_health(addr, "db", limit).await.unwrap_err();
        assert!(not.contains("NOT_SERVING"), "{not}");
        let unknown = grpc_health(addr, "nope", limit).await.unwrap_err();
        assert!(unknown.contains("NotFound"), "{unknown}");
        server.abort();
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let nobody = closed.local_addr().unwrap();
        drop(closed);
        let down = grpc_health(nobody, "", limit).await.unwrap_err();
        assert!(down.contains("connect"), "{down}");
    }
}
