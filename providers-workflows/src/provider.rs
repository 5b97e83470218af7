//! The `workflows` provider: start, read and list instances, decide approvals, cancel, signal.
//!
//! The provider writes what callers decide; the executor (`executor.rs`, run by the host)
//! does everything that happens by itself: running steps, retrying, compensating, timers,
//! SLAs and escalation.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use providers_core::{
    Action, CallContext, ConnectContext, Descriptor, Provider, ProviderError, Status,
};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sqlx::{AnyPool, Row};

use crate::definition::{Definition, StepKind};
use crate::executor::{begin_compensation, now_ms};
use crate::store::{self, Event, Instance, Loaded, state};

/// The builtin `workflows` provider.
#[derive(Default)]
pub struct Workflows {
    state: OnceLock<Connected>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Filled in by the host from `[workflows] definitions`.
    #[serde(default)]
    definitions: Vec<Definition>,
    #[serde(default = "default_input_bytes")]
    max_input_bytes: usize,
    #[serde(default = "default_comment_bytes")]
    max_comment_bytes: usize,
}

fn default_input_bytes() -> usize {
    64 * 1024
}

fn default_comment_bytes() -> usize {
    4096
}

struct Connected {
    pool: AnyPool,
    tenant: String,
    /// The current version of each definition, by name.
    definitions: BTreeMap<String, Arc<Loaded>>,
    max_input_bytes: usize,
    max_comment_bytes: usize,
}

pub(crate) fn descriptor() -> Descriptor {
    let id = json!({"type": "string", "minLength": 1, "maxLength": 64});
    let comment = json!({"type": "string", "maxLength": 65536});
    let decision = json!({
        "type": "object",
        "required": ["id"],
        "additionalProperties": false,
        "properties": {"id": id, "comment": comment},
    });
    Descriptor::new("workflows", providers_core::semver::Version::new(1, 0, 0))
        .description("Durable workflows: steps that call providers, approvals with SLAs and escalation, timers and signals, with retries and compensation.")
        .action(
            Action::new("start")
                .permission("workflows.start")
                .description("Starts a workflow. The same idempotency_key returns the same instance.")
                .compensated_by("cancel")
                .input(json!({
                    "type": "object",
                    "required": ["definition"],
                    "additionalProperties": false,
                    "properties": {
                        "definition": {"type": "string", "minLength": 1, "maxLength": 64},
                        "input": {"type": "object"},
                        "idempotency_key": {"type": "string", "minLength": 1, "maxLength": 200},
                    },
                })),
        )
        .action(
            Action::new("get")
                .permission("workflows.read")
                .idempotent()
                .description("An instance: its state, current step and full history.")
                .input(json!({"type": "object", "required": ["id"], "additionalProperties": false, "properties": {"id": id}})),
        )
        .action(
            Action::new("list")
                .permission("workflows.read")
                .idempotent()
                .description("Instances, newest first, filtered; `awaiting_me` lists the approvals the caller may decide.")
                .input(json!({
                    "type": "object",
                    "additionalProperties": false,
                    "properties": {
                        "definition": {"type": "string"},
                        "state": {"type": "string"},
                        "requester": {"type": "string"},
                        "awaiting_me": {"type": "boolean"},
                        "limit": {"type": "integer", "minimum": 1, "maximum": 500},
                        "after": {"type": "string"},
                    },
                })),
        )
        .action(
            Action::new("definitions")
                .permission("workflows.read")
                .idempotent()
                .description("The workflows that can be started, with their steps.")
                .input(json!({"type": "object", "additionalProperties": false})),
        )
        .action(Action::new("approve").permission("workflows.decide").description("Approves the pending step (the caller needs the step's role and must not be the requester).").input(decision.clone()))
        .action(Action::new("reject").permission("workflows.decide").description("Rejects the request: completed steps are compensated, then it is REJECTED. A comment is required.").input(decision.clone()))
        .action(Action::new("send_back").permission("workflows.decide").description("Sends the request back to the previous approval step, or to the requester from the first. A comment is required.").input(decision))
        .action(
            Action::new("resubmit")
                .permission("workflows.start")
                .description("The requester resubmits a request that was sent back, optionally with changed input fields.")
                .input(json!({"type": "object", "required": ["id"], "additionalProperties": false,
                    "properties": {"id": id, "input": {"type": "object"}, "comment": comment}})),
        )
        .action(
            Action::new("cancel")
                .permission("workflows.cancel")
                .description("Cancels an instance: completed steps are compensated in reverse order, then it is CANCELLED.")
                .input(json!({"type": "object", "required": ["id"], "additionalProperties": false, "properties": {"id": id, "comment": comment}})),
        )
        .action(
            Action::new("signal")
                .permission("workflows.signal")
                .description("Sends an external event; a signal step waiting for its name continues with the payload. Each name is received once per instance.")
                .input(json!({"type": "object", "required": ["id", "name"], "additionalProperties": false,
                    "properties": {"id": id, "name": {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,63}$"}, "payload": {}}})),
        )
        .config_schema(json!({
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "definitions": {"type": "array", "description": "Set by the host from [workflows] definitions."},
                "max_input_bytes": {"type": "integer", "minimum": 2, "maximum": 16777216},
                "max_comment_bytes": {"type": "integer", "minimum": 1, "maximum": 1048576},
            },
        }))
}

pub(crate) fn db_error(e: sqlx::Error) -> ProviderError {
    tracing::error!(error = %e, "workflows storage error");
    ProviderError::unavailable("workflow storage is unavailable; the host log has the cause")
}

fn id_of(payload: &Value) -> Result<&str, ProviderError> {
    payload
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| ProviderError::validation("payload at '/id': an instance id is required"))
}

impl Connected {
    async fn instance(&self, id: &str) -> Result<Instance, ProviderError> {
        store::load(&self.pool, &self.tenant, id)
            .await
            .map_err(db_error)?
            .ok_or_else(|| ProviderError::not_found(format!("no workflow instance '{id}'")))
    }

    fn comment(
        &self,
        payload: &Value,
        required: bool,
        action: &str,
    ) -> Result<Option<String>, ProviderError> {
        let comment = payload
            .get("comment")
            .and_then(Value::as_str)
            .map(str::trim);
        match comment {
            Some(c) if c.len() > self.max_comment_bytes => Err(ProviderError::validation(format!(
                "payload at '/comment': {} bytes, over the limit of {} (max_comment_bytes)",
                c.len(),
                self.max_comment_bytes
            ))),
            Some(c) if !c.is_empty() => Ok(Some(c.to_owned())),
            _ if required => Err(ProviderError::validation(format!(
                "payload at '/comment': {action} needs a comment saying why"
            ))),
            _ => Ok(None),
        }
    }

    fn check_input(&self, loaded: &Loaded, input: &Value) -> Result<(), ProviderError> {
        let size = input.to_string().len();
        if size > self.max_input_bytes {
            return Err(ProviderError::validation(format!(
                "payload at '/input': {size} bytes, over the limit of {} (max_input_bytes)",
                self.max_input_bytes
            )));
        }
        if let Some(schema) = &loaded.input
            && let Err(e) = schema.validate(input)
        {
            let at = e.instance_path().as_str();
            return Err(ProviderError::validation(format!(
                "payload at '/input{at}': {e} (workflow '{}' version {})",
                loaded.definition.name, loaded.definition.version
            )));
        }
        Ok(())
    }

    async fn start(&self, payload: Value, ctx: &CallContext) -> Result<Value, ProviderError> {
        let name = payload
            .get("definition")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let loaded = self.definitions.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.definitions.keys().map(String::as_str).collect();
            ProviderError::not_found(format!(
                "no workflow named '{name}' (defined: {})",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ))
        })?;
        let input = payload.get("input").cloned().unwrap_or_else(|| json!({}));
        self.check_input(loaded, &input)?;
        // The payload's key, else the call's (a client's `Idempotency-Key`, a workflow step's).
        let key = payload
            .get("idempotency_key")
            .and_then(Value::as_str)
            .or(ctx.idempotency_key());
        let request_hash = {
            use sha2::{Digest, Sha256};
            let hash = Sha256::digest(
                format!("{}\n{}\n{input}", loaded.definition.name, ctx.subject()).as_bytes(),
            );
            hash.iter().map(|b| format!("{b:02x}")).collect::<String>()
        };
        let now = now_ms();
        let id = uuid::Uuid::new_v4().to_string();
        let body = serde_json::to_string(&loaded.definition)
            .map_err(|e| ProviderError::internal(e.to_string()))?;
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        sqlx::query(
            "INSERT INTO wf_definitions (digest, name, version, body, created_ms) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (digest) DO NOTHING",
        )
        .bind(&loaded.digest)
        .bind(&loaded.definition.name)
        .bind(i64::from(loaded.definition.version))
        .bind(body)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        let inserted = sqlx::query(
            "INSERT INTO wf_instances (id, tenant, definition, version, digest, idempotency_key, request_hash, \
             requester, roles, company_id, state, ending, cursor, round, attempt, entered_ms, role, escalated_to, \
             reminders, input, outputs, done, error, cancel_requested, due_ms, lease_owner, lease_until_ms, rev, \
             created_ms, updated_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'INITIATED', NULL, 0, 0, 0, NULL, NULL, NULL, \
             0, $11, '{}', '[]', NULL, 0, $12, NULL, NULL, 1, $12, $12) \
             ON CONFLICT (tenant, idempotency_key) DO NOTHING RETURNING id",
        )
        .bind(&id)
        .bind(&self.tenant)
        .bind(&loaded.definition.name)
        .bind(i64::from(loaded.definition.version))
        .bind(&loaded.digest)
        .bind(key)
        .bind(&request_hash)
        .bind(ctx.subject())
        .bind(json!(ctx.roles()).to_string())
        .bind(ctx.company_id())
        .bind(input.to_string())
        .bind(now)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?;
        if inserted.is_none() {
            tx.rollback().await.map_err(db_error)?;
            // Only constant column names are formatted in; values are bound.
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {} FROM wf_instances WHERE tenant = $1 AND idempotency_key = $2",
                store::COLUMNS
            )))
            .bind(&self.tenant)
            .bind(key)
            .fetch_one(&self.pool)
            .await
            .map_err(db_error)?;
            let existing = Instance::from_row(&row).map_err(db_error)?;
            if existing.request_hash != request_hash {
                return Err(ProviderError::conflict(format!(
                    "idempotency key '{}' already started instance '{}' with another definition, input or requester",
                    key.unwrap_or_default(),
                    existing.id
                )));
            }
            return Ok(
                json!({"id": existing.id, "state": existing.state, "created": false,
                "definition": existing.definition, "version": existing.version}),
            );
        }
        let started = Event {
            kind: "started",
            step: None,
            actor: Some(ctx.subject().to_owned()),
            comment: None,
            detail: json!({"definition": loaded.definition.name, "version": loaded.definition.version, "idempotency_key": key}),
        };
        store::write_events(&mut tx, &id, now, &[started])
            .await
            .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        store::remember(loaded);
        crate::wake();
        Ok(json!({"id": id, "state": state::INITIATED, "created": true,
            "definition": loaded.definition.name, "version": loaded.definition.version}))
    }

    async fn get(&self, payload: &Value) -> Result<Value, ProviderError> {
        let inst = self.instance(id_of(payload)?).await?;
        let loaded = store::snapshot(&self.pool, &inst.digest).await?;
        let rows = sqlx::query(
            "SELECT at_ms, kind, step, actor, comment, detail FROM wf_history WHERE instance = $1 ORDER BY id",
        )
        .bind(&inst.id)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        let mut history = Vec::with_capacity(rows.len());
        for r in rows {
            let detail: String = r.try_get("detail").map_err(db_error)?;
            history.push(json!({
                "at_ms": r.try_get::<i64, _>("at_ms").map_err(db_error)?,
                "event": r.try_get::<String, _>("kind").map_err(db_error)?,
                "step": r.try_get::<Option<String>, _>("step").map_err(db_error)?,
                "actor": r.try_get::<Option<String>, _>("actor").map_err(db_error)?,
                "comment": r.try_get::<Option<String>, _>("comment").map_err(db_error)?,
                "detail": serde_json::from_str::<Value>(&detail).unwrap_or(Value::Null),
            }));
        }
        let mut out = inst.summary(Some(&loaded.definition));
        let current = loaded
            .definition
            .steps
            .get(usize::try_from(inst.cursor).unwrap_or(usize::MAX))
            .filter(|_| !state::is_final(&inst.state));
        if let Value::Object(fields) = &mut out {
            fields.insert("input".into(), inst.input.clone());
            fields.insert("outputs".into(), Value::Object(inst.outputs.clone()));
            fields.insert("error".into(), json!(inst.error));
            fields.insert("cancel_requested".into(), json!(inst.cancel_requested));
            fields.insert("idempotency_key".into(), json!(inst.idempotency_key));
            fields.insert(
                "current".into(),
                current.map_or(Value::Null, |s| {
                    json!({"id": s.id, "name": s.name, "type": kind_name(&s.kind),
                        "since_ms": inst.entered_ms, "due_ms": inst.due_ms, "attempt": inst.attempt})
                }),
            );
            fields.insert("history".into(), Value::Array(history));
        }
        Ok(out)
    }

    async fn list(&self, payload: &Value, ctx: &CallContext) -> Result<Value, ProviderError> {
        let limit = payload.get("limit").and_then(Value::as_i64).unwrap_or(50);
        let mut sql = format!(
            "SELECT {} FROM wf_instances WHERE tenant = $1",
            store::COLUMNS
        );
        let mut binds: Vec<Value> = vec![json!(self.tenant)];
        let mut add = |sql: &mut String, clause: &str, value: Value| {
            binds.push(value);
            sql.push_str(&clause.replace('?', &format!("${}", binds.len())));
        };
        for field in ["definition", "state", "requester"] {
            if let Some(v) = payload.get(field).and_then(Value::as_str) {
                add(&mut sql, &format!(" AND {field} = ?"), json!(v));
            }
        }
        if payload.get("awaiting_me").and_then(Value::as_bool) == Some(true) {
            sql.push_str(" AND state = 'PENDING_APPROVAL'");
            add(&mut sql, " AND requester <> ?", json!(ctx.subject()));
            let mut roles = String::new();
            for role in ctx.roles() {
                binds.push(json!(role));
                let n = binds.len();
                if !roles.is_empty() {
                    roles.push_str(", ");
                }
                roles.push_str(&format!("${n}"));
            }
            if roles.is_empty() {
                sql.push_str(" AND 1 = 0");
            } else {
                sql.push_str(&format!(
                    " AND (role IN ({roles}) OR escalated_to IN ({roles}))"
                ));
            }
        }
        if let Some(after) = payload.get("after").and_then(Value::as_str) {
            let (ms, id) = after
                .split_once('/')
                .and_then(|(ms, id)| Some((ms.parse::<i64>().ok()?, id.to_owned())))
                .ok_or_else(|| {
                    ProviderError::validation(
                        "payload at '/after': not a cursor this action returned",
                    )
                })?;
            binds.push(json!(ms));
            let a = binds.len();
            binds.push(json!(id));
            let b = binds.len();
            sql.push_str(&format!(
                " AND (created_ms < ${a} OR (created_ms = ${a} AND id < ${b}))"
            ));
        }
        binds.push(json!(limit + 1));
        sql.push_str(&format!(
            " ORDER BY created_ms DESC, id DESC LIMIT ${}",
            binds.len()
        ));
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for b in &binds {
            query = match b {
                Value::String(s) => query.bind(s.clone()),
                Value::Number(n) => query.bind(n.as_i64().unwrap_or(0)),
                _ => query,
            };
        }
        let rows = query.fetch_all(&self.pool).await.map_err(db_error)?;
        let mut items = Vec::new();
        let mut next = Value::Null;
        for (i, row) in rows.iter().enumerate() {
            let inst = Instance::from_row(row).map_err(db_error)?;
            if i as i64 == limit {
                break;
            }
            if i as i64 == limit - 1 && rows.len() as i64 > limit {
                next = json!(format!("{}/{}", inst.created_ms, inst.id));
            }
            let loaded = store::snapshot(&self.pool, &inst.digest).await.ok();
            items.push(inst.summary(loaded.as_ref().map(|l| &l.definition)));
        }
        Ok(json!({"items": items, "next": next}))
    }

    /// approve, reject, send_back.
    async fn decide(
        &self,
        decision: &'static str,
        payload: &Value,
        ctx: &CallContext,
    ) -> Result<Value, ProviderError> {
        let comment = self.comment(payload, decision != "approve", decision)?;
        let mut inst = self.instance(id_of(payload)?).await?;
        let loaded = store::snapshot(&self.pool, &inst.digest).await?;
        let cursor = usize::try_from(inst.cursor).unwrap_or(usize::MAX);
        let step = loaded.definition.steps.get(cursor);
        let (step, actions, role) = match (inst.state.as_str(), step.map(|s| (s, &s.kind))) {
            (state::PENDING_APPROVAL, Some((s, StepKind::Approval { actions, role, .. }))) => {
                (s, actions, role)
            }
            (other, _) => {
                return Err(ProviderError::conflict(format!(
                    "instance '{}' is {other}; only a pending approval can be decided",
                    inst.id
                )));
            }
        };
        if !actions.iter().any(|a| a == decision) {
            return Err(ProviderError::validation(format!(
                "step '{}' ({}) allows {}, not {decision}",
                step.id,
                step.name,
                actions.join(", ")
            )));
        }
        let may = ctx
            .roles()
            .iter()
            .any(|r| r == role || inst.escalated_to.as_deref() == Some(r.as_str()));
        if !may {
            let also = inst
                .escalated_to
                .as_deref()
                .map(|e| format!(" or {e}"))
                .unwrap_or_default();
            return Err(ProviderError::forbidden(format!(
                "deciding step '{}' ({}) needs role {role}{also}; the caller has {:?}",
                step.id,
                step.name,
                ctx.roles()
            )));
        }
        if ctx.subject() == inst.requester {
            return Err(ProviderError::forbidden(format!(
                "separation of duties: '{}' requested instance '{}' and cannot decide it",
                inst.requester, inst.id
            )));
        }
        let now = now_ms();
        let kind = match decision {
            "approve" => {
                let more = loaded.definition.steps[cursor + 1..]
                    .iter()
                    .any(|s| matches!(s.kind, StepKind::Approval { .. }));
                inst.outputs.insert(
                    step.id.clone(),
                    json!({"decision": "approved", "by": ctx.subject(), "comment": comment,
                        "roles": ctx.roles(), "company_id": ctx.company_id()}),
                );
                inst.cursor += 1;
                inst.state = if more {
                    state::RUNNING
                } else {
                    state::APPROVED
                }
                .into();
                "approved"
            }
            "reject" => {
                begin_compensation(&mut inst, state::REJECTED);
                "rejected"
            }
            _ => {
                let previous = loaded.definition.steps[..cursor]
                    .iter()
                    .rposition(|s| matches!(s.kind, StepKind::Approval { .. }));
                inst.round += 1;
                match previous {
                    Some(at) => rewind(&mut inst, &loaded.definition, at),
                    None => inst.state = state::SENT_BACK.into(),
                }
                "sent_back"
            }
        };
        inst.entered_ms = None;
        inst.attempt = 0;
        inst.reminders = 0;
        inst.role = None;
        inst.escalated_to = None;
        inst.due_ms = (inst.state != state::SENT_BACK).then_some(now);
        let event = Event {
            kind,
            step: Some(step.id.clone()),
            actor: Some(ctx.subject().to_owned()),
            comment,
            detail: json!({"roles": ctx.roles()}),
        };
        self.write(&inst, event, now).await?;
        Ok(json!({"id": inst.id, "state": inst.state}))
    }

    /// Writes a caller's change, fenced by the revision read.
    async fn write(&self, inst: &Instance, event: Event, now: i64) -> Result<(), ProviderError> {
        let lease = None;
        match store::save(&self.pool, inst, &[event], now, lease)
            .await
            .map_err(db_error)?
        {
            Some(_) => {
                crate::wake();
                Ok(())
            }
            None => Err(ProviderError::conflict(format!(
                "instance '{}' changed while this was decided; read it again",
                inst.id
            ))),
        }
    }

    async fn resubmit(&self, payload: &Value, ctx: &CallContext) -> Result<Value, ProviderError> {
        let comment = self.comment(payload, false, "resubmit")?;
        let mut inst = self.instance(id_of(payload)?).await?;
        if inst.state != state::SENT_BACK {
            return Err(ProviderError::conflict(format!(
                "instance '{}' is {}; only a request that was sent back can be resubmitted",
                inst.id, inst.state
            )));
        }
        if ctx.subject() != inst.requester {
            return Err(ProviderError::forbidden(format!(
                "only the requester '{}' can resubmit instance '{}'",
                inst.requester, inst.id
            )));
        }
        let loaded = store::snapshot(&self.pool, &inst.digest).await?;
        if let Some(Value::Object(changes)) = payload.get("input") {
            let mut input = match inst.input.clone() {
                Value::Object(m) => m,
                _ => Map::new(),
            };
            for (k, v) in changes {
                input.insert(k.clone(), v.clone());
            }
            let input = Value::Object(input);
            self.check_input(&loaded, &input)?;
            inst.input = input;
        }
        let now = now_ms();
        rewind(&mut inst, &loaded.definition, 0);
        inst.due_ms = Some(now);
        let event = Event {
            kind: "resubmitted",
            step: None,
            actor: Some(ctx.subject().to_owned()),
            comment,
            detail: json!({"round": inst.round}),
        };
        self.write(&inst, event, now).await?;
        Ok(json!({"id": inst.id, "state": inst.state}))
    }

    async fn cancel(&self, payload: &Value, ctx: &CallContext) -> Result<Value, ProviderError> {
        let comment = self.comment(payload, false, "cancel")?;
        let id = id_of(payload)?;
        let now = now_ms();
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        // Not fenced by the revision: a step may be running, and its result must still be
        // recorded (then compensated). The executor reads the flag after every write.
        let row = sqlx::query(
            "UPDATE wf_instances SET cancel_requested = 1, due_ms = $1 WHERE tenant = $2 AND id = $3 \
             AND state NOT IN ('COMPLETED', 'REJECTED', 'CANCELLED', 'FAILED') RETURNING state",
        )
        .bind(now)
        .bind(&self.tenant)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?;
        let Some(row) = row else {
            tx.rollback().await.map_err(db_error)?;
            let inst = self.instance(id).await?;
            return Err(ProviderError::conflict(format!(
                "instance '{id}' is {}; it can no longer be cancelled",
                inst.state
            )));
        };
        let current: String = row.try_get(0).map_err(db_error)?;
        let event = Event {
            kind: "cancel_requested",
            step: None,
            actor: Some(ctx.subject().to_owned()),
            comment,
            detail: json!({"state": current}),
        };
        store::write_events(&mut tx, id, now, &[event])
            .await
            .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        crate::wake();
        Ok(json!({"id": id, "state": current, "cancel_requested": true}))
    }

    async fn signal(&self, payload: &Value, ctx: &CallContext) -> Result<Value, ProviderError> {
        let id = id_of(payload)?;
        let name = payload
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let body = payload.get("payload").cloned().unwrap_or(Value::Null);
        if body.to_string().len() > self.max_input_bytes {
            return Err(ProviderError::validation(format!(
                "payload at '/payload': over the limit of {} bytes (max_input_bytes)",
                self.max_input_bytes
            )));
        }
        let inst = self.instance(id).await?;
        let loaded = store::snapshot(&self.pool, &inst.digest).await?;
        let waited: Vec<&str> = loaded
            .definition
            .steps
            .iter()
            .filter_map(|s| match &s.kind {
                StepKind::Signal { signal, .. } => Some(signal.as_str()),
                _ => None,
            })
            .collect();
        if !waited.contains(&name) {
            return Err(ProviderError::validation(format!(
                "payload at '/name': workflow '{}' waits for no signal '{name}' (it waits for: {})",
                inst.definition,
                if waited.is_empty() {
                    "none".to_owned()
                } else {
                    waited.join(", ")
                }
            )));
        }
        let now = now_ms();
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        let fresh = sqlx::query(
            "INSERT INTO wf_signals (instance, name, payload, at_ms) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (instance, name) DO NOTHING",
        )
        .bind(id)
        .bind(name)
        .bind(body.to_string())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?
        .rows_affected()
            == 1;
        // A signal sent again (a sender retrying) is answered `delivered: false` whatever
        // happened since, the workflow's end included; a new one to an ended workflow is
        // refused (the transaction is dropped, so nothing is kept).
        if fresh && state::is_final(&inst.state) {
            return Err(ProviderError::conflict(format!(
                "instance '{id}' is {}; it takes no more signals",
                inst.state
            )));
        }
        if fresh {
            let event = Event {
                kind: "signal",
                step: None,
                actor: Some(ctx.subject().to_owned()),
                comment: None,
                detail: json!({"name": name}),
            };
            store::write_events(&mut tx, id, now, &[event])
                .await
                .map_err(db_error)?;
            sqlx::query("UPDATE wf_instances SET due_ms = $1 WHERE id = $2 AND state = 'WAITING'")
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
        }
        tx.commit().await.map_err(db_error)?;
        if fresh {
            crate::wake();
        }
        Ok(json!({"id": id, "name": name, "delivered": fresh}))
    }

    fn definitions(&self) -> Value {
        let items: Vec<Value> = self
            .definitions
            .values()
            .map(|l| {
                let d = &l.definition;
                json!({
                    "name": d.name,
                    "version": d.version,
                    "description": d.description,
                    "input": d.input,
                    "steps": d.steps.iter().map(|s| {
                        let mut v = json!({"id": s.id, "name": s.name, "type": kind_name(&s.kind), "when": s.when});
                        if let (StepKind::Approval { role, sla_ms, escalate_to, escalate_after_ms, actions, .. }, Value::Object(m)) = (&s.kind, &mut v) {
                            m.insert("role".into(), json!(role));
                            m.insert("actions".into(), json!(actions));
                            m.insert("sla_ms".into(), json!(sla_ms));
                            m.insert("escalate_to".into(), json!(escalate_to));
                            m.insert("escalate_after_ms".into(), json!(escalate_after_ms));
                        }
                        v
                    }).collect::<Vec<_>>(),
                })
            })
            .collect();
        json!({"definitions": items})
    }
}

/// Moves `inst` back to step `to`: the completed call steps from there on will run again, so
/// they are undone first (compensated, then RUNNING from `to`).
fn rewind(inst: &mut Instance, definition: &Definition, to: usize) {
    inst.cursor = i64::try_from(to).unwrap_or(0);
    let again = inst.done.iter().any(|d| {
        let step = d.rsplit_once('@').map_or(d.as_str(), |(s, _)| s);
        definition.step(step).is_some_and(|(i, _)| i >= to)
    });
    if again {
        inst.state = state::COMPENSATING.into();
        inst.ending = Some(state::RUNNING.into());
    } else {
        inst.state = state::RUNNING.into();
    }
}

fn kind_name(kind: &StepKind) -> &'static str {
    match kind {
        StepKind::Call { .. } => "call",
        StepKind::Approval { .. } => "approval",
        StepKind::Timer { .. } => "timer",
        StepKind::Signal { .. } => "signal",
    }
}

#[async_trait]
impl Provider for Workflows {
    fn descriptor(&self) -> Descriptor {
        descriptor()
    }

    async fn connect(&mut self, ctx: &ConnectContext) -> Result<(), ProviderError> {
        let config: Config = serde_json::from_value(ctx.config().clone())
            .map_err(|e| ProviderError::validation(format!("workflows config: {e}")))?;
        let pool = ctx.resource::<AnyPool>().cloned().ok_or_else(|| {
            ProviderError::unavailable(
                "workflows needs the host's system database, which was not provided",
            )
        })?;
        crate::prepare(&pool).await.map_err(|e| {
            tracing::error!(error = %e, "workflow migrations failed");
            ProviderError::unavailable(
                "workflow storage could not be prepared; the host log has the cause",
            )
        })?;
        let mut definitions = BTreeMap::new();
        for d in config.definitions {
            let name = d.name.clone();
            let loaded = Loaded::new(d)
                .map_err(|e| ProviderError::validation(format!("workflow '{name}': {e}")))?;
            definitions.insert(name, Arc::new(loaded));
        }
        let _ = self.state.set(Connected {
            pool,
            tenant: ctx.tenant().to_owned(),
            definitions,
            max_input_bytes: config.max_input_bytes,
            max_comment_bytes: config.max_comment_bytes,
        });
        Ok(())
    }

    async fn execute(
        &self,
        action: &str,
        payload: Value,
        ctx: &CallContext,
    ) -> Result<Value, ProviderError> {
        let c = self
            .state
            .get()
            .ok_or_else(|| ProviderError::unavailable("workflows is not connected"))?;
        match action {
            "start" => c.start(payload, ctx).await,
            "get" => c.get(&payload).await,
            "list" => c.list(&payload, ctx).await,
            "definitions" => Ok(c.definitions()),
            "approve" => c.decide("approve", &payload, ctx).await,
            "reject" => c.decide("reject", &payload, ctx).await,
            "send_back" => c.decide("send_back", &payload, ctx).await,
            "resubmit" => c.resubmit(&payload, ctx).await,
            "cancel" => c.cancel(&payload, ctx).await,
            "signal" => c.signal(&payload, ctx).await,
            other => Err(ProviderError::not_found(format!(
                "workflows has no action '{other}'"
            ))),
        }
    }

    async fn get_status(&self) -> Status {
        match self.state.get() {
            None => Status::failed("not connected"),
            Some(c) => Status {
                detail: format!("{} definition(s)", c.definitions.len()),
                ..Status::ready()
            },
        }
    }
}
