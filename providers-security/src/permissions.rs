//! Roles map to permissions; an action's permission must be granted by one of the caller's roles.

use std::collections::BTreeMap;

/// Role name to the permissions it grants. A grant is an exact permission (`kv.read`),
/// a prefix wildcard (`kv.*`, which grants `kv.read` and `kv.write`), or `*` for all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    roles: BTreeMap<String, Vec<String>>,
}

impl Permissions {
    /// From a role-to-grants table, as in `[security.roles]`.
    pub fn new(roles: BTreeMap<String, Vec<String>>) -> Self {
        Self { roles }
    }

    /// Whether any of `roles` grants `permission`. Unknown roles grant nothing.
    pub fn allows(&self, roles: &[String], permission: &str) -> bool {
        roles
            .iter()
            .filter_map(|r| self.roles.get(r))
            .flatten()
            .any(|grant| grants(grant, permission))
    }

    /// Role names, sorted.
    pub fn roles(&self) -> impl Iterator<Item = &str> {
        self.roles.keys().map(String::as_str)
    }
}

fn grants(grant: &str, permission: &str) -> bool {
    if grant == "*" || grant == permission {
        return true;
    }
    match grant.strip_suffix('*') {
        Some(prefix) if prefix.ends_with('.') => permission.starts_with(prefix),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_match_exactly_by_prefix_or_all() {
        let p = Permissions::new(BTreeMap::from([
            ("admin".to_owned(), vec!["*".to_owned()]),
            ("reader".to_owned(), vec!["kv.read".to_owned()]),
            ("kv".to_owned(), vec!["kv.*".to_owned()]),
        ]));
        let r = |names: &[&str]| names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert!(p.allows(&r(&["admin"]), "anything.at_all"));
        assert!(p.allows(&r(&["reader"]), "kv.read"));
        assert!(!p.allows(&r(&["reader"]), "kv.write"));
        assert!(!p.allows(&r(&["reader"]), "kv.read.more"));
        assert!(p.allows(&r(&["kv"]), "kv.write"));
        assert!(
            !p.allows(&r(&["kv"]), "kvx.write"),
            "prefix stops at the dot"
        );
        assert!(!p.allows(&r(&["ghost"]), "kv.read"));
        assert!(!p.allows(&[], "kv.read"));
        assert!(p.allows(&r(&["ghost", "reader"]), "kv.read"));
    }
}
