//! Tenant-scoped provider instances: created lazily, connected once, backed off after a
//! failed connect, evicted when idle, replaced when their plan changes (the new instance
//! connected first, the old one retired once its calls finish), drained at shutdown.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use providers_core::{
    ConnectContext, Factory, Kind, Provider, ProviderError, Resources, SandboxLimits, Status,
};
use serde_json::Value;
use tokio::sync::{Notify, OnceCell, Semaphore};

use crate::config::{Limits, TenantService};
use crate::guard::{self, Cancel};
use crate::plugins::capabilities::{HostHttp, PluginStore};
use crate::storage::{InstanceEvent, Storage};

/// How long one `disconnect` may take before the host gives up on it.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// After shutdown cancels the calls that outlived the grace, how long it waits for them to
/// unwind before leaving their instances connected rather than disconnecting under them.
const CANCEL_WAIT: Duration = Duration::from_secs(5);
/// Disconnects running at once during eviction and shutdown: enough to drain thousands of
/// instances in seconds without starving live traffic of the storage pool.
const DISCONNECTS_AT_ONCE: usize = 32;

/// A connected instance.
pub struct Live {
    /// The provider.
    pub provider: Arc<dyn Provider>,
    /// Its version, for events.
    pub version: String,
    /// Bounds calls in flight, when the limits say so.
    pub limiter: Option<Arc<Semaphore>>,
    /// When it connected, milliseconds since the epoch.
    pub connected_ms: i64,
    /// Calls it answered.
    pub calls: AtomicU64,
    /// Calls it answered with an error.
    pub errors: AtomicU64,
    /// Its last error: when, code and detail.
    pub last_error: Mutex<Option<(i64, &'static str, String)>>,
}

impl Live {
    /// Counts one call's result.
    pub fn count<T>(&self, result: &Result<T, ProviderError>) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = result {
            self.errors.fetch_add(1, Ordering::Relaxed);
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((crate::audit::now_ms(), e.code.as_str(), e.detail.clone()));
        }
    }
}

/// How instances connect, retry and are given up on.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Deadline of one `connect`.
    pub connect_timeout: Duration,
    /// Wait before retrying after the first failed connect; doubles with each failure.
    pub backoff: Duration,
    /// The longest wait between attempts.
    pub backoff_max: Duration,
    /// Largest response body of a plugin's outbound HTTP request.
    pub http_max_body: u64,
}

/// Why the last connect failed and when the next may be tried.
#[derive(Clone)]
struct Failure {
    detail: String,
    /// Failed attempts in a row.
    count: u32,
    retry_at: Instant,
}

/// The place of one `(tenant, service)` instance. Entering and leaving it counts calls in
/// flight; the count is raised under the map's read lock and eviction removes under its
/// write lock, so an instance is never disconnected while a call that found it still runs.
struct Slot {
    /// The revision of the plan it was made for.
    revision: u64,
    /// That plan: the slot connects with it and nothing else, whoever's call comes first.
    plan: ConnectPlan,
    cell: OnceCell<Arc<Live>>,
    inflight: AtomicUsize,
    drained: Notify,
    last_used_ms: AtomicU64,
    /// The last connect's failure, until one succeeds.
    failure: Mutex<Option<Failure>>,
    /// Failed connects so far. A caller that queued behind an attempt which then failed
    /// takes that failure instead of trying again itself: one attempt per burst, not one per caller.
    attempts_failed: AtomicU64,
    /// Set by whoever disconnects its instance (eviction, retirement, shutdown), so only one does.
    released: AtomicBool,
}

impl Slot {
    fn new(revision: u64, plan: ConnectPlan, now_ms: u64) -> Self {
        Slot {
            revision,
            plan,
            cell: OnceCell::new(),
            inflight: AtomicUsize::new(0),
            drained: Notify::new(),
            last_used_ms: AtomicU64::new(now_ms),
            failure: Mutex::new(None),
            attempts_failed: AtomicU64::new(0),
            released: AtomicBool::new(false),
        }
    }

    /// The connected instance, to the one caller that will disconnect it.
    fn release(&self) -> Option<Arc<Live>> {
        let live = self.cell.get()?;
        (!self.released.swap(true, Ordering::AcqRel)).then(|| live.clone())
    }

    fn failure(&self) -> Option<Failure> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// A hold on an instance; dropping it ends the call (or the status probe).
pub struct Lease {
    slot: Arc<Slot>,
    epoch: Instant,
    /// Calls keep an instance from looking idle; status probes do not.
    touch: bool,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.touch {
            // Used until the call ends, not only when it starts: a long call is not "idle".
            let now = self.epoch.elapsed().as_millis() as u64;
            self.slot.last_used_ms.fetch_max(now, Ordering::Relaxed);
        }
        if self.slot.inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.slot.drained.notify_waiters();
        }
    }
}

type Map = HashMap<String, HashMap<String, Arc<Slot>>>;

/// One instance as [`Instances::snapshot`] sees it.
#[derive(Debug, Clone)]
pub struct InstanceInfo {
    /// The tenant.
    pub tenant: String,
    /// The service.
    pub service: String,
    /// `connected`, `failed` (its last connect) or `connecting`.
    pub state: &'static str,
    /// The connected version.
    pub version: Option<String>,
    /// Calls in flight.
    pub inflight: usize,
    /// The revision of its plan.
    pub revision: u64,
    /// How its provider was loaded.
    pub kind: Kind,
    /// When it connected, ms since the epoch.
    pub connected_ms: Option<i64>,
    /// Calls it answered, and how many of them with an error.
    pub calls: u64,
    /// Calls answered with an error.
    pub errors: u64,
    /// Its last error: when, code and detail.
    pub last_error: Option<(i64, &'static str, String)>,
    /// Why its last connect failed, while it has not connected.
    pub connect_failure: Option<String>,
}

/// Every instance of every tenant.
pub struct Instances {
    slots: RwLock<Map>,
    /// Set under the write lock at shutdown; no slot is entered after it.
    closing: AtomicBool,
    /// Fired when calls outlive the shutdown grace.
    cancel: Cancel,
    resources: Resources,
    storage: Storage,
    epoch: Instant,
    settings: Mutex<Settings>,
    /// Replaced or removed slots whose calls are finishing, until they are disconnected.
    retiring: Mutex<Vec<(String, String, Arc<Slot>)>>,
}

/// What connecting one instance needs, owned so that the connect can outlive its first caller.
#[derive(Clone)]
struct ConnectPlan {
    tenant: String,
    service: String,
    factory: Arc<dyn Factory>,
    config: Value,
    limits: Limits,
    /// kv config of a plugin's own store.
    store: Value,
    /// Hosts a plugin's outbound HTTP may reach.
    allowed_hosts: Arc<[String]>,
}

impl ConnectPlan {
    fn of(tenant: &str, service: &str, plan: &TenantService) -> Self {
        ConnectPlan {
            tenant: tenant.to_owned(),
            service: service.to_owned(),
            factory: plan.service.factory.clone(),
            config: plan.config.clone(),
            limits: plan.limits,
            store: plan.service.store.clone(),
            allowed_hosts: plan.service.allowed_hosts.clone(),
        }
    }
}

fn shutting_down() -> ProviderError {
    ProviderError::unavailable("the host is shutting down")
}

impl Instances {
    /// No instances yet; `resources` go to builtin providers at connect.
    pub fn new(storage: Storage, resources: Resources, settings: Settings) -> Self {
        Self {
            slots: RwLock::new(HashMap::new()),
            closing: AtomicBool::new(false),
            cancel: Cancel::default(),
            resources,
            storage,
            epoch: Instant::now(),
            settings: Mutex::new(settings),
            retiring: Mutex::new(Vec::new()),
        }
    }

    fn settings(&self) -> Settings {
        *self.settings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies new settings to connects from now on (a reload).
    pub fn set_settings(&self, settings: Settings) {
        *self.settings.lock().unwrap_or_else(|p| p.into_inner()) = settings;
    }

    /// Whether shutdown has begun.
    pub fn closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// The signal that cancels guarded calls at shutdown; every call into a provider runs under it.
    pub fn cancel(&self) -> &Cancel {
        &self.cancel
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn lease(&self, slot: &Arc<Slot>, touch: bool) -> Lease {
        slot.inflight.fetch_add(1, Ordering::AcqRel);
        if touch {
            slot.last_used_ms.store(self.now_ms(), Ordering::Relaxed);
        }
        Lease {
            slot: slot.clone(),
            epoch: self.epoch,
            touch,
        }
    }

    /// A lease on an existing slot, if there is one; creates nothing.
    fn existing(&self, tenant: &str, service: &str) -> Option<(Lease, Arc<Slot>)> {
        let map = self.slots.read().unwrap_or_else(|p| p.into_inner());
        if self.closing.load(Ordering::Acquire) {
            return None;
        }
        let slot = map.get(tenant)?.get(service)?;
        Some((self.lease(slot, false), slot.clone()))
    }

    /// A lease on the slot of `tenant`'s `service`, made for `revision` or a newer one. A
    /// slot of an older revision is replaced (and retired): the first call under a new plan
    /// gets a new instance. A caller holding an older plan (a nested call begun before a
    /// reload) uses the newer slot rather than bring the old plan back.
    fn enter(
        self: &Arc<Self>,
        tenant: &str,
        service: &str,
        plan: &TenantService,
    ) -> Result<(Lease, Arc<Slot>), ProviderError> {
        let revision = plan.revision;
        {
            let map = self.slots.read().unwrap_or_else(|p| p.into_inner());
            if self.closing.load(Ordering::Acquire) {
                return Err(shutting_down());
            }
            if let Some(slot) = map.get(tenant).and_then(|s| s.get(service))
                && slot.revision >= revision
            {
                return Ok((self.lease(slot, true), slot.clone()));
            }
        }
        let mut map = self.slots.write().unwrap_or_else(|p| p.into_inner());
        if self.closing.load(Ordering::Acquire) {
            return Err(shutting_down());
        }
        let now = self.now_ms();
        let services = map.entry(tenant.to_owned()).or_default();
        if let Some(slot) = services.get(service)
            && slot.revision >= revision
        {
            return Ok((self.lease(slot, true), slot.clone()));
        }
        let slot = Arc::new(Slot::new(
            revision,
            ConnectPlan::of(tenant, service, plan),
            now,
        ));
        let old = services.insert(service.to_owned(), slot.clone());
        let lease = self.lease(&slot, true);
        drop(map);
        if let Some(old) = old {
            self.retire(tenant, service, old, "replaced");
        }
        Ok((lease, slot))
    }

    /// The connected instance for `tenant`'s `service`, connecting it on first use.
    ///
    /// Concurrent first calls share one `connect`, which runs on a task of its own under the
    /// connect timeout: a caller that gives up (deadline, client gone) does not cancel it
    /// halfway. After a failed connect, calls are refused until the backoff has passed;
    /// then the next call tries again.
    pub async fn acquire(
        self: &Arc<Self>,
        tenant: &str,
        service: &str,
        plan: &TenantService,
    ) -> Result<(Lease, Arc<Live>), ProviderError> {
        let (lease, slot) = self.enter(tenant, service, plan)?;
        if let Some(live) = slot.cell.get() {
            return Ok((lease, live.clone()));
        }
        if let Some(failure) = slot.failure() {
            let now = Instant::now();
            if failure.retry_at > now {
                return Err(backing_off(service, &failure, now));
            }
        }
        // Safe outside the map's lock: the lease above keeps the slot from being evicted.
        let connecting = self.lease(&slot, true);
        let me = self.clone();
        // The slot's own plan: a caller holding an older plan may reach a newer slot first.
        let owned = slot.plan.clone();
        let failures_seen = slot.attempts_failed.load(Ordering::Acquire);
        let task = tokio::spawn(async move {
            // The task holds its own lease, so eviction cannot drop the slot under it.
            let _connecting = connecting;
            let slot = slot;
            slot.cell
                .get_or_try_init(|| async {
                    if slot.attempts_failed.load(Ordering::Acquire) != failures_seen
                        && let Some(failure) = slot.failure()
                    {
                        return Err(backing_off(&owned.service, &failure, Instant::now()));
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

    /// Connects a new instance for `plan` and only then puts it in place of the current one,
    /// which is retired: calls already on it finish there, then it is disconnected. New calls
    /// never wait for the connect. When `only_if_live` and nothing is connected, nothing is
    /// connected ahead: the next call connects under the new plan. If the new instance cannot
    /// connect, the current one stays when its plan is the same (a restart), and gives way to
    /// the failure otherwise (its plan is no longer the configuration).
    pub async fn replace(
        self: &Arc<Self>,
        tenant: &str,
        service: &str,
        plan: &TenantService,
        only_if_live: bool,
    ) -> Result<bool, ProviderError> {
        let current = self.existing(tenant, service);
        let live = current
            .as_ref()
            .is_some_and(|(_, slot)| slot.cell.get().is_some());
        let same_plan = current
            .as_ref()
            .is_some_and(|(_, slot)| slot.revision == plan.revision);
        drop(current);
        if only_if_live && !live {
            self.remove_older(tenant, service, plan.revision);
            return Ok(false);
        }
        if self.closing.load(Ordering::Acquire) {
            return Err(shutting_down());
        }
        let owned = ConnectPlan::of(tenant, service, plan);
        let slot = Arc::new(Slot::new(plan.revision, owned.clone(), self.now_ms()));
        let connecting = self.lease(&slot, true);
        let outcome = slot
            .cell
            .get_or_try_init(|| self.connect(&slot, owned))
            .await
            .cloned();
        drop(connecting);
        if let Err(e) = &outcome
            && same_plan
        {
            return Err(e.clone());
        }
        let old = {
            let mut map = self.slots.write().unwrap_or_else(|p| p.into_inner());
            if self.closing.load(Ordering::Acquire) {
                None
            } else {
                let services = map.entry(tenant.to_owned()).or_default();
                match services.get(service) {
                    // A newer plan got there first; this instance is not needed.
                    Some(existing) if existing.revision > plan.revision => Some(slot.clone()),
                    _ => services.insert(service.to_owned(), slot.clone()),
                }
            }
        };
        if let Some(old) = old {
            self.retire(tenant, service, old, "replaced");
        } else if self.closing.load(Ordering::Acquire) {
            self.retire(tenant, service, slot, "shutdown");
        }
        outcome.map(|_| true)
    }

    /// Drops the slot of `tenant`'s `service` if it was made for a revision older than `revision`.
    fn remove_older(self: &Arc<Self>, tenant: &str, service: &str, revision: u64) {
        let old = {
            let mut map = self.slots.write().unwrap_or_else(|p| p.into_inner());
            let Some(services) = map.get_mut(tenant) else {
                return;
            };
            let old = services
                .get(service)
                .filter(|s| s.revision < revision)
                .is_some()
                .then(|| services.remove(service))
                .flatten();
            if services.is_empty() {
                map.remove(tenant);
            }
            old
        };
        if let Some(old) = old {
            self.retire(tenant, service, old, "replaced");
        }
    }

    /// Removes and retires every slot `keep` says no to (given tenant, service, revision).
    /// Returns how many went.
    pub fn retire_where(self: &Arc<Self>, keep: impl Fn(&str, &str, u64) -> bool) -> usize {
        let mut gone = Vec::new();
        {
            let mut map = self.slots.write().unwrap_or_else(|p| p.into_inner());
            for (tenant, services) in map.iter_mut() {
                services.retain(|service, slot| {
                    let k = keep(tenant, service, slot.revision);
                    if !k {
                        gone.push((tenant.clone(), service.clone(), slot.clone()));
                    }
                    k
                });
            }
            map.retain(|_, services| !services.is_empty());
        }
        let count = gone.len();
        for (tenant, service, slot) in gone {
            self.retire(&tenant, &service, slot, "removed");
        }
        count
    }

    /// Lets the calls on a slot no longer in the map finish, then disconnects its instance.
    /// Every call has a deadline, so the wait ends; it is not cut short, since a call begun
    /// under a longer timeout than today's would otherwise outlive the wait. The slot stays
    /// listed as retiring until its instance is disconnected, so shutdown sees it and waits.
    fn retire(self: &Arc<Self>, tenant: &str, service: &str, slot: Arc<Slot>, why: &'static str) {
        self.retiring
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((tenant.to_owned(), service.to_owned(), slot.clone()));
        let me = self.clone();
        let (tenant, service) = (tenant.to_owned(), service.to_owned());
        tokio::spawn(async move {
            let mut warned = false;
            loop {
                let until = Instant::now() + me.settings().connect_timeout + CANCEL_WAIT;
                if drain(&slot, until).await {
                    break;
                }
                if !warned {
                    warned = true;
                    tracing::warn!(
                        tenant,
                        service,
                        calls = slot.inflight.load(Ordering::Acquire),
                        "calls on a retired instance are still running; it is disconnected when they end"
                    );
                }
            }
            if let Some(live) = slot.release() {
                me.disconnect(&tenant, &service, &live, why).await;
            }
            me.retiring
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|(_, _, s)| !Arc::ptr_eq(s, &slot));
        });
    }

    /// Replaces the instance of `tenant`'s `service` (every tenant's when `None`) with a new
    /// one on the same plans, connected before it takes over. Returns the tenants restarted
    /// and the failures, by tenant.
    pub async fn restart(
        self: &Arc<Self>,
        service: &str,
        plans: Vec<(String, &TenantService)>,
    ) -> (Vec<String>, Vec<(String, String)>) {
        let results = futures_util::future::join_all(plans.into_iter().map(|(tenant, plan)| {
            let me = self.clone();
            async move {
                let r = me.replace(&tenant, service, plan, true).await;
                (tenant, r)
            }
        }))
        .await;
        let mut done = Vec::new();
        let mut failed = Vec::new();
        for (tenant, r) in results {
            match r {
                Ok(true) => done.push(tenant),
                Ok(false) => {}
                Err(e) => failed.push((tenant, e.detail)),
            }
        }
        (done, failed)
    }

    /// Every slot: tenant, service, state, version, calls in flight, revision.
    pub fn snapshot(&self) -> Vec<InstanceInfo> {
        let map = self.slots.read().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<InstanceInfo> = map
            .iter()
            .flat_map(|(tenant, services)| {
                services.iter().map(move |(service, slot)| {
                    let live = slot.cell.get();
                    InstanceInfo {
                        tenant: tenant.clone(),
                        service: service.clone(),
                        state: match live {
                            Some(_) => "connected",
                            None if slot.failure().is_some() => "failed",
                            None => "connecting",
                        },
                        version: live.map(|l| l.version.clone()),
                        inflight: slot.inflight.load(Ordering::Acquire),
                        revision: slot.revision,
                        kind: slot.plan.factory.kind(),
                        connected_ms: live.map(|l| l.connected_ms),
                        calls: live.map_or(0, |l| l.calls.load(Ordering::Relaxed)),
                        errors: live.map_or(0, |l| l.errors.load(Ordering::Relaxed)),
                        last_error: live.and_then(|l| {
                            l.last_error
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .clone()
                        }),
                        connect_failure: live
                            .is_none()
                            .then(|| slot.failure().map(|f| f.detail))
                            .flatten(),
                    }
                })
            })
            .collect();
        all.sort_by(|a, b| (&a.tenant, &a.service).cmp(&(&b.tenant, &b.service)));
        all
    }

    async fn connect(&self, slot: &Slot, plan: ConnectPlan) -> Result<Arc<Live>, ProviderError> {
        let ConnectPlan {
            tenant,
            service,
            factory,
            config,
            limits,
            store,
            allowed_hosts,
        } = plan;
        let version = factory.descriptor().version.to_string();
        let what = || format!("provider '{service}' connect for tenant '{tenant}'");
        let settings = self.settings();
        let deadline = Instant::now() + settings.connect_timeout;
        let resources = &self.resources;
        let http_max_body = settings.http_max_body;
        let (t, s) = (tenant.clone(), service.clone());
        let outcome = guard::run(what, deadline, &self.cancel, async move {
            let ctx = ConnectContext::new(t.clone(), config).with_service(s.clone());
            // Builtins share the host's types; plugins get the capabilities instead.
            let ctx = if factory.kind() == Kind::Builtin {
                ctx.with_resources(resources.clone())
            } else {
                let store = PluginStore::connect(resources, &t, &s, store).await?;
                let http = HostHttp::new(&s, &allowed_hosts, http_max_body);
                ctx.with_store(Arc::new(store))
                    .with_log(crate::plugins::capabilities::logger(&s, &t))
                    .with_http(Arc::new(http))
                    .with_limits(SandboxLimits {
                        memory_bytes: limits.memory,
                        fuel: limits.fuel,
                    })
            };
            let mut provider = factory.create()?;
            provider.connect(&ctx).await?;
            Ok(provider)
        })
        .await;
        // Shutdown began while this connect ran. Its drain waits for this task's lease, so it
        // would disconnect the instance; releasing it here instead keeps it out of service.
        let outcome = match outcome {
            Ok(provider) if self.closing.load(Ordering::Acquire) => {
                let provider: Arc<dyn Provider> = Arc::from(provider);
                self.disconnect_provider(&tenant, &service, &version, provider, "shutdown")
                    .await;
                return Err(shutting_down());
            }
            other => other,
        };
        match outcome {
            Ok(provider) => {
                *slot.failure.lock().unwrap_or_else(|p| p.into_inner()) = None;
                self.record(&tenant, &service, &version, InstanceEvent::Connected, "")
                    .await;
                tracing::debug!(tenant, service, version, "instance connected");
                Ok(Arc::new(Live {
                    provider: Arc::from(provider),
                    connected_ms: crate::audit::now_ms(),
                    calls: AtomicU64::new(0),
                    errors: AtomicU64::new(0),
                    last_error: Mutex::new(None),
                    version,
                    limiter: limits
                        .max_concurrency
                        .map(|n| Arc::new(Semaphore::new(n as usize))),
                }))
            }
            Err(e) => {
                let failure = {
                    let mut last = slot.failure.lock().unwrap_or_else(|p| p.into_inner());
                    let count = last.as_ref().map_or(0, |f| f.count).saturating_add(1);
                    let failure = Failure {
                        detail: e.detail.clone(),
                        count,
                        retry_at: Instant::now() + self.backoff(count),
                    };
                    *last = Some(failure.clone());
                    failure
                };
                slot.attempts_failed.fetch_add(1, Ordering::AcqRel);
                self.record(
                    &tenant,
                    &service,
                    &version,
                    InstanceEvent::ConnectFailed,
                    &e.detail,
                )
                .await;
                tracing::warn!(tenant, service, error = ?e.detail, attempt = failure.count, "instance failed to connect");
                Err(ProviderError::unavailable(format!(
                    "service '{service}' is unavailable: {}",
                    e.detail
                )))
            }
        }
    }

    /// The wait after `count` failures in a row: doubling from the configured backoff up to
    /// its maximum, with up to half of it taken off at random so that many instances that
    /// failed together (a database restart) do not all retry at the same moment.
    fn backoff(&self, count: u32) -> Duration {
        let Settings {
            backoff,
            backoff_max,
            ..
        } = self.settings();
        let full = backoff
            .saturating_mul(1u32 << count.saturating_sub(1).min(20))
            .min(backoff_max);
        full.mul_f64(1.0 - rand::random::<f64>() * 0.5)
    }

    async fn record(
        &self,
        tenant: &str,
        service: &str,
        version: &str,
        event: InstanceEvent,
        detail: &str,
    ) {
        crate::observe::instance_event(service, event.as_str());
        if let Err(e) = self
            .storage
            .record(tenant, service, version, event, detail)
            .await
        {
            tracing::warn!(tenant, service, error = %e, "could not record instance event");
        }
    }

    /// The status of `tenant`'s `service`: the provider's own when connected, `failed` when
    /// its last connect failed, `None` when it has not been tried. The probe holds a lease,
    /// so eviction cannot disconnect the instance under it, and is bounded by `deadline`.
    pub async fn status(&self, tenant: &str, service: &str, deadline: Instant) -> Option<Status> {
        let (lease, slot) = self.existing(tenant, service)?;
        let Some(live) = slot.cell.get() else {
            return slot
                .failure()
                .map(|f| Status::failed(format!("connect failed: {}", f.detail)));
        };
        let provider = live.provider.clone();
        let probe = guard::run(
            || format!("provider '{service}' get_status for tenant '{tenant}'"),
            deadline,
            &self.cancel,
            async move { Ok(provider.get_status().await) },
        );
        let status = probe.await.unwrap_or_else(|e| Status::failed(e.detail));
        drop(lease);
        Some(status)
    }

    /// Disconnects and drops every instance unused for `idle`, a bounded number at once, and
    /// forgets failed connects unused that long. Returns how many instances were disconnected.
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
                    let idle = slot.inflight.load(Ordering::Acquire) == 0
                        && slot.last_used_ms.load(Ordering::Relaxed) <= cutoff;
                    if idle && let Some(live) = slot.release() {
                        gone.push((tenant.clone(), service.clone(), live));
                    }
                    !idle
                });
            }
            map.retain(|_, services| !services.is_empty());
        }
        let count = gone.len();
        futures_util::stream::iter(gone)
            .for_each_concurrent(DISCONNECTS_AT_ONCE, |(tenant, service, live)| async move {
                self.disconnect(&tenant, &service, &live, "idle").await;
            })
            .await;
        count
    }

    /// Refuses new calls and waits until `deadline` for in-flight ones. Calls still running
    /// then are cancelled, and each instance is disconnected only once its last call has
    /// stopped; instances whose calls will not stop (code that blocks its thread) are left
    /// connected rather than disconnected under a running call.
    pub async fn shutdown(&self, deadline: Instant) {
        let all: Map = {
            let mut map = self.slots.write().unwrap_or_else(|p| p.into_inner());
            self.closing.store(true, Ordering::Release);
            std::mem::take(&mut *map)
        };
        // Listed, not taken: each retire task unlists its slot once disconnected, and shutdown
        // waits for that below.
        let retiring = self
            .retiring
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let slots: Vec<(String, String, Arc<Slot>)> = all
            .into_iter()
            .flat_map(|(tenant, services)| {
                services
                    .into_iter()
                    .map(move |(service, slot)| (tenant.clone(), service, slot))
            })
            .chain(retiring)
            .collect();
        let drained = |until: Instant| {
            let slots = &slots;
            async move {
                let waits = slots.iter().map(|(_, _, slot)| drain(slot, until));
                futures_util::future::join_all(waits).await
            }
        };
        if drained(deadline).await.contains(&false) {
            let busy: usize = slots
                .iter()
                .map(|(_, _, s)| s.inflight.load(Ordering::Acquire))
                .sum();
            tracing::warn!(
                calls = busy,
                "calls still running after the shutdown grace are cancelled"
            );
            self.cancel.fire();
            drained(Instant::now() + CANCEL_WAIT).await;
        }
        futures_util::stream::iter(slots)
            .for_each_concurrent(DISCONNECTS_AT_ONCE, |(tenant, service, slot)| async move {
                if slot.cell.get().is_none() {
                    return;
                }
                if slot.inflight.load(Ordering::Acquire) > 0 {
                    tracing::error!(
                        tenant,
                        service,
                        "calls did not stop when cancelled; the instance is left connected"
                    );
                    return;
                }
                if let Some(live) = slot.release() {
                    self.disconnect(&tenant, &service, &live, "shutdown").await;
                }
            })
            .await;
        // A retire task that released its instance first may be disconnecting it still.
        let until = Instant::now() + DISCONNECT_TIMEOUT;
        while Instant::now() < until
            && self
                .retiring
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .any(|(_, _, slot)| slot.released.load(Ordering::Acquire))
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn disconnect(&self, tenant: &str, service: &str, live: &Arc<Live>, why: &str) {
        self.disconnect_provider(tenant, service, &live.version, live.provider.clone(), why)
            .await;
    }

    async fn disconnect_provider(
        &self,
        tenant: &str,
        service: &str,
        version: &str,
        provider: Arc<dyn Provider>,
        why: &str,
    ) {
        let what = || format!("provider '{service}' disconnect for tenant '{tenant}'");
        // Not under `cancel`: by the time anything disconnects, the calls it cancels are over,
        // and a disconnect cut short would leak what it was releasing.
        let never = Cancel::default();
        let detail = match guard::run(
            what,
            Instant::now() + DISCONNECT_TIMEOUT,
            &never,
            async move { provider.disconnect().await },
        )
        .await
        {
            Ok(()) => why.to_owned(),
            Err(e) => format!("{why}: {}", e.detail),
        };
        tracing::debug!(tenant, service, reason = why, "instance disconnected");
        self.record(
            tenant,
            service,
            version,
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

/// Waits until `slot` has no call in flight or `until` passes; whether it drained.
async fn drain(slot: &Slot, until: Instant) -> bool {
    loop {
        let notified = slot.drained.notified();
        if slot.inflight.load(Ordering::Acquire) == 0 {
            return true;
        }
        if tokio::time::timeout_at(until.into(), notified)
            .await
            .is_err()
        {
            return slot.inflight.load(Ordering::Acquire) == 0;
        }
    }
}

fn backing_off(service: &str, failure: &Failure, now: Instant) -> ProviderError {
    let wait = failure.retry_at.saturating_duration_since(now);
    // Whole seconds, rounded up, as Retry-After would say it.
    let seconds = wait.as_millis().div_ceil(1000).max(1);
    ProviderError::unavailable(format!(
        "service '{service}' is unavailable: {}; next attempt in {seconds}s",
        failure.detail
    ))
}
