//! What the host lends every plugin, whatever its engine: a log into the host's `tracing`
//! and a key-value store scoped to its `(tenant, service)`. Plain async Rust; the native and
//! wasm adapters translate their calls into these. (The third capability, calling another
//! provider, is the call context's own scoped caller.)

use std::sync::Arc;

use providers_core::{
    CallContext, ConnectContext, Expect, Level, Log, Logger, Provider, ProviderError, Resources,
    Store, StoreEntry, StorePage,
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
