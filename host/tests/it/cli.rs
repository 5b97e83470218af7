//! The real `provider-host` binary on a loopback port.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_provider-host");

/// Reads the child's stderr until the "listening" line and returns the address.
fn wait_listening(child: &mut Child) -> (String, std::thread::JoinHandle<String>) {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let rest = std::thread::spawn(move || {
        let mut reader = BufReader::new(stderr);
        let mut all = String::new();
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            if let Some(at) = line.find("local=") {
                let _ = tx.send(line[at + 6..].trim().to_owned());
            } else if let Ok(json) = serde_json::from_str::<serde_json::Value>(&line)
                && let Some(local) = json["local"].as_str()
            {
                // The JSON log format.
                let _ = tx.send(local.to_owned());
            }
            all.push_str(&line);
            line.clear();
        }
        all
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the host announced its address");
    (addr, rest)
}

/// Starts the demo in `dir` on a free port: the child, its address, the tour it printed and
/// the thread collecting its log.
fn demo(dir: &std::path::Path) -> (Child, String, String, std::thread::JoinHandle<String>) {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (addr, logs) = wait_listening(&mut child);
    // The pipe stays with the child: closing it early would fail the host's later writes.
    let stdout = child.stdout.as_mut().unwrap();
    let mut tour = vec![0u8; 16 * 1024];
    let n = stdout.read(&mut tour).unwrap();
    let tour = String::from_utf8_lossy(&tour[..n]).into_owned();
    (child, addr, tour, logs)
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < end, "the host did not stop after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn the_demo_serves_its_printed_tour_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr, tour, logs) = demo(dir.path());
    let token_of = |var: &str| {
        let line = tour
            .lines()
            .find(|l| l.contains(&format!("export {var}=")))
            .unwrap();
        line.split('\'').nth(1).unwrap().to_owned()
    };
    assert!(
        tour.contains(&format!("curl -s -X POST http://{addr}/providers/kv/set")),
        "{tour}"
    );
    // No plugins staged here: the tour says how to get inventory, and kv serves regardless.
    assert!(
        tour.contains("# inventory (a native plugin) is not loaded: "),
        "{tour}"
    );
    assert!(
        tour.contains("# Stage it and restart with: cargo xtask demo"),
        "{tour}"
    );

    let client = reqwest::Client::new();
    let url = |p: &str| format!("http://{addr}{p}");
    let r = client
        .post(url("/providers/kv/set"))
        .bearer_auth(token_of("ACME"))
        .header("x-request-id", "tour-1")
        .json(&json!({"key": "greeting", "value": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "tour-1");
    let r: serde_json::Value = client
        .post(url("/providers/kv/get"))
        .bearer_auth(token_of("GLOBEX"))
        .json(&json!({"key": "greeting"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["error_code"], "NOT_FOUND");

    // The token command mints with the same demo key.
    let out = Command::new(BIN)
        .args([
            "token", "--tenant", "acme", "--roles", "viewer", "--ttl", "5m",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let viewer = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let r: serde_json::Value = client
        .post(url("/providers/kv/get"))
        .bearer_auth(&viewer)
        .json(&json!({"key": "greeting"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["data"]["value"], "hello");
    let r = client
        .post(url("/providers/kv/set"))
        .bearer_auth(&viewer)
        .json(&json!({"key": "x", "value": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "viewer may only read");

    let status = terminate(&mut child);
    assert!(status.success(), "exit status {status:?}");
    let logs = logs.join().unwrap();
    assert!(logs.contains("stopped"), "{logs}");
    assert!(
        !logs.contains("instance disconnected"),
        "lifecycle lines are DEBUG, not INFO: {logs}"
    );
    assert!(dir.path().join("data/host.db").exists());

    // The instance's whole life is in the system database.
    let storage = provider_host::storage::Storage::open(&provider_host::config::StorageConfig {
        url: format!("sqlite://{}/data/host.db", dir.path().display()),
        ..Default::default()
    })
    .await
    .unwrap();
    let events = storage.events("acme", "kv").await.unwrap();
    let kinds: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(kinds, ["connected", "disconnected"]);

    // Every call is in the audit trail, flushed at shutdown; `audit verify` finds it intact,
    // and finds the row an intruder edits in the database.
    let verify = || {
        Command::new(BIN)
            .args(["audit", "verify"])
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let out = verify();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("acme: 3 records, intact, head "), "{text}");
    assert!(text.contains("globex: 1 records, intact"), "{text}");
    sqlx::query("UPDATE audit_log SET outcome = 'ok' WHERE tenant = 'acme' AND outcome = 'denied'")
        .execute(storage.pool())
        .await
        .unwrap();
    storage.close().await;
    let out = verify();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("acme: BROKEN: record 3 was changed after it was written"),
        "{text}"
    );
    assert!(text.contains("globex: 1 records, intact"), "{text}");
}

#[test]
fn check_reports_every_error_with_its_place_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("host.toml");
    std::fs::write(
        &path,
        "[security]\nissuer = \"i\"\naudience = \"a\"\n\n[[security.keys]]\nalgorithm = \"HS256\"\nsecret = \"${env:PH_TEST_UNSET_SECRET}\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:7:11: environment variable 'PH_TEST_UNSET_SECRET' is not set",
            path.display()
        )),
        "{stderr}"
    );

    std::fs::write(
        &path,
        "[security]\nissuer = \"i\"\naudience = \"a\"\n\n[[security.keys]]\nalgorithm = \"HS256\"\nsecret = \"${env:PH_TEST_SECRET}\"\n\n[[providers]]\nservice = \"kv\"\n\n[tenants.acme]\nservices = [\"kv\"]\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .env("PH_TEST_SECRET", "0123456789abcdef0123456789abcdef")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{}: ok (1 services, 1 tenants)", path.display())
    );
}

#[tokio::test]
async fn the_demo_serves_native_inventory_and_the_plugins_commands_report_it() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    let built = crate::plugins::built();
    crate::plugins::stage(
        &plugins,
        &built.file("inventory"),
        "inventory",
        "1.0.0",
        "1.0.0",
        "inventory.so",
    );
    let wasm = crate::plugins::wasm_built();
    crate::plugins::stage_wasm(
        &plugins,
        &wasm.dir.join("pricing.wasm"),
        "pricing",
        "1.0.0",
        "pricing.wasm",
    );
    // A second, tampered plugin: listed as refused, and the demo serves on without it.
    crate::plugins::stage(
        &plugins,
        &built.file("fixture-1.0.0"),
        "fixture",
        "1.0.0",
        "1.0.0",
        "fixture.so",
    );
    std::fs::write(
        plugins.join("fixture.so"),
        b"not the file the manifest hashed",
    )
    .unwrap();

    let out = Command::new(BIN)
        .args(["plugins", "list", "--dir"])
        .arg(&plugins)
        .output()
        .unwrap();
    assert!(out.status.success());
    let list = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 3, "{list}");
    assert!(
        lines[2].starts_with("pricing          1.0.0     wasm    "),
        "{list}"
    );
    assert!(
        lines[2].ends_with("pricing.wasm  hash ok, loadable"),
        "{list}"
    );
    let out = Command::new(BIN)
        .args(["plugins", "inspect"])
        .arg(plugins.join("pricing.wasm"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["kind"], "wasm");
    assert_eq!(report["descriptor"]["service"], "pricing");
    let imports: Vec<String> = serde_json::from_value(report["imports"].clone()).unwrap();
    // What it can reach is what it imports: the contract's types, std's stdio plumbing,
    // and no filesystem, socket or store.
    assert!(
        imports.contains(&"erp:provider/types@1.0.0".to_owned()),
        "{imports:?}"
    );
    assert!(
        !imports.iter().any(|i| i.starts_with("wasi:filesystem")
            || i.starts_with("wasi:sockets")
            || i.starts_with("erp:provider/store")),
        "{imports:?}"
    );
    assert!(
        lines[0].starts_with("fixture          1.0.0     native  "),
        "{list}"
    );
    assert!(
        lines[0].contains("fixture.so  refused: sha256 mismatch: the manifest says "),
        "{list}"
    );
    assert!(
        lines[1].starts_with("inventory        1.0.0     native  "),
        "{list}"
    );
    assert!(
        lines[1].ends_with("inventory.so  hash ok, loadable"),
        "{list}"
    );

    let out = Command::new(BIN)
        .args(["plugins", "inspect"])
        .arg(plugins.join("inventory.so"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["descriptor"]["service"], "inventory");
    assert_eq!(report["build"]["panic"], "unwind");
    assert_eq!(report["build"]["contract"], "1.0.0");
    assert_eq!(report["build"]["abi_stable"], "0.11.3");
    let out = Command::new(BIN)
        .args(["plugins", "inspect"])
        .arg(built.file("fixture-abort"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused: built with panic = \"abort\""));

    let out = Command::new(BIN)
        .args([
            "plugins",
            "new",
            "--kind",
            "native",
            "label-printer",
            "--dir",
        ])
        .arg(dir.path().join("label-printer"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lib = std::fs::read_to_string(dir.path().join("label-printer/src/lib.rs")).unwrap();
    assert!(lib.contains("providers_core::export_native_provider!(LabelPrinter::default());"));
    assert!(lib.contains("Descriptor::new(\"label-printer\""));
    let manifest = std::fs::read_to_string(dir.path().join("label-printer/Cargo.toml")).unwrap();
    assert!(
        manifest.contains("name = \"label-printer-provider\""),
        "{manifest}"
    );
    let again = Command::new(BIN)
        .args(["plugins", "new", "label-printer", "--dir"])
        .arg(dir.path().join("label-printer"))
        .output()
        .unwrap();
    assert_eq!(
        again.status.code(),
        Some(2),
        "an existing folder is never overwritten"
    );

    let (mut child, addr, tour, logs) = demo(dir.path());
    assert!(
        tour.contains(&format!(
            "curl -s -X POST http://{addr}/providers/inventory/receive"
        )),
        "{tour}"
    );
    let acme = tour
        .lines()
        .find(|l| l.contains("export ACME="))
        .and_then(|l| l.split('\'').nth(1))
        .unwrap()
        .to_owned();
    let client = reqwest::Client::new();
    let r: serde_json::Value = client
        .post(format!("http://{addr}/providers/inventory/receive"))
        .bearer_auth(&acme)
        .json(&json!({"item": "bolt", "warehouse": "main", "quantity": 20}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["data"]["available"], 20, "{r}");
    // The wasm component, as the tour shows it: globex's bolt price is its own.
    assert!(
        tour.contains(&format!(
            "curl -s -X POST http://{addr}/providers/pricing/quote"
        )),
        "{tour}"
    );
    let globex = tour
        .lines()
        .find(|l| l.contains("export GLOBEX="))
        .and_then(|l| l.split('\'').nth(1))
        .unwrap()
        .to_owned();
    for (token, net) in [(&acme, "39.90"), (&globex, "34.20")] {
        let r: serde_json::Value = client
            .post(format!("http://{addr}/providers/pricing/quote"))
            .bearer_auth(token)
            .json(&json!({"lines": [{"sku": "BOLT-M8", "quantity": 120}]}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(r["data"]["lines"][0]["net"], net, "{r}");
    }
    let status = terminate(&mut child);
    assert!(status.success(), "exit status {status:?}");
    let logs = logs.join().unwrap();
    // The plugin's own log line, with the provider and tenant the host knows.
    assert!(
        logs.contains("plugin: service=\"inventory\" tenant=\"acme\" request_id=\"\" \"inventory connected for tenant acme\""),
        "{logs}"
    );
    assert!(logs.contains("plugin refused"), "{logs}");
}

#[tokio::test]
async fn the_demo_keeps_serving_when_its_stdout_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // As `provider-host serve | head -0` would: nobody reads the tour.
    drop(child.stdout.take());
    let (addr, logs) = wait_listening(&mut child);
    let mut ok = false;
    for _ in 0..50 {
        if let Ok(r) = reqwest::get(format!("http://{addr}/health")).await {
            assert_eq!(r.status(), 200);
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(ok, "the host answers");
    let status = terminate(&mut child);
    assert!(status.success(), "exit status {status:?}");
    let logs = logs.join().unwrap();
    assert!(logs.contains("could not print the demo's tour"), "{logs}");
}

const OPS_CONFIG: &str = r#"
[server]
listen = "127.0.0.1:1"
watch_config = WATCH

[storage]
url = "sqlite://data/host.db"

[security]
issuer = "ops"
audience = "providers"
admin_role = "admin"
platform_tenant = "platform"

[[security.keys]]
algorithm = "HS256"
secret = "${env:OPS_JWT_SECRET}"

[security.roles]
admin = ["*"]
user = ["kv.*"]

[[providers]]
service = "kv"

[tenants.acme]
services = ["kv"]
"#;

const OPS_SECRET: &str = "ops-secret-ops-secret-ops-secret-ops!";

/// A host serving `OPS_CONFIG` from a file in `dir`, and the address it listens on.
fn ops_host(
    dir: &std::path::Path,
    watch: bool,
) -> (Child, String, std::thread::JoinHandle<String>) {
    std::fs::write(
        dir.join("host.toml"),
        OPS_CONFIG.replace("WATCH", if watch { "true" } else { "false" }),
    )
    .unwrap();
    serve_in(dir)
}

/// A host serving `dir/host.toml` on a free port: the child, its address, its log.
fn serve_in(dir: &std::path::Path) -> (Child, String, std::thread::JoinHandle<String>) {
    serve_with(dir, true)
}

/// [`serve_in`]; without `inherit_rust_log`, the configuration's own `log_filter` decides
/// what is logged whatever the test runner's environment says.
fn serve_with(
    dir: &std::path::Path,
    inherit_rust_log: bool,
) -> (Child, String, std::thread::JoinHandle<String>) {
    let mut command = Command::new(BIN);
    command
        .args(["serve", "--config", "host.toml", "--listen", "127.0.0.1:0"])
        .current_dir(dir)
        .env("OPS_JWT_SECRET", OPS_SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if !inherit_rust_log {
        command.env_remove("RUST_LOG");
    }
    let mut child = command.spawn().unwrap();
    let (addr, logs) = wait_listening(&mut child);
    (child, addr, logs)
}

fn mint(dir: &std::path::Path, tenant: &str, roles: &str) -> String {
    let out = Command::new(BIN)
        .args([
            "token",
            "--config",
            "host.toml",
            "--tenant",
            tenant,
            "--roles",
            roles,
        ])
        .current_dir(dir)
        .env("OPS_JWT_SECRET", OPS_SECRET)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// `provider-host admin …` against `addr`: exit code, stdout, stderr.
fn admin(
    dir: &std::path::Path,
    addr: &str,
    token: Option<&str>,
    args: &[&str],
) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.arg("admin")
        .args(args)
        .arg("--url")
        .arg(format!("http://{addr}"))
        .current_dir(dir);
    cmd.env_remove("PROVIDER_HOST_TOKEN");
    if let Some(t) = token {
        cmd.env("PROVIDER_HOST_TOKEN", t);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tenants_of(dir: &std::path::Path, addr: &str, token: &str) -> Vec<String> {
    let (code, out, err) = admin(dir, addr, Some(token), &["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["services"][0]["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["tenant"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn the_admin_commands_drive_a_running_host_and_sighup_reloads_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (mut child, addr, logs) = ops_host(d, false);
    assert!(
        d.join("data/host.db").exists(),
        "the database is beside the config file"
    );
    let platform = mint(d, "platform", "admin");
    let acme_admin = mint(d, "acme", "admin");
    let acme = mint(d, "acme", "user");

    let (code, out, err) = admin(d, &addr, Some(&platform), &["status"]);
    assert_eq!(code, 0, "{err}");
    let header = out.lines().nth(1).unwrap();
    assert!(
        header.starts_with("SERVICE") && header.contains("TENANT") && header.contains("INSTANCE"),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("kv ") && l.contains("acme") && l.contains("idle")),
        "{out}"
    );

    // validate: a good file exits 0, a bad one 2 with each error's place.
    std::fs::write(d.join("good.toml"), OPS_CONFIG.replace("WATCH", "false")).unwrap();
    let (code, out, _) = admin(d, &addr, Some(&platform), &["validate", "good.toml"]);
    assert_eq!(
        (code, out.trim()),
        (0, "good.toml: valid (1 services, 1 tenants)")
    );
    std::fs::write(
        d.join("bad.toml"),
        OPS_CONFIG
            .replace("WATCH", "\"sometimes\"")
            .replace("services = [\"kv\"]", "services = [\"nothing\"]"),
    )
    .unwrap();
    let (code, _, err) = admin(d, &addr, Some(&platform), &["validate", "bad.toml"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("422 VALIDATION_ERROR"), "{err}");
    assert!(
        err.contains("<request body>:4:"),
        "line and column of each error: {err}"
    );
    // A tenant admin may not validate; a missing token is refused; exit 3 for both.
    let (code, _, err) = admin(d, &addr, Some(&acme_admin), &["validate", "good.toml"]);
    assert_eq!(code, 3, "{err}");
    let (code, _, err) = admin(d, &addr, None, &["status"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("401 UNAUTHENTICATED"), "{err}");

    // reload over the API.
    let grow = |tenant: &str| {
        let text = std::fs::read_to_string(d.join("host.toml")).unwrap();
        std::fs::write(
            d.join("host.toml"),
            format!("{text}\n[tenants.{tenant}]\nservices = [\"kv\"]\n"),
        )
        .unwrap();
    };
    grow("initech");
    let (code, out, err) = admin(d, &addr, Some(&platform), &["reload"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("reloaded: generation 2") && out.contains("tenant 'initech' added"),
        "{out}"
    );
    assert!(
        !out.contains("needs a restart"),
        "--listen is not the file's address changing: {out}"
    );
    assert_eq!(tenants_of(d, &addr, &platform), ["acme", "initech"]);
    // An invalid file: exit 2, the running configuration stays.
    let good = std::fs::read_to_string(d.join("host.toml")).unwrap();
    std::fs::write(
        d.join("host.toml"),
        good.replace("[[providers]]", "[[providers]]\nunknown = 1"),
    )
    .unwrap();
    let (code, _, err) = admin(d, &addr, Some(&platform), &["reload"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown field `unknown`"), "{err}");
    std::fs::write(d.join("host.toml"), good).unwrap();

    // SIGHUP reloads too.
    grow("hooli");
    let status = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let end = Instant::now() + Duration::from_secs(10);
    while tenants_of(d, &addr, &platform).len() < 3 {
        assert!(Instant::now() < end, "SIGHUP did not reload");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        tenants_of(d, &addr, &platform),
        ["acme", "hooli", "initech"]
    );

    // pause, resume, restart, disable, enable.
    let client = reqwest::Client::new();
    let call = |token: String| {
        let (client, addr) = (client.clone(), addr.clone());
        async move {
            client
                .post(format!("http://{addr}/providers/kv/set"))
                .bearer_auth(token)
                .json(&json!({"key": "a", "value": 1}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(call(acme.clone()).await, 200);
    let (code, out, err) = admin(d, &addr, Some(&acme_admin), &["pause", "kv"]);
    assert_eq!(
        (code, out.trim()),
        (0, "kv paused for tenant acme"),
        "a tenant admin's own tenant: {err}"
    );
    assert_eq!(call(acme.clone()).await, 503);
    let (code, out, _) = admin(d, &addr, Some(&platform), &["status"]);
    assert_eq!(code, 0);
    assert!(
        out.lines()
            .any(|l| l.starts_with("kv ") && l.contains("acme") && l.contains("yes")),
        "{out}"
    );
    let (code, out, _) = admin(
        d,
        &addr,
        Some(&platform),
        &["resume", "kv", "--tenant", "acme"],
    );
    assert_eq!((code, out.trim()), (0, "kv resumed for tenant acme"));
    assert_eq!(call(acme.clone()).await, 200);
    let (code, out, _) = admin(d, &addr, Some(&platform), &["status", "--tenant", "acme"]);
    assert_eq!(code, 0);
    assert!(
        out.lines().skip(2).all(|l| l.contains("acme")) && out.lines().count() == 3,
        "{out}"
    );
    let (code, out, _) = admin(d, &addr, Some(&platform), &["restart", "kv"]);
    assert_eq!((code, out.trim()), (0, "kv: restarted acme"));
    let (code, _, err) = admin(d, &addr, Some(&platform), &["pause", "nothing"]);
    assert_eq!(code, 4, "{err}");
    let (code, out, _) = admin(d, &addr, Some(&acme_admin), &["disable", "acme", "kv"]);
    assert_eq!((code, out.trim()), (0, "acme/kv: disabled"));
    assert_eq!(call(acme.clone()).await, 404);
    let (code, _, err) = admin(d, &addr, Some(&acme_admin), &["enable", "initech", "kv"]);
    assert_eq!(code, 3, "another tenant: {err}");
    let (code, out, _) = admin(
        d,
        &addr,
        Some(&acme_admin),
        &["enable", "acme", "kv", "--json"],
    );
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["enabled"], true);
    assert_eq!(call(acme).await, 200);
    // Nothing listening: exit 1.
    let (code, _, err) = admin(d, "127.0.0.1:1", Some(&platform), &["status"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot reach"), "{err}");

    assert!(terminate(&mut child).success());
    let logs = logs.join().unwrap();
    assert!(
        logs.contains("SIGHUP: reloading the configuration"),
        "{logs}"
    );
}

#[tokio::test]
async fn watch_config_reloads_when_the_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (mut child, addr, logs) = ops_host(d, true);
    let platform = mint(d, "platform", "admin");
    assert_eq!(tenants_of(d, &addr, &platform), ["acme"]);
    // Modification times can be coarse: make sure this write is seen as a change.
    std::thread::sleep(Duration::from_millis(1100));
    let text = std::fs::read_to_string(d.join("host.toml")).unwrap();
    std::fs::write(
        d.join("host.toml"),
        format!("{text}\n[tenants.initech]\nservices = [\"kv\"]\n"),
    )
    .unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while tenants_of(d, &addr, &platform).len() < 2 {
        assert!(Instant::now() < end, "the change was not picked up");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(terminate(&mut child).success());
    assert!(
        logs.join()
            .unwrap()
            .contains("configuration file changed: reloading")
    );
}

/// Two host processes on one PostgreSQL database issue 200 identifiers between them, all at
/// once: the sequence has no gap and no duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_on_one_postgres_issue_gap_free_uids() {
    let db = providers_database::testing::TestDatabase::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let text = OPS_CONFIG
        .replace("WATCH", "false")
        .replace("sqlite://data/host.db", &db.url)
        .replace("user = [\"kv.*\"]", "user = [\"kv.*\", \"uid.*\"]")
        .replace("services = [\"kv\"]", "services = [\"kv\", \"uid\"]")
        + "\n[[providers]]\nservice = \"uid\"\nconfig = { tenant_code = \"ACME\", plants = [\"KOL\"] }\n";
    std::fs::write(d.join("host.toml"), &text).unwrap();
    let (mut one, a1, _l1) = serve_in(d);
    let (mut two, a2, _l2) = serve_in(d);
    let token = mint(d, "acme", "user");
    let client = reqwest::Client::new();
    let calls = (0..200).map(|i| {
        let addr = if i % 2 == 0 { &a1 } else { &a2 };
        client
            .post(format!("http://{addr}/providers/uid/issue"))
            .bearer_auth(&token)
            .json(&json!({"plant": "KOL", "type": "FG", "entity_type": "unit", "entity_id": format!("u{i}")}))
            .send()
    });
    let responses = futures_util::future::join_all(calls).await;
    let mut sequences = std::collections::BTreeSet::new();
    for r in responses {
        let r = r.unwrap();
        assert_eq!(r.status(), 200);
        let body: serde_json::Value = r.json().await.unwrap();
        sequences.insert(body["data"]["sequence"].as_i64().unwrap());
    }
    assert_eq!(
        sequences,
        (1..=200).collect(),
        "no gaps, no duplicates across two hosts"
    );
    assert!(terminate(&mut one).success());
    assert!(terminate(&mut two).success());
}

/// `admin status` shows every tenant of a host with more than one page of them.
#[tokio::test]
async fn admin_status_follows_every_page() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut text = OPS_CONFIG.replace("WATCH", "false");
    for i in 0..1200 {
        text.push_str(&format!("\n[tenants.t{i:04}]\nservices = [\"kv\"]\n"));
    }
    std::fs::write(d.join("host.toml"), &text).unwrap();
    let (mut child, addr, _logs) = serve_in(d);
    let platform = mint(d, "platform", "admin");
    let tenants = tenants_of(d, &addr, &platform);
    assert_eq!(tenants.len(), 1201, "acme and 1,200 more, over two pages");
    assert_eq!(tenants.first().map(String::as_str), Some("acme"));
    assert_eq!(tenants.last().map(String::as_str), Some("t1199"));
    assert!(terminate(&mut child).success());
}

/// `provider-host secrets|clients …` in `dir` with `stdin`: exit code, stdout, stderr.
fn store_cli(dir: &std::path::Path, args: &[&str], stdin: &str) -> (i32, String, String) {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .args(args)
        .args(["--config", "host.toml"])
        .current_dir(dir)
        .env("RUST_LOG", "trace")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_run_that_uses_secrets_never_shows_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The HS256 signing secret and a client secret are the most sensitive values a host has.
    let jwt = format!(
        "store-held-signing-secret-of-this-run-{}",
        std::process::id()
    );
    let keygen = Command::new(BIN)
        .args(["secrets", "keygen"])
        .output()
        .unwrap();
    assert!(keygen.status.success());
    let master = String::from_utf8(keygen.stdout).unwrap();
    std::fs::write(d.join("master.key"), &master).unwrap();
    let config = OPS_CONFIG
        .replace("WATCH", "false")
        .replace("${env:OPS_JWT_SECRET}", "${secret:jwt_signing}")
        .replace("[security]", "[secrets]\nkey_file = \"master.key\"\n\n[auth]\nenabled = true\nargon2 = { memory_kib = 256, iterations = 1, parallelism = 1 }\n\n[security]");
    std::fs::write(d.join("host.toml"), &config).unwrap();
    let mut seen = String::new();

    let (code, out, err) = store_cli(d, &["secrets", "set", "jwt_signing"], &format!("{jwt}\n"));
    assert_eq!(code, 0, "{err}");
    seen += &(out.clone() + &err);
    assert!(
        out.starts_with("stored secret 'jwt_signing' (key "),
        "{out}"
    );
    let (code, out, err) = store_cli(d, &["secrets", "list"], "");
    assert_eq!(code, 0, "{err}");
    assert!(
        out.lines().nth(1).unwrap().starts_with("jwt_signing "),
        "{out}"
    );
    seen += &(out + &err);
    let (code, _, err) = store_cli(d, &["secrets", "set", "bad name"], "x");
    assert_eq!(
        (code, err.trim()),
        (
            2,
            "error: 'bad name' is not a valid secret name (letters, digits, '_', '.', '-')"
        )
    );
    let (code, out, err) = store_cli(
        d,
        &["clients", "add", "--tenant", "acme", "--roles", "user"],
        "",
    );
    assert_eq!(code, 0, "{err}");
    seen += &err;
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .trim()
            .to_owned()
    };
    let (client_id, client_secret) = (field("client_id"), field("client_secret"));

    let mut child = Command::new(BIN)
        .args(["serve", "--config", "host.toml", "--listen", "127.0.0.1:0"])
        .current_dir(d)
        .env("RUST_LOG", "trace")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (addr, logs) = wait_listening(&mut child);
    let http = reqwest::Client::new();
    let url = |p: &str| format!("http://{addr}{p}");
    // A token minted with the stored key by the CLI, and one from the token service.
    let platform = {
        let out = Command::new(BIN)
            .args([
                "token",
                "--config",
                "host.toml",
                "--tenant",
                "platform",
                "--roles",
                "admin",
            ])
            .current_dir(d)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let grant = http
        .post(url("/auth/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "grant_type=client_credentials&client_id={client_id}&client_secret={client_secret}"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(grant.status(), 200);
    let grant: serde_json::Value = grant.json().await.unwrap();
    let access = grant["access_token"].as_str().unwrap().to_owned();
    let mut answers = String::new();
    for (method, path, token, body) in [
        (
            "POST",
            "/providers/kv/set",
            Some(access.as_str()),
            r#"{"key":"k","value":1}"#,
        ),
        ("POST", "/providers/kv/set", Some("not-a-token"), "{}"),
        (
            "POST",
            "/providers/kv/set",
            Some(access.as_str()),
            "{bad json",
        ),
        ("GET", "/admin/providers", Some(platform.as_str()), ""),
        (
            "GET",
            "/admin/audit?tenant=acme",
            Some(platform.as_str()),
            "",
        ),
        ("GET", "/admin/clients", Some(platform.as_str()), ""),
        ("POST", "/admin/config/reload", Some(platform.as_str()), ""),
        (
            "POST",
            "/admin/config/validate",
            Some(platform.as_str()),
            &config,
        ),
        (
            "POST",
            "/admin/config/validate",
            Some(platform.as_str()),
            &config.replace("jwt_signing", "missing"),
        ),
        ("GET", "/openapi.json", None, ""),
    ] {
        let mut req = http
            .request(method.parse().unwrap(), url(path))
            .body(body.to_owned());
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req
            .header(
                "content-type",
                if path.contains("validate") {
                    "application/toml"
                } else {
                    "application/json"
                },
            )
            .send()
            .await
            .unwrap();
        let status = r.status();
        answers += &format!("{method} {path} {status} {}\n", r.text().await.unwrap());
    }
    assert!(answers.contains("/admin/config/reload 200"), "{answers}");
    // What the command line changed is in the trail too, as the subject `cli`.
    let trail_of = |chain: &str| {
        http.get(url(&format!("/admin/audit?tenant={chain}&subject=cli")))
            .bearer_auth(&platform)
            .send()
    };
    let acme_trail = trail_of("acme").await.unwrap().text().await.unwrap();
    assert!(
        acme_trail.contains(&format!("\"action\":\"cli clients add {client_id}\"")),
        "{acme_trail}"
    );
    let trail = trail_of("-").await.unwrap().text().await.unwrap();
    assert!(trail.contains("cli secrets set jwt_signing"), "{trail}");
    answers += &trail;
    assert!(
        answers.contains("secret 'missing' is not in the secret store"),
        "{answers}"
    );
    assert_eq!(terminate(&mut child).code(), Some(0));
    let logs = logs.join().unwrap();
    assert!(
        logs.contains("TRACE") || logs.contains("DEBUG"),
        "the run logged at every level"
    );
    for (what, text) in [
        ("the CLI output", &seen),
        ("the answers", &answers),
        ("the host's log", &logs),
    ] {
        assert!(!text.contains(&jwt), "the signing secret appears in {what}");
        assert!(
            !text.contains(&client_secret),
            "the client secret appears in {what}"
        );
    }
}

#[tokio::test]
async fn json_logs_keep_their_shape_whatever_clients_send() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config = OPS_CONFIG.replace("WATCH", "false")
        + "\n[observability]\nlog_format = \"json\"\nlog_filter = \"info\"\n";
    std::fs::write(d.join("host.toml"), &config).unwrap();
    let (mut child, addr, logs) = serve_with(d, false);
    // A subject with quotes, a newline, a tab and control characters, as a signed claim.
    let weird = "ada \"the\" admin\nsecond line\t\u{1}\u{7f}\\";
    let key = jsonwebtoken::EncodingKey::from_secret(OPS_SECRET.as_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": weird, "tenant_id": "acme", "roles": ["user"], "iss": "ops", "aud": "providers", "exp": now + 60}),
        &key,
    )
    .unwrap();
    let http = reqwest::Client::new();
    let r = http
        .post(format!("http://{addr}/providers/kv/set"))
        .bearer_auth(&token)
        .header("x-request-id", "json-log-1")
        .body(r#"{"key":"quote\"d\nkey","value":"\u0000"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .get(format!("http://{addr}/no/%22such%0A%ff/route"))
        .header("x-request-id", "json-log-2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(terminate(&mut child).code(), Some(0));
    let logs = logs.join().unwrap();
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 4, "{logs}");
    let access = |id: &str| {
        lines
            .iter()
            .find(|l| l["request_id"] == id)
            .unwrap_or_else(|| panic!("no access line for {id}: {logs}"))
            .clone()
    };
    let one = access("json-log-1");
    let mut keys: Vec<&str> = one
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "error_code",
            "latency_us",
            "level",
            "message",
            "method",
            "path",
            "request_id",
            "status",
            "subject",
            "target",
            "tenant",
            "timestamp"
        ],
        "{one}"
    );
    assert_eq!(
        (
            &one["level"],
            &one["target"],
            &one["message"],
            &one["method"],
            &one["path"],
            &one["status"],
            &one["tenant"],
            &one["subject"],
            &one["error_code"]
        ),
        (
            &json!("INFO"),
            &json!("provider_host::access"),
            &json!("request"),
            &json!("POST"),
            &json!("/providers/kv/set"),
            &json!(200),
            &json!("acme"),
            &json!(weird),
            &json!("")
        )
    );
    assert!(one["latency_us"].as_u64().unwrap() > 0);
    let two = access("json-log-2");
    assert_eq!(
        (&two["status"], &two["error_code"], &two["tenant"]),
        (&json!(404), &json!("NOT_FOUND"), &json!(""))
    );
    assert_eq!(two["path"], "/no/%22such%0A%ff/route");
}

/// A native plugin's log line, written during a nested call, carries the request's span and
/// one span per provider call around it, outermost first, whatever the plugin wrote.
#[tokio::test]
async fn plugin_logs_land_inside_the_request_and_call_spans() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    crate::plugins::stage(
        &d.join("plugins"),
        &crate::plugins::built().file("fixture-1.0.0"),
        "fixture",
        "1.0.0",
        "1.0.0",
        "fixture.so",
    );
    let config = OPS_CONFIG
        .replace("WATCH", "false")
        .replace("user = [\"kv.*\"]", "user = [\"kv.*\", \"fixture.*\"]")
        .replace(
            "[tenants.acme]\nservices = [\"kv\"]",
            "[[providers]]\nservice = \"fixture\"\n\n[tenants.acme]\nservices = [\"kv\", \"fixture\"]",
        )
        + "\n[plugins]\ndirs = [\"plugins\"]\n\n[observability]\nlog_format = \"json\"\nlog_filter = \"info\"\n";
    std::fs::write(d.join("host.toml"), &config).unwrap();
    let (mut child, addr, logs) = serve_with(d, false);
    let token = mint(d, "acme", "user");
    let message = "stock \"low\"\n{\"level\":\"ERROR\"}\u{1}";
    let r = reqwest::Client::new()
        .post(format!("http://{addr}/providers/fixture/call"))
        .bearer_auth(&token)
        .header("x-request-id", "span-1")
        .json(&json!({"service": "fixture", "action": "log", "payload": {"message": message}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(terminate(&mut child).code(), Some(0));
    let logs = logs.join().unwrap();
    let line: serde_json::Value = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["target"] == "plugin")
        .unwrap_or_else(|| panic!("no plugin line: {logs}"));
    assert_eq!(
        (
            &line["level"],
            &line["service"],
            &line["tenant"],
            &line["request_id"]
        ),
        (
            &json!("WARN"),
            &json!("fixture"),
            &json!("acme"),
            &json!("span-1")
        ),
        "{line}"
    );
    assert_eq!(line["message"], format!("{message:?}"), "{line}");
    let spans = line["spans"].as_array().unwrap_or_else(|| panic!("{line}"));
    let names: Vec<&str> = spans.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["request", "call", "call"], "{line}");
    assert_eq!(
        (
            &spans[0]["request_id"],
            &spans[0]["method"],
            &spans[0]["path"],
            &spans[0]["tenant"],
            &spans[0]["subject"]
        ),
        (
            &json!("span-1"),
            &json!("POST"),
            &json!("/providers/fixture/call"),
            &json!("acme"),
            &json!("dev")
        ),
        "{line}"
    );
    for (span, action, depth) in [(&spans[1], "call", 0), (&spans[2], "log", 1)] {
        assert_eq!(
            (
                &span["service"],
                &span["action"],
                &span["tenant"],
                &span["depth"],
                &span["version"],
                &span["kind"]
            ),
            (
                &json!("fixture"),
                &json!(action),
                &json!("acme"),
                &json!(depth),
                &json!("1.0.0"),
                &json!("native")
            ),
            "{line}"
        );
    }
    assert_eq!(line["span"], spans[2], "the current span is the innermost");
}

/// What the test collector received: decoded OTLP spans and the `traceparent` of each request
/// made to its `/echo`.
#[derive(Default)]
struct Collected {
    spans: std::sync::Mutex<Vec<opentelemetry_proto::tonic::trace::v1::Span>>,
    echoed: std::sync::Mutex<Vec<Option<String>>>,
}

/// An OTLP/HTTP receiver on loopback (`POST /v1/traces`, protobuf) that also answers
/// `GET /echo`, recording the trace context it was sent.
async fn collector() -> (std::net::SocketAddr, std::sync::Arc<Collected>) {
    use axum::body::Bytes;
    use axum::http::HeaderMap;
    use prost::Message as _;
    let collected = std::sync::Arc::new(Collected::default());
    let traces = collected.clone();
    let echoes = collected.clone();
    let app = axum::Router::new()
        .route(
            "/v1/traces",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let traces = traces.clone();
                async move {
                    assert_eq!(headers["content-type"], "application/x-protobuf");
                    let request = opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(body)
                        .expect("a valid OTLP export request");
                    let mut spans = traces.spans.lock().unwrap();
                    for resource in request.resource_spans {
                        for scope in resource.scope_spans {
                            spans.extend(scope.spans);
                        }
                    }
                    ""
                }
            }),
        )
        .route(
            "/echo",
            axum::routing::get(move |headers: HeaderMap| {
                let echoes = echoes.clone();
                async move {
                    let parent = headers
                        .get("traceparent")
                        .map(|v| v.to_str().unwrap().to_owned());
                    echoes.echoed.lock().unwrap().push(parent);
                    "echoed"
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, collected)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(span: &opentelemetry_proto::tonic::trace::v1::Span, key: &str) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    let value = span
        .attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref()?.value.clone());
    match value {
        Some(Value::StringValue(s)) => s,
        Some(Value::IntValue(i)) => i.to_string(),
        other => format!("{other:?}"),
    }
}

/// `OPS_CONFIG` with the wasm fixture as `fixture` and as `patient` (which may reach
/// `allowed`), trace export to `otlp`, and `/metrics` open on the loopback listener.
fn traced_host(
    dir: &std::path::Path,
    otlp: &str,
    allowed: &str,
) -> (Child, String, std::thread::JoinHandle<String>) {
    let b = crate::plugins::wasm_built();
    crate::plugins::stage_wasm(
        &dir.join("plugins"),
        &b.dir.join("fixture.wasm"),
        "fixture",
        "1.0.0",
        "fixture.wasm",
    );
    let config = OPS_CONFIG
        .replace("WATCH", "false")
        .replace("user = [\"kv.*\"]", "user = [\"kv.*\", \"fixture.*\", \"patient.*\"]")
        .replace(
            "[tenants.acme]\nservices = [\"kv\"]",
            &format!(
                "[[providers]]\nservice = \"fixture\"\n\n[[providers]]\nservice = \"patient\"\nplugin = \"fixture\"\nallowed_hosts = [\"{allowed}\"]\n\n[tenants.acme]\nservices = [\"kv\", \"fixture\", \"patient\"]"
            ),
        )
        + &format!(
            "\n[plugins]\ndirs = [\"plugins\"]\n\n[observability]\nmetrics = \"open\"\notlp_endpoint = \"{otlp}\"\notlp_interval = \"100ms\"\notlp_timeout = \"1s\"\notlp_service_name = \"erp-test\"\n"
        );
    std::fs::write(dir.join("host.toml"), &config).unwrap();
    serve_in(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_reach_an_otlp_collector_with_the_callers_context() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (at, collected) = collector().await;
    let (mut child, addr, logs) = traced_host(d, &format!("http://{at}"), &at.to_string());
    let token = mint(d, "acme", "user");
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let r = reqwest::Client::new()
        .post(format!("http://{addr}/providers/fixture/call"))
        .bearer_auth(&token)
        .header("x-request-id", "traced-1")
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .header("tracestate", "vendor=opaque")
        .json(&json!({"service": "patient", "action": "fetch", "payload": {"url": format!("http://{at}/echo")}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["data"]["nested"]["body"], "echoed", "{body}");
    // SIGTERM flushes what is queued before the process exits.
    assert_eq!(terminate(&mut child).code(), Some(0));
    let logs = logs.join().unwrap();
    let spans = collected.spans.lock().unwrap().clone();
    let named = |name: &str, action: Option<&str>| {
        spans
            .iter()
            .find(|s| s.name == name && action.is_none_or(|a| attribute(s, "action") == a))
            .unwrap_or_else(|| panic!("no {name} {action:?} span in {spans:#?}\n{logs}"))
            .clone()
    };
    let request = named("request", None);
    let outer = named("call", Some("call"));
    let inner = named("call", Some("fetch"));
    assert_eq!(spans.len(), 3, "one request, two calls: {spans:#?}");
    for span in [&request, &outer, &inner] {
        assert_eq!(hex(&span.trace_id), trace_id, "{span:?}");
    }
    assert_eq!(hex(&request.parent_span_id), caller_span);
    assert_eq!(request.trace_state, "vendor=opaque");
    assert_eq!(outer.parent_span_id, request.span_id);
    assert_eq!(inner.parent_span_id, outer.span_id);
    assert_eq!(
        (
            attribute(&request, "request_id"),
            attribute(&request, "tenant"),
            attribute(&request, "status"),
            attribute(&outer, "service"),
            attribute(&inner, "service"),
            attribute(&inner, "kind"),
            attribute(&inner, "version"),
            attribute(&inner, "outcome"),
        ),
        (
            "traced-1".to_owned(),
            "acme".to_owned(),
            "200".to_owned(),
            "fixture".to_owned(),
            "patient".to_owned(),
            "wasm".to_owned(),
            "1.0.0".to_owned(),
            "ok".to_owned(),
        ),
        "{inner:?}"
    );
    // The outbound request of `patient.fetch` continues the trace as a child of that call.
    assert_eq!(
        *collected.echoed.lock().unwrap(),
        [Some(format!("00-{trace_id}-{}-01", hex(&inner.span_id)))]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_costs_spans_not_requests() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (mut child, addr, logs) = traced_host(d, &format!("http://{closed}"), "127.0.0.1:1");
    let token = mint(d, "acme", "user");
    let client = reqwest::Client::new();
    for i in 0..10 {
        let started = Instant::now();
        let r = client
            .post(format!("http://{addr}/providers/kv/set"))
            .bearer_auth(&token)
            .json(&json!({"key": format!("k{i}"), "value": i}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "not held by the export"
        );
    }
    let dropped = |text: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix("otlp_spans_dropped_total{reason=\"export_failed\"} "))
            .map_or(0.0, |v| v.parse().unwrap())
    };
    // Ten requests, each a request span and a call span: all twenty are lost, and counted,
    // with the request spans of the scrapes before the one that reads the counter.
    let mut last = String::new();
    let mut scrapes = 0;
    for _ in 0..100 {
        scrapes += 1;
        last = client
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if dropped(&last) >= 20.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lost = dropped(&last);
    assert!(
        lost >= 20.0 && lost < f64::from(20 + scrapes),
        "{lost} after {scrapes} scrapes: {last}"
    );
    assert!(!last.contains("otlp_spans_exported_total"), "{last}");
    assert_eq!(terminate(&mut child).code(), Some(0));
    let logs = logs.join().unwrap();
    assert_eq!(
        logs.matches("the trace collector refuses spans").count(),
        1,
        "one warning per outage: {logs}"
    );
}

/// A chain of call steps for the process tests: each writes `effects/<its idempotency key>`,
/// so a step applied twice under two keys would show as an extra entry, and a pause in the
/// middle keeps instances in flight while a host is killed.
const CHAIN: &str = r#"
name = "chain"
version = 1

[[steps]]
id = "one"
type = "call"
service = "kv"
action = "set"
payload = { key = "effects/${step.idempotency_key}", value = "${step.idempotency_key}" }

[[steps]]
id = "two"
type = "call"
service = "kv"
action = "set"
payload = { key = "effects/${step.idempotency_key}", value = "${step.idempotency_key}" }

[[steps]]
id = "pause"
type = "timer"
duration = "PAUSE"

[[steps]]
id = "three"
type = "call"
service = "kv"
action = "set"
payload = { key = "effects/${step.idempotency_key}", value = "${step.idempotency_key}" }
"#;

/// `OPS_CONFIG` on `url` with `workflows` for acme and the chain (pausing `pause`) in `dir/flows`.
fn workflow_host(dir: &std::path::Path, url: &str, pause: &str) {
    std::fs::create_dir_all(dir.join("flows")).unwrap();
    std::fs::write(dir.join("flows/chain.toml"), CHAIN.replace("PAUSE", pause)).unwrap();
    let text = OPS_CONFIG
        .replace("WATCH", "false\nrequest_timeout = \"2s\"")
        .replace("sqlite://data/host.db", url)
        .replace("user = [\"kv.*\"]", "user = [\"kv.*\", \"workflows.*\"]")
        .replace("services = [\"kv\"]", "services = [\"kv\", \"workflows\"]")
        + "\n[[providers]]\nservice = \"workflows\"\n\n[workflows]\ndefinitions = \"flows\"\npoll = \"50ms\"\nlease = \"3s\"\n";
    std::fs::write(dir.join("host.toml"), text).unwrap();
}

/// Starts `n` chains through `addrs` in turn, 50 at a time; returns their ids.
async fn start_chains(addrs: &[&str], token: &str, n: usize) -> Vec<String> {
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for batch in (0..n).collect::<Vec<_>>().chunks(50) {
        let calls = batch.iter().map(|i| {
            client
                .post(format!("http://{}/providers/workflows/start", addrs[i % addrs.len()]))
                .bearer_auth(token)
                .json(&json!({"definition": "chain", "input": {"n": i}, "idempotency_key": format!("chain-{i}")}))
                .send()
        });
        for r in futures_util::future::join_all(calls).await {
            let r = r.unwrap();
            assert_eq!(r.status(), 200);
            let body: serde_json::Value = r.json().await.unwrap();
            ids.push(body["data"]["id"].as_str().unwrap().to_owned());
        }
    }
    ids
}

async fn count(pool: &sqlx::AnyPool, sql: &'static str) -> i64 {
    use sqlx::Row;
    sqlx::query(sql)
        .fetch_one(pool)
        .await
        .unwrap()
        .get::<i64, _>(0)
}

/// Waits (within `limit`) until every instance is COMPLETED.
async fn all_completed(pool: &sqlx::AnyPool, n: i64, limit: Duration) {
    let end = Instant::now() + limit;
    loop {
        let done = count(
            pool,
            "SELECT count(*) FROM wf_instances WHERE state = 'COMPLETED'",
        )
        .await;
        if done == n {
            return;
        }
        assert!(
            Instant::now() < end,
            "only {done} of {n} workflows completed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What every run must show once all chains completed: each step recorded once, each
/// effect applied under exactly one key, and that key the step's.
async fn effects_once(pool: &sqlx::AnyPool, n: i64) {
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM wf_history WHERE kind = 'step_completed'"
        )
        .await,
        n * 3
    );
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM (SELECT instance, step FROM wf_history WHERE kind = 'step_completed' \
             GROUP BY instance, step HAVING count(*) > 1) AS twice"
        )
        .await,
        0,
        "no step is recorded twice"
    );
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM kv_entries WHERE tenant = 'acme' AND key LIKE 'effects/%'"
        )
        .await,
        n * 3,
        "one effect per step, none under a second key"
    );
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM kv_entries WHERE tenant = 'acme' AND key LIKE 'effects/%' \
             AND value <> '\"' || substr(key, 9) || '\"'"
        )
        .await,
        0
    );
}

/// SIGKILL in the middle of 100 workflows, then a restart: every workflow completes, no step
/// is lost, and none is applied twice (a step in flight at the kill runs again under the
/// same idempotency key once the dead host's lease expires).
#[tokio::test]
async fn a_host_killed_mid_run_resumes_every_workflow_once_restarted() {
    let db = providers_database::testing::TestDatabase::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    workflow_host(d, &db.url, "300ms");
    let (mut host, addr, _logs) = serve_in(d);
    let token = mint(d, "acme", "user");
    let pool = sqlx::AnyPool::connect(&db.url).await.unwrap();
    let ids = start_chains(&[&addr], &token, 100).await;
    // Kill once a quarter of the steps ran: the pause holds the rest back.
    let end = Instant::now() + Duration::from_secs(30);
    while count(
        &pool,
        "SELECT count(*) FROM wf_history WHERE kind = 'step_completed'",
    )
    .await
        < 75
    {
        assert!(Instant::now() < end, "the workflows did not run");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    host.kill().unwrap();
    host.wait().unwrap();
    let unfinished = count(
        &pool,
        "SELECT count(*) FROM wf_instances WHERE state <> 'COMPLETED'",
    )
    .await;
    assert!(unfinished > 0, "the kill came after the run");
    let (mut again, addr, _logs) = serve_in(d);
    all_completed(&pool, 100, Duration::from_secs(60)).await;
    effects_once(&pool, 100).await;
    assert_eq!(
        count(&pool, "SELECT count(DISTINCT (detail::jsonb ->> 'host')) FROM wf_history WHERE kind = 'step_started'").await,
        2,
        "the restarted host took over what the killed one held"
    );
    // Starting them again returns the same instances.
    assert_eq!(start_chains(&[&addr], &token, 100).await, ids);
    assert!(terminate(&mut again).success());
}

/// Two hosts on one PostgreSQL share 1,000 workflows: every step runs exactly once, and both
/// hosts ran some.
#[tokio::test]
async fn two_hosts_on_one_postgres_run_each_workflow_step_once() {
    let db = providers_database::testing::TestDatabase::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    workflow_host(d, &db.url, "1ms");
    let (mut one, a1, _l1) = serve_in(d);
    let (mut two, a2, _l2) = serve_in(d);
    let token = mint(d, "acme", "user");
    let pool = sqlx::AnyPool::connect(&db.url).await.unwrap();
    start_chains(&[&a1, &a2], &token, 1000).await;
    all_completed(&pool, 1000, Duration::from_secs(180)).await;
    effects_once(&pool, 1000).await;
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM wf_history WHERE kind = 'step_started'"
        )
        .await,
        3000,
        "without a crash no step starts twice"
    );
    let hosts = count(
        &pool,
        "SELECT count(DISTINCT (detail::jsonb ->> 'host')) FROM wf_history WHERE kind = 'step_started'",
    )
    .await;
    assert_eq!(hosts, 2, "both hosts ran steps");
    assert!(terminate(&mut one).success());
    assert!(terminate(&mut two).success());
}

/// On SQLite one host process runs workflows: a second is refused before it listens, saying
/// why; after the first is killed, a new one starts at once.
#[tokio::test]
async fn a_second_host_on_one_sqlite_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("data")).unwrap();
    sqlx::any::install_default_drivers();
    workflow_host(d, "sqlite://data/host.db", "1ms");
    let (mut first, addr, _logs) = serve_in(d);
    let out = Command::new(BIN)
        .args(["serve", "--config", "host.toml", "--listen", "127.0.0.1:0"])
        .current_dir(d)
        .env("OPS_JWT_SECRET", OPS_SECRET)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("workflows on SQLite run in one host process")
            && stderr.contains("run several hosts on PostgreSQL"),
        "{stderr}"
    );
    // The first one still serves.
    let token = mint(d, "acme", "user");
    let ids = start_chains(&[&addr], &token, 5).await;
    first.kill().unwrap();
    first.wait().unwrap();
    let (mut next, addr, _logs) = serve_in(d);
    let pool = sqlx::AnyPool::connect(&format!("sqlite://{}", d.join("data/host.db").display()))
        .await
        .unwrap();
    all_completed(&pool, 5, Duration::from_secs(30)).await;
    effects_once(&pool, 5).await;
    assert_eq!(start_chains(&[&addr], &token, 5).await, ids);
    assert!(terminate(&mut next).success());
}
