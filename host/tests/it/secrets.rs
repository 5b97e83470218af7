//! The secret store: `${secret:NAME}` resolved from sealed values in the system database,
//! missing and unopenable values refused with their place, keys rotated, tampering found.

use std::path::Path;
use std::sync::Arc;

use provider_host::host::{ConfigSource, Origin};
use provider_host::secrets;
use provider_host::storage::Storage;
use providers_database::testing::TestDatabase;
use providers_security::{Keyring, MasterKey, Secret};

use crate::support::{Counters, Edit, config_text, env, matrix, registry};

matrix!(secrets_resolve_from_the_store_rotate_and_refuse_what_does_not_open,);

fn key(dir: &Path, file: &str) -> MasterKey {
    let text = MasterKey::generate();
    std::fs::write(dir.join(file), format!("{text}\n")).unwrap();
    MasterKey::parse(&text, file).unwrap()
}

fn source(text: String, base: &Path) -> ConfigSource {
    ConfigSource {
        registry: registry(&Arc::new(Counters::default())),
        origin: Origin::Text {
            text,
            name: "test.toml".into(),
            base: base.to_path_buf(),
        },
        env: Box::new(env),
        listen: None,
    }
}

fn errors(source: &ConfigSource) -> Vec<String> {
    match source.load(None) {
        Ok(_) => panic!("the configuration was accepted"),
        Err(e) => e.iter().map(ToString::to_string).collect(),
    }
}

const JWT: &str = "a-signing-secret-from-the-store-0123456789";
const LABEL: &str = "label-from-the-store";

async fn secrets_resolve_from_the_store_rotate_and_refuse_what_does_not_open(db: TestDatabase) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (k1, k2) = (key(d, "k1.key"), key(d, "k2.key"));
    let text = config_text(&db.url, "\n[secrets]\nkey_file = \"k1.key\"\n")
        .edit(
            "secret = \"${env:TEST_JWT_SECRET}\"",
            "secret = \"${secret:jwt_key}\"",
        )
        .edit(
            "label = \"acme-label\"",
            "label = \"${secret:probe_label}\"",
        );
    let storage = Storage::open(&source(text.clone(), d).secret_store().unwrap().storage)
        .await
        .unwrap();
    let pool = storage.pool();
    let ring1 = Keyring {
        current: k1.clone(),
        previous: vec![],
    };
    secrets::set(pool, &ring1, "jwt_key", &Secret::new(JWT))
        .await
        .unwrap();
    secrets::set(pool, &ring1, "probe_label", &Secret::new("old"))
        .await
        .unwrap();
    secrets::set(pool, &ring1, "probe_label", &Secret::new(LABEL))
        .await
        .unwrap();

    let config = source(text.clone(), d)
        .load(None)
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(
        config.keys[0].verify,
        JWT.as_bytes(),
        "the signing key came from the store"
    );
    let acme = &config.tenants["acme"].services["probe"].config;
    assert_eq!(acme["label"], LABEL, "set again, the newest value");
    assert!(
        !format!("{:?}", config.keys).contains(JWT),
        "keys never format their material"
    );

    // A message about a resolved field names the reference, never the value.
    let mistyped = text.edit(
        "label = \"${secret:probe_label}\"",
        "label = \"x\"\nconnect_delay_ms = \"${secret:probe_label}\"",
    );
    let refused = errors(&source(mistyped.clone(), d));
    assert!(
        refused.iter().any(|e| e.contains("${secret:probe_label}")),
        "{refused:?}"
    );
    assert!(!refused.iter().any(|e| e.contains(LABEL)), "{refused:?}");
    // Validating a submitted text reads the running configuration's store and keys, never
    // the ones the text names.
    let elsewhere = text.edit(
        "key_file = \"k1.key\"",
        "key_file = \"/nonexistent/other.key\"",
    );
    assert!(source(text.clone(), d).check(&elsewhere, None).is_ok());

    // A name not in the store is refused where it is written.
    let missing = text.edit(
        "label = \"${secret:probe_label}\"",
        "label = \"${secret:nope}\"",
    );
    let line = missing
        .lines()
        .position(|l| l.contains("${secret:nope}"))
        .unwrap()
        + 1;
    assert_eq!(
        errors(&source(missing, d)),
        [format!(
            "test.toml:{line}:10: secret 'nope' is not in the secret store (store it with 'provider-host secrets set nope')"
        )]
    );
    let keyless = text.edit("[secrets]\nkey_file = \"k1.key\"\n", "");
    assert_eq!(
        errors(&source(keyless, d)),
        [
            "test.toml: '${secret:jwt_key}' needs the secret store, but [secrets] names no master key (key_file or key_env)"
        ]
    );
    let in_url = text.edit(
        &format!("url = \"{}\"", db.url),
        "url = \"${secret:db_url}\"",
    );
    assert_eq!(
        errors(&source(in_url, d)),
        [
            "test.toml: storage.url: cannot use '${secret:…}': the secret store is read through it (use '${env:NAME}')"
        ]
    );

    // Rotation: the new key current, the old one previous; re-sealed, the old key can go.
    let both = text.edit(
        "key_file = \"k1.key\"\n",
        "key_file = \"k2.key\"\nprevious_key_files = [\"k1.key\"]\n",
    );
    assert!(
        source(both.clone(), d).load(None).is_ok(),
        "values sealed by the previous key open"
    );
    let only_new = text.edit("key_file = \"k1.key\"\n", "key_file = \"k2.key\"\n");
    let refused = errors(&source(only_new.clone(), d));
    assert_eq!(refused.len(), 1);
    assert!(
        refused[0].contains(&format!(
            "secret 'jwt_key': sealed with key {}, which is not configured (keys: {})",
            k1.id(),
            k2.id()
        )),
        "{refused:?}"
    );
    let ring = source(both, d).secret_store().unwrap().keys.unwrap();
    assert_eq!(secrets::rotate(pool, &ring).await.unwrap(), 2);
    assert_eq!(
        secrets::rotate(pool, &ring).await.unwrap(),
        0,
        "nothing left to re-seal"
    );
    let listed = secrets::list(pool).await.unwrap();
    assert!(listed.iter().all(|s| s.key_id == k2.id()), "{listed:?}");
    let config = source(only_new.clone(), d)
        .load(None)
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(config.keys[0].verify, JWT.as_bytes());

    // A value altered in the database does not open, and says so without its value.
    sqlx::query("UPDATE secrets SET ciphertext = $1 WHERE name = 'jwt_key'")
        .bind({
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode([7u8; 60])
        })
        .execute(pool)
        .await
        .unwrap();
    let refused = errors(&source(only_new, d));
    assert!(
        refused[0].ends_with("secret 'jwt_key': stored value does not open with its key (altered, or stored under another name)"),
        "{refused:?}"
    );
    assert!(secrets::remove(pool, "probe_label").await.unwrap());
    assert!(!secrets::remove(pool, "probe_label").await.unwrap());
    storage.close().await;
}
