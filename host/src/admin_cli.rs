//! `provider-host admin …`: a running host's admin API from the command line.
//!
//! Exit codes: 0 done, 1 the host could not be reached or failed (5xx), 2 the request or
//! the configuration was invalid, 3 the token was refused (401/403), 4 no such service or
//! tenant (404), 5 the change conflicts with the host's state (409).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

#[derive(Args)]
pub struct AdminArgs {
    /// The host's base URL.
    #[arg(
        long,
        env = "PROVIDER_HOST_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    url: String,
    /// An administrator's bearer token.
    #[arg(
        long,
        env = "PROVIDER_HOST_TOKEN",
        hide_env_values = true,
        global = true
    )]
    token: Option<String>,
    /// Print the host's JSON answer instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Every provider with its version, kind and state per tenant.
    Status {
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Only this service.
        #[arg(long)]
        service: Option<String>,
    },
    /// Checks a configuration file on the host (its plugins, its registry), applying nothing.
    Validate {
        /// The configuration (TOML).
        file: PathBuf,
    },
    /// Reloads the host's configuration and plugin folders, applying only what changed.
    Reload,
    /// Pauses a provider: its calls answer 503 until resumed (kept across restarts).
    Pause(Targeted),
    /// Resumes a paused provider.
    Resume(Targeted),
    /// Restarts a provider's instances: each new one connects before it takes over.
    Restart(Targeted),
    /// Enables a tenant's service again after `disable`.
    Enable(TenantService),
    /// Hides a service from a tenant (kept across restarts).
    Disable(TenantService),
}

#[derive(Args)]
struct Targeted {
    /// The service.
    service: String,
    /// One tenant (default: every tenant for a platform operator, your own for a tenant admin).
    #[arg(long)]
    tenant: Option<String>,
}

#[derive(Args)]
struct TenantService {
    /// The tenant.
    tenant: String,
    /// The service.
    service: String,
}

pub fn run(args: AdminArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(call(args))
}

fn exit_for(status: u16) -> ExitCode {
    ExitCode::from(match status {
        200..=299 => 0,
        400 | 413 | 422 => 2,
        401 | 403 => 3,
        404 => 4,
        409 => 5,
        _ => 1,
    })
}

async fn call(args: AdminArgs) -> anyhow::Result<ExitCode> {
    let base = args.url.trim_end_matches('/').to_owned();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .context("building the HTTP client")?;
    let targeted = |verb: &str, t: &Targeted| {
        let body = match &t.tenant {
            Some(tenant) => json!({"tenant": tenant}),
            None => json!({}),
        };
        (
            reqwest::Method::POST,
            format!("/admin/providers/{}/{verb}", t.service),
            Some(body.to_string()),
        )
    };
    let (method, path, body) = match &args.command {
        AdminCommand::Status { tenant, service } => {
            // Every page, for a table of the whole host.
            let mut query = vec![("limit", "1000".to_owned())];
            if let Some(t) = tenant {
                query.push(("tenant", t.clone()));
            }
            if let Some(s) = service {
                query.push(("service", s.clone()));
            }
            let q: Vec<String> = query
                .iter()
                .map(|(k, v)| format!("{k}={}", encode(v)))
                .collect();
            (
                reqwest::Method::GET,
                format!("/admin/providers?{}", q.join("&")),
                None,
            )
        }
        AdminCommand::Validate { file } => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            (
                reqwest::Method::POST,
                "/admin/config/validate".to_owned(),
                Some(text),
            )
        }
        AdminCommand::Reload => (
            reqwest::Method::POST,
            "/admin/config/reload".to_owned(),
            None,
        ),
        AdminCommand::Pause(t) => targeted("pause", t),
        AdminCommand::Resume(t) => targeted("resume", t),
        AdminCommand::Restart(t) => targeted("restart", t),
        AdminCommand::Enable(t) | AdminCommand::Disable(t) => (
            reqwest::Method::POST,
            format!(
                "/admin/tenants/{}/services/{}/{}",
                t.tenant,
                t.service,
                if matches!(args.command, AdminCommand::Enable(_)) {
                    "enable"
                } else {
                    "disable"
                }
            ),
            None,
        ),
    };
    let mut request = client.request(method, format!("{base}{path}"));
    if let Some(token) = &args.token {
        request = request.bearer_auth(token.trim());
    }
    if let Some(body) = body {
        let kind = if matches!(args.command, AdminCommand::Validate { .. }) {
            "application/toml"
        } else {
            "application/json"
        };
        request = request.header("content-type", kind).body(body);
    }
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot reach {base}: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    let mut status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    let mut answer: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    // `status` shows the whole host: the following pages' tenants join the first page's.
    let first_url = format!("{base}{path}");
    while status == 200
        && let Some(next) = answer["next"].as_str().map(str::to_owned)
    {
        let mut request = client.get(format!("{first_url}&after={}", encode(&next)));
        if let Some(token) = &args.token {
            request = request.bearer_auth(token.trim());
        }
        let page: Value = match request.send().await {
            Ok(r) => {
                status = r.status().as_u16();
                r.json().await.unwrap_or(Value::Null)
            }
            Err(e) => {
                eprintln!("error: cannot reach {base}: {e}");
                return Ok(ExitCode::from(1));
            }
        };
        if status != 200 {
            answer = page;
            break;
        }
        if let (Some(all), Some(more)) = (
            answer["services"].as_array_mut(),
            page["services"].as_array(),
        ) {
            for (service, extra) in all.iter_mut().zip(more) {
                if let (Some(t), Some(x)) = (
                    service["tenants"].as_array_mut(),
                    extra["tenants"].as_array(),
                ) {
                    t.extend(x.iter().cloned());
                }
            }
        }
        answer["next"] = page["next"].clone();
    }
    let mut out = String::new();
    if args.json {
        out = format!("{}\n", serde_json::to_string_pretty(&answer)?);
    } else if (200..300).contains(&status) {
        out = render(&args.command, &answer);
    } else {
        let mut err = format!(
            "error: {} {}: {}\n",
            status,
            answer["error_code"].as_str().unwrap_or(""),
            answer["detail"].as_str().unwrap_or(&answer.to_string())
        );
        for e in answer["errors"].as_array().into_iter().flatten() {
            err.push_str(&format!(
                "{}:{}:{}: {}\n",
                e["file"].as_str().unwrap_or(""),
                e["line"],
                e["column"],
                e["message"].as_str().unwrap_or("")
            ));
        }
        eprint!("{err}");
    }
    #[allow(clippy::print_stdout, reason = "the CLI's answer")]
    {
        print!("{out}");
    }
    Ok(exit_for(status))
}

/// A readable answer of a successful call.
fn render(command: &AdminCommand, answer: &Value) -> String {
    let mut out = String::new();
    match command {
        AdminCommand::Status { .. } => {
            out.push_str(&format!(
                "generation {} of {}\n",
                answer["generation"],
                answer["source"].as_str().unwrap_or("")
            ));
            let mut rows = vec![[
                "SERVICE".to_owned(),
                "VERSION".into(),
                "KIND".into(),
                "TENANT".into(),
                "ENABLED".into(),
                "PAUSED".into(),
                "INSTANCE".into(),
            ]];
            for s in answer["services"].as_array().into_iter().flatten() {
                let service = s["service"].as_str().unwrap_or("").to_owned();
                let kind = s["kind"].as_str().unwrap_or("").to_owned();
                let tenants = s["tenants"].as_array().cloned().unwrap_or_default();
                if tenants.is_empty() {
                    rows.push([
                        service.clone(),
                        s["version"].as_str().unwrap_or("").into(),
                        kind.clone(),
                        "-".into(),
                        "-".into(),
                        yes(s["paused_for_all"].as_bool()),
                        s["unavailable"]
                            .as_str()
                            .map_or("-".into(), |_| "unavailable".into()),
                    ]);
                }
                for t in tenants {
                    let instance = match &t["instance"] {
                        Value::Null if s["unavailable"].is_string() => "unavailable".to_owned(),
                        Value::Null => "idle".to_owned(),
                        i => format!(
                            "{} {}{}",
                            i["state"].as_str().unwrap_or(""),
                            i["version"].as_str().unwrap_or(""),
                            if i["calls_in_flight"].as_u64().unwrap_or(0) > 0 {
                                format!(" ({} calls)", i["calls_in_flight"])
                            } else {
                                String::new()
                            }
                        )
                        .trim_end()
                        .to_owned(),
                    };
                    rows.push([
                        service.clone(),
                        t["version"].as_str().unwrap_or("").into(),
                        kind.clone(),
                        t["tenant"].as_str().unwrap_or("").into(),
                        yes(t["enabled"].as_bool()),
                        yes(t["paused"].as_bool()),
                        instance,
                    ]);
                }
            }
            out.push_str(&table(&rows));
        }
        AdminCommand::Validate { file } => out.push_str(&format!(
            "{}: valid ({} services, {} tenants)\n",
            file.display(),
            answer["services"],
            answer["tenants"]
        )),
        AdminCommand::Reload => {
            out.push_str(&format!("reloaded: generation {}\n", answer["generation"]));
            let list = |key: &str| answer[key].as_array().cloned().unwrap_or_default();
            let changes = list("changes");
            if changes.is_empty() {
                out.push_str("  no changes\n");
            }
            for c in changes {
                out.push_str(&format!("  {}\n", c.as_str().unwrap_or("")));
            }
            for r in list("restart_required") {
                out.push_str(&format!(
                    "  needs a restart: {}\n",
                    r.as_str().unwrap_or("")
                ));
            }
            for f in list("connect_failures") {
                out.push_str(&format!(
                    "  failed to connect: {}\n",
                    f.as_str().unwrap_or("")
                ));
            }
        }
        AdminCommand::Pause(t) | AdminCommand::Resume(t) => {
            // The host's answer, not the flag: a tenant admin's default is their own tenant.
            let whom = answer["tenant"]
                .as_str()
                .map_or("every tenant".to_owned(), |x| format!("tenant {x}"));
            let state = if answer["paused"] == json!(true) {
                "paused"
            } else {
                "resumed"
            };
            let already = if answer["changed"] == json!(false) {
                " (already so)"
            } else {
                ""
            };
            out.push_str(&format!("{} {state} for {whom}{already}\n", t.service));
        }
        AdminCommand::Restart(t) => {
            let done: Vec<&str> = answer["restarted"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            out.push_str(&format!(
                "{}: restarted {}\n",
                t.service,
                if done.is_empty() {
                    "nothing (no instance connected)".to_owned()
                } else {
                    done.join(", ")
                }
            ));
            for f in answer["failed"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "  {}: did not connect, the old instance keeps serving: {}\n",
                    f["tenant"].as_str().unwrap_or(""),
                    f["detail"].as_str().unwrap_or("")
                ));
            }
        }
        AdminCommand::Enable(t) | AdminCommand::Disable(t) => {
            let state = if answer["enabled"] == json!(true) {
                "enabled"
            } else {
                "disabled"
            };
            out.push_str(&format!("{}/{}: {state}\n", t.tenant, t.service));
        }
    }
    out
}

/// Percent-encodes a query value (names are plain, but a value is the user's).
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn yes(b: Option<bool>) -> String {
    match b {
        Some(true) => "yes".into(),
        Some(false) => "no".into(),
        None => "-".into(),
    }
}

fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
