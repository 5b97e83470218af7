//! The secret store: `${secret:NAME}` values, sealed in the system database under a master
//! key that never is (`[secrets] key_file` or `key_env`), each with the id of its key.
//!
//! The store is read before the configuration is checked, so a reference resolves like an
//! `${env:…}` one; what that read needs — the storage URL and the keys — therefore cannot
//! itself come from the store. Rotation: configure the new key as `key_file` and the old one
//! in `previous_key_files`, run `provider-host secrets rotate`, then drop the old key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use providers_security::{Keyring, MasterKey, Sealed, Secret, find_references, resolve_references};
use serde::{Deserialize, Serialize};
use sqlx::{AnyPool, Row};

use crate::audit::now_ms;
use crate::config::{ConfigError, StorageConfig};

/// `[secrets]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecretsSettings {
    /// The master key's file (32 bytes in base64), relative to the configuration's folder.
    pub key_file: Option<PathBuf>,
    /// The environment variable holding the master key, instead of a file.
    pub key_env: Option<String>,
    /// Earlier master keys' files: values they sealed still open until `secrets rotate`.
    pub previous_key_files: Vec<PathBuf>,
}

/// What reading the store needs, taken from a configuration's text before it is checked.
#[derive(Debug, Clone)]
pub struct StoreAccess {
    /// The system database.
    pub storage: StorageConfig,
    /// The keys, when `[secrets]` names one.
    pub keys: Option<Keyring>,
}

fn error(file: &str, message: String) -> ConfigError {
    ConfigError {
        file: file.to_owned(),
        line: 0,
        column: 0,
        message,
    }
}

/// The `${secret:NAME}` names used in string values of `table`.
fn secret_names(value: &toml::Value, out: &mut Vec<String>) {
    match value {
        toml::Value::String(s) => {
            if let Ok(refs) = find_references(s) {
                out.extend(
                    refs.into_iter()
                        .filter(|r| r.scheme == "secret")
                        .map(|r| r.name),
                );
            }
        }
        toml::Value::Array(items) => items.iter().for_each(|v| secret_names(v, out)),
        toml::Value::Table(t) => t.values().for_each(|v| secret_names(v, out)),
        _ => {}
    }
}

fn read_key(path: &Path, what: &str) -> Result<MasterKey, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{what}: cannot read '{}': {e}", path.display()))?;
    MasterKey::parse(&text, &format!("{what} '{}'", path.display())).map_err(|e| e.to_string())
}

/// The storage URL and keys the text of a configuration names (relative paths against
/// `base`, `${env:…}` through `env`). `${secret:…}` is refused in what the store's own read needs.
pub fn access(
    text: &str,
    name: &str,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<StoreAccess, Vec<ConfigError>> {
    let table: toml::Table =
        toml::from_str(text).map_err(|e| vec![error(name, e.message().trim_end().to_owned())])?;
    let env_only = |setting: &str, s: &str| -> Result<String, ConfigError> {
        if s.contains("${secret:") {
            return Err(error(
                name,
                format!(
                    "{setting}: cannot use '${{secret:…}}': the secret store is read through it (use '${{env:NAME}}')"
                ),
            ));
        }
        resolve_references(s, env).map_err(|(_, e)| error(name, format!("{setting}: {e}")))
    };
    let mut storage = StorageConfig::default();
    if let Some(url) = table
        .get("storage")
        .and_then(|s| s.get("url"))
        .and_then(|u| u.as_str())
    {
        storage.url = env_only("storage.url", url).map_err(|e| vec![e])?;
    }
    storage.url = crate::config::relative_sqlite(&storage.url, base);
    storage.max_connections = 1;
    storage.builtin_max_connections = 1;
    let settings: SecretsSettings = match table.get("secrets") {
        Some(v) => v.clone().try_into().map_err(|e: toml::de::Error| {
            vec![error(
                name,
                format!("[secrets]: {}", e.message().trim_end()),
            )]
        })?,
        None => SecretsSettings::default(),
    };
    let current = match (&settings.key_file, &settings.key_env) {
        (Some(_), Some(_)) => {
            return Err(vec![error(
                name,
                "[secrets]: give key_file or key_env, not both".into(),
            )]);
        }
        (Some(file), None) => {
            Some(read_key(&base.join(file), "secrets.key_file").map_err(|m| vec![error(name, m)])?)
        }
        (None, Some(var)) => {
            let value = env(var).ok_or_else(|| {
                vec![error(
                    name,
                    format!("secrets.key_env: environment variable '{var}' is not set"),
                )]
            })?;
            Some(
                MasterKey::parse(&value, &format!("secrets.key_env '{var}'"))
                    .map_err(|e| vec![error(name, e.to_string())])?,
            )
        }
        (None, None) => None,
    };
    let keys = match current {
        Some(current) => {
            let previous = settings
                .previous_key_files
                .iter()
                .map(|f| read_key(&base.join(f), "secrets.previous_key_files"))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|m| vec![error(name, m)])?;
            Some(Keyring { current, previous })
        }
        None if !settings.previous_key_files.is_empty() => {
            return Err(vec![error(
                name,
                "[secrets]: previous_key_files needs a current key (key_file or key_env)".into(),
            )]);
        }
        None => None,
    };
    Ok(StoreAccess { storage, keys })
}

/// The secrets a configuration's text references, opened; `None` when it references none
/// (the store is not read at all). The store is the one `store_text` names — the running
/// configuration's, when a submitted text is only being validated, so a request body never
/// chooses a database or a key file. Only the referenced names are opened: an unrelated
/// damaged value stops nothing. Runs on a thread of its own, so it can be called from
/// synchronous code on or off the runtime.
pub fn for_config(
    text: &str,
    store_text: &str,
    name: &str,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<BTreeMap<String, Secret>>, Vec<ConfigError>> {
    let Ok(value) = toml::from_str::<toml::Value>(text) else {
        return Ok(None);
    };
    let mut names = Vec::new();
    secret_names(&value, &mut names);
    if names.is_empty() {
        return Ok(None);
    }
    let access = access(store_text, name, base, env)?;
    let Some(keys) = access.keys.clone() else {
        return Err(vec![error(
            name,
            format!(
                "'${{secret:{}}}' needs the secret store, but [secrets] names no master key (key_file or key_env)",
                names[0]
            ),
        )]);
    };
    let file = name.to_owned();
    std::thread::scope(|s| {
        s.spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| vec![error(&file, format!("secret store: {e}"))])?;
            runtime.block_on(async {
                let storage = crate::storage::Storage::open(&access.storage)
                    .await
                    .map_err(|e| vec![error(&file, format!("secret store: {e:#}"))])?;
                let result = open_named(storage.pool(), &keys, &names).await;
                storage.close().await;
                result
                    .map(Some)
                    .map_err(|e| vec![error(&file, format!("secret store: {e:#}"))])
            })
        })
        .join()
        .unwrap_or_else(|_| Err(vec![error(&file, "secret store: the reader failed".into())]))
    })
}

/// One stored secret, as listed (never its value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Listed {
    /// Its name.
    pub name: String,
    /// The key that sealed it.
    pub key_id: String,
    /// When it was last set or re-sealed, milliseconds since the epoch.
    pub updated_ms: i64,
}

/// The secrets `names`, opened (those not stored are left out: the reference reports them).
pub async fn open_named(
    pool: &AnyPool,
    keys: &Keyring,
    names: &[String],
) -> anyhow::Result<BTreeMap<String, Secret>> {
    let mut out = BTreeMap::new();
    for name in names {
        if out.contains_key(name) {
            continue;
        }
        let row = sqlx::query("SELECT key_id, nonce, ciphertext FROM secrets WHERE name = $1")
            .bind(name)
            .fetch_optional(pool)
            .await?;
        if let Some(r) = row {
            let sealed = Sealed {
                key_id: r.try_get("key_id")?,
                nonce: r.try_get("nonce")?,
                ciphertext: r.try_get("ciphertext")?,
            };
            out.insert(name.clone(), keys.open(name, &sealed)?);
        }
    }
    Ok(out)
}

/// Every secret, opened.
pub async fn open_all(pool: &AnyPool, keys: &Keyring) -> anyhow::Result<BTreeMap<String, Secret>> {
    let rows = sqlx::query("SELECT name, key_id, nonce, ciphertext FROM secrets ORDER BY name")
        .fetch_all(pool)
        .await?;
    let mut out = BTreeMap::new();
    for r in &rows {
        let name: String = r.try_get("name")?;
        let sealed = Sealed {
            key_id: r.try_get("key_id")?,
            nonce: r.try_get("nonce")?,
            ciphertext: r.try_get("ciphertext")?,
        };
        let value = keys.open(&name, &sealed)?;
        out.insert(name, value);
    }
    Ok(out)
}

/// Seals and stores `value` as `name` under the current key.
pub async fn set(pool: &AnyPool, keys: &Keyring, name: &str, value: &Secret) -> anyhow::Result<()> {
    let sealed = keys.current.seal(name, value)?;
    sqlx::query(
        "INSERT INTO secrets (name, key_id, nonce, ciphertext, updated_ms) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (name) DO UPDATE SET key_id = excluded.key_id, nonce = excluded.nonce, \
         ciphertext = excluded.ciphertext, updated_ms = excluded.updated_ms",
    )
    .bind(name)
    .bind(&sealed.key_id)
    .bind(&sealed.nonce)
    .bind(&sealed.ciphertext)
    .bind(now_ms())
    .execute(pool)
    .await?;
    Ok(())
}

/// Every secret's name, key id and time.
pub async fn list(pool: &AnyPool) -> anyhow::Result<Vec<Listed>> {
    let rows = sqlx::query("SELECT name, key_id, updated_ms FROM secrets ORDER BY name")
        .fetch_all(pool)
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Listed {
                name: r.try_get("name")?,
                key_id: r.try_get("key_id")?,
                updated_ms: r.try_get("updated_ms")?,
            })
        })
        .collect()
}

/// Removes `name`; whether it existed.
pub async fn remove(pool: &AnyPool, name: &str) -> anyhow::Result<bool> {
    Ok(sqlx::query("DELETE FROM secrets WHERE name = $1")
        .bind(name)
        .execute(pool)
        .await?
        .rows_affected()
        > 0)
}

/// Re-seals every value not sealed by the current key, in one transaction; how many.
/// A value no configured key opens stops the rotation before anything is written.
pub async fn rotate(pool: &AnyPool, keys: &Keyring) -> anyhow::Result<usize> {
    let all = open_all(pool, keys).await?;
    let stale: Vec<String> = list(pool)
        .await?
        .into_iter()
        .filter(|l| l.key_id != keys.current.id())
        .map(|l| l.name)
        .collect();
    let mut tx = pool.begin().await?;
    for name in &stale {
        let sealed = keys.current.seal(name, &all[name])?;
        sqlx::query("UPDATE secrets SET key_id = $1, nonce = $2, ciphertext = $3, updated_ms = $4 WHERE name = $5")
            .bind(&sealed.key_id)
            .bind(&sealed.nonce)
            .bind(&sealed.ciphertext)
            .bind(now_ms())
            .bind(name)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(stale.len())
}
