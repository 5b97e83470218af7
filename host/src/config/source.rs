//! Positions in the configuration text, and `${env:NAME}` references resolved with them.

use std::fmt;
use std::ops::Range;

use providers_security::{find_references, resolve_references};

/// One problem in a configuration file, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file's name as given (or `<demo>` for the embedded demo).
    pub file: String,
    /// 1-based line; 0 when the problem has no place in the file.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.message
            )
        }
    }
}

impl std::error::Error for ConfigError {}

/// The text of a configuration and its name, to turn byte spans into positions.
pub(crate) struct Source<'a> {
    pub name: &'a str,
    pub text: &'a str,
}

impl Source<'_> {
    /// An error at byte `offset` (an empty span from a default value has offset 0 and no place).
    pub fn error_at(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        let (line, column) = if span == (0..0) {
            (0, 0)
        } else {
            let before = &self.text[..span.start.min(self.text.len())];
            let line = before.matches('\n').count() + 1;
            let line_start = before.rfind('\n').map_or(0, |i| i + 1);
            (line, before[line_start..].chars().count() + 1)
        };
        ConfigError {
            file: self.name.to_owned(),
            line,
            column,
            message: message.into(),
        }
    }

    /// An error about the file as a whole.
    pub fn error(&self, message: impl Into<String>) -> ConfigError {
        self.error_at(0..0, message)
    }

    /// Checks every `${...}` outside comments resolves, so that resolution after parsing
    /// cannot fail and each failure is reported where it is written.
    pub fn check_references(&self, env: &dyn Fn(&str) -> Option<String>) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        let mut offset = 0;
        for line in self.text.split_inclusive('\n') {
            let code = without_comment(line);
            match find_references(code) {
                Ok(refs) => {
                    for r in refs {
                        let text = &code[r.offset..r.offset + r.len];
                        if let Err((_, e)) = resolve_references(text, env) {
                            errors.push(
                                self.error_at(
                                    offset + r.offset..offset + r.offset + 1,
                                    e.to_string(),
                                ),
                            );
                        }
                    }
                }
                Err((at, e)) => {
                    errors.push(self.error_at(offset + at..offset + at + 1, e.to_string()))
                }
            }
            offset += line.len();
        }
        errors
    }
}

/// `line` up to a `#` that starts a comment (one outside any string on the line).
fn without_comment(line: &str) -> &str {
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (Some('"'), '\\') if !escaped => {
                escaped = true;
                continue;
            }
            (Some(q), c) if c == q && !escaped => quote = None,
            (None, '"' | '\'') => quote = Some(c),
            (None, '#') => return &line[..i],
            _ => {}
        }
        escaped = false;
    }
    line
}

/// Resolves references in every string inside a TOML value, in place.
pub(crate) fn resolve_value(
    value: &mut toml::Value,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), String> {
    match value {
        toml::Value::String(s) => {
            *s = resolve_references(s, env).map_err(|(_, e)| e.to_string())?;
        }
        toml::Value::Array(items) => {
            for item in items {
                resolve_value(item, env)?;
            }
        }
        toml::Value::Table(table) => {
            for (_, item) in table.iter_mut() {
                resolve_value(item, env)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Overlays `overlay` on `base`: objects merge key by key, anything else is replaced.
pub(crate) fn merge(base: &mut serde_json::Value, overlay: serde_json::Value) {
    match (base, overlay) {
        (serde_json::Value::Object(b), serde_json::Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn positions_are_one_based_lines_and_character_columns() {
        let s = Source {
            name: "h.toml",
            text: "a = 1\nbé = \"x\"\n",
        };
        let e = s.error_at(11..12, "bad");
        assert_eq!(e.to_string(), "h.toml:2:5: bad");
        assert_eq!(s.error("whole").to_string(), "h.toml: whole");
    }

    #[test]
    fn references_are_checked_where_written_and_comments_skipped() {
        let s = Source {
            name: "h.toml",
            text: "# ${env:IN_COMMENT}\nurl = \"${env:SET}\" # was ${env:OLD}\nkey = \"x#${env:UNSET}\"\n",
        };
        let env = |n: &str| (n == "SET").then(|| "v".to_owned());
        let errors = s.check_references(&env);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(
            errors[0].to_string(),
            "h.toml:3:10: environment variable 'UNSET' is not set (referenced as '${env:UNSET}')"
        );
    }

    #[test]
    fn merge_overlays_objects_deeply() {
        let mut base = json!({"a": 1, "nested": {"x": 1, "y": 2}, "list": [1, 2]});
        merge(
            &mut base,
            json!({"nested": {"y": 3}, "list": [9], "b": true}),
        );
        assert_eq!(
            base,
            json!({"a": 1, "nested": {"x": 1, "y": 3}, "list": [9], "b": true})
        );
    }
}
