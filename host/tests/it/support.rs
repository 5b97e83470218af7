//! A host in a test: a probe provider with counters, a config on a fresh database, and request helpers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use provider_host::config::{self, Config};
use provider_host::{Host, http};
use providers_core::{
    Action, CallContext, ConnectContext, Descriptor, ErrorCode, FnFactory, Provider, ProviderError,
    Registry, async_trait,
};
use providers_security::TokenIssuer;
use serde_json::{Value, json};
use tower::ServiceExt;

pub const SECRET: &str = "test-secret-test-secret-test-secret!";

/// What the probe saw, shared between the test and every probe instance.
#[derive(Default)]
pub struct Counters {
    pub connects: AtomicUsize,
    pub disconnects: AtomicUsize,
    /// Ordered log of lifecycle moments, e.g. "connect acme", "done sleep", "disconnect acme".
    pub log: Mutex<Vec<String>>,
    /// The context of the last `keep` call, kept past the call's end.
    pub kept: Mutex<Option<CallContext>>,
    /// `sleep` calls that have started, and `get_status` calls: signals for tests to wait on
    /// instead of sleeping themselves.
    pub sleeping: AtomicUsize,
    pub probing: AtomicUsize,
    /// `flaky` calls by idempotency key ("-" without one), and the order keys were applied in.
    pub keys: Mutex<std::collections::HashMap<String, u64>>,
    pub applied: Mutex<Vec<String>>,
}

impl Counters {
    /// Waits (within 5 s) until `counter` reaches `n`.
    pub async fn reach(&self, counter: impl Fn(&Self) -> &AtomicUsize, n: usize) {
        assert!(
            eventually(Duration::from_secs(5), || counter(self)
                .load(Ordering::SeqCst)
                >= n)
            .await,
            "the probe never got there"
        );
    }
}

impl Counters {
    pub fn log(&self, line: impl Into<String>) {
        self.log.lock().unwrap().push(line.into());
    }
    pub fn lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

/// A provider whose actions exercise the host: echo, sleep, panic, fail, nested call.
pub struct Probe {
    counters: Arc<Counters>,
    tenant: Option<String>,
    on_disconnect: Option<String>,
    status_delay: Duration,
}

#[async_trait]
impl Provider for Probe {
    fn descriptor(&self) -> Descriptor {
        let any = json!({"type": "object"});
        Descriptor::new("probe", providers_core::semver::Version::new(1, 4, 2))
            .description("Test provider")
            .config_schema(json!({"type": "object", "properties": {"fail_connect": {"type": "boolean"}, "label": {"type": "string"}, "connect_delay_ms": {"type": "integer"}, "on_disconnect": {"enum": ["panic", "hang"]}, "status_delay_ms": {"type": "integer"}}, "additionalProperties": false}))
            .action(Action::new("echo").permission("probe.use").idempotent().input(json!({
                "type": "object",
                "properties": {
                    "quantity": {"type": "number"},
                    "lines": {"type": "array", "items": {"type": "object", "properties": {"sku": {"type": "string"}}, "required": ["sku"]}}
                },
                "additionalProperties": true
            })))
            .action(Action::new("sleep").permission("probe.use").input(json!({"type": "object", "properties": {"ms": {"type": "integer"}}, "required": ["ms"]})))
            .action(Action::new("panic").permission("probe.use").input(any.clone()))
            .action(Action::new("fail").permission("probe.use").input(any.clone()))
            .action(Action::new("flaky").permission("probe.use").input(any.clone()))
            .action(Action::new("call").permission("probe.use").input(any.clone()))
            .action(Action::new("keep").permission("probe.use").input(any.clone()))
            .action(Action::new("big").permission("probe.use").input(any.clone()))
            .action(Action::new("secret").permission("probe.secret").input(any.clone()))
            .action(Action::new("account").permission("probe.use").input(any).output(json!({
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "bank": {"type": "object", "x-sensitive": "probe.finance"},
                    "lines": {"type": "array", "items": {"type": "object", "properties": {
                        "sku": {"type": "string"},
                        "cost": {"type": "string", "x-sensitive": "probe.cost"}
                    }}}
                }
            })))
    }

    async fn connect(&mut self, ctx: &ConnectContext) -> Result<(), ProviderError> {
        self.counters.connects.fetch_add(1, Ordering::SeqCst);
        // Long enough that concurrent first calls really overlap.
        let delay = ctx.config()["connect_delay_ms"].as_u64().unwrap_or(50);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        if ctx.config()["fail_connect"] == json!(true) {
            return Err(ProviderError::unavailable("probe was told to fail"));
        }
        self.counters.log(format!(
            "connect {} {}",
            ctx.tenant(),
            ctx.config()["label"].as_str().unwrap_or("")
        ));
        self.tenant = Some(ctx.tenant().to_owned());
        self.on_disconnect = ctx.config()["on_disconnect"].as_str().map(str::to_owned);
        self.status_delay =
            Duration::from_millis(ctx.config()["status_delay_ms"].as_u64().unwrap_or(0));
        Ok(())
    }

    async fn disconnect(&self) -> Result<(), ProviderError> {
        self.counters.disconnects.fetch_add(1, Ordering::SeqCst);
        self.counters.log(format!(
            "disconnect {}",
            self.tenant.as_deref().unwrap_or("?")
        ));
        match self.on_disconnect.as_deref() {
            Some("panic") => panic!("probe panics in disconnect"),
            Some("hang") => std::future::pending().await,
            _ => Ok(()),
        }
    }

    async fn get_status(&self) -> providers_core::Status {
        self.counters.probing.fetch_add(1, Ordering::SeqCst);
        if !self.status_delay.is_zero() {
            tokio::time::sleep(self.status_delay).await;
            self.counters.log("status done");
        }
        providers_core::Status::ready()
    }

    async fn execute(
        &self,
        action: &str,
        payload: Value,
        ctx: &CallContext,
    ) -> Result<Value, ProviderError> {
        match action {
            "echo" => Ok(
                json!({"payload": payload, "tenant": ctx.tenant(), "subject": ctx.subject(), "request_id": ctx.request_id()}),
            ),
            "sleep" => {
                // Logs "cancelled sleep N" if the host drops the call before it finishes.
                struct Watch<'a>(&'a Counters, u64, bool);
                impl Drop for Watch<'_> {
                    fn drop(&mut self) {
                        if !self.2 {
                            self.0.log(format!("cancelled sleep {}", self.1));
                        }
                    }
                }
                let ms = payload["ms"].as_u64().unwrap_or(0);
                self.counters.sleeping.fetch_add(1, Ordering::SeqCst);
                let mut watch = Watch(&self.counters, ms, false);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                watch.2 = true;
                self.counters.log(format!("done sleep {ms}"));
                Ok(json!({"slept_ms": ms}))
            }
            "panic" => panic!("probe panics on purpose"),
            "fail" => Err(ProviderError::conflict("probe reports a conflict")),
            // Fails `fail_times` times per idempotency key with `code` (PROVIDER_UNAVAILABLE
            // by default), then applies its effect once per key: a repeat answers as the first.
            "flaky" => {
                let key = ctx.idempotency_key().unwrap_or("-").to_owned();
                let calls = {
                    let mut keys = self.counters.keys.lock().unwrap();
                    let n = keys.entry(key.clone()).or_insert(0);
                    *n += 1;
                    *n
                };
                if calls <= payload["fail_times"].as_u64().unwrap_or(0) {
                    let code = match payload["code"].as_str() {
                        Some("VALIDATION_ERROR") => ErrorCode::ValidationError,
                        Some("TIMEOUT") => ErrorCode::Timeout,
                        _ => ErrorCode::ProviderUnavailable,
                    };
                    return Err(ProviderError::new(
                        code,
                        format!("flaky: call {calls} fails"),
                    ));
                }
                let mut applied = self.counters.applied.lock().unwrap();
                if !applied.contains(&key) {
                    applied.push(key.clone());
                }
                Ok(json!({"key": key, "calls": calls, "label": payload["label"]}))
            }
            "call" => {
                let (s, a) = (
                    payload["service"].as_str().unwrap_or(""),
                    payload["action"].as_str().unwrap_or(""),
                );
                if let Some(ms) = payload["delay_ms"].as_u64() {
                    self.counters.sleeping.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                ctx.call(s, a, payload["payload"].clone()).await
            }
            "keep" => {
                *self.counters.kept.lock().unwrap() = Some(ctx.clone());
                Ok(json!({"kept": true}))
            }
            "big" => Ok(json!(
                "x".repeat(payload["bytes"].as_u64().unwrap_or(0) as usize)
            )),
            "secret" => Ok(json!("classified")),
            "account" => Ok(json!({
                "name": "acme",
                "bank": {"iban": "DE02120300000000202051", "bic": "BYLADEM1001"},
                "lines": [{"sku": "BOLT", "cost": "0.12"}, {"sku": "NUT", "cost": "0.03"}]
            })),
            other => Err(ProviderError::not_found(format!("no action {other}"))),
        }
    }
}

pub fn registry(counters: &Arc<Counters>) -> Registry {
    let mut builder = Registry::builder().with_builtins().unwrap();
    let c = counters.clone();
    builder
        .add(Arc::new(FnFactory::new("tests/it/support.rs", move || {
            Box::new(Probe {
                counters: c.clone(),
                tenant: None,
                on_disconnect: None,
                status_delay: Duration::ZERO,
            }) as Box<dyn Provider>
        })))
        .unwrap();
    builder.build()
}

/// The test configuration; `extra` is appended (more tenants, overrides).
pub fn config_text(storage_url: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
body_limit_bytes = 1024
request_timeout = "3s"
idle_timeout = "1h"
shutdown_grace = "5s"
connect_backoff = "200ms"
connect_backoff_max = "400ms"
ready_cache = "200ms"

[storage]
url = "{storage_url}"

[security]
issuer = "test-issuer"
audience = "providers"
leeway_seconds = 0

[[security.keys]]
algorithm = "HS256"
secret = "${{env:TEST_JWT_SECRET}}"

[security.roles]
user = ["probe.use", "kv.*"]
reader = ["kv.read", "probe.use"]
admin = ["*"]

[[providers]]
service = "kv"
version = "^1"
required = true

[[providers]]
service = "probe"
version = "^1.4"
config = {{ label = "base" }}

[[providers]]
service = "limited"
plugin = "probe"
limits = {{ max_concurrency = 2 }}

[[providers]]
service = "quick"
plugin = "probe"
limits = {{ timeout = "300ms" }}

[tenants.acme]
services = ["kv", "probe", "limited", "quick"]

[tenants.acme.providers.probe]
label = "acme-label"

[tenants.globex]
services = ["kv"]
{extra}
"#
    )
}

/// `text` with `needle` replaced by `with`, failing loudly if the needle is not there: an edit
/// that silently does nothing would test the unedited configuration.
pub fn replace_once(text: &str, needle: &str, with: &str) -> String {
    assert_eq!(
        text.matches(needle).count(),
        1,
        "expected exactly one {needle:?} in the test configuration"
    );
    text.replacen(needle, with, 1)
}

/// Edits of the test configuration that fail loudly when their needle is missing.
pub trait Edit {
    /// [`replace_once`] as a method, for chains.
    fn edit(&self, needle: &str, with: &str) -> String;
}

impl Edit for str {
    fn edit(&self, needle: &str, with: &str) -> String {
        replace_once(self, needle, with)
    }
}

pub(crate) use providers_database::matrix;

pub fn env(name: &str) -> Option<String> {
    (name == "TEST_JWT_SECRET").then(|| SECRET.to_owned())
}

pub fn load(text: &str, registry: &Registry) -> Result<Config, Vec<config::ConfigError>> {
    config::load_str(text, "test.toml", std::path::Path::new("."), registry, &env)
}

pub struct App {
    pub host: Arc<Host>,
    pub router: axum::Router,
    pub counters: Arc<Counters>,
    pub issuer: TokenIssuer,
    pub _db: providers_database::testing::TestDatabase,
}

pub struct Resp {
    pub status: StatusCode,
    pub body: Value,
    pub headers: axum::http::HeaderMap,
}

impl App {
    pub async fn on(db: providers_database::testing::TestDatabase) -> App {
        Self::configured(db, |text| text).await
    }

    /// A host on the test config after `edit`.
    pub async fn configured(
        db: providers_database::testing::TestDatabase,
        edit: impl FnOnce(String) -> String,
    ) -> App {
        let counters = Arc::new(Counters::default());
        let registry = registry(&counters);
        let config =
            load(&edit(config_text(&db.url, "")), &registry).unwrap_or_else(|e| panic!("{e:?}"));
        let issuer = TokenIssuer::new(&config.keys, config.token.clone()).unwrap();
        let host = Host::start(config).await.unwrap();
        App {
            router: http::router(host.clone()),
            host,
            counters,
            issuer,
            _db: db,
        }
    }

    pub fn token(&self, tenant: &str, roles: &[&str]) -> String {
        let roles: Vec<String> = roles.iter().map(|r| (*r).to_owned()).collect();
        self.issuer.mint("tester", tenant, &roles, 300).unwrap()
    }

    /// A token for `subject` acting for `company` (the `company_id` claim).
    pub fn token_as(
        &self,
        tenant: &str,
        roles: &[&str],
        subject: &str,
        company: Option<&str>,
    ) -> String {
        let identity = providers_security::Identity {
            subject: subject.into(),
            tenant: tenant.into(),
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
            company_id: company.map(Into::into),
        };
        self.issuer.mint_identity(&identity, 300).unwrap()
    }

    pub async fn send(&self, request: Request<Body>) -> Resp {
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Resp {
            status,
            body,
            headers,
        }
    }

    /// POST /providers/{path} with a JSON body and a bearer token.
    pub async fn post(&self, token: Option<&str>, path: &str, body: Value) -> Resp {
        self.post_raw(token, path, body.to_string().into_bytes())
            .await
    }

    pub async fn post_raw(&self, token: Option<&str>, path: &str, body: Vec<u8>) -> Resp {
        let mut req =
            Request::post(format!("/providers/{path}")).header("content-type", "application/json");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        self.send(req.body(Body::from(body)).unwrap()).await
    }

    pub async fn get(&self, token: Option<&str>, path: &str) -> Resp {
        let mut req = Request::get(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        self.send(req.body(Body::empty()).unwrap()).await
    }
}

/// Asserts the one error shape with this status and code; returns the detail.
pub fn assert_error(r: &Resp, status: u16, code: ErrorCode) -> String {
    assert_eq!(r.status.as_u16(), status, "body: {}", r.body);
    assert_eq!(r.body["error_code"], code.as_str(), "body: {}", r.body);
    let keys: Vec<&String> = r.body.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        ["detail", "error_code", "request_id", "timestamp"],
        "exactly the error shape"
    );
    assert_eq!(
        r.body["request_id"].as_str(),
        r.headers.get("x-request-id").and_then(|v| v.to_str().ok())
    );
    r.body["detail"].as_str().unwrap().to_owned()
}

/// Polls `check` every 10 ms until it holds or `limit` passes.
pub async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    check()
}

/// Serves `app` on a loopback port; returns the address and a sender that stops it.
pub async fn serve(
    app: &App,
) -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(http::serve(app.host.clone(), listener, async move {
        let _ = stopped.await;
    }));
    (addr, stop, server)
}
