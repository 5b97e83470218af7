//! `purchase-orders`: both parties, both state machines, versions, approval by rules, and the
//! sync outbox under concurrent writers, on SQLite and PostgreSQL.

use std::collections::BTreeMap;
use std::sync::Arc;

use providers_core::testing::TestHost;
use providers_core::{CallContext, ErrorCode, ProviderError};
use providers_database::matrix;
use providers_database::testing::TestDatabase;
use providers_logic::{PurchaseOrders, Rules};
use serde_json::{Value, json};
use sqlx::AnyPool;

const BUYER: &str = "ACME-MFG";
const SELLER: &str = "STEEL-CO";

async fn connect(pool: &AnyPool, tenant: &str, config: Value) -> TestHost {
    TestHost::builder(PurchaseOrders::default())
        .tenant(tenant)
        .config(config)
        .resource(pool.clone())
        .peer_with_config(
            Rules::default(),
            json!({"sets": {"po_approval": {"rules": [
                {"name": "large_order", "when": "order.total > 100000", "then": "require_approval"}
            ], "default": "approve"}}}),
        )
        .connect()
        .await
        .unwrap()
}

struct Parties {
    host: TestHost,
    buyer: CallContext,
    approver: CallContext,
    seller: CallContext,
    stranger: CallContext,
    erp: CallContext,
}

async fn parties(pool: &AnyPool, tenant: &str, config: Value) -> Parties {
    let host = connect(pool, tenant, config).await;
    Parties {
        buyer: host.context_as("ada", &["buyer"], Some(BUYER)),
        approver: host.context_as("grace", &["approver"], Some(BUYER)),
        seller: host.context_as("sam", &["vendor"], Some(SELLER)),
        stranger: host.context_as("eve", &["vendor"], Some("OTHER-CO")),
        erp: host.context_as("erp-sync", &["sync"], None),
        host,
    }
}

impl Parties {
    async fn call(
        &self,
        who: &CallContext,
        action: &str,
        payload: Value,
    ) -> Result<Value, ProviderError> {
        self.host.call_as(who, action, payload).await
    }
}

fn order(quantity: &str, price: &str) -> Value {
    json!({
        "seller_company": SELLER, "product": "HR steel coil 2mm", "quantity": quantity, "unit": "TON",
        "unit_price": price, "delivery_date": "2027-01-15", "delivery_location": "Kolkata plant, gate 2"
    })
}

fn err(r: Result<Value, ProviderError>) -> (ErrorCode, String) {
    let e = r.unwrap_err();
    (e.code, e.detail)
}

async fn lifecycle_with_amendments_and_both_parties(db: TestDatabase) {
    let pool = db.pool().await;
    let p = parties(&pool, "acme", json!({"currency": "INR"})).await;
    let po = p
        .call(&p.buyer, "create", order("12.5", "4750.05"))
        .await
        .unwrap();
    assert_eq!(po["po_number"], "PO-000001");
    assert_eq!(po["quantity"], "12.500");
    assert_eq!(po["unit_price"], "4750.05");
    // 12.5 × 4750.05 = 59375.625, half away from zero → 59375.63; computed, never taken from the client.
    assert_eq!(po["total"], "59375.63");
    assert_eq!(po["currency"], "INR");
    assert_eq!(po["status"], "OPEN");
    assert_eq!(po["amendment_status"], "NONE");
    assert_eq!(po["erp_sync_status"], "PENDING");
    assert_eq!(po["version"], 1);
    let n = json!({"po_number": "PO-000001"});

    // Both parties see it; nobody else does, and is not told it exists.
    assert_eq!(p.call(&p.seller, "get", n.clone()).await.unwrap(), po);
    let (c, d) = err(p.call(&p.stranger, "get", n.clone()).await);
    assert_eq!(
        (c, d.as_str()),
        (
            ErrorCode::NotFound,
            "no purchase order 'PO-000001' that your company is a party to"
        )
    );
    let (c, d) = err(p.call(&p.erp, "get", n.clone()).await);
    assert_eq!(c, ErrorCode::Forbidden);
    assert!(d.contains("no company_id claim"), "{d}");

    // The buyer cannot act as the seller, nor the seller as the buyer.
    let (c, d) = err(p.call(&p.buyer, "seller_confirm", n.clone()).await);
    assert_eq!(c, ErrorCode::Forbidden);
    assert_eq!(
        d,
        "only the seller company ('STEEL-CO') may seller_confirm purchase order 'PO-000001'; you act for 'ACME-MFG'"
    );
    let (c, _) = err(p
        .call(
            &p.seller,
            "approve_changes",
            json!({"po_number": "PO-000001", "version": 1, "approve": true}),
        )
        .await);
    assert_eq!(c, ErrorCode::Forbidden);
    let (c, _) = err(p
        .call(
            &p.seller,
            "update",
            json!({"po_number": "PO-000001", "version": 1, "quantity": "1"}),
        )
        .await);
    assert_eq!(c, ErrorCode::Forbidden);

    // The seller proposes; while a proposal is pending neither confirm nor update is allowed.
    let proposed = p
        .call(&p.seller, "propose_changes", json!({"po_number": "PO-000001", "proposed_quantity": "10", "proposed_unit_price": "4800", "amendment_reason": "only 10 t in stock; price moved"}))
        .await
        .unwrap();
    assert_eq!(proposed["amendment_status"], "PROPOSED");
    assert_eq!(proposed["proposed_quantity"], "10.000");
    assert_eq!(proposed["proposed_unit_price"], "4800.00");
    assert_eq!(
        proposed["total"], "59375.63",
        "a proposal changes nothing until approved"
    );
    assert_eq!(proposed["version"], 2);
    let (c, d) = err(p.call(&p.seller, "seller_confirm", n.clone()).await);
    assert_eq!(c, ErrorCode::Conflict);
    assert_eq!(
        d,
        "purchase order 'PO-000001' is OPEN with amendment PROPOSED; seller_confirm is not allowed there (allowed: approve_changes, cancel)"
    );
    let (c, _) = err(p
        .call(
            &p.buyer,
            "update",
            json!({"po_number": "PO-000001", "version": 2, "quantity": "11"}),
        )
        .await);
    assert_eq!(c, ErrorCode::Conflict);

    // Rejected: back to the original terms, the seller may try again; approved: applied and agreed.
    let rejected = p
        .call(
            &p.approver,
            "approve_changes",
            json!({"po_number": "PO-000001", "version": 2, "approve": false, "buyer_notes": "we need 12.5 t"}),
        )
        .await
        .unwrap();
    assert_eq!(rejected["amendment_status"], "REJECTED");
    assert_eq!(rejected["status"], "OPEN");
    assert_eq!(rejected["proposed_quantity"], Value::Null);
    assert_eq!(rejected["buyer_notes"], "we need 12.5 t");
    p.call(&p.seller, "propose_changes", json!({"po_number": "PO-000001", "proposed_delivery_date": "2027-01-22", "proposed_unit_price": "4800", "amendment_reason": "a week later, at 4800"}))
        .await
        .unwrap();
    let agreed = p
        .call(
            &p.approver,
            "approve_changes",
            json!({"po_number": "PO-000001", "version": 4, "approve": true}),
        )
        .await
        .unwrap();
    assert_eq!(agreed["status"], "CONFIRMED");
    assert_eq!(agreed["amendment_status"], "APPROVED");
    assert_eq!(agreed["delivery_date"], "2027-01-22");
    assert_eq!(agreed["total"], "60000.00");
    assert_eq!(agreed["version"], 5);
    let (c, d) = err(p.call(&p.seller, "seller_confirm", n.clone()).await);
    assert_eq!(c, ErrorCode::Conflict);
    assert!(d.ends_with("(allowed: cancel)"), "{d}");
    let cancelled = p
        .call(
            &p.buyer,
            "cancel",
            json!({"po_number": "PO-000001", "reason": "plant shutdown"}),
        )
        .await
        .unwrap();
    assert_eq!(cancelled["status"], "CANCELLED");
    let (c, d) = err(p.call(&p.buyer, "cancel", n.clone()).await);
    assert_eq!(c, ErrorCode::Conflict);
    assert!(d.ends_with("(allowed: nothing, it is final)"), "{d}");

    // Every change is in the outbox, in order, with the order as it was.
    let u = p.call(&p.erp, "pending_updates", json!({})).await.unwrap();
    let events: Vec<(i64, &str, i64)> = u["updates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["id"].as_i64().unwrap(),
                x["event"].as_str().unwrap(),
                x["order"]["version"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        events,
        [
            (1, "created", 1),
            (2, "changes_proposed", 2),
            (3, "changes_rejected", 3),
            (4, "changes_proposed", 4),
            (5, "changes_approved", 5),
            (6, "cancelled", 6)
        ]
    );
    assert_eq!(u["updates"][0]["order"]["total"], "59375.63");
    let list = p
        .call(&p.seller, "list", json!({"status": "CANCELLED"}))
        .await
        .unwrap();
    assert_eq!(list["orders"].as_array().unwrap().len(), 1);
    p.host.disconnect().await.unwrap();
}

async fn approval_rules_and_separation_of_duties(db: TestDatabase) {
    let pool = db.pool().await;
    let p = parties(&pool, "acme", json!({"approval_rules": "po_approval"})).await;
    let small = p
        .call(&p.buyer, "create", order("10", "500"))
        .await
        .unwrap();
    assert_eq!(small["status"], "OPEN");
    let large = p
        .call(&p.buyer, "create", order("100", "1000.01"))
        .await
        .unwrap();
    assert_eq!(large["total"], "100001.00");
    assert_eq!(large["status"], "PENDING_APPROVAL");
    let n = json!({"po_number": large["po_number"], "version": 1});
    let (c, _) = err(p.call(&p.seller, "seller_confirm", n.clone()).await);
    assert_eq!(
        c,
        ErrorCode::Conflict,
        "the seller cannot confirm before the buyer approves"
    );
    // Its creator cannot approve it.
    let (c, d) = err(p.call(&p.buyer, "approve", n.clone()).await);
    assert_eq!(c, ErrorCode::Forbidden);
    assert_eq!(
        d,
        format!(
            "'ada' created purchase order '{}' and cannot approve it too",
            large["po_number"].as_str().unwrap()
        )
    );
    let (c, d) = err(p
        .call(
            &p.approver,
            "approve",
            json!({"po_number": large["po_number"]}),
        )
        .await);
    assert_eq!(
        (c, d.as_str()),
        (
            ErrorCode::ValidationError,
            "version: approve needs the version of the order that was reviewed"
        )
    );
    let approved = p.call(&p.approver, "approve", n.clone()).await.unwrap();
    assert_eq!(approved["status"], "OPEN");
    // An update that crosses the threshold asks for approval again.
    let up = p
        .call(
            &p.buyer,
            "update",
            json!({"po_number": small["po_number"], "version": 1, "quantity": "1000"}),
        )
        .await
        .unwrap();
    assert_eq!(up["total"], "500000.00");
    assert_eq!(up["status"], "PENDING_APPROVAL");
    let down = p
        .call(
            &p.buyer,
            "update",
            json!({"po_number": small["po_number"], "version": 2, "quantity": "1"}),
        )
        .await
        .unwrap();
    assert_eq!(down["status"], "OPEN");
    // Whoever made the change that needs approval cannot approve it, creator or not.
    let raised = p
        .call(
            &p.approver,
            "update",
            json!({"po_number": small["po_number"], "version": 3, "quantity": "999"}),
        )
        .await
        .unwrap();
    assert_eq!(raised["status"], "PENDING_APPROVAL");
    assert_eq!(raised["changed_by"], "grace");
    let again = json!({"po_number": small["po_number"], "version": 4});
    let (c, d) = err(p.call(&p.approver, "approve", again.clone()).await);
    assert_eq!(c, ErrorCode::Forbidden);
    assert!(d.starts_with("'grace' last changed purchase order"), "{d}");
    let other = p.host.context_as("bob", &["approver"], Some(BUYER));
    assert_eq!(
        p.call(&other, "approve", again).await.unwrap()["status"],
        "OPEN"
    );
    // Accepted terms over the threshold need a second approval as well.
    p.call(
        &p.seller,
        "propose_changes",
        json!({"po_number": small["po_number"], "proposed_unit_price": "5000", "amendment_reason": "steel went up"}),
    )
    .await
    .unwrap();
    let accepted = p
        .call(
            &p.approver,
            "approve_changes",
            json!({"po_number": small["po_number"], "version": 6, "approve": true}),
        )
        .await
        .unwrap();
    assert_eq!(accepted["total"], "4995000.00");
    assert_eq!(accepted["status"], "PENDING_APPROVAL");
    assert_eq!(accepted["amendment_status"], "APPROVED");
    p.host.disconnect().await.unwrap();
}

async fn bad_input_and_stale_versions_change_nothing(db: TestDatabase) {
    let pool = db.pool().await;
    let p = parties(&pool, "acme", json!({})).await;
    for (field, value, detail) in [
        (
            "quantity",
            "1.2345",
            "quantity: '1.2345' has more than 3 decimal places",
        ),
        ("quantity", "0", "quantity: '0' must be greater than zero"),
        (
            "quantity",
            "1e3",
            "quantity: '1e3' is not a decimal number written as digits, e.g. \"12.5\"",
        ),
        (
            "unit_price",
            "10.001",
            "unit_price: '10.001' has more than 2 decimal places",
        ),
        (
            "unit_price",
            "1000000000000",
            "unit_price: '1000000000000' is more than 999999999999",
        ),
        (
            "delivery_date",
            "2027-02-29",
            "delivery_date: '2027-02-29' is not a calendar date YYYY-MM-DD",
        ),
    ] {
        let mut o = order("1", "1");
        o[field] = json!(value);
        let (c, d) = err(p.call(&p.buyer, "create", o).await);
        assert_eq!((c, d.as_str()), (ErrorCode::ValidationError, detail));
    }
    let mut own = order("1", "1");
    own["seller_company"] = json!(BUYER);
    assert_eq!(
        err(p.call(&p.buyer, "create", own).await).0,
        ErrorCode::ValidationError
    );
    let mut spoof = order("1", "1");
    spoof["buyer_company"] = json!("SOMEONE-ELSE");
    assert_eq!(
        err(p.call(&p.buyer, "create", spoof).await).0,
        ErrorCode::Forbidden
    );
    let s = p.call(&p.erp, "sync_status", json!({})).await.unwrap();
    assert_eq!(s["last_cursor"], 0, "nothing was written: {s}");
    assert_eq!(
        p.call(&p.buyer, "list", json!({})).await.unwrap()["orders"],
        json!([])
    );

    let po = p.call(&p.buyer, "create", order("2", "3")).await.unwrap();
    let name = po["po_number"].as_str().unwrap().to_owned();
    // Two edits from the same version: exactly one wins, the other is told why.
    let shared = Arc::new(p);
    let tasks: Vec<_> = ["5", "7"]
        .into_iter()
        .map(|q| {
            let p = shared.clone();
            let name = name.clone();
            tokio::spawn(async move {
                p.call(
                    &p.buyer,
                    "update",
                    json!({"po_number": name, "version": 1, "quantity": q}),
                )
                .await
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap());
    }
    let wins: Vec<&Value> = outcomes.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(wins.len(), 1, "{outcomes:?}");
    let lost = outcomes.iter().find_map(|r| r.as_ref().err()).unwrap();
    assert_eq!(lost.code, ErrorCode::Conflict);
    assert!(
        lost.detail.starts_with(&format!(
            "purchase order '{name}' is at version 2; this change was based on version 1"
        )) || lost
            .detail
            .contains("changed while this update was checked"),
        "{}",
        lost.detail
    );
    let p = Arc::try_unwrap(shared).ok().unwrap();
    let now = p
        .call(&p.seller, "get", json!({"po_number": name}))
        .await
        .unwrap();
    assert_eq!(now["version"], 2);
    assert_eq!(now["quantity"], wins[0]["quantity"]);
    let u = p.call(&p.erp, "pending_updates", json!({})).await.unwrap();
    assert_eq!(
        u["updates"].as_array().unwrap().len(),
        2,
        "one create, one update: {u}"
    );
    p.host.disconnect().await.unwrap();
}

async fn the_outbox_loses_nothing_and_keeps_order_under_concurrent_writers(db: TestDatabase) {
    // Two pools stand for two hosts on one database.
    let pools = [db.pool().await, db.pool().await];
    let mut writers = Vec::new();
    for pool in &pools {
        writers.push(Arc::new(parties(pool, "acme", json!({})).await));
    }
    const ORDERS: usize = 20;
    const EDITS: i64 = 4;
    let tasks: Vec<_> = (0..ORDERS)
        .map(|i| {
            let p = writers[i % 2].clone();
            tokio::spawn(async move {
                let po = p.call(&p.buyer, "create", order(&format!("{}", i + 1), "10")).await.unwrap();
                let name = po["po_number"].as_str().unwrap().to_owned();
                for v in 1..=EDITS {
                    p.call(&p.buyer, "update", json!({"po_number": name, "version": v, "unit_price": format!("{}", 10 + v)}))
                        .await
                        .unwrap();
                }
                name
            })
        })
        .collect();
    // Meanwhile the ERP polls and acknowledges; a page must never skip a cursor.
    let poller = {
        let p = writers[0].clone();
        tokio::spawn(async move {
            let mut since = 0;
            let mut seen: Vec<(i64, String, i64)> = Vec::new();
            let total = (ORDERS as i64) * (EDITS + 1);
            for _ in 0..10_000 {
                let u = p
                    .call(
                        &p.erp,
                        "pending_updates",
                        json!({"since": since, "limit": 7}),
                    )
                    .await
                    .unwrap();
                let ids: Vec<i64> = u["updates"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x["id"].as_i64().unwrap())
                    .collect();
                for x in u["updates"].as_array().unwrap() {
                    let id = x["id"].as_i64().unwrap();
                    assert_eq!(id, since + 1, "a cursor was skipped or repeated");
                    since = id;
                    seen.push((
                        id,
                        x["po_number"].as_str().unwrap().to_owned(),
                        x["version"].as_i64().unwrap(),
                    ));
                }
                if !ids.is_empty() {
                    let a = p
                        .call(&p.erp, "acknowledge", json!({"ids": ids}))
                        .await
                        .unwrap();
                    assert_eq!(a["acknowledged"], ids.len());
                }
                if since == total {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            seen
        })
    };
    for t in tasks {
        t.await.unwrap();
    }
    let seen = poller.await.unwrap();
    assert_eq!(
        seen.len(),
        ORDERS * (EDITS as usize + 1),
        "every change delivered once"
    );
    let mut versions: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (_, po, v) in &seen {
        versions.entry(po.clone()).or_default().push(*v);
    }
    assert_eq!(versions.len(), ORDERS);
    for (po, vs) in &versions {
        assert_eq!(
            vs,
            &(1..=EDITS + 1).collect::<Vec<_>>(),
            "{po}: versions out of order"
        );
    }
    let p = &writers[1];
    let s = p.call(&p.erp, "sync_status", json!({})).await.unwrap();
    assert_eq!(s["pending"], 0);
    assert_eq!(s["acknowledged"], seen.len());
    assert_eq!(s["oldest_pending_age_ms"], Value::Null);
    let one = p
        .call(&p.buyer, "get", json!({"po_number": "PO-000001"}))
        .await
        .unwrap();
    assert_eq!(one["erp_sync_status"], "SYNCED");
    // Acknowledging again is safe and says so.
    let again = p
        .call(&p.erp, "acknowledge", json!({"ids": [1, 2, 3]}))
        .await
        .unwrap();
    assert_eq!(
        again,
        json!({"acknowledged": 0, "already_acknowledged": 3, "unknown": []})
    );
}

async fn another_tenant_sees_and_acknowledges_nothing(db: TestDatabase) {
    let pool = db.pool().await;
    let acme = parties(&pool, "acme", json!({})).await;
    let globex = parties(&pool, "globex", json!({})).await;
    acme.call(&acme.buyer, "create", order("1", "1"))
        .await
        .unwrap();
    // The same companies and the same number in another tenant are another order.
    let (c, _) = err(globex
        .call(&globex.buyer, "get", json!({"po_number": "PO-000001"}))
        .await);
    assert_eq!(c, ErrorCode::NotFound);
    assert_eq!(
        globex
            .call(&globex.seller, "list", json!({}))
            .await
            .unwrap()["orders"],
        json!([])
    );
    assert_eq!(
        globex
            .call(&globex.erp, "pending_updates", json!({}))
            .await
            .unwrap()["updates"],
        json!([])
    );
    let a = globex
        .call(&globex.erp, "acknowledge", json!({"ids": [1]}))
        .await
        .unwrap();
    assert_eq!(
        a,
        json!({"acknowledged": 0, "already_acknowledged": 0, "unknown": [1]})
    );
    let (c, _) = err(globex
        .call(
            &globex.seller,
            "seller_confirm",
            json!({"po_number": "PO-000001"}),
        )
        .await);
    assert_eq!(c, ErrorCode::NotFound);
    let s = acme
        .call(&acme.erp, "sync_status", json!({}))
        .await
        .unwrap();
    assert_eq!(s["pending"], 1, "acme's update is still waiting: {s}");
    let own = globex
        .call(&globex.buyer, "create", order("1", "1"))
        .await
        .unwrap();
    assert_eq!(own["po_number"], "PO-000001");
    acme.host.disconnect().await.unwrap();
    globex.host.disconnect().await.unwrap();
}

async fn lists_filter_and_page(db: TestDatabase) {
    let pool = db.pool().await;
    let p = parties(&pool, "acme", json!({})).await;
    for i in 0..7 {
        let mut o = order("1", "1");
        o["delivery_date"] = json!(format!("2027-03-0{}", i + 1));
        if i % 2 == 1 {
            o["seller_company"] = json!("OTHER-CO");
        }
        p.call(&p.buyer, "create", o).await.unwrap();
    }
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..10 {
        let mut q = json!({"limit": 3});
        if let Some(a) = &after {
            q["after"] = json!(a);
        }
        let page = p.call(&p.buyer, "list", q).await.unwrap();
        all.extend(
            page["orders"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o["po_number"].as_str().unwrap().to_owned()),
        );
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_owned()),
            None => break,
        }
    }
    assert_eq!(
        all,
        (1..=7).map(|i| format!("PO-{i:06}")).collect::<Vec<_>>()
    );
    let steel = p.call(&p.buyer, "list", json!({"seller_company": SELLER, "delivery_from": "2027-03-02", "delivery_to": "2027-03-05"})).await.unwrap();
    let got: Vec<&str> = steel["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["delivery_date"].as_str().unwrap())
        .collect();
    assert_eq!(got, ["2027-03-03", "2027-03-05"]);
    // The seller sees only its own four.
    assert_eq!(
        p.call(&p.seller, "list", json!({})).await.unwrap()["orders"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    let (c, d) = err(p.call(&p.buyer, "list", json!({"limit": 0})).await);
    assert_eq!(
        (c, d.as_str()),
        (
            ErrorCode::ValidationError,
            "limit: 0 is not between 1 and 500"
        )
    );
    let (c, d) = err(p.call(&p.buyer, "list", json!({"status": "SHIPPED"})).await);
    assert_eq!(
        (c, d.as_str()),
        (
            ErrorCode::ValidationError,
            "status: 'SHIPPED' is not one of PENDING_APPROVAL, OPEN, CONFIRMED, CANCELLED"
        )
    );
    p.host.disconnect().await.unwrap();
}

/// A create under a call's idempotency key (a workflow step's, a client's `Idempotency-Key`)
/// makes one order however often it runs; the key reused for another request is refused.
async fn creates_under_one_idempotency_key_make_one_order(db: TestDatabase) {
    let pool = db.pool().await;
    let p = parties(&pool, "acme", json!({})).await;
    let keyed = p.buyer.clone().with_idempotency_key(Some("wf-1:raise:0"));
    let first = p.call(&keyed, "create", order("3", "10")).await.unwrap();
    assert_eq!(first["po_number"], "PO-000001");
    // Confirmed by the seller meanwhile: a retry returns the order as it is now.
    let confirmed = p
        .call(
            &p.seller,
            "seller_confirm",
            json!({"po_number": "PO-000001", "version": 1}),
        )
        .await
        .unwrap();
    let again = p.call(&keyed, "create", order("3", "10")).await.unwrap();
    assert_eq!(again, confirmed);
    // The same key for another order is refused, and makes nothing.
    let (c, d) = err(p.call(&keyed, "create", order("4", "10")).await);
    assert_eq!(
        (c, d.as_str()),
        (
            ErrorCode::Conflict,
            "idempotency key 'wf-1:raise:0' was used to create purchase order 'PO-000001' from another request"
        )
    );
    // Concurrent retries under a new key: one order between them.
    let other = p.buyer.clone().with_idempotency_key(Some("client-7"));
    let made =
        futures_util::future::join_all((0..8).map(|_| p.call(&other, "create", order("5", "10"))))
            .await;
    let numbers: std::collections::BTreeSet<String> = made
        .into_iter()
        .map(|r| r.unwrap()["po_number"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(numbers.into_iter().collect::<Vec<_>>(), ["PO-000002"]);
    // Without a key, each create is an order.
    p.call(&p.buyer, "create", order("5", "10")).await.unwrap();
    let listed = p.call(&p.buyer, "list", json!({})).await.unwrap();
    let all: Vec<&str> = listed["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["po_number"].as_str().unwrap())
        .collect();
    assert_eq!(all, ["PO-000001", "PO-000002", "PO-000003"]);
    p.host.disconnect().await.unwrap();
}

matrix!(
    creates_under_one_idempotency_key_make_one_order,
    lifecycle_with_amendments_and_both_parties,
    approval_rules_and_separation_of_duties,
    bad_input_and_stale_versions_change_nothing,
    the_outbox_loses_nothing_and_keeps_order_under_concurrent_writers,
    another_tenant_sees_and_acknowledges_nothing,
    lists_filter_and_page,
);
