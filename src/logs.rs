//! How a process writes its log: human-readable lines, or one JSON object per line for a
//! log pipeline (`--log-format json`), always on stderr (the journal under systemd).

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// `--log-format` (`log_format` in node.toml).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `2026-12-03T12:00:00.000000Z  INFO cluster::node: node starting id=1 ...`
    #[default]
    Text,
    /// `{"timestamp":"...","level":"INFO","target":"cluster::node","node":1,
    /// "message":"node starting","id":1,...}`: every event's fields as JSON values, the
    /// node's id on every line.
    Json,
}

/// Installs the process's subscriber: `RUST_LOG` if set, else `default_level`. `node` is
/// the id every JSON line carries (one process runs one node).
pub fn init(format: LogFormat, default_level: &str, node: Option<u64>) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        // Colour codes only for a terminal, not in the journal or a log file.
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder
            .with_ansi(false)
            .event_format(JsonLines { node })
            .try_init(),
    };
}

/// One JSON object per event, with the event's fields as typed values (numbers stay
/// numbers) beside timestamp, level, target and the node id.
struct JsonLines {
    node: Option<u64>,
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut line = serde_json::Map::new();
        line.insert(
            "timestamp".into(),
            humantime::format_rfc3339_micros(std::time::SystemTime::now())
                .to_string()
                .into(),
        );
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        if let Some(node) = self.node {
            line.insert("node".into(), node.into());
        }
        event.record(&mut Fields(&mut line));
        writeln!(writer, "{}", serde_json::Value::Object(line))
    }
}

struct Fields<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl Fields<'_> {
    fn put(&mut self, field: &Field, value: serde_json::Value) {
        // An event field never hides one of the line's own keys.
        let name = match field.name() {
            key @ ("timestamp" | "level" | "target" | "node") => format!("field.{key}"),
            key => key.to_string(),
        };
        self.0.insert(name, value);
    }
}

impl Visit for Fields<'_> {
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, crate::error::Chain(value).to_string().into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_json_line_keeps_field_types_and_names_the_node() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .event_format(JsonLines { node: Some(3) })
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let error = std::io::Error::other("disk gone");
            tracing::warn!(
                generation = 7u64,
                ok = false,
                node = "spoof",
                error = &error as &dyn std::error::Error,
                "rollout \"step\" failed"
            );
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["node"], 3);
        assert_eq!(line["field.node"], "spoof");
        assert_eq!(line["generation"], 7);
        assert_eq!(line["ok"], false);
        assert_eq!(line["error"], "disk gone");
        assert_eq!(line["message"], "rollout \"step\" failed");
        assert!(line["timestamp"].as_str().unwrap().ends_with('Z'), "{line}");
    }
}
