//! Workflow definitions: parsed from TOML with the place of every mistake, checked whole, and
//! kept as JSON snapshots so that a running instance finishes on the version it started with.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::time::Duration;

use providers_cel::{Expression, SourceLimits};
use providers_core::ErrorCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use toml::Spanned;

use crate::template;

/// Limits of a `when` expression (the same shape as the `rules` provider's defaults).
pub const WHEN_LIMITS: SourceLimits = SourceLimits {
    max_bytes: 4096,
    max_depth: 32,
};

/// Approval actions a step may allow.
pub const DECISIONS: [&str; 3] = ["approve", "reject", "send_back"];

/// One problem in a definition file: a byte span of the file and what is wrong there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefinitionError {
    /// Bytes of the file the problem is at (`0..0` when it has no place).
    pub span: Range<usize>,
    /// What is wrong.
    pub message: String,
}

/// A checked definition, as stored with each instance that runs it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Definition {
    /// The workflow's name, which `start` asks for.
    pub name: String,
    /// Its version: an instance keeps the version it started on.
    pub version: u32,
    /// What it is for.
    #[serde(default)]
    pub description: String,
    /// A JSON Schema the input must meet, if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
    /// The steps, run in order.
    pub steps: Vec<Step>,
}

/// One step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Step {
    /// Unique in its definition; names its output for later steps.
    pub id: String,
    /// Shown in histories and inboxes.
    #[serde(default)]
    pub name: String,
    /// A CEL condition: the step runs only when it holds (else it is skipped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// What the step does.
    #[serde(flatten)]
    pub kind: StepKind,
}

/// What a step does.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StepKind {
    /// Calls a provider action.
    Call {
        /// The service.
        service: String,
        /// The action.
        action: String,
        /// The payload, with references resolved when the step runs.
        payload: Value,
        /// When and how often a failed call is tried again.
        retry: Retry,
        /// What undoes the step when the workflow is cancelled, rejected or fails later.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        compensate: Option<Compensation>,
        /// Call as the approver of this earlier approval step (their subject, roles and
        /// company when they decided) instead of as the requester.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        run_as: Option<String>,
    },
    /// Waits for a decision by a holder of `role`.
    Approval {
        /// Who decides.
        role: String,
        /// Which decisions are allowed.
        actions: Vec<String>,
        /// When a decision is due, in milliseconds after the step began.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sla_ms: Option<u64>,
        /// Reminders after the SLA is missed, every this many milliseconds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        remind_every_ms: Option<u64>,
        /// Who may decide as well once `escalate_after_ms` has passed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        escalate_to: Option<String>,
        /// When the step escalates, in milliseconds after it began.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        escalate_after_ms: Option<u64>,
    },
    /// Waits a fixed time.
    Timer {
        /// How long, in milliseconds.
        duration_ms: u64,
    },
    /// Waits for an external event sent with `signal`.
    Signal {
        /// The event's name.
        signal: String,
        /// How long to wait before the workflow fails, if bounded.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
}

/// A retry policy: exponential backoff with jitter, for the listed error codes only.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Retry {
    /// Tries in all, the first included.
    pub attempts: u32,
    /// The wait before the second try; each later wait doubles, up to `max_backoff_ms`.
    pub backoff_ms: u64,
    /// The longest wait.
    pub max_backoff_ms: u64,
    /// Error codes worth trying again (wire form, e.g. `TIMEOUT`).
    pub on: Vec<String>,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            attempts: 3,
            backoff_ms: 1000,
            max_backoff_ms: 60_000,
            on: vec![
                ErrorCode::ProviderUnavailable.as_str().into(),
                ErrorCode::Timeout.as_str().into(),
                ErrorCode::RateLimited.as_str().into(),
            ],
        }
    }
}

impl Retry {
    /// Whether an error with `code` may be tried again after `tries` tries.
    pub fn again(&self, code: ErrorCode, tries: u32) -> bool {
        tries < self.attempts && self.on.iter().any(|c| c == code.as_str())
    }

    /// The wait before try `tries + 1`, before jitter: `backoff × 2^(tries-1)`, capped.
    pub fn delay_ms(&self, tries: u32) -> u64 {
        let doubling = 1u64
            .checked_shl(tries.saturating_sub(1))
            .unwrap_or(u64::MAX);
        self.backoff_ms
            .saturating_mul(doubling)
            .min(self.max_backoff_ms)
    }
}

/// The call that undoes a step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Compensation {
    /// The service.
    pub service: String,
    /// The action.
    pub action: String,
    /// The payload; it may reference the step's own output.
    pub payload: Value,
}

impl Definition {
    /// The step with `id`.
    pub fn step(&self, id: &str) -> Option<(usize, &Step)> {
        self.steps.iter().enumerate().find(|(_, s)| s.id == id)
    }

    /// A digest of the definition's content: instances refer to the snapshot they run by it.
    pub fn digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let text = serde_json::to_string(self).unwrap_or_default();
        let hash = Sha256::digest(text.as_bytes());
        hash.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Compiles every `when` (checked at parse; a stored snapshot is compiled again on load).
    pub fn conditions(&self) -> Result<BTreeMap<String, Expression>, String> {
        let mut out = BTreeMap::new();
        for step in &self.steps {
            if let Some(when) = &step.when {
                let e = providers_cel::compile(when, WHEN_LIMITS).map_err(|errors| {
                    format!(
                        "step '{}' when: {}",
                        step.id,
                        errors
                            .iter()
                            .map(|e| format!("{}:{}: {}", e.line, e.column, e.message))
                            .collect::<Vec<_>>()
                            .join("; ")
                    )
                })?;
                out.insert(step.id.clone(), e);
            }
        }
        Ok(out)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefinition {
    name: Spanned<String>,
    version: Spanned<i64>,
    #[serde(default)]
    description: String,
    input: Option<Spanned<toml::Value>>,
    #[serde(default)]
    steps: Vec<Spanned<RawStep>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    id: Spanned<String>,
    #[serde(rename = "type")]
    kind: Spanned<String>,
    #[serde(default)]
    name: String,
    when: Option<Spanned<String>>,
    service: Option<Spanned<String>>,
    action: Option<Spanned<String>>,
    payload: Option<Spanned<toml::Value>>,
    retry: Option<Spanned<RawRetry>>,
    compensate: Option<Spanned<RawCompensation>>,
    run_as: Option<Spanned<String>>,
    role: Option<Spanned<String>>,
    actions: Option<Spanned<Vec<String>>>,
    sla: Option<Spanned<String>>,
    remind_every: Option<Spanned<String>>,
    escalate_to: Option<Spanned<String>>,
    escalate_after: Option<Spanned<String>>,
    duration: Option<Spanned<String>>,
    signal: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    attempts: Option<Spanned<i64>>,
    backoff: Option<Spanned<String>>,
    max_backoff: Option<Spanned<String>>,
    on: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCompensation {
    service: Spanned<String>,
    action: Spanned<String>,
    payload: Option<Spanned<toml::Value>>,
}

struct Errors(Vec<DefinitionError>);

impl Errors {
    fn at(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.0.push(DefinitionError {
            span,
            message: message.into(),
        });
    }

    fn duration(&mut self, value: &Option<Spanned<String>>, what: &str) -> Option<u64> {
        let value = value.as_ref()?;
        match humantime::parse_duration(value.get_ref()) {
            Ok(d) if d > Duration::ZERO => Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            Ok(_) => {
                self.at(value.span(), format!("{what} must be longer than zero"));
                None
            }
            Err(e) => {
                self.at(
                    value.span(),
                    format!(
                        "{what} '{}' is not a duration ({e}); write e.g. \"24h\" or \"500ms\"",
                        value.get_ref()
                    ),
                );
                None
            }
        }
    }

    /// A field that only some step types take, given to another.
    fn misplaced<T>(&mut self, field: &Option<Spanned<T>>, name: &str, kind: &str, takes: &str) {
        if let Some(f) = field {
            self.at(
                f.span(),
                format!("`{name}` applies to {takes} steps, not to a {kind} step"),
            );
        }
    }
}

fn json_of(value: toml::Value) -> Value {
    match value {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::from(i),
        toml::Value::Float(f) => serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number),
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(items) => Value::Array(items.into_iter().map(json_of).collect()),
        toml::Value::Table(t) => {
            Value::Object(t.into_iter().map(|(k, v)| (k, json_of(v))).collect())
        }
    }
}

fn valid_id(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && id.len() <= 64
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Where a call step (or its compensation) names a provider action, for checks against the
/// configured services.
#[derive(Debug, Clone)]
pub struct CallPlace {
    /// The step.
    pub step: String,
    /// The service it calls.
    pub service: String,
    /// The action.
    pub action: String,
    /// Where `service` is written.
    pub span: Range<usize>,
}

/// Parses and checks one definition file's `text`. Every mistake found is reported, each with
/// its place in the text.
pub fn parse(text: &str) -> Result<Definition, Vec<DefinitionError>> {
    parse_placed(text).map(|(d, _)| d)
}

/// [`parse`], with the places of the provider actions the definition calls.
pub fn parse_placed(text: &str) -> Result<(Definition, Vec<CallPlace>), Vec<DefinitionError>> {
    let raw: RawDefinition = toml::from_str(text).map_err(|e| {
        vec![DefinitionError {
            span: e.span().unwrap_or(0..0),
            message: e.message().trim_end().to_owned(),
        }]
    })?;
    let mut errors = Errors(Vec::new());
    if !valid_id(raw.name.get_ref()) {
        errors.at(
            raw.name.span(),
            format!(
                "invalid workflow name '{}' (expected 1-64 of a-z, 0-9, '_', starting with a letter)",
                raw.name.get_ref()
            ),
        );
    }
    let version = match u32::try_from(*raw.version.get_ref()) {
        Ok(v) if v >= 1 => v,
        _ => {
            errors.at(raw.version.span(), "version must be a whole number from 1");
            1
        }
    };
    let input = raw.input.map(|i| {
        let span = i.span();
        let schema = json_of(i.into_inner());
        if let Err(e) = jsonschema::validator_for(&schema) {
            errors.at(span, format!("input is not a valid JSON Schema: {e}"));
        }
        schema
    });
    if raw.steps.is_empty() {
        errors.at(0..0, "the workflow has no steps ([[steps]])");
    }
    let mut seen: HashSet<String> = HashSet::new();
    // Steps whose output later steps may reference: every step before the current one.
    let mut earlier: Vec<String> = Vec::new();
    let mut approvals: Vec<String> = Vec::new();
    let mut steps = Vec::new();
    let mut places = Vec::new();
    for step in raw.steps {
        let span = step.span();
        let s = step.into_inner();
        let id = s.id.get_ref().clone();
        if !valid_id(&id) {
            errors.at(
                s.id.span(),
                format!("invalid step id '{id}' (expected 1-64 of a-z, 0-9, '_', starting with a letter)"),
            );
        } else if !seen.insert(id.clone()) {
            errors.at(s.id.span(), format!("a second step has the id '{id}'"));
        }
        if let Some(when) = &s.when
            && let Err(found) = providers_cel::compile(when.get_ref(), WHEN_LIMITS)
        {
            for e in found {
                errors.at(
                    when.span(),
                    format!("step '{id}' when, {}:{}: {}", e.line, e.column, e.message),
                );
            }
        }
        let kind_name = s.kind.get_ref().as_str();
        let kind = match kind_name {
            "call" => {
                errors.misplaced(&s.role, "role", "call", "approval");
                errors.misplaced(&s.actions, "actions", "call", "approval");
                errors.misplaced(&s.sla, "sla", "call", "approval");
                errors.misplaced(&s.remind_every, "remind_every", "call", "approval");
                errors.misplaced(&s.escalate_to, "escalate_to", "call", "approval");
                errors.misplaced(&s.escalate_after, "escalate_after", "call", "approval");
                errors.misplaced(&s.duration, "duration", "call", "timer");
                errors.misplaced(&s.signal, "signal", "call", "signal");
                errors.misplaced(&s.timeout, "timeout", "call", "signal");
                let service = required(&mut errors, &s.service, "service", &id, span.clone());
                let action = required(&mut errors, &s.action, "action", &id, span.clone());
                let payload = references(&mut errors, s.payload, &id, &earlier, None);
                let retry = retry(&mut errors, s.retry);
                if let Some(at) = &s.service {
                    places.push(CallPlace {
                        step: id.clone(),
                        service: service.clone(),
                        action: action.clone(),
                        span: at.span(),
                    });
                }
                let compensate = s.compensate.map(|c| {
                    let c = c.into_inner();
                    places.push(CallPlace {
                        step: id.clone(),
                        service: c.service.get_ref().clone(),
                        action: c.action.get_ref().clone(),
                        span: c.service.span(),
                    });
                    Compensation {
                        service: c.service.into_inner(),
                        action: c.action.into_inner(),
                        payload: references(&mut errors, c.payload, &id, &earlier, Some(&id)),
                    }
                });
                if let Some(r) = &s.run_as
                    && !approvals.contains(r.get_ref())
                {
                    errors.at(
                        r.span(),
                        format!(
                            "step '{id}': run_as '{}' names no approval step before this one",
                            r.get_ref()
                        ),
                    );
                }
                StepKind::Call {
                    service,
                    action,
                    payload,
                    retry,
                    compensate,
                    run_as: s.run_as.map(Spanned::into_inner),
                }
            }
            "approval" => {
                for (field, name) in [(&s.service, "service"), (&s.action, "action")] {
                    errors.misplaced(field, name, "approval", "call");
                }
                errors.misplaced(&s.payload, "payload", "approval", "call");
                errors.misplaced(&s.retry, "retry", "approval", "call");
                errors.misplaced(&s.compensate, "compensate", "approval", "call");
                errors.misplaced(&s.run_as, "run_as", "approval", "call");
                errors.misplaced(&s.duration, "duration", "approval", "timer");
                errors.misplaced(&s.signal, "signal", "approval", "signal");
                errors.misplaced(&s.timeout, "timeout", "approval", "signal");
                let role = required(&mut errors, &s.role, "role", &id, span.clone());
                let actions = match &s.actions {
                    None => DECISIONS.iter().map(|a| (*a).to_owned()).collect(),
                    Some(list) => {
                        for a in list.get_ref() {
                            if !DECISIONS.contains(&a.as_str()) {
                                errors.at(
                                    list.span(),
                                    format!("step '{id}': unknown action '{a}' (expected approve, reject, send_back)"),
                                );
                            }
                        }
                        if !list.get_ref().iter().any(|a| a == "approve") {
                            errors.at(
                                list.span(),
                                format!("step '{id}': actions must include approve"),
                            );
                        }
                        list.get_ref().clone()
                    }
                };
                let sla_ms = errors.duration(&s.sla, "sla");
                let remind_every_ms = errors.duration(&s.remind_every, "remind_every");
                let escalate_after_ms = errors.duration(&s.escalate_after, "escalate_after");
                match (&s.escalate_to, &s.escalate_after) {
                    (Some(to), None) => errors.at(
                        to.span(),
                        format!("step '{id}': escalate_to needs escalate_after"),
                    ),
                    (None, Some(after)) => errors.at(
                        after.span(),
                        format!("step '{id}': escalate_after needs escalate_to"),
                    ),
                    _ => {}
                }
                if let (Some(r), None) = (&s.remind_every, &s.sla) {
                    errors.at(
                        r.span(),
                        format!("step '{id}': remind_every counts from the sla, which is not set"),
                    );
                }
                if let (Some(sla), Some(after), Some(at)) =
                    (sla_ms, escalate_after_ms, &s.escalate_after)
                    && after < sla
                {
                    errors.at(
                        at.span(),
                        format!("step '{id}': escalate_after is earlier than the sla"),
                    );
                }
                StepKind::Approval {
                    role,
                    actions,
                    sla_ms,
                    remind_every_ms,
                    escalate_to: s.escalate_to.map(Spanned::into_inner),
                    escalate_after_ms,
                }
            }
            "timer" | "signal" => {
                for (field, name) in [(&s.service, "service"), (&s.action, "action")] {
                    errors.misplaced(field, name, kind_name, "call");
                }
                errors.misplaced(&s.payload, "payload", kind_name, "call");
                errors.misplaced(&s.retry, "retry", kind_name, "call");
                errors.misplaced(&s.compensate, "compensate", kind_name, "call");
                errors.misplaced(&s.run_as, "run_as", kind_name, "call");
                errors.misplaced(&s.role, "role", kind_name, "approval");
                errors.misplaced(&s.actions, "actions", kind_name, "approval");
                errors.misplaced(&s.sla, "sla", kind_name, "approval");
                errors.misplaced(&s.remind_every, "remind_every", kind_name, "approval");
                errors.misplaced(&s.escalate_to, "escalate_to", kind_name, "approval");
                errors.misplaced(&s.escalate_after, "escalate_after", kind_name, "approval");
                if kind_name == "timer" {
                    errors.misplaced(&s.signal, "signal", "timer", "signal");
                    errors.misplaced(&s.timeout, "timeout", "timer", "signal");
                    if s.duration.is_none() {
                        errors.at(
                            span.clone(),
                            format!("step '{id}': a timer step needs `duration`"),
                        );
                    }
                    StepKind::Timer {
                        duration_ms: errors.duration(&s.duration, "duration").unwrap_or(1),
                    }
                } else {
                    errors.misplaced(&s.duration, "duration", "signal", "timer");
                    let signal = required(&mut errors, &s.signal, "signal", &id, span.clone());
                    if !signal.is_empty()
                        && !valid_id(&signal)
                        && let Some(sig) = &s.signal
                    {
                        errors.at(
                            sig.span(),
                            format!("invalid signal name '{signal}' (expected a-z, 0-9, '_')"),
                        );
                    }
                    StepKind::Signal {
                        signal,
                        timeout_ms: errors.duration(&s.timeout, "timeout"),
                    }
                }
            }
            other => {
                errors.at(
                    s.kind.span(),
                    format!("step '{id}': unknown type '{other}' (expected call, approval, timer or signal)"),
                );
                StepKind::Timer { duration_ms: 1 }
            }
        };
        earlier.push(id.clone());
        if matches!(kind, StepKind::Approval { .. }) {
            approvals.push(id.clone());
        }
        steps.push(Step {
            id,
            name: s.name,
            when: s.when.map(Spanned::into_inner),
            kind,
        });
    }
    if errors.0.is_empty() {
        Ok((
            Definition {
                name: raw.name.into_inner(),
                version,
                description: raw.description,
                input,
                steps,
            },
            places,
        ))
    } else {
        errors.0.sort_by_key(|e| e.span.start);
        Err(errors.0)
    }
}

fn required(
    errors: &mut Errors,
    field: &Option<Spanned<String>>,
    name: &str,
    step: &str,
    span: Range<usize>,
) -> String {
    match field {
        Some(f) if !f.get_ref().is_empty() => f.get_ref().clone(),
        Some(f) => {
            errors.at(f.span(), format!("step '{step}': `{name}` is empty"));
            String::new()
        }
        None => {
            errors.at(span, format!("step '{step}' needs `{name}`"));
            String::new()
        }
    }
}

fn references(
    errors: &mut Errors,
    payload: Option<Spanned<toml::Value>>,
    step: &str,
    earlier: &[String],
    own: Option<&str>,
) -> Value {
    let Some(payload) = payload else {
        return Value::Object(Default::default());
    };
    let span = payload.span();
    let value = json_of(payload.into_inner());
    for problem in template::check(&value, earlier, own) {
        errors.at(span.clone(), format!("step '{step}' payload{problem}"));
    }
    value
}

fn retry(errors: &mut Errors, raw: Option<Spanned<RawRetry>>) -> Retry {
    let mut retry = Retry::default();
    let Some(raw) = raw else { return retry };
    let raw = raw.into_inner();
    if let Some(a) = raw.attempts {
        match u32::try_from(*a.get_ref()) {
            Ok(n) if (1..=100).contains(&n) => retry.attempts = n,
            _ => errors.at(a.span(), "retry.attempts must be from 1 to 100"),
        }
    }
    if let Some(ms) = errors.duration(&raw.backoff, "retry.backoff") {
        retry.backoff_ms = ms;
    }
    match errors.duration(&raw.max_backoff, "retry.max_backoff") {
        Some(ms) => retry.max_backoff_ms = ms,
        // Unbounded by the default cap when only the first wait is given.
        None => retry.max_backoff_ms = retry.max_backoff_ms.max(retry.backoff_ms),
    }
    if retry.max_backoff_ms < retry.backoff_ms
        && let Some(b) = &raw.max_backoff
    {
        errors.at(b.span(), "retry.max_backoff is shorter than retry.backoff");
    }
    if let Some(on) = raw.on {
        for code in on.get_ref() {
            if !ErrorCode::ALL.iter().any(|c| c.as_str() == code) {
                let known: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
                errors.at(
                    on.span(),
                    format!(
                        "retry.on: unknown error code '{code}' (expected one of {})",
                        known.join(", ")
                    ),
                );
            }
        }
        retry.on = on.into_inner();
    }
    retry
}
