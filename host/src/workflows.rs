//! `[workflows]`: the definitions folder, checked with the configuration, and the executor the
//! host runs for the `workflows` provider, whose step calls go through the host's own call
//! pipeline (permissions, schemas, deadlines, metrics, the audit trail) as the requester.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use providers_core::{CallContext, ProviderError, async_trait};
use providers_workflows::executor::{Executor, Runner, Settings, StepCall, SystemClock};
use serde::Deserialize;
use serde_json::Value;

use crate::config::ConfigError;
use crate::config::duration;
use crate::host::Host;

/// `[workflows]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkflowSettings {
    /// The folder of definition files (`*.toml`), relative to the configuration file.
    pub definitions: Option<PathBuf>,
    /// How often the executor looks for due work when nothing woke it.
    #[serde(with = "duration")]
    pub poll: Duration,
    /// How long a claimed instance stays with this host before another may take it over;
    /// longer than `server.request_timeout`, so a step's call ends before its lease does.
    #[serde(with = "duration")]
    pub lease: Duration,
    /// Most instances claimed at once.
    pub batch: usize,
    /// Most instances this host drives at once.
    pub concurrency: usize,
    /// Definitions' durations are divided by this (demos and tests: `3600` runs an hour in a
    /// second). 1 in production.
    pub time_scale: f64,
}

impl Default for WorkflowSettings {
    fn default() -> Self {
        Self {
            definitions: None,
            poll: Duration::from_millis(200),
            lease: Duration::from_secs(60),
            batch: 32,
            concurrency: 64,
            time_scale: 1.0,
        }
    }
}

impl WorkflowSettings {
    fn executor(&self) -> Settings {
        Settings {
            lease: self.lease,
            batch: self.batch,
            concurrency: self.concurrency,
            time_scale: self.time_scale,
        }
    }
}

/// The checked definitions of a folder, with where each call step names its service.
pub(crate) struct Loaded {
    pub definitions: Vec<providers_workflows::Definition>,
    pub errors: Vec<ConfigError>,
}

/// Reads and checks every `*.toml` in `dir`: each mistake is reported with its file, line
/// and column; `services` maps configured services to their actions, for call steps.
pub(crate) fn load_definitions(dir: &Path, services: &BTreeMap<String, Vec<String>>) -> Loaded {
    let mut out = Loaded {
        definitions: Vec::new(),
        errors: Vec::new(),
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            out.errors.push(ConfigError {
                file: dir.display().to_string(),
                line: 0,
                column: 0,
                message: format!("workflows.definitions: cannot read the folder: {e}"),
            });
            return out;
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    for file in files {
        let name = file.display().to_string();
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                out.errors.push(ConfigError {
                    file: name,
                    line: 0,
                    column: 0,
                    message: format!("cannot read: {e}"),
                });
                continue;
            }
        };
        let src = crate::config::source::Source::new(&name, &text);
        match providers_workflows::definition::parse_placed(&text) {
            Err(errors) => out
                .errors
                .extend(errors.into_iter().map(|e| src.error_at(e.span, e.message))),
            Ok((definition, places)) => {
                let mut ok = true;
                for place in places {
                    if let Some(problem) = unknown_call(&place.service, &place.action, services) {
                        out.errors.push(src.error_at(
                            place.span.clone(),
                            format!("step '{}': {problem}", place.step),
                        ));
                        ok = false;
                    }
                }
                if let Some(first) = names.get(&definition.name) {
                    out.errors.push(src.error(format!(
                        "workflow '{}' is also defined in {first}",
                        definition.name
                    )));
                    ok = false;
                }
                names.insert(definition.name.clone(), name.clone());
                if ok {
                    out.definitions.push(definition);
                }
            }
        }
    }
    out
}

fn unknown_call(
    service: &str,
    action: &str,
    services: &BTreeMap<String, Vec<String>>,
) -> Option<String> {
    match services.get(service) {
        None => Some(format!(
            "calls service '{service}', which is not configured in [[providers]]"
        )),
        Some(actions) if !actions.iter().any(|a| a == action) => Some(format!(
            "service '{service}' has no action '{action}' (it has {})",
            actions.join(", ")
        )),
        Some(_) => None,
    }
}

/// Checks `[workflows]`' numbers against each other and `[server]`; problems at `span`.
pub(crate) fn check_settings(
    settings: &WorkflowSettings,
    request_timeout: Duration,
    mut at: impl FnMut(Range<usize>, String),
    span: Range<usize>,
) {
    if settings.lease <= request_timeout {
        at(
            span.clone(),
            format!(
                "workflows.lease ({}) must be longer than server.request_timeout ({}): a step's call must end before its lease does",
                humantime::format_duration(settings.lease),
                humantime::format_duration(request_timeout)
            ),
        );
    }
    if settings.poll < Duration::from_millis(10) {
        at(
            span.clone(),
            format!(
                "workflows.poll ({}) must be at least 10ms",
                humantime::format_duration(settings.poll)
            ),
        );
    }
    if !(1..=10_000).contains(&settings.batch) || !(1..=10_000).contains(&settings.concurrency) {
        at(
            span.clone(),
            "workflows.batch and workflows.concurrency: each from 1 to 10000".into(),
        );
    }
    if !(settings.time_scale.is_finite() && settings.time_scale >= 1.0) {
        at(
            span,
            format!(
                "workflows.time_scale: {} must be 1 or more (1 is real time)",
                settings.time_scale
            ),
        );
    }
}

/// The executor of a running host, and how to stop it.
pub(crate) struct Running {
    executor: Arc<Executor>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Running {
    /// Starts the executor on the builtin pool (on SQLite, refused when another process
    /// runs one on the same database).
    pub async fn start(
        pool: sqlx::AnyPool,
        settings: &WorkflowSettings,
    ) -> anyhow::Result<Executor> {
        Executor::start(pool, settings.executor(), Arc::new(SystemClock))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Drives `executor` for `host` until [`Running::stop`].
    pub fn spawn(executor: Executor, host: Weak<Host>, poll: Duration) -> Self {
        let executor = Arc::new(executor);
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let runner: Arc<dyn Runner> = Arc::new(HostRunner { host });
        let driven = executor.clone();
        // Its own task: a slow claim must not silence it (on SQLite, silence past 5 s lets
        // another process take the executor's slot).
        let beating = executor.clone();
        let mut beat_stopped = stop.subscribe();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => beating.heartbeat().await,
                    _ = beat_stopped.changed() => return,
                }
            }
        });
        let task = tokio::spawn(async move {
            tracing::info!(owner = driven.owner(), "workflow executor started");
            loop {
                if *stopped.borrow() {
                    break;
                }
                let claimed = match driven.tick(&runner).await {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!(error = %e, "workflow executor could not claim work");
                        0
                    }
                };
                if claimed == 0 {
                    tokio::select! {
                        _ = tokio::time::sleep(poll) => {}
                        _ = providers_workflows::woken() => {}
                        _ = stopped.changed() => {}
                    }
                }
            }
        });
        Self {
            executor,
            stop,
            task: tokio::sync::Mutex::new(Some(task)),
        }
    }

    /// Stops claiming, lets driven instances finish until `deadline`, then frees this host's
    /// leases so another host takes over at once.
    pub async fn stop(&self, deadline: Instant) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.lock().await.take() {
            let _ = tokio::time::timeout_at(deadline.into(), task).await;
        }
        self.executor.stop(deadline).await;
    }
}

/// Makes a step's call through the host, as the requester, and records it in the audit trail.
struct HostRunner {
    host: Weak<Host>,
}

#[async_trait]
impl Runner for HostRunner {
    async fn call(&self, call: StepCall) -> Result<Value, ProviderError> {
        let host = self
            .host
            .upgrade()
            .ok_or_else(|| ProviderError::unavailable("the host is shutting down"))?;
        let request_id = call.idempotency_key.clone();
        let ctx = CallContext::new(call.tenant.clone(), request_id.as_str())
            .with_subject(call.subject.as_str())
            .with_roles(call.roles.clone())
            .with_company_id(call.company_id.clone())
            .with_idempotency_key(Some(call.idempotency_key.as_str()));
        let audited = host
            .audit()
            .enabled()
            .then(|| crate::audit::sha256_hex(call.payload.to_string().as_bytes()));
        let started = Instant::now();
        let result = host
            .call(ctx, &call.service, &call.action, call.payload)
            .await;
        if let Some(payload_sha256) = audited {
            let code = result.as_ref().err().map(|e| e.code);
            host.audit()
                .record(crate::audit::Record {
                    tenant: call.tenant,
                    kind: "call".into(),
                    subject: call.subject,
                    service: call.service,
                    action: call.action,
                    outcome: crate::audit::outcome_of(code).into(),
                    error_code: code.map(|c| c.as_str().to_owned()).unwrap_or_default(),
                    request_id,
                    latency_us: i64::try_from(started.elapsed().as_micros()).unwrap_or(i64::MAX),
                    payload_sha256,
                    note: format!("workflow {} step {}", call.instance, call.step),
                    at_ms: 0,
                })
                .await;
        }
        result
    }
}
