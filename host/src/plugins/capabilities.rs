//! What the host lends every plugin, whatever its engine: a log into the host's `tracing`,
//! a key-value store scoped to its `(tenant, service)`, and outbound HTTP limited to the
//! provider's `allowed_hosts`. Plain async Rust; the native and wasm adapters translate
//! their calls into these. (Calling another provider is the call context's own scoped
//! caller.)

use std::sync::Arc;

use providers_core::{
    CallContext, ConnectContext, ErrorCode, Expect, Http, HttpRequest, HttpResponse, Level, Log,
    Logger, Provider, ProviderError, Resources, Store, StoreEntry, StorePage,
};
use providers_database::Kv;
use serde_json::{Value, json};

/// A plugin's store: the builtin `kv` provider connected for the plugin's tenant and
/// service, so it has kv's ETags, limits and quotas on the same tables, and no way to name
/// another tenant or service.
pub struct PluginStore {
    kv: Kv,
    ctx: CallContext,
}

impl PluginStore {
    /// Connects the store of `tenant`'s `service` with kv `config` (the provider's `store` table).
    pub async fn connect(
        resources: &Resources,
        tenant: &str,
        service: &str,
        config: Value,
    ) -> Result<Self, ProviderError> {
        let mut kv = Kv::default();
        let ctx = ConnectContext::new(tenant, config)
            .with_service(service)
            .with_resources(resources.clone());
        kv.connect(&ctx).await?;
        Ok(Self {
            kv,
            ctx: CallContext::new(tenant, "plugin-store"),
        })
    }

    async fn run(&self, action: &str, payload: Value) -> Result<Value, ProviderError> {
        self.kv.execute(action, payload, &self.ctx).await
    }
}

/// Every operation goes to kv's own code; reads and writes through its text API, so values
/// are parsed or serialised at most once on their way.
#[providers_core::async_trait]
impl Store for PluginStore {
    async fn get(&self, key: &str) -> Result<Option<StoreEntry>, ProviderError> {
        let Some((value, etag)) = self.kv.get_text(key).await? else {
            return Ok(None);
        };
        let value = serde_json::from_str(&value).map_err(|e| {
            ProviderError::internal(format!("stored value of '{key}' is not JSON: {e}"))
        })?;
        Ok(Some(StoreEntry { value, etag }))
    }

    async fn set(&self, key: &str, value: Value, expect: Expect) -> Result<String, ProviderError> {
        self.set_text(key, value.to_string(), expect).await
    }

    async fn get_text(&self, key: &str) -> Result<Option<(String, String)>, ProviderError> {
        self.kv.get_text(key).await
    }

    async fn set_text(
        &self,
        key: &str,
        value: String,
        expect: Expect,
    ) -> Result<String, ProviderError> {
        let (etag, if_absent) = match expect {
            Expect::Any => (None, false),
            Expect::Etag(etag) => (Some(etag), false),
            Expect::Absent => (None, true),
        };
        self.kv.set_text(key, value, etag, if_absent).await
    }

    async fn delete(&self, key: &str, etag: Option<&str>) -> Result<bool, ProviderError> {
        let payload = match etag {
            Some(etag) => json!({"key": key, "etag": etag}),
            None => json!({"key": key}),
        };
        Ok(self.run("delete", payload).await?["deleted"] == true)
    }

    async fn list(
        &self,
        prefix: &str,
        after: &str,
        limit: u32,
    ) -> Result<StorePage, ProviderError> {
        let limit = limit.clamp(1, 1000);
        let out = self
            .run(
                "list",
                json!({"prefix": prefix, "after": after, "limit": limit}),
            )
            .await?;
        StorePage::from_json(out)
    }
}

/// A plugin's log: lines land in the host's log under target `plugin`, with the provider
/// and tenant the host knows, never ones the plugin claims.
struct PluginLog {
    service: String,
    tenant: String,
}

impl Log for PluginLog {
    fn log(&self, level: Level, request_id: &str, message: &str) {
        let (service, tenant) = (self.service.as_str(), self.tenant.as_str());
        // `?` escapes the text: a plugin cannot forge log lines with newlines either.
        match level {
            Level::Debug => {
                tracing::debug!(target: "plugin", service, tenant, request_id, message = ?message)
            }
            Level::Info => {
                tracing::info!(target: "plugin", service, tenant, request_id, message = ?message)
            }
            Level::Warn => {
                tracing::warn!(target: "plugin", service, tenant, request_id, message = ?message)
            }
            _ => tracing::error!(target: "plugin", service, tenant, request_id, message = ?message),
        }
    }
}

/// The log of `tenant`'s instance of `service`.
pub fn logger(service: &str, tenant: &str) -> Logger {
    Logger::new(Arc::new(PluginLog {
        service: service.to_owned(),
        tenant: tenant.to_owned(),
    }))
}

/// One `allowed_hosts` entry: a host name or IP literal, and a port if it names one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHost {
    /// As a URL writes it: lowercase, IPv6 in brackets.
    host: String,
    port: Option<u16>,
}

impl AllowedHost {
    /// Parses `name`, `name:port`, `[v6]` or `[v6]:port`; `None` for anything else (schemes,
    /// paths, wildcards).
    pub fn parse(entry: &str) -> Option<Self> {
        let entry = entry.trim().to_ascii_lowercase();
        let (host, port) = if entry.starts_with('[') {
            let end = entry.find(']')?;
            let (host, rest) = entry.split_at(end + 1);
            match rest {
                "" => (host.to_owned(), None),
                _ => (host.to_owned(), Some(rest.strip_prefix(':')?)),
            }
        } else {
            match entry.split_once(':') {
                Some((host, port)) => (host.to_owned(), Some(port)),
                None => (entry.clone(), None),
            }
        };
        let name = host.trim_start_matches('[').trim_end_matches(']');
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'))
            && (host.starts_with('[') || !name.contains(':'));
        let port = match port {
            None => None,
            Some(p) => Some(p.parse::<u16>().ok().filter(|&p| p > 0)?),
        };
        valid.then_some(Self { host, port })
    }

    fn admits(&self, host: &str, port: u16) -> bool {
        self.host == host && self.port.is_none_or(|p| p == port)
    }
}

/// Outbound HTTP for one provider: refuses every host its `allowed_hosts` does not list,
/// follows no redirect (one could lead anywhere), bounds the request by the call's deadline
/// and the response by `max_body`. Plain `http://` only: this build links no TLS.
pub struct HostHttp {
    allowed: Vec<AllowedHost>,
    client: reqwest::Client,
    max_body: u64,
    service: String,
}

impl HostHttp {
    /// Outbound HTTP for `service`, to `allowed` only.
    pub fn new(service: &str, allowed: &[String], max_body: u64) -> Self {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Self {
            allowed: allowed
                .iter()
                .filter_map(|h| AllowedHost::parse(h))
                .collect(),
            client,
            max_body,
            service: service.to_owned(),
        }
    }
}

#[providers_core::async_trait]
impl Http for HostHttp {
    async fn send(&self, request: HttpRequest) -> Result<HttpResponse, ProviderError> {
        let url = reqwest::Url::parse(&request.url).map_err(|e| {
            ProviderError::validation(format!("invalid URL '{}': {e}", request.url))
        })?;
        if url.scheme() != "http" {
            return Err(ProviderError::validation(format!(
                "outbound HTTP supports http:// URLs only, not '{}'",
                url.scheme()
            )));
        }
        let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
        let port = url.port_or_known_default().unwrap_or(80);
        if !self.allowed.iter().any(|a| a.admits(&host, port)) {
            return Err(ProviderError::new(
                ErrorCode::Forbidden,
                format!(
                    "outbound HTTP to {host}:{port} is not allowed: it is not in the allowed_hosts of '{}'",
                    self.service
                ),
            ));
        }
        let method = reqwest::Method::from_bytes(request.method.as_bytes()).map_err(|_| {
            ProviderError::validation(format!("invalid HTTP method '{}'", request.method))
        })?;
        let mut builder = self.client.request(method, url).body(request.body);
        // When traces are exported the host owns the trace context: the downstream service
        // becomes a child of this provider call, whatever the plugin wrote.
        let trace = providers_observability::trace_headers(&tracing::Span::current());
        for (name, value) in &request.headers {
            let trace_header =
                name.eq_ignore_ascii_case("traceparent") || name.eq_ignore_ascii_case("tracestate");
            if !(trace.is_some() && trace_header) {
                builder = builder.header(name.as_str(), value.as_str());
            }
        }
        if let Some((parent, state)) = trace {
            builder = builder.header("traceparent", parent);
            if let Some(state) = state {
                builder = builder.header("tracestate", state);
            }
        }
        if let Some(deadline) = request.deadline {
            builder =
                builder.timeout(deadline.saturating_duration_since(std::time::Instant::now()));
        }
        let failed = |e: reqwest::Error| {
            let code = if e.is_timeout() {
                ErrorCode::Timeout
            } else {
                ErrorCode::ProviderUnavailable
            };
            ProviderError::new(code, format!("outbound HTTP to {host}:{port} failed: {e}"))
        };
        let mut response = builder.send().await.map_err(failed)?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(failed)? {
            if body.len() as u64 + chunk.len() as u64 > self.max_body {
                return Err(ProviderError::new(
                    ErrorCode::ProviderError,
                    format!(
                        "the response from {host}:{port} is larger than plugins.http_max_response_bytes ({} bytes)",
                        self.max_body
                    ),
                ));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(HttpResponse {
            status,
            headers,
            body,
        })
    }
}
