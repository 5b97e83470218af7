//! Who may administer what. A token holding `[security] admin_role` administers its own
//! tenant; the same role in `[security] platform_tenant` makes a platform operator, who
//! administers every tenant and the host's configuration.

use providers_core::ProviderError;
use providers_security::Identity;

use super::Generation;

/// What an administrator may act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminScope {
    /// Every tenant, and the configuration.
    Platform,
    /// This tenant only.
    Tenant(String),
}

/// A verified administrator.
#[derive(Debug, Clone)]
pub struct Admin {
    /// Who.
    pub identity: Identity,
    /// Over what.
    pub scope: AdminScope,
}

impl Admin {
    /// Whether this administrator may act on `tenant`.
    pub fn may(&self, tenant: &str) -> bool {
        match &self.scope {
            AdminScope::Platform => true,
            AdminScope::Tenant(own) => own == tenant,
        }
    }

    /// `FORBIDDEN` unless this administrator may act on `tenant`.
    pub fn check(&self, tenant: &str) -> Result<(), ProviderError> {
        if self.may(tenant) {
            Ok(())
        } else {
            Err(ProviderError::forbidden(format!(
                "an administrator of tenant '{}' cannot act on tenant '{tenant}'",
                self.identity.tenant
            )))
        }
    }

    /// `FORBIDDEN` unless this is a platform operator; `what` names the action.
    pub fn platform(&self, what: &str) -> Result<(), ProviderError> {
        match self.scope {
            AdminScope::Platform => Ok(()),
            AdminScope::Tenant(_) => Err(ProviderError::forbidden(format!(
                "{what} needs a platform operator (role '{}' in the platform tenant); tenant administrators act on their own tenant only",
                self.identity.roles.first().map_or("", String::as_str)
            ))),
        }
    }

    /// The subject, for the record of who changed what.
    pub fn by(&self) -> String {
        format!("{}@{}", self.identity.subject, self.identity.tenant)
    }
}

impl Generation {
    /// The administrator behind `authorization`: `UNAUTHENTICATED` without a valid token,
    /// `FORBIDDEN` when the admin API is off, the role is missing, or the token's tenant is
    /// neither the platform tenant nor configured here.
    pub fn admin(&self, authorization: Option<&str>) -> Result<Admin, ProviderError> {
        let identity = self.authenticate(authorization)?;
        let settings = &self.config.admin;
        let Some(role) = &settings.role else {
            return Err(ProviderError::forbidden(
                "the admin API is off on this host: set [security] admin_role to enable it",
            ));
        };
        if !identity.roles.iter().any(|r| r == role) {
            return Err(ProviderError::forbidden(format!(
                "/admin needs role '{role}', which roles {:?} do not include",
                identity.roles
            )));
        }
        let scope = if settings.platform_tenant.as_deref() == Some(&*identity.tenant) {
            AdminScope::Platform
        } else {
            self.tenant(&identity.tenant)?;
            AdminScope::Tenant(identity.tenant.to_string())
        };
        Ok(Admin {
            identity: Identity {
                roles: std::sync::Arc::from([role.clone()]),
                ..identity
            },
            scope,
        })
    }
}
