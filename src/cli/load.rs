//! A small HTTP load generator for `cluster demo`: keep-alive connections sending
//! `GET /version` back to back, counting every answer and every failure (a refused or
//! broken connection, or a status other than 200), and which versions answered.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// What the load saw.
#[derive(Clone, Debug, Default)]
pub struct LoadTally {
    pub served: u64,
    /// Connections refused or broken mid-request.
    pub connection_errors: u64,
    /// Answers other than 200.
    pub bad_answers: u64,
    /// Answers per body (the version that served them).
    pub versions: BTreeMap<String, u64>,
    pub slowest: Duration,
    /// The first few failures, as said.
    pub examples: Vec<String>,
}

impl LoadTally {
    pub fn failed(&self) -> u64 {
        self.connection_errors + self.bad_answers
    }
}

/// Load running until [`Load::stop`].
pub struct Load {
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<LoadTally>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `connections` connections to each of `targets` (host:port).
    pub fn start(targets: &[String], connections: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(LoadTally::default()));
        let mut tasks = Vec::new();
        for target in targets {
            for _ in 0..connections {
                tasks.push(tokio::spawn(client(
                    target.clone(),
                    stop.clone(),
                    tally.clone(),
                )));
            }
        }
        Load { stop, tally, tasks }
    }

    /// Stops every connection after its request in flight; the final tally.
    pub async fn stop(self) -> LoadTally {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            let _ = task.await;
        }
        let tally = self.tally.lock().unwrap_or_else(|e| e.into_inner()).clone();
        tally
    }
}

async fn client(target: String, stop: Arc<AtomicBool>, tally: Arc<Mutex<LoadTally>>) {
    let mut connection: Option<BufReader<TcpStream>> = None;
    while !stop.load(Ordering::SeqCst) {
        let started = Instant::now();
        let outcome = request(&target, &mut connection).await;
        let mut tally = tally.lock().unwrap_or_else(|e| e.into_inner());
        tally.slowest = tally.slowest.max(started.elapsed());
        match outcome {
            Ok((200, body)) => {
                tally.served += 1;
                *tally.versions.entry(body).or_default() += 1;
            }
            Ok((code, body)) => {
                tally.bad_answers += 1;
                if tally.examples.len() < 5 {
                    tally.examples.push(format!("{target}: {code} {body}"));
                }
            }
            Err(e) => {
                tally.connection_errors += 1;
                if tally.examples.len() < 5 {
                    tally.examples.push(format!("{target}: {e}"));
                }
                connection = None;
            }
        }
    }
}

/// One `GET /version` on the kept connection (a new one if there is none, or the server
/// closed it after its last answer).
async fn request(
    target: &str,
    connection: &mut Option<BufReader<TcpStream>>,
) -> std::io::Result<(u16, String)> {
    if connection.is_none() {
        let stream = TcpStream::connect(target).await?;
        stream.set_nodelay(true)?;
        *connection = Some(BufReader::new(stream));
    }
    let stream = connection.as_mut().expect("connected above");
    let request = format!("GET /version HTTP/1.1\r\nHost: {target}\r\n\r\n");
    stream.get_mut().write_all(request.as_bytes()).await?;
    let mut status_line = String::new();
    if stream.read_line(&mut status_line).await? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the connection closed before an answer",
        ));
    }
    let code: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {status_line:?}")))?;
    let (mut length, mut close) = (0usize, false);
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the connection closed mid-answer",
            ));
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            let name = name.trim().to_ascii_lowercase();
            if name == "content-length" {
                length = value.trim().parse().unwrap_or(0);
            } else if name == "connection" {
                close = value.trim().eq_ignore_ascii_case("close");
            }
        }
    }
    let mut body = vec![0u8; length.min(1 << 20)];
    stream.read_exact(&mut body).await?;
    if close {
        *connection = None;
    }
    Ok((code, String::from_utf8_lossy(&body).trim().to_string()))
}
