//! Observability for the ERP Provider Layer: the process's log subscriber (human-readable
//! text or JSON lines) and its Prometheus metrics recorder.
//!
//! Only the host calls this crate, once at start. Every other crate emits through the
//! `tracing` and `metrics` facades and never knows where the data goes.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One human-readable line per event (colours on a terminal).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message`, the event's own
    /// fields, `span` with the fields of the span it happened in and `spans` with those of
    /// every span around it, outermost first (the request, then each provider call).
    Json,
}

/// The filter used when neither the configuration nor `RUST_LOG` gives one.
pub const DEFAULT_FILTER: &str = "info,tower_http=warn,sqlx=warn";

/// Installs the process's log subscriber, writing to stderr. `RUST_LOG`, when set, wins over
/// `filter` (an `EnvFilter` directive list such as `info,provider_host=debug`). Fails on a
/// filter that does not parse, naming it; a second call does nothing.
pub fn init_logging(format: LogFormat, filter: Option<&str>) -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(from_env) if !from_env.is_empty() => EnvFilter::try_new(&from_env)
            .map_err(|e| format!("RUST_LOG '{from_env}' is not a valid filter: {e}"))?,
        _ => {
            let written = filter.unwrap_or(DEFAULT_FILTER);
            EnvFilter::try_new(written).map_err(|e| {
                format!("observability.log_filter '{written}' is not a valid filter: {e}")
            })?
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let done = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
    };
    // Already installed (tests, a second host in one process): the first one stays.
    let _ = done;
    Ok(())
}

/// Checks a filter directive list without installing anything.
pub fn check_filter(filter: &str) -> Result<(), String> {
    tracing_subscriber::EnvFilter::try_new(filter)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Latency buckets (seconds) of every histogram: 50 µs to 10 s.
const BUCKETS: [f64; 14] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5, 10.0,
];

static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process's Prometheus recorder, installed on first use as the global `metrics`
/// recorder; `None` when another recorder was installed first.
pub fn metrics() -> Option<&'static PrometheusHandle> {
    RECORDER
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&BUCKETS)
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            Some(handle)
        })
        .as_ref()
}

/// Everything recorded so far in the Prometheus text format (0.0.4); empty without a recorder.
pub fn render() -> String {
    metrics().map(PrometheusHandle::render).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_render_in_the_prometheus_text_format() {
        assert!(metrics().is_some());
        metrics::counter!("observability_selftest_total", "kind" => "a").increment(3);
        let text = render();
        assert!(
            text.contains("observability_selftest_total{kind=\"a\"} 3"),
            "{text}"
        );
    }

    #[test]
    fn filters_are_checked() {
        assert!(check_filter("info,provider_host=debug").is_ok());
        assert!(check_filter("info,=[").is_err());
    }
}
