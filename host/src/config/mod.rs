//! The host's TOML configuration: its shape, and loading it with errors that point at file, line and column.

mod check;
pub(crate) mod source;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

pub use check::{
    AdminSettings, Config, ServicePlan, TenantPlan, TenantService, load, load_file, load_str,
    load_with,
};
pub(crate) use check::{read_file, relative_sqlite};
pub use unavailable::Unavailable;

mod unavailable;
pub use source::ConfigError;

/// The configuration the host runs when none is given.
pub const DEMO: &str = include_str!("demo.toml");

/// The file as written, before checking against the registry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub storage: RawStorage,
    #[serde(default)]
    pub plugins: PluginsConfig,
    pub security: Spanned<RawSecurity>,
    #[serde(default)]
    pub providers: Vec<Spanned<RawProvider>>,
    #[serde(default)]
    pub tenants: BTreeMap<Spanned<String>, Spanned<RawTenant>>,
    #[serde(default)]
    pub audit: crate::audit::AuditSettings,
    #[serde(default)]
    pub auth: crate::auth::AuthSettings,
    #[serde(default)]
    pub observability: crate::observe::ObservabilitySettings,
    #[serde(default)]
    pub workflows: Option<Spanned<crate::workflows::WorkflowSettings>>,
    /// Read before the rest (see [`crate::secrets`]); here so the file is checked whole.
    #[serde(default)]
    #[allow(
        dead_code,
        reason = "read by crate::secrets::access before the typed parse"
    )]
    pub secrets: crate::secrets::SecretsSettings,
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Largest request body accepted, in bytes.
    pub body_limit_bytes: usize,
    /// Deadline of one call, unless a provider's limits set a shorter one.
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    /// An instance unused this long is disconnected and dropped.
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// How long shutdown waits for in-flight calls before cancelling them.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    /// From a request's first byte to the end of its header; a slower client is cut off.
    #[serde(with = "duration")]
    pub header_read_timeout: Duration,
    /// Reading a request body; the call's own deadline applies too, whichever is sooner.
    #[serde(with = "duration")]
    pub body_read_timeout: Duration,
    /// A kept-alive connection with no request in flight is closed after this.
    #[serde(with = "duration")]
    pub keepalive_timeout: Duration,
    /// A response the client does not read for this long closes its connection.
    #[serde(with = "duration")]
    pub write_timeout: Duration,
    /// Connections open at once; more clients wait in the listen backlog.
    pub max_connections: usize,
    /// Wait after a failed connect before the next attempt; doubles per failure.
    #[serde(with = "duration")]
    pub connect_backoff: Duration,
    /// The longest wait between connect attempts.
    #[serde(with = "duration")]
    pub connect_backoff_max: Duration,
    /// How long a readiness answer is reused, so a storm of probes costs one check.
    #[serde(with = "duration")]
    pub ready_cache: Duration,
    /// Bound on one readiness check, all its probes together.
    #[serde(with = "duration")]
    pub ready_timeout: Duration,
    /// At shutdown, `/ready` answers 503 for this long while requests are still served, so
    /// a load balancer stops sending before the listener closes. None by default.
    #[serde(default, with = "opt_duration")]
    pub shutdown_delay: Option<Duration>,
    /// Reload the configuration when its file changes (checked every second). Off by default.
    pub watch_config: bool,
    /// Most header fields in a request (431 beyond).
    pub max_headers: usize,
    /// Largest request line plus header section, in bytes (431 beyond; at least 8192).
    pub max_header_bytes: usize,
    /// `Strict-Transport-Security: max-age=…` on every response, for deployments behind TLS.
    /// None by default.
    #[serde(default, with = "opt_duration")]
    pub hsts_max_age: Option<Duration>,
    /// Cross-origin requests from browsers; off unless origins are listed.
    pub cors: Option<CorsConfig>,
}

/// `[server.cors]`: which browser origins may call the API.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Exact origins (`https://erp.example.com`), or `["*"]` for any.
    pub allowed_origins: Vec<String>,
    /// Request headers a page may send.
    #[serde(default = "cors_headers")]
    pub allowed_headers: Vec<String>,
    /// How long a browser may cache a preflight answer.
    #[serde(default = "cors_max_age", with = "duration")]
    pub max_age: Duration,
}

fn cors_headers() -> Vec<String> {
    ["authorization", "content-type", "x-request-id"]
        .map(String::from)
        .to_vec()
}

fn cors_max_age() -> Duration {
    Duration::from_secs(600)
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            body_limit_bytes: 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(600),
            shutdown_grace: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            connect_backoff: Duration::from_secs(1),
            connect_backoff_max: Duration::from_secs(300),
            ready_cache: Duration::from_secs(1),
            ready_timeout: Duration::from_secs(2),
            shutdown_delay: None,
            watch_config: false,
            max_headers: 100,
            max_header_bytes: 64 * 1024,
            hsts_max_age: None,
            cors: None,
        }
    }
}

/// `[plugins]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// Folders searched for `NAME.plugin.toml` manifests; relative paths resolve against
    /// the config file's folder (the working directory for the embedded demo).
    pub dirs: Vec<PathBuf>,
    /// Threads native plugin calls may occupy at once, across all native providers.
    pub native_threads: usize,
    /// Threads one native provider version may occupy at once: a plugin whose calls hang
    /// holds at most this many, and the rest of the host keeps serving.
    pub native_threads_per_provider: usize,
    /// The most linear memory any one wasm instance may have: the size of a slot in the
    /// instance pool. A provider's or tenant's `limits.memory` can only be lower.
    #[serde(with = "bytes")]
    pub wasm_memory: u64,
    /// Wasm instances that may exist at once across every tenant and provider (the pooling
    /// allocator's slots, reserved as address space at start, touched only when used).
    pub wasm_instances: u32,
    /// Instances one tenant's wasm provider may run at once: its calls run in parallel up
    /// to this many, then queue.
    pub wasm_instances_per_tenant: u32,
    /// Where compiled components are cached (keyed by component hash, wasmtime version and
    /// engine settings); relative to the config file's folder. A restart does not recompile.
    pub cache_dir: PathBuf,
    /// The largest response body a plugin's outbound HTTP request may read.
    #[serde(with = "bytes")]
    pub http_max_response_bytes: u64,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        Self {
            dirs: Vec::new(),
            native_threads: 64,
            native_threads_per_provider: 16,
            wasm_memory: 64 << 20,
            wasm_instances: 1000,
            wasm_instances_per_tenant: 4,
            cache_dir: PathBuf::from("data/plugin-cache"),
            http_max_response_bytes: 4 << 20,
        }
    }
}

/// `[storage]` as written, with places for messages.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawStorage {
    pub url: Spanned<String>,
    pub max_connections: Spanned<u32>,
    pub builtin_max_connections: Spanned<u32>,
    #[serde(with = "duration")]
    pub events_retention: Duration,
    pub events_max_rows: u64,
}

impl Default for RawStorage {
    fn default() -> Self {
        let d = StorageConfig::default();
        Self {
            url: Spanned::new(0..0, d.url),
            max_connections: Spanned::new(0..0, d.max_connections),
            builtin_max_connections: Spanned::new(0..0, d.builtin_max_connections),
            events_retention: d.events_retention,
            events_max_rows: d.events_max_rows,
        }
    }
}

/// `[storage]`.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// `sqlite://path` or `postgres://...`; may hold `${env:NAME}` references.
    pub url: String,
    /// Size of the host's own pool (instance events, readiness).
    pub max_connections: u32,
    /// Size of the pool builtin providers (`kv`) share, on the same database: their
    /// traffic cannot take the connections the host needs for its own tables.
    pub builtin_max_connections: u32,
    /// Instance events older than this are deleted.
    pub events_retention: Duration,
    /// At most this many instance events are kept, newest first.
    pub events_max_rows: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://data/host.db".into(),
            max_connections: 8,
            builtin_max_connections: 8,
            events_retention: Duration::from_secs(30 * 24 * 3600),
            events_max_rows: 100_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSecurity {
    pub issuer: String,
    pub audience: String,
    #[serde(default = "default_leeway")]
    pub leeway_seconds: Spanned<u64>,
    #[serde(default = "default_max_token_bytes")]
    pub max_token_bytes: Spanned<usize>,
    #[serde(default)]
    pub keys: Vec<Spanned<RawKey>>,
    #[serde(default)]
    pub roles: BTreeMap<String, Vec<String>>,
    /// The role that makes a token's holder an administrator of its own tenant.
    #[serde(default)]
    pub admin_role: Option<Spanned<String>>,
    /// The tenant whose administrators are platform operators (every tenant, the config).
    #[serde(default)]
    pub platform_tenant: Option<Spanned<String>>,
    /// Requests per second per tenant and per client; a tenant may set its own.
    #[serde(default)]
    pub rate_limits: Option<Spanned<crate::rate::RateLimits>>,
}

fn default_leeway() -> Spanned<u64> {
    Spanned::new(0..0, 30)
}

fn default_max_token_bytes() -> Spanned<usize> {
    Spanned::new(0..0, providers_security::DEFAULT_MAX_TOKEN_BYTES)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawKey {
    pub kid: Option<String>,
    pub algorithm: Spanned<String>,
    pub secret: Option<Spanned<String>>,
    pub secret_file: Option<PathBuf>,
    pub public_key_file: Option<PathBuf>,
    pub private_key_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProvider {
    pub service: Spanned<String>,
    pub plugin: Option<Spanned<String>>,
    #[serde(default = "any_version")]
    pub version: Spanned<String>,
    #[serde(default = "empty_table")]
    pub config: Spanned<toml::Table>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub required: bool,
    /// kv config of a plugin's own store (`max_keys`, `max_total_bytes`, ...).
    #[serde(default = "empty_table")]
    pub store: Spanned<toml::Table>,
    /// Hosts (`name` or `name:port`) a plugin's outbound HTTP may reach; none by default.
    #[serde(default)]
    pub allowed_hosts: Vec<Spanned<String>>,
}

fn empty_table() -> Spanned<toml::Table> {
    Spanned::new(0..0, toml::Table::new())
}

fn any_version() -> Spanned<String> {
    Spanned::new(0..0, "*".into())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTenant {
    #[serde(default)]
    pub services: Vec<Spanned<String>>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub providers: BTreeMap<Spanned<String>, Spanned<toml::Table>>,
    /// Per service, a version requirement that pins this tenant to another loaded version.
    #[serde(default)]
    pub versions: BTreeMap<Spanned<String>, Spanned<String>>,
    /// This tenant's own rate limits, each replacing the global one it names.
    #[serde(default)]
    pub rate_limits: Option<Spanned<crate::rate::RateLimits>>,
}

/// Per-provider or per-tenant limits; the tighter of the two applies.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Deadline of one call.
    #[serde(default, with = "opt_duration")]
    pub timeout: Option<Duration>,
    /// Calls in flight at once on one instance; more are refused with `RATE_LIMITED`.
    pub max_concurrency: Option<u32>,
    /// Linear memory of one wasm instance (`"64MiB"`); wasm components only.
    #[serde(default, with = "opt_bytes")]
    pub memory: Option<u64>,
    /// Fuel one wasm call may burn (about one unit per instruction); wasm components only.
    pub fuel: Option<u64>,
}

impl Limits {
    /// The tighter of `self` and `other`, field by field.
    pub fn tighter(self, other: Limits) -> Limits {
        fn min<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        }
        Limits {
            timeout: min(self.timeout, other.timeout),
            max_concurrency: min(self.max_concurrency, other.max_concurrency),
            memory: min(self.memory, other.memory),
            fuel: min(self.fuel, other.fuel),
        }
    }
}

pub(crate) mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        let value = humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration '{text}': {e} (e.g. \"30s\", \"10m\")"
            ))
        })?;
        // Zero would fail every call; beyond a year, deadlines stop meaning anything.
        if value.is_zero() || value > Duration::from_secs(365 * 24 * 3600) {
            return Err(serde::de::Error::custom(format!(
                "duration '{text}' is out of range (more than 0, at most 365 days)"
            )));
        }
        Ok(value)
    }
}

/// A byte size: an integer, or a string with a unit (`"512KiB"`, `"64MiB"`, `"1GiB"`, `"64MB"`).
mod bytes {
    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Number(u64),
        Text(String),
    }

    pub fn parse(text: &str) -> Result<u64, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        let scale: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            other => {
                return Err(format!(
                    "invalid size '{text}': unknown unit '{other}' (use B, KiB, MiB, GiB, KB, MB or GB)"
                ));
            }
        };
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("invalid size '{text}' (e.g. \"64MiB\")"))?;
        n.checked_mul(scale)
            .filter(|&b| b > 0)
            .ok_or_else(|| format!("size '{text}' is out of range (more than 0)"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match Written::deserialize(d)? {
            Written::Number(0) => Err(serde::de::Error::custom("a size must be more than 0")),
            Written::Number(n) => Ok(n),
            Written::Text(t) => parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

mod opt_bytes {
    use serde::Deserializer;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        super::bytes::deserialize(d).map(Some)
    }
}

mod opt_duration {
    use std::time::Duration;

    use serde::Deserializer;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::duration::deserialize(d).map(Some)
    }
}
