//! `kv` actions, ETags, TTLs, prefixes, numbers and tenant isolation on both backends.

use providers_core::testing::TestHost;
use providers_core::{CallContext, ErrorCode};
use providers_database::Kv;
use providers_database::testing::TestDatabase;
use serde_json::{Value, json};

use crate::support::{code, connect, rows};

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
    use sqlx::Row;
    for db in TestDatabase::both().await {
        let pool = db.pool().await;
        let mut kv = connect(&pool, "acme", json!({})).await;
        // (what the client sends, what it gets back). Every digit, sign and trailing zero comes
        // back. Exponents are respelled, but not by kv: serde_json's parser, which the host uses
        // for request bodies, writes every exponent as `e` and a sign before a provider sees it.
        let cases = [
            ("18446744073709551616", "18446744073709551616"),
            (
                "3.141592653589793238462643383279",
                "3.141592653589793238462643383279",
            ),
            ("-0", "-0"),
            ("1e400", "1e+400"),
            ("0.1", "0.1"),
            ("0.10", "0.10"),
            (
                "[-0.0,1E-2,12345678901234567890123]",
                "[-0.0,1e-2,12345678901234567890123]",
            ),
        ];
        let mut keys = Vec::new();
        for (i, (text, back)) in cases.iter().enumerate() {
            let parsed: Value = serde_json::from_str(text).unwrap();
            assert_eq!(
                serde_json::to_string(&parsed).unwrap(),
                *back,
                "serde_json's parser spells {text} so; if this changes, tighten the test"
            );
            // Parsed as the host parses a request body: `json!` would go through `to_value`.
            let key = format!("n{i}");
            let payload: Value =
                serde_json::from_str(&format!(r#"{{"key":"{key}","value":{text}}}"#)).unwrap();
            kv.call("set", payload).await.unwrap();
            let got = kv.call("get", json!({"key": key})).await.unwrap();
            assert_eq!(
                serde_json::to_string(&got["value"]).unwrap(),
                *back,
                "get, {}",
                db.backend
            );
            let stored: String = sqlx::query("SELECT value FROM kv_entries WHERE key = $1")
                .bind(&key)
                .fetch_one(&pool)
                .await
                .unwrap()
                .get(0);
            assert_eq!(stored, *back, "stored text, {}", db.backend);
            keys.push(key);
        }
        // The other ways out build their items the same way; check them too.
        let listed = kv.call("list", json!({"prefix": "n"})).await.unwrap();
        let bulk = kv.call("bulk_get", json!({"keys": keys})).await.unwrap();
        for (i, (_, back)) in cases.iter().enumerate() {
            for (how, items) in [("list", &listed["items"]), ("bulk_get", &bulk["items"])] {
                let item = items
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|it| it["key"] == format!("n{i}"))
                    .unwrap();
                assert_eq!(
                    serde_json::to_string(&item["value"]).unwrap(),
                    *back,
                    "{how}, {}",
                    db.backend
                );
            }
        }
    }
}

#[tokio::test]
async fn list_by_prefix_stays_inside_the_prefix() {
    for db in TestDatabase::both().await {
        let pool = db.pool().await;
        let mut kv = connect(&pool, "acme", json!({})).await;
        // Each prefix tested below has keys just outside it on both sides: "`" < "a" < ... < "b",
        // "a/" < ... < "a0", "é" < ... < "ê", U+D7FF < ... < U+E000 (the surrogates lie
        // between), "a" U+10FFFF < ... < "b", and U+FFFF below the open-ended U+10FFFF.
        for key in [
            "a",
            "a/1",
            "a/2",
            "a0",
            "ab",
            "b",
            "é",
            "é/x",
            "ê",
            "`",
            "\u{D7FF}",
            "\u{D7FF}z",
            "\u{E000}",
            "a\u{10FFFF}",
            "a\u{10FFFF}x",
            "\u{FFFF}",
            "\u{10FFFF}",
            "\u{10FFFF}\u{10FFFF}",
        ] {
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
            ["a", "a/1", "a/2", "a0", "ab", "a\u{10FFFF}", "a\u{10FFFF}x"]
        );
        assert_eq!(
            keys(kv.call("list", list("é")).await.unwrap()),
            ["é", "é/x"]
        );
        let page = kv
            .call("list", json!({"prefix": "a", "after": "a/2"}))
            .await
            .unwrap();
        assert_eq!(keys(page), ["a0", "ab", "a\u{10FFFF}", "a\u{10FFFF}x"]);
        assert_eq!(
            keys(kv.call("list", list("\u{D7FF}")).await.unwrap()),
            ["\u{D7FF}", "\u{D7FF}z"]
        );
        assert_eq!(
            keys(kv.call("list", list("a\u{10FFFF}")).await.unwrap()),
            ["a\u{10FFFF}", "a\u{10FFFF}x"]
        );
        // No upper bound exists: the open query, still starting at the prefix.
        assert_eq!(
            keys(kv.call("list", list("\u{10FFFF}")).await.unwrap()),
            ["\u{10FFFF}", "\u{10FFFF}\u{10FFFF}"]
        );
        assert_eq!(keys(kv.call("list", list("")).await.unwrap()).len(), 18);
    }
}

#[tokio::test]
async fn if_absent_creates_once_and_takes_an_expired_key_as_absent() {
    for db in TestDatabase::both().await {
        let pool = db.pool().await;
        let mut kv = connect(&pool, "acme", json!({})).await;
        let first = kv
            .call("set", json!({"key": "k", "value": 1, "if_absent": true}))
            .await
            .unwrap();
        let (c, detail) = code(
            kv.call("set", json!({"key": "k", "value": 2, "if_absent": true}))
                .await,
        );
        assert_eq!(
            (c, detail.as_str()),
            (ErrorCode::Conflict, "key 'k' already exists (if_absent)"),
            "{}",
            db.backend
        );
        let got = kv.call("get", json!({"key": "k"})).await.unwrap();
        assert_eq!(got["value"], 1, "the live value is untouched");
        assert_eq!(got["etag"], first["etag"]);
        let (c, detail) = code(
            kv.call(
                "set",
                json!({"key": "k", "value": 2, "if_absent": true, "etag": first["etag"]}),
            )
            .await,
        );
        assert_eq!(
            (c, detail.as_str()),
            (
                ErrorCode::ValidationError,
                "payload: `etag` and `if_absent` exclude each other"
            )
        );
        // An expired key is absent: if_absent writes it.
        kv.call("set", json!({"key": "old", "value": 1, "ttl_seconds": 1}))
            .await
            .unwrap();
        sqlx::query("UPDATE kv_entries SET expires_at = expires_at - 2000 WHERE key = 'old'")
            .execute(&pool)
            .await
            .unwrap();
        kv.call("set", json!({"key": "old", "value": 9, "if_absent": true}))
            .await
            .unwrap();
        assert_eq!(
            kv.call("get", json!({"key": "old"})).await.unwrap()["value"],
            9,
            "{}",
            db.backend
        );
        assert_eq!(rows(&pool, "acme").await, 2, "no row was added twice");
        kv.disconnect().await.unwrap();
    }
}
