//! Purchase-order pricing as a WebAssembly component.
//!
//! The tenant's config holds its price list, quantity discounts and tax rate; `quote`
//! validates the order lines and returns line totals, discount, tax and grand total.
//! Quantities are rounded to 3 decimals and money to 2, half-up on decimal values: no
//! binary float ever holds an amount. Every amount crosses as a JSON string.
//!
//! [`pricing`] is plain Rust; the component glue is compiled only for wasm32.

pub mod pricing;

#[cfg(target_arch = "wasm32")]
mod component;
