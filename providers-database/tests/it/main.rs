//! The `kv` provider against real SQLite and PostgreSQL databases.

mod kv;
