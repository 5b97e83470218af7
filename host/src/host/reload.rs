//! Live reconfiguration: validate a whole configuration, then apply only its difference.
//!
//! Changed tenant services get their new instance connected before the swap (when one was
//! connected), so no call waits for it and none fails; the old instance finishes its calls
//! and is then disconnected. What cannot change without a restart (storage, the listener)
//! is kept as it runs and named in the report.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use providers_core::{ProviderError, Registry};
use providers_security::TokenVerifier;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{ALL_TENANTS, Controls, Generation, Host};
use crate::config::{self, Config, ConfigError, TenantService};

/// How `${env:NAME}` references resolve.
pub type Env = dyn Fn(&str) -> Option<String> + Send + Sync;

/// Where a host's configuration comes from, and what checking it needs.
pub struct ConfigSource {
    /// Builtin providers (the registry plugins are added to).
    pub registry: Registry,
    /// The file, or text with the folder its relative paths resolve against.
    pub origin: Origin,
    /// How `${env:NAME}` references resolve.
    pub env: Box<Env>,
    /// `serve --listen`: replaces `server.listen` of every load, so a reload does not see the
    /// file's address as a change.
    pub listen: Option<std::net::SocketAddr>,
}

/// The configuration's text: a file read again at every reload, or fixed text (the embedded demo).
pub enum Origin {
    /// A file.
    File(PathBuf),
    /// Text named `name`, relative paths against `base`.
    Text {
        /// The text.
        text: String,
        /// Its name in messages.
        name: String,
        /// The folder relative paths resolve against.
        base: PathBuf,
    },
}

impl ConfigSource {
    fn base(&self) -> PathBuf {
        match &self.origin {
            Origin::File(path) => path.parent().map(PathBuf::from).unwrap_or_default(),
            Origin::Text { base, .. } => base.clone(),
        }
    }

    /// The source's current text and its name in messages.
    pub fn read(&self) -> Result<(String, String), Vec<ConfigError>> {
        match &self.origin {
            Origin::File(path) => config::read_file(path),
            Origin::Text { text, name, .. } => Ok((text.clone(), name.clone())),
        }
    }

    /// What reading the secret store takes (storage and keys), from the current text.
    pub fn secret_store(&self) -> Result<crate::secrets::StoreAccess, Vec<ConfigError>> {
        let (text, name) = self.read()?;
        crate::secrets::access(&text, &name, &self.base(), &*self.env)
    }

    /// Checks the source's current text, with its `${secret:…}` references read from the
    /// secret store first.
    pub fn load(&self, previous: Option<&Config>) -> Result<Config, Vec<ConfigError>> {
        let (text, name) = self.read()?;
        self.check_named(&text, &text, &name, previous)
    }

    fn overridden(&self, mut config: Config) -> Config {
        if let Some(listen) = self.listen {
            config.server.listen = listen;
        }
        config
    }

    /// Checks `text` as if it were the source's (relative paths against the same folder).
    /// Its secrets come from the running source's store, whatever `text` names.
    pub fn check(&self, text: &str, previous: Option<&Config>) -> Result<Config, Vec<ConfigError>> {
        let (current, _) = self.read()?;
        self.check_named(text, &current, "<request body>", previous)
    }

    fn check_named(
        &self,
        text: &str,
        store_text: &str,
        name: &str,
        previous: Option<&Config>,
    ) -> Result<Config, Vec<ConfigError>> {
        let base = self.base();
        let secrets = crate::secrets::for_config(text, store_text, name, &base, &*self.env)?;
        let lookup = |n: &str| match (n.strip_prefix("secret:"), &secrets) {
            (Some(secret), Some(found)) => found.get(secret).map(|v| v.expose().to_owned()),
            (Some(_), None) => None,
            (None, _) => (self.env)(n),
        };
        config::load_with(text, name, &base, &self.registry, &lookup, previous)
            .map(|c| self.overridden(c))
            .map_err(|errors| match &secrets {
                // A message may quote a value (a schema error on a resolved field): show the
                // reference instead, never the secret.
                Some(found) => errors
                    .into_iter()
                    .map(|mut e| {
                        for (name, value) in found {
                            if !value.expose().is_empty() {
                                e.message = e
                                    .message
                                    .replace(value.expose(), &format!("${{secret:{name}}}"));
                            }
                        }
                        e
                    })
                    .collect(),
                None => errors,
            })
    }
}

/// What a reload did.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    /// The generation now serving.
    pub generation: u64,
    /// Each change applied, in words ("tenant 'initech' added", "acme/pricing: config changed").
    pub changes: Vec<String>,
    /// Settings that changed in the file but apply only after a restart; they keep running as before.
    pub restart_required: Vec<String>,
    /// Instances that could not connect under their new plan (their calls answer 503 until one does).
    pub connect_failures: Vec<String>,
    /// The configuration's own warnings (unavailable services).
    pub warnings: Vec<String>,
}

/// Whether a slot made for `revision` still matches `generation`'s plan of `tenant`'s `service`.
/// A newer revision is kept: it is a reload's new instance, connected before its generation is.
pub(super) fn keeps(generation: &Generation, tenant: &str, service: &str, revision: u64) -> bool {
    generation
        .config
        .tenants
        .get(tenant)
        .and_then(|plan| plan.services.get(service))
        .is_some_and(|ts| revision >= ts.revision)
        && !generation.controls.disabled(tenant, service)
}

/// A digest of what the token verifier is built from: equal digests keep the verifier (and its cache).
pub(super) fn keys_fingerprint(config: &Config) -> [u8; 32] {
    let mut h = Sha256::new();
    let t = &config.token;
    for part in [t.issuer.as_bytes(), t.audience.as_bytes()] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.update(t.leeway_seconds.to_le_bytes());
    h.update((t.max_token_bytes as u64).to_le_bytes());
    for k in &config.keys {
        let kid = k.kid.as_deref().unwrap_or("");
        let alg = format!("{:?}", k.algorithm);
        for part in [
            kid.as_bytes(),
            alg.as_bytes(),
            &k.verify,
            k.sign.as_deref().unwrap_or(&[]),
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
    }
    h.finalize().into()
}

/// Settings that a running host cannot change: `(name, old, new)` for each that differs.
fn restart_only(old: &Config, new: &Config) -> Vec<String> {
    let (o, n) = (&old.server, &new.server);
    let mut out = Vec::new();
    let mut differ = |name: &str, a: String, b: String| {
        if a != b {
            out.push(format!("{name} ({a} → {b})"));
        }
    };
    differ("server.listen", o.listen.to_string(), n.listen.to_string());
    differ(
        "server.max_connections",
        o.max_connections.to_string(),
        n.max_connections.to_string(),
    );
    differ(
        "audit",
        format!("{:?}", old.audit),
        format!("{:?}", new.audit),
    );
    differ("auth", format!("{:?}", old.auth), format!("{:?}", new.auth));
    differ(
        "observability.log_format",
        format!("{:?}", old.observability.log_format),
        format!("{:?}", new.observability.log_format),
    );
    differ(
        "observability.log_filter",
        format!("{:?}", old.observability.log_filter),
        format!("{:?}", new.observability.log_filter),
    );
    differ(
        "observability.otlp",
        format!("{:?}", old.observability.otlp()),
        format!("{:?}", new.observability.otlp()),
    );
    differ(
        "server.max_headers",
        o.max_headers.to_string(),
        n.max_headers.to_string(),
    );
    differ(
        "server.max_header_bytes",
        o.max_header_bytes.to_string(),
        n.max_header_bytes.to_string(),
    );
    differ(
        "server.cors",
        format!("{:?}", o.cors.as_ref().map(|c| &c.allowed_origins)),
        format!("{:?}", n.cors.as_ref().map(|c| &c.allowed_origins)),
    );
    for (name, a, b) in [
        (
            "server.header_read_timeout",
            o.header_read_timeout,
            n.header_read_timeout,
        ),
        (
            "server.keepalive_timeout",
            o.keepalive_timeout,
            n.keepalive_timeout,
        ),
        ("server.write_timeout", o.write_timeout, n.write_timeout),
    ] {
        differ(
            name,
            humantime::format_duration(a).to_string(),
            humantime::format_duration(b).to_string(),
        );
    }
    let (o, n) = (&old.storage, &new.storage);
    differ(
        "storage.url",
        crate::storage::redact(&o.url),
        crate::storage::redact(&n.url),
    );
    differ(
        "storage.max_connections",
        o.max_connections.to_string(),
        n.max_connections.to_string(),
    );
    differ(
        "storage.builtin_max_connections",
        o.builtin_max_connections.to_string(),
        n.builtin_max_connections.to_string(),
    );
    out
}

/// Puts back what only a restart changes, so the running configuration says what runs.
fn keep_restart_only(old: &Config, new: &mut Config) {
    new.server.listen = old.server.listen;
    new.server.max_connections = old.server.max_connections;
    new.server.max_headers = old.server.max_headers;
    new.audit = old.audit.clone();
    new.auth = old.auth.clone();
    new.observability.log_format = old.observability.log_format;
    new.observability.log_filter = old.observability.log_filter.clone();
    new.server.max_header_bytes = old.server.max_header_bytes;
    new.server.cors = old.server.cors.clone();
    new.server.header_read_timeout = old.server.header_read_timeout;
    new.server.keepalive_timeout = old.server.keepalive_timeout;
    new.server.write_timeout = old.server.write_timeout;
    new.storage.url = old.storage.url.clone();
    new.storage.max_connections = old.storage.max_connections;
    new.storage.builtin_max_connections = old.storage.builtin_max_connections;
}

/// The difference in words.
fn changes(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for s in new.services.keys() {
        if !old.services.contains_key(s) {
            out.push(format!("service '{s}' added"));
        }
    }
    for s in old.services.keys() {
        if !new.services.contains_key(s) {
            out.push(format!("service '{s}' removed"));
        }
    }
    for (name, plan) in &new.tenants {
        let Some(was) = old.tenants.get(name) else {
            out.push(format!("tenant '{name}' added"));
            continue;
        };
        for (service, ts) in &plan.services {
            match was.services.get(service) {
                None => out.push(format!("{name}/{service}: enabled")),
                Some(o) if o.revision != ts.revision => {
                    let mut what = Vec::new();
                    let (ov, nv) = (
                        &o.service.factory.descriptor().version,
                        &ts.service.factory.descriptor().version,
                    );
                    if ov != nv {
                        what.push(format!("version {ov} → {nv}"));
                    } else if !Arc::ptr_eq(&o.service.factory, &ts.service.factory) {
                        what.push("plugin file replaced".to_owned());
                    }
                    if o.config != ts.config {
                        what.push("config changed".to_owned());
                    }
                    if o.limits != ts.limits {
                        what.push("limits changed".to_owned());
                    }
                    if what.is_empty() {
                        what.push("plan changed".to_owned());
                    }
                    out.push(format!("{name}/{service}: {}", what.join(", ")));
                }
                Some(_) => {}
            }
        }
        for service in was.services.keys() {
            if !plan.services.contains_key(service) {
                out.push(format!("{name}/{service}: removed"));
            }
        }
    }
    for name in old.tenants.keys() {
        if !new.tenants.contains_key(name) {
            out.push(format!("tenant '{name}' removed"));
        }
    }
    out
}

/// Why a reload did not happen.
#[derive(Debug)]
pub enum ReloadError {
    /// This host was started from a value and has nothing to read again.
    NoSource,
    /// The new configuration is invalid; the running one stays.
    Invalid(Vec<ConfigError>),
    /// Anything else (the verifier could not be built, the host is shutting down).
    Failed(String),
}

impl std::fmt::Display for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReloadError::NoSource => {
                f.write_str("this host was started without a configuration source to reload")
            }
            ReloadError::Invalid(errors) => write!(
                f,
                "the new configuration has {} error(s); the running one stays in force",
                errors.len()
            ),
            ReloadError::Failed(why) => f.write_str(why),
        }
    }
}

impl Host {
    /// Checks `text` as a whole configuration without applying anything: its errors, or a
    /// summary `(services, tenants, warnings)`. Plugins are loaded to be checked (and kept
    /// for a reload when unchanged), but nothing connects.
    pub async fn validate(
        &self,
        text: String,
    ) -> Result<Result<(usize, usize, Vec<String>), Vec<ConfigError>>, ReloadError> {
        let source = self.source.clone().ok_or(ReloadError::NoSource)?;
        let previous = self.config();
        let checked = tokio::task::spawn_blocking(move || source.check(&text, Some(&previous)))
            .await
            .map_err(|e| ReloadError::Failed(format!("checking failed: {e}")))?;
        Ok(checked.map(|c| (c.services.len(), c.tenants.len(), c.warnings.clone())))
    }

    /// Runs `work` on a task of its own: a change, once begun, is carried through (or fails)
    /// whole even if the request that asked for it goes away — the client disconnects, or the
    /// shutdown grace ends its connection — rather than being dropped halfway.
    async fn detached<T, F>(&self, work: impl FnOnce(Arc<Host>) -> F) -> Result<T, String>
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let host = self
            .me
            .upgrade()
            .ok_or_else(|| "the host is shutting down".to_owned())?;
        tokio::spawn(work(host))
            .await
            .map_err(|e| format!("the change failed: {e}"))
    }

    /// Reads the configuration's source again and applies it (see [`Host::apply`]).
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        self.detached(|host| async move { host.reload_here().await })
            .await
            .map_err(ReloadError::Failed)?
    }

    async fn reload_here(&self) -> Result<ReloadReport, ReloadError> {
        let source = self.source.clone().ok_or(ReloadError::NoSource)?;
        let _one = self.changing.lock().await;
        let previous = self.config();
        let loaded = tokio::task::spawn_blocking(move || source.load(Some(&previous)))
            .await
            .map_err(|e| ReloadError::Failed(format!("checking failed: {e}")))?;
        match loaded {
            Ok(config) => self.apply_locked(config).await,
            Err(errors) => {
                for e in &errors {
                    tracing::warn!("reload refused: {e}");
                }
                Err(ReloadError::Invalid(errors))
            }
        }
    }

    /// Applies a checked configuration: only what differs from the running one changes.
    pub async fn apply(&self, config: Config) -> Result<ReloadReport, ReloadError> {
        self.detached(|host| async move {
            let _one = host.changing.lock().await;
            host.apply_locked(config).await
        })
        .await
        .map_err(ReloadError::Failed)?
    }

    async fn apply_locked(&self, mut config: Config) -> Result<ReloadReport, ReloadError> {
        if self.instances.closing() {
            return Err(ReloadError::Failed("the host is shutting down".into()));
        }
        let old = self.generation();
        let restart_required = restart_only(&old.config, &config);
        keep_restart_only(&old.config, &mut config);
        let changes = changes(&old.config, &config);
        let keys = keys_fingerprint(&config);
        // The same keys keep the verifier, and with it the verified-token cache.
        let (verifier, issuer) = if keys == old.keys {
            (old.verifier.clone(), old.issuer.clone())
        } else {
            (
                Arc::new(
                    TokenVerifier::new(&config.keys, config.token.clone())
                        .map_err(|e| ReloadError::Failed(format!("security.keys: {e}")))?,
                ),
                super::issuer_of(&config),
            )
        };
        let controls = match self.storage.controls().await {
            Ok(rows) => Arc::new(Controls::from_rows(rows)),
            Err(e) => {
                tracing::warn!(error = %e, "could not read the service controls; keeping those in force");
                old.controls.clone()
            }
        };
        let config = Arc::new(config);
        // Changed plans whose instance is connected get their new one first, all at once.
        let mut replacing = Vec::new();
        for (tenant, plan) in &config.tenants {
            for (service, ts) in &plan.services {
                let unchanged = old
                    .config
                    .tenants
                    .get(tenant)
                    .and_then(|p| p.services.get(service))
                    .is_some_and(|o| o.revision == ts.revision);
                if !unchanged && !controls.disabled(tenant, service) {
                    replacing.push((tenant, service, ts));
                }
            }
        }
        let results = futures_util::future::join_all(replacing.iter().map(
            |(tenant, service, ts)| async move {
                let r = self.instances.replace(tenant, service, ts, true).await;
                (tenant, service, r)
            },
        ))
        .await;
        let connect_failures: Vec<String> = results
            .into_iter()
            .filter_map(|(t, s, r)| r.err().map(|e| format!("{t}/{s}: {}", e.detail)))
            .collect();
        let number = self.generations.fetch_add(1, Ordering::AcqRel) + 1;
        let generation = Arc::new(Generation {
            number,
            openapi: Arc::new(crate::http::openapi::document(&config)),
            config: config.clone(),
            verifier,
            issuer,
            keys,
            controls,
        });
        self.instances.set_settings(super::settings_of(&config));
        self.current.store(generation.clone());
        *self.readiness.lock().await = None;
        let removed = self.instances.retire_where(|tenant, service, revision| {
            keeps(&generation, tenant, service, revision)
        });
        for w in &restart_required {
            tracing::warn!(setting = %w, "changed in the configuration; applies after a restart");
        }
        tracing::info!(
            generation = number,
            changes = changes.len(),
            removed,
            "configuration reloaded"
        );
        Ok(ReloadReport {
            generation: number,
            changes,
            restart_required,
            connect_failures,
            warnings: config.warnings.clone(),
        })
    }

    /// Sets or clears a control (`paused`, `disabled`) of `tenant`'s `service` in the system
    /// database and puts it in force. `tenant` may be [`ALL_TENANTS`] for a pause. Returns
    /// whether anything changed.
    pub async fn set_control(
        &self,
        tenant: &str,
        service: &str,
        control: &'static str,
        on: bool,
        by: &str,
    ) -> Result<bool, ProviderError> {
        let (tenant, service, by) = (tenant.to_owned(), service.to_owned(), by.to_owned());
        self.detached(move |host| async move {
            host.set_control_here(&tenant, &service, control, on, &by)
                .await
        })
        .await
        .map_err(ProviderError::unavailable)?
    }

    async fn set_control_here(
        &self,
        tenant: &str,
        service: &str,
        control: &str,
        on: bool,
        by: &str,
    ) -> Result<bool, ProviderError> {
        let _one = self.changing.lock().await;
        let changed = self
            .storage
            .set_control(tenant, service, control, on, by)
            .await
            .map_err(|e| ProviderError::unavailable(format!("storage: {e}")))?;
        let rows = self
            .storage
            .controls()
            .await
            .map_err(|e| ProviderError::unavailable(format!("storage: {e}")))?;
        let old = self.generation();
        let generation = Arc::new(Generation {
            number: old.number,
            config: old.config.clone(),
            verifier: old.verifier.clone(),
            issuer: old.issuer.clone(),
            keys: old.keys,
            openapi: old.openapi.clone(),
            controls: Arc::new(Controls::from_rows(rows)),
        });
        self.current.store(generation.clone());
        if control == "disabled" && on {
            self.instances
                .retire_where(|t, s, rev| keeps(&generation, t, s, rev));
        }
        let scope = if tenant == ALL_TENANTS {
            "every tenant"
        } else {
            tenant
        };
        tracing::info!(
            tenant = scope,
            service,
            control,
            on,
            by,
            "service control changed"
        );
        Ok(changed)
    }

    /// Restarts `service`'s instance of `tenant`, or of every tenant with one connected: each
    /// new instance connects before it takes over. Returns the tenants restarted and the
    /// failures (whose old instance keeps serving).
    pub async fn restart(
        &self,
        service: &str,
        tenant: Option<&str>,
    ) -> (Vec<String>, Vec<(String, String)>) {
        let (service, tenant) = (service.to_owned(), tenant.map(str::to_owned));
        self.detached(
            move |host| async move { host.restart_here(&service, tenant.as_deref()).await },
        )
        .await
        .unwrap_or_else(|e| (Vec::new(), vec![(String::new(), e)]))
    }

    async fn restart_here(
        &self,
        service: &str,
        tenant: Option<&str>,
    ) -> (Vec<String>, Vec<(String, String)>) {
        let generation = self.generation();
        let plans: Vec<(String, &TenantService)> = generation
            .config
            .tenants
            .iter()
            .filter(|(t, _)| tenant.is_none_or(|only| only == t.as_str()))
            .filter_map(|(t, plan)| plan.services.get(service).map(|ts| (t.clone(), ts)))
            .collect();
        self.instances.restart(service, plans).await
    }
}
