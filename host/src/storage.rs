//! The host's system database: one sqlx pool over SQLite (default) or PostgreSQL, and the host's own tables.

use std::borrow::Cow;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use sqlx::any::AnyPoolOptions;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, Connection, SqlSafeStr};

use crate::config::StorageConfig;

/// The system database: the host's own pool, and a separate pool on the same database for
/// builtin providers, so that their traffic cannot take the connections the host needs.
#[derive(Clone)]
pub struct Storage {
    pool: AnyPool,
    builtin: AnyPool,
}

/// A lifecycle event of a tenant's provider instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceEvent {
    /// `connect` succeeded.
    Connected,
    /// `connect` failed.
    ConnectFailed,
    /// `disconnect` ran (after idle eviction or at shutdown).
    Disconnected,
}

impl InstanceEvent {
    /// The event's name, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceEvent::Connected => "connected",
            InstanceEvent::ConnectFailed => "connect_failed",
            InstanceEvent::Disconnected => "disconnected",
        }
    }
}

fn migrator() -> Migrator {
    let mut m = Migrator::with_migrations(vec![
        Migration::new(
            1,
            Cow::Borrowed("instance events"),
            MigrationType::Simple,
            sqlx::AssertSqlSafe(include_str!("../migrations/0001_instance_events.sql"))
                .into_sql_str(),
            false,
        ),
        Migration::new(
            2,
            Cow::Borrowed("service controls"),
            MigrationType::Simple,
            sqlx::AssertSqlSafe(include_str!("../migrations/0002_service_controls.sql"))
                .into_sql_str(),
            false,
        ),
        Migration::new(
            3,
            Cow::Borrowed("audit trail"),
            MigrationType::Simple,
            sqlx::AssertSqlSafe(include_str!("../migrations/0003_audit.sql")).into_sql_str(),
            false,
        ),
        Migration::new(
            4,
            Cow::Borrowed("token service"),
            MigrationType::Simple,
            sqlx::AssertSqlSafe(include_str!("../migrations/0004_auth.sql")).into_sql_str(),
            false,
        ),
        Migration::new(
            5,
            Cow::Borrowed("secret store"),
            MigrationType::Simple,
            sqlx::AssertSqlSafe(include_str!("../migrations/0005_secrets.sql")).into_sql_str(),
            false,
        ),
    ]);
    // Provider crates keep their own migration tables; this one is the host's.
    m.dangerous_set_table_name("_host_migrations");
    m
}

/// `sqlite://path` as sqlx wants it: the folder created and the file created on first open.
fn sqlite_url(url: &str) -> anyhow::Result<String> {
    let rest = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path != ":memory:"
        && let Some(dir) = Path::new(path)
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the storage folder '{}'", dir.display()))?;
    }
    let mode = if query.contains("mode=") {
        ""
    } else if query.is_empty() {
        "?mode=rwc"
    } else {
        "&mode=rwc"
    };
    Ok(format!("sqlite://{rest}{mode}"))
}

impl Storage {
    /// Opens the database of `config` and applies the host's migrations. An unreachable
    /// database fails at once with its real cause rather than after the pool's timeout.
    pub async fn open(config: &StorageConfig) -> anyhow::Result<Self> {
        sqlx::any::install_default_drivers();
        let sqlite = config.url.starts_with("sqlite:");
        let url = if sqlite {
            sqlite_url(&config.url)?
        } else {
            config.url.clone()
        };
        let shown = redact(&url);
        // One direct connection first: a pool retries until its acquire timeout and then
        // reports only "pool timed out", hiding "connection refused" or a wrong database name.
        match tokio::time::timeout(CONNECT_TIMEOUT, sqlx::AnyConnection::connect(&url)).await {
            Ok(Ok(conn)) => {
                let _ = conn.close().await;
            }
            Ok(Err(e)) => bail!("cannot connect to storage {shown}: {}", cause(&e)),
            Err(_) => bail!(
                "cannot connect to storage {shown}: no answer within {}s",
                CONNECT_TIMEOUT.as_secs()
            ),
        }
        let pool = |size: u32| {
            let mut options = AnyPoolOptions::new()
                .max_connections(size)
                .acquire_timeout(CONNECT_TIMEOUT);
            if sqlite {
                // WAL lets readers and the writer proceed together; with it, NORMAL sync is
                // durable across process crashes and much cheaper per commit than FULL.
                options = options.after_connect(|conn, _| {
                    Box::pin(async move {
                        sqlx::query("PRAGMA synchronous = NORMAL")
                            .execute(conn)
                            .await
                            .map(|_| ())
                    })
                });
            }
            options.connect(&url)
        };
        let pool_of =
            |e: sqlx::Error| anyhow::anyhow!("cannot connect to storage {shown}: {}", cause(&e));
        let system = pool(config.max_connections).await.map_err(pool_of)?;
        if sqlite {
            // Persistent in the file; set once here, before the pool is busy.
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&system)
                .await
                .context("switching SQLite to WAL")?;
        }
        migrator()
            .run(&system)
            .await
            .context("applying the host's storage migrations")?;
        let builtin = pool(config.builtin_max_connections)
            .await
            .map_err(pool_of)?;
        Ok(Self {
            pool: system,
            builtin,
        })
    }

    /// The pool builtin providers share, handed to them as a resource at connect.
    pub fn builtin_pool(&self) -> &AnyPool {
        &self.builtin
    }

    /// The host's own pool.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
    }

    /// Appends an instance lifecycle event.
    pub async fn record(
        &self,
        tenant: &str,
        service: &str,
        version: &str,
        event: InstanceEvent,
        detail: &str,
    ) -> Result<(), sqlx::Error> {
        let at = now_ms();
        sqlx::query(
            "INSERT INTO instance_events (id, tenant, service, version, event, detail, at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(uuid::Uuid::new_v4().to_string())
        .bind(tenant)
        .bind(service)
        .bind(version)
        .bind(event.as_str())
        .bind(detail)
        .bind(at)
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    /// Events of one tenant's service, oldest first, as `(event, version)`.
    pub async fn events(
        &self,
        tenant: &str,
        service: &str,
    ) -> Result<Vec<(String, String)>, sqlx::Error> {
        use sqlx::Row;
        let rows = sqlx::query(
            "SELECT event, version FROM instance_events WHERE tenant = $1 AND service = $2 ORDER BY at_ms, id",
        )
        .bind(tenant)
        .bind(service)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    /// Deletes instance events older than `max_age`, then all but the newest `max_rows`.
    /// Returns how many rows went.
    pub async fn prune_events(&self, max_age: Duration, max_rows: u64) -> Result<u64, sqlx::Error> {
        let cutoff =
            now_ms().saturating_sub(i64::try_from(max_age.as_millis()).unwrap_or(i64::MAX));
        let old = sqlx::query("DELETE FROM instance_events WHERE at_ms < $1")
            .bind(cutoff)
            .execute(&self.pool)
            .await?
            .rows_affected();
        // The subquery is NULL when there are fewer rows than the bound, and then nothing goes.
        let excess = sqlx::query(
            "DELETE FROM instance_events WHERE at_ms < \
             (SELECT at_ms FROM instance_events ORDER BY at_ms DESC LIMIT 1 OFFSET $1)",
        )
        .bind(i64::try_from(max_rows.saturating_sub(1)).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(old + excess)
    }

    /// How many instance events are stored.
    pub async fn event_count(&self) -> Result<i64, sqlx::Error> {
        use sqlx::Row;
        sqlx::query("SELECT COUNT(*) FROM instance_events")
            .fetch_one(&self.pool)
            .await?
            .try_get(0)
    }

    /// Every stored control, as `(tenant, service, control)`.
    pub async fn controls(&self) -> Result<Vec<(String, String, String)>, sqlx::Error> {
        use sqlx::Row;
        let rows = sqlx::query(
            "SELECT tenant, service, control FROM service_controls ORDER BY tenant, service, control",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect()
    }

    /// Who set a control (`subject@tenant`), if it is set.
    pub async fn control_setter(
        &self,
        tenant: &str,
        service: &str,
        control: &str,
    ) -> Result<Option<String>, sqlx::Error> {
        use sqlx::Row;
        let row = sqlx::query(
            "SELECT set_by FROM service_controls WHERE tenant = $1 AND service = $2 AND control = $3",
        )
        .bind(tenant)
        .bind(service)
        .bind(control)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| r.try_get(0)).transpose()
    }

    /// Sets (`on`) or clears a control; whether anything changed. Setting it again under
    /// another name records that name: the last to set a switch owns it.
    pub async fn set_control(
        &self,
        tenant: &str,
        service: &str,
        control: &str,
        on: bool,
        by: &str,
    ) -> Result<bool, sqlx::Error> {
        let done = if on {
            sqlx::query(
                "INSERT INTO service_controls (tenant, service, control, set_by, at_ms) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant, service, control) \
                 DO UPDATE SET set_by = excluded.set_by, at_ms = excluded.at_ms \
                 WHERE service_controls.set_by <> excluded.set_by",
            )
            .bind(tenant)
            .bind(service)
            .bind(control)
            .bind(by)
            .bind(now_ms())
            .execute(&self.pool)
            .await?
        } else {
            sqlx::query(
                "DELETE FROM service_controls WHERE tenant = $1 AND service = $2 AND control = $3",
            )
            .bind(tenant)
            .bind(service)
            .bind(control)
            .execute(&self.pool)
            .await?
        };
        Ok(done.rows_affected() > 0)
    }

    /// Closes both pools.
    pub async fn close(&self) {
        self.builtin.close().await;
        self.pool.close().await;
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// How long opening storage may take before start-up fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The innermost useful message of a sqlx error: its own text names the cause once, where
/// a full chain would repeat it ("error returned from database: …: …").
fn cause(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => db.message().to_owned(),
        sqlx::Error::Io(io) => io.to_string(),
        other => other.to_string(),
    }
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact("postgres://u:pw@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite://data/host.db"), "sqlite://data/host.db");
    }

    #[tokio::test]
    async fn sqlite_runs_in_wal_mode() {
        use sqlx::Row;
        let dir = tempfile::tempdir().unwrap();
        let config = StorageConfig {
            url: format!("sqlite://{}/h.db", dir.path().display()),
            ..StorageConfig::default()
        };
        let storage = Storage::open(&config).await.unwrap();
        let row = sqlx::query("PRAGMA journal_mode")
            .fetch_one(storage.pool())
            .await
            .unwrap();
        assert_eq!(row.get::<String, _>(0), "wal");
        let row = sqlx::query("PRAGMA synchronous")
            .fetch_one(storage.pool())
            .await
            .unwrap();
        assert_eq!(row.get::<i64, _>(0), 1, "NORMAL");
    }

    #[test]
    fn sqlite_urls_create_their_file() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/sub/h.db", dir.path().display());
        assert_eq!(sqlite_url(&url).unwrap(), format!("{url}?mode=rwc"));
        assert!(dir.path().join("sub").is_dir());
        assert_eq!(
            sqlite_url("sqlite://x.db?mode=ro").unwrap(),
            "sqlite://x.db?mode=ro"
        );
    }
}
