//! `kv` in memory (`config = { backend = "memory" }`): the same actions, answers and errors
//! as on the database, in a map held by the tenant's instance. Nothing survives the instance
//! (an idle eviction, a reload that changes its plan, a restart): for caches and tests, and
//! for measuring the host without a storage read.

use std::collections::BTreeMap;
use std::sync::Mutex;

use providers_core::ProviderError;
use serde_json::{Value, json};

use super::{BulkReq, KeyReq, ListReq, SetReq, entry, new_etag, now_ms, page, parse_etag};

struct Stored {
    value: String,
    etag: i64,
    expires: Option<i64>,
}

impl Stored {
    fn live(&self, now: i64) -> bool {
        self.expires.is_none_or(|e| e > now)
    }
}

/// A tenant's store in memory, with the configured limits.
pub(super) struct Memory {
    /// The tenant it serves.
    pub(super) tenant: String,
    entries: Mutex<BTreeMap<String, Stored>>,
    pub(super) max_value_bytes: usize,
    pub(super) default_ttl_seconds: Option<u64>,
    pub(super) max_page_bytes: usize,
    pub(super) max_keys: Option<i64>,
    pub(super) max_total_bytes: Option<i64>,
}

fn mismatch(etag: &str, key: &str) -> ProviderError {
    ProviderError::conflict(format!(
        "etag '{etag}' does not match the current version of key '{key}'"
    ))
}

impl Memory {
    pub(super) fn new(
        tenant: String,
        max_value_bytes: usize,
        default_ttl_seconds: Option<u64>,
        max_page_bytes: usize,
        max_keys: Option<i64>,
        max_total_bytes: Option<i64>,
    ) -> Self {
        Self {
            tenant,
            entries: Mutex::new(BTreeMap::new()),
            max_value_bytes,
            default_ttl_seconds,
            max_page_bytes,
            max_keys,
            max_total_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Stored>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn get(&self, req: KeyReq) -> Result<Value, ProviderError> {
        let now = now_ms();
        let found = self
            .lock()
            .get(&req.key)
            .filter(|s| s.live(now))
            .map(|s| (s.value.clone(), s.etag));
        match found {
            Some((value, etag)) => entry(req.key, &value, etag),
            None => Err(ProviderError::not_found(format!(
                "key '{}' not found",
                req.key
            ))),
        }
    }

    pub(super) fn set(&self, req: SetReq, value: Value) -> Result<Value, ProviderError> {
        let key = req.key.clone();
        let etag = self.set_text(req, value.to_string())?;
        Ok(json!({"key": key, "etag": etag}))
    }

    /// The value at `key` as JSON text, and its ETag, when live.
    pub(super) fn get_text(&self, key: &str) -> Option<(String, String)> {
        let now = now_ms();
        self.lock()
            .get(key)
            .filter(|s| s.live(now))
            .map(|s| (s.value.clone(), s.etag.to_string()))
    }

    /// Writes `value`, JSON text, with the rules of `set`; the new ETag.
    pub(super) fn set_text(&self, req: SetReq, value: String) -> Result<String, ProviderError> {
        let expected = req.checked(&value, self.max_value_bytes)?;
        let now = now_ms();
        let expires = req
            .ttl_seconds
            .or(self.default_ttl_seconds)
            .map(|s| now.saturating_add(i64::try_from(s).unwrap_or(i64::MAX).saturating_mul(1000)));
        let mut map = self.lock();
        // Expired entries are absent, and count for no quota.
        map.retain(|_, s| s.live(now));
        let current = map.get(&req.key);
        match (expected, current) {
            (Some(e), Some(c)) if c.etag != e => {
                return Err(mismatch(&req.etag.unwrap_or_default(), &req.key));
            }
            (Some(_), None) => return Err(mismatch(&req.etag.unwrap_or_default(), &req.key)),
            (None, Some(_)) if req.if_absent => {
                return Err(ProviderError::conflict(format!(
                    "key '{}' already exists (if_absent)",
                    req.key
                )));
            }
            _ => {}
        }
        let size = i64::try_from(value.len()).unwrap_or(i64::MAX);
        let old = current.map(|c| i64::try_from(c.value.len()).unwrap_or(i64::MAX));
        let (grow_keys, grow_bytes) = (i64::from(old.is_none()), size - old.unwrap_or(0));
        let held_keys = i64::try_from(map.len()).unwrap_or(i64::MAX);
        let held_bytes: i64 = map.values().map(|s| s.value.len() as i64).sum();
        if let Some(max) = self.max_keys
            && grow_keys > 0
            && held_keys + grow_keys > max
        {
            return Err(ProviderError::conflict(format!(
                "quota exceeded: writing key '{}' would make {} keys, more than max_keys {max} (kv config max_keys)",
                req.key,
                held_keys + grow_keys
            )));
        }
        if let Some(max) = self.max_total_bytes
            && grow_bytes > 0
            && held_bytes + grow_bytes > max
        {
            return Err(ProviderError::conflict(format!(
                "quota exceeded: writing key '{}' would make {} bytes, more than max_total_bytes {max} (kv config max_total_bytes)",
                req.key,
                held_bytes + grow_bytes
            )));
        }
        let etag = new_etag();
        map.insert(
            req.key,
            Stored {
                value,
                etag,
                expires,
            },
        );
        Ok(etag.to_string())
    }

    pub(super) fn delete(&self, req: KeyReq) -> Result<Value, ProviderError> {
        let expected = req
            .etag
            .as_deref()
            .map(|e| parse_etag(&req.key, e))
            .transpose()?;
        let now = now_ms();
        let mut map = self.lock();
        let live = map.get(&req.key).filter(|s| s.live(now)).map(|s| s.etag);
        let removed = match (expected, live) {
            (Some(e), Some(current)) if e != current => None,
            (Some(_), None) => None,
            (_, Some(_)) => map.remove(&req.key).map(|_| true),
            (None, None) => Some(false),
        };
        match removed {
            Some(deleted) => Ok(json!({"key": req.key, "deleted": deleted})),
            None => Err(mismatch(&req.etag.unwrap_or_default(), &req.key)),
        }
    }

    pub(super) fn list(&self, req: ListReq) -> Result<Value, ProviderError> {
        let now = now_ms();
        let map = self.lock();
        let mut items = Vec::new();
        let mut spent = 0usize;
        let mut more = false;
        let from = std::cmp::max(req.prefix.as_str(), req.after.as_str());
        for (key, s) in
            map.range::<str, _>((std::ops::Bound::Included(from), std::ops::Bound::Unbounded))
        {
            if !key.starts_with(&req.prefix) {
                break;
            }
            if key.as_str() <= req.after.as_str() || !s.live(now) {
                continue;
            }
            if items.len() as i64 == req.limit {
                more = true;
                break;
            }
            let cost = key.len() + s.value.len();
            if !items.is_empty() && spent + cost > self.max_page_bytes {
                more = true;
                break;
            }
            spent += cost;
            items.push(entry(key.clone(), &s.value, s.etag)?);
        }
        Ok(page(items, more))
    }

    pub(super) fn bulk_get(&self, req: BulkReq) -> Result<Value, ProviderError> {
        let now = now_ms();
        let map = self.lock();
        let mut spent = 0usize;
        let mut items = Vec::with_capacity(req.keys.len());
        for key in req.keys {
            match map.get(&key).filter(|s| s.live(now)) {
                Some(s) => {
                    let cost = key.len() + s.value.len();
                    if spent == 0 || spent.saturating_add(cost) <= self.max_page_bytes {
                        spent = spent.saturating_add(cost);
                        let mut e = entry(key, &s.value, s.etag)?;
                        e["found"] = Value::Bool(true);
                        items.push(e);
                    } else {
                        items.push(json!({"key": key, "found": true, "omitted": true}));
                    }
                }
                None => items.push(json!({"key": key, "found": false})),
            }
        }
        Ok(json!({"items": items}))
    }
}
