//! `kv` for stores that pass values on without reading them (the host's plugin store):
//! values in and out as the JSON text they are stored as.

use providers_core::ProviderError;

use super::{Connected, Kv, SetReq, check_key};

impl Kv {
    fn connected(&self) -> Result<&Connected, ProviderError> {
        self.state
            .get()
            .ok_or_else(|| ProviderError::unavailable("kv is not connected"))
    }

    /// The value at `key` as the JSON text it is stored as, and its ETag; `None` when absent
    /// or expired. For stores that hand values on without looking at them (the host's plugin
    /// store): no parse, no new serialisation.
    pub async fn get_text(&self, key: &str) -> Result<Option<(String, String)>, ProviderError> {
        check_key("key", key)?;
        if let Some(memory) = self.memory.get() {
            return Ok(memory.get_text(key));
        }
        let state = self.connected()?;
        Ok(state
            .read(key)
            .await?
            .map(|(value, etag)| (value, etag.to_string())))
    }

    /// Writes `value`, which must be JSON text, with the rules of `set` (limits, quotas, `etag`
    /// or `if_absent`); the new ETag.
    pub async fn set_text(
        &self,
        key: &str,
        value: String,
        etag: Option<String>,
        if_absent: bool,
    ) -> Result<String, ProviderError> {
        check_key("key", key)?;
        serde_json::from_str::<serde::de::IgnoredAny>(&value)
            .map_err(|e| ProviderError::validation(format!("value is not JSON: {e}")))?;
        let req = SetReq {
            key: key.to_owned(),
            etag,
            ttl_seconds: None,
            if_absent,
        };
        if let Some(memory) = self.memory.get() {
            return memory.set_text(req, value);
        }
        self.connected()?.set_text(req, value).await
    }
}
