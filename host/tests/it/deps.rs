//! The crate graph stays as ARCHITECTURE.md says it is. Read from the manifests and
//! `Cargo.lock`, so it needs neither the network nor a build.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// The names under `[dependencies]` (not dev or build) of the workspace member in `folder`.
fn direct(folder: &str) -> BTreeSet<String> {
    dependencies(folder, true)
}

/// Like [`direct`]; `optional` says whether feature-gated dependencies count.
fn dependencies(folder: &str, optional: bool) -> BTreeSet<String> {
    let text = std::fs::read_to_string(root().join(folder).join("Cargo.toml")).unwrap();
    let manifest: toml::Table = toml::from_str(&text).unwrap();
    manifest
        .get("dependencies")
        .and_then(|d| d.as_table())
        .map(|d| {
            d.iter()
                .filter(|(_, spec)| {
                    optional || spec.get("optional").and_then(|o| o.as_bool()) != Some(true)
                })
                .map(|(name, _)| name.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// Every package reachable from `start` through `Cargo.lock`. The lock lists each package's
/// dependencies across all features and targets, so this over-approximates: safe for "never".
fn closure(start: &BTreeSet<String>) -> BTreeSet<String> {
    let text = std::fs::read_to_string(root().join("Cargo.lock")).unwrap();
    let lock: toml::Table = toml::from_str(&text).unwrap();
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for package in lock["package"].as_array().unwrap() {
        let name = package["name"].as_str().unwrap().to_owned();
        let list = package
            .get("dependencies")
            .and_then(|d| d.as_array())
            .cloned()
            .unwrap_or_default();
        // Entries read "name" or "name version" when several versions are locked.
        let names = list
            .iter()
            .map(|d| d.as_str().unwrap().split(' ').next().unwrap().to_owned());
        deps.entry(name).or_default().extend(names);
    }
    let mut seen = BTreeSet::new();
    let mut todo: Vec<String> = start.iter().cloned().collect();
    while let Some(name) = todo.pop() {
        if seen.insert(name.clone()) {
            todo.extend(deps.get(&name).into_iter().flatten().cloned());
        }
    }
    seen
}

#[test]
fn the_crate_graph_keeps_its_invariants() {
    let workspace = [
        "providers-core",
        "providers-security",
        "providers-database",
        "providers-logic",
        "provider-host",
        "native-inventory",
        "native-fixture",
        "xtask",
    ];
    let internal = |folder: &str| -> BTreeSet<String> {
        direct(folder)
            .into_iter()
            .filter(|d| workspace.contains(&d.as_str()))
            .collect()
    };
    assert!(
        internal("providers-core").is_empty(),
        "providers-core depends on no workspace crate"
    );
    for provider_crate in [
        "providers-security",
        "providers-database",
        "providers-logic",
    ] {
        let deps = internal(provider_crate);
        assert!(
            deps.iter().all(|d| d == "providers-core"),
            "{provider_crate} may depend on providers-core only, has {deps:?}"
        );
    }
    assert_eq!(
        internal("host"),
        BTreeSet::from(
            [
                "providers-core",
                "providers-database",
                "providers-logic",
                "providers-security",
            ]
            .map(String::from)
        ),
        "the host depends on every provider crate"
    );
    // Plugin crates (examples, test plugins) and xtask are third-party-shaped: the contract only.
    for plugin in [
        "examples/native-inventory",
        "test-plugins/native-fixture",
        "xtask",
    ] {
        let deps = internal(plugin);
        assert_eq!(
            deps,
            BTreeSet::from(["providers-core".to_owned()]),
            "{plugin} depends on providers-core only"
        );
    }
    // Wasm guests share nothing with the host but the WIT file: no workspace crate, no runtime.
    for guest in ["examples/wasm-pricing", "test-plugins/wasm-fixture"] {
        let deps = dependencies(guest, true);
        assert!(
            deps.iter().all(|d| !workspace.contains(&d.as_str())),
            "{guest} depends on no workspace crate, has {deps:?}"
        );
        let reach = closure(&deps);
        for heavy in ["tokio", "wasmtime", "providers-core"] {
            assert!(!reach.contains(heavy), "{guest} pulls {heavy}");
        }
    }
    // The wasm engine is the host's alone.
    for crate_dir in [
        "providers-core",
        "providers-security",
        "providers-database",
        "providers-logic",
    ] {
        assert!(
            !closure(&dependencies(crate_dir, true)).contains("wasmtime"),
            "{crate_dir} must not pull wasmtime"
        );
    }
    assert!(direct("host").contains("wasmtime"));
    // abi_stable stays behind providers-core's `native` feature and the host's native engine.
    for crate_dir in [
        "providers-security",
        "providers-database",
        "providers-logic",
    ] {
        let text = std::fs::read_to_string(root().join(crate_dir).join("Cargo.toml")).unwrap();
        let manifest: toml::Table = toml::from_str(&text).unwrap();
        let features = manifest["dependencies"]
            .get("providers-core")
            .and_then(|core| core.get("features"));
        assert!(
            features.is_none() && !direct(crate_dir).contains("abi_stable"),
            "{crate_dir} must not pull abi_stable (directly or through providers-core/native)"
        );
    }
    assert!(dependencies("providers-core", true).contains("abi_stable"));
    // The default build of the contract: what a builtin or wasm author pays for.
    let core = closure(&dependencies("providers-core", false));
    assert!(
        core.contains("serde_json"),
        "the closure is computed: {core:?}"
    );
    for heavy in [
        "tokio",
        "axum",
        "hyper",
        "sqlx",
        "wasmtime",
        "anyhow",
        "jsonschema",
        "abi_stable",
    ] {
        assert!(
            !core.contains(heavy),
            "providers-core must stay light, but pulls {heavy}"
        );
    }
}
