//! Where a rollout's time goes: polls the active deployment every 20 ms and prints when each
//! node was first seen in each phase, relative to the deployment's start.
//!
//! Usage: `rollout_timeline <addr,addr,...>`; run it, then start `cluster update`. It
//! prints one line per (node, phase) as `<node> <phase> <ms since start>` once the
//! deployment it watched has finished (or on SIGTERM/SIGINT), then the deployment's
//! recorded start and finish. Any address that answers will do (nodes restart during a
//! rollout). Observations are at most one poll (20 ms) late; the node phases are the
//! replicated record, so this is what the leader did, not what a client saw.

use std::collections::BTreeMap;
use std::time::Duration;

use cluster::clock::unix_ms;
use cluster::rpc::{Channels, ControlClient};
use cluster::tls::Security;
use tokio::signal::unix::{signal, SignalKind};

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let addrs: Vec<String> = std::env::args()
        .nth(1)
        .ok_or("usage: rollout_timeline <addr,addr,...>")?
        .split(',')
        .map(str::to_string)
        .collect();
    // The credentials in $CLUSTER_TLS; plaintext when unset.
    let channels = Channels::new(&Security::from_env_or_insecure()?);
    let clients = addrs
        .iter()
        .map(|addr| {
            Ok(ControlClient::with_channels(&channels, addr)?.timeout(Duration::from_millis(500)))
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // (node, phase) -> first seen (epoch ms); the generation watched and its start.
    let mut seen: BTreeMap<(u64, String), u64> = BTreeMap::new();
    let mut watched: Option<(u64, u64)> = None;
    let mut finished: Option<u64> = None;
    let mut target = 0usize;
    'poll: loop {
        tokio::select! {
            _ = term.recv() => break 'poll,
            _ = int.recv() => break 'poll,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        let at = unix_ms();
        let view = match clients[target % clients.len()].clone().rollout().await {
            Ok(view) => view,
            Err(_) => {
                target += 1;
                continue;
            }
        };
        match (&view.deployment, watched) {
            (Some(deployment), _) => {
                watched.get_or_insert((deployment.generation, deployment.started_ms));
                for (id, step) in &deployment.nodes {
                    let phase = format!("{:?}", step.phase).to_lowercase();
                    seen.entry((*id, phase)).or_insert(at);
                }
            }
            (None, Some((generation, _))) => {
                finished = view
                    .history
                    .iter()
                    .find(|entry| entry.generation == generation)
                    .and_then(|entry| entry.finished_ms);
                break 'poll;
            }
            (None, None) => {}
        }
    }
    let Some((generation, started)) = watched else {
        println!("no deployment seen");
        return Ok(());
    };
    let mut lines: Vec<(u64, u64, String)> = seen
        .into_iter()
        .map(|((id, phase), at)| (at.saturating_sub(started), id, phase))
        .collect();
    lines.sort();
    for (offset, id, phase) in lines {
        println!("{id} {phase} {offset}");
    }
    println!(
        "generation {generation} started_ms {started} finished_after_ms {}",
        finished.map_or("?".to_string(), |f| f.saturating_sub(started).to_string())
    );
    Ok(())
}
