//! The business providers of `providers-logic` through the host: config checked against
//! their schemas, payloads validated, tenants kept apart.

use providers_core::ErrorCode;
use serde_json::json;

use crate::support::{App, Edit, assert_error, load, matrix, registry};

fn with_uid(text: String) -> String {
    text.edit(
        "services = [\"kv\", \"probe\", \"limited\", \"quick\"]",
        "services = [\"kv\", \"probe\", \"limited\", \"quick\", \"uid\"]",
    )
    .edit(
        "[tenants.globex]\nservices = [\"kv\"]",
        "[tenants.globex]\nservices = [\"kv\", \"uid\"]",
    )
    .edit(
        "user = [\"probe.use\", \"kv.*\"]",
        "user = [\"probe.use\", \"kv.*\", \"uid.*\"]",
    ) + "\n[[providers]]\nservice = \"uid\"\nconfig = { tenant_code = \"ACME\", plants = [\"KOL\"] }\n\n[tenants.globex.providers.uid]\ntenant_code = \"GLBX\"\n"
}

matrix!(uid_serves_each_tenant_its_own_identifiers);

async fn uid_serves_each_tenant_its_own_identifiers(db: providers_database::testing::TestDatabase) {
    let app = App::configured(db, with_uid).await;
    let acme = app.token("acme", &["user"]);
    let globex = app.token("globex", &["user"]);
    let body = json!({"plant": "KOL", "type": "RM", "entity_type": "material", "entity_id": "m1"});
    let r = app.post(Some(&acme), "uid/issue", body.clone()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let uid = r.body["data"]["uid"].as_str().unwrap().to_owned();
    assert!(uid.starts_with("UID-ACME-KOL-RM-000001-"), "{uid}");
    let r = app.post(Some(&globex), "uid/issue", body).await;
    assert!(
        r.body["data"]["uid"]
            .as_str()
            .unwrap()
            .starts_with("UID-GLBX-KOL-RM-000001-"),
        "{}",
        r.body
    );
    // Globex cannot see acme's identifier, however it asks.
    let r = app
        .post(Some(&globex), "uid/trace", json!({"uid": uid}))
        .await;
    assert_error(&r, 404, ErrorCode::NotFound);
    let r = app
        .post(
            Some(&globex),
            "uid/validate",
            json!({"uid": uid, "check_known": true}),
        )
        .await;
    assert_eq!(r.body["data"]["valid"], false);
    assert_eq!(r.body["data"]["known"], false);
    // The schema refuses a malformed payload before the provider sees it.
    let r = app
        .post(Some(&acme), "uid/issue", json!({"plant": "KOL"}))
        .await;
    assert_error(&r, 400, ErrorCode::ValidationError);
    // A role without uid's permissions is refused.
    let r = app
        .post(
            Some(&app.token("acme", &["reader"])),
            "uid/validate",
            json!({"uid": uid}),
        )
        .await;
    assert_error(&r, 403, ErrorCode::Forbidden);
}

#[test]
fn a_bad_uid_config_is_reported_where_it_is_written() {
    let counters = std::sync::Arc::new(crate::support::Counters::default());
    let text = with_uid(crate::support::config_text("sqlite::memory:", ""))
        .edit("tenant_code = \"GLBX\"", "tenant_code = \"globex\"");
    let errors = load(&text, &registry(&counters)).err().unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0]
            .message
            .contains("tenant 'globex', service 'uid' config"),
        "{}",
        errors[0]
    );
    assert!(errors[0].line > 0);
}
