//! Builds, parses and opens v1 sealed envelopes (layout in docs/envelope.md).
//! Knows nothing about tenants' storage, key caches or HTTP: it gets a key and a context, and
//! either produces bytes or says "decrypt failed" without saying why.

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use hkdf::Hkdf;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::keys::{DataKey, SecretBytes};
use super::{CryptoError, fill_random};
use crate::tenant::TenantId;

pub const VERSION_1: u8 = 0x01;
/// HKDF-SHA256 → AES-256-GCM with a 256-bit key commitment.
pub const SUITE_HKDF_SHA256_AES256GCM_COMMIT: u8 = 0x01;
pub const SALT_LEN: usize = 32;
pub const COMMITMENT_LEN: usize = 32;
pub const TAG_LEN: usize = 16;
const NONCE_LEN: usize = 12;
const ENC_KEY_LEN: usize = 32;
/// version, suite, key_version, salt, commitment.
pub const HEADER_LEN: usize = 1 + 1 + 4 + SALT_LEN + COMMITMENT_LEN;
/// Bytes an envelope adds to its plaintext.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;
const KDF_LABEL: &[u8] = b"kms-sidecar/v1";
const OKM_LEN: usize = ENC_KEY_LEN + NONCE_LEN + COMMITMENT_LEN;

/// What a sealed message is for; bound into the AAD so one kind never opens as another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Purpose {
    /// seal/open data.
    Data = 0x01,
    /// Data keys handed out by `datakey`.
    DataKey = 0x02,
    /// Values kept in the token vault.
    TokenValue = 0x03,
}

/// Everything besides the key that a message is bound to.
#[derive(Debug, Clone, Copy)]
pub struct SealContext<'a> {
    pub tenant: &'a TenantId,
    pub purpose: Purpose,
    /// The caller's own associated data (may be empty).
    pub aad: &'a [u8],
}

/// A parsed envelope, borrowing the bytes it was parsed from.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    header: &'a [u8],
    prefix: [u8; 6],
    key_version: u32,
    salt: &'a [u8],
    commitment: &'a [u8],
    body: &'a [u8],
    tag: &'a [u8],
}

impl<'a> Envelope<'a> {
    /// Parses the v1 layout. Total: any input gives `Ok` or `Err(Malformed)`, never a panic.
    /// Strict: unknown versions and suites, key version 0 and short inputs are rejected.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, CryptoError> {
        if bytes.len() < OVERHEAD {
            return Err(CryptoError::Malformed);
        }
        let (header, rest) = bytes.split_at(HEADER_LEN);
        let (body, tag) = rest.split_at(rest.len() - TAG_LEN);
        let [version, suite, v0, v1, v2, v3, ..] = *header else {
            return Err(CryptoError::Malformed);
        };
        if version != VERSION_1 || suite != SUITE_HKDF_SHA256_AES256GCM_COMMIT {
            return Err(CryptoError::Malformed);
        }
        let key_version = u32::from_be_bytes([v0, v1, v2, v3]);
        if key_version == 0 {
            return Err(CryptoError::Malformed);
        }
        let (salt, commitment) = header[6..].split_at(SALT_LEN);
        Ok(Envelope {
            header,
            prefix: [version, suite, v0, v1, v2, v3],
            key_version,
            salt,
            commitment,
            body,
            tag,
        })
    }

    /// The tenant key version this envelope was sealed under.
    pub fn key_version(&self) -> u32 {
        self.key_version
    }

    /// Length of the plaintext inside.
    pub fn plaintext_len(&self) -> usize {
        self.body.len()
    }

    /// Opens the envelope with `key`. Every failure is the same `DecryptFailed`.
    pub fn open(&self, key: &DataKey, ctx: &SealContext<'_>) -> Result<SecretBytes, CryptoError> {
        let okm = derive(key, &self.prefix, self.salt)?;
        let (enc_key, nonce, commitment) = split_okm(&okm);
        if !bool::from(commitment.ct_eq(self.commitment)) {
            return Err(CryptoError::DecryptFailed);
        }
        let aad = build_aad(self.header, ctx);
        let cipher = Aes256Gcm::new_from_slice(enc_key).map_err(|_| CryptoError::DecryptFailed)?;
        let nonce = Nonce::try_from(nonce).map_err(|_| CryptoError::DecryptFailed)?;
        let tag = Tag::try_from(self.tag).map_err(|_| CryptoError::DecryptFailed)?;
        let mut out = Zeroizing::new(self.body.to_vec());
        cipher
            .decrypt_inout_detached(&nonce, &aad, out.as_mut_slice().into(), &tag)
            .map_err(|_| CryptoError::DecryptFailed)?;
        Ok(SecretBytes::from(out))
    }
}

/// Seals `plaintext` under `key` (version `key_version`) with a fresh random salt.
pub fn seal(
    key: &DataKey,
    key_version: u32,
    ctx: &SealContext<'_>,
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let mut salt = [0u8; SALT_LEN];
    fill_random(&mut salt)?;
    seal_with_salt(key, key_version, ctx, plaintext, &salt)
}

/// Seals with a caller-chosen salt. Only for test vectors and tests: a repeated salt repeats the
/// per-message key and nonce.
#[doc(hidden)]
pub fn seal_with_salt(
    key: &DataKey,
    key_version: u32,
    ctx: &SealContext<'_>,
    plaintext: &[u8],
    salt: &[u8; SALT_LEN],
) -> Result<Vec<u8>, CryptoError> {
    if key_version == 0 {
        return Err(CryptoError::Malformed);
    }
    let mut prefix = [0u8; 6];
    prefix[0] = VERSION_1;
    prefix[1] = SUITE_HKDF_SHA256_AES256GCM_COMMIT;
    prefix[2..].copy_from_slice(&key_version.to_be_bytes());
    let okm = derive(key, &prefix, salt)?;
    let (enc_key, nonce, commitment) = split_okm(&okm);

    let mut out = Vec::with_capacity(OVERHEAD + plaintext.len());
    out.extend_from_slice(&prefix);
    out.extend_from_slice(salt);
    out.extend_from_slice(commitment);
    let aad = build_aad(&out, ctx);
    out.extend_from_slice(plaintext);

    let cipher = Aes256Gcm::new_from_slice(enc_key).map_err(|_| CryptoError::KeyLength)?;
    let nonce = Nonce::try_from(nonce).map_err(|_| CryptoError::KeyLength)?;
    let tag = cipher
        .encrypt_inout_detached(&nonce, &aad, (&mut out[HEADER_LEN..]).into())
        // Only fails past GCM's 2^36-byte plaintext limit, far beyond any body limit.
        .map_err(|_| CryptoError::Malformed)?;
    out.extend_from_slice(&tag);
    Ok(out)
}

fn derive(
    key: &DataKey,
    prefix: &[u8; 6],
    salt: &[u8],
) -> Result<Zeroizing<[u8; OKM_LEN]>, CryptoError> {
    let mut info = [0u8; KDF_LABEL.len() + 6];
    info[..KDF_LABEL.len()].copy_from_slice(KDF_LABEL);
    info[KDF_LABEL.len()..].copy_from_slice(prefix);
    let hk = Hkdf::<Sha256>::new(Some(salt), key.expose());
    let mut okm = Zeroizing::new([0u8; OKM_LEN]);
    hk.expand(&info, okm.as_mut_slice())
        .map_err(|_| CryptoError::KeyLength)?;
    Ok(okm)
}

fn split_okm(okm: &[u8; OKM_LEN]) -> (&[u8], &[u8], &[u8]) {
    let (enc_key, rest) = okm.split_at(ENC_KEY_LEN);
    let (nonce, commitment) = rest.split_at(NONCE_LEN);
    (enc_key, nonce, commitment)
}

fn build_aad(header: &[u8], ctx: &SealContext<'_>) -> Vec<u8> {
    let tenant = ctx.tenant.as_bytes();
    let mut aad = Vec::with_capacity(header.len() + 2 + tenant.len() + ctx.aad.len());
    aad.extend_from_slice(header);
    aad.push(ctx.purpose as u8);
    aad.push(ctx.tenant.len_byte());
    aad.extend_from_slice(tenant);
    aad.extend_from_slice(ctx.aad);
    aad
}

#[cfg(test)]
#[path = "envelope_tests.rs"]
mod tests;
