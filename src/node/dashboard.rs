//! `--dashboard-listen`: a read-only web page of the cluster as this node sees it
//! (members, leader, builds, acknowledgement ages, the active rollout's phases, history),
//! refreshed every second from `/api/state`.

use std::sync::Arc;

use axum::http::StatusCode;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::handle::NodeHandle;

const PAGE: &str = include_str!("dashboard.html");

/// How many finished rollouts the page lists.
const HISTORY_SHOWN: usize = 10;

/// The page's data: the leader's status (this node's own when no leader answers), the
/// rollout summary of `cluster status --json`, and the latest history without manifests.
pub async fn state(node: &NodeHandle) -> Result<serde_json::Value, String> {
    let status = match node.status(false, 0).await {
        Ok(status) => status,
        Err(_) => node.status(true, 0).await.map_err(|e| e.to_string())?,
    };
    let view = node.rollout_view();
    let members: Vec<u64> = status.nodes.iter().map(|n| n.id).collect();
    let history = crate::api::rollout::history_json(&view.history, HISTORY_SHOWN);
    Ok(serde_json::json!({
        "status": status,
        "rollout": crate::api::rollout::status_json(&view, &members),
        "history": history,
    }))
}

/// Serves the page on `listener` until `stop`.
pub async fn serve(listener: TcpListener, node: Arc<NodeHandle>, mut stop: watch::Receiver<bool>) {
    use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
    let app = axum::Router::new()
        .route(
            "/",
            axum::routing::get(|| async { ([(CONTENT_TYPE, "text/html; charset=utf-8")], PAGE) }),
        )
        .route(
            "/api/state",
            axum::routing::get(move || {
                let node = node.clone();
                async move {
                    let headers = [
                        (CONTENT_TYPE, "application/json"),
                        (CACHE_CONTROL, "no-store"),
                    ];
                    match state(&node).await {
                        Ok(json) => (StatusCode::OK, headers, json.to_string()),
                        Err(e) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            headers,
                            serde_json::json!({"error": e}).to_string(),
                        ),
                    }
                }
            }),
        );
    let served = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = stop.wait_for(|stop| *stop).await;
    });
    if let Err(e) = served.await {
        tracing::error!(error = %e, "the dashboard listener failed");
    }
}
