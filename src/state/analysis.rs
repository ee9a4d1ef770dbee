//! Metric gates as the deployment records them: the gate an operator gave and each of its
//! evaluations. Plain data; what they mean (parsing, verdicts, decisions) is
//! `rollout::analysis`'s.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Evaluations a deployment keeps (the newest); older ones are dropped.
pub const EVALUATIONS_KEPT: usize = 200;

/// What an inconclusive evaluation does.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Inconclusive {
    /// It counts toward the failure limit like a failed one.
    #[default]
    Fail,
    /// It pauses the rollout (`cluster rollout resume` goes on).
    Pause,
}

/// One metric gate, as the operator gave it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Analysis {
    pub name: String,
    /// Base URL of the Prometheus server (`http://host:port`).
    pub prometheus: String,
    /// A PromQL instant query that yields one number.
    pub query: String,
    /// The value must be at most this.
    pub max: Option<f64>,
    /// The value must be at least this.
    pub min: Option<f64>,
    pub interval_ms: u64,
    /// Failed evaluations in a row that stop the rollout.
    pub failure_limit: u32,
    pub inconclusive: Inconclusive,
}

// Thresholds are finite numbers (the parser refuses NaN), so equality is total.
impl Eq for Analysis {}

/// How an evaluation came out.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    Fail,
    Inconclusive,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::Inconclusive => "inconclusive",
        })
    }
}

/// One evaluation of one analysis, as the deployment records it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Evaluation {
    pub name: String,
    pub query: String,
    /// What the query returned, when it returned one number.
    pub value: Option<f64>,
    /// What the value had to be ("<= 0.001", ">= 10").
    pub threshold: String,
    pub verdict: Verdict,
    /// Why it was inconclusive.
    #[serde(default)]
    pub detail: Option<String>,
    pub at_ms: u64,
}

// A recorded value is a finite number or absent (NaN is inconclusive, with no value).
impl Eq for Evaluation {}
