//! Sequential write latency of one client against a running cluster.
//!
//! Usage: `cargo run --release --example write_latency -- <node addr> [count]`
//! Prints p50, p99 and max of `kv put` round trips (each acknowledged once committed).

use std::time::{Duration, Instant};

use cluster::rpc::{Channels, ControlClient};
use cluster::tls::Security;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args
        .next()
        .ok_or("usage: write_latency <node addr> [count]")?;
    let count: usize = args.next().map(|c| c.parse()).transpose()?.unwrap_or(500);
    // The credentials in $CLUSTER_TLS; plaintext when unset.
    let channels = Channels::new(&Security::from_env_or_insecure()?);
    let client = ControlClient::with_channels(&channels, &addr)?;
    let mut samples: Vec<Duration> = Vec::with_capacity(count);
    for i in 0..count {
        let started = Instant::now();
        client.clone().kv_put(&format!("latency-{i}"), "x").await?;
        samples.push(started.elapsed());
    }
    samples.sort();
    let pick = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{count} sequential writes via {addr}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        pick(0.50).as_secs_f64() * 1e3,
        pick(0.99).as_secs_f64() * 1e3,
        pick(1.0).as_secs_f64() * 1e3
    );
    Ok(())
}
