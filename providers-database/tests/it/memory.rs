//! `backend = "memory"` answers exactly as the database does: one script of calls — writes,
//! ETag conflicts, `if_absent`, limits, quotas, pages, `bulk_get`, TTLs, bad input — run on
//! both, every answer and error compared (ETags, random on both, compared by where they came from).

use std::time::Duration;

use providers_database::testing::TestDatabase;
use serde_json::{Value, json};

use crate::support::connect;

fn steps() -> Vec<(&'static str, Value)> {
    vec![
        ("set", json!({"key": "a", "value": {"n": 1}})),
        ("get", json!({"key": "a"})),
        (
            "set",
            json!({"key": "a", "value": {"n": 2}, "etag": "$last"}),
        ),
        (
            "set",
            json!({"key": "a", "value": {"n": 3}, "etag": "12345"}),
        ),
        (
            "set",
            json!({"key": "a", "value": {"n": 3}, "etag": "$last", "if_absent": true}),
        ),
        ("set", json!({"key": "a", "value": 1, "if_absent": true})),
        (
            "set",
            json!({"key": "b", "value": [1, 2.50, -0, 18446744073709551616_u128], "if_absent": true}),
        ),
        ("set", json!({"key": "big", "value": "x".repeat(80)})),
        ("list", json!({"prefix": "", "limit": 1})),
        ("list", json!({"prefix": "", "after": "a"})),
        ("list", json!({"prefix": "b"})),
        ("bulk_get", json!({"keys": ["a", "b", "zz"]})),
        // Asked for many times, a key costs each time: the page budget still holds.
        ("bulk_get", json!({"keys": vec!["b"; 40]})),
        ("delete", json!({"key": "a", "etag": "999"})),
        ("delete", json!({"key": "a", "etag": "$last"})),
        ("delete", json!({"key": "a"})),
        ("delete", json!({"key": "a"})),
        ("set", json!({"key": "c", "value": "c"})),
        ("set", json!({"key": "d", "value": "d"})),
        ("set", json!({"key": "e", "value": "e"})),
        ("set", json!({"key": "d", "value": "d2"})),
        ("get", json!({"key": "missing"})),
        ("get", json!({"key": "nul\u{0}key"})),
        ("set", json!({"key": "t", "ttl_seconds": 1, "value": 1})),
        ("rename", json!({})),
        ("get", json!({"nokey": 1})),
        ("sleep", json!({})),
        ("get", json!({"key": "t"})),
        ("set", json!({"key": "e", "value": "e"})),
        ("list", json!({"prefix": ""})),
    ]
}

/// Every answer of the script, with each ETag replaced by the step whose answer carried it.
async fn run(config: Value, pool: &sqlx::AnyPool) -> Vec<String> {
    let mut kv = connect(pool, "acme", config).await;
    let mut answers = Vec::new();
    let mut etags: Vec<(String, usize)> = Vec::new();
    let mut last = String::new();
    for (i, (action, payload)) in steps().into_iter().enumerate() {
        if action == "sleep" {
            tokio::time::sleep(Duration::from_millis(1100)).await;
            continue;
        }
        let payload: Value =
            serde_json::from_str(&payload.to_string().replace("$last", &last)).unwrap();
        let mut text = match kv.call(action, payload).await {
            Ok(v) => {
                if let Some(e) = v["etag"].as_str() {
                    last = e.to_owned();
                    etags.push((e.to_owned(), i));
                }
                v.to_string()
            }
            Err(e) => format!("{} {}", e.code.as_str(), e.detail),
        };
        for (etag, step) in &etags {
            text = text.replace(etag, &format!("<etag of step {step}>"));
        }
        answers.push(format!("{action}: {text}"));
    }
    answers
}

#[tokio::test]
async fn the_memory_backend_answers_as_the_database_does() {
    let db = TestDatabase::sqlite();
    let pool = db.pool().await;
    let limits = json!({"max_value_bytes": 64, "max_keys": 3, "max_page_bytes": 1024});
    let sql = run(limits.clone(), &pool).await;
    let mut memory_config = limits;
    memory_config["backend"] = json!("memory");
    // Another tenant's pool is irrelevant to memory: the same pool shows it writes nothing there.
    let memory = run(memory_config, &pool).await;
    assert_eq!(sql.len(), memory.len());
    for (s, m) in sql.iter().zip(&memory) {
        assert_eq!(s, m);
    }
    assert!(
        sql.iter()
            .any(|a| a.starts_with("set: CONFLICT quota exceeded")),
        "{sql:#?}"
    );
    assert!(sql.iter().any(|a| a.contains("\"next\":\"a\"")), "{sql:#?}");
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM kv_entries")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        rows, 3,
        "only the database run wrote rows (b, c, d; t expired and was purged)"
    );
}

#[tokio::test]
async fn memory_stores_are_per_instance_and_tenant() {
    let db = TestDatabase::sqlite();
    let pool = db.pool().await;
    let mut a = connect(&pool, "acme", json!({"backend": "memory"})).await;
    let mut b = connect(&pool, "globex", json!({"backend": "memory"})).await;
    a.call("set", json!({"key": "k", "value": "acme's"}))
        .await
        .unwrap();
    let e = b.call("get", json!({"key": "k"})).await.unwrap_err();
    assert_eq!(
        (e.code.as_str(), e.detail.as_str()),
        ("NOT_FOUND", "key 'k' not found")
    );
    assert_eq!(
        a.call("get", json!({"key": "k"})).await.unwrap()["value"],
        "acme's"
    );
    let mut again = connect(&pool, "acme", json!({"backend": "memory"})).await;
    assert!(
        again.call("get", json!({"key": "k"})).await.is_err(),
        "a new instance starts empty"
    );
    let bad = providers_core::testing::TestHost::builder(providers_database::Kv::default())
        .tenant("acme")
        .config(json!({"backend": "disk"}))
        .connect()
        .await;
    let e = bad.err().unwrap();
    assert!(
        e.detail.starts_with("kv config: unknown variant `disk`"),
        "{}",
        e.detail
    );
}
