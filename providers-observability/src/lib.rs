//! Observability for the ERP Provider Layer: the process's log subscriber (human-readable
//! text or JSON lines), its Prometheus metrics recorder and the OTLP export of its traces.
//!
//! Only the host calls this crate, once at start. Every other crate emits through the
//! `tracing` and `metrics` facades and never knows where the data goes.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;

mod json;
mod otlp;
mod writer;

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

/// The span targets sent to an OTLP collector: the host's request and provider-call spans.
const TRACED_TARGETS: [&str; 2] = ["provider_host::request", "provider_host::call"];

/// The target of the host's access lines; see [`access_enabled`].
const ACCESS_TARGET: &str = "provider_host::access";

/// Whether [`init`] found the access lines on (1) or off (2); 0 before it ran.
static ACCESS: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Whether the host's access lines (target `provider_host::access`, INFO) are written.
///
/// Decided once by [`init`] on a private copy of the filter: asking the installed subscriber
/// with `tracing::enabled!` would leave its per-layer filter state set without an event to
/// clear it, and the next span (the request's, a call's) would then be skipped by the trace
/// export. Without [`init`] (tests with a subscriber of their own) `tracing` is asked.
pub fn access_enabled() -> bool {
    match ACCESS.load(std::sync::atomic::Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO),
    }
}

/// Where and how traces are exported (OTLP over HTTP, protobuf).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Otlp {
    /// The collector's base URL (`http://127.0.0.1:4318`); spans go to `<endpoint>/v1/traces`.
    pub endpoint: String,
    /// `service.name` of the exported resource.
    pub service_name: String,
    /// Finished spans waiting for export; beyond it they are dropped and counted.
    pub queue: usize,
    /// How long a batch may wait before it is sent.
    pub interval: std::time::Duration,
    /// Per export request; a collector that does not answer in time loses the batch.
    pub timeout: std::time::Duration,
}

/// Keeps the log writer and the trace export alive; dropping it (or [`Telemetry::shutdown`])
/// writes the queued log lines and sends the queued spans.
#[derive(Debug, Default)]
#[must_use = "dropping the guard stops the trace export"]
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
    /// The log writer's thread; dropping it writes the lines still waiting.
    logs: Option<writer::Flusher>,
}

impl Telemetry {
    /// Exports the spans still queued (waiting at most the export timeout) and stops.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
        self.logs.take();
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.stop();
    }
}

static TRACING_ON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Installs the process's subscriber, logging to stderr and, with `otlp`, exporting the
/// request and call spans. `RUST_LOG`, when set, wins over `filter` (an `EnvFilter` directive
/// list such as `info,provider_host=debug`); the log filter does not limit what is exported.
/// Fails on a filter that does not parse or an exporter that cannot be built, naming it; a
/// second call does nothing.
pub fn init(
    format: LogFormat,
    filter: Option<&str>,
    otlp: Option<&Otlp>,
) -> Result<Telemetry, String> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::{EnvFilter, Layer as _, Registry};
    let directives = match std::env::var("RUST_LOG") {
        Ok(from_env) if !from_env.is_empty() => {
            EnvFilter::try_new(&from_env)
                .map_err(|e| format!("RUST_LOG '{from_env}' is not a valid filter: {e}"))?;
            from_env
        }
        _ => {
            let written = filter.unwrap_or(DEFAULT_FILTER);
            EnvFilter::try_new(written).map_err(|e| {
                format!("observability.log_filter '{written}' is not a valid filter: {e}")
            })?;
            written.to_owned()
        }
    };
    let filter = EnvFilter::new(&directives);
    let probe = tracing_subscriber::registry().with(EnvFilter::new(&directives));
    let access = tracing::subscriber::with_default(
        probe,
        || tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO),
    );
    type Boxed = Box<dyn tracing_subscriber::Layer<Registry> + Send + Sync>;
    // Lines are written in batches by a thread of their own (see `writer`).
    let (writer, guard) = writer::stderr();
    let logs: Boxed = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => json::JsonLines::new(writer).with_filter(filter).boxed(),
    };
    let mut layers = vec![logs];
    let mut telemetry = Telemetry {
        provider: None,
        logs: Some(guard),
    };
    if let Some(otlp) = otlp {
        let provider = otlp::provider(otlp)?;
        let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "provider-host");
        let targets = TRACED_TARGETS
            .iter()
            .fold(tracing_subscriber::filter::Targets::new(), |t, target| {
                t.with_target(*target, tracing::Level::INFO)
            });
        layers.push(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_location(false)
                .with_threads(false)
                .with_tracked_inactivity(false)
                .with_filter(targets)
                .boxed(),
        );
        telemetry.provider = Some(provider);
    }
    // Already installed (tests, a second host in one process): the first one stays.
    if tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .is_ok()
        && otlp.is_some()
    {
        TRACING_ON.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    ACCESS.store(
        if access { 1 } else { 2 },
        std::sync::atomic::Ordering::Relaxed,
    );
    Ok(telemetry)
}

/// Makes `span` (not yet entered) a child of the caller's W3C trace context, when traces are
/// exported and `traceparent` is valid; otherwise it starts a trace of its own.
pub fn adopt_remote_parent(span: &tracing::Span, traceparent: &str, tracestate: Option<&str>) {
    use opentelemetry::propagation::TextMapPropagator as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    if !TRACING_ON.load(std::sync::atomic::Ordering::Relaxed) || span.is_disabled() {
        return;
    }
    let carrier = otlp::Incoming {
        traceparent,
        tracestate,
    };
    let cx = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(cx);
}

/// The W3C `traceparent` (and `tracestate`, when there is one) naming `span` as the parent of
/// an outgoing request; `None` when traces are not exported or `span` is not traced.
pub fn trace_headers(span: &tracing::Span) -> Option<(String, Option<String>)> {
    use opentelemetry::propagation::TextMapPropagator as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    if !TRACING_ON.load(std::sync::atomic::Ordering::Relaxed) || span.is_disabled() {
        return None;
    }
    let mut carrier = otlp::Carrier::default();
    opentelemetry_sdk::propagation::TraceContextPropagator::new()
        .inject_context(&span.context(), &mut carrier);
    carrier.traceparent.map(|p| (p, carrier.tracestate))
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
            // Histogram samples wait in buckets until they are folded in; without this a host
            // nobody scrapes would keep every sample it ever took.
            let upkeep = handle.clone();
            let _ = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(std::time::Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                });
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
