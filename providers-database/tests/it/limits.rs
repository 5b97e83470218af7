//! `kv`'s limits at their edges on both backends: page bytes and per-tenant quotas.

use providers_core::ErrorCode;
use providers_core::testing::TestHost;
use providers_database::Kv;
use providers_database::testing::TestDatabase;
use serde_json::{Value, json};

use crate::support::{code, connect, rows, usage};

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
async fn a_lowered_quota_still_lets_a_tenant_shrink() {
    for db in TestDatabase::both().await {
        let pool = db.pool().await;
        let mut kv = connect(&pool, "acme", json!({})).await;
        kv.call("set", json!({"key": "a", "value": "12345678"}))
            .await
            .unwrap(); // 10 bytes
        kv.call("set", json!({"key": "b", "value": "1234"}))
            .await
            .unwrap(); // 6 bytes
        // The operator lowers both quotas below what the tenant holds (2 keys, 16 bytes).
        let mut kv = connect(&pool, "acme", json!({"max_keys": 1, "max_total_bytes": 12})).await;
        kv.call("set", json!({"key": "b", "value": "12"}))
            .await
            .unwrap(); // 4 bytes: smaller, so accepted although still over both quotas
        assert_eq!(usage(&pool, "acme").await, (2, 14), "{}", db.backend);
        // Growing is refused, naming the quota that grows: the key count does not.
        let r = kv.call("set", json!({"key": "b", "value": "1234"})).await;
        assert_eq!(
            code(r),
            (ErrorCode::Conflict, "quota exceeded: writing key 'b' would make 16 bytes, more than max_total_bytes 12 (kv config max_total_bytes)".to_owned()),
            "{}",
            db.backend
        );
        let r = kv.call("set", json!({"key": "c", "value": 1})).await;
        assert_eq!(
            code(r),
            (ErrorCode::Conflict, "quota exceeded: writing key 'c' would make 3 keys, more than max_keys 1 (kv config max_keys)".to_owned())
        );
        assert_eq!(
            kv.call("get", json!({"key": "b"})).await.unwrap()["value"],
            "12"
        );
        assert_eq!(rows(&pool, "acme").await, 2);
        assert_eq!(usage(&pool, "acme").await, (2, 14));
        kv.call("delete", json!({"key": "a"})).await.unwrap();
        assert_eq!(usage(&pool, "acme").await, (1, 4));
    }
}

/// Writers of one key each read its old size before writing; the usage row they lock first
/// makes those reads see each other, so the key is counted once. The usage row exists before
/// the race: creating it would serialise the writers by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_of_one_key_count_it_once() {
    for db in TestDatabase::both().await {
        let pool = db.pool().await;
        let kv = std::sync::Arc::new(
            TestHost::builder(Kv::default())
                .tenant("acme")
                .resource(pool.clone())
                .connect()
                .await
                .unwrap(),
        );
        kv.call_shared("set", json!({"key": "warm-up", "value": 1}))
            .await
            .unwrap();
        kv.call_shared("delete", json!({"key": "warm-up"}))
            .await
            .unwrap();
        // A few rounds: a lost count needs two writers interleaved, which one round may miss.
        for round in 0..5 {
            let key = format!("same-{round}");
            let mut writers = tokio::task::JoinSet::new();
            for i in 0..20 {
                let (kv, key) = (kv.clone(), key.clone());
                writers.spawn(async move {
                    // Every value serialises to 4 bytes: "00" to "19" in quotes.
                    kv.call_shared("set", json!({"key": key, "value": format!("{i:02}")}))
                        .await
                });
            }
            while let Some(r) = writers.join_next().await {
                r.unwrap().unwrap();
            }
            assert_eq!(usage(&pool, "acme").await, (1, 4), "{}", db.backend);
            let mut deleters = tokio::task::JoinSet::new();
            for _ in 0..20 {
                let (kv, key) = (kv.clone(), key.clone());
                deleters.spawn(async move { kv.call_shared("delete", json!({"key": key})).await });
            }
            let mut deleted = 0;
            while let Some(r) = deleters.join_next().await {
                if r.unwrap().unwrap()["deleted"] == true {
                    deleted += 1;
                }
            }
            assert_eq!(deleted, 1, "{}", db.backend);
            assert_eq!(usage(&pool, "acme").await, (0, 0), "{}", db.backend);
        }
    }
}
