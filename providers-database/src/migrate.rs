//! This crate's migrations, applied on connect and tracked in their own table.

use std::borrow::Cow;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, SqlSafeStr};
use tokio::sync::Mutex;

/// Instances connect concurrently; SQLite has no advisory lock, so serialise here.
static MIGRATING: Mutex<()> = Mutex::const_new(());

fn migrator(postgres: bool) -> Migrator {
    let sql = if postgres {
        include_str!("../migrations/postgres/0001_kv_entries.sql")
    } else {
        include_str!("../migrations/sqlite/0001_kv_entries.sql")
    };
    let mut m = Migrator::with_migrations(vec![Migration::new(
        1,
        Cow::Borrowed("kv entries"),
        MigrationType::Simple,
        sqlx::AssertSqlSafe(sql).into_sql_str(),
        false,
    )]);
    // Each crate owns its migrations; a table of our own keeps version numbers from clashing.
    m.dangerous_set_table_name("_kv_migrations");
    m
}

pub(crate) async fn run(pool: &AnyPool) -> Result<(), sqlx::migrate::MigrateError> {
    let _guard = MIGRATING.lock().await;
    let postgres = pool
        .connect_options()
        .database_url
        .scheme()
        .starts_with("postgres");
    migrator(postgres).run(pool).await
}
