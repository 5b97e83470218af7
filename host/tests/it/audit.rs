//! The audit trail: one record per call, denial and admin request with the documented
//! fields, read back per tenant, tampering found, both failure modes, flushed at shutdown.

use std::time::{Duration, Instant};

use providers_core::ErrorCode;
use providers_database::testing::TestDatabase;
use serde_json::{Value, json};
use sqlx::AnyPool;

use crate::support::{App, Edit, assert_error, eventually, matrix};

matrix!(
    calls_denials_and_admin_requests_leave_one_record_each,
    an_edited_inserted_or_deleted_record_is_found,
    fail_closed_refuses_calls_until_the_trail_is_written_again,
    buffer_holds_records_to_its_bound_then_refuses,
    shutdown_writes_every_record_held,
);

fn with_admins(text: String) -> String {
    text.edit(
        "leeway_seconds = 0\n",
        "leeway_seconds = 0\nadmin_role = \"admin\"\nplatform_tenant = \"platform\"\n",
    )
}

async fn flushed(app: &App) {
    assert!(
        eventually(Duration::from_secs(10), || app.host.audit().unwritten()
            == 0)
        .await,
        "the trail was not written"
    );
}

async fn trail(app: &App, tenant: &str) -> Vec<Value> {
    let platform = app.token("platform", &["admin"]);
    let r = app
        .get(
            Some(&platform),
            &format!("/admin/audit?tenant={tenant}&limit=1000"),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["records"].as_array().unwrap().clone()
}

async fn calls_denials_and_admin_requests_leave_one_record_each(db: TestDatabase) {
    let app = App::configured(db, with_admins).await;
    let user = app.token_as("acme", &["user"], "ada", None);
    let body = json!({"key": "k", "value": "secret-value-123"});
    let ok = app.post(Some(&user), "kv/set", body.clone()).await;
    assert_eq!(ok.status, 200);
    let denied = app
        .post(
            Some(&app.token("acme", &["reader"])),
            "kv/set",
            body.clone(),
        )
        .await;
    assert_error(&denied, 403, ErrorCode::Forbidden);
    let no_token = app.post(None, "kv/get", json!({"key": "k"})).await;
    assert_error(&no_token, 401, ErrorCode::Unauthenticated);
    let listing = app.get(Some("not-a-token"), "/providers").await;
    assert_error(&listing, 401, ErrorCode::Unauthenticated);
    let nested = app
        .post(
            Some(&user),
            "probe/call",
            json!({"service": "kv", "action": "get", "payload": {"key": "k"}}),
        )
        .await;
    assert_eq!(nested.status, 200, "{}", nested.body);
    let acme_admin = app.token_as("acme", &["admin"], "root", None);
    let r = app
        .send(
            axum::http::Request::post("/admin/providers/probe/pause")
                .header("authorization", format!("Bearer {acme_admin}"))
                .header("content-type", "application/json")
                .body(axum::body::Body::from(r#"{"tenant":"acme"}"#))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    flushed(&app).await;

    let records = trail(&app, "acme").await;
    let id = |r: &crate::support::Resp| r.headers["x-request-id"].to_str().unwrap().to_owned();
    let of = |request: &str| -> Vec<&Value> {
        records
            .iter()
            .filter(|r| r["request_id"] == request)
            .collect()
    };
    let set = of(&id(&ok));
    assert_eq!(set.len(), 1, "{records:?}");
    let set = set[0];
    assert_eq!(
        (
            &set["kind"],
            &set["subject"],
            &set["service"],
            &set["action"],
            &set["outcome"],
            &set["error_code"]
        ),
        (
            &json!("call"),
            &json!("ada"),
            &json!("kv"),
            &json!("set"),
            &json!("ok"),
            &json!("")
        )
    );
    assert_eq!(
        set["payload_sha256"],
        provider_host::audit::sha256_hex(body.to_string().as_bytes())
    );
    assert!(set["latency_us"].as_i64().unwrap() > 0);
    let refused = of(&id(&denied));
    assert_eq!(refused.len(), 1, "one denial, one record");
    assert_eq!(refused[0]["outcome"], "denied");
    assert_eq!(refused[0]["error_code"], "FORBIDDEN");
    // The nested call is a record of its own under the same request id.
    let both = of(&id(&nested));
    assert_eq!(both.len(), 2, "{both:?}");
    assert_eq!(both[0]["service"], "kv");
    assert_eq!(both[0]["note"], "nested call, depth 1");
    assert_eq!(both[1]["service"], "probe");
    let admin = of(&id(&r));
    assert_eq!(admin.len(), 1);
    assert_eq!(admin[0]["kind"], "admin");
    assert_eq!(admin[0]["action"], "POST /admin/providers/probe/pause");
    assert_eq!(admin[0]["subject"], "root");
    let seqs: Vec<i64> = records.iter().map(|r| r["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, (1..=records.len() as i64).collect::<Vec<_>>());
    // Requests without a configured tenant have their own chain.
    let none = trail(&app, "-").await;
    assert_eq!(none.len(), 2, "{none:?}");
    assert_eq!(none[0]["error_code"], "UNAUTHENTICATED");
    assert_eq!(none[0]["kind"], "call");
    assert_eq!(none[1]["kind"], "authn");
    assert_eq!(none[1]["action"], "GET /providers");
    // No payload is ever kept.
    let all = serde_json::to_string(&records).unwrap();
    assert!(!all.contains("secret-value-123"));

    // A tenant administrator reads their own chain, and no other.
    let r = app.get(Some(&acme_admin), "/admin/audit?limit=2").await;
    assert_eq!(r.body["tenant"], "acme");
    assert_eq!(r.body["records"].as_array().unwrap().len(), 2);
    let next = r.body["next"].as_i64().unwrap();
    let r = app
        .get(
            Some(&acme_admin),
            &format!("/admin/audit?after={next}&kind=admin"),
        )
        .await;
    let kinds: Vec<&Value> = r.body["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["kind"])
        .collect();
    assert!(
        kinds.iter().all(|k| *k == "admin") && !kinds.is_empty(),
        "{}",
        r.body
    );
    for chain in ["globex", "-", "platform"] {
        let r = app
            .get(Some(&acme_admin), &format!("/admin/audit?tenant={chain}"))
            .await;
        assert_error(&r, 403, ErrorCode::Forbidden);
    }
    let r = app
        .get(Some(&app.token("platform", &["admin"])), "/admin/audit")
        .await;
    assert_error(&r, 400, ErrorCode::ValidationError);
    let r = app.get(Some(&acme_admin), "/admin/audit?limit=0").await;
    assert_error(&r, 400, ErrorCode::ValidationError);
    let r = app.get(Some(&acme_admin), "/admin/audit?colour=red").await;
    assert_error(&r, 400, ErrorCode::ValidationError);
    flushed(&app).await;
    let reports = provider_host::audit::verify(app.host.storage().pool(), None)
        .await
        .unwrap();
    assert!(reports.iter().all(|r| r.problem.is_none()), "{reports:?}");
}

async fn some_records(app: &App, n: usize) {
    let user = app.token("acme", &["user"]);
    for i in 0..n {
        app.post(Some(&user), "kv/get", json!({"key": format!("k{i}")}))
            .await;
    }
    flushed(app).await;
}

async fn problem(pool: &AnyPool) -> Option<String> {
    let reports = provider_host::audit::verify(pool, Some("acme"))
        .await
        .unwrap();
    reports[0].problem.clone()
}

async fn an_edited_inserted_or_deleted_record_is_found(db: TestDatabase) {
    let app = App::on(db).await;
    some_records(&app, 5).await;
    let pool = app.host.storage().pool().clone();
    assert_eq!(problem(&pool).await, None);
    let run = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query(sql).execute(&pool).await.unwrap();
        }
    };
    // Edited, then put back: found, then intact again.
    run("UPDATE audit_log SET subject = 'someone-else' WHERE tenant = 'acme' AND seq = 2").await;
    assert_eq!(
        problem(&pool).await.as_deref(),
        Some("record 2 was changed after it was written")
    );
    run("UPDATE audit_log SET subject = 'tester' WHERE tenant = 'acme' AND seq = 2").await;
    assert_eq!(problem(&pool).await, None);
    // A forged record appended after the head.
    run("INSERT INTO audit_log SELECT tenant, seq + 1, at_ms, kind, subject, service, action, outcome, error_code, request_id, latency_us, payload_sha256, note, hash, hash FROM audit_log WHERE tenant = 'acme' AND seq = 5").await;
    assert_eq!(
        problem(&pool).await.as_deref(),
        Some("record 6 was changed after it was written")
    );
    run("DELETE FROM audit_log WHERE tenant = 'acme' AND seq = 6").await;
    assert_eq!(problem(&pool).await, None);
    // The last record deleted: the head still names it.
    run("DELETE FROM audit_log WHERE tenant = 'acme' AND seq = 5").await;
    assert_eq!(
        problem(&pool).await.as_deref(),
        Some(
            "the chain ends at record 4 but its head says 5: records were deleted from its end or the head was changed"
        )
    );
    // A record deleted from the middle.
    run("DELETE FROM audit_log WHERE tenant = 'acme' AND seq = 3").await;
    assert_eq!(
        problem(&pool).await.as_deref(),
        Some("record 3 is missing (the next is 4): records were deleted")
    );
}

fn failing_mode(mode: &'static str, buffer: usize) -> impl FnOnce(String) -> String {
    move |text| text + &format!("\n[audit]\non_failure = \"{mode}\"\nbuffer = {buffer}\n")
}

async fn break_store(app: &App) {
    sqlx::query("ALTER TABLE audit_log RENAME TO audit_log_away")
        .execute(app.host.storage().pool())
        .await
        .unwrap();
}

async fn mend_store(app: &App) {
    sqlx::query("ALTER TABLE audit_log_away RENAME TO audit_log")
        .execute(app.host.storage().pool())
        .await
        .unwrap();
}

async fn count(app: &App) -> i64 {
    use sqlx::Row;
    sqlx::query("SELECT COUNT(*) FROM audit_log WHERE tenant = 'acme'")
        .fetch_one(app.host.storage().pool())
        .await
        .unwrap()
        .get(0)
}

async fn fail_closed_refuses_calls_until_the_trail_is_written_again(db: TestDatabase) {
    let app = App::configured(db, failing_mode("fail_closed", 10_000)).await;
    let user = app.token("acme", &["user"]);
    let get = || app.post(Some(&user), "kv/get", json!({"key": "k"}));
    assert_eq!(get().await.status, 404);
    flushed(&app).await;
    break_store(&app).await;
    // This call is served; writing its record fails, and from then on calls are refused.
    assert_eq!(get().await.status, 404);
    assert!(
        eventually(Duration::from_secs(10), || app
            .host
            .audit()
            .refusal()
            .is_some())
        .await
    );
    let r = get().await;
    assert_error(&r, 503, ErrorCode::ProviderUnavailable);
    assert_eq!(
        r.body["detail"],
        "the audit trail cannot be written (audit.on_failure = \"fail_closed\"); calls resume once it can"
    );
    // Reads of the host itself still answer.
    assert_eq!(app.get(None, "/health").await.status, 200);
    mend_store(&app).await;
    assert!(
        eventually(Duration::from_secs(10), || app
            .host
            .audit()
            .refusal()
            .is_none())
        .await
    );
    assert_eq!(get().await.status, 404);
    flushed(&app).await;
    // Nothing recorded was lost: the served calls, not the refused one.
    assert_eq!(count(&app).await, 3);
    assert_eq!(problem(app.host.storage().pool()).await, None);
}

async fn buffer_holds_records_to_its_bound_then_refuses(db: TestDatabase) {
    let app = App::configured(db, failing_mode("buffer", 3)).await;
    let user = app.token("acme", &["user"]);
    let get = || app.post(Some(&user), "kv/get", json!({"key": "k"}));
    break_store(&app).await;
    for _ in 0..3 {
        assert_eq!(get().await.status, 404);
    }
    // Held, and the writer has seen the store fail (its first attempt may still be running).
    assert!(
        eventually(Duration::from_secs(5), || app.host.audit().unwritten() == 3
            && app.host.audit().refusal().is_some())
        .await
    );
    let r = get().await;
    assert_error(&r, 503, ErrorCode::ProviderUnavailable);
    assert_eq!(
        r.body["detail"],
        "the audit trail cannot be written and holds 3 records unwritten, its limit (audit.buffer); calls resume once it can"
    );
    mend_store(&app).await;
    flushed(&app).await;
    assert_eq!(count(&app).await, 3, "the held records were written");
    assert_eq!(get().await.status, 404);
    flushed(&app).await;
    assert_eq!(count(&app).await, 4);
    assert_eq!(problem(app.host.storage().pool()).await, None);
}

async fn shutdown_writes_every_record_held(db: TestDatabase) {
    let url = db.url.clone();
    let app = App::on(db).await;
    let user = app.token("acme", &["user"]);
    for i in 0..50 {
        app.post(Some(&user), "kv/get", json!({"key": format!("k{i}")}))
            .await;
    }
    app.host
        .shutdown(Instant::now() + Duration::from_secs(10))
        .await;
    let pool = sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    use sqlx::Row;
    let n: i64 = sqlx::query("SELECT COUNT(*) FROM audit_log WHERE tenant = 'acme'")
        .fetch_one(&pool)
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 50);
}
