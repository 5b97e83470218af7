//! The `kv` descriptor: its actions' JSON Schemas and its config schema.

use providers_core::semver::Version;
use providers_core::{Action, Descriptor};
use serde_json::{Value, json};

/// Longest key, in characters.
pub(crate) const MAX_KEY_CHARS: u64 = 512;
/// Most keys in one `bulk_get`.
pub(crate) const MAX_BULK_KEYS: u64 = 100;
/// Largest page of `list`.
pub(crate) const MAX_LIST_LIMIT: u64 = 1000;

fn key() -> Value {
    json!({"type": "string", "minLength": 1, "maxLength": MAX_KEY_CHARS})
}

fn etag() -> Value {
    json!({"type": "string", "minLength": 1, "maxLength": 32})
}

fn object(properties: Value, required: &[&str]) -> Value {
    json!({"type": "object", "properties": properties, "required": required, "additionalProperties": false})
}

fn item() -> Value {
    object(
        json!({"key": key(), "value": {}, "etag": etag()}),
        &["key", "value", "etag"],
    )
}

pub(crate) fn descriptor(version: Version) -> Descriptor {
    Descriptor::new("kv", version)
        .description("Tenant-scoped key-value state with ETags for optimistic concurrency, optional TTLs and per-tenant quotas. A write that would grow the store past max_keys or max_total_bytes is a CONFLICT, not RATE_LIMITED: waiting does not help, deleting keys does; writes that do not grow it (a smaller value, a delete) always pass, even over a lowered quota.")
        .config_schema(object(
            json!({
                "backend": {"enum": ["sql", "memory"],
                    "description": "Where entries live: sql (the system database, default) or memory (this tenant's instance only, lost when it is evicted, replaced or the host restarts: for caches and tests)."},
                "max_value_bytes": {"type": "integer", "minimum": 1, "maximum": 16_777_216,
                    "description": "Largest value accepted, as serialised JSON (default 65536)."},
                "default_ttl_seconds": {"type": "integer", "minimum": 1,
                    "description": "TTL applied when a set names none (default: no expiry)."},
                "max_page_bytes": {"type": "integer", "minimum": 1024, "maximum": 268_435_456,
                    "description": "Largest list page or bulk_get answer, as the sum of its keys and serialised values (default 1048576)."},
                "max_keys": {"type": "integer", "minimum": 1,
                    "description": "Quota: most keys the tenant may keep in this store (default: no quota)."},
                "max_total_bytes": {"type": "integer", "minimum": 1,
                    "description": "Quota: most bytes of serialised values the tenant may keep in this store (default: no quota)."}
            }),
            &[],
        ))
        .action(
            Action::new("get")
                .description("Reads one key; NOT_FOUND if it is absent or expired.")
                .permission("kv.read")
                .idempotent()
                .input(object(json!({"key": key()}), &["key"]))
                .output(item()),
        )
        .action(
            Action::new("set")
                .description("Writes one key. With `etag`, only if the key still has that ETag; with `if_absent`, only if it does not exist (else CONFLICT).")
                .permission("kv.write")
                .input(object(
                    json!({
                        "key": key(),
                        "value": {"description": "Any JSON value."},
                        "etag": etag(),
                        "ttl_seconds": {"type": "integer", "minimum": 1, "maximum": 315_360_000},
                        "if_absent": {"type": "boolean", "description": "Write only if the key does not exist (else CONFLICT); excludes `etag`."}
                    }),
                    &["key", "value"],
                ))
                .output(object(json!({"key": key(), "etag": etag()}), &["key", "etag"])),
        )
        .action(
            Action::new("delete")
                .description("Deletes one key. With `etag`, only if the key still has that ETag (else CONFLICT).")
                .permission("kv.write")
                .idempotent()
                .input(object(json!({"key": key(), "etag": etag()}), &["key"]))
                .output(object(
                    json!({"key": key(), "deleted": {"type": "boolean"}}),
                    &["key", "deleted"],
                )),
        )
        .action(
            Action::new("list")
                .description("Lists keys starting with `prefix`, in key order, a page at a time (at most `limit` items and max_page_bytes); pass `next` back as `after`.")
                .permission("kv.read")
                .idempotent()
                .input(object(
                    json!({
                        "prefix": {"type": "string", "maxLength": MAX_KEY_CHARS},
                        "after": {"type": "string", "maxLength": MAX_KEY_CHARS},
                        "limit": {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT}
                    }),
                    &[],
                ))
                .output(object(
                    json!({"items": {"type": "array", "items": item()}, "next": {"type": ["string", "null"]}}),
                    &["items", "next"],
                )),
        )
        .action(
            Action::new("bulk_get")
                .description("Reads up to 100 keys at once; each item says whether it was found. Items past max_page_bytes come back as {key, found: true, omitted: true}: ask for them again.")
                .permission("kv.read")
                .idempotent()
                .input(object(
                    json!({"keys": {"type": "array", "items": key(), "minItems": 1, "maxItems": MAX_BULK_KEYS}}),
                    &["keys"],
                ))
                .output(object(
                    json!({"items": {"type": "array", "items": {
                        "type": "object",
                        "properties": {"key": key(), "found": {"type": "boolean"}, "omitted": {"type": "boolean"}, "value": {}, "etag": etag()},
                        "required": ["key", "found"]
                    }}}),
                    &["items"],
                )),
        )
}
