//! Helpers shared by the `kv` tests.

use providers_core::testing::TestHost;
use providers_core::{ErrorCode, ProviderError};
use providers_database::Kv;
use serde_json::Value;
use sqlx::{AnyPool, Row};

/// A `kv` instance for `tenant` on `pool`.
pub async fn connect(pool: &AnyPool, tenant: &str, config: Value) -> TestHost {
    TestHost::builder(Kv::default())
        .tenant(tenant)
        .config(config)
        .resource(pool.clone())
        .connect()
        .await
        .unwrap()
}

/// How many rows `tenant` has, expired or not.
pub async fn rows(pool: &AnyPool, tenant: &str) -> i64 {
    sqlx::query("SELECT COUNT(*) FROM kv_entries WHERE tenant = $1")
        .bind(tenant)
        .fetch_one(pool)
        .await
        .unwrap()
        .get::<i64, _>(0)
}

/// The code and detail of an error that must have happened.
pub fn code(r: Result<Value, ProviderError>) -> (ErrorCode, String) {
    let e = r.unwrap_err();
    (e.code, e.detail)
}

/// `tenant`'s usage row: (keys, bytes).
pub async fn usage(pool: &AnyPool, tenant: &str) -> (i64, i64) {
    let row = sqlx::query("SELECT keys, bytes FROM kv_usage WHERE tenant = $1")
        .bind(tenant)
        .fetch_one(pool)
        .await
        .unwrap();
    (row.get(0), row.get(1))
}
