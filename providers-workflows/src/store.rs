//! Instances and their history in the database, written once for SQLite and PostgreSQL.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use providers_core::ProviderError;
use serde_json::{Map, Value, json};
use sqlx::any::AnyRow;
use sqlx::{AnyPool, Row};

use crate::definition::Definition;

/// Instance states.
pub mod state {
    /// Started; no step has run yet.
    pub const INITIATED: &str = "INITIATED";
    /// Running steps.
    pub const RUNNING: &str = "RUNNING";
    /// Waiting for an approval step's decision.
    pub const PENDING_APPROVAL: &str = "PENDING_APPROVAL";
    /// Every approval step is approved; the remaining steps run.
    pub const APPROVED: &str = "APPROVED";
    /// Waiting on a timer or a signal.
    pub const WAITING: &str = "WAITING";
    /// Sent back to the requester, who may resubmit.
    pub const SENT_BACK: &str = "SENT_BACK";
    /// Undoing completed steps before ending as `ending` says.
    pub const COMPENSATING: &str = "COMPENSATING";
    /// Done: every step ran.
    pub const COMPLETED: &str = "COMPLETED";
    /// An approver rejected it.
    pub const REJECTED: &str = "REJECTED";
    /// Cancelled by a caller.
    pub const CANCELLED: &str = "CANCELLED";
    /// A step failed for good.
    pub const FAILED: &str = "FAILED";

    /// Whether nothing more happens to an instance in `state`.
    pub fn is_final(state: &str) -> bool {
        matches!(state, COMPLETED | REJECTED | CANCELLED | FAILED)
    }
}

/// One instance as stored.
#[derive(Debug, Clone)]
pub struct Instance {
    /// Its id.
    pub id: String,
    /// The tenant it belongs to.
    pub tenant: String,
    /// The definition's name.
    pub definition: String,
    /// The definition's version.
    pub version: i64,
    /// The snapshot it runs.
    pub digest: String,
    /// The key it was started with, if any.
    pub idempotency_key: Option<String>,
    pub(crate) request_hash: String,
    /// Who started it; its steps call as this subject.
    pub requester: String,
    /// The requester's roles when it started; its steps call with them.
    pub roles: Vec<String>,
    /// The requester's company.
    pub company_id: Option<String>,
    /// See [`state`].
    pub state: String,
    /// While compensating: the state it ends in.
    pub ending: Option<String>,
    /// The current step's index.
    pub cursor: i64,
    /// Counts passes through the steps (a send-back or resubmit starts a new one), so a step
    /// run again on purpose gets a new idempotency key and a retry keeps its old one.
    pub round: i64,
    /// Failed tries of the current call.
    pub attempt: i64,
    /// When the current waiting step began.
    pub entered_ms: Option<i64>,
    /// The role the pending approval waits for.
    pub role: Option<String>,
    /// The role it was escalated to.
    pub escalated_to: Option<String>,
    /// SLA reminders sent for the current approval.
    pub reminders: i64,
    /// The input.
    pub input: Value,
    /// Outputs of completed steps, by step id.
    pub outputs: Map<String, Value>,
    /// Completed call steps in order (`<step>@<round>`), for compensation.
    pub done: Vec<String>,
    /// Why it failed, when it did.
    pub error: Option<String>,
    /// A cancel was asked for.
    pub cancel_requested: bool,
    /// When the executor should look at it next (none: only a caller's action moves it).
    pub due_ms: Option<i64>,
    /// The revision read.
    pub rev: i64,
    /// When it started.
    pub created_ms: i64,
    /// When it last changed.
    pub updated_ms: i64,
}

/// Every column, in the order [`Instance::from_row`] reads them.
pub(crate) const COLUMNS: &str = "id, tenant, definition, version, digest, idempotency_key, request_hash, \
    requester, roles, company_id, state, ending, cursor, round, attempt, entered_ms, role, escalated_to, \
    reminders, input, outputs, done, error, cancel_requested, due_ms, rev, created_ms, updated_ms";

fn parse_json(text: &str, column: &str) -> Result<Value, sqlx::Error> {
    serde_json::from_str(text).map_err(|e| sqlx::Error::ColumnDecode {
        index: column.to_owned(),
        source: Box::new(e),
    })
}

impl Instance {
    pub(crate) fn from_row(row: &AnyRow) -> Result<Self, sqlx::Error> {
        let roles: Vec<String> = match parse_json(&row.try_get::<String, _>("roles")?, "roles")? {
            Value::Array(items) => items
                .into_iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        let outputs = match parse_json(&row.try_get::<String, _>("outputs")?, "outputs")? {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        let done = match parse_json(&row.try_get::<String, _>("done")?, "done")? {
            Value::Array(items) => items
                .into_iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        Ok(Self {
            id: row.try_get("id")?,
            tenant: row.try_get("tenant")?,
            definition: row.try_get("definition")?,
            version: row.try_get("version")?,
            digest: row.try_get("digest")?,
            idempotency_key: row.try_get("idempotency_key")?,
            request_hash: row.try_get("request_hash")?,
            requester: row.try_get("requester")?,
            roles,
            company_id: row.try_get("company_id")?,
            state: row.try_get("state")?,
            ending: row.try_get("ending")?,
            cursor: row.try_get("cursor")?,
            round: row.try_get("round")?,
            attempt: row.try_get("attempt")?,
            entered_ms: row.try_get("entered_ms")?,
            role: row.try_get("role")?,
            escalated_to: row.try_get("escalated_to")?,
            reminders: row.try_get("reminders")?,
            input: parse_json(&row.try_get::<String, _>("input")?, "input")?,
            outputs,
            done,
            error: row.try_get("error")?,
            cancel_requested: row.try_get::<i64, _>("cancel_requested")? != 0,
            due_ms: row.try_get("due_ms")?,
            rev: row.try_get("rev")?,
            created_ms: row.try_get("created_ms")?,
            updated_ms: row.try_get("updated_ms")?,
        })
    }

    /// The summary `list` shows.
    pub fn summary(&self, definition: Option<&Definition>) -> Value {
        let step = definition
            .and_then(|d| d.steps.get(usize::try_from(self.cursor).ok()?))
            .filter(|_| !state::is_final(&self.state));
        json!({
            "id": self.id,
            "definition": self.definition,
            "version": self.version,
            "state": self.state,
            "step": step.map(|s| s.id.clone()),
            "step_name": step.map(|s| s.name.clone()),
            "role": self.role,
            "escalated_to": self.escalated_to,
            "requester": self.requester,
            "created_ms": self.created_ms,
            "updated_ms": self.updated_ms,
        })
    }
}

/// One history entry to write.
#[derive(Debug, Clone)]
pub struct Event {
    /// What happened (`started`, `step_completed`, `approved`, `escalated`, …).
    pub kind: &'static str,
    /// The step it concerns.
    pub step: Option<String>,
    /// Who did it (a subject; none for the executor).
    pub actor: Option<String>,
    /// The actor's comment.
    pub comment: Option<String>,
    /// Anything else, as JSON.
    pub detail: Value,
}

impl Event {
    /// An event of the executor's.
    pub fn new(kind: &'static str, step: Option<&str>, detail: Value) -> Self {
        Self {
            kind,
            step: step.map(str::to_owned),
            actor: None,
            comment: None,
            detail,
        }
    }
}

pub(crate) async fn write_events<'c>(
    tx: &mut sqlx::Transaction<'c, sqlx::Any>,
    instance: &str,
    at_ms: i64,
    events: &[Event],
) -> Result<(), sqlx::Error> {
    let rows: Vec<(&str, i64, &Event)> = events.iter().map(|e| (instance, at_ms, e)).collect();
    insert_events(tx, &rows).await
}

/// Most events in one `INSERT` (7 values each, far below either database's bound limit).
const EVENTS_PER_INSERT: usize = 500;

/// Inserts `(instance, event)` rows, many per statement.
async fn insert_events<'c>(
    tx: &mut sqlx::Transaction<'c, sqlx::Any>,
    rows: &[(&str, i64, &Event)],
) -> Result<(), sqlx::Error> {
    for chunk in rows.chunks(EVENTS_PER_INSERT) {
        let mut sql = String::from(
            "INSERT INTO wf_history (instance, at_ms, kind, step, actor, comment, detail) VALUES ",
        );
        for i in 0..chunk.len() {
            let b = i * 7;
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!(
                "(${}, ${}, ${}, ${}, ${}, ${}, ${})",
                b + 1,
                b + 2,
                b + 3,
                b + 4,
                b + 5,
                b + 6,
                b + 7
            ));
        }
        // Only placeholders are formatted in; every value is bound.
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (instance, at_ms, e) in chunk {
            query = query
                .bind(*instance)
                .bind(*at_ms)
                .bind(e.kind)
                .bind(e.step.as_deref())
                .bind(e.actor.as_deref())
                .bind(e.comment.as_deref())
                .bind(e.detail.to_string());
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// Every column a write may change; `input` only where a caller changes it (a resubmit), so
/// the executor's writes do not rewrite it per step. A cancel asked for keeps the instance due
/// now whatever the write says, so a drive that did not see it yet cannot park it.
fn update_sql(with_input: bool) -> &'static str {
    if with_input {
        "UPDATE wf_instances SET state = $1, ending = $2, cursor = $3, round = $4, attempt = $5, \
         entered_ms = $6, role = $7, escalated_to = $8, reminders = $9, outputs = $10, \
         done = $11, error = $12, due_ms = CASE WHEN cancel_requested = 1 AND $1 NOT IN \
         ('COMPLETED', 'REJECTED', 'CANCELLED', 'FAILED', 'COMPENSATING') THEN $14 ELSE $13 END, \
         updated_ms = $14, rev = rev + 1, lease_owner = $15, lease_until_ms = $16, input = $19 \
         WHERE id = $17 AND rev = $18 RETURNING cancel_requested"
    } else {
        "UPDATE wf_instances SET state = $1, ending = $2, cursor = $3, round = $4, attempt = $5, \
         entered_ms = $6, role = $7, escalated_to = $8, reminders = $9, outputs = $10, \
         done = $11, error = $12, due_ms = CASE WHEN cancel_requested = 1 AND $1 NOT IN \
         ('COMPLETED', 'REJECTED', 'CANCELLED', 'FAILED', 'COMPENSATING') THEN $14 ELSE $13 END, \
         updated_ms = $14, rev = rev + 1, lease_owner = $15, lease_until_ms = $16 \
         WHERE id = $17 AND rev = $18 RETURNING cancel_requested"
    }
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>;

/// Binds `$1..$18` of [`update_sql`] for `inst`.
fn bind_update<'q>(
    query: AnyQuery<'q>,
    inst: &Instance,
    now_ms: i64,
    lease: Option<(&str, i64)>,
) -> AnyQuery<'q> {
    query
        .bind(inst.state.clone())
        .bind(inst.ending.clone())
        .bind(inst.cursor)
        .bind(inst.round)
        .bind(inst.attempt)
        .bind(inst.entered_ms)
        .bind(inst.role.clone())
        .bind(inst.escalated_to.clone())
        .bind(inst.reminders)
        .bind(Value::Object(inst.outputs.clone()).to_string())
        .bind(json!(inst.done).to_string())
        .bind(inst.error.clone())
        .bind(inst.due_ms)
        .bind(now_ms)
        .bind(lease.map(|(owner, _)| owner.to_owned()))
        .bind(lease.map(|(_, until)| until))
        .bind(inst.id.clone())
        .bind(inst.rev)
}

/// Writes `inst` if it is still at revision `inst.rev`: whether a cancel was asked for, or
/// `None` when it changed since it was read (nothing is written).
async fn update<'c>(
    tx: &mut sqlx::Transaction<'c, sqlx::Any>,
    inst: &Instance,
    now_ms: i64,
    lease: Option<(&str, i64)>,
    with_input: bool,
) -> Result<Option<bool>, sqlx::Error> {
    let mut query = bind_update(sqlx::query(update_sql(with_input)), inst, now_ms, lease);
    if with_input {
        query = query.bind(inst.input.to_string());
    }
    let row = query.fetch_optional(&mut **tx).await?;
    row.map(|r| r.try_get::<i64, _>(0).map(|c| c != 0))
        .transpose()
}

/// Writes `inst` (read at revision `inst.rev`) and `events` in one transaction. The lease is
/// released when `lease` is none, else held until its time. Returns whether a cancel was
/// asked for, or `None` when the instance changed since it was read (nothing is written).
pub(crate) async fn save(
    pool: &AnyPool,
    inst: &Instance,
    events: &[Event],
    now_ms: i64,
    lease: Option<(&str, i64)>,
) -> Result<Option<bool>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let Some(cancel) = update(&mut tx, inst, now_ms, lease, true).await? else {
        return Ok(None);
    };
    write_events(&mut tx, &inst.id, now_ms, events).await?;
    tx.commit().await?;
    Ok(Some(cancel))
}

/// One executor write waiting to be committed.
pub(crate) struct Pending {
    pub inst: Instance,
    pub events: Vec<Event>,
    pub now_ms: i64,
    pub lease: Option<(String, i64)>,
    pub reply: tokio::sync::oneshot::Sender<Result<Option<bool>, String>>,
}

/// Most writes committed together.
const BATCH: usize = 128;
/// Most history rows in one batch statement (with [`BATCH`], far below either database's
/// limit on bound values once padded); a single write with more goes alone, in a transaction.
const BATCH_EVENTS: usize = 1024;

/// Commits the executor's writes, many instances' in one transaction when they come together
/// (each still fenced by its own revision): what bounds throughput is commits (SQLite has one
/// writer; PostgreSQL flushes its log per commit). There is no writer task: whoever holds the
/// lock commits everything queued, its own write included, so an uncontended write costs no
/// hand-off between tasks, and a write that waited finds itself committed by the one before.
pub(crate) struct Writer {
    pool: AnyPool,
    postgres: bool,
    queue: std::sync::Mutex<Vec<Pending>>,
    committing: tokio::sync::Mutex<()>,
}

impl Writer {
    pub(crate) fn new(pool: AnyPool, postgres: bool) -> Self {
        Self {
            postgres,
            pool,
            queue: std::sync::Mutex::new(Vec::new()),
            committing: tokio::sync::Mutex::new(()),
        }
    }

    /// Commits `inst` and `events` (see [`save`]), with whatever else is waiting.
    pub(crate) async fn save(
        &self,
        inst: Instance,
        events: Vec<Event>,
        now_ms: i64,
        lease: Option<(String, i64)>,
    ) -> Result<Option<bool>, String> {
        let (reply, mut written) = tokio::sync::oneshot::channel();
        self.queue
            .lock()
            .map_err(|_| "the workflow write queue is poisoned".to_owned())?
            .push(Pending {
                inst,
                events,
                now_ms,
                lease,
                reply,
            });
        loop {
            let _turn = self.committing.lock().await;
            if let Some(done) = Self::answered(&mut written) {
                return done;
            }
            let batch: Vec<Pending> = {
                let mut queue = self
                    .queue
                    .lock()
                    .map_err(|_| "the workflow write queue is poisoned".to_owned())?;
                let mut n = 0;
                let mut events = 0;
                while let Some(p) = queue.get(n) {
                    if n > 0 && (n == BATCH || events + p.events.len() > BATCH_EVENTS) {
                        break;
                    }
                    events += p.events.len();
                    n += 1;
                }
                queue.drain(..n).collect()
            };
            if batch.is_empty() {
                // Ours is neither queued nor answered: cannot happen, as whoever took it
                // answers (or drops it) before letting go of the lock.
                return Err("the workflow write was lost before its commit".into());
            }
            match write_batch(&self.pool, self.postgres, &batch).await {
                Ok(outcomes) => {
                    for (p, outcome) in batch.into_iter().zip(outcomes) {
                        let _ = p.reply.send(Ok(outcome));
                    }
                }
                Err(e) => {
                    let e = e.to_string();
                    for p in batch {
                        let _ = p.reply.send(Err(e.clone()));
                    }
                }
            }
            if let Some(done) = Self::answered(&mut written) {
                return done;
            }
        }
    }

    /// The answer to a queued write, once it was committed or abandoned (the drive that took
    /// it into its batch was dropped mid-commit: then it is in doubt, and retried from the
    /// database's state like any fault).
    fn answered(
        written: &mut tokio::sync::oneshot::Receiver<Result<Option<bool>, String>>,
    ) -> Option<Result<Option<bool>, String>> {
        match written.try_recv() {
            Ok(done) => Some(done),
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => None,
            Err(tokio::sync::oneshot::error::TryRecvError::Closed) => Some(Err(
                "the commit carrying this write was abandoned; its outcome is read back".into(),
            )),
        }
    }
}

/// The columns of one instance's row in a batch's `v` table, in the order they are bound.
const V_COLUMNS: &str = "id, rev, state, ending, cursor, round, attempt, entered_ms, role, \
     escalated_to, reminders, outputs, done, error, due_ms, now_ms, lease_owner, lease_until_ms";
const V_WIDTH: usize = 18;

/// The columns of one history row in a batch's `h` table: the row and its order in the batch.
const H_COLUMNS: &str = "instance, at_ms, kind, step, actor, comment, detail, ord";
const H_WIDTH: usize = 8;

/// What the executor's update sets from a row of `v`; as [`update_sql`] (a cancel asked for
/// keeps the instance due now), for many rows at once.
const V_SET: &str = "state = v.state, ending = v.ending, cursor = v.cursor, round = v.round, \
     attempt = v.attempt, entered_ms = v.entered_ms, role = v.role, escalated_to = v.escalated_to, \
     reminders = v.reminders, outputs = v.outputs, done = v.done, error = v.error, \
     due_ms = CASE WHEN wf_instances.cancel_requested = 1 AND v.state NOT IN \
     ('COMPLETED', 'REJECTED', 'CANCELLED', 'FAILED', 'COMPENSATING') THEN v.now_ms ELSE v.due_ms END, \
     updated_ms = v.now_ms, rev = wf_instances.rev + 1, lease_owner = v.lease_owner, \
     lease_until_ms = v.lease_until_ms, write_id = $1";

/// `($first, …), (…)`: `rows` rows of `width` placeholders.
fn placeholders(first: usize, rows: usize, width: usize) -> String {
    let mut out = String::with_capacity(rows * width * 5);
    for r in 0..rows {
        out.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..width {
            if c > 0 {
                out.push_str(", ");
            }
            out.push('$');
            out.push_str(&(first + r * width + c).to_string());
        }
        out.push(')');
    }
    out
}

/// The batch statement for `instances` rows of `v` and `events` rows of `h` (both already
/// rounded up, so the database sees few distinct statements and keeps each one prepared).
fn batch_sql(postgres: bool, instances: usize, events: usize) -> String {
    // `$1` is the batch's id.
    let v = placeholders(2, instances, V_WIDTH);
    let update = format!(
        "UPDATE wf_instances SET {V_SET} FROM v WHERE wf_instances.id = v.id AND wf_instances.rev = v.rev \
         RETURNING wf_instances.id, wf_instances.cancel_requested"
    );
    let h = (events > 0).then(|| placeholders(2 + instances * V_WIDTH, events, H_WIDTH));
    let insert = "INSERT INTO wf_history (instance, at_ms, kind, step, actor, comment, detail) \
         SELECT instance, at_ms, kind, step, actor, comment, detail FROM h";
    if postgres {
        // One statement: the history rows go in only for the instances `u` wrote.
        let mut sql = format!("WITH v ({V_COLUMNS}) AS (VALUES {v}), u AS ({update})");
        if let Some(h) = h {
            sql.push_str(&format!(
                ", h ({H_COLUMNS}) AS (VALUES {h}), e AS ({insert} WHERE instance IN (SELECT id FROM u) ORDER BY ord)"
            ));
        }
        sql.push_str(" SELECT id, cancel_requested FROM u");
        sql
    } else {
        // One script in one transaction: the instances its update wrote carry the batch's id.
        let mut sql = format!("BEGIN IMMEDIATE;\nWITH v ({V_COLUMNS}) AS (VALUES {v}) {update};\n");
        if let Some(h) = h {
            sql.push_str(&format!(
                "WITH h ({H_COLUMNS}) AS (VALUES {h}) {insert} WHERE EXISTS \
                 (SELECT 1 FROM wf_instances w WHERE w.id = h.instance AND w.write_id = $1) ORDER BY ord;\n"
            ));
        }
        sql.push_str("COMMIT;");
        sql
    }
}

/// Parameters of [`update_sql`] without `input` ($1..$18).
const UPDATE_PARAMS: usize = 18;

/// Commits one instance's write in one round trip: on PostgreSQL one statement (the update a
/// CTE, the history rows inserted only if it matched), on SQLite one script inside
/// `BEGIN IMMEDIATE … COMMIT` (the history rows guarded by the update's `changes()`).
/// Cheaper than [`write_batch`] for one row: no join with a `VALUES` table.
async fn write_one(
    pool: &AnyPool,
    postgres: bool,
    p: &Pending,
) -> Result<Option<bool>, sqlx::Error> {
    let update = update_sql(false);
    let h = (!p.events.is_empty()).then(|| placeholders(UPDATE_PARAMS + 1, p.events.len(), 7));
    let insert = "INSERT INTO wf_history (instance, at_ms, kind, step, actor, comment, detail) SELECT * FROM";
    let sql = if postgres {
        match h {
            Some(h) => format!(
                "WITH u AS ({update}), e AS ({insert} (VALUES {h}) AS h WHERE EXISTS (SELECT 1 FROM u)) \
                 SELECT cancel_requested FROM u"
            ),
            None => update.to_owned(),
        }
    } else {
        match h {
            Some(h) => format!(
                "BEGIN IMMEDIATE;\n{update};\n{insert} (VALUES {h}) WHERE changes() = 1;\nCOMMIT;"
            ),
            None => update.to_owned(),
        }
    };
    // Only placeholders are formatted in; every value is bound.
    let lease = p
        .lease
        .as_ref()
        .map(|(owner, until)| (owner.as_str(), *until));
    let mut query = bind_update(
        sqlx::query(sqlx::AssertSqlSafe(sql)),
        &p.inst,
        p.now_ms,
        lease,
    );
    for e in &p.events {
        query = query
            .bind(p.inst.id.clone())
            .bind(p.now_ms)
            .bind(e.kind)
            .bind(e.step.clone())
            .bind(e.actor.clone())
            .bind(e.comment.clone())
            .bind(e.detail.to_string());
    }
    // Every row is read: a SQLite script runs only as far as its rows are taken, so stopping
    // at the update's would leave the rest (the history, the commit) unrun.
    let rows = if postgres || p.events.is_empty() {
        query.fetch_all(pool).await?
    } else {
        let mut conn = pool.acquire().await?;
        match query.fetch_all(&mut *conn).await {
            Ok(rows) => rows,
            Err(e) => {
                rollback(conn).await;
                return Err(e);
            }
        }
    };
    rows.first()
        .map(|r| r.try_get::<i64, _>(0).map(|c| c != 0))
        .transpose()
}

/// Ends whatever a failed SQLite script left open before the connection is used again, or
/// drops the connection if that fails too.
async fn rollback(mut conn: sqlx::pool::PoolConnection<sqlx::Any>) {
    if let Err(r) = sqlx::query("ROLLBACK").execute(&mut *conn).await
        && !is_no_transaction(&r)
    {
        drop(conn.detach());
    }
}

/// Commits `batch` in one round trip: on PostgreSQL one statement (the updates from a
/// `VALUES` table, the history rows inserted only for the instances written), on SQLite one
/// script inside `BEGIN IMMEDIATE … COMMIT`. Each instance is written only at the revision it
/// names. Rows are padded (with rows that match nothing) to powers of two.
async fn write_batch(
    pool: &AnyPool,
    postgres: bool,
    batch: &[Pending],
) -> Result<Vec<Option<bool>>, sqlx::Error> {
    let event_count: usize = batch.iter().map(|p| p.events.len()).sum();
    if let [only] = batch {
        if event_count > BATCH_EVENTS {
            let lease = only.lease.as_ref().map(|(o, u)| (o.as_str(), *u));
            return Ok(vec![
                save(pool, &only.inst, &only.events, only.now_ms, lease).await?,
            ]);
        }
        return Ok(vec![write_one(pool, postgres, only).await?]);
    }
    let instances = batch.len().max(1).next_power_of_two();
    let events = if event_count == 0 {
        0
    } else {
        event_count.next_power_of_two()
    };
    let sql = batch_sql(postgres, instances, events);
    // Only placeholders are formatted in; every value is bound.
    let write_id = i64::from_ne_bytes(uuid::Uuid::new_v4().as_u64_pair().0.to_ne_bytes());
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(write_id);
    for p in batch {
        let inst = &p.inst;
        query = query
            .bind(Some(inst.id.clone()))
            .bind(Some(inst.rev))
            .bind(Some(inst.state.clone()))
            .bind(inst.ending.clone())
            .bind(Some(inst.cursor))
            .bind(Some(inst.round))
            .bind(Some(inst.attempt))
            .bind(inst.entered_ms)
            .bind(inst.role.clone())
            .bind(inst.escalated_to.clone())
            .bind(Some(inst.reminders))
            .bind(Some(Value::Object(inst.outputs.clone()).to_string()))
            .bind(Some(json!(inst.done).to_string()))
            .bind(inst.error.clone())
            .bind(inst.due_ms)
            .bind(Some(p.now_ms))
            .bind(p.lease.as_ref().map(|(owner, _)| owner.clone()))
            .bind(p.lease.as_ref().map(|(_, until)| *until));
    }
    for _ in batch.len()..instances {
        // Matches no row: its id is NULL.
        query = query
            .bind(None::<String>)
            .bind(None::<i64>)
            .bind(None::<String>)
            .bind(None::<String>)
            .bind(None::<i64>)
            .bind(None::<i64>)
            .bind(None::<i64>)
            .bind(None::<i64>)
            .bind(None::<String>)
            .bind(None::<String>)
            .bind(None::<i64>)
            .bind(None::<String>)
            .bind(None::<String>)
            .bind(None::<String>)
            .bind(None::<i64>)
            .bind(None::<i64>)
            .bind(None::<String>)
            .bind(None::<i64>);
    }
    let mut ord = 0_i64;
    for p in batch {
        for e in &p.events {
            ord += 1;
            query = query
                .bind(Some(p.inst.id.clone()))
                .bind(Some(p.now_ms))
                .bind(Some(e.kind))
                .bind(e.step.clone())
                .bind(e.actor.clone())
                .bind(e.comment.clone())
                .bind(Some(e.detail.to_string()))
                .bind(Some(ord));
        }
    }
    for _ in event_count..events {
        // Belongs to no instance: never inserted.
        query = query
            .bind(None::<String>)
            .bind(None::<i64>)
            .bind(None::<&'static str>)
            .bind(None::<String>)
            .bind(None::<String>)
            .bind(None::<String>)
            .bind(None::<String>)
            .bind(None::<i64>);
    }
    let rows = if postgres {
        query.fetch_all(pool).await?
    } else {
        let mut conn = pool.acquire().await?;
        match query.fetch_all(&mut *conn).await {
            Ok(rows) => rows,
            Err(e) => {
                rollback(conn).await;
                return Err(e);
            }
        }
    };
    let mut written = HashMap::with_capacity(rows.len());
    for row in &rows {
        let id: String = row.try_get(0)?;
        let cancel: i64 = row.try_get(1)?;
        written.insert(id, cancel != 0);
    }
    Ok(batch
        .iter()
        .map(|p| written.get(&p.inst.id).copied())
        .collect())
}

/// Whether `e` is SQLite saying no transaction was open (the script failed before `BEGIN`, or
/// the failure rolled it back already).
fn is_no_transaction(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.message().contains("no transaction is active"))
}

/// The instance `id` of `tenant`.
pub(crate) async fn load(
    pool: &AnyPool,
    tenant: &str,
    id: &str,
) -> Result<Option<Instance>, sqlx::Error> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM wf_instances WHERE tenant = $1 AND id = $2"
    )))
    .bind(tenant)
    .bind(id)
    .fetch_optional(pool)
    .await?;
    row.as_ref().map(Instance::from_row).transpose()
}

/// A definition snapshot with its compiled conditions and input schema.
pub struct Loaded {
    /// The definition.
    pub definition: Definition,
    /// Its digest.
    pub digest: String,
    /// Compiled `when` conditions by step id.
    pub conditions: std::collections::BTreeMap<String, providers_cel::Expression>,
    /// The input schema, compiled.
    pub input: Option<jsonschema::Validator>,
}

impl Loaded {
    /// Compiles `definition`.
    pub fn new(definition: Definition) -> Result<Self, String> {
        let conditions = definition.conditions()?;
        let input = match &definition.input {
            Some(schema) => {
                Some(jsonschema::validator_for(schema).map_err(|e| format!("input schema: {e}"))?)
            }
            None => None,
        };
        Ok(Self {
            digest: definition.digest(),
            definition,
            conditions,
            input,
        })
    }
}

/// Snapshots this process has read, by digest: a snapshot never changes.
static SNAPSHOTS: RwLock<Option<HashMap<String, Arc<Loaded>>>> = RwLock::new(None);

pub(crate) fn remember(loaded: &Arc<Loaded>) {
    if let Ok(mut map) = SNAPSHOTS.write() {
        map.get_or_insert_with(HashMap::new)
            .entry(loaded.digest.clone())
            .or_insert_with(|| loaded.clone());
    }
}

/// The snapshot with `digest`, from memory or the database.
pub(crate) async fn snapshot(pool: &AnyPool, digest: &str) -> Result<Arc<Loaded>, ProviderError> {
    if let Some(found) = SNAPSHOTS
        .read()
        .ok()
        .and_then(|m| m.as_ref().and_then(|m| m.get(digest).cloned()))
    {
        return Ok(found);
    }
    let row = sqlx::query("SELECT body FROM wf_definitions WHERE digest = $1")
        .bind(digest)
        .fetch_optional(pool)
        .await
        .map_err(crate::db_error)?
        .ok_or_else(|| {
            ProviderError::internal(format!("definition snapshot {digest} is missing"))
        })?;
    let body: String = row.try_get(0).map_err(crate::db_error)?;
    let definition: Definition = serde_json::from_str(&body)
        .map_err(|e| ProviderError::internal(format!("definition snapshot {digest}: {e}")))?;
    let loaded = Arc::new(Loaded::new(definition).map_err(ProviderError::internal)?);
    remember(&loaded);
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use providers_database::testing::TestDatabase;

    use super::*;

    async fn seeded(db: &TestDatabase) -> AnyPool {
        let pool = db.pool().await;
        crate::prepare(&pool).await.expect("workflow tables");
        sqlx::query(
            "INSERT INTO wf_definitions (digest, name, version, body, created_ms) VALUES ('d', 'f', 1, '{}', 0)",
        )
        .execute(&pool)
        .await
        .expect("definition");
        for id in ["a", "b", "c"] {
            sqlx::query(
                "INSERT INTO wf_instances (id, tenant, definition, version, digest, idempotency_key, request_hash, \
                 requester, roles, company_id, state, ending, cursor, round, attempt, entered_ms, role, escalated_to, \
                 reminders, input, outputs, done, error, cancel_requested, due_ms, lease_owner, lease_until_ms, rev, \
                 created_ms, updated_ms) VALUES ($1, 't', 'f', 1, 'd', NULL, 'h', 'u', '[]', NULL, 'RUNNING', NULL, 0, 0, 0, \
                 NULL, NULL, NULL, 0, '{}', '{}', '[]', NULL, $2, 0, NULL, NULL, 5, 0, 0)",
            )
            .bind(id)
            .bind(i64::from(id == "c"))
            .execute(&pool)
            .await
            .expect("instance");
        }
        pool
    }

    fn pending(mut inst: Instance, rev: i64, events: usize) -> Pending {
        inst.rev = rev;
        inst.cursor = 1;
        let event = |i: usize| Event {
            kind: "step_completed",
            step: Some(format!("s{i}")),
            actor: None,
            comment: Some("it's \"quoted\"".into()),
            detail: json!({"i": i}),
        };
        Pending {
            inst,
            events: (0..events).map(event).collect(),
            now_ms: 9,
            lease: Some(("me".into(), 99)),
            reply: tokio::sync::oneshot::channel().0,
        }
    }

    async fn history(pool: &AnyPool, id: &str) -> Vec<(String, Option<String>)> {
        sqlx::query("SELECT kind, step FROM wf_history WHERE instance = $1 ORDER BY id")
            .bind(id)
            .fetch_all(pool)
            .await
            .expect("history")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    /// One statement writes several instances: each update lands only at the revision it
    /// names, and a stale one's history rows are not written either.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_writes_each_instance_only_at_its_revision() {
        for db in TestDatabase::both().await {
            let pool = seeded(&db).await;
            let postgres = db.backend == "postgres";
            let load = |id: &'static str| {
                let pool = pool.clone();
                async move { load(&pool, "t", id).await.expect("read").expect("there") }
            };
            let batch = vec![
                pending(load("a").await, 5, 2),
                pending(load("b").await, 4, 1),
                pending(load("c").await, 5, 0),
            ];
            let outcomes = write_batch(&pool, postgres, &batch).await.expect("written");
            assert_eq!(
                outcomes,
                vec![Some(false), None, Some(true)],
                "{}",
                db.backend
            );
            let lease = |id: &'static str| {
                let pool = pool.clone();
                async move {
                    sqlx::query("SELECT lease_owner FROM wf_instances WHERE id = $1")
                        .bind(id)
                        .fetch_one(&pool)
                        .await
                        .expect("lease")
                        .get::<Option<String>, _>(0)
                }
            };
            let a = load("a").await;
            assert_eq!((a.rev, a.cursor), (6, 1), "{}", db.backend);
            assert_eq!(lease("a").await.as_deref(), Some("me"));
            let b = load("b").await;
            assert_eq!((b.rev, b.cursor), (5, 0), "{}", db.backend);
            assert_eq!(lease("b").await, None);
            assert_eq!(
                history(&pool, "a").await,
                vec![
                    ("step_completed".to_owned(), Some("s0".to_owned())),
                    ("step_completed".to_owned(), Some("s1".to_owned()))
                ]
            );
            assert!(history(&pool, "b").await.is_empty(), "{}", db.backend);
            // Alone, a write goes another way (no VALUES table): fenced the same.
            let alone = write_batch(&pool, postgres, &[pending(load("b").await, 4, 2)]).await;
            assert_eq!(alone.expect("written"), vec![None], "{}", db.backend);
            assert!(history(&pool, "b").await.is_empty(), "{}", db.backend);
            let alone = write_batch(&pool, postgres, &[pending(load("b").await, 5, 0)]).await;
            assert_eq!(alone.expect("written"), vec![Some(false)], "{}", db.backend);
            assert_eq!(load("b").await.rev, 6, "{}", db.backend);

            // A batch that fails after its update changes nothing, and every connection of
            // the pool is usable after it (no transaction left open).
            sqlx::query("ALTER TABLE wf_history RENAME TO wf_history_away")
                .execute(&pool)
                .await
                .expect("rename");
            let failed = write_batch(&pool, postgres, &[pending(load("a").await, 6, 1)]).await;
            assert!(failed.is_err(), "{}", db.backend);
            sqlx::query("ALTER TABLE wf_history_away RENAME TO wf_history")
                .execute(&pool)
                .await
                .expect("rename back");
            assert_eq!(load("a").await.rev, 6, "{}", db.backend);
            for _ in 0..4 {
                let at = load("a").await;
                let rev = at.rev;
                let outcomes = write_batch(&pool, postgres, &[pending(at, rev, 1)])
                    .await
                    .expect("written after a failure");
                assert_eq!(outcomes, vec![Some(false)], "{}", db.backend);
            }
            assert_eq!(load("a").await.rev, 10, "{}", db.backend);
            assert_eq!(history(&pool, "a").await.len(), 6, "{}", db.backend);
        }
    }
}
