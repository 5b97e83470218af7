//! What the host lends a plugin (native or wasm): its own key-value store and its log.
//!
//! Builtins share the host's Rust types and get [`Resources`](crate::Resources) instead.
//! A plugin cannot: it gets these two capabilities, the same for every kind of plugin,
//! through [`ConnectContext::store`](crate::ConnectContext::store) and
//! [`ConnectContext::log`](crate::ConnectContext::log). Calling another provider is the third
//! capability and needs no new type: [`CallContext::call`](crate::CallContext::call).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde_json::Value;

use crate::ProviderError;

/// One stored value and the version it has now.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreEntry {
    /// The value, as it was written.
    pub value: Value,
    /// Opaque; compare it exactly, never parse it.
    pub etag: String,
}

/// The condition a write makes on the key's current state.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Expect {
    /// Write whatever is there.
    #[default]
    Any,
    /// Write only if the key still has this ETag (else `CONFLICT`).
    Etag(String),
    /// Write only if the key does not exist (else `CONFLICT`).
    Absent,
}

/// One page of [`Store::list`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StorePage {
    /// Keys and their entries, in byte order of the key.
    pub items: Vec<(String, StoreEntry)>,
    /// Pass it back as `after` for the next page; `None` at the end.
    pub next: Option<String>,
}

impl StorePage {
    /// The page in the JSON form of `kv`'s `list` answer:
    /// `{"items": [{"key", "value", "etag"}], "next": string | null}`.
    pub fn to_json(&self) -> Value {
        let items: Vec<Value> = self
            .items
            .iter()
            .map(|(key, e)| serde_json::json!({"key": key, "value": e.value, "etag": e.etag}))
            .collect();
        serde_json::json!({"items": items, "next": self.next})
    }

    /// A page from that JSON form; `INTERNAL` if it is malformed (it comes from the host).
    pub fn from_json(mut page: Value) -> Result<Self, ProviderError> {
        let bad = || ProviderError::internal("malformed store page");
        let mut items = Vec::new();
        for item in page["items"].as_array_mut().ok_or_else(bad)? {
            let key = item["key"].as_str().ok_or_else(bad)?.to_owned();
            let etag = item["etag"].as_str().ok_or_else(bad)?.to_owned();
            let value = item.get_mut("value").map(Value::take).ok_or_else(bad)?;
            items.push((key, StoreEntry { value, etag }));
        }
        let next = page["next"].as_str().map(str::to_owned);
        Ok(Self { items, next })
    }
}

/// A key-value store scoped to one `(tenant, service)`: the plugin's own state.
///
/// In the host it is the builtin `kv` store on the system database, with the same ETag
/// semantics, limits and quotas (the provider's `store` config), and no caller's permission
/// is needed: no other tenant or service is reachable through it.
#[async_trait]
pub trait Store: Send + Sync {
    /// The entry at `key`, or `None` if absent or expired.
    async fn get(&self, key: &str) -> Result<Option<StoreEntry>, ProviderError>;
    /// Writes `value` at `key` under `expect`; the new ETag.
    async fn set(&self, key: &str, value: Value, expect: Expect) -> Result<String, ProviderError>;
    /// Deletes `key` (only if it has `etag`, when given); whether something was deleted.
    async fn delete(&self, key: &str, etag: Option<&str>) -> Result<bool, ProviderError>;
    /// Keys starting with `prefix` and greater than `after`, at most `limit` of them.
    async fn list(&self, prefix: &str, after: &str, limit: u32)
    -> Result<StorePage, ProviderError>;

    /// [`get`](Self::get) with the value as JSON text: what a plugin boundary passes on.
    /// Stores that keep text override it to skip a parse and a serialisation.
    async fn get_text(&self, key: &str) -> Result<Option<(String, String)>, ProviderError> {
        Ok(self.get(key).await?.map(|e| (e.value.to_string(), e.etag)))
    }

    /// [`set`](Self::set) with the value as JSON text (`VALIDATION_ERROR` if it is not JSON).
    async fn set_text(
        &self,
        key: &str,
        value: String,
        expect: Expect,
    ) -> Result<String, ProviderError> {
        let value: Value = serde_json::from_str(&value)
            .map_err(|e| ProviderError::validation(format!("value is not JSON: {e}")))?;
        self.set(key, value, expect).await
    }
}

/// Severity of a [`Log`] line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Level {
    /// Fine detail.
    Debug,
    /// Normal operation.
    Info,
    /// Something an operator may want to look at.
    Warn,
    /// Something failed.
    Error,
}

impl Level {
    /// The level as a number, 0 (debug) to 3 (error), as it crosses plugin boundaries.
    pub const fn as_u8(self) -> u8 {
        match self {
            Level::Debug => 0,
            Level::Info => 1,
            Level::Warn => 2,
            Level::Error => 3,
        }
    }

    /// The level of a number from [`as_u8`](Self::as_u8); unknown numbers are `Error`.
    pub const fn from_u8(n: u8) -> Self {
        match n {
            0 => Level::Debug,
            1 => Level::Info,
            2 => Level::Warn,
            _ => Level::Error,
        }
    }
}

/// Where a plugin's log lines go. The host writes them to its own log with the provider's
/// and tenant's fields; the plugin cannot forge those.
pub trait Log: Send + Sync {
    /// Writes one line; `request_id` is empty outside a call.
    fn log(&self, level: Level, request_id: &str, message: &str);
}

/// A cheap handle on a [`Log`]; lines are dropped when the host gave none.
#[derive(Clone, Default)]
pub struct Logger(Option<Arc<dyn Log>>);

impl Logger {
    /// A logger writing to `log`.
    pub fn new(log: Arc<dyn Log>) -> Self {
        Self(Some(log))
    }

    /// Writes one line at `level`.
    pub fn log(&self, level: Level, message: &str) {
        if let Some(log) = &self.0 {
            log.log(level, "", message);
        }
    }

    /// Writes one line at `level` about the call `request_id`.
    pub fn log_for(&self, level: Level, request_id: &str, message: &str) {
        if let Some(log) = &self.0 {
            log.log(level, request_id, message);
        }
    }

    /// `debug`.
    pub fn debug(&self, message: &str) {
        self.log(Level::Debug, message);
    }
    /// `info`.
    pub fn info(&self, message: &str) {
        self.log(Level::Info, message);
    }
    /// `warn`.
    pub fn warn(&self, message: &str) {
        self.log(Level::Warn, message);
    }
    /// `error`.
    pub fn error(&self, message: &str) {
        self.log(Level::Error, message);
    }
}

impl fmt::Debug for Logger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Logger"
        } else {
            "Logger(none)"
        })
    }
}

/// A [`Store`] in memory, with the host's ETag rules: for tests of plugin providers
/// ([`TestHost`](crate::testing::TestHost) gives one to every provider it connects).
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<(u64, BTreeMap<String, StoreEntry>)>,
}

impl MemoryStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, BTreeMap<String, StoreEntry>)> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn mismatch(key: &str, etag: &str) -> ProviderError {
    ProviderError::conflict(format!(
        "etag '{etag}' does not match the current version of key '{key}'"
    ))
}

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<StoreEntry>, ProviderError> {
        Ok(self.lock().1.get(key).cloned())
    }

    async fn set(&self, key: &str, value: Value, expect: Expect) -> Result<String, ProviderError> {
        let mut guard = self.lock();
        let (counter, map) = &mut *guard;
        match (&expect, map.get(key)) {
            (Expect::Etag(e), Some(current)) if &current.etag != e => {
                return Err(mismatch(key, e));
            }
            (Expect::Etag(e), None) => return Err(mismatch(key, e)),
            (Expect::Absent, Some(_)) => {
                return Err(ProviderError::conflict(format!(
                    "key '{key}' already exists"
                )));
            }
            _ => {}
        }
        *counter += 1;
        let etag = counter.to_string();
        map.insert(
            key.to_owned(),
            StoreEntry {
                value,
                etag: etag.clone(),
            },
        );
        Ok(etag)
    }

    async fn delete(&self, key: &str, etag: Option<&str>) -> Result<bool, ProviderError> {
        let mut guard = self.lock();
        match (etag, guard.1.get(key)) {
            (Some(e), Some(current)) if current.etag != e => Err(mismatch(key, e)),
            (Some(e), None) => Err(mismatch(key, e)),
            _ => Ok(guard.1.remove(key).is_some()),
        }
    }

    async fn list(
        &self,
        prefix: &str,
        after: &str,
        limit: u32,
    ) -> Result<StorePage, ProviderError> {
        // The host's store pages 1 to 1000 keys at a time; so does this one.
        let limit = limit.clamp(1, 1000);
        let guard = self.lock();
        let mut items: Vec<(String, StoreEntry)> = guard
            .1
            .range::<str, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
            .filter(|(k, _)| k.starts_with(prefix))
            .take(limit as usize + 1)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let next = if items.len() > limit as usize {
            items.truncate(limit as usize);
            items.last().map(|(k, _)| k.clone())
        } else {
            None
        };
        Ok(StorePage { items, next })
    }
}

/// An outbound HTTP request a plugin asks the host to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    /// `GET`, `POST`, ...
    pub method: String,
    /// An absolute `http://` URL.
    pub url: String,
    /// Header names and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body; empty for none.
    pub body: Vec<u8>,
    /// The calling provider call's deadline, which bounds the request.
    pub deadline: Option<std::time::Instant>,
}

/// What came back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// Header names and values.
    pub headers: Vec<(String, String)>,
    /// The body, up to the host's size limit.
    pub body: Vec<u8>,
}

/// Outbound HTTP under the operator's rules: only to the hosts listed in the provider's
/// `allowed_hosts`, none by default. A refused host is `FORBIDDEN`.
#[async_trait]
pub trait Http: Send + Sync {
    /// Sends `request` and reads the response.
    async fn send(&self, request: HttpRequest) -> Result<HttpResponse, ProviderError>;
}

/// What a sandboxed instance may use, resolved from the provider's and the tenant's limits.
/// Engines that cannot enforce a limit ignore it (native code is not sandboxed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SandboxLimits {
    /// Linear memory of one instance, in bytes.
    pub memory_bytes: Option<u64>,
    /// Fuel (roughly, wasm instructions) one call may burn.
    pub fuel: Option<u64>,
}
