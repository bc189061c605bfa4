//! Logging through `tracing`: filter from `PROXY_LOG` (default `info`), plain or JSON lines
//! on stderr.
//!
//! Per-connection work runs in a `connection` span (listener, peer), so that a warning about
//! a connection says whose it is. Access-log lines (target [`ACCESS_TARGET`]) carry those
//! facts as their own fields and are emitted as root events, outside any span: their format
//! is an interface (operators and tests parse it) and must not change with the spans around.

use std::io::IsTerminal;

use tracing::{Metadata, Subscriber};
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer, fmt};

/// The target of access-log lines.
pub(crate) const ACCESS_TARGET: &str = "proxy::access";

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber. Call once, first thing in `main`.
pub(crate) fn init(format: LogFormat) {
    // Colour only for a person at a terminal, never into files or the journal.
    let ansi = std::io::stderr().is_terminal();
    subscriber(format, std::io::stderr, ansi).init();
}

/// The subscriber `init` installs, writing to `writer`.
fn subscriber<W>(format: LogFormat, writer: W, ansi: bool) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'a> MakeWriter<'a> + Clone + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_env("PROXY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        // Access lines are root events: the plain format shows no span for them.
        LogFormat::Plain => {
            Box::new(registry.with(fmt::layer().with_writer(writer).with_ansi(ansi)))
        }
        // JSON would list the surrounding spans even for root events: access lines go
        // through a layer that shows none, everything else through one that lists them.
        LogFormat::Json => {
            let is_access = |meta: &Metadata<'_>| meta.target() == ACCESS_TARGET;
            Box::new(
                registry
                    .with(json_layer(writer.clone(), false).with_filter(filter_fn(is_access)))
                    .with(
                        json_layer(writer, true)
                            .with_filter(filter_fn(move |meta| !is_access(meta))),
                    ),
            )
        }
    }
}

fn json_layer<S, W>(writer: W, with_spans: bool) -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(with_spans)
        .with_writer(writer)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Log output kept in memory.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    /// Logs, inside a connection span, an access line and a warning; returns the two lines.
    fn log_in_a_connection(format: LogFormat) -> (String, String) {
        let captured = Captured::default();
        tracing::subscriber::with_default(subscriber(format, captured.clone(), false), || {
            let span =
                tracing::info_span!("connection", listener = "https", peer = "192.0.2.1:5000");
            let _entered = span.enter();
            tracing::info!(target: ACCESS_TARGET, parent: None, listener = "https", status = 200u16, "request");
            tracing::warn!("upstream request failed");
        });
        let text = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("utf-8");
        let mut lines = text.lines().map(str::to_owned);
        let access = lines.next().expect("an access line");
        let warning = lines.next().expect("a warning");
        (access, warning)
    }

    #[test]
    fn plain_access_lines_show_no_span_and_other_lines_do() {
        let (access, warning) = log_in_a_connection(LogFormat::Plain);
        assert!(
            access.contains(" INFO proxy::access: request listener=\"https\" status=200"),
            "{access}"
        );
        assert!(!access.contains("connection{"), "{access}");
        assert!(
            warning.contains("connection{listener=\"https\" peer=\"192.0.2.1:5000\"}"),
            "{warning}"
        );
    }

    #[test]
    fn json_access_lines_keep_their_keys_and_other_lines_list_spans() {
        let (access, warning) = log_in_a_connection(LogFormat::Json);
        let access: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&access).expect("a JSON object");
        let mut keys: Vec<&str> = access.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "level",
                "listener",
                "message",
                "status",
                "target",
                "timestamp"
            ]
        );
        let warning: serde_json::Value = serde_json::from_str(&warning).expect("a JSON object");
        assert_eq!(warning["spans"][0]["peer"], "192.0.2.1:5000", "{warning}");
    }
}
