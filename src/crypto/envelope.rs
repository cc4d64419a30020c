//! Builds, parses and opens v1 sealed envelopes (layout in docs/envelope.md).
//! Knows nothing about tenants' storage, key caches or HTTP: it gets a key and a context, and
//! either produces bytes or says "decrypt failed" without saying why.

use hkdf::Hkdf;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::keys::{DataKey, SecretBytes, SecretVec};
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
        let (cipher, nonce, aad) = self.opener(key, ctx)?;
        let tag = Tag::try_from(self.tag).map_err(|_| CryptoError::DecryptFailed)?;
        // Zeroizing from the start: a failed open may leave unverified plaintext in the buffer.
        let mut out = SecretVec::from(self.body.to_vec());
        cipher
            .open_in_place_separate_tag(nonce, Aad::from(aad), tag, out.as_mut_slice(), 0..)
            .map_err(|_| CryptoError::DecryptFailed)?;
        Ok(SecretBytes::from(out))
    }

    /// Checks the commitment and derives the cipher, nonce and AAD for this envelope.
    fn opener(
        &self,
        key: &DataKey,
        ctx: &SealContext<'_>,
    ) -> Result<(LessSafeKey, Nonce, Vec<u8>), CryptoError> {
        let okm = derive(key, &self.prefix, self.salt)?;
        let (enc_key, nonce, commitment) = split_okm(&okm);
        if !bool::from(commitment.ct_eq(self.commitment)) {
            return Err(CryptoError::DecryptFailed);
        }
        let cipher = aead_key(enc_key).map_err(|_| CryptoError::DecryptFailed)?;
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| CryptoError::DecryptFailed)?;
        Ok((cipher, nonce, build_aad(self.header, ctx)))
    }
}

/// Opens an envelope held in an owned buffer, decrypting in place: the plaintext is returned
/// in the same allocation, so a large body is never copied. Every failure is `DecryptFailed`
/// (or `Malformed` for bytes that are not an envelope), and the buffer is zeroized on failure.
pub fn open_owned(
    key: &DataKey,
    ctx: &SealContext<'_>,
    envelope: SecretVec,
) -> Result<SecretBytes, CryptoError> {
    let mut buf = envelope;
    let (cipher, nonce, aad) = {
        let env = Envelope::parse(&buf)?;
        env.opener(key, ctx)?
    };
    let len = cipher
        .open_within(nonce, Aad::from(aad), buf.as_mut_slice(), HEADER_LEN..)
        .map_err(|_| CryptoError::DecryptFailed)?
        .len();
    buf.truncate(len);
    Ok(SecretBytes::from(buf))
}

/// A plaintext laid out for sealing in place: room for the header in front and the tag behind,
/// so that sealing needs no second buffer. Zeroized on drop.
pub struct SealBuffer(SecretVec);

impl SealBuffer {
    /// An empty plaintext with room for `plaintext_len` bytes.
    pub fn with_capacity(plaintext_len: usize) -> Self {
        let mut buf = SecretVec::with_capacity(OVERHEAD.saturating_add(plaintext_len));
        buf.resize(HEADER_LEN, 0);
        SealBuffer(buf)
    }

    /// A buffer whose first `HEADER_LEN` bytes are headroom and the rest the plaintext (e.g. a
    /// request body read with that headroom). Keep `TAG_LEN` spare capacity to avoid a copy.
    pub fn from_headroom(buf: SecretVec) -> Result<Self, CryptoError> {
        if buf.len() < HEADER_LEN {
            return Err(CryptoError::Malformed);
        }
        Ok(SealBuffer(buf))
    }

    /// A copy of `plaintext`.
    pub fn from_plaintext(plaintext: &[u8]) -> Self {
        let mut b = SealBuffer::with_capacity(plaintext.len());
        b.extend_from_slice(plaintext);
        b
    }

    /// Appends plaintext. Growing moves the bytes to a new buffer and zeroizes the old one, so
    /// no partial plaintext is left behind in freed memory.
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.reserve(bytes.len());
        self.0.extend_from_slice(bytes);
    }

    /// Makes room for `additional` more plaintext bytes plus the tag, without leaving copies.
    pub fn reserve(&mut self, additional: usize) {
        let needed = self
            .0
            .len()
            .saturating_add(additional)
            .saturating_add(TAG_LEN);
        if needed > self.0.capacity() {
            let mut grown = SecretVec::with_capacity(needed.max(self.0.capacity() * 2));
            grown.extend_from_slice(&self.0);
            // The old buffer is zeroized as it drops.
            self.0 = grown;
        }
    }

    /// Appends up to `max` bytes written by `fill` straight into the buffer (e.g. a base64
    /// decoder), which returns how many it wrote. The room is reserved first and the slice
    /// handed out is exactly that room, so nothing can reallocate and leave plaintext behind.
    pub fn append_with<E>(
        &mut self,
        max: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<usize, E>,
    ) -> Result<(), E> {
        self.reserve(max);
        let start = self.0.len();
        self.0.resize(start.saturating_add(max), 0);
        let written = fill(&mut self.0[start..]);
        let n = match &written {
            Ok(n) => (*n).min(max),
            Err(_) => 0,
        };
        self.0.truncate(start + n);
        written.map(|_| ())
    }

    /// The plaintext written so far.
    pub fn plaintext(&self) -> &[u8] {
        self.0.get(HEADER_LEN..).unwrap_or_default()
    }

    pub fn plaintext_len(&self) -> usize {
        self.0.len().saturating_sub(HEADER_LEN)
    }
}

impl std::fmt::Debug for SealBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SealBuffer({} bytes)", self.plaintext_len())
    }
}

/// Seals the plaintext in `buf` in place (fresh random salt) and returns the envelope, in the
/// same allocation.
pub fn seal_buffer(
    key: &DataKey,
    key_version: u32,
    ctx: &SealContext<'_>,
    buf: SealBuffer,
) -> Result<Vec<u8>, CryptoError> {
    let mut salt = [0u8; SALT_LEN];
    fill_random(&mut salt)?;
    seal_buffer_with_salt(key, key_version, ctx, buf, &salt)
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
    seal_buffer_with_salt(
        key,
        key_version,
        ctx,
        SealBuffer::from_plaintext(plaintext),
        salt,
    )
}

fn seal_buffer_with_salt(
    key: &DataKey,
    key_version: u32,
    ctx: &SealContext<'_>,
    buf: SealBuffer,
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

    let mut out = buf.0;
    let header = out.get_mut(..HEADER_LEN).ok_or(CryptoError::Malformed)?;
    let (p, rest) = header.split_at_mut(prefix.len());
    p.copy_from_slice(&prefix);
    let (s, c) = rest.split_at_mut(SALT_LEN);
    s.copy_from_slice(salt);
    c.copy_from_slice(commitment);
    let aad = build_aad(&out[..HEADER_LEN], ctx);

    let cipher = aead_key(enc_key)?;
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| CryptoError::KeyLength)?;
    let tag = cipher
        .seal_in_place_separate_tag(nonce, Aad::from(aad), &mut out[HEADER_LEN..])
        // Only fails past GCM's 2^36-byte plaintext limit, far beyond any body limit.
        .map_err(|_| CryptoError::Malformed)?;
    out.extend_from_slice(tag.as_ref());
    // The buffer now holds only ciphertext: hand it out without the zeroizing wrapper.
    Ok(std::mem::take(&mut *out))
}

/// The AES-256-GCM key for one message. ring does not zeroize its key schedule on drop; the key
/// is a per-message key derived by HKDF (it opens this one message only), and its bytes in `okm`
/// are zeroized by the caller.
fn aead_key(enc_key: &[u8]) -> Result<LessSafeKey, CryptoError> {
    UnboundKey::new(&AES_256_GCM, enc_key)
        .map(LessSafeKey::new)
        .map_err(|_| CryptoError::KeyLength)
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
