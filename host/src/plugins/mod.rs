//! Plugins: providers loaded at run time from `[plugins] dirs`, native or wasm, through one
//! path. `manifest` and `discovery` check what a file is before it is opened; `capabilities`
//! is what every plugin gets from the host; each engine (`native`, `wasm`) only adapts those
//! to its boundary and hands the registry a `Factory`. Nothing above this module knows an
//! engine.

pub mod capabilities;
pub mod cli;
pub mod discovery;
pub mod manifest;
pub mod native;
mod threads;
pub mod wasm;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use providers_core::RegistryBuilder;

pub use discovery::{Candidate, Refusal};
pub use manifest::{Manifest, PluginKind};
pub use native::NativePool;

/// What loading the plugin folders gave: every plugin accepted into the registry, every
/// one refused with its reason, and the factories by [`Engines::key`], so that loading the
/// same folders again (a reload) keeps the factory of every file that did not change.
#[derive(Default, Clone)]
pub struct Loaded {
    /// Accepted: service, version, kind, file.
    pub accepted: Vec<(String, String, PluginKind, PathBuf)>,
    /// Refused, with why.
    pub refused: Vec<Refusal>,
    /// The accepted factories, by file, hash and engine settings.
    pub factories: HashMap<String, Arc<dyn providers_core::Factory>>,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("accepted", &self.accepted)
            .field("refused", &self.refused)
            .finish_non_exhaustive()
    }
}

impl Loaded {
    /// The refusals of plugin `name`, newest manifest order.
    pub fn refusals_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Refusal> + 'a {
        self.refused.iter().filter(move |r| r.name == name)
    }
}

/// The engines plugins run in. The wasm engine starts with the first wasm plugin: a host
/// that loads none reserves no instance pool and runs no epoch ticker.
pub struct Engines {
    native: NativePool,
    wasm_settings: wasm::WasmSettings,
    wasm: OnceLock<Result<Arc<wasm::WasmEngine>, String>>,
}

impl Engines {
    /// Engines from `[plugins]`; `fuel` when some limit meters fuel.
    pub fn new(config: &crate::config::PluginsConfig, native: NativePool, fuel: bool) -> Self {
        Self {
            native,
            wasm_settings: wasm::WasmSettings {
                memory: config.wasm_memory,
                instances: config.wasm_instances.max(1),
                per_tenant: config.wasm_instances_per_tenant.max(1),
                cache_dir: config.cache_dir.clone(),
                http_max_body: config.http_max_response_bytes,
                fuel,
            },
            wasm: OnceLock::new(),
        }
    }

    /// The wasm engine, started on first use.
    pub fn wasm(&self) -> Result<Arc<wasm::WasmEngine>, String> {
        self.wasm
            .get_or_init(|| wasm::WasmEngine::shared(&self.wasm_settings))
            .clone()
    }

    /// `[plugins] http_max_response_bytes`.
    pub fn http_max_body(&self) -> u64 {
        self.wasm_settings.http_max_body
    }

    /// The native pool.
    pub fn native(&self) -> &NativePool {
        &self.native
    }

    /// What identifies a loaded plugin across loads: its file, its hash and the settings of
    /// the engine it runs in. Equal keys mean the factory already loaded can serve again.
    fn key(&self, c: &Candidate) -> String {
        let engine = match c.manifest.kind {
            PluginKind::Native => format!("{:?}", self.native.settings()),
            PluginKind::Wasm => format!("{:?}", self.wasm_settings),
        };
        format!(
            "{:?}|{}|{}|{engine}",
            c.manifest.kind,
            c.file.display(),
            c.manifest.sha256.trim().to_ascii_lowercase()
        )
    }
}

/// Discovers, verifies and loads every plugin in `dirs`, adding each accepted one to
/// `registry`. A plugin that fails any check is refused, never half-loaded. A plugin whose
/// file, hash and engine settings match one in `previous` reuses that factory: a reload
/// neither maps a native library again nor restarts the instances of an unchanged plugin.
pub fn load(
    dirs: &[PathBuf],
    engines: &Engines,
    registry: &mut RegistryBuilder,
    previous: Option<&Loaded>,
) -> Loaded {
    let pool = &engines.native;
    let (candidates, mut refused) = discovery::discover(dirs);
    let mut accepted = Vec::new();
    let mut factories = HashMap::new();
    for c in candidates {
        let m = &c.manifest;
        let refuse = |reason: String| Refusal {
            name: m.name.clone(),
            version: Some(m.version.to_string()),
            file: c.file.clone(),
            reason,
        };
        if registry.has_builtin(&m.name) {
            refused.push(refuse(format!(
                "'{}' is the name of a builtin provider; a plugin cannot replace it",
                m.name
            )));
            continue;
        }
        let key = engines.key(&c);
        let kept = previous.and_then(|p| p.factories.get(&key)).cloned();
        let factory: Arc<dyn providers_core::Factory> = match (kept, m.kind) {
            (Some(factory), _) => factory,
            (None, PluginKind::Native) => match verified_copy(&c).and_then(|copy| copy.open()) {
                Ok(lib) => match agrees(m, &lib.descriptor) {
                    Ok(()) => Arc::new(native::NativeFactory::new(&c, lib, pool.clone())),
                    Err(reason) => {
                        refused.push(refuse(reason));
                        continue;
                    }
                },
                Err(reason) => {
                    refused.push(refuse(reason));
                    continue;
                }
            },
            (None, PluginKind::Wasm) => match load_wasm(&c, engines) {
                Ok(factory) => Arc::new(factory),
                Err(reason) => {
                    refused.push(refuse(reason));
                    continue;
                }
            },
        };
        match registry.add(factory.clone()) {
            Ok(()) => {
                factories.insert(key, factory);
                accepted.push((
                    m.name.clone(),
                    m.version.to_string(),
                    m.kind,
                    c.file.clone(),
                ));
            }
            Err(e) => refused.push(refuse(e.to_string())),
        }
    }
    for r in &refused {
        tracing::warn!(plugin = %r.name, file = %r.file.display(), reason = ?r.reason, "plugin refused");
    }
    Loaded {
        accepted,
        refused,
        factories,
    }
}

/// Compiles (or takes from the cache) and links a wasm candidate, from a verified copy.
fn load_wasm(c: &Candidate, engines: &Engines) -> Result<wasm::WasmFactory, String> {
    let engine = engines.wasm()?;
    let copy = verified_copy(c)?;
    let (component, origin) = engine.component(&copy.file, &c.manifest.sha256)?;
    tracing::debug!(plugin = %c.manifest.name, ?origin, "wasm component ready");
    let prepared = engine.prepare_blocking(&component)?;
    agrees(&c.manifest, &prepared.descriptor)?;
    Ok(wasm::WasmFactory::new(c, engine, prepared))
}

/// A host-private copy of a candidate's file whose hash was checked again after copying:
/// what is loaded is exactly what was hashed, even if the plugin folder changes meanwhile.
struct VerifiedCopy {
    dir: PathBuf,
    file: PathBuf,
}

fn verified_copy(c: &Candidate) -> Result<VerifiedCopy, String> {
    let dir = std::env::temp_dir().join(format!(
        "provider-host-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    let mut builder = std::fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(&dir)
        .map_err(|e| format!("cannot make a private copy: {e}"))?;
    let file = dir.join(c.file.file_name().unwrap_or_default());
    let copy = VerifiedCopy { dir, file };
    std::fs::copy(&c.file, &copy.file).map_err(|e| format!("cannot make a private copy: {e}"))?;
    let actual = manifest::sha256_file(&copy.file)
        .map_err(|e| format!("cannot read the private copy: {e}"))?;
    if !actual.eq_ignore_ascii_case(c.manifest.sha256.trim()) {
        return Err(format!(
            "sha256 mismatch: the manifest says {}, the file has {actual}; the file changed while it was being loaded, so it is not loaded",
            c.manifest.sha256.trim()
        ));
    }
    Ok(copy)
}

impl VerifiedCopy {
    /// Loads the copy. The library stays mapped (never unloaded), so its file can go at once.
    fn open(self) -> Result<native::Loaded, String> {
        native::open(&self.file)
    }
}

impl Drop for VerifiedCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The manifest and the library must tell the same story.
pub(crate) fn agrees(m: &Manifest, d: &providers_core::Descriptor) -> Result<(), String> {
    if d.service != m.name || d.version != m.version {
        return Err(format!(
            "the manifest says {} {}, the library describes itself as {} {}",
            m.name, m.version, d.service, d.version
        ));
    }
    if d.contract_version != m.contract {
        return Err(format!(
            "the manifest says contract {}, the library's descriptor says {}",
            m.contract, d.contract_version
        ));
    }
    Ok(())
}
