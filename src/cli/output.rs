//! Human and JSON rendering of command results.

use serde::Serialize;

use crate::api::ClusterStatus;
use crate::state::deployment::short_hash;

/// Writes one line to stdout. A reader that went away (`| head`) is an error the caller
/// returns with `?`, so that what it owns is cleaned up: `main` then exits quietly, with the
/// status a shell gives a process ended by SIGPIPE.
pub fn line(args: std::fmt::Arguments) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)?;
    out.write_all(b"\n")
}

/// Whether `error` is a write to a closed pipe (see [`line`]).
pub fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

pub fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub fn or_dash(value: Option<u64>, unit: &str) -> String {
    value
        .map(|v| format!("{v}{unit}"))
        .unwrap_or_else(|| "-".to_string())
}

pub fn print_status(status: &ClusterStatus) -> std::io::Result<()> {
    outln!("{}", render_status(status));
    Ok(())
}

/// Rows (the first is the header) as left-aligned columns two spaces apart.
pub fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|col| rows.iter().map(|r| r[col].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// "node N", or why there is no leader.
pub fn leader_name(leader: Option<u64>) -> String {
    leader
        .map(|l| format!("node {l}"))
        .unwrap_or_else(|| "none (election in progress or quorum lost)".into())
}

pub fn render_status(status: &ClusterStatus) -> String {
    let leader = leader_name(status.leader);
    let mut out = format!(
        "cluster {}  leader: {leader}  term: {}  commit: {}  (view of node {})\n",
        if status.cluster_id.is_empty() {
            "(unnamed)"
        } else {
            &status.cluster_id
        },
        status.term,
        or_dash(status.commit_index, ""),
        status.answered_by,
    );
    let header = [
        "ID", "ADDR", "ROLE", "STATE", "BUILD", "LAST ACK", "MATCHED", "APPLIED",
    ];
    let mut rows = vec![header.map(String::from).to_vec()];
    for node in &status.nodes {
        rows.push(vec![
            node.id.to_string(),
            node.addr.clone(),
            node.role.clone(),
            node.state.clone(),
            if node.build_hash.is_empty() {
                "?".into()
            } else {
                short_hash(&node.build_hash).into()
            },
            or_dash(node.last_ack_ms, " ms"),
            or_dash(node.matched_index, ""),
            or_dash(node.applied_index, ""),
        ]);
    }
    // Labels only when some node has any: most clusters have none.
    if status.nodes.iter().any(|n| !n.labels.is_empty()) {
        for (row, node) in rows.iter_mut().skip(1).zip(&status.nodes) {
            row.push(crate::state::deployment::describe_labels(&node.labels));
        }
        rows[0].push("LABELS".into());
    }
    out.push_str(&table(&rows));
    let services: Vec<_> = status
        .nodes
        .iter()
        .flat_map(|node| node.services.iter().map(move |s| (node.id, s)))
        .collect();
    if !services.is_empty() {
        let header = [
            "NODE",
            "SERVICE",
            "INGRESS",
            "STATE",
            "ACTIVE",
            "CANDIDATE",
            "FAILS",
        ];
        let mut rows = vec![header.map(String::from).to_vec()];
        let instance = |i: &Option<crate::api::ServiceInstance>| match i {
            Some(i) => format!("{} pid {}", short_hash(&i.release), i.pid),
            None => "-".into(),
        };
        for (id, service) in &services {
            rows.push(vec![
                id.to_string(),
                service.name.clone(),
                service.listen.clone(),
                service.state.clone(),
                instance(&service.active),
                instance(&service.candidate),
                service.failure_streak.to_string(),
            ]);
        }
        out.push('\n');
        out.push_str(&table(&rows));
        for (id, service) in &services {
            if let (Some(reason), Some(at)) = (&service.last_rollback, service.last_rollback_at_ms)
            {
                out.push_str(&format!(
                    "node {id} service {}: last candidate not switched to ({}): {reason}\n",
                    service.name,
                    super::rollout::clock(at),
                ));
            }
        }
    }
    for node in &status.nodes {
        if node.insecure {
            out.push_str(&format!(
                "node {} runs with --insecure: plaintext, no authentication\n",
                node.id
            ));
        }
        if let Some(problem) = &node.health_problem {
            out.push_str(&format!("node {} is unhealthy: {problem}\n", node.id));
        }
        if let Some(restore) = &node.last_auto_restore {
            out.push_str(&format!(
                "node {} restored itself from {} to {}: {}\n",
                node.id,
                short_hash(&restore.to),
                short_hash(&restore.from),
                restore.reason
            ));
        }
    }
    out.trim_end().to_string()
}
