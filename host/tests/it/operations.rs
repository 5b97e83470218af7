//! Operations: the admin API, live reconfiguration without failed requests, pauses that
//! survive a restart, paths relative to the config file, and draining at shutdown.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use provider_host::host::{ConfigSource, Origin};
use provider_host::{Host, http};
use providers_core::ErrorCode;
use providers_security::TokenIssuer;
use serde_json::{Value, json};

use crate::plugins::{built, stage, stage_wasm, wasm_built};
use crate::support::{App, Counters, Edit, Resp, assert_error, env, matrix, registry};

/// kv and the probe (builtins), the native fixture and the wasm pricing component, with
/// the plugin folder written relative to the config file.
fn text(db: &str, cache: &Path, acme_bolt: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
request_timeout = "5s"
idle_timeout = "1h"
shutdown_grace = "5s"
ready_cache = "1ms"

[storage]
url = "{db}"

[plugins]
dirs = ["plugins"]
cache_dir = "{cache}"
wasm_memory = "32MiB"
wasm_instances = 64

[security]
issuer = "test-issuer"
audience = "providers"
admin_role = "admin"
platform_tenant = "platform"

[[security.keys]]
algorithm = "HS256"
secret = "${{env:TEST_JWT_SECRET}}"

[security.roles]
admin = ["*"]
user = ["kv.*", "probe.use", "pricing.*", "fixture.*"]

[[providers]]
service = "kv"
required = true

[[providers]]
service = "probe"
config = {{ label = "base" }}

[[providers]]
service = "pricing"
config = {{ currency = "EUR", tax_rate = "0.19", prices = {{ BOLT = "0.35", PANEL = "12.50" }} }}

[[providers]]
service = "fixture"

[tenants.acme]
services = ["kv", "probe", "pricing", "fixture"]

[tenants.acme.providers.pricing]
prices = {{ BOLT = "{acme_bolt}" }}

[tenants.globex]
services = ["kv", "pricing", "fixture"]
{extra}
"#,
        cache = cache.display(),
    )
}

/// A host read from a file it can reload, with its plugin folder beside the file.
struct Ops {
    app: App,
    dir: tempfile::TempDir,
    file: PathBuf,
    cache: PathBuf,
}

fn stage_fixture(plugins: &Path, version: &str) {
    stage(
        plugins,
        &built().file(&format!("fixture-{version}")),
        "fixture",
        version,
        "1.0.0",
        "fixture.so",
    );
}

impl Ops {
    async fn start(db: providers_database::testing::TestDatabase, acme_bolt: &str) -> Ops {
        let dir = tempfile::tempdir().unwrap();
        let plugins = dir.path().join("plugins");
        stage_fixture(&plugins, "1.0.0");
        stage_wasm(
            &plugins,
            &wasm_built().dir.join("pricing.wasm"),
            "pricing",
            "1.0.0",
            "pricing.wasm",
        );
        let cache = wasm_built().dir.join("cache");
        let file = dir.path().join("host.toml");
        std::fs::write(&file, text(&db.url, &cache, acme_bolt, "")).unwrap();
        let counters = Arc::new(Counters::default());
        let (host, issuer) = start_host(&file, &counters).await;
        Ops {
            app: App {
                router: http::router(host.clone()),
                host,
                counters,
                issuer,
                _db: db,
            },
            dir,
            file,
            cache,
        }
    }

    fn write(&self, acme_bolt: &str, extra: &str) {
        let db = self.app.host.config().storage.url.clone();
        std::fs::write(&self.file, text(&db, &self.cache, acme_bolt, extra)).unwrap();
    }

    fn plugins(&self) -> PathBuf {
        self.dir.path().join("plugins")
    }

    fn platform(&self) -> String {
        self.app.token("platform", &["admin"])
    }

    async fn admin(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> Resp {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let body = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Body::from(b)
            }
            None => Body::empty(),
        };
        self.app.send(req.body(body).unwrap()).await
    }

    async fn reload(&self) -> Resp {
        self.admin(Some(&self.platform()), "POST", "/admin/config/reload", None)
            .await
    }
}

async fn start_host(file: &Path, counters: &Arc<Counters>) -> (Arc<Host>, TokenIssuer) {
    let source = ConfigSource {
        registry: registry(counters),
        origin: Origin::File(file.to_path_buf()),
        env: Box::new(env),
        listen: None,
    };
    let config = source.load(None).unwrap_or_else(|e| panic!("{e:?}"));
    assert!(
        config.loaded_plugins.refused.is_empty(),
        "{:?}",
        config.loaded_plugins.refused
    );
    let issuer = TokenIssuer::new(&config.keys, config.token.clone()).unwrap();
    (
        Host::start_with(config, Some(source)).await.unwrap(),
        issuer,
    )
}

async fn bolt(app: &App, tenant: &str) -> String {
    let r = app
        .post(
            Some(&app.token(tenant, &["user"])),
            "pricing/prices",
            json!({}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["data"]["prices"]["BOLT"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Every admin route, with a body that is valid for it.
fn routes() -> Vec<(&'static str, &'static str, Option<&'static str>)> {
    vec![
        ("GET", "/admin/providers", None),
        ("POST", "/admin/config/validate", Some("[security]\n")),
        ("POST", "/admin/config/reload", None),
        ("POST", "/admin/plugins/reload", None),
        (
            "POST",
            "/admin/providers/probe/pause",
            Some(r#"{"tenant":"acme"}"#),
        ),
        (
            "POST",
            "/admin/providers/probe/resume",
            Some(r#"{"tenant":"acme"}"#),
        ),
        (
            "POST",
            "/admin/providers/probe/restart",
            Some(r#"{"tenant":"acme"}"#),
        ),
        ("POST", "/admin/tenants/acme/services/probe/disable", None),
        ("POST", "/admin/tenants/acme/services/probe/enable", None),
    ]
}

matrix!(
    admin_routes_refuse_a_missing_or_wrong_role,
    nested_calls_stay_on_their_requests_configuration,
    reload_applies_only_the_difference,
    validate_lists_every_error_and_applies_nothing,
    pauses_answer_503_and_survive_a_restart,
    disabled_services_are_hidden_until_enabled,
    restart_connects_the_new_instance_before_the_old_one_goes,
    reconfiguration_under_load_fails_no_request,
);

async fn admin_routes_refuse_a_missing_or_wrong_role(
    db: providers_database::testing::TestDatabase,
) {
    let ops = Ops::start(db, "0.35").await;
    let app = &ops.app;
    let user = app.token("acme", &["user"]);
    let outsider_admin = app.token("nowhere", &["admin"]);
    let globex_admin = app.token("globex", &["admin"]);
    for (method, path, body) in routes() {
        let body = body.map(str::to_owned);
        let r = ops.admin(None, method, path, body.clone()).await;
        assert_error(&r, 401, ErrorCode::Unauthenticated);
        let r = ops
            .admin(Some("not-a-token"), method, path, body.clone())
            .await;
        assert_error(&r, 401, ErrorCode::Unauthenticated);
        let r = ops.admin(Some(&user), method, path, body.clone()).await;
        let detail = assert_error(&r, 403, ErrorCode::Forbidden);
        assert!(
            detail.contains("needs role 'admin'"),
            "{method} {path}: {detail}"
        );
        let r = ops
            .admin(Some(&outsider_admin), method, path, body.clone())
            .await;
        assert_error(&r, 403, ErrorCode::Forbidden);
        // Globex's administrator acts on globex only, and never on the configuration.
        let r = ops
            .admin(Some(&globex_admin), method, path, body.clone())
            .await;
        if path == "/admin/providers" {
            assert_eq!(r.status, 200, "{}", r.body);
            let tenants: Vec<&Value> = r.body["services"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|s| s["tenants"].as_array().unwrap())
                .collect();
            assert!(!tenants.is_empty());
            assert!(
                tenants.iter().all(|t| t["tenant"] == "globex"),
                "a tenant admin sees only their tenant: {}",
                r.body
            );
            assert!(!r.body.to_string().contains("acme"), "{}", r.body);
        } else {
            let detail = assert_error(&r, 403, ErrorCode::Forbidden);
            assert!(
                detail.contains("cannot act on tenant 'acme'")
                    || detail.contains("needs a platform operator"),
                "{method} {path}: {detail}"
            );
        }
    }
    // Every admin route is in the OpenAPI document.
    let doc = app.get(None, "/openapi.json").await.body;
    for (method, path, _) in routes() {
        let path = path.replace("/probe/", "/{service}/").replace(
            "/tenants/acme/services/{service}/",
            "/tenants/{tenant}/services/{service}/",
        );
        assert!(
            doc["paths"][&path][method.to_lowercase()].is_object(),
            "{method} {path} is not in /openapi.json"
        );
    }
    // Nothing a refused request asked for happened.
    assert_eq!(app.host.generation().number, 1);
    assert!(app.host.generation().controls.paused.is_empty());
    assert!(app.host.generation().controls.disabled.is_empty());
    // Without admin_role the admin API is off for everyone.
    let text = std::fs::read_to_string(&ops.file).unwrap().edit(
        "admin_role = \"admin\"\nplatform_tenant = \"platform\"\n",
        "",
    );
    let off = tempfile::tempdir().unwrap();
    let file = off.path().join("host.toml");
    std::fs::write(&file, text).unwrap();
    copy_dir(&ops.plugins(), &off.path().join("plugins"));
    let counters = Arc::new(Counters::default());
    let (host, _) = start_host(&file, &counters).await;
    let r = App {
        router: http::router(host.clone()),
        host,
        counters,
        issuer: TokenIssuer::new(&app.host.config().keys, app.host.config().token.clone()).unwrap(),
        _db: providers_database::testing::TestDatabase::sqlite(),
    };
    let resp = r.get(Some(&ops.platform()), "/admin/providers").await;
    let detail = assert_error(&resp, 403, ErrorCode::Forbidden);
    assert!(detail.contains("admin API is off"), "{detail}");
}

/// The instance events of `tenant`'s `service` once there are `n` (within 5 s).
async fn events_until(app: &App, tenant: &str, service: &str, n: usize) -> Vec<String> {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let events: Vec<String> = app
            .host
            .storage()
            .events(tenant, service)
            .await
            .unwrap()
            .into_iter()
            .map(|(e, _)| e)
            .collect();
        if events.len() >= n || Instant::now() > end {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A request that began before a reload makes its nested calls under the configuration it
/// began with: a service the reload took from its tenant still answers it, and only it.
async fn nested_calls_stay_on_their_requests_configuration(
    db: providers_database::testing::TestDatabase,
) {
    let ops = Ops::start(db, "0.35").await;
    let app = Arc::new(ops.app);
    let acme = app.token("acme", &["user"]);
    let outer = {
        let (app, acme) = (app.clone(), acme.clone());
        tokio::spawn(async move {
            let nested = json!({"service": "kv", "action": "set", "delay_ms": 300, "payload": {"key": "n", "value": 1}});
            app.post(Some(&acme), "probe/call", nested).await
        })
    };
    app.counters.reach(|c| &c.sleeping, 1).await;
    let text = std::fs::read_to_string(&ops.file).unwrap().edit(
        "services = [\"kv\", \"probe\", \"pricing\", \"fixture\"]",
        "services = [\"probe\", \"pricing\", \"fixture\"]",
    );
    std::fs::write(&ops.file, text).unwrap();
    let req = Request::post("/admin/config/reload")
        .header(
            "authorization",
            format!("Bearer {}", app.token("platform", &["admin"])),
        )
        .body(Body::empty())
        .unwrap();
    let r = app.send(req).await;
    assert_eq!(r.body["changes"], json!(["acme/kv: removed"]), "{}", r.body);
    let r = app
        .post(Some(&acme), "kv/set", json!({"key": "m", "value": 1}))
        .await;
    assert_error(&r, 404, ErrorCode::NotFound);
    let r = outer.await.unwrap();
    assert_eq!(
        r.status, 200,
        "the nested call ran under the request's configuration: {}",
        r.body
    );
    assert!(r.body["data"]["etag"].is_string(), "{}", r.body);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

async fn reload_applies_only_the_difference(db: providers_database::testing::TestDatabase) {
    let ops = Ops::start(db, "0.35").await;
    let app = &ops.app;
    let acme = app.token("acme", &["user"]);
    assert_eq!(bolt(app, "acme").await, "0.35");
    assert_eq!(bolt(app, "globex").await, "0.35");
    let r = app.post(Some(&acme), "probe/echo", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = app
        .post(Some(&acme), "kv/set", json!({"key": "k", "value": 1}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let before = app.host.instances().snapshot();
    assert_eq!(before.len(), 4, "{before:?}");

    // Acme's price changes and a tenant arrives; nothing else does.
    ops.write(
        "0.31",
        "[tenants.initech]\nservices = [\"kv\", \"pricing\"]\n",
    );
    let r = ops.reload().await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["generation"], 2);
    assert_eq!(
        r.body["changes"],
        json!(["acme/pricing: config changed", "tenant 'initech' added"]),
        "{}",
        r.body
    );
    assert_eq!(r.body["restart_required"], json!([]));
    assert_eq!(r.body["connect_failures"], json!([]));
    // The change is in force for the very next call.
    assert_eq!(bolt(app, "acme").await, "0.31");
    assert_eq!(bolt(app, "globex").await, "0.35");
    assert_eq!(bolt(app, "initech").await, "0.35");
    // Only acme's pricing instance was replaced: the new one connected, then the old one went.
    // (Events in one millisecond have no order among them.)
    let mut events = events_until(app, "acme", "pricing", 3).await;
    events.sort();
    assert_eq!(events, ["connected", "connected", "disconnected"]);
    assert_eq!(app.counters.connects.load(Ordering::SeqCst), 1);
    assert_eq!(app.counters.disconnects.load(Ordering::SeqCst), 0);
    for (tenant, service) in [("acme", "kv"), ("acme", "fixture"), ("globex", "pricing")] {
        let events = app.host.storage().events(tenant, service).await.unwrap();
        assert!(
            events.iter().all(|(e, _)| e == "connected"),
            "{tenant}/{service} kept its instance: {events:?}"
        );
    }
    let r = app.post(Some(&acme), "kv/get", json!({"key": "k"})).await;
    assert_eq!(r.body["data"]["value"], 1, "{}", r.body);

    // An invalid configuration is refused whole; the running one stays.
    std::fs::write(
        &ops.file,
        std::fs::read_to_string(&ops.file)
            .unwrap()
            .edit("config = { label = \"base\" }", "config = { label = 7 }")
            .edit(
                "service = \"fixture\"\n",
                "service = \"fixture\"\nversion = \"^9\"\n",
            ),
    )
    .unwrap();
    let r = ops.reload().await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.body["error_code"], "VALIDATION_ERROR");
    let errors = r.body["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 2, "{}", r.body);
    assert!(
        errors
            .iter()
            .all(|e| e["line"].as_u64().unwrap() > 0 && e["column"].as_u64().unwrap() > 0)
    );
    assert!(
        errors[0]["message"].as_str().unwrap().contains("label"),
        "{}",
        r.body
    );
    assert!(
        errors[1]["message"].as_str().unwrap().contains("^9"),
        "{}",
        r.body
    );
    assert_eq!(app.host.generation().number, 2);
    assert_eq!(bolt(app, "acme").await, "0.31");

    // A tenant removed: its calls are refused, its instances go.
    ops.write("0.31", "");
    let std_text = std::fs::read_to_string(&ops.file).unwrap().edit(
        "[tenants.globex]\nservices = [\"kv\", \"pricing\", \"fixture\"]\n",
        "",
    );
    std::fs::write(
        &ops.file,
        std_text.edit("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\""),
    )
    .unwrap();
    let r = ops.reload().await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body["changes"],
        json!(["tenant 'globex' removed", "tenant 'initech' removed"])
    );
    assert_eq!(
        r.body["restart_required"],
        json!(["server.listen (127.0.0.1:0 → 127.0.0.1:1)"])
    );
    assert_eq!(
        app.host.config().server.listen.to_string(),
        "127.0.0.1:0",
        "still what runs"
    );
    let r = app
        .post(
            Some(&app.token("globex", &["user"])),
            "pricing/prices",
            json!({}),
        )
        .await;
    assert_error(&r, 403, ErrorCode::Forbidden);
    // Tokens keep verifying across reloads until [security] changes; then the new settings hold.
    std::fs::write(
        &ops.file,
        std::fs::read_to_string(&ops.file)
            .unwrap()
            .edit("issuer = \"test-issuer\"", "issuer = \"new-issuer\""),
    )
    .unwrap();
    assert_eq!(ops.reload().await.status, 200);
    let r = app.post(Some(&acme), "kv/get", json!({"key": "k"})).await;
    let detail = assert_error(&r, 401, ErrorCode::Unauthenticated);
    assert!(detail.contains("iss"), "{detail}");
    assert!(
        crate::support::eventually(Duration::from_secs(5), || {
            app.host
                .instances()
                .snapshot()
                .iter()
                .all(|i| i.tenant == "acme")
        })
        .await
    );
}

async fn validate_lists_every_error_and_applies_nothing(
    db: providers_database::testing::TestDatabase,
) {
    let ops = Ops::start(db, "0.35").await;
    let platform = ops.platform();
    let good = std::fs::read_to_string(&ops.file).unwrap();
    let r = ops
        .admin(
            Some(&platform),
            "POST",
            "/admin/config/validate",
            Some(good.edit("currency = \"EUR\"", "currency = \"USD\"")),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body,
        json!({"valid": true, "services": 4, "tenants": 2, "warnings": []})
    );
    let bad = good.edit("request_timeout = \"5s\"", "request_timeout = \"soon\"");
    let r = ops
        .admin(Some(&platform), "POST", "/admin/config/validate", Some(bad))
        .await;
    assert_eq!(r.status, 422, "{}", r.body);
    let errors = r.body["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{}", r.body);
    assert_eq!(errors[0]["line"], 4, "{}", r.body);
    assert!(
        errors[0]["message"]
            .as_str()
            .unwrap()
            .contains("invalid duration 'soon'")
    );
    let bad = good
        .edit(
            "service = \"probe\"",
            "service = \"probe\"\nversion = \"^7\"",
        )
        .edit(
            "services = [\"kv\", \"pricing\", \"fixture\"]",
            "services = [\"kv\", \"nothing\"]",
        );
    let r = ops
        .admin(Some(&platform), "POST", "/admin/config/validate", Some(bad))
        .await;
    assert_eq!(r.status, 422, "{}", r.body);
    let lines: Vec<u64> = r.body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{}", r.body);
    assert!(lines[0] < lines[1], "in file order: {}", r.body);
    let r = ops
        .admin(
            Some(&platform),
            "POST",
            "/admin/config/validate",
            Some("not = [toml".into()),
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.body["errors"][0]["line"], 1);
    let r = ops
        .admin(
            Some(&platform),
            "POST",
            "/admin/config/validate",
            Some("  ".into()),
        )
        .await;
    assert_error(&r, 400, ErrorCode::ValidationError);
    // Nothing was applied: same generation, same prices.
    assert_eq!(ops.app.host.generation().number, 1);
    assert_eq!(bolt(&ops.app, "acme").await, "0.35");
}

async fn pauses_answer_503_and_survive_a_restart(db: providers_database::testing::TestDatabase) {
    let ops = Ops::start(db, "0.35").await;
    let app = &ops.app;
    let platform = ops.platform();
    let acme_admin = app.token("acme", &["admin"]);
    let acme = app.token("acme", &["user"]);
    let globex = app.token("globex", &["user"]);
    // A tenant admin pauses for their own tenant by default.
    let r = ops
        .admin(
            Some(&acme_admin),
            "POST",
            "/admin/providers/pricing/pause",
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body,
        json!({"service": "pricing", "tenant": "acme", "paused": true, "changed": true})
    );
    let r = app.post(Some(&acme), "pricing/prices", json!({})).await;
    let detail = assert_error(&r, 503, ErrorCode::ProviderUnavailable);
    assert_eq!(
        detail,
        "service 'pricing' is paused for tenant 'acme' by an administrator; calls resume when it is resumed"
    );
    assert_eq!(
        bolt(app, "globex").await,
        "0.35",
        "another tenant is not paused"
    );
    let r = app.get(Some(&acme), "/providers").await;
    let pricing = r.body["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["service"] == "pricing")
        .unwrap()
        .clone();
    assert_eq!(pricing["status"]["state"], "paused");
    // Bad input: unknown service, unknown tenant, a body that is not the target shape.
    let r = ops
        .admin(
            Some(&platform),
            "POST",
            "/admin/providers/nothing/pause",
            None,
        )
        .await;
    assert_error(&r, 404, ErrorCode::NotFound);
    let r = ops
        .admin(
            Some(&platform),
            "POST",
            "/admin/providers/pricing/pause",
            Some(r#"{"tenant":"nobody"}"#.into()),
        )
        .await;
    assert_error(&r, 404, ErrorCode::NotFound);
    let r = ops
        .admin(
            Some(&platform),
            "POST",
            "/admin/providers/probe/pause",
            Some(r#"{"tenant":"globex"}"#.into()),
        )
        .await;
    let detail = assert_error(&r, 404, ErrorCode::NotFound);
    assert_eq!(detail, "tenant 'globex' does not enable service 'probe'");
    let r = ops
        .admin(
            Some(&platform),
            "POST",
            "/admin/providers/pricing/pause",
            Some(r#"{"tenants":"acme"}"#.into()),
        )
        .await;
    let detail = assert_error(&r, 400, ErrorCode::ValidationError);
    assert!(detail.contains("unknown field `tenants`"), "{detail}");
    let r = ops
        .admin(
            Some(&acme_admin),
            "POST",
            "/admin/providers/pricing/pause",
            Some(r#"{"tenant":"globex"}"#.into()),
        )
        .await;
    assert_error(&r, 403, ErrorCode::Forbidden);
    assert_eq!(
        bolt(app, "globex").await,
        "0.35",
        "the refused pause did nothing"
    );
    // What a platform operator paused for acme, acme's administrator cannot resume.
    let r = ops
        .admin(
            Some(&platform),
            "POST",
            "/admin/providers/pricing/pause",
            Some(r#"{"tenant":"acme"}"#.into()),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = ops
        .admin(
            Some(&acme_admin),
            "POST",
            "/admin/providers/pricing/resume",
            None,
        )
        .await;
    let detail = assert_error(&r, 403, ErrorCode::Forbidden);
    assert!(detail.contains("by a platform operator"), "{detail}");
    let r = app.post(Some(&acme), "pricing/prices", json!({})).await;
    assert_error(&r, 503, ErrorCode::ProviderUnavailable);
    // The platform pauses kv for everyone.
    let r = ops
        .admin(
            Some(&platform),
            "POST",
            "/admin/providers/kv/pause",
            Some("{}".into()),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["tenant"], Value::Null);
    let r = app
        .post(Some(&globex), "kv/set", json!({"key": "a", "value": 1}))
        .await;
    let detail = assert_error(&r, 503, ErrorCode::ProviderUnavailable);
    assert!(detail.contains("paused for every tenant"), "{detail}");

    // A new host on the same database and configuration keeps both pauses.
    app.host
        .shutdown(Instant::now() + Duration::from_secs(5))
        .await;
    let (host, _) = start_host(&ops.file, &app.counters).await;
    let again = App {
        router: http::router(host.clone()),
        host,
        counters: app.counters.clone(),
        issuer: TokenIssuer::new(&app.host.config().keys, app.host.config().token.clone()).unwrap(),
        _db: providers_database::testing::TestDatabase::sqlite(),
    };
    let r = again.post(Some(&acme), "pricing/prices", json!({})).await;
    assert_error(&r, 503, ErrorCode::ProviderUnavailable);
    let r = again
        .post(Some(&globex), "kv/set", json!({"key": "a", "value": 1}))
        .await;
    assert_error(&r, 503, ErrorCode::ProviderUnavailable);
    let status = again.get(Some(&platform), "/admin/providers").await;
    let kv = status.body["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == "kv")
        .unwrap()
        .clone();
    assert_eq!(kv["paused_for_all"], true);
    let resume = |path: &'static str, body: &'static str| {
        let req = Request::post(path)
            .header("authorization", format!("Bearer {platform}"))
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap();
        again.send(req)
    };
    let r = resume("/admin/providers/pricing/resume", r#"{"tenant":"acme"}"#).await;
    assert_eq!(
        r.body,
        json!({"service": "pricing", "tenant": "acme", "paused": false, "changed": true})
    );
    let r = resume("/admin/providers/pricing/resume", r#"{"tenant":"acme"}"#).await;
    assert_eq!(r.body["changed"], false, "resuming twice changes nothing");
    let r = resume("/admin/providers/kv/resume", "{}").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(bolt(&again, "acme").await, "0.35");
    let r = again
        .post(Some(&globex), "kv/set", json!({"key": "a", "value": 1}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    again
        .host
        .shutdown(Instant::now() + Duration::from_secs(5))
        .await;
}

async fn disabled_services_are_hidden_until_enabled(db: providers_database::testing::TestDatabase) {
    let ops = Ops::start(db, "0.35").await;
    let app = &ops.app;
    let acme_admin = app.token("acme", &["admin"]);
    let acme = app.token("acme", &["user"]);
    let r = app.post(Some(&acme), "probe/echo", json!({})).await;
    assert_eq!(r.status, 200);
    let r = ops
        .admin(
            Some(&acme_admin),
            "POST",
            "/admin/tenants/acme/services/probe/disable",
            None,
        )
        .await;
    assert_eq!(
        r.body,
        json!({"tenant": "acme", "service": "probe", "enabled": false, "changed": true})
    );
    let r = app.post(Some(&acme), "probe/echo", json!({})).await;
    let detail = assert_error(&r, 404, ErrorCode::NotFound);
    assert_eq!(detail, "no service 'probe' is available to tenant 'acme'");
    let r = app.get(Some(&acme), "/providers").await;
    assert!(
        r.body["providers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["service"] != "probe"),
        "{}",
        r.body
    );
    let r = app.get(Some(&acme), "/providers/probe").await;
    assert_error(&r, 404, ErrorCode::NotFound);
    // Its instance is disconnected once disabled.
    app.counters.reach(|c| &c.disconnects, 1).await;
    // Bad input.
    let r = ops
        .admin(
            Some(&acme_admin),
            "POST",
            "/admin/tenants/acme/services/nothing/disable",
            None,
        )
        .await;
    assert_error(&r, 404, ErrorCode::NotFound);
    let r = ops
        .admin(
            Some(&ops.platform()),
            "POST",
            "/admin/tenants/nobody/services/kv/disable",
            None,
        )
        .await;
    assert_error(&r, 404, ErrorCode::NotFound);
    let r = ops
        .admin(
            Some(&ops.platform()),
            "POST",
            "/admin/tenants/globex/services/probe/enable",
            None,
        )
        .await;
    let detail = assert_error(&r, 409, ErrorCode::Conflict);
    assert!(detail.contains("does not list service 'probe'"), "{detail}");
    let r = ops
        .admin(
            Some(&acme_admin),
            "POST",
            "/admin/tenants/globex/services/kv/disable",
            None,
        )
        .await;
    assert_error(&r, 403, ErrorCode::Forbidden);
    let r = app
        .post(
            Some(&app.token("globex", &["user"])),
            "kv/set",
            json!({"key": "a", "value": 1}),
        )
        .await;
    assert_eq!(r.status, 200, "the refused disable did nothing");
    let r = ops
        .admin(
            Some(&acme_admin),
            "POST",
            "/admin/tenants/acme/services/probe/enable",
            None,
        )
        .await;
    assert_eq!(r.body["enabled"], true);
    let r = app.post(Some(&acme), "probe/echo", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(app.counters.connects.load(Ordering::SeqCst), 2);
}

async fn restart_connects_the_new_instance_before_the_old_one_goes(
    db: providers_database::testing::TestDatabase,
) {
    let ops = Ops::start(db, "0.35").await;
    let app = Arc::new(ops.app);
    let acme = app.token("acme", &["user"]);
    let platform = app.token("platform", &["admin"]);
    let r = app.post(Some(&acme), "probe/echo", json!({})).await;
    assert_eq!(r.status, 200);
    let slow = {
        let (app, acme) = (app.clone(), acme.clone());
        tokio::spawn(async move {
            app.post(Some(&acme), "probe/sleep", json!({"ms": 400}))
                .await
        })
    };
    app.counters.reach(|c| &c.sleeping, 1).await;
    let req = Request::post("/admin/providers/probe/restart")
        .header("authorization", format!("Bearer {platform}"))
        .body(Body::empty())
        .unwrap();
    let r = app.send(req).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body,
        json!({"service": "probe", "restarted": ["acme"], "failed": []})
    );
    assert_eq!(app.counters.connects.load(Ordering::SeqCst), 2);
    // New calls go to the new instance while the old one finishes its call.
    let r = app.post(Some(&acme), "probe/echo", json!({})).await;
    assert_eq!(r.status, 200);
    let r = slow.await.unwrap();
    assert_eq!(
        r.status, 200,
        "the call in flight finished on the old instance: {}",
        r.body
    );
    app.counters.reach(|c| &c.disconnects, 1).await;
    assert_eq!(
        app.counters.lines(),
        [
            "connect acme base",
            "connect acme base",
            "done sleep 400",
            "disconnect acme"
        ]
    );
    // Restarting a service with nothing connected restarts nothing; unknown names are 404.
    let req = |path: &str| {
        Request::post(path.to_owned())
            .header("authorization", format!("Bearer {platform}"))
            .body(Body::empty())
            .unwrap()
    };
    let r = app.send(req("/admin/providers/fixture/restart")).await;
    assert_eq!(r.body["restarted"], json!([]), "{}", r.body);
    let r = app.send(req("/admin/providers/nothing/restart")).await;
    assert_error(&r, 404, ErrorCode::NotFound);
}

/// Clients call builtin, native and wasm providers for three tenants without pause while the
/// configuration changes 20 times (some invalid, a tenant added, a tenant's override
/// changed) and the native plugin is replaced by another version 10 times: no call fails,
/// and each change is in force for the very next call.
async fn reconfiguration_under_load_fails_no_request(
    db: providers_database::testing::TestDatabase,
) {
    let ops = Ops::start(db, "0.35").await;
    let (addr, stop, server) = crate::support::serve(&ops.app).await;
    let base = format!("http://{addr}");
    let client = reqwest::Client::new();
    let done = Arc::new(AtomicBool::new(false));
    let initech_live = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let tokens: Vec<(String, String)> = ["acme", "globex", "initech"]
        .iter()
        .map(|t| ((*t).to_owned(), ops.app.token(t, &["user"])))
        .collect();
    let mut workers = Vec::new();
    for w in 0..4 {
        let (client, base, done, initech_live, calls, failures, tokens) = (
            client.clone(),
            base.clone(),
            done.clone(),
            initech_live.clone(),
            calls.clone(),
            failures.clone(),
            tokens.clone(),
        );
        workers.push(tokio::spawn(async move {
            let routes = [
                (
                    "acme",
                    "kv/set",
                    json!({"key": format!("w{w}"), "value": 1}),
                ),
                ("acme", "probe/echo", json!({})),
                ("acme", "pricing/prices", json!({})),
                ("acme", "fixture/echo", json!({})),
                (
                    "globex",
                    "pricing/quote",
                    json!({"lines": [{"sku": "BOLT", "quantity": "3"}]}),
                ),
                ("globex", "fixture/echo", json!({})),
                (
                    "globex",
                    "kv/set",
                    json!({"key": format!("w{w}"), "value": 2}),
                ),
                ("initech", "pricing/prices", json!({})),
            ];
            let mut i = w;
            while !done.load(Ordering::Acquire) {
                let (tenant, path, body) = &routes[i % routes.len()];
                i += 1;
                if *tenant == "initech" && !initech_live.load(Ordering::Acquire) {
                    continue;
                }
                let token = &tokens.iter().find(|(t, _)| t == tenant).unwrap().1;
                let r = client
                    .post(format!("{base}/providers/{path}"))
                    .bearer_auth(token)
                    .json(body)
                    .send()
                    .await;
                calls.fetch_add(1, Ordering::Relaxed);
                match r {
                    Ok(r) if r.status() == 200 => {}
                    Ok(r) => {
                        let status = r.status();
                        let text = r.text().await.unwrap_or_default();
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("{tenant} {path}: {status} {text}"));
                    }
                    Err(e) => failures
                        .lock()
                        .unwrap()
                        .push(format!("{tenant} {path}: {e}")),
                }
            }
        }));
    }
    let platform = ops.platform();
    let reload = || {
        client
            .post(format!("{base}/admin/config/reload"))
            .bearer_auth(&platform)
            .send()
    };
    let prices = |tenant: &'static str| {
        let token = tokens.iter().find(|(t, _)| t == tenant).unwrap().1.clone();
        let (client, base) = (client.clone(), base.clone());
        async move {
            let r = client
                .post(format!("{base}/providers/pricing/prices"))
                .bearer_auth(token)
                .json(&json!({}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let body: Value = r.json().await.unwrap();
            body["data"]["prices"]["BOLT"].as_str().unwrap().to_owned()
        }
    };
    let fixture_version = || {
        let token = tokens[1].1.clone();
        let (client, base) = (client.clone(), base.clone());
        async move {
            let r = client
                .post(format!("{base}/providers/fixture/echo"))
                .bearer_auth(token)
                .json(&json!({}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let body: Value = r.json().await.unwrap();
            body["data"]["version"].as_str().unwrap().to_owned()
        }
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = String::new();
    let mut bolt = "0.35".to_owned();
    let mut version = "1.0.0";
    let (mut applied, mut refused, mut replaced) = (0, 0, 0);
    let mut reloads = Vec::new();
    for change in 0..20 {
        if change % 5 == 4 {
            // An invalid version of the file: refused whole, nothing changes.
            let text = std::fs::read_to_string(&ops.file).unwrap();
            std::fs::write(
                &ops.file,
                text.replace("required = true", "required = \"yes\""),
            )
            .unwrap();
            let r = reload().await.unwrap();
            assert_eq!(r.status(), 422);
            refused += 1;
        } else {
            bolt = format!("0.{}", 40 + change);
            if change == 7 {
                extra = "[tenants.initech]\nservices = [\"kv\", \"pricing\"]\n".into();
            }
            ops.write(&bolt, &extra);
            let started = Instant::now();
            let r = reload().await.unwrap();
            reloads.push(started.elapsed());
            assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
            applied += 1;
            if change == 7 {
                initech_live.store(true, Ordering::Release);
                assert_eq!(
                    prices("initech").await,
                    "0.35",
                    "the new tenant is served at once"
                );
            }
        }
        assert_eq!(
            prices("acme").await,
            bolt,
            "change {change} is in force for the next call"
        );
        assert_eq!(prices("globex").await, "0.35");
        if change % 2 == 1 {
            version = if version == "1.0.0" { "1.1.0" } else { "1.0.0" };
            ops.write(&bolt, &extra);
            stage_fixture(&ops.plugins(), version);
            let started = Instant::now();
            let r = client
                .post(format!("{base}/admin/plugins/reload"))
                .bearer_auth(&platform)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            reloads.push(started.elapsed());
            let report: Value = r.json().await.unwrap();
            assert!(
                report["changes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|c| c.as_str().unwrap().starts_with("globex/fixture: version")),
                "{report}"
            );
            assert_eq!(
                fixture_version().await,
                version,
                "the new plugin serves the next call"
            );
            replaced += 1;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    done.store(true, Ordering::Release);
    for w in workers {
        w.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    let calls = calls.load(Ordering::Relaxed);
    assert_eq!((applied, refused, replaced), (16, 4, 10));
    assert!(
        failures.is_empty(),
        "{} of {calls} calls failed: {failures:#?}",
        failures.len()
    );
    assert!(calls > 300, "the clients kept calling throughout: {calls}");
    reloads.sort();
    eprintln!(
        "under load: {calls} calls, 0 failed; {} reloads applied, {refused} refused; reload p50 {:?}, max {:?}",
        reloads.len(),
        reloads[reloads.len() / 2],
        reloads[reloads.len() - 1]
    );
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

/// Every relative path in a config file resolves against the file's folder, whatever the
/// working directory: the SQLite file, key files, plugin folders and the compile cache.
#[tokio::test]
async fn relative_paths_resolve_against_the_config_files_folder() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("etc");
    std::fs::create_dir_all(conf.join("keys")).unwrap();
    std::fs::write(
        conf.join("keys/jwt.secret"),
        "a-secret-of-enough-length-for-hs256!!",
    )
    .unwrap();
    let plugins = conf.join("plugins");
    stage_fixture(&plugins, "1.0.0");
    let file = conf.join("host.toml");
    std::fs::write(
        &file,
        r#"
[storage]
url = "sqlite://data/host.db"

[plugins]
dirs = ["plugins"]
cache_dir = "cache"

[security]
issuer = "i"
audience = "a"

[[security.keys]]
algorithm = "HS256"
secret_file = "keys/jwt.secret"

[[providers]]
service = "fixture"

[tenants.acme]
services = ["fixture"]
"#,
    )
    .unwrap();
    let registry = provider_host::builtin_registry().unwrap();
    let config = provider_host::config::load(&file, &registry).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(
        config.storage.url,
        format!("sqlite://{}", conf.join("data/host.db").display())
    );
    assert_eq!(config.plugins.dirs, [plugins]);
    assert_eq!(config.plugins.cache_dir, conf.join("cache"));
    assert_eq!(
        config.keys[0].verify,
        b"a-secret-of-enough-length-for-hs256!!"
    );
    assert!(
        config.loaded_plugins.refused.is_empty(),
        "{:?}",
        config.loaded_plugins.refused
    );
    let host = Host::start(config).await.unwrap();
    assert!(
        conf.join("data/host.db").exists(),
        "the database is beside the config file"
    );
    host.shutdown(Instant::now() + Duration::from_secs(5)).await;
    // URLs that are not relative paths stay as written.
    for url in ["sqlite::memory:", "sqlite:///abs/h.db", "postgres://u@h/db"] {
        let text = std::fs::read_to_string(&file)
            .unwrap()
            .edit("sqlite://data/host.db", url);
        let config =
            provider_host::config::load_str(&text, "t", &conf, &registry, &|_| None).unwrap();
        assert_eq!(config.storage.url, url);
    }
}

/// At shutdown `/ready` answers 503 for `server.shutdown_delay` while calls are still served,
/// then the listener closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_turns_503_before_the_listener_closes() {
    let db = providers_database::testing::TestDatabase::sqlite();
    let app = App::configured(db, |t| {
        t.edit(
            "ready_cache = \"200ms\"",
            "ready_cache = \"200ms\"\nshutdown_delay = \"600ms\"",
        )
    })
    .await;
    let (addr, stop, server) = crate::support::serve(&app).await;
    let client = reqwest::Client::new();
    let ready = format!("http://{addr}/ready");
    assert_eq!(client.get(&ready).send().await.unwrap().status(), 200);
    let _ = stop.send(());
    let started = Instant::now();
    let mut saw_503 = false;
    while started.elapsed() < Duration::from_millis(400) {
        let r = client.get(&ready).send().await.unwrap();
        if r.status() == 503 {
            saw_503 = true;
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["error_code"], "PROVIDER_UNAVAILABLE");
            assert!(body["detail"].as_str().unwrap().contains("shutting down"));
            // Calls are still served meanwhile.
            let token = app.token("acme", &["user"]);
            let r = client
                .post(format!("http://{addr}/providers/probe/echo"))
                .bearer_auth(token)
                .json(&json!({}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(saw_503, "/ready never said 503 during the delay");
    server.await.unwrap().unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "the listener stayed open for the delay"
    );
    assert!(client.get(&ready).send().await.is_err(), "closed after");
}

/// A slot connects with the plan it was made for, whoever's call reaches it first: a caller
/// still holding the older plan (a request begun before a reload) cannot connect the newer
/// slot with the old configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_connects_with_its_own_plan_whoever_calls_first() {
    let db = providers_database::testing::TestDatabase::sqlite();
    let counters = Arc::new(Counters::default());
    let registry = registry(&counters);
    let base = crate::support::config_text(&db.url, "");
    let old = crate::support::load(
        &base.edit("label = \"acme-label\"", "label = \"old\""),
        &registry,
    )
    .unwrap_or_else(|e| panic!("{e:?}"));
    let new = provider_host::config::load_with(
        &base.edit(
            "label = \"acme-label\"",
            "label = \"new\"\nfail_connect = true",
        ),
        "test.toml",
        Path::new("."),
        &registry,
        &env,
        Some(&old),
    )
    .unwrap_or_else(|e| panic!("{e:?}"));
    let host = Host::start(old).await.unwrap();
    let running = host.config();
    let (old_plan, new_plan) = (
        &running.tenants["acme"].services["probe"],
        &new.tenants["acme"].services["probe"],
    );
    assert!(new_plan.revision > old_plan.revision);
    let instances = host.instances();
    let Err(e) = instances.acquire("acme", "probe", new_plan).await else {
        panic!("the new plan fails to connect")
    };
    assert!(e.detail.contains("probe was told to fail"), "{}", e.detail);
    // Past the backoff, a caller with the old plan reaches the new slot and connects it with
    // the new plan, which fails again: never the old configuration.
    tokio::time::sleep(Duration::from_millis(450)).await;
    let Err(e) = instances.acquire("acme", "probe", old_plan).await else {
        panic!("the old plan must not connect the new slot")
    };
    assert!(e.detail.contains("probe was told to fail"), "{}", e.detail);
    assert!(
        counters.lines().iter().all(|l| !l.contains("old")),
        "{:?}",
        counters.lines()
    );
}

/// A reload whose request goes away midway is carried through whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_abandoned_by_its_caller_still_completes() {
    let db = providers_database::testing::TestDatabase::sqlite();
    let ops = Ops::start(db, "0.35").await;
    let app = &ops.app;
    let acme = app.token("acme", &["user"]);
    assert_eq!(
        app.post(Some(&acme), "probe/echo", json!({})).await.status,
        200
    );
    // The probe's new instance takes 300 ms to connect; the caller gives up after 20.
    std::fs::write(
        &ops.file,
        std::fs::read_to_string(&ops.file).unwrap().edit(
            "config = { label = \"base\" }",
            "config = { label = \"slow\", connect_delay_ms = 300 }",
        ),
    )
    .unwrap();
    let gave_up = tokio::time::timeout(Duration::from_millis(20), app.host.reload()).await;
    assert!(gave_up.is_err(), "the reload was still connecting");
    assert!(
        crate::support::eventually(Duration::from_secs(5), || app.host.generation().number == 2)
            .await,
        "the reload completed without its caller"
    );
    assert_eq!(
        app.post(Some(&acme), "probe/echo", json!({})).await.status,
        200
    );
    assert!(
        app.counters
            .lines()
            .contains(&"connect acme slow".to_owned()),
        "{:?}",
        app.counters.lines()
    );
}

/// `GET /admin/providers` pages through tenants and filters by tenant and service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_providers_pages_and_filters() {
    let ops = Ops::start(providers_database::testing::TestDatabase::sqlite(), "0.35").await;
    let app = &ops.app;
    let platform = ops.platform();
    let tenants_of = |body: &Value, service: &str| -> Vec<String> {
        body["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["service"] == service)
            .unwrap()["tenants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["tenant"].as_str().unwrap().to_owned())
            .collect()
    };
    let r = app.get(Some(&platform), "/admin/providers?limit=1").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(tenants_of(&r.body, "kv"), ["acme"]);
    assert_eq!(r.body["next"], "acme");
    let r = app
        .get(Some(&platform), "/admin/providers?limit=1&after=acme")
        .await;
    assert_eq!(tenants_of(&r.body, "kv"), ["globex"]);
    assert_eq!(r.body["next"], Value::Null);
    let r = app
        .get(Some(&platform), "/admin/providers?service=kv&tenant=globex")
        .await;
    assert_eq!(
        r.body["services"].as_array().unwrap().len(),
        1,
        "{}",
        r.body
    );
    assert_eq!(tenants_of(&r.body, "kv"), ["globex"]);
    let r = app
        .get(Some(&platform), "/admin/providers?service=nothing")
        .await;
    assert_error(&r, 404, ErrorCode::NotFound);
    let r = app
        .get(Some(&platform), "/admin/providers?tenant=nobody")
        .await;
    assert_error(&r, 404, ErrorCode::NotFound);
    for bad in ["limit=0", "limit=1001", "limit=many", "page=2"] {
        let r = app
            .get(Some(&platform), &format!("/admin/providers?{bad}"))
            .await;
        assert_error(&r, 400, ErrorCode::ValidationError);
    }
    let globex_admin = app.token("globex", &["admin"]);
    let r = app
        .get(Some(&globex_admin), "/admin/providers?tenant=acme")
        .await;
    assert_error(&r, 403, ErrorCode::Forbidden);
    let r = app
        .get(Some(&globex_admin), "/admin/providers?limit=1")
        .await;
    assert_eq!(tenants_of(&r.body, "kv"), ["globex"]);
    assert_eq!(r.body["next"], Value::Null);
}
