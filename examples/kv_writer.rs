//! One sequential key/value client for benchmarks, with the same loop against `cluster`
//! (its gRPC Control service) and against etcd (its HTTP/JSON gateway, `/v3/kv/put`), so
//! that write gaps and latencies of the two are measured the same way.
//!
//! ```text
//! kv_writer gap     <cluster|etcd> <addr,addr,...> <acked-file> [timeout-ms]
//! kv_writer latency <cluster|etcd> <addr,addr,...> <count> [timeout-ms]
//! kv_writer verify  <cluster|etcd> <addr,addr,...> <acked-file>
//! ```
//!
//! `gap` writes `gap-<pid>-N` keys one after another until SIGTERM or SIGINT, moving to the
//! next address after any error (as a client with a list of endpoints does), appends every
//! acknowledged key to `<acked-file>` and then prints one JSON line: acknowledged writes,
//! the longest time between two acknowledgements (`max_gap_ms`), failed attempts and
//! latency percentiles. Every request has the same timeout (default 2000 ms). `latency`
//! times `<count>` writes to the first address. `verify` reads every key of `<acked-file>`
//! back (linearizable reads) and prints how many are missing or wrong; it exits 1 if any is.
//! Against `cluster`, the credentials in `$CLUSTER_TLS` are used; unset, it speaks
//! plaintext (to nodes started with `--insecure`).

use std::io::Write as _;
use std::time::{Duration, Instant};

use cluster::rpc::{Channels, ControlClient};
use cluster::tls::Security;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::signal::unix::{signal, SignalKind};

type Error = Box<dyn std::error::Error + Send + Sync>;

const USAGE: &str = "usage: kv_writer <gap|latency|verify> <cluster|etcd> <addr,...> <acked-file|count> [timeout-ms]";

/// A connection to one endpoint of either store.
enum Conn {
    Cluster(ControlClient),
    Etcd(EtcdConn),
}

impl Conn {
    fn new(backend: &str, addr: &str, timeout: Duration) -> Result<Self, Error> {
        match backend {
            "cluster" => {
                let channels = Channels::new(&Security::from_env_or_insecure()?);
                Ok(Self::Cluster(
                    ControlClient::with_channels(&channels, addr)?.timeout(timeout),
                ))
            }
            "etcd" => Ok(Self::Etcd(EtcdConn {
                addr: addr.to_string(),
                stream: None,
                timeout,
            })),
            other => Err(format!("unknown backend {other:?}: cluster or etcd").into()),
        }
    }

    /// Returns once the store acknowledges the write as committed.
    async fn put(&mut self, key: &str, value: &str) -> Result<(), Error> {
        match self {
            Self::Cluster(client) => {
                client.kv_put(key, value).await?;
                Ok(())
            }
            Self::Etcd(conn) => {
                let body = format!(
                    r#"{{"key":"{}","value":"{}"}}"#,
                    base64(key.as_bytes()),
                    base64(value.as_bytes())
                );
                conn.post("/v3/kv/put", &body).await.map(|_| ())
            }
        }
    }

    async fn get(&mut self, key: &str) -> Result<Option<String>, Error> {
        match self {
            Self::Cluster(client) => Ok(client.kv_get(key).await?),
            Self::Etcd(conn) => {
                let body = format!(r#"{{"key":"{}"}}"#, base64(key.as_bytes()));
                let reply: serde_json::Value =
                    serde_json::from_slice(&conn.post("/v3/kv/range", &body).await?)?;
                let Some(value) = reply["kvs"][0]["value"].as_str() else {
                    return Ok(None);
                };
                Ok(Some(String::from_utf8(unbase64(value)?)?))
            }
        }
    }
}

/// A kept-alive HTTP/1.1 connection to etcd's JSON gateway; dropped after any error.
struct EtcdConn {
    addr: String,
    stream: Option<BufReader<TcpStream>>,
    timeout: Duration,
}

impl EtcdConn {
    async fn post(&mut self, path: &str, body: &str) -> Result<Vec<u8>, Error> {
        let result = tokio::time::timeout(self.timeout, self.exchange(path, body)).await;
        match result {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => {
                self.stream = None;
                Err(e)
            }
            Err(_) => {
                self.stream = None;
                Err(format!("{} did not answer within {:?}", self.addr, self.timeout).into())
            }
        }
    }

    async fn exchange(&mut self, path: &str, body: &str) -> Result<Vec<u8>, Error> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(&self.addr).await?;
            stream.set_nodelay(true)?;
            self.stream = Some(BufReader::new(stream));
        }
        let stream = self.stream.as_mut().expect("connected above");
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        stream.get_mut().write_all(request.as_bytes()).await?;

        let mut line = String::new();
        stream.read_line(&mut line).await?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| format!("{}: malformed status line {line:?}", self.addr))?;
        let mut length = None;
        let mut chunked = false;
        loop {
            line.clear();
            if stream.read_line(&mut line).await? == 0 {
                return Err(format!("{}: connection closed in the headers", self.addr).into());
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let (name, value) = header.split_once(':').unwrap_or((header, ""));
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.parse::<usize>()?);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            }
        }
        let mut reply = Vec::new();
        if chunked {
            loop {
                line.clear();
                stream.read_line(&mut line).await?;
                let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)?;
                let mut chunk = vec![0; size + 2];
                stream.read_exact(&mut chunk).await?;
                if size == 0 {
                    break;
                }
                reply.extend_from_slice(&chunk[..size]);
            }
        } else {
            let length = length.ok_or_else(|| format!("{}: reply without a length", self.addr))?;
            reply.resize(length, 0);
            stream.read_exact(&mut reply).await?;
        }
        if status != 200 {
            return Err(format!(
                "{}: HTTP {status}: {}",
                self.addr,
                String::from_utf8_lossy(&reply)
            )
            .into());
        }
        Ok(reply)
    }
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let n = group
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= group.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn unbase64(text: &str) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    let (mut bits, mut count) = (0u32, 0);
    for c in text.bytes().filter(|c| *c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return Err(format!("not base64: {text:?}").into()),
        };
        bits = bits << 6 | u32::from(v);
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
        }
    }
    Ok(out)
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e3
}

async fn gap(
    backend: &str,
    addrs: &[String],
    acked_file: &str,
    timeout: Duration,
) -> Result<(), Error> {
    let mut conns = addrs
        .iter()
        .map(|addr| Conn::new(backend, addr, timeout))
        .collect::<Result<Vec<_>, _>>()?;
    let mut acked = std::io::BufWriter::new(std::fs::File::create(acked_file)?);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let prefix = format!("gap-{}", std::process::id());
    let (mut n, mut target, mut failed) = (0u64, 0usize, 0u64);
    let mut latencies = Vec::new();
    let mut max_gap = Duration::ZERO;
    let mut last_ack = Instant::now();
    loop {
        let key = format!("{prefix}-{n}");
        let value = format!("v{n}");
        let started = Instant::now();
        let conn = &mut conns[target % addrs.len()];
        let result = tokio::select! {
            result = conn.put(&key, &value) => result,
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        match result {
            Ok(()) => {
                latencies.push(started.elapsed());
                max_gap = max_gap.max(last_ack.elapsed());
                last_ack = Instant::now();
                writeln!(acked, "{key} {value}")?;
                n += 1;
            }
            Err(_) => {
                failed += 1;
                target += 1;
                // A refused connection fails at once: do not spin on a dead node.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    // A store that never came back shows as a gap up to the stop.
    max_gap = max_gap.max(last_ack.elapsed());
    acked.flush()?;
    latencies.sort();
    println!(
        r#"{{"acked": {n}, "max_gap_ms": {:.1}, "failed_attempts": {failed}, "p50_ms": {:.2}, "p99_ms": {:.2}, "timeout_ms": {}}}"#,
        max_gap.as_secs_f64() * 1e3,
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        timeout.as_millis()
    );
    Ok(())
}

async fn latency(backend: &str, addr: &str, count: usize, timeout: Duration) -> Result<(), Error> {
    let mut conn = Conn::new(backend, addr, timeout)?;
    let prefix = format!("latency-{}", std::process::id());
    let mut samples = Vec::with_capacity(count);
    for i in 0..count {
        let started = Instant::now();
        conn.put(&format!("{prefix}-{i}"), "x").await?;
        samples.push(started.elapsed());
    }
    samples.sort();
    println!(
        r#"{{"count": {count}, "p50_ms": {:.2}, "p99_ms": {:.2}, "max_ms": {:.2}}}"#,
        percentile(&samples, 0.50),
        percentile(&samples, 0.99),
        percentile(&samples, 1.0)
    );
    Ok(())
}

async fn verify(
    backend: &str,
    addrs: &[String],
    acked_file: &str,
    timeout: Duration,
) -> Result<bool, Error> {
    let text = std::fs::read_to_string(acked_file)?;
    let mut conns = addrs
        .iter()
        .map(|addr| Conn::new(backend, addr, timeout))
        .collect::<Result<Vec<_>, _>>()?;
    let (mut checked, mut lost, mut target) = (0u64, Vec::new(), 0usize);
    for line in text.lines() {
        let (key, value) = line.split_once(' ').ok_or("malformed acked file")?;
        let mut attempts = 0;
        let got = loop {
            match conns[target % addrs.len()].get(key).await {
                Ok(got) => break got,
                Err(e) if attempts >= 3 * addrs.len() => return Err(e),
                Err(_) => {
                    attempts += 1;
                    target += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        checked += 1;
        if got.as_deref() != Some(value) {
            lost.push(key.to_string());
        }
    }
    println!(
        r#"{{"checked": {checked}, "lost": {}, "first_lost": {:?}}}"#,
        lost.len(),
        lost.first().map(String::as_str).unwrap_or("")
    );
    Ok(lost.is_empty())
}

#[tokio::main]
async fn main() -> Result<std::process::ExitCode, Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        return Err(USAGE.into());
    }
    let (mode, backend, arg) = (args[0].as_str(), args[1].as_str(), args[3].as_str());
    let addrs: Vec<String> = args[2].split(',').map(str::to_string).collect();
    let timeout =
        Duration::from_millis(args.get(4).map(|t| t.parse()).transpose()?.unwrap_or(2000));
    match mode {
        "gap" => gap(backend, &addrs, arg, timeout).await?,
        "latency" => latency(backend, &addrs[0], arg.parse()?, timeout).await?,
        "verify" => {
            if !verify(backend, &addrs, arg, timeout).await? {
                return Ok(std::process::ExitCode::FAILURE);
            }
        }
        _ => return Err(USAGE.into()),
    }
    Ok(std::process::ExitCode::SUCCESS)
}
