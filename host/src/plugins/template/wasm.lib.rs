//! The `{name}` provider, a WebAssembly component for the ERP Provider Layer.
//!
//! `wit/provider.wit` is the contract (a copy of the host's `erp:provider@1.0.0`). Build with
//! `cargo build --release --target wasm32-wasip2`; the component is
//! `target/wasm32-wasip2/release/{lib}.wasm`.

use std::cell::RefCell;

use serde_json::{Value, json};

wit_bindgen::generate!({
    world: "provider",
    path: "wit",
});

use erp::provider::store;
use erp::provider::types::{ErrorCode, State};

struct {type_name};

thread_local! {
    /// This instance's config. The host may run several instances for one tenant, so
    /// anything that must be shared between calls belongs in the store.
    static CONFIG: RefCell<Value> = const { RefCell::new(Value::Null) };
}

fn error(code: ErrorCode, message: impl Into<String>) -> Error {
    Error { code, message: message.into() }
}

impl Guest for {type_name} {
    fn describe() -> String {
        json!({
            "service": "{name}",
            "version": env!("CARGO_PKG_VERSION"),
            "contract_version": "1.0.0",
            "description": "Counts greetings per name",
            "config_schema": {"type": "object", "properties": {"greeting": {"type": "string"}}},
            "actions": [{
                "name": "hello",
                "description": "Greets someone and counts how often",
                "input_schema": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
            }],
        })
        .to_string()
    }

    fn connect(_tenant: String, _service: String, config: String) -> Result<(), Error> {
        let config = serde_json::from_str(&config)
            .map_err(|e| error(ErrorCode::ValidationError, format!("config: {e}")))?;
        CONFIG.with(|c| *c.borrow_mut() = config);
        Ok(())
    }

    fn disconnect() -> Result<(), Error> {
        Ok(())
    }

    fn execute(action: String, payload: String, _call: Call) -> Result<String, Error> {
        let payload: Value = serde_json::from_str(&payload)
            .map_err(|e| error(ErrorCode::ValidationError, format!("payload: {e}")))?;
        match action.as_str() {
            "hello" => {
                let who = payload["name"].as_str().unwrap_or_default();
                let key = format!("count/{who}");
                let count = match store::get(&key)? {
                    Some(entry) => entry.value.parse::<u64>().unwrap_or(0) + 1,
                    None => 1,
                };
                store::set(&key, &count.to_string(), &store::Expect::Any)?;
                let greeting = CONFIG.with(|c| c.borrow()["greeting"].as_str().unwrap_or("Hello").to_owned());
                Ok(json!({"message": format!("{greeting}, {who}!"), "count": count}).to_string())
            }
            other => Err(error(ErrorCode::NotFound, format!("unknown action '{other}'"))),
        }
    }

    fn get_status() -> Status {
        Status { state: State::Ready, detail: String::new() }
    }
}

export!({type_name});
