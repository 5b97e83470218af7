//! Tenant instances: connect once, deadlines, panics, limits, eviction and shutdown.

use std::sync::atomic::Ordering;
use std::time::Duration;

use providers_core::ErrorCode;
use serde_json::json;

use providers_database::testing::TestDatabase;

use crate::support::{App, assert_error, eventually, matrix, replace_once, serve};

matrix!(
    a_hundred_concurrent_first_calls_connect_once,
    a_panic_is_a_provider_error_and_the_instance_keeps_serving,
    the_deadline_turns_a_slow_call_into_a_timeout,
    max_concurrency_refuses_the_call_past_the_limit,
    idle_instances_are_evicted_with_disconnect_and_come_back,
    a_failed_connect_backs_off_then_retries,
    a_slow_connect_outlives_the_call_that_started_it,
    eviction_skips_instances_with_calls_in_flight,
    after_shutdown_calls_are_refused_and_nothing_reconnects,
    graceful_shutdown_finishes_in_flight_calls_then_disconnects,
    a_burst_against_a_failing_connect_makes_one_attempt,
    one_tenants_broken_override_keeps_the_replica_ready,
    a_call_past_the_shutdown_grace_is_cancelled_before_disconnect,
    a_connect_finishing_during_shutdown_is_released,
    a_disconnect_that_panics_or_hangs_is_contained,
    a_status_probe_holds_its_instance,
    readiness_is_bounded_when_a_status_hangs,
);

async fn a_hundred_concurrent_first_calls_connect_once(db: TestDatabase) {
    let app = std::sync::Arc::new(App::on(db).await);
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

async fn a_panic_is_a_provider_error_and_the_instance_keeps_serving(db: TestDatabase) {
    let app = App::on(db).await;
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

async fn the_deadline_turns_a_slow_call_into_a_timeout(db: TestDatabase) {
    let app = App::on(db).await;
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

async fn max_concurrency_refuses_the_call_past_the_limit(db: TestDatabase) {
    let app = std::sync::Arc::new(App::on(db).await);
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
    app.counters.reach(|c| &c.sleeping, 2).await;
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

async fn idle_instances_are_evicted_with_disconnect_and_come_back(db: TestDatabase) {
    let app = App::on(db).await;
    let token = app.token("acme", &["user"]);
    app.post(Some(&token), "probe/echo", json!({})).await;
    app.post(Some(&token), "kv/set", json!({"key": "kept", "value": 1}))
        .await;
    assert_eq!(app.host.instances().connected(), 2);
    // Nothing is idle for an hour yet.
    assert_eq!(app.host.maintain().await, 0);
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

async fn a_failed_connect_backs_off_then_retries(db: TestDatabase) {
    let app = App::configured(db, |text| {
        let text = replace_once(&text, "label = \"acme-label\"", "fail_connect = true");
        replace_once(
            &text,
            "version = \"^1.4\"",
            "version = \"^1.4\"\nrequired = true",
        )
    })
    .await;
    let token = app.token("acme", &["user"]);
    assert_eq!(app.get(None, "/ready").await.status, 200, "not tried yet");
    let r = app.post(Some(&token), "probe/echo", json!({})).await;
    assert_eq!(
        assert_error(&r, 503, ErrorCode::ProviderUnavailable),
        "service 'probe' is unavailable: probe was told to fail"
    );
    // Within the backoff (test config: 200 ms, doubling, at most 400 ms) no new attempt is made.
    for _ in 0..5 {
        let r = app.post(Some(&token), "probe/echo", json!({})).await;
        let detail = assert_error(&r, 503, ErrorCode::ProviderUnavailable);
        assert!(
            detail.starts_with(
                "service 'probe' is unavailable: probe was told to fail; next attempt in "
            ),
            "{detail}"
        );
    }
    assert_eq!(app.counters.connects.load(Ordering::SeqCst), 1);
    let events = app.host.storage().events("acme", "probe").await.unwrap();
    assert_eq!(events.len(), 1, "one event per attempt, not per call");
    // After the backoff the next call tries again.
    let counters = app.counters.clone();
    let mut retried = false;
    for _ in 0..100 {
        app.post(Some(&token), "probe/echo", json!({})).await;
        if counters.connects.load(Ordering::SeqCst) == 2 {
            retried = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(retried, "a second attempt after the backoff");
    let events = app.host.storage().events("acme", "probe").await.unwrap();
    assert_eq!(
        events,
        [
            ("connect_failed".to_owned(), "1.4.2".to_owned()),
            ("connect_failed".to_owned(), "1.4.2".to_owned())
        ]
    );
    // Even as the only tenant of a required service, its failing connect never takes the
    // replica out of rotation (where no call could ever clear it).
    let r = app.get(None, "/ready").await;
    assert_eq!(
        (r.status.as_u16(), &r.body),
        (200, &json!({"status": "ready"}))
    );
}

async fn a_slow_connect_outlives_the_call_that_started_it(db: TestDatabase) {
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

async fn eviction_skips_instances_with_calls_in_flight(db: TestDatabase) {
    let app = std::sync::Arc::new(App::on(db).await);
    let token = app.token("acme", &["user"]);
    let slow = {
        let (app, token) = (app.clone(), token.clone());
        tokio::spawn(async move {
            app.post(Some(&token), "probe/sleep", json!({"ms": 400}))
                .await
                .status
        })
    };
    app.counters.reach(|c| &c.sleeping, 1).await;
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

async fn after_shutdown_calls_are_refused_and_nothing_reconnects(db: TestDatabase) {
    let app = App::on(db).await;
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

async fn graceful_shutdown_finishes_in_flight_calls_then_disconnects(db: TestDatabase) {
    let app = App::on(db).await;
    let token = app.token("acme", &["user"]);
    let (addr, stop, server) = serve(&app).await;
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
    app.counters.reach(|c| &c.sleeping, 1).await;
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

async fn a_burst_against_a_failing_connect_makes_one_attempt(db: TestDatabase) {
    let app = std::sync::Arc::new(
        App::configured(db, |text| {
            let text = replace_once(&text, "label = \"acme-label\"", "fail_connect = true");
            replace_once(
                &text,
                "version = \"^1.4\"",
                "version = \"^1.4\"\nrequired = true",
            )
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
    let events = app.host.storage().events("acme", "probe").await.unwrap();
    assert_eq!(events.len(), 1, "one attempt, one event");
    assert_eq!(app.get(None, "/ready").await.status, 200);
    // A failed slot unused for the idle timeout is forgotten with its backoff: the next call
    // tries again at once.
    app.host.instances().evict_idle(Duration::ZERO).await;
    let r = app.post(Some(&token), "probe/echo", json!({})).await;
    assert_eq!(
        assert_error(&r, 503, ErrorCode::ProviderUnavailable),
        "service 'probe' is unavailable: probe was told to fail"
    );
    assert_eq!(app.counters.connects.load(Ordering::SeqCst), 2);
}

async fn one_tenants_broken_override_keeps_the_replica_ready(db: TestDatabase) {
    let app = App::configured(db, |text| {
        let text = replace_once(&text, "version = \"^1.4\"", "version = \"^1.4\"\nrequired = true");
        text + "\n[tenants.broken]\nservices = [\"probe\"]\n[tenants.broken.providers.probe]\nfail_connect = true\n"
    })
    .await;
    let broken = app.token("broken", &["user"]);
    let acme = app.token("acme", &["user"]);
    assert_eq!(
        app.post(Some(&acme), "probe/echo", json!({})).await.status,
        200
    );
    let r = app.post(Some(&broken), "probe/echo", json!({})).await;
    assert_error(&r, 503, ErrorCode::ProviderUnavailable);
    let r = app.get(None, "/ready").await;
    assert_eq!(
        (r.status.as_u16(), &r.body),
        (200, &json!({"status": "ready"}))
    );
    // The broken tenant sees its own failure, behind its token.
    let r = app.get(Some(&broken), "/providers/probe").await;
    assert_eq!(r.body["status"]["state"], "failed", "{}", r.body);
    assert_eq!(
        r.body["status"]["detail"],
        "connect failed: probe was told to fail"
    );
}

async fn a_call_past_the_shutdown_grace_is_cancelled_before_disconnect(db: TestDatabase) {
    let app = App::configured(db, |text| {
        replace_once(
            &text,
            "shutdown_grace = \"5s\"",
            "shutdown_grace = \"300ms\"",
        )
    })
    .await;
    let token = app.token("acme", &["user"]);
    let (addr, stop, server) = serve(&app).await;
    let slow = tokio::spawn(
        reqwest::Client::new()
            .post(format!("http://{addr}/providers/probe/sleep"))
            .bearer_auth(token)
            .json(&json!({"ms": 2500}))
            .send(),
    );
    let counters = app.counters.clone();
    assert!(
        eventually(Duration::from_secs(5), || counters
            .connects
            .load(Ordering::SeqCst)
            == 1)
        .await
    );
    app.counters.reach(|c| &c.sleeping, 1).await;
    let stopping = std::time::Instant::now();
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("shutdown ends soon after the grace, not after the call")
        .unwrap()
        .unwrap();
    assert!(
        stopping.elapsed() < Duration::from_millis(2000),
        "{:?}",
        stopping.elapsed()
    );
    assert!(
        slow.await.unwrap().is_err(),
        "the connection was closed under the call"
    );
    assert_eq!(
        app.counters.lines(),
        [
            "connect acme acme-label",
            "cancelled sleep 2500",
            "disconnect acme"
        ],
        "cancelled first, disconnected after"
    );
}

async fn a_connect_finishing_during_shutdown_is_released(db: TestDatabase) {
    let app = std::sync::Arc::new(
        App::configured(db, |text| {
            replace_once(&text, "label = \"acme-label\"", "connect_delay_ms = 400")
        })
        .await,
    );
    let token = app.token("acme", &["user"]);
    let first = {
        let (app, token) = (app.clone(), token.clone());
        tokio::spawn(async move { app.post(Some(&token), "probe/echo", json!({})).await })
    };
    let counters = app.counters.clone();
    assert!(
        eventually(Duration::from_secs(3), || counters
            .connects
            .load(Ordering::SeqCst)
            == 1)
        .await
    );
    app.host
        .instances()
        .shutdown(std::time::Instant::now() + Duration::from_secs(3))
        .await;
    let r = first.await.unwrap();
    assert_eq!(
        assert_error(&r, 503, ErrorCode::ProviderUnavailable),
        "the host is shutting down"
    );
    assert_eq!(app.counters.connects.load(Ordering::SeqCst), 1);
    assert_eq!(
        app.counters.disconnects.load(Ordering::SeqCst),
        1,
        "released, not leaked"
    );
    assert_eq!(app.host.instances().connected(), 0);
}

async fn a_disconnect_that_panics_or_hangs_is_contained(db: TestDatabase) {
    let app = App::configured(db, |text| {
        text + "\n[tenants.panics]\nservices = [\"probe\"]\n[tenants.panics.providers.probe]\non_disconnect = \"panic\"\n"
            + "\n[tenants.hangs]\nservices = [\"probe\"]\n[tenants.hangs.providers.probe]\non_disconnect = \"hang\"\n"
    })
    .await;
    for tenant in ["panics", "hangs"] {
        let token = app.token(tenant, &["user"]);
        assert_eq!(
            app.post(Some(&token), "probe/echo", json!({})).await.status,
            200
        );
    }
    // Eviction returns although one disconnect panics and the other never ends (bounded at 10 s).
    let evicted = tokio::time::timeout(
        Duration::from_secs(15),
        app.host.instances().evict_idle(Duration::ZERO),
    )
    .await
    .expect("eviction is bounded");
    assert_eq!(evicted, 2);
    let details = |tenant: &'static str| {
        let storage = app.host.storage().clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT detail FROM instance_events WHERE tenant = $1 AND event = 'disconnected'",
            )
            .bind(tenant)
            .fetch_all(storage.pool())
            .await
            .unwrap()
        }
    };
    assert_eq!(
        details("panics").await,
        ["idle: provider 'probe' disconnect for tenant 'panics' failed: the provider panicked"]
    );
    assert_eq!(
        details("hangs").await,
        ["idle: provider 'probe' disconnect for tenant 'hangs' did not finish before its deadline"]
    );
}

async fn a_status_probe_holds_its_instance(db: TestDatabase) {
    let app = std::sync::Arc::new(
        App::configured(db, |text| {
            replace_once(&text, "label = \"acme-label\"", "status_delay_ms = 300")
        })
        .await,
    );
    let token = app.token("acme", &["user"]);
    assert_eq!(
        app.post(Some(&token), "probe/echo", json!({})).await.status,
        200
    );
    let probe = {
        let app = app.clone();
        tokio::spawn(async move {
            app.host
                .instances()
                .status(
                    "acme",
                    "probe",
                    std::time::Instant::now() + Duration::from_secs(2),
                )
                .await
        })
    };
    app.counters.reach(|c| &c.probing, 1).await;
    assert_eq!(
        app.host.instances().evict_idle(Duration::ZERO).await,
        0,
        "a status probe is in flight"
    );
    assert_eq!(
        probe.await.unwrap().unwrap().state,
        providers_core::State::Ready
    );
    assert_eq!(app.host.instances().evict_idle(Duration::ZERO).await, 1);
    assert_eq!(
        app.counters.lines(),
        ["connect acme base", "status done", "disconnect acme"]
    );
}

async fn readiness_is_bounded_when_a_status_hangs(db: TestDatabase) {
    let app = App::configured(db, |text| {
        let text = replace_once(
            &text,
            "ready_cache = \"200ms\"",
            "ready_cache = \"200ms\"\nready_timeout = \"300ms\"",
        );
        let text = replace_once(
            &text,
            "version = \"^1.4\"",
            "version = \"^1.4\"\nrequired = true",
        );
        replace_once(&text, "label = \"acme-label\"", "status_delay_ms = 30000")
    })
    .await;
    let token = app.token("acme", &["user"]);
    assert_eq!(
        app.post(Some(&token), "probe/echo", json!({})).await.status,
        200
    );
    // Readiness never waits on a provider's status.
    let started = std::time::Instant::now();
    let r = app.get(None, "/ready").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // The tenant's own view is bounded by ready_timeout, not by the provider.
    let started = std::time::Instant::now();
    let r = app.get(Some(&token), "/providers/probe").await;
    assert_eq!(r.body["status"]["state"], "failed", "{}", r.body);
    assert_eq!(
        r.body["status"]["detail"],
        "provider 'probe' get_status for tenant 'acme' did not finish before its deadline"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "bounded by ready_timeout: {:?}",
        started.elapsed()
    );
}
