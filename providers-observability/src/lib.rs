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
    let filter = LogFilter::of(&directives);
    let probe = tracing_subscriber::registry().with(EnvFilter::new(&directives));
    let access = tracing::subscriber::with_default(
        probe,
        || tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO),
    );
    // Lines are written in batches by a thread of their own (see `writer`).
    let (writer, guard) = writer::stderr();
    let mut telemetry = Telemetry {
        provider: None,
        logs: Some(guard),
    };
    let text = format == LogFormat::Text;
    let json = (format == LogFormat::Json).then(|| json::JsonLines::new(writer.clone()));
    // Already installed (tests, a second host in one process): the first one stays.
    match otlp {
        // The log layer alone: its filter is the subscriber's. A per-layer filter would keep
        // a thread-local bitset in step on every span opened, entered, recorded and closed,
        // for nothing to choose between.
        None => {
            let _ = tracing_subscriber::registry()
                .with(filter.layer())
                .with(text.then(|| text_layer(writer)))
                .with(json)
                .try_init();
        }
        Some(otlp) => {
            type Boxed = Box<dyn tracing_subscriber::Layer<Registry> + Send + Sync>;
            let filter = filter.per_layer();
            let logs: Boxed = if text {
                text_layer(writer).with_filter(filter).boxed()
            } else {
                json.with_filter(filter).boxed()
            };
            let provider = otlp::provider(otlp)?;
            let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "provider-host");
            let targets = TRACED_TARGETS
                .iter()
                .fold(tracing_subscriber::filter::Targets::new(), |t, target| {
                    t.with_target(*target, tracing::Level::INFO)
                });
            let export: Boxed = tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_location(false)
                .with_threads(false)
                .with_tracked_inactivity(false)
                .with_filter(targets)
                .boxed();
            telemetry.provider = Some(provider);
            if tracing_subscriber::registry()
                .with(vec![logs, export])
                .try_init()
                .is_ok()
            {
                TRACING_ON.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
    ACCESS.store(
        if access { 1 } else { 2 },
        std::sync::atomic::Ordering::Relaxed,
    );
    Ok(telemetry)
}

/// The log filter of a directive list.
enum LogFilter {
    /// Only targets and levels: decided per callsite, once, and no state kept per span.
    Targets(tracing_subscriber::filter::Targets),
    /// Span and field directives (`[request{tenant=acme}]=debug`): `EnvFilter` follows every
    /// span, taking a lock each time one is entered, exited, recorded or closed.
    Env(Box<tracing_subscriber::EnvFilter>),
}

impl LogFilter {
    /// `directives` must already have parsed as an `EnvFilter`.
    fn of(directives: &str) -> Self {
        // Spaces are not trimmed by every parser: such a list is left to `EnvFilter`.
        let dynamic = directives.contains(['[', '{']) || directives.contains(char::is_whitespace);
        match directives.parse() {
            Ok(targets) if !dynamic => Self::Targets(targets),
            _ => Self::Env(Box::new(tracing_subscriber::EnvFilter::new(directives))),
        }
    }

    /// As the subscriber's own filter.
    fn layer(
        self,
    ) -> Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync> {
        use tracing_subscriber::Layer as _;
        match self {
            Self::Targets(targets) => targets.boxed(),
            Self::Env(env) => env.boxed(),
        }
    }

    /// As one layer's filter.
    fn per_layer(
        self,
    ) -> Box<dyn tracing_subscriber::layer::Filter<tracing_subscriber::Registry> + Send + Sync>
    {
        match self {
            Self::Targets(targets) => Box::new(targets),
            Self::Env(env) => env,
        }
    }
}

/// Human-readable lines (colours on a terminal).
fn text_layer<S>(writer: writer::Batched) -> impl tracing_subscriber::Layer<S> + Send + Sync
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
}

/// Whether spans are exported (an OTLP endpoint is set). Fields a span only learns as it ends
/// (a request's status, a call's outcome and duration) reach no log line, as every line inside
/// the span was written before: without an export they need not be recorded at all.
pub fn traces_exported() -> bool {
    TRACING_ON.load(std::sync::atomic::Ordering::Relaxed)
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
    fn a_targets_filter_decides_as_envfilter_would() {
        use tracing::Level;
        use tracing_subscriber::layer::SubscriberExt as _;
        let lists = [
            DEFAULT_FILTER,
            "warn",
            "off",
            "provider_host=debug",
            "info,provider_host::access=off,provider_host=trace,sqlx=error",
        ];
        let targets = [
            "provider_host",
            "provider_host::access",
            "provider_host::call",
            "sqlx::query",
            "plugin",
            "tower_http::cors",
        ];
        let levels = [
            Level::ERROR,
            Level::WARN,
            Level::INFO,
            Level::DEBUG,
            Level::TRACE,
        ];
        for list in lists {
            assert!(
                matches!(LogFilter::of(list), LogFilter::Targets(_)),
                "{list}"
            );
            let decide = |filter: LogFilter| {
                let subscriber = tracing_subscriber::registry().with(filter.layer());
                tracing::subscriber::with_default(subscriber, || {
                    targets
                        .iter()
                        .flat_map(|t| levels.iter().map(move |l| (*t, *l)))
                        .map(|(target, level)| {
                            // `enabled!` needs literal targets and levels: ask the dispatcher.
                            let meta = tracing::Metadata::new(
                                "probe",
                                target,
                                level,
                                None,
                                None,
                                None,
                                tracing::field::FieldSet::new(
                                    &[],
                                    tracing::callsite::Identifier(&PROBE),
                                ),
                                tracing::metadata::Kind::EVENT,
                            );
                            tracing::dispatcher::get_default(|d| d.enabled(&meta))
                        })
                        .collect::<Vec<_>>()
                })
            };
            let env = LogFilter::Env(Box::new(tracing_subscriber::EnvFilter::new(list)));
            assert_eq!(decide(LogFilter::of(list)), decide(env), "{list}");
        }
        for list in [
            "[request]=debug",
            "info,[call{service=kv}]=trace",
            "info, sqlx=warn",
        ] {
            assert!(matches!(LogFilter::of(list), LogFilter::Env(_)), "{list}");
        }
    }

    struct Probe;
    static PROBE: Probe = Probe;
    impl tracing::Callsite for Probe {
        fn set_interest(&self, _: tracing::subscriber::Interest) {}
        fn metadata(&self) -> &tracing::Metadata<'_> {
            unreachable!("never registered")
        }
    }

    #[test]
    fn filters_are_checked() {
        assert!(check_filter("info,provider_host=debug").is_ok());
        assert!(check_filter("info,=[").is_err());
    }
}
