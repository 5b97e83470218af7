//! The crate graph stays as ARCHITECTURE.md says it is.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;

struct Graph {
    names: BTreeMap<String, String>,
    /// Normal (non-dev, non-build) dependencies, by package id.
    edges: BTreeMap<String, Vec<String>>,
}

fn graph() -> Graph {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--locked",
            "--offline",
            "--all-features",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap().to_owned(),
                p["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let edges = meta["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let deps = n["deps"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| {
                    d["dep_kinds"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|k| k["kind"].is_null())
                })
                .map(|d| d["pkg"].as_str().unwrap().to_owned())
                .collect();
            (n["id"].as_str().unwrap().to_owned(), deps)
        })
        .collect();
    Graph { names, edges }
}

impl Graph {
    fn id(&self, name: &str) -> String {
        self.names
            .iter()
            .find(|(_, n)| *n == name)
            .unwrap()
            .0
            .clone()
    }

    fn direct(&self, name: &str) -> BTreeSet<String> {
        self.edges[&self.id(name)]
            .iter()
            .map(|id| self.names[id].clone())
            .collect()
    }

    fn tree(&self, name: &str) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![self.id(name)];
        while let Some(id) = todo.pop() {
            for dep in &self.edges[&id] {
                if seen.insert(self.names[dep].clone()) {
                    todo.push(dep.clone());
                }
            }
        }
        seen
    }
}

#[test]
fn the_crate_graph_keeps_its_invariants() {
    let g = graph();
    let workspace = [
        "providers-core",
        "providers-security",
        "providers-database",
        "provider-host",
        "loadtest",
    ];
    let internal = |name: &str| -> BTreeSet<String> {
        g.direct(name)
            .into_iter()
            .filter(|d| workspace.contains(&d.as_str()))
            .collect()
    };
    assert!(
        internal("providers-core").is_empty(),
        "providers-core depends on no workspace crate"
    );
    for provider_crate in ["providers-security", "providers-database"] {
        let deps = internal(provider_crate);
        assert!(
            deps.iter().all(|d| d == "providers-core"),
            "{provider_crate} may depend on providers-core only, has {deps:?}"
        );
    }
    assert_eq!(
        internal("provider-host"),
        BTreeSet::from(
            ["providers-core", "providers-database", "providers-security"].map(String::from)
        ),
        "the host depends on every provider crate"
    );
    let core = g.tree("providers-core");
    for heavy in ["tokio", "axum", "hyper", "sqlx", "wasmtime", "anyhow"] {
        assert!(
            !core.contains(heavy),
            "providers-core must stay light, but pulls {heavy}"
        );
    }
}
