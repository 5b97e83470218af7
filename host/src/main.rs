//! `provider-host`: serve, check a configuration, mint a development token.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use provider_host::config::{self, Config, ConfigError};
use provider_host::host::{ConfigSource, Origin};
use provider_host::{Host, builtin_registry, demo, http};
use providers_security::{Identity, TokenIssuer};

/// The allocator the host runs with (the same in the benchmarks' references, so ratios compare
/// like with like): glibc's malloc and free were a third of a request's cost.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod admin_cli;
mod store_cli;

#[derive(Parser)]
#[command(
    name = "provider-host",
    version,
    about = "Hosts ERP providers behind one HTTP contract, per tenant."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serves the providers. Without --config, runs the demo (tenants acme and globex on SQLite in ./data).
    Serve {
        /// The host configuration (TOML).
        #[arg(long, env = "PROVIDER_HOST_CONFIG")]
        config: Option<PathBuf>,
        /// Listen here instead of server.listen.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Checks a configuration against the providers this binary has, without starting anything.
    Check {
        /// The host configuration (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Mints a development token with the configured signing key.
    Token {
        /// The tenant the token speaks for.
        #[arg(long)]
        tenant: String,
        /// Comma-separated roles.
        #[arg(long, value_delimiter = ',', default_value = "")]
        roles: Vec<String>,
        /// The subject (`sub`).
        #[arg(long, default_value = "dev")]
        subject: String,
        /// The company the subject acts for (`company_id`), e.g. the buyer or the seller of a
        /// purchase order.
        #[arg(long)]
        company: Option<String>,
        /// How long the token is valid, e.g. 1h, 30m.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// The host configuration; the demo's when absent.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Mints this many tokens, one per line, with subjects SUBJECT-1, SUBJECT-2, … (for
        /// load tests that must not hit the verified-token cache).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        count: u32,
    },
    /// Lists, inspects and creates plugins.
    Plugins {
        #[command(subcommand)]
        command: PluginsCommand,
    },
    /// Talks to a running host's admin API: status, validate, reload, pause, resume, restart.
    Admin(admin_cli::AdminArgs),
    /// The token service's clients (OAuth2 client credentials), in the configured database.
    Clients {
        #[command(subcommand)]
        command: store_cli::ClientsCommand,
    },
    /// The secret store behind ${secret:NAME} references.
    Secrets {
        #[command(subcommand)]
        command: store_cli::SecretsCommand,
    },
    /// Checks the audit trail in the configured database.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Walks every hash chain (or one tenant's): exit 0 when all are intact, 1 when one is
    /// broken (edited, inserted or deleted records), naming the first break in each.
    Verify {
        /// The host configuration; the demo's when absent.
        #[arg(long, env = "PROVIDER_HOST_CONFIG")]
        config: Option<PathBuf>,
        /// Only this tenant's chain (`-` for requests without a configured tenant).
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(Subcommand)]
enum PluginsCommand {
    /// Every plugin in the configured (or given) folders: whether its hash matches and whether it would load.
    List {
        /// Read `[plugins] dirs` from this configuration.
        #[arg(long, conflicts_with = "dir")]
        config: Option<PathBuf>,
        /// A plugin folder (repeatable).
        #[arg(long)]
        dir: Vec<PathBuf>,
    },
    /// The build facts and descriptor of a native plugin file, running only the checks and `describe`.
    Inspect {
        /// The plugin file (.so).
        file: PathBuf,
    },
    /// Writes a ready-to-build plugin crate.
    New {
        /// native (wasm once that engine lands).
        #[arg(long, default_value = "native")]
        kind: String,
        /// The provider's service name.
        name: String,
        /// Where to write the crate (default: ./NAME).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Path of the providers-core crate to depend on (default: the one this binary was built from, if present).
        #[arg(long)]
        core_path: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `serve` logs as its configuration's [observability] says, from the first line on.
    let observability = match &cli.command {
        Command::Serve { config, .. } => match config {
            Some(path) => std::fs::read_to_string(path)
                .map(|text| provider_host::observe::settings_of(&text))
                .unwrap_or_default(),
            None => provider_host::observe::settings_of(config::DEMO),
        },
        _ => Default::default(),
    };
    let telemetry = match providers_observability::init(
        observability.log_format,
        observability.log_filter.as_deref(),
        observability.otlp().as_ref(),
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Serve { config, listen } => serve(config, listen),
        Command::Check { config } => check(&config),
        Command::Token {
            tenant,
            roles,
            subject,
            company,
            ttl,
            config,
            count,
        } => token(config, &tenant, &roles, &subject, company, ttl, count),
        Command::Plugins { command } => plugins(command),
        Command::Admin(args) => admin_cli::run(args),
        Command::Clients { command } => store_cli::clients(command, source),
        Command::Secrets { command } => store_cli::secrets(command, source),
        Command::Audit {
            command: AuditCommand::Verify { config, tenant },
        } => audit_verify(config, tenant.as_deref()),
    };
    // The spans of the last requests still go out before the process ends.
    telemetry.shutdown();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once: a cause whose text its parent already
/// contains (sqlx repeats its source in its own message) is skipped.
fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

fn print_errors(errors: &[ConfigError]) {
    for e in errors {
        eprintln!("{e}");
    }
}

/// The configuration at `path`, or the demo's (creating its secret) when there is none.
fn load(path: Option<&Path>) -> anyhow::Result<Result<Config, Vec<ConfigError>>> {
    let source = source(path)?;
    Ok(source.load(None))
}

/// Where the configuration comes from: the file, or the embedded demo against the working directory.
fn source(path: Option<&Path>) -> anyhow::Result<ConfigSource> {
    source_with(path, None)
}

fn source_with(path: Option<&Path>, listen: Option<SocketAddr>) -> anyhow::Result<ConfigSource> {
    let origin = match path {
        Some(path) => Origin::File(path.to_path_buf()),
        None => {
            let cwd = std::env::current_dir().context("reading the working directory")?;
            demo::ensure_secret(&cwd)?;
            demo::write_workflows(&cwd)?;
            Origin::Text {
                text: config::DEMO.to_owned(),
                name: "<demo>".into(),
                base: cwd,
            }
        }
    };
    Ok(ConfigSource {
        registry: builtin_registry()?,
        origin,
        env: Box::new(|n| std::env::var(n).ok()),
        listen,
    })
}

fn audit_verify(path: Option<PathBuf>, tenant: Option<&str>) -> anyhow::Result<ExitCode> {
    let config = match load(path.as_deref())? {
        Ok(c) => c,
        Err(errors) => {
            print_errors(&errors);
            return Ok(ExitCode::from(2));
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let reports = runtime.block_on(async {
        let storage = provider_host::storage::Storage::open(&config.storage).await?;
        let reports = provider_host::audit::verify(storage.pool(), tenant)
            .await
            .context("reading the audit trail")?;
        storage.close().await;
        anyhow::Ok(reports)
    })?;
    let mut broken = 0;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if reports.is_empty() {
        writeln!(
            out,
            "no audit records{}",
            tenant
                .map(|t| format!(" for tenant '{t}'"))
                .unwrap_or_default()
        )?;
    }
    for r in &reports {
        match &r.problem {
            None => writeln!(
                out,
                "{}: {} records, intact, head {}",
                r.tenant, r.records, r.head
            )?,
            Some(problem) => {
                broken += 1;
                writeln!(out, "{}: BROKEN: {problem}", r.tenant)?;
            }
        }
    }
    out.flush()?;
    Ok(if broken == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn check(path: &Path) -> anyhow::Result<ExitCode> {
    match load(Some(path))? {
        Ok(c) => {
            for w in &c.warnings {
                eprintln!("{w}");
            }
            #[allow(clippy::print_stdout, reason = "the CLI's answer")]
            {
                println!(
                    "{}: ok ({} services, {} tenants)",
                    path.display(),
                    c.services.len(),
                    c.tenants.len()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            print_errors(&errors);
            eprintln!("{}: {} error(s)", path.display(), errors.len());
            Ok(ExitCode::from(2))
        }
    }
}

#[allow(clippy::print_stdout, reason = "the CLI's answers")]
fn plugins(command: PluginsCommand) -> anyhow::Result<ExitCode> {
    use provider_host::plugins::{PluginKind, cli};
    match command {
        PluginsCommand::List { config, dir } => {
            let dirs = match config {
                Some(path) => match load(Some(&path))? {
                    Ok(c) => c.plugins.dirs,
                    Err(errors) => {
                        print_errors(&errors);
                        return Ok(ExitCode::from(2));
                    }
                },
                None if dir.is_empty() => vec![PathBuf::from("plugins")],
                None => dir,
            };
            print!("{}", cli::list(&dirs));
            Ok(ExitCode::SUCCESS)
        }
        PluginsCommand::Inspect { file } => match cli::inspect(&file) {
            Ok(report) => {
                println!("{report}");
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{}: refused: {e}", file.display());
                Ok(ExitCode::from(2))
            }
        },
        PluginsCommand::New {
            kind,
            name,
            dir,
            core_path,
        } => {
            let kind = match kind.as_str() {
                "native" => PluginKind::Native,
                "wasm" => PluginKind::Wasm,
                other => bail!("unknown kind '{other}' (expected native or wasm)"),
            };
            let core = core_path
                .or_else(|| {
                    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../providers-core");
                    p.exists().then(|| p.canonicalize().unwrap_or(p))
                })
                .map(|p| format!("path = {:?}", p.display().to_string()))
                .unwrap_or_else(|| "version = \"0.1\"".to_owned());
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            match cli::new(kind, &name, &dir, &core) {
                Ok(files) => {
                    for f in files {
                        println!("wrote {}", f.display());
                    }
                    match kind {
                        PluginKind::Native => println!(
                            "build it with: cd {} && cargo build --release",
                            dir.display()
                        ),
                        PluginKind::Wasm => println!(
                            "build it with: cd {} && cargo build --release --target wasm32-wasip2 (rustup target add wasm32-wasip2 once)",
                            dir.display()
                        ),
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    Ok(ExitCode::from(2))
                }
            }
        }
    }
}

fn token(
    path: Option<PathBuf>,
    tenant: &str,
    roles: &[String],
    subject: &str,
    company: Option<String>,
    ttl: Duration,
    count: u32,
) -> anyhow::Result<ExitCode> {
    let config = match load(path.as_deref())? {
        Ok(c) => c,
        Err(errors) => {
            print_errors(&errors);
            return Ok(ExitCode::from(2));
        }
    };
    let platform = config.admin.platform_tenant.as_deref() == Some(tenant);
    if !config.tenants.contains_key(tenant) && !platform {
        bail!("tenant '{tenant}' is not configured in {}", config.source);
    }
    let roles: Vec<String> = roles.iter().filter(|r| !r.is_empty()).cloned().collect();
    let issuer = TokenIssuer::new(&config.keys, config.token.clone())?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for i in 1..=count {
        let subject = if count == 1 {
            subject.to_owned()
        } else {
            format!("{subject}-{i}")
        };
        let identity = Identity {
            subject: subject.into(),
            tenant: tenant.into(),
            roles: roles.as_slice().into(),
            company_id: company.as_deref().filter(|c| !c.is_empty()).map(Into::into),
        };
        let token = issuer.mint_identity(&identity, ttl.as_secs())?;
        out.write_all(format!("{token}\n").as_bytes())?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn serve(path: Option<PathBuf>, listen: Option<SocketAddr>) -> anyhow::Result<ExitCode> {
    let is_demo = path.is_none();
    let source = source_with(path.as_deref(), listen)?;
    let config = match source.load(None) {
        Ok(c) => c,
        Err(errors) => {
            print_errors(&errors);
            return Ok(ExitCode::from(2));
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let inventory = config
        .services
        .get("inventory")
        .and_then(|s| s.unavailable.clone());
    let pricing = config
        .services
        .get("pricing")
        .and_then(|s| s.unavailable.clone());
    runtime.block_on(async move {
        let addr = config.server.listen;
        let issuer = if is_demo {
            Some(TokenIssuer::new(&config.keys, config.token.clone())?)
        } else {
            None
        };
        // Storage first: a host that cannot reach its database never opens its port, so a
        // load balancer never sees it half-started.
        let watch = config.server.watch_config.then(|| path.clone()).flatten();
        let host = Host::start_with(config, Some(source)).await?;
        reload_on_signal(&host);
        if let Some(file) = watch {
            reload_on_change(&host, file);
        }
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        let local = listener.local_addr()?;
        let tour = match issuer {
            Some(issuer) => {
                let day = 24 * 3600;
                Some(demo::banner(
                    &local.to_string(),
                    &issuer.mint("demo-user", "acme", &["staff".into()], day)?,
                    &issuer.mint("demo-user", "globex", &["staff".into()], day)?,
                    inventory.as_deref(),
                    pricing.as_deref(),
                ))
            }
            None => None,
        };
        tracing::info!(%local, "listening");
        if let Some(tour) = tour {
            // Not `println!`: a closed stdout (`serve | head`) must not take the server down.
            let mut out = std::io::stdout().lock();
            if let Err(e) = writeln!(out, "{tour}").and_then(|()| out.flush()) {
                tracing::warn!(error = %e, "could not print the demo's tour");
            }
        }
        http::serve(host, listener, shutdown_signal()).await?;
        tracing::info!("stopped");
        Ok(ExitCode::SUCCESS)
    })
}

/// SIGHUP reloads the configuration; a refused one is logged and the running one stays.
fn reload_on_signal(host: &std::sync::Arc<Host>) {
    #[cfg(unix)]
    {
        let host = std::sync::Arc::downgrade(host);
        tokio::spawn(async move {
            let kind = tokio::signal::unix::SignalKind::hangup();
            let Ok(mut hup) = tokio::signal::unix::signal(kind) else {
                tracing::warn!("cannot listen for SIGHUP; reload over /admin/config/reload");
                return;
            };
            while hup.recv().await.is_some() {
                let Some(host) = host.upgrade() else { return };
                tracing::info!("SIGHUP: reloading the configuration");
                log_reload(host.reload().await);
            }
        });
    }
}

fn log_reload(
    result: Result<provider_host::host::ReloadReport, provider_host::host::reload::ReloadError>,
) {
    match result {
        Ok(report) => {
            for change in &report.changes {
                tracing::info!(generation = report.generation, "{change}");
            }
            for failure in &report.connect_failures {
                tracing::warn!("after reload: {failure}");
            }
        }
        // The errors themselves were logged, one per line, by the reload.
        Err(e) => tracing::warn!("reload refused: {e}"),
    }
}

/// `[server] watch_config`: reloads when the file's modification time or size changes,
/// checked every second (a polling loop needs no platform watcher and sees edits made by
/// replacing the file as well as in place).
fn reload_on_change(host: &std::sync::Arc<Host>, file: PathBuf) {
    let host = std::sync::Arc::downgrade(host);
    tokio::spawn(async move {
        let stamp = |f: &Path| {
            std::fs::metadata(f)
                .ok()
                .map(|m| (m.modified().ok(), m.len()))
        };
        let mut last = stamp(&file);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let now = stamp(&file);
            if now == last || now.is_none() {
                continue;
            }
            last = now;
            let Some(host) = host.upgrade() else { return };
            tracing::info!(file = %file.display(), "configuration file changed: reloading");
            log_reload(host.reload().await);
        }
    });
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
