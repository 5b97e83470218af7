//! The token service: client-credentials grants the host's own verifier accepts, refresh
//! rotation with family revocation on reuse, revocation, tenant-scoped client management,
//! rate limits before hashing, the JWKS of an RS256 key, and one audit record per grant.

use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use base64::Engine;
use providers_core::ErrorCode;
use providers_database::testing::TestDatabase;
use serde_json::{Value, json};

use crate::support::{App, Edit, Resp, assert_error, eventually, matrix};

matrix!(
    a_client_credentials_grant_gives_tokens_the_host_accepts,
    a_refresh_token_works_once_and_its_reuse_revokes_the_family,
    a_revoked_client_gets_no_tokens_and_its_refresh_tokens_die,
    tenant_admins_manage_their_own_tenant_s_clients_only,
    grants_are_rate_limited_per_client_and_overall_before_hashing,
);

/// Admins on, the token service on with cheap hashing (the costs are the operator's; tests
/// check behaviour), and `rates` as written.
fn with_auth(rates: &str) -> impl FnOnce(String) -> String + '_ {
    move |text: String| {
        text.edit(
            "leeway_seconds = 0\n",
            "leeway_seconds = 0\nadmin_role = \"admin\"\nplatform_tenant = \"platform\"\n",
        ) + &format!(
            "\n[auth]\nenabled = true\naccess_ttl = \"2m\"\nargon2 = {{ memory_kib = 256, iterations = 1, parallelism = 1 }}\n{rates}\n"
        )
    }
}

const OPEN: &str = "client_rate = { per_second = 1000 }\noverall_rate = { per_second = 1000 }";

pub async fn form(app: &App, path: &str, body: &str, basic: Option<(&str, &str)>) -> Resp {
    let mut req = Request::post(path).header("content-type", "application/x-www-form-urlencoded");
    if let Some((id, secret)) = basic {
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
        req = req.header("authorization", format!("Basic {b64}"));
    }
    app.send(req.body(Body::from(body.to_owned())).unwrap())
        .await
}

async fn admin_post(app: &App, token: &str, path: &str, body: Value) -> Resp {
    app.send(
        Request::post(path)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap(),
    )
    .await
}

/// A client of `tenant` with `roles`, created by a platform operator: (id, secret).
pub async fn client(app: &App, tenant: &str, roles: &[&str]) -> (String, String) {
    let platform = app.token("platform", &["admin"]);
    let r = admin_post(
        app,
        &platform,
        "/admin/clients",
        json!({"tenant": tenant, "roles": roles, "subject": format!("svc-{tenant}")}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    (
        r.body["client_id"].as_str().unwrap().to_owned(),
        r.body["client_secret"].as_str().unwrap().to_owned(),
    )
}

/// An OAuth2 error: status, `error`, the host's code, and the no-store header.
fn assert_oauth(r: &Resp, status: u16, error: &str, code: ErrorCode) -> String {
    assert_eq!(r.status.as_u16(), status, "{}", r.body);
    assert_eq!(r.body["error"], error, "{}", r.body);
    assert_eq!(r.body["error_code"], code.as_str(), "{}", r.body);
    assert_eq!(r.headers["cache-control"], "no-store");
    let keys: Vec<&String> = r.body.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        ["error", "error_code", "error_description", "request_id"]
    );
    r.body["error_description"].as_str().unwrap().to_owned()
}

async fn token_records(app: &App, tenant: &str) -> Vec<Value> {
    assert!(
        eventually(Duration::from_secs(10), || app.host.audit().unwritten()
            == 0)
        .await
    );
    let platform = app.token("platform", &["admin"]);
    let r = app
        .get(
            Some(&platform),
            &format!("/admin/audit?tenant={tenant}&kind=token&limit=1000"),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "token")
        .cloned()
        .collect()
}

async fn a_client_credentials_grant_gives_tokens_the_host_accepts(db: TestDatabase) {
    let app = App::configured(db, with_auth(OPEN)).await;
    let (id, secret) = client(&app, "acme", &["user"]).await;
    assert!(id.starts_with("acme-"), "{id}");

    // The form body (the standard), JSON, and HTTP Basic all grant.
    let by_form = form(
        &app,
        "/auth/token",
        &format!("grant_type=client_credentials&client_id={id}&client_secret={secret}"),
        None,
    )
    .await;
    assert_eq!(by_form.status, 200, "{}", by_form.body);
    assert_eq!(by_form.headers["cache-control"], "no-store");
    assert_eq!(by_form.body["token_type"], "Bearer");
    assert_eq!(by_form.body["expires_in"], 120);
    assert_eq!(by_form.body["refresh_expires_in"], 8 * 3600);
    let by_json = app
        .send(
            Request::post("/auth/token")
                .header("content-type", "application/json")
                .body(Body::from(json!({"grant_type": "client_credentials", "client_id": id, "client_secret": secret}).to_string()))
                .unwrap(),
        )
        .await;
    assert_eq!(by_json.status, 200, "{}", by_json.body);
    let by_basic = form(
        &app,
        "/auth/token",
        "grant_type=client_credentials",
        Some((&id, &secret)),
    )
    .await;
    assert_eq!(by_basic.status, 200, "{}", by_basic.body);

    // The access token is the host's own: its claims are the client's, and calls accept it.
    let access = by_form.body["access_token"].as_str().unwrap();
    let identity = app
        .host
        .authenticate(Some(&format!("Bearer {access}")))
        .unwrap();
    assert_eq!(
        (
            &*identity.tenant,
            &*identity.subject,
            identity.roles.to_vec()
        ),
        ("acme", "svc-acme", vec!["user".to_owned()])
    );
    let set = app
        .post(Some(access), "kv/set", json!({"key": "k", "value": 1}))
        .await;
    assert_eq!(set.status, 200, "{}", set.body);
    // Its roles bound it: `user` has no admin rights.
    let r = app.get(Some(access), "/admin/providers").await;
    assert_error(&r, 403, ErrorCode::Forbidden);

    // Refusals: the same words for an unknown id and a wrong secret, each with its status.
    let wrong = form(
        &app,
        "/auth/token",
        &format!("grant_type=client_credentials&client_id={id}&client_secret=nope"),
        None,
    )
    .await;
    let unknown = form(
        &app,
        "/auth/token",
        "grant_type=client_credentials&client_id=acme-nobody&client_secret=nope",
        None,
    )
    .await;
    let d1 = assert_oauth(&wrong, 401, "invalid_client", ErrorCode::Unauthenticated);
    let d2 = assert_oauth(&unknown, 401, "invalid_client", ErrorCode::Unauthenticated);
    assert_eq!(d1, d2, "no oracle for which client ids exist");
    assert_eq!(
        wrong.headers["www-authenticate"],
        "Basic realm=\"provider-host\""
    );
    let d = assert_oauth(
        &form(&app, "/auth/token", "grant_type=password&username=a", None).await,
        400,
        "unsupported_grant_type",
        ErrorCode::ValidationError,
    );
    assert_eq!(
        d,
        "grant_type 'password' is not supported (client_credentials, refresh_token)"
    );
    let d = assert_oauth(
        &form(
            &app,
            "/auth/token",
            &format!("grant_type=client_credentials&client_id={id}"),
            None,
        )
        .await,
        400,
        "invalid_request",
        ErrorCode::ValidationError,
    );
    assert_eq!(d, "client_secret is missing");
    let long = "x".repeat(300);
    let d = assert_oauth(
        &form(
            &app,
            "/auth/token",
            &format!("grant_type=client_credentials&client_id={long}&client_secret=s"),
            None,
        )
        .await,
        400,
        "invalid_request",
        ErrorCode::ValidationError,
    );
    assert_eq!(d, "client_id is longer than 256 bytes");
    let d = assert_oauth(
        &form(
            &app,
            "/auth/token",
            &format!("grant_type=client_credentials&client_id={id}&client_secret={secret}"),
            Some((&id, &secret)),
        )
        .await,
        400,
        "invalid_request",
        ErrorCode::ValidationError,
    );
    assert!(d.starts_with("client credentials were given twice"), "{d}");
    let plain = app
        .send(
            Request::post("/auth/token")
                .header("content-type", "text/plain")
                .body(Body::from("x"))
                .unwrap(),
        )
        .await;
    let d = assert_oauth(&plain, 400, "invalid_request", ErrorCode::ValidationError);
    assert!(
        d.starts_with("Content-Type 'text/plain' is not accepted"),
        "{d}"
    );

    // One record per grant and per refused grant that named a client, in the client's
    // tenant when the id is known; never a secret.
    let acme = token_records(&app, "acme").await;
    let seen: Vec<(&Value, &Value, &Value)> = acme
        .iter()
        .map(|r| (&r["subject"], &r["outcome"], &r["note"]))
        .collect();
    let ok = (&json!("svc-acme"), &json!("ok"), &json!(""));
    assert_eq!(
        seen,
        [
            ok,
            ok,
            ok,
            (
                &json!("svc-acme"),
                &json!("denied"),
                &json!("wrong client secret")
            )
        ]
    );
    assert!(acme.iter().all(|r| r["action"] == "client_credentials"));
    let nobody = token_records(&app, "-").await;
    let seen: Vec<(&Value, &Value, &Value)> = nobody
        .iter()
        .map(|r| (&r["subject"], &r["outcome"], &r["note"]))
        .collect();
    assert_eq!(
        seen,
        [(
            &json!("acme-nobody"),
            &json!("denied"),
            &json!("unknown client id")
        )]
    );
    let all = serde_json::to_string(&(acme, nobody)).unwrap();
    assert!(!all.contains(&secret) && !all.contains(access));
    // And the store keeps only a hash of the secret.
    let stored: String =
        sqlx::query_scalar("SELECT secret_hash FROM auth_clients WHERE client_id = $1")
            .bind(&id)
            .fetch_one(app.host.storage().pool())
            .await
            .unwrap();
    assert!(
        stored.starts_with("$argon2id$v=19$m=256,t=1,p=1$") && !stored.contains(&secret),
        "{stored}"
    );
}

async fn grant(app: &App, id: &str, secret: &str) -> Value {
    let r = form(
        app,
        "/auth/token",
        &format!("grant_type=client_credentials&client_id={id}&client_secret={secret}"),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

async fn refresh(app: &App, token: &str) -> Resp {
    form(
        app,
        "/auth/refresh",
        &format!("refresh_token={token}"),
        None,
    )
    .await
}

async fn a_refresh_token_works_once_and_its_reuse_revokes_the_family(db: TestDatabase) {
    let app = App::configured(db, with_auth(OPEN)).await;
    let (id, secret) = client(&app, "acme", &["user"]).await;
    let first = grant(&app, &id, &secret).await;
    let other = grant(&app, &id, &secret).await;
    let r1 = first["refresh_token"].as_str().unwrap();

    let second = refresh(&app, r1).await;
    assert_eq!(second.status, 200, "{}", second.body);
    let r2 = second.body["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(r2, r1);
    let access = second.body["access_token"].as_str().unwrap();
    assert_eq!(
        app.post(Some(access), "kv/set", json!({"key": "k", "value": 2}))
            .await
            .status,
        200
    );
    // grant_type=refresh_token at /auth/token is the same rotation.
    let third = form(
        &app,
        "/auth/token",
        &format!("grant_type=refresh_token&refresh_token={r2}"),
        None,
    )
    .await;
    assert_eq!(third.status, 200, "{}", third.body);
    let r3 = third.body["refresh_token"].as_str().unwrap().to_owned();

    // r1 again: only a stolen copy would be replayed, so the whole family goes.
    let d = assert_oauth(
        &refresh(&app, r1).await,
        400,
        "invalid_grant",
        ErrorCode::Unauthenticated,
    );
    assert!(
        d.starts_with(
            "refresh token was already used: every refresh token of its family is now revoked"
        ),
        "{d}"
    );
    let d = assert_oauth(
        &refresh(&app, &r3).await,
        400,
        "invalid_grant",
        ErrorCode::Unauthenticated,
    );
    assert_eq!(d, "refresh token is revoked");
    let d = assert_oauth(
        &refresh(&app, "never-issued").await,
        400,
        "invalid_grant",
        ErrorCode::Unauthenticated,
    );
    assert_eq!(d, "refresh token is not known");
    let d = assert_oauth(
        &form(&app, "/auth/refresh", "", None).await,
        400,
        "invalid_request",
        ErrorCode::ValidationError,
    );
    assert_eq!(d, "refresh_token is missing");
    // The other grant's family is untouched.
    let still = refresh(&app, other["refresh_token"].as_str().unwrap()).await;
    assert_eq!(still.status, 200, "{}", still.body);
    let live: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM auth_refresh_tokens WHERE revoked_ms IS NULL AND used_ms IS NULL",
    )
    .fetch_one(app.host.storage().pool())
    .await
    .unwrap();
    assert_eq!(live, 1, "only the other family's newest token is live");

    // Two racing uses of one token: one rotates, the other is a reuse.
    let fresh = grant(&app, &id, &secret).await;
    let t = fresh["refresh_token"].as_str().unwrap();
    let (a, b) = tokio::join!(refresh(&app, t), refresh(&app, t));
    let mut statuses = [a.status.as_u16(), b.status.as_u16()];
    statuses.sort();
    assert_eq!(statuses, [200, 400]);
    // The loser's reuse revoked the family, the winner's new token included.
    let winner = if a.status == 200 { &a } else { &b };
    let d = assert_oauth(
        &refresh(&app, winner.body["refresh_token"].as_str().unwrap()).await,
        400,
        "invalid_grant",
        ErrorCode::Unauthenticated,
    );
    assert_eq!(d, "refresh token is revoked");

    let records = token_records(&app, "acme").await;
    let reuse: Vec<&Value> = records
        .iter()
        .filter(|r| {
            r["note"]
                .as_str()
                .is_some_and(|n| n.starts_with("refresh token was already used"))
        })
        .collect();
    assert_eq!(
        reuse.len(),
        2,
        "the replay and the lost race are in acme's trail: {records:?}"
    );
}

async fn a_revoked_client_gets_no_tokens_and_its_refresh_tokens_die(db: TestDatabase) {
    let app = App::configured(db, with_auth(OPEN)).await;
    let (id, secret) = client(&app, "acme", &["user"]).await;
    let before = grant(&app, &id, &secret).await;
    let platform = app.token("platform", &["admin"]);
    let r = admin_post(
        &app,
        &platform,
        &format!("/admin/clients/{id}/revoke"),
        json!({}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body["client"]["revoked_ms"].as_i64().is_some());
    let g = form(
        &app,
        "/auth/token",
        &format!("grant_type=client_credentials&client_id={id}&client_secret={secret}"),
        None,
    )
    .await;
    assert_oauth(&g, 401, "invalid_client", ErrorCode::Unauthenticated);
    let d = assert_oauth(
        &refresh(&app, before["refresh_token"].as_str().unwrap()).await,
        400,
        "invalid_grant",
        ErrorCode::Unauthenticated,
    );
    assert_eq!(d, "refresh token is revoked");
    let records = token_records(&app, "acme").await;
    assert_eq!(records.last().unwrap()["note"], "refresh token is revoked");
    assert!(
        records.iter().any(|r| r["note"] == "client is revoked"),
        "{records:?}"
    );
    let r = admin_post(
        &app,
        &platform,
        "/admin/clients/acme-nope/revoke",
        json!({}),
    )
    .await;
    assert_error(&r, 404, ErrorCode::NotFound);
}

async fn tenant_admins_manage_their_own_tenant_s_clients_only(db: TestDatabase) {
    let app = App::configured(db, with_auth(OPEN)).await;
    let acme_admin = app.token("acme", &["admin"]);
    let mine = admin_post(
        &app,
        &acme_admin,
        "/admin/clients",
        json!({"roles": ["reader"]}),
    )
    .await;
    assert_eq!(mine.status, 201, "{}", mine.body);
    assert_eq!(mine.body["tenant"], "acme");
    assert_eq!(mine.body["created_by"], "tester@acme");
    let theirs = admin_post(
        &app,
        &acme_admin,
        "/admin/clients",
        json!({"tenant": "globex", "roles": ["reader"]}),
    )
    .await;
    assert_eq!(
        assert_error(&theirs, 403, ErrorCode::Forbidden),
        "an administrator of tenant 'acme' cannot act on tenant 'globex'"
    );
    let platform_client = admin_post(
        &app,
        &acme_admin,
        "/admin/clients",
        json!({"tenant": "platform", "roles": ["admin"]}),
    )
    .await;
    assert_error(&platform_client, 403, ErrorCode::Forbidden);
    let (globex_id, _) = client(&app, "globex", &["reader"]).await;

    let listed = app.get(Some(&acme_admin), "/admin/clients").await;
    assert_eq!(listed.status, 200);
    let tenants: Vec<&Value> = listed.body["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| &c["tenant"])
        .collect();
    assert_eq!(tenants, [&json!("acme")]);
    assert!(
        !listed.body.to_string().contains("secret"),
        "no secret or hash is listed"
    );
    assert_error(
        &app.get(Some(&acme_admin), "/admin/clients?tenant=globex")
            .await,
        403,
        ErrorCode::Forbidden,
    );
    let r = admin_post(
        &app,
        &acme_admin,
        &format!("/admin/clients/{globex_id}/revoke"),
        json!({}),
    )
    .await;
    assert_eq!(
        assert_error(&r, 404, ErrorCode::NotFound),
        format!("no client '{globex_id}'")
    );
    let platform = app.token("platform", &["admin"]);
    let all = app.get(Some(&platform), "/admin/clients").await;
    assert_eq!(all.body["clients"].as_array().unwrap().len(), 2);
    assert!(
        all.body["clients"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["revoked_ms"].is_null()),
        "the refused revoke changed nothing"
    );

    // What is created is checked.
    let d = assert_error(
        &admin_post(
            &app,
            &acme_admin,
            "/admin/clients",
            json!({"roles": ["root"]}),
        )
        .await,
        400,
        ErrorCode::ValidationError,
    );
    assert!(
        d.starts_with("roles: 'root' is not defined in [security.roles]"),
        "{d}"
    );
    let d = assert_error(
        &admin_post(
            &app,
            &platform,
            "/admin/clients",
            json!({"tenant": "initech", "roles": ["user"]}),
        )
        .await,
        400,
        ErrorCode::ValidationError,
    );
    assert_eq!(d, "tenant: 'initech' is not configured on this host");
    let d = assert_error(
        &admin_post(
            &app,
            &platform,
            "/admin/clients",
            json!({"roles": ["user"]}),
        )
        .await,
        400,
        ErrorCode::ValidationError,
    );
    assert_eq!(d, "tenant: name the tenant the client's tokens are for");
    let d = assert_error(
        &admin_post(&app, &acme_admin, "/admin/clients", json!({"roles": []})).await,
        400,
        ErrorCode::ValidationError,
    );
    assert_eq!(d, "roles: give at least one role");
    assert_error(
        &app.get(Some(&app.token("acme", &["user"])), "/admin/clients")
            .await,
        403,
        ErrorCode::Forbidden,
    );
    assert_error(
        &app.get(None, "/admin/clients").await,
        401,
        ErrorCode::Unauthenticated,
    );
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM auth_clients")
        .fetch_one(app.host.storage().pool())
        .await
        .unwrap();
    assert_eq!(count, 2, "nothing refused was stored");
}

async fn grants_are_rate_limited_per_client_and_overall_before_hashing(db: TestDatabase) {
    let app = App::configured(
        db,
        with_auth("client_rate = { per_minute = 3 }\noverall_rate = { per_minute = 5 }"),
    )
    .await;
    let (a, a_secret) = client(&app, "acme", &["user"]).await;
    let (b, b_secret) = client(&app, "acme", &["user"]).await;
    for _ in 0..3 {
        grant(&app, &a, &a_secret).await;
    }
    let r = form(
        &app,
        "/auth/token",
        &format!("grant_type=client_credentials&client_id={a}&client_secret={a_secret}"),
        None,
    )
    .await;
    let d = assert_oauth(&r, 429, "rate_limited", ErrorCode::RateLimited);
    assert_eq!(
        d,
        format!(
            "client '{a}' is over its token rate limit of 3 requests per minute (auth.client_rate)"
        )
    );
    let wait: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=20).contains(&wait), "{wait}");
    // Another client has its own cell, until everyone's is spent.
    grant(&app, &b, &b_secret).await;
    grant(&app, &b, &b_secret).await;
    let r = form(
        &app,
        "/auth/token",
        &format!("grant_type=client_credentials&client_id={b}&client_secret={b_secret}"),
        None,
    )
    .await;
    let d = assert_oauth(&r, 429, "rate_limited", ErrorCode::RateLimited);
    assert_eq!(
        d,
        "the token endpoint is over its rate limit of 5 requests per minute (auth.overall_rate)"
    );
    // Unknown ids spend the overall budget too, so random ids are no way around it.
    let r = form(
        &app,
        "/auth/token",
        "grant_type=client_credentials&client_id=x&client_secret=y",
        None,
    )
    .await;
    assert_oauth(&r, 429, "rate_limited", ErrorCode::RateLimited);
    let records = token_records(&app, "acme").await;
    assert_eq!(
        records.len(),
        5,
        "refusals by rate are not recorded one by one"
    );
}

#[tokio::test]
async fn an_rs256_host_publishes_its_jwks_and_accepts_what_it_issues() {
    let keys = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../providers-security/tests/keys"
    );
    let db = TestDatabase::sqlite();
    let app = App::configured(db, |text| {
        with_auth(OPEN)(text.edit(
            "algorithm = \"HS256\"\nsecret = \"${env:TEST_JWT_SECRET}\"",
            &format!("kid = \"rsa-1\"\nalgorithm = \"RS256\"\npublic_key_file = \"{keys}/rs256.pub.pem\"\nprivate_key_file = \"{keys}/rs256.key.pem\""),
        ))
    })
    .await;
    let r = app.get(None, "/.well-known/jwks.json").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let key = &r.body["keys"][0];
    assert_eq!(
        (
            &key["kty"],
            &key["alg"],
            &key["kid"],
            &key["use"],
            &key["e"]
        ),
        (
            &json!("RSA"),
            &json!("RS256"),
            &json!("rsa-1"),
            &json!("sig"),
            &json!("AQAB")
        )
    );
    assert!(key["n"].as_str().unwrap().len() > 300);
    assert!(key.get("d").is_none(), "no private part");
    let (id, secret) = client(&app, "acme", &["user"]).await;
    let access = grant(&app, &id, &secret).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let header: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(access.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        (&header["alg"], &header["kid"]),
        (&json!("RS256"), &json!("rsa-1"))
    );
    // A verifier built from the published JWK alone accepts it.
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(key.clone()).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&["providers"]);
    validation.set_issuer(&["test-issuer"]);
    let claims = jsonwebtoken::decode::<Value>(
        &access,
        &jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(),
        &validation,
    )
    .unwrap()
    .claims;
    assert_eq!(
        (&claims["tenant_id"], &claims["sub"]),
        (&json!("acme"), &json!("svc-acme"))
    );
    assert_eq!(
        app.post(Some(&access), "kv/set", json!({"key": "k", "value": 2}))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn an_hs256_host_publishes_no_jwks_and_the_service_is_off_unless_enabled() {
    let app = App::configured(TestDatabase::sqlite(), with_auth(OPEN)).await;
    let d = assert_error(
        &app.get(None, "/.well-known/jwks.json").await,
        404,
        ErrorCode::NotFound,
    );
    assert!(
        d.starts_with("this host has no public signing key to publish"),
        "{d}"
    );
    let off = App::on(TestDatabase::sqlite()).await;
    let d = assert_error(
        &form(&off, "/auth/token", "grant_type=client_credentials", None).await,
        404,
        ErrorCode::NotFound,
    );
    assert_eq!(
        d,
        "the token service is off on this host: set [auth] enabled = true to use it"
    );
}
