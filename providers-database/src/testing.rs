//! Fresh databases for tests: a SQLite file in a temporary folder, or a new database on the
//! PostgreSQL server named by `TEST_POSTGRES_URL` (which `scripts/test.sh` starts).

use sqlx::{AnyPool, Connection};

/// A database that lives as long as this value.
pub struct TestDatabase {
    /// Its URL.
    pub url: String,
    /// `sqlite` or `postgres`.
    pub backend: &'static str,
    _dir: Option<tempfile::TempDir>,
}

impl TestDatabase {
    /// A new, empty SQLite database file.
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("a temporary folder for the test database");
        Self {
            url: format!("sqlite://{}/test.db?mode=rwc", dir.path().display()),
            backend: "sqlite",
            _dir: Some(dir),
        }
    }

    /// A new, empty database on the test PostgreSQL server.
    ///
    /// # Panics
    /// If `TEST_POSTGRES_URL` is unset or the server refuses: storage tests must run against
    /// both backends, so a missing server is a failure, not a skip.
    pub async fn postgres() -> Self {
        let admin = std::env::var("TEST_POSTGRES_URL").expect(
            "TEST_POSTGRES_URL is not set: run the tests with scripts/test.sh, which starts PostgreSQL",
        );
        sqlx::any::install_default_drivers();
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::AnyConnection::connect(&admin)
            .await
            .expect("connecting to TEST_POSTGRES_URL");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("creating a test database");
        let _ = conn.close().await;
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        Self {
            url: format!("{base}/{name}"),
            backend: "postgres",
            _dir: None,
        }
    }

    /// Both backends, SQLite first.
    pub async fn both() -> [Self; 2] {
        [Self::sqlite(), Self::postgres().await]
    }

    /// A pool on it.
    pub async fn pool(&self) -> AnyPool {
        sqlx::any::install_default_drivers();
        sqlx::any::AnyPoolOptions::new()
            .max_connections(4)
            .connect(&self.url)
            .await
            .expect("connecting to the test database")
    }
}

/// Runs each named `async fn(TestDatabase)` once per backend, on a multi-thread runtime so
/// that races between worker threads are real: `matrix!(a_test, another);` makes
/// `a_test::sqlite` and `a_test::postgres`. The calling crate needs tokio's `macros` and
/// `rt-multi-thread` features.
#[macro_export]
macro_rules! matrix {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::testing::TestDatabase::sqlite()).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name($crate::testing::TestDatabase::postgres().await).await
            }
        }
    )*};
}
