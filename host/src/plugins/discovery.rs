//! Plugin folders → checked candidates: manifests parsed, files hashed, contracts compared,
//! all before any plugin file is opened.

use std::path::{Path, PathBuf};

use providers_core::{contract_compatible, is_valid_name};

use super::manifest::{self, Manifest, SUFFIX};

/// A plugin whose manifest and file passed every check that needs no plugin code.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The manifest file.
    pub manifest_path: PathBuf,
    /// Its content.
    pub manifest: Manifest,
    /// The plugin file, hash verified.
    pub file: PathBuf,
}

/// A plugin the host will not load, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The service name the manifest gives, or the manifest's file stem when unreadable.
    pub name: String,
    /// The version the manifest gives, when it could be read.
    pub version: Option<String>,
    /// The manifest or plugin file concerned.
    pub file: PathBuf,
    /// What is wrong, for an operator.
    pub reason: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.version {
            Some(v) => write!(
                f,
                "plugin '{}' {v} ({}): {}",
                self.name,
                self.file.display(),
                self.reason
            ),
            None => write!(
                f,
                "plugin '{}' ({}): {}",
                self.name,
                self.file.display(),
                self.reason
            ),
        }
    }
}

/// Every `*.plugin.toml` in `dirs`, in name order per folder, checked or refused. A missing
/// folder has no plugins; an unreadable one is a refusal.
pub fn discover(dirs: &[PathBuf]) -> (Vec<Candidate>, Vec<Refusal>) {
    let mut found = Vec::new();
    let mut refused = Vec::new();
    for dir in dirs {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                refused.push(Refusal {
                    name: String::new(),
                    version: None,
                    file: dir.clone(),
                    reason: format!("cannot read the plugin folder: {e}"),
                });
                continue;
            }
        };
        let mut manifests: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(SUFFIX))
            })
            .collect();
        manifests.sort();
        for path in manifests {
            match check(&path) {
                Ok(c) => found.push(c),
                Err(r) => refused.push(r),
            }
        }
    }
    (found, refused)
}

/// Checks one manifest and the file it names.
pub fn check(path: &Path) -> Result<Candidate, Refusal> {
    let stem = path
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.trim_end_matches(SUFFIX).to_owned())
        .unwrap_or_default();
    let refuse = |name: &str, version: Option<String>, file: &Path, reason: String| Refusal {
        name: name.to_owned(),
        version,
        file: file.to_owned(),
        reason,
    };
    let m = manifest::read(path).map_err(|reason| refuse(&stem, None, path, reason))?;
    let version = Some(m.version.to_string());
    if !is_valid_name(&m.name) {
        return Err(refuse(
            &stem,
            version,
            path,
            format!(
                "invalid name '{}' (expected 1-64 of a-z, 0-9, '_', '-', starting with a letter)",
                m.name
            ),
        ));
    }
    let host = providers_core::contract_version();
    if !contract_compatible(&m.contract, &host) {
        return Err(refuse(
            &m.name,
            version,
            path,
            format!(
                "built for contract {}, which is not compatible with this host's contract {host} (caret rule)",
                m.contract
            ),
        ));
    }
    let file =
        manifest::plugin_file(path, &m).map_err(|r| refuse(&m.name, version.clone(), path, r))?;
    let actual = manifest::sha256_file(&file).map_err(|e| {
        refuse(
            &m.name,
            version.clone(),
            &file,
            format!("cannot read the plugin file: {e}"),
        )
    })?;
    if !actual.eq_ignore_ascii_case(m.sha256.trim()) {
        return Err(refuse(
            &m.name,
            version,
            &file,
            format!(
                "sha256 mismatch: the manifest says {}, the file has {actual}; the file was changed or replaced, so it is not loaded",
                m.sha256.trim()
            ),
        ));
    }
    Ok(Candidate {
        manifest_path: path.to_owned(),
        manifest: m,
        file,
    })
}
