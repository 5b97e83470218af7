//! `{name}`: a native provider for the ERP Provider Layer.
//!
//! Build: `cargo build --release`; stage `target/release/lib{lib}.so` beside a
//! `{name}.plugin.toml` manifest (see docs/native-plugins.md) in one of the host's
//! `[plugins] dirs`, then enable it with `[[providers]] service = "{name}"`.

use providers_core::semver::Version;
use providers_core::{Action, CallContext, ConnectContext, Descriptor, Provider, ProviderError, async_trait};
use serde_json::{Value, json};

providers_core::export_native_provider!({type_name}::default());

/// The provider; one instance serves one tenant.
#[derive(Default)]
pub struct {type_name} {
    store: Option<std::sync::Arc<dyn providers_core::Store>>,
}

#[async_trait]
impl Provider for {type_name} {
    fn descriptor(&self) -> Descriptor {
        Descriptor::new("{name}", Version::new(0, 1, 0))
            .description("What {name} does, in one line.")
            .action(
                Action::new("remember")
                    .permission("{name}.write")
                    .input(json!({"type": "object", "properties": {"key": {"type": "string", "minLength": 1}, "value": {}}, "required": ["key", "value"], "additionalProperties": false})),
            )
            .action(
                Action::new("recall")
                    .permission("{name}.read")
                    .idempotent()
                    .input(json!({"type": "object", "properties": {"key": {"type": "string", "minLength": 1}}, "required": ["key"], "additionalProperties": false})),
            )
    }

    async fn connect(&mut self, ctx: &ConnectContext) -> Result<(), ProviderError> {
        // The host lends every plugin a store scoped to its tenant and service.
        self.store = ctx.store().cloned();
        ctx.log().info("connected");
        Ok(())
    }

    async fn execute(&self, action: &str, payload: Value, _ctx: &CallContext) -> Result<Value, ProviderError> {
        let store = self.store.as_ref().ok_or_else(|| ProviderError::unavailable("not connected"))?;
        let key = payload["key"].as_str().unwrap_or_default();
        match action {
            "remember" => {
                let etag = store.set(key, payload["value"].clone(), providers_core::Expect::Any).await?;
                Ok(json!({"key": key, "etag": etag}))
            }
            "recall" => match store.get(key).await? {
                Some(entry) => Ok(json!({"key": key, "value": entry.value})),
                None => Err(ProviderError::not_found(format!("no key '{key}'"))),
            },
            other => Err(ProviderError::not_found(format!("{name} has no action '{other}'"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn remembers_and_recalls() {
        let mut host = providers_core::testing::TestHost::new({type_name}::default()).await.unwrap();
        host.call("remember", json!({"key": "a", "value": 1})).await.unwrap();
        assert_eq!(host.call("recall", json!({"key": "a"})).await.unwrap()["value"], 1);
        host.disconnect().await.unwrap();
    }
}
