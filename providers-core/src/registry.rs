//! The registry: every loadable provider as a factory with a checked descriptor.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use semver::{Version, VersionReq};

use crate::descriptor::{is_valid_name, is_valid_permission};
use crate::{Descriptor, Provider, ProviderError};

/// How a provider reached the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Kind {
    /// Linked into the host and registered with [`submit_builtin!`](crate::submit_builtin).
    Builtin,
    /// A native dynamic library.
    Native,
    /// A WebAssembly component.
    Wasm,
}

/// Makes fresh, unconnected instances of one provider version. Loaders implement it.
pub trait Factory: Send + Sync {
    /// The provider's descriptor, read once when the factory was made.
    fn descriptor(&self) -> &Descriptor;
    /// How it was loaded.
    fn kind(&self) -> Kind;
    /// Where it came from, for error messages: a crate path or a file.
    fn origin(&self) -> &str;
    /// A new instance, not yet connected.
    fn create(&self) -> Result<Box<dyn Provider>, ProviderError>;
}

/// A provider compiled into the host, collected with `inventory`.
///
/// Register one with [`submit_builtin!`](crate::submit_builtin) in the crate that defines it.
pub struct Builtin {
    create: fn() -> Box<dyn Provider>,
    origin: &'static str,
}

impl Builtin {
    /// A builtin made by `create`; `origin` is the module path that registered it.
    pub const fn new(create: fn() -> Box<dyn Provider>, origin: &'static str) -> Self {
        Self { create, origin }
    }
}

inventory::collect!(Builtin);

/// Registers a builtin provider: `submit_builtin!(MyProvider::default());`.
///
/// The host collects every registration at start. A crate whose only registration is
/// this macro must still be referenced by the host (`use my_crate as _;`), or the linker
/// may drop it.
#[macro_export]
macro_rules! submit_builtin {
    ($make:expr) => {
        $crate::inventory::submit! {
            $crate::Builtin::new(|| ::std::boxed::Box::new($make), ::core::module_path!())
        }
    };
}

/// Why a provider was refused or could not be found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The service name is not `[a-z][a-z0-9_-]{0,63}`.
    #[error(
        "provider from {origin}: invalid service name '{service}' (expected 1-64 of a-z, 0-9, '_', '-', starting with a letter)"
    )]
    InvalidName {
        /// The offending name.
        service: String,
        /// Where the provider came from.
        origin: String,
    },
    /// An action name is invalid or repeated.
    #[error("provider '{service}' from {origin}: {reason}")]
    InvalidAction {
        /// The service.
        service: String,
        /// Where the provider came from.
        origin: String,
        /// What is wrong with which action.
        reason: String,
    },
    /// Built for a contract this host does not speak.
    #[error(
        "provider '{service}' {version} from {origin} was built for contract {built_for}, which is not compatible with this host's contract {host} (caret rule)"
    )]
    IncompatibleContract {
        /// The service.
        service: String,
        /// The provider's version.
        version: String,
        /// Where it came from.
        origin: String,
        /// The contract it was built for.
        built_for: String,
        /// The host's contract.
        host: String,
    },
    /// The same service and version registered twice.
    #[error("provider '{service}' {version} is registered twice: by {first} and by {second}")]
    Duplicate {
        /// The service.
        service: String,
        /// The version.
        version: String,
        /// The first registration.
        first: String,
        /// The second registration.
        second: String,
    },
    /// No provider offers the service.
    #[error("no provider offers service '{service}' (available: {available})")]
    UnknownService {
        /// The service asked for.
        service: String,
        /// The services there are, comma-separated.
        available: String,
    },
    /// The service exists but no loaded version satisfies the requirement.
    #[error("service '{service}': no loaded version matches '{requested}' (loaded: {loaded})")]
    NoMatchingVersion {
        /// The service.
        service: String,
        /// The requirement.
        requested: String,
        /// The versions loaded, comma-separated.
        loaded: String,
    },
}

/// Whether a provider built for contract `built_for` may run on a host speaking `host`.
///
/// Caret semantics: same major (same minor while major is 0), and the host at least as new.
pub fn contract_compatible(built_for: &Version, host: &Version) -> bool {
    let req = VersionReq {
        comparators: vec![semver::Comparator {
            op: semver::Op::Caret,
            major: built_for.major,
            minor: Some(built_for.minor),
            patch: Some(built_for.patch),
            pre: built_for.pre.clone(),
        }],
    };
    req.matches(host)
}

/// Collects factories, checking each before it is accepted.
pub struct RegistryBuilder {
    host_contract: Version,
    by_service: BTreeMap<String, Vec<Arc<dyn Factory>>>,
}

impl RegistryBuilder {
    /// An empty builder for a host speaking `host_contract`.
    pub fn new(host_contract: Version) -> Self {
        Self {
            host_contract,
            by_service: BTreeMap::new(),
        }
    }

    /// Adds every builtin registered with [`submit_builtin!`](crate::submit_builtin).
    ///
    /// Stops at the first refusal: a bad builtin is a defect of this build, not an operator error.
    #[allow(
        clippy::result_large_err,
        reason = "registry errors carry full context and occur at start-up, never on a hot path"
    )]
    pub fn with_builtins(mut self) -> Result<Self, RegistryError> {
        let mut builtins: Vec<_> = inventory::iter::<Builtin>
            .into_iter()
            .map(|b| FnFactory::new(format!("builtin {}", b.origin), b.create))
            .collect();
        // inventory's order depends on link order; sort so errors and listings are stable.
        builtins.sort_by(|a, b| {
            let key = |f: &FnFactory<_>| {
                (
                    f.descriptor.service.clone(),
                    f.descriptor.version.clone(),
                    f.origin.clone(),
                )
            };
            key(a).cmp(&key(b))
        });
        for factory in builtins {
            self.add(Arc::new(factory))?;
        }
        Ok(self)
    }

    /// Checks and adds one factory. On refusal the builder is unchanged.
    #[allow(
        clippy::result_large_err,
        reason = "registry errors carry full context and occur at start-up, never on a hot path"
    )]
    pub fn add(&mut self, factory: Arc<dyn Factory>) -> Result<(), RegistryError> {
        let d = factory.descriptor();
        let origin = factory.origin().to_owned();
        if !is_valid_name(&d.service) {
            return Err(RegistryError::InvalidName {
                service: d.service.clone(),
                origin,
            });
        }
        let mut seen = std::collections::BTreeSet::new();
        for action in &d.actions {
            let reason = if !is_valid_name(&action.name) {
                format!("invalid action name '{}'", action.name)
            } else if !seen.insert(action.name.as_str()) {
                format!("action '{}' is declared twice", action.name)
            } else if !is_valid_permission(&action.permission) {
                format!(
                    "action '{}' needs invalid permission '{}' (expected dot-separated segments of a-z, 0-9, '_', '-', such as '{}.{}')",
                    action.name, action.permission, d.service, action.name
                )
            } else {
                continue;
            };
            return Err(RegistryError::InvalidAction {
                service: d.service.clone(),
                origin,
                reason,
            });
        }
        if !contract_compatible(&d.contract_version, &self.host_contract) {
            return Err(RegistryError::IncompatibleContract {
                service: d.service.clone(),
                version: d.version.to_string(),
                origin,
                built_for: d.contract_version.to_string(),
                host: self.host_contract.to_string(),
            });
        }
        let versions = self.by_service.entry(d.service.clone()).or_default();
        if let Some(existing) = versions
            .iter()
            .find(|f| f.descriptor().version == d.version)
        {
            return Err(RegistryError::Duplicate {
                service: d.service.clone(),
                version: d.version.to_string(),
                first: existing.origin().to_owned(),
                second: origin,
            });
        }
        let at = versions.partition_point(|f| f.descriptor().version < d.version);
        versions.insert(at, factory);
        Ok(())
    }

    /// Whether a builtin already offers `service`: a plugin may not take a builtin's name
    /// (it would serve, and read the stores of, every tenant using the builtin).
    pub fn has_builtin(&self, service: &str) -> bool {
        self.by_service
            .get(service)
            .is_some_and(|versions| versions.iter().any(|f| f.kind() == Kind::Builtin))
    }

    /// The registry.
    pub fn build(self) -> Registry {
        Registry {
            host_contract: self.host_contract,
            by_service: self.by_service,
        }
    }
}

/// Every accepted factory, by service, versions ascending. Immutable once built.
#[derive(Clone)]
pub struct Registry {
    host_contract: Version,
    by_service: BTreeMap<String, Vec<Arc<dyn Factory>>>,
}

impl Registry {
    /// A builder for this crate's [`CONTRACT_VERSION`](crate::CONTRACT_VERSION).
    pub fn builder() -> RegistryBuilder {
        RegistryBuilder::new(crate::contract_version())
    }

    /// A builder holding every factory of this registry, to add more (a host adds the
    /// plugins it discovers to its builtins).
    pub fn to_builder(&self) -> RegistryBuilder {
        RegistryBuilder {
            host_contract: self.host_contract.clone(),
            by_service: self.by_service.clone(),
        }
    }

    /// The contract version the registry checked against.
    pub fn host_contract(&self) -> &Version {
        &self.host_contract
    }

    /// The highest loaded version of `service` that satisfies `requirement`.
    #[allow(
        clippy::result_large_err,
        reason = "registry errors carry full context and occur at start-up, never on a hot path"
    )]
    pub fn resolve(
        &self,
        service: &str,
        requirement: &VersionReq,
    ) -> Result<Arc<dyn Factory>, RegistryError> {
        let Some(versions) = self.by_service.get(service) else {
            return Err(RegistryError::UnknownService {
                service: service.to_owned(),
                available: self.services().collect::<Vec<_>>().join(", "),
            });
        };
        versions
            .iter()
            .rev()
            .find(|f| requirement.matches(&f.descriptor().version))
            .cloned()
            .ok_or_else(|| RegistryError::NoMatchingVersion {
                service: service.to_owned(),
                requested: requirement.to_string(),
                loaded: versions
                    .iter()
                    .map(|f| f.descriptor().version.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Service names, sorted.
    pub fn services(&self) -> impl Iterator<Item = &str> {
        self.by_service.keys().map(String::as_str)
    }

    /// Every factory, by service then version.
    pub fn factories(&self) -> impl Iterator<Item = &Arc<dyn Factory>> {
        self.by_service.values().flatten()
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        for factory in self.factories() {
            let d = factory.descriptor();
            list.entry(&format_args!(
                "{}@{} ({})",
                d.service,
                d.version,
                factory.origin()
            ));
        }
        list.finish()
    }
}

/// A factory around a function or closure: how builtins are registered, and how tests or
/// embedding hosts register providers by hand.
pub struct FnFactory<F> {
    descriptor: Descriptor,
    origin: String,
    make: F,
}

impl<F> FnFactory<F>
where
    F: Fn() -> Box<dyn Provider> + Send + Sync,
{
    /// A factory whose descriptor is read from one instance made by `make`.
    pub fn new(origin: impl Into<String>, make: F) -> Self {
        Self {
            descriptor: make().descriptor(),
            origin: origin.into(),
            make,
        }
    }
}

impl<F> Factory for FnFactory<F>
where
    F: Fn() -> Box<dyn Provider> + Send + Sync,
{
    fn descriptor(&self) -> &Descriptor {
        &self.descriptor
    }
    fn kind(&self) -> Kind {
        Kind::Builtin
    }
    fn origin(&self) -> &str {
        &self.origin
    }
    fn create(&self) -> Result<Box<dyn Provider>, ProviderError> {
        Ok((self.make)())
    }
}
