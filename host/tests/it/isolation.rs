//! The isolation matrix: every route of the generated OpenAPI document (which lists the
//! provider actions, `/admin/*` and `/auth/*`) against fourteen tokens — three roles of
//! tenant A, B's admin, a platform operator and nine forged or misdirected ones — with the
//! exact status of every cell, one audit record per recorded cell (every denial among them),
//! and no tenant-B identifier in any answer to tenant A (nor the other way round).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::Request;
use base64::Engine;
use provider_host::host::{ConfigSource, Origin};
use provider_host::{Host, http};
use providers_database::testing::TestDatabase;
use providers_security::{Identity, TokenIssuer};
use serde_json::{Value, json};

use crate::support::{App, Counters, eventually, matrix, registry};

matrix!(every_route_answers_every_token_as_the_matrix_says,);

const KEYS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../providers-security/tests/keys"
);

fn config(url: &str) -> String {
    format!(
        r#"
[storage]
url = "{url}"

[security]
issuer = "test-issuer"
audience = "providers"
leeway_seconds = 0
admin_role = "admin"
platform_tenant = "platform"

[[security.keys]]
kid = "rsa-1"
algorithm = "RS256"
public_key_file = "{KEYS}/rs256.pub.pem"
private_key_file = "{KEYS}/rs256.key.pem"

[security.roles]
admin = ["*"]
staff = ["kv.*"]
vendor = ["kv.read"]

[auth]
enabled = true
argon2 = {{ memory_kib = 256, iterations = 1, parallelism = 1 }}
client_rate = {{ per_second = 10000 }}
overall_rate = {{ per_second = 10000 }}

[[providers]]
service = "kv"

[tenants.acme]
services = ["kv"]

[tenants.globex]
services = ["kv"]
"#
    )
}

/// The columns: the five real identities, then the nine tokens that must get 401 everywhere.
const TOKENS: [&str; 14] = [
    "A admin",
    "A staff",
    "A vendor",
    "B admin",
    "platform",
    "expired",
    "not yet valid",
    "exp as a string",
    "alg none",
    "HS256 with the RS256 public key",
    "unknown kid",
    "wrong issuer",
    "wrong audience",
    "no tenant claim",
];

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token signed with the RS256 private key under `kid`, with exactly `claims`.
fn rs256(kid: &str, claims: &Value) -> String {
    let key = std::fs::read(format!("{KEYS}/rs256.key.pem")).unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(
        &header,
        claims,
        &jsonwebtoken::EncodingKey::from_rsa_pem(&key).unwrap(),
    )
    .unwrap()
}

fn forged(kind: &str) -> String {
    let t = now();
    let good = json!({"sub": "mallory", "tenant_id": "acme", "roles": ["admin"], "iss": "test-issuer", "aud": "providers", "iat": t, "exp": t + 300});
    let with = |k: &str, v: Value| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    match kind {
        "expired" => rs256("rsa-1", &with("exp", json!(t - 120))),
        "not yet valid" => rs256("rsa-1", &with("nbf", json!(t + 3600))),
        "exp as a string" => rs256("rsa-1", &with("exp", json!((t + 300).to_string()))),
        "alg none" => format!(
            "{}.{}.",
            b64(br#"{"alg":"none","typ":"JWT"}"#),
            b64(good.to_string().as_bytes())
        ),
        "HS256 with the RS256 public key" => {
            let public = std::fs::read(format!("{KEYS}/rs256.pub.pem")).unwrap();
            let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
            header.kid = Some("rsa-1".into());
            jsonwebtoken::encode(
                &header,
                &good,
                &jsonwebtoken::EncodingKey::from_secret(&public),
            )
            .unwrap()
        }
        "unknown kid" => rs256("rsa-2", &good),
        "wrong issuer" => rs256("rsa-1", &with("iss", json!("someone-else"))),
        "wrong audience" => rs256("rsa-1", &with("aud", json!("another-api"))),
        "no tenant claim" => {
            let mut c = good.clone();
            c.as_object_mut().unwrap().remove("tenant_id");
            rs256("rsa-1", &c)
        }
        other => panic!("no forged token '{other}'"),
    }
}

struct Row {
    method: &'static str,
    /// As in the OpenAPI document.
    template: &'static str,
    /// With its parameters filled in (and a query).
    path: String,
    body: String,
    content_type: &'static str,
    /// The status for A admin, A staff, A vendor, B admin, platform; every forged token gets
    /// 401 unless the route is public (`public`: then it gets A admin's status).
    expect: [u16; 5],
    public: bool,
    /// Whether a cell leaves a record even when it succeeds (provider calls, admin requests,
    /// grants); other routes are recorded when they refuse (401/403).
    recorded: bool,
}

fn rows(config_text: &str, acme_client: (&str, &str), victim: &str) -> Vec<Row> {
    let row = |method, template, path: &str, body: &str, expect, public, recorded| Row {
        method,
        template,
        path: path.to_owned(),
        body: body.to_owned(),
        content_type: "application/json",
        expect,
        public,
        recorded,
    };
    let call = |action: &'static str, body: &str, expect| {
        row("POST", action, action, body, expect, false, true)
    };
    let admin = |method, template, path: &str, body: &str, expect| {
        row(method, template, path, body, expect, false, true)
    };
    let (id, secret) = acme_client;
    vec![
        call(
            "/providers/kv/get",
            r#"{"key":"shared"}"#,
            [200, 200, 200, 200, 403],
        ),
        call(
            "/providers/kv/list",
            r#"{"prefix":""}"#,
            [200, 200, 200, 200, 403],
        ),
        call(
            "/providers/kv/bulk_get",
            r#"{"keys":["shared"]}"#,
            [200, 200, 200, 200, 403],
        ),
        call(
            "/providers/kv/set",
            r#"{"key":"scratch","value":1}"#,
            [200, 200, 403, 200, 403],
        ),
        call(
            "/providers/kv/delete",
            r#"{"key":"scratch"}"#,
            [200, 200, 403, 200, 403],
        ),
        row(
            "GET",
            "/providers",
            "/providers",
            "",
            [200, 200, 200, 200, 403],
            false,
            false,
        ),
        row(
            "GET",
            "/providers/{service}",
            "/providers/kv",
            "",
            [200, 200, 200, 200, 403],
            false,
            false,
        ),
        row(
            "GET",
            "/openapi.json",
            "/openapi.json",
            "",
            [200; 5],
            true,
            false,
        ),
        row("GET", "/health", "/health", "", [200; 5], true, false),
        row("GET", "/ready", "/ready", "", [200; 5], true, false),
        row(
            "GET",
            "/metrics",
            "/metrics",
            "",
            [403, 403, 403, 403, 200],
            false,
            false,
        ),
        row(
            "GET",
            "/.well-known/jwks.json",
            "/.well-known/jwks.json",
            "",
            [200; 5],
            true,
            false,
        ),
        Row {
            content_type: "application/x-www-form-urlencoded",
            ..row(
                "POST",
                "/auth/token",
                "/auth/token",
                &format!("grant_type=client_credentials&client_id={id}&client_secret={secret}"),
                [200; 5],
                true,
                true,
            )
        },
        Row {
            content_type: "application/x-www-form-urlencoded",
            ..row(
                "POST",
                "/auth/refresh",
                "/auth/refresh",
                "refresh_token=never-issued",
                [400; 5],
                true,
                true,
            )
        },
        admin(
            "GET",
            "/admin/providers",
            "/admin/providers",
            "",
            [200, 403, 403, 200, 200],
        ),
        admin(
            "GET",
            "/admin/instances",
            "/admin/instances",
            "",
            [200, 403, 403, 200, 200],
        ),
        admin(
            "GET",
            "/admin/audit",
            "/admin/audit?tenant=acme&limit=5",
            "",
            [200, 403, 403, 403, 200],
        ),
        admin(
            "GET",
            "/admin/clients",
            "/admin/clients",
            "",
            [200, 403, 403, 200, 200],
        ),
        admin(
            "POST",
            "/admin/clients",
            "/admin/clients",
            r#"{"tenant":"acme","roles":["vendor"]}"#,
            [201, 403, 403, 403, 201],
        ),
        admin(
            "POST",
            "/admin/clients/{client_id}/revoke",
            &format!("/admin/clients/{victim}/revoke"),
            "",
            [200, 403, 403, 404, 200],
        ),
        Row {
            content_type: "application/toml",
            ..admin(
                "POST",
                "/admin/config/validate",
                "/admin/config/validate",
                config_text,
                [403, 403, 403, 403, 200],
            )
        },
        admin(
            "POST",
            "/admin/config/reload",
            "/admin/config/reload",
            "",
            [403, 403, 403, 403, 200],
        ),
        admin(
            "POST",
            "/admin/plugins/reload",
            "/admin/plugins/reload",
            "",
            [403, 403, 403, 403, 200],
        ),
        admin(
            "POST",
            "/admin/providers/{service}/pause",
            "/admin/providers/kv/pause",
            r#"{"tenant":"acme"}"#,
            [200, 403, 403, 403, 200],
        ),
        admin(
            "POST",
            "/admin/providers/{service}/resume",
            "/admin/providers/kv/resume",
            r#"{"tenant":"acme"}"#,
            [200, 403, 403, 403, 200],
        ),
        admin(
            "POST",
            "/admin/providers/{service}/restart",
            "/admin/providers/kv/restart",
            r#"{"tenant":"acme"}"#,
            [200, 403, 403, 403, 200],
        ),
        admin(
            "POST",
            "/admin/tenants/{tenant}/services/{service}/disable",
            "/admin/tenants/acme/services/kv/disable",
            "",
            [200, 403, 403, 403, 200],
        ),
        admin(
            "POST",
            "/admin/tenants/{tenant}/services/{service}/enable",
            "/admin/tenants/acme/services/kv/enable",
            "",
            [200, 403, 403, 403, 200],
        ),
    ]
}

async fn records(app: &App) -> i64 {
    assert!(
        eventually(Duration::from_secs(10), || app.host.audit().unwritten()
            == 0)
        .await
    );
    sqlx::query_scalar("SELECT COUNT(*) FROM audit_log")
        .fetch_one(app.host.storage().pool())
        .await
        .unwrap()
}

async fn every_route_answers_every_token_as_the_matrix_says(db: TestDatabase) {
    let text = config(&db.url);
    let source = ConfigSource {
        registry: registry(&Arc::new(Counters::default())),
        origin: Origin::Text {
            text: text.clone(),
            name: "matrix.toml".into(),
            base: ".".into(),
        },
        env: Box::new(|_| None),
        listen: None,
    };
    let loaded = source.load(None).unwrap_or_else(|e| panic!("{e:?}"));
    let issuer = TokenIssuer::new(&loaded.keys, loaded.token.clone()).unwrap();
    let host = Host::start_with(loaded, Some(source)).await.unwrap();
    let app = App {
        router: http::router(host.clone()),
        host,
        counters: Arc::new(Counters::default()),
        issuer,
        _db: db,
    };
    let mint = |tenant: &str, roles: &[&str], subject: &str| {
        app.issuer
            .mint_identity(
                &Identity {
                    subject: subject.into(),
                    tenant: tenant.into(),
                    roles: roles.iter().map(|r| (*r).to_owned()).collect(),
                    company_id: None,
                },
                300,
            )
            .unwrap()
    };
    let tokens: Vec<String> = vec![
        mint("acme", &["admin"], "ada-of-acme"),
        mint("acme", &["staff"], "sam-of-acme"),
        mint("acme", &["vendor"], "val-of-acme"),
        mint("globex", &["admin"], "bob-of-globex"),
        mint("platform", &["admin"], "olga-the-operator"),
    ]
    .into_iter()
    .chain(TOKENS[5..].iter().map(|k| forged(k)))
    .collect();

    // Each tenant's own data, and clients: what the other tenant must never see.
    for (i, value) in [(0, "acme-private-value"), (3, "globex-private-value")] {
        let r = app
            .post(
                Some(&tokens[i]),
                "kv/set",
                json!({"key": "shared", "value": value}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let add = |tenant: &str| {
        let body = json!({"tenant": tenant, "roles": ["vendor"], "subject": format!("svc-{tenant}-{}", tenant.len())});
        let token = tokens[4].clone();
        let app = &app;
        async move {
            let r = app
                .send(
                    Request::post("/admin/clients")
                        .header("authorization", format!("Bearer {token}"))
                        .header("content-type", "application/json")
                        .body(Body::from(body.to_string()))
                        .unwrap(),
                )
                .await;
            assert_eq!(r.status, 201, "{}", r.body);
            (
                r.body["client_id"].as_str().unwrap().to_owned(),
                r.body["client_secret"].as_str().unwrap().to_owned(),
            )
        }
    };
    let acme_client = add("acme").await;
    let victim = add("acme").await.0;
    let globex_client = add("globex").await.0;
    let acme_marks = [
        "acme-private-value",
        "ada-of-acme",
        "sam-of-acme",
        "val-of-acme",
        acme_client.0.as_str(),
        victim.as_str(),
        "svc-acme-4",
    ];
    let globex_marks = [
        "globex-private-value",
        "bob-of-globex",
        globex_client.as_str(),
        "svc-globex-6",
    ];

    let table = rows(&text, (&acme_client.0, &acme_client.1), &victim);
    // The table covers the document exactly: a route added without a row fails here.
    let doc = app.get(None, "/openapi.json").await.body;
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    let covered: BTreeSet<(String, String)> = table
        .iter()
        .map(|r| (r.method.to_owned(), r.template.to_owned()))
        .collect();
    assert_eq!(
        documented, covered,
        "every documented route has a row, and only those"
    );

    let mut failures = Vec::new();
    let mut cells = 0;
    for (t, token) in tokens.iter().enumerate() {
        for row in &table {
            let want = if t < 5 {
                row.expect[t]
            } else if row.public {
                row.expect[0]
            } else {
                401
            };
            let before = records(&app).await;
            let mut req = Request::builder()
                .method(row.method)
                .uri(&row.path)
                .header("authorization", format!("Bearer {token}"));
            if !row.body.is_empty() {
                req = req.header("content-type", row.content_type);
            }
            let r = app
                .send(req.body(Body::from(row.body.clone())).unwrap())
                .await;
            let added = records(&app).await - before;
            cells += 1;
            let cell = format!("{} {} × {}", row.method, row.path, TOKENS[t]);
            if r.status.as_u16() != want {
                failures.push(format!(
                    "{cell}: {} (expected {want}): {}",
                    r.status.as_u16(),
                    r.body
                ));
            }
            let refused = matches!(r.status.as_u16(), 401 | 403);
            let expect_records = i64::from(row.recorded || (!row.public && refused));
            if added != expect_records {
                failures.push(format!(
                    "{cell}: {added} audit records (expected {expect_records})"
                ));
            }
            let text = r.body.to_string();
            let (theirs, whose) = match t {
                0..=2 => (&globex_marks[..], "B"),
                3 => (&acme_marks[..], "A"),
                _ => (&[][..], ""),
            };
            // What the caller sent itself (a client id in the path) is only echoed back.
            for mark in theirs
                .iter()
                .filter(|m| !row.path.contains(**m) && !row.body.contains(**m))
            {
                if text.contains(mark) {
                    failures.push(format!(
                        "{cell}: the answer holds tenant {whose}'s '{mark}': {text}"
                    ));
                }
            }
        }
    }
    assert_eq!(cells, 14 * table.len());
    assert!(
        failures.is_empty(),
        "{} of {cells} cells wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
