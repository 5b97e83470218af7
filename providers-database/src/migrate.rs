//! This crate's migrations, applied once per database and tracked in their own table.

use std::borrow::Cow;
use std::collections::HashSet;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, SqlSafeStr};
use tokio::sync::Mutex;

/// Databases whose migrations this process has applied, by URL. Instances connect
/// concurrently and SQLite has no advisory lock, so the check and the run are serialised here.
static PREPARED: Mutex<Option<HashSet<String>>> = Mutex::const_new(None);

fn migration(version: i64, description: &'static str, sql: &'static str) -> Migration {
    Migration::new(
        version,
        Cow::Borrowed(description),
        MigrationType::Simple,
        sqlx::AssertSqlSafe(sql).into_sql_str(),
        false,
    )
}

fn migrator(postgres: bool) -> Migrator {
    // The two databases need different DDL: PostgreSQL a byte-wise collation for keys,
    // SQLite a cast to count bytes. Queries are shared.
    let migrations = if postgres {
        vec![
            migration(
                1,
                "kv entries",
                include_str!("../migrations/postgres/0001_kv_entries.sql"),
            ),
            migration(
                2,
                "kv usage",
                include_str!("../migrations/postgres/0002_kv_usage.sql"),
            ),
        ]
    } else {
        vec![
            migration(
                1,
                "kv entries",
                include_str!("../migrations/sqlite/0001_kv_entries.sql"),
            ),
            migration(
                2,
                "kv usage",
                include_str!("../migrations/sqlite/0002_kv_usage.sql"),
            ),
        ]
    };
    let mut m = Migrator::with_migrations(migrations);
    // Each crate owns its migrations; a table of our own keeps version numbers from clashing.
    m.dangerous_set_table_name("_kv_migrations");
    m
}

/// Applies `kv`'s migrations to the database behind `pool`, once per database per process:
/// later calls return at once. The host calls it at start; `connect` calls it too, so a
/// provider used outside the host (tests, embedding) prepares its own tables.
pub async fn prepare(pool: &AnyPool) -> Result<(), sqlx::migrate::MigrateError> {
    let url = pool.connect_options().database_url.to_string();
    let mut prepared = PREPARED.lock().await;
    if prepared.as_ref().is_some_and(|done| done.contains(&url)) {
        return Ok(());
    }
    let postgres = url.starts_with("postgres");
    migrator(postgres).run(pool).await?;
    prepared.get_or_insert_with(HashSet::new).insert(url);
    Ok(())
}
