//! Prometheus metrics: the text exposition format (pure), and the process-wide recorder
//! of what happens over time (phase durations, finished rollouts, release transfers),
//! which the node renders beside gauges read from its state at scrape time
//! (`node::metrics`).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Mutex, OnceLock};

use crate::state::deployment::Phase;
use crate::state::{Command, Record, State};

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A metric family's type.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Builds one scrape in the text exposition format: each family's HELP and TYPE, then
/// its samples.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// Starts family `name`; its samples follow.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample of the current family (`name` carries a histogram's suffix).
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (key, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{key}=\"{}\"", escape(value));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", number(value));
    }

    /// A family of one sample with no labels.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// The `_bucket`, `_sum` and `_count` samples of `histogram`.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], histogram: &Histogram) {
        let mut cumulative = 0;
        for (bound, count) in histogram.bounds.iter().zip(&histogram.counts) {
            cumulative += count;
            let le = number(*bound);
            let mut with_le = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&format!("{name}_bucket"), &with_le, cumulative as f64);
        }
        let mut with_le = labels.to_vec();
        with_le.push(("le", "+Inf"));
        self.sample(&format!("{name}_bucket"), &with_le, histogram.count as f64);
        self.sample(&format!("{name}_sum"), labels, histogram.sum);
        self.sample(&format!("{name}_count"), labels, histogram.count as f64);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn number(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{value}")
    }
}

/// Observations counted into buckets with upper bounds `bounds` (ascending).
#[derive(Clone, Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket, not cumulative; past the last bound only in `count`.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|bound| value <= *bound) {
            self.counts[i] += 1;
        }
        self.sum += value;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

/// Phases last from a fraction of a second (backup) to the health deadline and the
/// stabilization window (minutes).
pub const PHASE_SECONDS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Checking a release byte for byte: milliseconds to tens of seconds for gigabytes.
pub const VERIFY_SECONDS: &[f64] = &[0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// What happened in this process since it started, counted as it happened.
pub struct Recorder {
    /// Wall-clock start of this process: log entries replayed at start-up that happened
    /// before it are not counted again.
    started_ms: u64,
    inner: Mutex<Recorded>,
}

struct Recorded {
    phase_seconds: BTreeMap<&'static str, Histogram>,
    rollouts_finished: BTreeMap<&'static str, u64>,
    fetched_bytes: u64,
    fetched_chunks: u64,
    reused_bytes: u64,
    verify_seconds: Histogram,
}

/// The process's recorder (one node per process).
pub fn recorder() -> &'static Recorder {
    static RECORDER: OnceLock<Recorder> = OnceLock::new();
    RECORDER.get_or_init(|| Recorder::new(crate::clock::unix_ms()))
}

/// A node's phase and since when, before a command is applied (see [`Recorder::applied`]).
pub struct Before(Option<(Phase, Option<u64>)>);

impl Before {
    pub fn of(state: &State, command: &Command) -> Before {
        let Command::SetNodePhase { node, .. } = command else {
            return Before(None);
        };
        Before(
            state
                .deployment
                .as_ref()
                .and_then(|d| d.nodes.get(node))
                .map(|step| (step.phase, step.phase_since_ms)),
        )
    }
}

impl Recorder {
    pub fn new(started_ms: u64) -> Recorder {
        Recorder {
            started_ms,
            inner: Mutex::new(Recorded {
                phase_seconds: BTreeMap::new(),
                rollouts_finished: BTreeMap::new(),
                fetched_bytes: 0,
                fetched_chunks: 0,
                reused_bytes: 0,
                verify_seconds: Histogram::new(VERIFY_SECONDS),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recorded> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts what applying `command` did to `state` (now after it): a node that left a
    /// phase, and a rollout that ended (`records` name its history entry).
    pub fn applied(&self, before: Before, command: &Command, state: &State, records: &[Record]) {
        if let (
            Command::SetNodePhase {
                node, phase, at_ms, ..
            },
            Before(Some((left, Some(since)))),
        ) = (command, &before)
        {
            let moved = state
                .deployment
                .as_ref()
                .and_then(|d| d.nodes.get(node))
                .is_some_and(|step| step.phase == *phase)
                || records.iter().any(|r| matches!(r, Record::History(_)));
            if moved && left != phase && *at_ms >= self.started_ms {
                let seconds = at_ms.saturating_sub(*since) as f64 / 1000.0;
                self.lock()
                    .phase_seconds
                    .entry(left.as_str())
                    .or_insert_with(|| Histogram::new(PHASE_SECONDS))
                    .observe(seconds);
            }
        }
        for entry in state.concluded(records) {
            if entry.finished_ms.unwrap_or(entry.started_ms) >= self.started_ms {
                *self
                    .lock()
                    .rollouts_finished
                    .entry(entry.outcome.as_str())
                    .or_default() += 1;
            }
        }
    }

    /// A release's content arrived: `fetched` bytes in `chunks` over the network,
    /// `reused` bytes from releases already held.
    pub fn fetched(&self, fetched: u64, chunks: u64, reused: u64) {
        let mut recorded = self.lock();
        recorded.fetched_bytes += fetched;
        recorded.fetched_chunks += chunks;
        recorded.reused_bytes += reused;
    }

    /// A held release was checked byte for byte in `seconds`.
    pub fn verified(&self, seconds: f64) {
        self.lock().verify_seconds.observe(seconds);
    }

    /// The recorder's families.
    pub fn render(&self, out: &mut Exposition) {
        let recorded = self.lock();
        out.family(
            "cluster_rollout_phase_duration_seconds",
            Kind::Histogram,
            "How long nodes stayed in each rollout phase, counted when they left it.",
        );
        for (phase, histogram) in &recorded.phase_seconds {
            out.histogram(
                "cluster_rollout_phase_duration_seconds",
                &[("phase", phase)],
                histogram,
            );
        }
        out.family(
            "cluster_rollouts_finished_total",
            Kind::Counter,
            "Rollouts that ended, by outcome (completed, failed, reverted, aborted).",
        );
        for outcome in ["completed", "failed", "reverted", "aborted"] {
            let count = recorded
                .rollouts_finished
                .get(outcome)
                .copied()
                .unwrap_or(0);
            out.sample(
                "cluster_rollouts_finished_total",
                &[("outcome", outcome)],
                count as f64,
            );
        }
        out.single(
            "cluster_release_fetched_bytes_total",
            Kind::Counter,
            "Release content this node fetched from peers or received in uploads.",
            recorded.fetched_bytes as f64,
        );
        out.single(
            "cluster_release_fetched_chunks_total",
            Kind::Counter,
            "Content chunks this node fetched from peers or received in uploads.",
            recorded.fetched_chunks as f64,
        );
        out.single(
            "cluster_release_reused_bytes_total",
            Kind::Counter,
            "Release content this node took from releases it already held instead of fetching.",
            recorded.reused_bytes as f64,
        );
        out.family(
            "cluster_release_verify_seconds",
            Kind::Histogram,
            "Time to check a held release byte for byte against its build hash.",
        );
        out.histogram(
            "cluster_release_verify_seconds",
            &[],
            &recorded.verify_seconds,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_escape_labels_and_histograms_are_cumulative() {
        let mut out = Exposition::default();
        out.family("x_total", Kind::Counter, "A \\ help\nline.");
        out.sample("x_total", &[("path", "a\"b\\c\nd")], 3.0);
        let mut histogram = Histogram::new(&[1.0, 5.0]);
        for v in [0.5, 0.7, 3.0, 9.0] {
            histogram.observe(v);
        }
        out.family("d_seconds", Kind::Histogram, "D.");
        out.histogram("d_seconds", &[("phase", "sync")], &histogram);
        let text = out.finish();
        assert_eq!(
            text,
            "# HELP x_total A \\\\ help\\nline.\n# TYPE x_total counter\n\
             x_total{path=\"a\\\"b\\\\c\\nd\"} 3\n\
             # HELP d_seconds D.\n# TYPE d_seconds histogram\n\
             d_seconds_bucket{phase=\"sync\",le=\"1\"} 2\n\
             d_seconds_bucket{phase=\"sync\",le=\"5\"} 3\n\
             d_seconds_bucket{phase=\"sync\",le=\"+Inf\"} 4\n\
             d_seconds_sum{phase=\"sync\"} 13.2\n\
             d_seconds_count{phase=\"sync\"} 4\n"
        );
    }

    #[test]
    fn a_phase_is_timed_when_a_node_leaves_it_and_replayed_history_is_not_counted() {
        use crate::state::deployment::{Deployment, NodeStep, Role};
        let recorder = Recorder::new(10_000);
        let mut state = State::default();
        let mut deployment = Deployment {
            generation: 1,
            ..Deployment::default()
        };
        deployment
            .nodes
            .insert(2, NodeStep::pending(Role::Voter, "n2", "old"));
        deployment.order = vec![2];
        state.deployment = Some(deployment);
        let mut step = |phase: Phase, at_ms: u64| {
            let command = Command::SetNodePhase {
                generation: 1,
                node: 2,
                phase,
                error: None,
                at_ms,
            };
            let before = Before::of(&state, &command);
            let (_, records) = state.apply(&command);
            recorder.applied(before, &command, &state, &records);
        };
        // Before this process started: replayed, not counted.
        step(Phase::Backup, 5_000);
        step(Phase::Sync, 9_000);
        // Live: sync lasted 1.5 s, activate 0.25 s; pending has no start to time.
        step(Phase::Activate, 10_500);
        step(Phase::Health, 10_750);
        let recorded = recorder.lock();
        let counts: Vec<(&str, u64)> = recorded
            .phase_seconds
            .iter()
            .map(|(phase, h)| (*phase, h.count()))
            .collect();
        assert_eq!(counts, [("activate", 1), ("sync", 1)]);
        assert_eq!(recorded.phase_seconds["sync"].sum, 1.5);
        assert_eq!(recorded.phase_seconds["activate"].sum, 0.25);
    }
}
