//! `rules`: decisions, compile errors with positions, and every limit at its edge.

use providers_core::testing::TestHost;
use providers_core::{CallContext, ErrorCode, ProviderError};
use providers_logic::Rules;
use serde_json::{Value, json};

fn approval() -> Value {
    json!({
        "sets": {
            "po_approval": {
                "description": "who must approve a purchase order",
                "rules": [
                    {"name": "blocked_supplier", "when": "order.seller_company in ['SHADY-CO']", "then": "reject"},
                    {"name": "large_order", "when": "order.total > 100000 && !has(order.approved_by)", "then": "require_approval"},
                    {"name": "many_lines", "when": "size(order.lines) > 3"},
                    {"name": "clerk_only", "when": "'approver' in caller.roles == false && order.total > 50000", "then": "require_approval"}
                ],
                "default": "approve"
            }
        }
    })
}

async fn connect(config: Value) -> Result<TestHost, ProviderError> {
    TestHost::builder(Rules::default())
        .tenant("acme")
        .roles(&["clerk"])
        .config(config)
        .connect()
        .await
}

fn order(total: f64, lines: usize) -> Value {
    json!({"order": {"total": total, "seller_company": "STEEL-CO", "lines": vec![1; lines]}})
}

async fn evaluate(host: &mut TestHost, input: Value) -> Result<Value, ProviderError> {
    host.call("evaluate", json!({"set": "po_approval", "input": input}))
        .await
}

#[tokio::test]
async fn the_first_rule_that_holds_decides_and_every_result_is_reported() {
    let mut host = connect(approval()).await.unwrap();
    let small = evaluate(&mut host, order(120.5, 1)).await.unwrap();
    assert_eq!(small["decision"], "approve");
    assert_eq!(small["decided_by"], Value::Null);
    let matched: Vec<bool> = small["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["matched"].as_bool().unwrap())
        .collect();
    assert_eq!(matched, [false, false, false, false]);

    let large = evaluate(&mut host, order(250_000.0, 5)).await.unwrap();
    assert_eq!(large["decision"], "require_approval");
    assert_eq!(large["decided_by"], "large_order");
    let matched: Vec<bool> = large["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["matched"].as_bool().unwrap())
        .collect();
    // Later rules are still evaluated and reported; `many_lines` decides nothing.
    assert_eq!(matched, [false, true, true, true]);
    assert_eq!(large["results"][2]["then"], Value::Null);

    let mut approved = order(250_000.0, 1);
    approved["order"]["approved_by"] = json!("grace");
    let r = evaluate(&mut host, approved).await.unwrap();
    // The caller is a clerk: the last rule still asks for approval over 50,000.
    assert_eq!(r["decided_by"], "clerk_only");

    // Integers in the input are integers in CEL, and compare with the literal as written.
    let r = evaluate(
        &mut host,
        json!({"order": {"total": 100001, "seller_company": "SHADY-CO", "lines": []}}),
    )
    .await
    .unwrap();
    assert_eq!(r["decided_by"], "blocked_supplier");
    assert_eq!(r["decision"], "reject");
    host.disconnect().await.unwrap();
}

#[tokio::test]
async fn the_caller_variable_reflects_the_context() {
    let mut host = connect(approval()).await.unwrap();
    let approver = CallContext::new("acme", "r1")
        .with_subject("grace")
        .with_roles(vec!["approver".to_owned()]);
    let r = host
        .call_as(
            &approver,
            "evaluate",
            json!({"set": "po_approval", "input": order(60_000.0, 1)}),
        )
        .await
        .unwrap();
    assert_eq!(r["decision"], "approve");
    let r = evaluate(&mut host, order(60_000.0, 1)).await.unwrap();
    assert_eq!(r["decision"], "require_approval");
    let e = evaluate(
        &mut host,
        json!({"caller": {"roles": ["approver"]}, "order": {}}),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code, ErrorCode::ValidationError);
    assert!(e.detail.contains("'caller' is reserved"), "{}", e.detail);
    host.disconnect().await.unwrap();
}

#[tokio::test]
async fn a_rule_that_cannot_read_its_input_fails_closed() {
    let mut host = connect(approval()).await.unwrap();
    let e = evaluate(&mut host, json!({"order": {"total": 5}}))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::ValidationError);
    assert!(
        e.detail
            .starts_with("rule 'blocked_supplier' of set 'po_approval' could not be evaluated"),
        "{}",
        e.detail
    );
    let mut host = connect(json!({"sets": {"s": {"rules": [{"name": "n", "when": "1 + 1", "then": "x"}], "default": "d"}}}))
        .await
        .unwrap();
    let e = host
        .call("evaluate", json!({"set": "s", "input": {}}))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::ValidationError);
    assert_eq!(
        e.detail,
        "rule 'n' of set 's' gave 2 where true or false was expected"
    );
    let e = host
        .call("evaluate", json!({"set": "nope", "input": {}}))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    assert_eq!(e.detail, "no rule set 'nope' (sets: s)");
    host.disconnect().await.unwrap();
}

#[tokio::test]
async fn compile_errors_name_the_set_the_rule_and_the_position() {
    let bad = json!({"sets": {"s": {"rules": [
        {"name": "ok", "when": "a > 1", "then": "x"},
        {"name": "broken", "when": "a >\n  && b", "then": "x"}
    ], "default": "d"}}});
    let e = connect(bad).await.err().unwrap();
    assert_eq!(e.code, ErrorCode::ValidationError);
    assert!(
        e.detail
            .starts_with("rules config does not compile: set 's', rule 'broken', 2:"),
        "{}",
        e.detail
    );

    let mut host = connect(approval()).await.unwrap();
    let r = host
        .call(
            "validate",
            json!({"rules": [
                {"name": "fine", "when": "x == 1"},
                {"name": "oops", "when": "x == (1"},
                {"name": "fine", "when": "true"}
            ]}),
        )
        .await
        .unwrap();
    assert_eq!(r["valid"], false);
    let errors = r["errors"].as_array().unwrap();
    assert_eq!(errors[0]["rule"], "oops");
    assert_eq!(errors[0]["line"], 1);
    assert!(errors[0]["column"].as_u64().unwrap() >= 7, "{r}");
    assert_eq!(errors.last().unwrap()["rule"], "fine");
    assert_eq!(
        errors.last().unwrap()["message"],
        "a second rule is named 'fine'"
    );
    let r = host
        .call("validate", json!({"set": "po_approval"}))
        .await
        .unwrap();
    assert_eq!(r, json!({"valid": true, "errors": []}));
    let listed = host.call("list", json!({})).await.unwrap();
    assert_eq!(listed["sets"][0]["name"], "po_approval");
    assert_eq!(
        listed["sets"][0]["rules"][1]["when"],
        "order.total > 100000 && !has(order.approved_by)"
    );
    host.disconnect().await.unwrap();
}

#[tokio::test]
async fn input_size_is_limited_at_the_edge() {
    let config = json!({"max_input_bytes": 30, "sets": {"s": {"rules": [{"name": "n", "when": "size(s) > 0", "then": "x"}], "default": "d"}}});
    let mut host = connect(config).await.unwrap();
    // {"s":"…"} is 8 bytes of JSON around the string.
    let at = json!({"s": "a".repeat(22)});
    assert_eq!(serde_json::to_vec(&at).unwrap().len(), 30);
    let r = host
        .call("evaluate", json!({"set": "s", "input": at}))
        .await
        .unwrap();
    assert_eq!(r["decision"], "x");
    let over = json!({"s": "a".repeat(23)});
    let e = host
        .call("evaluate", json!({"set": "s", "input": over}))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::ValidationError);
    assert_eq!(
        e.detail,
        "input is 31 bytes; rule set 's' takes at most 30 (max_input_bytes)"
    );
    host.disconnect().await.unwrap();
}

#[tokio::test]
async fn a_rule_that_would_run_away_is_cut_off_before_it_runs() {
    // Two nested comprehensions: work grows with the square of the list.
    let config = json!({"max_cost": 1_000_000, "sets": {"s": {"rules": [
        {"name": "pairs", "when": "xs.all(a, xs.exists(b, a + b == 0))", "then": "x"}
    ], "default": "d"}}});
    let mut host = connect(config).await.unwrap();
    let small: Vec<i64> = (0..50).collect();
    let r = host
        .call("evaluate", json!({"set": "s", "input": {"xs": small}}))
        .await
        .unwrap();
    assert_eq!(r["decision"], "d");
    assert!(r["cost_bound"].as_u64().unwrap() <= 1_000_000, "{r}");
    // 5,000 elements, and the caller variable has 5 more (4 fields and a one-role list).
    let large: Vec<i64> = (0..5000).collect();
    let e = host
        .call("evaluate", json!({"set": "s", "input": {"xs": large}}))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::ValidationError);
    assert!(
        e.detail.starts_with("rule set 's' could cost up to "),
        "{}",
        e.detail
    );
    assert!(
        // Two comprehensions, and `+` and `==` inside them count as a loop each.
        e.detail.contains("(rule 'pairs' nests 3 loop(s) over up to 5005 elements); the limit is 1000000 (max_cost)"),
        "{}",
        e.detail
    );
    host.disconnect().await.unwrap();
}

#[tokio::test]
async fn expression_size_and_nesting_are_limited() {
    let long = format!("x == '{}'", "a".repeat(100));
    let config = json!({"max_expression_bytes": 64, "sets": {"s": {"rules": [{"name": "long", "when": long}], "default": "d"}}});
    let e = connect(config).await.err().unwrap();
    assert_eq!(
        e.detail,
        "rules config does not compile: set 's', rule 'long', 1:1: the expression is 107 bytes long; the limit is 64"
    );
    // Nesting at the limit compiles and evaluates on an ordinary stack; one more is refused.
    let nested = |n: usize| format!("{}true{}", "(".repeat(n), ")".repeat(n));
    let config = |n: usize| json!({"max_nesting": 16, "sets": {"s": {"rules": [{"name": "deep", "when": nested(n), "then": "yes"}], "default": "d"}}});
    let mut host = connect(config(12)).await.unwrap();
    let r = host
        .call("evaluate", json!({"set": "s", "input": {}}))
        .await
        .unwrap();
    assert_eq!(r["decision"], "yes");
    host.disconnect().await.unwrap();
    let e = connect(config(40)).await.err().unwrap();
    assert!(e.detail.contains("rule 'deep'"), "{}", e.detail);
    // A flat chain of operators is as deep a tree as it is long: refused, not overflowed.
    let chain = format!("1{} == 0", "+1".repeat(1500));
    let e = connect(
        json!({"sets": {"s": {"rules": [{"name": "chain", "when": chain}], "default": "d"}}}),
    )
    .await
    .err()
    .unwrap();
    assert!(
        e.detail
            .contains("rule 'chain', 1:1: the expression nests ")
            && e.detail
                .ends_with("levels deep; the limit is 64 (max_nesting × 2)"),
        "{}",
        e.detail
    );
}
