//! Counts every call of any root provider, and its failures by kind, into `Metrics`, keyed by the
//! root's id and the operation. A transparent decorator: it changes no result and adds no policy.

use std::sync::Arc;

use async_trait::async_trait;

use super::{ProviderError, RootId, RootProvider, WrapContext};
use crate::crypto::DataKey;
use crate::metrics::Metrics;

/// A root whose calls are counted.
pub struct Metered {
    inner: Arc<dyn RootProvider>,
    metrics: Arc<Metrics>,
}

impl Metered {
    /// `inner`, with its calls counted into `metrics`.
    pub fn counting(inner: Arc<dyn RootProvider>, metrics: Arc<Metrics>) -> Arc<dyn RootProvider> {
        Arc::new(Metered { inner, metrics })
    }

    fn count<T>(&self, op: &'static str, r: Result<T, ProviderError>) -> Result<T, ProviderError> {
        let kind = r.as_ref().err().map(error_kind);
        self.metrics.root_call(self.inner.id().as_str(), op, kind);
        r
    }
}

/// The `kind` label of a provider error.
pub fn error_kind(e: &ProviderError) -> &'static str {
    match e {
        ProviderError::Unavailable { .. } => "unavailable",
        ProviderError::AccessDenied { .. } => "access_denied",
        ProviderError::UnwrapFailed { .. } => "unwrap_failed",
        ProviderError::Setup(_) => "setup",
        ProviderError::Crypto(_) => "crypto",
    }
}

#[async_trait]
impl RootProvider for Metered {
    fn id(&self) -> &RootId {
        self.inner.id()
    }

    async fn wrap(&self, dek: &DataKey, ctx: &WrapContext<'_>) -> Result<Vec<u8>, ProviderError> {
        let r = self.inner.wrap(dek, ctx).await;
        self.count("wrap", r)
    }

    async fn unwrap(&self, blob: &[u8], ctx: &WrapContext<'_>) -> Result<DataKey, ProviderError> {
        let r = self.inner.unwrap(blob, ctx).await;
        self.count("unwrap", r)
    }

    async fn generate(&self, ctx: &WrapContext<'_>) -> Result<(DataKey, Vec<u8>), ProviderError> {
        let r = self.inner.generate(ctx).await;
        self.count("generate", r)
    }

    async fn health(&self) -> Result<(), ProviderError> {
        let r = self.inner.health().await;
        self.count("health", r)
    }
}
