//! Native plugins through the real router: the inventory example, every refusal, panics,
//! hangs, nested calls, the plugin store and side-by-side versions, on both backends.

use std::path::Path;
use std::sync::Arc;

use provider_host::{Host, http};
use providers_core::{ErrorCode, Registry};
use providers_security::TokenIssuer;
use serde_json::{Value, json};

use crate::plugins::{built, stage, standard};
use crate::support::{App, Counters, assert_error, env, matrix};

fn builtins() -> Registry {
    Registry::builder().with_builtins().unwrap().build()
}

/// A config serving kv, inventory and fixture from `dir`; `extra` is appended.
fn text(db: &str, dir: &Path, extra: &str) -> String {
    format!(
        r#"
[server]
request_timeout = "3s"
connect_backoff = "200ms"
connect_backoff_max = "400ms"
ready_cache = "1ms"

[storage]
url = "{db}"

[plugins]
dirs = ["{dir}"]
native_threads = 8
native_threads_per_provider = 2

[security]
issuer = "test-issuer"
audience = "providers"

[[security.keys]]
algorithm = "HS256"
secret = "${{env:TEST_JWT_SECRET}}"

[security.roles]
clerk = ["inventory.*", "kv.*", "fixture.*", "sturdy.*"]
reader = ["fixture.*", "kv.read"]

[[providers]]
service = "kv"
required = true

[[providers]]
service = "inventory"
limits = {{ timeout = "10s" }}

[[providers]]
service = "fixture"
version = "^1"
limits = {{ timeout = "400ms" }}
store = {{ max_keys = 2 }}

# The same plugin under a patient deadline: a panic's backtrace (RUST_BACKTRACE in tests)
# takes longer than fixture's 400 ms to print.
[[providers]]
service = "sturdy"
plugin = "fixture"
limits = {{ timeout = "20s" }}
{extra}
[tenants.acme]
services = ["kv", "inventory", "fixture", "sturdy"]

[tenants.globex]
services = ["kv", "inventory", "fixture"]
"#,
        dir = dir.display()
    )
}

fn load(
    text: &str,
) -> Result<provider_host::config::Config, Vec<provider_host::config::ConfigError>> {
    provider_host::config::load_str(text, "native.toml", Path::new("."), &builtins(), &env)
}

async fn app(db: providers_database::testing::TestDatabase, text: &str) -> App {
    let config = load(text).unwrap_or_else(|e| panic!("{e:?}"));
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

fn plugin_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    standard(dir.path());
    dir
}

async fn on(db: providers_database::testing::TestDatabase, dir: &Path, extra: &str) -> App {
    let text = text(&db.url, dir, extra);
    app(db, &text).await
}

matrix!(
    inventory_reserves_never_oversell_and_is_tenant_scoped,
    a_panic_fails_one_request_and_the_instance_keeps_serving,
    plugin_store_and_nested_calls_act_for_the_caller_only,
);

async fn inventory_reserves_never_oversell_and_is_tenant_scoped(
    db: providers_database::testing::TestDatabase,
) {
    let dir = plugin_dir();
    let app = Arc::new(on(db, dir.path(), "").await);
    let acme = app.token("acme", &["clerk"]);
    let globex = app.token("globex", &["clerk"]);
    let r = app
        .post(
            Some(&acme),
            "inventory/receive",
            json!({"item": "bolt", "warehouse": "main", "quantity": 20}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["data"]["on_hand"], 20);
    let mut calls = Vec::new();
    for _ in 0..50 {
        let (app, acme) = (app.clone(), acme.clone());
        calls.push(tokio::spawn(async move {
            app.post(
                Some(&acme),
                "inventory/reserve",
                json!({"item": "bolt", "warehouse": "main", "quantity": 1}),
            )
            .await
        }));
    }
    let mut ok = 0;
    for call in calls {
        let r = call.await.unwrap();
        match r.status.as_u16() {
            200 => ok += 1,
            _ => {
                let detail = assert_error(&r, 409, ErrorCode::Conflict);
                assert_eq!(
                    detail,
                    "insufficient stock of 'bolt' in 'main': 0 available, 1 asked"
                );
            }
        }
    }
    assert_eq!(ok, 20, "exactly the stock is reserved");
    let levels = app.post(Some(&acme), "inventory/levels", json!({})).await;
    assert_eq!(
        levels.body["data"]["levels"],
        json!([{"item": "bolt", "warehouse": "main", "on_hand": 20, "reserved": 20, "available": 0}])
    );
    // Tenant B has its own store: none of A's stock, and its writes do not touch A's.
    let theirs = app.post(Some(&globex), "inventory/levels", json!({})).await;
    assert_eq!(theirs.body["data"]["levels"], json!([]));
    let r = app
        .post(
            Some(&globex),
            "inventory/release",
            json!({"item": "bolt", "warehouse": "main", "quantity": 1}),
        )
        .await;
    assert_eq!(
        assert_error(&r, 409, ErrorCode::Conflict),
        "cannot release 1 of 'bolt' in 'main': only 0 reserved"
    );
    let again = app.post(Some(&acme), "inventory/levels", json!({})).await;
    assert_eq!(
        again.body,
        json!({"data": levels.body["data"], "request_id": again.body["request_id"]})
    );
    // The plugin's store is not the tenant's kv store.
    let kv = app.post(Some(&acme), "kv/list", json!({})).await;
    assert_eq!(kv.body["data"]["items"], json!([]));
    app.host
        .shutdown(std::time::Instant::now() + std::time::Duration::from_secs(5))
        .await;
}

async fn a_panic_fails_one_request_and_the_instance_keeps_serving(
    db: providers_database::testing::TestDatabase,
) {
    let dir = plugin_dir();
    let app = on(db, dir.path(), "").await;
    let t = app.token("acme", &["clerk"]);
    let first = app.post(Some(&t), "sturdy/echo", json!({})).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let instance = first.body["data"]["instance"].clone();
    let r = app.post(Some(&t), "sturdy/panic", json!({})).await;
    assert_eq!(
        assert_error(&r, 502, ErrorCode::ProviderError),
        "execute panicked in the plugin: fixture panicked on purpose"
    );
    // A plugin's own tokio finds no reactor: its panic is contained like any other.
    let r = app.post(Some(&t), "sturdy/tokio_sleep", json!({})).await;
    let detail = assert_error(&r, 502, ErrorCode::ProviderError);
    assert!(
        detail.starts_with("execute panicked in the plugin: "),
        "{detail}"
    );
    assert!(detail.contains("no reactor running"), "{detail}");
    for i in 0..1000 {
        let r = app.post(Some(&t), "sturdy/echo", json!({"i": i})).await;
        assert_eq!(r.status, 200, "call {i}: {}", r.body);
        assert_eq!(r.body["data"]["payload"]["i"], i);
        assert_eq!(
            r.body["data"]["instance"], instance,
            "the same instance serves on"
        );
    }
    assert_eq!(app.host.instances().connected(), 1);
}

async fn plugin_store_and_nested_calls_act_for_the_caller_only(
    db: providers_database::testing::TestDatabase,
) {
    let dir = plugin_dir();
    let app = on(db, dir.path(), "").await;
    let clerk = app.token("acme", &["clerk"]);
    let reader = app.token("acme", &["reader"]);
    let globex = app.token("globex", &["clerk"]);
    // The store: ETags, create-only, and scoped to (tenant, service).
    let put = app
        .post(
            Some(&clerk),
            "fixture/put",
            json!({"key": "k", "value": {"n": 18446744073709551616u128}}),
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.body);
    let etag = put.body["data"]["etag"].as_str().unwrap().to_owned();
    let got = app
        .post(Some(&clerk), "fixture/get", json!({"key": "k"}))
        .await;
    assert_eq!(
        got.body["data"],
        json!({"value": {"n": 18446744073709551616u128}, "etag": etag})
    );
    let r = app
        .post(
            Some(&clerk),
            "fixture/put",
            json!({"key": "k", "value": 1, "if_absent": true}),
        )
        .await;
    assert_eq!(
        assert_error(&r, 409, ErrorCode::Conflict),
        "key 'k' already exists (if_absent)"
    );
    let r = app
        .post(
            Some(&clerk),
            "fixture/put",
            json!({"key": "k", "value": 1, "etag": "nope"}),
        )
        .await;
    assert_eq!(
        assert_error(&r, 409, ErrorCode::Conflict),
        "etag 'nope' does not match the current version of key 'k'"
    );
    let r = app
        .post(Some(&globex), "fixture/get", json!({"key": "k"}))
        .await;
    assert_eq!(assert_error(&r, 404, ErrorCode::NotFound), "no key 'k'");
    // The operator's `store` table is kv config for it: a quota of 2 keys holds at the edge.
    let r = app
        .post(
            Some(&clerk),
            "fixture/put",
            json!({"key": "k2", "value": 2}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = app
        .post(
            Some(&clerk),
            "fixture/put",
            json!({"key": "k3", "value": 3}),
        )
        .await;
    assert_eq!(
        assert_error(&r, 409, ErrorCode::Conflict),
        "quota exceeded: writing key 'k3' would make 3 keys, more than max_keys 2 (kv config max_keys)"
    );
    let r = app
        .post(Some(&clerk), "fixture/get", json!({"key": "k3"}))
        .await;
    assert_eq!(assert_error(&r, 404, ErrorCode::NotFound), "no key 'k3'");
    let r = app.post(Some(&clerk), "kv/get", json!({"key": "k"})).await;
    assert_eq!(
        assert_error(&r, 404, ErrorCode::NotFound),
        "key 'k' not found"
    );
    // Nested calls run as the caller: a clerk may write kv through the plugin, a reader may not.
    let nested =
        json!({"service": "kv", "action": "set", "payload": {"key": "via-plugin", "value": 7}});
    let r = app.post(Some(&clerk), "fixture/call", nested.clone()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["data"]["key"], "via-plugin");
    let r = app.post(Some(&reader), "fixture/call", nested).await;
    assert_eq!(
        assert_error(&r, 403, ErrorCode::Forbidden),
        "action 'kv/set' needs permission 'kv.write', which roles [\"reader\"] do not grant"
    );
    // A native provider calling another native provider: each call on its own pool thread.
    let r = app
        .post(
            Some(&clerk),
            "fixture/call",
            json!({"service": "inventory", "action": "receive", "payload": {"item": "nut", "warehouse": "main", "quantity": 3}}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["data"]["on_hand"], 3);
    let read = app
        .post(Some(&clerk), "kv/get", json!({"key": "via-plugin"}))
        .await;
    assert_eq!(read.body["data"]["value"], 7);
    // A context kept past its call cannot call out any more.
    let r = app.post(Some(&clerk), "fixture/keep", json!({})).await;
    assert_eq!(r.status, 200);
    let r = app.post(Some(&clerk), "fixture/call_kept", json!({})).await;
    assert_eq!(
        assert_error(&r, 403, ErrorCode::Forbidden),
        "cannot call 'fixture/echo': the call this context was given to has ended"
    );
    // The identity a plugin sees is the caller's, from the token.
    let echo = app.post(Some(&reader), "fixture/echo", json!({})).await;
    assert_eq!(echo.body["data"]["tenant"], "acme");
    assert_eq!(echo.body["data"]["subject"], "tester");
    assert_eq!(echo.body["data"]["roles"], json!(["reader"]));
    assert_eq!(echo.body["data"]["has_deadline"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_plugin_times_out_degrades_and_cannot_exhaust_the_pool() {
    let dir = plugin_dir();
    let db = providers_database::testing::TestDatabase::sqlite();
    let text = text(&db.url, dir.path(), "") + "\n[observability]\nmetrics = \"open\"\n";
    let app = Arc::new(app(db, &text).await);
    let t = app.token("acme", &["clerk"]);
    let started = std::time::Instant::now();
    let r = app.post(Some(&t), "fixture/hang", json!({})).await;
    let took = started.elapsed();
    assert_eq!(
        assert_error(&r, 504, ErrorCode::Timeout),
        "'fixture/hang' did not finish before its deadline; the plugin still runs it on a native thread"
    );
    assert!(
        took >= std::time::Duration::from_millis(400)
            && took < std::time::Duration::from_millis(1500),
        "{took:?}"
    );
    let listed = app.get(Some(&t), "/providers/fixture").await;
    assert_eq!(
        listed.body["status"]["state"], "degraded",
        "{}",
        listed.body
    );
    assert_eq!(
        listed.body["status"]["detail"],
        "1 call(s) ran past their deadline and still run in plugin code"
    );
    // The second hang takes the provider's last thread; then calls fail at once.
    let r = app.post(Some(&t), "fixture/hang", json!({})).await;
    assert_error(&r, 504, ErrorCode::Timeout);
    let started = std::time::Instant::now();
    let r = app.post(Some(&t), "fixture/echo", json!({})).await;
    assert_eq!(
        assert_error(&r, 503, ErrorCode::ProviderUnavailable),
        "all 2 native threads of 'fixture' are held by calls that ran past their deadline"
    );
    assert!(started.elapsed() < std::time::Duration::from_millis(200));
    // Everything else keeps answering: another native provider, the builtin, another tenant's kv.
    let r = app.post(Some(&t), "inventory/levels", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = app
        .post(Some(&t), "kv/set", json!({"key": "a", "value": 1}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let ready = app.get(None, "/ready").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    // The pool's figures: the two hung calls hold two of its eight threads, both overdue.
    // The gauges are the process's and set at scrape time, so another test's scrape can land
    // in between: look again (bounded) until this host's own figures are read.
    let mut seen = (0.0, 0.0, 0.0);
    for _ in 0..20 {
        let r = app.get(None, "/metrics").await;
        assert_eq!(r.status, 200, "{}", r.body);
        let text = r.body.as_str().unwrap();
        seen = (
            crate::observability::count(text, "native_pool_threads", &[]),
            crate::observability::count(text, "native_pool_busy", &[]),
            crate::observability::count(text, "native_pool_overdue", &[]),
        );
        if seen == (8.0, 2.0, 2.0) {
            break;
        }
    }
    assert_eq!(seen, (8.0, 2.0, 2.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn side_by_side_versions_and_a_pinned_tenant() {
    let dir = plugin_dir();
    let db = providers_database::testing::TestDatabase::sqlite();
    let pinned = text(&db.url, dir.path(), "").replace(
        "[tenants.globex]",
        "[tenants.acme.versions]\nfixture = \"=1.0.0\"\n\n[tenants.globex]",
    );
    assert!(pinned.contains("[tenants.acme.versions]"));
    let app = app(db, &pinned).await;
    let acme = app
        .post(
            Some(&app.token("acme", &["clerk"])),
            "fixture/echo",
            json!({}),
        )
        .await;
    let globex = app
        .post(
            Some(&app.token("globex", &["clerk"])),
            "fixture/echo",
            json!({}),
        )
        .await;
    assert_eq!(acme.body["data"]["version"], "1.0.0", "acme is pinned");
    assert_eq!(
        globex.body["data"]["version"], "1.1.0",
        "the others get the newest match"
    );
    let listed = app
        .get(Some(&app.token("acme", &["clerk"])), "/providers/fixture")
        .await;
    assert_eq!(listed.body["version"], "1.0.0");
    // A pin that matches nothing is a config error at its place.
    let bad = text("sqlite://unused.db", dir.path(), "").replace(
        "[tenants.globex]",
        "[tenants.acme.versions]\nfixture = \"^3\"\n\n[tenants.globex]",
    );
    let errors = load(&bad).err().unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].message.starts_with("tenant 'acme', versions.fixture: service 'fixture': no loaded version matches '^3' (loaded: 1.0.0, 1.1.0)"),
        "{}",
        errors[0]
    );
}

/// Stages the inventory example as a good plugin and `fixture` by `prepare`; returns the
/// reason fixture's calls answer with.
async fn refused(prepare: impl FnOnce(&Path)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let b = built();
    stage(
        dir.path(),
        &b.file("inventory"),
        "inventory",
        "1.0.0",
        "1.0.0",
        "inventory.so",
    );
    prepare(dir.path());
    let db = providers_database::testing::TestDatabase::sqlite();
    let text = text(&db.url, dir.path(), "");
    // Required, the refusal stops the host: `check` and `serve` fail with the reason.
    let required = text.replace(
        "service = \"fixture\"\nversion = \"^1\"",
        "service = \"fixture\"\nversion = \"^1\"\nrequired = true",
    );
    assert_ne!(required, text);
    let errors = load(&required)
        .err()
        .expect("a required refused plugin is an error");
    assert_eq!(errors.len(), 1, "{errors:?}");
    let message = errors[0].message.clone();
    assert!(
        message.starts_with("service 'fixture' is required: "),
        "{message}"
    );
    // Not required, the host serves everything else and fixture answers 503 with the reason.
    let app = app(db, &text).await;
    let t = app.token("acme", &["clerk"]);
    let r = app.post(Some(&t), "fixture/echo", json!({})).await;
    let detail = assert_error(&r, 503, ErrorCode::ProviderUnavailable);
    assert_eq!(format!("service 'fixture' is required: {detail}"), message);
    let listed = app.get(Some(&t), "/providers/fixture").await;
    assert_eq!(
        listed.body["status"],
        json!({"state": "unavailable", "detail": detail})
    );
    let r = app.post(Some(&t), "inventory/levels", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let ready = app.get(None, "/ready").await;
    assert_eq!(
        (ready.status.as_u16(), ready.body),
        (
            200,
            json!({"status": "ready", "unavailable": ["fixture", "sturdy"]})
        )
    );
    detail
}

fn fixture(dir: &Path, variant: &str, contract: &str) {
    stage(
        dir,
        &built().file(variant),
        "fixture",
        "1.0.0",
        contract,
        "fixture.so",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_file_is_refused_before_it_is_opened() {
    let detail = refused(|dir| {
        fixture(dir, "fixture-1.0.0", "1.0.0");
        let mut bytes = std::fs::read(dir.join("fixture.so")).unwrap();
        bytes.push(0);
        std::fs::write(dir.join("fixture.so"), bytes).unwrap();
    })
    .await;
    assert!(
        detail.contains("refused: plugin 'fixture' 1.0.0 ("),
        "{detail}"
    );
    assert!(
        detail.contains("fixture.so): sha256 mismatch: the manifest says "),
        "{detail}"
    );
    assert!(
        detail.ends_with("the file was changed or replaced, so it is not loaded"),
        "{detail}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_library_built_with_panic_abort_is_refused() {
    let detail = refused(|dir| fixture(dir, "fixture-abort", "1.0.0")).await;
    assert!(
        detail.ends_with("built with panic = \"abort\": a panic in it would abort the whole host; rebuild it with panic = \"unwind\" (the default)"),
        "{detail}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_contract_major_is_refused_by_manifest_and_by_library() {
    let by_manifest = refused(|dir| fixture(dir, "fixture-contract2", "2.0.0")).await;
    assert!(
        by_manifest.ends_with("built for contract 2.0.0, which is not compatible with this host's contract 1.0.0 (caret rule)"),
        "{by_manifest}"
    );
    let by_library = refused(|dir| fixture(dir, "fixture-contract2", "1.0.0")).await;
    assert!(
        by_library
            .ends_with("the manifest says contract 1.0.0, the library's descriptor says 2.0.0"),
        "{by_library}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_malformed_manifest_is_refused() {
    let missing = refused(|dir| {
        std::fs::copy(built().file("fixture-1.0.0"), dir.join("fixture.so")).unwrap();
    })
    .await;
    assert!(missing.starts_with("no provider offers service 'fixture' (available: inventory, kv, purchase-orders, rules, uid, workflows); no fixture.plugin.toml was found in "), "{missing}");
    let malformed = refused(|dir| {
        fixture(dir, "fixture-1.0.0", "1.0.0");
        let path = dir.join("fixture.plugin.toml");
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("kind = \"native\"", "kind = \"elf\"");
        std::fs::write(&path, text).unwrap();
    })
    .await;
    assert!(
        malformed.contains("refused: plugin 'fixture' ("),
        "{malformed}"
    );
    assert!(malformed.contains("fixture.plugin.toml): malformed manifest: line 3, column 8: unknown variant `elf`, expected `native` or `wasm`"), "{malformed}");
    let escaping = refused(|dir| {
        fixture(dir, "fixture-1.0.0", "1.0.0");
        let path = dir.join("fixture.plugin.toml");
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("file = \"fixture.so\"", "file = \"../fixture.so\"");
        std::fs::write(&path, text).unwrap();
    })
    .await;
    assert!(
        escaping.ends_with(
            "file = \"../fixture.so\" must be a file name beside the manifest, not a path"
        ),
        "{escaping}"
    );
}

#[test]
fn the_manifest_and_the_library_must_agree() {
    let dir = tempfile::tempdir().unwrap();
    stage(
        dir.path(),
        &built().file("fixture-1.1.0"),
        "fixture",
        "1.0.0",
        "1.0.0",
        "fixture.so",
    );
    let mut builder = builtins().to_builder();
    let loaded = provider_host::plugins::load(
        &[dir.path().to_owned()],
        &provider_host::plugins::Engines::new(
            &Default::default(),
            provider_host::plugins::NativePool::new(4, 2),
            false,
        ),
        &mut builder,
        None,
    );
    assert!(loaded.accepted.is_empty());
    assert_eq!(loaded.refused.len(), 1);
    assert_eq!(
        loaded.refused[0].reason,
        "the manifest says fixture 1.0.0, the library describes itself as fixture 1.1.0"
    );
    // A plugin may not take a builtin's name: it would serve every kv tenant, and read their stores.
    let dir = tempfile::tempdir().unwrap();
    stage(
        dir.path(),
        &built().file("fixture-1.0.0"),
        "kv",
        "9.0.0",
        "1.0.0",
        "kv.so",
    );
    let mut builder = builtins().to_builder();
    let loaded = provider_host::plugins::load(
        &[dir.path().to_owned()],
        &provider_host::plugins::Engines::new(
            &Default::default(),
            provider_host::plugins::NativePool::new(4, 2),
            false,
        ),
        &mut builder,
        None,
    );
    assert_eq!(loaded.refused.len(), 1);
    assert_eq!(
        loaded.refused[0].reason,
        "'kv' is the name of a builtin provider; a plugin cannot replace it"
    );
    let registry = builder.build();
    let kv = registry
        .resolve("kv", &providers_core::semver::VersionReq::STAR)
        .unwrap();
    assert_eq!(kv.kind(), providers_core::Kind::Builtin);
    let _: Value = json!(null);
}

#[test]
fn a_plugin_store_table_is_checked_at_load() {
    let dir = plugin_dir();
    let base = text("sqlite://unused.db", dir.path(), "");
    let typo = base.replace("store = { max_keys = 2 }", "store = { max_keyz = 2 }");
    assert_ne!(typo, base);
    let errors = load(&typo).err().unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0]
            .message
            .starts_with("service 'fixture' store at '/': ")
            && errors[0].message.contains("max_keyz"),
        "{}",
        errors[0]
    );
    assert!(errors[0].line > 0, "the error has a place: {}", errors[0]);
    let builtin = base.replace(
        "service = \"kv\"\nrequired = true",
        "service = \"kv\"\nrequired = true\nstore = { max_keys = 1 }",
    );
    assert_ne!(builtin, base);
    let errors = load(&builtin).err().unwrap();
    assert_eq!(
        errors
            .iter()
            .map(|e| e.message.as_str())
            .collect::<Vec<_>>(),
        ["service 'kv': `store` configures a plugin's own store; builtin providers have none"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_connect_past_its_deadline_is_refused_then_released() {
    let dir = plugin_dir();
    let db = providers_database::testing::TestDatabase::sqlite();
    // The connect deadline is request_timeout (3 s here); globex's connect takes 3.5 s, so the
    // host gives up on it at 3 s while the plugin still runs it.
    let text = text(&db.url, dir.path(), "")
        + "\n[tenants.globex.providers.fixture]\nconnect_sleep_ms = 3500\n";
    let app = app(db, &text).await;
    let acme = app.token("acme", &["clerk"]);
    let before = app.post(Some(&acme), "fixture/echo", json!({})).await;
    assert_eq!(before.status, 200, "{}", before.body);
    let disconnects = before.body["data"]["disconnects"].as_u64().unwrap();
    // The first call gives up at its own deadline (400 ms); the connect goes on, on its own.
    let globex = app.token("globex", &["clerk"]);
    let r = app.post(Some(&globex), "fixture/echo", json!({})).await;
    assert_eq!(
        assert_error(&r, 504, ErrorCode::Timeout),
        "'fixture/echo' did not finish before its deadline"
    );
    // When the plugin's connect finally returns, nobody waits for it: the host disconnects
    // the instance it made instead of leaking it.
    let mut released = false;
    for _ in 0..80 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let now = app.post(Some(&acme), "fixture/echo", json!({})).await;
        if now.body["data"]["disconnects"].as_u64().unwrap() > disconnects {
            released = true;
            break;
        }
    }
    assert!(released, "the late instance was disconnected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_file_changed_in_place_after_loading_changes_nothing() {
    let dir = plugin_dir();
    let db = providers_database::testing::TestDatabase::sqlite();
    let text = text(&db.url, dir.path(), "");
    let app = app(db, &text).await;
    let acme = app.token("acme", &["clerk"]);
    assert_eq!(
        app.post(Some(&acme), "fixture/echo", json!({}))
            .await
            .status,
        200
    );
    // Overwritten in place (same inode): a library mapped from this file would now run
    // garbage. The host loaded a private copy whose hash it checked, so nothing changes.
    let file = dir.path().join("fixture-1.1.0.so");
    let len = std::fs::metadata(&file).unwrap().len() as usize;
    std::fs::write(&file, vec![0xCC; len]).unwrap();
    let r = app
        .post(Some(&acme), "fixture/echo", json!({"after": true}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["data"]["version"], "1.1.0");
    let globex = app.token("globex", &["clerk"]);
    let r = app.post(Some(&globex), "fixture/echo", json!({})).await;
    assert_eq!(
        r.status, 200,
        "a new instance is made from the loaded copy too: {}",
        r.body
    );
}
