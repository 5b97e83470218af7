//! Builtin providers over SQL databases.
//!
//! Today: [`Kv`], a tenant-scoped state store in the host's system database (registered as
//! the builtin service `kv`). It depends on `providers-core` and sqlx only, never on the
//! host or another provider crate; it gets its database pool from the host at connect, as
//! a resource, and owns its migrations (in `migrations/`, tracked in `_kv_migrations`, applied
//! once per database by [`prepare`]).

mod kv;
mod migrate;

pub use kv::Kv;
pub use migrate::prepare;

#[cfg(feature = "test-support")]
pub mod testing;

providers_core::submit_builtin!(Kv::default());
