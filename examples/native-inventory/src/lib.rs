//! Example native provider: `inventory`, stock per item and warehouse.
//!
//! It shows a third-party provider shipped as a native dynamic library: an ordinary
//! `impl Provider`, exported with one macro, its state kept in the store the host lends
//! every plugin (scoped to the tenant and service, so tenant B never sees tenant A's stock).
//! `reserve` never oversells: each change is a compare-and-set on the level's ETag, retried
//! when another call changed it first.
//!
//! Build and stage it with `cargo xtask plugins`, then enable it in the host's config:
//! `[[providers]] service = "inventory"` with `[plugins] dirs = ["plugins"]`.
//! `docs/native-plugins.md` walks through it.

use providers_core::semver::Version;
use providers_core::{
    Action, CallContext, ConnectContext, Descriptor, ErrorCode, Expect, Provider, ProviderError,
    Store, async_trait,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::sync::{Arc, OnceLock};

providers_core::export_native_provider!(Inventory::default());

/// How many times a change is retried when another call changed the same level first.
const ATTEMPTS: u32 = 200;

/// The provider. One instance serves one tenant.
#[derive(Default)]
pub struct Inventory {
    state: OnceLock<Connected>,
}

struct Connected {
    store: Arc<dyn Store>,
    log: providers_core::Logger,
    /// Warehouses this tenant may use; empty for any.
    warehouses: Vec<String>,
}

/// One stock level, as stored.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
struct Level {
    on_hand: u64,
    reserved: u64,
}

#[derive(Deserialize)]
struct Move {
    item: String,
    warehouse: String,
    quantity: u64,
}

#[derive(Deserialize)]
struct Query {
    #[serde(default)]
    item: Option<String>,
    #[serde(default)]
    warehouse: Option<String>,
}

fn name() -> Value {
    json!({"type": "string", "minLength": 1, "maxLength": 64, "pattern": "^[A-Za-z0-9._-]+$"})
}

fn movement(description: &str) -> Value {
    json!({
        "type": "object",
        "description": description,
        "properties": {
            "item": name(),
            "warehouse": name(),
            "quantity": {"type": "integer", "minimum": 1, "maximum": 1_000_000_000u64}
        },
        "required": ["item", "warehouse", "quantity"],
        "additionalProperties": false
    })
}

fn level_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "item": name(), "warehouse": name(),
            "on_hand": {"type": "integer"}, "reserved": {"type": "integer"}, "available": {"type": "integer"}
        },
        "required": ["item", "warehouse", "on_hand", "reserved", "available"]
    })
}

fn key(warehouse: &str, item: &str) -> String {
    format!("level/{warehouse}/{item}")
}

fn view(item: &str, warehouse: &str, level: Level) -> Value {
    json!({
        "item": item,
        "warehouse": warehouse,
        "on_hand": level.on_hand,
        "reserved": level.reserved,
        "available": level.on_hand - level.reserved,
    })
}

fn parse<T: for<'de> Deserialize<'de>>(payload: Value) -> Result<T, ProviderError> {
    serde_json::from_value(payload).map_err(|e| ProviderError::validation(format!("payload: {e}")))
}

impl Connected {
    fn check_warehouse(&self, warehouse: &str) -> Result<(), ProviderError> {
        if self.warehouses.is_empty() || self.warehouses.iter().any(|w| w == warehouse) {
            Ok(())
        } else {
            Err(ProviderError::validation(format!(
                "payload.warehouse: '{warehouse}' is not one of this tenant's warehouses ({})",
                self.warehouses.join(", ")
            )))
        }
    }

    /// Applies `change` to the level of (`warehouse`, `item`) atomically: read, change,
    /// write if unchanged since the read, else read again.
    async fn update(
        &self,
        m: &Move,
        change: impl Fn(Level) -> Result<Level, ProviderError>,
    ) -> Result<Value, ProviderError> {
        self.check_warehouse(&m.warehouse)?;
        let key = key(&m.warehouse, &m.item);
        for attempt in 0..ATTEMPTS {
            let current = self.store.get(&key).await?;
            let (level, expect) = match current {
                Some(entry) => (
                    serde_json::from_value::<Level>(entry.value).map_err(|e| {
                        ProviderError::provider(format!("stored level of '{key}' is corrupt: {e}"))
                    })?,
                    Expect::Etag(entry.etag),
                ),
                None => (Level::default(), Expect::Absent),
            };
            let next = change(level)?;
            let value = serde_json::to_value(next)
                .map_err(|e| ProviderError::internal(format!("level is not JSON: {e}")))?;
            match self.store.set(&key, value, expect).await {
                Ok(_) => return Ok(view(&m.item, &m.warehouse, next)),
                // Someone else changed the level between our read and write: read again.
                Err(e) if e.code == ErrorCode::Conflict && !e.detail.contains("quota") => {
                    if attempt > 8 {
                        std::thread::sleep(std::time::Duration::from_micros(
                            200 * u64::from(attempt % 8),
                        ));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(ProviderError::conflict(format!(
            "'{key}' changed under {ATTEMPTS} attempts in a row; try again"
        )))
    }

    async fn levels(&self, q: Query) -> Result<Value, ProviderError> {
        let prefix = match (&q.warehouse, &q.item) {
            (Some(w), Some(i)) => key(w, i),
            (Some(w), None) => format!("level/{w}/"),
            _ => "level/".to_owned(),
        };
        let mut out = Vec::new();
        let mut after = String::new();
        loop {
            let page = self.store.list(&prefix, &after, 500).await?;
            for (k, entry) in page.items {
                let mut parts = k.splitn(3, '/').skip(1);
                let (Some(w), Some(i)) = (parts.next(), parts.next()) else {
                    continue;
                };
                if q.item.as_deref().is_some_and(|item| item != i) {
                    continue;
                }
                let level: Level = serde_json::from_value(entry.value).unwrap_or_default();
                out.push(view(i, w, level));
            }
            match page.next {
                Some(next) => after = next,
                None => break,
            }
        }
        Ok(json!({"levels": out}))
    }
}

#[async_trait]
impl Provider for Inventory {
    fn descriptor(&self) -> Descriptor {
        Descriptor::new("inventory", Version::new(1, 0, 0))
            .description("Stock per item and warehouse: receive, reserve (never oversells), release, levels.")
            .config_schema(json!({
                "type": "object",
                "properties": {
                    "warehouses": {"type": "array", "items": name(),
                        "description": "Warehouses the tenant may use (default: any)."}
                },
                "additionalProperties": false
            }))
            .action(Action::new("receive").permission("inventory.write")
                .description("Adds received stock to a warehouse.")
                .input(movement("Stock received"))
                .output(level_schema()))
            .action(Action::new("reserve").permission("inventory.write")
                .description("Reserves available stock; CONFLICT when less is available than asked.")
                .input(movement("Stock to reserve"))
                .output(level_schema())
                .compensated_by("release"))
            .action(Action::new("release").permission("inventory.write")
                .description("Releases reserved stock; CONFLICT when less is reserved than asked.")
                .input(movement("Stock to release"))
                .output(level_schema()))
            .action(Action::new("level").permission("inventory.read").idempotent()
                .description("The stock level of one item in one warehouse (zero when never received).")
                .input(json!({"type": "object", "properties": {"item": name(), "warehouse": name()}, "required": ["item", "warehouse"], "additionalProperties": false}))
                .output(level_schema()))
            .action(Action::new("levels").permission("inventory.read").idempotent()
                .description("Stock levels, optionally of one item and/or one warehouse.")
                .input(json!({"type": "object", "properties": {"item": name(), "warehouse": name()}, "additionalProperties": false}))
                .output(json!({"type": "object", "properties": {"levels": {"type": "array", "items": level_schema()}}})))
    }

    async fn connect(&mut self, ctx: &ConnectContext) -> Result<(), ProviderError> {
        let store = ctx
            .store()
            .cloned()
            .ok_or_else(|| ProviderError::unavailable("inventory needs the host's plugin store"))?;
        let warehouses = ctx.config()["warehouses"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|w| w.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let log = ctx.log().clone();
        log.info(&format!("inventory connected for tenant {}", ctx.tenant()));
        self.state
            .set(Connected {
                store,
                log,
                warehouses,
            })
            .map_err(|_| ProviderError::internal("inventory connected twice"))
    }

    async fn execute(
        &self,
        action: &str,
        payload: Value,
        ctx: &CallContext,
    ) -> Result<Value, ProviderError> {
        let state = self
            .state
            .get()
            .ok_or_else(|| ProviderError::unavailable("inventory is not connected"))?;
        match action {
            "receive" => {
                let m: Move = parse(payload)?;
                state
                    .update(&m, |l| {
                        let on_hand = l.on_hand.checked_add(m.quantity).ok_or_else(|| {
                            ProviderError::validation("payload.quantity: the stock would overflow")
                        })?;
                        Ok(Level { on_hand, ..l })
                    })
                    .await
            }
            "reserve" => {
                let m: Move = parse(payload)?;
                let out = state
                    .update(&m, |l| {
                        let available = l.on_hand - l.reserved;
                        if available < m.quantity {
                            return Err(ProviderError::conflict(format!(
                                "insufficient stock of '{}' in '{}': {available} available, {} asked",
                                m.item, m.warehouse, m.quantity
                            )));
                        }
                        Ok(Level { reserved: l.reserved + m.quantity, ..l })
                    })
                    .await;
                if let Err(e) = &out {
                    state
                        .log
                        .log_for(providers_core::Level::Debug, ctx.request_id(), &e.detail);
                }
                out
            }
            "release" => {
                let m: Move = parse(payload)?;
                state
                    .update(&m, |l| {
                        if l.reserved < m.quantity {
                            return Err(ProviderError::conflict(format!(
                                "cannot release {} of '{}' in '{}': only {} reserved",
                                m.quantity, m.item, m.warehouse, l.reserved
                            )));
                        }
                        Ok(Level {
                            reserved: l.reserved - m.quantity,
                            ..l
                        })
                    })
                    .await
            }
            "level" => {
                let q: Query = parse(payload)?;
                let (Some(item), Some(warehouse)) = (q.item, q.warehouse) else {
                    return Err(ProviderError::validation(
                        "payload: item and warehouse are required",
                    ));
                };
                let level = match state.store.get(&key(&warehouse, &item)).await? {
                    Some(entry) => serde_json::from_value(entry.value).map_err(|e| {
                        ProviderError::provider(format!("stored level is corrupt: {e}"))
                    })?,
                    None => Level::default(),
                };
                Ok(view(&item, &warehouse, level))
            }
            "levels" => state.levels(parse(payload)?).await,
            other => Err(ProviderError::not_found(format!(
                "inventory has no action '{other}'"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use providers_core::testing::TestHost;

    #[tokio::test]
    async fn receive_reserve_release_and_levels() {
        let mut host = TestHost::new(Inventory::default()).await.unwrap();
        let m = json!({"item": "bolt", "warehouse": "main", "quantity": 5});
        assert_eq!(
            host.call("receive", m.clone()).await.unwrap()["available"],
            5
        );
        assert_eq!(
            host.call(
                "reserve",
                json!({"item": "bolt", "warehouse": "main", "quantity": 3})
            )
            .await
            .unwrap()["available"],
            2
        );
        let e = host.call("reserve", m.clone()).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::Conflict);
        assert_eq!(
            e.detail,
            "insufficient stock of 'bolt' in 'main': 2 available, 5 asked"
        );
        assert_eq!(
            host.call(
                "release",
                json!({"item": "bolt", "warehouse": "main", "quantity": 3})
            )
            .await
            .unwrap()["reserved"],
            0
        );
        let levels = host.call("levels", json!({})).await.unwrap();
        assert_eq!(
            levels,
            json!({"levels": [{"item": "bolt", "warehouse": "main", "on_hand": 5, "reserved": 0, "available": 5}]})
        );
        host.disconnect().await.unwrap();
    }
}
