//! `cargo xtask plugins [--out DIR] [--dev]` builds every example plugin and stages it with
//! its manifest (real sha256) in DIR (default `plugins/`); `cargo xtask demo [ARGS]` stages
//! them and runs `provider-host serve` on the embedded demo, passing ARGS on.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use serde::Deserialize;
use sha2::{Digest, Sha256};

#[derive(Deserialize)]
struct Manifest {
    package: Package,
}

#[derive(Deserialize)]
struct Package {
    name: String,
    version: String,
    #[serde(default)]
    metadata: Option<Metadata>,
}

#[derive(Deserialize)]
struct Metadata {
    provider: Option<ProviderMeta>,
}

#[derive(Deserialize)]
struct ProviderMeta {
    name: String,
    kind: String,
}

/// An example plugin crate under `examples/`.
struct Example {
    crate_name: String,
    version: String,
    meta: ProviderMeta,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn examples(root: &Path) -> Result<Vec<Example>, String> {
    let mut out = Vec::new();
    let dir = root.join("examples");
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| format!("reading {}: {e}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path().join("Cargo.toml"))
        .filter(|p| p.exists())
        .collect();
    entries.sort();
    for path in entries {
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let m: Manifest = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some(meta) = m.package.metadata.and_then(|m| m.provider) {
            out.push(Example {
                crate_name: m.package.name,
                version: m.package.version,
                meta,
            });
        }
    }
    Ok(out)
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

fn sha256(path: &Path) -> Result<String, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let status = cmd.status().map_err(|e| format!("running {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed: {status}"))
    }
}

/// The WebAssembly target guests are built for, added with rustup when missing.
const WASM_TARGET: &str = "wasm32-wasip2";

fn ensure_wasm_target() -> Result<(), String> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == WASM_TARGET)
        })
        .unwrap_or(false);
    if installed {
        return Ok(());
    }
    eprintln!("adding the {WASM_TARGET} target (once)");
    run(Command::new("rustup").args(["target", "add", WASM_TARGET]))
}

/// Builds every example plugin and writes it, with its manifest, into `out`: native ones
/// with the host's profile, wasm ones for `wasm32-wasip2` with the `guest` profile.
fn plugins(out: &Path, release: bool) -> Result<(), String> {
    let root = root();
    let examples = examples(&root)?;
    let of_kind =
        |kind: &str| -> Vec<&Example> { examples.iter().filter(|e| e.meta.kind == kind).collect() };
    let (native, wasm) = (of_kind("native"), of_kind("wasm"));
    if !native.is_empty() {
        let mut build = cargo();
        build.current_dir(&root).arg("build").arg("--locked");
        if release {
            build.arg("--release");
        }
        for e in &native {
            build.arg("-p").arg(&e.crate_name);
        }
        run(&mut build)?;
    }
    if !wasm.is_empty() {
        ensure_wasm_target()?;
        let mut build = cargo();
        build.current_dir(&root).args([
            "build",
            "--locked",
            "--profile",
            "guest",
            "--target",
            WASM_TARGET,
        ]);
        for e in &wasm {
            build.arg("-p").arg(&e.crate_name);
        }
        run(&mut build)?;
    }
    std::fs::create_dir_all(out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    let profile = if release { "release" } else { "debug" };
    for e in &examples {
        let (built, suffix) = match e.meta.kind.as_str() {
            "wasm" => (
                target_dir(&root)
                    .join(WASM_TARGET)
                    .join("guest")
                    .join(format!("{}.wasm", e.crate_name.replace('-', "_"))),
                ".wasm",
            ),
            _ => (
                target_dir(&root).join(profile).join(format!(
                    "{}{}{}",
                    std::env::consts::DLL_PREFIX,
                    e.crate_name.replace('-', "_"),
                    std::env::consts::DLL_SUFFIX
                )),
                std::env::consts::DLL_SUFFIX,
            ),
        };
        let file = format!("{}-{}{suffix}", e.meta.name, e.version);
        let staged = out.join(&file);
        // Replace rather than overwrite in place: a running host may have the old file mapped.
        let _ = std::fs::remove_file(&staged);
        std::fs::copy(&built, &staged)
            .map_err(|err| format!("copying {} to {}: {err}", built.display(), staged.display()))?;
        let manifest = format!(
            "# Written by `cargo xtask plugins`; the host refuses the file if its hash differs.\n\
             name = \"{}\"\nversion = \"{}\"\nkind = \"{}\"\nfile = \"{file}\"\nsha256 = \"{}\"\ncontract = \"{}\"\n",
            e.meta.name,
            e.version,
            e.meta.kind,
            sha256(&staged)?,
            providers_core::CONTRACT_VERSION,
        );
        let path = out.join(format!("{}.plugin.toml", e.meta.name));
        std::fs::write(&path, manifest).map_err(|err| format!("{}: {err}", path.display()))?;
        eprintln!(
            "staged {} {} ({}) in {}",
            e.meta.name,
            e.version,
            e.meta.kind,
            out.display()
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("plugins") => {
            let mut out = PathBuf::from("plugins");
            let mut release = true;
            let mut rest = args[1..].iter();
            let mut bad = None;
            while let Some(a) = rest.next() {
                match a.as_str() {
                    "--out" => match rest.next() {
                        Some(d) => out = PathBuf::from(d),
                        None => bad = Some("--out needs a folder".to_owned()),
                    },
                    "--dev" => release = false,
                    other => bad = Some(format!("unknown argument '{other}'")),
                }
            }
            match bad {
                Some(e) => Err(e),
                None => plugins(&out, release),
            }
        }
        Some("demo") => plugins(Path::new("plugins"), true).and_then(|()| {
            run(cargo()
                .args([
                    "run",
                    "--release",
                    "--locked",
                    "-p",
                    "provider-host",
                    "--",
                    "serve",
                ])
                .args(&args[1..]))
        }),
        _ => Err(
            "usage: cargo xtask plugins [--out DIR] [--dev] | cargo xtask demo [serve args]".into(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}
