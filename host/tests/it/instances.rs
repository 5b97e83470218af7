//! Tenant instances: connect once, deadlines, panics, limits, eviction and shutdown.

use std::sync::atomic::Ordering;
use std::time::Duration;

use providers_core::ErrorCode;
use serde_json::json;

use crate::support::{App, assert_error, eventually};

#[tokio::test]
async fn a_hundred_concurrent_first_calls_connect_once() {
    let app = std::sync::Arc::new(App::sqlite().await);
    let token = app.token("acme", &["user"]);
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..100 {
        let (app, token) = (app.clone(), token.clone());
        calls.spawn(async move {
            app.post(Some(&token), "probe/echo", json!({"quantity": i}))
                .await
                .status
        });
    }
    let mut statuses = Vec::new();
    while let Some(status) = calls.join_next().await {
        statuses.push(status.unwrap().as_u16());
    }
    assert_eq!(statuses, vec![200; 100]);
    assert_eq!(app.counters.connects.load(Ordering::SeqCst), 1);
    assert_eq!(
        app.counters.lines(),
        ["connect acme acme-label"],
        "base config overlaid by the tenant's"
    );
    assert_eq!(app.host.instances().connected(), 1);
}

#[tokio::test]
async fn a_panic_is_a_provider_error_and_the_instance_keeps_serving() {
    let app = App::sqlite().await;
    let token = app.token("acme", &["user"]);
    let r = app.post(Some(&token), "probe/panic", json!({})).await;
    assert_eq!(
        assert_error(&r, 502, ErrorCode::ProviderError),
        "'probe/panic' failed: the provider panicked"
    );
    let r = app
        .post(Some(&token), "probe/echo", json!({"quantity": 1}))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        app.counters.connects.load(Ordering::SeqCst),
        1,
        "same instance, not reconnected"
    );
}

#[tokio::test]
async fn the_deadline_turns_a_slow_call_into_a_timeout() {
    let app = App::sqlite().await;
    let token = app.token("acme", &["user"]);
    // `quick` is probe with limits.timeout = 300ms, which also covers connecting: connect first.
    assert_eq!(
        app.post(Some(&token), "quick/echo", json!({})).await.status,
        200
    );
    let r = app
        .post(Some(&token), "quick/sleep", json!({"ms": 150}))
        .await;
    assert_eq!(r.status, 200, "under the deadline: {}", r.body);
    let started = std::time::Instant::now();
    let r = app
        .post(Some(&token), "quick/sleep", json!({"ms": 2000}))
        .await;
    assert_eq!(
        assert_error(&r, 504, ErrorCode::Timeout),
        "'quick/sleep' did not finish before its deadline"
    );
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "answered at the deadline, not after the sleep"
    );
    // The call was cancelled, not left running.
    let counters = app.counters.clone();
    let cancelled = || counters.lines().iter().any(|l| l == "cancelled sleep 2000");
    assert!(eventually(Duration::from_secs(1), cancelled).await);
    assert!(!app.counters.lines().iter().any(|l| l == "done sleep 2000"));
}

#[tokio::test]
async fn max_concurrency_refuses_the_call_past_the_limit() {
    let app = std::sync::Arc::new(App::sqlite().await);
    let token = app.token("acme", &["user"]);
    // Connect first, so the slow calls below overlap in execute, not in connect.
    assert_eq!(
        app.post(Some(&token), "limited/echo", json!({}))
            .await
            .status,
        200
    );
    let mut slow = Vec::new();
    for _ in 0..2 {
        let (app, token) = (app.clone(), token.clone());
        slow.push(tokio::spawn(async move {
            app.post(Some(&token), "limited/sleep", json!({"ms": 400}))
                .await
                .status
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = app.post(Some(&token), "limited/echo", json!({})).await;
    assert_eq!(
        assert_error(&r, 429, ErrorCode::RateLimited),
        "tenant 'acme' has 2 calls in flight on 'limited', its limit"
    );
    for s in slow {
        assert_eq!(s.await.unwrap(), 200);
    }
    assert_eq!(
        app.post(Some(&token), "limited/echo", json!({}))
            .await
            .status,
        200,
        "free again"
    );
}

#[tokio::test]
async fn idle_instances_are_evicted_with_disconnect_and_come_back() {
    let app = App::sqlite().await;
    let token = app.token("acme", &["user"]);
    app.post(Some(&token), "probe/echo", json!({})).await;
    app.post(Some(&token), "kv/set", json!({"key": "kept", "value": 1}))
        .await;
    assert_eq!(app.host.instances().connected(), 2);
    // Nothing is idle for an hour yet.
    assert_eq!(app.host.evict_idle().await, 0);
    assert_eq!(app.host.instances().evict_idle(Duration::ZERO).await, 2);
    assert_eq!(app.counters.disconnects.load(Ordering::SeqCst), 1);
    assert_eq!(app.host.instances().connected(), 0);
    let r = app
        .post(Some(&token), "kv/get", json!({"key": "kept"}))
        .await;
    assert_eq!(r.body["data"]["value"], 1, "state outlives the instance");
    app.post(Some(&token), "probe/echo", json!({})).await;
    assert_eq!(app.counters.connects.load(Ordering::SeqCst), 2);
    assert_eq!(
        app.counters.lines(),
        [
            "connect acme acme-label",
            "disconnect acme",
            "connect acme acme-label"
        ]
    );
}

#[tokio::test]
async fn a_failed_connect_is_unavailable_retried_and_makes_the_host_not_ready() {
    let db = providers_database::testing::TestDatabase::sqlite();
    let app = App::configured(db, |text| {
        text.replace("label = \"acme-label\"", "fail_connect = true")
            .replace("version = \"^1.4\"", "version = \"^1.4\"\nrequired = true")
    })
    .await;
    let token = app.token("acme", &["user"]);
    assert_eq!(app.get(None, "/ready").await.status, 200, "not tried yet");
    for attempt in 1..=2 {
        let r = app.post(Some(&token), "probe/echo", json!({})).await;
        assert_eq!(
            assert_error(&r, 503, ErrorCode::ProviderUnavailable),
            "service 'probe' is unavailable: probe was told to fail"
        );
        assert_eq!(app.counters.connects.load(Ordering::SeqCst), attempt);
    }
    let events = app.host.storage().events("acme", "probe").await.unwrap();
    assert_eq!(
        events,
        [
            ("connect_failed".to_owned(), "1.4.2".to_owned()),
            ("connect_failed".to_owned(), "1.4.2".to_owned())
        ]
    );
    let r = app.get(None, "/ready").await;
    assert_eq!(
        assert_error(&r, 503, ErrorCode::ProviderUnavailable),
        "not ready: provider 'probe' failed for tenant 'acme': connect failed: probe was told to fail"
    );
}

#[tokio::test]
async fn a_slow_connect_outlives_the_call_that_started_it() {
    let db = providers_database::testing::TestDatabase::sqlite();
    // `quick` allows 300 ms per call; this tenant's instance takes 600 ms to connect.
    let app = App::configured(db, |text| {
        text + "\n[tenants.slowco]\nservices = [\"quick\"]\n[tenants.slowco.providers.quick]\nconnect_delay_ms = 600\n"
    })
    .await;
    let token = app.token("slowco", &["user"]);
    let r = app.post(Some(&token), "quick/echo", json!({})).await;
    assert_error(&r, 504, ErrorCode::Timeout);
    let counters = app.counters.clone();
    let connected = || {
        counters
            .lines()
            .iter()
            .any(|l| l.starts_with("connect slowco"))
    };
    assert!(eventually(Duration::from_secs(3), connected).await);
    let r = app.post(Some(&token), "quick/echo", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        app.counters.connects.load(Ordering::SeqCst),
        1,
        "the first connect finished and was kept"
    );
}

#[tokio::test]
async fn eviction_skips_instances_with_calls_in_flight() {
    let app = std::sync::Arc::new(App::sqlite().await);
    let token = app.token("acme", &["user"]);
    let slow = {
        let (app, token) = (app.clone(), token.clone());
        tokio::spawn(async move {
            app.post(Some(&token), "probe/sleep", json!({"ms": 400}))
                .await
                .status
        })
    };
    let counters = app.counters.clone();
    assert!(eventually(Duration::from_secs(3), || !counters.lines().is_empty()).await);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        app.host.instances().evict_idle(Duration::ZERO).await,
        0,
        "in use"
    );
    assert_eq!(slow.await.unwrap(), 200);
    assert_eq!(app.host.instances().evict_idle(Duration::ZERO).await, 1);
    assert_eq!(
        app.counters.lines(),
        [
            "connect acme acme-label",
            "done sleep 400",
            "disconnect acme"
        ]
    );
}

#[tokio::test]
async fn after_shutdown_calls_are_refused_and_nothing_reconnects() {
    let app = App::sqlite().await;
    let token = app.token("acme", &["user"]);
    assert_eq!(
        app.post(Some(&token), "probe/echo", json!({})).await.status,
        200
    );
    app.host
        .instances()
        .shutdown(std::time::Instant::now() + Duration::from_secs(1))
        .await;
    let r = app.post(Some(&token), "probe/echo", json!({})).await;
    assert_eq!(
        assert_error(&r, 503, ErrorCode::ProviderUnavailable),
        "the host is shutting down"
    );
    assert_eq!(app.counters.connects.load(Ordering::SeqCst), 1);
    assert_eq!(app.counters.disconnects.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_calls_then_disconnects() {
    let app = App::sqlite().await;
    let token = app.token("acme", &["user"]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(provider_host::http::serve(
        app.host.clone(),
        listener,
        async move {
            let _ = stopped.await;
        },
    ));
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/providers/probe/sleep");
    let slow = {
        let (client, url, token) = (client.clone(), url.clone(), token.clone());
        tokio::spawn(async move {
            let r = client
                .post(url)
                .bearer_auth(token)
                .json(&json!({"ms": 500}))
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        })
    };
    let counters = app.counters.clone();
    assert!(
        eventually(Duration::from_secs(5), || counters
            .connects
            .load(Ordering::SeqCst)
            == 1)
        .await
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.send(()).unwrap();
    let (status, body) = slow.await.unwrap();
    assert_eq!((status, &body["data"]), (200, &json!({"slept_ms": 500})));
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        app.counters.lines(),
        [
            "connect acme acme-label",
            "done sleep 500",
            "disconnect acme"
        ],
        "disconnect only after the in-flight call finished"
    );
    assert!(
        client
            .post(url)
            .bearer_auth(token)
            .json(&json!({"ms": 1}))
            .send()
            .await
            .is_err(),
        "no longer listening"
    );
}

#[tokio::test]
async fn a_burst_against_a_failing_connect_makes_one_attempt() {
    let db = providers_database::testing::TestDatabase::sqlite();
    let app = std::sync::Arc::new(
        App::configured(db, |text| {
            text.replace("label = \"acme-label\"", "fail_connect = true")
                .replace("version = \"^1.4\"", "version = \"^1.4\"\nrequired = true")
        })
        .await,
    );
    let token = app.token("acme", &["user"]);
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (app, token) = (app.clone(), token.clone());
        calls.spawn(async move {
            app.post(Some(&token), "probe/echo", json!({}))
                .await
                .status
                .as_u16()
        });
    }
    while let Some(status) = calls.join_next().await {
        assert_eq!(status.unwrap(), 503);
    }
    assert_eq!(
        app.counters.connects.load(Ordering::SeqCst),
        1,
        "waiters shared the failed attempt"
    );
    // A later call tries again, and the failed slot survives idle eviction for readiness.
    app.post(Some(&token), "probe/echo", json!({})).await;
    assert_eq!(app.counters.connects.load(Ordering::SeqCst), 2);
    app.host.instances().evict_idle(Duration::ZERO).await;
    assert_eq!(app.get(None, "/ready").await.status, 503);
}
