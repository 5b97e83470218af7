//! From TOML text to a checked [`Config`]: parse, resolve references, check against the registry.

use crate::rate::{RateLimits, TenantRate};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use providers_core::semver::VersionReq;
use providers_core::{Factory, Registry, is_valid_name};
use providers_security::{Algorithm, KeyMaterial, Permissions, TokenIssuer, TokenSettings};
use serde_json::Value;
use toml::Spanned;

use super::source::{Source, merge, resolve_value};
use super::{
    ConfigError, Limits, PluginsConfig, RawConfig, RawKey, RawProvider, RawSecurity, RawStorage,
    RawTenant, ServerConfig, StorageConfig, Unavailable,
};
use crate::plugins::{self, NativePool};

mod plans;

/// A configuration that parsed and checked against the registry; the host runs from it.
pub struct Config {
    /// Where it came from, for messages.
    pub source: String,
    /// `[server]`.
    pub server: ServerConfig,
    /// `[storage]`, references resolved.
    pub storage: StorageConfig,
    /// `[plugins]`, with `dirs` resolved against the config's folder.
    pub plugins: PluginsConfig,
    /// What loading the plugin folders gave.
    pub loaded_plugins: plugins::Loaded,
    /// Every provider this host can run: builtins and accepted plugins.
    pub registry: Registry,
    /// Problems that do not stop the host: a service that is not required and whose plugin
    /// was refused or is missing (its calls answer 503 with the reason).
    pub warnings: Vec<String>,
    /// Issuer and audience tokens must carry.
    pub token: TokenSettings,
    /// Keys, loaded.
    pub keys: Vec<KeyMaterial>,
    /// `[security.roles]`.
    pub permissions: Permissions,
    /// Who may use `/admin`.
    pub admin: AdminSettings,
    /// The threads native plugins run on, kept by a reload whose settings match.
    pub native_pool: NativePool,
    /// Configured services, by name.
    pub services: BTreeMap<String, Arc<ServicePlan>>,
    /// Configured tenants, by name.
    pub tenants: BTreeMap<String, TenantPlan>,
    /// `[audit]`.
    pub audit: crate::audit::AuditSettings,
    /// `[auth]`: the token service.
    pub auth: crate::auth::AuthSettings,
    /// `[observability]`: logs and metrics.
    pub observability: crate::observe::ObservabilitySettings,
    /// `[workflows]`, its folder resolved against the config's.
    pub workflows: crate::workflows::WorkflowSettings,
}

/// `[security] admin_role` and `platform_tenant`: who administers what.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminSettings {
    /// The role that makes a token an administrator of its own tenant; no admin API without it.
    pub role: Option<String>,
    /// The tenant whose administrators are platform operators: every tenant and the config.
    pub platform_tenant: Option<String>,
}

/// Revisions of tenant services: a new one for every plan a load makes, so a slot made for
/// an older plan is told from one made for a newer.
static REVISIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn next_revision() -> u64 {
    REVISIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// One `[[providers]]` entry, resolved to a factory.
pub struct ServicePlan {
    /// The service name clients use.
    pub service: String,
    /// The provider serving it.
    pub factory: Arc<dyn Factory>,
    /// Whether readiness depends on it.
    pub required: bool,
    /// Compiled input schemas, by action.
    pub validators: HashMap<String, jsonschema::Validator>,
    /// Fields the output schemas mark `x-sensitive`, by action (only actions that have some).
    pub masks: HashMap<String, Vec<crate::masking::Mask>>,
    /// Why the service cannot be served (its plugin was refused or is missing); every call
    /// answers 503 `PROVIDER_UNAVAILABLE` with it.
    pub unavailable: Option<String>,
    /// kv config of a plugin's own store.
    pub store: Value,
    /// Hosts the plugin's outbound HTTP may reach.
    pub allowed_hosts: Arc<[String]>,
    /// Its calls' metric handles, registered on first use.
    pub(crate) calls: crate::observe::CallMetrics,
}

/// One tenant: its enabled services with their merged config and limits.
pub struct TenantPlan {
    /// Enabled services.
    pub services: BTreeMap<String, TenantService>,
    /// Its rate-limit cells (kept by a reload that leaves its limits as they were).
    pub rate: Arc<TenantRate>,
}

/// A service as one tenant sees it.
pub struct TenantService {
    /// The service.
    pub service: Arc<ServicePlan>,
    /// The provider's base config overlaid by the tenant's overrides.
    pub config: Value,
    /// The tighter of the provider's and the tenant's limits.
    pub limits: Limits,
    /// Which plan this is: a reload keeps the revision of a plan that did not change, and
    /// gives a changed one a higher revision, whose instance replaces the older one's.
    pub revision: u64,
}

impl TenantService {
    /// Whether `other` would run the same instance: the same factory, config, limits, store
    /// and allowed hosts. Builtin factories come from one registry and plugins keep their
    /// factory across loads while their file is unchanged, so factories compare by identity.
    pub fn same_plan(&self, other: &TenantService) -> bool {
        Arc::ptr_eq(&self.service.factory, &other.service.factory)
            && self.config == other.config
            && self.limits == other.limits
            && self.service.store == other.service.store
            && self.service.allowed_hosts == other.service.allowed_hosts
            && self.service.unavailable == other.service.unavailable
    }
}

/// Reads and checks the file at `path`. Every relative path in it (a SQLite file in
/// `storage.url`, key files, plugin folders, the compile cache) resolves against its folder.
pub fn load(path: &Path, registry: &Registry) -> Result<Config, Vec<ConfigError>> {
    load_file(path, registry, &|n| std::env::var(n).ok(), None)
}

/// [`load`] with references read through `env`, keeping what `previous` loaded where it
/// did not change (see [`load_with`]).
pub fn load_file(
    path: &Path,
    registry: &Registry,
    env: &dyn Fn(&str) -> Option<String>,
    previous: Option<&Config>,
) -> Result<Config, Vec<ConfigError>> {
    let (text, name) = read_file(path)?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    load_with(&text, &name, &base, registry, env, previous)
}

/// The text of the configuration file at `path` and its name in messages.
pub(crate) fn read_file(path: &Path) -> Result<(String, String), Vec<ConfigError>> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![ConfigError {
            file: name.clone(),
            line: 0,
            column: 0,
            message: format!("cannot read: {e}"),
        }]
    })?;
    Ok((text, name))
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
    load_with(text, name, base_dir, registry, env, None)
}

/// [`load_str`] for a reload: plugins whose file, hash and engine settings are unchanged
/// keep the factory `previous` loaded, the native pool is kept when its settings are, and
/// tenant services whose plan did not change keep their revision (and so their instance).
pub fn load_with(
    text: &str,
    name: &str,
    base_dir: &Path,
    registry: &Registry,
    env: &dyn Fn(&str) -> Option<String>,
    previous: Option<&Config>,
) -> Result<Config, Vec<ConfigError>> {
    let src = Source::new(name, text);
    let errors = src.check_references(env);
    let raw: RawConfig = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            let mut errors = errors;
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
    let mut checker = Checker {
        src,
        base_dir,
        env,
        errors,
        per_tenant: BTreeMap::new(),
        warnings: Vec::new(),
        plugin_dirs: Vec::new(),
        wasm_memory: 0,
        loaded: plugins::Loaded::default(),
        pinned: BTreeMap::new(),
        previous,
        global_rate: RateLimits::default(),
    };
    let config = checker.check(raw, registry);
    let errors = checker.finish();
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(errors)
    }
}

/// A SQLite URL whose file path is relative, made relative to `base` (the config file's
/// folder) instead of the working directory; any other URL as it is.
pub(crate) fn relative_sqlite(url: &str, base: &Path) -> String {
    let Some(rest) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    else {
        return url.to_owned();
    };
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, format!("?{q}")),
        None => (rest, String::new()),
    };
    if path.is_empty() || path == ":memory:" || Path::new(path).is_absolute() {
        return url.to_owned();
    }
    format!("sqlite://{}{query}", base.join(path).display())
}

/// Placeholder for the tenant's name in per-tenant messages, so the same mistake made in
/// many tenants is reported once.
const TENANT: &str = "{tenant}";

struct Checker<'a> {
    src: Source<'a>,
    base_dir: &'a Path,
    env: &'a dyn Fn(&str) -> Option<String>,
    errors: Vec<ConfigError>,
    /// Per-tenant messages (with [`TENANT`] in place of the name) and where each occurred.
    per_tenant: BTreeMap<String, Vec<(Range<usize>, String)>>,
    warnings: Vec<String>,
    plugin_dirs: Vec<std::path::PathBuf>,
    /// `[plugins] wasm_memory`: the ceiling of every `limits.memory`.
    wasm_memory: u64,
    loaded: plugins::Loaded,
    /// Plans of versions tenants are pinned to, by (service, version).
    pinned: BTreeMap<(String, String), Arc<ServicePlan>>,
    /// The configuration this one replaces, if any.
    previous: Option<&'a Config>,
    /// `[security] rate_limits`, which a tenant's own override.
    global_rate: RateLimits,
}

/// A `[[providers]]` entry that checked: its plan, its base config resolved, and its limits.
struct Provided {
    plan: Arc<ServicePlan>,
    /// The plugin (registry name) serving it, for tenants pinned to another version.
    plugin: String,
    base: Value,
    limits: Limits,
    /// The config schema, compiled once for every tenant; `None` when the base config or
    /// the schema itself was invalid (reported once, at the provider, not per tenant).
    config_schema: Option<jsonschema::Validator>,
}

impl<'a> Checker<'a> {
    /// An error at `span`; without one (`0..0`, a check of a whole setting rather than of a
    /// parsed value) at the setting the message starts with (`audit.batch: ...`), when the
    /// file writes it.
    fn at(&mut self, span: Range<usize>, message: impl Into<String>) {
        let message = message.into();
        let span = match message.split_once(": ") {
            Some((key, _))
                if span == (0..0)
                    && key.contains('.')
                    && key
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.') =>
            {
                self.src.span_of(key)
            }
            _ => span,
        };
        let e = self.src.error_at(span, message);
        self.errors.push(e);
    }

    /// An error about `tenant`, written with [`TENANT`] where the tenant's name goes.
    fn tenant_at(&mut self, span: Range<usize>, tenant: &str, template: String) {
        self.per_tenant
            .entry(template)
            .or_default()
            .push((span, tenant.to_owned()));
    }

    /// Every error, in file order; each per-tenant mistake once, naming how many more
    /// tenants repeat it.
    fn finish(mut self) -> Vec<ConfigError> {
        for (template, mut places) in std::mem::take(&mut self.per_tenant) {
            places.sort_by_key(|(span, _)| span.start);
            let (span, first) = places[0].clone();
            let mut message = template.replace(TENANT, &format!("'{first}'"));
            if places.len() > 1 {
                let others: Vec<&str> = places[1..].iter().map(|(_, t)| t.as_str()).collect();
                let shown = others.len().min(3);
                let mut list = others[..shown].join(", ");
                if others.len() > shown {
                    list.push_str(&format!(", …{} more", others.len() - shown));
                }
                message.push_str(&format!(
                    " (the same in {} more tenant{}: {list})",
                    others.len(),
                    if others.len() == 1 { "" } else { "s" }
                ));
            }
            self.at(span, message);
        }
        // The configuration file's errors first, then each definition file's, each in order.
        let main = self.src.name.to_owned();
        self.errors.sort_by(|a, b| {
            (a.file != main, &a.file, a.line, a.column).cmp(&(
                b.file != main,
                &b.file,
                b.line,
                b.column,
            ))
        });
        self.errors
    }

    fn resolve(&mut self, span: Range<usize>, text: &str) -> String {
        let mut v = toml::Value::String(text.to_owned());
        match resolve_value(&mut v, self.env) {
            Ok(()) => v.as_str().unwrap_or_default().to_owned(),
            Err(e) => {
                self.at(span, e);
                String::new()
            }
        }
    }

    fn check(&mut self, raw: RawConfig, builtins: &Registry) -> Config {
        self.server(&raw.server);
        let storage = self.storage(raw.storage);
        let mut plugins = raw.plugins;
        for dir in &mut plugins.dirs {
            *dir = self.base_dir.join(&*dir);
        }
        if plugins.native_threads == 0 || plugins.native_threads_per_provider == 0 {
            self.at(
                0..0,
                "plugins.native_threads and plugins.native_threads_per_provider: must be at least 1",
            );
        }
        if plugins.wasm_instances == 0 || plugins.wasm_instances_per_tenant == 0 {
            self.at(
                0..0,
                "plugins.wasm_instances and plugins.wasm_instances_per_tenant: must be at least 1",
            );
        }
        if plugins.wasm_memory < (1 << 20) {
            self.at(0..0, "plugins.wasm_memory: must be at least 1MiB");
        }
        plugins.cache_dir = self.base_dir.join(&plugins.cache_dir);
        self.wasm_memory = plugins.wasm_memory;
        let fresh = NativePool::new(
            plugins.native_threads.max(1),
            plugins.native_threads_per_provider.max(1),
        );
        // One pool while its settings hold: its bounds are global only if every factory shares it.
        let pool = match self.previous {
            Some(p) if p.native_pool.settings() == fresh.settings() => p.native_pool.clone(),
            _ => fresh,
        };
        // Fuel metering costs every wasm instruction, so the engine meters only when a limit asks.
        let fuel = raw
            .providers
            .iter()
            .any(|p| p.get_ref().limits.fuel.is_some())
            || raw
                .tenants
                .values()
                .any(|t| t.get_ref().limits.fuel.is_some());
        let engines = plugins::Engines::new(&plugins, pool.clone(), fuel);
        let mut builder = builtins.to_builder();
        let previous = self.previous;
        let loaded_plugins = plugins::load(
            &plugins.dirs,
            &engines,
            &mut builder,
            previous.map(|p| &p.loaded_plugins),
        );
        let registry = builder.build();
        let registry = &registry;
        self.plugin_dirs = plugins.dirs.clone();
        self.loaded = loaded_plugins.clone();
        let mut raw_security = raw.security;
        self.global_rate = match raw_security.get_mut().rate_limits.take() {
            Some(r) => {
                let span = r.span();
                self.rates(span, "security.rate_limits", r.into_inner())
            }
            None => RateLimits::default(),
        };
        let (token, keys, permissions, admin) = self.security(raw_security);
        let declared: BTreeSet<String> = raw
            .providers
            .iter()
            .map(|p| p.get_ref().service.get_ref().clone())
            .collect();
        let mut provided = BTreeMap::new();
        for entry in raw.providers {
            let span = entry.span();
            let entry = entry.into_inner();
            let Some(p) = self.provider(span, &entry, registry) else {
                continue;
            };
            let name = p.plan.service.clone();
            if provided.contains_key(&name) {
                self.at(
                    entry.service.span(),
                    format!("service '{name}' is configured twice"),
                );
                continue;
            }
            provided.insert(name, p);
        }
        let workflows = self.workflows(raw.workflows, &raw.server, &mut provided);
        let mut tenants = BTreeMap::new();
        for (name, tenant) in raw.tenants {
            let span = name.span();
            let name = name.into_inner();
            let plan = self.tenant(
                span,
                &name,
                tenant.into_inner(),
                &provided,
                &declared,
                registry,
            );
            tenants.insert(name, plan);
        }
        if let Some(platform) = &admin.platform_tenant
            && tenants.contains_key(platform)
        {
            self.at(
                0..0,
                format!("security.platform_tenant: '{platform}' is also a configured tenant; the platform tenant administers the others and serves no providers of its own"),
            );
        }
        // A plan that did not change keeps its revision, so its instance keeps serving.
        if let Some(previous) = previous {
            for (name, plan) in &mut tenants {
                let Some(old) = previous.tenants.get(name) else {
                    continue;
                };
                // Unchanged limits keep their cells: a reload is no way around a limit.
                if old.rate.limits == plan.rate.limits {
                    plan.rate = old.rate.clone();
                }
                for (service, ts) in &mut plan.services {
                    if let Some(o) = old.services.get(service)
                        && o.same_plan(ts)
                    {
                        ts.revision = o.revision;
                    }
                }
            }
        }
        let audit = raw.audit;
        if !(1..=10_000_000).contains(&audit.buffer) {
            self.at(
                0..0,
                format!(
                    "audit.buffer: {} is out of range (1 to 10000000)",
                    audit.buffer
                ),
            );
        }
        if audit.linger > std::time::Duration::from_secs(1) {
            self.at(
                0..0,
                format!(
                    "audit.linger: {} is out of range (0 to 1s)",
                    humantime::format_duration(audit.linger)
                ),
            );
        }
        if !(1..=10_000).contains(&audit.batch) {
            self.at(
                0..0,
                format!("audit.batch: {} is out of range (1 to 10000)", audit.batch),
            );
        }
        let auth = self.auth(raw.auth, &keys, &token);
        let observability = raw.observability;
        if let Some(filter) = &observability.log_filter
            && let Err(e) = providers_observability::check_filter(filter)
        {
            self.at(
                0..0,
                format!("observability.log_filter: '{filter}' is not a valid filter: {e}"),
            );
        }
        if let Some(endpoint) = &observability.otlp_endpoint {
            match reqwest::Url::parse(endpoint) {
                Ok(url) if url.scheme() == "http" && url.host_str().is_some() => {}
                Ok(url) => self.at(
                    0..0,
                    format!(
                        "observability.otlp_endpoint: '{endpoint}' must be an http:// URL with a host (this build links no TLS; got scheme '{}')",
                        url.scheme()
                    ),
                ),
                Err(e) => self.at(
                    0..0,
                    format!("observability.otlp_endpoint: '{endpoint}' is not a URL: {e}"),
                ),
            }
        }
        if !(1..=1_000_000).contains(&observability.otlp_queue) {
            self.at(
                0..0,
                format!(
                    "observability.otlp_queue: {} is out of range (1 to 1000000)",
                    observability.otlp_queue
                ),
            );
        }
        if observability.metrics == crate::observe::MetricsAccess::Open
            && !raw.server.listen.ip().is_loopback()
        {
            self.at(
                0..0,
                format!(
                    "observability.metrics: \"open\" serves /metrics without a token, which is accepted only on a loopback listener (server.listen is {}); use \"operator\"",
                    raw.server.listen
                ),
            );
        }
        let registry = registry.clone();
        Config {
            source: self.src.name.to_owned(),
            server: raw.server,
            storage,
            plugins,
            loaded_plugins,
            registry,
            warnings: std::mem::take(&mut self.warnings),
            token,
            keys,
            permissions,
            admin,
            native_pool: pool,
            services: provided
                .into_iter()
                .map(|(name, p)| (name, p.plan))
                .collect(),
            tenants,
            audit,
            auth,
            observability,
            workflows,
        }
    }

    /// `[workflows]`: its settings, and its definitions checked against the configured
    /// services and given to every service the builtin `workflows` provider serves.
    fn workflows(
        &mut self,
        raw: Option<Spanned<crate::workflows::WorkflowSettings>>,
        server: &ServerConfig,
        provided: &mut BTreeMap<String, Provided>,
    ) -> crate::workflows::WorkflowSettings {
        let (span, mut settings) = match raw {
            Some(s) => (s.span(), s.into_inner()),
            None => (0..0, Default::default()),
        };
        let served: Vec<String> = provided
            .iter()
            .filter(|(_, p)| {
                p.plugin == "workflows" && p.plan.factory.kind() == providers_core::Kind::Builtin
            })
            .map(|(name, _)| name.clone())
            .collect();
        // The settings matter only where the executor runs.
        if !served.is_empty() {
            let mut problems = Vec::new();
            crate::workflows::check_settings(
                &settings,
                server.request_timeout,
                |span, message| problems.push((span, message)),
                span.clone(),
            );
            for (span, message) in problems {
                self.at(span, message);
            }
        }
        let definitions = match &mut settings.definitions {
            Some(dir) => {
                *dir = self.base_dir.join(&*dir);
                let actions: BTreeMap<String, Vec<String>> = provided
                    .iter()
                    .map(|(name, p)| {
                        let d = p.plan.factory.descriptor();
                        (
                            name.clone(),
                            d.actions.iter().map(|a| a.name.clone()).collect(),
                        )
                    })
                    .collect();
                let loaded = crate::workflows::load_definitions(dir, &actions);
                self.errors.extend(loaded.errors);
                loaded.definitions
            }
            None => Vec::new(),
        };
        if served.is_empty() && settings.definitions.is_some() {
            self.warnings.push(format!(
                "{}: [workflows] definitions are set, but no [[providers]] entry serves the builtin `workflows`",
                self.src.name
            ));
        }
        let definitions: Value = serde_json::to_value(&definitions).unwrap_or_default();
        for name in served {
            if let Some(p) = provided.get_mut(&name)
                && let Value::Object(base) = &mut p.base
            {
                if base.contains_key("definitions") {
                    self.at(
                        span.clone(),
                        format!("service '{name}' config: `definitions` comes from [workflows] definitions, not from the provider's config"),
                    );
                }
                base.insert("definitions".into(), definitions.clone());
            }
        }
        settings
    }

    /// `[auth]`: rates and costs in range, and a key this host can sign with when it is on.
    fn auth(
        &mut self,
        auth: crate::auth::AuthSettings,
        keys: &[KeyMaterial],
        token: &TokenSettings,
    ) -> crate::auth::AuthSettings {
        for (name, rate) in [
            ("auth.client_rate", auth.client_rate),
            ("auth.overall_rate", auth.overall_rate),
        ] {
            if let Some(problem) = rate.problem() {
                self.at(0..0, format!("{name}: {problem}"));
            }
        }
        if let Err(e) = providers_security::SecretHasher::new(auth.argon2) {
            self.at(0..0, e.to_string());
        }
        let secs = |d: std::time::Duration| d.as_secs();
        if !(1..=86_400).contains(&secs(auth.access_ttl)) {
            self.at(
                0..0,
                format!(
                    "auth.access_ttl: {}s is out of range (1s to 24h)",
                    secs(auth.access_ttl)
                ),
            );
        }
        if auth.refresh_ttl < auth.access_ttl || secs(auth.refresh_ttl) > 90 * 86_400 {
            self.at(
                0..0,
                format!(
                    "auth.refresh_ttl: {}s is out of range (access_ttl to 90 days)",
                    secs(auth.refresh_ttl)
                ),
            );
        }
        if !(1..=1024).contains(&auth.max_hashing) {
            self.at(
                0..0,
                format!(
                    "auth.max_hashing: {} is out of range (1 to 1024)",
                    auth.max_hashing
                ),
            );
        }
        if auth.enabled && !keys.is_empty() && TokenIssuer::new(keys, token.clone()).is_err() {
            self.at(0..0, "auth.enabled: the token service signs with the host's key, and no [[security.keys]] entry can sign (an HS256 secret, or an RS256 key with private_key_file)");
        }
        auth
    }

    /// `limits` with its out-of-range values reported at `span` and dropped.
    fn rates(&mut self, span: Range<usize>, at: &str, limits: RateLimits) -> RateLimits {
        let mut checked = limits;
        for (which, rate) in [
            ("tenant", &mut checked.tenant),
            ("client", &mut checked.client),
        ] {
            if let Some(problem) = rate.as_ref().and_then(|r| r.problem()) {
                self.at(span.clone(), format!("{at}.{which}: {problem}"));
                *rate = None;
            }
        }
        checked
    }

    fn server(&mut self, server: &ServerConfig) {
        if server.max_connections == 0 {
            self.at(0..0, "server.max_connections: must be at least 1");
        }
        if !(8..=1000).contains(&server.max_headers) {
            self.at(
                0..0,
                format!(
                    "server.max_headers: {} is out of range (8 to 1000)",
                    server.max_headers
                ),
            );
        }
        if !(8192..=1024 * 1024).contains(&server.max_header_bytes) {
            self.at(
                0..0,
                format!(
                    "server.max_header_bytes: {} is out of range (8192 to 1048576)",
                    server.max_header_bytes
                ),
            );
        }
        if let Some(cors) = &server.cors {
            if cors.allowed_origins.is_empty() {
                self.at(
                    0..0,
                    "server.cors.allowed_origins: list the origins, or leave [server.cors] out to keep cross-origin requests off",
                );
            }
            for origin in &cors.allowed_origins {
                let plain = origin == "*"
                    || ((origin.starts_with("https://") || origin.starts_with("http://"))
                        && !origin.ends_with('/')
                        && axum::http::HeaderValue::from_str(origin).is_ok());
                if !plain {
                    self.at(
                        0..0,
                        format!("server.cors.allowed_origins: '{origin}' is not an origin like https://erp.example.com (scheme and host, no path) or \"*\""),
                    );
                }
            }
            for header in &cors.allowed_headers {
                if axum::http::HeaderName::from_bytes(header.as_bytes()).is_err() {
                    self.at(
                        0..0,
                        format!("server.cors.allowed_headers: '{header}' is not a header name"),
                    );
                }
            }
        }
        if server.connect_backoff > server.connect_backoff_max {
            self.at(
                0..0,
                "server.connect_backoff: must not exceed server.connect_backoff_max",
            );
        }
    }

    fn storage(&mut self, raw: RawStorage) -> StorageConfig {
        let storage = StorageConfig {
            url: self.resolve(raw.url.span(), raw.url.get_ref()),
            max_connections: *raw.max_connections.get_ref(),
            builtin_max_connections: *raw.builtin_max_connections.get_ref(),
            events_retention: raw.events_retention,
            events_max_rows: raw.events_max_rows,
        };
        let storage = StorageConfig {
            url: relative_sqlite(&storage.url, self.base_dir),
            ..storage
        };
        if !(storage.url.starts_with("sqlite:")
            || storage.url.starts_with("postgres://")
            || storage.url.starts_with("postgresql://"))
        {
            self.at(
                raw.url.span(),
                "storage.url: expected 'sqlite://path' or 'postgres://...'",
            );
        }
        for (value, name) in [
            (&raw.max_connections, "max_connections"),
            (&raw.builtin_max_connections, "builtin_max_connections"),
        ] {
            if *value.get_ref() == 0 {
                self.at(value.span(), format!("storage.{name}: must be at least 1"));
            }
        }
        if storage.events_max_rows == 0 {
            self.at(0..0, "storage.events_max_rows: must be at least 1");
        }
        storage
    }

    fn security(
        &mut self,
        raw: Spanned<RawSecurity>,
    ) -> (TokenSettings, Vec<KeyMaterial>, Permissions, AdminSettings) {
        let span = raw.span();
        let security = raw.into_inner();
        let leeway = *security.leeway_seconds.get_ref();
        if leeway > providers_security::MAX_LEEWAY_SECONDS {
            self.at(
                security.leeway_seconds.span(),
                format!(
                    "security.leeway_seconds: {leeway} is out of range (at most {})",
                    providers_security::MAX_LEEWAY_SECONDS
                ),
            );
        }
        let max_token_bytes = *security.max_token_bytes.get_ref();
        if !(256..=1024 * 1024).contains(&max_token_bytes) {
            self.at(
                security.max_token_bytes.span(),
                format!(
                    "security.max_token_bytes: {max_token_bytes} is out of range (256 to 1048576)"
                ),
            );
        }
        let token = TokenSettings {
            issuer: security.issuer,
            audience: security.audience,
            leeway_seconds: leeway.min(providers_security::MAX_LEEWAY_SECONDS),
            max_token_bytes,
        };
        let mut keys = Vec::new();
        if security.keys.is_empty() {
            self.at(
                span.clone(),
                "security: at least one [[security.keys]] entry is needed to verify tokens",
            );
        }
        for key in security.keys {
            let span = key.span();
            if let Some(k) = self.key(span.clone(), key.into_inner()) {
                // Each key on its own, so an unusable one is reported where it is written.
                let settings = TokenSettings {
                    issuer: String::new(),
                    audience: String::new(),
                    leeway_seconds: 0,
                    max_token_bytes: providers_security::DEFAULT_MAX_TOKEN_BYTES,
                };
                match providers_security::TokenVerifier::new(std::slice::from_ref(&k), settings) {
                    Ok(_) => keys.push(k),
                    Err(e) => self.at(span, format!("security.keys: {e}")),
                }
            }
        }
        for (role, grants) in &security.roles {
            if grants.iter().any(|g| g.is_empty()) {
                self.at(
                    span.clone(),
                    format!("security.roles.{role}: empty permission"),
                );
            }
        }
        let mut admin = AdminSettings::default();
        if let Some(role) = &security.admin_role {
            if role.get_ref().is_empty() {
                self.at(role.span(), "security.admin_role: must not be empty");
            } else if !security.roles.contains_key(role.get_ref()) {
                self.at(
                    role.span(),
                    format!(
                        "security.admin_role: '{}' is not a role in [security.roles]",
                        role.get_ref()
                    ),
                );
            }
            admin.role = Some(role.get_ref().clone());
        }
        if let Some(platform) = &security.platform_tenant {
            if !is_valid_name(platform.get_ref()) {
                self.at(
                    platform.span(),
                    format!(
                        "security.platform_tenant: invalid tenant name '{}'",
                        platform.get_ref()
                    ),
                );
            }
            if admin.role.is_none() {
                self.at(
                    platform.span(),
                    "security.platform_tenant: needs security.admin_role (platform operators are that role's holders in this tenant)",
                );
            }
            admin.platform_tenant = Some(platform.get_ref().clone());
        }
        (token, keys, Permissions::new(security.roles), admin)
    }

    fn tenant(
        &mut self,
        span: Range<usize>,
        name: &str,
        tenant: RawTenant,
        provided: &BTreeMap<String, Provided>,
        declared: &BTreeSet<String>,
        registry: &Registry,
    ) -> TenantPlan {
        let own_rate = match &tenant.rate_limits {
            Some(r) => self.rates(
                r.span(),
                &format!("tenants.{name}.rate_limits"),
                *r.get_ref(),
            ),
            None => RateLimits::default(),
        };
        let rate = Arc::new(TenantRate::new(own_rate.over(self.global_rate)));
        if !is_valid_name(name) {
            self.at(span.clone(), format!("tenant '{name}': invalid name (expected 1-64 of a-z, 0-9, '_', '-', starting with a letter)"));
        }
        if let Some(memory) = tenant.limits.memory
            && memory > self.wasm_memory
        {
            self.tenant_at(
                span.clone(),
                name,
                format!(
                    "tenant {TENANT}: limits.memory ({memory} bytes) exceeds plugins.wasm_memory ({} bytes), the size of an instance slot",
                    self.wasm_memory
                ),
            );
        }
        if tenant.limits.max_concurrency == Some(0) {
            self.tenant_at(
                span.clone(),
                name,
                format!("tenant {TENANT}: limits.max_concurrency must be at least 1"),
            );
        }
        let mut enabled = BTreeMap::new();
        for service in &tenant.services {
            let s = service.get_ref();
            let Some(p) = provided.get(s) else {
                // A configured service that failed its own checks was reported already.
                if !declared.contains(s.as_str()) {
                    self.tenant_at(service.span(), name, format!("tenant {TENANT} enables service '{s}', which no [[providers]] entry configures"));
                }
                continue;
            };
            let mut config = p.base.clone();
            let overrides = tenant.providers.iter().find(|(k, _)| k.get_ref() == s);
            if let Some((_, overrides)) = overrides {
                let mut o = toml::Value::Table(overrides.get_ref().clone());
                if let Err(e) = resolve_value(&mut o, self.env) {
                    self.at(overrides.span(), e);
                }
                merge(&mut config, to_json(o));
            }
            let pin = tenant.versions.iter().find(|(k, _)| k.get_ref() == s);
            let (plan, pinned_schema) = match pin {
                Some((_, req)) => match self.pinned_plan(name, s, p, req, registry) {
                    Some(found) => found,
                    None => continue,
                },
                None => (p.plan.clone(), None),
            };
            // An invalid base config was reported at the provider; once is enough.
            if let Some(schema) = pinned_schema.as_ref().or(p.config_schema.as_ref()) {
                let place = overrides.map_or(span.clone(), |(_, o)| o.span());
                if let Some(problem) = config_problem(schema, &config) {
                    self.tenant_at(
                        place,
                        name,
                        format!("tenant {TENANT}, service '{s}' config{problem}"),
                    );
                }
            }
            // A zero was reported where it is written (the provider or the tenant limits).
            let mut limits = p.limits.tighter(tenant.limits);
            if limits.max_concurrency == Some(0) {
                limits.max_concurrency = Some(1);
            }
            enabled.insert(
                s.clone(),
                TenantService {
                    service: plan,
                    config,
                    limits,
                    revision: next_revision(),
                },
            );
        }
        for (service, req) in &tenant.versions {
            if !tenant
                .services
                .iter()
                .any(|s| s.get_ref() == service.get_ref())
            {
                self.tenant_at(req.span(), name, format!("tenant {TENANT} pins a version of '{}', which it does not enable (add it to services)", service.get_ref()));
            }
        }
        for (service, overrides) in &tenant.providers {
            if !tenant
                .services
                .iter()
                .any(|s| s.get_ref() == service.get_ref())
            {
                self.tenant_at(overrides.span(), name, format!("tenant {TENANT} overrides the config of '{}', which it does not enable (add it to services)", service.get_ref()));
            }
        }
        TenantPlan {
            services: enabled,
            rate,
        }
    }

    fn provider(
        &mut self,
        span: Range<usize>,
        entry: &RawProvider,
        registry: &Registry,
    ) -> Option<Provided> {
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
        let mut store = toml::Value::Table(entry.store.get_ref().clone());
        if let Err(e) = resolve_value(&mut store, self.env) {
            self.at(entry.store.span(), e);
        }
        let store = to_json(store);
        let place = if entry.version.span() == (0..0) {
            plugin.span()
        } else {
            entry.version.span()
        };
        let factory = match registry.resolve(plugin.get_ref(), &requirement) {
            Ok(f) => f,
            Err(e) => {
                // A plugin that was refused, or that is absent from the configured plugin
                // folders, leaves its service unavailable; any other mismatch (a version no
                // loaded provider has, a name nothing could offer) is a mistake in this file.
                let plugin_problem = self.loaded.refusals_of(plugin.get_ref()).next().is_some()
                    || (matches!(e, providers_core::RegistryError::UnknownService { .. })
                        && !self.plugin_dirs.is_empty());
                let reason = self.why_missing(plugin.get_ref(), e);
                if !plugin_problem {
                    self.at(place, reason);
                    return None;
                }
                if entry.required {
                    self.at(place, format!("service '{service}' is required: {reason}"));
                    return None;
                }
                let warning = self.src.error_at(
                    place.clone(),
                    format!("warning: service '{service}' is unavailable, its calls answer 503: {reason}"),
                );
                self.warnings.push(warning.to_string());
                let version = registry
                    .resolve(plugin.get_ref(), &VersionReq::STAR)
                    .map(|f| f.descriptor().version.clone())
                    .unwrap_or_else(|_| providers_core::semver::Version::new(0, 0, 0));
                let factory: Arc<dyn Factory> =
                    Arc::new(Unavailable::new(service, version, reason.clone()));
                return Some(Provided {
                    plan: Arc::new(ServicePlan {
                        service: service.clone(),
                        factory,
                        required: false,
                        validators: HashMap::new(),
                        masks: HashMap::new(),
                        unavailable: Some(reason),
                        store,
                        allowed_hosts: Arc::from(Vec::new()),
                        calls: Default::default(),
                    }),
                    plugin: plugin.get_ref().clone(),
                    base: Value::Object(Default::default()),
                    limits: entry.limits,
                    config_schema: None,
                });
            }
        };
        self.check_store(service, &entry.store, &store, factory.kind(), registry);
        let allowed_hosts = self.allowed_hosts(service, &entry.allowed_hosts, factory.kind());
        self.check_sandbox(span.clone(), service, &entry.limits, factory.kind());
        let plan = self.plan(
            span.clone(),
            service,
            factory.clone(),
            entry.required,
            (store, allowed_hosts),
        )?;
        let d = factory.descriptor();
        if entry.limits.max_concurrency == Some(0) {
            self.at(
                span.clone(),
                format!("service '{service}': limits.max_concurrency must be at least 1"),
            );
        }
        let mut base = toml::Value::Table(entry.config.get_ref().clone());
        let resolved = resolve_value(&mut base, self.env).is_ok();
        let base = to_json(base);
        let config_schema = match jsonschema::validator_for(&d.config_schema) {
            Ok(schema) => match config_problem(&schema, &base) {
                Some(problem) => {
                    self.at(
                        entry.config.span(),
                        format!("service '{service}' config{problem}"),
                    );
                    None
                }
                None => resolved.then_some(schema),
            },
            Err(e) => {
                self.at(
                    entry.config.span(),
                    format!(
                        "service '{service}' config: the provider's config schema is invalid: {e}"
                    ),
                );
                None
            }
        };
        Some(Provided {
            plan,
            plugin: plugin.get_ref().clone(),
            base,
            limits: entry.limits,
            config_schema,
        })
    }

    fn key(&mut self, span: Range<usize>, key: RawKey) -> Option<KeyMaterial> {
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

/// What is wrong with `config` under `schema`, as the tail of a message (" at '/x': …"),
/// or `None` when it fits.
fn config_problem(schema: &jsonschema::Validator, config: &Value) -> Option<String> {
    schema.validate(config).err().map(|e| {
        let path = e.instance_path().as_str();
        let at = if path.is_empty() { "/" } else { path };
        format!(" at '{at}': {e}")
    })
}

fn to_json(value: toml::Value) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}
