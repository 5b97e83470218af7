//! Registry checks, error codes and call-context rules.

use std::sync::Arc;

use semver::{Version, VersionReq};
use serde_json::{Value, json};

use super::*;

struct Fake(Descriptor);

#[async_trait]
impl Provider for Fake {
    fn descriptor(&self) -> Descriptor {
        self.0.clone()
    }
    async fn execute(&self, _: &str, p: Value, _: &CallContext) -> Result<Value, ProviderError> {
        Ok(p)
    }
}

fn factory(d: Descriptor, origin: &str) -> Arc<dyn Factory> {
    Arc::new(FnFactory::new(origin, move || {
        Box::new(Fake(d.clone())) as Box<dyn Provider>
    }))
}

fn desc(service: &str, version: &str) -> Descriptor {
    Descriptor::new(service, Version::parse(version).unwrap())
}

#[test]
fn contract_constant_and_parsed_version_agree() {
    assert_eq!(
        contract_version(),
        Version::parse(CONTRACT_VERSION).unwrap()
    );
}

#[test]
fn contract_compatibility_is_caret() {
    let host = Version::new(1, 3, 0);
    assert!(contract_compatible(&Version::new(1, 0, 0), &host));
    assert!(contract_compatible(&Version::new(1, 3, 0), &host));
    assert!(
        !contract_compatible(&Version::new(1, 4, 0), &host),
        "provider needs a newer host"
    );
    assert!(!contract_compatible(&Version::new(2, 0, 0), &host));
    assert!(!contract_compatible(&Version::new(0, 9, 0), &host));
    assert!(!contract_compatible(
        &Version::new(0, 1, 0),
        &Version::new(0, 2, 0)
    ));
}

#[test]
fn registry_refuses_incompatible_contract_with_names_and_versions() {
    let mut b = RegistryBuilder::new(Version::new(1, 0, 0));
    let d = desc("inv", "3.1.0").contract_version(Version::new(2, 0, 0));
    let err = b.add(factory(d, "plugins/inv.so")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "provider 'inv' 3.1.0 from plugins/inv.so was built for contract 2.0.0, which is not compatible with this host's contract 1.0.0 (caret rule)"
    );
    assert_eq!(b.build().services().count(), 0, "nothing was added");
}

#[test]
fn registry_refuses_duplicates_but_keeps_versions_side_by_side() {
    let mut b = Registry::builder();
    b.add(factory(desc("kv", "1.2.0"), "a")).unwrap();
    b.add(factory(desc("kv", "1.10.0"), "b")).unwrap();
    b.add(factory(desc("kv", "2.0.0"), "c")).unwrap();
    let err = b.add(factory(desc("kv", "1.2.0"), "d")).unwrap_err();
    assert_eq!(
        err,
        RegistryError::Duplicate {
            service: "kv".into(),
            version: "1.2.0".into(),
            first: "a".into(),
            second: "d".into()
        }
    );
    let r = b.build();
    let pick = |req: &str| {
        r.resolve("kv", &VersionReq::parse(req).unwrap())
            .map(|f| f.descriptor().version.to_string())
    };
    assert_eq!(pick("^1").unwrap(), "1.10.0", "highest match wins");
    assert_eq!(pick("^1.2, <1.3").unwrap(), "1.2.0");
    assert_eq!(pick("*").unwrap(), "2.0.0");
    assert_eq!(
        pick("^3").unwrap_err().to_string(),
        "service 'kv': no loaded version matches '^3' (loaded: 1.2.0, 1.10.0, 2.0.0)"
    );
    assert_eq!(
        r.resolve("nope", &VersionReq::STAR)
            .err()
            .unwrap()
            .to_string(),
        "no provider offers service 'nope' (available: kv)"
    );
}

#[test]
fn registry_checks_names() {
    let mut b = Registry::builder();
    let err = b.add(factory(desc("Bad Name", "1.0.0"), "x")).unwrap_err();
    assert!(matches!(err, RegistryError::InvalidName { .. }), "{err}");
    let d = desc("ok", "1.0.0")
        .action(Action::new("get"))
        .action(Action::new("get"));
    let err = b.add(factory(d, "x")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "provider 'ok' from x: action 'get' is declared twice"
    );
    assert!(is_valid_name("kv"));
    assert!(is_valid_name("bulk_get"));
    assert!(!is_valid_name("9kv"));
    assert!(!is_valid_name(""));
    assert!(!is_valid_name(&"a".repeat(65)));
}

#[test]
fn permissions_default_to_service_dot_action_and_are_checked() {
    let d = desc("inventory", "1.0.0")
        .action(Action::new("get"))
        .action(Action::new("adjust").permission("inventory.write"));
    assert_eq!(
        d.actions[0].permission, "inventory.get",
        "not the bare 'get'"
    );
    assert_eq!(d.actions[1].permission, "inventory.write");

    for bad in [
        "", "Kv.read", "kv.*", "kv..read", ".kv", "kv read", "9kv.read",
    ] {
        let mut d = desc("kv", "1.0.0").action(Action::new("get"));
        d.actions[0].permission = bad.to_owned();
        let err = Registry::builder().add(factory(d, "x")).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "provider 'kv' from x: action 'get' needs invalid permission '{bad}' (expected dot-separated segments of a-z, 0-9, '_', '-', such as 'kv.get')"
            ),
        );
    }
    assert!(is_valid_permission("purchase-orders.amend"));
    assert!(is_valid_permission("kv"));
    assert!(!is_valid_permission(&"a".repeat(129)));
}

#[test]
fn error_codes_have_stable_wire_names() {
    let names: Vec<_> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(
        names,
        [
            "VALIDATION_ERROR",
            "UNAUTHENTICATED",
            "FORBIDDEN",
            "NOT_FOUND",
            "CONFLICT",
            "RATE_LIMITED",
            "TIMEOUT",
            "PROVIDER_UNAVAILABLE",
            "PROVIDER_ERROR",
            "INTERNAL"
        ]
    );
    for code in ErrorCode::ALL {
        assert_eq!(serde_json::to_value(code).unwrap(), json!(code.as_str()));
    }
}

#[tokio::test]
async fn nested_calls_reach_peers_and_stop_at_max_depth() {
    struct Loop;
    #[async_trait]
    impl Provider for Loop {
        fn descriptor(&self) -> Descriptor {
            desc("loop", "1.0.0").action(Action::new("again"))
        }
        async fn execute(
            &self,
            _: &str,
            _: Value,
            ctx: &CallContext,
        ) -> Result<Value, ProviderError> {
            ctx.call("loop", "again", json!({})).await
        }
    }
    let mut host = testing::TestHost::builder(Loop)
        .peer(Loop)
        .connect()
        .await
        .unwrap();
    let err = host.call("again", json!({})).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Forbidden);
    assert_eq!(
        err.detail,
        format!("provider calls nest deeper than {MAX_CALL_DEPTH} levels")
    );
    host.disconnect().await.unwrap();
}

#[tokio::test]
async fn a_provider_cannot_change_who_calls_or_extend_its_deadline() {
    struct Escalate;
    #[async_trait]
    impl Provider for Escalate {
        fn descriptor(&self) -> Descriptor {
            desc("escalate", "1.0.0").action(Action::new("go"))
        }
        async fn execute(
            &self,
            _: &str,
            _: Value,
            ctx: &CallContext,
        ) -> Result<Value, ProviderError> {
            let forged = ctx.clone().with_roles(vec!["admin".to_owned()]);
            forged.call("escalate", "go", json!({})).await
        }
    }
    let mut host = testing::TestHost::builder(Escalate)
        .peer(Escalate)
        .connect()
        .await
        .unwrap();
    let err = host.call("go", json!({})).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::ProviderUnavailable);
    assert_eq!(
        err.detail,
        "no caller in this context to reach 'escalate/go'"
    );
    host.disconnect().await.unwrap();

    let soon = std::time::Instant::now() + std::time::Duration::from_secs(1);
    let ctx = host_ctx().with_deadline(Some(soon));
    let later = ctx
        .clone()
        .with_deadline(Some(soon + std::time::Duration::from_secs(60)));
    assert_eq!(later.deadline(), Some(soon));
    assert_eq!(ctx.clone().with_deadline(None).deadline(), Some(soon));
}

fn host_ctx() -> CallContext {
    struct Nobody;
    #[async_trait]
    impl Caller for Nobody {
        async fn call(
            &self,
            _: &CallContext,
            _: &str,
            _: &str,
            _: Value,
        ) -> Result<Value, ProviderError> {
            Ok(Value::Null)
        }
    }
    CallContext::new("t", "r").with_caller(Arc::new(Nobody))
}
