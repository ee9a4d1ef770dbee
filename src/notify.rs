//! Rollout notifications (`--notify-url`): a JSON document POSTed for every rollout
//! state change (started, a node's phase, paused, resumed, halting, reverting, completed,
//! failed, reverted, aborted) and every boot-guard restore.
//!
//! Events are derived as the state machine applies commands (on every member, in log
//! order), and the node that leads when it applies one sends it: once per cluster while
//! leadership holds still. A new leader sends what it applies after its election, entries
//! its predecessor may have sent already among them: delivery is at least once, with an
//! `id` a receiver deduplicates on. Delivery never blocks nor fails a rollout: each URL has its own bounded queue
//! and task, a failed POST is retried with backoff, and an event that cannot be delivered
//! is dropped with a warning.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::state::deployment::Phase;
use crate::state::{Command, DeploymentState, Record, State};

/// One notification.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    /// Unique per change: `<generation>-<log index>-<n>`; the same on every member.
    pub id: String,
    /// `started`, `node_phase`, `paused`, `running` (resumed), `halting`, `reverting`,
    /// `completed`, `failed`, `reverted`, `aborted`, or `auto_restore`.
    pub event: String,
    pub generation: u64,
    /// The node concerned (`node_phase`, `auto_restore`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The deployment's state after the change.
    pub state: String,
    pub target_hash: String,
    pub previous_hash: String,
    /// Why (a node's error, the rollout's reason, the guard's reason).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When it happened (unix ms, the leader's clock).
    pub at_ms: u64,
    /// The node that sent it.
    pub sent_by: u64,
}

/// What the state looked like before a command: enough to name what it changed.
pub struct Before {
    deployment: Option<(u64, DeploymentState, BTreeMap<u64, Phase>)>,
    restore: Option<(u64, Option<u64>)>,
}

impl Before {
    pub fn of(state: &State, command: &Command) -> Before {
        let rollout = matches!(
            command,
            Command::BeginDeployment { .. }
                | Command::SetNodePhase { .. }
                | Command::SetDeploymentState { .. }
                | Command::AbortDeployment { .. }
        );
        let deployment = state.deployment.as_ref().filter(|_| rollout).map(|d| {
            let phases = d.nodes.iter().map(|(id, s)| (*id, s.phase)).collect();
            (d.generation, d.state, phases)
        });
        let restore = match command {
            Command::RegisterNode { id, .. } => Some((
                *id,
                state
                    .nodes
                    .get(id)
                    .and_then(|n| n.last_auto_restore.as_ref())
                    .map(|r| r.at_ms),
            )),
            _ => None,
        };
        Before {
            deployment,
            restore,
        }
    }
}

/// The events `command` (entry `index`) caused, `state` being after it.
pub fn derive(
    before: &Before,
    command: &Command,
    index: u64,
    state: &State,
    records: &[Record],
    sent_by: u64,
) -> Vec<Event> {
    let mut events = Vec::new();
    let mut push = |event: &str,
                    generation: u64,
                    node: Option<u64>,
                    phase: Option<Phase>,
                    st: DeploymentState,
                    hashes: (&str, &str),
                    reason: Option<String>,
                    at_ms: u64| {
        events.push(Event {
            id: String::new(),
            event: event.to_string(),
            generation,
            node,
            phase: phase.map(|p| p.as_str().to_string()),
            state: st.as_str().to_string(),
            target_hash: hashes.0.to_string(),
            previous_hash: hashes.1.to_string(),
            reason,
            at_ms,
            sent_by,
        });
    };
    let at_ms = match command {
        Command::SetNodePhase { at_ms, .. }
        | Command::SetDeploymentState { at_ms, .. }
        | Command::AbortDeployment { at_ms, .. } => *at_ms,
        Command::BeginDeployment { deployment } => deployment.started_ms,
        _ => 0,
    };
    if let Some(d) = &state.deployment {
        let hashes = (d.target_hash.as_str(), d.previous_hash.as_str());
        match &before.deployment {
            Some((generation, _, _)) if *generation != d.generation => {}
            None if matches!(command, Command::BeginDeployment { .. }) => push(
                "started",
                d.generation,
                None,
                None,
                d.state,
                hashes,
                d.trigger.clone(),
                at_ms,
            ),
            None => {}
            Some((_, was, phases)) => {
                for (id, step) in &d.nodes {
                    if phases.get(id) != Some(&step.phase) {
                        push(
                            "node_phase",
                            d.generation,
                            Some(*id),
                            Some(step.phase),
                            d.state,
                            hashes,
                            step.error.clone(),
                            at_ms,
                        );
                    }
                }
                if *was != d.state {
                    push(
                        d.state.as_str(),
                        d.generation,
                        None,
                        None,
                        d.state,
                        hashes,
                        d.reason.clone(),
                        at_ms,
                    );
                }
            }
        }
    }
    for entry in state.concluded(records) {
        let hashes = (entry.target_hash.as_str(), entry.previous_hash.as_str());
        if let Some((_, _, phases)) = &before.deployment {
            for (id, step) in &entry.nodes {
                if phases.get(id) != Some(&step.phase) {
                    push(
                        "node_phase",
                        entry.generation,
                        Some(*id),
                        Some(step.phase),
                        entry.outcome,
                        hashes,
                        step.error.clone(),
                        at_ms,
                    );
                }
            }
        }
        push(
            entry.outcome.as_str(),
            entry.generation,
            None,
            None,
            entry.outcome,
            hashes,
            entry.reason.clone(),
            entry.finished_ms.unwrap_or(at_ms),
        );
    }
    if let (Some((id, was)), Command::RegisterNode { .. }) = (&before.restore, command) {
        let restore = state
            .nodes
            .get(id)
            .and_then(|n| n.last_auto_restore.as_ref());
        if let Some(r) = restore.filter(|r| Some(r.at_ms) != *was) {
            push(
                "auto_restore",
                r.generation,
                Some(*id),
                None,
                state
                    .deployment
                    .as_ref()
                    .map_or(DeploymentState::Running, |d| d.state),
                (&r.to, &r.from),
                Some(r.reason.clone()),
                r.at_ms,
            );
        }
    }
    for (n, event) in events.iter_mut().enumerate() {
        event.id = format!("{}-{index}-{n}", event.generation);
    }
    events
}

/// Where the state machine hands events to this process's notifier, once it runs.
struct Sink {
    events: mpsc::Sender<Event>,
    node: u64,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Called by the state machine after each applied command (see [`derive`]); a no-op
/// until [`run`] installed the notifier. Never waits: a full queue drops the events.
pub fn applied(before: &Before, command: &Command, index: u64, state: &State, records: &[Record]) {
    let Some(sink) = SINK.get() else {
        return;
    };
    for event in derive(before, command, index, state, records, sink.node) {
        if sink.events.try_send(event).is_err() {
            tracing::warn!("the notification queue is full: an event was dropped");
        }
    }
}

/// A notification target: `http://host:port/path` (plain HTTP only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotifyUrl(pub String);

impl std::str::FromStr for NotifyUrl {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let uri: hyper::Uri = text
            .parse()
            .map_err(|e| format!("{text:?} is not a URL: {e}"))?;
        match (uri.scheme_str(), uri.host()) {
            (Some("http"), Some(_)) => Ok(NotifyUrl(text.to_string())),
            (Some("https"), _) => Err(format!(
                "{text:?}: https notification URLs are not supported; use http:// to a \
                 receiver on a trusted network (a local relay forwards to https)"
            )),
            _ => Err(format!("{text:?} must be http://host[:port]/path")),
        }
    }
}

/// Attempts per event and URL, and the pause before the first retry (doubled each time).
pub const ATTEMPTS: u32 = 6;
pub const FIRST_RETRY: Duration = Duration::from_millis(250);
/// A POST that has not answered by then has failed.
pub const POST_TIMEOUT: Duration = Duration::from_secs(5);
/// Events waiting per URL before new ones are dropped.
const QUEUE: usize = 1024;

/// Sends the events this node applies while it leads (`leads`) to every URL, until `stop`.
pub async fn run(
    urls: Vec<NotifyUrl>,
    node: u64,
    leads: impl Fn() -> bool + Send + 'static,
    mut stop: watch::Receiver<bool>,
) {
    let (tx, mut rx) = mpsc::channel(QUEUE);
    let sink = Sink { events: tx, node };
    if SINK.set(sink).is_err() {
        tracing::error!("a notifier already runs in this process");
        return;
    }
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let queues: Vec<mpsc::Sender<Event>> = urls
        .into_iter()
        .map(|url| {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(deliver(client.clone(), url, rx, stop.clone()));
            tx
        })
        .collect();
    loop {
        let event = tokio::select! {
            event = rx.recv() => match event { Some(e) => e, None => break },
            _ = stop.wait_for(|s| *s) => break,
        };
        if !leads() {
            continue;
        }
        for queue in &queues {
            if queue.try_send(event.clone()).is_err() {
                tracing::warn!(id = %event.id, "a notification queue is full: event dropped");
            }
        }
    }
}

async fn deliver<C>(
    client: hyper_util::client::legacy::Client<C, http_body_util::Full<bytes::Bytes>>,
    url: NotifyUrl,
    mut events: mpsc::Receiver<Event>,
    mut stop: watch::Receiver<bool>,
) where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    while let Some(event) = tokio::select! {
        event = events.recv() => event,
        _ = stop.wait_for(|s| *s) => None,
    } {
        let body = serde_json::to_vec(&event).expect("an event always serializes");
        let mut pause = FIRST_RETRY;
        for attempt in 1..=ATTEMPTS {
            let request = hyper::Request::post(url.0.as_str())
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .header("x-cluster-event-id", event.id.as_str())
                .body(http_body_util::Full::new(bytes::Bytes::from(body.clone())))
                .expect("a checked URL makes a request");
            let outcome = tokio::time::timeout(POST_TIMEOUT, client.request(request)).await;
            let problem = match outcome {
                Ok(Ok(reply)) if reply.status().is_success() => break,
                Ok(Ok(reply)) => format!("answered {}", reply.status()),
                Ok(Err(e)) => format!("failed: {}", crate::error::Chain(&e)),
                Err(_) => format!("did not answer within {POST_TIMEOUT:?}"),
            };
            if attempt == ATTEMPTS {
                tracing::warn!(url = %url.0, id = %event.id, "notification dropped after {ATTEMPTS} attempts: {problem}");
                break;
            }
            tracing::debug!(url = %url.0, id = %event.id, attempt, "notification {problem}; retrying");
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            pause = (pause * 2).min(Duration::from_secs(8));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::deployment::{Deployment, NodeStep, Role};

    fn apply(state: &mut State, command: Command, index: u64) -> Vec<Event> {
        let before = Before::of(state, &command);
        let (_, records) = state.apply(&command);
        derive(&before, &command, index, state, &records, 1)
    }

    #[test]
    fn a_rollouts_changes_become_events() {
        let mut state = State::default();
        let mut deployment = Deployment {
            generation: 1,
            target_hash: "new".into(),
            previous_hash: "old".into(),
            started_ms: 1_000,
            ..Deployment::default()
        };
        deployment.order = vec![2];
        deployment
            .nodes
            .insert(2, NodeStep::pending(Role::Voter, "n2", "old"));
        let begin = Command::BeginDeployment {
            deployment: deployment.clone(),
        };
        let started = apply(&mut state, begin, 9);
        assert_eq!(started.len(), 1);
        assert_eq!(
            (started[0].event.as_str(), started[0].id.as_str()),
            ("started", "1-9-0")
        );
        assert_eq!(started[0].target_hash, "new");

        let phase = |phase, at_ms| Command::SetNodePhase {
            generation: 1,
            node: 2,
            phase,
            error: None,
            at_ms,
        };
        let events = apply(&mut state, phase(Phase::Backup, 2_000), 10);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].event, "node_phase");
        assert_eq!(events[0].node, Some(2));
        assert_eq!(events[0].phase.as_deref(), Some("backup"));
        let paused = apply(
            &mut state,
            Command::SetDeploymentState {
                generation: 1,
                state: DeploymentState::Paused,
                reason: Some("by alice".into()),
                at_ms: 3_000,
            },
            11,
        );
        let kinds: Vec<&str> = paused.iter().map(|e| e.event.as_str()).collect();
        assert_eq!(kinds, ["paused"]);
        assert_eq!(paused[0].reason.as_deref(), Some("by alice"));
        // The same phase again changes nothing, and says nothing.
        assert!(apply(&mut state, phase(Phase::Backup, 4_000), 12).is_empty());
    }

    #[test]
    fn a_boot_guard_restore_a_node_reports_is_an_event_once() {
        use crate::state::{GuardRestore, NodeInfo};
        let mut state = State::default();
        let report = |restore: Option<GuardRestore>| Command::RegisterNode {
            id: 3,
            info: NodeInfo {
                addr: "n3".into(),
                build_hash: "old".into(),
                last_auto_restore: restore,
                ..NodeInfo::default()
            },
        };
        assert!(apply(&mut state, report(None), 5).is_empty());
        let restore = GuardRestore {
            from: "old".into(),
            to: "bad".into(),
            generation: 2,
            reason: "did not stay up for 3 starts".into(),
            at_ms: 7_000,
        };
        let events = apply(&mut state, report(Some(restore.clone())), 6);
        assert_eq!(events.len(), 1, "{events:?}");
        let event = &events[0];
        assert_eq!(event.event, "auto_restore");
        assert_eq!((event.node, event.generation), (Some(3), 2));
        assert_eq!(
            (event.target_hash.as_str(), event.previous_hash.as_str()),
            ("bad", "old")
        );
        assert_eq!(
            event.reason.as_deref(),
            Some("did not stay up for 3 starts")
        );
        // The node reports the same restore again on its next start: no new event.
        assert!(apply(&mut state, report(Some(restore)), 7).is_empty());
    }

    #[test]
    fn only_http_urls_are_accepted() {
        assert!("http://127.0.0.1:9/hook".parse::<NotifyUrl>().is_ok());
        let https = "https://hooks.example/x".parse::<NotifyUrl>().unwrap_err();
        assert!(https.contains("not supported"), "{https}");
        assert!("ftp://x/".parse::<NotifyUrl>().is_err());
        assert!("not a url".parse::<NotifyUrl>().is_err());
    }
}
