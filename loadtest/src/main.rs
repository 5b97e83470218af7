//! Reference servers for `bench/run.sh`, measured in the same run as the host:
//!
//! - `loadtest bare <addr>`: a bare axum handler answering `POST /providers/kv/get` with the
//!   same JSON the host returns, from memory: the ceiling for any axum service.
//! - `loadtest map <addr>`: a bare axum handler doing the JSON work of `kv/get` on the memory
//!   backend: parse the body, read the value of its `key` from a `HashMap`, answer the same
//!   envelope. The reference for the host on `kv`'s memory backend.
//! - `loadtest sql <addr> <sqlite-url>`: the same handler doing the same SELECT the `kv`
//!   provider does, on the same database, with no auth, validation or instance routing: the
//!   ceiling for a host that must read storage.
//! - `loadtest rate <url> <rps> <seconds> <token> <body>`: a client, not a server. Sends
//!   `POST <url>` at a fixed rate (wrk has no rate mode), open loop: a request is sent on its
//!   tick whether or not the earlier ones were answered, so a stalled server cannot slow the
//!   client down and hide its stall. Prints `sent p50 p99 p999` (microseconds, each from the
//!   moment its request was sent).

use std::sync::Arc;

use anyhow::{Context, bail};
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::post;
use serde_json::{Value, json};
use sqlx::{AnyPool, Row};

/// The host's allocator, so the references compare like with like.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

type Map = Arc<std::collections::HashMap<String, Value>>;

async fn lookup(State(map): State<Map>, body: axum::body::Bytes) -> axum::response::Response {
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return axum::http::StatusCode::BAD_REQUEST.into_response();
    };
    let key = request["key"].as_str().unwrap_or_default();
    match map.get(key) {
        Some(value) => axum::Json(json!({
            "data": {"key": key, "value": value, "etag": "1"},
            "request_id": uuid_like(),
        }))
        .into_response(),
        None => axum::http::StatusCode::NOT_FOUND.into_response(),
    }
}

/// Open-loop requests at `rps` for `seconds` (after one second of warm-up).
async fn rate(url: &str, rps: u32, seconds: u64, token: &str, body: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let send = || {
        let request = client
            .post(url)
            .header("content-type", "application/json")
            .bearer_auth(token)
            .body(body.to_owned())
            .send();
        // Timed from here, not from the tick: tokio's timers fire up to a millisecond late,
        // which would be counted against every server alike.
        let sent = std::time::Instant::now();
        async move {
            let ok = matches!(request.await, Ok(r) if r.status().is_success());
            (ok, sent.elapsed())
        }
    };
    let period = std::time::Duration::from_secs(1) / rps.max(1);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let warmup = u64::from(rps);
    let total = warmup + u64::from(rps) * seconds;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        tick.tick().await;
        let request = send();
        tasks.spawn(async move { (i >= warmup, request.await) });
    }
    let mut latencies = Vec::with_capacity(total as usize);
    let mut failed = 0u64;
    while let Some(done) = tasks.join_next().await {
        let (measured, (ok, took)) = done?;
        failed += u64::from(!ok);
        if measured {
            latencies.push(took.as_micros() as u64);
        }
    }
    if failed > 0 {
        bail!("{failed} of {total} requests to {url} failed");
    }
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    #[allow(clippy::print_stdout, reason = "the figures are this mode's output")]
    {
        println!("{} {} {} {}", latencies.len(), at(0.5), at(0.99), at(0.999));
    }
    Ok(())
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
        [mode, addr] if mode == "map" => {
            let values: Map = Arc::new(
                [(
                    "bench".to_owned(),
                    json!({"sku": "A-100", "qty": 42, "warehouse": "north"}),
                )]
                .into(),
            );
            (
                Router::new()
                    .route("/providers/kv/get", post(lookup))
                    .with_state(values),
                addr,
            )
        }
        [mode, url, rps, seconds, token, body] if mode == "rate" => {
            return rate(
                url,
                rps.parse().context("rps")?,
                seconds.parse().context("seconds")?,
                token,
                body,
            )
            .await;
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
        _ => bail!(
            "usage: loadtest bare <addr> | loadtest map <addr> | loadtest sql <addr> <sqlite-url> \
             | loadtest rate <url> <rps> <seconds> <token> <body>"
        ),
    };
    let listener = tokio::net::TcpListener::bind(addr.as_str()).await?;
    axum::serve(listener, router).await?;
    Ok(())
}
