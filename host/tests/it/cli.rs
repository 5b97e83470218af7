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
