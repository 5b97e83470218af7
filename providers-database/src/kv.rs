//! `kv`: a tenant-scoped state store with ETags and TTLs, in the spirit of Dapr's state API.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use providers_core::semver::Version;
use providers_core::{
    CallContext, ConnectContext, Descriptor, Provider, ProviderError, Status, async_trait,
};
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::{AnyPool, Row};

mod schema;

/// The `kv` provider. Every row is keyed by the tenant the instance was connected for and
/// the service name it is configured under, so no query can see another tenant's keys, nor
/// another store's when an operator configures `kv` under several service names.
#[derive(Default)]
pub struct Kv {
    state: OnceLock<Connected>,
}

struct Connected {
    pool: AnyPool,
    tenant: String,
    /// The configured service name: two services served by `kv` keep separate stores.
    store: String,
    max_value_bytes: usize,
    default_ttl_seconds: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_max_value_bytes")]
    max_value_bytes: usize,
    #[serde(default)]
    default_ttl_seconds: Option<u64>,
}

fn default_max_value_bytes() -> usize {
    64 * 1024
}

#[derive(Deserialize)]
struct KeyReq {
    key: String,
    #[serde(default)]
    etag: Option<String>,
}

#[derive(Deserialize)]
struct SetReq {
    key: String,
    value: Value,
    #[serde(default)]
    etag: Option<String>,
    #[serde(default)]
    ttl_seconds: Option<u64>,
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

fn parse_etag(key: &str, etag: &str) -> Result<i64, ProviderError> {
    etag.parse::<i64>().map_err(|_| {
        ProviderError::conflict(format!(
            "etag '{etag}' does not match the current version of key '{key}'"
        ))
    })
}

fn entry(key: String, value: &str, etag: i64) -> Result<Value, ProviderError> {
    let value: Value = serde_json::from_str(value).map_err(|e| {
        ProviderError::internal(format!("stored value of '{key}' is not JSON: {e}"))
    })?;
    Ok(json!({"key": key, "value": value, "etag": etag.to_string()}))
}

impl Connected {
    fn expiry(&self, ttl: Option<u64>, now: i64) -> Option<i64> {
        ttl.or(self.default_ttl_seconds)
            .map(|s| now.saturating_add(i64::try_from(s).unwrap_or(i64::MAX).saturating_mul(1000)))
    }

    async fn get(&self, req: KeyReq) -> Result<Value, ProviderError> {
        let row = sqlx::query(
            "SELECT value, etag FROM kv_entries \
             WHERE tenant = $1 AND store = $4 AND key = $2 AND (expires_at IS NULL OR expires_at > $3)",
        )
        .bind(&self.tenant)
        .bind(&req.key)
        .bind(now_ms())
        .bind(&self.store)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        match row {
            Some(row) => entry(
                req.key,
                row.try_get(0).map_err(db)?,
                row.try_get(1).map_err(db)?,
            ),
            None => Err(ProviderError::not_found(format!(
                "key '{}' not found",
                req.key
            ))),
        }
    }

    async fn set(&self, req: SetReq) -> Result<Value, ProviderError> {
        let value = req.value.to_string();
        if value.len() > self.max_value_bytes {
            return Err(ProviderError::validation(format!(
                "payload/value: {} bytes exceeds the limit of {} bytes (config max_value_bytes)",
                value.len(),
                self.max_value_bytes
            )));
        }
        let now = now_ms();
        let expires = self.expiry(req.ttl_seconds, now);
        let etag = new_etag();
        let written = match &req.etag {
            None => sqlx::query(
                "INSERT INTO kv_entries (tenant, store, key, value, etag, expires_at, updated_at) \
                 VALUES ($1, $7, $2, $3, $4, $5, $6) \
                 ON CONFLICT (tenant, store, key) DO UPDATE SET value = excluded.value, \
                 etag = excluded.etag, expires_at = excluded.expires_at, updated_at = excluded.updated_at",
            )
            .bind(&self.tenant)
            .bind(&req.key)
            .bind(&value)
            .bind(etag)
            .bind(expires)
            .bind(now)
            .bind(&self.store)
            .execute(&self.pool)
            .await
            .map_err(db)?
            .rows_affected(),
            Some(expected) => sqlx::query(
                "UPDATE kv_entries SET value = $3, etag = $4, expires_at = $5, updated_at = $6 \
                 WHERE tenant = $1 AND store = $8 AND key = $2 AND etag = $7 \
                 AND (expires_at IS NULL OR expires_at > $6)",
            )
            .bind(&self.tenant)
            .bind(&req.key)
            .bind(&value)
            .bind(etag)
            .bind(expires)
            .bind(now)
            .bind(parse_etag(&req.key, expected)?)
            .bind(&self.store)
            .execute(&self.pool)
            .await
            .map_err(db)?
            .rows_affected(),
        };
        if written == 0 {
            return Err(ProviderError::conflict(format!(
                "etag '{}' does not match the current version of key '{}'",
                req.etag.unwrap_or_default(),
                req.key
            )));
        }
        Ok(json!({"key": req.key, "etag": etag.to_string()}))
    }

    async fn delete(&self, req: KeyReq) -> Result<Value, ProviderError> {
        let now = now_ms();
        let removed = match &req.etag {
            None => sqlx::query(
                "DELETE FROM kv_entries WHERE tenant = $1 AND store = $4 AND key = $2 \
                 AND (expires_at IS NULL OR expires_at > $3)",
            )
            .bind(&self.tenant)
            .bind(&req.key)
            .bind(now)
            .bind(&self.store)
            .execute(&self.pool)
            .await
            .map_err(db)?
            .rows_affected(),
            Some(expected) => {
                let n = sqlx::query(
                    "DELETE FROM kv_entries WHERE tenant = $1 AND store = $5 AND key = $2 AND etag = $3 \
                     AND (expires_at IS NULL OR expires_at > $4)",
                )
                .bind(&self.tenant)
                .bind(&req.key)
                .bind(parse_etag(&req.key, expected)?)
                .bind(now)
                .bind(&self.store)
                .execute(&self.pool)
                .await
                .map_err(db)?
                .rows_affected();
                if n == 0 {
                    return Err(ProviderError::conflict(format!(
                        "etag '{expected}' does not match the current version of key '{}'",
                        req.key
                    )));
                }
                n
            }
        };
        Ok(json!({"key": req.key, "deleted": removed > 0}))
    }

    async fn list(&self, req: ListReq) -> Result<Value, ProviderError> {
        // One row more than asked tells whether there is a next page.
        let rows = sqlx::query(
            "SELECT key, value, etag FROM kv_entries \
             WHERE tenant = $1 AND store = $6 AND substr(key, 1, length($2)) = $2 AND key > $3 \
             AND (expires_at IS NULL OR expires_at > $4) ORDER BY key LIMIT $5",
        )
        .bind(&self.tenant)
        .bind(&req.prefix)
        .bind(&req.after)
        .bind(now_ms())
        .bind(req.limit + 1)
        .bind(&self.store)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let more = rows.len() as i64 > req.limit;
        let mut items = Vec::with_capacity(rows.len());
        for row in rows.iter().take(req.limit as usize) {
            items.push(entry(
                row.try_get(0).map_err(db)?,
                row.try_get(1).map_err(db)?,
                row.try_get(2).map_err(db)?,
            )?);
        }
        let next = if more {
            items
                .last()
                .map(|i| i["key"].clone())
                .unwrap_or(Value::Null)
        } else {
            Value::Null
        };
        Ok(json!({"items": items, "next": next}))
    }

    async fn bulk_get(&self, req: BulkReq) -> Result<Value, ProviderError> {
        let placeholders: Vec<String> =
            (0..req.keys.len()).map(|i| format!("${}", i + 4)).collect();
        let sql = format!(
            "SELECT key, value, etag FROM kv_entries WHERE tenant = $1 AND store = $3 \
             AND (expires_at IS NULL OR expires_at > $2) AND key IN ({})",
            placeholders.join(", ")
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&self.tenant)
            .bind(now_ms())
            .bind(&self.store);
        for key in &req.keys {
            query = query.bind(key);
        }
        let rows = query.fetch_all(&self.pool).await.map_err(db)?;
        let mut found = std::collections::HashMap::with_capacity(rows.len());
        for row in &rows {
            let key: String = row.try_get(0).map_err(db)?;
            found.insert(
                key,
                (
                    row.try_get::<String, _>(1).map_err(db)?,
                    row.try_get::<i64, _>(2).map_err(db)?,
                ),
            );
        }
        let mut items = Vec::with_capacity(req.keys.len());
        for key in req.keys {
            items.push(match found.get(&key) {
                Some((value, etag)) => {
                    let mut e = entry(key, value, *etag)?;
                    e["found"] = Value::Bool(true);
                    e
                }
                None => json!({"key": key, "found": false}),
            });
        }
        Ok(json!({"items": items}))
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
        let pool = ctx.resource::<AnyPool>().cloned().ok_or_else(|| {
            ProviderError::unavailable(
                "kv needs the host's system database, which was not provided",
            )
        })?;
        crate::migrate::run(&pool).await.map_err(|e| {
            tracing::error!(error = %e, "kv migrations failed");
            ProviderError::unavailable(
                "kv storage could not be prepared; the host log has the cause",
            )
        })?;
        // Expired rows are invisible to reads; clearing them here bounds their number.
        let store = if ctx.service().is_empty() {
            "kv"
        } else {
            ctx.service()
        };
        sqlx::query("DELETE FROM kv_entries WHERE tenant = $1 AND store = $3 AND expires_at <= $2")
            .bind(ctx.tenant())
            .bind(now_ms())
            .bind(store)
            .execute(&pool)
            .await
            .map_err(db)?;
        let connected = Connected {
            pool,
            tenant: ctx.tenant().to_owned(),
            store: store.to_owned(),
            max_value_bytes: config.max_value_bytes,
            default_ttl_seconds: config.default_ttl_seconds,
        };
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
        let state = self
            .state
            .get()
            .ok_or_else(|| ProviderError::unavailable("kv is not connected"))?;
        // The host routes by tenant; this guards the invariant rather than trusting it.
        if ctx.tenant() != state.tenant {
            return Err(ProviderError::forbidden(format!(
                "this kv instance serves tenant '{}', not '{}'",
                state.tenant,
                ctx.tenant()
            )));
        }
        match action {
            "get" => {
                let req: KeyReq = parse(payload)?;
                check_key("key", &req.key)?;
                state.get(req).await
            }
            "set" => {
                let req: SetReq = parse(payload)?;
                check_key("key", &req.key)?;
                state.set(req).await
            }
            "delete" => {
                let req: KeyReq = parse(payload)?;
                check_key("key", &req.key)?;
                state.delete(req).await
            }
            "list" => {
                let req: ListReq = parse(payload)?;
                check_key("prefix", &req.prefix)?;
                check_key("after", &req.after)?;
                state.list(req).await
            }
            "bulk_get" => {
                let req: BulkReq = parse(payload)?;
                for (i, key) in req.keys.iter().enumerate() {
                    check_key(&format!("keys/{i}"), key)?;
                }
                state.bulk_get(req).await
            }
            other => Err(ProviderError::not_found(format!(
                "kv has no action '{other}'"
            ))),
        }
    }

    async fn get_status(&self) -> Status {
        let Some(state) = self.state.get() else {
            return Status::failed("not connected");
        };
        match sqlx::query("SELECT 1").execute(&state.pool).await {
            Ok(_) => Status::ready(),
            Err(e) => Status::failed(format!("storage unreachable: {e}")),
        }
    }
}
