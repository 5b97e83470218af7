//! The call context: who is calling, under which request and deadline, and how to call others.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use serde_json::Value;

use crate::{ErrorCode, ProviderError};

/// How deep provider-to-provider calls may nest before the host refuses (a cycle guard).
pub const MAX_CALL_DEPTH: u32 = 8;

/// Calls another provider by name on behalf of the current caller.
///
/// The host implements this; the call is made for the same tenant and under the same
/// subject, roles and deadline, so a provider can never reach further than its caller.
#[async_trait]
pub trait Caller: Send + Sync {
    /// Runs `service`/`action` with `payload` as a nested call of `ctx`.
    async fn call(
        &self,
        ctx: &CallContext,
        service: &str,
        action: &str,
        payload: Value,
    ) -> Result<Value, ProviderError>;
}

/// Everything a provider knows about the call it is serving.
#[derive(Clone)]
pub struct CallContext {
    tenant: Arc<str>,
    subject: Arc<str>,
    roles: Arc<[String]>,
    company_id: Option<Arc<str>>,
    request_id: Arc<str>,
    deadline: Option<Instant>,
    depth: u32,
    idempotency_key: Option<Arc<str>>,
    caller: Option<Arc<dyn Caller>>,
}

impl CallContext {
    /// A context for `tenant` and `request_id`, with no subject, roles, deadline or caller.
    pub fn new(tenant: impl Into<Arc<str>>, request_id: impl Into<Arc<str>>) -> Self {
        Self {
            tenant: tenant.into(),
            subject: Arc::from(""),
            roles: Arc::from(Vec::new()),
            company_id: None,
            request_id: request_id.into(),
            deadline: None,
            depth: 0,
            idempotency_key: None,
            caller: None,
        }
    }

    /// A context for a verified caller: `tenant`, `subject`, `roles` and `company_id` as its
    /// token gives them; no deadline or caller yet. [`new`](Self::new) with the `with_`
    /// setters gives the same context, making and dropping the empty values it starts with.
    pub fn of(
        tenant: Arc<str>,
        subject: Arc<str>,
        roles: Arc<[String]>,
        company_id: Option<Arc<str>>,
        request_id: impl Into<Arc<str>>,
    ) -> Self {
        Self {
            tenant,
            subject,
            roles,
            company_id,
            request_id: request_id.into(),
            deadline: None,
            depth: 0,
            idempotency_key: None,
            caller: None,
        }
    }

    /// Sets the subject (the token's `sub`).
    ///
    /// A context whose identity changes loses its caller: a provider cannot give itself
    /// another identity and then call out under it.
    pub fn with_subject(mut self, subject: impl Into<Arc<str>>) -> Self {
        self.subject = subject.into();
        self.caller = None;
        self
    }

    /// Sets the roles. Like [`with_subject`](Self::with_subject), this drops the caller.
    pub fn with_roles(mut self, roles: impl Into<Arc<[String]>>) -> Self {
        self.roles = roles.into();
        self.caller = None;
        self
    }

    /// Sets the company the caller acts for (the token's `company_id` claim), which business
    /// providers use to tell the parties of a document apart. Like
    /// [`with_subject`](Self::with_subject), this drops the caller.
    pub fn with_company_id(mut self, company_id: Option<impl Into<Arc<str>>>) -> Self {
        self.company_id = company_id.map(Into::into);
        self.caller = None;
        self
    }

    /// Sets the deadline. Once the context has a caller, a deadline can only move earlier:
    /// a provider cannot extend the time its own caller gave it.
    pub fn with_deadline(mut self, deadline: Option<Instant>) -> Self {
        self.deadline = match (self.caller.is_some(), self.deadline, deadline) {
            (true, Some(current), Some(new)) => Some(current.min(new)),
            (true, Some(current), None) => Some(current),
            (_, _, new) => new,
        };
        self
    }

    /// Sets the key that identifies this call across retries: the same key means the same
    /// intended effect, so a provider that has applied it once may answer with the first
    /// result instead of applying it again. The workflow executor sets one per step.
    pub fn with_idempotency_key(mut self, key: Option<impl Into<Arc<str>>>) -> Self {
        self.idempotency_key = key.map(Into::into);
        self
    }

    /// Sets the handle used by [`CallContext::call`]; set it last, after the identity.
    pub fn with_caller(mut self, caller: Arc<dyn Caller>) -> Self {
        self.caller = Some(caller);
        self
    }

    /// The tenant the call is for. Providers scope every piece of data by it.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The authenticated subject.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The caller's roles.
    pub fn roles(&self) -> &[String] {
        &self.roles
    }

    /// The company the caller acts for, if its token names one.
    pub fn company_id(&self) -> Option<&str> {
        self.company_id.as_deref()
    }

    /// The request id, for logs and correlation.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// When the call must be done by; the host cancels it after that.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The caller's key for this call's effect, if it gave one (see
    /// [`with_idempotency_key`](Self::with_idempotency_key)). Nested calls do not inherit it:
    /// a key names one call, and a provider that calls others derives keys of its own.
    pub fn idempotency_key(&self) -> Option<&str> {
        self.idempotency_key.as_deref()
    }

    /// How many provider-to-provider hops led here (0 for a client's call).
    pub fn depth(&self) -> u32 {
        self.depth
    }

    /// The context for a nested call: same tenant, subject, roles, request and deadline, one level deeper.
    pub fn nested(&self) -> Result<Self, ProviderError> {
        if self.depth >= MAX_CALL_DEPTH {
            return Err(ProviderError::new(
                ErrorCode::Forbidden,
                format!("provider calls nest deeper than {MAX_CALL_DEPTH} levels"),
            ));
        }
        let mut next = self.clone();
        next.depth += 1;
        next.idempotency_key = None;
        Ok(next)
    }

    /// Calls `service`/`action` as this caller.
    pub async fn call(
        &self,
        service: &str,
        action: &str,
        payload: Value,
    ) -> Result<Value, ProviderError> {
        let caller = self.caller.as_ref().ok_or_else(|| {
            ProviderError::unavailable(format!(
                "no caller in this context to reach '{service}/{action}'"
            ))
        })?;
        caller.call(self, service, action, payload).await
    }
}

impl fmt::Debug for CallContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallContext")
            .field("tenant", &self.tenant)
            .field("subject", &self.subject)
            .field("roles", &self.roles)
            .field("company_id", &self.company_id)
            .field("request_id", &self.request_id)
            .field("deadline", &self.deadline)
            .field("depth", &self.depth)
            .field("idempotency_key", &self.idempotency_key)
            .finish_non_exhaustive()
    }
}
