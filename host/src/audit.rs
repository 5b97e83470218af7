//! The audit trail: one record per provider call, admin action, authentication failure and
//! authorization denial, written off the request path in batches, hash-chained per tenant.
//!
//! Each record's `hash` is SHA-256 over the previous record's hash and every field of its
//! own, so editing, inserting or deleting a row breaks the chain at that row; `audit_heads`
//! holds each chain's last link, which catches rows deleted from the end. [`verify`] walks the
//! chains. Records are kept in the host's own pool (plugins never reach it) and never hold a
//! payload, only its SHA-256.
//!
//! If the store fails, `on_failure` decides: `fail_closed` refuses provider calls (503) until
//! a write succeeds again; `buffer` keeps up to `buffer` records in memory and refuses calls
//! only once that is full. A store that works but writes slower than requests arrive slows
//! them instead: a request's record waits for room in the queue (`buffer` long) before the
//! response goes out. Either way nothing recorded is dropped while the host runs, and
//! shutdown flushes what is held.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use providers_core::ErrorCode;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::{AnyPool, Row};
use tokio::sync::{mpsc, oneshot};

/// What happens to calls when the audit store cannot be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Refuse provider calls (503) until the store is written again.
    FailClosed,
    /// Hold records in memory up to `buffer`, then refuse.
    Buffer,
}

/// `[audit]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSettings {
    /// Whether records are written at all.
    pub enabled: bool,
    /// See [`OnFailure`].
    pub on_failure: OnFailure,
    /// Records held unwritten at most (`buffer` mode: then calls are refused).
    pub buffer: usize,
    /// Records written per transaction at most.
    pub batch: usize,
    /// How long the writer lets a batch gather after its first record: under load, one
    /// transaction per `linger` instead of one per handful of records (each costs thread
    /// handoffs to the database driver). Records reach the database this much later.
    #[serde(with = "crate::config::duration")]
    pub linger: Duration,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            on_failure: OnFailure::Buffer,
            buffer: 10_000,
            batch: 500,
            linger: Duration::from_millis(5),
        }
    }
}

/// The chain of requests that name no configured tenant (a bad token, an unknown tenant).
pub const NO_TENANT: &str = "-";

/// The `prev_hash` of a chain's first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audit record before it is chained.
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// The tenant, or [`NO_TENANT`].
    pub tenant: String,
    /// `call`, `admin`, `authn` (no valid token) or `authz` (refused a route).
    pub kind: Cow<'static, str>,
    /// The token's subject, empty without one.
    pub subject: String,
    /// The service (for admin actions: the route's target, if any).
    pub service: String,
    /// The action (for admin actions: method and path).
    pub action: String,
    /// `ok`, `denied` (401/403) or `error`; see [`outcome_of`].
    pub outcome: Cow<'static, str>,
    /// The stable error code, empty on success.
    pub error_code: String,
    /// The request id.
    pub request_id: String,
    /// Time taken, microseconds.
    pub latency_us: i64,
    /// SHA-256 of the request payload, hex; empty when there is none.
    pub payload_sha256: String,
    /// Anything else worth keeping (a nested call's depth).
    pub note: String,
    /// When, milliseconds since the epoch.
    pub at_ms: i64,
}

/// The hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `ok` without an error, `denied` for a refused credential or permission, `error` otherwise.
pub fn outcome_of(code: Option<ErrorCode>) -> &'static str {
    match code {
        None => "ok",
        Some(ErrorCode::Unauthenticated | ErrorCode::Forbidden) => "denied",
        Some(_) => "error",
    }
}

/// What a record's hash covers, as JSON text: the previous hash, then every field in a fixed
/// order, unambiguously (an array). The writer stores this same text, so it is made once.
fn linked_fields(prev: &str, seq: i64, r: &Record) -> String {
    // A tuple serializes exactly as the array of its fields would, without building one.
    let fields = (
        prev,
        seq,
        &r.tenant,
        r.at_ms,
        &r.kind,
        &r.subject,
        &r.service,
        &r.action,
        &r.outcome,
        &r.error_code,
        &r.request_id,
        r.latency_us,
        &r.payload_sha256,
        &r.note,
    );
    serde_json::to_string(&fields).unwrap_or_default()
}

/// The hash linking a record to its chain.
fn link(prev: &str, seq: i64, r: &Record) -> String {
    sha256_hex(linked_fields(prev, seq, r).as_bytes())
}

/// A stored record's fields, as they were hashed.
fn record_of(r: &sqlx::any::AnyRow) -> Result<Record, sqlx::Error> {
    let text = |c: &str| r.try_get::<String, _>(c);
    Ok(Record {
        tenant: text("tenant")?,
        kind: text("kind")?.into(),
        subject: text("subject")?,
        service: text("service")?,
        action: text("action")?,
        outcome: text("outcome")?.into(),
        error_code: text("error_code")?,
        request_id: text("request_id")?,
        latency_us: r.try_get("latency_us")?,
        payload_sha256: text("payload_sha256")?,
        note: text("note")?,
        at_ms: r.try_get("at_ms")?,
    })
}

#[allow(
    clippy::large_enum_variant,
    reason = "records are the traffic and Close comes once: boxing would allocate per record"
)]
enum Msg {
    Record(Record),
    Close(oneshot::Sender<()>),
}

/// The trail's writer and its state.
pub struct Audit {
    settings: AuditSettings,
    tx: mpsc::Sender<Msg>,
    /// Records accepted and not yet committed.
    unwritten: Arc<AtomicUsize>,
    /// Whether the last write failed.
    failing: Arc<AtomicBool>,
    writer: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Audit {
    /// Starts the writer on `pool`.
    pub fn start(pool: AnyPool, settings: AuditSettings) -> Self {
        // The queue is the buffer: the writer takes a batch at a time, so a full queue makes
        // requests wait (a slow store) and admission refuses them first (a failing one).
        let (tx, rx) = mpsc::channel(settings.buffer.max(1));
        let unwritten = Arc::new(AtomicUsize::new(0));
        let failing = Arc::new(AtomicBool::new(false));
        let writer = tokio::spawn(write_loop(
            pool,
            rx,
            settings.batch.max(1),
            settings.linger,
            unwritten.clone(),
            failing.clone(),
        ));
        Self {
            settings,
            tx,
            unwritten,
            failing,
            writer: std::sync::Mutex::new(Some(writer)),
        }
    }

    /// Whether records are written.
    pub fn enabled(&self) -> bool {
        self.settings.enabled
    }

    /// Why a provider call must be refused now, if it must.
    pub fn refusal(&self) -> Option<String> {
        if !self.settings.enabled {
            return None;
        }
        match self.settings.on_failure {
            OnFailure::FailClosed if self.failing.load(Ordering::Acquire) => Some(
                "the audit trail cannot be written (audit.on_failure = \"fail_closed\"); calls resume once it can".into(),
            ),
            OnFailure::Buffer
                if self.failing.load(Ordering::Acquire)
                    && self.unwritten.load(Ordering::Acquire) >= self.settings.buffer =>
            {
                Some(format!(
                "the audit trail cannot be written and holds {} records unwritten, its limit (audit.buffer); calls resume once it can",
                self.settings.buffer
            ))
            }
            _ => None,
        }
    }

    /// Records not yet committed.
    pub fn unwritten(&self) -> usize {
        self.unwritten.load(Ordering::Acquire)
    }

    /// Queues `record`.
    pub async fn record(&self, mut record: Record) {
        if !self.settings.enabled {
            return;
        }
        if record.at_ms == 0 {
            record.at_ms = now_ms();
        }
        // PostgreSQL text cannot hold NUL: one such subject must not stop the trail.
        for field in [
            &mut record.tenant,
            &mut record.subject,
            &mut record.service,
            &mut record.action,
            &mut record.request_id,
            &mut record.note,
        ] {
            if field.contains('\0') {
                *field = field.replace('\0', "\u{fffd}");
            }
        }
        self.unwritten.fetch_add(1, Ordering::AcqRel);
        if self.tx.send(Msg::Record(record)).await.is_err() {
            self.unwritten.fetch_sub(1, Ordering::AcqRel);
            tracing::error!("audit record after the trail was closed; it is lost");
        }
    }

    /// Writes what is held and stops the writer, giving up at `deadline`.
    pub async fn close(&self, deadline: Instant) {
        let (done, flushed) = oneshot::channel();
        let flush = async {
            self.tx.send(Msg::Close(done)).await.ok()?;
            flushed.await.ok()
        };
        if tokio::time::timeout_at(deadline.into(), flush)
            .await
            .ok()
            .flatten()
            .is_none()
        {
            tracing::error!(
                records = self.unwritten(),
                "audit records could not be written before shutdown ended; they are lost"
            );
        }
        let writer = self.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(writer) = writer {
            writer.abort();
        }
    }
}

async fn write_loop(
    pool: AnyPool,
    mut rx: mpsc::Receiver<Msg>,
    batch: usize,
    linger: Duration,
    unwritten: Arc<AtomicUsize>,
    failing: Arc<AtomicBool>,
) {
    let mut held: Vec<Record> = Vec::new();
    let mut closing: Option<oneshot::Sender<()>> = None;
    let mut backoff = Duration::from_millis(50);
    loop {
        if held.is_empty() && closing.is_none() {
            match rx.recv().await {
                Some(Msg::Record(r)) => held.push(r),
                Some(Msg::Close(done)) => closing = Some(done),
                None => return,
            }
            if closing.is_none() && !linger.is_zero() {
                tokio::time::sleep(linger).await;
            }
        }
        while held.len() < batch {
            match rx.try_recv() {
                Ok(Msg::Record(r)) => held.push(r),
                Ok(Msg::Close(done)) => closing = Some(done),
                Err(_) => break,
            }
        }
        if !held.is_empty() {
            let n = held.len().min(batch);
            match write(&pool, &held[..n]).await {
                Ok(()) => {
                    held.drain(..n);
                    unwritten.fetch_sub(n, Ordering::AcqRel);
                    if failing.swap(false, Ordering::AcqRel) {
                        tracing::info!("the audit trail is written again");
                    }
                    backoff = Duration::from_millis(50);
                }
                Err(e) => {
                    if !failing.swap(true, Ordering::AcqRel) {
                        tracing::error!(error = %e, held = held.len(), "the audit trail cannot be written; retrying");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
        if held.is_empty()
            && let Some(done) = closing.take()
        {
            let _ = done.send(());
            return;
        }
    }
}

// Each row is `[fields, hash]`, `fields` the very array the hash covers (see `linked_fields`).
const INSERT_SQLITE: &str = "INSERT INTO audit_log (prev_hash, seq, tenant, at_ms, kind, subject, service, action, \
     outcome, error_code, request_id, latency_us, payload_sha256, note, hash) \
     SELECT value -> 0 ->> 0, value -> 0 ->> 1, value -> 0 ->> 2, value -> 0 ->> 3, value -> 0 ->> 4, \
     value -> 0 ->> 5, value -> 0 ->> 6, value -> 0 ->> 7, value -> 0 ->> 8, value -> 0 ->> 9, \
     value -> 0 ->> 10, value -> 0 ->> 11, value -> 0 ->> 12, value -> 0 ->> 13, value ->> 1 FROM json_each($1)";

const INSERT_POSTGRES: &str = "INSERT INTO audit_log (prev_hash, seq, tenant, at_ms, kind, subject, service, action, \
     outcome, error_code, request_id, latency_us, payload_sha256, note, hash) \
     SELECT r -> 0 ->> 0, (r -> 0 ->> 1)::bigint, r -> 0 ->> 2, (r -> 0 ->> 3)::bigint, r -> 0 ->> 4, \
     r -> 0 ->> 5, r -> 0 ->> 6, r -> 0 ->> 7, r -> 0 ->> 8, r -> 0 ->> 9, \
     r -> 0 ->> 10, (r -> 0 ->> 11)::bigint, r -> 0 ->> 12, r -> 0 ->> 13, r ->> 1 \
     FROM jsonb_array_elements($1::jsonb) AS r";

/// Appends `records` to their chains now, in one transaction: for what changes the store
/// without a running host (the `clients` and `secrets` commands), so it is in the trail too.
pub async fn append(pool: &AnyPool, mut records: Vec<Record>) -> Result<(), sqlx::Error> {
    for r in &mut records {
        if r.at_ms == 0 {
            r.at_ms = now_ms();
        }
    }
    write(pool, &records).await
}

/// Appends `records` to their chains in one transaction.
async fn write(pool: &AnyPool, records: &[Record]) -> Result<(), sqlx::Error> {
    let sqlite = pool.connect_options().database_url.scheme() == "sqlite";
    let mut tx = pool.begin().await?;
    let mut tenants: Vec<&str> = Vec::new();
    for r in records {
        if !tenants.contains(&r.tenant.as_str()) {
            tenants.push(&r.tenant);
        }
    }
    // Heads locked in one order by every writer: two hosts cannot deadlock on them.
    tenants.sort_unstable();
    for tenant in tenants {
        // The head row is written first: it locks the chain (PostgreSQL) or the database
        // (SQLite) until commit, so two writers never extend one chain at once.
        let head = sqlx::query(
            "INSERT INTO audit_heads (tenant, seq, hash) VALUES ($1, 0, $2) \
             ON CONFLICT (tenant) DO UPDATE SET seq = audit_heads.seq RETURNING seq, hash",
        )
        .bind(tenant)
        .bind(GENESIS)
        .fetch_one(&mut *tx)
        .await?;
        let mut seq: i64 = head.try_get(0)?;
        let mut prev: String = head.try_get(1)?;
        // All of a chain's new rows in one statement with one parameter, a JSON array the
        // database unpacks: one round trip per chain per batch whatever its size (a statement
        // per row costs a thread handoff each with SQLite's driver; many parameters per
        // statement cost quadratic name lookups there).
        let mut rows = String::from("[");
        for r in records.iter().filter(|r| r.tenant == tenant) {
            seq += 1;
            let fields = linked_fields(&prev, seq, r);
            prev = sha256_hex(fields.as_bytes());
            if rows.len() > 1 {
                rows.push(',');
            }
            rows.push('[');
            rows.push_str(&fields);
            rows.push_str(",\"");
            rows.push_str(&prev);
            rows.push_str("\"]");
        }
        rows.push(']');
        sqlx::query(if sqlite {
            INSERT_SQLITE
        } else {
            INSERT_POSTGRES
        })
        .bind(rows)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE audit_heads SET seq = $2, hash = $3 WHERE tenant = $1")
            .bind(tenant)
            .bind(seq)
            .bind(&prev)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}

const COLUMNS: &str = "tenant, seq, at_ms, kind, subject, service, action, outcome, error_code, request_id, latency_us, payload_sha256, note, prev_hash, hash";

fn row_json(r: &sqlx::any::AnyRow) -> Result<Value, sqlx::Error> {
    Ok(json!({
        "tenant": r.try_get::<String, _>("tenant")?,
        "seq": r.try_get::<i64, _>("seq")?,
        "at_ms": r.try_get::<i64, _>("at_ms")?,
        "kind": r.try_get::<String, _>("kind")?,
        "subject": r.try_get::<String, _>("subject")?,
        "service": r.try_get::<String, _>("service")?,
        "action": r.try_get::<String, _>("action")?,
        "outcome": r.try_get::<String, _>("outcome")?,
        "error_code": r.try_get::<String, _>("error_code")?,
        "request_id": r.try_get::<String, _>("request_id")?,
        "latency_us": r.try_get::<i64, _>("latency_us")?,
        "payload_sha256": r.try_get::<String, _>("payload_sha256")?,
        "note": r.try_get::<String, _>("note")?,
        "hash": r.try_get::<String, _>("hash")?,
    }))
}

/// Filters of [`list`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// The chain (required for a platform operator; a tenant administrator's own by default).
    pub tenant: Option<String>,
    /// One subject.
    pub subject: Option<String>,
    /// One service.
    pub service: Option<String>,
    /// `ok`, `denied` or `error`.
    pub outcome: Option<String>,
    /// `call`, `admin`, `authn` or `authz`.
    pub kind: Option<String>,
    /// From this time on (ms since the epoch).
    pub since_ms: Option<i64>,
    /// Before this time.
    pub until_ms: Option<i64>,
    /// Records after this sequence number (the previous page's `next`).
    pub after: Option<i64>,
    /// Records per page, 1 to 1000 (default 100).
    pub limit: Option<i64>,
}

/// One page of `tenant`'s records matching `filter`, oldest first, and the cursor of the next.
pub async fn list(
    pool: &AnyPool,
    tenant: &str,
    filter: &Filter,
) -> Result<(Vec<Value>, Option<i64>), sqlx::Error> {
    let limit = filter.limit.unwrap_or(100).clamp(1, 1000);
    let mut sql = format!("SELECT {COLUMNS} FROM audit_log WHERE tenant = $1 AND seq > $2");
    let mut texts: Vec<&str> = Vec::new();
    for (column, value) in [
        ("subject", &filter.subject),
        ("service", &filter.service),
        ("outcome", &filter.outcome),
        ("kind", &filter.kind),
    ] {
        if let Some(v) = value {
            texts.push(v);
            sql.push_str(&format!(" AND {column} = ${}", texts.len() + 2));
        }
    }
    let mut n = texts.len() + 2;
    if filter.since_ms.is_some() {
        n += 1;
        sql.push_str(&format!(" AND at_ms >= ${n}"));
    }
    if filter.until_ms.is_some() {
        n += 1;
        sql.push_str(&format!(" AND at_ms < ${n}"));
    }
    sql.push_str(&format!(" ORDER BY seq LIMIT {}", limit + 1));
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(tenant)
        .bind(filter.after.unwrap_or(0));
    for t in texts {
        query = query.bind(t);
    }
    if let Some(s) = filter.since_ms {
        query = query.bind(s);
    }
    if let Some(u) = filter.until_ms {
        query = query.bind(u);
    }
    let rows = query.fetch_all(pool).await?;
    let mut records = rows.iter().map(row_json).collect::<Result<Vec<_>, _>>()?;
    let next = if records.len() > limit as usize {
        records.truncate(limit as usize);
        records.last().and_then(|r| r["seq"].as_i64())
    } else {
        None
    };
    Ok((records, next))
}

/// What [`verify`] found in one chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainReport {
    /// The chain's tenant.
    pub tenant: String,
    /// Records in it.
    pub records: i64,
    /// Its last hash, as the head records it.
    pub head: String,
    /// The first break found, if any.
    pub problem: Option<String>,
}

/// Walks every chain (or `tenant`'s) and reports the first break in each.
pub async fn verify(pool: &AnyPool, tenant: Option<&str>) -> Result<Vec<ChainReport>, sqlx::Error> {
    let mut tenants: Vec<String> = sqlx::query(
        "SELECT tenant FROM audit_heads UNION SELECT DISTINCT tenant FROM audit_log ORDER BY 1",
    )
    .fetch_all(pool)
    .await?
    .iter()
    .map(|r| r.try_get::<String, _>(0))
    .collect::<Result<_, _>>()?;
    if let Some(only) = tenant {
        tenants.retain(|t| t == only);
    }
    let mut reports = Vec::new();
    for tenant in tenants {
        let mut problem = None;
        let (mut expected, mut prev, mut count) = (1i64, GENESIS.to_owned(), 0i64);
        let mut after = 0i64;
        // The head is read after the walk: a batch committed meanwhile (rows and head move
        // together) is walked too rather than taken for a break.
        let (mut head_seq, mut head_hash) = (-1i64, String::new());
        let mut rounds = 0;
        'pages: loop {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM audit_log WHERE tenant = $1 AND seq > $2 ORDER BY seq LIMIT 10000"
            )))
            .bind(&tenant)
            .bind(after)
            .fetch_all(pool)
            .await?;
            if rows.is_empty() {
                let head = sqlx::query("SELECT seq, hash FROM audit_heads WHERE tenant = $1")
                    .bind(&tenant)
                    .fetch_optional(pool)
                    .await?;
                (head_seq, head_hash) = match &head {
                    Some(r) => (r.try_get::<i64, _>(0)?, r.try_get::<String, _>(1)?),
                    None => (-1, String::new()),
                };
                rounds += 1;
                if head_seq > expected - 1 && rounds < 100 {
                    continue;
                }
                break;
            }
            for r in &rows {
                let seq: i64 = r.try_get("seq")?;
                after = seq;
                count += 1;
                let text = |c: &str| r.try_get::<String, _>(c);
                let (prev_hash, hash) = (text("prev_hash")?, text("hash")?);
                if seq != expected {
                    problem = Some(format!(
                        "record {expected} is missing (the next is {seq}): records were deleted"
                    ));
                    break 'pages;
                }
                if prev_hash != prev {
                    problem = Some(format!(
                        "record {seq} does not follow record {}: a record was inserted or replaced",
                        seq - 1
                    ));
                    break 'pages;
                }
                if link(&prev, seq, &record_of(r)?) != hash {
                    problem = Some(format!("record {seq} was changed after it was written"));
                    break 'pages;
                }
                prev = hash;
                expected += 1;
            }
        }
        if problem.is_none() && (head_seq != expected - 1 || head_hash != prev) {
            problem = Some(format!(
                "the chain ends at record {} but its head says {head_seq}: records were deleted from its end or the head was changed",
                expected - 1
            ));
        }
        reports.push(ChainReport {
            tenant,
            records: count,
            head: head_hash,
            problem,
        });
    }
    Ok(reports)
}
