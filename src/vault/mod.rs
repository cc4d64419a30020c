//! The token vault: replaces sensitive values (card numbers, national ids, OAuth tokens,
//! emails) with tokens, and gives values back only on `reveal`. Values are sealed under the
//! tenant's data key (purpose `TokenValue`, bound to the token string) and never stored in
//! clear; deterministic tokens come from an HMAC keyed per tenant. Defines the storage port it
//! needs (`VaultStore`); knows nothing about SQL or HTTP.

pub mod format;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::crypto::{Purpose, SecretBytes};
use crate::keyring::{Keyring, KeyringError, StoreError};
use crate::tenant::TenantId;
use format::{Format, FormatError, TokenBytes};

/// Attempts at a token that is not taken yet before giving up (format-preserving spaces can be
/// crowded; opaque tokens never collide in practice).
const MAX_ATTEMPTS: u32 = 16;
/// Longest token string looked up; anything longer cannot be one of ours.
const MAX_TOKEN_LEN: usize = 512;
/// Longest value accepted.
pub const MAX_VALUE_LEN: usize = 16 * 1024;

/// A stored token row. `sealed` is an envelope; `det_index` is an HMAC, never the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub tenant: TenantId,
    pub token: String,
    pub format: String,
    pub det_index: Option<Vec<u8>>,
    pub sealed: Vec<u8>,
    pub key_version: u32,
    pub created_at: i64,
    pub expires_at: Option<i64>,
}

/// What inserting a row did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertOutcome {
    Inserted,
    /// Another value already holds this token: try another one.
    TokenTaken,
    /// A deterministic token for this value exists already (this one is returned).
    Existing {
        token: String,
        expires_at: Option<i64>,
    },
}

/// A row found by `lookup_tokens`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredToken {
    pub format: String,
    pub sealed: Vec<u8>,
    pub expires_at: Option<i64>,
}

/// What the vault needs from storage.
#[async_trait]
pub trait VaultStore: Send + Sync + 'static {
    /// Inserts rows in one transaction. A deterministic row whose index already exists (and has
    /// not expired) is not inserted; the existing token is reported instead.
    async fn insert_tokens(
        &self,
        rows: &[TokenRow],
        now: i64,
    ) -> Result<Vec<InsertOutcome>, StoreError>;

    /// Unexpired rows of these tokens, in order (`None` where there is none).
    async fn lookup_tokens(
        &self,
        tenant: &TenantId,
        tokens: &[String],
        now: i64,
    ) -> Result<Vec<Option<StoredToken>>, StoreError>;

    /// Deletes one token; false if it did not exist (or had expired).
    async fn delete_token(
        &self,
        tenant: &TenantId,
        token: &str,
        now: i64,
    ) -> Result<bool, StoreError>;

    /// Deletes every expired row; returns how many.
    async fn purge_expired_tokens(&self, now: i64) -> Result<u64, StoreError>;
}

/// Errors of vault operations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VaultError {
    #[error("{0}")]
    InvalidValue(String),
    #[error("{0}")]
    FormatSpaceTooSmall(String),
    #[error("no free token left in this format for the value; try another format")]
    TokenSpaceExhausted,
    #[error("token not found")]
    TokenNotFound,
    #[error(transparent)]
    Keyring(#[from] KeyringError),
}

impl From<StoreError> for VaultError {
    fn from(e: StoreError) -> Self {
        VaultError::Keyring(e.into())
    }
}

impl From<FormatError> for VaultError {
    fn from(e: FormatError) -> Self {
        match e {
            FormatError::Invalid(m) => VaultError::InvalidValue(m),
            FormatError::SpaceTooSmall(m) => VaultError::FormatSpaceTooSmall(m),
        }
    }
}

/// One value to tokenize.
pub struct TokenizeItem {
    pub value: Zeroizing<String>,
    pub format: Format,
    pub deterministic: bool,
    pub ttl: Option<Duration>,
}

/// A token handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedToken {
    pub token: String,
    pub format: &'static str,
    pub expires_at: Option<i64>,
}

/// The vault over a key ring and a store.
#[derive(Clone)]
pub struct Vault {
    keyring: Keyring,
    store: Arc<dyn VaultStore>,
}

struct Pending {
    index: usize,
    value: Zeroizing<String>,
    format: Format,
    det_index: Option<Vec<u8>>,
    expires_at: Option<i64>,
}

impl Vault {
    pub fn new(keyring: Keyring, store: Arc<dyn VaultStore>) -> Self {
        Vault { keyring, store }
    }

    /// Tokenizes a batch; one result per item, in order. Store and key failures fail the batch.
    pub async fn tokenize(
        &self,
        tenant: &TenantId,
        items: Vec<TokenizeItem>,
    ) -> Result<Vec<Result<IssuedToken, VaultError>>, VaultError> {
        let now = crate::keyring::unix_now();
        let mut results: Vec<Option<Result<IssuedToken, VaultError>>> =
            (0..items.len()).map(|_| None).collect();
        let index_key = if items.iter().any(|i| i.deterministic) {
            Some(self.keyring.token_index_key(tenant).await?)
        } else {
            None
        };
        let mut pending = Vec::new();
        for (index, item) in items.into_iter().enumerate() {
            if item.value.is_empty() || item.value.len() > MAX_VALUE_LEN {
                results[index] = Some(Err(VaultError::InvalidValue(format!(
                    "values must be 1 to {MAX_VALUE_LEN} bytes"
                ))));
                continue;
            }
            let value = match format::normalize(item.format, &item.value) {
                Ok(v) => Zeroizing::new(v),
                Err(e) => {
                    results[index] = Some(Err(e.into()));
                    continue;
                }
            };
            let det_index = match (&index_key, item.deterministic) {
                (Some(k), true) => Some(hmac(
                    k,
                    &[
                        b"index",
                        item.format.name().as_bytes(),
                        &[0],
                        value.as_bytes(),
                    ],
                )),
                _ => None,
            };
            pending.push(Pending {
                index,
                value,
                format: item.format,
                det_index,
                expires_at: item.ttl.map(|t| now.saturating_add(t.as_secs() as i64)),
            });
        }
        for attempt in 0..MAX_ATTEMPTS {
            if pending.is_empty() {
                break;
            }
            let mut rows = Vec::with_capacity(pending.len());
            for p in &pending {
                let token = match (&index_key, &p.det_index) {
                    (Some(k), Some(_)) => {
                        let mut stream = HmacStream::new(k, p.format, &p.value, attempt);
                        format::make_token(p.format, &p.value, &mut stream)
                    }
                    _ => format::make_token(p.format, &p.value, &mut OsBytes),
                };
                let (sealed, key_version) = self
                    .keyring
                    .seal(
                        tenant,
                        Purpose::TokenValue,
                        token.as_bytes(),
                        SecretBytes::new(p.value.as_bytes().to_vec()),
                    )
                    .await?;
                rows.push(TokenRow {
                    tenant: tenant.clone(),
                    token,
                    format: p.format.name().to_owned(),
                    det_index: p.det_index.clone(),
                    sealed,
                    key_version,
                    created_at: now,
                    expires_at: p.expires_at,
                });
            }
            let outcomes = self
                .keyring
                .metrics()
                .store_call("insert_tokens", self.store.insert_tokens(&rows, now))
                .await?;
            let mut retry = Vec::new();
            for ((p, row), outcome) in pending.into_iter().zip(rows).zip(outcomes) {
                let issued = |token: String, expires_at| IssuedToken {
                    token,
                    format: p.format.name(),
                    expires_at,
                };
                match outcome {
                    InsertOutcome::Inserted => {
                        results[p.index] = Some(Ok(issued(row.token, row.expires_at)))
                    }
                    InsertOutcome::Existing { token, expires_at } => {
                        results[p.index] = Some(Ok(issued(token, expires_at)))
                    }
                    InsertOutcome::TokenTaken => retry.push(p),
                }
            }
            pending = retry;
        }
        for p in pending {
            results[p.index] = Some(Err(VaultError::TokenSpaceExhausted));
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or(Err(VaultError::TokenSpaceExhausted)))
            .collect())
    }

    /// Values of tokens, in order; unknown, expired and deleted tokens are `TokenNotFound`
    /// (whatever tenant they might belong to). With `mask`, all but the last four characters
    /// come back as `*`.
    pub async fn reveal(
        &self,
        tenant: &TenantId,
        tokens: &[String],
        mask: bool,
    ) -> Result<Vec<Result<Zeroizing<String>, VaultError>>, VaultError> {
        let now = crate::keyring::unix_now();
        let plausible: Vec<String> = tokens
            .iter()
            .map(|t| {
                if t.len() <= MAX_TOKEN_LEN && t.bytes().all(|b| b.is_ascii_graphic()) {
                    t.clone()
                } else {
                    String::new()
                }
            })
            .collect();
        let found = self
            .keyring
            .metrics()
            .store_call(
                "lookup_tokens",
                self.store.lookup_tokens(tenant, &plausible, now),
            )
            .await?;
        let mut out = Vec::with_capacity(tokens.len());
        for (token, row) in plausible.iter().zip(found) {
            let Some(row) = row else {
                out.push(Err(VaultError::TokenNotFound));
                continue;
            };
            match self
                .keyring
                .open(tenant, Purpose::TokenValue, token.as_bytes(), &row.sealed)
                .await
            {
                Ok(value) => {
                    let text = Zeroizing::new(String::from_utf8_lossy(value.expose()).into_owned());
                    out.push(Ok(if mask {
                        Zeroizing::new(format::mask_last4(&text))
                    } else {
                        text
                    }));
                }
                Err(KeyringError::DecryptFailed) => {
                    out.push(Err(KeyringError::DecryptFailed.into()))
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    pub async fn delete(&self, tenant: &TenantId, token: &str) -> Result<(), VaultError> {
        let now = crate::keyring::unix_now();
        let deleted = self
            .keyring
            .metrics()
            .store_call("delete_token", self.store.delete_token(tenant, token, now))
            .await?;
        if deleted {
            Ok(())
        } else {
            Err(VaultError::TokenNotFound)
        }
    }

    /// Deletes expired tokens; the server runs it periodically.
    pub async fn sweep(&self) -> Result<u64, VaultError> {
        let store = &self.store;
        Ok(self
            .keyring
            .metrics()
            .store_call(
                "purge_expired_tokens",
                store.purge_expired_tokens(crate::keyring::unix_now()),
            )
            .await?)
    }
}

fn hmac(key: &[u8; 32], parts: &[&[u8]]) -> Vec<u8> {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return Vec::new(),
    };
    for p in parts {
        mac.update(&(p.len() as u64).to_be_bytes());
        mac.update(p);
    }
    mac.finalize().into_bytes().to_vec()
}

/// Token bytes from the OS CSPRNG.
pub struct OsBytes;

impl TokenBytes for OsBytes {
    fn fill(&mut self, out: &mut [u8]) {
        if crate::crypto::fill_random(out).is_err() {
            // Without randomness no token may be issued; the all-zero bytes make every
            // format's token collide with the next one, which ends in TokenSpaceExhausted.
            out.fill(0);
        }
    }
}

/// Deterministic token bytes: HMAC(index key, "token" ‖ format ‖ value ‖ attempt ‖ block).
struct HmacStream<'a> {
    key: &'a [u8; 32],
    format: Format,
    value: &'a str,
    attempt: u32,
    block: u64,
    buf: Vec<u8>,
}

impl<'a> HmacStream<'a> {
    fn new(key: &'a [u8; 32], format: Format, value: &'a str, attempt: u32) -> Self {
        HmacStream {
            key,
            format,
            value,
            attempt,
            block: 0,
            buf: Vec::new(),
        }
    }
}

impl TokenBytes for HmacStream<'_> {
    fn fill(&mut self, out: &mut [u8]) {
        for b in out.iter_mut() {
            if self.buf.is_empty() {
                self.buf = hmac(
                    self.key,
                    &[
                        b"token",
                        self.format.name().as_bytes(),
                        self.value.as_bytes(),
                        &self.attempt.to_be_bytes(),
                        &self.block.to_be_bytes(),
                    ],
                );
                self.buf.reverse();
                self.block += 1;
            }
            *b = self.buf.pop().unwrap_or(0);
        }
    }
}
