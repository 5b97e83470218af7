//! A component that misbehaves on request, for the host's containment tests. Built for
//! `wasm32-wasip2` by the tests themselves; on any other target the crate is empty.

#![cfg(target_arch = "wasm32")]
// The bindings wit-bindgen generates export functions by name, and `scan` reads raw memory.
#![allow(
    unsafe_code,
    reason = "generated bindings and a deliberate raw memory scan"
)]
#![allow(
    clippy::too_many_arguments,
    reason = "wit-bindgen lowers records into flat arguments"
)]
#![allow(
    missing_docs,
    reason = "wit-bindgen generates the bindings undocumented"
)]

use std::cell::RefCell;

use serde_json::{Value, json};

wit_bindgen::generate!({
    world: "provider",
    path: "../../providers-core/wit",
});

use erp::provider::types::{ErrorCode, State};
use erp::provider::{http, log, providers, store};

struct Fixture;

thread_local! {
    static CONFIG: RefCell<Value> = const { RefCell::new(Value::Null) };
    static CALLS: RefCell<u64> = const { RefCell::new(0) };
    /// Secrets written by `remember`: they live in this instance's linear memory only.
    static SECRETS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    static HOARD: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

fn error(code: ErrorCode, message: impl Into<String>) -> Error {
    Error {
        code,
        message: message.into(),
    }
}

fn text(payload: &Value, key: &str) -> Result<String, Error> {
    payload
        .get(key)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| error(ErrorCode::ValidationError, format!("'{key}' is required")))
}

#[inline(never)]
#[allow(
    unconditional_recursion,
    reason = "unbounded recursion is what this action tests"
)]
fn recurse(n: u64, pad: &mut [u8; 256]) -> u64 {
    pad[(n % 256) as usize] = n as u8;
    let mut local = *pad;
    recurse(n + 1, &mut local) + u64::from(local[0])
}

/// Every occurrence of `marker` followed by printable bytes anywhere in linear memory.
fn scan(marker: &[u8]) -> Vec<String> {
    let size = core::arch::wasm32::memory_size(0) * 65536;
    let mut found = Vec::new();
    let mut at = 1usize;
    while at + marker.len() < size {
        // SAFETY: every address below memory_size(0) * 64 KiB is in bounds of linear memory 0.
        let byte = |i: usize| unsafe { core::ptr::read_volatile(i as *const u8) };
        if (0..marker.len()).all(|k| byte(at + k) == marker[k]) {
            let mut end = at + marker.len();
            while end < size && byte(end).is_ascii_alphanumeric() {
                end += 1;
            }
            let bytes: Vec<u8> = (at..end).map(byte).collect();
            found.push(String::from_utf8_lossy(&bytes).into_owned());
            at = end;
        } else {
            at += 1;
        }
    }
    found
}

impl Guest for Fixture {
    fn describe() -> String {
        let action =
            |name: &str| json!({"name": name, "description": format!("fixture action {name}")});
        let actions: Vec<Value> = [
            "ping", "echo", "spin", "busy", "grow", "recurse", "trap", "panic", "remember", "scan",
            "put", "get", "call", "fetch", "log",
        ]
        .iter()
        .map(|a| action(a))
        .collect();
        json!({
            "service": "fixture",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "wasm test fixture",
            "contract_version": "1.0.0",
            "actions": actions,
        })
        .to_string()
    }

    fn connect(_tenant: String, _service: String, config: String) -> Result<(), Error> {
        let config: Value = serde_json::from_str(&config)
            .map_err(|e| error(ErrorCode::ValidationError, e.to_string()))?;
        if config.get("fail_connect").and_then(Value::as_bool) == Some(true) {
            return Err(error(
                ErrorCode::ProviderUnavailable,
                "told to fail connect",
            ));
        }
        // Nested calls belong to a call: from connect the host must refuse them.
        if config.get("call_in_connect").and_then(Value::as_bool) == Some(true) {
            let refused = providers::call("kv", "list", "{}")
                .err()
                .map_or("the nested call was allowed".to_owned(), |e| e.message);
            return Err(error(
                ErrorCode::ProviderUnavailable,
                format!("connect: {refused}"),
            ));
        }
        CONFIG.with(|c| *c.borrow_mut() = config);
        Ok(())
    }

    fn disconnect() -> Result<(), Error> {
        Ok(())
    }

    fn execute(action: String, payload: String, call: Call) -> Result<String, Error> {
        let payload: Value = serde_json::from_str(&payload)
            .map_err(|e| error(ErrorCode::ValidationError, e.to_string()))?;
        let calls = CALLS.with(|c| {
            *c.borrow_mut() += 1;
            *c.borrow()
        });
        let out = match action.as_str() {
            "ping" => json!({"pong": true, "tenant": call.tenant}),
            "echo" => json!({
                "payload": payload,
                "calls": calls,
                "tenant": call.tenant,
                "subject": call.subject,
                "roles": call.roles,
                "remaining_ms": call.remaining_ms,
                "config": CONFIG.with(|c| c.borrow().clone()),
            }),
            "spin" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "busy" => {
                let ms = payload.get("ms").and_then(Value::as_u64).unwrap_or(10);
                let start = std::time::Instant::now();
                while start.elapsed().as_millis() < u128::from(ms) {
                    std::hint::black_box(());
                }
                json!({"busy_ms": ms})
            }
            "grow" => {
                let mb = payload
                    .get("mb")
                    .and_then(Value::as_u64)
                    .unwrap_or(u64::MAX);
                for _ in 0..mb {
                    HOARD.with(|h| h.borrow_mut().push(vec![1u8; 1 << 20]));
                }
                json!({"grown_mb": mb})
            }
            "recurse" => {
                let mut pad = [0u8; 256];
                json!({"depth": recurse(0, &mut pad)})
            }
            "trap" => core::arch::wasm32::unreachable(),
            "panic" => panic!("the fixture was told to panic"),
            "remember" => {
                let secret = text(&payload, "secret")?;
                SECRETS.with(|s| s.borrow_mut().push(format!("TENANTSECRET{secret}")));
                json!({"remembered": SECRETS.with(|s| s.borrow().len())})
            }
            "scan" => {
                // Built at run time so the marker itself is not a literal in the data segment.
                let marker: Vec<u8> = ["TENANT", "SECRET"].concat().into_bytes();
                let mine: Vec<String> = SECRETS.with(|s| s.borrow().clone());
                let found: Vec<String> = scan(&marker)
                    .into_iter()
                    .filter(|f| f.len() > marker.len())
                    .collect();
                json!({"found": found, "mine": mine})
            }
            "put" => {
                let key = text(&payload, "key")?;
                let value = payload.get("value").cloned().unwrap_or(Value::Null);
                let etag = store::set(&key, &value.to_string(), &store::Expect::Any)?;
                json!({"etag": etag})
            }
            "get" => {
                let key = text(&payload, "key")?;
                match store::get(&key)? {
                    Some(e) => {
                        json!({"value": serde_json::from_str::<Value>(&e.value).unwrap_or(Value::Null), "etag": e.etag})
                    }
                    None => json!({"value": null}),
                }
            }
            "call" => {
                let service = text(&payload, "service")?;
                let action = text(&payload, "action")?;
                let inner = payload.get("payload").cloned().unwrap_or(json!({}));
                let out = providers::call(&service, &action, &inner.to_string())?;
                json!({"nested": serde_json::from_str::<Value>(&out).unwrap_or(Value::Null)})
            }
            "fetch" => {
                let url = text(&payload, "url")?;
                let response = http::send(&http::Request {
                    method: "GET".into(),
                    url,
                    headers: vec![("accept".into(), "text/plain".into())],
                    body: Vec::new(),
                })?;
                json!({
                    "status": response.status,
                    "body": String::from_utf8_lossy(&response.body),
                })
            }
            "log" => {
                let message = text(&payload, "message")?;
                log::log(log::Level::Warn, &message);
                json!({"logged": true})
            }
            other => {
                return Err(error(
                    ErrorCode::NotFound,
                    format!("unknown action '{other}'"),
                ));
            }
        };
        Ok(out.to_string())
    }

    fn get_status() -> Status {
        Status {
            state: State::Ready,
            detail: String::new(),
        }
    }
}

export!(Fixture);
