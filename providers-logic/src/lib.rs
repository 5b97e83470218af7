//! Builtin business providers.
//!
//! [`Uid`], unique identification and lifecycle traceability (the builtin service `uid`);
//! [`Rules`], business rules in CEL (`rules`); [`PurchaseOrders`], purchase orders with
//! amendments and an ERP sync outbox (`purchase-orders`). Like every provider crate this one
//! depends on `providers-core` and not on other provider crates; the providers get the host's
//! system database as a resource at connect, scope every row by tenant, and own their
//! migrations (`migrations/`, tracked in `_logic_migrations`). One provider reaches another
//! only by name through the call context, under the caller's permissions.

mod migrate;
pub mod purchase_orders;
pub mod rules;
pub mod uid;

pub use migrate::prepare;
pub use purchase_orders::PurchaseOrders;
pub use rules::Rules;
pub use uid::Uid;

providers_core::submit_builtin!(Uid::default());
providers_core::submit_builtin!(Rules::default());
providers_core::submit_builtin!(PurchaseOrders::default());
