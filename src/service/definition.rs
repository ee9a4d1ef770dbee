//! The operator's services as a dist defines them: `service.toml` at the dist root, one
//! `[[service]]` table each. Pure: text in, validated definitions or the field at fault
//! out; a definition is untrusted input like a manifest, checked at stamp, at install and
//! in preflight before anything starts from it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where a dist defines its services, relative to its root (part of the build hash like
/// every other file).
pub const SERVICE_FILE: &str = "service.toml";

/// At most this many services per release: each holds a socket and a process per node.
pub const MAX_SERVICES: usize = 16;

/// One service, validated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceDef {
    /// Unique in the release: `[a-z0-9-]`, 1-32 characters (names its state directory).
    pub name: String,
    /// The executable, relative to the release root.
    pub exec: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// The ingress the node holds for the service, whatever instance serves it; port 0
    /// picks a free port once per node (kept across restarts).
    pub listen: SocketAddr,
    /// The service takes its socket by descriptor (socket activation). `false`: it binds
    /// `listen` itself, so one instance runs at a time and its port refuses connections
    /// while instances change (no zero-downtime cutover; preflight says so).
    pub socket_activation: bool,
    pub check: Check,
    /// How long a new instance may take to pass its first check.
    pub start_grace: Duration,
    /// How long an instance asked to stop may take to finish its requests.
    pub drain_timeout: Duration,
    /// What asks an instance to stop (a signal number; SIGTERM by default).
    pub stop_signal: i32,
    /// Past the drain timeout, how much longer an instance has to exit (its shutdown
    /// hooks) before SIGKILL.
    pub kill_timeout: Duration,
}

/// How the node checks an instance, always through that instance's own check socket
/// (never the shared ingress, which either instance may answer during a cutover).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub kind: CheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    /// Failed checks in a row that make a serving instance unhealthy.
    pub failure_threshold: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckKind {
    /// `GET path` answers `expect_status`.
    Http { path: String, expect_status: u16 },
    /// A TCP connection is accepted.
    Tcp,
    /// The standard gRPC health protocol (plaintext) answers SERVING for `service`
    /// ("" for the server as a whole).
    Grpc { service: String },
    /// The command (relative to the release root, or absolute) exits 0; it gets the
    /// instance's check address in `CHECK_ADDR`.
    Command(Vec<String>),
}

/// What is wrong with a service definition: the field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DefinitionError {
    #[error("{SERVICE_FILE} is not valid TOML: {0}")]
    Syntax(String),
    #[error("{SERVICE_FILE}: service {service}: `{field}` {problem}")]
    Field {
        service: String,
        field: &'static str,
        problem: String,
    },
    #[error("{SERVICE_FILE} defines {0} services; at most {MAX_SERVICES} are allowed")]
    TooMany(usize),
}

/// The file as written; `Raw` is turned into `ServiceDef` by [`parse`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    service: Vec<RawService>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    exec: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    listen: String,
    socket_activation: Option<bool>,
    check: RawCheck,
    start_grace: Option<String>,
    drain_timeout: Option<String>,
    stop_signal: Option<String>,
    kill_timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    http: Option<String>,
    expect_status: Option<u16>,
    tcp: Option<bool>,
    grpc: Option<String>,
    command: Option<Vec<String>>,
    interval: Option<String>,
    timeout: Option<String>,
    failure_threshold: Option<u32>,
}

/// Parses and validates `text`, the content of `service.toml`. `has_executable` says
/// whether a relative path names a regular, executable file of the release.
pub fn parse(
    text: &str,
    has_executable: impl Fn(&str) -> bool,
) -> Result<Vec<ServiceDef>, DefinitionError> {
    let raw: RawFile = toml::from_str(text).map_err(|e| DefinitionError::Syntax(e.to_string()))?;
    if raw.service.len() > MAX_SERVICES {
        return Err(DefinitionError::TooMany(raw.service.len()));
    }
    let mut defs: Vec<ServiceDef> = Vec::new();
    for service in raw.service {
        let def = one(service, &has_executable)?;
        let field = |field, problem: String| DefinitionError::Field {
            service: def.name.clone(),
            field,
            problem,
        };
        if defs.iter().any(|d| d.name == def.name) {
            return Err(field("name", "is used by another service".into()));
        }
        if def.listen.port() != 0 && defs.iter().any(|d| d.listen == def.listen) {
            return Err(field(
                "listen",
                format!("{} is another service's ingress", def.listen),
            ));
        }
        defs.push(def);
    }
    Ok(defs)
}

fn one(
    raw: RawService,
    has_executable: &impl Fn(&str) -> bool,
) -> Result<ServiceDef, DefinitionError> {
    let name = raw.name;
    let field = |field, problem: String| DefinitionError::Field {
        service: if name.is_empty() {
            "\"\"".into()
        } else {
            name.clone()
        },
        field,
        problem,
    };
    let name_ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if !name_ok {
        return Err(field(
            "name",
            "must be 1-32 characters of a-z, 0-9 and '-', not starting with '-'".into(),
        ));
    }
    let exec = relative_path(&raw.exec).map_err(|problem| field("exec", problem))?;
    if !has_executable(&exec) {
        return Err(field(
            "exec",
            format!("{exec} is not an executable file of the release (chmod +x, and ship it in the dist)"),
        ));
    }
    for key in raw.env.keys() {
        let reserved =
            key.starts_with("LISTEN_") || key == "NOTIFY_SOCKET" || key == "STATE_DIRECTORY";
        if key.is_empty() || key.contains('=') || key.contains('\0') || reserved {
            return Err(field(
                "env",
                format!("{key:?} cannot be set: LISTEN_*, NOTIFY_SOCKET and STATE_DIRECTORY are the node's to set"),
            ));
        }
    }
    if raw
        .args
        .iter()
        .chain(raw.env.values())
        .any(|a| a.contains('\0'))
    {
        return Err(field("args", "contains a NUL byte".into()));
    }
    let listen: SocketAddr = raw.listen.parse().map_err(|_| {
        field(
            "listen",
            format!(
                "{:?} is not an address like \"0.0.0.0:8080\" or \"[::]:8080\"",
                raw.listen
            ),
        )
    })?;
    let socket_activation = raw.socket_activation.unwrap_or(true);
    if !socket_activation && listen.port() == 0 {
        return Err(field(
            "listen",
            "needs a port of its own with socket_activation = false: the service binds it itself"
                .into(),
        ));
    }
    let duration = |what: &'static str, text: Option<String>, default: Duration, max: Duration| {
        let Some(text) = text else { return Ok(default) };
        let parsed = humantime::parse_duration(&text).map_err(|e| {
            field(
                what,
                format!("{text:?} is not a duration like \"5s\" or \"500ms\": {e}"),
            )
        })?;
        if parsed.is_zero() || parsed > max {
            return Err(field(
                what,
                format!(
                    "{text} must be above 0 and at most {}",
                    humantime::format_duration(max)
                ),
            ));
        }
        Ok(parsed)
    };
    let hour = Duration::from_secs(3600);
    let start_grace = duration(
        "start_grace",
        raw.start_grace,
        Duration::from_secs(30),
        hour,
    )?;
    let drain_timeout = duration(
        "drain_timeout",
        raw.drain_timeout,
        Duration::from_secs(30),
        hour,
    )?;
    let kill_timeout = duration(
        "kill_timeout",
        raw.kill_timeout,
        Duration::from_secs(5),
        hour,
    )?;
    let stop_signal = match raw.stop_signal.as_deref() {
        None => SIGTERM,
        Some(name) => signal_number(name).ok_or_else(|| {
            field(
                "stop_signal",
                format!("{name:?} is not one of SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1, SIGUSR2, SIGWINCH"),
            )
        })?,
    };

    let check = raw.check;
    let kinds = [
        check.http.is_some(),
        check.tcp == Some(true),
        check.grpc.is_some(),
        check.command.is_some(),
    ];
    if kinds.iter().filter(|k| **k).count() != 1 {
        return Err(field(
            "check",
            "needs exactly one of http = \"/path\", tcp = true, grpc = \"<service>\", command = [...]"
                .into(),
        ));
    }
    let kind = if let Some(path) = check.http {
        if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(field(
                "check.http",
                format!("{path:?} must be a path starting with '/', without spaces"),
            ));
        }
        let expect_status = check.expect_status.unwrap_or(200);
        if !(100..=599).contains(&expect_status) {
            return Err(field(
                "check.expect_status",
                format!("{expect_status} is not an HTTP status"),
            ));
        }
        CheckKind::Http {
            path,
            expect_status,
        }
    } else if let Some(service) = check.grpc {
        if service.len() > 200 || service.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(field(
                "check.grpc",
                format!("{service:?} is not a gRPC service name (\"\" checks the whole server)"),
            ));
        }
        CheckKind::Grpc { service }
    } else if let Some(command) = check.command {
        if command.is_empty() || command.iter().any(|a| a.contains('\0')) {
            return Err(field(
                "check.command",
                "must be a non-empty list without NUL bytes".into(),
            ));
        }
        CheckKind::Command(command)
    } else {
        CheckKind::Tcp
    };
    if check.expect_status.is_some() && !matches!(kind, CheckKind::Http { .. }) {
        return Err(field(
            "check.expect_status",
            "applies to http checks only".into(),
        ));
    }
    let interval = duration(
        "check.interval",
        check.interval,
        Duration::from_secs(1),
        hour,
    )?;
    let timeout = duration("check.timeout", check.timeout, Duration::from_secs(1), hour)?;
    let failure_threshold = check.failure_threshold.unwrap_or(3);
    if !(1..=100).contains(&failure_threshold) {
        return Err(field(
            "check.failure_threshold",
            format!("{failure_threshold} must be 1 to 100"),
        ));
    }
    Ok(ServiceDef {
        name: name.clone(),
        exec,
        args: raw.args,
        env: raw.env,
        listen,
        socket_activation,
        check: Check {
            kind,
            interval,
            timeout,
            failure_threshold,
        },
        start_grace,
        drain_timeout,
        stop_signal,
        kill_timeout,
    })
}

/// A path inside the release: relative, no `..`, no empty or `.` parts.
fn relative_path(path: &str) -> Result<String, String> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path.contains('\0')
        || path
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..");
    if bad {
        return Err(format!(
            "{path:?} must be a path inside the release, like \"bin/web\" (relative, no '..')"
        ));
    }
    Ok(path.to_string())
}

const SIGTERM: i32 = 15;

/// The signals a service may ask to be stopped with (Linux numbers).
fn signal_number(name: &str) -> Option<i32> {
    let name = name.strip_prefix("SIG").unwrap_or(name);
    Some(match name {
        "TERM" => 15,
        "INT" => 2,
        "QUIT" => 3,
        "HUP" => 1,
        "USR1" => 10,
        "USR2" => 12,
        "WINCH" => 28,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[service]]
name = "web"
exec = "bin/web"
args = ["--port", "fd"]
env = { MODE = "prod" }
listen = "127.0.0.1:8080"
drain_timeout = "10s"
[service.check]
http = "/healthz"
interval = "500ms"
"#;

    fn exists(path: &str) -> bool {
        path == "bin/web"
    }

    #[test]
    fn a_good_definition_parses_with_defaults() {
        let defs = parse(GOOD, exists).unwrap();
        assert_eq!(defs.len(), 1);
        let web = &defs[0];
        assert_eq!(web.name, "web");
        assert_eq!(web.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(web.drain_timeout, Duration::from_secs(10));
        assert_eq!(web.start_grace, Duration::from_secs(30));
        assert_eq!(web.stop_signal, 15);
        assert_eq!(
            web.check.kind,
            CheckKind::Http {
                path: "/healthz".into(),
                expect_status: 200
            }
        );
        assert_eq!(web.check.interval, Duration::from_millis(500));
        assert_eq!(web.check.failure_threshold, 3);
        assert_eq!(parse("", exists).unwrap(), vec![]);
        let grpc = GOOD.replace("http = \"/healthz\"", "grpc = \"\"");
        assert_eq!(
            parse(&grpc, exists).unwrap()[0].check.kind,
            CheckKind::Grpc {
                service: String::new()
            }
        );
    }

    #[test]
    fn every_bad_field_is_named() {
        let table: &[(&str, &str, &str)] = &[
            ("name = \"web\"", "name = \"Web!\"", "`name`"),
            ("exec = \"bin/web\"", "exec = \"../bin/web\"", "`exec`"),
            ("exec = \"bin/web\"", "exec = \"/usr/bin/web\"", "`exec`"),
            (
                "exec = \"bin/web\"",
                "exec = \"bin/missing\"",
                "not an executable",
            ),
            (
                "listen = \"127.0.0.1:8080\"",
                "listen = \"localhost\"",
                "`listen`",
            ),
            (
                "drain_timeout = \"10s\"",
                "drain_timeout = \"soon\"",
                "`drain_timeout`",
            ),
            (
                "drain_timeout = \"10s\"",
                "drain_timeout = \"0s\"",
                "`drain_timeout`",
            ),
            ("http = \"/healthz\"", "http = \"healthz\"", "`check.http`"),
            ("http = \"/healthz\"", "tcp = false", "`check`"),
            (
                "http = \"/healthz\"",
                "http = \"/h\"\ntcp = true",
                "`check`",
            ),
            (
                "interval = \"500ms\"",
                "failure_threshold = 0",
                "`check.failure_threshold`",
            ),
            (
                "env = { MODE = \"prod\" }",
                "env = { LISTEN_FDS = \"3\" }",
                "`env`",
            ),
            (
                "drain_timeout = \"10s\"",
                "stop_signal = \"SIGKILL\"",
                "`stop_signal`",
            ),
            (
                "drain_timeout = \"10s\"",
                "colour = \"blue\"",
                "not valid TOML",
            ),
        ];
        for (from, to, expected) in table {
            assert!(GOOD.contains(from), "{from}");
            let text = GOOD.replacen(from, to, 1);
            let error = parse(&text, exists).unwrap_err().to_string();
            assert!(error.contains(expected), "{to}: {error}");
        }
    }

    #[test]
    fn names_and_ingresses_are_unique() {
        let twice = format!(
            "{GOOD}\n{}",
            GOOD.replace("127.0.0.1:8080", "127.0.0.1:8081")
        );
        let error = parse(&twice, exists).unwrap_err().to_string();
        assert!(error.contains("used by another service"), "{error}");
        let same_port = format!("{GOOD}\n{}", GOOD.replace("\"web\"\n", "\"api\"\n"));
        let error = parse(&same_port, exists).unwrap_err().to_string();
        assert!(error.contains("another service's ingress"), "{error}");
        let bound_by_itself = GOOD.replace(
            "listen = \"127.0.0.1:8080\"",
            "listen = \"127.0.0.1:0\"\nsocket_activation = false",
        );
        let error = parse(&bound_by_itself, exists).unwrap_err().to_string();
        assert!(error.contains("a port of its own"), "{error}");
        let any_port = GOOD.replace("127.0.0.1:8080", "127.0.0.1:0");
        let both = format!("{any_port}\n{}", any_port.replace("\"web\"\n", "\"api\"\n"));
        assert_eq!(parse(&both, exists).unwrap().len(), 2);
    }
}
