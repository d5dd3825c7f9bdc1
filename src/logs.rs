//! Log output. JSON lines (controller, `agent run`) are flat: the event's fields and
//! the fields of every span it happened in sit at the top level beside `timestamp`,
//! `level`, `target` and `span`, so the object reference a span carries (`kind`,
//! `namespace`, `name`, `run`, `agent`) is on every line about that object and
//! `jq 'select(.name == "web-1")'` finds it. Human-readable output (`fleetpatch dev`)
//! is coloured only on a terminal, and never when `NO_COLOR` is set.

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// Whether human-readable output gets ANSI colours: only on a terminal, and not when
/// `NO_COLOR` is set to anything but the empty string (https://no-color.org).
pub fn colour(on_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    on_terminal && no_color.is_none_or(|value| value.is_empty())
}

/// The span of work on one object: every line logged inside it names the object.
/// `namespace` and `run` are left out when there are none.
pub fn object_span(
    kind: &str,
    namespace: Option<&str>,
    name: &str,
    run: Option<&str>,
) -> tracing::Span {
    let span = tracing::info_span!(
        "object",
        kind,
        namespace = tracing::field::Empty,
        name,
        run = tracing::field::Empty,
    );
    if let Some(namespace) = namespace {
        span.record("namespace", namespace);
    }
    if let Some(run) = run.filter(|r| !r.is_empty()) {
        span.record("run", run);
    }
    span
}

/// The span of work on one PatchJob: its reference, its run and its agent.
pub fn job_span(namespace: &str, name: &str, run: &str, agent: &str) -> tracing::Span {
    tracing::info_span!("object", kind = "PatchJob", namespace, name, run, agent)
}

/// Formats each event as one flat JSON object (see the module comment). Span fields
/// are recorded by [`JsonFields`]; inner spans win over outer ones, the event's own
/// fields over all of them.
pub struct FlatJson;

impl<S> FormatEvent<S, JsonFields> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let metadata = event.metadata();
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            Value::from(k8s_openapi::jiff::Timestamp::now().to_string()),
        );
        line.insert("level".into(), Value::from(metadata.level().as_str()));
        line.insert("target".into(), Value::from(metadata.target()));
        if let Some(scope) = ctx.event_scope() {
            let mut innermost = None;
            for span in scope.from_root() {
                innermost = Some(span.name());
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<JsonFields>>()
                    && let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(fields)
                {
                    line.extend(fields);
                }
            }
            if let Some(name) = innermost {
                line.insert("span".into(), Value::from(name));
            }
        }
        event.record(&mut Fields(&mut line));
        writeln!(writer, "{}", Value::Object(line))
    }
}

/// Writes an event's fields into a JSON map.
struct Fields<'a>(&'a mut Map<String, Value>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0
            .insert(field.name().into(), Value::from(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), Value::from(format!("{value:?}")));
    }
}

/// JSON logs on standard error, filtered by `RUST_LOG` (default `info`).
pub fn init_json() {
    tracing_subscriber::fmt()
        .fmt_fields(JsonFields::new())
        .event_format(FlatJson)
        .with_env_filter(env_filter())
        .with_writer(std::io::stderr)
        .init();
}

/// Human-readable logs on standard error, coloured as [`colour`] says.
pub fn init_text() {
    use std::io::IsTerminal;
    let no_color = std::env::var_os("NO_COLOR");
    tracing_subscriber::fmt()
        .with_env_filter(env_filter())
        .with_ansi(colour(std::io::stderr().is_terminal(), no_color.as_deref()))
        .with_writer(std::io::stderr)
        .init();
}

fn env_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;
    use std::sync::Arc;
    use tracing_subscriber::fmt::MakeWriter;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    #[test]
    fn every_line_inside_an_objects_span_carries_its_reference() {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .with_writer(captured.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let agent = tracing::info_span!("agent request", kind = "Agent", name = "web-1");
            let _agent = agent.enter();
            tracing::info!(count = 2, "heartbeat");
            let job = tracing::info_span!(
                "job",
                kind = "PatchJob",
                namespace = "default",
                name = "weekly-1-web-1",
                run = "1",
                agent = "web-1",
            );
            job.in_scope(|| tracing::warn!(error = "boom", "status write failed"));
        });
        let text = String::from_utf8(captured.0.lock().clone()).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["kind"], "Agent");
        assert_eq!(lines[0]["name"], "web-1");
        assert_eq!(lines[0]["message"], "heartbeat");
        assert_eq!(lines[0]["count"], 2);
        assert_eq!(lines[1]["kind"], "PatchJob", "the inner span wins");
        assert_eq!(lines[1]["namespace"], "default");
        assert_eq!(lines[1]["name"], "weekly-1-web-1");
        assert_eq!(lines[1]["run"], "1");
        assert_eq!(lines[1]["agent"], "web-1");
        assert_eq!(lines[1]["level"], "WARN");
        assert_eq!(lines[1]["span"], "job");
        assert_eq!(lines[1]["error"], "boom");
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(
            !colour(false, None),
            "redirected output gets no escape codes"
        );
        assert!(!colour(true, Some(std::ffi::OsStr::new("1"))));
        assert!(
            colour(true, Some(std::ffi::OsStr::new(""))),
            "an empty NO_COLOR is unset"
        );
    }
}
