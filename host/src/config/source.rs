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
    /// Byte offset of each line's start, computed once: a mistake repeated in thousands of
    /// tenants must not rescan the file for each message.
    line_starts: std::sync::OnceLock<Vec<usize>>,
}

impl<'a> Source<'a> {
    pub fn new(name: &'a str, text: &'a str) -> Self {
        Self {
            name,
            text,
            line_starts: std::sync::OnceLock::new(),
        }
    }

    /// An error at byte `offset` (an empty span from a default value has offset 0 and no place).
    pub fn error_at(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        let (line, column) = if span == (0..0) {
            (0, 0)
        } else {
            let starts = self.line_starts.get_or_init(|| {
                std::iter::once(0)
                    .chain(self.text.match_indices('\n').map(|(i, _)| i + 1))
                    .collect()
            });
            let offset = span.start.min(self.text.len());
            let line = starts.partition_point(|&s| s <= offset);
            let start = starts[line - 1];
            let column = self
                .text
                .get(start..offset)
                .map_or(1, |before| before.chars().count() + 1);
            (line, column)
        };
        ConfigError {
            file: self.name.to_owned(),
            line,
            column,
            message: message.into(),
        }
    }

    /// Where the value of the dotted key `path` (`observability.otlp_queue`) is written, through
    /// tables; `0..0` (no place) when it is not written, or is inside an array of tables.
    pub fn span_of(&self, path: &str) -> Range<usize> {
        let Ok(doc) = toml::de::DeTable::parse(self.text) else {
            return 0..0;
        };
        let mut table = doc.get_ref();
        let mut keys = path.split('.').peekable();
        while let Some(key) = keys.next() {
            let Some((_, value)) = table.iter().find(|(k, _)| k.get_ref() == key) else {
                return 0..0;
            };
            match value.get_ref() {
                _ if keys.peek().is_none() => return value.span(),
                toml::de::DeValue::Table(inner) => table = inner,
                _ => return 0..0,
            }
        }
        0..0
    }

    /// An error about the file as a whole.
    pub fn error(&self, message: impl Into<String>) -> ConfigError {
        self.error_at(0..0, message)
    }

    /// Checks that every `${...}` in a string value resolves, so that resolution after
    /// parsing cannot fail and each failure is reported where it is written. Values come from
    /// toml's own spanned parse, so comments and multi-line strings need no guessing; a
    /// syntax error is left to the typed parse, which reports it.
    pub fn check_references(&self, env: &dyn Fn(&str) -> Option<String>) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        if let Ok(doc) = toml::de::DeTable::parse(self.text) {
            for (_, value) in doc.get_ref() {
                self.check_value(value, env, &mut errors);
            }
        }
        errors
    }

    fn check_value(
        &self,
        value: &toml::Spanned<toml::de::DeValue<'_>>,
        env: &dyn Fn(&str) -> Option<String>,
        errors: &mut Vec<ConfigError>,
    ) {
        match value.get_ref() {
            toml::de::DeValue::String(text) => {
                let span = value.span();
                let raw = self.text.get(span.clone()).unwrap_or("");
                let refs = match find_references(text) {
                    Ok(refs) => refs,
                    Err((at, e)) => {
                        let place = locate(raw, &text[at..], span.start);
                        errors.push(self.error_at(place..place + 1, e.to_string()));
                        return;
                    }
                };
                for r in refs {
                    let written = &text[r.offset..r.offset + r.len];
                    if let Err((_, e)) = resolve_references(written, env) {
                        let place = locate(raw, written, span.start);
                        errors.push(self.error_at(place..place + 1, e.to_string()));
                    }
                }
            }
            toml::de::DeValue::Array(items) => {
                for item in items {
                    self.check_value(item, env, errors);
                }
            }
            toml::de::DeValue::Table(table) => {
                for (_, item) in table {
                    self.check_value(item, env, errors);
                }
            }
            _ => {}
        }
    }
}

/// Where `needle` is written inside the literal `raw` starting at byte `start`; the literal's
/// start when escapes make it impossible to find verbatim.
fn locate(raw: &str, needle: &str, start: usize) -> usize {
    raw.find(needle).map_or(start, |i| start + i)
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
    fn dotted_keys_are_found_through_tables_and_inline_tables() {
        let text =
            "# c\n[observability]\notlp_queue = 0\n[audit]\nbatch = { n = 3 }\n[[keys]]\nid = 1\n";
        let src = Source::new("t.toml", text);
        let at = |path: &str| {
            let span = src.span_of(path);
            (span != (0..0)).then(|| &text[span])
        };
        assert_eq!(at("observability.otlp_queue"), Some("0"));
        assert_eq!(at("audit.batch.n"), Some("3"));
        assert_eq!(at("audit.batch"), Some("{ n = 3 }"));
        assert_eq!(at("observability.log_filter"), None);
        assert_eq!(at("keys.id"), None);
        assert_eq!(at("nowhere"), None);
        let e = src.error_at(src.span_of("observability.otlp_queue"), "m");
        assert_eq!((e.line, e.column), (3, 14));
    }

    #[test]
    fn positions_are_one_based_lines_and_character_columns() {
        let s = Source::new("h.toml", "a = 1\nbé = \"x\"\n");
        let e = s.error_at(11..12, "bad");
        assert_eq!(e.to_string(), "h.toml:2:5: bad");
        assert_eq!(s.error("whole").to_string(), "h.toml: whole");
    }

    #[test]
    fn references_are_checked_where_written_and_comments_skipped() {
        let s = Source::new(
            "h.toml",
            "# ${env:IN_COMMENT}\nurl = \"${env:SET}\" # was ${env:OLD}\nkey = \"x#${env:UNSET}\"\nnote = \"\"\"\nfirst # ${env:UNSET2}\n\"\"\" # ${env:OLD}\n",
        );
        let env = |n: &str| (n == "SET").then(|| "v".to_owned());
        let errors: Vec<String> = s
            .check_references(&env)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            errors,
            [
                "h.toml:3:10: environment variable 'UNSET' is not set (referenced as '${env:UNSET}')",
                "h.toml:5:9: environment variable 'UNSET2' is not set (referenced as '${env:UNSET2}')",
            ],
            "comments are skipped, multi-line strings are not"
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
