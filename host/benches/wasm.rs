//! Cost of WebAssembly component providers, as ratios against references measured in the
//! same run, written to `bench/wasm-results.md`.
//!
//! Run: `cargo bench -p provider-host --bench wasm` (it builds `examples/wasm-pricing` for
//! wasm32-wasip2 with the `guest` profile first). The work is one pricing `quote` of a
//! 256-byte order, through:
//! - `compiled in`: the same pricing crate linked into the host as a builtin provider;
//! - `wasm provider`: the component as the host runs it, through a tenant's reused instance;
//! - both again through the host's router in process (JWT, validation, envelope);
//! - a new tenant's first call (instantiate, connect, execute) against wasmtime alone doing
//!   the same instantiate + connect + execute;
//! - loading the component from the compile cache against compiling it;
//! - 10 tenants against 10,000 tenants: resident memory and p99 of a call.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    reason = "a benchmark binary"
)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::http::Request;
use http_body_util::BodyExt;
use provider_host::plugins::wasm::{Origin, WasmEngine, WasmSettings, reference};
use provider_host::{Host, config, http};
use providers_core::semver::Version;
use providers_core::{
    CallContext, ConnectContext, Descriptor, FnFactory, MemoryStore, Provider, ProviderError,
    Registry, async_trait,
};
use providers_security::TokenIssuer;
use serde_json::{Value, json};
use tower::ServiceExt;
use wasm_pricing::pricing::{self, PriceList};

mod support;
use support::measure;

const SECRET: &str = "bench-secret-bench-secret-bench-secret-0123";

/// The pricing logic compiled in, as a builtin would be.
#[derive(Default)]
struct Compiled {
    list: Option<PriceList>,
}

fn compiled_descriptor() -> Descriptor {
    let mut d = pricing::descriptor("1.0.0");
    d["service"] = json!("compiled");
    for a in d["actions"].as_array_mut().unwrap() {
        let name = a["name"].as_str().unwrap().to_owned();
        a["permission"] = json!(format!("compiled.{name}"));
    }
    let mut d: Descriptor = serde_json::from_value(d).unwrap();
    d.version = Version::new(1, 0, 0);
    d
}

#[async_trait]
impl Provider for Compiled {
    fn descriptor(&self) -> Descriptor {
        compiled_descriptor()
    }
    async fn connect(&mut self, ctx: &ConnectContext) -> Result<(), ProviderError> {
        self.list = Some(
            PriceList::from_config(ctx.config())
                .map_err(|e| ProviderError::validation(e.to_string()))?,
        );
        Ok(())
    }
    async fn execute(
        &self,
        action: &str,
        payload: Value,
        _: &CallContext,
    ) -> Result<Value, ProviderError> {
        let list = self.list.as_ref().unwrap();
        pricing::execute(list, action, &payload)
            .map_err(|e| ProviderError::validation(e.to_string()))
    }
}

fn price_config() -> Value {
    json!({"currency": "EUR", "tax_rate": "0.19",
        "prices": {"BOLT-M8": "0.35", "PANEL-A4": "12.50", "HINGE": "3.20", "NUT-M8": "0.05"},
        "discounts": [{"min_quantity": 100, "percent": 5}]})
}

/// A 256-byte order.
fn order() -> Value {
    let v = json!({"lines": [
        {"sku": "BOLT-M8", "quantity": 120}, {"sku": "PANEL-A4", "quantity": "2.5"},
        {"sku": "HINGE", "quantity": 8}, {"sku": "NUT-M8", "quantity": 1000},
        {"sku": "BOLT-M8", "quantity": "12.125"}, {"sku": "HINGE", "quantity": 3}],
        "reference": "PO-2026-000123-ACME-NORTH-WAREHO"});
    assert_eq!(v.to_string().len(), 256, "{}", v.to_string().len());
    v
}

fn build_component() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&root)
            .args([
                "build",
                "--quiet",
                "--locked",
                "--profile",
                "guest",
                "--target",
                "wasm32-wasip2",
                "-p",
                "wasm-pricing",
            ])
            .status()
            .unwrap();
    assert!(status.success(), "building wasm-pricing");
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    target.join("wasm32-wasip2/guest/wasm_pricing.wasm")
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p) as usize]
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let component = build_component();
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(&component, plugins.join("pricing.wasm")).unwrap();
    let sha = provider_host::plugins::manifest::sha256_file(&plugins.join("pricing.wasm")).unwrap();
    std::fs::write(
        plugins.join("pricing.plugin.toml"),
        format!("name = \"pricing\"\nversion = \"1.0.0\"\nkind = \"wasm\"\nfile = \"pricing.wasm\"\nsha256 = \"{sha}\"\ncontract = \"1.0.0\"\n"),
    )
    .unwrap();
    let tenants = 10_000usize;
    let settings = WasmSettings {
        memory: 64 << 20,
        instances: tenants as u32 + 100,
        per_tenant: 4,
        cache_dir: dir.path().join("cache"),
        // As the config below gives it, so the host shares this engine (and its pool).
        http_max_body: 4 << 20,
        fuel: false,
    };

    // Cached load against compile, on the engine the host will use.
    let engine = WasmEngine::shared(&settings).unwrap();
    let cwasm = || {
        std::fs::read_dir(&settings.cache_dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    let mut compile = Vec::new();
    for _ in 0..3 {
        for f in cwasm() {
            std::fs::remove_file(f).unwrap();
        }
        let start = Instant::now();
        let (_, origin) = engine
            .component(&plugins.join("pricing.wasm"), &sha)
            .unwrap();
        compile.push(start.elapsed().as_secs_f64() * 1e3);
        assert_eq!(origin, Origin::Compiled);
    }
    let mut cached = Vec::new();
    for _ in 0..20 {
        let start = Instant::now();
        let (_, origin) = engine
            .component(&plugins.join("pricing.wasm"), &sha)
            .unwrap();
        cached.push(start.elapsed().as_secs_f64() * 1e3);
        assert_eq!(origin, Origin::Cache);
    }
    let (compile_ms, cached_ms) = (percentile(compile, 0.5), percentile(cached, 0.5));

    // The host, serving the component and the compiled-in logic side by side.
    let text = format!(
        r#"
[storage]
url = "sqlite://{dir}/bench.db"
[plugins]
dirs = ["{plugins}"]
cache_dir = "{cache}"
wasm_memory = "64MiB"
wasm_instances = {instances}
[security]
issuer = "bench"
audience = "providers"
[[security.keys]]
algorithm = "HS256"
secret = "${{env:BENCH_SECRET}}"
[security.roles]
caller = ["pricing.*", "compiled.*"]
[[providers]]
service = "kv"
[[providers]]
service = "pricing"
config = {config}
[[providers]]
service = "compiled"
config = {config}
[tenants.bench]
services = ["kv", "pricing", "compiled"]
"#,
        dir = dir.path().display(),
        plugins = plugins.display(),
        cache = settings.cache_dir.display(),
        instances = settings.instances,
        config = r#"{ currency = "EUR", tax_rate = "0.19", prices = { BOLT-M8 = "0.35", PANEL-A4 = "12.50", HINGE = "3.20", NUT-M8 = "0.05" }, discounts = [{ min_quantity = 100, percent = 5 }] }"#,
    );
    let mut registry = Registry::builder().with_builtins().unwrap();
    registry
        .add(Arc::new(FnFactory::new("bench", || {
            Box::new(Compiled::default()) as Box<dyn Provider>
        })))
        .unwrap();
    let env = |n: &str| (n == "BENCH_SECRET").then(|| SECRET.to_owned());
    let config = config::load_str(&text, "bench.toml", dir.path(), &registry.build(), &env)
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert!(
        config.loaded_plugins.refused.is_empty(),
        "{:?}",
        config.loaded_plugins.refused
    );
    let wasm_factory = config.services["pricing"].factory.clone();
    let issuer = TokenIssuer::new(&config.keys, config.token.clone()).unwrap();
    let token = issuer
        .mint("bench", "bench", &["caller".into()], 3600)
        .unwrap();
    let host = rt.block_on(Host::start(config)).unwrap();
    let router = http::router(host.clone());

    // In process: execute through a connected instance of each.
    let ctx = CallContext::new("bench", "r");
    let connect = |p: &mut Box<dyn Provider>, tenant: &str| {
        let c = ConnectContext::new(tenant, price_config())
            .with_service("pricing")
            .with_store(Arc::new(MemoryStore::default()));
        rt.block_on(p.connect(&c)).unwrap();
    };
    let mut compiled: Box<dyn Provider> = Box::new(Compiled::default());
    connect(&mut compiled, "bench");
    let mut wasm = wasm_factory.create().unwrap();
    connect(&mut wasm, "bench");
    let (a, b) = (
        rt.block_on(compiled.execute("quote", order(), &ctx))
            .unwrap(),
        rt.block_on(wasm.execute("quote", order(), &ctx)).unwrap(),
    );
    assert_eq!(a, b, "the component and the compiled-in logic agree");
    let direct = measure(&rt, || async {
        std::hint::black_box(compiled.execute("quote", order(), &ctx).await.unwrap());
    });
    let in_wasm = measure(&rt, || async {
        std::hint::black_box(wasm.execute("quote", order(), &ctx).await.unwrap());
    });
    // The boundary alone: an action that does next to nothing (`prices` returns the list).
    let direct_small = measure(&rt, || async {
        std::hint::black_box(compiled.execute("prices", json!({}), &ctx).await.unwrap());
    });
    let wasm_small = measure(&rt, || async {
        std::hint::black_box(wasm.execute("prices", json!({}), &ctx).await.unwrap());
    });
    // The host's pipeline without HTTP (permission, validation, instance, deadline, guard).
    let identity = providers_security::Identity {
        subject: "bench".into(),
        tenant: "bench".into(),
        roles: Arc::from(["caller".to_owned()]),
        company_id: None,
    };
    let host_call = |service: &'static str| {
        let (host, identity) = (host.clone(), identity.clone());
        async move {
            let ctx = host.context(identity, "r");
            std::hint::black_box(host.call(ctx, service, "quote", order()).await.unwrap());
        }
    };
    let call_compiled = measure(&rt, || host_call("compiled"));
    let call_wasm = measure(&rt, || host_call("pricing"));

    // Through the router.
    let body = Bytes::from(order().to_string());
    let empty = Bytes::from_static(b"{}");
    let request = |path: &'static str| {
        let payload = if path.ends_with("/prices") {
            empty.clone()
        } else {
            body.clone()
        };
        let req = Request::post(path)
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {token}"))
            .body(Body::from(payload))
            .unwrap();
        let router = router.clone();
        async move {
            let response = router.oneshot(req).await.unwrap();
            assert!(response.status().is_success());
            std::hint::black_box(response.into_body().collect().await.unwrap().to_bytes());
        }
    };
    let http_compiled = measure(&rt, || request("/providers/compiled/quote"));
    let http_wasm = measure(&rt, || request("/providers/pricing/quote"));
    let http_compiled_small = measure(&rt, || request("/providers/compiled/prices"));
    let http_wasm_small = measure(&rt, || request("/providers/pricing/prices"));

    // A new tenant's first call, against wasmtime alone doing the same.
    let engine = WasmEngine::shared(&settings).unwrap();
    let (component_c, _) = engine
        .component(&plugins.join("pricing.wasm"), &sha)
        .unwrap();
    let prepared = rt.block_on(engine.prepare(&component_c)).unwrap();
    let (config_text, order_text) = (price_config().to_string(), order().to_string());
    let raw = measure(&rt, || async {
        std::hint::black_box(
            reference::instantiate_and_call(&engine, &prepared, &config_text, "prices", "{}").await,
        );
    });
    let _ = &order_text;
    let first_n = 2000;
    let mut kept = Vec::with_capacity(first_n);
    let start = Instant::now();
    for i in 0..first_n {
        let mut p = wasm_factory.create().unwrap();
        connect(&mut p, &format!("first-{i}"));
        std::hint::black_box(rt.block_on(p.execute("prices", json!({}), &ctx)).unwrap());
        kept.push(p);
    }
    let first = start.elapsed().as_nanos() as f64 / first_n as f64;
    drop(kept);

    // 10 tenants against 10,000: resident memory and the p99 of a call.
    let latencies = |providers: &[Box<dyn Provider>], calls: usize| -> Vec<f64> {
        let mut out = Vec::with_capacity(calls);
        for i in 0..calls {
            let p = &providers[(i * 7919) % providers.len()];
            let start = Instant::now();
            std::hint::black_box(rt.block_on(p.execute("quote", order(), &ctx)).unwrap());
            out.push(start.elapsed().as_nanos() as f64 / 1000.0);
        }
        out
    };
    let make = |n: usize, prefix: &str| -> Vec<Box<dyn Provider>> {
        (0..n)
            .map(|i| {
                let mut p = wasm_factory.create().unwrap();
                connect(&mut p, &format!("{prefix}-{i}"));
                std::hint::black_box(rt.block_on(p.execute("quote", order(), &ctx)).unwrap());
                p
            })
            .collect()
    };
    let few = make(10, "few");
    let p99_few = percentile(latencies(&few, 20_000), 0.99);
    let rss_before = rss_kib();
    let many = make(tenants, "many");
    let rss_after = rss_kib();
    let p99_many = percentile(latencies(&many, 20_000), 0.99);
    let per_tenant_kib = (rss_after.saturating_sub(rss_before)) as f64 / tenants as f64;
    drop(many);
    drop(few);
    rt.block_on(host.shutdown(Instant::now() + std::time::Duration::from_secs(5)));

    let (cores, cpu, when) = support::machine();
    let us = |ns: f64| ns / 1000.0;
    let entry = format!(
        "## {when}\n\nMachine: {cores} cores, {cpu}. One current-thread runtime; median of 7 batch means of ~100 ms unless said. The work: pricing `quote` of a 256-byte, six-line order (exact decimals), the same crate compiled in and as a component (release / `guest` profile).\n\n\
| measurement | value | reference (same run) | ratio | goal |\n| --- | ---: | ---: | ---: | --- |\n\
| `execute` of `quote` through a reused tenant instance | {:.2} µs | compiled in: {:.2} µs | {:+.2} µs | ≤ +2 µs |\n\
| `execute` of `prices` (next to no work: the boundary) | {:.2} µs | compiled in: {:.2} µs | {:+.2} µs | |\n\
| `Host::call` of `quote` (no HTTP) | {:.2} µs | compiled-in provider: {:.2} µs | {:+.2} µs | |\n\
| host router in process, `POST /providers/pricing/quote` | {:.2} µs | compiled-in provider on the same router: {:.2} µs | {:.2}× throughput | ≥ 0.90× |\n\
| host router in process, `POST /providers/pricing/prices` (the boundary) | {:.2} µs | compiled-in provider on the same router: {:.2} µs | {:.2}× throughput | |\n\
| first call of a new tenant (instantiate, connect, execute `prices`; mean of {first_n}) | {:.1} µs | wasmtime alone, instantiate + connect + execute: {:.1} µs | {:.2}× | ≤ 70 µs |\n\
| loading the component: compile cache | {:.2} ms | compiling it (Cranelift, median of 3): {:.1} ms | {:.0}× faster | ≥ 10× |\n\
| resident memory per tenant instance (10,000 tenants) | {:.0} KiB | total {:.0} MiB for 10,000 | | ≤ 1 GiB total |\n\
| p99 of a call across 10,000 tenants | {:.1} µs | across 10 tenants: {:.1} µs | {:.2}× | unchanged |\n",
        us(in_wasm),
        us(direct),
        us(in_wasm - direct),
        us(wasm_small),
        us(direct_small),
        us(wasm_small - direct_small),
        us(call_wasm),
        us(call_compiled),
        us(call_wasm - call_compiled),
        us(http_wasm),
        us(http_compiled),
        http_compiled / http_wasm,
        us(http_wasm_small),
        us(http_compiled_small),
        http_compiled_small / http_wasm_small,
        us(first),
        us(raw),
        first / raw,
        cached_ms,
        compile_ms,
        compile_ms / cached_ms,
        per_tenant_kib,
        (rss_after.saturating_sub(rss_before)) as f64 / 1024.0,
        p99_many,
        p99_few,
        p99_many / p99_few,
    );
    print!("{entry}");
    support::record(
        "wasm-results.md",
        "# WebAssembly component results\n\nWritten by `cargo bench -p provider-host --bench wasm`; newest first. Every ratio compares figures measured in the same invocation.\n\n",
        &entry,
    );
}
