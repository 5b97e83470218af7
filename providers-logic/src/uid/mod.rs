//! `uid`: unique identifiers for materials and products, and their lifecycle.
//!
//! An identifier is `UID-{TENANT}-{PLANT}-{TYPE}-{SEQUENCE}-{CHECK}` (see [`code`]). Sequences
//! run per (tenant, plant, type) without gaps or duplicates: the sequence row is advanced and
//! the identifier stored in one transaction, so a failed issue consumes nothing. Each
//! identifier has a lifecycle of stages in the configured order, and may have a parent (the
//! lot it was made from), which `trace` follows both ways.

use std::collections::HashSet;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use providers_core::semver::Version;
use providers_core::{
    Action, CallContext, ConnectContext, Descriptor, Provider, ProviderError, Status, async_trait,
};
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::{AnyPool, Row};

pub mod code;

/// The `uid` provider.
#[derive(Default)]
pub struct Uid {
    state: OnceLock<Connected>,
}

struct Connected {
    pool: AnyPool,
    tenant: String,
    config: Config,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    tenant_code: String,
    plants: Vec<String>,
    #[serde(default = "default_types")]
    types: Vec<String>,
    #[serde(default = "default_stages")]
    stages: Vec<String>,
    #[serde(default = "default_depth")]
    max_trace_depth: u32,
}

fn default_types() -> Vec<String> {
    ["RM", "FG", "SA", "WIP", "PK"].map(String::from).to_vec()
}

fn default_stages() -> Vec<String> {
    [
        "PROCUREMENT",
        "GRN",
        "QC",
        "ISSUE_TO_PRODUCTION",
        "PRODUCTION",
        "DISPATCH",
    ]
    .map(String::from)
    .to_vec()
}

fn default_depth() -> u32 {
    10
}

/// At most this many identifiers in one `trace` answer's genealogy.
const MAX_TRACE_NODES: usize = 1000;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn storage(e: sqlx::Error) -> ProviderError {
    tracing::warn!(error = %e, "uid storage failed");
    ProviderError::unavailable("uid storage is unavailable; the host log has the cause")
}

fn code_schema(len: &str) -> Value {
    json!({"type": "string", "pattern": format!("^[A-Z0-9]{{{len}}}$")})
}

fn descriptor() -> Descriptor {
    let text = json!({"type": "string", "minLength": 1, "maxLength": 128});
    let uid = json!({"type": "string", "minLength": 1, "maxLength": 64});
    let item = json!({"type": "object", "properties": {
        "uid": {"type": "string"}, "plant": {"type": "string"}, "type": {"type": "string"},
        "sequence": {"type": "integer"}, "entity_type": {"type": "string"}, "entity_id": {"type": "string"},
        "parent": {"type": ["string", "null"]}, "created_ms": {"type": "integer"}
    }});
    Descriptor::new("uid", Version::new(1, 0, 0))
        .description("Unique identification (UID-TENANT-PLANT-TYPE-SEQUENCE-CHECK, ISO/IEC 7064 MOD 1271-36) and lifecycle traceability.")
        .config_schema(json!({
            "type": "object",
            "properties": {
                "tenant_code": code_schema("4"),
                "plants": {"type": "array", "items": code_schema("3"), "minItems": 1, "uniqueItems": true},
                "types": {"type": "array", "items": code_schema("2,3"), "minItems": 1, "uniqueItems": true},
                "stages": {"type": "array", "items": {"type": "string", "pattern": "^[A-Z][A-Z0-9_]{0,39}$"}, "minItems": 1, "uniqueItems": true},
                "max_trace_depth": {"type": "integer", "minimum": 1, "maximum": 50}
            },
            "required": ["tenant_code", "plants"],
            "additionalProperties": false
        }))
        .action(
            Action::new("issue")
                .description("Issues the next identifier of a plant and type for an entity, optionally made from a parent identifier.")
                .permission("uid.issue")
                .input(json!({
                    "type": "object",
                    "properties": {"plant": {"type": "string"}, "type": {"type": "string"}, "entity_type": text, "entity_id": text, "parent": uid},
                    "required": ["plant", "type", "entity_type", "entity_id"],
                    "additionalProperties": false
                }))
                .output(json!({"type": "object", "properties": {"uid": {"type": "string"}, "sequence": {"type": "integer"}}, "required": ["uid", "sequence"]})),
        )
        .action(
            Action::new("validate")
                .description("Says whether a string is a valid identifier of this tenant, and if not which part is wrong and why. Pure computation; with `check_known`, also whether it was issued here (one read).")
                .permission("uid.read")
                .idempotent()
                .input(json!({"type": "object", "properties": {"uid": {"type": "string", "maxLength": 256}, "check_known": {"type": "boolean"}}, "required": ["uid"], "additionalProperties": false}))
                .output(json!({"type": "object", "properties": {
                    "valid": {"type": "boolean"}, "known": {"type": ["boolean", "null"]},
                    "problems": {"type": "array", "items": {"type": "object", "properties": {"part": {"type": "string"}, "reason": {"type": "string"}}}}
                }, "required": ["valid", "known", "problems"]})),
        )
        .action(
            Action::new("record")
                .description("Appends a lifecycle stage; stages go forward in the configured order (CONFLICT otherwise).")
                .permission("uid.record")
                .input(json!({
                    "type": "object",
                    "properties": {"uid": uid, "stage": {"type": "string"}, "reference": {"type": "string", "maxLength": 256}, "location": {"type": "string", "maxLength": 256}, "at_ms": {"type": "integer", "minimum": 0}},
                    "required": ["uid", "stage"],
                    "additionalProperties": false
                }))
                .output(json!({"type": "object", "properties": {"uid": {"type": "string"}, "position": {"type": "integer"}, "stage": {"type": "string"}}})),
        )
        .action(
            Action::new("trace")
                .description("An identifier's lifecycle with its ancestors and descendants, to a bounded depth.")
                .permission("uid.read")
                .idempotent()
                .input(json!({"type": "object", "properties": {"uid": uid, "depth": {"type": "integer", "minimum": 1, "maximum": 50}}, "required": ["uid"], "additionalProperties": false}))
                .output(json!({"type": "object", "properties": {"item": item, "lifecycle": {"type": "array"}, "ancestors": {"type": "array"}, "descendants": {"type": "array"}, "truncated": {"type": "boolean"}}})),
        )
        .action(
            Action::new("lookup")
                .description("The identifiers issued for an entity.")
                .permission("uid.read")
                .idempotent()
                .input(json!({"type": "object", "properties": {"entity_type": text, "entity_id": text}, "required": ["entity_type", "entity_id"], "additionalProperties": false}))
                .output(json!({"type": "object", "properties": {"uids": {"type": "array", "items": item}}})),
        )
}

#[derive(Deserialize)]
struct IssueReq {
    plant: String,
    #[serde(rename = "type")]
    kind: String,
    entity_type: String,
    entity_id: String,
    #[serde(default)]
    parent: Option<String>,
}

#[derive(Deserialize)]
struct RecordReq {
    uid: String,
    stage: String,
    #[serde(default)]
    reference: String,
    #[serde(default)]
    location: String,
    #[serde(default)]
    at_ms: Option<i64>,
}

fn parse<T: serde::de::DeserializeOwned>(payload: Value) -> Result<T, ProviderError> {
    serde_json::from_value(payload).map_err(|e| ProviderError::validation(e.to_string()))
}

fn item_json(row: &sqlx::any::AnyRow) -> Result<Value, sqlx::Error> {
    Ok(json!({
        "uid": row.try_get::<String, _>("uid")?,
        "plant": row.try_get::<String, _>("plant")?,
        "type": row.try_get::<String, _>("kind")?,
        "sequence": row.try_get::<i64, _>("sequence")?,
        "entity_type": row.try_get::<String, _>("entity_type")?,
        "entity_id": row.try_get::<String, _>("entity_id")?,
        "parent": row.try_get::<Option<String>, _>("parent")?,
        "created_ms": row.try_get::<i64, _>("created_ms")?,
    }))
}

const ITEM: &str =
    "SELECT uid, plant, kind, sequence, entity_type, entity_id, parent, created_ms FROM uid_items";

impl Connected {
    fn not_found(&self, uid: &str) -> ProviderError {
        ProviderError::not_found(format!("no identifier '{uid}' was issued to this tenant"))
    }

    async fn issue(&self, req: IssueReq) -> Result<Value, ProviderError> {
        let c = &self.config;
        if !c.plants.contains(&req.plant) {
            return Err(ProviderError::validation(format!(
                "plant '{}' is not configured (plants: {})",
                req.plant,
                c.plants.join(", ")
            )));
        }
        if !c.types.contains(&req.kind) {
            return Err(ProviderError::validation(format!(
                "type '{}' is not configured (types: {})",
                req.kind,
                c.types.join(", ")
            )));
        }
        let mut tx = self.pool.begin().await.map_err(storage)?;
        // The first statement writes, so SQLite takes its write lock at once (no read-to-write
        // upgrade to fail under contention) and PostgreSQL locks the sequence row.
        let row = sqlx::query(
            "INSERT INTO uid_sequences (tenant, plant, kind, last) VALUES ($1, $2, $3, 1) \
             ON CONFLICT (tenant, plant, kind) DO UPDATE SET last = uid_sequences.last + 1 \
             RETURNING last",
        )
        .bind(&self.tenant)
        .bind(&req.plant)
        .bind(&req.kind)
        .fetch_one(&mut *tx)
        .await
        .map_err(storage)?;
        let sequence: i64 = row.try_get(0).map_err(storage)?;
        if sequence > code::MAX_SEQUENCE {
            return Err(ProviderError::conflict(format!(
                "the sequence of plant '{}' and type '{}' is exhausted ({} identifiers issued)",
                req.plant,
                req.kind,
                code::MAX_SEQUENCE
            )));
        }
        if let Some(parent) = &req.parent {
            let found = sqlx::query("SELECT 1 FROM uid_items WHERE tenant = $1 AND uid = $2")
                .bind(&self.tenant)
                .bind(parent)
                .fetch_optional(&mut *tx)
                .await
                .map_err(storage)?;
            if found.is_none() {
                // Dropping the transaction rolls the sequence back: nothing is consumed.
                return Err(ProviderError::not_found(format!(
                    "parent '{parent}' was not issued to this tenant"
                )));
            }
        }
        let uid = code::format(&c.tenant_code, &req.plant, &req.kind, sequence);
        sqlx::query(
            "INSERT INTO uid_items (tenant, uid, plant, kind, sequence, entity_type, entity_id, parent, created_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&self.tenant)
        .bind(&uid)
        .bind(&req.plant)
        .bind(&req.kind)
        .bind(sequence)
        .bind(&req.entity_type)
        .bind(&req.entity_id)
        .bind(req.parent.as_deref())
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(storage)?;
        tx.commit().await.map_err(storage)?;
        Ok(json!({"uid": uid, "sequence": sequence}))
    }

    async fn known(&self, uid: &str) -> Result<bool, ProviderError> {
        Ok(
            sqlx::query("SELECT 1 FROM uid_items WHERE tenant = $1 AND uid = $2")
                .bind(&self.tenant)
                .bind(uid)
                .fetch_optional(&self.pool)
                .await
                .map_err(storage)?
                .is_some(),
        )
    }

    async fn validate(&self, text: &str, check_known: bool) -> Result<Value, ProviderError> {
        let c = &self.config;
        let problems = match code::parse(text) {
            Err(problems) => problems,
            Ok(parts) => {
                let mut problems = Vec::new();
                // Another tenant's identifiers are simply not this tenant's: nothing more is said.
                if parts.tenant != c.tenant_code {
                    problems.push(code::Problem {
                        part: "tenant",
                        reason: format!("'{}' is not this tenant's code", parts.tenant),
                    });
                }
                if !c.plants.contains(&parts.plant) {
                    problems.push(code::Problem {
                        part: "plant",
                        reason: format!("unknown plant '{}'", parts.plant),
                    });
                }
                if !c.types.contains(&parts.kind) {
                    problems.push(code::Problem {
                        part: "type",
                        reason: format!("unknown type '{}'", parts.kind),
                    });
                }
                problems
            }
        };
        let valid = problems.is_empty();
        // Unasked, no I/O: `known` is null.
        let known = if check_known {
            json!(valid && self.known(text).await?)
        } else {
            Value::Null
        };
        let problems: Vec<Value> = problems
            .into_iter()
            .map(|p| json!({"part": p.part, "reason": p.reason}))
            .collect();
        Ok(json!({"uid": text, "valid": valid, "known": known, "problems": problems}))
    }

    async fn record(&self, req: RecordReq) -> Result<Value, ProviderError> {
        let stages = &self.config.stages;
        let Some(index) = stages.iter().position(|s| *s == req.stage) else {
            return Err(ProviderError::validation(format!(
                "unknown stage '{}' (stages, in order: {})",
                req.stage,
                stages.join(", ")
            )));
        };
        let mut tx = self.pool.begin().await.map_err(storage)?;
        // A write first: it locks the identifier's row (PostgreSQL) or the database (SQLite),
        // so two records of one identifier run one after the other.
        let touched = sqlx::query(
            "UPDATE uid_items SET created_ms = created_ms WHERE tenant = $1 AND uid = $2",
        )
        .bind(&self.tenant)
        .bind(&req.uid)
        .execute(&mut *tx)
        .await
        .map_err(storage)?;
        if touched.rows_affected() == 0 {
            return Err(self.not_found(&req.uid));
        }
        let last = sqlx::query(
            "SELECT position, stage FROM uid_events WHERE tenant = $1 AND uid = $2 ORDER BY position DESC LIMIT 1",
        )
        .bind(&self.tenant)
        .bind(&req.uid)
        .fetch_optional(&mut *tx)
        .await
        .map_err(storage)?;
        let (position, previous) = match last {
            Some(row) => (
                row.try_get::<i64, _>(0).map_err(storage)? + 1,
                Some(row.try_get::<String, _>(1).map_err(storage)?),
            ),
            None => (1, None),
        };
        if let Some(previous) = &previous {
            let before = stages.iter().position(|s| s == previous).unwrap_or(0);
            if index <= before {
                let allowed: Vec<&str> = stages[before + 1..].iter().map(String::as_str).collect();
                return Err(ProviderError::conflict(format!(
                    "'{}' is at stage {previous}; {} cannot follow it (allowed next: {})",
                    req.uid,
                    req.stage,
                    if allowed.is_empty() {
                        "none, it is at the last stage".to_owned()
                    } else {
                        allowed.join(", ")
                    }
                )));
            }
        }
        sqlx::query(
            "INSERT INTO uid_events (tenant, uid, position, stage, reference, location, at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&self.tenant)
        .bind(&req.uid)
        .bind(position)
        .bind(&req.stage)
        .bind(&req.reference)
        .bind(&req.location)
        .bind(req.at_ms.unwrap_or_else(now_ms))
        .execute(&mut *tx)
        .await
        .map_err(storage)?;
        tx.commit().await.map_err(storage)?;
        Ok(json!({"uid": req.uid, "position": position, "stage": req.stage}))
    }

    async fn item(&self, uid: &str) -> Result<Option<Value>, ProviderError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{ITEM} WHERE tenant = $1 AND uid = $2"
        )))
        .bind(&self.tenant)
        .bind(uid)
        .fetch_optional(&self.pool)
        .await
        .map_err(storage)?;
        row.as_ref().map(item_json).transpose().map_err(storage)
    }

    async fn trace(&self, uid: &str, depth: u32) -> Result<Value, ProviderError> {
        let item = self.item(uid).await?.ok_or_else(|| self.not_found(uid))?;
        let rows = sqlx::query(
            "SELECT position, stage, reference, location, at_ms FROM uid_events WHERE tenant = $1 AND uid = $2 ORDER BY position",
        )
        .bind(&self.tenant)
        .bind(uid)
        .fetch_all(&self.pool)
        .await
        .map_err(storage)?;
        let lifecycle = rows
            .iter()
            .map(|r| {
                Ok(json!({
                    "position": r.try_get::<i64, _>(0)?,
                    "stage": r.try_get::<String, _>(1)?,
                    "reference": r.try_get::<String, _>(2)?,
                    "location": r.try_get::<String, _>(3)?,
                    "at_ms": r.try_get::<i64, _>(4)?,
                }))
            })
            .collect::<Result<Vec<Value>, sqlx::Error>>()
            .map_err(storage)?;
        let mut seen: HashSet<String> = HashSet::from([uid.to_owned()]);
        let mut truncated = false;
        // Up the parent chain.
        let mut ancestors = Vec::new();
        let mut parent = item["parent"].as_str().map(str::to_owned);
        for level in 1..=depth {
            let Some(p) = parent.take() else { break };
            if !seen.insert(p.clone()) {
                break;
            }
            let Some(mut found) = self.item(&p).await? else {
                break;
            };
            parent = found["parent"].as_str().map(str::to_owned);
            found["level"] = json!(level);
            ancestors.push(found);
        }
        truncated |= parent.is_some();
        // Down, breadth first.
        let mut descendants = Vec::new();
        let mut frontier = vec![uid.to_owned()];
        for level in 1..=depth {
            if frontier.is_empty() {
                break;
            }
            let mut next = Vec::new();
            for p in &frontier {
                let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "{ITEM} WHERE tenant = $1 AND parent = $2 ORDER BY uid"
                )))
                .bind(&self.tenant)
                .bind(p)
                .fetch_all(&self.pool)
                .await
                .map_err(storage)?;
                for row in &rows {
                    let mut child = item_json(row).map_err(storage)?;
                    let id = child["uid"].as_str().unwrap_or_default().to_owned();
                    if !seen.insert(id.clone()) {
                        continue;
                    }
                    if seen.len() > MAX_TRACE_NODES {
                        truncated = true;
                        break;
                    }
                    child["level"] = json!(level);
                    descendants.push(child);
                    next.push(id);
                }
            }
            frontier = next;
            if level == depth && !frontier.is_empty() {
                truncated = true;
            }
        }
        Ok(json!({
            "item": item,
            "lifecycle": lifecycle,
            "ancestors": ancestors,
            "descendants": descendants,
            "truncated": truncated,
        }))
    }

    async fn lookup(&self, entity_type: &str, entity_id: &str) -> Result<Value, ProviderError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{ITEM} WHERE tenant = $1 AND entity_type = $2 AND entity_id = $3 ORDER BY uid LIMIT 1000"
        )))
        .bind(&self.tenant)
        .bind(entity_type)
        .bind(entity_id)
        .fetch_all(&self.pool)
        .await
        .map_err(storage)?;
        let uids = rows
            .iter()
            .map(item_json)
            .collect::<Result<Vec<Value>, sqlx::Error>>()
            .map_err(storage)?;
        Ok(json!({"uids": uids}))
    }
}

#[async_trait]
impl Provider for Uid {
    fn descriptor(&self) -> Descriptor {
        descriptor()
    }

    async fn connect(&mut self, ctx: &ConnectContext) -> Result<(), ProviderError> {
        let config: Config = serde_json::from_value(ctx.config().clone())
            .map_err(|e| ProviderError::validation(format!("uid config: {e}")))?;
        let pool = crate::migrate::connected_pool(ctx, "uid").await?;
        let _ = self.state.set(Connected {
            pool,
            tenant: ctx.tenant().to_owned(),
            config,
        });
        Ok(())
    }

    async fn disconnect(&self) -> Result<(), ProviderError> {
        Ok(())
    }

    async fn execute(
        &self,
        action: &str,
        payload: Value,
        _ctx: &CallContext,
    ) -> Result<Value, ProviderError> {
        let c = self
            .state
            .get()
            .ok_or_else(|| ProviderError::unavailable("uid is not connected"))?;
        match action {
            "issue" => c.issue(parse(payload)?).await,
            "validate" => {
                let text = payload["uid"].as_str().unwrap_or_default().to_owned();
                let check_known = payload["check_known"].as_bool().unwrap_or(false);
                c.validate(&text, check_known).await
            }
            "record" => c.record(parse(payload)?).await,
            "trace" => {
                let uid = payload["uid"].as_str().unwrap_or_default().to_owned();
                let depth = payload["depth"]
                    .as_u64()
                    .map_or(c.config.max_trace_depth, |d| {
                        (d as u32).min(c.config.max_trace_depth)
                    });
                c.trace(&uid, depth).await
            }
            "lookup" => {
                let t = payload["entity_type"].as_str().unwrap_or_default();
                let i = payload["entity_id"].as_str().unwrap_or_default();
                c.lookup(t, i).await
            }
            other => Err(ProviderError::not_found(format!(
                "uid has no action '{other}'"
            ))),
        }
    }

    async fn get_status(&self) -> Status {
        match self.state.get() {
            None => Status::failed("not connected"),
            Some(c) => match sqlx::query("SELECT 1").execute(&c.pool).await {
                Ok(_) => Status::ready(),
                Err(e) => Status::failed(format!("storage: {e}")),
            },
        }
    }
}
