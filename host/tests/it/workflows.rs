//! The `workflows` provider and the host's executor: the seed's purchase requisition with its
//! approvals, SLAs and escalation; retries, compensation, timers and signals; idempotent
//! starts; and definitions refused with their places.

use std::time::Duration;

use providers_core::ErrorCode;
use serde_json::{Value, json};

use crate::support::{App, Edit, assert_error, load, matrix, registry};

pub const SEED: &str = include_str!("../../src/config/workflows/purchase_requisition.toml");

/// A fulfilment flow for the executor's mechanics: a store write undone by a delete, a flaky
/// charge retried under one idempotency key, a timer, a signal, and a last write using it.
pub const FULFILMENT: &str = r#"
name = "fulfilment"
version = 1

[[steps]]
id = "reserve"
type = "call"
service = "kv"
action = "set"
payload = { key = "reserved/${workflow.id}", value = "${input.sku}" }
compensate = { service = "kv", action = "delete", payload = { key = "reserved/${workflow.id}" } }

[[steps]]
id = "charge"
type = "call"
service = "probe"
action = "flaky"
payload = { fail_times = "${input.fail_times}", code = "${input.code}", label = "charge ${input.sku}" }
retry = { attempts = 3, backoff = "10ms", max_backoff = "20ms", on = ["PROVIDER_UNAVAILABLE"] }
compensate = { service = "kv", action = "set", payload = { key = "refunded/${workflow.id}", value = "${steps.charge.output.key}" } }

[[steps]]
id = "cool_off"
type = "timer"
duration = "30ms"

[[steps]]
id = "delivery"
type = "signal"
signal = "delivered"

[[steps]]
id = "close"
type = "call"
service = "kv"
action = "set"
payload = { key = "closed/${workflow.id}", value = "${steps.delivery.output.note}" }
"#;

/// The test configuration with `workflows` for acme, the seed's roles, and `definitions`
/// written to a folder of their own.
pub fn with_workflows(
    dir: &std::path::Path,
    time_scale: f64,
    definitions: &[(&str, &str)],
) -> impl FnOnce(String) -> String + use<> {
    for (name, text) in definitions {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let dir = dir.display().to_string();
    move |text: String| {
        text.edit(
            "services = [\"kv\", \"probe\", \"limited\", \"quick\"]",
            "services = [\"kv\", \"probe\", \"limited\", \"quick\", \"workflows\"]",
        )
        .edit(
            "[tenants.globex]\nservices = [\"kv\"]",
            "[tenants.globex]\nservices = [\"kv\", \"workflows\"]",
        )
        .edit(
            "[security.roles]\n",
            "[security.roles]\n\
             requester = [\"workflows.start\", \"workflows.read\", \"workflows.cancel\", \"workflows.signal\", \"kv.*\", \"probe.use\"]\n\
             DEPT_HEAD = [\"workflows.read\", \"workflows.decide\", \"kv.read\"]\n\
             ACCOUNTANT = [\"workflows.read\", \"workflows.decide\"]\n\
             PLANT_MANAGER = [\"workflows.read\", \"workflows.decide\"]\n",
        ) + &format!(
            "\n[[providers]]\nservice = \"workflows\"\n\n[workflows]\ndefinitions = \"{dir}\"\npoll = \"20ms\"\nlease = \"10s\"\ntime_scale = {time_scale:?}\n"
        )
    }
}

struct Flow {
    app: App,
    requester: String,
    _dir: tempfile::TempDir,
}

impl Flow {
    async fn new(db: providers_database::testing::TestDatabase, time_scale: f64) -> Flow {
        let dir = tempfile::tempdir().unwrap();
        let edit = with_workflows(
            dir.path(),
            time_scale,
            &[
                ("purchase_requisition.toml", SEED),
                ("fulfilment.toml", FULFILMENT),
            ],
        );
        let app = App::configured(db, edit).await;
        let requester = app.token_as("acme", &["requester"], "ana", None);
        Flow {
            app,
            requester,
            _dir: dir,
        }
    }

    fn as_role(&self, role: &str, subject: &str) -> String {
        self.app.token_as("acme", &[role], subject, None)
    }

    async fn call(&self, token: &str, action: &str, body: Value) -> crate::support::Resp {
        self.app
            .post(Some(token), &format!("workflows/{action}"), body)
            .await
    }

    async fn start(&self, definition: &str, input: Value) -> String {
        let r = self
            .call(
                &self.requester,
                "start",
                json!({"definition": definition, "input": input}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body["data"]["created"], true);
        r.body["data"]["id"].as_str().unwrap().to_owned()
    }

    async fn get(&self, id: &str) -> Value {
        let r = self.call(&self.requester, "get", json!({"id": id})).await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.body["data"].clone()
    }

    /// Waits (within 10 s) until `id` is in `state`; returns the instance.
    async fn reach(&self, id: &str, state: &str) -> Value {
        self.until(id, |got| got["state"] == state).await
    }

    /// Waits (within 10 s) until `id` meets `check`; returns the instance.
    async fn until(&self, id: &str, check: impl Fn(&Value) -> bool) -> Value {
        for _ in 0..500 {
            let got = self.get(id).await;
            if check(&got) {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{id} never got there: {:#}", self.get(id).await);
    }

    async fn kv(&self, key: &str) -> crate::support::Resp {
        self.app
            .post(Some(&self.requester), "kv/get", json!({"key": key}))
            .await
    }
}

fn events(instance: &Value) -> Vec<String> {
    instance["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| match e["step"].as_str() {
            Some(step) => format!("{} {step}", e["event"].as_str().unwrap()),
            None => e["event"].as_str().unwrap().to_owned(),
        })
        .collect()
}

matrix!(
    a_requisition_is_approved_by_its_roles_only_and_recorded,
    send_back_resubmit_and_reject_follow_the_seed,
    overdue_approvals_are_reminded_and_escalated_on_the_seed_schedule,
    retries_keep_one_idempotency_key_and_failures_compensate,
    cancel_compensates_completed_steps_in_reverse,
    a_cancel_during_a_running_step_is_not_lost,
    starts_are_idempotent_and_inputs_checked,
    an_idempotency_key_header_keys_the_start,
    a_purchase_order_is_raised_approved_as_its_approver_and_cancelled_by_compensation,
);

pub const PO_CHAIN: &str = include_str!("../../src/config/workflows/purchase_order_approval.toml");

async fn a_purchase_order_is_raised_approved_as_its_approver_and_cancelled_by_compensation(
    db: providers_database::testing::TestDatabase,
) {
    let dir = tempfile::tempdir().unwrap();
    let flows = with_workflows(dir.path(), 1.0, &[("po.toml", PO_CHAIN)]);
    let app = App::configured(db, |text| {
        flows(text)
            .edit("\"quick\", \"workflows\"]", "\"quick\", \"workflows\", \"rules\", \"purchase-orders\"]")
            .edit(
                "[security.roles]\n",
                "[security.roles]\n\
                 buyer = [\"purchase-orders.read\", \"purchase-orders.write\", \"rules.evaluate\", \"workflows.start\", \"workflows.read\", \"workflows.cancel\"]\n\
                 approver = [\"purchase-orders.read\", \"purchase-orders.approve\", \"workflows.read\", \"workflows.decide\"]\n",
            )
            + r#"
[[providers]]
service = "rules"

[providers.config.sets.po_approval]
default = "approve"
rules = [{ name = "large_order", when = "order.total > 100000", then = "require_approval" }]

[[providers]]
service = "purchase-orders"
config = { currency = "EUR", approval_rules = "po_approval" }
"#
    })
    .await;
    let buyer = app.token_as("acme", &["buyer"], "ada", Some("ACME-MFG"));
    let approver = app.token_as("acme", &["approver"], "grace", Some("ACME-MFG"));
    let order = |quantity: &str| {
        json!({"seller_company": "STEEL-CO", "product": "HR coil", "quantity": quantity, "unit": "TON",
            "unit_price": "512.35", "delivery_date": "2027-01-15", "delivery_location": "Kolkata"})
    };
    let start = |input: Value| {
        let app = &app;
        let buyer = &buyer;
        async move {
            let r = app
                .post(
                    Some(buyer),
                    "workflows/start",
                    json!({"definition": "purchase_order_approval", "input": input}),
                )
                .await;
            assert_eq!(r.status, 200, "{}", r.body);
            r.body["data"]["id"].as_str().unwrap().to_owned()
        }
    };
    let get = |id: String| {
        let app = &app;
        let buyer = &buyer;
        async move {
            app.post(Some(buyer), "workflows/get", json!({"id": id}))
                .await
                .body["data"]
                .clone()
        }
    };
    let reach = |id: String, state: &'static str| {
        let get = &get;
        async move {
            for _ in 0..500 {
                let got = get(id.clone()).await;
                if got["state"] == state {
                    return got;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("{id} never reached {state}: {:#}", get(id.clone()).await);
        }
    };
    // 200 t: over 100,000, so the rules ask for approval.
    let big = start(order("200")).await;
    let pending = reach(big.clone(), "PENDING_APPROVAL").await;
    assert_eq!(
        (pending["step"].as_str(), pending["role"].as_str()),
        (Some("review"), Some("approver"))
    );
    let po = pending["outputs"]["raise"]["po_number"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(pending["outputs"]["raise"]["status"], "PENDING_APPROVAL");
    let r = app
        .post(
            Some(&approver),
            "workflows/approve",
            json!({"id": big, "comment": "budget ok"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let done = reach(big.clone(), "COMPLETED").await;
    // The release ran as the approver: the order provider's own rule (not its creator) held.
    let release = done["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event"] == "step_started" && e["step"] == "release")
        .unwrap();
    assert_eq!(release["detail"]["run_as"], "grace");
    let r = app
        .post(
            Some(&buyer),
            "purchase-orders/get",
            json!({"po_number": po}),
        )
        .await;
    assert_eq!(r.body["data"]["status"], "OPEN", "{}", r.body);

    // 20 t needs no approval: review and release are skipped.
    let small = start(order("20")).await;
    let done = reach(small, "COMPLETED").await;
    assert_eq!(
        events(&done),
        [
            "started",
            "step_started raise",
            "step_completed raise",
            "skipped review",
            "skipped release",
            "completed"
        ]
    );

    // Sent back to the buyer, then resubmitted: the first order is cancelled before the
    // order is raised again (under the new round's key), and the new one is approved.
    let again = start(order("250")).await;
    let pending = reach(again.clone(), "PENDING_APPROVAL").await;
    let first_po = pending["outputs"]["raise"]["po_number"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = app
        .post(
            Some(&approver),
            "workflows/send_back",
            json!({"id": again, "comment": "wrong seller"}),
        )
        .await;
    assert_eq!(r.body["data"]["state"], "SENT_BACK", "{}", r.body);
    let r = app
        .post(
            Some(&buyer),
            "workflows/resubmit",
            json!({"id": again, "input": {"quantity": "240"}}),
        )
        .await;
    assert_eq!(r.body["data"]["state"], "COMPENSATING", "{}", r.body);
    let pending = reach(again.clone(), "PENDING_APPROVAL").await;
    let second_po = pending["outputs"]["raise"]["po_number"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(first_po, second_po);
    let r = app
        .post(
            Some(&buyer),
            "purchase-orders/get",
            json!({"po_number": first_po}),
        )
        .await;
    assert_eq!(r.body["data"]["status"], "CANCELLED", "{}", r.body);
    let keys: Vec<String> = pending["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["step"] == "raise" && e["detail"]["idempotency_key"].is_string())
        .map(|e| e["detail"]["idempotency_key"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        keys,
        [
            format!("{again}:raise:0"),
            format!("{again}:raise:0:undo"),
            format!("{again}:raise:1")
        ]
    );
    let r = app
        .post(Some(&approver), "workflows/approve", json!({"id": again}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    reach(again.clone(), "COMPLETED").await;
    let r = app
        .post(
            Some(&buyer),
            "purchase-orders/get",
            json!({"po_number": second_po}),
        )
        .await;
    assert_eq!(r.body["data"]["status"], "OPEN", "{}", r.body);
    assert_eq!(r.body["data"]["quantity"], "240.000", "{}", r.body);

    // Cancelled while waiting for approval: the compensation cancels the order.
    let withdrawn = start(order("300")).await;
    let pending = reach(withdrawn.clone(), "PENDING_APPROVAL").await;
    let po = pending["outputs"]["raise"]["po_number"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = app
        .post(Some(&buyer), "workflows/cancel", json!({"id": withdrawn}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    reach(withdrawn.clone(), "CANCELLED").await;
    let r = app
        .post(
            Some(&buyer),
            "purchase-orders/get",
            json!({"po_number": po}),
        )
        .await;
    assert_eq!(r.body["data"]["status"], "CANCELLED", "{}", r.body);
    assert_eq!(
        r.body["data"]["buyer_notes"],
        format!("workflow {withdrawn} was cancelled")
    );
}

async fn a_requisition_is_approved_by_its_roles_only_and_recorded(
    db: providers_database::testing::TestDatabase,
) {
    let f = Flow::new(db, 1.0).await;
    let id = f
        .start(
            "purchase_requisition",
            json!({"item": "bearing 6204", "quantity": 40, "amount": 1200}),
        )
        .await;
    let pending = f.reach(&id, "PENDING_APPROVAL").await;
    assert_eq!(pending["step"], "dept_head");
    assert_eq!(pending["step_name"], "Department Head Approval");
    assert_eq!(pending["role"], "DEPT_HEAD");
    assert_eq!(pending["current"]["type"], "approval");

    // Separation of duties: the requester holds DEPT_HEAD too, and still may not approve.
    let both = f
        .app
        .token_as("acme", &["requester", "DEPT_HEAD"], "ana", None);
    let r = f.call(&both, "approve", json!({"id": id})).await;
    let detail = assert_error(&r, 403, ErrorCode::Forbidden);
    assert!(
        detail.contains("separation of duties: 'ana' requested"),
        "{detail}"
    );
    // The wrong role is refused, naming the role needed.
    let r = f
        .call(
            &f.as_role("ACCOUNTANT", "carl"),
            "approve",
            json!({"id": id}),
        )
        .await;
    let detail = assert_error(&r, 403, ErrorCode::Forbidden);
    assert!(detail.contains("needs role DEPT_HEAD"), "{detail}");
    // Without the permission the host refuses before the provider runs.
    let r = f.call(&f.requester, "approve", json!({"id": id})).await;
    assert_error(&r, 403, ErrorCode::Forbidden);
    // Nothing changed.
    let same = f.get(&id).await;
    assert_eq!(
        (same["state"].clone(), same["step"].clone()),
        (json!("PENDING_APPROVAL"), json!("dept_head"))
    );
    assert_eq!(events(&same), events(&pending));

    // The approver's inbox has it; the requester's has not.
    let head = f.as_role("DEPT_HEAD", "dora");
    let r = f.call(&head, "list", json!({"awaiting_me": true})).await;
    let ids: Vec<&str> = r.body["data"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id.as_str()]);
    let r = f.call(&both, "list", json!({"awaiting_me": true})).await;
    assert_eq!(r.body["data"]["items"], json!([]), "{}", r.body);

    let r = f
        .call(
            &head,
            "approve",
            json!({"id": id, "comment": "within budget"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body["data"]["state"], "RUNNING",
        "the accounts step is still ahead"
    );
    let done = f.reach(&id, "COMPLETED").await;
    assert_eq!(
        events(&done),
        [
            "started",
            "awaiting_approval dept_head",
            "approved dept_head",
            "skipped accounts",
            "step_started record",
            "step_completed record",
            "completed"
        ]
    );
    let approved = &done["history"][2];
    assert_eq!(approved["actor"], "dora");
    assert_eq!(approved["comment"], "within budget");
    assert!(approved["at_ms"].as_i64().unwrap() >= done["created_ms"].as_i64().unwrap());
    // The record step wrote the requisition, as the requester, keyed by the instance.
    let r = f.kv(&format!("requisitions/{id}")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body["data"]["value"],
        json!({"item": "bearing 6204", "quantity": 40, "amount": 1200, "requested_by": "ana"})
    );
    // A decided request takes no more decisions.
    let r = f.call(&head, "approve", json!({"id": id})).await;
    let detail = assert_error(&r, 409, ErrorCode::Conflict);
    assert!(detail.contains("is COMPLETED"), "{detail}");
    // Another tenant does not see it, nor can it decide it.
    let globex = f.app.token_as("globex", &["requester"], "gus", None);
    let r = f.call(&globex, "get", json!({"id": id})).await;
    assert_eq!(
        assert_error(&r, 404, ErrorCode::NotFound),
        format!("no workflow instance '{id}'")
    );
    let r = f.call(&globex, "list", json!({})).await;
    assert_eq!(r.body["data"]["items"], json!([]));
    let r = f
        .call(
            &f.app.token_as("globex", &["DEPT_HEAD"], "gil", None),
            "cancel",
            json!({"id": id}),
        )
        .await;
    assert_error(&r, 403, ErrorCode::Forbidden);
}

async fn send_back_resubmit_and_reject_follow_the_seed(
    db: providers_database::testing::TestDatabase,
) {
    let f = Flow::new(db, 1.0).await;
    let head = f.as_role("DEPT_HEAD", "dora");
    let accounts = f.as_role("ACCOUNTANT", "carl");
    let id = f
        .start(
            "purchase_requisition",
            json!({"item": "CNC spindle", "quantity": 1, "amount": 64000}),
        )
        .await;
    f.reach(&id, "PENDING_APPROVAL").await;
    let r = f.call(&head, "approve", json!({"id": id})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Over 50,000: the accounts review runs.
    let review = f.reach(&id, "PENDING_APPROVAL").await;
    let review = if review["step"] == "dept_head" {
        f.reach(&id, "PENDING_APPROVAL").await
    } else {
        review
    };
    assert_eq!(
        (review["step"].as_str(), review["role"].as_str()),
        (Some("accounts"), Some("ACCOUNTANT"))
    );
    // Sending back needs a reason.
    let r = f.call(&accounts, "send_back", json!({"id": id})).await;
    let detail = assert_error(&r, 400, ErrorCode::ValidationError);
    assert!(detail.contains("send_back needs a comment"), "{detail}");
    let r = f
        .call(
            &accounts,
            "send_back",
            json!({"id": id, "comment": "quote missing"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Back to the department head; from there back to the requester.
    f.until(&id, |got| {
        got["state"] == "PENDING_APPROVAL" && got["step"] == "dept_head"
    })
    .await;
    let r = f
        .call(
            &head,
            "send_back",
            json!({"id": id, "comment": "please split the order"}),
        )
        .await;
    assert_eq!(r.body["data"]["state"], "SENT_BACK", "{}", r.body);
    // Only the requester resubmits.
    let r = f
        .call(
            &f.as_role("requester", "otto"),
            "resubmit",
            json!({"id": id}),
        )
        .await;
    assert_error(&r, 403, ErrorCode::Forbidden);
    let r = f
        .call(
            &f.requester,
            "resubmit",
            json!({"id": id, "input": {"amount": -1}}),
        )
        .await;
    let detail = assert_error(&r, 400, ErrorCode::ValidationError);
    assert!(detail.contains("payload at '/input/amount'"), "{detail}");
    assert_eq!(
        f.get(&id).await["state"],
        "SENT_BACK",
        "a refused resubmit changes nothing"
    );
    let r = f
        .call(
            &f.requester,
            "resubmit",
            json!({"id": id, "input": {"amount": 32000}, "comment": "split"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    f.reach(&id, "PENDING_APPROVAL").await;
    let r = f.call(&head, "approve", json!({"id": id})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let done = f.reach(&id, "COMPLETED").await;
    assert_eq!(done["input"]["amount"], 32000);
    let trail = events(&done);
    assert_eq!(
        trail,
        [
            "started",
            "awaiting_approval dept_head",
            "approved dept_head",
            "awaiting_approval accounts",
            "sent_back accounts",
            "awaiting_approval dept_head",
            "sent_back dept_head",
            "resubmitted",
            "awaiting_approval dept_head",
            "approved dept_head",
            "skipped accounts",
            "step_started record",
            "step_completed record",
            "completed"
        ]
    );
    // Each send-back began a new round; the record step ran in the third: its key says so.
    let started = done["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event"] == "step_started")
        .unwrap();
    assert_eq!(
        started["detail"]["idempotency_key"],
        format!("{id}:record:2")
    );

    // Rejected at the first stage: REJECTED, nothing recorded.
    let other = f
        .start(
            "purchase_requisition",
            json!({"item": "gold taps", "quantity": 2, "amount": 900}),
        )
        .await;
    f.reach(&other, "PENDING_APPROVAL").await;
    let r = f
        .call(
            &head,
            "reject",
            json!({"id": other, "comment": "not needed"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let rejected = f.reach(&other, "REJECTED").await;
    assert_eq!(
        events(&rejected),
        [
            "started",
            "awaiting_approval dept_head",
            "rejected dept_head",
            "ended"
        ]
    );
    assert_eq!(rejected["history"][2]["comment"], "not needed");
    let r = f.kv(&format!("requisitions/{other}")).await;
    assert_error(&r, 404, ErrorCode::NotFound);
}

async fn overdue_approvals_are_reminded_and_escalated_on_the_seed_schedule(
    db: providers_database::testing::TestDatabase,
) {
    // One hour of the definition's time is 50 ms: the SLA (24 h) falls at 1.2 s, reminders
    // (12 h) every 0.6 s after it, the escalation (72 h) at 3.6 s.
    let f = Flow::new(db, 72_000.0).await;
    let manager = f.as_role("PLANT_MANAGER", "pia");
    let id = f
        .start(
            "purchase_requisition",
            json!({"item": "boiler", "quantity": 1, "amount": 70000}),
        )
        .await;
    f.reach(&id, "PENDING_APPROVAL").await;
    // Before the escalation the plant manager may not decide.
    let r = f.call(&manager, "approve", json!({"id": id})).await;
    let detail = assert_error(&r, 403, ErrorCode::Forbidden);
    assert!(detail.contains("needs role DEPT_HEAD;"), "{detail}");
    let escalated = f
        .until(&id, |got| got["escalated_to"] == "PLANT_MANAGER")
        .await;
    assert_eq!(escalated["escalated_to"], "PLANT_MANAGER", "{escalated:#}");
    let trail = events(&escalated);
    assert_eq!(
        trail[..3],
        [
            "started",
            "awaiting_approval dept_head",
            "sla_breached dept_head"
        ]
    );
    let reminders = trail.iter().filter(|e| *e == "reminder dept_head").count();
    // Between 24 h and 72 h, a reminder every 12 h: at 36, 48 and 60 h (and 72 h may race the
    // escalation); polled every 20 ms, none is lost.
    assert!((3..=4).contains(&reminders), "{trail:?}");
    let position = |name: &str| trail.iter().position(|e| e == name).unwrap();
    assert!(position("sla_breached dept_head") < position("escalated dept_head"));
    let history = escalated["history"].as_array().unwrap();
    let at = |kind: &str| {
        history.iter().find(|e| e["event"] == kind).unwrap()["at_ms"]
            .as_i64()
            .unwrap()
    };
    let began = at("awaiting_approval");
    assert!(
        at("sla_breached") - began >= 1200,
        "the SLA breach waits 24 h"
    );
    assert!(at("escalated") - began >= 3600, "the escalation waits 72 h");
    let escalation = history.iter().find(|e| e["event"] == "escalated").unwrap();
    assert_eq!(
        escalation["detail"],
        json!({"from": "DEPT_HEAD", "to": "PLANT_MANAGER"})
    );
    // The manager's inbox now has it, and the manager decides.
    let r = f.call(&manager, "list", json!({"awaiting_me": true})).await;
    assert_eq!(r.body["data"]["items"][0]["id"], id.as_str(), "{}", r.body);
    let r = f
        .call(&manager, "approve", json!({"id": id, "comment": "urgent"}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // The accounts review (over 50,000) starts its own schedule, and escalates too.
    let review = f
        .until(&id, |got| {
            got["step"] == "accounts" && got["escalated_to"] == "PLANT_MANAGER"
        })
        .await;
    assert_eq!(
        (review["step"].as_str(), review["escalated_to"].as_str()),
        (Some("accounts"), Some("PLANT_MANAGER")),
        "{review:#}"
    );
    let r = f.call(&manager, "approve", json!({"id": id})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let done = f.reach(&id, "COMPLETED").await;
    let approvals: Vec<&str> = done["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "approved")
        .map(|e| e["actor"].as_str().unwrap())
        .collect();
    assert_eq!(approvals, ["pia", "pia"]);
}

async fn retries_keep_one_idempotency_key_and_failures_compensate(
    db: providers_database::testing::TestDatabase,
) {
    let f = Flow::new(db, 1.0).await;
    // Two failures, then success: three calls under one key, then the timer and the signal.
    let id = f
        .start(
            "fulfilment",
            json!({"sku": "PUMP-9", "fail_times": 2, "code": "PROVIDER_UNAVAILABLE"}),
        )
        .await;
    let waiting = f.reach(&id, "WAITING").await;
    let waiting = if waiting["step"] == "cool_off" {
        f.reach(&id, "WAITING").await
    } else {
        waiting
    };
    let key = format!("{id}:charge:0");
    assert_eq!(f.app.counters.keys.lock().unwrap().get(&key), Some(&3));
    assert_eq!(
        waiting["outputs"]["charge"],
        json!({"key": key, "calls": 3, "label": "charge PUMP-9"})
    );
    let trail = events(&waiting);
    assert_eq!(
        trail
            .iter()
            .filter(|e| e.starts_with("step_failed charge"))
            .count(),
        2,
        "{trail:?}"
    );
    // A name no step waits for is refused, naming the ones it waits for.
    let r = f
        .call(
            &f.requester,
            "signal",
            json!({"id": id, "name": "delivred"}),
        )
        .await;
    let detail = assert_error(&r, 400, ErrorCode::ValidationError);
    assert_eq!(
        detail,
        "payload at '/name': workflow 'fulfilment' waits for no signal 'delivred' (it waits for: delivered)"
    );
    // A signal nobody waits for is kept; the step waiting for its name takes it.
    let r = f
        .call(
            &f.requester,
            "signal",
            json!({"id": id, "name": "delivered", "payload": {"note": "dock 4"}}),
        )
        .await;
    assert_eq!(r.body["data"]["delivered"], true, "{}", r.body);
    let r = f
        .call(
            &f.requester,
            "signal",
            json!({"id": id, "name": "delivered", "payload": {"note": "again"}}),
        )
        .await;
    assert_eq!(
        r.body["data"]["delivered"], false,
        "each name is received once: {}",
        r.body
    );
    let done = f.reach(&id, "COMPLETED").await;
    // A sender retrying after the end is told the same.
    let r = f
        .call(
            &f.requester,
            "signal",
            json!({"id": id, "name": "delivered", "payload": {"note": "late"}}),
        )
        .await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.body);
    assert_eq!(r.body["data"]["delivered"], false, "{}", r.body);
    assert_eq!(done["outputs"]["delivery"], json!({"note": "dock 4"}));
    assert_eq!(
        f.kv(&format!("closed/{id}")).await.body["data"]["value"],
        "dock 4"
    );
    let trail = events(&done);
    for expected in [
        "timer_started cool_off",
        "timer_fired cool_off",
        "signal_received delivery",
        "step_completed close",
        "completed",
    ] {
        assert!(
            trail.iter().any(|e| e == expected),
            "{expected} missing from {trail:?}"
        );
    }

    // Five failures outlast three attempts: the reservation is undone, then FAILED.
    let failed = f
        .start(
            "fulfilment",
            json!({"sku": "PUMP-9", "fail_times": 5, "code": "PROVIDER_UNAVAILABLE"}),
        )
        .await;
    let end = f.reach(&failed, "FAILED").await;
    assert_eq!(
        f.app
            .counters
            .keys
            .lock()
            .unwrap()
            .get(&format!("{failed}:charge:0")),
        Some(&3)
    );
    assert!(
        end["error"]
            .as_str()
            .unwrap()
            .contains("step 'charge' failed: PROVIDER_UNAVAILABLE"),
        "{end:#}"
    );
    let trail = events(&end);
    assert_eq!(
        trail[trail.len() - 4..],
        [
            "step_failed charge",
            "compensation_started reserve",
            "compensated reserve",
            "ended"
        ]
    );
    assert_error(
        &f.kv(&format!("reserved/{failed}")).await,
        404,
        ErrorCode::NotFound,
    );
    assert_error(
        &f.kv(&format!("refunded/{failed}")).await,
        404,
        ErrorCode::NotFound,
    );

    // A code the policy does not list is not retried.
    let refused = f
        .start(
            "fulfilment",
            json!({"sku": "PUMP-9", "fail_times": 1, "code": "VALIDATION_ERROR"}),
        )
        .await;
    f.reach(&refused, "FAILED").await;
    assert_eq!(
        f.app
            .counters
            .keys
            .lock()
            .unwrap()
            .get(&format!("{refused}:charge:0")),
        Some(&1)
    );
}

async fn cancel_compensates_completed_steps_in_reverse(
    db: providers_database::testing::TestDatabase,
) {
    let f = Flow::new(db, 1.0).await;
    let id = f
        .start(
            "fulfilment",
            json!({"sku": "VALVE-2", "fail_times": 0, "code": "PROVIDER_UNAVAILABLE"}),
        )
        .await;
    f.until(&id, |got| {
        got["state"] == "WAITING" && got["step"] == "delivery"
    })
    .await;
    assert_eq!(f.kv(&format!("reserved/{id}")).await.status, 200);
    let r = f
        .call(
            &f.requester,
            "cancel",
            json!({"id": id, "comment": "customer withdrew"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["data"]["cancel_requested"], true);
    let end = f.reach(&id, "CANCELLED").await;
    let trail = events(&end);
    assert_eq!(
        trail[trail.len() - 7..],
        [
            "cancel_requested",
            "cancelling",
            "compensation_started charge",
            "compensated charge",
            "compensation_started reserve",
            "compensated reserve",
            "ended"
        ]
    );
    let cancel = end["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event"] == "cancel_requested")
        .unwrap();
    assert_eq!(
        (cancel["actor"].as_str(), cancel["comment"].as_str()),
        (Some("ana"), Some("customer withdrew"))
    );
    // The charge's compensation refunded under the charge's own key; the reservation is gone.
    assert_eq!(
        f.kv(&format!("refunded/{id}")).await.body["data"]["value"],
        format!("{id}:charge:0")
    );
    assert_error(
        &f.kv(&format!("reserved/{id}")).await,
        404,
        ErrorCode::NotFound,
    );
    // Ended: no more cancels or signals.
    let r = f.call(&f.requester, "cancel", json!({"id": id})).await;
    let detail = assert_error(&r, 409, ErrorCode::Conflict);
    assert!(detail.contains("is CANCELLED"), "{detail}");
    let r = f
        .call(
            &f.requester,
            "signal",
            json!({"id": id, "name": "delivered"}),
        )
        .await;
    assert_error(&r, 409, ErrorCode::Conflict);
}

/// A call in flight when the cancel comes: it finishes, is compensated with the rest, and the
/// approval after it never begins.
pub const SLOW: &str = r#"
name = "slow"
version = 1

[[steps]]
id = "reserve"
type = "call"
service = "kv"
action = "set"
payload = { key = "held/${workflow.id}", value = 1 }
compensate = { service = "kv", action = "delete", payload = { key = "held/${workflow.id}" } }

[[steps]]
id = "nap"
type = "call"
service = "probe"
action = "sleep"
payload = { ms = 400 }

[[steps]]
id = "ask"
type = "approval"
role = "DEPT_HEAD"
"#;

async fn a_cancel_during_a_running_step_is_not_lost(db: providers_database::testing::TestDatabase) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::configured(db, with_workflows(dir.path(), 1.0, &[("slow.toml", SLOW)])).await;
    let ana = app.token_as("acme", &["requester"], "ana", None);
    let r = app
        .post(Some(&ana), "workflows/start", json!({"definition": "slow"}))
        .await;
    let id = r.body["data"]["id"].as_str().unwrap().to_owned();
    app.counters.reach(|c| &c.sleeping, 1).await;
    let r = app
        .post(Some(&ana), "workflows/cancel", json!({"id": id}))
        .await;
    assert_eq!(r.body["data"]["state"], "RUNNING", "{}", r.body);
    let mut end = Value::Null;
    for _ in 0..300 {
        end = app
            .post(Some(&ana), "workflows/get", json!({"id": id}))
            .await
            .body["data"]
            .clone();
        if end["state"] == "CANCELLED" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(end["state"], "CANCELLED", "{end:#}");
    let trail = events(&end);
    assert!(
        trail.contains(&"step_completed nap".to_owned()),
        "the call in flight finished: {trail:?}"
    );
    // Nothing starts after the cancel (the approval may be entered in the same write as the
    // call's result, and is left at once).
    let cancelled_at = trail.iter().position(|e| e == "cancel_requested").unwrap();
    assert!(
        !trail[cancelled_at..]
            .iter()
            .any(|e| e.starts_with("step_started")),
        "{trail:?}"
    );
    assert!(
        !trail
            .iter()
            .any(|e| e.starts_with("sla_breached") || e.starts_with("approved")),
        "{trail:?}"
    );
    assert_eq!(
        trail[trail.len() - 3..],
        [
            "compensation_started reserve",
            "compensated reserve",
            "ended"
        ]
    );
    let r = app
        .post(Some(&ana), "kv/get", json!({"key": format!("held/{id}")}))
        .await;
    assert_error(&r, 404, ErrorCode::NotFound);
}

async fn starts_are_idempotent_and_inputs_checked(db: providers_database::testing::TestDatabase) {
    let f = Flow::new(db, 1.0).await;
    let body = json!({"definition": "purchase_requisition", "idempotency_key": "req-77",
        "input": {"item": "gloves", "quantity": 100, "amount": 300}});
    let first = f.call(&f.requester, "start", body.clone()).await;
    assert_eq!(first.body["data"]["created"], true, "{}", first.body);
    let again = f.call(&f.requester, "start", body.clone()).await;
    assert_eq!(again.body["data"]["created"], false, "{}", again.body);
    assert_eq!(again.body["data"]["id"], first.body["data"]["id"]);
    // The same key from another requester is not theirs to reuse.
    let r = f
        .call(&f.as_role("requester", "otto"), "start", body.clone())
        .await;
    let detail = assert_error(&r, 409, ErrorCode::Conflict);
    assert!(
        detail.contains("another definition, input or requester"),
        "{detail}"
    );
    let mut other = body.clone();
    other["input"]["amount"] = json!(301);
    let r = f.call(&f.requester, "start", other).await;
    let detail = assert_error(&r, 409, ErrorCode::Conflict);
    assert!(
        detail.contains("idempotency key 'req-77' already started instance"),
        "{detail}"
    );
    // Input checked against the definition's schema, naming the field.
    let r = f
        .call(&f.requester, "start", json!({"definition": "purchase_requisition", "input": {"item": "x", "quantity": 0, "amount": 1}}))
        .await;
    let detail = assert_error(&r, 400, ErrorCode::ValidationError);
    assert!(
        detail.starts_with("payload at '/input/quantity'"),
        "{detail}"
    );
    let r = f
        .call(
            &f.requester,
            "start",
            json!({"definition": "nope", "input": {}}),
        )
        .await;
    let detail = assert_error(&r, 404, ErrorCode::NotFound);
    assert_eq!(
        detail,
        "no workflow named 'nope' (defined: fulfilment, purchase_requisition)"
    );
    // One instance exists, whatever was retried or refused; paging walks newest first.
    for n in 0..2 {
        f.start(
            "purchase_requisition",
            json!({"item": format!("item {n}"), "quantity": 1, "amount": 5}),
        )
        .await;
    }
    let r = f
        .call(
            &f.requester,
            "list",
            json!({"definition": "purchase_requisition", "limit": 2}),
        )
        .await;
    let page = &r.body["data"];
    assert_eq!(page["items"].as_array().unwrap().len(), 2, "{page}");
    let r = f
        .call(
            &f.requester,
            "list",
            json!({"definition": "purchase_requisition", "limit": 2, "after": page["next"]}),
        )
        .await;
    let rest = r.body["data"]["items"].as_array().unwrap().clone();
    assert_eq!(rest.len(), 1, "{}", r.body);
    assert_eq!(rest[0]["id"], first.body["data"]["id"]);
    assert_eq!(r.body["data"]["next"], Value::Null);
    let r = f.call(&f.requester, "definitions", json!({})).await;
    let names: Vec<&str> = r.body["data"]["definitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["fulfilment", "purchase_requisition"]);
}

#[test]
fn definitions_with_errors_are_refused_with_their_places() {
    let dir = tempfile::tempdir().unwrap();
    let bad = "name = \"broken\"\nversion = 1\n\n[[steps]]\nid = \"pay\"\ntype = \"call\"\nservice = \"payments\"\naction = \"charge\"\n\n[[steps]]\nid = \"store\"\ntype = \"call\"\nservice = \"kv\"\naction = \"put\"\n";
    let edit = with_workflows(
        dir.path(),
        1.0,
        &[
            ("broken.toml", bad),
            ("seed.toml", SEED),
            ("twice.toml", SEED),
        ],
    );
    let counters = std::sync::Arc::new(crate::support::Counters::default());
    let Err(errors) = load(
        &edit(crate::support::config_text("sqlite::memory:", "")),
        &registry(&counters),
    ) else {
        panic!("accepted");
    };
    let shown: Vec<String> = errors
        .iter()
        .map(|e| {
            let file = std::path::Path::new(&e.file)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            format!("{file}:{}:{}: {}", e.line, e.column, e.message)
        })
        .collect();
    let twice = format!(
        "twice.toml:0:0: workflow 'purchase_requisition' is also defined in {}",
        dir.path().join("seed.toml").display()
    );
    assert_eq!(
        shown,
        [
            "broken.toml:7:11: step 'pay': calls service 'payments', which is not configured in [[providers]]",
            "broken.toml:13:11: step 'store': service 'kv' has no action 'put' (it has get, set, delete, list, bulk_get)",
            twice.as_str(),
        ]
    );
    // `[workflows]` settings that cannot work are refused too.
    let edit = with_workflows(dir.path(), 1.0, &[]);
    let Err(errors) = load(
        &edit(crate::support::config_text("sqlite::memory:", ""))
            .replace("lease = \"10s\"", "lease = \"2s\""),
        &registry(&counters),
    ) else {
        panic!("accepted");
    };
    assert!(
        errors.iter().any(|e| e
            .message
            .starts_with("workflows.lease (2s) must be longer than server.request_timeout (3s)")),
        "{errors:?}"
    );
}

/// `Idempotency-Key` on the request is the start's key when the payload names none; a header
/// that is not a key is refused before anything runs.
async fn an_idempotency_key_header_keys_the_start(db: providers_database::testing::TestDatabase) {
    let f = Flow::new(db, 1.0).await;
    let start = |key: &str| {
        axum::http::Request::post("/providers/workflows/start")
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {}", f.requester))
            .header("idempotency-key", key)
            .body(axum::body::Body::from(
                json!({"definition": "purchase_requisition",
                    "input": {"item": "boots", "quantity": 2, "amount": 80}})
                .to_string(),
            ))
            .unwrap()
    };
    let first = f.app.send(start("client-req-1")).await;
    assert_eq!(first.body["data"]["created"], true, "{}", first.body);
    let again = f.app.send(start("client-req-1")).await;
    assert_eq!(
        (&again.body["data"]["created"], &again.body["data"]["id"]),
        (&json!(false), &first.body["data"]["id"]),
        "{}",
        again.body
    );
    for bad in ["two words", &"k".repeat(201), ""] {
        let r = f.app.send(start(bad)).await;
        let detail = assert_error(&r, 400, ErrorCode::ValidationError);
        assert_eq!(
            detail,
            "header Idempotency-Key: must be 1 to 200 visible ASCII characters (no spaces)"
        );
    }
    let edge = f.app.send(start(&"k".repeat(200))).await;
    assert_eq!(edge.body["data"]["created"], true, "{}", edge.body);
    let listed = f.call(&f.requester, "list", json!({})).await;
    assert_eq!(
        listed.body["data"]["items"].as_array().map(Vec::len),
        Some(2),
        "one instance per key, none for the refused headers: {}",
        listed.body
    );
}
