//! Workflow steps against raw commits on the same database, written to
//! `bench/workflows-results.md`.
//!
//! Run: `cargo bench -p provider-host --bench workflows` (SQLite), with
//! `BENCH_POSTGRES_URL=postgres://…` for PostgreSQL as well.
//!
//! On each database, in one run:
//! - **commit**: one single-row `INSERT` in its own transaction (`BEGIN`, `INSERT`, `COMMIT`),
//!   one after another (the reference for a step's latency);
//! - **one-statement commit**: the same `INSERT` committing itself, one round trip (the
//!   cheapest commit either database has);
//! - **update + insert commit**: what a step writes, without the executor: one row updated
//!   (revision-checked) and one inserted in one transaction;
//! - **the call alone**: `rules/list` through `Host::call`, without a workflow;
//! - **step**: workflows of 50 call steps to a no-I/O builtin (`rules/list`) through the
//!   host's call pipeline, run by the executor one after another: (start → COMPLETED) ÷ 50,
//!   the median of 15 (the start and the claim are shared by the 50 steps; completion is polled by id
//!   every millisecond, which bounds the error to 20 µs a step);
//! - **insert rate**: single-row commits from 64 concurrent tasks (the reference for
//!   throughput);
//! - **1,000 workflows**: 1,000 workflows of 3 such steps started at once; steps completed
//!   per second from the first start to the last completion.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    reason = "a benchmark binary"
)]

use std::time::{Duration, Instant};

use provider_host::{Host, builtin_registry, config};
use providers_security::Identity;
use serde_json::json;
use sqlx::Row;

mod support;

const SECRET: &str = "bench-secret-bench-secret-bench-secret-0123";
const CHAIN: usize = 50;
const WORKFLOWS: usize = 1000;

fn definitions(dir: &std::path::Path) {
    let step = |i: usize| {
        format!(
            "\n[[steps]]\nid = \"s{i}\"\ntype = \"call\"\nservice = \"rules\"\naction = \"list\"\n"
        )
    };
    let chain: String = (0..CHAIN).map(step).collect();
    std::fs::write(
        dir.join("chain.toml"),
        format!("name = \"chain\"\nversion = 1\n{chain}"),
    )
    .unwrap();
    let three: String = (0..3).map(step).collect();
    std::fs::write(
        dir.join("three.toml"),
        format!("name = \"three\"\nversion = 1\n{three}"),
    )
    .unwrap();
}

fn config_text(url: &str, flows: &std::path::Path) -> String {
    format!(
        r#"
[storage]
url = "{url}"
builtin_max_connections = 16
[security]
issuer = "bench"
audience = "providers"
[[security.keys]]
algorithm = "HS256"
secret = "${{env:BENCH_SECRET}}"
[security.roles]
clerk = ["rules.*", "workflows.*"]
[audit]
enabled = false
[[providers]]
service = "rules"
[[providers]]
service = "workflows"
[workflows]
definitions = "{}"
poll = "10ms"
batch = 64
concurrency = 64
[tenants.acme]
services = ["rules", "workflows"]
"#,
        flows.display()
    )
}

struct Figures {
    commit_us: f64,
    auto_us: f64,
    state_us: f64,
    call_us: f64,
    step_us: f64,
    insert_rate: f64,
    step_rate: f64,
    workflow_rate: f64,
}

async fn state_counts(pool: &sqlx::AnyPool) -> i64 {
    sqlx::query("SELECT count(*) FROM wf_instances WHERE state = 'COMPLETED'")
        .fetch_one(pool)
        .await
        .unwrap()
        .get::<i64, _>(0)
}

async fn run(url: &str) -> Figures {
    let flows = tempfile::tempdir().unwrap();
    definitions(flows.path());
    let env = |n: &str| (n == "BENCH_SECRET").then(|| SECRET.to_owned());
    let config = config::load_str(
        &config_text(url, flows.path()),
        "bench.toml",
        flows.path(),
        &builtin_registry().unwrap(),
        &env,
    )
    .unwrap_or_else(|e| panic!("{e:?}"));
    let host = Host::start(config).await.unwrap();
    let pool = host.storage().builtin_pool().clone();
    sqlx::query("DROP TABLE IF EXISTS bench_raw")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE bench_raw (id TEXT PRIMARY KEY, at BIGINT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let insert = |pool: sqlx::AnyPool, id: String| async move {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("INSERT INTO bench_raw (id, at) VALUES ($1, $2)")
            .bind(id)
            .bind(1_i64)
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    };
    // Warm the pool and the tables.
    for i in 0..50 {
        insert(pool.clone(), format!("warm{i}")).await;
    }
    let started = Instant::now();
    for i in 0..500 {
        insert(pool.clone(), format!("seq{i}")).await;
    }
    let commit_us = started.elapsed().as_secs_f64() * 1e6 / 500.0;
    // The same row written by one statement that commits itself: one round trip.
    let started = Instant::now();
    for i in 0..500 {
        sqlx::query("INSERT INTO bench_raw (id, at) VALUES ($1, $2)")
            .bind(format!("auto{i}"))
            .bind(1_i64)
            .execute(&pool)
            .await
            .unwrap();
    }
    let auto_us = started.elapsed().as_secs_f64() * 1e6 / 500.0;

    // What a step writes, without the executor: one row updated and one inserted, one commit.
    for table in ["bench_state", "bench_events"] {
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS {table}")))
            .execute(&pool)
            .await
            .unwrap();
    }
    sqlx::query(
        "CREATE TABLE bench_state (id TEXT PRIMARY KEY, body TEXT NOT NULL, rev BIGINT NOT NULL)",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("CREATE TABLE bench_events (id TEXT PRIMARY KEY, body TEXT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO bench_state (id, body, rev) VALUES ('s', '{}', 0)")
        .execute(&pool)
        .await
        .unwrap();
    let body = json!({"s0": {"sets": []}, "s1": {"sets": []}}).to_string();
    let started = Instant::now();
    for i in 0..500 {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("UPDATE bench_state SET body = $1, rev = rev + 1 WHERE id = 's' AND rev = $2")
            .bind(&body)
            .bind(i64::from(i))
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::query("INSERT INTO bench_events (id, body) VALUES ($1, $2)")
            .bind(format!("e{i}"))
            .bind(&body)
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    let state_us = started.elapsed().as_secs_f64() * 1e6 / 500.0;

    let identity = Identity {
        subject: "bench".into(),
        tenant: "acme".into(),
        roles: std::sync::Arc::from(["clerk".to_owned()]),
        company_id: None,
    };
    let start = |definition: &'static str| {
        let host = host.clone();
        let identity = identity.clone();
        async move {
            let ctx = host.context(identity, "bench");
            host.call(ctx, "workflows", "start", json!({"definition": definition}))
                .await
                .unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    // The call a step makes, alone.
    let ctx = host.context(identity.clone(), "bench");
    for _ in 0..50 {
        host.call(ctx.clone(), "rules", "list", json!({}))
            .await
            .unwrap();
    }
    let started = Instant::now();
    for _ in 0..2000 {
        host.call(ctx.clone(), "rules", "list", json!({}))
            .await
            .unwrap();
    }
    let call_us = started.elapsed().as_secs_f64() * 1e6 / 2000.0;

    // Chains one after another; the median.
    let mut chains = Vec::new();
    for _ in 0..15 {
        let t = Instant::now();
        let id = start("chain").await;
        loop {
            let state: String = sqlx::query("SELECT state FROM wf_instances WHERE id = $1")
                .bind(&id)
                .fetch_one(&pool)
                .await
                .unwrap()
                .get(0);
            if state == "COMPLETED" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        chains.push(t.elapsed().as_secs_f64() * 1e6 / CHAIN as f64);
    }
    chains.sort_by(f64::total_cmp);
    let step_us = chains[chains.len() / 2];

    // Concurrent single-row commits.
    let total = 5000;
    let t = Instant::now();
    let tasks: Vec<_> = (0..64)
        .map(|w| {
            let pool = pool.clone();
            tokio::spawn(async move {
                for i in (w..total).step_by(64) {
                    insert(pool.clone(), format!("par{i}")).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let insert_rate = total as f64 / t.elapsed().as_secs_f64();

    // 1,000 workflows at once.
    let before = state_counts(&pool).await;
    let t = Instant::now();
    let starts: Vec<_> = (0..WORKFLOWS)
        .map(|_| tokio::spawn(start("three")))
        .collect();
    for s in starts {
        s.await.unwrap();
    }
    let target = before + WORKFLOWS as i64;
    while state_counts(&pool).await < target {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let took = t.elapsed().as_secs_f64();
    host.shutdown(Instant::now() + Duration::from_secs(5)).await;
    Figures {
        commit_us,
        auto_us,
        state_us,
        call_us,
        step_us,
        insert_rate,
        step_rate: (WORKFLOWS * 3) as f64 / took,
        workflow_rate: WORKFLOWS as f64 / took,
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut runs = vec![(
        "SQLite (file)",
        rt.block_on(run(&format!("sqlite://{}/bench.db", dir.path().display()))),
    )];
    if let Ok(url) = std::env::var("BENCH_POSTGRES_URL") {
        runs.push(("PostgreSQL", rt.block_on(run(&url))));
    }
    let (cores, cpu, stamp) = support::machine();
    let mut entry = format!(
        "## {stamp}\n\nMachine: {cores} cores, {cpu}. Steps call `rules/list` (no I/O) through the host's pipeline; references are raw single-row commits on the same database and pool, in the same run.\n\n\
         | database | raw commit (`BEGIN`, `INSERT`, `COMMIT`) | one-statement commit (`INSERT`) | update + insert commit | the call alone | step | step ÷ raw commit (goal ≤ 1.5) | step ÷ one-statement commit | raw inserts/s (64 tasks) | steps/s (1,000 workflows × 3) | ÷ raw (goal ≥ 0.5) | workflows/s |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    );
    for (name, f) in &runs {
        entry.push_str(&format!(
            "| {name} | {:.0} µs | {:.0} µs | {:.0} µs | {:.1} µs | {:.0} µs | {:.2} | {:.2} | {:.0} | {:.0} | {:.2} | {:.0} |\n",
            f.commit_us,
            f.auto_us,
            f.state_us,
            f.call_us,
            f.step_us,
            f.step_us / f.commit_us,
            f.step_us / f.auto_us,
            f.insert_rate,
            f.step_rate,
            f.step_rate / f.insert_rate,
            f.workflow_rate
        ));
    }
    println!("{entry}");
    let header = "# Workflow steps\n\nWritten by `cargo bench -p provider-host --bench workflows`; newest first. Each run measures raw commits and workflow steps on the same database in one run.\n\n";
    support::record("workflows-results.md", header, &entry);
}
