//! The sample service (`cluster sample-service`, hidden): a small HTTP server the demo
//! and the tests roll out. It takes its sockets by socket activation (`LISTEN_FDS`),
//! serves `/`, `/version`, `/healthz`, `/slow?ms=N`, `/requests` (the count it keeps in
//! its state directory) and `/metrics` (Prometheus text: `http_requests_total` by path and
//! status, and the `http_request_duration_seconds` histogram), and on SIGTERM stops
//! accepting, answers every request still in flight, and exits. It can be told to fail a
//! share of its requests or to answer slowly: the bad releases a canary's metric gates
//! must stop. Plain threads, no runtime: what an operator's small service is.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How the sample behaves (its arguments in a release's `service.toml`).
#[derive(Clone, Debug, Default)]
pub struct SampleOptions {
    /// What `/version` answers.
    pub version: String,
    /// `/healthz` answers 503 from the start.
    pub fail_health: bool,
    /// `/healthz` answers 200 for this long after start, then 503.
    pub healthy_for: Option<Duration>,
    /// Without sockets passed: bind this address itself (a service that is not
    /// socket-activated).
    pub listen: Option<std::net::SocketAddr>,
    /// This share of requests to `/` answers 500 (spread evenly: 0.05 fails every 20th).
    pub error_rate: f64,
    /// Every request to `/` takes this much longer.
    pub latency: Option<Duration>,
}

/// Upper bounds (seconds) of the request duration histogram's buckets.
const BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Requests by path and status, and their durations: what `/metrics` shows.
#[derive(Default)]
struct Metrics {
    requests: std::collections::BTreeMap<(String, u16), u64>,
    /// Cumulative: requests that took at most `BUCKETS[i]`.
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum_seconds: f64,
}

impl Metrics {
    /// With the series an error-rate query divides already at 0 (as a well-instrumented
    /// service exports them): a release with no errors yet has a rate of 0, not no data.
    fn started() -> Self {
        let mut metrics = Self::default();
        for status in [200, 500] {
            metrics.requests.insert(("/".to_string(), status), 0);
        }
        metrics
    }

    fn observe(&mut self, path: &str, status: u16, took: Duration) {
        // Paths outside the service's own are counted as one, so a scan cannot grow this.
        let path = match path {
            "/" | "/version" | "/healthz" | "/slow" | "/requests" => path,
            _ => "other",
        };
        *self.requests.entry((path.to_string(), status)).or_default() += 1;
        let seconds = took.as_secs_f64();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                self.buckets[i] += 1;
            }
        }
        self.count += 1;
        self.sum_seconds += seconds;
    }

    fn render(&self, version: &str) -> String {
        let mut out = String::from(
            "# HELP http_requests_total Requests answered, by path and status.\n\
             # TYPE http_requests_total counter\n",
        );
        for ((path, status), n) in &self.requests {
            out += &format!(
                "http_requests_total{{path=\"{path}\",status=\"{status}\",version=\"{version}\"}} {n}\n"
            );
        }
        out += "# HELP http_request_duration_seconds Time to answer a request.\n\
                # TYPE http_request_duration_seconds histogram\n";
        for (bound, n) in BUCKETS.iter().zip(self.buckets) {
            out += &format!(
                "http_request_duration_seconds_bucket{{le=\"{bound}\",version=\"{version}\"}} {n}\n"
            );
        }
        out += &format!(
            "http_request_duration_seconds_bucket{{le=\"+Inf\",version=\"{version}\"}} {count}\n\
             http_request_duration_seconds_sum{{version=\"{version}\"}} {sum}\n\
             http_request_duration_seconds_count{{version=\"{version}\"}} {count}\n",
            count = self.count,
            sum = self.sum_seconds
        );
        out
    }
}

static STOPPING: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOPPING.store(true, Ordering::SeqCst);
}

/// How long a kept-alive connection with no request in progress stays open once the
/// service is stopping: its client's next request is still answered (with
/// `Connection: close`), so no request races the close.
const IDLE_GRACE: Duration = Duration::from_millis(1500);

struct Shared {
    options: SampleOptions,
    started: Instant,
    /// Requests this instance answered and has not yet added to the state directory's
    /// count (instances of two releases add theirs to one file during a cutover).
    unsaved: AtomicU64,
    open: AtomicUsize,
    counter_file: Option<PathBuf>,
    /// Requests to `/` so far (which of them fail follows from `error_rate`).
    served_root: AtomicU64,
    metrics: std::sync::Mutex<Metrics>,
}

/// Runs until SIGTERM or SIGINT, then drains.
pub fn run(options: SampleOptions) -> Result<(), String> {
    let listeners = match (std::env::var_os("LISTEN_FDS"), options.listen) {
        (None, Some(addr)) => {
            let listener =
                TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            let _ = listener.set_nonblocking(true);
            vec![listener]
        }
        _ => listen_fds()?,
    };
    // SAFETY: installs a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_stop as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_stop as *const () as libc::sighandler_t);
    }
    let counter_file =
        std::env::var_os("STATE_DIRECTORY").map(|d| PathBuf::from(d).join("requests"));
    let shared = Arc::new(Shared {
        options,
        started: Instant::now(),
        unsaved: AtomicU64::new(0),
        open: AtomicUsize::new(0),
        counter_file,
        served_root: AtomicU64::new(0),
        metrics: std::sync::Mutex::new(Metrics::started()),
    });
    eprintln!(
        "sample-service {} (pid {}) serving on {} sockets",
        shared.options.version,
        std::process::id(),
        listeners.len()
    );
    let mut polls: Vec<libc::pollfd> = listeners
        .iter()
        .map(|l| libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut saved = Instant::now();
    while !STOPPING.load(Ordering::SeqCst) {
        // SAFETY: poll on descriptors we own, with the array's own length.
        let ready = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, 50) };
        if ready > 0 {
            for (i, poll) in polls.iter().enumerate() {
                if poll.revents & libc::POLLIN == 0 {
                    continue;
                }
                // Another instance on the same socket may have taken it first.
                if let Ok((stream, _)) = listeners[i].accept() {
                    let shared = shared.clone();
                    shared.open.fetch_add(1, Ordering::SeqCst);
                    std::thread::spawn(move || {
                        let _ = serve(stream, &shared);
                        shared.open.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            }
        }
        if saved.elapsed() > Duration::from_secs(1) {
            let _ = save(&shared);
            saved = Instant::now();
        }
    }
    // Stop accepting: the socket stays open in the node and the next instance, which
    // take every connection still queued.
    drop(listeners);
    eprintln!(
        "sample-service {} stopping: draining {} connections",
        shared.options.version,
        shared.open.load(Ordering::SeqCst)
    );
    while shared.open.load(Ordering::SeqCst) > 0 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let count = save(&shared);
    eprintln!(
        "sample-service {} drained ({count} requests counted)",
        shared.options.version
    );
    Ok(())
}

/// Adds the requests not yet counted to the state directory's count, under a lock the
/// other instance of a cutover takes too. Returns the count.
fn save(shared: &Shared) -> u64 {
    let pending = shared.unsaved.swap(0, Ordering::SeqCst);
    let Some(file) = &shared.counter_file else {
        return pending;
    };
    let Ok(lock) = std::fs::File::create(file.with_extension("lock")) else {
        shared.unsaved.fetch_add(pending, Ordering::SeqCst);
        return pending;
    };
    // SAFETY: flock on a file we hold open; released when it closes.
    unsafe {
        libc::flock(lock.as_raw_fd(), libc::LOCK_EX);
    }
    let before: u64 = std::fs::read_to_string(file)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0);
    let count = before + pending;
    let temporary = file.with_extension("tmp");
    let written = std::fs::write(&temporary, count.to_string())
        .and_then(|()| std::fs::rename(&temporary, file));
    if written.is_err() {
        shared.unsaved.fetch_add(pending, Ordering::SeqCst);
    }
    count
}

/// The listening sockets passed by socket activation.
fn listen_fds() -> Result<Vec<TcpListener>, String> {
    let pid = std::env::var("LISTEN_PID").unwrap_or_default();
    if !pid.is_empty() && pid != std::process::id().to_string() {
        return Err(format!("LISTEN_PID {pid} is not this process"));
    }
    let count: i32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|n| *n > 0)
        .ok_or("no sockets passed (LISTEN_FDS): run me as a service of a cluster node")?;
    Ok((0..count)
        .map(|i| {
            // SAFETY: socket activation hands this process descriptors 3.. to own.
            let listener = unsafe { TcpListener::from_raw_fd(3 + i) };
            let _ = listener.set_nonblocking(true);
            listener
        })
        .collect())
}

/// Serves one connection, kept alive until the client closes it or the service stops.
fn serve(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut buffer: Vec<u8> = Vec::new();
    let mut idle_since_stop: Option<Instant> = None;
    loop {
        let Some(end) = find(&buffer, b"\r\n\r\n") else {
            match read_more(&mut stream, &mut buffer)? {
                Received::Closed => return Ok(()),
                Received::Got => {}
                Received::Nothing => {
                    if STOPPING.load(Ordering::SeqCst) && buffer.is_empty() {
                        let since = *idle_since_stop.get_or_insert_with(Instant::now);
                        if since.elapsed() > IDLE_GRACE {
                            return Ok(());
                        }
                    }
                }
            }
            if buffer.len() > 64 * 1024 {
                return Ok(());
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
        buffer.drain(..end + 4);
        let mut lines = head.lines();
        let request_line = lines.next().unwrap_or("");
        let mut parts = request_line.split_whitespace();
        let (_method, target, version) = (
            parts.next().unwrap_or(""),
            parts.next().unwrap_or("/"),
            parts.next().unwrap_or("HTTP/1.0"),
        );
        let mut close = version == "HTTP/1.0";
        let mut body_len = 0usize;
        for line in lines {
            if let Some((name, value)) = line.split_once(':') {
                let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
                if name == "connection" {
                    close = value.eq_ignore_ascii_case("close");
                } else if name == "content-length" {
                    body_len = value.parse().unwrap_or(0);
                }
            }
        }
        // A body is read and ignored.
        while buffer.len() < body_len {
            if read_more(&mut stream, &mut buffer)? == Received::Closed {
                return Ok(());
            }
        }
        buffer.drain(..body_len.min(buffer.len()));
        let began = Instant::now();
        let (status, body) = answer(target, shared);
        shared.unsaved.fetch_add(1, Ordering::SeqCst);
        let path = target.split('?').next().unwrap_or(target);
        if path != "/metrics" {
            shared
                .metrics
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .observe(path, status, began.elapsed());
        }
        // A stopping service closes each connection after its current request.
        close |= STOPPING.load(Ordering::SeqCst);
        let reason = match status {
            200 => "OK",
            404 => "Not Found",
            500 => "Internal Server Error",
            _ => "Service Unavailable",
        };
        let reply = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n{body}",
            body.len(),
            if close { "close" } else { "keep-alive" }
        );
        stream.write_all(reply.as_bytes())?;
        if close {
            let _ = stream.shutdown(std::net::Shutdown::Write);
            // Reads what the client still sends, so the close is not a reset.
            let deadline = Instant::now() + Duration::from_millis(200);
            let mut sink = [0u8; 1024];
            while Instant::now() < deadline {
                match stream.read(&mut sink) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break,
                }
            }
            return Ok(());
        }
    }
}

fn answer(target: &str, shared: &Shared) -> (u16, String) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    match path {
        "/version" => (200, format!("{}\n", shared.options.version)),
        "/healthz" => {
            let expired = shared
                .options
                .healthy_for
                .is_some_and(|limit| shared.started.elapsed() > limit);
            if shared.options.fail_health || expired {
                (503, "unhealthy\n".into())
            } else {
                (200, "ok\n".into())
            }
        }
        "/slow" => {
            let ms: u64 = query
                .split('&')
                .find_map(|pair| pair.strip_prefix("ms="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(100)
                .min(60_000);
            std::thread::sleep(Duration::from_millis(ms));
            (200, format!("slept {ms} ms ({})\n", shared.options.version))
        }
        "/requests" => (200, format!("{}\n", save(shared))),
        "/metrics" => (
            200,
            shared
                .metrics
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .render(&shared.options.version),
        ),
        "/" => {
            if let Some(latency) = shared.options.latency {
                std::thread::sleep(latency);
            }
            let n = shared.served_root.fetch_add(1, Ordering::SeqCst) + 1;
            if fails(n, shared.options.error_rate) {
                (
                    500,
                    format!("sample-service {} failed\n", shared.options.version),
                )
            } else {
                (200, format!("sample-service {}\n", shared.options.version))
            }
        }
        _ => (404, "not found\n".into()),
    }
}

/// Whether request `n` (from 1) of a service failing `rate` of its requests fails: the
/// failures are spread evenly, so any window of requests fails close to `rate` of them.
fn fails(n: u64, rate: f64) -> bool {
    rate > 0.0 && (n as f64 * rate).floor() > ((n - 1) as f64 * rate).floor()
}

/// What one read of a connection gave.
#[derive(PartialEq, Eq)]
enum Received {
    Got,
    /// The read timed out with nothing (the connection is idle).
    Nothing,
    Closed,
}

/// Reads what the client sent next into `buffer`.
fn read_more(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> std::io::Result<Received> {
    let mut chunk = [0u8; 4096];
    match stream.read(&mut chunk) {
        Ok(0) => Ok(Received::Closed),
        Ok(n) => {
            buffer.extend_from_slice(&chunk[..n]);
            Ok(Received::Got)
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Ok(Received::Nothing)
        }
        Err(e) => Err(e),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_the_share_asked_for_spread_evenly() {
        for (rate, window, expected) in [(0.05, 100, 5), (0.0, 100, 0), (1.0, 10, 10), (0.5, 10, 5)]
        {
            let failed = (1..=window).filter(|n| fails(*n, rate)).count();
            assert_eq!(failed, expected, "rate {rate} over {window}");
        }
        // Any 20 consecutive requests at 5% hold exactly one failure.
        for start in 1..200 {
            assert_eq!((start..start + 20).filter(|n| fails(*n, 0.05)).count(), 1);
        }
    }

    #[test]
    fn metrics_are_prometheus_text_with_a_cumulative_histogram() {
        let mut metrics = Metrics::started();
        assert!(metrics
            .render("v1")
            .contains("http_requests_total{path=\"/\",status=\"500\",version=\"v1\"} 0"));
        metrics.observe("/", 200, Duration::from_millis(3));
        metrics.observe("/", 500, Duration::from_millis(300));
        metrics.observe("/../etc", 404, Duration::from_millis(1));
        let text = metrics.render("v2");
        for line in [
            "http_requests_total{path=\"/\",status=\"200\",version=\"v2\"} 1",
            "http_requests_total{path=\"/\",status=\"500\",version=\"v2\"} 1",
            "http_requests_total{path=\"other\",status=\"404\",version=\"v2\"} 1",
            "http_request_duration_seconds_bucket{le=\"0.005\",version=\"v2\"} 2",
            "http_request_duration_seconds_bucket{le=\"0.25\",version=\"v2\"} 2",
            "http_request_duration_seconds_bucket{le=\"0.5\",version=\"v2\"} 3",
            "http_request_duration_seconds_bucket{le=\"+Inf\",version=\"v2\"} 3",
            "http_request_duration_seconds_count{version=\"v2\"} 3",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
    }
}
