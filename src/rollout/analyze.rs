//! Evaluates the active deployment's metric gates on the leader: each analysis at its
//! interval while [`analysis::due`] holds, its evaluation recorded in the deployment (one
//! replicated `RecordEvaluation`), then [`analysis::decide`] on what is recorded; a stop
//! becomes the state a failed node would cause (`reverting`, or `halting` under
//! `--on-failure halt`) with the analysis's reason, a pause `paused`.
//!
//! Nothing here survives a leader change but timers: a new leader evaluates each analysis
//! once it leads (the recorded evaluations carry the streaks over).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use tokio::sync::watch;
use tokio::time::Instant;

use super::analysis::{self, Analysis, Decision};
use super::cluster::Cluster;
use crate::clock::unix_ms;
use crate::state::{Command, DeploymentState, OnFailure, Response};

/// How often the loop looks at the deployment.
const TICK: Duration = Duration::from_millis(250);

/// The longest a query may take (an analysis's interval, if shorter).
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest answer read from Prometheus.
const MAX_ANSWER_BYTES: usize = 1 << 20;

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Empty<bytes::Bytes>,
>;

/// Runs until `stop`.
pub async fn analyze<C: Cluster>(cluster: Arc<C>, mut stop: watch::Receiver<bool>) {
    let client: Client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    // When each analysis (by generation and name) is next due on this leader.
    let mut next: BTreeMap<(u64, String), Instant> = BTreeMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if !cluster.raft_view().leading {
            next.clear();
            continue;
        }
        // The gates are copied only while they are due (most ticks find none).
        let Some((generation, due)) = cluster.read(|s| {
            s.deployment.as_ref().map(|d| {
                let due =
                    analysis::due(d).then(|| (d.strategy.analyses.clone(), d.strategy.on_failure));
                (d.generation, due)
            })
        }) else {
            next.clear();
            continue;
        };
        next.retain(|(g, _), _| *g == generation);
        let Some((analyses, on_failure)) = due else {
            continue;
        };
        for spec in &analyses {
            let key = (generation, spec.name.clone());
            let now = Instant::now();
            if next.get(&key).is_some_and(|at| *at > now) {
                continue;
            }
            next.insert(key, now + Duration::from_millis(spec.interval_ms));
            let answer = query(&client, spec).await;
            let evaluation = spec.judge(answer, unix_ms());
            tracing::info!(
                generation,
                analysis = %spec.name,
                value = ?evaluation.value,
                threshold = %evaluation.threshold,
                verdict = %evaluation.verdict,
                detail = evaluation.detail.as_deref().unwrap_or(""),
                "metric gate evaluated"
            );
            let recorded = cluster
                .propose(Command::RecordEvaluation {
                    generation,
                    evaluation: Box::new(evaluation),
                })
                .await;
            match recorded {
                Ok(Response::Ok) => {}
                Ok(Response::Rejected { reason }) => {
                    tracing::info!(%reason, "evaluation not recorded");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "evaluation not recorded");
                    break;
                }
            }
            let decision = cluster.read(|s| {
                s.deployment
                    .as_ref()
                    .filter(|d| d.generation == generation)
                    .map(|d| analysis::decide(&d.strategy.analyses, &d.evaluations))
            });
            let (state, reason) = match decision {
                None | Some(Decision::Continue) => continue,
                Some(Decision::Stop(reason)) => match on_failure {
                    OnFailure::Revert => (DeploymentState::Reverting, reason),
                    OnFailure::Halt => (DeploymentState::Halting, reason),
                },
                Some(Decision::Pause(reason)) => (DeploymentState::Paused, reason),
            };
            tracing::warn!(generation, %state, %reason, "a metric gate stops the rollout");
            let command = Command::SetDeploymentState {
                generation,
                state,
                reason: Some(reason),
                at_ms: unix_ms(),
            };
            if let Err(e) = cluster.propose(command).await {
                tracing::warn!(error = %e, "the metric gate's decision was not recorded");
            }
            break;
        }
    }
}

/// Asks Prometheus for the analysis's value now: `GET /api/v1/query?query=...`.
async fn query(client: &Client, spec: &Analysis) -> Result<f64, String> {
    let url = format!(
        "{}/api/v1/query?query={}",
        spec.prometheus,
        encode(&spec.query)
    );
    let request = hyper::Request::get(url.as_str())
        .body(http_body_util::Empty::new())
        .map_err(|e| format!("cannot ask {}: {e}", spec.prometheus))?;
    let timeout = QUERY_TIMEOUT.min(Duration::from_millis(spec.interval_ms));
    let asked = async {
        let reply = client.request(request).await.map_err(|e| {
            format!(
                "{} unreachable: {}",
                spec.prometheus,
                crate::error::Chain(&e)
            )
        })?;
        let status = reply.status();
        let body = http_body_util::Limited::new(reply.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| format!("{}: reading the answer: {e}", spec.prometheus))?
            .to_bytes();
        // Prometheus answers a bad query with 400 and a JSON error: read it either way.
        match analysis::read_answer(&body) {
            Err(why) if !status.is_success() => Err(format!("{status}: {why}")),
            other => other,
        }
    };
    tokio::time::timeout(timeout, asked)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "{} did not answer within {timeout:?}",
                spec.prometheus
            ))
        })
}

/// Percent-encodes a query parameter (everything but unreserved characters).
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_is_percent_encoded() {
        assert_eq!(
            encode("sum(rate(x{a=~\"5..\"}[1m])) / 2"),
            "sum%28rate%28x%7Ba%3D~%225..%22%7D%5B1m%5D%29%29%20%2F%202"
        );
    }
}
