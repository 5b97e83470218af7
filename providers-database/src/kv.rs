//! `kv`: a tenant-scoped state store with ETags and TTLs, in the spirit of Dapr's state API.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::TryStreamExt;
use providers_core::semver::Version;
use providers_core::{
    CallContext, ConnectContext, Descriptor, Provider, ProviderError, Status, async_trait,
};
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::{AnyPool, Row};

mod memory;
mod schema;
mod text;

/// The `kv` provider. Every row is keyed by the tenant the instance was connected for and
/// the service name it is configured under, so no query can see another tenant's keys, nor
/// another store's when an operator configures `kv` under several service names.
#[derive(Default)]
pub struct Kv {
    state: OnceLock<Connected>,
    /// Set instead of `state` with `backend = "memory"`.
    memory: OnceLock<memory::Memory>,
}

struct Connected {
    pool: AnyPool,
    tenant: String,
    /// The configured service name: two services served by `kv` keep separate stores.
    store: String,
    max_value_bytes: usize,
    default_ttl_seconds: Option<u64>,
    max_page_bytes: usize,
    max_keys: Option<i64>,
    max_total_bytes: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// `sql` (the system database, default) or `memory` (this instance's map).
    #[serde(default)]
    backend: Backend,
    #[serde(default = "default_max_value_bytes")]
    max_value_bytes: usize,
    #[serde(default)]
    default_ttl_seconds: Option<u64>,
    #[serde(default = "default_max_page_bytes")]
    max_page_bytes: usize,
    #[serde(default)]
    max_keys: Option<i64>,
    #[serde(default)]
    max_total_bytes: Option<i64>,
}

#[derive(Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum Backend {
    #[default]
    Sql,
    Memory,
}

/// `max_total_bytes` of a memory store that sets none: 64 MiB.
const MEMORY_DEFAULT_MAX_BYTES: i64 = 64 * 1024 * 1024;

fn default_max_value_bytes() -> usize {
    64 * 1024
}

fn default_max_page_bytes() -> usize {
    1024 * 1024
}

#[derive(Deserialize)]
struct KeyReq {
    key: String,
    #[serde(default)]
    etag: Option<String>,
}

/// A `set` without its value, which is taken out of the payload as it is: deserialising it
/// again would turn `-0` into `0`.
#[derive(Deserialize)]
struct SetReq {
    key: String,
    #[serde(default)]
    etag: Option<String>,
    #[serde(default)]
    ttl_seconds: Option<u64>,
    #[serde(default)]
    if_absent: bool,
}

impl SetReq {
    /// What every backend checks before a write: `etag` and `if_absent` are not both given,
    /// the value fits `max_value_bytes`, and the ETag is one a store could have issued (its
    /// number, when given).
    fn checked(&self, value: &str, max_value_bytes: usize) -> Result<Option<i64>, ProviderError> {
        if self.if_absent && self.etag.is_some() {
            return Err(ProviderError::validation(
                "payload: `etag` and `if_absent` exclude each other",
            ));
        }
        if value.len() > max_value_bytes {
            return Err(ProviderError::validation(format!(
                "payload/value: {} bytes exceeds the limit of {max_value_bytes} bytes (config max_value_bytes)",
                value.len(),
            )));
        }
        self.etag
            .as_deref()
            .map(|e| parse_etag(&self.key, e))
            .transpose()
    }
}

#[derive(Deserialize)]
struct ListReq {
    #[serde(default)]
    prefix: String,
    #[serde(default)]
    after: String,
    #[serde(default = "default_limit")]
    limit: i64,
}

fn default_limit() -> i64 {
    100
}

#[derive(Deserialize)]
struct BulkReq {
    keys: Vec<String>,
}

/// An action's payload, parsed and checked the same way for both backends.
enum Request {
    Get(KeyReq),
    Set(SetReq, Value),
    Delete(KeyReq),
    List(ListReq),
    BulkGet(BulkReq),
}

impl Request {
    fn parse(action: &str, payload: Value) -> Result<Self, ProviderError> {
        Ok(match action {
            "get" => {
                let req: KeyReq = parse(payload)?;
                check_key("key", &req.key)?;
                Request::Get(req)
            }
            "set" => {
                let mut payload = payload;
                let value = payload
                    .get_mut("value")
                    .map(Value::take)
                    .ok_or_else(|| ProviderError::validation("payload: missing field `value`"))?;
                let req: SetReq = parse(payload)?;
                check_key("key", &req.key)?;
                Request::Set(req, value)
            }
            "delete" => {
                let req: KeyReq = parse(payload)?;
                check_key("key", &req.key)?;
                Request::Delete(req)
            }
            "list" => {
                let req: ListReq = parse(payload)?;
                check_key("prefix", &req.prefix)?;
                check_key("after", &req.after)?;
                Request::List(req)
            }
            "bulk_get" => {
                let req: BulkReq = parse(payload)?;
                for (i, key) in req.keys.iter().enumerate() {
                    check_key(&format!("keys/{i}"), key)?;
                }
                Request::BulkGet(req)
            }
            other => {
                return Err(ProviderError::not_found(format!(
                    "kv has no action '{other}'"
                )));
            }
        })
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn parse<T: for<'de> Deserialize<'de>>(payload: Value) -> Result<T, ProviderError> {
    serde_json::from_value(payload).map_err(|e| ProviderError::validation(format!("payload: {e}")))
}

/// Storage errors are logged in full and reported to clients without database internals.
fn db(e: sqlx::Error) -> ProviderError {
    tracing::error!(error = %e, "kv storage error");
    ProviderError::unavailable("kv storage is unavailable; the host log has the cause")
}

/// PostgreSQL text cannot hold NUL, so no backend accepts it: the same key works everywhere.
fn check_key(field: &str, key: &str) -> Result<(), ProviderError> {
    if key.contains('\0') {
        return Err(ProviderError::validation(format!(
            "payload/{field}: must not contain NUL characters"
        )));
    }
    Ok(())
}

/// ETags are opaque: a fresh random number per write, so a key deleted and written again
/// never reuses an old ETag (no ABA).
fn new_etag() -> i64 {
    // Positive, so the text form never starts with '-'.
    rand::random::<i64>() & i64::MAX
}

/// ETags are opaque strings compared exactly: only the canonical text of a stored ETag
/// matches it, so `"0" + E` or `"+" + E` do not.
fn parse_etag(key: &str, etag: &str) -> Result<i64, ProviderError> {
    etag.parse::<i64>()
        .ok()
        .filter(|n| n.to_string() == etag)
        .ok_or_else(|| {
            ProviderError::conflict(format!(
                "etag '{etag}' does not match the current version of key '{key}'"
            ))
        })
}

/// The smallest string greater than every string that starts with `prefix`, in code-point
/// order (which is UTF-8 byte order, how both databases compare keys); `None` when there is
/// none (an empty prefix, or only U+10FFFF).
fn successor(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = match last {
            '\u{D7FF}' => Some('\u{E000}'),
            c => char::from_u32(c as u32 + 1),
        };
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// A `list` answer: its items, and `next` (the last key) when more follow.
fn page(items: Vec<Value>, more: bool) -> Value {
    let next = match items.last() {
        Some(last) if more => last["key"].clone(),
        _ => Value::Null,
    };
    json!({"items": items, "next": next})
}

fn entry(key: String, value: &str, etag: i64) -> Result<Value, ProviderError> {
    let value: Value = serde_json::from_str(value).map_err(|e| {
        ProviderError::internal(format!("stored value of '{key}' is not JSON: {e}"))
    })?;
    // Built by hand: `json!` would copy the value through `to_value`, a second up to
    // max_value_bytes per item. (Numbers survive either way: arbitrary_precision keeps their text.)
    let mut item = serde_json::Map::new();
    item.insert("key".into(), Value::String(key));
    item.insert("value".into(), value);
    item.insert("etag".into(), Value::String(etag.to_string()));
    Ok(Value::Object(item))
}

/// `list` with a prefix that has an upper bound: a range scan of the primary key.
const LIST_BOUNDED: &str = "SELECT key, value, etag FROM kv_entries \
     WHERE tenant = $1 AND store = $6 AND key >= $2 AND key > $3 AND key < $7 \
     AND (expires_at IS NULL OR expires_at > $4) ORDER BY key LIMIT $5";

/// `list` with no upper bound (an empty prefix, or one of only U+10FFFF).
const LIST_OPEN: &str = "SELECT key, value, etag FROM kv_entries \
     WHERE tenant = $1 AND store = $6 AND key >= $2 AND key > $3 \
     AND (expires_at IS NULL OR expires_at > $4) ORDER BY key LIMIT $5";

/// `set` without an ETag: insert or overwrite.
const UPSERT: &str = "INSERT INTO kv_entries (tenant, store, key, value, etag, expires_at, updated_at, bytes) \
     VALUES ($1, $7, $2, $3, $4, $5, $6, $8) \
     ON CONFLICT (tenant, store, key) DO UPDATE SET value = excluded.value, \
     etag = excluded.etag, expires_at = excluded.expires_at, updated_at = excluded.updated_at, \
     bytes = excluded.bytes";

/// `set` with `if_absent`: the same, but an existing row is overwritten only if it expired
/// (an expired key counts as absent); a live one leaves nothing written.
const UPSERT_IF_ABSENT: &str = "INSERT INTO kv_entries (tenant, store, key, value, etag, expires_at, updated_at, bytes) \
     VALUES ($1, $7, $2, $3, $4, $5, $6, $8) \
     ON CONFLICT (tenant, store, key) DO UPDATE SET value = excluded.value, \
     etag = excluded.etag, expires_at = excluded.expires_at, updated_at = excluded.updated_at, \
     bytes = excluded.bytes \
     WHERE kv_entries.expires_at IS NOT NULL AND kv_entries.expires_at <= excluded.updated_at";

impl Connected {
    fn expiry(&self, ttl: Option<u64>, now: i64) -> Option<i64> {
        ttl.or(self.default_ttl_seconds)
            .map(|s| now.saturating_add(i64::try_from(s).unwrap_or(i64::MAX).saturating_mul(1000)))
    }

    /// The stored JSON text of `key` and its ETag, if the key is live.
    async fn read(&self, key: &str) -> Result<Option<(String, i64)>, ProviderError> {
        let row = sqlx::query(
            "SELECT value, etag FROM kv_entries \
             WHERE tenant = $1 AND store = $4 AND key = $2 AND (expires_at IS NULL OR expires_at > $3)",
        )
        .bind(&self.tenant)
        .bind(key)
        .bind(now_ms())
        .bind(&self.store)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.map(|row| Ok((row.try_get(0).map_err(db)?, row.try_get(1).map_err(db)?)))
            .transpose()
    }

    async fn get(&self, req: KeyReq) -> Result<Value, ProviderError> {
        match self.read(&req.key).await? {
            Some((value, etag)) => entry(req.key, &value, etag),
            None => Err(ProviderError::not_found(format!(
                "key '{}' not found",
                req.key
            ))),
        }
    }

    /// Starts a write: a transaction holding this store's usage row, created if absent. The
    /// row lock serialises writers of one store, so each sees the others' sizes (PostgreSQL),
    /// and as the first statement is a write, SQLite takes its write lock at once rather than
    /// failing to upgrade a read later.
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, ProviderError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        sqlx::query(
            "INSERT INTO kv_usage (tenant, store, keys, bytes) VALUES ($1, $2, 0, 0) \
             ON CONFLICT (tenant, store) DO UPDATE SET keys = kv_usage.keys",
        )
        .bind(&self.tenant)
        .bind(&self.store)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        Ok(tx)
    }

    /// The stored size of `key`, expired or not: what the usage row counts.
    async fn stored_bytes(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        key: &str,
    ) -> Result<Option<i64>, ProviderError> {
        let row = sqlx::query(
            "SELECT bytes FROM kv_entries WHERE tenant = $1 AND store = $2 AND key = $3",
        )
        .bind(&self.tenant)
        .bind(&self.store)
        .bind(key)
        .fetch_optional(&mut **tx)
        .await
        .map_err(db)?;
        row.map(|r| r.try_get::<i64, _>(0)).transpose().map_err(db)
    }

    /// Moves the usage by `keys` and `bytes` if the quotas allow; whether they did. Only a
    /// growing count is checked: when an operator lowers a quota below what a tenant holds,
    /// writes that shrink the store (a smaller value, a delete) still go through.
    async fn reserve(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        keys: i64,
        bytes: i64,
    ) -> Result<bool, ProviderError> {
        let moved = sqlx::query(
            "UPDATE kv_usage SET keys = keys + $3, bytes = bytes + $4 \
             WHERE tenant = $1 AND store = $2 \
             AND ($3 <= 0 OR keys + $3 <= $5) AND ($4 <= 0 OR bytes + $4 <= $6)",
        )
        .bind(&self.tenant)
        .bind(&self.store)
        .bind(keys)
        .bind(bytes)
        .bind(self.max_keys.unwrap_or(i64::MAX))
        .bind(self.max_total_bytes.unwrap_or(i64::MAX))
        .execute(&mut **tx)
        .await
        .map_err(db)?
        .rows_affected();
        Ok(moved == 1)
    }

    /// Deletes this store's expired rows inside `tx` and takes them off the usage.
    async fn purge_expired(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        now: i64,
    ) -> Result<(), ProviderError> {
        let row = sqlx::query(
            "SELECT COUNT(*), CAST(COALESCE(SUM(bytes), 0) AS BIGINT) FROM kv_entries \
             WHERE tenant = $1 AND store = $2 AND expires_at <= $3",
        )
        .bind(&self.tenant)
        .bind(&self.store)
        .bind(now)
        .fetch_one(&mut **tx)
        .await
        .map_err(db)?;
        let (keys, bytes): (i64, i64) = (row.try_get(0).map_err(db)?, row.try_get(1).map_err(db)?);
        if keys == 0 {
            return Ok(());
        }
        sqlx::query("DELETE FROM kv_entries WHERE tenant = $1 AND store = $2 AND expires_at <= $3")
            .bind(&self.tenant)
            .bind(&self.store)
            .bind(now)
            .execute(&mut **tx)
            .await
            .map_err(db)?;
        sqlx::query("UPDATE kv_usage SET keys = keys - $3, bytes = bytes - $4 WHERE tenant = $1 AND store = $2")
            .bind(&self.tenant)
            .bind(&self.store)
            .bind(keys)
            .bind(bytes)
            .execute(&mut **tx)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn quota_error(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        key: &str,
        keys: i64,
        bytes: i64,
    ) -> ProviderError {
        let usage =
            sqlx::query("SELECT keys, bytes FROM kv_usage WHERE tenant = $1 AND store = $2")
                .bind(&self.tenant)
                .bind(&self.store)
                .fetch_one(&mut **tx)
                .await
                .and_then(|r| Ok((r.try_get::<i64, _>(0)?, r.try_get::<i64, _>(1)?)));
        let (held_keys, held_bytes) = match usage {
            Ok(u) => u,
            Err(e) => return db(e),
        };
        // Name the quota this write grows past, as `reserve` judged it.
        if let Some(max) = self.max_keys
            && keys > 0
            && held_keys + keys > max
        {
            return ProviderError::conflict(format!(
                "quota exceeded: writing key '{key}' would make {} keys, more than max_keys {max} (kv config max_keys)",
                held_keys + keys
            ));
        }
        ProviderError::conflict(format!(
            "quota exceeded: writing key '{key}' would make {} bytes, more than max_total_bytes {} (kv config max_total_bytes)",
            held_bytes + bytes,
            self.max_total_bytes.unwrap_or(i64::MAX)
        ))
    }

    async fn set(&self, req: SetReq, value: Value) -> Result<Value, ProviderError> {
        let key = req.key.clone();
        let etag = self.set_text(req, value.to_string()).await?;
        Ok(json!({"key": key, "etag": etag}))
    }

    /// Writes `value`, JSON text, as `set` does; the new ETag.
    async fn set_text(&self, req: SetReq, value: String) -> Result<String, ProviderError> {
        let expected = req.checked(&value, self.max_value_bytes)?;
        let size = i64::try_from(value.len()).unwrap_or(i64::MAX);
        let now = now_ms();
        let expires = self.expiry(req.ttl_seconds, now);
        let etag = new_etag();
        let mut tx = self.begin_write().await?;
        let old = self.stored_bytes(&mut tx, &req.key).await?;
        let (keys, bytes) = (i64::from(old.is_none()), size - old.unwrap_or(0));
        if !self.reserve(&mut tx, keys, bytes).await? {
            // Expired rows still count until purged; purge, then try once more.
            self.purge_expired(&mut tx, now).await?;
            let old = self.stored_bytes(&mut tx, &req.key).await?;
            let (keys, bytes) = (i64::from(old.is_none()), size - old.unwrap_or(0));
            if !self.reserve(&mut tx, keys, bytes).await? {
                let e = self.quota_error(&mut tx, &req.key, keys, bytes).await;
                let _ = tx.rollback().await;
                return Err(e);
            }
        }
        let written = match expected {
            None => sqlx::query(if req.if_absent { UPSERT_IF_ABSENT } else { UPSERT })
            .bind(&self.tenant)
            .bind(&req.key)
            .bind(&value)
            .bind(etag)
            .bind(expires)
            .bind(now)
            .bind(&self.store)
            .bind(size)
            .execute(&mut *tx)
            .await
            .map_err(db)?
            .rows_affected(),
            Some(expected) => sqlx::query(
                "UPDATE kv_entries SET value = $3, etag = $4, expires_at = $5, updated_at = $6, bytes = $9 \
                 WHERE tenant = $1 AND store = $8 AND key = $2 AND etag = $7 \
                 AND (expires_at IS NULL OR expires_at > $6)",
            )
            .bind(&self.tenant)
            .bind(&req.key)
            .bind(&value)
            .bind(etag)
            .bind(expires)
            .bind(now)
            .bind(expected)
            .bind(&self.store)
            .bind(size)
            .execute(&mut *tx)
            .await
            .map_err(db)?
            .rows_affected(),
        };
        if written == 0 && req.if_absent {
            let _ = tx.rollback().await;
            return Err(ProviderError::conflict(format!(
                "key '{}' already exists (if_absent)",
                req.key
            )));
        }
        if written == 0 {
            let _ = tx.rollback().await;
            return Err(ProviderError::conflict(format!(
                "etag '{}' does not match the current version of key '{}'",
                req.etag.unwrap_or_default(),
                req.key
            )));
        }
        tx.commit().await.map_err(db)?;
        Ok(etag.to_string())
    }

    async fn delete(&self, req: KeyReq) -> Result<Value, ProviderError> {
        let expected = req
            .etag
            .as_deref()
            .map(|e| parse_etag(&req.key, e))
            .transpose()?;
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let old = self.stored_bytes(&mut tx, &req.key).await?;
        let removed = sqlx::query(
            "DELETE FROM kv_entries WHERE tenant = $1 AND store = $4 AND key = $2 \
             AND (expires_at IS NULL OR expires_at > $3) AND ($5 IS NULL OR etag = $5)",
        )
        .bind(&self.tenant)
        .bind(&req.key)
        .bind(now)
        .bind(&self.store)
        .bind(expected)
        .execute(&mut *tx)
        .await
        .map_err(db)?
        .rows_affected();
        if removed == 0 && expected.is_some() {
            let _ = tx.rollback().await;
            return Err(ProviderError::conflict(format!(
                "etag '{}' does not match the current version of key '{}'",
                req.etag.unwrap_or_default(),
                req.key
            )));
        }
        if removed > 0 {
            sqlx::query("UPDATE kv_usage SET keys = keys - 1, bytes = bytes - $3 WHERE tenant = $1 AND store = $2")
                .bind(&self.tenant)
                .bind(&self.store)
                .bind(old.unwrap_or(0))
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        Ok(json!({"key": req.key, "deleted": removed > 0}))
    }

    async fn list(&self, req: ListReq) -> Result<Value, ProviderError> {
        // A range over the primary key, not a filter over the whole store. One row more than
        // asked tells whether there is a next page.
        let upper = successor(&req.prefix);
        // Two texts rather than `($7 IS NULL OR key < $7)`: a planner cannot bound an index
        // range with a disjunction, and would scan to the end of the tenant's store.
        let sql = if upper.is_some() {
            LIST_BOUNDED
        } else {
            LIST_OPEN
        };
        let mut query = sqlx::query(sql)
            .bind(&self.tenant)
            .bind(&req.prefix)
            .bind(&req.after)
            .bind(now_ms())
            .bind(req.limit + 1)
            .bind(&self.store);
        if let Some(upper) = &upper {
            query = query.bind(upper);
        }
        let mut rows = query.fetch(&self.pool);
        // Rows are taken one at a time and the stream dropped once the page is full, so a page
        // of large values never sits in memory whole, however large `limit` is.
        let mut items = Vec::new();
        let mut spent = 0usize;
        let mut more = false;
        while let Some(row) = rows.try_next().await.map_err(db)? {
            if items.len() as i64 == req.limit {
                more = true;
                break;
            }
            let key: String = row.try_get(0).map_err(db)?;
            let value: String = row.try_get(1).map_err(db)?;
            let cost = key.len() + value.len();
            // Always one item, so a page makes progress whatever the budget.
            if !items.is_empty() && spent + cost > self.max_page_bytes {
                more = true;
                break;
            }
            spent += cost;
            items.push(entry(key, &value, row.try_get(2).map_err(db)?)?);
        }
        drop(rows);
        Ok(page(items, more))
    }

    async fn bulk_get(&self, req: BulkReq) -> Result<Value, ProviderError> {
        // Sizes first, then values only for the keys that fit the budget in request order:
        // 100 keys of large values never sit in memory together.
        let sizes = self
            .select_keys(&req.keys, "key, bytes")
            .await?
            .iter()
            .map(|row| Ok((row.try_get::<String, _>(0)?, row.try_get::<i64, _>(1)?)))
            .collect::<Result<std::collections::HashMap<_, _>, sqlx::Error>>()
            .map_err(db)?;
        // The budget is spent per occurrence: a key asked for twice costs twice.
        let mut spent = 0usize;
        let mut fits = Vec::new();
        let mut fit = Vec::with_capacity(req.keys.len());
        for key in &req.keys {
            let mut this = false;
            if let Some(bytes) = sizes.get(key) {
                let cost = key.len() + usize::try_from(*bytes).unwrap_or(usize::MAX);
                if spent == 0 || spent.saturating_add(cost) <= self.max_page_bytes {
                    spent = spent.saturating_add(cost);
                    fits.push(key.clone());
                    this = true;
                }
            }
            fit.push(this);
        }
        let mut found = std::collections::HashMap::with_capacity(fits.len());
        if !fits.is_empty() {
            for row in self.select_keys(&fits, "key, value, etag").await? {
                let key: String = row.try_get(0).map_err(db)?;
                found.insert(
                    key,
                    (
                        row.try_get::<String, _>(1).map_err(db)?,
                        row.try_get::<i64, _>(2).map_err(db)?,
                    ),
                );
            }
        }
        let mut items = Vec::with_capacity(req.keys.len());
        for (key, fits) in req.keys.into_iter().zip(fit) {
            items.push(
                match (found.get(&key).filter(|_| fits), sizes.contains_key(&key)) {
                    (Some((value, etag)), _) => {
                        let mut e = entry(key, value, *etag)?;
                        e["found"] = Value::Bool(true);
                        e
                    }
                    // Present, but past the budget (or expired between the two reads: asking
                    // again answers that too).
                    (None, true) => json!({"key": key, "found": true, "omitted": true}),
                    (None, false) => json!({"key": key, "found": false}),
                },
            );
        }
        Ok(json!({"items": items}))
    }

    /// `columns` of this store's live entries among `keys`.
    async fn select_keys(
        &self,
        keys: &[String],
        columns: &str,
    ) -> Result<Vec<sqlx::any::AnyRow>, ProviderError> {
        let placeholders: Vec<String> = (0..keys.len()).map(|i| format!("${}", i + 4)).collect();
        let sql = format!(
            "SELECT {columns} FROM kv_entries WHERE tenant = $1 AND store = $3 \
             AND (expires_at IS NULL OR expires_at > $2) AND key IN ({})",
            placeholders.join(", ")
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&self.tenant)
            .bind(now_ms())
            .bind(&self.store);
        for key in keys {
            query = query.bind(key);
        }
        query.fetch_all(&self.pool).await.map_err(db)
    }
}

#[async_trait]
impl Provider for Kv {
    fn descriptor(&self) -> Descriptor {
        schema::descriptor(Version::new(1, 0, 0))
    }

    async fn connect(&mut self, ctx: &ConnectContext) -> Result<(), ProviderError> {
        let config: Config = serde_json::from_value(ctx.config().clone())
            .map_err(|e| ProviderError::validation(format!("kv config: {e}")))?;
        if config.backend == Backend::Memory {
            let memory = memory::Memory::new(
                ctx.tenant().to_owned(),
                config.max_value_bytes,
                config.default_ttl_seconds,
                config.max_page_bytes,
                config.max_keys,
                // Host memory is no database: a store in it is bounded even when unconfigured.
                config.max_total_bytes.or(Some(MEMORY_DEFAULT_MAX_BYTES)),
            );
            return self
                .memory
                .set(memory)
                .map_err(|_| ProviderError::internal("kv connected twice"));
        }
        let pool = ctx.resource::<AnyPool>().cloned().ok_or_else(|| {
            ProviderError::unavailable(
                "kv needs the host's system database, which was not provided",
            )
        })?;
        crate::migrate::prepare(&pool).await.map_err(|e| {
            tracing::error!(error = %e, "kv migrations failed");
            ProviderError::unavailable(
                "kv storage could not be prepared; the host log has the cause",
            )
        })?;
        let store = if ctx.service().is_empty() {
            "kv"
        } else {
            ctx.service()
        };
        let connected = Connected {
            pool,
            tenant: ctx.tenant().to_owned(),
            store: store.to_owned(),
            max_value_bytes: config.max_value_bytes,
            default_ttl_seconds: config.default_ttl_seconds,
            max_page_bytes: config.max_page_bytes,
            max_keys: config.max_keys,
            max_total_bytes: config.max_total_bytes,
        };
        // Expired rows are invisible to reads; clearing them here bounds their number. A read
        // on the expiry index first, so that a connect with nothing to clear writes nothing.
        let now = now_ms();
        let expired = sqlx::query(
            "SELECT 1 FROM kv_entries WHERE tenant = $1 AND store = $2 AND expires_at <= $3 LIMIT 1",
        )
        .bind(&connected.tenant)
        .bind(&connected.store)
        .bind(now)
        .fetch_optional(&connected.pool)
        .await
        .map_err(db)?;
        if expired.is_some() {
            let mut tx = connected.begin_write().await?;
            connected.purge_expired(&mut tx, now).await?;
            tx.commit().await.map_err(db)?;
        }
        self.state
            .set(connected)
            .map_err(|_| ProviderError::internal("kv connected twice"))
    }

    async fn execute(
        &self,
        action: &str,
        payload: Value,
        ctx: &CallContext,
    ) -> Result<Value, ProviderError> {
        let request = Request::parse(action, payload)?;
        let tenant = match (self.memory.get(), self.state.get()) {
            (Some(m), _) => m.tenant.as_str(),
            (None, Some(s)) => s.tenant.as_str(),
            (None, None) => return Err(ProviderError::unavailable("kv is not connected")),
        };
        // The host routes by tenant; this guards the invariant rather than trusting it.
        if ctx.tenant() != tenant {
            return Err(ProviderError::forbidden(format!(
                "this kv instance serves tenant '{tenant}', not '{}'",
                ctx.tenant()
            )));
        }
        if let Some(m) = self.memory.get() {
            return match request {
                Request::Get(req) => m.get(req),
                Request::Set(req, value) => m.set(req, value),
                Request::Delete(req) => m.delete(req),
                Request::List(req) => m.list(req),
                Request::BulkGet(req) => m.bulk_get(req),
            };
        }
        let state = self
            .state
            .get()
            .ok_or_else(|| ProviderError::unavailable("kv is not connected"))?;
        match request {
            Request::Get(req) => state.get(req).await,
            Request::Set(req, value) => state.set(req, value).await,
            Request::Delete(req) => state.delete(req).await,
            Request::List(req) => state.list(req).await,
            Request::BulkGet(req) => state.bulk_get(req).await,
        }
    }

    async fn get_status(&self) -> Status {
        if self.memory.get().is_some() {
            return Status::ready();
        }
        let Some(state) = self.state.get() else {
            return Status::failed("not connected");
        };
        match sqlx::query("SELECT 1").execute(&state.pool).await {
            Ok(_) => Status::ready(),
            Err(e) => {
                // Like every storage error: the cause in the log, not in the status.
                tracing::warn!(error = %e, "kv status: storage unreachable");
                Status::failed("kv storage is unreachable; the host log has the cause")
            }
        }
    }
}

#[cfg(test)]
mod tests;
