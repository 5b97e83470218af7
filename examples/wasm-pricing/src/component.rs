//! The component's exports: the contract of `providers-core/wit`, over [`crate::pricing`].

// wit-bindgen's generated glue exports functions by name; this module holds nothing else.
#![allow(unsafe_code, reason = "the bindings wit-bindgen generates")]
#![allow(
    clippy::too_many_arguments,
    reason = "wit-bindgen lowers records into flat arguments"
)]

use std::cell::RefCell;

use serde_json::Value;

use crate::pricing::{self, Failure, PriceList};

wit_bindgen::generate!({
    world: "provider",
    path: "../../providers-core/wit",
});

use erp::provider::types::{ErrorCode, State};

struct Pricing;

thread_local! {
    /// This instance's tenant price list, parsed once at connect.
    static LIST: RefCell<Option<PriceList>> = const { RefCell::new(None) };
}

fn error(f: Failure) -> Error {
    let code = match f {
        Failure::Invalid(_) => ErrorCode::ValidationError,
        Failure::UnknownAction(_) => ErrorCode::NotFound,
    };
    Error {
        code,
        message: f.to_string(),
    }
}

impl Guest for Pricing {
    fn describe() -> String {
        pricing::descriptor(env!("CARGO_PKG_VERSION")).to_string()
    }

    fn connect(_tenant: String, _service: String, config: String) -> Result<(), Error> {
        let config: Value = serde_json::from_str(&config).map_err(|e| Error {
            code: ErrorCode::ValidationError,
            message: format!("config is not JSON: {e}"),
        })?;
        let list = PriceList::from_config(&config).map_err(error)?;
        LIST.with(|l| *l.borrow_mut() = Some(list));
        Ok(())
    }

    fn disconnect() -> Result<(), Error> {
        LIST.with(|l| *l.borrow_mut() = None);
        Ok(())
    }

    fn execute(action: String, payload: String, _call: Call) -> Result<String, Error> {
        let payload: Value = serde_json::from_str(&payload).map_err(|e| Error {
            code: ErrorCode::ValidationError,
            message: format!("payload is not JSON: {e}"),
        })?;
        LIST.with(|l| match l.borrow().as_ref() {
            Some(list) => pricing::execute(list, &action, &payload)
                .map(|v| v.to_string())
                .map_err(error),
            None => Err(Error {
                code: ErrorCode::ProviderUnavailable,
                message: "not connected".into(),
            }),
        })
    }

    fn get_status() -> Status {
        let connected = LIST.with(|l| l.borrow().is_some());
        Status {
            state: if connected {
                State::Ready
            } else {
                State::Failed
            },
            detail: if connected {
                String::new()
            } else {
                "not connected".into()
            },
        }
    }
}

export!(Pricing);
