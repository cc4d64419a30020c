//! Root-key providers: the one trait behind which every key-encryption key (KEK) sits — offline
//! keyfile, PKCS#11 HSM and AWS KMS (behind the `aws` cargo feature). A provider wraps and
//! unwraps tenant data keys with a context bound in, and never hands its root key out. Knows
//! nothing about tenants' storage, caching or HTTP.

#[cfg(feature = "aws")]
pub mod aws_kms;
pub mod keyfile;
pub mod metered;
pub mod pkcs11;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::crypto::{CryptoError, DataKey};
use crate::tenant::TenantId;

/// A root's stable id, stored beside every blob it wrapped (`keyfile:<hex>`, later
/// `aws-kms:<arn>`, `pkcs11:<token>/<label>`). Identifies the root without revealing it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RootId(String);

impl RootId {
    pub fn new(id: impl Into<String>) -> Self {
        RootId(id.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RootId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RootId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RootId({})", self.0)
    }
}

/// Prefix of the ids of AWS KMS roots: `aws-kms:<key ARN, key id or alias as configured>`.
pub const AWS_KMS_PREFIX: &str = "aws-kms:";

/// The root id of an AWS KMS key named by ARN (`arn:aws:kms:…:key/…` or `…:alias/…`), alias
/// (`alias/…`) or key id. Checked for shape only (KMS itself decides whether the key exists), so
/// the id is safe in logs, metrics labels and the store.
pub fn aws_kms_root_id(key: &str) -> Result<RootId, String> {
    let charset_ok = !key.is_empty()
        && key.len() <= 2048
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/:_-.".contains(&b));
    let shape_ok = if let Some(rest) = key.strip_prefix("arn:") {
        rest.contains(":kms:") && (rest.contains(":key/") || rest.contains(":alias/"))
    } else if let Some(name) = key.strip_prefix("alias/") {
        !name.is_empty() && !name.contains(':')
    } else {
        key.len() <= 64 && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if charset_ok && shape_ok {
        Ok(RootId::new(format!("{AWS_KMS_PREFIX}{key}")))
    } else {
        Err(format!(
            "{key:?} is not an AWS KMS key ARN, alias (alias/NAME) or key id"
        ))
    }
}

/// Makes roots on demand from their stored ids: the customer-managed keys bound to single
/// tenants (BYOK), which are not listed in the configuration.
pub trait RootFactory: Send + Sync + 'static {
    /// The root with this id; `Setup` if this factory does not make roots of its kind.
    fn root(&self, id: &RootId) -> Result<Arc<dyn RootProvider>, ProviderError>;
}

/// Why a data key is wrapped; bound into every wrap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum WrapPurpose {
    /// A version of a tenant's data key.
    TenantDek = 0x01,
}

/// The context bound into every wrap: KMS EncryptionContext, or AAD for GCM-wrapping roots.
#[derive(Debug, Clone, Copy)]
pub struct WrapContext<'a> {
    pub tenant: &'a TenantId,
    pub key_version: u32,
    pub purpose: WrapPurpose,
}

impl WrapContext<'_> {
    /// The canonical byte encoding used as AAD by roots that wrap with an AEAD:
    /// `"kms-sidecar/wrap/v1" || purpose || key_version (u32 BE) || len(tenant) || tenant`.
    pub fn aad(&self) -> Vec<u8> {
        const LABEL: &[u8] = b"kms-sidecar/wrap/v1";
        let t = self.tenant.as_bytes();
        let mut aad = Vec::with_capacity(LABEL.len() + 6 + t.len());
        aad.extend_from_slice(LABEL);
        aad.push(self.purpose as u8);
        aad.extend_from_slice(&self.key_version.to_be_bytes());
        aad.push(self.tenant.len_byte());
        aad.extend_from_slice(t);
        aad
    }
}

/// Errors of root providers. Messages name the root, never key bytes.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ProviderError {
    /// The root cannot be reached now (network, HSM session, timeout); retrying later may work.
    #[error("root key {root} unavailable: {reason}")]
    Unavailable { root: String, reason: String },
    /// The root refused: key disabled, revoked or access denied.
    #[error("access to root key {root} denied")]
    AccessDenied { root: String },
    /// The blob is not one this root made for this context (tampered, moved or foreign).
    #[error("root key {root} could not unwrap the key")]
    UnwrapFailed { root: String },
    /// The provider could not be set up (file, passphrase, parameters).
    #[error("{0}")]
    Setup(String),
    #[error("cryptographic failure: {0}")]
    Crypto(#[from] CryptoError),
}

/// A root key (KEK). Implementations must bind `ctx` into every wrap so that a blob only
/// unwraps under the exact same context.
#[async_trait]
pub trait RootProvider: Send + Sync + 'static {
    /// Stable id stored beside every blob this root wrapped.
    fn id(&self) -> &RootId;

    /// Wraps `dek` for `ctx`.
    async fn wrap(&self, dek: &DataKey, ctx: &WrapContext<'_>) -> Result<Vec<u8>, ProviderError>;

    /// Unwraps a blob this root made for exactly `ctx`.
    async fn unwrap(&self, blob: &[u8], ctx: &WrapContext<'_>) -> Result<DataKey, ProviderError>;

    /// A new data key and its wrap under this root. Roots that can generate keys themselves
    /// (KMS GenerateDataKey) override this; the default draws from the OS CSPRNG.
    async fn generate(&self, ctx: &WrapContext<'_>) -> Result<(DataKey, Vec<u8>), ProviderError> {
        let dek = DataKey::generate()?;
        let blob = self.wrap(&dek, ctx).await?;
        Ok((dek, blob))
    }

    /// Whether the root can serve now.
    async fn health(&self) -> Result<(), ProviderError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aws_kms_root_ids_accept_arns_aliases_and_key_ids_only() {
        for key in [
            "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            "arn:aws-us-gov:kms:us-gov-west-1:123456789012:alias/tenant-a",
            "alias/tenant-a",
            "1234abcd-12ab-34cd-56ef-1234567890ab",
            "mrk-1234abcd12ab34cd56ef1234567890ab",
        ] {
            assert_eq!(
                aws_kms_root_id(key).unwrap().as_str(),
                format!("aws-kms:{key}")
            );
        }
        for bad in [
            "",
            "alias/",
            "not a key",
            "arn:aws:s3:::bucket",
            "arn:aws:kms:us-east-1:123456789012:other/x",
            "key\nid",
            "alias/x\"y",
        ] {
            assert!(aws_kms_root_id(bad).is_err(), "{bad:?}");
        }
    }
}
