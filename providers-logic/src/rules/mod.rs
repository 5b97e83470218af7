//! `rules`: business rules in CEL, per tenant.
//!
//! A tenant's rule sets live in its provider config; each is compiled once when the instance
//! connects (a config change brings a new instance, so the compiled sets are cached per
//! config). A set is an ordered list of rules, each a CEL condition (`when`) and the decision
//! it gives (`then`); the first rule that holds decides, and the set's `default` decides when
//! none does. Evaluation is bounded: the input's size, each expression's size and nesting,
//! and an upper bound of the evaluation's cost (see `providers_cel`) are all limited.

use std::sync::OnceLock;

use providers_core::semver::Version;
use providers_core::{
    Action, CallContext, ConnectContext, Descriptor, Provider, ProviderError, Status, async_trait,
};
use serde::Deserialize;
use serde_json::{Value, json};

use providers_cel as engine;

use engine::{CompileError, Expression, SourceLimits, Variables};

/// The `rules` provider.
#[derive(Default)]
pub struct Rules {
    state: OnceLock<Connected>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    sets: std::collections::BTreeMap<String, SetConfig>,
    #[serde(default = "default_input_bytes")]
    max_input_bytes: usize,
    #[serde(default = "default_cost")]
    max_cost: u64,
    #[serde(default = "default_expression_bytes")]
    max_expression_bytes: usize,
    #[serde(default = "default_nesting")]
    max_nesting: u16,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetConfig {
    #[serde(default)]
    description: String,
    rules: Vec<RuleConfig>,
    default: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleConfig {
    name: String,
    when: String,
    #[serde(default)]
    then: Option<String>,
    #[serde(default)]
    description: String,
}

fn default_input_bytes() -> usize {
    64 * 1024
}
fn default_cost() -> u64 {
    1_000_000
}
fn default_expression_bytes() -> usize {
    4096
}
fn default_nesting() -> u16 {
    32
}

/// The variable every evaluation has besides the input's fields: who is asking.
const CALLER: &str = "caller";

struct Rule {
    name: String,
    source: String,
    then: Option<String>,
    description: String,
    expression: Expression,
}

struct RuleSet {
    description: String,
    rules: Vec<Rule>,
    default: String,
}

struct Connected {
    sets: std::collections::BTreeMap<String, RuleSet>,
    max_input_bytes: usize,
    max_cost: u64,
    limits: SourceLimits,
}

/// One compile error of a set, placed by rule and position.
struct Placed {
    rule: String,
    error: CompileError,
}

fn compile_set(set: SetConfig, limits: SourceLimits) -> Result<RuleSet, Vec<Placed>> {
    let mut errors = Vec::new();
    let mut rules: Vec<Rule> = Vec::new();
    for rule in set.rules {
        if rules.iter().any(|r| r.name == rule.name) {
            errors.push(Placed {
                rule: rule.name.clone(),
                error: CompileError {
                    line: 1,
                    column: 1,
                    message: format!("a second rule is named '{}'", rule.name),
                },
            });
            continue;
        }
        match engine::compile(&rule.when, limits) {
            Ok(expression) => rules.push(Rule {
                name: rule.name,
                source: rule.when,
                then: rule.then,
                description: rule.description,
                expression,
            }),
            Err(found) => errors.extend(found.into_iter().map(|error| Placed {
                rule: rule.name.clone(),
                error,
            })),
        }
    }
    if errors.is_empty() {
        Ok(RuleSet {
            description: set.description,
            rules,
            default: set.default,
        })
    } else {
        Err(errors)
    }
}

fn placed_json(errors: &[Placed]) -> Vec<Value> {
    errors
        .iter()
        .map(|p| {
            json!({"rule": p.rule, "line": p.error.line, "column": p.error.column, "message": p.error.message})
        })
        .collect()
}

fn descriptor() -> Descriptor {
    let name = json!({"type": "string", "pattern": "^[a-z][a-z0-9_]{0,63}$"});
    let rule = json!({
        "type": "object",
        "properties": {
            "name": name,
            "when": {"type": "string", "minLength": 1},
            "then": {"type": "string", "minLength": 1, "maxLength": 64},
            "description": {"type": "string", "maxLength": 512}
        },
        "required": ["name", "when"],
        "additionalProperties": false
    });
    let set = json!({
        "type": "object",
        "properties": {
            "description": {"type": "string", "maxLength": 512},
            "rules": {"type": "array", "items": rule, "maxItems": 256},
            "default": {"type": "string", "minLength": 1, "maxLength": 64}
        },
        "required": ["rules", "default"],
        "additionalProperties": false
    });
    let errors = json!({"type": "array", "items": {"type": "object", "properties": {
        "rule": {"type": "string"}, "line": {"type": "integer"}, "column": {"type": "integer"}, "message": {"type": "string"}
    }}});
    Descriptor::new("rules", Version::new(1, 0, 0))
        .description("Business rules in CEL: ordered rule sets per tenant, each rule a condition and the decision it gives; compiled once per config, evaluated under size and cost limits.")
        .config_schema(json!({
            "type": "object",
            "properties": {
                "sets": {"type": "object", "propertyNames": name, "additionalProperties": set},
                "max_input_bytes": {"type": "integer", "minimum": 2, "maximum": 16_777_216},
                "max_cost": {"type": "integer", "minimum": 1},
                "max_expression_bytes": {"type": "integer", "minimum": 1, "maximum": 65_536},
                "max_nesting": {"type": "integer", "minimum": 1, "maximum": 64}
            },
            "additionalProperties": false
        }))
        .action(
            Action::new("evaluate")
                .description("Evaluates a rule set on a JSON object whose fields are the rules' variables (plus `caller`): each rule's result and the decision of the first rule that holds, or the set's default.")
                .permission("rules.evaluate")
                .idempotent()
                .input(json!({
                    "type": "object",
                    "properties": {"set": name, "input": {"type": "object"}},
                    "required": ["set", "input"],
                    "additionalProperties": false
                }))
                .output(json!({"type": "object", "properties": {
                    "set": {"type": "string"},
                    "decision": {"type": "string"},
                    "decided_by": {"type": ["string", "null"]},
                    "results": {"type": "array", "items": {"type": "object", "properties": {
                        "rule": {"type": "string"}, "matched": {"type": "boolean"}, "then": {"type": ["string", "null"]}
                    }}},
                    "cost_bound": {"type": "integer"}
                }, "required": ["set", "decision", "decided_by", "results"]})),
        )
        .action(
            Action::new("validate")
                .description("Compiles a rule set (a configured one by name, or one given inline) and returns its errors with rule, line and column.")
                .permission("rules.read")
                .idempotent()
                .input(json!({
                    "type": "object",
                    "properties": {"set": name, "rules": {"type": "array", "items": rule, "maxItems": 256}},
                    "oneOf": [{"required": ["set"]}, {"required": ["rules"]}],
                    "additionalProperties": false
                }))
                .output(json!({"type": "object", "properties": {"valid": {"type": "boolean"}, "errors": errors}, "required": ["valid", "errors"]})),
        )
        .action(
            Action::new("list")
                .description("The tenant's rule sets with their rules, in evaluation order.")
                .permission("rules.read")
                .idempotent()
                .input(json!({"type": "object", "additionalProperties": false}))
                .output(json!({"type": "object", "properties": {"sets": {"type": "array"}}, "required": ["sets"]})),
        )
}

fn caller_json(ctx: &CallContext) -> Value {
    json!({
        "subject": ctx.subject(),
        "tenant": ctx.tenant(),
        "roles": ctx.roles(),
        "company_id": ctx.company_id(),
    })
}

impl Connected {
    fn set(&self, name: &str) -> Result<&RuleSet, ProviderError> {
        self.sets.get(name).ok_or_else(|| {
            ProviderError::not_found(format!(
                "no rule set '{name}' (sets: {})",
                if self.sets.is_empty() {
                    "none configured".to_owned()
                } else {
                    self.sets.keys().cloned().collect::<Vec<_>>().join(", ")
                }
            ))
        })
    }

    fn evaluate(&self, payload: &Value, ctx: &CallContext) -> Result<Value, ProviderError> {
        let name = payload["set"].as_str().unwrap_or_default();
        let set = self.set(name)?;
        let Some(input) = payload["input"].as_object() else {
            return Err(ProviderError::validation("input must be a JSON object"));
        };
        // Measured as the JSON text the rules read, whatever form the payload arrived in.
        let size = serde_json::to_vec(&payload["input"]).map_or(usize::MAX, |b| b.len());
        if size > self.max_input_bytes {
            return Err(ProviderError::validation(format!(
                "input is {size} bytes; rule set '{name}' takes at most {} (max_input_bytes)",
                self.max_input_bytes
            )));
        }
        if input.contains_key(CALLER) {
            return Err(ProviderError::validation(format!(
                "input field '{CALLER}' is reserved: rules read the caller from it"
            )));
        }
        let caller = caller_json(ctx);
        let vars = Variables::new(
            input
                .iter()
                .map(|(k, v)| (k.as_str(), v))
                .chain([(CALLER, &caller)]),
        );
        let mut cost: u64 = 0;
        for rule in &set.rules {
            cost = cost.saturating_add(rule.expression.cost(vars.elements));
            if cost > self.max_cost {
                return Err(ProviderError::validation(format!(
                    "rule set '{name}' could cost up to {cost} steps on this input (rule '{}' nests {} loop(s) over up to {} elements); the limit is {} (max_cost)",
                    rule.name,
                    rule.expression.comprehension_depth(),
                    vars.elements,
                    self.max_cost
                )));
            }
        }
        let mut results = Vec::with_capacity(set.rules.len());
        let mut decided: Option<&Rule> = None;
        for rule in &set.rules {
            let matched = match rule.expression.evaluate(&vars) {
                Ok(Value::Bool(b)) => b,
                Ok(other) => {
                    return Err(ProviderError::validation(format!(
                        "rule '{}' of set '{name}' gave {other} where true or false was expected",
                        rule.name
                    )));
                }
                // Fail closed: a policy that cannot read its input decides nothing.
                Err(e) => {
                    return Err(ProviderError::validation(format!(
                        "rule '{}' of set '{name}' could not be evaluated on this input: {e}",
                        rule.name
                    )));
                }
            };
            if matched && decided.is_none() && rule.then.is_some() {
                decided = Some(rule);
            }
            results.push(json!({"rule": rule.name, "matched": matched, "then": rule.then}));
        }
        let decision = decided
            .and_then(|r| r.then.clone())
            .unwrap_or_else(|| set.default.clone());
        Ok(json!({
            "set": name,
            "decision": decision,
            "decided_by": decided.map(|r| r.name.as_str()),
            "results": results,
            "cost_bound": cost,
        }))
    }

    fn validate(&self, payload: Value) -> Result<Value, ProviderError> {
        if let Some(name) = payload["set"].as_str() {
            // Configured sets compiled at connect: existing means valid.
            self.set(name)?;
            return Ok(json!({"valid": true, "errors": []}));
        }
        let rules: Vec<RuleConfig> = serde_json::from_value(payload["rules"].clone())
            .map_err(|e| ProviderError::validation(format!("rules: {e}")))?;
        let set = SetConfig {
            description: String::new(),
            rules,
            default: String::new(),
        };
        Ok(match compile_set(set, self.limits) {
            Ok(_) => json!({"valid": true, "errors": []}),
            Err(errors) => json!({"valid": false, "errors": placed_json(&errors)}),
        })
    }

    fn list(&self) -> Value {
        let sets: Vec<Value> = self
            .sets
            .iter()
            .map(|(name, set)| {
                let rules: Vec<Value> = set
                    .rules
                    .iter()
                    .map(|r| json!({"name": r.name, "when": r.source, "then": r.then, "description": r.description}))
                    .collect();
                json!({"name": name, "description": set.description, "default": set.default, "rules": rules})
            })
            .collect();
        json!({"sets": sets})
    }
}

#[async_trait]
impl Provider for Rules {
    fn descriptor(&self) -> Descriptor {
        descriptor()
    }

    async fn connect(&mut self, ctx: &ConnectContext) -> Result<(), ProviderError> {
        let config: Config = serde_json::from_value(ctx.config().clone())
            .map_err(|e| ProviderError::validation(format!("rules config: {e}")))?;
        let limits = SourceLimits {
            max_bytes: config.max_expression_bytes,
            max_depth: config.max_nesting,
        };
        let mut sets = std::collections::BTreeMap::new();
        let mut problems = Vec::new();
        for (name, set) in config.sets {
            match compile_set(set, limits) {
                Ok(compiled) => {
                    sets.insert(name, compiled);
                }
                Err(errors) => problems.extend(errors.into_iter().map(|p| {
                    format!(
                        "set '{name}', rule '{}', {}:{}: {}",
                        p.rule, p.error.line, p.error.column, p.error.message
                    )
                })),
            }
        }
        if !problems.is_empty() {
            return Err(ProviderError::validation(format!(
                "rules config does not compile: {}",
                problems.join("; ")
            )));
        }
        let _ = self.state.set(Connected {
            sets,
            max_input_bytes: config.max_input_bytes,
            max_cost: config.max_cost,
            limits,
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
            .ok_or_else(|| ProviderError::unavailable("rules is not connected"))?;
        match action {
            "evaluate" => c.evaluate(&payload, ctx),
            "validate" => c.validate(payload),
            "list" => Ok(c.list()),
            other => Err(ProviderError::not_found(format!(
                "rules has no action '{other}'"
            ))),
        }
    }

    async fn get_status(&self) -> Status {
        match self.state.get() {
            None => Status::failed("not connected"),
            Some(c) => Status {
                detail: format!("{} rule set(s)", c.sets.len()),
                ..Status::ready()
            },
        }
    }
}
