//! Counts every call of any root provider, its failures by kind and its latency into `Metrics`,
//! keyed by the root's id and the operation. A transparent decorator: it changes no result and
//! adds no policy.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;

use super::{ProviderError, RootId, RootProvider, WrapContext};
use crate::crypto::DataKey;
use crate::metrics::{Metrics, RootMeter, RootOp};

/// A root whose calls are counted and timed.
pub struct Metered {
    inner: Arc<dyn RootProvider>,
    meter: RootMeter,
}

impl Metered {
    /// `inner`, with its calls counted into `metrics`.
    pub fn counting(inner: Arc<dyn RootProvider>, metrics: &Metrics) -> Arc<dyn RootProvider> {
        let meter = metrics.root_meter(inner.id().as_str());
        Arc::new(Metered { inner, meter })
    }

    fn count<T>(
        &self,
        op: RootOp,
        started: Instant,
        r: Result<T, ProviderError>,
    ) -> Result<T, ProviderError> {
        let kind = r.as_ref().err().map(error_kind);
        self.meter.observe(op, started.elapsed(), kind);
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
        let started = Instant::now();
        let r = self.inner.wrap(dek, ctx).await;
        self.count(RootOp::Wrap, started, r)
    }

    async fn unwrap(&self, blob: &[u8], ctx: &WrapContext<'_>) -> Result<DataKey, ProviderError> {
        let started = Instant::now();
        let r = self.inner.unwrap(blob, ctx).await;
        self.count(RootOp::Unwrap, started, r)
    }

    async fn generate(&self, ctx: &WrapContext<'_>) -> Result<(DataKey, Vec<u8>), ProviderError> {
        let started = Instant::now();
        let r = self.inner.generate(ctx).await;
        self.count(RootOp::Generate, started, r)
    }

    async fn health(&self) -> Result<(), ProviderError> {
        let started = Instant::now();
        let r = self.inner.health().await;
        self.count(RootOp::Health, started, r)
    }
}
