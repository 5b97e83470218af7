//! The demo `serve` runs without a config: its secret, and the ready-to-paste tour it prints.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

/// Where the demo keeps its HS256 secret (relative to the working directory).
pub const SECRET_FILE: &str = "data/demo-jwt.secret";

/// Where the demo keeps the master key of its secret store.
pub const SECRETS_KEY_FILE: &str = "data/demo-secrets.key";

/// Where the demo's workflow definitions are written, and what they are.
pub const WORKFLOWS_DIR: &str = "data/workflows";
const WORKFLOWS: [(&str, &str); 2] = [
    (
        "purchase_requisition.toml",
        include_str!("config/workflows/purchase_requisition.toml"),
    ),
    (
        "purchase_order_approval.toml",
        include_str!("config/workflows/purchase_order_approval.toml"),
    ),
];

/// Writes the demo's workflow definitions (every start: they belong to the binary; copy them
/// elsewhere to change them).
pub fn write_workflows(base: &Path) -> anyhow::Result<()> {
    let dir = base.join(WORKFLOWS_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, text) in WORKFLOWS {
        let path = dir.join(name);
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text) {
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}

/// Creates the demo's signing secret and secret-store key on first use, readable by the
/// owner only.
pub fn ensure_secret(base: &Path) -> anyhow::Result<()> {
    let hmac: String = (0..48)
        .map(|_| char::from(b"0123456789abcdef"[rand::random_range(0..16)]))
        .collect();
    create_private(&base.join(SECRET_FILE), &hmac)?;
    create_private(
        &base.join(SECRETS_KEY_FILE),
        &providers_security::MasterKey::generate(),
    )
}

fn create_private(path: &Path, content: &str) -> anyhow::Result<()> {
    if path.exists() {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(file, "{content}").with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The tour printed at start: how to call the demo with a token for each tenant.
/// `inventory` and `pricing` say why those plugins are unavailable, if they are.
pub fn banner(
    addr: &str,
    acme: &str,
    globex: &str,
    inventory: Option<&str>,
    pricing: Option<&str>,
) -> String {
    let inventory = match inventory {
        None => format!(
            "  # inventory is a native plugin (examples/native-inventory), loaded from ./plugins:
  curl -s -X POST http://{addr}/providers/inventory/receive -H \"Authorization: Bearer $ACME\" -d '{{\"item\":\"bolt\",\"warehouse\":\"main\",\"quantity\":20}}'
  curl -s -X POST http://{addr}/providers/inventory/reserve -H \"Authorization: Bearer $ACME\" -d '{{\"item\":\"bolt\",\"warehouse\":\"main\",\"quantity\":5}}'
  curl -s -X POST http://{addr}/providers/inventory/levels -H \"Authorization: Bearer $GLOBEX\" -d '{{}}'   # globex has its own stock
"
        ),
        Some(reason) => format!(
            "  # inventory (a native plugin) is not loaded: {reason}
  # Stage it and restart with: cargo xtask demo
"
        ),
    };
    let pricing = match pricing {
        None => format!(
            "  # pricing is a sandboxed WebAssembly component (examples/wasm-pricing); globex has its own bolt price:
  curl -s -X POST http://{addr}/providers/pricing/quote -H \"Authorization: Bearer $ACME\" -d '{{\"lines\":[{{\"sku\":\"BOLT-M8\",\"quantity\":120}},{{\"sku\":\"PANEL-A4\",\"quantity\":\"2.5\"}}]}}'
  curl -s -X POST http://{addr}/providers/pricing/quote -H \"Authorization: Bearer $GLOBEX\" -d '{{\"lines\":[{{\"sku\":\"BOLT-M8\",\"quantity\":120}}]}}'
"
        ),
        Some(reason) => format!(
            "  # pricing (a wasm component) is not loaded: {reason}
  # Stage it and restart with: cargo xtask demo
"
        ),
    };
    format!(
        "\
ERP Provider Layer demo on http://{addr}  (tenants: acme, globex; storage: sqlite://data/host.db)

  export ACME='{acme}'
  export GLOBEX='{globex}'

  curl -s -X POST http://{addr}/providers/kv/set -H \"Authorization: Bearer $ACME\" -d '{{\"key\":\"greeting\",\"value\":\"hello\"}}'
  curl -s -X POST http://{addr}/providers/kv/get -H \"Authorization: Bearer $ACME\" -d '{{\"key\":\"greeting\"}}'
  curl -s -X POST http://{addr}/providers/kv/get -H \"Authorization: Bearer $GLOBEX\" -d '{{\"key\":\"greeting\"}}'   # NOT_FOUND: globex has its own store
{inventory}{pricing}  # a durable workflow (the README's walkthrough approves it and watches it escalate):
  curl -s -X POST http://{addr}/providers/workflows/start -H \"Authorization: Bearer $ACME\" -d '{{\"definition\":\"purchase_requisition\",\"input\":{{\"item\":\"bearing\",\"quantity\":40,\"amount\":64000}}}}'
  curl -s http://{addr}/providers -H \"Authorization: Bearer $ACME\"
  curl -s http://{addr}/openapi.json

Tokens are valid for 24 hours; mint more with: provider-host token --tenant acme --roles staff
Stop with Ctrl-C.
"
    )
}
