//! Field masking: an action's output schema marks fields with `"x-sensitive": "<permission>"`,
//! and the host replaces them with `null` in the answers of callers without that permission —
//! for every provider kind, in the one place every call passes.
//!
//! The marks are found once per plan by walking the output schema through `properties`,
//! `items` and the branches of `allOf`/`anyOf`/`oneOf` (not through `$ref`). A marked field
//! is masked whole, whatever it holds; a field the answer does not have is left absent.

use serde_json::Value;

/// One marked field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mask {
    path: Vec<Step>,
    /// The permission a caller needs to see the field.
    pub permission: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Field(String),
    Items,
}

/// Deepest schema nesting walked for marks.
const MAX_DEPTH: usize = 32;

impl Mask {
    /// The field's place, as written in the docs: `bank`, `lines[].cost`.
    pub fn path(&self) -> String {
        let mut out = String::new();
        for step in &self.path {
            match step {
                Step::Field(f) => {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(f);
                }
                Step::Items => out.push_str("[]"),
            }
        }
        out
    }
}

/// The marks of an output schema, or what is wrong with one of them.
pub fn masks_of(schema: &Value) -> Result<Vec<Mask>, String> {
    let mut out = Vec::new();
    walk(schema, &mut Vec::new(), &mut out, 0)?;
    // A mark the walk cannot reach would leave its field unmasked: refuse it instead.
    if marks(schema, 0) != out.len() {
        return Err("x-sensitive is followed through properties, items and allOf/anyOf/oneOf only, within 32 levels; a mark sits elsewhere (additionalProperties, patternProperties, prefixItems, $defs…) or deeper, where it would not be applied".into());
    }
    Ok(out)
}

/// Every `x-sensitive` key in `schema`, wherever it is (not inside a marked field).
fn marks(schema: &Value, depth: usize) -> usize {
    if depth > 256 {
        return 1;
    }
    match schema {
        Value::Object(o) if o.contains_key("x-sensitive") => 1,
        Value::Object(o) => o.values().map(|v| marks(v, depth + 1)).sum(),
        Value::Array(a) => a.iter().map(|v| marks(v, depth + 1)).sum(),
        _ => 0,
    }
}

fn walk(
    schema: &Value,
    path: &mut Vec<Step>,
    out: &mut Vec<Mask>,
    depth: usize,
) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Ok(());
    }
    let Some(object) = schema.as_object() else {
        return Ok(());
    };
    if let Some(mark) = object.get("x-sensitive") {
        let permission = mark.as_str().filter(|p| !p.is_empty()).ok_or_else(|| {
            format!(
                "x-sensitive at '{}' must name the permission that may see the field",
                Mask {
                    path: path.clone(),
                    permission: String::new()
                }
                .path()
            )
        })?;
        if path.is_empty() {
            return Err("x-sensitive marks the whole answer; mark its fields instead".into());
        }
        out.push(Mask {
            path: path.clone(),
            permission: permission.to_owned(),
        });
        return Ok(());
    }
    if let Some(props) = object.get("properties").and_then(Value::as_object) {
        for (name, sub) in props {
            path.push(Step::Field(name.clone()));
            walk(sub, path, out, depth + 1)?;
            path.pop();
        }
    }
    if let Some(items) = object.get("items") {
        path.push(Step::Items);
        walk(items, path, out, depth + 1)?;
        path.pop();
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        if let Some(branches) = object.get(key).and_then(Value::as_array) {
            for branch in branches {
                walk(branch, path, out, depth + 1)?;
            }
        }
    }
    Ok(())
}

/// Masks `value` at every mark in `hidden`; how many fields were masked.
pub fn apply(hidden: &[&Mask], value: &mut Value) -> usize {
    hidden.iter().map(|m| mask(&m.path, value)).sum()
}

fn mask(path: &[Step], value: &mut Value) -> usize {
    match path.split_first() {
        None => {
            *value = Value::Null;
            1
        }
        Some((Step::Field(name), rest)) => {
            match value.as_object_mut().and_then(|o| o.get_mut(name)) {
                Some(inner) if rest.is_empty() && inner.is_null() => 0,
                Some(inner) => mask(rest, inner),
                None => 0,
            }
        }
        Some((Step::Items, rest)) => match value.as_array_mut() {
            Some(items) => items.iter_mut().map(|item| mask(rest, item)).sum(),
            None => 0,
        },
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn marks_are_found_through_properties_items_and_branches_and_masked_in_place() {
        let schema = json!({"type": "object", "properties": {
            "name": {"type": "string"},
            "bank": {"type": "object", "x-sensitive": "finance.read", "properties": {"iban": {"type": "string"}}},
            "lines": {"type": "array", "items": {"type": "object", "properties": {
                "sku": {"type": "string"},
                "cost": {"type": "string", "x-sensitive": "costs.read"}
            }}},
            "extra": {"oneOf": [{"type": "object", "properties": {"margin": {"x-sensitive": "costs.read"}}}]}
        }});
        let masks = masks_of(&schema).unwrap();
        let paths: Vec<String> = masks.iter().map(Mask::path).collect();
        assert_eq!(paths, ["bank", "extra.margin", "lines[].cost"]);
        let mut answer = json!({"name": "acme", "bank": {"iban": "DE02"}, "lines": [{"sku": "a", "cost": "1.00"}, {"sku": "b"}], "extra": {"margin": 3}});
        let hidden: Vec<&Mask> = masks
            .iter()
            .filter(|m| m.permission == "costs.read")
            .collect();
        assert_eq!(apply(&hidden, &mut answer), 2);
        assert_eq!(
            answer,
            json!({"name": "acme", "bank": {"iban": "DE02"}, "lines": [{"sku": "a", "cost": null}, {"sku": "b"}], "extra": {"margin": null}})
        );
        assert!(
            masks_of(&json!({"properties": {"x": {"x-sensitive": 5}}}))
                .unwrap_err()
                .contains("at 'x'")
        );
        assert!(masks_of(&json!({"x-sensitive": "p"})).is_err());
        let hidden = json!({"properties": {"m": {"additionalProperties": {"x-sensitive": "p"}}}});
        assert!(
            masks_of(&hidden)
                .unwrap_err()
                .contains("a mark sits elsewhere")
        );
    }
}
