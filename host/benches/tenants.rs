//! The host at 10,000 tenants, against the same host at one tenant measured in the same run,
//! written to `bench/tenants-results.md`.
//!
//! Run: `cargo bench -p provider-host --bench tenants [-- TENANTS]` (default 10000).
//!
//! For each operator-visible step it reports the time at N tenants, the time at one tenant,
//! and their ratio divided by N (1.0 = linear; below 1.0 = better than linear):
//! - `check`: loading and checking a config with N tenants that each repeat one mistake
//!   (every error positioned and grouped);
//! - `connect`: the first call of every tenant to `kv`, which connects its instance;
//! - `ready`: one uncached `GET /ready` computation with every instance live;
//! - `evict`: disconnecting every instance (idle eviction).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    reason = "a benchmark binary"
)]

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use provider_host::{Host, builtin_registry, config};
use providers_security::Identity;
use serde_json::json;

mod support;

const SECRET: &str = "bench-secret-bench-secret-bench-secret-0123";

fn config_text(dir: &std::path::Path, tenants: usize, mistake: bool) -> String {
    let mut text = format!(
        r#"
[server]
ready_cache = "1ms"
[storage]
url = "sqlite://{}/bench.db"
builtin_max_connections = 8
[security]
issuer = "bench"
audience = "providers"
[[security.keys]]
algorithm = "HS256"
secret = "${{env:BENCH_SECRET}}"
[security.roles]
clerk = ["kv.*"]
[[providers]]
service = "kv"
required = true
"#,
        dir.display()
    );
    for i in 0..tenants {
        let _ = write!(text, "\n[tenants.t{i}]\nservices = [\"kv\"]\n");
        if mistake {
            let _ = write!(
                text,
                "[tenants.t{i}.providers.kv]\nmax_value_bytes = \"large\"\n"
            );
        }
    }
    text
}

struct Figures {
    check: Duration,
    connect: Duration,
    ready: Duration,
    evict: Duration,
}

fn run(rt: &tokio::runtime::Runtime, tenants: usize) -> Figures {
    let dir = tempfile::tempdir().unwrap();
    let registry = builtin_registry().unwrap();
    let env = |n: &str| (n == "BENCH_SECRET").then(|| SECRET.to_owned());

    let wrong = config_text(dir.path(), tenants, true);
    let started = Instant::now();
    let errors = config::load_str(&wrong, "bench.toml", dir.path(), &registry, &env)
        .err()
        .unwrap();
    let check = started.elapsed();
    assert_eq!(errors.len(), 1, "one grouped error: {:?}", errors.first());

    let text = config_text(dir.path(), tenants, false);
    let config = config::load_str(&text, "bench.toml", dir.path(), &registry, &env).unwrap();
    rt.block_on(async {
        let host = Host::start(config).await.unwrap();
        let started = Instant::now();
        for i in 0..tenants {
            let identity = Identity {
                subject: "bench".into(),
                tenant: format!("t{i}").into(),
                roles: std::sync::Arc::from(["clerk".to_owned()]),
                company_id: None,
            };
            let ctx = host.context(identity, "bench");
            let r = host.call(ctx, "kv", "get", json!({"key": "none"})).await;
            assert_eq!(r.unwrap_err().code, providers_core::ErrorCode::NotFound);
        }
        let connect = started.elapsed();
        assert_eq!(host.instances().connected(), tenants);

        // ready_cache is 1 ms: wait it out so the readiness below is computed, not cached.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let started = Instant::now();
        let readiness = host.readiness().await;
        let ready = started.elapsed();
        assert!(readiness.ready, "{readiness:?}");

        let started = Instant::now();
        let evicted = host.instances().evict_idle(Duration::ZERO).await;
        let evict = started.elapsed();
        assert_eq!(evicted, tenants);
        host.shutdown(Instant::now() + Duration::from_secs(5)).await;
        Figures {
            check,
            connect,
            ready,
            evict,
        }
    })
}

fn main() {
    let tenants: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let one = run(&rt, 1);
    let many = run(&rt, tenants);

    let (cores, cpu, stamp) = support::machine();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let row = |name: &str, one: Duration, many: Duration| {
        format!(
            "| {name} | {:.2} | {:.1} | {:.3} |\n",
            ms(one),
            ms(many),
            ms(many) / ms(one).max(1e-6) / tenants as f64
        )
    };
    let entry = format!(
        "## {stamp}\n\nMachine: {cores} cores, {cpu}. SQLite storage; {tenants} tenants against 1, in one run.\n\n\
         | step | 1 tenant (ms) | {tenants} tenants (ms) | ratio ÷ {tenants} (1.0 = linear) |\n| --- | ---: | ---: | ---: |\n{}{}{}{}",
        row(
            "`check`: a config whose every tenant repeats one mistake",
            one.check,
            many.check
        ),
        row(
            "`connect`: every tenant's first `kv` call",
            one.connect,
            many.connect
        ),
        row(
            "`ready`: one uncached readiness check, every instance live",
            one.ready,
            many.ready
        ),
        row(
            "`evict`: idle eviction of every instance",
            one.evict,
            many.evict
        ),
    );
    println!("{entry}");
    let header = "# Many tenants\n\nWritten by `cargo bench -p provider-host --bench tenants`; newest first. Each run measures 1 tenant and N tenants on the same machine.\n\n";
    support::record("tenants-results.md", header, &entry);
}
