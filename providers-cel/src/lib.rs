//! CEL expressions for business logic: compiled once with bounded size and nesting, evaluated under a cost bound.
//!
//! CEL always terminates, but a comprehension over a large list inside another one does work
//! proportional to the product of their sizes. Before evaluating, the cost of an expression on
//! the given input is bounded from above: every node counts once per iteration of each
//! comprehension around it, and an iteration range is taken to be as long as all the
//! collections of the input and the expression's list literals together. An input whose bound
//! exceeds the limit is refused before any of it runs.

use std::collections::HashMap;
use std::sync::Arc;

use cel::common::ast::{EntryExpr, Expr};
use cel::objects::{Key, Map};
use cel::parser::Parser;
use cel::{Context, Env, IdedExpr, Value};
use serde_json::{Number, Value as Json};

/// Limits of one expression's source and shape.
#[derive(Debug, Clone, Copy)]
pub struct SourceLimits {
    /// Longest source text, in bytes.
    pub max_bytes: usize,
    /// Deepest nesting the parser accepts.
    pub max_depth: u16,
}

/// A parse error with its 1-based position in the expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileError {
    /// Line in the expression, from 1.
    pub line: u32,
    /// Column in that line, from 1.
    pub column: u32,
    /// What is wrong.
    pub message: String,
}

/// A parsed expression with the shape its cost bound needs.
#[derive(Debug)]
pub struct Expression {
    expr: IdedExpr,
    /// Nodes at each comprehension depth: `nodes[d]` sit inside `d` nested comprehensions.
    nodes: Vec<u64>,
    /// Elements written as list or map literals, which a comprehension may range over too.
    literal_elements: u64,
}

// The ANTLR-generated parser recurses deeply per nesting level: parse on a thread of its own
// with a stack sized for it, whatever stack the caller runs on.
const PARSER_STACK: usize = 64 << 20;

/// Parses `source` within `limits`.
pub fn compile(source: &str, limits: SourceLimits) -> Result<Expression, Vec<CompileError>> {
    if source.len() > limits.max_bytes {
        return Err(vec![CompileError {
            line: 1,
            column: 1,
            message: format!(
                "the expression is {} bytes long; the limit is {}",
                source.len(),
                limits.max_bytes
            ),
        }]);
    }
    if source.trim().is_empty() {
        return Err(vec![CompileError {
            line: 1,
            column: 1,
            message: "the expression is empty".into(),
        }]);
    }
    let text = source.to_owned();
    // Parsed, measured and (when refused) dropped on the big stack: the tree of `1+1+1+…` is
    // as deep as it is long, whatever the parser's own recursion limit counts.
    let parsed = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("cel-parse".into())
            .stack_size(PARSER_STACK)
            .spawn_scoped(scope, move || {
                let expr = Parser::new()
                    .max_recursion_depth(limits.max_depth)
                    .parse(&text)
                    .map_err(|errors| {
                        errors
                            .errors
                            .into_iter()
                            .map(|e| CompileError {
                                line: u32::try_from(e.pos.0.max(1)).unwrap_or(1),
                                column: u32::try_from(e.pos.1.max(0) + 1).unwrap_or(1),
                                message: e.msg,
                            })
                            .collect::<Vec<_>>()
                    })?;
                let mut shape = Shape::default();
                measure(&expr, 0, 1, &mut shape);
                if shape.deepest > usize::from(limits.max_depth) * 2 {
                    return Err(vec![CompileError {
                        line: 1,
                        column: 1,
                        message: format!(
                            "the expression nests {} levels deep; the limit is {} (max_nesting × 2)",
                            shape.deepest,
                            usize::from(limits.max_depth) * 2
                        ),
                    }]);
                }
                Ok((expr, shape))
            })
            .map(|handle| handle.join())
    });
    let (expr, shape) = match parsed {
        Ok(Ok(result)) => result?,
        _ => {
            return Err(vec![CompileError {
                line: 1,
                column: 1,
                message: "the expression could not be parsed (parser thread failed)".into(),
            }]);
        }
    };
    Ok(Expression {
        expr,
        nodes: shape.nodes,
        literal_elements: shape.literals,
    })
}

#[derive(Default)]
struct Shape {
    nodes: Vec<u64>,
    literals: u64,
    /// The tree's depth.
    deepest: usize,
}

/// Operators whose work grows with their operands (membership, equality and concatenation
/// of lists, strings and maps): each counts as a loop over the input's elements.
const LINEAR: [&str; 4] = ["@in", "_==_", "_!=_", "_+_"];

fn measure(e: &IdedExpr, depth: usize, level: usize, s: &mut Shape) {
    s.deepest = s.deepest.max(level);
    // Past the limit nothing more is counted; the caller refuses the expression.
    if level > 1024 {
        return;
    }
    let mut count = |d: usize| {
        if s.nodes.len() <= d {
            s.nodes.resize(d + 1, 0);
        }
        s.nodes[d] += 1;
    };
    count(depth);
    match &e.expr {
        Expr::Unspecified | Expr::Ident(_) | Expr::Literal(_) => {}
        Expr::Call(call) => {
            if LINEAR.contains(&call.func_name.as_str()) {
                count(depth + 1);
            }
            if let Some(target) = &call.target {
                measure(target, depth, level + 1, s);
            }
            for arg in &call.args {
                measure(arg, depth, level + 1, s);
            }
        }
        Expr::Comprehension(c) => {
            measure(&c.iter_range, depth, level + 1, s);
            measure(&c.accu_init, depth, level + 1, s);
            for body in [&c.loop_cond, &c.loop_step, &c.result] {
                measure(body, depth + 1, level + 1, s);
            }
        }
        Expr::List(list) => {
            s.literals += list.elements.len() as u64;
            for item in &list.elements {
                measure(item, depth, level + 1, s);
            }
        }
        Expr::Map(map) => {
            s.literals += map.entries.len() as u64;
            for entry in &map.entries {
                if let EntryExpr::MapEntry(m) = &entry.expr {
                    measure(&m.key, depth, level + 1, s);
                    measure(&m.value, depth, level + 1, s);
                }
            }
        }
        Expr::Select(select) => measure(&select.operand, depth, level + 1, s),
        Expr::Struct(st) => {
            for entry in &st.entries {
                if let EntryExpr::StructField(f) = &entry.expr {
                    measure(&f.value, depth, level + 1, s);
                }
            }
        }
    }
}

impl Expression {
    /// The most nested loops in this expression (comprehensions, and operators whose work
    /// grows with their operands).
    pub fn comprehension_depth(&self) -> usize {
        self.nodes.len().saturating_sub(1)
    }

    /// An upper bound of the evaluation steps on an input holding `elements` collection
    /// elements in all.
    pub fn cost(&self, elements: u64) -> u64 {
        let range = elements
            .saturating_add(self.literal_elements)
            .saturating_add(1);
        let mut factor: u64 = 1;
        let mut total: u64 = 0;
        for &count in &self.nodes {
            total = total.saturating_add(count.saturating_mul(factor));
            factor = factor.saturating_mul(range);
        }
        total
    }

    /// Evaluates against `vars`.
    pub fn evaluate(&self, vars: &Variables) -> Result<Json, String> {
        let mut ctx = Context::with_env(vars.env.clone());
        for (name, value) in &vars.values {
            ctx.add_variable_from_value(name.as_str(), value.clone());
        }
        let value = ctx.resolve(&self.expr).map_err(|e| e.to_string())?;
        to_json(&value)
    }
}

/// The variables of one evaluation, converted once for every expression that reads them.
pub struct Variables {
    env: Arc<Env>,
    values: Vec<(String, Value)>,
    /// Collection elements in all the values: the range of the cost bound.
    pub elements: u64,
}

/// The standard library, built once per process.
fn stdlib() -> Arc<Env> {
    static ENV: std::sync::OnceLock<Arc<Env>> = std::sync::OnceLock::new();
    ENV.get_or_init(|| Arc::new(Env::stdlib())).clone()
}

impl Variables {
    /// Converts `(name, JSON)` pairs into CEL values.
    pub fn new<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a Json)>) -> Self {
        let mut elements = 0;
        let values = pairs
            .into_iter()
            .map(|(name, json)| (name.to_owned(), from_json(json, &mut elements)))
            .collect();
        Self {
            env: stdlib(),
            values,
            elements,
        }
    }
}

fn from_json(json: &Json, elements: &mut u64) -> Value {
    match json {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(*b),
        // Integers stay integers, so `order.lines > 3` compares as written; the rest are
        // doubles (CEL has no decimal type: thresholds compare in double precision).
        Json::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::Int(i),
            (None, Some(u)) => Value::UInt(u),
            _ => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::String(Arc::new(s.clone())),
        Json::Array(items) => {
            *elements += items.len() as u64;
            Value::List(Arc::new(
                items.iter().map(|v| from_json(v, elements)).collect(),
            ))
        }
        Json::Object(fields) => {
            *elements += fields.len() as u64;
            let map: HashMap<Key, Value> = fields
                .iter()
                .map(|(k, v)| (Key::String(Arc::new(k.clone())), from_json(v, elements)))
                .collect();
            Value::Map(Map { map: Arc::new(map) })
        }
    }
}

fn to_json(value: &Value) -> Result<Json, String> {
    Ok(match value {
        Value::Null => Json::Null,
        Value::Bool(b) => Json::Bool(*b),
        Value::Int(i) => Json::from(*i),
        Value::UInt(u) => Json::from(*u),
        Value::Float(f) => Number::from_f64(*f).map_or(Json::Null, Json::Number),
        Value::String(s) => Json::String(s.to_string()),
        Value::List(items) => Json::Array(items.iter().map(to_json).collect::<Result<_, _>>()?),
        Value::Map(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map.map.iter() {
                let key = match k {
                    Key::String(s) => s.to_string(),
                    Key::Int(i) => i.to_string(),
                    Key::Uint(u) => u.to_string(),
                    Key::Bool(b) => b.to_string(),
                };
                out.insert(key, to_json(v)?);
            }
            Json::Object(out)
        }
        other => return Err(format!("a {:?} value has no JSON form", other.type_of())),
    })
}
