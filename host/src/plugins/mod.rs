//! Plugins: providers loaded at run time from `[plugins] dirs`, native or wasm, through one
//! path. `manifest` and `discovery` check what a file is before it is opened; `capabilities`
//! is what every plugin gets from the host; each engine (`native`) only adapts those to its
//! boundary and hands the registry a `Factory`. Nothing above this module knows an engine.

pub mod capabilities;
pub mod cli;
pub mod discovery;
pub mod manifest;
pub mod native;
mod threads;

use std::path::PathBuf;
use std::sync::Arc;

use providers_core::RegistryBuilder;

pub use discovery::{Candidate, Refusal};
pub use manifest::{Manifest, PluginKind};
pub use native::NativePool;

/// What loading the plugin folders gave: every plugin accepted into the registry, every
/// one refused with its reason.
#[derive(Debug, Default, Clone)]
pub struct Loaded {
    /// Accepted: service, version, kind, file.
    pub accepted: Vec<(String, String, PluginKind, PathBuf)>,
    /// Refused, with why.
    pub refused: Vec<Refusal>,
}

impl Loaded {
    /// The refusals of plugin `name`, newest manifest order.
    pub fn refusals_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Refusal> + 'a {
        self.refused.iter().filter(move |r| r.name == name)
    }
}

/// Discovers, verifies and loads every plugin in `dirs`, adding each accepted one to
/// `registry`. A plugin that fails any check is refused, never half-loaded.
pub fn load(dirs: &[PathBuf], pool: &NativePool, registry: &mut RegistryBuilder) -> Loaded {
    let (candidates, mut refused) = discovery::discover(dirs);
    let mut accepted = Vec::new();
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
        let factory: Arc<dyn providers_core::Factory> = match m.kind {
            PluginKind::Native => match verified_copy(&c).and_then(|copy| copy.open()) {
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
            PluginKind::Wasm => {
                refused.push(refuse(
                    "wasm components are not supported by this host yet".into(),
                ));
                continue;
            }
        };
        match registry.add(factory) {
            Ok(()) => accepted.push((
                m.name.clone(),
                m.version.to_string(),
                m.kind,
                c.file.clone(),
            )),
            Err(e) => refused.push(refuse(e.to_string())),
        }
    }
    for r in &refused {
        tracing::warn!(plugin = %r.name, file = %r.file.display(), reason = ?r.reason, "plugin refused");
    }
    Loaded { accepted, refused }
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
