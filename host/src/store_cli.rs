//! `provider-host clients …` and `provider-host secrets …`: the token service's clients and
//! the secret store, read and written directly in the configured system database.
//!
//! Exit codes: 0 done, 1 the store failed, 2 the configuration or the input was invalid,
//! 4 no such client or secret.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use provider_host::auth::{self, NewClient};
use provider_host::config::ConfigError;
use provider_host::host::ConfigSource;
use provider_host::secrets::{self, StoreAccess};
use provider_host::storage::Storage;
use providers_security::{MasterKey, Secret, SecretHasher};

#[derive(Subcommand)]
pub enum ClientsCommand {
    /// Creates a client and prints its id and secret (the secret is shown only this once).
    Add {
        /// The tenant its tokens are for (the platform tenant makes platform operators).
        #[arg(long)]
        tenant: String,
        /// Comma-separated roles, each defined in [security.roles] (or the admin role).
        #[arg(long, value_delimiter = ',', required = true)]
        roles: Vec<String>,
        /// The tokens' subject (default: the client id).
        #[arg(long)]
        subject: Option<String>,
        /// The tokens' company_id.
        #[arg(long)]
        company: Option<String>,
        /// The host configuration; the demo's when absent.
        #[arg(long, env = "PROVIDER_HOST_CONFIG")]
        config: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Lists clients (never their secrets).
    List {
        /// Only this tenant's.
        #[arg(long)]
        tenant: Option<String>,
        /// The host configuration; the demo's when absent.
        #[arg(long, env = "PROVIDER_HOST_CONFIG")]
        config: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revokes a client and every refresh token it holds; its access tokens expire on their own.
    Revoke {
        /// The client id.
        client_id: String,
        /// The host configuration; the demo's when absent.
        #[arg(long, env = "PROVIDER_HOST_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum SecretsCommand {
    /// Prints a new master key (32 random bytes, base64) for [secrets] key_file.
    Keygen,
    /// Stores a secret, reading its value from standard input (never from the command line,
    /// which other users can see); one trailing newline is dropped.
    Set {
        /// Its name, as in ${secret:NAME}.
        name: String,
        /// The host configuration; the demo's when absent.
        #[arg(long, env = "PROVIDER_HOST_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Lists stored secrets: names, key ids and times, never values.
    List {
        /// The host configuration; the demo's when absent.
        #[arg(long, env = "PROVIDER_HOST_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Re-seals every value under the current key (after a new key_file, with the old one in
    /// previous_key_files); then the old key can go.
    Rotate {
        /// The host configuration; the demo's when absent.
        #[arg(long, env = "PROVIDER_HOST_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Removes a secret.
    Remove {
        /// Its name.
        name: String,
        /// The host configuration; the demo's when absent.
        #[arg(long, env = "PROVIDER_HOST_CONFIG")]
        config: Option<PathBuf>,
    },
}

/// Puts a change made from the command line (subject `cli`) in the audit trail.
async fn record(pool: &sqlx::AnyPool, tenant: &str, action: String) -> anyhow::Result<()> {
    provider_host::audit::append(
        pool,
        vec![provider_host::audit::Record {
            tenant: tenant.to_owned(),
            kind: "admin".into(),
            subject: "cli".into(),
            action,
            outcome: "ok".into(),
            ..Default::default()
        }],
    )
    .await
    .context("recording the change in the audit trail")
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn print_errors(errors: &[ConfigError]) -> ExitCode {
    for e in errors {
        eprintln!("{e}");
    }
    ExitCode::from(2)
}

fn ms_text(ms: i64) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

#[allow(clippy::print_stdout, reason = "the CLI's answers")]
pub fn clients(
    command: ClientsCommand,
    source: impl Fn(Option<&std::path::Path>) -> anyhow::Result<ConfigSource>,
) -> anyhow::Result<ExitCode> {
    let path = match &command {
        ClientsCommand::Add { config, .. }
        | ClientsCommand::List { config, .. }
        | ClientsCommand::Revoke { config, .. } => config.clone(),
    };
    let config = match source(path.as_deref())?.load(None) {
        Ok(c) => c,
        Err(errors) => return Ok(print_errors(&errors)),
    };
    runtime()?.block_on(async {
        let storage = Storage::open(&config.storage).await?;
        let pool = storage.pool();
        let code = match command {
            ClientsCommand::Add { tenant, roles, subject, company, json, .. } => {
                let new = NewClient {
                    tenant,
                    subject,
                    roles: roles.into_iter().filter(|r| !r.is_empty()).collect(),
                    company_id: company.filter(|c| !c.is_empty()),
                    created_by: "cli".into(),
                };
                if let Err(why) = auth::check_new(&config, &new) {
                    eprintln!("error: {why}");
                    return Ok(ExitCode::from(2));
                }
                if !config.auth.enabled {
                    eprintln!("note: [auth] enabled is false in {}: the client is stored, but the host issues no tokens until it is enabled", config.source);
                }
                let hasher = SecretHasher::new(config.auth.argon2)?;
                let created = auth::add_client(pool, &hasher, new).await.context("creating the client")?;
                record(pool, &created.client.tenant, format!("cli clients add {}", created.client.client_id)).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&created)?);
                } else {
                    println!("client_id      {}", created.client.client_id);
                    println!("client_secret  {}", created.client_secret);
                    println!("tenant         {}", created.client.tenant);
                    println!("subject        {}", created.client.subject);
                    println!("roles          {}", created.client.roles.join(","));
                    println!("(the secret is shown only now: only its Argon2id hash is stored)");
                }
                ExitCode::SUCCESS
            }
            ClientsCommand::List { tenant, json, .. } => {
                let list = auth::list_clients(pool, tenant.as_deref()).await.context("listing clients")?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&list)?);
                } else if list.is_empty() {
                    println!("no clients");
                } else {
                    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                    writeln!(out, "{:<34} {:<12} {:<24} {:<24} {:<8} CREATED", "CLIENT_ID", "TENANT", "SUBJECT", "ROLES", "STATE")?;
                    for c in &list {
                        writeln!(
                            out,
                            "{:<34} {:<12} {:<24} {:<24} {:<8} {} by {}",
                            c.client_id,
                            c.tenant,
                            c.subject,
                            c.roles.join(","),
                            if c.revoked_ms.is_some() { "revoked" } else { "active" },
                            ms_text(c.created_ms),
                            c.created_by
                        )?;
                    }
                    out.flush()?;
                }
                ExitCode::SUCCESS
            }
            ClientsCommand::Revoke { client_id, .. } => match auth::revoke_client(pool, &client_id, None).await.context("revoking the client")? {
                Some(c) => {
                    record(pool, &c.tenant, format!("cli clients revoke {}", c.client_id)).await?;
                    println!("revoked {} (tenant {}); its refresh tokens are revoked, its access tokens expire within {}s", c.client_id, c.tenant, config.auth.access_ttl.as_secs());
                    ExitCode::SUCCESS
                }
                None => {
                    eprintln!("error: no client '{client_id}'");
                    ExitCode::from(4)
                }
            },
        };
        storage.close().await;
        anyhow::Ok(code)
    })
}

fn store(source: &ConfigSource) -> Result<StoreAccess, ExitCode> {
    source.secret_store().map_err(|e| print_errors(&e))
}

#[allow(clippy::print_stdout, reason = "the CLI's answers")]
pub fn secrets(
    command: SecretsCommand,
    source: impl Fn(Option<&std::path::Path>) -> anyhow::Result<ConfigSource>,
) -> anyhow::Result<ExitCode> {
    let path = match &command {
        SecretsCommand::Keygen => {
            println!("{}", MasterKey::generate());
            return Ok(ExitCode::SUCCESS);
        }
        SecretsCommand::Set { config, .. }
        | SecretsCommand::List { config }
        | SecretsCommand::Rotate { config }
        | SecretsCommand::Remove { config, .. } => config.clone(),
    };
    let access = match store(&source(path.as_deref())?) {
        Ok(a) => a,
        Err(code) => return Ok(code),
    };
    let keys = || {
        access.keys.clone().ok_or_else(|| {
            eprintln!("error: [secrets] names no master key (key_file or key_env); 'provider-host secrets keygen' prints one");
            ExitCode::from(2)
        })
    };
    let value = if let SecretsCommand::Set { name, .. } = &command {
        if providers_security::find_references(&format!("${{secret:{name}}}")).is_err() {
            eprintln!(
                "error: '{name}' is not a valid secret name (letters, digits, '_', '.', '-')"
            );
            return Ok(ExitCode::from(2));
        }
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the value from standard input")?;
        let text = text
            .strip_suffix('\n')
            .map(|t| t.strip_suffix('\r').unwrap_or(t))
            .unwrap_or(&text)
            .to_owned();
        if text.is_empty() {
            eprintln!("error: the value on standard input is empty");
            return Ok(ExitCode::from(2));
        }
        Some(Secret::new(text))
    } else {
        None
    };
    runtime()?.block_on(async {
        let storage = Storage::open(&access.storage).await?;
        let pool = storage.pool();
        let code = match command {
            SecretsCommand::Keygen => ExitCode::SUCCESS,
            SecretsCommand::Set { name, .. } => match keys() {
                Ok(keys) => {
                    let value = value.unwrap_or_else(|| Secret::new(""));
                    secrets::set(pool, &keys, &name, &value)
                        .await
                        .context("storing the secret")?;
                    record(
                        pool,
                        provider_host::audit::NO_TENANT,
                        format!("cli secrets set {name}"),
                    )
                    .await?;
                    println!(
                        "stored secret '{name}' (key {}); reload the host for it to take effect",
                        keys.current.id()
                    );
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            },
            SecretsCommand::List { .. } => {
                let list = secrets::list(pool).await.context("listing secrets")?;
                let current = access.keys.as_ref().map(|k| k.current.id().to_owned());
                if list.is_empty() {
                    println!("no secrets");
                } else {
                    println!("{:<32} {:<10} UPDATED", "NAME", "KEY");
                    for s in &list {
                        let stale = current.as_deref().is_some_and(|c| c != s.key_id);
                        println!(
                            "{:<32} {:<10} {}{}",
                            s.name,
                            s.key_id,
                            ms_text(s.updated_ms),
                            if stale {
                                "  (older key: run secrets rotate)"
                            } else {
                                ""
                            }
                        );
                    }
                }
                ExitCode::SUCCESS
            }
            SecretsCommand::Rotate { .. } => match keys() {
                Ok(keys) => {
                    let n = secrets::rotate(pool, &keys)
                        .await
                        .context("rotating the secrets")?;
                    record(
                        pool,
                        provider_host::audit::NO_TENANT,
                        format!("cli secrets rotate ({n} re-sealed)"),
                    )
                    .await?;
                    println!("re-sealed {n} secret(s) under key {}", keys.current.id());
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            },
            SecretsCommand::Remove { name, .. } => {
                if secrets::remove(pool, &name)
                    .await
                    .context("removing the secret")?
                {
                    record(
                        pool,
                        provider_host::audit::NO_TENANT,
                        format!("cli secrets remove {name}"),
                    )
                    .await?;
                    println!("removed secret '{name}'");
                    ExitCode::SUCCESS
                } else {
                    eprintln!("error: no secret '{name}'");
                    ExitCode::from(4)
                }
            }
        };
        storage.close().await;
        anyhow::Ok(code)
    })
}
