//! Tenant-scoped provider instances: created lazily, connected once, evicted when idle, drained at shutdown.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use providers_core::{ConnectContext, Factory, Kind, Provider, ProviderError, Resources, Status};
use serde_json::Value;
use tokio::sync::{Notify, OnceCell, Semaphore};

use crate::config::{Limits, TenantService};
use crate::guard;
use crate::storage::{InstanceEvent, Storage};

/// How long one `disconnect` may take before the host gives up on it.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A connected instance.
pub struct Live {
    /// The provider.
    pub provider: Arc<dyn Provider>,
    /// Its version, for events.
    pub version: String,
    /// Bounds calls in flight, when the limits say so.
    pub limiter: Option<Arc<Semaphore>>,
}

/// The place of one `(tenant, service)` instance. Entering and leaving it counts calls in
/// flight; the count is raised under the map's read lock and eviction removes under its
/// write lock, so an instance is never disconnected while a call that found it still runs.
struct Slot {
    cell: OnceCell<Arc<Live>>,
    inflight: AtomicUsize,
    drained: Notify,
    last_used_ms: AtomicU64,
    /// Why the last connect failed, until one succeeds; readiness reports it.
    last_error: Mutex<Option<String>>,
    /// Failed connects so far. A caller that queued behind an attempt which then failed
    /// takes that failure instead of trying again itself: one attempt per burst, not one per caller.
    failures: AtomicU64,
}

/// A call's hold on an instance; dropping it ends the call.
pub struct Lease {
    slot: Arc<Slot>,
    epoch: Instant,
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Used until the call ends, not only when it starts: a long call is not "idle".
        let now = self.epoch.elapsed().as_millis() as u64;
        self.slot.last_used_ms.fetch_max(now, Ordering::Relaxed);
        if self.slot.inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.slot.drained.notify_waiters();
        }
    }
}

type Map = HashMap<String, HashMap<String, Arc<Slot>>>;

/// Every instance of every tenant.
pub struct Instances {
    slots: RwLock<Map>,
    /// Set under the write lock at shutdown; no slot is entered after it.
    closing: AtomicBool,
    resources: Resources,
    storage: Storage,
    epoch: Instant,
    connect_timeout: Duration,
}

/// What connecting one instance needs, owned so that the connect can outlive its first caller.
struct ConnectPlan {
    tenant: String,
    service: String,
    factory: Arc<dyn Factory>,
    config: Value,
    limits: Limits,
}

impl Instances {
    /// No instances yet; `resources` go to builtin providers at connect.
    pub fn new(storage: Storage, resources: Resources, connect_timeout: Duration) -> Self {
        Self {
            slots: RwLock::new(HashMap::new()),
            closing: AtomicBool::new(false),
            resources,
            storage,
            epoch: Instant::now(),
            connect_timeout,
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn enter(&self, tenant: &str, service: &str) -> Result<(Lease, Arc<Slot>), ProviderError> {
        let now = self.now_ms();
        let take = |slot: &Arc<Slot>| {
            slot.inflight.fetch_add(1, Ordering::AcqRel);
            slot.last_used_ms.store(now, Ordering::Relaxed);
            (
                Lease {
                    slot: slot.clone(),
                    epoch: self.epoch,
                },
                slot.clone(),
            )
        };
        let shutting_down = || ProviderError::unavailable("the host is shutting down");
        {
            let map = self.slots.read().unwrap_or_else(|p| p.into_inner());
            if self.closing.load(Ordering::Acquire) {
                return Err(shutting_down());
            }
            if let Some(slot) = map.get(tenant).and_then(|s| s.get(service)) {
                return Ok(take(slot));
            }
        }
        let mut map = self.slots.write().unwrap_or_else(|p| p.into_inner());
        if self.closing.load(Ordering::Acquire) {
            return Err(shutting_down());
        }
        let slot = map
            .entry(tenant.to_owned())
            .or_default()
            .entry(service.to_owned())
            .or_insert_with(|| {
                Arc::new(Slot {
                    cell: OnceCell::new(),
                    inflight: AtomicUsize::new(0),
                    drained: Notify::new(),
                    last_used_ms: AtomicU64::new(now),
                    last_error: Mutex::new(None),
                    failures: AtomicU64::new(0),
                })
            });
        Ok(take(slot))
    }

    /// The connected instance for `tenant`'s `service`, connecting it on first use.
    ///
    /// Concurrent first calls share one `connect`, which runs on a task of its own under the
    /// connect timeout: a caller that gives up (deadline, client gone) does not cancel it
    /// halfway. A failed connect is retried by the next call.
    pub async fn acquire(
        self: &Arc<Self>,
        tenant: &str,
        service: &str,
        plan: &TenantService,
    ) -> Result<(Lease, Arc<Live>), ProviderError> {
        let (lease, slot) = self.enter(tenant, service)?;
        if let Some(live) = slot.cell.get() {
            return Ok((lease, live.clone()));
        }
        let (connecting, _) = self.enter(tenant, service)?;
        let me = self.clone();
        let owned = ConnectPlan {
            tenant: tenant.to_owned(),
            service: service.to_owned(),
            factory: plan.plan.factory.clone(),
            config: plan.config.clone(),
            limits: plan.limits,
        };
        let failures_seen = slot.failures.load(Ordering::Acquire);
        let task = tokio::spawn(async move {
            // The task holds its own lease, so eviction cannot drop the slot under it.
            let _connecting = connecting;
            let slot = slot;
            slot.cell
                .get_or_try_init(|| async {
                    if slot.failures.load(Ordering::Acquire) != failures_seen {
                        let error = slot
                            .last_error
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .clone();
                        return Err(ProviderError::unavailable(format!(
                            "service '{}' is unavailable: {}",
                            owned.service,
                            error.unwrap_or_default()
                        )));
                    }
                    me.connect(&slot, owned).await
                })
                .await
                .cloned()
        });
        let live = task.await.map_err(|e| {
            ProviderError::internal(format!("connecting '{service}' failed: {e}"))
        })??;
        Ok((lease, live))
    }

    async fn connect(&self, slot: &Slot, plan: ConnectPlan) -> Result<Arc<Live>, ProviderError> {
        let ConnectPlan {
            tenant,
            service,
            factory,
            config,
            limits,
        } = plan;
        let version = factory.descriptor().version.to_string();
        let resources = if factory.kind() == Kind::Builtin {
            self.resources.clone()
        } else {
            Resources::default()
        };
        let ctx = ConnectContext::new(tenant.clone(), config)
            .with_service(service.clone())
            .with_resources(resources);
        let what = || format!("provider '{service}' connect for tenant '{tenant}'");
        let created = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| factory.create()))
            .unwrap_or_else(|_| {
                Err(ProviderError::provider(format!(
                    "{} failed: the factory panicked",
                    what()
                )))
            });
        let outcome = match created {
            Ok(mut provider) => {
                guard::run(what, Instant::now() + self.connect_timeout, async move {
                    let result = provider.connect(&ctx).await;
                    result.map(|()| provider)
                })
                .await
            }
            Err(e) => Err(e),
        };
        // Shutdown began while this connect ran: release it at once rather than leak it.
        let outcome = match outcome {
            Ok(provider) if self.closing.load(Ordering::Acquire) => {
                let _ = provider.disconnect().await;
                Err(ProviderError::unavailable("the host is shutting down"))
            }
            other => other,
        };
        *slot.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
            outcome.as_ref().err().map(|e| e.detail.clone());
        if outcome.is_err() {
            slot.failures.fetch_add(1, Ordering::AcqRel);
        }
        match outcome {
            Ok(provider) => {
                self.note(&tenant, &service, &version, InstanceEvent::Connected, "")
                    .await;
                tracing::info!(tenant, service, version, "instance connected");
                Ok(Arc::new(Live {
                    provider: Arc::from(provider),
                    version,
                    limiter: limits
                        .max_concurrency
                        .map(|n| Arc::new(Semaphore::new(n as usize))),
                }))
            }
            Err(e) => {
                self.note(
                    &tenant,
                    &service,
                    &version,
                    InstanceEvent::ConnectFailed,
                    &e.detail,
                )
                .await;
                tracing::warn!(tenant, service, error = %e, "instance failed to connect");
                Err(ProviderError::unavailable(format!(
                    "service '{service}' is unavailable: {}",
                    e.detail
                )))
            }
        }
    }

    async fn note(
        &self,
        tenant: &str,
        service: &str,
        version: &str,
        event: InstanceEvent,
        detail: &str,
    ) {
        if let Err(e) = self
            .storage
            .record(tenant, service, version, event, detail)
            .await
        {
            tracing::warn!(tenant, service, error = %e, "could not record instance event");
        }
    }

    /// The status of `tenant`'s `service`: the provider's own when connected, `failed` when
    /// its last connect failed, `None` when it has not been tried.
    pub async fn status(&self, tenant: &str, service: &str) -> Option<Status> {
        let slot = {
            let map = self.slots.read().unwrap_or_else(|p| p.into_inner());
            map.get(tenant)?.get(service)?.clone()
        };
        let Some(live) = slot.cell.get() else {
            let error = slot
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            return error.map(|e| Status::failed(format!("connect failed: {e}")));
        };
        let provider = live.provider.clone();
        let probe = guard::run(
            || format!("provider '{service}' get_status for tenant '{tenant}'"),
            Instant::now() + Duration::from_secs(2),
            async move { Ok(provider.get_status().await) },
        );
        Some(probe.await.unwrap_or_else(|e| Status::failed(e.detail)))
    }

    /// Disconnects and drops every instance unused for `idle`. Returns how many went.
    pub async fn evict_idle(&self, idle: Duration) -> usize {
        // A host younger than `idle` has nothing idle that long.
        let Some(cutoff) = self.now_ms().checked_sub(idle.as_millis() as u64) else {
            return 0;
        };
        let mut gone = Vec::new();
        {
            let mut map = self.slots.write().unwrap_or_else(|p| p.into_inner());
            for (tenant, services) in map.iter_mut() {
                services.retain(|service, slot| {
                    // A slot whose connect failed stays: readiness keeps reporting it.
                    let failed = slot
                        .last_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .is_some();
                    let idle = !failed
                        && slot.inflight.load(Ordering::Acquire) == 0
                        && slot.last_used_ms.load(Ordering::Relaxed) <= cutoff;
                    if idle {
                        gone.push((tenant.clone(), service.clone(), slot.clone()));
                    }
                    !idle
                });
            }
            map.retain(|_, services| !services.is_empty());
        }
        let count = gone
            .iter()
            .filter(|(_, _, s)| s.cell.get().is_some())
            .count();
        for (tenant, service, slot) in gone {
            if let Some(live) = slot.cell.get() {
                self.disconnect(&tenant, &service, live, "idle").await;
            }
        }
        count
    }

    /// Refuses new calls, waits until `deadline` for in-flight ones, and disconnects every
    /// instance, all instances at once (each disconnect is bounded on its own).
    pub async fn shutdown(&self, deadline: Instant) {
        let all: Map = {
            let mut map = self.slots.write().unwrap_or_else(|p| p.into_inner());
            self.closing.store(true, Ordering::Release);
            std::mem::take(&mut *map)
        };
        let drains = all.into_iter().flat_map(|(tenant, services)| {
            services.into_iter().map(move |(service, slot)| {
                let tenant = tenant.clone();
                async move {
                    loop {
                        let notified = slot.drained.notified();
                        if slot.inflight.load(Ordering::Acquire) == 0 {
                            break;
                        }
                        if tokio::time::timeout_at(deadline.into(), notified)
                            .await
                            .is_err()
                        {
                            tracing::warn!(
                                tenant,
                                service,
                                "calls still in flight after the shutdown grace"
                            );
                            break;
                        }
                    }
                    if let Some(live) = slot.cell.get() {
                        self.disconnect(&tenant, &service, live, "shutdown").await;
                    }
                }
            })
        });
        futures_util::future::join_all(drains).await;
    }

    async fn disconnect(&self, tenant: &str, service: &str, live: &Arc<Live>, why: &str) {
        let provider = live.provider.clone();
        let what = || format!("provider '{service}' disconnect for tenant '{tenant}'");
        let detail = match guard::run(what, Instant::now() + DISCONNECT_TIMEOUT, async move {
            provider.disconnect().await
        })
        .await
        {
            Ok(()) => why.to_owned(),
            Err(e) => format!("{why}: {}", e.detail),
        };
        tracing::info!(tenant, service, reason = why, "instance disconnected");
        self.note(
            tenant,
            service,
            &live.version,
            InstanceEvent::Disconnected,
            &detail,
        )
        .await;
    }

    /// How many instances are connected.
    pub fn connected(&self) -> usize {
        let map = self.slots.read().unwrap_or_else(|p| p.into_inner());
        map.values()
            .flat_map(|s| s.values())
            .filter(|s| s.cell.get().is_some())
            .count()
    }
}
