//! One logfmt line per event on stdout, in the style of Heroku's own router and dyno manager:
//! `source=bpg-tunnel level=info event=ssh-connected addon=DATABASE ms=42`.
//!
//! Metrics lines are the exception: l2met and Heroku's own runtime metrics read `source=` as
//! the dyno a measurement comes from (`source=web.1`), and merge the figures of every line with
//! the same source. Theirs carry the dyno's name, so that each dyno's figures stay its own.
//!
//! Events are emitted with `tracing` macros whose fields become logfmt pairs, so filtering
//! (`BPG_TUNNEL_LOG` / `RUST_LOG`) works as usual. Nothing here ever receives a secret: callers
//! log names, addresses and counts, never config values.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

struct Logfmt {
    /// The `source=` of metrics lines: the dyno's name.
    metrics_source: String,
}

impl<S, N> FormatEvent<S, N> for Logfmt
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
        let mut line = String::with_capacity(160);
        line.push_str("source=");
        if meta.target() == METRICS_TARGET {
            push_value(&mut line, &self.metrics_source);
        } else {
            line.push_str("bpg-tunnel");
        }
        push_pair(
            &mut line,
            "level",
            &meta.level().as_str().to_ascii_lowercase(),
        );
        // Library events (russh, ...) are rare and mostly at debug; say where they come from.
        // Those bridged from the `log` crate carry their origin in a `log.target` field.
        if !meta.target().starts_with("bpg_tunnel") && meta.target() != "log" {
            push_pair(&mut line, "target", meta.target());
        }
        event.record(&mut PairVisitor { line: &mut line });
        writeln!(writer, "{line}")
    }
}

struct PairVisitor<'a> {
    line: &'a mut String,
}

impl Visit for PairVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "log.target" => push_pair(self.line, "target", value),
            name if name.starts_with("log.") => {}
            _ => push_pair(self.line, key(field), value),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if !field.name().starts_with("log.") {
            push_pair(self.line, key(field), &format!("{value:?}"));
        }
    }
}

fn key(field: &Field) -> &'static str {
    match field.name() {
        "message" => "msg",
        name => name,
    }
}

/// Appends ` key=value`, quoting the value when logfmt requires it.
fn push_pair(line: &mut String, key: &str, value: &str) {
    line.push(' ');
    line.push_str(key);
    line.push('=');
    push_value(line, value);
}

/// Appends `value`, quoted when logfmt requires it.
fn push_value(line: &mut String, value: &str) {
    let needs_quotes = value.is_empty()
        || value
            .chars()
            .any(|c| c == ' ' || c == '=' || c == '"' || c == '\\' || c.is_control());
    if !needs_quotes {
        line.push_str(value);
        return;
    }
    line.push('"');
    for c in value.chars() {
        match c {
            '"' => line.push_str("\\\""),
            c => push_escaped_char(line, c),
        }
    }
    line.push('"');
}

/// `value` as the logs write it inside quotes, minus the quotes: a backslash doubled, a newline
/// as `\n` and any other control character as `\u{1b}`, so that text from a server or the
/// environment can neither start a line of its own nor drive the terminal it is shown on.
pub(crate) fn escape_controls(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        push_escaped_char(&mut escaped, c);
    }
    escaped
}

fn push_escaped_char(line: &mut String, c: char) {
    match c {
        '\\' => line.push_str("\\\\"),
        '\n' => line.push_str("\\n"),
        c if c.is_control() => {
            let _ = write!(line, "\\u{{{:x}}}", c as u32);
        }
        c => line.push(c),
    }
}

/// Where the log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// The dyno's log stream.
    Stdout,
    /// For commands whose stdout is their answer (`check`).
    Stderr,
}

/// The target of metrics lines (`metrics`): `BPG_TUNNEL_LOG=warn,bpg_tunnel::metrics=info`
/// keeps them while silencing the rest.
pub(crate) const METRICS_TARGET: &str = "bpg_tunnel::metrics";

/// Installs the logfmt subscriber. `filter` uses RUST_LOG syntax; an invalid filter falls back to
/// `info` with a warning rather than silencing the daemon. `dyno` is the `source=` of metrics
/// lines.
pub fn init(filter: &str, output: Output, dyno: &str) {
    let (filter, invalid) = match EnvFilter::try_new(filter) {
        Ok(filter) => (filter, None),
        Err(error) => (EnvFilter::new("info"), Some(error.to_string())),
    };
    let subscriber = tracing_subscriber::fmt()
        .event_format(Logfmt {
            metrics_source: dyno.to_owned(),
        })
        .with_env_filter(filter);
    let _ = match output {
        Output::Stdout => subscriber.with_writer(std::io::stdout).try_init(),
        Output::Stderr => subscriber.with_writer(std::io::stderr).try_init(),
    };
    if let Some(error) = invalid {
        tracing::warn!(event = "config-error", var = "BPG_TUNNEL_LOG", error = %error, "invalid log filter; using info");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_only_when_needed() {
        let mut line = String::new();
        push_pair(&mut line, "addon", "DATABASE");
        push_pair(&mut line, "reason", "connection reset by peer");
        push_pair(&mut line, "empty", "");
        push_pair(&mut line, "q", "say \"hi\"\nbye");
        assert_eq!(
            line,
            r#" addon=DATABASE reason="connection reset by peer" empty="" q="say \"hi\"\nbye""#
        );
    }

    #[test]
    fn text_for_a_terminal_is_escaped_as_in_the_logs() {
        let hostile = "bye\x1b[2J\r\nforged \\ \u{9b}";
        assert_eq!(
            escape_controls(hostile),
            r"bye\u{1b}[2J\u{d}\nforged \\ \u{9b}"
        );
        let mut line = String::new();
        push_value(&mut line, hostile);
        assert_eq!(line, format!("\"{}\"", escape_controls(hostile)));
    }
}
