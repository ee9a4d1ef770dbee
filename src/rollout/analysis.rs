//! Metric gates ("analyses"): a PromQL query the leader evaluates against a Prometheus
//! server at an interval while a rollout runs, with a threshold its value must keep.
//! Pure: the spec, reading Prometheus's answer, the verdict, and what the evaluations
//! recorded so far decide. The runtime (`analyze`) does the querying and the proposing.
//!
//! An analysis is evaluated while the deployment is running and some node already serves
//! the new release (its phase is `health`, `stabilize` or `committed`): during each
//! node's stabilization window and the final soak. `failure_limit` failed evaluations in
//! a row stop the rollout as a failed node would (reverted, or halted under
//! `--on-failure halt`), with the query and its value as the reason. An inconclusive
//! evaluation (the query failed, returned no data, more than one series, or NaN) counts
//! as a failure, or pauses the rollout, as the analysis says.

use crate::state::{Deployment, DeploymentState, Phase};

/// Longest query accepted, in bytes (every evaluation records it).
pub const MAX_QUERY_BYTES: usize = 1024;

pub use crate::state::analysis::{Analysis, Evaluation, Inconclusive, Verdict, EVALUATIONS_KEPT};

impl Analysis {
    /// Parses `name=N,prometheus=URL[,max=X][,min=X][,interval=10s][,failure-limit=N]
    /// [,inconclusive=fail|pause],query=PROMQL`. `query` comes last and takes the rest of
    /// the text, commas and all (PromQL is full of them).
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (head, query) = match spec.split_once("query=") {
            Some((head, query)) => (head, query.trim()),
            None => {
                return Err(format!(
                    "{spec:?} has no query=: give the PromQL query last"
                ))
            }
        };
        if !(head.is_empty() || head.ends_with(',')) {
            return Err(format!(
                "{spec:?}: query= must start a field (name=...,prometheus=...,query=...)"
            ));
        }
        let mut analysis = Analysis {
            name: String::new(),
            prometheus: String::new(),
            query: query.to_string(),
            max: None,
            min: None,
            interval_ms: 10_000,
            failure_limit: 1,
            inconclusive: Inconclusive::Fail,
        };
        for field in head.split(',').filter(|f| !f.trim().is_empty()) {
            let (key, value) = field
                .split_once('=')
                .map(|(k, v)| (k.trim(), v.trim()))
                .ok_or_else(|| format!("{field:?} is not key=value"))?;
            match key {
                "name" => analysis.name = value.to_string(),
                "prometheus" => analysis.prometheus = value.trim_end_matches('/').to_string(),
                "max" => analysis.max = Some(number(key, value)?),
                "min" => analysis.min = Some(number(key, value)?),
                "interval" => {
                    analysis.interval_ms = humantime::parse_duration(value)
                        .map_err(|e| format!("interval={value}: {e} (e.g. 10s)"))?
                        .as_millis() as u64
                }
                "failure-limit" => {
                    analysis.failure_limit = value.parse().map_err(|_| {
                        format!("failure-limit={value} is not a number of evaluations")
                    })?
                }
                "inconclusive" => {
                    analysis.inconclusive = match value {
                        "fail" => Inconclusive::Fail,
                        "pause" => Inconclusive::Pause,
                        other => {
                            return Err(format!("inconclusive={other}: fail or pause"));
                        }
                    }
                }
                other => {
                    return Err(format!(
                        "unknown field {other:?}: name, prometheus, max, min, interval, \
                         failure-limit, inconclusive, query"
                    ))
                }
            }
        }
        analysis.check()?;
        Ok(analysis)
    }

    /// Every rule a spec must keep, also checked when a deployment is begun.
    pub fn check(&self) -> Result<(), String> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !name_ok {
            return Err(format!(
                "analysis name {:?}: 1 to 64 letters, digits, - or _",
                self.name
            ));
        }
        let uri: Option<hyper::Uri> = self.prometheus.parse().ok();
        match uri.as_ref().map(|u| (u.scheme_str(), u.host())) {
            Some((Some("http"), Some(_))) => {}
            Some((Some("https"), _)) => {
                return Err(format!(
                    "analysis {}: prometheus={}: https is not supported; use http:// to a \
                     server on a trusted network",
                    self.name, self.prometheus
                ))
            }
            _ => {
                return Err(format!(
                    "analysis {}: prometheus={:?} must be http://host:port",
                    self.name, self.prometheus
                ))
            }
        }
        if self.query.is_empty() || self.query.len() > MAX_QUERY_BYTES {
            return Err(format!(
                "analysis {}: the query must be 1 to {MAX_QUERY_BYTES} bytes",
                self.name
            ));
        }
        if self.max.is_none() && self.min.is_none() {
            return Err(format!(
                "analysis {}: give max= or min= (or both): what the value must keep",
                self.name
            ));
        }
        if let (Some(min), Some(max)) = (self.min, self.max) {
            if min > max {
                return Err(format!(
                    "analysis {}: min={min} is above max={max}",
                    self.name
                ));
            }
        }
        if self.interval_ms < 1000 {
            return Err(format!(
                "analysis {}: interval must be at least 1s",
                self.name
            ));
        }
        if self.failure_limit == 0 {
            return Err(format!(
                "analysis {}: failure-limit must be at least 1",
                self.name
            ));
        }
        Ok(())
    }

    /// What the value must be, in words: "<= 0.001", ">= 10", ">= 1 and <= 5".
    pub fn threshold(&self) -> String {
        match (self.min, self.max) {
            (Some(min), Some(max)) => format!(">= {min} and <= {max}"),
            (Some(min), None) => format!(">= {min}"),
            (None, Some(max)) => format!("<= {max}"),
            (None, None) => "anything".into(),
        }
    }

    /// The evaluation of what Prometheus answered (a value, or why there is none).
    pub fn judge(&self, answer: Result<f64, String>, at_ms: u64) -> Evaluation {
        let (value, verdict, detail) = match answer {
            Ok(value) => {
                let low = self.min.is_some_and(|min| value < min);
                let high = self.max.is_some_and(|max| value > max);
                let verdict = if low || high {
                    Verdict::Fail
                } else {
                    Verdict::Pass
                };
                (Some(value), verdict, None)
            }
            Err(why) => (None, Verdict::Inconclusive, Some(why)),
        };
        Evaluation {
            name: self.name.clone(),
            query: self.query.clone(),
            value,
            threshold: self.threshold(),
            verdict,
            detail,
            at_ms,
        }
    }
}

fn number(key: &str, value: &str) -> Result<f64, String> {
    let parsed: f64 = value
        .parse()
        .map_err(|_| format!("{key}={value} is not a number"))?;
    if !parsed.is_finite() {
        return Err(format!("{key}={value} must be a finite number"));
    }
    Ok(parsed)
}

/// The one number in a Prometheus `/api/v1/query` answer, or why there is none.
pub fn read_answer(body: &[u8]) -> Result<f64, String> {
    let json: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| format!("Prometheus answered something that is not JSON: {e}"))?;
    if json["status"] != "success" {
        return Err(format!(
            "Prometheus refused the query: {}",
            json["error"].as_str().unwrap_or("no reason given")
        ));
    }
    let data = &json["data"];
    let sample = match data["resultType"].as_str() {
        Some("scalar") => &data["result"],
        Some("vector") => {
            let series = data["result"].as_array().map(Vec::len).unwrap_or(0);
            match series {
                0 => return Err("no data (the query matched no series)".into()),
                1 => &data["result"][0]["value"],
                n => {
                    return Err(format!(
                        "{n} series: aggregate the query to one (sum, max, ...)"
                    ))
                }
            }
        }
        other => {
            return Err(format!(
                "a {} result: the query must yield one number",
                other.unwrap_or("missing")
            ))
        }
    };
    let text = sample[1]
        .as_str()
        .ok_or("Prometheus's sample has no value")?;
    let value: f64 = text
        .parse()
        .map_err(|_| format!("Prometheus's value {text:?} is not a number"))?;
    if value.is_nan() {
        return Err("NaN (no traffic in the window?)".into());
    }
    Ok(value)
}

/// Whether the deployment's analyses are evaluated now: it is running, and some node
/// already serves the new release.
pub fn due(deployment: &Deployment) -> bool {
    deployment.state == DeploymentState::Running
        && !deployment.strategy.analyses.is_empty()
        && deployment
            .nodes
            .values()
            .any(|s| matches!(s.phase, Phase::Health | Phase::Stabilize | Phase::Committed))
}

/// What the recorded evaluations ask of the rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Continue,
    /// Stop it as a failed node would, for this reason.
    Stop(String),
    /// Pause it, for this reason.
    Pause(String),
}

/// Looks at each analysis's newest evaluations: `failure_limit` failures in a row (an
/// inconclusive one counting as a failure unless it pauses) stop the rollout; a newest
/// evaluation that is inconclusive, for an analysis that pauses, pauses it.
pub fn decide(analyses: &[Analysis], evaluations: &[Evaluation]) -> Decision {
    for analysis in analyses {
        let mine: Vec<&Evaluation> = evaluations
            .iter()
            .filter(|e| e.name == analysis.name)
            .collect();
        let Some(newest) = mine.last() else { continue };
        if newest.verdict == Verdict::Inconclusive && analysis.inconclusive == Inconclusive::Pause {
            return Decision::Pause(format!(
                "analysis {} was inconclusive: {} ({})",
                analysis.name,
                newest.detail.as_deref().unwrap_or("no value"),
                analysis.query
            ));
        }
        let failing = mine
            .iter()
            .rev()
            .take_while(|e| e.verdict != Verdict::Pass)
            .count();
        if failing >= analysis.failure_limit as usize {
            let value = match (newest.value, &newest.detail) {
                (Some(value), _) => format!("{value}"),
                (None, Some(why)) => format!("no value ({why})"),
                (None, None) => "no value".into(),
            };
            return Decision::Stop(format!(
                "analysis {} failed {failing} evaluation(s) in a row: `{}` = {value}, must be {}",
                analysis.name, analysis.query, newest.threshold
            ));
        }
    }
    Decision::Continue
}

#[cfg(test)]
mod tests {
    use super::*;

    const ERRORS: &str = "name=errors,prometheus=http://127.0.0.1:9090,max=0.001,\
        failure-limit=2,interval=2s,query=sum(rate(http_requests_total{status=~\"5..\"}[1m])) \
        / sum(rate(http_requests_total[1m]))";
    const P99: &str = "name=p99,prometheus=http://prom:9090/,max=0.5,inconclusive=pause,\
        query=histogram_quantile(0.99, sum by (le) (rate(http_request_duration_seconds_bucket[1m])))";

    #[test]
    fn the_two_gates_of_a_canary_parse_as_written() {
        let errors = Analysis::parse(ERRORS).unwrap();
        assert_eq!(errors.name, "errors");
        assert_eq!(errors.max, Some(0.001));
        assert_eq!(errors.failure_limit, 2);
        assert_eq!(errors.interval_ms, 2000);
        assert_eq!(
            errors.query,
            "sum(rate(http_requests_total{status=~\"5..\"}[1m])) / sum(rate(http_requests_total[1m]))"
        );
        let p99 = Analysis::parse(P99).unwrap();
        assert_eq!(p99.prometheus, "http://prom:9090");
        assert_eq!(p99.inconclusive, Inconclusive::Pause);
        assert!(p99.query.contains("0.99, sum by (le)"), "commas kept");
        assert_eq!(p99.threshold(), "<= 0.5");
    }

    #[test]
    fn a_bad_spec_says_what_is_wrong() {
        let cases = [
            ("name=x,prometheus=http://p:9,max=1", "no query="),
            ("name=x,prometheus=http://p:9,query=up", "give max= or min="),
            ("prometheus=http://p:9,max=1,query=up", "analysis name"),
            (
                "name=x,prometheus=https://p:9,max=1,query=up",
                "https is not supported",
            ),
            (
                "name=x,prometheus=p:9,max=1,query=up",
                "must be http://host:port",
            ),
            ("name=x,prometheus=http://p:9,max=NaN,query=up", "finite"),
            ("name=x,prometheus=http://p:9,max=1,min=2,query=up", "above"),
            (
                "name=x,prometheus=http://p:9,max=1,interval=10ms,query=up",
                "at least 1s",
            ),
            (
                "name=x,prometheus=http://p:9,max=1,failure-limit=0,query=up",
                "at least 1",
            ),
            (
                "name=x,prometheus=http://p:9,max=1,inconclusive=maybe,query=up",
                "fail or pause",
            ),
            (
                "name=x,prometheus=http://p:9,max=1,colour=red,query=up",
                "unknown field",
            ),
            (
                "name=x,prometheus=http://p:9,max=1,query=",
                "1 to 1024 bytes",
            ),
        ];
        for (spec, said) in cases {
            let err = Analysis::parse(spec).unwrap_err();
            assert!(err.contains(said), "{spec}: {err}");
        }
    }

    #[test]
    fn prometheus_answers_read_as_one_number_or_a_reason() {
        let vector = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1.5,"0.05"]}]}}"#;
        assert_eq!(read_answer(vector), Ok(0.05));
        let scalar = br#"{"status":"success","data":{"resultType":"scalar","result":[1.5,"2"]}}"#;
        assert_eq!(read_answer(scalar), Ok(2.0));
        let cases: [(&[u8], &str); 5] = [
            (br#"{"status":"success","data":{"resultType":"vector","result":[]}}"#, "no data"),
            (
                br#"{"status":"success","data":{"resultType":"vector","result":[{"value":[1,"1"]},{"value":[1,"2"]}]}}"#,
                "2 series",
            ),
            (br#"{"status":"success","data":{"resultType":"vector","result":[{"value":[1,"NaN"]}]}}"#, "NaN"),
            (br#"{"status":"error","error":"parse error at char 3"}"#, "parse error"),
            (b"<html>", "not JSON"),
        ];
        for (body, said) in cases {
            let err = read_answer(body).unwrap_err();
            assert!(err.contains(said), "{err}");
        }
    }

    fn evaluation(analysis: &Analysis, answer: Result<f64, String>) -> Evaluation {
        analysis.judge(answer, 1)
    }

    #[test]
    fn failures_in_a_row_stop_and_a_pass_starts_the_count_again() {
        let errors = Analysis::parse(ERRORS).unwrap();
        let analyses = [errors.clone()];
        let fail = evaluation(&errors, Ok(0.05));
        let pass = evaluation(&errors, Ok(0.0));
        let unknown = evaluation(&errors, Err("no data".into()));
        assert_eq!(fail.verdict, Verdict::Fail);
        assert_eq!(pass.verdict, Verdict::Pass);
        assert_eq!(unknown.verdict, Verdict::Inconclusive);
        assert_eq!(
            decide(&analyses, std::slice::from_ref(&fail)),
            Decision::Continue
        );
        assert_eq!(
            decide(&analyses, &[fail.clone(), pass.clone(), fail.clone()]),
            Decision::Continue
        );
        let Decision::Stop(why) = decide(&analyses, &[pass.clone(), fail.clone(), fail.clone()])
        else {
            panic!("two failures in a row stop");
        };
        assert!(why.contains("= 0.05, must be <= 0.001"), "{why}");
        assert!(
            why.contains("http_requests_total"),
            "the query is named: {why}"
        );
        // Inconclusive counts as a failure by default.
        assert!(matches!(
            decide(&analyses, &[fail, unknown]),
            Decision::Stop(_)
        ));
    }

    #[test]
    fn an_inconclusive_evaluation_pauses_an_analysis_that_says_so() {
        let p99 = Analysis::parse(P99).unwrap();
        let unknown = evaluation(&p99, Err("NaN (no traffic in the window?)".into()));
        let Decision::Pause(why) = decide(std::slice::from_ref(&p99), &[unknown]) else {
            panic!("pauses");
        };
        assert!(why.contains("NaN"), "{why}");
        let slow = evaluation(&p99, Ok(0.7));
        assert!(matches!(decide(&[p99], &[slow]), Decision::Stop(_)));
    }

    #[test]
    fn min_and_max_bound_the_value_inclusively() {
        let both = Analysis::parse("name=rps,prometheus=http://p:9,min=10,max=20,query=x").unwrap();
        for (value, verdict) in [
            (9.9, Verdict::Fail),
            (10.0, Verdict::Pass),
            (20.0, Verdict::Pass),
            (20.1, Verdict::Fail),
        ] {
            assert_eq!(both.judge(Ok(value), 0).verdict, verdict, "{value}");
        }
    }
}
