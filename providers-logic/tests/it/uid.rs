//! `uid`: the format and its check characters, gap-free sequences under concurrency,
//! lifecycle order, genealogy and tenant isolation, on SQLite and PostgreSQL.

use std::collections::BTreeSet;
use std::sync::Arc;

use providers_core::ErrorCode;
use providers_core::testing::TestHost;
use providers_database::matrix;
use providers_database::testing::TestDatabase;
use providers_logic::Uid;
use providers_logic::uid::code;
use rand::Rng;
use serde_json::{Value, json};
use sqlx::AnyPool;

fn config(code: &str) -> Value {
    json!({"tenant_code": code, "plants": ["KOL", "PUN"]})
}

async fn connect(pool: &AnyPool, tenant: &str, config: Value) -> TestHost {
    TestHost::builder(Uid::default())
        .tenant(tenant)
        .config(config)
        .resource(pool.clone())
        .connect()
        .await
        .unwrap()
}

fn issue(plant: &str, kind: &str, entity: &str) -> Value {
    json!({"plant": plant, "type": kind, "entity_type": "material", "entity_id": entity})
}

fn error(r: Result<Value, providers_core::ProviderError>) -> (ErrorCode, String) {
    let e = r.unwrap_err();
    (e.code, e.detail)
}

#[test]
fn the_check_catches_every_single_substitution_and_adjacent_transposition() {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut rng = rand::rng();
    let pick = |rng: &mut rand::rngs::ThreadRng, n: usize| -> String {
        (0..n)
            .map(|_| ALPHABET[rng.random_range(0..36)] as char)
            .collect()
    };
    let (mut substitutions, mut transpositions) = (0u64, 0u64);
    for _ in 0..300 {
        let kind_len = rng.random_range(2..=3);
        let uid = code::format(
            &pick(&mut rng, 4),
            &pick(&mut rng, 3),
            &pick(&mut rng, kind_len),
            rng.random_range(1..=code::MAX_SEQUENCE),
        );
        assert!(code::parse(&uid).is_ok(), "{uid}");
        let chars: Vec<char> = uid.chars().collect();
        for i in 0..chars.len() {
            if chars[i] == '-' {
                continue;
            }
            for &other in ALPHABET {
                let other = other as char;
                if other == chars[i] {
                    continue;
                }
                let mut changed = chars.clone();
                changed[i] = other;
                let changed: String = changed.into_iter().collect();
                assert!(code::parse(&changed).is_err(), "{uid} → {changed} passed");
                substitutions += 1;
            }
        }
        // Adjacent in the checked text: the neighbours across a dash are adjacent too.
        let plain: Vec<usize> = (0..chars.len()).filter(|&i| chars[i] != '-').collect();
        for w in plain.windows(2) {
            let (a, b) = (w[0], w[1]);
            if chars[a] == chars[b] {
                continue;
            }
            let mut swapped = chars.clone();
            swapped.swap(a, b);
            let swapped: String = swapped.into_iter().collect();
            let r = code::parse(&swapped);
            assert!(r.is_err(), "{uid} → {swapped} passed");
            transpositions += 1;
        }
    }
    assert!(
        substitutions > 100_000 && transpositions > 3000,
        "{substitutions} {transpositions}"
    );
}

#[test]
fn validation_names_the_wrong_part() {
    let uid = code::format("SAIF", "KOL", "RM", 1);
    assert!(uid.starts_with("UID-SAIF-KOL-RM-000001-"));
    let parts = |text: &str| -> Vec<&'static str> {
        code::parse(text)
            .unwrap_err()
            .into_iter()
            .map(|p| p.part)
            .collect()
    };
    assert_eq!(parts("UID-SAIF-KOL-RM-000001"), ["format"]);
    assert_eq!(parts(&uid.replacen("UID", "XID", 1)), ["prefix"]);
    assert_eq!(parts(&uid.replacen("SAIF", "SAI", 1)), ["tenant"]);
    assert_eq!(parts(&uid.replacen("KOL", "kol", 1)), ["plant"]);
    assert_eq!(parts(&uid.replacen("-RM-", "-R-", 1)), ["type"]);
    assert_eq!(parts(&uid.replacen("000001", "000000", 1)), ["sequence"]);
    assert_eq!(parts(&uid.replacen("000001", "000002", 1)), ["checksum"]);
}

async fn issues_records_traces_and_looks_up(db: TestDatabase) {
    let pool = db.pool().await;
    let mut acme = connect(&pool, "acme", config("SAIF")).await;
    let lot = acme
        .call("issue", issue("KOL", "RM", "steel-42"))
        .await
        .unwrap();
    let lot_uid = lot["uid"].as_str().unwrap().to_owned();
    assert_eq!(lot["sequence"], 1);
    assert!(lot_uid.starts_with("UID-SAIF-KOL-RM-000001-"), "{lot_uid}");
    let v = acme
        .call("validate", json!({"uid": lot_uid, "check_known": true}))
        .await
        .unwrap();
    assert_eq!(
        v,
        json!({"uid": lot_uid, "valid": true, "known": true, "problems": []})
    );
    // A well-formed identifier never issued: valid, not known.
    let never = code::format("SAIF", "KOL", "RM", 999);
    let v = acme
        .call("validate", json!({"uid": lot_uid}))
        .await
        .unwrap();
    assert_eq!(v["known"], Value::Null, "no I/O unless asked");
    assert_eq!(v["valid"], true);
    let v = acme
        .call("validate", json!({"uid": never, "check_known": true}))
        .await
        .unwrap();
    assert_eq!(
        (v["valid"].clone(), v["known"].clone()),
        (json!(true), json!(false))
    );
    // Configured plants and types only.
    let v = acme
        .call(
            "validate",
            json!({"uid": code::format("SAIF", "XYZ", "RM", 1)}),
        )
        .await
        .unwrap();
    assert_eq!(
        v["problems"],
        json!([{"part": "plant", "reason": "unknown plant 'XYZ'"}])
    );
    let (c, detail) = error(acme.call("issue", issue("XYZ", "RM", "x")).await);
    assert_eq!(
        (c, detail.as_str()),
        (
            ErrorCode::ValidationError,
            "plant 'XYZ' is not configured (plants: KOL, PUN)"
        )
    );

    // Two sub-assemblies made from the lot, a finished good from one of them.
    let mut child = issue("KOL", "SA", "frame-1");
    child["parent"] = json!(lot_uid);
    let sa1 = acme.call("issue", child.clone()).await.unwrap()["uid"]
        .as_str()
        .unwrap()
        .to_owned();
    child["entity_id"] = json!("frame-2");
    let sa2 = acme.call("issue", child).await.unwrap()["uid"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut fg = issue("KOL", "FG", "bike-1");
    fg["parent"] = json!(sa1);
    let fg = acme.call("issue", fg).await.unwrap()["uid"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        sa2.contains("-SA-000002-") && fg.contains("-FG-000001-"),
        "{sa2} {fg}"
    );

    // A parent that does not exist consumes no sequence number.
    let mut orphan = issue("KOL", "FG", "bike-2");
    orphan["parent"] = json!(code::format("SAIF", "KOL", "RM", 77));
    let (c, _) = error(acme.call("issue", orphan).await);
    assert_eq!(c, ErrorCode::NotFound);
    let next = acme
        .call("issue", issue("KOL", "FG", "bike-3"))
        .await
        .unwrap();
    assert_eq!(next["sequence"], 2, "no gap after the refused issue");

    // The lifecycle goes forward in the configured order, skipping allowed.
    for stage in ["PROCUREMENT", "GRN", "QC"] {
        let r = acme.call("record", json!({"uid": lot_uid, "stage": stage, "reference": format!("doc-{stage}"), "location": "KOL-W1"})).await.unwrap();
        assert_eq!(r["stage"], stage);
    }
    let (c, detail) = error(
        acme.call("record", json!({"uid": lot_uid, "stage": "GRN"}))
            .await,
    );
    assert_eq!(c, ErrorCode::Conflict);
    assert!(detail.contains("is at stage QC; GRN cannot follow it (allowed next: ISSUE_TO_PRODUCTION, PRODUCTION, DISPATCH)"), "{detail}");
    let (c, _) = error(
        acme.call("record", json!({"uid": lot_uid, "stage": "QC"}))
            .await,
    );
    assert_eq!(c, ErrorCode::Conflict, "a stage once");
    let (c, detail) = error(
        acme.call("record", json!({"uid": lot_uid, "stage": "PAINT"}))
            .await,
    );
    assert_eq!(c, ErrorCode::ValidationError);
    assert!(detail.starts_with("unknown stage 'PAINT'"), "{detail}");
    acme.call("record", json!({"uid": lot_uid, "stage": "DISPATCH"}))
        .await
        .unwrap();
    let (c, detail) = error(
        acme.call("record", json!({"uid": lot_uid, "stage": "DISPATCH"}))
            .await,
    );
    assert_eq!(c, ErrorCode::Conflict);
    assert!(detail.contains("none, it is at the last stage"), "{detail}");

    // Trace: the lot's lifecycle and its descendants; the finished good's ancestors.
    let t = acme.call("trace", json!({"uid": lot_uid})).await.unwrap();
    let stages: Vec<&str> = t["lifecycle"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["stage"].as_str().unwrap())
        .collect();
    assert_eq!(stages, ["PROCUREMENT", "GRN", "QC", "DISPATCH"]);
    assert_eq!(t["lifecycle"][1]["reference"], "doc-GRN");
    let down: Vec<(&str, u64)> = t["descendants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["uid"].as_str().unwrap(), d["level"].as_u64().unwrap()))
        .collect();
    let mut expected = vec![(sa1.as_str(), 1), (sa2.as_str(), 1)];
    expected.sort();
    expected.push((fg.as_str(), 2));
    assert_eq!(down, expected);
    assert_eq!(t["ancestors"], json!([]));
    let t = acme.call("trace", json!({"uid": fg})).await.unwrap();
    let up: Vec<&str> = t["ancestors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["uid"].as_str().unwrap())
        .collect();
    assert_eq!(up, [sa1.as_str(), lot_uid.as_str()]);
    // Bounded depth says it was cut.
    let t = acme
        .call("trace", json!({"uid": lot_uid, "depth": 1}))
        .await
        .unwrap();
    assert_eq!(t["descendants"].as_array().unwrap().len(), 2);
    assert_eq!(t["truncated"], true);

    let l = acme
        .call(
            "lookup",
            json!({"entity_type": "material", "entity_id": "frame-2"}),
        )
        .await
        .unwrap();
    assert_eq!(l["uids"].as_array().unwrap().len(), 1);
    assert_eq!(l["uids"][0]["uid"], sa2.as_str());
    assert_eq!(l["uids"][0]["parent"], lot_uid.as_str());
}

async fn another_tenant_cannot_see_or_touch_an_identifier(db: TestDatabase) {
    let pool = db.pool().await;
    let mut acme = connect(&pool, "acme", config("SAIF")).await;
    // Same code on purpose: isolation must not rest on the code.
    let mut globex = connect(&pool, "globex", config("SAIF")).await;
    let uid = acme.call("issue", issue("KOL", "RM", "x")).await.unwrap()["uid"]
        .as_str()
        .unwrap()
        .to_owned();
    let v = globex
        .call("validate", json!({"uid": uid, "check_known": true}))
        .await
        .unwrap();
    assert_eq!(v["known"], false, "{v}");
    let (c, _) = error(globex.call("trace", json!({"uid": uid})).await);
    assert_eq!(c, ErrorCode::NotFound);
    let (c, _) = error(
        globex
            .call("record", json!({"uid": uid, "stage": "GRN"}))
            .await,
    );
    assert_eq!(c, ErrorCode::NotFound);
    let mut child = issue("KOL", "SA", "y");
    child["parent"] = json!(uid);
    let (c, _) = error(globex.call("issue", child).await);
    assert_eq!(c, ErrorCode::NotFound);
    let l = globex
        .call(
            "lookup",
            json!({"entity_type": "material", "entity_id": "x"}),
        )
        .await
        .unwrap();
    assert_eq!(l["uids"], json!([]));
    // Globex's own sequence starts at 1: the same identifier text, a different tenant's row.
    let own = globex.call("issue", issue("KOL", "RM", "x")).await.unwrap();
    assert_eq!(own["uid"], uid.as_str());
    let t = acme.call("trace", json!({"uid": uid})).await.unwrap();
    assert_eq!(t["item"]["entity_id"], "x");
    let other = connect(&pool, "initech", config("INIT")).await;
    let v = other
        .call_shared("validate", json!({"uid": uid}))
        .await
        .unwrap();
    assert_eq!(v["problems"][0]["part"], "tenant");
    assert_eq!(v["valid"], false);
}

async fn concurrent_issues_leave_no_gap_and_no_duplicate(db: TestDatabase) {
    // Two pools on one database stand for two hosts sharing it.
    let pools = [db.pool().await, db.pool().await];
    let mut hosts = Vec::new();
    for pool in &pools {
        hosts.push(Arc::new(connect(pool, "acme", config("SAIF")).await));
    }
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let host = hosts[i % 2].clone();
            tokio::spawn(async move {
                host.call_shared("issue", issue("PUN", "WIP", &format!("e{i}")))
                    .await
            })
        })
        .collect();
    let mut sequences = BTreeSet::new();
    let mut uids = BTreeSet::new();
    for t in tasks {
        let r = t.await.unwrap().unwrap();
        sequences.insert(r["sequence"].as_i64().unwrap());
        uids.insert(r["uid"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        sequences,
        (1..=200).collect::<BTreeSet<i64>>(),
        "no gaps, no duplicates"
    );
    assert_eq!(uids.len(), 200);
    for uid in &uids {
        assert!(code::parse(uid).is_ok(), "{uid}");
    }
}

matrix!(
    issues_records_traces_and_looks_up,
    another_tenant_cannot_see_or_touch_an_identifier,
    concurrent_issues_leave_no_gap_and_no_duplicate,
);
