//! `kv`'s storage on both backends: migrations applied once, errors kept out of statuses.

use providers_database::testing::TestDatabase;
use serde_json::json;
use sqlx::{AnyPool, Row};

use crate::support::connect;

async fn recorded_migrations(pool: &AnyPool) -> i64 {
    sqlx::query("SELECT COUNT(*) FROM _kv_migrations")
        .fetch_one(pool)
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn migrations_run_once_per_database() {
    for db in TestDatabase::both().await {
        let pool = db.pool().await;
        connect(&pool, "acme", json!({})).await;
        assert_eq!(recorded_migrations(&pool).await, 2, "{}", db.backend);
        // Make the database forget them: a migrator run now would apply them again (0002's
        // ALTER TABLE fails the second time) and record them again.
        sqlx::query("DELETE FROM _kv_migrations")
            .execute(&pool)
            .await
            .unwrap();
        // A new pool on the same URL, as the host's start and every later instance use.
        let again = db.pool().await;
        providers_database::prepare(&again).await.unwrap();
        let mut kv = connect(&again, "globex", json!({})).await;
        kv.call("set", json!({"key": "k", "value": 1}))
            .await
            .unwrap();
        assert_eq!(
            recorded_migrations(&again).await,
            0,
            "the migrator did not run again: {}",
            db.backend
        );
    }
}

#[tokio::test]
async fn status_hides_storage_errors() {
    for db in TestDatabase::both().await {
        let pool = db.pool().await;
        let kv = connect(&pool, "acme", json!({})).await;
        pool.close().await;
        let status = kv.status().await;
        assert_eq!(
            status.state,
            providers_core::State::Failed,
            "{}",
            db.backend
        );
        assert_eq!(
            status.detail, "kv storage is unreachable; the host log has the cause",
            "{}",
            db.backend
        );
    }
}
