//! What `provider-host plugins list|inspect|new` report and write; `main.rs` prints it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use providers_core::is_valid_name;

use super::{PluginKind, discovery, manifest, native, wasm};

/// One line per manifest in `dirs`: name, version, kind, file, whether the hash matches,
/// and whether it would load (running only the checks and `describe`).
pub fn list(dirs: &[PathBuf]) -> String {
    let mut out = String::new();
    let mut any = false;
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            let _ = writeln!(out, "{}: no such folder", dir.display());
            continue;
        };
        let mut manifests: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().ends_with(manifest::SUFFIX))
            .collect();
        manifests.sort();
        for path in manifests {
            any = true;
            let line = match discovery::check(&path) {
                Err(r) => format!(
                    "{:<16} {:<9} {:<7} {}  refused: {}",
                    r.name,
                    r.version.as_deref().unwrap_or("?"),
                    manifest::read(&path)
                        .map(|m| m.kind.as_str())
                        .unwrap_or("?"),
                    r.file.display(),
                    r.reason
                ),
                Ok(c) => {
                    let verdict = match c.manifest.kind {
                        PluginKind::Native => match native::open(&c.file)
                            .and_then(|lib| super::agrees(&c.manifest, &lib.descriptor))
                        {
                            Ok(()) => "hash ok, loadable".to_owned(),
                            Err(e) => format!("hash ok, refused: {e}"),
                        },
                        PluginKind::Wasm => match describe_wasm(&c.file)
                            .and_then(|(d, _)| super::agrees(&c.manifest, &d))
                        {
                            Ok(()) => "hash ok, loadable".to_owned(),
                            Err(e) => format!("hash ok, refused: {e}"),
                        },
                    };
                    format!(
                        "{:<16} {:<9} {:<7} {}  {verdict}",
                        c.manifest.name,
                        c.manifest.version,
                        c.manifest.kind.as_str(),
                        c.file.display()
                    )
                }
            };
            out.push_str(&line);
            out.push('\n');
        }
    }
    if !any {
        out.push_str("no plugins found\n");
    }
    out
}

/// An engine for looking at components outside a running host: a small pool, no cache
/// folder shared with one (compiled artifacts go to a private temporary folder).
fn inspection_engine() -> Result<std::sync::Arc<wasm::WasmEngine>, String> {
    wasm::WasmEngine::shared(&wasm::WasmSettings {
        memory: 64 << 20,
        instances: 4,
        per_tenant: 1,
        cache_dir: std::env::temp_dir()
            .join(format!("provider-host-inspect-{}", std::process::id())),
        http_max_body: 0,
        fuel: false,
    })
}

/// Compiles and describes the component at `file`; also its imports.
fn describe_wasm(file: &Path) -> Result<(providers_core::Descriptor, Vec<String>), String> {
    let engine = inspection_engine()?;
    let (component, imports) = engine.compile_uncached(file)?;
    let prepared = engine.prepare_blocking(&component)?;
    Ok((prepared.descriptor, imports))
}

fn is_wasm(file: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(file)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && &magic == b"\0asm"
}

/// The build facts and descriptor of the native library at `file`, or the descriptor and
/// imports of the wasm component at `file`, as pretty JSON.
pub fn inspect(file: &Path) -> Result<String, String> {
    if is_wasm(file) {
        let (descriptor, imports) = describe_wasm(file)?;
        let report = serde_json::json!({
            "file": file.display().to_string(),
            "sha256": manifest::sha256_file(file).map_err(|e| e.to_string())?,
            "kind": "wasm",
            "imports": imports,
            "descriptor": descriptor,
        });
        return serde_json::to_string_pretty(&report).map_err(|e| e.to_string());
    }
    let loaded = native::open(file)?;
    let f = &loaded.facts;
    let report = serde_json::json!({
        "file": file.display().to_string(),
        "sha256": manifest::sha256_file(file).map_err(|e| e.to_string())?,
        "kind": "native",
        "build": {
            "contract": f.contract.as_str(),
            "providers_core": f.core.as_str(),
            "abi_stable": f.abi_stable.as_str(),
            "rustc": f.rustc.as_str(),
            "target": f.target.as_str(),
            "panic": if f.panic_unwind { "unwind" } else { "abort" },
        },
        "descriptor": loaded.descriptor,
    });
    serde_json::to_string_pretty(&report).map_err(|e| e.to_string())
}

/// Writes a ready-to-build plugin crate for `name` into `dir` (which must not exist);
/// `core` is the Cargo dependency spec of providers-core (a path or a version).
pub fn new(kind: PluginKind, name: &str, dir: &Path, core: &str) -> Result<Vec<PathBuf>, String> {
    if !is_valid_name(name) {
        return Err(format!(
            "invalid name '{name}' (expected 1-64 of a-z, 0-9, '_', '-', starting with a letter)"
        ));
    }
    if dir.exists() {
        return Err(format!("{} already exists", dir.display()));
    }
    let crate_name = format!("{name}-provider");
    let type_name: String = name
        .split(['-', '_'])
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut c = p.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect();
    let fill = |t: &str| {
        t.replace("{crate}", &crate_name)
            .replace("{name}", name)
            .replace("{lib}", &crate_name.replace('-', "_"))
            .replace("{type_name}", &type_name)
            .replace("{core}", core)
    };
    let files = match kind {
        PluginKind::Native => vec![
            (
                dir.join("Cargo.toml"),
                fill(include_str!("template/native.Cargo.toml")),
            ),
            (
                dir.join("src/lib.rs"),
                fill(include_str!("template/native.lib.rs")),
            ),
        ],
        // The component carries its own copy of the contract it was built against.
        PluginKind::Wasm => vec![
            (
                dir.join("Cargo.toml"),
                fill(include_str!("template/wasm.Cargo.toml")),
            ),
            (
                dir.join("src/lib.rs"),
                fill(include_str!("template/wasm.lib.rs")),
            ),
            (
                dir.join("wit/provider.wit"),
                include_str!("../../../providers-core/wit/provider.wit").to_owned(),
            ),
        ],
    };
    for sub in ["src", "wit"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    for (path, text) in &files {
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(files.into_iter().map(|(p, _)| p).collect())
}
