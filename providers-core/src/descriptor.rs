//! How a provider describes itself: service, versions, actions and their schemas.

use semver::Version;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Everything the host needs to know about a provider before running any of its code.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Descriptor {
    /// The service name clients address: `/providers/<service>/...`. Lowercase ASCII, digits, `-`, `_`.
    pub service: String,
    /// The provider's own version.
    pub version: Version,
    /// The contract version the provider was built against (normally [`crate::CONTRACT_VERSION`]).
    pub contract_version: Version,
    /// One line for humans.
    #[serde(default)]
    pub description: String,
    /// The actions, in the order the provider lists them.
    pub actions: Vec<Action>,
    /// JSON Schema of the configuration `connect` receives (base config overlaid by tenant overrides).
    #[serde(default = "object_schema")]
    pub config_schema: Value,
}

impl Descriptor {
    /// A descriptor for the current contract, with no actions and an empty-object config schema.
    pub fn new(service: impl Into<String>, version: Version) -> Self {
        Self {
            service: service.into(),
            version,
            contract_version: crate::contract_version(),
            description: String::new(),
            actions: Vec::new(),
            config_schema: json!({"type": "object", "additionalProperties": false}),
        }
    }

    /// Sets the description.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// Adds an action. An action that names no permission needs `<service>.<action>`, so a
    /// grant for one provider's action never covers another provider's action of the same name.
    pub fn action(mut self, mut action: Action) -> Self {
        if action.permission.is_empty() {
            action.permission = format!("{}.{}", self.service, action.name);
        }
        self.actions.push(action);
        self
    }

    /// Sets the config schema.
    pub fn config_schema(mut self, schema: Value) -> Self {
        self.config_schema = schema;
        self
    }

    /// Overrides the contract version (for providers built against an older contract).
    pub fn contract_version(mut self, version: Version) -> Self {
        self.contract_version = version;
        self
    }

    /// Fills what a descriptor read from JSON may leave out: an action naming no permission
    /// needs `<service>.<action>`, as with [`action`](Self::action).
    pub fn normalized(mut self) -> Self {
        for action in &mut self.actions {
            if action.permission.is_empty() {
                action.permission = format!("{}.{}", self.service, action.name);
            }
        }
        self
    }

    /// The action named `name`, if the provider has one.
    pub fn find_action(&self, name: &str) -> Option<&Action> {
        self.actions.iter().find(|a| a.name == name)
    }
}

/// One named action of a provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Action {
    /// The name clients address: `/providers/<service>/<name>`.
    pub name: String,
    /// One line for humans.
    #[serde(default)]
    pub description: String,
    /// JSON Schema the payload must satisfy; the host validates before the provider sees it.
    #[serde(default = "object_schema")]
    pub input_schema: Value,
    /// JSON Schema of the result.
    #[serde(default = "any_schema")]
    pub output_schema: Value,
    /// The permission a caller's roles must grant, e.g. `kv.write`: dot-separated segments
    /// of `a-z 0-9 _ -` (see [`is_valid_permission`]). [`Descriptor::action`] sets
    /// `<service>.<action>` when the action names none.
    #[serde(default)]
    pub permission: String,
    /// Whether repeating the call with the same payload has no further effect.
    #[serde(default)]
    pub idempotent: bool,
    /// The action that undoes this one, for workflows that compensate.
    #[serde(default)]
    pub compensation: Option<String>,
}

impl Action {
    /// An action that takes and returns any JSON object and needs the `<service>.<name>`
    /// permission unless [`permission`](Self::permission) names another.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            permission: String::new(),
            name: name.into(),
            description: String::new(),
            input_schema: json!({"type": "object"}),
            output_schema: json!({}),
            idempotent: false,
            compensation: None,
        }
    }

    /// Sets the description.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// Sets the input schema.
    pub fn input(mut self, schema: Value) -> Self {
        self.input_schema = schema;
        self
    }

    /// Sets the output schema.
    pub fn output(mut self, schema: Value) -> Self {
        self.output_schema = schema;
        self
    }

    /// Sets the permission the caller needs.
    pub fn permission(mut self, permission: impl Into<String>) -> Self {
        self.permission = permission.into();
        self
    }

    /// Marks the action idempotent.
    pub fn idempotent(mut self) -> Self {
        self.idempotent = true;
        self
    }

    /// Names the compensating action.
    pub fn compensated_by(mut self, action: impl Into<String>) -> Self {
        self.compensation = Some(action.into());
        self
    }
}

fn object_schema() -> Value {
    json!({"type": "object"})
}

fn any_schema() -> Value {
    json!({})
}

/// Whether `name` is a valid service or action name: 1 to 64 of `a-z 0-9 _ -`, starting with a letter.
pub fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z'))
        && name.len() <= 64
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_' | '-'))
}

/// Whether `permission` is a valid permission name: 1 to 128 characters of dot-separated,
/// non-empty segments of `a-z 0-9 _ -`, the first starting with a letter (`kv.read`,
/// `purchase-orders.amend`). Wildcards belong to grants, not to the permissions actions need.
pub fn is_valid_permission(permission: &str) -> bool {
    permission.len() <= 128
        && permission.starts_with(|c: char| c.is_ascii_lowercase())
        && permission.split('.').all(|segment| {
            !segment.is_empty()
                && segment
                    .chars()
                    .all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_' | '-'))
        })
}
