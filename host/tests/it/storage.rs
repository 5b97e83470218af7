//! The host over SQLite and PostgreSQL alike, and readiness when storage goes away.

use std::time::Duration;

use providers_database::testing::TestDatabase;
use serde_json::json;

use crate::support::App;

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
        crate::support::assert_error(&r, 409, providers_core::ErrorCode::Conflict);
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
        crate::support::assert_error(&r, 404, providers_core::ErrorCode::NotFound);
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

#[tokio::test]
async fn readiness_reports_unreachable_storage() {
    let app = App::sqlite().await;
    app.host.storage().close().await;
    let r = app.get(None, "/ready").await;
    let detail =
        crate::support::assert_error(&r, 503, providers_core::ErrorCode::ProviderUnavailable);
    assert!(
        detail.starts_with("not ready: storage unreachable: "),
        "{detail}"
    );
    assert_eq!(
        app.get(None, "/health").await.status,
        200,
        "alive nonetheless"
    );
}

#[tokio::test]
async fn two_services_served_by_kv_keep_separate_stores() {
    let app = App::configured(TestDatabase::sqlite(), |text| {
        text.replace(
            "[[providers]]\nservice = \"probe\"",
            "[[providers]]\nservice = \"notes\"\nplugin = \"kv\"\n\n[[providers]]\nservice = \"probe\"",
        )
        .replace(
            "services = [\"kv\", \"probe\", \"limited\", \"quick\"]",
            "services = [\"kv\", \"notes\", \"probe\", \"limited\", \"quick\"]",
        )
    })
    .await;
    let acme = app.token("acme", &["admin"]);
    app.post(Some(&acme), "kv/set", json!({"key": "k", "value": "in kv"}))
        .await;
    app.post(
        Some(&acme),
        "notes/set",
        json!({"key": "k", "value": "in notes"}),
    )
    .await;
    let r = app.post(Some(&acme), "kv/get", json!({"key": "k"})).await;
    assert_eq!(r.body["data"]["value"], "in kv");
    let r = app
        .post(Some(&acme), "notes/get", json!({"key": "k"}))
        .await;
    assert_eq!(r.body["data"]["value"], "in notes");
    app.post(Some(&acme), "notes/delete", json!({"key": "k"}))
        .await;
    let r = app.post(Some(&acme), "kv/list", json!({})).await;
    assert_eq!(
        r.body["data"]["items"].as_array().unwrap().len(),
        1,
        "deleting a note left kv alone"
    );
}
