//! In-process cost of the host's call pipeline, as ratios against references measured in
//! the same run, written to `bench/pipeline-results.md`.
//!
//! Run: `cargo bench -p provider-host --bench pipeline`.
//!
//! Four measurements of the same work (a provider that returns its payload):
//! - `direct`: `Provider::execute` called directly — the floor for any host.
//! - `host.call`: `Host::call` — tenant plan, permission, schema validation, instance lookup,
//!   deadline and panic guard, but no HTTP.
//! - `bare router`: an axum router whose handler parses the JSON body and wraps it in the
//!   response envelope — the floor for any axum service doing this work.
//! - `host router`: the host's router — adds bearer-token verification, request ids, the
//!   error-shape middleware and everything of `host.call`.
//!
//! Times come from a plain loop: the figures of interest are ratios within one run on one
//! machine, for which the median of a few batch means is enough; no statistics crate needed.
//!
//! Each set is measured in a child process, observability off (no subscriber, a no-op
//! metrics recorder) and on (JSON log lines at INFO to a file, the Prometheus recorder), the
//! two interleaved over three rounds so that a drift of the machine hits both; the median of
//! the rounds is reported.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    reason = "a benchmark binary"
)]

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::Request;
use axum::routing::post;
use http_body_util::BodyExt;
use provider_host::{Host, config, http};
use providers_core::{
    Action, CallContext, Descriptor, FnFactory, Provider, ProviderError, Registry, async_trait,
};
use providers_security::{Identity, TokenIssuer};
use serde_json::{Value, json};
use tower::ServiceExt;

mod support;
use support::measure;

struct Echo;

#[async_trait]
impl Provider for Echo {
    fn descriptor(&self) -> Descriptor {
        Descriptor::new("echo", providers_core::semver::Version::new(1, 0, 0)).action(
            Action::new("echo").permission("echo.call").idempotent().input(json!({
                "type": "object",
                "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}, "warehouse": {"type": "string"}},
                "required": ["sku"]
            })),
        )
    }

    async fn execute(
        &self,
        _: &str,
        payload: Value,
        _: &CallContext,
    ) -> Result<Value, ProviderError> {
        Ok(payload)
    }
}

const SECRET: &str = "bench-secret-bench-secret-bench-secret";

fn payload() -> Value {
    json!({"sku": "A-100", "qty": 42, "warehouse": "north"})
}

const ROUNDS: usize = 3;
const NAMES: [&str; 5] = [
    "direct",
    "host_call",
    "bare_router",
    "host_router",
    "host_verifying",
];

fn main() {
    match std::env::var("PIPELINE_CHILD").ok().as_deref() {
        Some(mode) => child(mode == "on"),
        None => parent(),
    }
}

fn parent() {
    let logs = tempfile::tempdir().unwrap();
    let mut figures: std::collections::BTreeMap<(bool, &str), Vec<f64>> = Default::default();
    for round in 0..ROUNDS {
        for on in [false, true] {
            let log = logs.path().join(format!("{round}-{on}.jsonl"));
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .env("PIPELINE_CHILD", if on { "on" } else { "off" })
                .stderr(std::fs::File::create(&log).unwrap())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "child failed: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            let line: Value = serde_json::from_slice(&out.stdout).unwrap();
            for name in NAMES {
                figures
                    .entry((on, name))
                    .or_default()
                    .push(line[name].as_f64().unwrap());
            }
            if on {
                // The log is real: every request left its access line, in JSON.
                let text = std::fs::read_to_string(&log).unwrap();
                let access = text
                    .lines()
                    .filter(|l| l.contains("\"provider_host::access\""))
                    .count();
                assert!(access > 1000, "{access} access lines");
                serde_json::from_str::<Value>(text.lines().last().unwrap()).unwrap();
            }
        }
    }
    let median = |on: bool, name: &str| {
        let mut v = figures[&(on, name)].clone();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (cores, cpu, stamp) = support::machine();
    let row = |name: &str, key: &str, reference: &str| {
        let (off, on) = (median(false, key), median(true, key));
        format!(
            "| {name} | {off:.0} | {:.2} | {on:.0} | {:.2} | {:.2} |\n",
            off / median(false, reference),
            on / median(true, reference),
            off / on,
        )
    };
    let entry = format!(
        "## {stamp}\n\nMachine: {cores} cores, {cpu}. One current-thread runtime per process; median of 7 batch means of ~100 ms, then the median of {ROUNDS} interleaved rounds. *On*: JSON log lines at INFO written to a file (an access line and the request and call spans per request) and the Prometheus recorder; *off*: no subscriber and a no-op recorder.\n\n\
         | measurement | off: ns per call | × reference | on: ns per call | × reference | off ÷ on (throughput on ÷ off) |\n| --- | ---: | ---: | ---: | ---: | ---: |\n{}{}{}{}{}\n\
         Host router ÷ bare axum router, observability on: **{:.2}×** (goal ≤ 1.5×). Observability on ÷ off, host router throughput: **{:.2}×** (goal ≥ 0.95×). Host router overhead over the bare router: {:.1} µs off, {:.1} µs on.\n",
        row(
            "direct `Provider::execute` (reference for host.call)",
            "direct",
            "direct"
        ),
        row("`Host::call` (no HTTP)", "host_call", "direct"),
        row(
            "bare axum router, same JSON work (reference for host router)",
            "bare_router",
            "bare_router"
        ),
        row(
            "host router, `POST /providers/echo/echo` with JWT (one token: verified-token cache hits)",
            "host_router",
            "bare_router"
        ),
        row(
            "host router, the same with a different token per request (HS256 verified every time)",
            "host_verifying",
            "bare_router"
        ),
        median(true, "host_router") / median(true, "bare_router"),
        median(false, "host_router") / median(true, "host_router"),
        (median(false, "host_router") - median(false, "bare_router")) / 1000.0,
        (median(true, "host_router") - median(true, "bare_router")) / 1000.0,
    );
    println!("{entry}");
    let header = "# In-process pipeline results\n\nWritten by `cargo bench -p provider-host --bench pipeline`; newest first. Ratios compare runs made in the same invocation.\n\n";
    support::record("pipeline-results.md", header, &entry);
}

fn child(observed: bool) {
    // Held to the end of the measurements (it exports nothing here: no OTLP endpoint).
    let _telemetry = if observed {
        providers_observability::init(providers_observability::LogFormat::Json, Some("info"), None)
            .unwrap()
    } else {
        metrics::set_global_recorder(metrics::NoopRecorder).unwrap();
        providers_observability::Telemetry::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
[storage]
url = "sqlite://{}/bench.db"
[security]
issuer = "bench"
audience = "providers"
[[security.keys]]
algorithm = "HS256"
secret = "${{env:BENCH_SECRET}}"
[security.roles]
caller = ["echo.call"]
[[providers]]
service = "echo"
[tenants.bench]
services = ["echo"]
# A durable write per request is not pipeline work: the audit trail's cost is measured by
# bench/run.sh (audit on ÷ off).
[audit]
enabled = false
"#,
        dir.path().display()
    );
    let mut registry = Registry::builder();
    registry
        .add(Arc::new(FnFactory::new("bench", || {
            Box::new(Echo) as Box<dyn Provider>
        })))
        .unwrap();
    let env = |n: &str| (n == "BENCH_SECRET").then(|| SECRET.to_owned());
    let config =
        config::load_str(&text, "bench.toml", dir.path(), &registry.build(), &env).unwrap();
    let issuer = TokenIssuer::new(&config.keys, config.token.clone()).unwrap();
    let token = issuer
        .mint("bench", "bench", &["caller".into()], 3600)
        .unwrap();
    // More distinct tokens than the verified-token cache holds, each used in turn, so that
    // every request pays for signature verification and claim decoding.
    let tokens: Vec<String> = (0..10_000)
        .map(|i| {
            issuer
                .mint(&format!("bench-{i}"), "bench", &["caller".into()], 3600)
                .unwrap()
        })
        .collect();
    let next_token = std::cell::Cell::new(0usize);
    let host = rt.block_on(Host::start(config)).unwrap();
    let router = http::router(host.clone());
    let identity = Identity {
        subject: "bench".into(),
        tenant: "bench".into(),
        roles: Arc::from(["caller".to_owned()]),
        company_id: None,
    };
    let body = Bytes::from(payload().to_string());
    // `PIPELINE_ONLY=<name>` measures one set alone, for a profiler (`perf record`).
    let only = std::env::var("PIPELINE_ONLY").ok();
    let wanted = |name: &str| only.as_deref().is_none_or(|o| o == name);

    let direct = if !wanted("direct") {
        0.0
    } else {
        let provider: Arc<dyn Provider> = Arc::new(Echo);
        let ctx = CallContext::new("bench", "r");
        measure(&rt, || {
            let (provider, ctx) = (provider.clone(), ctx.clone());
            async move {
                std::hint::black_box(provider.execute("echo", payload(), &ctx).await.unwrap());
            }
        })
    };
    let host_call = if !wanted("host_call") {
        0.0
    } else {
        measure(&rt, || {
            let (host, identity) = (host.clone(), identity.clone());
            async move {
                let ctx = host.context(identity, "r");
                std::hint::black_box(host.call(ctx, "echo", "echo", payload()).await.unwrap());
            }
        })
    };
    let bare = Router::new().route(
        "/providers/echo/echo",
        post(|body: Bytes| async move {
            let data: Value = serde_json::from_slice(&body).unwrap();
            axum::Json(json!({"data": data, "request_id": "00000000-0000-4000-8000-000000000000"}))
        }),
    );
    let request = |router: &Router, auth: Option<&str>| {
        let mut req =
            Request::post("/providers/echo/echo").header("content-type", "application/json");
        if let Some(token) = auth {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let (router, req) = (router.clone(), req.body(Body::from(body.clone())).unwrap());
        async move {
            let response = router.oneshot(req).await.unwrap();
            assert!(response.status().is_success());
            std::hint::black_box(response.into_body().collect().await.unwrap().to_bytes());
        }
    };
    let bare_router = if wanted("bare_router") {
        measure(&rt, || request(&bare, None))
    } else {
        0.0
    };
    let host_router = if wanted("host_router") {
        measure(&rt, || request(&router, Some(&token)))
    } else {
        0.0
    };
    let host_verifying = if wanted("host_verifying") {
        measure(&rt, || {
            let i = next_token.get();
            next_token.set((i + 1) % tokens.len());
            request(&router, Some(&tokens[i]))
        })
    } else {
        0.0
    };

    println!(
        "{}",
        json!({
            "direct": direct,
            "host_call": host_call,
            "bare_router": bare_router,
            "host_router": host_router,
            "host_verifying": host_verifying,
        })
    );
}
