//! Unit tests of `kv`'s private parts: the prefix successor, ETag parsing, query plans.

use super::*;

#[test]
fn the_successor_bounds_every_string_with_the_prefix() {
    assert_eq!(successor(""), None);
    assert_eq!(successor("a").as_deref(), Some("b"));
    assert_eq!(successor("a/").as_deref(), Some("a0"));
    assert_eq!(successor("é").as_deref(), Some("ê"));
    assert_eq!(successor("a\u{10FFFF}").as_deref(), Some("b"));
    assert_eq!(successor("\u{10FFFF}\u{10FFFF}"), None);
    assert_eq!(successor("x\u{D7FF}").as_deref(), Some("x\u{E000}"));
    // Where the UTF-8 length grows, code-point order and byte order still agree.
    assert_eq!(successor("\u{7F}").as_deref(), Some("\u{80}"));
    assert_eq!(successor("\u{FFFF}").as_deref(), Some("\u{10000}"));
    for prefix in [
        "a",
        "a/",
        "é",
        "x\u{D7FF}",
        "k\u{10FFFF}",
        "\u{7F}",
        "\u{FFFF}",
    ] {
        let upper = successor(prefix).unwrap();
        for tail in ["", "\0", "z", "\u{10FFFF}\u{10FFFF}"] {
            let key = format!("{prefix}{tail}");
            assert!(key.as_bytes() < upper.as_bytes(), "{key:?} < {upper:?}");
        }
    }
}

#[tokio::test]
async fn list_by_prefix_is_a_range_scan_of_the_primary_key_on_sqlite() {
    use sqlx::Row;
    let db = crate::testing::TestDatabase::sqlite();
    let pool = db.pool().await;
    crate::prepare(&pool).await.unwrap();
    let plan = sqlx::query(sqlx::AssertSqlSafe(format!(
        "EXPLAIN QUERY PLAN {LIST_BOUNDED}"
    )))
    .bind("acme")
    .bind("p")
    .bind("")
    .bind(0i64)
    .bind(10i64)
    .bind("kv")
    .bind("q")
    .fetch_all(&pool)
    .await
    .unwrap();
    let detail: Vec<String> = plan.iter().map(|r| r.get::<String, _>(3)).collect();
    assert!(
        detail.iter().any(|d| d.contains("key>? AND key<?")),
        "a range bounded on both sides: {detail:?}"
    );
}

#[test]
fn etags_match_only_their_canonical_text() {
    assert_eq!(parse_etag("k", "42").unwrap(), 42);
    for other in ["042", "+42", " 42", "42 ", "4_2"] {
        assert_eq!(
            parse_etag("k", other).unwrap_err().code,
            providers_core::ErrorCode::Conflict
        );
    }
}

/// PostgreSQL folds a bound parameter into a custom plan, where even `($7 IS NULL OR key < $7)`
/// becomes a bound; a cached statement may switch to a generic plan, though, so that is the
/// plan checked here (and an empty table needs sequential scans off to use any index).
#[tokio::test]
async fn list_by_prefix_is_a_range_scan_of_the_primary_key_on_postgres() {
    use sqlx::Row;
    let db = crate::testing::TestDatabase::postgres().await;
    let pool = db.pool().await;
    crate::prepare(&pool).await.unwrap();
    let mut conn = pool.acquire().await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET enable_seqscan = off; SET plan_cache_mode = force_generic_plan; \
         PREPARE list_bounded(text, text, text, bigint, bigint, text, text) AS {LIST_BOUNDED}"
    )))
    .execute(&mut *conn)
    .await
    .unwrap();
    let plan = sqlx::query("EXPLAIN EXECUTE list_bounded('acme', 'p', '', 0, 10, 'kv', 'q')")
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    let lines: Vec<String> = plan.iter().map(|r| r.get::<String, _>(0)).collect();
    assert!(
        lines.iter().any(|l| l.contains("Index Cond")
            && l.contains("(key >= $2)")
            && l.contains("(key < $7)")),
        "a range bounded on both sides: {lines:#?}"
    );
}
