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

matrix!(
    uid_serves_each_tenant_its_own_identifiers,
    purchase_orders_ask_the_rules_under_the_callers_permissions,
);

fn with_orders(text: String) -> String {
    text.edit(
        "services = [\"kv\", \"probe\", \"limited\", \"quick\"]",
        "services = [\"kv\", \"probe\", \"limited\", \"quick\", \"rules\", \"purchase-orders\"]",
    )
    .edit(
        "[security.roles]\n",
        "[security.roles]\n\
         buyer = [\"purchase-orders.read\", \"purchase-orders.write\", \"rules.evaluate\"]\n\
         hasty = [\"purchase-orders.read\", \"purchase-orders.write\"]\n\
         approver = [\"purchase-orders.read\", \"purchase-orders.approve\"]\n\
         vendor = [\"purchase-orders.read\", \"purchase-orders.respond\"]\n\
         erp = [\"purchase-orders.sync\"]\n",
    ) + r#"
[[providers]]
service = "rules"

[providers.config.sets.po_approval]
default = "approve"
rules = [{ name = "large_order", when = "order.total > 100000", then = "require_approval" }]

[[providers]]
service = "purchase-orders"
config = { currency = "EUR", approval_rules = "po_approval" }
"#
}

async fn purchase_orders_ask_the_rules_under_the_callers_permissions(
    db: providers_database::testing::TestDatabase,
) {
    let app = App::configured(db, with_orders).await;
    let buyer = app.token_as("acme", &["buyer"], "ada", Some("ACME-MFG"));
    let approver = app.token_as("acme", &["approver"], "grace", Some("ACME-MFG"));
    let vendor = app.token_as("acme", &["vendor"], "sam", Some("STEEL-CO"));
    let erp = app.token_as("acme", &["erp"], "erp-sync", None);
    let order = json!({
        "seller_company": "STEEL-CO", "product": "HR coil", "quantity": "200", "unit": "TON",
        "unit_price": "512.35", "delivery_date": "2027-01-15", "delivery_location": "Kolkata"
    });
    // Without rules.evaluate the nested call is refused, and nothing is written.
    let hasty = app.token_as("acme", &["hasty"], "hal", Some("ACME-MFG"));
    let r = app
        .post(Some(&hasty), "purchase-orders/create", order.clone())
        .await;
    assert_error(&r, 403, ErrorCode::Forbidden);
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .contains("'rules/evaluate' needs permission 'rules.evaluate'"),
        "{}",
        r.body
    );
    let r = app
        .post(Some(&erp), "purchase-orders/sync_status", json!({}))
        .await;
    assert_eq!(r.body["data"]["last_cursor"], 0, "{}", r.body);

    let r = app
        .post(Some(&buyer), "purchase-orders/create", order.clone())
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["data"]["total"], "102470.00");
    assert_eq!(r.body["data"]["currency"], "EUR");
    assert_eq!(r.body["data"]["status"], "PENDING_APPROVAL");
    let po = json!({"po_number": r.body["data"]["po_number"]});
    let reviewed = json!({"po_number": r.body["data"]["po_number"], "version": 1});
    let r = app
        .post(Some(&vendor), "purchase-orders/seller_confirm", po.clone())
        .await;
    assert_error(&r, 409, ErrorCode::Conflict);
    let r = app
        .post(Some(&approver), "purchase-orders/approve", reviewed.clone())
        .await;
    assert_eq!(r.body["data"]["status"], "OPEN", "{}", r.body);
    let r = app
        .post(Some(&vendor), "purchase-orders/seller_confirm", po.clone())
        .await;
    assert_eq!(r.body["data"]["status"], "CONFIRMED", "{}", r.body);
    // The vendor's role does not hold approve, whatever its company.
    let r = app
        .post(Some(&vendor), "purchase-orders/approve", reviewed.clone())
        .await;
    assert_error(&r, 403, ErrorCode::Forbidden);
    // A token without company_id is refused by the provider.
    let r = app
        .post(
            Some(&app.token("acme", &["buyer"])),
            "purchase-orders/get",
            po.clone(),
        )
        .await;
    assert_error(&r, 403, ErrorCode::Forbidden);
    // The schema refuses a float quantity before the provider sees it.
    let mut float = order.clone();
    float["quantity"] = json!(2.5);
    let r = app
        .post(Some(&buyer), "purchase-orders/create", float)
        .await;
    assert_error(&r, 400, ErrorCode::ValidationError);
    let r = app
        .post(
            Some(&erp),
            "purchase-orders/pending_updates",
            json!({"since": 0}),
        )
        .await;
    let events: Vec<&str> = r.body["data"]["updates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["created", "approved", "confirmed"]);

    let r = app
        .post(
            Some(&buyer),
            "rules/evaluate",
            json!({"set": "po_approval", "input": {"order": {"total": 5}}}),
        )
        .await;
    assert_eq!(r.body["data"]["decision"], "approve", "{}", r.body);
    let r = app.get(None, "/openapi.json").await;
    let create = &r.body["paths"]["/providers/purchase-orders/create"]["post"];
    assert_eq!(
        create["requestBody"]["content"]["application/json"]["schema"]["required"],
        json!([
            "seller_company",
            "product",
            "quantity",
            "unit",
            "unit_price",
            "delivery_date",
            "delivery_location"
        ])
    );
    assert!(r.body["paths"]["/providers/rules/evaluate"].is_object());
    assert!(r.body["paths"]["/providers/purchase-orders/acknowledge"].is_object());
}

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
