//! What the host records through the `metrics` facade, and `[observability]`.
//!
//! Labels come only from resolved names: a configured service, a declared action, a
//! tenant on the `metrics_tenants` list (every other tenant is `other`), so nothing a
//! client sends can add a series.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

use providers_core::ErrorCode;
use providers_observability::LogFormat;
use serde::Deserialize;

use crate::config::{Config, ServicePlan};
use crate::host::Generation;

/// Who may read `GET /metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricsAccess {
    /// A platform operator's token.
    #[default]
    Operator,
    /// Anyone who reaches the listener; only accepted on a loopback listener.
    Open,
    /// No `/metrics` (404).
    Off,
}

/// `[observability]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObservabilitySettings {
    /// `text` or `json` (one object per line).
    pub log_format: LogFormat,
    /// Level filters per target, e.g. `info,provider_host=debug`; `RUST_LOG` wins when set.
    pub log_filter: Option<String>,
    /// Who may read `/metrics`.
    pub metrics: MetricsAccess,
    /// Tenants that get a `tenant` label of their own; every other tenant is `other`.
    pub metrics_tenants: Vec<String>,
    /// An OpenTelemetry collector's OTLP/HTTP base URL (`http://127.0.0.1:4318`); traces are
    /// exported, and W3C `traceparent` honoured, only when it is set.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported traces.
    pub otlp_service_name: String,
    /// Finished spans waiting for export; beyond it they are dropped (and counted).
    pub otlp_queue: usize,
    /// How long finished spans wait to be sent together.
    #[serde(with = "crate::config::duration")]
    pub otlp_interval: Duration,
    /// Per export request.
    #[serde(with = "crate::config::duration")]
    pub otlp_timeout: Duration,
}

impl Default for ObservabilitySettings {
    fn default() -> Self {
        Self {
            log_format: LogFormat::default(),
            log_filter: None,
            metrics: MetricsAccess::default(),
            metrics_tenants: Vec::new(),
            otlp_endpoint: None,
            otlp_service_name: "provider-host".into(),
            otlp_queue: 2048,
            otlp_interval: Duration::from_secs(1),
            otlp_timeout: Duration::from_secs(5),
        }
    }
}

impl ObservabilitySettings {
    /// The trace export these settings ask for, if any.
    pub fn otlp(&self) -> Option<providers_observability::Otlp> {
        self.otlp_endpoint
            .as_ref()
            .map(|endpoint| providers_observability::Otlp {
                endpoint: endpoint.clone(),
                service_name: self.otlp_service_name.clone(),
                queue: self.otlp_queue,
                interval: self.otlp_interval,
                timeout: self.otlp_timeout,
            })
    }
}

/// The `[observability]` table of a configuration's text, before the rest is checked (the
/// log subscriber is installed first, so that loading is logged as configured). A table
/// that does not parse gives the defaults here and its error from the full check.
pub fn settings_of(text: &str) -> ObservabilitySettings {
    toml::from_str::<toml::Table>(text)
        .ok()
        .and_then(|t| t.get("observability").cloned())
        .and_then(|v| v.try_into().ok())
        .unwrap_or_default()
}

impl Config {
    /// `tenant` as a metrics label: its name when listed in `metrics_tenants`, else `other`.
    pub fn metrics_tenant(&self, tenant: &str) -> &str {
        self.metrics_tenant_index(tenant)
            .map_or("other", |i| &self.observability.metrics_tenants[i])
    }

    /// Which of `metrics_tenants` `tenant` is; `None` for `other`.
    pub(crate) fn metrics_tenant_index(&self, tenant: &str) -> Option<usize> {
        self.observability
            .metrics_tenants
            .iter()
            .position(|t| t == tenant)
    }
}

/// The handles of one service's call metrics, each registered with the recorder on its first
/// use and kept: a call then records without building a label set or looking it up in the
/// recorder's registry (that was most of the cost of a call's metrics).
#[derive(Default)]
pub struct CallMetrics {
    /// By (action index, tenant label index, outcome code index).
    counters: RwLock<HashMap<(usize, usize, usize), metrics::Counter>>,
    /// By action index.
    latencies: RwLock<HashMap<usize, metrics::Histogram>>,
    /// The provider's version as its call spans show it, written once.
    version: std::sync::OnceLock<Box<str>>,
}

impl CallMetrics {
    /// The version of the service's provider, `descriptor`, as text.
    pub(crate) fn version(&self, descriptor: &providers_core::Descriptor) -> &str {
        self.version
            .get_or_init(|| descriptor.version.to_string().into())
    }
}

/// Counts one provider call (nested ones too) and its latency. `plan` is the configured
/// service and `action` the index and name of its declared action, when they are (anything
/// else is `-`); `tenant_index` its tenant's place in `metrics_tenants` (`None`: `other`).
pub(crate) fn call(
    config: &Config,
    plan: Option<&ServicePlan>,
    action: Option<(usize, &str)>,
    tenant_index: Option<usize>,
    code: Option<ErrorCode>,
    took: Duration,
) {
    let tenant = tenant_index.map_or("other", |i| &config.observability.metrics_tenants[i]);
    let (Some(plan), Some((action_index, action))) = (plan, action) else {
        let service = plan.map_or("-", |p| p.service.as_str());
        counter(service, "-", tenant, code).increment(1);
        latency(service, "-").record(took.as_secs_f64());
        return;
    };
    let key = (
        action_index,
        tenant_index.unwrap_or(usize::MAX),
        code.and_then(|c| ErrorCode::ALL.iter().position(|k| *k == c))
            .unwrap_or(usize::MAX),
    );
    let calls = &plan.calls;
    cached(&calls.counters, key, || {
        counter(&plan.service, action, tenant, code)
    })
    .increment(1);
    cached(&calls.latencies, action_index, || {
        latency(&plan.service, action)
    })
    .record(took.as_secs_f64());
}

/// The handle under `key`, registered with `make` the first time.
fn cached<K: std::hash::Hash + Eq, V: Clone>(
    handles: &RwLock<HashMap<K, V>>,
    key: K,
    make: impl FnOnce() -> V,
) -> V {
    if let Some(handle) = handles.read().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return handle.clone();
    }
    let handle = make();
    handles
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .entry(key)
        .or_insert(handle)
        .clone()
}

fn counter(service: &str, action: &str, tenant: &str, code: Option<ErrorCode>) -> metrics::Counter {
    metrics::counter!(
        "provider_calls_total",
        "tenant" => tenant.to_owned(),
        "service" => service.to_owned(),
        "action" => action.to_owned(),
        "outcome" => crate::audit::outcome_of(code),
        "code" => code.map_or("none", |c| c.as_str()),
    )
}

fn latency(service: &str, action: &str) -> metrics::Histogram {
    metrics::histogram!(
        "provider_call_duration_seconds",
        "service" => service.to_owned(),
        "action" => action.to_owned(),
    )
}

/// Counts a request refused for its tenant's or client's rate limit.
pub fn rate_limited(config: &Config, tenant: &str) {
    metrics::counter!("rate_limit_rejections_total", "tenant" => config.metrics_tenant(tenant).to_owned())
        .increment(1);
}

/// Counts an instance event (`connected`, `connect_failed`, `disconnected`) of a configured service.
pub fn instance_event(service: &str, event: &'static str) {
    metrics::counter!("provider_instance_events_total", "service" => service.to_owned(), "event" => event)
        .increment(1);
}

/// Sets the gauges read at scrape time: live instances by kind and state, calls in flight
/// per service.
pub fn refresh_gauges(host: &crate::Host, generation: &Generation) {
    use std::collections::BTreeMap;
    let mut instances: BTreeMap<(&'static str, &'static str), f64> = BTreeMap::new();
    let mut inflight: BTreeMap<String, f64> = BTreeMap::new();
    for plan in generation.config.services.values() {
        for state in ["connected", "connecting", "failed"] {
            instances.insert((kind_name(plan.factory.kind()), state), 0.0);
        }
    }
    for info in host.instances().snapshot() {
        let Some(plan) = generation.config.services.get(&info.service) else {
            continue;
        };
        *instances
            .entry((kind_name(plan.factory.kind()), info.state))
            .or_default() += 1.0;
        *inflight.entry(info.service.clone()).or_default() += info.inflight as f64;
    }
    for ((kind, state), n) in instances {
        metrics::gauge!("provider_instances", "kind" => kind, "state" => state).set(n);
    }
    for service in generation.config.services.keys() {
        let n = inflight.get(service).copied().unwrap_or(0.0);
        metrics::gauge!("provider_calls_in_flight", "service" => service.clone()).set(n);
    }
    let (threads, busy, overdue) = generation.config.native_pool.figures();
    metrics::gauge!("native_pool_threads").set(threads as f64);
    metrics::gauge!("native_pool_busy").set(busy as f64);
    metrics::gauge!("native_pool_overdue").set(overdue as f64);
}

pub(crate) fn kind_name(kind: providers_core::Kind) -> &'static str {
    match kind {
        providers_core::Kind::Builtin => "builtin",
        providers_core::Kind::Native => "native",
        providers_core::Kind::Wasm => "wasm",
        _ => "other",
    }
}
