//! Metrics at `GET /metrics` after known traffic (exact counts), bounded tenant labels,
//! access to the endpoint, and the JSON access log's fields.

use std::collections::BTreeMap;

use providers_core::ErrorCode;
use providers_database::testing::TestDatabase;
use serde_json::json;

use crate::support::{App, Edit, assert_error};

type Labels = BTreeMap<String, String>;

/// Every sample of `name` in a Prometheus text exposition.
pub fn samples(text: &str, name: &str) -> Vec<(Labels, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, labels) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            (metric == name).then(|| {
                let labels = labels
                    .split("\",")
                    .filter(|p| !p.is_empty())
                    .filter_map(|p| {
                        let (k, v) = p.split_once("=\"")?;
                        Some((k.to_owned(), v.trim_end_matches('"').to_owned()))
                    })
                    .collect();
                (labels, value.parse().unwrap())
            })
        })
        .collect()
}

pub fn count(text: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    samples(text, name)
        .into_iter()
        .filter(|(labels, _)| {
            want.iter()
                .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| v)
        .sum()
}

fn with_metrics(access: &'static str, tenants: &'static str) -> impl FnOnce(String) -> String {
    move |text: String| {
        text.edit(
            "leeway_seconds = 0\n",
            "leeway_seconds = 0\nadmin_role = \"admin\"\nplatform_tenant = \"platform\"\n",
        ) + &format!(
            "\n[tenants.{tenants}]\nservices = [\"kv\"]\n\n[tenants.{tenants}-limited]\nservices = [\"kv\"]\nrate_limits = {{ client = {{ per_minute = 1 }} }}\n\n[observability]\nmetrics = \"{access}\"\nmetrics_tenants = [\"{tenants}\", \"{tenants}-limited\"]\n"
        )
    }
}

async fn scrape(app: &App) -> String {
    let r = app
        .get(Some(&app.token("platform", &["admin"])), "/metrics")
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    r.body.as_str().unwrap().to_owned()
}

#[tokio::test]
async fn metrics_count_known_traffic_exactly() {
    // The recorder is the process's: this test's tenants are its own, so its counts are exact.
    let app = App::configured(
        TestDatabase::sqlite(),
        with_metrics("operator", "metrics-a"),
    )
    .await;
    let user = app.token("metrics-a", &["user"]);
    for i in 0..3 {
        assert_eq!(
            app.post(
                Some(&user),
                "kv/set",
                json!({"key": format!("k{i}"), "value": i})
            )
            .await
            .status,
            200
        );
    }
    assert_error(
        &app.post(Some(&user), "kv/get", json!({"key": "missing"}))
            .await,
        404,
        ErrorCode::NotFound,
    );
    assert_error(
        &app.post(
            Some(&app.token("metrics-a", &["reader"])),
            "kv/set",
            json!({"key": "k", "value": 1}),
        )
        .await,
        403,
        ErrorCode::Forbidden,
    );
    assert_error(
        &app.post(Some(&user), "kv/no-such-action", json!({})).await,
        404,
        ErrorCode::NotFound,
    );
    assert_error(
        &app.post(Some(&user), "no-such-service/x", json!({})).await,
        404,
        ErrorCode::NotFound,
    );
    let limited = app.token("metrics-a-limited", &["user"]);
    assert_eq!(
        app.post(Some(&limited), "kv/set", json!({"key": "k", "value": 1}))
            .await
            .status,
        200
    );
    assert_error(
        &app.post(Some(&limited), "kv/set", json!({"key": "k", "value": 2}))
            .await,
        429,
        ErrorCode::RateLimited,
    );

    let text = scrape(&app).await;
    let calls = |labels: &[(&str, &str)]| count(&text, "provider_calls_total", labels);
    let a = ("tenant", "metrics-a");
    assert_eq!(
        calls(&[
            a,
            ("service", "kv"),
            ("action", "set"),
            ("outcome", "ok"),
            ("code", "none")
        ]),
        3.0,
        "{text}"
    );
    assert_eq!(
        calls(&[
            a,
            ("service", "kv"),
            ("action", "get"),
            ("outcome", "error"),
            ("code", "NOT_FOUND")
        ]),
        1.0
    );
    assert_eq!(
        calls(&[
            a,
            ("service", "kv"),
            ("action", "set"),
            ("outcome", "denied"),
            ("code", "FORBIDDEN")
        ]),
        1.0
    );
    // Names the client made up never become labels.
    assert_eq!(
        calls(&[a, ("service", "kv"), ("action", "-"), ("code", "NOT_FOUND")]),
        1.0
    );
    assert_eq!(
        calls(&[a, ("service", "-"), ("action", "-"), ("code", "NOT_FOUND")]),
        1.0
    );
    assert_eq!(calls(&[a]), 7.0, "every call of the tenant, once");
    assert!(!text.contains("no-such"), "{text}");
    assert_eq!(
        count(
            &text,
            "rate_limit_rejections_total",
            &[("tenant", "metrics-a-limited")]
        ),
        1.0
    );
    assert_eq!(
        calls(&[("tenant", "metrics-a-limited")]),
        1.0,
        "a refused request is no call"
    );
    assert!(
        count(
            &text,
            "provider_call_duration_seconds_count",
            &[("service", "kv"), ("action", "set")]
        ) >= 4.0
    );
    assert!(
        count(
            &text,
            "provider_instance_events_total",
            &[("service", "kv"), ("event", "connected")]
        ) >= 2.0
    );
    assert!(
        count(
            &text,
            "provider_instances",
            &[("kind", "builtin"), ("state", "connected")]
        ) >= 2.0
    );
    assert!(!samples(&text, "provider_calls_in_flight").is_empty());

    // Only a platform operator reads it.
    assert_error(
        &app.get(None, "/metrics").await,
        401,
        ErrorCode::Unauthenticated,
    );
    assert_error(
        &app.get(Some(&app.token("metrics-a", &["admin"])), "/metrics")
            .await,
        403,
        ErrorCode::Forbidden,
    );
}

#[tokio::test]
async fn tenant_labels_are_bounded_and_access_is_configurable() {
    let many: String = (0..300)
        .map(|i| format!("\n[tenants.crowd-{i}]\nservices = [\"kv\"]\n"))
        .collect();
    let app = App::configured(TestDatabase::sqlite(), move |text| {
        with_metrics("open", "metrics-b")(text) + &many
    })
    .await;
    for i in 0..300 {
        let t = app.token(&format!("crowd-{i}"), &["user"]);
        assert_eq!(
            app.post(Some(&t), "kv/set", json!({"key": "k", "value": i}))
                .await
                .status,
            200
        );
    }
    // Open: no token needed on this loopback listener.
    let r = app.get(None, "/metrics").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let text = r.body.as_str().unwrap();
    assert!(
        !text.contains("crowd-"),
        "an unlisted tenant never becomes a label"
    );
    assert!(
        count(
            text,
            "provider_calls_total",
            &[("tenant", "other"), ("service", "kv"), ("action", "set")]
        ) >= 300.0
    );
    let tenants: std::collections::BTreeSet<String> = samples(text, "provider_calls_total")
        .into_iter()
        .filter_map(|(l, _)| l.get("tenant").cloned())
        .collect();
    assert!(tenants.len() <= 8, "{tenants:?}");

    let off = App::configured(TestDatabase::sqlite(), with_metrics("off", "metrics-c")).await;
    let d = assert_error(
        &off.get(Some(&off.token("platform", &["admin"])), "/metrics")
            .await,
        404,
        ErrorCode::NotFound,
    );
    assert_eq!(
        d,
        "metrics are off on this host ([observability] metrics = \"off\")"
    );
    let text =
        crate::support::config_text("sqlite::memory:", "\n[observability]\nmetrics = \"open\"\n")
            .edit("listen = \"127.0.0.1:0\"", "listen = \"0.0.0.0:8080\"");
    let errors = crate::support::load(&text, &crate::support::registry(&Default::default()))
        .err()
        .unwrap();
    assert!(errors[0].message.starts_with("observability.metrics: \"open\" serves /metrics without a token, which is accepted only on a loopback listener"), "{errors:?}");
}

#[tokio::test]
async fn admin_instances_shows_each_live_instance_with_its_counts() {
    let app = App::configured(TestDatabase::sqlite(), with_metrics("operator", "inst-a")).await;
    let user = app.token("inst-a", &["user"]);
    for i in 0..2 {
        assert_eq!(
            app.post(Some(&user), "kv/set", json!({"key": "k", "value": i}))
                .await
                .status,
            200
        );
    }
    assert_error(
        &app.post(Some(&user), "kv/get", json!({"key": "missing"}))
            .await,
        404,
        ErrorCode::NotFound,
    );
    let other = app.token("inst-a-limited", &["user"]);
    assert_eq!(
        app.post(Some(&other), "kv/set", json!({"key": "k", "value": 1}))
            .await
            .status,
        200
    );

    let r = app
        .get(Some(&app.token("inst-a", &["admin"])), "/admin/instances")
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let list = r.body["instances"].as_array().unwrap();
    assert_eq!(
        list.len(),
        1,
        "a tenant administrator sees their own tenant's only: {list:?}"
    );
    let kv = &list[0];
    assert_eq!(
        (
            &kv["tenant"],
            &kv["service"],
            &kv["kind"],
            &kv["state"],
            &kv["calls"],
            &kv["errors"],
            &kv["calls_in_flight"]
        ),
        (
            &json!("inst-a"),
            &json!("kv"),
            &json!("builtin"),
            &json!("connected"),
            &json!(3),
            &json!(1),
            &json!(0)
        )
    );
    assert_eq!(kv["status"]["state"], "ready");
    assert_eq!(kv["last_error"]["error_code"], "NOT_FOUND");
    assert_eq!(kv["last_error"]["detail"], "key 'missing' not found");
    assert!(kv["connected_since_ms"].as_i64().unwrap() > 0 && kv["version"].is_string());
    let all = app
        .get(Some(&app.token("platform", &["admin"])), "/admin/instances")
        .await;
    let tenants: Vec<&str> = all.body["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["tenant"].as_str().unwrap())
        .collect();
    assert_eq!(tenants, ["inst-a", "inst-a-limited"]);
    assert_error(
        &app.get(Some(&user), "/admin/instances").await,
        403,
        ErrorCode::Forbidden,
    );
}

#[test]
fn otlp_settings_are_checked_at_their_edges() {
    let errors_of = |settings: &str| -> Vec<String> {
        let text = crate::support::config_text(
            "sqlite::memory:",
            &format!("\n[observability]\n{settings}\n"),
        );
        match crate::support::load(&text, &crate::support::registry(&Default::default())) {
            Ok(_) => Vec::new(),
            Err(errors) => errors.into_iter().map(|e| e.message).collect(),
        }
    };
    for fine in [
        "otlp_endpoint = \"http://127.0.0.1:4318\"\notlp_queue = 1",
        "otlp_endpoint = \"http://collector.internal:4318/base\"\notlp_queue = 1000000",
        "otlp_interval = \"10ms\"\notlp_timeout = \"30s\"\notlp_service_name = \"erp-eu\"",
    ] {
        assert_eq!(errors_of(fine), Vec::<String>::new(), "{fine}");
    }
    assert_eq!(
        errors_of("otlp_endpoint = \"https://collector:4318\""),
        [
            "observability.otlp_endpoint: 'https://collector:4318' must be an http:// URL with a host (this build links no TLS; got scheme 'https')"
        ]
    );
    assert_eq!(
        errors_of("otlp_endpoint = \"collector:4318\""),
        [
            "observability.otlp_endpoint: 'collector:4318' must be an http:// URL with a host (this build links no TLS; got scheme 'collector')"
        ]
    );
    assert_eq!(
        errors_of("otlp_endpoint = \"127.0.0.1:4318\""),
        ["observability.otlp_endpoint: '127.0.0.1:4318' is not a URL: relative URL without a base"]
    );
    for (queue, shown) in [("0", "0"), ("1000001", "1000001")] {
        assert_eq!(
            errors_of(&format!("otlp_queue = {queue}")),
            [format!(
                "observability.otlp_queue: {shown} is out of range (1 to 1000000)"
            )]
        );
    }
    let bad_interval = errors_of("otlp_interval = \"soon\"");
    assert_eq!(bad_interval.len(), 1, "{bad_interval:?}");
    assert!(bad_interval[0].contains("soon"), "{bad_interval:?}");
}
