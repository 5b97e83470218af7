//! References in step payloads: `${input.amount}`, `${steps.reserve.output.id}`,
//! `${workflow.id}`, `${workflow.requester}`, `${step.idempotency_key}`.
//!
//! A string that is exactly one reference becomes the referenced value, whatever its type; a
//! reference inside other text is written into it (strings as they are, anything else as
//! JSON). `$${` writes a literal `${`. Numeric segments index arrays (`${input.lines.0}`).

use serde_json::Value;

/// What references resolve against when a step runs.
pub struct Scope<'a> {
    /// The workflow's input.
    pub input: &'a Value,
    /// Outputs of the steps that ran, by step id.
    pub outputs: &'a serde_json::Map<String, Value>,
    /// The instance id.
    pub id: &'a str,
    /// Who started it.
    pub requester: &'a str,
    /// The tenant.
    pub tenant: &'a str,
    /// The key the step's call carries.
    pub idempotency_key: &'a str,
}

enum Piece<'a> {
    Text(&'a str),
    Reference(&'a str),
}

/// Splits `text` into literal text and references; an unclosed `${` is an error.
fn pieces(text: &str) -> Result<Vec<Piece<'_>>, String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("${") {
        if at > 0 && rest[..at].ends_with('$') {
            out.push(Piece::Text(&rest[..at - 1]));
            out.push(Piece::Text("${"));
            rest = &rest[at + 2..];
            continue;
        }
        out.push(Piece::Text(&rest[..at]));
        let Some(end) = rest[at..].find('}') else {
            return Err(format!(
                "'{text}' opens a reference with ${{ that is not closed"
            ));
        };
        out.push(Piece::Reference(rest[at + 2..at + end].trim()));
        rest = &rest[at + end + 1..];
    }
    out.push(Piece::Text(rest));
    out.retain(|p| !matches!(p, Piece::Text("")));
    Ok(out)
}

/// Checks every reference in `value` against the steps that run before (`earlier`) and, in
/// a compensation, the step being undone (`own`). Each problem names its JSON path.
pub fn check(value: &Value, earlier: &[String], own: Option<&str>) -> Vec<String> {
    let mut problems = Vec::new();
    walk(
        value,
        &mut String::new(),
        &mut |path, text| match pieces(text) {
            Err(e) => problems.push(format!("{path}: {e}")),
            Ok(found) => {
                for piece in found {
                    if let Piece::Reference(r) = piece
                        && let Err(e) = check_path(r, earlier, own)
                    {
                        problems.push(format!("{path}: ${{{r}}}: {e}"));
                    }
                }
            }
        },
    );
    problems
}

fn walk(value: &Value, path: &mut String, f: &mut dyn FnMut(&str, &str)) {
    match value {
        Value::String(s) => f(if path.is_empty() { "" } else { path }, s),
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                walk(v, path, f);
                path.truncate(len);
            }
        }
        Value::Object(fields) => {
            for (k, v) in fields {
                let len = path.len();
                path.push('.');
                path.push_str(k);
                walk(v, path, f);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

fn check_path(reference: &str, earlier: &[String], own: Option<&str>) -> Result<(), String> {
    let segments: Vec<&str> = reference.split('.').collect();
    match segments.as_slice() {
        ["input", ..] => Ok(()),
        ["workflow", "id" | "requester" | "tenant"] => Ok(()),
        ["step", "idempotency_key"] => Ok(()),
        ["steps", step, "output", ..] => {
            if earlier.iter().any(|e| e == step) || own == Some(*step) {
                Ok(())
            } else {
                Err(format!("no step '{step}' runs before this one"))
            }
        }
        ["steps", _, ..] => Err("a step's value is read as steps.<id>.output".into()),
        _ => Err("unknown reference (expected input…, steps.<id>.output…, workflow.id, workflow.requester, workflow.tenant or step.idempotency_key)".into()),
    }
}

/// `value` with its references resolved in `scope`.
pub fn resolve(value: &Value, scope: &Scope<'_>) -> Result<Value, String> {
    Ok(match value {
        Value::String(s) => {
            let found = pieces(s)?;
            match found.as_slice() {
                [Piece::Reference(r)] => lookup(r, scope)?,
                _ => {
                    let mut out = String::new();
                    for piece in found {
                        match piece {
                            Piece::Text(t) => out.push_str(t),
                            Piece::Reference(r) => match lookup(r, scope)? {
                                Value::String(s) => out.push_str(&s),
                                other => out.push_str(&other.to_string()),
                            },
                        }
                    }
                    Value::String(out)
                }
            }
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| resolve(v, scope))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(k, v)| Ok((k.clone(), resolve(v, scope)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

fn lookup(reference: &str, scope: &Scope<'_>) -> Result<Value, String> {
    let segments: Vec<&str> = reference.split('.').collect();
    let (mut value, rest) = match segments.as_slice() {
        ["workflow", "id"] => return Ok(Value::from(scope.id)),
        ["workflow", "requester"] => return Ok(Value::from(scope.requester)),
        ["workflow", "tenant"] => return Ok(Value::from(scope.tenant)),
        ["step", "idempotency_key"] => return Ok(Value::from(scope.idempotency_key)),
        ["input", rest @ ..] => (scope.input, rest),
        ["steps", step, "output", rest @ ..] => match scope.outputs.get(*step) {
            Some(v) => (v, rest),
            None => {
                return Err(format!(
                    "${{{reference}}}: step '{step}' has no output (it was skipped or has not run)"
                ));
            }
        },
        _ => return Err(format!("${{{reference}}}: unknown reference")),
    };
    for (i, segment) in rest.iter().enumerate() {
        let next = match value {
            Value::Object(fields) => fields.get(*segment),
            Value::Array(items) => segment.parse::<usize>().ok().and_then(|n| items.get(n)),
            _ => None,
        };
        value = next.ok_or_else(|| {
            let at = segments[..segments.len() - rest.len() + i].join(".");
            format!("${{{reference}}}: {at} has no '{segment}'")
        })?;
    }
    Ok(value.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scope<'a>(input: &'a Value, outputs: &'a serde_json::Map<String, Value>) -> Scope<'a> {
        Scope {
            input,
            outputs,
            id: "wf-1",
            requester: "ana",
            tenant: "acme",
            idempotency_key: "wf-1:pay:0",
        }
    }

    #[test]
    fn whole_references_keep_their_type_and_text_interpolates() {
        let input = json!({"amount": 60000, "lines": [{"sku": "A"}]});
        let mut outputs = serde_json::Map::new();
        outputs.insert("po".into(), json!({"id": "PO-7"}));
        let payload = json!({
            "amount": "${input.amount}",
            "first": "${input.lines.0.sku}",
            "note": "PO ${steps.po.output.id} for ${input.amount} by ${workflow.requester}",
            "key": "${step.idempotency_key}",
            "literal": "costs $${input.amount}",
        });
        let out = resolve(&payload, &scope(&input, &outputs)).expect("resolves");
        assert_eq!(
            out,
            json!({"amount": 60000, "first": "A", "note": "PO PO-7 for 60000 by ana",
                   "key": "wf-1:pay:0", "literal": "costs ${input.amount}"})
        );
    }

    #[test]
    fn missing_values_name_where_the_path_stops() {
        let input = json!({"a": {"b": 1}});
        let outputs = serde_json::Map::new();
        let e = resolve(&json!("${input.a.c}"), &scope(&input, &outputs)).expect_err("missing");
        assert_eq!(e, "${input.a.c}: input.a has no 'c'");
        let e =
            resolve(&json!("${steps.x.output}"), &scope(&input, &outputs)).expect_err("no step");
        assert!(e.contains("step 'x' has no output"), "{e}");
    }

    #[test]
    fn check_names_each_bad_reference_by_path() {
        let earlier = vec!["reserve".to_owned()];
        let problems = check(
            &json!({"a": "${steps.later.output}", "b": ["${env:HOME}"], "c": "${input", "d": "${steps.reserve.output.id}"}),
            &earlier,
            None,
        );
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems[0].starts_with(".a: ${steps.later.output}: no step 'later'"),
            "{problems:?}"
        );
        assert!(
            problems[1].starts_with(".b[0]: ${env:HOME}: unknown reference"),
            "{problems:?}"
        );
        assert!(
            problems[2].starts_with(".c: '${input' opens a reference"),
            "{problems:?}"
        );
    }
}
