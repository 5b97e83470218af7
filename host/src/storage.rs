//! The host's system database: one sqlx pool over SQLite (default) or PostgreSQL, and the host's own tables.

use std::borrow::Cow;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use sqlx::any::AnyPoolOptions;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, SqlSafeStr};

/// The system database.
#[derive(Clone)]
pub struct Storage {
    pool: AnyPool,
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
    fn as_str(self) -> &'static str {
        match self {
            InstanceEvent::Connected => "connected",
            InstanceEvent::ConnectFailed => "connect_failed",
            InstanceEvent::Disconnected => "disconnected",
        }
    }
}

fn migrator() -> Migrator {
    let mut m = Migrator::with_migrations(vec![Migration::new(
        1,
        Cow::Borrowed("instance events"),
        MigrationType::Simple,
        sqlx::AssertSqlSafe(include_str!("../migrations/0001_instance_events.sql")).into_sql_str(),
        false,
    )]);
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
    /// Opens the database at `url` and applies the host's migrations.
    pub async fn open(url: &str, max_connections: u32) -> anyhow::Result<Self> {
        sqlx::any::install_default_drivers();
        let sqlite = url.starts_with("sqlite:");
        let url = if sqlite {
            sqlite_url(url)?
        } else {
            url.to_owned()
        };
        let mut options = AnyPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10));
        if sqlite {
            // WAL lets readers and the writer proceed together; with it, NORMAL sync is durable
            // across process crashes and much cheaper per commit than FULL.
            options = options.after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query("PRAGMA synchronous = NORMAL")
                        .execute(conn)
                        .await
                        .map(|_| ())
                })
            });
        }
        let pool = options
            .connect(&url)
            .await
            .with_context(|| format!("connecting to storage {}", redact(&url)))?;
        if sqlite {
            // Persistent in the file; set once here, before the pool is busy.
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await
                .context("switching SQLite to WAL")?;
        }
        migrator()
            .run(&pool)
            .await
            .context("applying the host's storage migrations")?;
        Ok(Self { pool })
    }

    /// The pool, shared with builtin providers as a resource.
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
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
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

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
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
        let storage = Storage::open(&format!("sqlite://{}/h.db", dir.path().display()), 2)
            .await
            .unwrap();
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
