//! The HTTP routes, called in-process: auth, validation, limits, permissions, listings.

use axum::body::Body;
use axum::http::Request;
use base64::Engine;
use providers_core::ErrorCode;
use serde_json::json;

use providers_database::testing::TestDatabase;

use crate::support::{App, SECRET, assert_error, matrix};

matrix!(
    client_text_in_errors_is_quoted,
    a_kept_context_cannot_call_after_its_call_ended,
    nesting_is_bounded_and_nested_calls_keep_the_deadline,
    a_call_returns_data_and_echoes_the_request_id,
    bad_tokens_are_401_and_unknown_tenants_403,
    payloads_are_validated_with_the_pointer_of_the_bad_field,
    the_body_limit_holds_at_the_edge,
    services_actions_and_permissions_are_enforced,
    nested_calls_run_as_the_caller,
    listings_and_openapi_come_from_the_descriptors,
    a_malformed_path_gets_the_error_shape,
);

async fn a_call_returns_data_and_echoes_the_request_id(db: TestDatabase) {
    let app = App::on(db).await;
    let token = app.token("acme", &["user"]);
    let req = Request::post("/providers/probe/echo")
        .header("authorization", format!("Bearer {token}"))
        .header("x-request-id", "order-42:retry.1")
        .body(Body::from(r#"{"quantity": 3}"#))
        .unwrap();
    let r = app.send(req).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.headers["x-request-id"], "order-42:retry.1");
    assert_eq!(
        r.body,
        json!({"data": {"payload": {"quantity": 3}, "tenant": "acme", "subject": "tester", "request_id": "order-42:retry.1"}, "request_id": "order-42:retry.1"})
    );

    // A client id that is not plain is replaced by a generated one.
    let req = Request::post("/providers/probe/echo")
        .header("authorization", format!("Bearer {token}"))
        .header("x-request-id", "evil\tid")
        .body(Body::empty())
        .unwrap();
    let r = app.send(req).await;
    let id = r.headers["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(id.len(), 36, "a uuid");
    assert_eq!(r.body["request_id"], id.as_str());
    assert_eq!(
        r.body["data"]["payload"],
        json!({}),
        "an empty body is an empty object"
    );
}

async fn bad_tokens_are_401_and_unknown_tenants_403(db: TestDatabase) {
    let app = App::on(db).await;
    let r = app.post(None, "kv/get", json!({"key": "a"})).await;
    assert_eq!(
        assert_error(&r, 401, ErrorCode::Unauthenticated),
        "missing Authorization: Bearer <token> header"
    );

    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({"sub": "x", "tenant_id": "acme", "roles": ["admin"], "iss": "test-issuer", "aud": "providers", "exp": now + 60});
    let none = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(&claims.to_string())
    );
    let r = app.post(Some(&none), "kv/get", json!({"key": "a"})).await;
    assert_eq!(
        assert_error(&r, 401, ErrorCode::Unauthenticated),
        "malformed bearer token"
    );

    let sign = |claims: &serde_json::Value, secret: &[u8]| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            claims,
            &jsonwebtoken::EncodingKey::from_secret(secret),
        )
        .unwrap()
    };
    let mut string_exp = claims.clone();
    string_exp["exp"] = json!((now + 60).to_string());
    let r = app
        .post(
            Some(&sign(&string_exp, SECRET.as_bytes())),
            "kv/get",
            json!({"key": "a"}),
        )
        .await;
    assert_error(&r, 401, ErrorCode::Unauthenticated);

    let r = app
        .post(
            Some(&sign(&claims, b"a-different-secret-a-different-secret")),
            "kv/get",
            json!({"key": "a"}),
        )
        .await;
    assert_eq!(
        assert_error(&r, 401, ErrorCode::Unauthenticated),
        "token signature is invalid"
    );

    let mut expired = claims.clone();
    expired["exp"] = json!(now - 10);
    let r = app
        .post(
            Some(&sign(&expired, SECRET.as_bytes())),
            "kv/get",
            json!({"key": "a"}),
        )
        .await;
    assert_eq!(
        assert_error(&r, 401, ErrorCode::Unauthenticated),
        "token has expired"
    );

    let r = app
        .post(
            Some(&sign(&claims, SECRET.as_bytes())),
            "kv/get",
            json!({"key": "a"}),
        )
        .await;
    assert_eq!(
        assert_error(&r, 404, ErrorCode::NotFound),
        "key 'a' not found",
        "the same claims, properly signed, pass"
    );

    let stranger = app.token("initech", &["admin"]);
    let r = app
        .post(Some(&stranger), "kv/get", json!({"key": "a"}))
        .await;
    assert_eq!(
        assert_error(&r, 403, ErrorCode::Forbidden),
        "tenant \"initech\" is not configured on this host"
    );
    let r = app.get(Some(&stranger), "/providers").await;
    assert_error(&r, 403, ErrorCode::Forbidden);

    // A header naming another tenant changes nothing: the tenant comes from the token only.
    let acme = app.token("acme", &["user"]);
    let req = Request::post("/providers/probe/echo")
        .header("authorization", format!("Bearer {acme}"))
        .header("x-tenant-id", "globex")
        .body(Body::empty())
        .unwrap();
    assert_eq!(app.send(req).await.body["data"]["tenant"], "acme");
}

async fn payloads_are_validated_with_the_pointer_of_the_bad_field(db: TestDatabase) {
    let app = App::on(db).await;
    let token = app.token("acme", &["user"]);
    let r = app
        .post(Some(&token), "probe/echo", json!({"quantity": "three"}))
        .await;
    assert_eq!(
        assert_error(&r, 400, ErrorCode::ValidationError),
        "payload at '/quantity': \"three\" is not of type \"number\""
    );
    let r = app
        .post(
            Some(&token),
            "probe/echo",
            json!({"lines": [{"sku": "a"}, {"qty": 1}]}),
        )
        .await;
    assert_eq!(
        assert_error(&r, 400, ErrorCode::ValidationError),
        "payload at '/lines/1': \"sku\" is a required property"
    );
    let r = app.post(Some(&token), "kv/set", json!({"key": "k"})).await;
    assert_eq!(
        assert_error(&r, 400, ErrorCode::ValidationError),
        "payload at '/': \"value\" is a required property"
    );
    let r = app
        .post_raw(Some(&token), "kv/set", b"{\"key\": ".to_vec())
        .await;
    let detail = assert_error(&r, 400, ErrorCode::ValidationError);
    assert!(
        detail.starts_with("request body is not valid JSON: "),
        "{detail}"
    );
    // Nothing was written by the refused calls.
    let r = app.post(Some(&token), "kv/list", json!({})).await;
    assert_eq!(r.body["data"]["items"], json!([]));
}

async fn the_body_limit_holds_at_the_edge(db: TestDatabase) {
    let app = App::on(db).await;
    let token = app.token("acme", &["user"]);
    // body_limit_bytes = 1024 in the test config.
    let exact = |len: usize| {
        let filler = len - r#"{"key":"k","value":""}"#.len();
        format!(r#"{{"key":"k","value":"{}"}}"#, "x".repeat(filler)).into_bytes()
    };
    let r = app.post_raw(Some(&token), "kv/set", exact(1024)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = app.post_raw(Some(&token), "kv/set", exact(1025)).await;
    assert_eq!(
        assert_error(&r, 413, ErrorCode::ValidationError),
        "request body exceeds the limit of 1024 bytes (server.body_limit_bytes)"
    );
    let r = app.post(Some(&token), "kv/get", json!({"key": "k"})).await;
    assert_eq!(
        r.body["data"]["value"].as_str().unwrap().len(),
        1024 - 22,
        "the 1024-byte write stands"
    );
}

async fn services_actions_and_permissions_are_enforced(db: TestDatabase) {
    let app = App::on(db).await;
    let acme = app.token("acme", &["user"]);
    let r = app.post(Some(&acme), "ledger/post", json!({})).await;
    assert_eq!(
        assert_error(&r, 404, ErrorCode::NotFound),
        "no service 'ledger' is available to tenant 'acme'"
    );
    let r = app.post(Some(&acme), "kv/explode", json!({})).await;
    assert_eq!(
        assert_error(&r, 404, ErrorCode::NotFound),
        "service 'kv' has no action 'explode'"
    );
    let r = app.post(Some(&acme), "probe/secret", json!({})).await;
    assert_eq!(
        assert_error(&r, 403, ErrorCode::Forbidden),
        "action 'probe/secret' needs permission 'probe.secret', which roles [\"user\"] do not grant"
    );
    let admin = app.token("acme", &["admin"]);
    assert_eq!(
        app.post(Some(&admin), "probe/secret", json!({})).await.body["data"],
        "classified"
    );

    // globex does not have probe enabled: not even its existence shows.
    let globex = app.token("globex", &["admin"]);
    let r = app.post(Some(&globex), "probe/echo", json!({})).await;
    assert_eq!(
        assert_error(&r, 404, ErrorCode::NotFound),
        "no service 'probe' is available to tenant 'globex'"
    );
    let r = app.get(Some(&globex), "/providers/probe").await;
    assert_error(&r, 404, ErrorCode::NotFound);

    // Provider errors keep their code.
    let r = app.post(Some(&acme), "probe/fail", json!({})).await;
    assert_eq!(
        assert_error(&r, 409, ErrorCode::Conflict),
        "probe reports a conflict"
    );

    // Unknown routes and methods get the error shape too.
    let r = app.get(None, "/nowhere").await;
    assert_error(&r, 404, ErrorCode::NotFound);
    let r = app.get(Some(&acme), "/providers/kv/get").await;
    assert_error(&r, 405, ErrorCode::ValidationError);
}

async fn nested_calls_run_as_the_caller(db: TestDatabase) {
    let app = App::on(db).await;
    let user = app.token("acme", &["user"]);
    let set =
        json!({"service": "kv", "action": "set", "payload": {"key": "via-probe", "value": 7}});
    let r = app.post(Some(&user), "probe/call", set.clone()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = app
        .post(Some(&user), "kv/get", json!({"key": "via-probe"}))
        .await;
    assert_eq!(r.body["data"]["value"], 7);

    // A reader may call probe, but probe cannot write kv on its behalf.
    let reader = app.token("acme", &["reader"]);
    let r = app.post(Some(&reader), "probe/call", set).await;
    assert_eq!(
        assert_error(&r, 403, ErrorCode::Forbidden),
        "action 'kv/set' needs permission 'kv.write', which roles [\"reader\"] do not grant"
    );
    // Nested payloads are validated like a client's.
    let bad = json!({"service": "kv", "action": "get", "payload": {"key": 1}});
    let r = app.post(Some(&user), "probe/call", bad).await;
    assert_eq!(
        assert_error(&r, 400, ErrorCode::ValidationError),
        "payload at '/key': 1 is not of type \"string\""
    );
}

async fn listings_and_openapi_come_from_the_descriptors(db: TestDatabase) {
    let app = App::on(db).await;
    let acme = app.token("acme", &["user"]);
    let r = app.get(Some(&acme), "/providers").await;
    assert_eq!(r.status, 200);
    let services: Vec<&str> = r.body["providers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["service"].as_str().unwrap())
        .collect();
    assert_eq!(services, ["kv", "limited", "probe", "quick"]);
    assert_eq!(r.body["providers"][2]["version"], "1.4.2");
    assert_eq!(r.body["providers"][2]["status"]["state"], "idle");
    app.post(Some(&acme), "probe/echo", json!({})).await;
    let r = app.get(Some(&acme), "/providers/probe").await;
    assert_eq!(r.body["status"]["state"], "ready");
    assert_eq!(r.body["actions"][0]["name"], "echo");
    assert_eq!(
        r.body["actions"][0]["input_schema"]["properties"]["quantity"],
        json!({"type": "number"})
    );

    let globex = app.token("globex", &["user"]);
    let r = app.get(Some(&globex), "/providers").await;
    assert_eq!(r.body["providers"].as_array().unwrap().len(), 1);

    let r = app.get(None, "/openapi.json").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["openapi"], "3.1.0");
    let set = &r.body["paths"]["/providers/kv/set"]["post"];
    assert_eq!(set["operationId"], "kv.set");
    assert_eq!(
        set["requestBody"]["content"]["application/json"]["schema"]["required"],
        json!(["key", "value"])
    );
    assert_eq!(
        set["responses"]["200"]["content"]["application/json"]["schema"]["properties"]["data"]["required"],
        json!(["key", "etag"])
    );
    assert!(
        r.body["paths"]["/providers/limited/sleep"].is_object(),
        "aliases are documented under their own name"
    );

    let r = app.get(None, "/health").await;
    assert_eq!(r.body, json!({"status": "ok"}));
    let r = app.get(None, "/ready").await;
    assert_eq!(
        r.body,
        json!({"status": "ready"}),
        "public readiness names nothing inside the host"
    );
}

async fn a_malformed_path_gets_the_error_shape(db: TestDatabase) {
    let app = App::on(db).await;
    let token = app.token("acme", &["user"]);
    let req = Request::post("/providers/%FF/get")
        .header("authorization", format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap();
    let r = app.send(req).await;
    let detail = assert_error(&r, 400, ErrorCode::ValidationError);
    assert!(detail.starts_with("invalid path: "), "{detail}");
    // The bearer scheme is case-insensitive.
    let req = Request::post("/providers/probe/echo")
        .header("authorization", format!("BEARER {token}"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(app.send(req).await.status, 200);
}

async fn a_kept_context_cannot_call_after_its_call_ended(db: TestDatabase) {
    let app = App::on(db).await;
    let token = app.token("acme", &["user"]);
    let r = app.post(Some(&token), "probe/keep", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let kept = app.counters.kept.lock().unwrap().clone().unwrap();
    let e = kept
        .call("kv", "set", json!({"key": "late", "value": 1}))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Forbidden);
    assert_eq!(
        e.detail,
        "cannot call 'kv/set': the call this context was given to has ended"
    );
    let r = app
        .post(Some(&token), "kv/get", json!({"key": "late"}))
        .await;
    assert_error(&r, 404, ErrorCode::NotFound);
}

async fn nesting_is_bounded_and_nested_calls_keep_the_deadline(db: TestDatabase) {
    let app = App::on(db).await;
    let token = app.token("acme", &["user"]);
    // probe/call → probe/call → … nine levels deep, then echo: the ninth hop is refused.
    let mut payload = json!({"service": "probe", "action": "echo", "payload": {}});
    for _ in 0..9 {
        payload = json!({"service": "probe", "action": "call", "payload": payload});
    }
    let r = app.post(Some(&token), "probe/call", payload).await;
    assert_eq!(
        assert_error(&r, 403, ErrorCode::Forbidden),
        "provider calls nest deeper than 8 levels"
    );
    let mut ok = json!({"service": "probe", "action": "echo", "payload": {"quantity": 1}});
    for _ in 0..7 {
        ok = json!({"service": "probe", "action": "call", "payload": ok});
    }
    let r = app.post(Some(&token), "probe/call", ok).await;
    assert_eq!(r.status, 200, "eight levels are allowed: {}", r.body);

    // `quick` allows 300 ms; the probe it calls would sleep 2 s under its own 3 s limit,
    // but inherits the caller's deadline.
    assert_eq!(
        app.post(Some(&token), "quick/echo", json!({})).await.status,
        200
    );
    let started = std::time::Instant::now();
    let sleep = json!({"service": "probe", "action": "sleep", "payload": {"ms": 2000}});
    let r = app.post(Some(&token), "quick/call", sleep).await;
    // The nested call's own guard fires, at the caller's deadline: without propagation it would
    // run under its 3 s and only the outer call would time out, naming 'quick/call'.
    assert_eq!(
        assert_error(&r, 504, ErrorCode::Timeout),
        "'probe/sleep' did not finish before its deadline"
    );
    assert!(started.elapsed() < std::time::Duration::from_millis(1500));
    let counters = app.counters.clone();
    assert!(
        crate::support::eventually(std::time::Duration::from_secs(1), || counters
            .lines()
            .iter()
            .any(|l| l == "cancelled sleep 2000"))
        .await,
        "the nested call was cancelled at the caller's deadline"
    );
}

async fn client_text_in_errors_is_quoted(db: TestDatabase) {
    let app = App::on(db).await;
    // A signed token whose tenant carries a newline and a fake log line.
    let token = app.token("evil\nWARN forged: admin logged in", &["x"]);
    let r = app.post(Some(&token), "kv/get", json!({"key": "a"})).await;
    assert_eq!(
        assert_error(&r, 403, ErrorCode::Forbidden),
        "tenant \"evil\\nWARN forged: admin logged in\" is not configured on this host"
    );
}
