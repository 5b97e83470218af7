//! Configuration checks: every error with its file, line and column.

use std::sync::Arc;

use crate::support::{Counters, Edit, config_text, load, registry};

fn errors_of(text: &str) -> Vec<String> {
    let counters = Arc::new(Counters::default());
    match load(text, &registry(&counters)) {
        Ok(_) => panic!("expected errors"),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

fn base() -> String {
    config_text("sqlite://unused.db", "")
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).unwrap() + 1
}

#[test]
fn the_test_and_demo_configs_load() {
    let counters = Arc::new(Counters::default());
    let c = load(&base(), &registry(&counters)).unwrap();
    assert_eq!(
        c.services.keys().collect::<Vec<_>>(),
        ["kv", "limited", "probe", "quick"]
    );
    let acme = &c.tenants["acme"].services["probe"];
    assert_eq!(
        acme.config,
        serde_json::json!({"label": "acme-label"}),
        "tenant override wins"
    );
    let globex_kv = &c.tenants["globex"].services["kv"];
    assert_eq!(globex_kv.config, serde_json::json!({}));

    let dir = tempfile::tempdir().unwrap();
    provider_host::demo::ensure_secret(dir.path()).unwrap();
    provider_host::demo::write_workflows(dir.path()).unwrap();
    let demo = provider_host::config::load_str(
        provider_host::config::DEMO,
        "<demo>",
        dir.path(),
        &provider_host::builtin_registry().unwrap(),
        &|_| None,
    )
    .unwrap();
    assert_eq!(demo.tenants.keys().collect::<Vec<_>>(), ["acme", "globex"]);
    // Both demo workflows check against the demo's services and reach the provider.
    let workflows = &demo.tenants["acme"].services["workflows"].config["definitions"];
    let names: Vec<&str> = workflows
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["purchase_order_approval", "purchase_requisition"]);
    assert_eq!(
        demo.tenants["globex"].services["kv"].config,
        serde_json::json!({"max_value_bytes": 4096})
    );
}

#[test]
fn unknown_keys_are_errors_with_line_and_column() {
    let text = base().edit(
        "idle_timeout = \"1h\"",
        "idle_timeout = \"1h\"\nidle_timout = \"2h\"",
    );
    let line = line_of(&text, "idle_timout");
    let errors = errors_of(&text);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with(&format!("test.toml:{line}:1: unknown field `idle_timout`")),
        "{errors:?}"
    );
}

#[test]
fn services_versions_and_tenants_are_checked_against_the_registry() {
    let text = base()
        .edit("version = \"^1.4\"", "version = \"^2\"")
        .edit("services = [\"kv\"]\n", "services = [\"kv\", \"ledger\"]\n");
    let errors = errors_of(&text);
    let version_line = line_of(&text, "version = \"^2\"");
    let ledger_line = line_of(&text, "\"ledger\"");
    assert_eq!(
        errors,
        [
            format!(
                "test.toml:{version_line}:11: service 'probe': no loaded version matches '^2' (loaded: 1.4.2)"
            ),
            format!(
                "test.toml:{ledger_line}:19: tenant 'globex' enables service 'ledger', which no [[providers]] entry configures"
            ),
        ]
    );
}

#[test]
fn references_clear_secrets_and_config_schemas_are_checked() {
    let text = base()
        .edit("${env:TEST_JWT_SECRET}", "${env:NOT_SET_ANYWHERE}")
        .edit("label = \"acme-label\"", "label = 42");
    let errors = errors_of(&text);
    let line = line_of(&text, "NOT_SET_ANYWHERE");
    assert_eq!(
        errors,
        [format!(
            "test.toml:{line}:11: environment variable 'NOT_SET_ANYWHERE' is not set (referenced as '${{env:NOT_SET_ANYWHERE}}')"
        )],
        "reference errors stop before semantic checks"
    );

    let text = base().edit(
        "${env:TEST_JWT_SECRET}",
        "plain-text-secret-plain-text-secret",
    );
    let errors = errors_of(&text);
    let line = line_of(&text, "plain-text-secret");
    assert_eq!(
        errors,
        [format!(
            "test.toml:{line}:10: secrets are never written in clear: use secret = \"${{env:NAME}}\" or secret_file"
        )]
    );

    let text = base().edit("label = \"acme-label\"", "label = 42");
    let errors = errors_of(&text);
    // Reported at the tenant's override table, which made it invalid.
    let line = line_of(&text, "[tenants.acme.providers.probe]");
    assert_eq!(
        errors,
        [format!(
            "test.toml:{line}:1: tenant 'acme', service 'probe' config at '/label': 42 is not of type \"string\""
        )]
    );
}

#[test]
fn syntax_errors_and_bad_values_point_at_their_place() {
    let text = base().edit(
        "request_timeout = \"3s\"",
        "request_timeout = \"3 parsecs\"",
    );
    let errors = errors_of(&text);
    let line = line_of(&text, "parsecs");
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].starts_with(&format!(
            "test.toml:{line}:19: invalid duration '3 parsecs'"
        )),
        "{errors:?}"
    );

    let errors = errors_of("[server\nlisten = 1");
    assert!(errors[0].starts_with("test.toml:1:8: "), "{errors:?}");

    let text = base().edit("service = \"quick\"", "service = \"kv\"");
    let errors = errors_of(&text);
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].ends_with("service 'kv' is configured twice"),
        "{errors:?}"
    );
    assert!(
        errors[1].ends_with(
            "tenant 'acme' enables service 'quick', which no [[providers]] entry configures"
        ),
        "{errors:?}"
    );
}

#[test]
fn durations_limits_and_partial_references_are_refused_in_place() {
    let text = base().edit("request_timeout = \"3s\"", "request_timeout = \"0s\"");
    let line = line_of(&text, "\"0s\"");
    assert_eq!(
        errors_of(&text),
        [format!(
            "test.toml:{line}:19: duration '0s' is out of range (more than 0, at most 365 days)"
        )]
    );

    let text = base().edit("${env:TEST_JWT_SECRET}", "hunter2${env:TEST_JWT_SECRET}");
    let line = line_of(&text, "hunter2");
    assert_eq!(
        errors_of(&text),
        [format!(
            "test.toml:{line}:10: secrets are never written in clear: use secret = \"${{env:NAME}}\" or secret_file"
        )],
        "a literal around a reference is still a secret in clear"
    );

    let text = base().edit(
        "limits = { max_concurrency = 2 }",
        "limits = { max_concurrency = 0 }",
    );
    let errors = errors_of(&text);
    assert_eq!(
        errors.len(),
        1,
        "reported once, at the provider: {errors:?}"
    );
    assert!(
        errors[0].ends_with("service 'limited': limits.max_concurrency must be at least 1"),
        "{errors:?}"
    );

    let text = base().edit("url = \"sqlite://unused.db\"", "url = \"mysql://nope\"");
    let line = line_of(&text, "mysql://");
    assert_eq!(
        errors_of(&text),
        [format!(
            "test.toml:{line}:7: storage.url: expected 'sqlite://path' or 'postgres://...'"
        )]
    );

    // A reference named only in a trailing comment is not resolved.
    let counters = Arc::new(Counters::default());
    let text = base().edit("[server]", "[server] # was ${env:SOME_OLD_UNSET_VAR}");
    assert!(load(&text, &registry(&counters)).is_ok());
}

#[test]
fn an_rs256_key_from_pem_files_verifies_tokens() {
    let keys = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../providers-security/tests/keys"
    );
    let text = base().edit(
        "algorithm = \"HS256\"\nsecret = \"${env:TEST_JWT_SECRET}\"",
        &format!("kid = \"rsa-1\"\nalgorithm = \"RS256\"\npublic_key_file = \"{keys}/rs256.pub.pem\"\nprivate_key_file = \"{keys}/rs256.key.pem\""),
    );
    let counters = Arc::new(Counters::default());
    let config = load(&text, &registry(&counters)).unwrap_or_else(|e| panic!("{e:?}"));
    let issuer = providers_security::TokenIssuer::new(&config.keys, config.token.clone()).unwrap();
    let token = issuer.mint("ada", "acme", &[], 60).unwrap();
    let verifier =
        providers_security::TokenVerifier::new(&config.keys, config.token.clone()).unwrap();
    assert_eq!(&*verifier.verify(&token).unwrap().tenant, "acme");

    let text = text.edit("rs256.pub.pem", "missing.pem");
    let errors = errors_of(&text);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("public_key_file '") && errors[0].contains("missing.pem'"),
        "{errors:?}"
    );
}

#[test]
fn key_fields_must_fit_their_algorithm() {
    let text = base().edit("algorithm = \"HS256\"", "algorithm = \"RS256\"");
    let errors = errors_of(&text);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].ends_with("RS256: an HS256 key takes secret or secret_file; an RS256 key takes public_key_file and private_key_file"),
        "a secret on an RS256 key is refused, not ignored: {errors:?}"
    );
}

#[test]
fn security_and_server_settings_are_range_checked() {
    let text = base().edit(
        "leeway_seconds = 0",
        "leeway_seconds = 18446744073709551615",
    );
    let line = line_of(&text, "leeway_seconds");
    assert_eq!(
        errors_of(&text),
        [format!(
            "test.toml:{line}:18: security.leeway_seconds: 18446744073709551615 is out of range (at most 600)"
        )],
        "a huge leeway is an error, not a panic"
    );
    let text = base().edit("leeway_seconds = 0", "leeway_seconds = 600");
    let counters = Arc::new(Counters::default());
    assert!(
        load(&text, &registry(&counters)).is_ok(),
        "the edge is allowed"
    );

    let text = base().edit(
        "leeway_seconds = 0",
        "leeway_seconds = 0\nmax_token_bytes = 100",
    );
    let line = line_of(&text, "max_token_bytes");
    assert_eq!(
        errors_of(&text),
        [format!(
            "test.toml:{line}:19: security.max_token_bytes: 100 is out of range (256 to 1048576)"
        )]
    );

    let text = base().edit(
        "connect_backoff_max = \"400ms\"",
        "connect_backoff_max = \"100ms\"\nmax_connections = 0",
    );
    // Checks of a whole setting are placed at the setting the message names, in file order.
    let (backoff, max) = (
        line_of(&text, "connect_backoff ="),
        line_of(&text, "max_connections"),
    );
    assert_eq!(
        errors_of(&text),
        [
            format!(
                "test.toml:{backoff}:19: server.connect_backoff: must not exceed server.connect_backoff_max"
            ),
            format!("test.toml:{max}:19: server.max_connections: must be at least 1"),
        ]
    );
}

#[test]
fn a_mistake_repeated_in_many_tenants_is_reported_once() {
    let mut text = base();
    for i in 0..2000 {
        text.push_str(&format!(
            "\n[tenants.t{i}]\nservices = [\"probe\"]\n[tenants.t{i}.providers.probe]\nlabel = 5\n"
        ));
    }
    let errors = errors_of(&text);
    let line = line_of(&text, "[tenants.t0.providers.probe]");
    assert_eq!(
        errors,
        [format!(
            "test.toml:{line}:1: tenant 't0', service 'probe' config at '/label': 5 is not of type \"string\" (the same in 1999 more tenants: t1, t2, t3, …1996 more)"
        )]
    );
}
