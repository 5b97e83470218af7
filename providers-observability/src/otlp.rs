//! The OTLP/HTTP trace export behind a bounded queue of our own.
//!
//! The SDK's batch processor keeps the count of what it drops to itself; here a full queue
//! or a failed export is counted in `otlp_spans_dropped_total{reason}`, and the thread that
//! ends a span never waits: it hands the span over or drops it.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter as _};

use crate::Otlp;

/// Spans sent in one export request at most.
const BATCH: usize = 512;

/// The tracer provider exporting through a [`Queue`] to `otlp.endpoint`.
pub(crate) fn provider(otlp: &Otlp) -> Result<SdkTracerProvider, String> {
    let url = format!("{}/v1/traces", otlp.endpoint.trim_end_matches('/'));
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(&url)
        .with_timeout(otlp.timeout)
        .build()
        .map_err(|e| format!("observability.otlp_endpoint '{}': {e}", otlp.endpoint))?;
    let resource = opentelemetry_sdk::Resource::builder_empty()
        .with_service_name(otlp.service_name.clone())
        .build();
    exporter.set_resource(&resource);
    let (tx, rx) = mpsc::sync_channel(otlp.queue.max(1));
    let interval = otlp.interval;
    std::thread::Builder::new()
        .name("otlp-export".into())
        .spawn(move || export_loop(&rx, &exporter, interval))
        .map_err(|e| format!("cannot start the trace export thread: {e}"))?;
    Ok(SdkTracerProvider::builder()
        .with_resource(resource)
        .with_span_processor(Queue {
            tx,
            timeout: otlp.timeout,
        })
        .build())
}

enum Message {
    Span(Box<SpanData>),
    /// Export what is queued, then answer.
    Flush(mpsc::Sender<()>),
}

#[derive(Debug)]
struct Queue {
    tx: SyncSender<Message>,
    timeout: Duration,
}

impl opentelemetry_sdk::trace::SpanProcessor for Queue {
    fn on_start(&self, _: &mut opentelemetry_sdk::trace::Span, _: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.tx.try_send(Message::Span(Box::new(span)))
        {
            metrics::counter!("otlp_spans_dropped_total", "reason" => "queue_full").increment(1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        let (done, wait) = mpsc::channel();
        self.tx
            .send(Message::Flush(done))
            .map_err(|_| OTelSdkError::AlreadyShutdown)?;
        // The export is bounded by its own timeout; allow it that long, plus slack.
        wait.recv_timeout(self.timeout + Duration::from_secs(1))
            .map_err(|_| OTelSdkError::Timeout(self.timeout))
    }

    fn shutdown_with_timeout(&self, _: Duration) -> OTelSdkResult {
        self.force_flush()
    }
}

fn export_loop(
    rx: &Receiver<Message>,
    exporter: &opentelemetry_otlp::SpanExporter,
    every: Duration,
) {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        tracing::error!("the trace export cannot start a runtime; spans are dropped");
        return;
    };
    let mut batch = Vec::with_capacity(BATCH);
    let mut failing = false;
    let mut send = |batch: &mut Vec<SpanData>| {
        if batch.is_empty() {
            return;
        }
        let spans = batch.len() as u64;
        match runtime.block_on(exporter.export(std::mem::take(batch))) {
            Ok(()) => {
                metrics::counter!("otlp_spans_exported_total").increment(spans);
                if std::mem::replace(&mut failing, false) {
                    tracing::info!("the trace collector accepts spans again");
                }
            }
            Err(e) => {
                metrics::counter!("otlp_spans_dropped_total", "reason" => "export_failed")
                    .increment(spans);
                // Once per outage, not once per batch.
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(error = %e, "the trace collector refuses spans; they are dropped and counted in otlp_spans_dropped_total");
                }
            }
        }
        batch.reserve(BATCH);
    };
    let mut due = Instant::now() + every;
    loop {
        match rx.recv_timeout(due.saturating_duration_since(Instant::now())) {
            Ok(Message::Span(span)) => {
                batch.push(*span);
                if batch.len() >= BATCH {
                    send(&mut batch);
                }
            }
            Ok(Message::Flush(done)) => {
                send(&mut batch);
                let _ = done.send(());
            }
            Err(RecvTimeoutError::Timeout) => {
                send(&mut batch);
                due = Instant::now() + every;
            }
            Err(RecvTimeoutError::Disconnected) => {
                send(&mut batch);
                return;
            }
        }
    }
}

/// The two W3C trace-context headers of a request, borrowed from it.
pub(crate) struct Incoming<'a> {
    pub(crate) traceparent: &'a str,
    pub(crate) tracestate: Option<&'a str>,
}

impl opentelemetry::propagation::Extractor for Incoming<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => Some(self.traceparent),
            "tracestate" => self.tracestate,
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

/// The two W3C trace-context headers for an outgoing request.
#[derive(Default)]
pub(crate) struct Carrier {
    pub(crate) traceparent: Option<String>,
    pub(crate) tracestate: Option<String>,
}

impl opentelemetry::propagation::Injector for Carrier {
    fn set(&mut self, key: &str, value: String) {
        match key {
            "traceparent" => self.traceparent = Some(value),
            "tracestate" if !value.is_empty() => self.tracestate = Some(value),
            _ => {}
        }
    }
}
