//! Preflight: may a rolling update start? Every check over a snapshot the leader gathers.
//!
//! Pure: the runtime collects a [`Survey`] (a quorum round trip, the leader's replication
//! metrics, one probe per node, the target dist) and [`preflight`] judges it. Every check
//! is reported, passed or not, and a failing detail names the node and the figure that
//! failed it, so an operator can act on the report alone.

use serde::{Deserialize, Serialize};

use super::format_bytes;
pub use crate::api::rollout::{Check, Report};
use crate::state::deployment::{describe_labels, short_hash, Selector};
use crate::state::{DeploymentState, Role, ROLLOUT_PROTOCOL};

/// How far behind the leader's log a node may be and still count as caught up. Not zero:
/// the snapshot is taken while clients may be writing, and a follower a few entries behind
/// an append in flight is healthy; a node needing a snapshot install is thousands behind.
pub const DEFAULT_MAX_LOG_LAG: u64 = 100;

/// What the leader knows about the cluster at one moment: plain data, gathered by the
/// runtime, judged here.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct Survey {
    /// The node that gathered the snapshot and would run the rollout.
    pub leader: u64,
    pub term: u64,
    /// A quorum answered a round trip in `term` (openraft's `ensure_linearizable`), so no
    /// newer leader exists that this one does not know about.
    pub leadership_confirmed: bool,
    /// Why leadership could not be confirmed.
    pub leadership_error: Option<String>,
    /// Every voter and learner, the leader included.
    pub members: Vec<Member>,
    /// Index of the last entry in the leader's log.
    pub last_log_index: u64,
    /// The configured heartbeat period; the default acknowledgement limit derives from it.
    pub heartbeat_ms: u64,
    /// The rollout the replicated state says is active, if any.
    pub active_rollout: Option<ActiveRollout>,
    /// The release to roll out.
    pub dist: TargetDist,
}

/// One member as the leader sees it and as it answered the leader's probe.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct Member {
    pub id: u64,
    pub addr: String,
    pub role: Role,
    /// Age of the member's last acknowledgement on the leader's monotonic clock; `None`:
    /// never acknowledged. Unused for the leader itself.
    pub last_ack_ms: Option<u64>,
    /// Highest log index the leader knows the member stores. Unused for the leader.
    pub matched_index: Option<u64>,
    /// The probe got an answer. When false the fields below are meaningless.
    pub reachable: bool,
    /// Why the probe got no answer.
    pub unreachable_reason: Option<String>,
    /// The node accepts requests (not starting up or shutting down).
    pub serving: bool,
    /// Why the node's own health check failed; `None` when it passed (or none is set).
    pub health_problem: Option<String>,
    /// Build hash of the binary the node runs ("dev" outside a release).
    pub build_hash: String,
    /// Protocol the node's binary speaks (see `state::PROTOCOL`).
    pub protocol: u32,
    pub applied_index: Option<u64>,
    /// Free space where the node keeps its releases.
    pub free_bytes: u64,
    /// Bytes the node must fetch for the target release: chunks no local release holds.
    pub needed_bytes: u64,
    /// The labels the member reported (node.toml `labels`), from the replicated state.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// The active rollout, as the replicated state records it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct ActiveRollout {
    pub generation: u64,
    pub state: DeploymentState,
    pub target_hash: String,
}

/// The dist the operator asked to roll out.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct TargetDist {
    /// As the operator gave it, for messages.
    pub dir: String,
    /// Build hash of the dist when it is valid.
    pub build_hash: String,
    pub files: u64,
    pub total_bytes: u64,
    /// Why the dist is not valid (scan, sanitizer, version.json or signature error);
    /// `None` if valid.
    pub error: Option<String>,
    /// The id of the key the release is signed with, when it is signed.
    pub signed_by: Option<String>,
    /// The services the release defines (with a note for those that cannot be cut over
    /// without refusing connections), when the leader could read them.
    pub services: Vec<String>,
}

/// What the operator allows, from `cluster update` flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Accept a cluster that cannot lose a voter (1 or 2 voters): it is unavailable while
    /// each voter restarts.
    pub allow_downtime: bool,
    /// Acknowledgement age above which a member counts as stale; `None`: 2 x heartbeat.
    pub stale_ack_ms: Option<u64>,
    pub max_log_lag: u64,
    /// The protocol every member must speak: the rollout commands', or higher when the
    /// rollout uses a command a later protocol added (metric gates).
    pub min_protocol: u32,
    /// `--nodes`: at least one member must match it.
    pub selector: Option<Selector>,
    /// `--order-by`: at least one member must have the label.
    pub order_by: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            allow_downtime: false,
            stale_ack_ms: None,
            max_log_lag: DEFAULT_MAX_LOG_LAG,
            min_protocol: ROLLOUT_PROTOCOL,
            selector: None,
            order_by: None,
        }
    }
}

impl Options {
    /// The acknowledgement limit in force for a cluster with this heartbeat.
    pub fn stale_ack_limit_ms(&self, heartbeat_ms: u64) -> u64 {
        self.stale_ack_ms
            .unwrap_or_else(|| heartbeat_ms.saturating_mul(2))
    }
}

/// Voters that must agree: a strict majority.
pub fn quorum_size(voters: usize) -> usize {
    voters / 2 + 1
}

/// Judges `snapshot`. Checks are independent: each reports on its own concern, and nodes
/// that did not answer the probe are only reported by `reachable`.
pub fn preflight(snapshot: &Survey, options: &Options) -> Report {
    let voters = snapshot
        .members
        .iter()
        .filter(|m| m.role == Role::Voter)
        .count();
    let quorum = quorum_size(voters);
    let can_lose = voters.saturating_sub(quorum);
    let checks = vec![
        leadership(snapshot),
        quorum_check(voters, quorum, can_lose, options),
        reachable(snapshot),
        per_reachable_node(snapshot, "serving", "serving requests", |m| {
            (!m.serving).then(|| {
                format!(
                    "{} is not serving requests: is it starting up or shutting down?",
                    name(m)
                )
            })
        }),
        per_reachable_node(snapshot, "healthy", "healthy", |m| {
            m.health_problem
                .as_ref()
                .map(|problem| format!("{} is unhealthy: {problem}", name(m)))
        }),
        acks(snapshot, options),
        caught_up(snapshot, options),
        no_active_rollout(snapshot),
        dist(snapshot),
        per_reachable_node(snapshot, "disk", "with room for the release", |m| {
            (m.needed_bytes > m.free_bytes).then(|| {
                format!(
                    "{} must fetch {} for the release but has {} free: free space in its \
                     data directory",
                    name(m),
                    format_bytes(m.needed_bytes),
                    format_bytes(m.free_bytes)
                )
            })
        }),
        per_reachable_node(snapshot, "protocol", "speaking the rollout protocol", |m| {
            let needed = options.min_protocol.max(ROLLOUT_PROTOCOL);
            (m.protocol < needed).then(|| {
                let (what, how) = if needed > ROLLOUT_PROTOCOL {
                    (
                        "this rollout's strategy (metric gates, canary steps, failure \
                         budgets, --nodes, --order-by) needs",
                        " (a rollout without those options can do that)",
                    )
                } else {
                    ("rollout commands need", "")
                };
                format!(
                    "{} speaks protocol {}; {what} {needed}: install a newer release on it \
                     first{how}",
                    name(m),
                    m.protocol
                )
            })
        }),
        per_reachable_node(
            snapshot,
            "release",
            "on a release that can be restored",
            |m| {
                (m.build_hash.is_empty() || m.build_hash == "dev").then(|| {
                    format!(
                        "{} runs {:?}, not an installed release: it would have nothing to be \
                     restored to; install a release on it first",
                        name(m),
                        m.build_hash
                    )
                })
            },
        ),
    ];
    let mut checks = checks;
    checks.extend(
        options
            .selector
            .as_ref()
            .map(|selector| targets(snapshot, selector)),
    );
    checks.extend(
        options
            .order_by
            .as_deref()
            .map(|key| order_by(snapshot, key)),
    );
    let proceed = checks.iter().all(|check| check.passed);
    Report {
        checks,
        voters,
        quorum,
        can_lose,
        proceed,
    }
}

/// `--nodes`: a selector no member matches would start a rollout of nothing.
fn targets(snapshot: &Survey, selector: &Selector) -> Check {
    let matching = snapshot
        .members
        .iter()
        .filter(|m| selector.matches(&m.labels))
        .count();
    let failures = if matching == 0 {
        let labels: Vec<String> = snapshot
            .members
            .iter()
            .map(|m| match describe_labels(&m.labels) {
                labels if labels.is_empty() => format!("node {}: no labels", m.id),
                labels => format!("node {}: {labels}", m.id),
            })
            .collect();
        vec![format!(
            "--nodes {selector} matches no member ({}): give nodes labels in node.toml \
             (labels = {{ zone = \"a\" }}) or with `node run --label`",
            labels.join("; ")
        )]
    } else {
        vec![]
    };
    check(
        "targets",
        failures,
        format!(
            "{matching} of {} members match --nodes {selector}",
            snapshot.members.len()
        ),
    )
}

/// `--order-by`: a label no member has would order nothing (a misspelt key, say).
fn order_by(snapshot: &Survey, key: &str) -> Check {
    let mut groups: Vec<&str> = snapshot
        .members
        .iter()
        .filter_map(|m| m.labels.get(key).map(String::as_str))
        .collect();
    groups.sort_unstable();
    groups.dedup();
    let failures = if groups.is_empty() {
        let mut keys: Vec<&str> = snapshot
            .members
            .iter()
            .flat_map(|m| m.labels.keys().map(String::as_str))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        vec![format!(
            "--order-by {key}: no member has the label {key} (labels in the cluster: {})",
            if keys.is_empty() {
                "none".to_string()
            } else {
                keys.join(", ")
            }
        )]
    } else {
        vec![]
    };
    check(
        "order_by",
        failures,
        format!("{} groups by {key}: {}", groups.len(), groups.join(", ")),
    )
}

fn name(member: &Member) -> String {
    format!("node {} ({})", member.id, member.addr)
}

fn check(name: &str, failures: Vec<String>, pass_detail: String) -> Check {
    Check {
        name: name.to_string(),
        passed: failures.is_empty(),
        detail: if failures.is_empty() {
            pass_detail
        } else {
            failures.join("; ")
        },
    }
}

fn leadership(snapshot: &Survey) -> Check {
    if snapshot.leadership_confirmed {
        return check(
            "leadership",
            vec![],
            format!(
                "node {} leads term {}, confirmed by a quorum",
                snapshot.leader, snapshot.term
            ),
        );
    }
    let why = snapshot
        .leadership_error
        .as_deref()
        .unwrap_or("no quorum answered");
    check(
        "leadership",
        vec![format!(
            "node {} could not confirm it leads term {}: {why}: check that a majority of \
             voters is up and reachable",
            snapshot.leader, snapshot.term
        )],
        String::new(),
    )
}

fn quorum_check(voters: usize, quorum: usize, can_lose: usize, options: &Options) -> Check {
    let figures = format!("{voters} voters, quorum {quorum}");
    if voters == 0 {
        return check("quorum", vec!["the cluster has no voters".into()], figures);
    }
    if can_lose >= 1 {
        return check(
            "quorum",
            vec![],
            format!("{figures}: stays available with {can_lose} voter(s) down"),
        );
    }
    if options.allow_downtime {
        return check(
            "quorum",
            vec![],
            format!(
                "{figures}: cannot lose a voter; --allow-downtime accepts the outage while \
                 each voter restarts"
            ),
        );
    }
    check(
        "quorum",
        vec![format!(
            "{figures}: cannot lose a voter, so each voter's restart stops the cluster; add a \
             voter, or pass --allow-downtime to accept the outage"
        )],
        String::new(),
    )
}

fn reachable(snapshot: &Survey) -> Check {
    let failures = snapshot
        .members
        .iter()
        .filter(|m| !m.reachable)
        .map(|m| {
            format!(
                "{} did not answer: {}: is it running?",
                name(m),
                m.unreachable_reason.as_deref().unwrap_or("no reply")
            )
        })
        .collect();
    check(
        "reachable",
        failures,
        format!("all {} nodes answered", snapshot.members.len()),
    )
}

/// A check on what each reachable node reported; unreachable nodes are named as not
/// checked rather than failed twice.
fn per_reachable_node(
    snapshot: &Survey,
    check_name: &str,
    what: &str,
    failure: impl Fn(&Member) -> Option<String>,
) -> Check {
    let failures = snapshot
        .members
        .iter()
        .filter(|m| m.reachable)
        .filter_map(&failure)
        .collect();
    let unchecked: Vec<String> = snapshot
        .members
        .iter()
        .filter(|m| !m.reachable)
        .map(|m| m.id.to_string())
        .collect();
    let checked = snapshot.members.len() - unchecked.len();
    let mut pass_detail = format!("all {checked} reachable nodes {what}");
    if !unchecked.is_empty() {
        pass_detail.push_str(&format!(
            " (not checked, unreachable: node {})",
            unchecked.join(", ")
        ));
    }
    check(check_name, failures, pass_detail)
}

fn acks(snapshot: &Survey, options: &Options) -> Check {
    let limit = options.stale_ack_limit_ms(snapshot.heartbeat_ms);
    let failures = snapshot
        .members
        .iter()
        .filter(|m| m.id != snapshot.leader)
        .filter_map(|m| match m.last_ack_ms {
            None => Some(format!(
                "{} never acknowledged the leader: is it running?",
                name(m)
            )),
            Some(last_ack_age) if last_ack_age > limit => Some(format!(
                "{} last acked {last_ack_age} ms ago (limit {limit} ms): is it running?",
                name(m)
            )),
            Some(_) => None,
        })
        .collect();
    check(
        "acks",
        failures,
        format!("every follower acked within {limit} ms"),
    )
}

fn caught_up(snapshot: &Survey, options: &Options) -> Check {
    let leader_index = snapshot.last_log_index;
    let limit = options.max_log_lag;
    let failures = snapshot
        .members
        .iter()
        .filter(|m| m.id != snapshot.leader)
        .filter_map(|m| {
            let matched = m.matched_index.unwrap_or(0);
            let behind = leader_index.saturating_sub(matched);
            (behind > limit).then(|| {
                format!(
                    "{} is {behind} entries behind the leader (has {matched} of \
                     {leader_index}, limit {limit}): wait for it to catch up",
                    name(m)
                )
            })
        })
        .collect();
    check(
        "caught_up",
        failures,
        format!("every follower within {limit} entries of the leader's {leader_index}"),
    )
}

fn no_active_rollout(snapshot: &Survey) -> Check {
    let failures = snapshot
        .active_rollout
        .iter()
        .map(|active| {
            format!(
                "rollout generation {} to {} is {}: wait for it to finish, or run `cluster \
                 rollout abort`",
                active.generation,
                short_hash(&active.target_hash),
                active.state
            )
        })
        .collect();
    check("no_active_rollout", failures, "no rollout is active".into())
}

fn dist(snapshot: &Survey) -> Check {
    let dist = &snapshot.dist;
    let failures = match (&dist.error, dist.build_hash.is_empty()) {
        (Some(error), _) => vec![format!("dist {}: {error}", dist.dir)],
        (None, true) => vec![format!(
            "dist {} has no build hash: run `cluster dist stamp`",
            dist.dir
        )],
        (None, false) => vec![],
    };
    let signed = match &dist.signed_by {
        Some(key_id) => format!(", signed by key {key_id}"),
        None => String::new(),
    };
    let services = match dist.services.as_slice() {
        [] => String::new(),
        list => format!("; services: {}", list.join(", ")),
    };
    check(
        "dist",
        failures,
        format!(
            "dist {} is build {}: {} files, {}{signed}{services}",
            dist.dir,
            short_hash(&dist.build_hash),
            dist.files,
            format_bytes(dist.total_bytes)
        ),
    )
}

/// Judges what a candidate's `bin/cluster --version` printed (`cluster 0.1.0 (build
/// <hash>, protocol <n>)`): it must be release `hash` itself, speaking at least
/// `min_protocol` (a binary of an older protocol cannot read entries this cluster's log
/// already holds).
pub fn judge_version(said: &str, hash: &str, min_protocol: u32) -> Result<(), String> {
    let inside = said
        .rsplit_once("(build ")
        .and_then(|(_, rest)| rest.strip_suffix(')'))
        .and_then(|rest| rest.split_once(", protocol "));
    let Some((build, protocol)) = inside else {
        return Err(format!(
            "`bin/cluster --version` printed {said:?}, not `cluster <version> (build <hash>, \
             protocol <n>)`: is bin/cluster a cluster binary?"
        ));
    };
    if build != hash {
        return Err(format!(
            "`bin/cluster --version` says build {build}, but the release is {hash}: was the \
             dist stamped after its binary was replaced?"
        ));
    }
    match protocol.parse::<u32>() {
        Ok(p) if p >= min_protocol => Ok(()),
        Ok(p) => Err(format!(
            "bin/cluster speaks protocol {p}; this cluster runs protocol {min_protocol}, whose \
             log it could not read"
        )),
        Err(_) => Err(format!(
            "`bin/cluster --version` printed protocol {protocol:?}"
        )),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const OLD: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    pub(crate) const NEW: &str = "2222222222222222222222222222222222222222222222222222222222222222";

    fn member(id: u64, role: Role) -> Member {
        Member {
            id,
            addr: format!("127.0.0.1:710{id}"),
            role,
            last_ack_ms: Some(40),
            matched_index: Some(120),
            reachable: true,
            unreachable_reason: None,
            serving: true,
            health_problem: None,
            build_hash: OLD.into(),
            protocol: ROLLOUT_PROTOCOL,
            applied_index: Some(120),
            free_bytes: 10 << 30,
            needed_bytes: 48 << 20,
            labels: Default::default(),
        }
    }

    /// A cluster where every check passes: `voters` and `learners` by id, `leader` leads.
    pub(crate) fn healthy(voters: &[u64], learners: &[u64], leader: u64) -> Survey {
        let members = voters
            .iter()
            .map(|id| member(*id, Role::Voter))
            .chain(learners.iter().map(|id| member(*id, Role::Learner)))
            .collect();
        Survey {
            leader,
            term: 7,
            leadership_confirmed: true,
            leadership_error: None,
            members,
            last_log_index: 120,
            heartbeat_ms: 100,
            active_rollout: None,
            dist: TargetDist {
                dir: "./dist".into(),
                build_hash: NEW.into(),
                files: 3,
                total_bytes: 50 << 20,
                error: None,
                signed_by: None,
                services: Vec::new(),
            },
        }
    }

    fn node(snapshot: &mut Survey, id: u64) -> &mut Member {
        snapshot.members.iter_mut().find(|m| m.id == id).unwrap()
    }

    #[test]
    fn a_selector_or_order_that_matches_no_member_is_refused_naming_the_labels_there_are() {
        let mut snapshot = healthy(&[1, 2, 3], &[], 1);
        node(&mut snapshot, 2)
            .labels
            .insert("zone".into(), "b".into());
        let options = |text: &str| Options {
            selector: Some(Selector::parse(text).unwrap()),
            ..Options::default()
        };
        let report = preflight(&snapshot, &options("zone=b"));
        assert!(report.proceed, "{report:#?}");
        let targets = report.checks.last().unwrap();
        assert_eq!(
            (targets.name.as_str(), targets.detail.as_str()),
            ("targets", "1 of 3 members match --nodes zone=b")
        );

        let report = preflight(&snapshot, &options("zone=q"));
        assert!(!report.proceed);
        let failed = report.failed().next().unwrap();
        assert_eq!(failed.name, "targets");
        assert!(
            failed.detail.starts_with(
                "--nodes zone=q matches no member (node 1: no labels; node 2: zone=b; node 3: \
                 no labels)"
            ),
            "{}",
            failed.detail
        );
        let report = preflight(
            &snapshot,
            &Options {
                order_by: Some("zon".into()),
                ..Options::default()
            },
        );
        let failed = report.failed().next().unwrap();
        assert_eq!(
            (failed.name.as_str(), failed.detail.as_str()),
            (
                "order_by",
                "--order-by zon: no member has the label zon (labels in the cluster: zone)"
            )
        );
        let report = preflight(
            &snapshot,
            &Options {
                order_by: Some("zone".into()),
                ..Options::default()
            },
        );
        assert!(report.proceed, "{report:#?}");
        // Without --nodes there is no such check.
        let names: Vec<String> = preflight(&snapshot, &Options::default())
            .checks
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert!(!names.contains(&"targets".to_string()));
    }

    #[test]
    fn a_healthy_cluster_passes_every_check() {
        let report = preflight(&healthy(&[1, 2, 3], &[4], 1), &Options::default());
        assert!(report.proceed, "{report:#?}");
        assert_eq!((report.voters, report.quorum, report.can_lose), (3, 2, 1));
        let names: Vec<&str> = report.checks.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "leadership",
                "quorum",
                "reachable",
                "serving",
                "healthy",
                "acks",
                "caught_up",
                "no_active_rollout",
                "dist",
                "disk",
                "protocol",
                "release"
            ]
        );
        assert_eq!(
            report.checks[8].detail,
            "dist ./dist is build 222222222222: 3 files, 50.0 MiB"
        );
        let mut signed = healthy(&[1, 2, 3], &[4], 1);
        signed.dist.signed_by = Some("0123456789abcdef".into());
        let report = preflight(&signed, &Options::default());
        assert_eq!(
            report.checks[8].detail,
            "dist ./dist is build 222222222222: 3 files, 50.0 MiB, signed by key 0123456789abcdef"
        );
        let mut with_services = healthy(&[1, 2, 3], &[4], 1);
        with_services.dist.services = vec!["web".into(), "legacy (binds ...)".into()];
        let report = preflight(&with_services, &Options::default());
        assert!(report.proceed);
        assert!(
            report.checks[8]
                .detail
                .ends_with("; services: web, legacy (binds ...)"),
            "{}",
            report.checks[8].detail
        );
    }

    #[test]
    fn each_check_fails_alone_and_names_the_node_and_figure() {
        struct Case {
            name: &'static str,
            check: &'static str,
            options: Options,
            break_it: fn(&mut Survey),
            detail: &'static str,
        }
        let cases = vec![
            Case {
                name: "leadership not confirmed",
                check: "leadership",
                options: Options::default(),
                break_it: |s| {
                    s.leadership_confirmed = false;
                    s.leadership_error = Some("timeout after 1 s".into());
                },
                detail: "node 1 could not confirm it leads term 7: timeout after 1 s",
            },
            Case {
                name: "two voters cannot lose one",
                check: "quorum",
                options: Options::default(),
                break_it: |s| s.members.retain(|m| m.id != 3),
                detail: "2 voters, quorum 2: cannot lose a voter",
            },
            Case {
                name: "unreachable node",
                check: "reachable",
                options: Options::default(),
                break_it: |s| {
                    let m = node(s, 3);
                    m.reachable = false;
                    m.unreachable_reason = Some("connection refused".into());
                },
                detail: "node 3 (127.0.0.1:7103) did not answer: connection refused: is it \
                         running?",
            },
            Case {
                name: "node not serving",
                check: "serving",
                options: Options::default(),
                break_it: |s| node(s, 2).serving = false,
                detail: "node 2 (127.0.0.1:7102) is not serving requests",
            },
            Case {
                name: "node unhealthy",
                check: "healthy",
                options: Options::default(),
                break_it: |s| node(s, 4).health_problem = Some("health_command exited 1".into()),
                detail: "node 4 (127.0.0.1:7104) is unhealthy: health_command exited 1",
            },
            Case {
                name: "stale acknowledgement",
                check: "acks",
                options: Options::default(),
                break_it: |s| node(s, 3).last_ack_ms = Some(4200),
                detail: "node 3 (127.0.0.1:7103) last acked 4200 ms ago (limit 200 ms): is it \
                         running?",
            },
            Case {
                name: "stale against a configured limit",
                check: "acks",
                options: Options {
                    stale_ack_ms: Some(30),
                    ..Options::default()
                },
                break_it: |_| {},
                detail: "node 2 (127.0.0.1:7102) last acked 40 ms ago (limit 30 ms)",
            },
            Case {
                name: "never acknowledged",
                check: "acks",
                options: Options::default(),
                break_it: |s| node(s, 2).last_ack_ms = None,
                detail: "node 2 (127.0.0.1:7102) never acknowledged the leader",
            },
            Case {
                name: "lagging follower",
                check: "caught_up",
                options: Options {
                    max_log_lag: 0,
                    ..Options::default()
                },
                break_it: |s| node(s, 2).matched_index = Some(117),
                detail: "node 2 (127.0.0.1:7102) is 3 entries behind the leader (has 117 of 120, \
                         limit 0)",
            },
            Case {
                name: "rollout already active",
                check: "no_active_rollout",
                options: Options::default(),
                break_it: |s| {
                    s.active_rollout = Some(ActiveRollout {
                        generation: 4,
                        state: DeploymentState::Paused,
                        target_hash: NEW.into(),
                    })
                },
                detail: "rollout generation 4 to 222222222222 is paused",
            },
            Case {
                name: "invalid dist",
                check: "dist",
                options: Options::default(),
                break_it: |s| s.dist.error = Some("bin/cluster is missing".into()),
                detail: "dist ./dist: bin/cluster is missing",
            },
            Case {
                name: "no room on disk",
                check: "disk",
                options: Options::default(),
                break_it: |s| node(s, 2).free_bytes = 12 << 20,
                detail: "node 2 (127.0.0.1:7102) must fetch 48.0 MiB for the release but has \
                         12.0 MiB free",
            },
            Case {
                name: "old protocol",
                check: "protocol",
                options: Options::default(),
                break_it: |s| node(s, 3).protocol = 1,
                detail: "node 3 (127.0.0.1:7103) speaks protocol 1; rollout commands need 2",
            },
            Case {
                name: "development build",
                check: "release",
                options: Options::default(),
                break_it: |s| node(s, 1).build_hash = "dev".into(),
                detail: "node 1 (127.0.0.1:7101) runs \"dev\", not an installed release",
            },
        ];
        for case in cases {
            let mut snapshot = healthy(&[1, 2, 3], &[4], 1);
            (case.break_it)(&mut snapshot);
            let report = preflight(&snapshot, &case.options);
            let failed: Vec<&str> = report.failed().map(|c| c.name.as_str()).collect();
            assert_eq!(failed, [case.check], "{}: {report:#?}", case.name);
            assert!(!report.proceed, "{}", case.name);
            let detail = &report.failed().next().unwrap().detail;
            assert!(detail.contains(case.detail), "{}: {detail}", case.name);
        }
    }

    #[test]
    fn allow_downtime_accepts_a_cluster_that_cannot_lose_a_voter() {
        for voters in [&[1][..], &[1, 2][..]] {
            let snapshot = healthy(voters, &[], 1);
            let strict = preflight(&snapshot, &Options::default());
            assert!(!strict.proceed);
            assert_eq!(strict.can_lose, 0);
            let relaxed = preflight(
                &snapshot,
                &Options {
                    allow_downtime: true,
                    ..Options::default()
                },
            );
            assert!(relaxed.proceed, "{relaxed:#?}");
            assert!(relaxed.checks[1]
                .detail
                .contains("--allow-downtime accepts"));
        }
    }

    #[test]
    fn quorum_figures() {
        let cases = [
            (1, 1, 0),
            (2, 2, 0),
            (3, 2, 1),
            (4, 3, 1),
            (5, 3, 2),
            (7, 4, 3),
        ];
        for (voters, quorum, can_lose) in cases {
            let ids: Vec<u64> = (1..=voters).collect();
            let report = preflight(&healthy(&ids, &[], 1), &Options::default());
            assert_eq!(
                (report.quorum, report.can_lose),
                (quorum, can_lose),
                "{voters} voters"
            );
        }
    }

    #[test]
    fn the_leader_is_exempt_from_ack_and_lag_checks() {
        let mut snapshot = healthy(&[1, 2, 3], &[], 1);
        node(&mut snapshot, 1).last_ack_ms = None;
        node(&mut snapshot, 1).matched_index = None;
        assert!(preflight(&snapshot, &Options::default()).proceed);
    }

    #[test]
    fn unreachable_nodes_are_reported_once() {
        let mut snapshot = healthy(&[1, 2, 3], &[], 1);
        let m = node(&mut snapshot, 2);
        m.reachable = false;
        m.serving = false;
        m.protocol = 0;
        let report = preflight(&snapshot, &Options::default());
        let failed: Vec<&str> = report.failed().map(|c| c.name.as_str()).collect();
        assert_eq!(failed, ["reachable"]);
        assert!(report.checks[3]
            .detail
            .contains("(not checked, unreachable: node 2)"));
    }

    #[test]
    fn a_candidate_must_say_it_is_the_release_and_speak_the_clusters_protocol() {
        let hash = "ab12";
        assert!(judge_version("cluster 0.1.0 (build ab12, protocol 4)", hash, 4).is_ok());
        assert!(judge_version("cluster 0.2.0 (build ab12, protocol 5)", hash, 4).is_ok());
        let cases = [
            ("", "is bin/cluster a cluster binary"),
            ("hello", "is bin/cluster a cluster binary"),
            ("cluster 0.1.0 (build dev, protocol 4)", "says build dev"),
            (
                "cluster 0.1.0 (build ab12, protocol 3)",
                "speaks protocol 3",
            ),
            ("cluster 0.1.0 (build ab12, protocol x)", "printed protocol"),
        ];
        for (said, expected) in cases {
            let why = judge_version(said, hash, 4).unwrap_err();
            assert!(why.contains(expected), "{said:?}: {why}");
        }
    }
}
