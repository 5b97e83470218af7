//! Rate limits per tenant and per client (a token's subject within its tenant): GCRA cells
//! from `governor`, checked after authentication and before anything else is done.
//!
//! The client's cell is checked first, so a client over its own limit is refused without
//! spending its tenant's budget: one flooding client cannot starve the rest of its tenant.
//! A tenant's cells live in its plan and survive a reload that leaves its limits unchanged.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};
use providers_core::{ErrorCode, ProviderError};
use serde::Deserialize;

/// One limit: a sustained rate (per second or per minute) and the burst allowed above it.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// Requests per second, sustained.
    #[serde(default)]
    pub per_second: Option<u32>,
    /// Requests per minute, sustained (instead of `per_second`).
    #[serde(default)]
    pub per_minute: Option<u32>,
    /// Requests allowed at once (default: the rate's own number).
    #[serde(default)]
    pub burst: Option<u32>,
}

/// `rate_limits = { tenant = {...}, client = {...} }`, in `[security]` or per tenant.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateLimits {
    /// All of a tenant's requests together.
    #[serde(default)]
    pub tenant: Option<Rate>,
    /// Each client (subject) of a tenant.
    #[serde(default)]
    pub client: Option<Rate>,
}

/// Largest `per_second` and `burst` accepted.
pub const MAX_RATE: u32 = 10_000_000;

impl Rate {
    /// What is wrong with this rate, if anything.
    pub fn problem(&self) -> Option<String> {
        let (name, n) = match (self.per_second, self.per_minute) {
            (Some(n), None) => ("per_second", n),
            (None, Some(n)) => ("per_minute", n),
            _ => return Some("give exactly one of per_second and per_minute".into()),
        };
        if !(1..=MAX_RATE).contains(&n) {
            return Some(format!("{name} = {n} is out of range (1 to {MAX_RATE})"));
        }
        match self.burst {
            Some(b) if !(1..=MAX_RATE).contains(&b) => {
                Some(format!("burst = {b} is out of range (1 to {MAX_RATE})"))
            }
            _ => None,
        }
    }

    pub(crate) fn quota(&self) -> Quota {
        let nonzero = |n: u32| NonZeroU32::new(n.clamp(1, MAX_RATE)).unwrap_or(NonZeroU32::MIN);
        let (quota, n) = match (self.per_second, self.per_minute) {
            (None, Some(n)) => (Quota::per_minute(nonzero(n)), n),
            (s, _) => {
                let n = s.unwrap_or(1);
                (Quota::per_second(nonzero(n)), n)
            }
        };
        quota.allow_burst(nonzero(self.burst.unwrap_or(n)))
    }

    /// The rate in words, for errors: "10 requests per second".
    pub(crate) fn words(&self) -> String {
        match (self.per_second, self.per_minute) {
            (None, Some(n)) => format!("{n} {} per minute", plural(n)),
            (s, _) => {
                let n = s.unwrap_or(1);
                format!("{n} {} per second", plural(n))
            }
        }
    }
}

impl RateLimits {
    /// `self`, each limit the tenant does not set taken from `global`.
    pub fn over(self, global: RateLimits) -> RateLimits {
        RateLimits {
            tenant: self.tenant.or(global.tenant),
            client: self.client.or(global.client),
        }
    }
}

/// A tenant's cells.
pub struct TenantRate {
    /// The limits they were made for.
    pub limits: RateLimits,
    tenant: Option<DefaultDirectRateLimiter>,
    clients: Option<DefaultKeyedRateLimiter<String>>,
}

impl std::fmt::Debug for TenantRate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantRate")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// A refusal: the error and how long to wait.
pub struct Limited {
    /// `RATE_LIMITED`, naming the limit.
    pub error: ProviderError,
    /// When a retry can pass, rounded up to whole seconds for `Retry-After`.
    pub retry_after_secs: u64,
}

impl TenantRate {
    /// Fresh cells for `limits`.
    pub fn new(limits: RateLimits) -> Self {
        Self {
            limits,
            tenant: limits
                .tenant
                .map(|r| DefaultDirectRateLimiter::direct(r.quota())),
            clients: limits
                .client
                .map(|r| DefaultKeyedRateLimiter::dashmap(r.quota())),
        }
    }

    /// Whether there is anything to check.
    pub fn is_limited(&self) -> bool {
        self.tenant.is_some() || self.clients.is_some()
    }

    /// Admits one request of `subject` in `tenant`, or says how long to wait.
    pub fn admit(&self, tenant: &str, subject: &str) -> Result<(), Limited> {
        let now = DefaultClock::default().now();
        if let Some(clients) = &self.clients
            && let Err(not_until) = clients.check_key(&subject.to_owned())
        {
            let rate = self.limits.client.map(|r| r.words()).unwrap_or_default();
            return Err(limited(
                format!(
                    "client '{subject}' of tenant '{tenant}' is over its rate limit of {rate} (rate_limits.client)"
                ),
                not_until.wait_time_from(now),
            ));
        }
        if let Some(cell) = &self.tenant
            && let Err(not_until) = cell.check()
        {
            let rate = self.limits.tenant.map(|r| r.words()).unwrap_or_default();
            return Err(limited(
                format!("tenant '{tenant}' is over its rate limit of {rate} (rate_limits.tenant)"),
                not_until.wait_time_from(now),
            ));
        }
        Ok(())
    }

    /// Forgets clients whose cells are back to full, so the map holds recent clients only.
    pub fn forget_idle_clients(&self) {
        if let Some(clients) = &self.clients {
            clients.retain_recent();
            clients.shrink_to_fit();
        }
    }

    /// Clients with a cell.
    pub fn clients(&self) -> usize {
        self.clients.as_ref().map_or(0, |c| c.len())
    }
}

pub(crate) fn limited(detail: String, wait: Duration) -> Limited {
    Limited {
        error: ProviderError::new(ErrorCode::RateLimited, detail),
        retry_after_secs: (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1),
    }
}

fn plural(n: u32) -> &'static str {
    if n == 1 { "request" } else { "requests" }
}
