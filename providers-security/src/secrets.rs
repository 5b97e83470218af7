//! `${env:NAME}` and `${secret:NAME}` references: secrets stay out of configuration files and
//! are resolved at load.

use crate::SecurityError;

/// One `${scheme:NAME}` reference found in a text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Byte offset of the `$` in the text.
    pub offset: usize,
    /// Length in bytes of the whole `${...}`.
    pub len: usize,
    /// `env` or `secret`.
    pub scheme: String,
    /// The name after the colon.
    pub name: String,
}

/// Every `${...}` in `text`, whether or not it resolves. An unterminated `${` or one without
/// a `scheme:` is reported as an error with its offset.
pub fn find_references(text: &str) -> Result<Vec<Reference>, (usize, SecurityError)> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(at) = text[from..].find("${").map(|i| i + from) {
        let Some(end) = text[at..].find('}').map(|i| i + at) else {
            return Err((
                at,
                SecurityError::Reference("unterminated '${' (expected '${env:NAME}')".into()),
            ));
        };
        let inner = &text[at + 2..end];
        let Some((scheme, name)) = inner.split_once(':') else {
            return Err((
                at,
                SecurityError::Reference(format!(
                    "'${{{inner}}}' names no source (expected '${{env:NAME}}')"
                )),
            ));
        };
        let valid_name = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-');
        if !valid_name {
            return Err((
                at,
                SecurityError::Reference(format!("'${{{inner}}}': invalid name '{name}'")),
            ));
        }
        out.push(Reference {
            offset: at,
            len: end + 1 - at,
            scheme: scheme.to_owned(),
            name: name.to_owned(),
        });
        from = end + 1;
    }
    Ok(out)
}

/// Replaces every reference in `text` with its value, using `lookup` to read them:
/// `${env:NAME}` asks for `NAME`, `${secret:NAME}` for `secret:NAME` (the host answers those
/// from its secret store). An unknown one is refused, never left in place.
pub fn resolve_references(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, (usize, SecurityError)> {
    let env = lookup;
    let refs = find_references(text)?;
    if refs.is_empty() {
        return Ok(text.to_owned());
    }
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for r in refs {
        out.push_str(&text[last..r.offset]);
        let value = match r.scheme.as_str() {
            "env" => env(&r.name).ok_or_else(|| {
                (
                    r.offset,
                    SecurityError::Reference(format!(
                        "environment variable '{}' is not set (referenced as '${{env:{}}}')",
                        r.name, r.name
                    )),
                )
            })?,
            "secret" => env(&format!("secret:{}", r.name)).ok_or_else(|| {
                (
                    r.offset,
                    SecurityError::Reference(format!(
                        "secret '{}' is not in the secret store (store it with 'provider-host secrets set {}')",
                        r.name, r.name
                    )),
                )
            })?,
            other => {
                return Err((
                    r.offset,
                    SecurityError::Reference(format!(
                        "unknown reference source '{other}' in '${{{other}:{}}}' (expected 'env' or 'secret')",
                        r.name
                    )),
                ));
            }
        };
        out.push_str(&value);
        last = r.offset + r.len;
    }
    out.push_str(&text[last..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "DB_PASS" => Some("s3cr}t".to_owned()),
            "secret:api_key" => Some("k3y".to_owned()),
            _ => None,
        }
    }

    #[test]
    fn resolves_env_references_in_place() {
        assert_eq!(
            resolve_references("postgres://u:${env:DB_PASS}@h/db", env).unwrap(),
            "postgres://u:s3cr}t@h/db"
        );
        assert_eq!(resolve_references("plain", env).unwrap(), "plain");
    }

    #[test]
    fn reports_what_and_where() {
        let (at, err) = resolve_references("x ${env:NOPE} y", env).unwrap_err();
        assert_eq!(at, 2);
        assert_eq!(
            err.to_string(),
            "environment variable 'NOPE' is not set (referenced as '${env:NOPE}')"
        );
        let (at, err) = resolve_references("ab${env:X", env).unwrap_err();
        assert_eq!(
            (at, err.to_string().as_str()),
            (2, "unterminated '${' (expected '${env:NAME}')")
        );
        let (_, err) = resolve_references("${vault:X}", env).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown reference source 'vault' in '${vault:X}' (expected 'env' or 'secret')"
        );
        let (_, err) = resolve_references("${secret:X}", env).unwrap_err();
        assert_eq!(
            err.to_string(),
            "secret 'X' is not in the secret store (store it with 'provider-host secrets set X')"
        );
        assert_eq!(
            resolve_references("Bearer ${secret:api_key}", env).unwrap(),
            "Bearer k3y"
        );
        let (_, err) = resolve_references("${DB_PASS}", env).unwrap_err();
        assert_eq!(
            err.to_string(),
            "'${DB_PASS}' names no source (expected '${env:NAME}')"
        );
    }
}
