//! From TOML text to a checked [`Config`]: parse, resolve references, check against the registry.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use providers_core::semver::VersionReq;
use providers_core::{Factory, Registry, is_valid_name};
use providers_security::{Algorithm, KeyMaterial, Permissions, TokenSettings};
use serde_json::Value;

use super::source::{Source, merge, resolve_value};
use super::{ConfigError, Limits, RawConfig, RawKey, RawProvider, ServerConfig, StorageConfig};

/// A configuration that parsed and checked against the registry; the host runs from it.
pub struct Config {
    /// Where it came from, for messages.
    pub source: String,
    /// `[server]`.
    pub server: ServerConfig,
    /// `[storage]`, references resolved.
    pub storage: StorageConfig,
    /// Issuer and audience tokens must carry.
    pub token: TokenSettings,
    /// Keys, loaded.
    pub keys: Vec<KeyMaterial>,
    /// `[security.roles]`.
    pub permissions: Permissions,
    /// Configured services, by name.
    pub services: BTreeMap<String, Arc<ServicePlan>>,
    /// Configured tenants, by name.
    pub tenants: BTreeMap<String, TenantPlan>,
}

/// One `[[providers]]` entry, resolved to a factory.
pub struct ServicePlan {
    /// The service name clients use.
    pub service: String,
    /// The provider serving it.
    pub factory: Arc<dyn Factory>,
    /// Calls in the readiness check.
    pub required: bool,
    /// Compiled input schemas, by action.
    pub validators: HashMap<String, jsonschema::Validator>,
}

/// One tenant: its enabled services with their merged config and limits.
pub struct TenantPlan {
    /// Enabled services.
    pub services: BTreeMap<String, TenantService>,
}

/// A service as one tenant sees it.
pub struct TenantService {
    /// The service.
    pub plan: Arc<ServicePlan>,
    /// The provider's base config overlaid by the tenant's overrides.
    pub config: Value,
    /// The tighter of the provider's and the tenant's limits.
    pub limits: Limits,
}

/// Reads and checks the file at `path`. Key files resolve against its folder; a relative
/// SQLite path in `storage.url` resolves against the working directory, like any sqlx URL.
pub fn load(path: &Path, registry: &Registry) -> Result<Config, Vec<ConfigError>> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![ConfigError {
            file: name.clone(),
            line: 0,
            column: 0,
            message: format!("cannot read: {e}"),
        }]
    })?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    load_str(&text, &name, &base, registry, &|n| std::env::var(n).ok())
}

/// Checks configuration `text` named `name`, with files relative to `base_dir` and
/// references read through `env`.
pub fn load_str(
    text: &str,
    name: &str,
    base_dir: &Path,
    registry: &Registry,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, Vec<ConfigError>> {
    let src = Source { name, text };
    let mut errors = src.check_references(env);
    let raw: RawConfig = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            errors.push(match e.span() {
                Some(span) => src.error_at(span, e.message().trim_end()),
                None => src.error(e.message().trim_end()),
            });
            return Err(errors);
        }
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut ck = Checker {
        src,
        base_dir,
        env,
        errors,
        invalid_base: Default::default(),
    };
    let config = ck.check(raw, registry);
    if ck.errors.is_empty() {
        config.ok_or_else(|| vec![ck.src.error("configuration is invalid")])
    } else {
        Err(ck.errors)
    }
}

struct Checker<'a> {
    src: Source<'a>,
    base_dir: &'a Path,
    env: &'a dyn Fn(&str) -> Option<String>,
    errors: Vec<ConfigError>,
    /// Services whose base config failed its schema (reported once, at the provider).
    invalid_base: std::collections::BTreeSet<String>,
}

impl Checker<'_> {
    fn at(&mut self, span: std::ops::Range<usize>, message: impl Into<String>) {
        let e = self.src.error_at(span, message);
        self.errors.push(e);
    }

    fn resolve(&mut self, span: std::ops::Range<usize>, text: &str) -> String {
        let mut v = toml::Value::String(text.to_owned());
        match resolve_value(&mut v, self.env) {
            Ok(()) => v.as_str().unwrap_or_default().to_owned(),
            Err(e) => {
                self.at(span, e);
                String::new()
            }
        }
    }

    fn check(&mut self, raw: RawConfig, registry: &Registry) -> Option<Config> {
        let storage = StorageConfig {
            url: self.resolve(raw.storage.url.span(), raw.storage.url.get_ref()),
            max_connections: *raw.storage.max_connections.get_ref(),
        };
        if !(storage.url.starts_with("sqlite:")
            || storage.url.starts_with("postgres://")
            || storage.url.starts_with("postgresql://"))
        {
            self.at(
                raw.storage.url.span(),
                "storage.url: expected 'sqlite://path' or 'postgres://...'",
            );
        }
        if storage.max_connections == 0 {
            self.at(
                raw.storage.max_connections.span(),
                "storage.max_connections: must be at least 1",
            );
        }

        let security_span = raw.security.span();
        let security = raw.security.into_inner();
        let mut keys = Vec::new();
        let declared_keys = security.keys.len();
        for key in security.keys {
            let span = key.span();
            if let Some(k) = self.key(span.clone(), key.into_inner()) {
                // Each key on its own, so an unusable one is reported where it is written.
                let settings = TokenSettings {
                    issuer: String::new(),
                    audience: String::new(),
                    leeway_seconds: 0,
                };
                match providers_security::TokenVerifier::new(std::slice::from_ref(&k), settings) {
                    Ok(_) => keys.push(k),
                    Err(e) => self.at(span, format!("security.keys: {e}")),
                }
            }
        }
        if declared_keys == 0 {
            self.at(
                security_span.clone(),
                "security: at least one [[security.keys]] entry is needed to verify tokens",
            );
        }
        for (role, grants) in &security.roles {
            if grants.iter().any(|g| g.is_empty()) {
                self.at(
                    security_span.clone(),
                    format!("security.roles.{role}: empty permission"),
                );
            }
        }

        let mut services = BTreeMap::new();
        let mut provider_entries = BTreeMap::new();
        let declared: std::collections::BTreeSet<String> = raw
            .providers
            .iter()
            .map(|p| p.get_ref().service.get_ref().clone())
            .collect();
        for entry in raw.providers {
            let span = entry.span();
            let entry = entry.into_inner();
            if let Some(plan) = self.provider(span.clone(), &entry, registry) {
                let name = plan.service.clone();
                if services.contains_key(&name) {
                    self.at(
                        entry.service.span(),
                        format!("service '{name}' is configured twice"),
                    );
                    continue;
                }
                services.insert(name.clone(), Arc::new(plan));
                provider_entries.insert(name, entry);
            }
        }

        let mut tenants = BTreeMap::new();
        for (name, tenant) in raw.tenants {
            let tenant_span = name.span();
            let name = name.into_inner();
            if !is_valid_name(&name) {
                self.at(tenant_span.clone(), format!("tenant '{name}': invalid name (expected 1-64 of a-z, 0-9, '_', '-', starting with a letter)"));
            }
            let tenant = tenant.into_inner();
            if tenant.limits.max_concurrency == Some(0) {
                self.at(
                    tenant_span.clone(),
                    format!("tenant '{name}': limits.max_concurrency must be at least 1"),
                );
            }
            let mut enabled = BTreeMap::new();
            for service in &tenant.services {
                let s = service.get_ref();
                let Some(plan) = services.get(s) else {
                    // A configured service that failed its own checks was reported already.
                    if !declared.contains(s.as_str()) {
                        self.at(service.span(), format!("tenant '{name}' enables service '{s}', which no [[providers]] entry configures"));
                    }
                    continue;
                };
                let Some(entry) = provider_entries.get(s) else {
                    continue;
                };
                let mut base = toml::Value::Table(entry.config.get_ref().clone());
                if let Err(e) = resolve_value(&mut base, self.env) {
                    self.at(entry.config.span(), e);
                }
                let mut config = to_json(base);
                // A zero was reported where it is written (the provider or the tenant limits).
                let mut limits = entry.limits.tighter(tenant.limits);
                if limits.max_concurrency == Some(0) {
                    limits.max_concurrency = Some(1);
                }
                let overrides = tenant
                    .providers
                    .iter()
                    .find(|(k, _)| k.get_ref() == s)
                    .map(|(_, v)| v);
                if let Some(overrides) = tenant
                    .providers
                    .iter()
                    .find(|(k, _)| k.get_ref() == s)
                    .map(|(_, v)| v)
                {
                    let mut o = toml::Value::Table(overrides.get_ref().clone());
                    if let Err(e) = resolve_value(&mut o, self.env) {
                        self.at(overrides.span(), e);
                    }
                    merge(&mut config, to_json(o));
                }
                // An invalid base config was reported at the provider; once is enough.
                if !self.invalid_base.contains(s.as_str()) {
                    let schema = &plan.factory.descriptor().config_schema;
                    let place = overrides.map_or(tenant_span.clone(), |o| o.span());
                    let what = format!("tenant '{name}', service '{s}' config");
                    self.validate_config(schema, &config, place, &what);
                }
                enabled.insert(
                    s.clone(),
                    TenantService {
                        plan: plan.clone(),
                        config,
                        limits,
                    },
                );
            }
            for (service, overrides) in &tenant.providers {
                if !tenant
                    .services
                    .iter()
                    .any(|s| s.get_ref() == service.get_ref())
                {
                    self.at(overrides.span(), format!("tenant '{name}' overrides the config of '{}', which it does not enable (add it to services)", service.get_ref()));
                }
            }
            tenants.insert(name, TenantPlan { services: enabled });
        }

        Some(Config {
            source: self.src.name.to_owned(),
            server: raw.server,
            storage,
            token: TokenSettings {
                issuer: security.issuer,
                audience: security.audience,
                leeway_seconds: security.leeway_seconds,
            },
            keys,
            permissions: Permissions::new(security.roles),
            services,
            tenants,
        })
    }

    /// Returns whether `config` satisfies `schema`, reporting at `span` when it does not.
    fn validate_config(
        &mut self,
        schema: &Value,
        config: &Value,
        span: std::ops::Range<usize>,
        what: &str,
    ) -> bool {
        match jsonschema::validator_for(schema) {
            Ok(v) => match v.validate(config) {
                Ok(()) => true,
                Err(e) => {
                    let path = e.instance_path().as_str().to_owned();
                    let at = if path.is_empty() {
                        "/".to_owned()
                    } else {
                        path
                    };
                    self.at(span, format!("{what} at '{at}': {e}"));
                    false
                }
            },
            Err(e) => {
                self.at(
                    span,
                    format!("{what}: the provider's config schema is invalid: {e}"),
                );
                false
            }
        }
    }

    fn provider(
        &mut self,
        span: std::ops::Range<usize>,
        entry: &RawProvider,
        registry: &Registry,
    ) -> Option<ServicePlan> {
        let service = entry.service.get_ref();
        if !is_valid_name(service) {
            self.at(entry.service.span(), format!("invalid service name '{service}' (expected 1-64 of a-z, 0-9, '_', '-', starting with a letter)"));
            return None;
        }
        let plugin = entry.plugin.as_ref().unwrap_or(&entry.service);
        let requirement = match VersionReq::parse(entry.version.get_ref()) {
            Ok(r) => r,
            Err(e) => {
                self.at(
                    entry.version.span(),
                    format!(
                        "service '{service}': invalid version requirement '{}': {e}",
                        entry.version.get_ref()
                    ),
                );
                return None;
            }
        };
        let factory = match registry.resolve(plugin.get_ref(), &requirement) {
            Ok(f) => f,
            Err(e) => {
                let place = if entry.version.span() == (0..0) {
                    plugin.span()
                } else {
                    entry.version.span()
                };
                self.at(place, e.to_string());
                return None;
            }
        };
        let d = factory.descriptor();
        let mut validators = HashMap::new();
        for action in &d.actions {
            match jsonschema::validator_for(&action.input_schema) {
                Ok(v) => {
                    validators.insert(action.name.clone(), v);
                }
                Err(e) => {
                    self.at(span.clone(), format!("provider '{}' {} ({}) declares an invalid input schema for action '{}': {e}", d.service, d.version, factory.origin(), action.name));
                    return None;
                }
            }
        }
        if entry.limits.max_concurrency == Some(0) {
            self.at(
                span.clone(),
                format!("service '{service}': limits.max_concurrency must be at least 1"),
            );
        }
        let mut base = toml::Value::Table(entry.config.get_ref().clone());
        if resolve_value(&mut base, self.env).is_ok() {
            let what = format!("service '{service}' config");
            if !self.validate_config(
                &d.config_schema.clone(),
                &to_json(base),
                entry.config.span(),
                &what,
            ) {
                self.invalid_base.insert(service.clone());
            }
        }
        Some(ServicePlan {
            service: service.clone(),
            factory,
            required: entry.required,
            validators,
        })
    }

    fn key(&mut self, span: std::ops::Range<usize>, key: RawKey) -> Option<KeyMaterial> {
        let algorithm = match key.algorithm.get_ref().as_str() {
            "HS256" => Algorithm::HS256,
            "RS256" => Algorithm::RS256,
            other => {
                self.at(
                    key.algorithm.span(),
                    format!("unsupported algorithm '{other}' (expected \"HS256\" or \"RS256\")"),
                );
                return None;
            }
        };
        let read = |c: &mut Self, path: &Path, what: &str| -> Option<Vec<u8>> {
            let full = c.base_dir.join(path);
            match std::fs::read(&full) {
                Ok(bytes) => Some(bytes),
                Err(e) => {
                    c.at(span.clone(), format!("{what} '{}': {e}", full.display()));
                    None
                }
            }
        };
        let misplaced = match algorithm {
            Algorithm::HS256 => key.public_key_file.is_some() || key.private_key_file.is_some(),
            _ => key.secret.is_some() || key.secret_file.is_some(),
        };
        if misplaced {
            self.at(span, format!(
                "{}: an HS256 key takes secret or secret_file; an RS256 key takes public_key_file and private_key_file",
                key.algorithm.get_ref()
            ));
            return None;
        }
        match algorithm {
            Algorithm::HS256 => {
                let secret = match (&key.secret, &key.secret_file) {
                    (Some(s), None) => {
                        let whole_reference = providers_security::find_references(s.get_ref())
                            .is_ok_and(|r| {
                                r.len() == 1 && r[0].offset == 0 && r[0].len == s.get_ref().len()
                            });
                        if !whole_reference {
                            self.at(s.span(), "secrets are never written in clear: use secret = \"${env:NAME}\" or secret_file");
                            return None;
                        }
                        self.resolve(s.span(), s.get_ref()).into_bytes()
                    }
                    (None, Some(path)) => {
                        let mut bytes = read(self, path, "secret_file")?;
                        while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
                            bytes.pop();
                        }
                        bytes
                    }
                    _ => {
                        self.at(
                            span,
                            "an HS256 key needs exactly one of secret or secret_file",
                        );
                        return None;
                    }
                };
                Some(KeyMaterial {
                    kid: key.kid,
                    algorithm,
                    verify: secret.clone(),
                    sign: Some(secret),
                })
            }
            _ => {
                let Some(public) = &key.public_key_file else {
                    self.at(
                        span,
                        "an RS256 key needs public_key_file (and private_key_file to mint tokens)",
                    );
                    return None;
                };
                let verify = read(self, public, "public_key_file")?;
                let sign = match &key.private_key_file {
                    Some(p) => Some(read(self, p, "private_key_file")?),
                    None => None,
                };
                Some(KeyMaterial {
                    kid: key.kid,
                    algorithm,
                    verify,
                    sign,
                })
            }
        }
    }
}

fn to_json(value: toml::Value) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}
