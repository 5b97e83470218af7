//! Test plugins built from source in this repository, once per test run, and staged with
//! manifests the way `cargo xtask plugins` stages them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The built plugin files, one per variant, in a folder of their own.
pub struct Built {
    pub dir: PathBuf,
}

impl Built {
    /// `inventory.so`, `fixture-1.0.0.so`, `fixture-1.1.0.so`, `fixture-contract2.so`, `fixture-abort.so`.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir
            .join(format!("{name}{}", std::env::consts::DLL_SUFFIX))
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `target/` of this test binary: `target/debug/deps/it-…` sits three levels down.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary has a path");
    exe.ancestors()
        .nth(3)
        .expect("the test binary sits in target/<profile>/deps")
        .to_owned()
}

fn lib(name: &str) -> String {
    format!(
        "{}{name}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    )
}

fn cargo(args: &[&str], env: &[(&str, &str)]) {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // The target dir before the arguments: `cargo rustc` passes what follows `--` to rustc.
    cmd.current_dir(workspace())
        .arg(args[0])
        .arg("--target-dir")
        .arg(target_dir())
        .args(&args[1..])
        .env_remove("FIXTURE_VERSION")
        .env_remove("FIXTURE_CONTRACT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let status = cmd
        .status()
        .expect("running cargo to build the test plugins");
    assert!(
        status.success(),
        "building the test plugins failed: {args:?} {env:?}"
    );
}

/// Builds every variant once per test process (the same dev profile and target as the
/// tests, so dependencies are shared with the test build).
pub fn built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = target_dir().join("test-plugins");
        std::fs::create_dir_all(&dir).unwrap();
        let profile = target_dir().join("debug");
        let keep = |from: &str, to: &str| {
            let dest = dir.join(format!("{to}{}", std::env::consts::DLL_SUFFIX));
            let _ = std::fs::remove_file(&dest);
            std::fs::copy(profile.join(lib(from)), &dest).unwrap();
        };
        cargo(
            &[
                "build",
                "--quiet",
                "-p",
                "native-inventory",
                "-p",
                "native-fixture",
            ],
            &[],
        );
        keep("native_inventory", "inventory");
        keep("native_fixture", "fixture-1.0.0");
        cargo(
            &["build", "--quiet", "-p", "native-fixture"],
            &[("FIXTURE_VERSION", "1.1.0")],
        );
        keep("native_fixture", "fixture-1.1.0");
        cargo(
            &["build", "--quiet", "-p", "native-fixture"],
            &[("FIXTURE_CONTRACT", "2.0.0")],
        );
        keep("native_fixture", "fixture-contract2");
        cargo(
            &[
                "rustc",
                "--quiet",
                "-p",
                "native-fixture",
                "--lib",
                "--",
                "-C",
                "panic=abort",
            ],
            &[],
        );
        keep("native_fixture", "fixture-abort");
        Built { dir }
    })
}

/// Copies `file` into `dir` as `stage_as` and writes its native manifest; returns the manifest path.
pub fn stage(
    dir: &Path,
    file: &Path,
    name: &str,
    version: &str,
    contract: &str,
    stage_as: &str,
) -> PathBuf {
    stage_kind(dir, file, "native", name, version, contract, stage_as)
}

/// [`stage`] for any kind: the manifest `cargo xtask plugins` would write.
fn stage_kind(
    dir: &Path,
    file: &Path,
    kind: &str,
    name: &str,
    version: &str,
    contract: &str,
    stage_as: &str,
) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let dest = dir.join(stage_as);
    std::fs::copy(file, &dest).unwrap();
    let sha = provider_host::plugins::manifest::sha256_file(&dest).unwrap();
    let stem = Path::new(stage_as).file_stem().unwrap().to_string_lossy();
    let manifest = dir.join(format!("{stem}.plugin.toml"));
    std::fs::write(
        &manifest,
        format!(
            "name = \"{name}\"\nversion = \"{version}\"\nkind = \"{kind}\"\nfile = \"{stage_as}\"\nsha256 = \"{sha}\"\ncontract = \"{contract}\"\n"
        ),
    )
    .unwrap();
    manifest
}

/// A plugin folder with the inventory example and fixture 1.0.0 and 1.1.0.
pub fn standard(dir: &Path) {
    let b = built();
    stage(
        dir,
        &b.file("inventory"),
        "inventory",
        "1.0.0",
        "1.0.0",
        "inventory.so",
    );
    stage(
        dir,
        &b.file("fixture-1.0.0"),
        "fixture",
        "1.0.0",
        "1.0.0",
        "fixture-1.0.0.so",
    );
    stage(
        dir,
        &b.file("fixture-1.1.0"),
        "fixture",
        "1.1.0",
        "1.0.0",
        "fixture-1.1.0.so",
    );
}

/// The wasm guests (`wasm-fixture`, `wasm-pricing`), built once per test process for
/// `wasm32-wasip2` with the `guest` profile `cargo xtask plugins` uses.
pub fn wasm_built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = target_dir().join("test-plugins-wasm");
        std::fs::create_dir_all(&dir).unwrap();
        cargo(
            &[
                "build",
                "--quiet",
                "--profile",
                "guest",
                "--target",
                "wasm32-wasip2",
                "-p",
                "wasm-fixture",
                "-p",
                "wasm-pricing",
            ],
            &[],
        );
        let out = target_dir().join("wasm32-wasip2").join("guest");
        for (from, to) in [("wasm_fixture", "fixture"), ("wasm_pricing", "pricing")] {
            let dest = dir.join(format!("{to}.wasm"));
            let _ = std::fs::remove_file(&dest);
            std::fs::copy(out.join(format!("{from}.wasm")), &dest).unwrap();
        }
        Built { dir }
    })
}

/// Stages a wasm component with its manifest; returns the manifest path.
pub fn stage_wasm(dir: &Path, file: &Path, name: &str, version: &str, stage_as: &str) -> PathBuf {
    stage_kind(dir, file, "wasm", name, version, "1.0.0", stage_as)
}
