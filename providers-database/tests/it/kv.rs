//! `kv` actions, ETags, TTLs, limits and tenant isolation on both backends.

use providers_core::testing::TestHost;
use providers_core::{CallContext, ErrorCode, ProviderError};
use providers_database::Kv;
use providers_database::testing::TestDatabase;
use serde_json::{Value, json};
use sqlx::AnyPool;

async fn connect(pool: &AnyPool, tenant: &str, config: Value) -> TestHost {
    TestHost::builder(Kv::default())
        .tenant(tenant)
        .config(config)
        .resource(pool.clone())
        .connect()
        .await
        .unwrap()
}

async fn rows(pool: &AnyPool, tenant: &str) -> i64 {
    use sqlx::Row;
    sqlx::query("SELECT COUNT(*) FROM kv_entries WHERE tenant = $1")
        .bind(tenant)
        .fetch_one(pool)
        .await
        .unwrap()
        .get::<i64, _>(0)
}

fn code(r: Result<Value, ProviderError>) -> (ErrorCode, String) {
    let e = r.unwrap_err();
    (e.code, e.detail)
}

#[tokio::test]
async fn set_get_etag_conflict_and_delete() {
    for db in TestDatabase::both().await {
        let pool = db.pool().await;
        let mut kv = connect(&pool, "acme", json!({})).await;
        let first = kv
            .call("set", json!({"key": "a", "value": {"n": 1}}))
            .await
            .unwrap();
        let etag1 = first["etag"].as_str().unwrap().to_owned();
        let got = kv.call("get", json!({"key": "a"})).await.unwrap();
        assert_eq!(
            got,
            json!({"key": "a", "value": {"n": 1}, "etag": etag1}),
            "{}",
            db.backend
        );

        let second = kv
            .call("set", json!({"key": "a", "value": {"n": 2}, "etag": etag1}))
            .await
            .unwrap();
        let etag2 = second["etag"].as_str().unwrap().to_owned();
        assert_ne!(etag1, etag2);

        // The stale etag loses and the stored value is untouched.
        let (c, detail) = code(
            kv.call("set", json!({"key": "a", "value": {"n": 3}, "etag": etag1}))
                .await,
        );
        assert_eq!(c, ErrorCode::Conflict, "{}", db.backend);
        assert_eq!(
            detail,
            format!("etag '{etag1}' does not match the current version of key 'a'")
        );
        assert_eq!(
            kv.call("get", json!({"key": "a"})).await.unwrap()["value"],
            json!({"n": 2})
        );

        // An etag for a key that does not exist is a conflict too, and creates nothing.
        let (c, _) = code(
            kv.call("set", json!({"key": "ghost", "value": 1, "etag": "12"}))
                .await,
        );
        assert_eq!(c, ErrorCode::Conflict);
        let (c, _) = code(
            kv.call(
                "set",
                json!({"key": "ghost", "value": 1, "etag": "not-a-number"}),
            )
            .await,
        );
        assert_eq!(c, ErrorCode::Conflict);
        assert_eq!(rows(&pool, "acme").await, 1);

        let (c, _) = code(kv.call("delete", json!({"key": "a", "etag": etag1})).await);
        assert_eq!(c, ErrorCode::Conflict);
        assert_eq!(
            rows(&pool, "acme").await,
            1,
            "a stale delete removes nothing"
        );
        assert_eq!(
            kv.call("delete", json!({"key": "a", "etag": etag2}))
                .await
                .unwrap(),
            json!({"key": "a", "deleted": true})
        );
        assert_eq!(
            kv.call("delete", json!({"key": "a"})).await.unwrap(),
            json!({"key": "a", "deleted": false})
        );
        let (c, detail) = code(kv.call("get", json!({"key": "a"})).await);
        assert_eq!(
            (c, detail.as_str()),
            (ErrorCode::NotFound, "key 'a' not found")
        );

        // Re-created, it gets a fresh etag: the old one cannot win by coincidence.
        let again = kv
            .call("set", json!({"key": "a", "value": 0}))
            .await
            .unwrap();
        assert_ne!(again["etag"], json!(etag1));
        assert_ne!(again["etag"], json!(etag2));
        kv.disconnect().await.unwrap();
    }
}

#[tokio::test]
async fn tenants_never_see_each_other() {
    for db in TestDatabase::both().await {
        let pool = db.pool().await;
        let mut acme = connect(&pool, "acme", json!({})).await;
        let mut globex = connect(&pool, "globex", json!({})).await;
        acme.call("set", json!({"key": "shared-name", "value": "acme's"}))
            .await
            .unwrap();
        acme.call("set", json!({"key": "only-acme", "value": 1}))
            .await
            .unwrap();
        globex
            .call("set", json!({"key": "shared-name", "value": "globex's"}))
            .await
            .unwrap();

        assert_eq!(
            acme.call("get", json!({"key": "shared-name"}))
                .await
                .unwrap()["value"],
            "acme's"
        );
        assert_eq!(
            globex
                .call("get", json!({"key": "shared-name"}))
                .await
                .unwrap()["value"],
            "globex's"
        );
        let (c, _) = code(globex.call("get", json!({"key": "only-acme"})).await);
        assert_eq!(c, ErrorCode::NotFound, "{}", db.backend);
        let listed = globex.call("list", json!({})).await.unwrap();
        assert_eq!(listed["items"].as_array().unwrap().len(), 1);
        assert_eq!(listed["items"][0]["value"], "globex's");
        let bulk = globex
            .call("bulk_get", json!({"keys": ["only-acme", "shared-name"]}))
            .await
            .unwrap();
        assert_eq!(
            bulk["items"][0],
            json!({"key": "only-acme", "found": false})
        );
        assert_eq!(bulk["items"][1]["value"], "globex's");
        // Deleting globex's key leaves acme's alone.
        globex
            .call("delete", json!({"key": "shared-name"}))
            .await
            .unwrap();
        assert_eq!(rows(&pool, "acme").await, 2);
        assert_eq!(rows(&pool, "globex").await, 0);

        // An instance refuses a context for another tenant, even if the host erred.
        let foreign = CallContext::new("globex", "r1");
        let (c, detail) = code(
            acme.call_as(&foreign, "get", json!({"key": "only-acme"}))
                .await,
        );
        assert_eq!(c, ErrorCode::Forbidden);
        assert_eq!(
            detail,
            "this kv instance serves tenant 'acme', not 'globex'"
        );
        acme.disconnect().await.unwrap();
        globex.disconnect().await.unwrap();
    }
}

#[tokio::test]
async fn list_pages_by_prefix_in_key_order() {
    for db in TestDatabase::both().await {
        let pool = db.pool().await;
        let mut kv = connect(&pool, "acme", json!({})).await;
        for k in [
            "order/3", "order/1", "order/2", "orders", "other", "Order/9",
        ] {
            kv.call("set", json!({"key": k, "value": k})).await.unwrap();
        }
        let page = kv
            .call("list", json!({"prefix": "order/", "limit": 2}))
            .await
            .unwrap();
        let keys = |p: &Value| {
            p["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["key"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(keys(&page), ["order/1", "order/2"], "{}", db.backend);
        assert_eq!(page["next"], "order/2");
        let page = kv
            .call(
                "list",
                json!({"prefix": "order/", "limit": 2, "after": "order/2"}),
            )
            .await
            .unwrap();
        assert_eq!(keys(&page), ["order/3"]);
        assert_eq!(page["next"], Value::Null);
        // Prefixes are case-sensitive on both backends, and % or _ are not wildcards.
        kv.call("set", json!({"key": "a%b", "value": 1}))
            .await
            .unwrap();
        kv.call("set", json!({"key": "axb", "value": 1}))
            .await
            .unwrap();
        assert_eq!(
            keys(&kv.call("list", json!({"prefix": "a%"})).await.unwrap()),
            ["a%b"]
        );
        assert_eq!(
            keys(&kv.call("list", json!({"prefix": "Order"})).await.unwrap()),
            ["Order/9"]
        );
        kv.disconnect().await.unwrap();
    }
}

#[tokio::test]
async fn ttl_hides_expired_values_and_limits_hold_at_the_edge() {
    for db in TestDatabase::both().await {
        let pool = db.pool().await;
        let mut kv = connect(&pool, "acme", json!({"max_value_bytes": 10})).await;
        kv.call("set", json!({"key": "short", "value": 1, "ttl_seconds": 1}))
            .await
            .unwrap();
        kv.call(
            "set",
            json!({"key": "long", "value": 2, "ttl_seconds": 3600}),
        )
        .await
        .unwrap();
        assert_eq!(
            kv.call("get", json!({"key": "short"})).await.unwrap()["value"],
            1
        );
        // Expire it by moving its expiry into the past rather than by sleeping.
        sqlx::query("UPDATE kv_entries SET expires_at = expires_at - 2000 WHERE key = 'short'")
            .execute(&pool)
            .await
            .unwrap();
        let (c, _) = code(kv.call("get", json!({"key": "short"})).await);
        assert_eq!(c, ErrorCode::NotFound, "{}", db.backend);
        let listed = kv.call("list", json!({})).await.unwrap();
        assert_eq!(listed["items"].as_array().unwrap().len(), 1);
        // An expired key takes a plain set as a fresh key.
        kv.call("set", json!({"key": "short", "value": 3}))
            .await
            .unwrap();
        assert_eq!(
            kv.call("get", json!({"key": "short"})).await.unwrap()["value"],
            3
        );

        // "0123456789" serialises to 12 bytes with its quotes; "01234567" to exactly 10.
        kv.call("set", json!({"key": "edge", "value": "01234567"}))
            .await
            .unwrap();
        let (c, detail) = code(
            kv.call("set", json!({"key": "edge", "value": "012345678"}))
                .await,
        );
        assert_eq!(c, ErrorCode::ValidationError);
        assert_eq!(
            detail,
            "payload/value: 11 bytes exceeds the limit of 10 bytes (config max_value_bytes)"
        );
        assert_eq!(
            kv.call("get", json!({"key": "edge"})).await.unwrap()["value"],
            "01234567"
        );
        kv.disconnect().await.unwrap();
    }
}

#[tokio::test]
async fn connect_refuses_bad_config_and_missing_storage() {
    let db = TestDatabase::sqlite();
    let pool = db.pool().await;
    let err = TestHost::builder(Kv::default())
        .config(json!({"max_value_bytes": "big"}))
        .resource(pool)
        .connect()
        .await
        .err()
        .unwrap();
    assert_eq!(err.code, ErrorCode::ValidationError);
    assert!(err.detail.starts_with("kv config: "), "{}", err.detail);
    let err = TestHost::builder(Kv::default())
        .connect()
        .await
        .err()
        .unwrap();
    assert_eq!(err.code, ErrorCode::ProviderUnavailable);
    assert_eq!(
        err.detail,
        "kv needs the host's system database, which was not provided"
    );
}

#[tokio::test]
async fn nul_in_keys_is_refused_alike_on_both_backends() {
    for db in TestDatabase::both().await {
        let pool = db.pool().await;
        let mut kv = connect(&pool, "acme", json!({})).await;
        let (c, detail) = code(kv.call("set", json!({"key": "a\u{0}b", "value": 1})).await);
        assert_eq!(
            (c, detail.as_str()),
            (
                ErrorCode::ValidationError,
                "payload/key: must not contain NUL characters"
            ),
            "{}",
            db.backend
        );
        let (c, detail) = code(kv.call("bulk_get", json!({"keys": ["ok", "x\u{0}"]})).await);
        assert_eq!(
            (c, detail.as_str()),
            (
                ErrorCode::ValidationError,
                "payload/keys/1: must not contain NUL characters"
            )
        );
        assert_eq!(rows(&pool, "acme").await, 0);
        // Values may hold NUL: they are stored as JSON text, where it is escaped.
        kv.call("set", json!({"key": "v", "value": "a\u{0}b"}))
            .await
            .unwrap();
        assert_eq!(
            kv.call("get", json!({"key": "v"})).await.unwrap()["value"],
            "a\u{0}b",
            "{}",
            db.backend
        );
        kv.disconnect().await.unwrap();
    }
}

#[tokio::test]
async fn postgres_orders_keys_byte_wise_whatever_the_locale() {
    use sqlx::Row;
    let db = TestDatabase::postgres().await;
    let pool = db.pool().await;
    let mut kv = connect(&pool, "acme", json!({})).await;
    let collation: Option<String> = sqlx::query(
        "SELECT collation_name::text FROM information_schema.columns WHERE table_name = 'kv_entries' AND column_name = 'key'",
    )
    .fetch_one(&pool)
    .await
    .unwrap()
    .get(0);
    assert_eq!(collation.as_deref(), Some("C"));
    for k in ["b", "B", "a", "_x"] {
        kv.call("set", json!({"key": k, "value": 1})).await.unwrap();
    }
    let listed = kv.call("list", json!({})).await.unwrap();
    let keys: Vec<&str> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["B", "_x", "a", "b"], "byte order, as on SQLite");
    kv.disconnect().await.unwrap();
}

#[tokio::test]
async fn etags_are_opaque_strings_compared_exactly() {
    for db in TestDatabase::both().await {
        let pool = db.pool().await;
        let mut kv = connect(&pool, "acme", json!({})).await;
        let set = kv
            .call("set", json!({"key": "a", "value": 1}))
            .await
            .unwrap();
        let etag = set["etag"].as_str().unwrap().to_owned();
        for near in [format!("0{etag}"), format!("+{etag}")] {
            let r = kv
                .call("set", json!({"key": "a", "value": 2, "etag": near}))
                .await;
            assert_eq!(
                code(r),
                (
                    ErrorCode::Conflict,
                    format!("etag '{near}' does not match the current version of key 'a'")
                ),
                "{}",
                db.backend
            );
            let r = kv.call("delete", json!({"key": "a", "etag": near})).await;
            assert_eq!(code(r).0, ErrorCode::Conflict);
        }
        let got = kv.call("get", json!({"key": "a"})).await.unwrap();
        assert_eq!(
            (got["value"].clone(), got["etag"].as_str()),
            (json!(1), Some(etag.as_str())),
            "nothing changed"
        );
    }
}

#[tokio::test]
async fn numbers_come_back_exactly_as_written() {
    for db in TestDatabase::both().await {
        let pool = db.pool().await;
        let mut kv = connect(&pool, "acme", json!({})).await;
        // Every digit and sign is kept; only exponent notation is spelled one way (e, signed).
        for (i, (text, expected)) in [
            ("18446744073709551616", "18446744073709551616"),
            (
                "3.141592653589793238462643383279",
                "3.141592653589793238462643383279",
            ),
            ("-0", "-0"),
            ("0.10", "0.10"),
            ("1e400", "1e+400"),
            (
                "[-0.0,1E-2,12345678901234567890123]",
                "[-0.0,1e-2,12345678901234567890123]",
            ),
        ]
        .iter()
        .enumerate()
        {
            // Parsed as the host parses a request body: `json!` would re-serialise the number.
            let key = format!("n{i}");
            let payload: Value =
                serde_json::from_str(&format!(r#"{{"key":"{key}","value":{text}}}"#)).unwrap();
            kv.call("set", payload).await.unwrap();
            let got = kv.call("get", json!({"key": key})).await.unwrap();
            assert_eq!(
                serde_json::to_string(&got["value"]).unwrap(),
                *expected,
                "{}",
                db.backend
            );
        }
    }
}

#[tokio::test]
async fn list_by_prefix_stays_inside_the_prefix() {
    for db in TestDatabase::both().await {
        let pool = db.pool().await;
        let mut kv = connect(&pool, "acme", json!({})).await;
        for key in ["a", "a/1", "a/2", "a0", "ab", "b", "é", "é/x", "ê", "`"] {
            kv.call("set", json!({"key": key, "value": key}))
                .await
                .unwrap();
        }
        let keys = |r: Value| -> Vec<String> {
            r["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["key"].as_str().unwrap().to_owned())
                .collect()
        };
        let list = |prefix: &str| json!({"prefix": prefix});
        assert_eq!(
            keys(kv.call("list", list("a/")).await.unwrap()),
            ["a/1", "a/2"],
            "{}",
            db.backend
        );
        assert_eq!(
            keys(kv.call("list", list("a")).await.unwrap()),
            ["a", "a/1", "a/2", "a0", "ab"]
        );
        assert_eq!(
            keys(kv.call("list", list("é")).await.unwrap()),
            ["é", "é/x"]
        );
        let page = kv
            .call("list", json!({"prefix": "a", "after": "a/2"}))
            .await
            .unwrap();
        assert_eq!(keys(page), ["a0", "ab"]);
    }
}

#[tokio::test]
async fn pages_are_bounded_by_bytes_as_well_as_count() {
    for db in TestDatabase::both().await {
        let pool = db.pool().await;
        // Each value serialises to 602 bytes ("x" * 600 in quotes); with its 2-byte key, 604.
        let mut kv = connect(&pool, "acme", json!({"max_page_bytes": 1208})).await;
        for i in 0..5 {
            kv.call(
                "set",
                json!({"key": format!("k{i}"), "value": "x".repeat(600)}),
            )
            .await
            .unwrap();
        }
        let page = kv.call("list", json!({})).await.unwrap();
        assert_eq!(
            page["items"].as_array().unwrap().len(),
            2,
            "exactly two fit: {}",
            db.backend
        );
        assert_eq!(page["next"], "k1");
        let page = kv.call("list", json!({"after": "k3"})).await.unwrap();
        assert_eq!(page["items"].as_array().unwrap().len(), 1);
        assert_eq!(page["next"], Value::Null);

        let bulk = kv
            .call("bulk_get", json!({"keys": ["k0", "nope", "k1", "k2"]}))
            .await
            .unwrap();
        let items = bulk["items"].as_array().unwrap();
        assert_eq!(items[0]["found"], true);
        assert_eq!(items[0]["value"].as_str().unwrap().len(), 600);
        assert_eq!(items[1], json!({"key": "nope", "found": false}));
        assert_eq!(items[2]["value"].as_str().unwrap().len(), 600);
        assert_eq!(
            items[3],
            json!({"key": "k2", "found": true, "omitted": true})
        );

        // A single value larger than the budget still comes back, alone.
        let mut small = connect(
            &pool,
            "acme",
            json!({"max_page_bytes": 1024, "max_value_bytes": 4096}),
        )
        .await;
        small
            .call("set", json!({"key": "big", "value": "y".repeat(2000)}))
            .await
            .unwrap();
        let page = small.call("list", json!({"prefix": "big"})).await.unwrap();
        assert_eq!(page["items"].as_array().unwrap().len(), 1);
    }
}

async fn usage(pool: &AnyPool, tenant: &str) -> (i64, i64) {
    use sqlx::Row;
    let row = sqlx::query("SELECT keys, bytes FROM kv_usage WHERE tenant = $1")
        .bind(tenant)
        .fetch_one(pool)
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn quotas_hold_at_the_edge_and_lose_nothing() {
    for db in TestDatabase::both().await {
        let pool = db.pool().await;
        let mut kv = connect(&pool, "acme", json!({"max_keys": 2, "max_total_bytes": 20})).await;
        kv.call("set", json!({"key": "a", "value": "12345678"}))
            .await
            .unwrap(); // 10 bytes
        kv.call("set", json!({"key": "b", "value": "1234"}))
            .await
            .unwrap(); // 6 bytes
        assert_eq!(usage(&pool, "acme").await, (2, 16), "{}", db.backend);
        let r = kv.call("set", json!({"key": "c", "value": 1})).await;
        assert_eq!(
            code(r),
            (ErrorCode::Conflict, "quota exceeded: writing key 'c' would make 3 keys, more than max_keys 2 (kv config max_keys)".to_owned())
        );
        // Overwriting changes bytes, not keys: up to exactly 20 bytes, not one more.
        kv.call("set", json!({"key": "b", "value": "12345678"}))
            .await
            .unwrap();
        assert_eq!(usage(&pool, "acme").await, (2, 20));
        let r = kv
            .call("set", json!({"key": "b", "value": "123456789"}))
            .await;
        assert_eq!(
            code(r),
            (ErrorCode::Conflict, "quota exceeded: writing key 'b' would make 21 bytes, more than max_total_bytes 20 (kv config max_total_bytes)".to_owned())
        );
        let got = kv.call("get", json!({"key": "b"})).await.unwrap();
        assert_eq!(
            got["value"], "12345678",
            "the refused write changed nothing"
        );
        assert_eq!(rows(&pool, "acme").await, 2);
        // Deleting makes room.
        kv.call("delete", json!({"key": "a"})).await.unwrap();
        assert_eq!(usage(&pool, "acme").await, (1, 10));
        kv.call("set", json!({"key": "c", "value": 1}))
            .await
            .unwrap();
        // Another tenant has its own quota.
        let mut other = connect(&pool, "globex", json!({"max_keys": 1})).await;
        other
            .call("set", json!({"key": "a", "value": 1}))
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_never_overshoot_the_quota() {
    for db in TestDatabase::both().await {
        let pool = db.pool().await;
        let kv = std::sync::Arc::new(
            TestHost::builder(Kv::default())
                .tenant("acme")
                .config(json!({"max_keys": 10}))
                .resource(pool.clone())
                .connect()
                .await
                .unwrap(),
        );
        let mut writers = tokio::task::JoinSet::new();
        for i in 0..20 {
            let kv = kv.clone();
            writers.spawn(async move {
                kv.call_shared("set", json!({"key": format!("k{i:02}"), "value": i}))
                    .await
            });
        }
        let mut ok = 0;
        while let Some(r) = writers.join_next().await {
            match r.unwrap() {
                Ok(_) => ok += 1,
                Err(e) => assert_eq!(e.code, ErrorCode::Conflict, "{}: {}", db.backend, e.detail),
            }
        }
        assert_eq!(ok, 10, "{}", db.backend);
        assert_eq!(rows(&pool, "acme").await, 10);
        assert_eq!(usage(&pool, "acme").await.0, 10);
    }
}

#[tokio::test]
async fn expired_rows_leave_the_quota_when_purged() {
    for db in TestDatabase::both().await {
        let pool = db.pool().await;
        let mut kv = connect(&pool, "acme", json!({"max_keys": 1})).await;
        kv.call("set", json!({"key": "a", "value": 1, "ttl_seconds": 1}))
            .await
            .unwrap();
        // Make it expired without waiting: move its expiry into the past.
        sqlx::query("UPDATE kv_entries SET expires_at = 1 WHERE tenant = 'acme'")
            .execute(&pool)
            .await
            .unwrap();
        kv.call("set", json!({"key": "b", "value": 2}))
            .await
            .unwrap();
        assert_eq!(usage(&pool, "acme").await.0, 1, "{}", db.backend);
        assert_eq!(rows(&pool, "acme").await, 1);
        // A new instance clears what expired meanwhile, and its usage with it.
        sqlx::query("UPDATE kv_entries SET expires_at = 1 WHERE tenant = 'acme'")
            .execute(&pool)
            .await
            .unwrap();
        connect(&pool, "acme", json!({"max_keys": 1})).await;
        assert_eq!(rows(&pool, "acme").await, 0);
        assert_eq!(usage(&pool, "acme").await, (0, 0));
    }
}

#[tokio::test]
async fn status_hides_storage_errors() {
    let db = TestDatabase::sqlite();
    let pool = db.pool().await;
    let kv = connect(&pool, "acme", json!({})).await;
    pool.close().await;
    let status = kv.status().await;
    assert_eq!(status.state, providers_core::State::Failed);
    assert_eq!(
        status.detail,
        "kv storage is unreachable; the host log has the cause"
    );
}
