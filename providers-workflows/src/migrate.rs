//! This crate's migrations, applied once per database and tracked in their own table.

use std::borrow::Cow;
use std::collections::HashSet;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, SqlSafeStr};
use tokio::sync::Mutex;

/// Databases whose migrations this process has applied, by URL (SQLite has no advisory lock).
static PREPARED: Mutex<Option<HashSet<String>>> = Mutex::const_new(None);

fn migrator(postgres: bool) -> Migrator {
    let sql = if postgres {
        [
            include_str!("../migrations/postgres/0001_workflows.sql"),
            include_str!("../migrations/postgres/0002_write_id.sql"),
        ]
    } else {
        [
            include_str!("../migrations/sqlite/0001_workflows.sql"),
            include_str!("../migrations/sqlite/0002_write_id.sql"),
        ]
    };
    let migration = |version: i64, name: &'static str, sql: &'static str| {
        Migration::new(
            version,
            Cow::Borrowed(name),
            MigrationType::Simple,
            sqlx::AssertSqlSafe(sql).into_sql_str(),
            false,
        )
    };
    let mut m = Migrator::with_migrations(vec![
        migration(1, "workflows", sql[0]),
        migration(2, "write_id", sql[1]),
    ]);
    m.dangerous_set_table_name("_workflows_migrations");
    m
}

/// Whether `pool` is on PostgreSQL (else SQLite).
pub(crate) fn is_postgres(pool: &AnyPool) -> bool {
    pool.connect_options()
        .database_url
        .as_str()
        .starts_with("postgres")
}

/// Applies this crate's migrations to the database behind `pool`, once per database per process.
pub async fn prepare(pool: &AnyPool) -> Result<(), sqlx::migrate::MigrateError> {
    let url = pool.connect_options().database_url.to_string();
    let mut prepared = PREPARED.lock().await;
    if prepared.as_ref().is_some_and(|done| done.contains(&url)) {
        return Ok(());
    }
    migrator(is_postgres(pool)).run(pool).await?;
    prepared.get_or_insert_with(HashSet::new).insert(url);
    Ok(())
}
