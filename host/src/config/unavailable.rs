//! A configured service whose provider could not be loaded: it answers every call with 503
//! and its reason, while the rest of the host serves.

use providers_core::semver::Version;
use providers_core::{Descriptor, Factory, Kind, Provider, ProviderError};

/// Stands in the registry's place for a service whose plugin was refused or is missing.
pub struct Unavailable {
    descriptor: Descriptor,
    reason: String,
}

impl Unavailable {
    /// A stand-in for `service`, refused for `reason`.
    pub fn new(service: &str, version: Version, reason: String) -> Self {
        Self {
            descriptor: Descriptor::new(service, version).config_schema(serde_json::json!({})),
            reason,
        }
    }

    /// Why the service is unavailable.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl Factory for Unavailable {
    fn descriptor(&self) -> &Descriptor {
        &self.descriptor
    }
    fn kind(&self) -> Kind {
        Kind::Native
    }
    fn origin(&self) -> &str {
        "unavailable"
    }
    fn create(&self) -> Result<Box<dyn Provider>, ProviderError> {
        Err(ProviderError::unavailable(self.reason.clone()))
    }
}
