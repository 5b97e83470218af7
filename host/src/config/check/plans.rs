//! Service plans: a provider's compiled schemas, the versions tenants pin, and why a
//! configured plugin is missing.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use providers_core::semver::VersionReq;
use providers_core::{Factory, Registry};
use serde_json::Value;
use toml::Spanned;

use super::{Checker, Provided, ServicePlan};
use crate::plugins;

impl Checker<'_> {
    /// The plan of `service` served by `factory`: its input schemas compiled once.
    pub(super) fn plan(
        &mut self,
        span: Range<usize>,
        service: &str,
        factory: Arc<dyn Factory>,
        required: bool,
        (store, allowed_hosts): (Value, Arc<[String]>),
    ) -> Option<Arc<ServicePlan>> {
        let d = factory.descriptor();
        let mut validators = HashMap::new();
        let mut masks = HashMap::new();
        for action in &d.actions {
            match crate::masking::masks_of(&action.output_schema) {
                Ok(found) if found.is_empty() => {}
                Ok(found) => {
                    masks.insert(action.name.clone(), found);
                }
                Err(e) => {
                    self.at(
                        span,
                        format!(
                            "provider '{}' {} ({}) marks a field of action '{}' wrongly: {e}",
                            d.service,
                            d.version,
                            factory.origin(),
                            action.name
                        ),
                    );
                    return None;
                }
            }
            match jsonschema::validator_for(&action.input_schema) {
                Ok(v) => {
                    validators.insert(action.name.clone(), v);
                }
                Err(e) => {
                    self.at(span, format!("provider '{}' {} ({}) declares an invalid input schema for action '{}': {e}", d.service, d.version, factory.origin(), action.name));
                    return None;
                }
            }
        }
        Some(Arc::new(ServicePlan {
            service: service.to_owned(),
            factory,
            required,
            validators,
            masks,
            unavailable: None,
            store,
            allowed_hosts,
            calls: Default::default(),
        }))
    }

    /// Why no loaded provider `plugin` matches: its refusals if it was refused, the
    /// folders searched if it is nowhere, or the registry's own answer.
    pub(super) fn why_missing(&self, plugin: &str, error: providers_core::RegistryError) -> String {
        let refusals: Vec<String> = self
            .loaded
            .refusals_of(plugin)
            .map(ToString::to_string)
            .collect();
        if !refusals.is_empty() {
            return format!("{error}; refused: {}", refusals.join("; "));
        }
        if matches!(error, providers_core::RegistryError::UnknownService { .. }) {
            let dirs: Vec<String> = self
                .plugin_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect();
            return if dirs.is_empty() {
                format!(
                    "{error}; no [plugins] dirs are configured to look for a plugin named '{plugin}'"
                )
            } else {
                format!(
                    "{error}; no {plugin}{} was found in {} (stage plugins with `cargo xtask plugins`)",
                    plugins::manifest::SUFFIX,
                    dirs.join(", ")
                )
            };
        }
        error.to_string()
    }

    /// The plan of the version `tenant` pins `service` to, with that version's config schema.
    pub(super) fn pinned_plan(
        &mut self,
        tenant: &str,
        service: &str,
        p: &Provided,
        req: &Spanned<String>,
        registry: &Registry,
    ) -> Option<(Arc<ServicePlan>, Option<jsonschema::Validator>)> {
        let requirement = match VersionReq::parse(req.get_ref()) {
            Ok(r) => r,
            Err(e) => {
                self.at(
                    req.span(),
                    format!(
                        "tenant '{tenant}', versions.{service}: invalid version requirement '{}': {e}",
                        req.get_ref()
                    ),
                );
                return None;
            }
        };
        let factory = match registry.resolve(&p.plugin, &requirement) {
            Ok(f) => f,
            Err(e) => {
                let reason = self.why_missing(&p.plugin, e);
                self.at(
                    req.span(),
                    format!("tenant '{tenant}', versions.{service}: {reason}"),
                );
                return None;
            }
        };
        let d = factory.descriptor();
        let key = (service.to_owned(), d.version.to_string());
        let schema = jsonschema::validator_for(&d.config_schema).ok();
        if let Some(plan) = self.pinned.get(&key) {
            return Some((plan.clone(), schema));
        }
        let plan = self.plan(
            req.span(),
            service,
            factory.clone(),
            p.plan.required,
            (p.plan.store.clone(), p.plan.allowed_hosts.clone()),
        )?;
        self.pinned.insert(key, plan.clone());
        Some((plan, schema))
    }

    /// `allowed_hosts`: `name` or `name:port` each, for plugins only.
    pub(super) fn allowed_hosts(
        &mut self,
        service: &str,
        written: &[Spanned<String>],
        kind: providers_core::Kind,
    ) -> Arc<[String]> {
        let mut hosts = Vec::new();
        for entry in written {
            let host = entry.get_ref().trim().to_ascii_lowercase();
            if kind == providers_core::Kind::Builtin {
                self.at(
                    entry.span(),
                    format!("service '{service}': `allowed_hosts` governs a plugin's outbound HTTP; builtin providers have none"),
                );
                return Arc::from(hosts);
            }
            if plugins::capabilities::AllowedHost::parse(&host).is_none() {
                self.at(
                    entry.span(),
                    format!("service '{service}': allowed_hosts entry '{}' is not a host or host:port (no scheme, path or wildcard)", entry.get_ref()),
                );
                continue;
            }
            hosts.push(host);
        }
        Arc::from(hosts)
    }

    /// `limits.memory` and `limits.fuel` are enforced by the wasm sandbox only.
    pub(super) fn check_sandbox(
        &mut self,
        span: Range<usize>,
        service: &str,
        limits: &crate::config::Limits,
        kind: providers_core::Kind,
    ) {
        if (limits.memory.is_some() || limits.fuel.is_some()) && kind != providers_core::Kind::Wasm
        {
            self.at(
                span.clone(),
                format!("service '{service}': limits.memory and limits.fuel apply to wasm components only ({} code is not sandboxed)", format!("{kind:?}").to_lowercase()),
            );
        }
        if let Some(memory) = limits.memory
            && memory > self.wasm_memory
        {
            self.at(
                span,
                format!(
                    "service '{service}': limits.memory ({memory} bytes) exceeds plugins.wasm_memory ({} bytes), the size of an instance slot",
                    self.wasm_memory
                ),
            );
        }
    }

    /// A plugin's `store` table is kv config: checked against kv's own config schema here,
    /// rather than failing the plugin's first connect. Builtins have no plugin store.
    pub(super) fn check_store(
        &mut self,
        service: &str,
        written: &Spanned<toml::Table>,
        store: &Value,
        kind: providers_core::Kind,
        registry: &Registry,
    ) {
        if written.get_ref().is_empty() {
            return;
        }
        if kind == providers_core::Kind::Builtin {
            self.at(
                written.span(),
                format!("service '{service}': `store` configures a plugin's own store; builtin providers have none"),
            );
            return;
        }
        let Ok(kv) = registry.resolve("kv", &VersionReq::STAR) else {
            return;
        };
        if let Ok(schema) = jsonschema::validator_for(&kv.descriptor().config_schema)
            && let Err(e) = schema.validate(store)
        {
            let path = e.instance_path().as_str();
            let at = if path.is_empty() { "/" } else { path };
            self.at(
                written.span(),
                format!("service '{service}' store at '{at}': {e}"),
            );
        }
    }
}
