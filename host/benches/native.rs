//! In-process cost of a native plugin call, as ratios against the same logic compiled in,
//! measured in the same run and written to `bench/native-results.md`.
//!
//! Run: `cargo bench -p provider-host --bench native` (it builds `test-plugins/native-fixture`
//! in release first). Three measurements of one action that returns its 256-byte payload:
//! - `compiled in`: `Provider::execute` of a builtin with the same one-line logic;
//! - `FFI, same thread`: the loaded library's `execute` entry called on the caller's thread,
//!   with the host's marshalling (payload to JSON text, result parsed back): the boundary alone;
//! - `native provider`: what the host runs, the same entry on a native pool thread under a
//!   deadline, with the hand-off there and back.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    reason = "a benchmark binary"
)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{ROption, RResult, RStr, RString, RVec};
use providers_core::native::{
    FfiCall, FfiCaller, FfiCaller_TO, FfiEntry, FfiError, FfiExpect, FfiHost, FfiHost_TO,
    PluginModuleRef,
};
use providers_core::semver::{Version, VersionReq};
use providers_core::{
    Action, CallContext, ConnectContext, Descriptor, MemoryStore, Provider, ProviderError,
    Registry, async_trait,
};
use serde_json::{Value, json};

mod support;
use support::measure;

/// The fixture's `ping`, compiled in.
struct Ping;

#[async_trait]
impl Provider for Ping {
    fn descriptor(&self) -> Descriptor {
        Descriptor::new("ping", Version::new(1, 0, 0)).action(Action::new("ping"))
    }
    async fn execute(
        &self,
        _: &str,
        payload: Value,
        _: &CallContext,
    ) -> Result<Value, ProviderError> {
        Ok(payload)
    }
}

/// A 256-byte JSON object, as a purchase-order line would be.
fn payload() -> Value {
    let v = json!({"sku": "A-100-XL", "qty": 42, "warehouse": "north", "unit_price": "12.50", "currency": "EUR",
        "lines": [{"sku": "B-7", "qty": 3}, {"sku": "C-9", "qty": 1}], "note": "x".repeat(107)});
    let text = v.to_string();
    assert!(
        (250..=262).contains(&text.len()),
        "payload is {} bytes",
        text.len()
    );
    v
}

fn target_dir() -> PathBuf {
    std::env::current_exe()
        .unwrap()
        .ancestors()
        .nth(3)
        .unwrap()
        .to_owned()
}

fn build_fixture() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&root)
            .args(["build", "--release", "--quiet", "--target-dir"])
            .arg(target_dir())
            .args(["-p", "native-fixture"])
            .env_remove("FIXTURE_VERSION")
            .env_remove("FIXTURE_CONTRACT")
            .status()
            .unwrap();
    assert!(status.success());
    target_dir().join("release").join(format!(
        "{}native_fixture{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ))
}

/// Capabilities that do nothing: `ping` uses none.
struct NoHost;

impl FfiHost for NoHost {
    fn log(&self, _: u8, _: RStr<'_>, _: RStr<'_>) {}
    fn store_get(&self, _: RStr<'_>) -> RResult<ROption<FfiEntry>, FfiError> {
        RResult::ROk(ROption::RNone)
    }
    fn store_set(&self, _: RStr<'_>, _: RStr<'_>, _: FfiExpect) -> RResult<RString, FfiError> {
        RResult::ROk(RString::new())
    }
    fn store_delete(&self, _: RStr<'_>, _: ROption<RString>) -> RResult<bool, FfiError> {
        RResult::ROk(false)
    }
    fn store_list(&self, _: RStr<'_>, _: RStr<'_>, _: u32) -> RResult<RString, FfiError> {
        RResult::ROk(RString::new())
    }
}

struct NoCalls;

impl FfiCaller for NoCalls {
    fn call(&self, _: RStr<'_>, _: RStr<'_>, _: RStr<'_>) -> RResult<RString, FfiError> {
        RResult::RErr(ProviderError::forbidden("no nested calls here").into())
    }
}

fn main() {
    let library = build_fixture();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ctx = CallContext::new("bench", "bench-request")
        .with_subject("bench")
        .with_roles(vec!["clerk".to_owned()])
        .with_deadline(Some(Instant::now() + Duration::from_secs(3600)));
    let input = payload();

    // 1. Compiled in.
    let ping = Ping;
    let direct = measure(&rt, || async {
        let out = ping.execute("ping", input.clone(), &ctx).await.unwrap();
        std::hint::black_box(out);
    });

    // What the marshalling alone costs: the payload to text and back, twice (in and out).
    let json_only = measure(&rt, || async {
        for _ in 0..2 {
            let text = input.to_string();
            let back: Value = serde_json::from_str(&text).unwrap();
            std::hint::black_box(back);
        }
    });

    // 2. The library's entry on this thread, with the host's marshalling.
    let module = abi_stable::library::lib_header_from_path(&library)
        .unwrap()
        .init_root_module::<PluginModuleRef>()
        .unwrap();
    let mut instance = (module.create())().into_result().unwrap();
    instance
        .connect(
            RStr::from_str("bench"),
            RStr::from_str("fixture"),
            RStr::from_str("{}"),
            FfiHost_TO::from_value(NoHost, TD_Opaque),
        )
        .into_result()
        .unwrap();
    let ffi = measure(&rt, || async {
        let call = FfiCall {
            tenant: ctx.tenant().into(),
            subject: ctx.subject().into(),
            roles: ctx
                .roles()
                .iter()
                .map(|r| RString::from(r.as_str()))
                .collect::<RVec<_>>(),
            request_id: ctx.request_id().into(),
            remaining_ms: 3_600_000,
            caller: FfiCaller_TO::from_value(NoCalls, TD_Opaque),
        };
        let text = input.to_string();
        let out = instance
            .execute(RStr::from_str("ping"), RStr::from_str(&text), call)
            .into_result()
            .unwrap();
        let out: Value = serde_json::from_str(&out).unwrap();
        std::hint::black_box(out);
    });

    // 3. The host's native provider: the same entry on a pool thread, under the deadline.
    let dir = tempfile::tempdir().unwrap();
    let staged = dir.path().join("fixture.so");
    std::fs::copy(&library, &staged).unwrap();
    let sha = provider_host::plugins::manifest::sha256_file(&staged).unwrap();
    std::fs::write(
        dir.path().join("fixture.plugin.toml"),
        format!("name = \"fixture\"\nversion = \"1.0.0\"\nkind = \"native\"\nfile = \"fixture.so\"\nsha256 = \"{sha}\"\ncontract = \"1.0.0\"\n"),
    )
    .unwrap();
    let mut builder = Registry::builder();
    let loaded = provider_host::plugins::load(
        &[dir.path().to_owned()],
        &provider_host::plugins::Engines::new(
            &Default::default(),
            provider_host::plugins::NativePool::new(4, 4),
            false,
        ),
        &mut builder,
        None,
    );
    assert!(loaded.refused.is_empty(), "{:?}", loaded.refused);
    let registry = builder.build();
    let factory = registry.resolve("fixture", &VersionReq::STAR).unwrap();
    let mut provider = factory.create().unwrap();
    rt.block_on(async {
        let c = ConnectContext::new("bench", json!({}))
            .with_service("fixture")
            .with_store(Arc::new(MemoryStore::default()));
        provider.connect(&c).await.unwrap();
    });
    let pooled = measure(&rt, || async {
        let out = provider.execute("ping", input.clone(), &ctx).await.unwrap();
        std::hint::black_box(out);
    });
    assert_eq!(
        rt.block_on(provider.execute("ping", input.clone(), &ctx))
            .unwrap(),
        input,
        "every path returns the payload"
    );

    let (cores, cpu, when) = support::machine();
    let row = |name: &str, ns: f64| {
        format!(
            "| {name} | {ns:.0} | {:.2} | {:+.2} |\n",
            ns / direct,
            (ns - direct) / 1000.0
        )
    };
    let mut entry = format!(
        "## {when}\n\nMachine: {cores} cores, {cpu}. One current-thread runtime; median of 7 batch means of ~100 ms; a 256-byte JSON payload returned as is.\n\n| path | ns per call | × compiled in | µs over compiled in |\n| --- | ---: | ---: | ---: |\n"
    );
    entry.push_str(&row("compiled in: `Provider::execute` (reference)", direct));
    entry.push_str(&row(
        "JSON alone: the payload to text and back, twice (in and out)",
        json_only,
    ));
    entry.push_str(&row(
        "FFI entry on the caller's thread, with the host's JSON marshalling",
        ffi,
    ));
    entry.push_str(&row(
        "native provider as the host runs it: pool thread, deadline, hand-off both ways",
        pooled,
    ));
    entry.push_str(&format!(
        "\nThe boundary itself (FFI and marshalling) costs {:.2} µs; the hand-off to a native pool thread and back adds {:.2} µs more.\n",
        (ffi - direct) / 1000.0,
        (pooled - ffi) / 1000.0
    ));
    print!("{entry}");
    support::record(
        "native-results.md",
        "# Native plugin call results\n\nWritten by `cargo bench -p provider-host --bench native`; newest first. Ratios compare runs made in the same invocation.\n\n",
        &entry,
    );
}
