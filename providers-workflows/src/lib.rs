//! The builtin `workflows` provider: durable multi-step workflows on the host's database.
//!
//! A workflow is defined in TOML ([`definition`]): steps that call provider actions (payloads
//! built with [`template`] references), approval steps with roles, SLAs and escalation,
//! timers and signals, each with an optional CEL condition; call steps have retry policies
//! and compensations. [`Workflows`] is the provider callers use (`start`, `get`, `list`,
//! `approve`, `reject`, `send_back`, `resubmit`, `cancel`, `signal`); the [`executor`] runs
//! the steps, and the host drives it, giving it a [`executor::Runner`] that makes each step's
//! call through the host's own pipeline. Like every provider crate this one depends on no
//! other provider crate; its CEL comes from the shared `providers-cel` library.

pub mod definition;
pub mod executor;
mod migrate;
mod provider;
pub mod store;
pub mod template;

pub use definition::{Definition, DefinitionError, parse};
pub use executor::{Clock, Executor, Runner, Settings, StepCall, SystemClock};
pub use migrate::prepare;
pub use provider::Workflows;
pub(crate) use provider::db_error;

providers_core::submit_builtin!(Workflows::default());

/// Wakes the executor of this process: something became due now.
static WAKE: tokio::sync::Notify = tokio::sync::Notify::const_new();

pub(crate) fn wake() {
    WAKE.notify_one();
}

/// Resolves when a caller made something due (a start, a decision, a cancel, a signal).
pub async fn woken() {
    WAKE.notified().await;
}
