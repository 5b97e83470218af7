//! This crate's migrations, applied once per database and tracked in their own table.

use std::borrow::Cow;
use std::collections::HashSet;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, SqlSafeStr};
use tokio::sync::Mutex;

/// Databases whose migrations this process has applied, by URL (SQLite has no advisory lock).
static PREPARED: Mutex<Option<HashSet<String>>> = Mutex::const_new(None);

fn migrator() -> Migrator {
    let mut m = Migrator::with_migrations(vec![
        Migration::new(
            1,
            Cow::Borrowed("uid"),
            MigrationType::Simple,
            sqlx::AssertSqlSafe(include_str!("../migrations/0001_uid.sql")).into_sql_str(),
            false,
        ),
        Migration::new(
            2,
            Cow::Borrowed("purchase orders"),
            MigrationType::Simple,
            sqlx::AssertSqlSafe(include_str!("../migrations/0002_purchase_orders.sql"))
                .into_sql_str(),
            false,
        ),
        Migration::new(
            3,
            Cow::Borrowed("purchase order keys"),
            MigrationType::Simple,
            sqlx::AssertSqlSafe(include_str!("../migrations/0003_purchase_order_keys.sql"))
                .into_sql_str(),
            false,
        ),
    ]);
    m.dangerous_set_table_name("_logic_migrations");
    m
}

/// Applies this crate's migrations to the database behind `pool`, once per database per process.
pub async fn prepare(pool: &AnyPool) -> Result<(), sqlx::migrate::MigrateError> {
    let url = pool.connect_options().database_url.to_string();
    let mut prepared = PREPARED.lock().await;
    if prepared.as_ref().is_some_and(|done| done.contains(&url)) {
        return Ok(());
    }
    migrator().run(pool).await?;
    prepared.get_or_insert_with(HashSet::new).insert(url);
    Ok(())
}

/// The host's system database from `ctx`, with this crate's tables in place: what each of the
/// crate's providers needs at connect. `provider` names it in the errors.
pub(crate) async fn connected_pool(
    ctx: &providers_core::ConnectContext,
    provider: &str,
) -> Result<AnyPool, providers_core::ProviderError> {
    use providers_core::ProviderError;
    let pool = ctx.resource::<AnyPool>().cloned().ok_or_else(|| {
        ProviderError::unavailable(format!(
            "{provider} needs the host's system database, which was not provided"
        ))
    })?;
    prepare(&pool).await.map_err(|e| {
        tracing::error!(error = %e, provider, "migrations failed");
        ProviderError::unavailable(format!(
            "{provider} storage could not be prepared; the host log has the cause"
        ))
    })?;
    Ok(pool)
}
