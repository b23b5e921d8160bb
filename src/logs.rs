//! The log subscriber: stderr through a writer thread, pretty or JSON, filtered by `RUST_LOG`.
//!
//! Owns: colour (only on a terminal, never with `NO_COLOR`), the default filter, and one line
//! per failed request (pingora's own copy of the failure is dropped: ours carries the request
//! id). Must not touch: what is logged where (each module's own `tracing` calls).

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::IsTerminal;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

/// Without `RUST_LOG`: our info lines, only warnings and errors from pingora and sqlx.
const DEFAULT_FILTER: &str = "info,pingora=warn,sqlx=warn";

/// Installs the subscriber (and the `log` bridge pingora's lines come through). Logs go to
/// stderr through a writer thread: a proxy thread formats its line and queues it, and never
/// waits on the write (a slow pipe or terminal). Past 128,000 queued lines, new ones are
/// dropped rather than slowing requests down. The guard flushes the queue when dropped.
pub(crate) fn init(json: bool) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_FILTER));
    let ansi = colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .thread_name("tollgate-log")
        .finish(std::io::stderr());
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi);
    let subscriber = tracing_subscriber::registry()
        .with(filter)
        .with(OneLinePerFailure);
    match json {
        true => subscriber.with(lines.json()).init(),
        false => subscriber.with(lines).init(),
    }
    guard
}

/// ANSI colours only on a terminal (never in a file or a pipe), and not when `NO_COLOR` is set
/// to anything but the empty string (<https://no-color.org>).
fn colour(terminal: bool, no_color: Option<&OsStr>) -> bool {
    terminal && no_color.is_none_or(OsStr::is_empty)
}

/// Drops pingora's error line for a request it has just handed to `fail_to_proxy` ("Fail to
/// proxy: …, status: 502, …" and "Fail to filter request: …, status: …"): `fail_to_proxy`
/// logs the same failure with the request id (`upstream failed`, `client closed the
/// connection`). Every other pingora line stays: its retry warnings, listener and TLS errors,
/// a request head that could not be read.
struct OneLinePerFailure;

impl<S: Subscriber> Layer<S> for OneLinePerFailure {
    fn event_enabled(&self, event: &Event<'_>, _: Context<'_, S>) -> bool {
        // Lines from the `log` crate come with target `log` and their own in `log.target`.
        let meta = event.metadata();
        if meta.target() != "log" || *meta.level() != Level::ERROR {
            return true;
        }
        let mut line = LogLine::default();
        event.record(&mut line);
        !(line.target == "pingora_proxy" && repeats_fail_to_proxy(&line.message))
    }
}

/// pingora's error line after `fail_to_proxy` (`pingora-proxy` 0.9, `process_request` and
/// `handle_error`): the only ones of the crate root that name the answer's status.
fn repeats_fail_to_proxy(message: &str) -> bool {
    message.starts_with("Fail to ") && message.contains(", status: ")
}

#[derive(Default)]
struct LogLine {
    target: String,
    message: String,
}

impl Visit for LogLine {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "log.target" => self.target = value.to_string(),
            "message" => self.message = value.to_string(),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Colour only on a terminal, and `NO_COLOR` (set and not empty) turns it off.
    #[test]
    fn colour_needs_a_terminal_and_no_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None));
    }

    /// pingora's repeat of a failure is recognised; its other lines are not.
    #[test]
    fn only_the_repeat_of_a_failure_is_dropped() {
        assert!(repeats_fail_to_proxy(
            "Fail to proxy: Peer: addr: 127.0.0.1:9 ConnectRefused context: …, status: 502, tries: 1, retry: false, GET /signals, Host: x"
        ));
        assert!(repeats_fail_to_proxy(
            "Fail to filter request: InternalError, status: 500, GET / , Host: x"
        ));
        assert!(!repeats_fail_to_proxy(
            "Fail to proxy: ConnectRefused, tries: 1, retry: true, GET /signals"
        ));
        assert!(!repeats_fail_to_proxy(
            "Fail to proxy: Downstream ReadError, downstream session type: HTTP/1.1"
        ));
        assert!(!repeats_fail_to_proxy(
            "failed to accept: too many open files"
        ));
    }
}
