//! `cluster mcp`: a Model Context Protocol server on stdio, so that an assistant or an
//! automation host can read the cluster and drive rollouts through tools with JSON
//! schemas. JSON-RPC 2.0, one message per line; what it may do is what the credentials
//! it runs with may do (a viewer certificate reads, an operator's also acts).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::rollout::{options_of, upload_to_leader, UpdateArgs};
use super::Target;
use crate::agent::upload::LocalDist;
use crate::api::rollout::Operation;

/// Protocol revisions of the `initialize` handshake this server speaks, oldest first.
const PROTOCOLS: [&str; 4] = ["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"];

/// The tools, with their input schemas.
fn tools() -> Value {
    let none = json!({"type": "object", "properties": {}, "additionalProperties": false});
    json!([
        {
            "name": "cluster_status",
            "description": "The cluster as its leader sees it: leader, term, every member's role, state, build, acknowledgement age and health, and the rollout summary (active rollout with each node's phase, target build, automatic rollouts). Same JSON as `cluster status --json`.",
            "inputSchema": none,
        },
        {
            "name": "initiate_rolling_update",
            "description": "Roll a dist (a directory with bin/cluster on the machine running this server) across the cluster, one node at a time, leader last. With dryRun, only preflight and plan: nothing changes. Otherwise the dist is uploaded to the leader and the rollout starts; it returns at once with the generation: follow it with rollout_status. A refused preflight is an error naming every failed check.",
            "inputSchema": {
                "type": "object",
                "properties": {
                    "dist": {"type": "string", "description": "Path of the dist directory"},
                    "dryRun": {"type": "boolean", "default": false, "description": "Check and plan only"},
                    "maxParallel": {"type": "integer", "minimum": 1, "description": "Learners updated at once (voters always one at a time)"},
                    "onFailure": {"type": "string", "enum": ["revert", "halt"], "description": "What a failed node does to the rest of the rollout"},
                    "stabilizeMs": {"type": "integer", "minimum": 0, "description": "How long a node must stay healthy before it is committed"},
                    "healthDeadlineMs": {"type": "integer", "minimum": 1, "description": "How long a restarted node may take to report healthy"},
                    "soakMs": {"type": "integer", "minimum": 0, "description": "How long health is watched after the last commit"},
                    "steps": {"type": "string", "description": "Canary steps: nodes or shares at the end of each step, e.g. 10%,50%,100%"},
                    "stepPause": {"type": "string", "description": "How long each step holds, e.g. 10m (default: until promoted)"},
                    "analysis": {"type": "array", "items": {"type": "string"}, "description": "Metric gates, each `name=...,prometheus=http://...,max=...,query=PROMQL` as `cluster update --analysis`"},
                    "progressDeadline": {"type": "string", "description": "Stop a rollout that makes no progress for this long, e.g. 15m"},
                    "maxFailures": {"type": "string", "description": "Learner failures tolerated: a number (2) or a share of the learners (10%)"},
                    "nodes": {"type": "string", "description": "Only members with these labels, e.g. zone=a,rack=r1"},
                    "orderBy": {"type": "string", "description": "A label: finish every node of one value before the next, e.g. zone"},
                },
                "required": ["dist"],
                "additionalProperties": false,
            },
        },
        {
            "name": "rollout_status",
            "description": "The active rollout (generation, state, target and previous builds, each node's phase, what it waits for), or state idle.",
            "inputSchema": none,
        },
        {
            "name": "rollout_history",
            "description": "Finished rollouts, oldest first: outcome, builds, who started them, when, why they failed, each node's last phase.",
            "inputSchema": {
                "type": "object",
                "properties": {"limit": {"type": "integer", "minimum": 1, "default": 10}},
                "additionalProperties": false,
            },
        },
        {
            "name": "rollout_pause",
            "description": "Pause the active rollout: no further node starts; a node in flight finishes its step.",
            "inputSchema": none,
        },
        {
            "name": "rollout_resume",
            "description": "Resume a paused rollout.",
            "inputSchema": none,
        },
        {
            "name": "rollout_promote",
            "description": "Begin the next canary step of the active rollout now (a rollout started with steps).",
            "inputSchema": none,
        },
        {
            "name": "rollout_abort",
            "description": "Stop the active rollout: nodes caught mid-update are restored; updated nodes stay on the new build unless revert.",
            "inputSchema": {
                "type": "object",
                "properties": {"revert": {"type": "boolean", "default": false, "description": "Also bring every updated node back to its previous build"}},
                "additionalProperties": false,
            },
        },
    ])
}

/// Serves MCP on stdin/stdout until stdin closes.
pub async fn serve(target: Target) -> anyhow::Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdout = tokio::io::stdout();
    while let Some(line) = lines.next_line().await.context("reading stdin")? {
        if line.trim().is_empty() {
            continue;
        }
        let reply = match serde_json::from_str::<Value>(&line) {
            Err(e) => Some(error(Value::Null, -32700, &format!("not JSON: {e}"))),
            Ok(message) => answer(&target, message).await,
        };
        if let Some(reply) = reply {
            let mut text = reply.to_string();
            text.push('\n');
            stdout.write_all(text.as_bytes()).await?;
            stdout.flush().await?;
        }
    }
    Ok(())
}

fn error(id: Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

/// The reply to one message; `None` for notifications.
async fn answer(target: &Target, message: Value) -> Option<Value> {
    let id = message.get("id").cloned()?;
    let method = message["method"].as_str().unwrap_or_default();
    let params = message.get("params").cloned().unwrap_or(json!({}));
    let result = match method {
        "initialize" => {
            let asked = params["protocolVersion"].as_str().unwrap_or_default();
            let version = PROTOCOLS
                .iter()
                .find(|v| **v == asked)
                .unwrap_or(&PROTOCOLS[PROTOCOLS.len() - 1]);
            json!({
                "protocolVersion": version,
                "capabilities": {"tools": {"listChanged": false}},
                "serverInfo": {"name": "cluster", "version": env!("CARGO_PKG_VERSION")},
                "instructions": "Tools read and operate the cluster reached at the server's --node. Run initiate_rolling_update with dryRun first; a real rollout returns at once, so poll rollout_status until its state is idle, then read rollout_history.",
            })
        }
        "ping" => json!({}),
        "tools/list" => json!({"tools": tools()}),
        "tools/call" => {
            let name = params["name"].as_str().unwrap_or_default();
            let arguments = params.get("arguments").cloned().unwrap_or(json!({}));
            match call(target, name, &arguments).await {
                Ok(Called::Done(value)) => tool_result(value, false),
                Ok(Called::Refused(value)) => tool_result(value, true),
                Err(ToolError::Unknown) => {
                    return Some(error(id, -32602, &format!("no tool named {name:?}")))
                }
                Err(ToolError::Failed(e)) => {
                    tool_result(json!({"error": crate::error::Chain(&*e).to_string()}), true)
                }
            }
        }
        other => return Some(error(id, -32601, &format!("no method {other:?}"))),
    };
    Some(json!({"jsonrpc": "2.0", "id": id, "result": result}))
}

fn tool_result(value: Value, is_error: bool) -> Value {
    let text = serde_json::to_string_pretty(&value).unwrap_or_default();
    let mut result = json!({"content": [{"type": "text", "text": text}], "isError": is_error});
    if value.is_object() {
        result["structuredContent"] = value;
    }
    result
}

enum Called {
    Done(Value),
    /// The cluster said no (a refused preflight): a tool error the caller can act on.
    Refused(Value),
}

enum ToolError {
    Unknown,
    Failed(Box<dyn std::error::Error + Send + Sync>),
}

impl<E: Into<anyhow::Error>> From<E> for ToolError {
    fn from(e: E) -> Self {
        ToolError::Failed(e.into().into())
    }
}

async fn call(target: &Target, name: &str, arguments: &Value) -> Result<Called, ToolError> {
    let mut client = target.client()?.timeout(Duration::from_secs(60));
    Ok(Called::Done(match name {
        "cluster_status" => {
            let status = client.status(false).await?;
            let members: Vec<u64> = status.nodes.iter().map(|n| n.id).collect();
            let view = super::rollout::leader_view(target, Some(&status)).await?;
            let mut json = serde_json::to_value(&status)?;
            json["rollout"] = crate::api::rollout::status_json(&view, &members);
            json
        }
        "rollout_status" => {
            let status = client.status(false).await?;
            let members: Vec<u64> = status.nodes.iter().map(|n| n.id).collect();
            let view = super::rollout::leader_view(target, Some(&status)).await?;
            crate::api::rollout::status_json(&view, &members)
        }
        "rollout_history" => {
            let limit = arguments["limit"].as_u64().unwrap_or(10).max(1) as usize;
            let view = client.rollout().await?;
            json!({"rollouts": crate::api::rollout::history_json(&view.history, limit)})
        }
        "rollout_pause" | "rollout_resume" | "rollout_promote" | "rollout_abort" => {
            let operation = match name {
                "rollout_pause" => Operation::Pause,
                "rollout_resume" => Operation::Resume,
                "rollout_promote" => Operation::Promote,
                _ => Operation::Abort {
                    revert: arguments["revert"].as_bool().unwrap_or(false),
                },
            };
            let done = client.operate(operation).await?;
            json!({"message": done.message})
        }
        "initiate_rolling_update" => return update(target, arguments).await,
        _ => return Err(ToolError::Unknown),
    }))
}

/// `initiate_rolling_update`: the arguments become `cluster update` flags, so they are
/// checked, and take their defaults, exactly as on the command line.
async fn update(target: &Target, arguments: &Value) -> Result<Called, ToolError> {
    #[derive(Parser)]
    struct Update {
        #[command(flatten)]
        args: UpdateArgs,
    }
    let mut argv = vec!["initiate_rolling_update".to_string()];
    let dist = arguments["dist"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("dist is required: the path of a dist directory"))?;
    argv.extend(["--dist".into(), dist.into()]);
    if arguments["dryRun"].as_bool().unwrap_or(false) {
        argv.push("--dry-run".into());
    }
    for (key, flag) in [
        ("maxParallel", "--max-parallel"),
        ("stabilizeMs", "--stabilize-ms"),
        ("healthDeadlineMs", "--health-deadline-ms"),
        ("soakMs", "--soak-ms"),
    ] {
        match &arguments[key] {
            Value::Null => {}
            Value::Number(n) if n.as_u64().is_some() => argv.extend([flag.into(), n.to_string()]),
            other => {
                return Err(anyhow::anyhow!("{key} must be a whole number, not {other}").into())
            }
        }
    }
    for (key, flag) in [
        ("onFailure", "--on-failure"),
        ("steps", "--steps"),
        ("stepPause", "--step-pause"),
        ("progressDeadline", "--progress-deadline"),
        ("maxFailures", "--max-failures"),
        ("nodes", "--nodes"),
        ("orderBy", "--order-by"),
    ] {
        match &arguments[key] {
            Value::Null => {}
            Value::String(value) => argv.extend([flag.into(), value.clone()]),
            other => return Err(anyhow::anyhow!("{key} must be a string, not {other}").into()),
        }
    }
    match &arguments["analysis"] {
        Value::Null => {}
        Value::Array(gates) => {
            for gate in gates {
                let gate = gate.as_str().ok_or_else(|| {
                    anyhow::anyhow!("analysis must be a list of strings, not {gate}")
                })?;
                argv.extend(["--analysis".into(), gate.into()]);
            }
        }
        other => {
            return Err(anyhow::anyhow!("analysis must be a list of strings, not {other}").into())
        }
    }
    let mut args = Update::try_parse_from(&argv)
        .map_err(|e| anyhow::anyhow!("{}", e.render().to_string().trim()))?
        .args;
    args.target = target.clone();

    let limits = crate::release::Limits::default();
    let dir = args.dist.clone();
    let dist = match tokio::task::spawn_blocking(move || LocalDist::scan(&dir, &limits)).await? {
        Ok(dist) => Arc::new(dist),
        Err(e) => {
            return Ok(Called::Refused(json!({
                "proceed": false,
                "error": format!("the dist is not valid: {}", crate::error::Chain(&e)),
            })))
        }
    };
    let mut uploaded = Value::Null;
    if !args.dry_run {
        match upload_to_leader(&args.target, &dist).await? {
            Ok((leader, outcome)) => {
                uploaded = json!({"leader": leader, "sent_bytes": outcome.fetched_bytes, "reused_bytes": outcome.reused_bytes})
            }
            Err(refused) => {
                return Ok(Called::Refused(json!({"proceed": false, "error": refused})))
            }
        }
    }
    let outcome = args
        .target
        .client()?
        .timeout(Duration::from_secs(60))
        .update(&dist.manifest, &options_of(&args), args.dry_run)
        .await?;
    let reply = json!({
        "proceed": outcome.report.proceed,
        "dryRun": args.dry_run,
        "generation": (!args.dry_run && outcome.report.proceed).then_some(outcome.generation),
        "report": outcome.report,
        "plan": outcome.plan,
        "uploaded": uploaded,
    });
    Ok(if outcome.report.proceed {
        Called::Done(reply)
    } else {
        Called::Refused(reply)
    })
}
