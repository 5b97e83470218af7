//! Reference servers for `bench/run.sh`, measured in the same run as the host:
//!
//! - `loadtest bare <addr>`: a bare axum handler answering `POST /providers/kv/get` with the
//!   same JSON the host returns, from memory: the ceiling for any axum service.
//! - `loadtest sql <addr> <sqlite-url>`: the same handler doing the same SELECT the `kv`
//!   provider does, on the same database, with no auth, validation or instance routing: the
//!   ceiling for a host that must read storage.

use std::sync::Arc;

use anyhow::{Context, bail};
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::post;
use serde_json::{Value, json};
use sqlx::{AnyPool, Row};

const BODY: &str = r#"{"data":{"key":"bench","value":{"sku":"A-100","qty":42,"warehouse":"north"},"etag":"1234567890123456789"},"request_id":"00000000-0000-4000-8000-000000000000"}"#;

async fn bare() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], BODY)
}

async fn sql(State(pool): State<Arc<AnyPool>>, body: axum::body::Bytes) -> impl IntoResponse {
    let key = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["key"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let row = sqlx::query(
        "SELECT value, etag FROM kv_entries \
         WHERE tenant = $1 AND store = $4 AND key = $2 AND (expires_at IS NULL OR expires_at > $3)",
    )
    .bind("bench")
    .bind(&key)
    .bind(now)
    .bind("kv")
    .fetch_optional(&*pool)
    .await;
    let data = match row {
        Ok(Some(row)) => {
            let value: String = row.try_get(0).unwrap_or_default();
            let etag: i64 = row.try_get(1).unwrap_or_default();
            json!({"key": key, "value": serde_json::from_str::<Value>(&value).unwrap_or(Value::Null), "etag": etag.to_string()})
        }
        _ => Value::Null,
    };
    axum::Json(json!({"data": data, "request_id": uuid_like()}))
}

fn uuid_like() -> &'static str {
    "00000000-0000-4000-8000-000000000000"
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (router, addr) = match args.as_slice() {
        [mode, addr] if mode == "bare" => {
            (Router::new().route("/providers/kv/get", post(bare)), addr)
        }
        [mode, addr, url] if mode == "sql" => {
            sqlx::any::install_default_drivers();
            let pool = sqlx::any::AnyPoolOptions::new()
                .max_connections(8)
                .connect(url)
                .await
                .with_context(|| format!("connecting to {url}"))?;
            (
                Router::new()
                    .route("/providers/kv/get", post(sql))
                    .with_state(Arc::new(pool)),
                addr,
            )
        }
        _ => bail!("usage: loadtest bare <addr> | loadtest sql <addr> <sqlite-url>"),
    };
    let listener = tokio::net::TcpListener::bind(addr.as_str()).await?;
    axum::serve(listener, router).await?;
    Ok(())
}
