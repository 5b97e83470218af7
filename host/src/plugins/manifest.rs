//! `NAME.plugin.toml`: what a plugin file is, read and verified before the file is opened.

use std::io::Read;
use std::path::{Path, PathBuf};

use providers_core::semver::Version;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The suffix of a manifest file name.
pub const SUFFIX: &str = ".plugin.toml";

/// How a plugin is built and loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PluginKind {
    /// A `cdylib` exporting the abi_stable root module.
    Native,
    /// A WebAssembly component of the `provider` world.
    Wasm,
}

impl PluginKind {
    /// The manifest's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::Native => "native",
            PluginKind::Wasm => "wasm",
        }
    }
}

/// A manifest as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The provider's service name, as its descriptor says it.
    pub name: String,
    /// The provider's version, as its descriptor says it.
    pub version: Version,
    /// How to load it.
    pub kind: PluginKind,
    /// The plugin file, beside the manifest (a bare file name).
    pub file: String,
    /// Lowercase hex SHA-256 of the file.
    pub sha256: String,
    /// The contract version it was built for.
    pub contract: Version,
}

/// Reads and parses the manifest at `path`; the error names the place in the file.
pub fn read(path: &Path) -> Result<Manifest, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    toml::from_str(&text).map_err(|e| {
        let at = e
            .span()
            .map(|span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!("line {line}, column {column}: ")
            })
            .unwrap_or_default();
        format!("malformed manifest: {at}{}", e.message().trim_end())
    })
}

/// The plugin file a manifest names: a plain file name in the manifest's own folder, so a
/// manifest can never point the host at a file elsewhere.
pub fn plugin_file(manifest_path: &Path, manifest: &Manifest) -> Result<PathBuf, String> {
    let name = Path::new(&manifest.file);
    let plain = name.components().count() == 1
        && matches!(
            name.components().next(),
            Some(std::path::Component::Normal(_))
        );
    if !plain {
        return Err(format!(
            "file = {:?} must be a file name beside the manifest, not a path",
            manifest.file
        ));
    }
    Ok(manifest_path.parent().unwrap_or(Path::new(".")).join(name))
}

/// Lowercase hex SHA-256 of the file at `path`, read in blocks.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
