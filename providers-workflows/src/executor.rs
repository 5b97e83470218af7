//! The executor: claims instances that have something due, runs their steps, and writes their
//! state before and after each step.
//!
//! A claim is a lease on the instance row (`lease_owner`, `lease_until_ms`): on PostgreSQL,
//! hosts claim with `FOR UPDATE SKIP LOCKED`, so several share the work and a host that dies
//! holding leases has them taken over once they expire; on SQLite one process runs the
//! executor and a second is refused. Every write names the revision it read, so a write from
//! a lease that was taken over changes nothing; the step the new holder runs again carries the
//! same idempotency key, so a provider that deduplicates applies its effect once.
//!
//! A step's result and the start of the next step are written in one transaction: a chain of
//! call steps costs one commit per step.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use providers_core::ProviderError;
use rand::Rng;
use serde_json::{Value, json};
use sqlx::{AnyPool, Row};

use crate::definition::StepKind;
use crate::store::{self, Event, Instance, Loaded, state};
use crate::template::{self, Scope};

/// Where the executor's time comes from; tests and demos may run it faster.
pub trait Clock: Send + Sync {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        now_ms()
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// How the executor claims and paces work.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long a claim holds an instance before another executor may take it over.
    pub lease: Duration,
    /// Most instances claimed at once.
    pub batch: usize,
    /// Most instances driven at once by this executor.
    pub concurrency: usize,
    /// Definitions' durations (SLAs, escalations, timers, backoffs) are divided by this: a
    /// demo or a test runs a 72 h escalation in 72 ms with 3,600,000.
    pub time_scale: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(30),
            batch: 32,
            concurrency: 64,
            time_scale: 1.0,
        }
    }
}

/// One provider call a step makes.
#[derive(Debug, Clone)]
pub struct StepCall {
    /// The instance's tenant.
    pub tenant: String,
    /// The requester: steps call as them.
    pub subject: String,
    /// The requester's roles when the instance started.
    pub roles: Vec<String>,
    /// The requester's company.
    pub company_id: Option<String>,
    /// The instance.
    pub instance: String,
    /// The step.
    pub step: String,
    /// The service.
    pub service: String,
    /// The action.
    pub action: String,
    /// The payload, references resolved.
    pub payload: Value,
    /// `<instance>:<step>:<round>` (`:undo` for a compensation): the same on every retry and
    /// after a crash, new when a send-back runs the step again on purpose.
    pub idempotency_key: String,
}

/// Makes a step's call; the host implements it with its own call pipeline.
#[async_trait]
pub trait Runner: Send + Sync {
    /// Runs `call`.
    async fn call(&self, call: StepCall) -> Result<Value, ProviderError>;
}

/// Why the executor could not start.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

/// The executor of one host process.
pub struct Executor {
    pool: AnyPool,
    owner: String,
    postgres: bool,
    settings: Settings,
    clock: Arc<dyn Clock>,
    permits: Arc<tokio::sync::Semaphore>,
    /// On SQLite: another process took the slot (this one was silent too long); stop.
    lost: std::sync::atomic::AtomicBool,
    /// What every drive's writes go through.
    writer: store::Writer,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into())
}

/// This process's PID namespace (Linux), so a process id is only compared within one.
fn pid_namespace() -> String {
    std::fs::read_link("/proc/self/ns/pid")
        .map(|l| {
            l.display()
                .to_string()
                .chars()
                .filter(char::is_ascii_digit)
                .collect()
        })
        .unwrap_or_default()
}

/// A process's name in leases: host name, process id, PID namespace and a random part.
fn owner_name() -> String {
    format!(
        "{}:{}:{}:{}",
        hostname(),
        std::process::id(),
        pid_namespace(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Whether the process named in `owner` is gone: it ran on this machine, in this PID
/// namespace, and its process id is free.
fn gone(owner: &str) -> bool {
    let parts: Vec<&str> = owner.split(':').collect();
    let [host, pid, namespace, _] = parts.as_slice() else {
        return false;
    };
    let ours = pid_namespace();
    *host == hostname()
        && !ours.is_empty()
        && *namespace == ours
        && !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// How long a SQLite executor's heartbeat may be silent before another process may start.
const SQLITE_STALE_MS: i64 = 5_000;

impl Executor {
    /// Prepares the tables and starts an executor on `pool`. On SQLite it takes the
    /// database's one executor slot, or refuses when another live process holds it.
    pub async fn start(
        pool: AnyPool,
        settings: Settings,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StartError> {
        crate::prepare(&pool)
            .await
            .map_err(|e| StartError(format!("preparing the workflow tables: {e}")))?;
        let postgres = crate::migrate::is_postgres(&pool);
        let owner = owner_name();
        let executor = Self {
            writer: store::Writer::new(pool.clone(), postgres),
            lost: std::sync::atomic::AtomicBool::new(false),
            pool,
            owner,
            postgres,
            permits: Arc::new(tokio::sync::Semaphore::new(settings.concurrency.max(1))),
            settings,
            clock,
        };
        if !postgres {
            executor.take_sqlite_slot().await?;
        }
        Ok(executor)
    }

    async fn take_sqlite_slot(&self) -> Result<(), StartError> {
        let now = self.clock.now_ms();
        let holder: Option<(String, i64)> =
            sqlx::query("SELECT owner, heartbeat_ms FROM wf_executors WHERE name = 'sqlite'")
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| StartError(format!("reading the workflow executor slot: {e}")))?
                .map(|r| Ok::<_, sqlx::Error>((r.try_get(0)?, r.try_get(1)?)))
                .transpose()
                .map_err(|e| StartError(format!("reading the workflow executor slot: {e}")))?;
        let stale_before = match &holder {
            Some((owner, _)) if gone(owner) => i64::MAX,
            _ => now - SQLITE_STALE_MS,
        };
        let taken = sqlx::query(
            "INSERT INTO wf_executors (name, owner, heartbeat_ms) VALUES ('sqlite', $1, $2) \
             ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, heartbeat_ms = excluded.heartbeat_ms \
             WHERE wf_executors.heartbeat_ms < $3 RETURNING owner",
        )
        .bind(&self.owner)
        .bind(now)
        .bind(stale_before)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| StartError(format!("taking the workflow executor slot: {e}")))?;
        if taken.is_none() {
            let (owner, seen) = holder.unwrap_or_default();
            return Err(StartError(format!(
                "workflows on SQLite run in one host process, and '{owner}' runs them on this database \
                 (last seen {} ms ago); run several hosts on PostgreSQL, or stop the other one",
                now - seen
            )));
        }
        // The only executor: leases left by a process that died are free now.
        sqlx::query(
            "UPDATE wf_instances SET lease_owner = NULL, lease_until_ms = NULL WHERE lease_owner IS NOT NULL",
        )
        .execute(&self.pool)
        .await
        .map_err(|e| StartError(format!("freeing old leases: {e}")))?;
        Ok(())
    }

    /// This executor's name in leases.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Keeps the SQLite slot: called every second, on a task of its own, while the executor
    /// runs.
    pub async fn heartbeat(&self) {
        if self.postgres {
            return;
        }
        let result = sqlx::query(
            "UPDATE wf_executors SET heartbeat_ms = $1 WHERE name = 'sqlite' AND owner = $2",
        )
        .bind(self.clock.now_ms())
        .bind(&self.owner)
        .execute(&self.pool)
        .await;
        match result {
            Ok(r) if r.rows_affected() == 0 => {
                if !self.lost.swap(true, std::sync::atomic::Ordering::AcqRel) {
                    tracing::error!(owner = %self.owner, "another process took the SQLite workflow executor slot; this host runs no more workflows (restart it once the other one is stopped)");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "workflow executor heartbeat failed"),
        }
    }

    /// Claims what is due, up to the batch size and the free concurrency, and drives each
    /// claimed instance on a task of its own. Returns how many it claimed.
    pub async fn tick(self: &Arc<Self>, runner: &Arc<dyn Runner>) -> Result<usize, sqlx::Error> {
        let free = self
            .permits
            .available_permits()
            .min(self.settings.batch.max(1));
        if free == 0 || self.lost.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(0);
        }
        let claimed = self.claim(free).await?;
        let n = claimed.len();
        for inst in claimed {
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                // Cannot happen (claims never exceed the free permits); the lease expires.
                break;
            };
            let me = self.clone();
            let runner = runner.clone();
            tokio::spawn(async move {
                let _permit = permit;
                me.drive(inst, runner.as_ref()).await;
            });
        }
        Ok(n)
    }

    /// Waits until every driven instance is done or `deadline`, then frees this executor's
    /// leases (so another host may take over at once) and, on SQLite, its slot.
    pub async fn stop(&self, deadline: std::time::Instant) {
        let all = u32::try_from(self.settings.concurrency.max(1)).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout_at(deadline.into(), self.permits.acquire_many(all)).await;
        self.permits.close();
        let _ = sqlx::query(
            "UPDATE wf_instances SET lease_owner = NULL, lease_until_ms = NULL WHERE lease_owner = $1",
        )
        .bind(&self.owner)
        .execute(&self.pool)
        .await;
        if !self.postgres {
            let _ = sqlx::query("DELETE FROM wf_executors WHERE name = 'sqlite' AND owner = $1")
                .bind(&self.owner)
                .execute(&self.pool)
                .await;
        }
    }

    async fn claim(&self, limit: usize) -> Result<Vec<Instance>, sqlx::Error> {
        let now = self.clock.now_ms();
        let until = now + lease_ms(&self.settings);
        // PostgreSQL: rows another host is claiming are skipped, not waited for. SQLite has
        // one executor, so nothing else claims.
        let lock = if self.postgres {
            " FOR UPDATE SKIP LOCKED"
        } else {
            ""
        };
        let sql = format!(
            "UPDATE wf_instances SET lease_owner = $1, lease_until_ms = $2, rev = rev + 1 \
             WHERE id IN (SELECT id FROM wf_instances WHERE due_ms <= $3 \
             AND (lease_until_ms IS NULL OR lease_until_ms < $3) ORDER BY due_ms LIMIT $4{lock}) \
             RETURNING {}",
            store::COLUMNS
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&self.owner)
            .bind(until)
            .bind(now)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(Instance::from_row).collect()
    }

    /// Frees the lease this drive holds, if the row is still at the revision it last wrote
    /// (a later claim by this same process is left alone), due again at `due_ms`.
    async fn release(&self, inst: &Instance, due_ms: Option<i64>) {
        let _ = sqlx::query(
            "UPDATE wf_instances SET lease_owner = NULL, lease_until_ms = NULL, due_ms = $1 \
             WHERE id = $2 AND lease_owner = $3 AND rev = $4",
        )
        .bind(due_ms)
        .bind(&inst.id)
        .bind(&self.owner)
        .bind(inst.rev)
        .execute(&self.pool)
        .await;
    }

    /// Runs `inst` until it waits, ends, or its state changed under it. A failure to read or
    /// write leaves it to be tried again in [`RETRY_AFTER_FAULT_MS`].
    async fn drive(&self, mut inst: Instance, runner: &dyn Runner) {
        if let Err(e) = self.drive_inner(&mut inst, runner).await {
            tracing::warn!(instance = %inst.id, tenant = %inst.tenant, error = %e, "workflow could not be run or recorded; it is tried again in 5 s");
            self.release(&inst, Some(self.clock.now_ms() + RETRY_AFTER_FAULT_MS))
                .await;
        }
    }

    async fn drive_inner(&self, inst: &mut Instance, runner: &dyn Runner) -> Result<(), String> {
        let loaded = store::snapshot(&self.pool, &inst.digest)
            .await
            .map_err(|e| format!("its definition snapshot: {}", e.detail))?;
        let mut outcome: Option<Result<Value, ProviderError>> = None;
        // Bounded: a workflow of n steps needs about n transitions; a loop cannot spin here.
        for _ in 0..(loaded.definition.steps.len() * 6 + 16) {
            let now = self.clock.now_ms();
            let mut events = Vec::new();
            let cancel_seen = inst.cancel_requested;
            let next = advance(
                inst,
                &loaded,
                now,
                outcome.take(),
                &mut events,
                &self.settings,
            );
            if let (Next::Call(_), Some(started)) = (&next, events.last_mut())
                && let Value::Object(detail) = &mut started.detail
            {
                // Which host ran it: after a takeover, the history shows both.
                detail.insert("host".into(), Value::from(self.owner.as_str()));
            }
            let hold = !matches!(next, Next::Stop);
            if hold {
                // Held: due as soon as the lease would expire, should this process die.
                inst.due_ms = Some(now);
            }
            let lease = hold.then(|| (self.owner.clone(), now + lease_ms(&self.settings)));
            let saved = self.writer.save(inst.clone(), events, now, lease).await?;
            match saved {
                Some(cancel) => {
                    inst.rev += 1;
                    inst.cancel_requested = cancel;
                }
                // Changed meanwhile (a decision, or a lease taken over): whoever changed it
                // holds it now and moves it on; nothing of this drive's is released.
                None => return Ok(()),
            }
            // A cancel that arrived while this transition was decided: act on it first (no
            // further step starts). The write made it due, should this drive stop here.
            if inst.cancel_requested
                && !cancel_seen
                && !state::is_final(&inst.state)
                && inst.state != state::COMPENSATING
            {
                if !hold {
                    // Released by the write: claim it back if nobody else did.
                    let reclaimed = sqlx::query(
                        "UPDATE wf_instances SET lease_owner = $1, lease_until_ms = $2, rev = rev + 1 \
                         WHERE id = $3 AND rev = $4 AND lease_owner IS NULL",
                    )
                    .bind(&self.owner)
                    .bind(now + lease_ms(&self.settings))
                    .bind(&inst.id)
                    .bind(inst.rev)
                    .execute(&self.pool)
                    .await
                    .map_err(|e| e.to_string())?;
                    if reclaimed.rows_affected() == 0 {
                        return Ok(());
                    }
                    inst.rev += 1;
                }
                continue;
            }
            match next {
                Next::Stop => return Ok(()),
                Next::Continue => {}
                Next::Call(call) => {
                    outcome = Some(runner.call(*call).await);
                }
                Next::Signal(name, deadline) => {
                    if let Some(payload) = self.signal(&inst.id, &name, deadline).await? {
                        outcome = Some(Ok(payload));
                        continue;
                    }
                    if deadline.is_some_and(|d| now >= d) {
                        outcome = Some(Err(ProviderError::new(
                            providers_core::ErrorCode::Timeout,
                            format!("signal '{name}' did not arrive in time"),
                        )));
                        continue;
                    }
                    // Released as waiting first, then the signals read again: a signal sent
                    // before the release is seen here; one sent after finds the instance
                    // waiting and makes it due itself. A cancel made meanwhile keeps it due.
                    sqlx::query(
                        "UPDATE wf_instances SET lease_owner = NULL, lease_until_ms = NULL, \
                         due_ms = CASE WHEN cancel_requested = 1 THEN $1 ELSE $2 END \
                         WHERE id = $3 AND lease_owner = $4 AND rev = $5",
                    )
                    .bind(now)
                    .bind(deadline)
                    .bind(&inst.id)
                    .bind(&self.owner)
                    .bind(inst.rev)
                    .execute(&self.pool)
                    .await
                    .map_err(|e| e.to_string())?;
                    if self.signal(&inst.id, &name, deadline).await?.is_some() {
                        sqlx::query(
                            "UPDATE wf_instances SET due_ms = $1 WHERE id = $2 AND state = 'WAITING'",
                        )
                        .bind(self.clock.now_ms())
                        .bind(&inst.id)
                        .execute(&self.pool)
                        .await
                        .map_err(|e| e.to_string())?;
                    }
                    return Ok(());
                }
            }
        }
        self.release(inst, Some(self.clock.now_ms())).await;
        Ok(())
    }

    /// The payload of signal `name` if it arrived (by `deadline`, when there is one).
    async fn signal(
        &self,
        instance: &str,
        name: &str,
        deadline: Option<i64>,
    ) -> Result<Option<Value>, String> {
        let row = sqlx::query(
            "SELECT payload FROM wf_signals WHERE instance = $1 AND name = $2 AND at_ms <= $3",
        )
        .bind(instance)
        .bind(name)
        .bind(deadline.unwrap_or(i64::MAX))
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| e.to_string())?;
        Ok(match row {
            Some(r) => Some(
                serde_json::from_str(&r.try_get::<String, _>(0).map_err(|e| e.to_string())?)
                    .unwrap_or(Value::Null),
            ),
            None => None,
        })
    }
}

/// After a fault (the database unreachable, a snapshot unreadable), how long an instance
/// rests before it is tried again: a fault that persists must not spin the executor.
const RETRY_AFTER_FAULT_MS: i64 = 5_000;

fn lease_ms(settings: &Settings) -> i64 {
    i64::try_from(settings.lease.as_millis()).unwrap_or(i64::MAX)
}

/// What the executor does after a transition is written.
enum Next {
    /// Release the instance: it waits, or it ended.
    Stop,
    /// Look again at once (a step was skipped or ended).
    Continue,
    /// Make this call, then apply its outcome.
    Call(Box<StepCall>),
    /// Read whether this signal has arrived; apply it if so, else wait for it until the
    /// deadline (if any).
    Signal(String, Option<i64>),
}

/// Scales a definition's duration to the executor's clock.
fn scaled(ms: u64, settings: &Settings) -> i64 {
    let ms = (ms as f64 / settings.time_scale.max(f64::MIN_POSITIVE)).ceil();
    if ms >= i64::MAX as f64 {
        i64::MAX
    } else {
        (ms as i64).max(1)
    }
}

/// The wait before a retry: the policy's delay, scaled, with equal jitter (half fixed, half
/// random) so that instances failing together do not retry together.
fn backoff(delay_ms: u64, settings: &Settings) -> i64 {
    let full = scaled(delay_ms, settings);
    let half = full / 2;
    half + rand::rng().random_range(0..=full - half)
}

fn event(kind: &'static str, step: &str, detail: Value) -> Event {
    Event::new(kind, Some(step), detail)
}

/// Moves `inst` one transition on, given the outcome of the call the last transition asked
/// for. Pure: what it decides is written by the caller, fenced by the revision.
fn advance(
    inst: &mut Instance,
    loaded: &Loaded,
    now: i64,
    outcome: Option<Result<Value, ProviderError>>,
    events: &mut Vec<Event>,
    settings: &Settings,
) -> Next {
    let steps = &loaded.definition.steps;
    inst.due_ms = None;
    if let Some(outcome) = outcome
        && let Some(next) = apply(inst, loaded, now, outcome, events, settings)
    {
        return next;
    }
    if inst.cancel_requested && !state::is_final(&inst.state) && inst.state != state::COMPENSATING {
        events.push(Event::new("cancelling", None, json!({})));
        begin_compensation(inst, state::CANCELLED);
    }
    let cursor = usize::try_from(inst.cursor).unwrap_or(usize::MAX);
    match inst.state.as_str() {
        state::COMPENSATING => {
            // Rewinding (a send-back or resubmit): only the steps that will run again are
            // undone, then the workflow runs on from its cursor.
            let rewind = inst.ending.as_deref() == Some(state::RUNNING);
            while let Some((id, _)) = inst.done.last().map(|d| done_entry(d)) {
                let found = loaded.definition.step(id);
                if rewind && found.is_some_and(|(i, _)| (i as i64) < inst.cursor) {
                    break;
                }
                match found.map(|(_, s)| &s.kind) {
                    Some(StepKind::Call {
                        compensate: Some(_),
                        ..
                    }) => break,
                    _ => {
                        inst.done.pop();
                    }
                }
            }
            let last = inst.done.last().map(|d| done_entry(d)).filter(|(id, _)| {
                !rewind
                    || loaded
                        .definition
                        .step(id)
                        .is_some_and(|(i, _)| (i as i64) >= inst.cursor)
            });
            let Some((id, round)) = last.map(|(id, round)| (id.to_owned(), round)) else {
                let ending = inst.ending.take().unwrap_or_else(|| state::FAILED.into());
                if rewind {
                    events.push(Event::new(
                        "undone",
                        None,
                        json!({"resume_at": inst.cursor}),
                    ));
                } else {
                    events.push(Event::new(
                        "ended",
                        None,
                        json!({"state": ending, "error": inst.error}),
                    ));
                }
                inst.state = ending;
                inst.role = None;
                inst.escalated_to = None;
                return if rewind { Next::Continue } else { Next::Stop };
            };
            let Some((_, step)) = loaded.definition.step(&id) else {
                return Next::Stop;
            };
            let StepKind::Call {
                compensate: Some(c),
                run_as,
                ..
            } = &step.kind
            else {
                return Next::Stop;
            };
            // The undo names the run it undoes, and runs as that run did.
            let key = format!("{}:{}:{}:undo", inst.id, step.id, round);
            let identity = match run_as {
                None => Ok(None),
                Some(approval) => approver(inst, approval).map(Some),
            };
            match template::resolve(&c.payload, &scope(inst, &key))
                .and_then(|p| identity.map(|i| (p, i)))
            {
                Ok((payload, identity)) => {
                    events.push(event(
                        "compensation_started",
                        &step.id,
                        json!({"attempt": inst.attempt + 1, "idempotency_key": key}),
                    ));
                    let mut call = call_of(inst, &step.id, &c.service, &c.action, payload, key);
                    if let Some((subject, roles, company)) = identity {
                        (call.subject, call.roles, call.company_id) = (subject, roles, company);
                    }
                    Next::Call(Box::new(call))
                }
                Err(e) => {
                    events.push(event("compensation_failed", &step.id, json!({"error": e})));
                    note_error(inst, format!("compensation of step '{}': {e}", step.id));
                    inst.done.pop();
                    Next::Continue
                }
            }
        }
        state::INITIATED | state::RUNNING | state::APPROVED | state::WAITING => {
            if inst.state == state::INITIATED {
                inst.state = state::RUNNING.into();
            }
            let Some(step) = steps.get(cursor) else {
                events.push(Event::new("completed", None, json!({})));
                inst.state = state::COMPLETED.into();
                return Next::Stop;
            };
            if inst.entered_ms.is_none()
                && inst.attempt == 0
                && let Some(condition) = loaded.conditions.get(&step.id)
            {
                match holds(condition, inst) {
                    Ok(true) => {}
                    Ok(false) => {
                        events.push(event("skipped", &step.id, json!({"when": step.when})));
                        inst.cursor += 1;
                        return Next::Continue;
                    }
                    Err(e) => {
                        events.push(event("step_failed", &step.id, json!({"error": e})));
                        note_error(inst, format!("step '{}' when: {e}", step.id));
                        begin_compensation(inst, state::FAILED);
                        return Next::Continue;
                    }
                }
            }
            match &step.kind {
                StepKind::Call {
                    service,
                    action,
                    payload,
                    run_as,
                    ..
                } => {
                    let key = format!("{}:{}:{}", inst.id, step.id, inst.round);
                    let payload = template::resolve(payload, &scope(inst, &key));
                    let identity = match run_as {
                        None => Ok(None),
                        Some(approval) => approver(inst, approval).map(Some),
                    };
                    match payload.and_then(|p| identity.map(|i| (p, i))) {
                        Ok((payload, identity)) => {
                            if inst.state == state::WAITING {
                                inst.state = state::RUNNING.into();
                            }
                            let mut call =
                                call_of(inst, &step.id, service, action, payload, key.clone());
                            let mut detail =
                                json!({"attempt": inst.attempt + 1, "idempotency_key": key});
                            if let Some((subject, roles, company)) = identity {
                                detail["run_as"] = Value::from(subject.as_str());
                                (call.subject, call.roles, call.company_id) =
                                    (subject, roles, company);
                            }
                            events.push(event("step_started", &step.id, detail));
                            Next::Call(Box::new(call))
                        }
                        Err(e) => {
                            events.push(event("step_failed", &step.id, json!({"error": e})));
                            note_error(inst, format!("step '{}': {e}", step.id));
                            begin_compensation(inst, state::FAILED);
                            Next::Continue
                        }
                    }
                }
                StepKind::Approval {
                    role,
                    sla_ms,
                    escalate_after_ms,
                    escalate_to,
                    ..
                } => {
                    inst.state = state::PENDING_APPROVAL.into();
                    inst.entered_ms = Some(now);
                    inst.role = Some(role.clone());
                    inst.escalated_to = None;
                    inst.reminders = 0;
                    let sla_due = sla_ms.map(|ms| now + scaled(ms, settings));
                    let escalate_at = escalate_after_ms.map(|ms| now + scaled(ms, settings));
                    inst.due_ms = [sla_due, escalate_at].into_iter().flatten().min();
                    events.push(event(
                        "awaiting_approval",
                        &step.id,
                        json!({"role": role, "sla_due_ms": sla_due, "escalate_to": escalate_to, "escalate_at_ms": escalate_at}),
                    ));
                    Next::Stop
                }
                StepKind::Timer { duration_ms } => match inst.entered_ms {
                    None => {
                        inst.entered_ms = Some(now);
                        inst.state = state::WAITING.into();
                        inst.due_ms = Some(now + scaled(*duration_ms, settings));
                        events.push(event(
                            "timer_started",
                            &step.id,
                            json!({"fires_ms": inst.due_ms}),
                        ));
                        Next::Stop
                    }
                    Some(at) if now >= at + scaled(*duration_ms, settings) => {
                        events.push(event("timer_fired", &step.id, json!({})));
                        step_done(inst, &step.id, Value::Null);
                        Next::Continue
                    }
                    Some(at) => {
                        inst.due_ms = Some(at + scaled(*duration_ms, settings));
                        Next::Stop
                    }
                },
                StepKind::Signal { signal, timeout_ms } => {
                    let entered = *inst.entered_ms.get_or_insert(now);
                    let deadline = timeout_ms.map(|ms| entered + scaled(ms, settings));
                    if inst.state != state::WAITING {
                        events.push(event(
                            "waiting_for_signal",
                            &step.id,
                            json!({"signal": signal, "timeout_ms": deadline}),
                        ));
                    }
                    inst.state = state::WAITING.into();
                    // Whether it arrived, or the wait ran out, is read by the caller.
                    Next::Signal(signal.clone(), deadline)
                }
            }
        }
        state::PENDING_APPROVAL => {
            // Claimed because an SLA event is due.
            let Some(step) = steps.get(cursor) else {
                return Next::Stop;
            };
            let StepKind::Approval {
                role,
                sla_ms,
                remind_every_ms,
                escalate_to,
                escalate_after_ms,
                ..
            } = &step.kind
            else {
                return Next::Stop;
            };
            let entered = inst.entered_ms.unwrap_or(now);
            let sla_at = sla_ms.map(|ms| entered + scaled(ms, settings));
            let every = remind_every_ms.map(|ms| scaled(ms, settings));
            if let Some(at) = sla_at {
                if inst.reminders == 0 && now >= at {
                    inst.reminders = 1;
                    events.push(event(
                        "sla_breached",
                        &step.id,
                        json!({"role": role, "sla_due_ms": at}),
                    ));
                    tracing::warn!(instance = %inst.id, tenant = %inst.tenant, step = %step.id, role = %role, "workflow approval is past its SLA");
                } else if let Some(every) = every
                    && inst.reminders > 0
                    && now >= at + inst.reminders * every
                {
                    inst.reminders += 1;
                    events.push(event("reminder", &step.id, json!({"role": inst.escalated_to.as_deref().unwrap_or(role), "reminder": inst.reminders - 1})));
                }
            }
            let escalate_at = escalate_after_ms.map(|ms| entered + scaled(ms, settings));
            if let (Some(at), Some(to)) = (escalate_at, escalate_to)
                && inst.escalated_to.is_none()
                && now >= at
            {
                inst.escalated_to = Some(to.clone());
                events.push(event(
                    "escalated",
                    &step.id,
                    json!({"from": role, "to": to}),
                ));
                tracing::warn!(instance = %inst.id, tenant = %inst.tenant, step = %step.id, to = %to, "workflow approval escalated");
            }
            let next_reminder = match (sla_at, every) {
                (Some(at), _) if inst.reminders == 0 => Some(at),
                (Some(at), Some(every)) => Some(at + inst.reminders * every),
                _ => None,
            };
            let next_escalation = escalate_at.filter(|_| inst.escalated_to.is_none());
            inst.due_ms = [next_reminder, next_escalation].into_iter().flatten().min();
            Next::Stop
        }
        _ => Next::Stop,
    }
}

/// Applies a call's outcome; `Some` when that already decides what comes next.
fn apply(
    inst: &mut Instance,
    loaded: &Loaded,
    now: i64,
    outcome: Result<Value, ProviderError>,
    events: &mut Vec<Event>,
    settings: &Settings,
) -> Option<Next> {
    let cursor = usize::try_from(inst.cursor).unwrap_or(usize::MAX);
    if inst.state == state::COMPENSATING {
        let last = done_entry(inst.done.last()?).0.to_owned();
        let retry = match loaded.definition.step(&last).map(|(_, s)| &s.kind) {
            Some(StepKind::Call { retry, .. }) => retry.clone(),
            _ => Default::default(),
        };
        match outcome {
            Ok(_) => {
                events.push(event(
                    "compensated",
                    &last,
                    json!({"attempt": inst.attempt + 1}),
                ));
                inst.done.pop();
                inst.attempt = 0;
            }
            Err(e) => {
                if let Some(next) = retry_later(
                    inst,
                    &retry,
                    &e,
                    now,
                    settings,
                    "compensation_failed",
                    &last,
                    events,
                ) {
                    return Some(next);
                }
                note_error(
                    inst,
                    format!("compensation of step '{last}' failed: {}", e.detail),
                );
                inst.done.pop();
                inst.attempt = 0;
            }
        }
        return None;
    }
    let step = loaded.definition.steps.get(cursor)?;
    let StepKind::Call { retry, .. } = &step.kind else {
        // A signal step's payload, or its wait running out.
        match outcome {
            Ok(payload) => {
                events.push(event("signal_received", &step.id, json!({})));
                step_done(inst, &step.id, payload);
                if inst.state == state::WAITING {
                    inst.state = state::RUNNING.into();
                }
            }
            Err(e) => {
                events.push(event(
                    "step_failed",
                    &step.id,
                    json!({"code": e.code.as_str(), "error": e.detail, "final": true}),
                ));
                note_error(inst, format!("step '{}': {}", step.id, e.detail));
                begin_compensation(inst, state::FAILED);
            }
        }
        return None;
    };
    match outcome {
        Ok(output) => {
            events.push(event(
                "step_completed",
                &step.id,
                json!({"attempt": inst.attempt + 1}),
            ));
            inst.done.push(format!("{}@{}", step.id, inst.round));
            step_done(inst, &step.id, output);
            None
        }
        Err(e) => {
            if let Some(next) = retry_later(
                inst,
                retry,
                &e,
                now,
                settings,
                "step_failed",
                &step.id,
                events,
            ) {
                return Some(next);
            }
            note_error(
                inst,
                format!(
                    "step '{}' failed: {}: {}",
                    step.id,
                    e.code.as_str(),
                    e.detail
                ),
            );
            begin_compensation(inst, state::FAILED);
            None
        }
    }
}

/// Records a failed try of `step`'s call (or its compensation) as `kind`: with the time of the
/// next try when `retry` allows one (`Some(Stop)`: it rests until then), else as final.
#[allow(
    clippy::too_many_arguments,
    reason = "one call site each for steps and compensations"
)]
fn retry_later(
    inst: &mut Instance,
    retry: &crate::definition::Retry,
    e: &ProviderError,
    now: i64,
    settings: &Settings,
    kind: &'static str,
    step: &str,
    events: &mut Vec<Event>,
) -> Option<Next> {
    let tries = u32::try_from(inst.attempt + 1).unwrap_or(u32::MAX);
    let mut detail = json!({"code": e.code.as_str(), "error": e.detail, "attempt": tries});
    if retry.again(e.code, tries) {
        let at = now + backoff(retry.delay_ms(tries), settings);
        inst.attempt += 1;
        inst.due_ms = Some(at);
        detail["retry_at_ms"] = json!(at);
        events.push(event(kind, step, detail));
        return Some(Next::Stop);
    }
    detail["final"] = json!(true);
    events.push(event(kind, step, detail));
    None
}

/// A completed step as `done` keeps it: `<step>@<round>`.
fn done_entry(entry: &str) -> (&str, i64) {
    match entry.rsplit_once('@') {
        Some((step, round)) => (step, round.parse().unwrap_or(0)),
        None => (entry, 0),
    }
}

fn step_done(inst: &mut Instance, step: &str, output: Value) {
    inst.outputs.insert(step.to_owned(), output);
    inst.cursor += 1;
    inst.attempt = 0;
    inst.entered_ms = None;
}

fn note_error(inst: &mut Instance, error: String) {
    inst.error = Some(match inst.error.take() {
        Some(earlier) => format!("{earlier}; {error}"),
        None => error,
    });
}

/// Starts undoing completed steps, to end in `ending`.
pub(crate) fn begin_compensation(inst: &mut Instance, ending: &str) {
    inst.state = state::COMPENSATING.into();
    inst.ending = Some(ending.to_owned());
    inst.attempt = 0;
    inst.entered_ms = None;
    inst.role = None;
    inst.escalated_to = None;
}

fn scope<'a>(inst: &'a Instance, key: &'a str) -> Scope<'a> {
    Scope {
        input: &inst.input,
        outputs: &inst.outputs,
        id: &inst.id,
        requester: &inst.requester,
        tenant: &inst.tenant,
        idempotency_key: key,
    }
}

fn call_of(
    inst: &Instance,
    step: &str,
    service: &str,
    action: &str,
    payload: Value,
    idempotency_key: String,
) -> StepCall {
    StepCall {
        tenant: inst.tenant.clone(),
        subject: inst.requester.clone(),
        roles: inst.roles.clone(),
        company_id: inst.company_id.clone(),
        instance: inst.id.clone(),
        step: step.to_owned(),
        service: service.to_owned(),
        action: action.to_owned(),
        payload,
        idempotency_key,
    }
}

/// Who decided approval step `step`, with the roles and company they held then.
fn approver(inst: &Instance, step: &str) -> Result<(String, Vec<String>, Option<String>), String> {
    let decided = inst
        .outputs
        .get(step)
        .filter(|o| o["decision"] == "approved")
        .ok_or_else(|| {
            format!("run_as '{step}': that approval step was not approved (it was skipped?)")
        })?;
    let subject = decided["by"].as_str().unwrap_or_default().to_owned();
    let roles = decided["roles"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let company = decided["company_id"].as_str().map(str::to_owned);
    Ok((subject, roles, company))
}

/// Evaluates a `when` on the instance: variables `input`, `steps` (outputs by step id) and
/// `workflow` (`id`, `requester`, `tenant`).
fn holds(condition: &providers_cel::Expression, inst: &Instance) -> Result<bool, String> {
    let steps = Value::Object(inst.outputs.clone());
    let workflow = json!({"id": inst.id, "requester": inst.requester, "tenant": inst.tenant});
    let vars = providers_cel::Variables::new([
        ("input", &inst.input),
        ("steps", &steps),
        ("workflow", &workflow),
    ]);
    const MAX_COST: u64 = 1_000_000;
    let cost = condition.cost(vars.elements);
    if cost > MAX_COST {
        return Err(format!(
            "the condition's cost bound on this input is {cost}, over {MAX_COST}"
        ));
    }
    match condition.evaluate(&vars)? {
        Value::Bool(b) => Ok(b),
        other => Err(format!("the condition gave {other}, not true or false")),
    }
}
