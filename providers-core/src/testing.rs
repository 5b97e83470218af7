//! Run a provider in a few lines, without the host: connect, call, disconnect.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use crate::capabilities::{Level, Log, Logger, MemoryStore, Store};
use crate::{CallContext, Caller, ConnectContext, Provider, ProviderError, Resources};

/// A minimal host for one provider instance in tests.
///
/// It drives the lifecycle in the contract's order and routes [`CallContext::call`] to the
/// other providers added with [`TestHostBuilder::peer`]. It does not validate schemas or
/// permissions: use the real host for that.
pub struct TestHost {
    provider: Arc<dyn Provider>,
    ctx: CallContext,
    peers: Arc<Peers>,
    connected: bool,
}

/// Configures a [`TestHost`].
pub struct TestHostBuilder {
    provider: Box<dyn Provider>,
    tenant: String,
    roles: Vec<String>,
    config: Value,
    resources: Resources,
    store: Option<Arc<dyn Store>>,
    peers: Vec<(String, Box<dyn Provider>, Value)>,
}

/// Plugin log lines, on stderr, where the test harness captures them.
struct StderrLog(String);

impl Log for StderrLog {
    fn log(&self, level: Level, request_id: &str, message: &str) {
        eprintln!("[{level:?} {} {request_id}] {message}", self.0);
    }
}

impl TestHost {
    /// Connects `provider` for tenant `test` with an empty config.
    pub async fn new(provider: impl Provider) -> Result<Self, ProviderError> {
        Self::builder(provider).connect().await
    }

    /// A builder for finer setups.
    pub fn builder(provider: impl Provider) -> TestHostBuilder {
        TestHostBuilder {
            provider: Box::new(provider),
            tenant: "test".to_owned(),
            roles: Vec::new(),
            config: Value::Object(Default::default()),
            resources: Resources::default(),
            store: None,
            peers: Vec::new(),
        }
    }

    /// Calls `action` with `payload` under the host's context.
    pub async fn call(&mut self, action: &str, payload: Value) -> Result<Value, ProviderError> {
        self.provider.execute(action, payload, &self.ctx).await
    }

    /// Like [`call`](Self::call), through a shared reference: put the host in an `Arc` to
    /// call from several tasks at once, as the real host does.
    pub async fn call_shared(&self, action: &str, payload: Value) -> Result<Value, ProviderError> {
        self.provider.execute(action, payload, &self.ctx).await
    }

    /// Calls `action` under a context of the caller's choosing.
    pub async fn call_as(
        &self,
        ctx: &CallContext,
        action: &str,
        payload: Value,
    ) -> Result<Value, ProviderError> {
        self.provider.execute(action, payload, ctx).await
    }

    /// The context calls run under.
    pub fn context(&self) -> &CallContext {
        &self.ctx
    }

    /// A context for another caller of the same tenant, say a buyer and a seller company;
    /// its nested calls reach the peers like the host's own context.
    pub fn context_as(
        &self,
        subject: &str,
        roles: &[&str],
        company_id: Option<&str>,
    ) -> CallContext {
        CallContext::new(self.ctx.tenant(), self.ctx.request_id())
            .with_subject(subject)
            .with_roles(roles.iter().map(|r| (*r).to_owned()).collect::<Vec<_>>())
            .with_company_id(company_id)
            .with_caller(self.peers.clone())
    }

    /// The provider's status.
    pub async fn status(&self) -> crate::Status {
        self.provider.get_status().await
    }

    /// Disconnects the provider, ending its lifecycle.
    pub async fn disconnect(mut self) -> Result<(), ProviderError> {
        self.connected = false;
        self.provider.disconnect().await
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        // Drop cannot await `disconnect`; a test that forgets it should not pass silently.
        if self.connected && !std::thread::panicking() {
            eprintln!(
                "TestHost dropped without disconnect(); call it to exercise the whole lifecycle"
            );
        }
    }
}

impl TestHostBuilder {
    /// The tenant (default `test`).
    pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = tenant.into();
        self
    }

    /// The caller's roles.
    pub fn roles(mut self, roles: &[&str]) -> Self {
        self.roles = roles.iter().map(|r| (*r).to_owned()).collect();
        self
    }

    /// The config `connect` receives.
    pub fn config(mut self, config: Value) -> Self {
        self.config = config;
        self
    }

    /// A resource `connect` can find with [`ConnectContext::resource`].
    pub fn resource<T: std::any::Any + Send + Sync>(mut self, value: T) -> Self {
        self.resources.insert(value);
        self
    }

    /// The store `connect` finds in [`ConnectContext::store`]; by default each provider
    /// gets a fresh [`MemoryStore`]. Pass the same one to two hosts to share state.
    pub fn store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// Another provider reachable through [`CallContext::call`], connected with an empty config.
    pub fn peer(self, provider: impl Provider) -> Self {
        self.peer_with_config(provider, Value::Object(Default::default()))
    }

    /// Like [`peer`](Self::peer), connected with `config`.
    pub fn peer_with_config(mut self, provider: impl Provider, config: Value) -> Self {
        let service = provider.descriptor().service;
        self.peers.push((service, Box::new(provider), config));
        self
    }

    /// Connects everything and returns the host.
    pub async fn connect(self) -> Result<TestHost, ProviderError> {
        let mut peers = Vec::new();
        for (service, mut peer, config) in self.peers {
            let ctx = ConnectContext::new(self.tenant.clone(), config)
                .with_service(service.clone())
                .with_resources(self.resources.clone())
                .with_store(Arc::new(MemoryStore::default()))
                .with_log(Logger::new(Arc::new(StderrLog(service.clone()))));
            peer.connect(&ctx).await?;
            peers.push((service, Arc::<dyn Provider>::from(peer)));
        }
        let mut provider = self.provider;
        let service = provider.descriptor().service;
        let store = self
            .store
            .unwrap_or_else(|| Arc::new(MemoryStore::default()));
        let ctx = ConnectContext::new(self.tenant.clone(), self.config)
            .with_service(service.clone())
            .with_resources(self.resources)
            .with_store(store)
            .with_log(Logger::new(Arc::new(StderrLog(service))));
        provider.connect(&ctx).await?;
        let peers = Arc::new(Peers(peers));
        let ctx = CallContext::new(self.tenant, "test-request")
            .with_subject("test-subject")
            .with_roles(self.roles)
            .with_caller(peers.clone());
        Ok(TestHost {
            provider: Arc::from(provider),
            ctx,
            peers,
            connected: true,
        })
    }
}

struct Peers(Vec<(String, Arc<dyn Provider>)>);

#[async_trait]
impl Caller for Peers {
    async fn call(
        &self,
        ctx: &CallContext,
        service: &str,
        action: &str,
        payload: Value,
    ) -> Result<Value, ProviderError> {
        let (_, peer) = self
            .0
            .iter()
            .find(|(name, _)| name == service)
            .ok_or_else(|| ProviderError::not_found(format!("no peer service '{service}'")))?;
        peer.execute(action, payload, &ctx.nested()?).await
    }
}
