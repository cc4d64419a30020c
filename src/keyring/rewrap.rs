//! Root (KEK) rotation: rewraps every stored data-key version under a target root, optionally
//! dropping the wrap under a retired root in the same transaction. No data is re-encrypted.
//! Resumable and idempotent: each version moves in one transaction, versions already done are
//! skipped, so a crash at any point is finished by running the job again. Tenants bound to their
//! own root (BYOK) are left alone: their keys must stay under the customer's key only.

use std::sync::Arc;

use super::ring::unwrap_with;
use super::{KeyState, KeyringError, KeyringStore, Wrapping};
use crate::providers::{RootId, RootProvider, WrapContext, WrapPurpose};

/// What a rewrap should do.
pub struct RewrapPlan {
    /// Roots that may unwrap existing versions, in preference order.
    pub roots: Vec<Arc<dyn RootProvider>>,
    /// The root every version must end up wrapped under.
    pub to: Arc<dyn RootProvider>,
    /// A root whose wraps are removed once the target wrap exists.
    pub drop: Option<RootId>,
}

/// What a rewrap did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RewrapSummary {
    /// Live (not destroyed) versions looked at.
    pub versions: u64,
    /// Versions changed by this run.
    pub rewrapped: u64,
    /// Versions that were already in the target state (finished by an earlier run).
    pub already_done: u64,
    /// Destroyed versions skipped.
    pub destroyed: u64,
    /// Versions of tenants bound to their own root (BYOK), left where they are.
    pub customer_managed: u64,
    /// Versions that could not be rewrapped (first error kept in `first_error`).
    pub failed: u64,
    pub first_error: Option<String>,
}

/// Runs the plan over every tenant. `progress(done, total)` is called after each version.
pub async fn rewrap_roots(
    store: &dyn KeyringStore,
    plan: &RewrapPlan,
    mut progress: impl FnMut(u64, u64),
) -> Result<RewrapSummary, KeyringError> {
    let tenants = store.tenants().await?;
    let mut work = Vec::new();
    let mut customer_managed = 0;
    for t in &tenants {
        if t.root.is_some() {
            customer_managed += store.key_versions(&t.tenant).await?.len() as u64;
            continue;
        }
        for v in store.key_versions(&t.tenant).await? {
            work.push((t.tenant.clone(), v));
        }
    }
    let total = work.len() as u64;
    let to_id = plan.to.id().clone();
    let mut summary = RewrapSummary {
        customer_managed,
        ..RewrapSummary::default()
    };
    for (i, (tenant, version)) in work.into_iter().enumerate() {
        if version.state == KeyState::Destroyed {
            summary.destroyed += 1;
            progress(i as u64 + 1, total);
            continue;
        }
        summary.versions += 1;
        let has_target = version.wrappings.iter().any(|w| w.root == to_id);
        let has_dropped = plan
            .drop
            .as_ref()
            .is_some_and(|d| *d != to_id && version.wrappings.iter().any(|w| &w.root == d));
        if has_target && !has_dropped {
            summary.already_done += 1;
            progress(i as u64 + 1, total);
            continue;
        }
        let result = async {
            let wrapping = match version.wrappings.iter().find(|w| w.root == to_id) {
                // Only the drop is left to do (a run stopped between the two, or none needed).
                Some(w) => w.clone(),
                None => {
                    let (dek, _) = unwrap_with(&plan.roots, &tenant, &version, None).await?;
                    let ctx = WrapContext {
                        tenant: &tenant,
                        key_version: version.version,
                        purpose: WrapPurpose::TenantDek,
                    };
                    Wrapping {
                        root: to_id.clone(),
                        blob: plan.to.wrap(&dek, &ctx).await?,
                    }
                }
            };
            store
                .put_wrapping(&tenant, version.version, &wrapping, plan.drop.as_ref())
                .await
                .map_err(KeyringError::from)
        }
        .await;
        match result {
            Ok(true) => summary.rewrapped += 1,
            Ok(false) => summary.already_done += 1,
            Err(e) => {
                summary.failed += 1;
                if summary.first_error.is_none() {
                    summary.first_error = Some(format!("{tenant} v{}: {e}", version.version));
                }
            }
        }
        progress(i as u64 + 1, total);
    }
    Ok(summary)
}
