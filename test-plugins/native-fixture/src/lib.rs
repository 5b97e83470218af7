//! A native provider for the host's tests: service `fixture`, built in several variants.
//!
//! `FIXTURE_VERSION` (default 1.0.0) and `FIXTURE_CONTRACT` (default this crate's contract)
//! are read at build time, so the tests build side-by-side versions and a wrong-contract
//! library from this one crate; they build the `panic = "abort"` variant with
//! `cargo rustc -- -C panic=abort`. Its actions misbehave on purpose.

use std::sync::Mutex;
use std::time::Duration;

use providers_core::semver::Version;
use providers_core::{
    Action, CallContext, ConnectContext, Descriptor, Expect, Logger, Provider, ProviderError,
    Store, async_trait,
};
use serde_json::{Value, json};

providers_core::export_native_provider!(Fixture::default());

/// Numbers instances as they connect, so tests can tell one instance from another.
static CONNECTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Disconnects so far, across instances: tests read it through `echo`.
static DISCONNECTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A context kept past its call, to prove it can no longer call out.
static KEPT: Mutex<Option<CallContext>> = Mutex::new(None);

/// The fixture provider.
#[derive(Default)]
pub struct Fixture {
    store: Option<std::sync::Arc<dyn Store>>,
    log: Logger,
    tenant: String,
    instance: u64,
}

fn version(var: Option<&str>, default: Version) -> Version {
    var.and_then(|v| Version::parse(v).ok()).unwrap_or(default)
}

#[async_trait]
impl Provider for Fixture {
    fn descriptor(&self) -> Descriptor {
        let open = json!({"type": "object"});
        let mut d = Descriptor::new(
            "fixture",
            version(option_env!("FIXTURE_VERSION"), Version::new(1, 0, 0)),
        )
        .config_schema(json!({"type": "object"}));
        for name in [
            "ping",
            "tokio_sleep",
            "echo",
            "panic",
            "hang",
            "sleep",
            "call",
            "keep",
            "call_kept",
            "put",
            "get",
            "log",
        ] {
            d = d.action(Action::new(name).input(open.clone()));
        }
        d.contract_version(version(
            option_env!("FIXTURE_CONTRACT"),
            providers_core::contract_version(),
        ))
    }

    async fn connect(&mut self, ctx: &ConnectContext) -> Result<(), ProviderError> {
        if let Some(ms) = ctx.config()["connect_sleep_ms"].as_u64() {
            std::thread::sleep(Duration::from_millis(ms));
        }
        if ctx.config()["fail_connect"] == true {
            return Err(ProviderError::unavailable(
                "fixture told to fail its connect",
            ));
        }
        self.store = ctx.store().cloned();
        self.log = ctx.log().clone();
        self.tenant = ctx.tenant().to_owned();
        self.instance = CONNECTS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        Ok(())
    }

    async fn disconnect(&self) -> Result<(), ProviderError> {
        DISCONNECTS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    async fn execute(
        &self,
        action: &str,
        payload: Value,
        ctx: &CallContext,
    ) -> Result<Value, ProviderError> {
        let store = || {
            self.store
                .as_ref()
                .ok_or_else(|| ProviderError::unavailable("no store"))
        };
        match action {
            "echo" => Ok(json!({
                "payload": payload,
                "tenant": ctx.tenant(),
                "subject": ctx.subject(),
                "roles": ctx.roles(),
                "request_id": ctx.request_id(),
                "has_deadline": ctx.deadline().is_some(),
                "connected_for": self.tenant,
                "instance": self.instance,
                "disconnects": DISCONNECTS.load(std::sync::atomic::Ordering::SeqCst),
                "version": self.descriptor().version.to_string(),
            })),
            "ping" => Ok(payload),
            // The plugin's tokio has no reactor here (the host never lends its runtime).
            "tokio_sleep" => {
                tokio::time::sleep(Duration::from_millis(1)).await;
                Ok(json!({"slept": true}))
            }
            "panic" => panic!("fixture panicked on purpose"),
            "hang" => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
            "sleep" => {
                let ms = payload["ms"].as_u64().unwrap_or(0);
                std::thread::sleep(Duration::from_millis(ms));
                Ok(json!({"slept_ms": ms}))
            }
            "call" => {
                let service = payload["service"].as_str().unwrap_or_default();
                let action = payload["action"].as_str().unwrap_or_default();
                ctx.call(service, action, payload["payload"].clone()).await
            }
            "keep" => {
                *KEPT.lock().unwrap_or_else(|p| p.into_inner()) = Some(ctx.clone());
                Ok(json!({"kept": true}))
            }
            "call_kept" => {
                let kept = KEPT.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let kept = kept.ok_or_else(|| ProviderError::not_found("nothing kept"))?;
                kept.call("fixture", "echo", json!({})).await
            }
            "put" => {
                let key = payload["key"].as_str().unwrap_or_default();
                let expect = match payload["etag"].as_str() {
                    Some(e) => Expect::Etag(e.to_owned()),
                    None if payload["if_absent"] == true => Expect::Absent,
                    None => Expect::Any,
                };
                let etag = store()?.set(key, payload["value"].clone(), expect).await?;
                Ok(json!({"etag": etag}))
            }
            "get" => {
                let key = payload["key"].as_str().unwrap_or_default();
                match store()?.get(key).await? {
                    Some(e) => Ok(json!({"value": e.value, "etag": e.etag})),
                    None => Err(ProviderError::not_found(format!("no key '{key}'"))),
                }
            }
            "log" => {
                let message = payload["message"].as_str().unwrap_or_default();
                self.log
                    .log_for(providers_core::Level::Warn, ctx.request_id(), message);
                Ok(json!({"logged": true}))
            }
            other => Err(ProviderError::not_found(format!(
                "fixture has no action '{other}'"
            ))),
        }
    }
}
