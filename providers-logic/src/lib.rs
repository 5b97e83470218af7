//! Builtin business providers.
//!
//! Today: [`Uid`], unique identification and lifecycle traceability (registered as the
//! builtin service `uid`). Like every provider crate it depends on `providers-core` and sqlx
//! only, gets the host's system database as a resource at connect, scopes every row by
//! tenant, and owns its migrations (`migrations/`, tracked in `_logic_migrations`).

mod migrate;
pub mod uid;

pub use migrate::prepare;
pub use uid::Uid;

providers_core::submit_builtin!(Uid::default());
