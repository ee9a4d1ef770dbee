//! The dashboard: a read-only web page of the cluster (members, leader, builds,
//! acknowledgement ages, the active rollout's phases, history), refreshed every second
//! from `/api/state`. A node serves it with `--dashboard-listen` (HTTPS for viewer
//! certificates, `super::http`); `cluster dashboard` serves it on an operator's loopback.

use std::sync::Arc;

use axum::http::StatusCode;

use super::handle::NodeHandle;
use crate::api::rollout::RolloutView;
use crate::api::ClusterStatus;

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
    Ok(page_state(&status, &node.rollout_view()))
}

/// The page's data from a status and a rollout view, wherever they were read.
pub fn page_state(status: &ClusterStatus, view: &RolloutView) -> serde_json::Value {
    let members: Vec<u64> = status.nodes.iter().map(|n| n.id).collect();
    serde_json::json!({
        "status": status,
        "rollout": crate::api::rollout::status_json(view, &members),
        "history": crate::api::rollout::history_json(&view.history, HISTORY_SHOWN),
    })
}

/// The page and its data; `super::http::serve` serves it on a node, and `cluster
/// dashboard` on an operator's loopback with `state` read through the Control API.
pub fn app<F, Fut>(state: F) -> axum::Router
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<serde_json::Value, String>> + Send + 'static,
{
    use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
    axum::Router::new()
        .route(
            "/",
            axum::routing::get(|| async { ([(CONTENT_TYPE, "text/html; charset=utf-8")], PAGE) }),
        )
        .route(
            "/api/state",
            axum::routing::get(move || {
                let state = state.clone();
                async move {
                    let headers = [
                        (CONTENT_TYPE, "application/json"),
                        (CACHE_CONTROL, "no-store"),
                    ];
                    match state().await {
                        Ok(json) => (StatusCode::OK, headers, json.to_string()),
                        Err(e) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            headers,
                            serde_json::json!({"error": e}).to_string(),
                        ),
                    }
                }
            }),
        )
}

/// The dashboard app of `node`: its data is the node's own view.
pub fn node_app(node: Arc<NodeHandle>) -> axum::Router {
    app(move || {
        let node = node.clone();
        async move { state(&node).await }
    })
}
