//! The host over SQLite and PostgreSQL alike, and readiness when storage goes away.

use std::time::Duration;

use providers_database::testing::TestDatabase;
use serde_json::json;

use providers_core::ErrorCode;

use crate::support::{App, Edit, assert_error, matrix};

matrix!(
    readiness_is_generic_cached_and_sees_storage_go,
    two_services_served_by_kv_keep_separate_stores,
    numbers_pass_through_http_verbatim,
    instance_events_are_pruned_by_age_and_count,
    builtin_providers_cannot_starve_the_hosts_own_pool,
);

#[tokio::test]
async fn kv_over_http_and_instance_events_on_both_backends() {
    for db in TestDatabase::both().await {
        let backend = db.backend;
        let app = App::on(db).await;
        let acme = app.token("acme", &["user"]);
        let globex = app.token("globex", &["user"]);
        let r = app
            .post(
                Some(&acme),
                "kv/set",
                json!({"key": "invoice/1", "value": {"total": 12.5}}),
            )
            .await;
        assert_eq!(r.status, 200, "{backend}: {}", r.body);
        let etag = r.body["data"]["etag"].as_str().unwrap().to_owned();
        let r = app
            .post(
                Some(&acme),
                "kv/set",
                json!({"key": "invoice/1", "value": {"total": 0}, "etag": "1"}),
            )
            .await;
        assert_error(&r, 409, ErrorCode::Conflict);
        let r = app
            .post(Some(&acme), "kv/get", json!({"key": "invoice/1"}))
            .await;
        assert_eq!(
            r.body["data"],
            json!({"key": "invoice/1", "value": {"total": 12.5}, "etag": etag}),
            "{backend}"
        );

        // globex reads, lists and bulk-reads nothing of acme's.
        let r = app
            .post(Some(&globex), "kv/get", json!({"key": "invoice/1"}))
            .await;
        assert_error(&r, 404, ErrorCode::NotFound);
        let r = app
            .post(Some(&globex), "kv/list", json!({"prefix": "invoice/"}))
            .await;
        assert_eq!(
            r.body["data"],
            json!({"items": [], "next": null}),
            "{backend}"
        );
        let r = app
            .post(Some(&globex), "kv/bulk_get", json!({"keys": ["invoice/1"]}))
            .await;
        assert_eq!(
            r.body["data"]["items"],
            json!([{"key": "invoice/1", "found": false}])
        );

        app.host.instances().evict_idle(Duration::ZERO).await;
        let events = app.host.storage().events("acme", "kv").await.unwrap();
        let kinds: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
        assert_eq!(kinds, ["connected", "disconnected"], "{backend}");
        assert_eq!(events[0].1, "1.0.0");
    }
}

async fn readiness_is_generic_cached_and_sees_storage_go(db: TestDatabase) {
    let app = App::on(db).await;
    let r = app.get(None, "/ready").await;
    assert_eq!(
        (r.status.as_u16(), &r.body),
        (200, &json!({"status": "ready"}))
    );
    app.host.storage().close().await;
    // Within ready_cache (200 ms in the test config) probes get the cached answer.
    assert_eq!(app.get(None, "/ready").await.status, 200, "cached");
    tokio::time::sleep(Duration::from_millis(250)).await;
    let r = app.get(None, "/ready").await;
    assert_eq!(
        assert_error(&r, 503, ErrorCode::ProviderUnavailable),
        "not ready: storage unreachable",
        "no driver error text on a public route"
    );
    assert_eq!(
        app.get(None, "/health").await.status,
        200,
        "alive nonetheless"
    );
}

async fn two_services_served_by_kv_keep_separate_stores(db: TestDatabase) {
    let app = App::configured(db, |text| {
        text.edit(
            "[[providers]]\nservice = \"probe\"",
            "[[providers]]\nservice = \"notes\"\nplugin = \"kv\"\n\n[[providers]]\nservice = \"probe\"",
        )
        .edit(
            "services = [\"kv\", \"probe\", \"limited\", \"quick\"]",
            "services = [\"kv\", \"notes\", \"probe\", \"limited\", \"quick\"]",
        )
    })
    .await;
    let acme = app.token("acme", &["admin"]);
    let ok = |r: crate::support::Resp| {
        assert_eq!(r.status, 200, "{}", r.body);
        r.body
    };
    ok(app
        .post(Some(&acme), "kv/set", json!({"key": "k", "value": "in kv"}))
        .await);
    ok(app
        .post(
            Some(&acme),
            "notes/set",
            json!({"key": "k", "value": "in notes"}),
        )
        .await);
    let r = ok(app.post(Some(&acme), "kv/get", json!({"key": "k"})).await);
    assert_eq!(r["data"]["value"], "in kv");
    let r = ok(app
        .post(Some(&acme), "notes/get", json!({"key": "k"}))
        .await);
    assert_eq!(r["data"]["value"], "in notes");
    let r = ok(app
        .post(Some(&acme), "notes/delete", json!({"key": "k"}))
        .await);
    assert_eq!(r["data"]["deleted"], true);
    let r = ok(app.post(Some(&acme), "kv/list", json!({})).await);
    assert_eq!(
        r["data"]["items"].as_array().unwrap().len(),
        1,
        "deleting a note left kv alone"
    );
    let r = app
        .post(Some(&acme), "notes/get", json!({"key": "k"}))
        .await;
    assert_error(&r, 404, ErrorCode::NotFound);
}

async fn numbers_pass_through_http_verbatim(db: TestDatabase) {
    let app = App::on(db).await;
    let acme = app.token("acme", &["user"]);
    let value = r#"{"big":18446744073709551616,"huge":1e400,"neg_zero":-0,"pi":3.141592653589793238462643383279,"price":0.10,"tiny":1e-400}"#;
    let body = format!(r#"{{"key":"n","value":{value}}}"#);
    let r = app.post_raw(Some(&acme), "kv/set", body.into_bytes()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let req = axum::http::Request::post("/providers/kv/get")
        .header("authorization", format!("Bearer {acme}"))
        .body(axum::body::Body::from(r#"{"key":"n"}"#))
        .unwrap();
    let response = tower::ServiceExt::oneshot(app.router.clone(), req)
        .await
        .unwrap();
    let bytes = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    let expected = value.replace("1e400", "1e+400");
    assert!(text.contains(&format!(r#""value":{expected}"#)), "{text}");
}

async fn instance_events_are_pruned_by_age_and_count(db: TestDatabase) {
    let app = App::on(db).await;
    let storage = app.host.storage();
    for i in 0..5 {
        storage
            .record(
                "acme",
                "probe",
                "1.0.0",
                provider_host::storage::InstanceEvent::Connected,
                &i.to_string(),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        storage
            .prune_events(Duration::from_secs(3600), 100)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        storage
            .prune_events(Duration::from_secs(3600), 2)
            .await
            .unwrap(),
        3
    );
    assert_eq!(storage.event_count().await.unwrap(), 2);
    let kept: Vec<String> = sqlx::query_scalar("SELECT detail FROM instance_events ORDER BY at_ms")
        .fetch_all(storage.pool())
        .await
        .unwrap();
    assert_eq!(kept, ["3", "4"], "the newest stay");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        storage
            .prune_events(Duration::from_millis(10), 100)
            .await
            .unwrap(),
        2
    );
    assert_eq!(storage.event_count().await.unwrap(), 0);
}

#[tokio::test]
async fn unreachable_or_wrong_postgres_fails_at_once_with_its_cause() {
    let config = provider_host::config::StorageConfig {
        url: "postgres://postgres@127.0.0.1:1/nothing".into(),
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let e = provider_host::storage::Storage::open(&config)
        .await
        .err()
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "not the pool's timeout"
    );
    let text = format!("{e:#}");
    assert!(
        text.starts_with("cannot connect to storage postgres://postgres@127.0.0.1:1/nothing: "),
        "{text}"
    );
    assert!(text.to_lowercase().contains("refused"), "{text}");
    assert!(!text.contains("timed out"), "{text}");

    let admin = std::env::var("TEST_POSTGRES_URL").unwrap();
    let base = admin.rsplit_once('/').unwrap().0;
    let config = provider_host::config::StorageConfig {
        url: format!("{base}/no_such_database"),
        ..Default::default()
    };
    let e = provider_host::storage::Storage::open(&config)
        .await
        .err()
        .unwrap();
    let text = format!("{e:#}");
    assert_eq!(
        text.matches("does not exist").count(),
        1,
        "the cause once: {text}"
    );
}

async fn builtin_providers_cannot_starve_the_hosts_own_pool(db: TestDatabase) {
    let app = App::on(db).await;
    // Every connection of the builtin providers' pool taken, as a flood of kv calls would.
    let pool = app.host.storage().builtin_pool();
    let mut held = Vec::new();
    for _ in 0..pool.options().get_max_connections() {
        held.push(pool.acquire().await.unwrap());
    }
    let r = app.get(None, "/ready").await;
    assert_eq!(
        (r.status.as_u16(), &r.body),
        (200, &json!({"status": "ready"}))
    );
    app.host
        .storage()
        .record(
            "acme",
            "kv",
            "1.0.0",
            provider_host::storage::InstanceEvent::Connected,
            "",
        )
        .await
        .expect("the host's own writes go through");
    drop(held);
}
