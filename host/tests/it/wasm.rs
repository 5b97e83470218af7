//! WebAssembly components through the real router: the pricing example, and the sandbox's
//! containment (deadlines, memory, stack, traps, tenant isolation of memory and store,
//! abandoned calls, outbound HTTP), each checked while another tenant keeps being served.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use provider_host::{Host, http};
use providers_core::{ErrorCode, Registry};
use providers_security::TokenIssuer;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::plugins::{stage_wasm, wasm_built};
use crate::support::{App, Counters, assert_error, env, matrix, serve};

fn builtins() -> Registry {
    Registry::builder().with_builtins().unwrap().build()
}

/// A plugin folder with the pricing example and the fixture, and a cache folder.
struct Staged {
    dir: tempfile::TempDir,
    cache: Cache,
}

/// The compile cache the tests share (each component is compiled once per test run), or
/// a test's own.
enum Cache {
    Shared(std::path::PathBuf),
    Own(tempfile::TempDir),
}

impl Cache {
    fn path(&self) -> &Path {
        match self {
            Cache::Shared(p) => p,
            Cache::Own(t) => t.path(),
        }
    }
}

/// Staged with a compile cache of its own.
fn staged_alone() -> Staged {
    Staged {
        cache: Cache::Own(tempfile::tempdir().unwrap()),
        ..staged()
    }
}

fn staged() -> Staged {
    let b = wasm_built();
    let dir = tempfile::tempdir().unwrap();
    stage_wasm(
        dir.path(),
        &b.dir.join("pricing.wasm"),
        "pricing",
        "1.0.0",
        "pricing.wasm",
    );
    stage_wasm(
        dir.path(),
        &b.dir.join("fixture.wasm"),
        "fixture",
        "1.0.0",
        "fixture.wasm",
    );
    Staged {
        dir,
        cache: Cache::Shared(b.dir.join("cache")),
    }
}

/// A config serving kv, pricing and the fixture (twice: `fixture` with a short deadline and
/// a small memory limit, `patient` with neither); `extra` goes before the tenants.
fn text(db: &str, s: &Staged, plugins: &str, extra: &str) -> String {
    format!(
        r#"
[server]
request_timeout = "5s"
ready_cache = "1ms"

[storage]
url = "{db}"

[plugins]
dirs = ["{dir}"]
cache_dir = "{cache}"
wasm_memory = "32MiB"
wasm_instances = 64
wasm_instances_per_tenant = 2
{plugins}

[security]
issuer = "test-issuer"
audience = "providers"

[[security.keys]]
algorithm = "HS256"
secret = "${{env:TEST_JWT_SECRET}}"

[security.roles]
clerk = ["pricing.*", "fixture.*", "patient.*", "kv.*"]
outsider = ["fixture.*"]

[[providers]]
service = "kv"
required = true

[[providers]]
service = "pricing"
config = {{ currency = "EUR", tax_rate = "0.19", prices = {{ BOLT = "0.35", PANEL = "12.50" }}, discounts = [{{ min_quantity = 100, percent = 5 }}] }}

[[providers]]
service = "fixture"
limits = {{ timeout = "300ms", memory = "16MiB" }}
store = {{ max_keys = 2 }}

[[providers]]
service = "patient"
plugin = "fixture"
limits = {{ timeout = "30s" }}
{extra}
[tenants.acme]
services = ["kv", "pricing", "fixture", "patient"]

[tenants.globex]
services = ["kv", "pricing", "fixture", "patient"]

[tenants.globex.providers.pricing]
prices = {{ BOLT = "0.30" }}
"#,
        dir = s.dir.path().display(),
        cache = s.cache.path().display(),
    )
}

fn load(
    text: &str,
) -> Result<provider_host::config::Config, Vec<provider_host::config::ConfigError>> {
    provider_host::config::load_str(text, "wasm.toml", Path::new("."), &builtins(), &env)
}

async fn app(db: providers_database::testing::TestDatabase, text: &str) -> App {
    let config = load(text).unwrap_or_else(|e| panic!("{e:?}"));
    assert!(
        config.loaded_plugins.refused.is_empty(),
        "{:?}",
        config.loaded_plugins.refused
    );
    let issuer = TokenIssuer::new(&config.keys, config.token.clone()).unwrap();
    let host = Host::start(config).await.unwrap();
    App {
        router: http::router(host.clone()),
        host,
        counters: Arc::new(Counters::default()),
        issuer,
        _db: db,
    }
}

async fn on(db: providers_database::testing::TestDatabase, s: &Staged, extra: &str) -> App {
    let text = text(&db.url, s, "", extra);
    app(db, &text).await
}

async fn stop(app: &App) {
    app.host
        .shutdown(Instant::now() + Duration::from_secs(5))
        .await;
}

/// Globex pings `fixture` until `done` flips, asserting every call succeeds; returns how many.
fn keep_calling(
    app: &Arc<App>,
    done: &Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<usize> {
    let (app, done) = (app.clone(), done.clone());
    let token = app.token("globex", &["clerk"]);
    tokio::spawn(async move {
        let mut n = 0;
        while !done.load(std::sync::atomic::Ordering::Acquire) {
            let r = app.post(Some(&token), "fixture/ping", json!({})).await;
            assert_eq!(
                r.status, 200,
                "another tenant's call failed meanwhile: {}",
                r.body
            );
            assert_eq!(r.body["data"], json!({"pong": true, "tenant": "globex"}));
            n += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        n
    })
}

matrix!(
    pricing_quotes_from_the_tenants_price_list,
    the_store_of_one_tenant_is_invisible_to_another,
);

async fn pricing_quotes_from_the_tenants_price_list(db: providers_database::testing::TestDatabase) {
    let s = staged();
    let app = on(db, &s, "").await;
    let lines = json!({"lines": [
        {"sku": "BOLT", "quantity": "120"},
        {"sku": "PANEL", "quantity": 2.0005},
    ]});
    let acme = app.token("acme", &["clerk"]);
    let r = app.post(Some(&acme), "pricing/quote", lines.clone()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let q = &r.body["data"];
    // 120 × 0.35 = 42.00, 5 % off = 2.10 → 39.90; 2.0005 → 2.001 (half-up) × 12.50 = 25.0125 → 25.01.
    assert_eq!(q["lines"][0]["net"], "39.90");
    assert_eq!(q["lines"][1]["quantity"], "2.001");
    assert_eq!(q["lines"][1]["net"], "25.01");
    assert_eq!(q["subtotal"], "64.91");
    // 64.91 × 0.19 = 12.3329 → 12.33.
    assert_eq!(q["tax"], "12.33");
    assert_eq!(q["total"], "77.24");
    // Globex's override changes its bolt price only.
    let globex = app.token("globex", &["clerk"]);
    let r = app.post(Some(&globex), "pricing/quote", lines).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["data"]["lines"][0]["unit_price"], "0.30");
    assert_eq!(r.body["data"]["lines"][0]["net"], "34.20");
    assert_eq!(r.body["data"]["lines"][1]["net"], "25.01");
    // A bad line is named; the instance keeps serving.
    let r = app
        .post(
            Some(&acme),
            "pricing/quote",
            json!({"lines": [{"sku": "BOLT", "quantity": 1}, {"sku": "NUT", "quantity": 1}]}),
        )
        .await;
    assert_eq!(
        assert_error(&r, 400, ErrorCode::ValidationError),
        "lines[1].sku: 'NUT' is not in this price list"
    );
    let r = app.post(Some(&acme), "pricing/prices", json!({})).await;
    assert_eq!(
        r.body["data"],
        json!({"currency": "EUR", "prices": {"BOLT": "0.35", "PANEL": "12.50"}})
    );
    // The host validates the declared input schema before the guest runs.
    let r = app
        .post(Some(&acme), "pricing/quote", json!({"items": []}))
        .await;
    assert_error(&r, 400, ErrorCode::ValidationError);
    // A tenant without the permission is refused by the host.
    let outsider = app.token("acme", &["outsider"]);
    let r = app
        .post(Some(&outsider), "pricing/quote", json!({"lines": []}))
        .await;
    assert_error(&r, 403, ErrorCode::Forbidden);
    stop(&app).await;
}

async fn the_store_of_one_tenant_is_invisible_to_another(
    db: providers_database::testing::TestDatabase,
) {
    let s = staged();
    let app = on(db, &s, "").await;
    let acme = app.token("acme", &["clerk"]);
    let globex = app.token("globex", &["clerk"]);
    let r = app
        .post(
            Some(&acme),
            "fixture/put",
            json!({"key": "plan", "value": {"secret": "acme-only"}}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = app
        .post(Some(&globex), "fixture/get", json!({"key": "plan"}))
        .await;
    assert_eq!(r.body["data"], json!({"value": null}));
    let r = app
        .post(
            Some(&globex),
            "fixture/put",
            json!({"key": "plan", "value": "globex"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = app
        .post(Some(&acme), "fixture/get", json!({"key": "plan"}))
        .await;
    assert_eq!(r.body["data"]["value"], json!({"secret": "acme-only"}));
    // The same component under another service name has a store of its own.
    let r = app
        .post(Some(&acme), "patient/get", json!({"key": "plan"}))
        .await;
    assert_eq!(r.body["data"], json!({"value": null}));
    // The store's own limits hold (max_keys = 2), and nothing was written past them.
    app.post(
        Some(&acme),
        "fixture/put",
        json!({"key": "second", "value": 2}),
    )
    .await;
    let r = app
        .post(
            Some(&acme),
            "fixture/put",
            json!({"key": "third", "value": 3}),
        )
        .await;
    assert_eq!(
        assert_error(&r, 409, ErrorCode::Conflict),
        "quota exceeded: writing key 'third' would make 3 keys, more than max_keys 2 (kv config max_keys)"
    );
    let r = app
        .post(Some(&acme), "fixture/get", json!({"key": "third"}))
        .await;
    assert_eq!(r.body["data"], json!({"value": null}));
    // Nested calls act for the caller: with kv.* the fixture reads the tenant's kv, without it is refused.
    app.post(Some(&acme), "kv/set", json!({"key": "k", "value": 7}))
        .await;
    let r = app
        .post(
            Some(&acme),
            "fixture/call",
            json!({"service": "kv", "action": "get", "payload": {"key": "k"}}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["data"]["nested"]["value"], 7);
    let outsider = app.token("acme", &["outsider"]);
    let r = app
        .post(
            Some(&outsider),
            "fixture/call",
            json!({"service": "kv", "action": "get", "payload": {"key": "k"}}),
        )
        .await;
    assert_error(&r, 403, ErrorCode::Forbidden);
    stop(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infinite_loop_is_cut_at_its_deadline() {
    let s = staged();
    let app = Arc::new(on(providers_database::testing::TestDatabase::sqlite(), &s, "").await);
    let acme = app.token("acme", &["clerk"]);
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let others = keep_calling(&app, &done);
    for _ in 0..3 {
        let started = Instant::now();
        let r = app.post(Some(&acme), "fixture/spin", json!({})).await;
        let took = started.elapsed();
        assert_error(&r, 504, ErrorCode::Timeout);
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_millis(400),
            "cut at the 300 ms deadline, within +100 ms: {took:?}"
        );
        let r = app.post(Some(&acme), "fixture/ping", json!({})).await;
        assert_eq!(r.status, 200, "the next call succeeds: {}", r.body);
    }
    done.store(true, std::sync::atomic::Ordering::Release);
    assert!(
        others.await.unwrap() > 5,
        "the other tenant was served meanwhile"
    );
    stop(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stack_and_traps_are_contained() {
    let s = staged();
    // Globex may use less memory than the provider allows.
    let extra = "[tenants.globex.limits]\nmemory = \"4MiB\"\n";
    let db = providers_database::testing::TestDatabase::sqlite();
    let text = text(&db.url, &s, "", "");
    let text = text.replace(
        "[tenants.globex.providers.pricing]",
        &format!("{extra}\n[tenants.globex.providers.pricing]"),
    );
    let app = Arc::new(app(db, &text).await);
    let acme = app.token("acme", &["clerk"]);
    let cases: [(&str, Value, &str); 5] = [
        (
            "grow",
            json!({}),
            "the component exceeded its memory limit of 16777216 bytes and was stopped",
        ),
        (
            "recurse",
            json!({}),
            "the component accessed memory out of bounds (an overflow of its own stack, such as unbounded recursion, ends this way) and was stopped",
        ),
        (
            "trap",
            json!({}),
            "the component trapped: wasm trap: wasm `unreachable` instruction executed",
        ),
        (
            "panic",
            json!({}),
            "the component trapped: wasm trap: wasm `unreachable` instruction executed; it said: the fixture was told to panic",
        ),
        ("grow", json!({"mb": 8}), ""),
    ];
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let others = keep_calling(&app, &done);
    for (action, payload, expected) in cases {
        let r = app
            .post(Some(&acme), &format!("fixture/{action}"), payload.clone())
            .await;
        if expected.is_empty() {
            assert_eq!(
                r.status, 200,
                "{action} {payload} within the limit: {}",
                r.body
            );
        } else {
            let detail = assert_error(&r, 502, ErrorCode::ProviderError);
            assert_eq!(detail, expected, "{action}");
        }
        let r = app.post(Some(&acme), "fixture/echo", json!({})).await;
        assert_eq!(
            r.status, 200,
            "the next call after {action} succeeds: {}",
            r.body
        );
    }
    // The provider's limit is 16 MiB for acme (32 MiB slots); globex's own is 4 MiB.
    let globex = app.token("globex", &["clerk"]);
    let r = app
        .post(Some(&globex), "patient/grow", json!({"mb": 8}))
        .await;
    let detail = assert_error(&r, 502, ErrorCode::ProviderError);
    assert_eq!(
        detail,
        "the component exceeded its memory limit of 4194304 bytes and was stopped"
    );
    done.store(true, std::sync::atomic::Ordering::Release);
    assert!(others.await.unwrap() > 0);
    stop(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_share_no_memory_even_when_pool_slots_are_reused() {
    let s = staged();
    // A pool of 4 slots and one instance per tenant: every fresh instance reuses a slot.
    let db = providers_database::testing::TestDatabase::sqlite();
    let text = text(&db.url, &s, "", "")
        .replace("wasm_instances = 64", "wasm_instances = 4")
        .replace(
            "wasm_instances_per_tenant = 2",
            "wasm_instances_per_tenant = 1",
        );
    let app = app(db, &text).await;
    let acme = app.token("acme", &["clerk"]);
    let globex = app.token("globex", &["clerk"]);
    for round in 0..12 {
        let secret = format!("round{round}x{}", uuid_like(round));
        let r = app
            .post(Some(&acme), "patient/remember", json!({"secret": secret}))
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let r = app.post(Some(&acme), "patient/scan", json!({})).await;
        let found: Vec<String> = serde_json::from_value(r.body["data"]["found"].clone()).unwrap();
        assert!(
            found.contains(&format!("TENANTSECRET{secret}")),
            "the scan sees its own tenant's secret: {found:?}"
        );
        // Acme's instance traps: its slot goes back to the pool, secret and all.
        let r = app.post(Some(&acme), "patient/trap", json!({})).await;
        assert_error(&r, 502, ErrorCode::ProviderError);
        // Globex's instance traps too, so its next call takes a fresh instance from a slot
        // that acme's instance used.
        let r = app.post(Some(&globex), "patient/trap", json!({})).await;
        assert_error(&r, 502, ErrorCode::ProviderError);
        let r = app.post(Some(&globex), "patient/scan", json!({})).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let found: Vec<String> = serde_json::from_value(r.body["data"]["found"].clone()).unwrap();
        let leaked: Vec<&String> = found
            .iter()
            .filter(|f| f.starts_with("TENANTSECRETround"))
            .collect();
        assert!(
            leaked.is_empty(),
            "round {round}: globex's memory holds acme's secrets: {leaked:?}"
        );
    }
    stop(&app).await;
}

fn uuid_like(n: u32) -> String {
    format!("{:08x}", n.wrapping_mul(2_654_435_761))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_call_leaks_no_instance() {
    let s = staged();
    // One instance per tenant: had the abandoned call kept it, the next would wait 30 s.
    let db = providers_database::testing::TestDatabase::sqlite();
    let text = text(&db.url, &s, "", "")
        .replace(
            "wasm_instances_per_tenant = 2",
            "wasm_instances_per_tenant = 1",
        )
        .replace("request_timeout = \"5s\"", "request_timeout = \"60s\"");
    let app = app(db, &text).await;
    let (addr, stop_serving, server) = serve(&app).await;
    let acme = app.token("acme", &["clerk"]);
    let body = json!({"ms": 30000}).to_string();
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket
        .write_all(
            format!(
                "POST /providers/patient/busy HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {acme}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(socket);
    let client = reqwest::Client::new();
    let next = tokio::time::timeout(
        Duration::from_secs(10),
        client
            .post(format!("http://{addr}/providers/patient/echo"))
            .bearer_auth(&acme)
            .json(&json!({}))
            .send(),
    )
    .await
    .expect("the next call does not wait for the abandoned one")
    .unwrap();
    assert_eq!(next.status(), 200);
    let body: Value = next.json().await.unwrap();
    assert_eq!(body["data"]["calls"], 1, "a fresh instance: {body}");
    let _ = stop_serving.send(());
    let _ = server.await;
    stop(&app).await;
}

/// A tiny HTTP server on loopback answering every request with `hello from <path>`.
async fn upstream() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        for _ in 0..64 {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = socket.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]).into_owned();
                let path = request.split_whitespace().nth(1).unwrap_or("?").to_owned();
                let body = format!("hello from {path}");
                let _ = socket
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_http_reaches_allowed_hosts_only() {
    let s = staged();
    let allowed = upstream().await;
    let other = upstream().await;
    let db = providers_database::testing::TestDatabase::sqlite();
    let text = text(&db.url, &s, "", "").replace(
        "service = \"patient\"\nplugin = \"fixture\"",
        &format!("service = \"patient\"\nplugin = \"fixture\"\nallowed_hosts = [\"{allowed}\"]"),
    );
    let app = app(db, &text).await;
    let acme = app.token("acme", &["clerk"]);
    let r = app
        .post(
            Some(&acme),
            "patient/fetch",
            json!({"url": format!("http://{allowed}/stock")}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body["data"],
        json!({"status": 200, "body": "hello from /stock"})
    );
    for (url, why) in [
        (
            format!("http://{other}/stock"),
            format!("{}:{}", other.ip(), other.port()),
        ),
        (
            format!("http://localhost:{}/stock", allowed.port()),
            format!("localhost:{}", allowed.port()),
        ),
    ] {
        let r = app
            .post(Some(&acme), "patient/fetch", json!({"url": url}))
            .await;
        assert_eq!(
            assert_error(&r, 403, ErrorCode::Forbidden),
            format!(
                "outbound HTTP to {why} is not allowed: it is not in the allowed_hosts of 'patient'"
            )
        );
    }
    // `fixture` lists no host: denied by default.
    let r = app
        .post(
            Some(&acme),
            "fixture/fetch",
            json!({"url": format!("http://{allowed}/stock")}),
        )
        .await;
    assert_error(&r, 403, ErrorCode::Forbidden);
    let r = app
        .post(
            Some(&acme),
            "patient/fetch",
            json!({"url": "https://example.com/"}),
        )
        .await;
    assert_eq!(
        assert_error(&r, 400, ErrorCode::ValidationError),
        "outbound HTTP supports http:// URLs only, not 'https'"
    );
    stop(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_are_refused_when_they_do_not_check_out() {
    let b = wasm_built();
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    // A manifest whose hash is wrong, one that names the wrong service, and bytes that are
    // not a component.
    let m = stage_wasm(
        dir.path(),
        &b.dir.join("fixture.wasm"),
        "fixture",
        "1.0.0",
        "fixture.wasm",
    );
    let manifest = std::fs::read_to_string(&m).unwrap();
    let sha = manifest
        .lines()
        .find(|l| l.starts_with("sha256"))
        .unwrap()
        .to_owned();
    std::fs::write(
        &m,
        manifest.replace(&sha, &format!("sha256 = \"{}\"", "0".repeat(64))),
    )
    .unwrap();
    stage_wasm(
        dir.path(),
        &b.dir.join("fixture.wasm"),
        "impostor",
        "1.0.0",
        "impostor.wasm",
    );
    std::fs::write(dir.path().join("junk.bin"), b"\0asm\x0d\0\x01\0not really").unwrap();
    stage_wasm(
        dir.path(),
        &dir.path().join("junk.bin"),
        "junk",
        "1.0.0",
        "junk.wasm",
    );
    let config = load(&format!(
        "[storage]\nurl = \"sqlite::memory:\"\n[plugins]\ndirs = [\"{}\"]\ncache_dir = \"{}\"\nwasm_instances = 8\n[security]\nissuer = \"i\"\naudience = \"a\"\n[[security.keys]]\nalgorithm = \"HS256\"\nsecret = \"${{env:TEST_JWT_SECRET}}\"\n",
        dir.path().display(),
        cache.path().display()
    ))
    .unwrap_or_else(|e| panic!("{e:?}"));
    let mut refused: Vec<(String, String)> = config
        .loaded_plugins
        .refused
        .iter()
        .map(|r| (r.name.clone(), r.reason.clone()))
        .collect();
    refused.sort();
    assert_eq!(refused.len(), 3, "{refused:?}");
    assert_eq!(refused[0].0, "fixture");
    assert!(
        refused[0].1.starts_with("sha256 mismatch"),
        "{}",
        refused[0].1
    );
    assert_eq!(refused[1].0, "impostor");
    assert_eq!(
        refused[1].1,
        "the manifest says impostor 1.0.0, the library describes itself as fixture 1.0.0"
    );
    assert_eq!(refused[2].0, "junk");
    assert!(
        refused[2]
            .1
            .starts_with("not a valid component for this host"),
        "{}",
        refused[2].1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiled_components_are_cached_and_a_bad_cache_entry_is_compiled_again() {
    let s = staged_alone();
    let db = providers_database::testing::TestDatabase::sqlite();
    let config = load(&text(&db.url, &s, "", "")).unwrap_or_else(|e| panic!("{e:?}"));
    assert!(config.loaded_plugins.refused.is_empty());
    drop(config);
    let entries = || -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(s.cache.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
            .collect();
        v.sort();
        v
    };
    let cached = entries();
    assert_eq!(cached.len(), 2, "one artifact per component: {cached:?}");
    // Damage one: the next load notices, compiles again and serves.
    std::fs::write(&cached[0], b"garbage").unwrap();
    let text = text(&db.url, &s, "", "");
    let app = app(db, &text).await;
    let acme = app.token("acme", &["clerk"]);
    let r = app.post(Some(&acme), "fixture/ping", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = app
        .post(
            Some(&acme),
            "pricing/quote",
            json!({"lines": [{"sku": "BOLT", "quantity": 1}]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_ne!(std::fs::read(&cached[0]).unwrap(), b"garbage", "rewritten");
    stop(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_limits_are_checked_in_the_config() {
    let s = staged();
    let db = providers_database::testing::TestDatabase::sqlite();
    let base = text(&db.url, &s, "", "");
    let errors = |t: String| -> Vec<String> {
        load(&t)
            .err()
            .unwrap_or_default()
            .iter()
            .map(|e| e.message.clone())
            .collect()
    };
    let e = errors(base.replace("memory = \"16MiB\"", "memory = \"64MiB\""));
    assert_eq!(
        e,
        [
            "service 'fixture': limits.memory (67108864 bytes) exceeds plugins.wasm_memory (33554432 bytes), the size of an instance slot"
        ]
    );
    let e = errors(base.replace("memory = \"16MiB\"", "memory = \"16 parsecs\""));
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].contains("invalid size '16 parsecs': unknown unit 'parsecs'"),
        "{e:?}"
    );
    let e = errors(base.replace("service = \"kv\"\nrequired = true", "service = \"kv\"\nrequired = true\nlimits = { memory = \"1MiB\" }\nallowed_hosts = [\"example.com\"]"));
    assert_eq!(
        e,
        [
            "service 'kv': limits.memory and limits.fuel apply to wasm components only (builtin code is not sandboxed)",
            "service 'kv': `allowed_hosts` governs a plugin's outbound HTTP; builtin providers have none",
        ]
    );
    let e = errors(base.replace(
        "service = \"patient\"\nplugin = \"fixture\"",
        "service = \"patient\"\nplugin = \"fixture\"\nallowed_hosts = [\"http://example.com/\", \"*.example.com\", \"example.com:0\"]",
    ));
    assert_eq!(e.len(), 3, "{e:?}");
    assert!(e[0].ends_with("allowed_hosts entry 'http://example.com/' is not a host or host:port (no scheme, path or wildcard)"), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuel_limits_stop_a_call_that_burns_too_much() {
    let s = staged();
    let db = providers_database::testing::TestDatabase::sqlite();
    let text = text(&db.url, &s, "", "").replace(
        "limits = { timeout = \"30s\" }",
        "limits = { timeout = \"30s\", fuel = 50000000 }",
    );
    let app = app(db, &text).await;
    let acme = app.token("acme", &["clerk"]);
    let r = app.post(Some(&acme), "patient/spin", json!({})).await;
    assert_eq!(
        assert_error(&r, 502, ErrorCode::ProviderError),
        "the component ran out of fuel (limits.fuel)"
    );
    let r = app.post(Some(&acme), "patient/ping", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    stop(&app).await;
}

/// What docs/wasm-plugins.md tells a third party to do, from `plugins new --kind wasm` to a
/// call: the generated crate builds on its own and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wasm_template_builds_and_serves() {
    let work = tempfile::tempdir().unwrap();
    let crate_dir = work.path().join("greeter");
    provider_host::plugins::cli::new(
        provider_host::plugins::PluginKind::Wasm,
        "greeter",
        &crate_dir,
        "",
    )
    .unwrap();
    // The shared target folder: its wasm dependencies are built once per machine.
    let target = std::env::current_exe()
        .unwrap()
        .ancestors()
        .nth(3)
        .unwrap()
        .join("template");
    let status =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&crate_dir)
            .args([
                "build",
                "--quiet",
                "--release",
                "--target",
                "wasm32-wasip2",
                "--target-dir",
            ])
            .arg(&target)
            .status()
            .unwrap();
    assert!(status.success(), "the template builds");
    let plugins = work.path().join("plugins");
    stage_wasm(
        &plugins,
        &target.join("wasm32-wasip2/release/greeter_provider.wasm"),
        "greeter",
        "0.1.0",
        "greeter.wasm",
    );
    let db = providers_database::testing::TestDatabase::sqlite();
    let text = format!(
        "[storage]\nurl = \"{}\"\n[plugins]\ndirs = [\"{}\"]\ncache_dir = \"{}\"\nwasm_instances = 8\n[security]\nissuer = \"test-issuer\"\naudience = \"providers\"\n[[security.keys]]\nalgorithm = \"HS256\"\nsecret = \"${{env:TEST_JWT_SECRET}}\"\n[security.roles]\nuser = [\"greeter.*\"]\n[[providers]]\nservice = \"kv\"\n[[providers]]\nservice = \"greeter\"\nconfig = {{ greeting = \"Hej\" }}\n[tenants.acme]\nservices = [\"kv\", \"greeter\"]\n",
        db.url,
        plugins.display(),
        work.path().join("cache").display()
    );
    let app = app(db, &text).await;
    let t = app.token("acme", &["user"]);
    for count in 1..=2 {
        let r = app
            .post(Some(&t), "greeter/hello", json!({"name": "Ada"}))
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            r.body["data"],
            json!({"message": "Hej, Ada!", "count": count})
        );
    }
    stop(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_calls_run_side_by_side_and_nested_calls_exist_only_in_a_call() {
    let s = staged();
    let db = providers_database::testing::TestDatabase::sqlite();
    let text = text(&db.url, &s, "", "").replace(
        "[tenants.globex.providers.pricing]",
        "[tenants.globex.providers.patient]\ncall_in_connect = true\n\n[tenants.globex.providers.pricing]",
    );
    let app = Arc::new(app(db, &text).await);
    let acme = app.token("acme", &["clerk"]);
    // One instance busy for a second; a second call of the same tenant gets its own instance
    // (wasm_instances_per_tenant = 2) and returns while the first still runs.
    let busy = {
        let (app, acme) = (app.clone(), acme.clone());
        tokio::spawn(async move {
            app.post(Some(&acme), "patient/busy", json!({"ms": 1000}))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let r = app.post(Some(&acme), "patient/echo", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        !busy.is_finished(),
        "the second call did not wait for the first"
    );
    assert_eq!(busy.await.unwrap().status, 200);
    // Outside a call (here, in connect) the nested-call import is refused.
    let globex = app.token("globex", &["clerk"]);
    let r = app.post(Some(&globex), "patient/echo", json!({})).await;
    let detail = assert_error(&r, 503, ErrorCode::ProviderUnavailable);
    assert!(
        detail.contains("connect: call-provider is only available during execute"),
        "{detail}"
    );
    stop(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_each_services_wasm_instances_and_memory() {
    use crate::observability::count;
    const MIB: f64 = 1024.0 * 1024.0;
    let s = staged();
    // A service of its own: the gauges are the process's, and no other test moves this one.
    let db = providers_database::testing::TestDatabase::sqlite();
    let text = text(
        &db.url,
        &s,
        "",
        "\n[[providers]]\nservice = \"gauged\"\nplugin = \"fixture\"\nlimits = { timeout = \"30s\", memory = \"16MiB\" }\n",
    )
    .replacen(
        "services = [\"kv\", \"pricing\", \"fixture\", \"patient\"]",
        "services = [\"kv\", \"pricing\", \"fixture\", \"patient\", \"gauged\"]",
        1,
    )
    .replacen("\"patient.*\", \"kv.*\"]", "\"patient.*\", \"kv.*\", \"gauged.*\"]", 1)
        + "\n[observability]\nmetrics = \"open\"\n";
    let app = app(db, &text).await;
    let acme = app.token("acme", &["clerk"]);
    let scrape = || async {
        let r = app.get(None, "/metrics").await;
        assert_eq!(r.status, 200, "{}", r.body);
        let text = r.body.as_str().unwrap().to_owned();
        (
            count(&text, "wasm_instances", &[("service", "gauged")]),
            count(&text, "wasm_memory_bytes", &[("service", "gauged")]),
        )
    };
    assert_eq!(scrape().await, (0.0, 0.0), "nothing connected yet");
    let r = app.post(Some(&acme), "gauged/ping", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let (instances, first) = scrape().await;
    assert_eq!(instances, 1.0);
    assert!(first > 0.0 && first < 16.0 * MIB, "{first}");
    let r = app.post(Some(&acme), "gauged/grow", json!({"mb": 4})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let (instances, grown) = scrape().await;
    assert_eq!(instances, 1.0);
    assert!(
        grown >= first + 4.0 * MIB && grown <= 16.0 * MIB,
        "{first} then {grown}"
    );
    // A trap discards the instance: its memory goes with it.
    let r = app.post(Some(&acme), "gauged/trap", json!({})).await;
    assert_error(&r, 502, ErrorCode::ProviderError);
    assert_eq!(scrape().await, (0.0, 0.0));
    let r = app.post(Some(&acme), "gauged/ping", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let (instances, fresh) = scrape().await;
    assert_eq!(
        (instances, fresh),
        (1.0, first),
        "a fresh instance starts as small"
    );
    stop(&app).await;
    assert_eq!(scrape().await, (0.0, 0.0), "disconnected at shutdown");
}
