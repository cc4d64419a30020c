//! The API's one error type and its one mapping to HTTP status and stable snake_case code.
//! Messages never carry key bytes, plaintext, or which check of an open failed.

use hyper::StatusCode;

use crate::keyring::{KeyringError, StoreError};
use crate::providers::ProviderError;

/// Every error the HTTP API can answer with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("field `{0}` is not valid base64")]
    InvalidBase64(&'static str),
    #[error("tenant id must be 1 to 128 characters of A-Z a-z 0-9 . _ -")]
    InvalidTenant,
    #[error("a batch holds at most {max} items")]
    BatchTooLarge { max: usize },
    #[error("request body larger than {max} bytes")]
    BodyTooLarge { max: usize },
    #[error("application/octet-stream bodies are accepted by seal and open only")]
    UnsupportedMediaType,
    #[error("no such route")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("authentication required")]
    Unauthenticated,
    #[error("not allowed")]
    Forbidden,
    #[error("tenant not found")]
    TenantNotFound,
    #[error("decryption failed")]
    DecryptFailed,
    #[error("tenant destroyed")]
    TenantDestroyed,
    #[error("key version destroyed")]
    KeyVersionDestroyed,
    #[error("key version retired: below the tenant's min_decrypt_version")]
    KeyVersionRetired,
    #[error("{0}")]
    Conflict(String),
    #[error("approval not found")]
    ApprovalNotFound,
    #[error("approval expired")]
    ApprovalExpired,
    #[error("the principal that requested a shred cannot approve it")]
    ApprovalSamePrincipal,
    #[error("approval is no longer pending")]
    ApprovalNotPending,
    #[error("audit log unavailable; the operation was not performed")]
    AuditUnavailable,
    #[error("token not found")]
    TokenNotFound,
    #[error("{0}")]
    InvalidValue(String),
    #[error("{0}")]
    FormatSpaceTooSmall(String),
    #[error("no free token left in this format for the value")]
    TokenSpaceExhausted,
    #[error("root key unavailable")]
    RootKeyUnavailable,
    #[error("access to the root key was denied")]
    RootKeyAccessDenied,
    #[error("a stored key version could not be unwrapped by any configured root")]
    KeyUnwrapFailed,
    #[error("store unavailable")]
    StoreUnavailable,
    #[error("not ready")]
    NotReady,
    #[error("too many requests in flight; retry shortly")]
    Overloaded,
    #[error("internal error")]
    Internal,
}

impl ApiError {
    /// The one place errors become statuses and codes. The codes are listed in the README.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        use ApiError::*;
        match self {
            InvalidRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            InvalidBase64(_) => (StatusCode::BAD_REQUEST, "invalid_base64"),
            InvalidTenant => (StatusCode::BAD_REQUEST, "invalid_tenant"),
            BatchTooLarge { .. } => (StatusCode::BAD_REQUEST, "batch_too_large"),
            BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            UnsupportedMediaType => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            NotFound => (StatusCode::NOT_FOUND, "not_found"),
            MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Unauthenticated => (StatusCode::UNAUTHORIZED, "unauthenticated"),
            Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
            TenantNotFound => (StatusCode::NOT_FOUND, "tenant_not_found"),
            DecryptFailed => (StatusCode::BAD_REQUEST, "decrypt_failed"),
            TenantDestroyed => (StatusCode::GONE, "tenant_destroyed"),
            KeyVersionDestroyed => (StatusCode::GONE, "key_version_destroyed"),
            KeyVersionRetired => (StatusCode::CONFLICT, "key_version_retired"),
            Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApprovalNotFound => (StatusCode::NOT_FOUND, "approval_not_found"),
            ApprovalExpired => (StatusCode::GONE, "approval_expired"),
            ApprovalSamePrincipal => (StatusCode::FORBIDDEN, "approval_same_principal"),
            ApprovalNotPending => (StatusCode::CONFLICT, "approval_not_pending"),
            AuditUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "audit_unavailable"),
            TokenNotFound => (StatusCode::NOT_FOUND, "token_not_found"),
            InvalidValue(_) => (StatusCode::BAD_REQUEST, "invalid_value"),
            FormatSpaceTooSmall(_) => (StatusCode::BAD_REQUEST, "format_space_too_small"),
            TokenSpaceExhausted => (StatusCode::CONFLICT, "token_space_exhausted"),
            RootKeyUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "root_key_unavailable"),
            RootKeyAccessDenied => (StatusCode::FORBIDDEN, "root_key_access_denied"),
            KeyUnwrapFailed => (StatusCode::INTERNAL_SERVER_ERROR, "key_unwrap_failed"),
            StoreUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            NotReady => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
            Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl From<KeyringError> for ApiError {
    fn from(e: KeyringError) -> Self {
        match e {
            KeyringError::TenantNotFound => ApiError::TenantNotFound,
            KeyringError::DecryptFailed => ApiError::DecryptFailed,
            KeyringError::TenantDestroyed => ApiError::TenantDestroyed,
            KeyringError::KeyVersionDestroyed => ApiError::KeyVersionDestroyed,
            KeyringError::KeyVersionRetired => ApiError::KeyVersionRetired,
            KeyringError::Refused(m) => ApiError::Conflict(m),
            KeyringError::ApprovalNotFound => ApiError::ApprovalNotFound,
            KeyringError::ApprovalExpired => ApiError::ApprovalExpired,
            KeyringError::ApprovalSamePrincipal => ApiError::ApprovalSamePrincipal,
            KeyringError::ApprovalNotPending => ApiError::ApprovalNotPending,
            KeyringError::KeyUnwrapFailed { .. } => ApiError::KeyUnwrapFailed,
            KeyringError::Provider(p) => match p {
                ProviderError::Unavailable { .. } => ApiError::RootKeyUnavailable,
                ProviderError::AccessDenied { .. } => ApiError::RootKeyAccessDenied,
                ProviderError::UnwrapFailed { .. } => ApiError::KeyUnwrapFailed,
                ProviderError::Setup(_) | ProviderError::Crypto(_) => ApiError::Internal,
            },
            KeyringError::Store(StoreError::Unavailable(_)) => ApiError::StoreUnavailable,
            KeyringError::Store(StoreError::Corrupt(_)) => ApiError::Internal,
            KeyringError::Store(StoreError::Refused(m)) => ApiError::Conflict(m),
            KeyringError::Crypto(_) | KeyringError::Internal(_) => ApiError::Internal,
        }
    }
}

impl From<crate::vault::VaultError> for ApiError {
    fn from(e: crate::vault::VaultError) -> Self {
        use crate::vault::VaultError;
        match e {
            VaultError::InvalidValue(m) => ApiError::InvalidValue(m),
            VaultError::FormatSpaceTooSmall(m) => ApiError::FormatSpaceTooSmall(m),
            VaultError::TokenSpaceExhausted => ApiError::TokenSpaceExhausted,
            VaultError::TokenNotFound => ApiError::TokenNotFound,
            VaultError::Keyring(k) => k.into(),
        }
    }
}
