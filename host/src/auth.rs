//! The token service: OAuth2 client credentials (RFC 6749 §4.4) and refresh-token rotation.
//!
//! A client belongs to one tenant and carries the subject, roles and company its tokens
//! speak for. Its secret is shown once, at creation, and kept only as an Argon2id hash.
//! A grant returns a short-lived access JWT, signed with the host's own key (so its verifier
//! accepts it), and a refresh token. Each refresh token works once: using it returns a new
//! one of the same family, and using a spent one again revokes the whole family, since
//! only a stolen copy would be replayed. Hashing is bounded twice before it runs: per
//! client id and overall (rates), then by a permit count, so the endpoint cannot be used
//! to exhaust the CPU.

use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter};
use providers_security::{HashSettings, SecretHasher, SecurityError, random_token};
use serde::{Deserialize, Serialize};
use sqlx::{AnyPool, Row};

use crate::audit::{now_ms, sha256_hex};
use crate::rate::{Limited, Rate, limited};

/// `[auth]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// Whether `/auth/token` and `/auth/refresh` answer.
    pub enabled: bool,
    /// Lifetime of an access token.
    #[serde(with = "crate::config::duration")]
    pub access_ttl: Duration,
    /// Lifetime of a refresh token (each rotation starts a new one).
    #[serde(with = "crate::config::duration")]
    pub refresh_ttl: Duration,
    /// Argon2id costs of client secrets.
    pub argon2: HashSettings,
    /// Grants per client id.
    pub client_rate: Rate,
    /// Grants and refreshes of all clients together.
    pub overall_rate: Rate,
    /// Secrets hashed at once at most; further grants wait for a permit.
    pub max_hashing: usize,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            access_ttl: Duration::from_secs(300),
            refresh_ttl: Duration::from_secs(8 * 3600),
            argon2: HashSettings::default(),
            client_rate: Rate {
                per_second: None,
                per_minute: Some(30),
                burst: Some(10),
            },
            overall_rate: Rate {
                per_second: Some(20),
                per_minute: None,
                burst: Some(40),
            },
            max_hashing: 2,
        }
    }
}

/// A client as listed: everything but its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClientInfo {
    /// Its id (public).
    pub client_id: String,
    /// The tenant its tokens are for.
    pub tenant: String,
    /// The `sub` of its tokens.
    pub subject: String,
    /// The `roles` of its tokens.
    pub roles: Vec<String>,
    /// The `company_id` of its tokens, if any.
    pub company_id: Option<String>,
    /// Who created it (`subject@tenant`, or `cli`).
    pub created_by: String,
    /// When, milliseconds since the epoch.
    pub created_ms: i64,
    /// When it was revoked, if it was.
    pub revoked_ms: Option<i64>,
}

/// A client to create.
#[derive(Debug, Clone)]
pub struct NewClient {
    /// Its tenant.
    pub tenant: String,
    /// Its tokens' subject; the client id when absent.
    pub subject: Option<String>,
    /// Its tokens' roles.
    pub roles: Vec<String>,
    /// Its tokens' company.
    pub company_id: Option<String>,
    /// Who creates it.
    pub created_by: String,
}

/// A client just created, with the only copy of its secret.
#[derive(Debug, Clone, Serialize)]
pub struct Created {
    /// The client.
    #[serde(flatten)]
    pub client: ClientInfo,
    /// The secret, shown once.
    pub client_secret: String,
}

/// Why a grant or refresh was refused, in OAuth2's terms (RFC 6749 §5.2).
#[derive(Debug)]
pub enum Refusal {
    /// Unknown client, wrong secret or revoked client: `invalid_client`, 401. The text is
    /// the same for all three; `why` says which, for the audit trail only.
    InvalidClient {
        /// Which of the three, for the record.
        why: &'static str,
        /// The client, when the id is known: the refusal goes to its tenant's trail.
        client: Option<Box<ClientInfo>>,
    },
    /// The refresh token is unknown, spent, revoked or expired: `invalid_grant`, 400.
    InvalidGrant(String),
    /// The store failed.
    Store(sqlx::Error),
}

impl From<sqlx::Error> for Refusal {
    fn from(e: sqlx::Error) -> Self {
        Refusal::Store(e)
    }
}

const CLIENT_COLUMNS: &str =
    "client_id, tenant, subject, roles, company_id, created_by, created_ms, revoked_ms";

fn client_of(r: &sqlx::any::AnyRow) -> Result<ClientInfo, sqlx::Error> {
    let roles: String = r.try_get("roles")?;
    Ok(ClientInfo {
        client_id: r.try_get("client_id")?,
        tenant: r.try_get("tenant")?,
        subject: r.try_get("subject")?,
        roles: serde_json::from_str(&roles).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        company_id: r.try_get("company_id")?,
        created_by: r.try_get("created_by")?,
        created_ms: r.try_get("created_ms")?,
        revoked_ms: r.try_get("revoked_ms")?,
    })
}

/// What is wrong with a client to create: an unconfigured tenant, an undefined role, a bad name.
pub fn check_new(config: &crate::config::Config, new: &NewClient) -> Result<(), String> {
    let platform = config.admin.platform_tenant.as_deref() == Some(new.tenant.as_str());
    if !platform && !config.tenants.contains_key(&new.tenant) {
        return Err(format!(
            "tenant: '{}' is not configured on this host",
            new.tenant
        ));
    }
    if new.roles.is_empty() {
        return Err("roles: give at least one role".into());
    }
    for role in &new.roles {
        let defined = config.permissions.roles().any(|r| r == role)
            || config.admin.role.as_deref() == Some(role.as_str());
        if !defined {
            return Err(format!(
                "roles: '{role}' is not defined in [security.roles] (defined: {})",
                config.permissions.roles().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    let plain = |s: &str| !s.is_empty() && s.len() <= 256 && !s.chars().any(char::is_control);
    if let Some(subject) = &new.subject
        && !plain(subject)
    {
        return Err("subject: 1 to 256 characters, no control characters".into());
    }
    if let Some(company) = &new.company_id
        && !plain(company)
    {
        return Err("company_id: 1 to 256 characters, no control characters".into());
    }
    Ok(())
}

/// Every client, or one tenant's, by id.
pub async fn list_clients(
    pool: &AnyPool,
    tenant: Option<&str>,
) -> Result<Vec<ClientInfo>, sqlx::Error> {
    let rows = match tenant {
        Some(t) => {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {CLIENT_COLUMNS} FROM auth_clients WHERE tenant = $1 ORDER BY client_id"
            )))
            .bind(t)
            .fetch_all(pool)
            .await?
        }
        None => {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {CLIENT_COLUMNS} FROM auth_clients ORDER BY tenant, client_id"
            )))
            .fetch_all(pool)
            .await?
        }
    };
    rows.iter().map(client_of).collect()
}

/// One client, if it exists.
pub async fn client(pool: &AnyPool, client_id: &str) -> Result<Option<ClientInfo>, sqlx::Error> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {CLIENT_COLUMNS} FROM auth_clients WHERE client_id = $1"
    )))
    .bind(client_id)
    .fetch_optional(pool)
    .await?
    .as_ref()
    .map(client_of)
    .transpose()
}

/// Creates a client with a fresh id and secret; the secret is hashed off the runtime.
pub async fn add_client(
    pool: &AnyPool,
    hasher: &SecretHasher,
    new: NewClient,
) -> anyhow::Result<Created> {
    let client_id = format!("{}-{}", new.tenant, random_token(12));
    let secret = random_token(32);
    let hash = {
        let (hasher, secret) = (hasher.clone(), secret.clone());
        tokio::task::spawn_blocking(move || hasher.hash(&secret)).await??
    };
    let client = ClientInfo {
        subject: new.subject.unwrap_or_else(|| client_id.clone()),
        client_id,
        tenant: new.tenant,
        roles: new.roles,
        company_id: new.company_id,
        created_by: new.created_by,
        created_ms: now_ms(),
        revoked_ms: None,
    };
    sqlx::query(
        "INSERT INTO auth_clients (client_id, tenant, subject, roles, company_id, secret_hash, created_by, created_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&client.client_id)
    .bind(&client.tenant)
    .bind(&client.subject)
    .bind(serde_json::to_string(&client.roles)?)
    .bind(&client.company_id)
    .bind(hash)
    .bind(&client.created_by)
    .bind(client.created_ms)
    .execute(pool)
    .await?;
    Ok(Created {
        client,
        client_secret: secret,
    })
}

/// Revokes a client (of `tenant`, when given) and every refresh token it holds. `None` when
/// there is no such client there; a client already revoked keeps its first revocation time.
pub async fn revoke_client(
    pool: &AnyPool,
    client_id: &str,
    tenant: Option<&str>,
) -> Result<Option<ClientInfo>, sqlx::Error> {
    let Some(found) = client(pool, client_id).await? else {
        return Ok(None);
    };
    if tenant.is_some_and(|t| t != found.tenant) {
        return Ok(None);
    }
    let now = now_ms();
    let mut tx = pool.begin().await?;
    sqlx::query(
        "UPDATE auth_clients SET revoked_ms = $1 WHERE client_id = $2 AND revoked_ms IS NULL",
    )
    .bind(now)
    .bind(client_id)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE auth_refresh_tokens SET revoked_ms = $1 WHERE client_id = $2 AND revoked_ms IS NULL",
    )
    .bind(now)
    .bind(client_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    client(pool, client_id).await
}

/// The service's limits and hasher; the clients and tokens are in the system database.
pub struct TokenService {
    /// As configured.
    pub settings: AuthSettings,
    hasher: SecretHasher,
    per_client: DefaultKeyedRateLimiter<String>,
    overall: DefaultDirectRateLimiter,
    hashing: tokio::sync::Semaphore,
}

impl std::fmt::Debug for TokenService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenService")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl TokenService {
    /// The service for `settings`; refuses Argon2 costs it cannot use.
    pub fn new(settings: AuthSettings) -> Result<Self, SecurityError> {
        Ok(Self {
            hasher: SecretHasher::new(settings.argon2)?,
            per_client: DefaultKeyedRateLimiter::dashmap(settings.client_rate.quota()),
            overall: DefaultDirectRateLimiter::direct(settings.overall_rate.quota()),
            hashing: tokio::sync::Semaphore::new(settings.max_hashing.max(1)),
            settings,
        })
    }

    /// The hasher, for creating clients.
    pub fn hasher(&self) -> &SecretHasher {
        &self.hasher
    }

    /// A permit to hash: creating clients over HTTP waits for one like grants do, so it
    /// cannot run more Argon2 at once than `max_hashing` either.
    pub async fn hashing_permit(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.hashing.acquire().await.ok()
    }

    /// Admits one grant for `client_id` (checked first, so one client over its limit does
    /// not spend everyone's budget) or one refresh (`None`), or says how long to wait.
    pub fn admit(&self, client_id: Option<&str>) -> Result<(), Limited> {
        let now = DefaultClock::default().now();
        if let Some(id) = client_id
            && let Err(not_until) = self.per_client.check_key(&id.to_owned())
        {
            return Err(limited(
                format!(
                    "client '{id}' is over its token rate limit of {} (auth.client_rate)",
                    self.settings.client_rate.words()
                ),
                not_until.wait_time_from(now),
            ));
        }
        if let Err(not_until) = self.overall.check() {
            return Err(limited(
                format!(
                    "the token endpoint is over its rate limit of {} (auth.overall_rate)",
                    self.settings.overall_rate.words()
                ),
                not_until.wait_time_from(now),
            ));
        }
        Ok(())
    }

    /// Forgets client ids whose cells are back to full.
    pub fn forget_idle_clients(&self) {
        self.per_client.retain_recent();
        self.per_client.shrink_to_fit();
    }

    /// The client `client_id` if `secret` is its secret and it is not revoked. An unknown
    /// id costs one hash like a known one.
    pub async fn authenticate(
        &self,
        pool: &AnyPool,
        client_id: &str,
        secret: &str,
    ) -> Result<ClientInfo, Refusal> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CLIENT_COLUMNS}, secret_hash FROM auth_clients WHERE client_id = $1"
        )))
        .bind(client_id)
        .fetch_optional(pool)
        .await?;
        let found = match &row {
            Some(r) => Some((client_of(r)?, r.try_get::<String, _>("secret_hash")?)),
            None => None,
        };
        let permit = self
            .hashing
            .acquire()
            .await
            .map_err(|_| Refusal::InvalidClient {
                why: "closing",
                client: None,
            })?;
        let matches = {
            let hasher = self.hasher.clone();
            let stored = found.as_ref().map(|(_, h)| h.clone());
            let secret = secret.to_owned();
            tokio::task::spawn_blocking(move || hasher.verify(stored.as_deref(), &secret))
                .await
                .unwrap_or(false)
        };
        drop(permit);
        match found {
            None => Err(Refusal::InvalidClient {
                why: "unknown client id",
                client: None,
            }),
            Some((c, _)) if !matches => Err(Refusal::InvalidClient {
                why: "wrong client secret",
                client: Some(Box::new(c)),
            }),
            Some((c, _)) if c.revoked_ms.is_some() => Err(Refusal::InvalidClient {
                why: "client is revoked",
                client: Some(Box::new(c)),
            }),
            Some((c, _)) => Ok(c),
        }
    }

    /// A new refresh token for `client_id`, in `family` (a new family when `None`).
    pub async fn issue_refresh(
        &self,
        pool: &AnyPool,
        client_id: &str,
        family: Option<&str>,
    ) -> Result<String, sqlx::Error> {
        let token = random_token(32);
        let now = now_ms();
        let ttl = i64::try_from(self.settings.refresh_ttl.as_millis()).unwrap_or(i64::MAX);
        let family = family.map_or_else(|| random_token(16), str::to_owned);
        sqlx::query(
            "INSERT INTO auth_refresh_tokens (token_sha256, family, client_id, issued_ms, expires_ms) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(sha256_hex(token.as_bytes()))
        .bind(family)
        .bind(client_id)
        .bind(now)
        .bind(now.saturating_add(ttl))
        .execute(pool)
        .await?;
        Ok(token)
    }

    /// Spends `token` and returns its client with the next token of its family. A token
    /// spent before revokes its whole family; so does one whose client was revoked.
    pub async fn rotate(
        &self,
        pool: &AnyPool,
        token: &str,
    ) -> Result<(ClientInfo, String), Refusal> {
        let digest = sha256_hex(token.as_bytes());
        let now = now_ms();
        // Spending and issuing the successor are one transaction: a replay racing with it
        // either finds the token unspent (and loses the spend) or finds the successor
        // committed with it, so the family's revocation always reaches the newest token.
        let mut tx = pool.begin().await?;
        let spent = sqlx::query(
            "UPDATE auth_refresh_tokens SET used_ms = $1 \
             WHERE token_sha256 = $2 AND used_ms IS NULL AND revoked_ms IS NULL AND expires_ms > $1",
        )
        .bind(now)
        .bind(&digest)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        let Some(row) = sqlx::query(
            "SELECT family, client_id, expires_ms, used_ms, revoked_ms FROM auth_refresh_tokens WHERE token_sha256 = $1",
        )
        .bind(&digest)
        .fetch_optional(&mut *tx)
        .await?
        else {
            tx.rollback().await?;
            return Err(Refusal::InvalidGrant("refresh token is not known".into()));
        };
        let family: String = row.try_get("family")?;
        let client_id: String = row.try_get("client_id")?;
        if spent {
            let owner = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {CLIENT_COLUMNS} FROM auth_clients WHERE client_id = $1"
            )))
            .bind(&client_id)
            .fetch_optional(&mut *tx)
            .await?
            .as_ref()
            .map(client_of)
            .transpose()?;
            if let Some(c) = owner.filter(|c| c.revoked_ms.is_none()) {
                let next = random_token(32);
                let ttl = i64::try_from(self.settings.refresh_ttl.as_millis()).unwrap_or(i64::MAX);
                sqlx::query(
                    "INSERT INTO auth_refresh_tokens (token_sha256, family, client_id, issued_ms, expires_ms) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(sha256_hex(next.as_bytes()))
                .bind(&family)
                .bind(&client_id)
                .bind(now)
                .bind(now.saturating_add(ttl))
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                return Ok((c, next));
            }
            tx.commit().await?;
            self.revoke_family(pool, &family, now).await?;
            return Err(Refusal::InvalidGrant(
                "the client of this refresh token is revoked".into(),
            ));
        }
        tx.commit().await?;
        let revoked: Option<i64> = row.try_get("revoked_ms")?;
        let expires: i64 = row.try_get("expires_ms")?;
        if revoked.is_some() {
            return Err(Refusal::InvalidGrant("refresh token is revoked".into()));
        }
        if expires <= now {
            return Err(Refusal::InvalidGrant("refresh token has expired".into()));
        }
        self.revoke_family(pool, &family, now).await?;
        Err(Refusal::InvalidGrant(
            "refresh token was already used: every refresh token of its family is now revoked; ask for a new grant with the client's credentials".into(),
        ))
    }

    async fn revoke_family(
        &self,
        pool: &AnyPool,
        family: &str,
        now: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE auth_refresh_tokens SET revoked_ms = $1 WHERE family = $2 AND revoked_ms IS NULL",
        )
        .bind(now)
        .bind(family)
        .execute(pool)
        .await?;
        Ok(())
    }
}

/// The client a refresh token was issued to, if the token is known.
pub async fn client_of_refresh(
    pool: &AnyPool,
    token: &str,
) -> Result<Option<ClientInfo>, sqlx::Error> {
    let row = sqlx::query("SELECT client_id FROM auth_refresh_tokens WHERE token_sha256 = $1")
        .bind(sha256_hex(token.as_bytes()))
        .fetch_optional(pool)
        .await?;
    match row {
        Some(r) => client(pool, &r.try_get::<String, _>("client_id")?).await,
        None => Ok(None),
    }
}
