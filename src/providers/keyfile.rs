//! The offline keyfile root: a 256-bit root key in a local file, optionally sealed under a
//! passphrase with Argon2id, for air-gapped sites and development. Wraps data keys with
//! AES-256-GCM under a key derived from the root; the root key never leaves this module.
//! File layout and blob layout: docs/envelope.md.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use argon2::{Algorithm, Argon2, Params, Version};
use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hkdf::Hkdf;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::{ProviderError, RootId, RootProvider, WrapContext};
use crate::crypto::keys::KEY_LEN;
use crate::crypto::{DataKey, fill_random};

const BLOB_FORMAT_V1: u8 = 0x01;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// format, nonce, encrypted key, tag.
pub const BLOB_LEN: usize = 1 + NONCE_LEN + KEY_LEN + TAG_LEN;
const FILE_VERSION: u32 = 1;
const SEAL_AAD: &[u8] = b"kms-sidecar/keyfile/v1";
const SALT_LEN: usize = 16;

/// Argon2id cost parameters for sealing a keyfile under a passphrase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KdfParams {
    pub m_kib: u32,
    pub t: u32,
    pub p: u32,
}

impl Default for KdfParams {
    /// RFC 9106's second recommended setting, with one lane: 64 MiB, 3 passes.
    fn default() -> Self {
        KdfParams {
            m_kib: 64 * 1024,
            t: 3,
            p: 1,
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KdfJson {
    alg: String,
    #[serde(flatten)]
    params: KdfParams,
    salt: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyfileJson {
    kms_sidecar_keyfile: u32,
    #[serde(default)]
    key: Option<SecretString>,
    #[serde(default)]
    kdf: Option<KdfJson>,
    #[serde(default)]
    sealed_key: Option<String>,
}

/// A loaded keyfile root.
pub struct KeyfileRoot {
    id: RootId,
    /// AES-256-GCM keyed with the wrap key derived from the root; zeroizes its key schedule on drop.
    cipher: Aes256Gcm,
}

impl KeyfileRoot {
    /// Builds the root from raw key bytes.
    pub fn from_key(root: &[u8; KEY_LEN]) -> Result<Self, ProviderError> {
        let hk = Hkdf::<Sha256>::new(None, root);
        let mut wrap_key = Zeroizing::new([0u8; KEY_LEN]);
        let mut id = [0u8; 8];
        hk.expand(b"kms-sidecar/keyfile/wrap/v1", wrap_key.as_mut_slice())
            .and_then(|()| hk.expand(b"kms-sidecar/keyfile/id/v1", &mut id))
            .map_err(|_| ProviderError::Setup("keyfile: key derivation failed".into()))?;
        let cipher = Aes256Gcm::new_from_slice(wrap_key.as_slice())
            .map_err(|_| ProviderError::Setup("keyfile: bad key length".into()))?;
        Ok(KeyfileRoot {
            id: RootId::new(format!("keyfile:{}", hex::encode(id))),
            cipher,
        })
    }

    /// Loads a keyfile; `passphrase` is required exactly when the file is sealed.
    pub fn load(path: &Path, passphrase: Option<&SecretString>) -> Result<Self, ProviderError> {
        let text = Zeroizing::new(std::fs::read(path).map_err(|e| {
            ProviderError::Setup(format!("keyfile {}: cannot read: {e}", path.display()))
        })?);
        let key = parse_keyfile(&text, passphrase)
            .map_err(|m| ProviderError::Setup(format!("keyfile {}: {m}", path.display())))?;
        Self::from_key(&key)
    }
}

/// Decodes a keyfile's JSON into the root key. Errors say what is wrong, never what the key is.
pub fn parse_keyfile(
    text: &[u8],
    passphrase: Option<&SecretString>,
) -> Result<Zeroizing<[u8; KEY_LEN]>, String> {
    let file: KeyfileJson =
        serde_json::from_slice(text).map_err(|e| format!("not a kms-sidecar keyfile ({e})"))?;
    if file.kms_sidecar_keyfile != FILE_VERSION {
        return Err(format!(
            "unsupported keyfile version {}",
            file.kms_sidecar_keyfile
        ));
    }
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    match (file.key, file.kdf, file.sealed_key) {
        (Some(plain), None, None) => {
            let raw = Zeroizing::new(
                B64.decode(plain.expose_secret().as_bytes())
                    .map_err(|_| "key is not valid base64".to_string())?,
            );
            if raw.len() != KEY_LEN {
                return Err("key must be 32 bytes".into());
            }
            key.copy_from_slice(&raw);
        }
        (None, Some(kdf), Some(sealed)) => {
            let passphrase = passphrase
                .ok_or("the keyfile is sealed: a passphrase is required (--passphrase-env / root passphrase_env)")?;
            if kdf.alg != "argon2id" {
                return Err(format!("unsupported kdf {:?}", kdf.alg));
            }
            let salt = B64
                .decode(kdf.salt.as_bytes())
                .map_err(|_| "kdf salt is not valid base64")?;
            let sealed = B64
                .decode(sealed.as_bytes())
                .map_err(|_| "sealed_key is not valid base64")?;
            if sealed.len() != NONCE_LEN + KEY_LEN + TAG_LEN {
                return Err("sealed_key has the wrong length".into());
            }
            let kek = stretch(passphrase, &salt, kdf.params)?;
            let cipher = Aes256Gcm::new_from_slice(kek.as_slice()).map_err(|_| "bad kek")?;
            let (nonce, rest) = sealed.split_at(NONCE_LEN);
            let (ct, tag) = rest.split_at(KEY_LEN);
            key.copy_from_slice(ct);
            let nonce = Nonce::try_from(nonce).map_err(|_| "bad nonce")?;
            let tag = Tag::try_from(tag).map_err(|_| "bad tag")?;
            cipher
                .decrypt_inout_detached(&nonce, SEAL_AAD, key.as_mut_slice().into(), &tag)
                .map_err(|_| "wrong passphrase or damaged keyfile")?;
        }
        _ => {
            return Err(
                "a keyfile holds either `key`, or `kdf` with `sealed_key`, and nothing else".into(),
            );
        }
    }
    Ok(key)
}

fn stretch(
    passphrase: &SecretString,
    salt: &[u8],
    params: KdfParams,
) -> Result<Zeroizing<[u8; KEY_LEN]>, String> {
    // Bounds keep a damaged or hostile file from exhausting memory or time at start.
    if params.m_kib > 4 * 1024 * 1024 || params.t > 64 || params.p > 16 {
        return Err("argon2id parameters out of range (m_kib <= 4 GiB, t <= 64, p <= 16)".into());
    }
    let params = Params::new(params.m_kib, params.t, params.p, Some(KEY_LEN))
        .map_err(|e| format!("bad argon2id parameters: {e}"))?;
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(
            passphrase.expose_secret().as_bytes(),
            salt,
            out.as_mut_slice(),
        )
        .map_err(|e| format!("argon2id failed: {e}"))?;
    Ok(out)
}

/// Builds the JSON of a new keyfile holding a fresh random root key.
pub fn new_keyfile_json(
    passphrase: Option<&SecretString>,
    params: KdfParams,
) -> Result<Zeroizing<String>, String> {
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    fill_random(key.as_mut_slice()).map_err(|e| e.to_string())?;
    let file = match passphrase {
        None => KeyfileJson {
            kms_sidecar_keyfile: FILE_VERSION,
            key: Some(SecretString::from(B64.encode(key.as_slice()))),
            kdf: None,
            sealed_key: None,
        },
        Some(pass) => {
            if pass.expose_secret().is_empty() {
                return Err("the passphrase is empty".into());
            }
            let mut salt = [0u8; SALT_LEN];
            let mut nonce = [0u8; NONCE_LEN];
            fill_random(&mut salt).map_err(|e| e.to_string())?;
            fill_random(&mut nonce).map_err(|e| e.to_string())?;
            let kek = stretch(pass, &salt, params)?;
            let cipher = Aes256Gcm::new_from_slice(kek.as_slice()).map_err(|_| "bad kek")?;
            let mut ct = Zeroizing::new(key.to_vec());
            let tag = cipher
                .encrypt_inout_detached(&Nonce::from(nonce), SEAL_AAD, ct.as_mut_slice().into())
                .map_err(|_| "sealing failed")?;
            let mut sealed = nonce.to_vec();
            sealed.extend_from_slice(&ct);
            sealed.extend_from_slice(&tag);
            KeyfileJson {
                kms_sidecar_keyfile: FILE_VERSION,
                key: None,
                kdf: Some(KdfJson {
                    alg: "argon2id".into(),
                    params,
                    salt: B64.encode(salt),
                }),
                sealed_key: Some(B64.encode(sealed)),
            }
        }
    };
    let mut text = Zeroizing::new(json_of(&file)?);
    text.push('\n');
    Ok(text)
}

/// `SecretString` deliberately has no `Serialize`, so the one place that writes a plain root key
/// builds its JSON by hand from the exposed value.
fn json_of(file: &KeyfileJson) -> Result<String, String> {
    let mut obj = serde_json::Map::new();
    obj.insert(
        "kms_sidecar_keyfile".into(),
        file.kms_sidecar_keyfile.into(),
    );
    if let Some(key) = &file.key {
        obj.insert("key".into(), key.expose_secret().into());
    }
    if let Some(kdf) = &file.kdf {
        obj.insert(
            "kdf".into(),
            serde_json::to_value(kdf).map_err(|e| e.to_string())?,
        );
    }
    if let Some(sealed) = &file.sealed_key {
        obj.insert("sealed_key".into(), sealed.as_str().into());
    }
    serde_json::to_string(&obj).map_err(|e| e.to_string())
}

/// Writes a new keyfile at `path` with mode 0600. Refuses to overwrite an existing file.
pub fn create_keyfile(
    path: &Path,
    passphrase: Option<&SecretString>,
    params: KdfParams,
) -> Result<(), String> {
    let text = new_keyfile_json(passphrase, params)?;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[async_trait]
impl RootProvider for KeyfileRoot {
    fn id(&self) -> &RootId {
        &self.id
    }

    async fn wrap(
        &self,
        dek: &crate::crypto::DataKey,
        ctx: &WrapContext<'_>,
    ) -> Result<Vec<u8>, ProviderError> {
        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce)?;
        let mut blob = Vec::with_capacity(BLOB_LEN);
        blob.push(BLOB_FORMAT_V1);
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(dek.expose());
        let tag = self
            .cipher
            .encrypt_inout_detached(
                &Nonce::from(nonce),
                &ctx.aad(),
                (&mut blob[1 + NONCE_LEN..]).into(),
            )
            .map_err(|_| ProviderError::Setup("keyfile wrap failed".into()))?;
        blob.extend_from_slice(&tag);
        Ok(blob)
    }

    async fn unwrap(&self, blob: &[u8], ctx: &WrapContext<'_>) -> Result<DataKey, ProviderError> {
        let failed = || ProviderError::UnwrapFailed {
            root: self.id.to_string(),
        };
        let parts = parse_blob(blob).ok_or_else(failed)?;
        let mut key = Zeroizing::new(*parts.encrypted_key);
        self.cipher
            .decrypt_inout_detached(
                &Nonce::from(*parts.nonce),
                &ctx.aad(),
                key.as_mut_slice().into(),
                &Tag::from(*parts.tag),
            )
            .map_err(|_| failed())?;
        Ok(DataKey::from_slice(key.as_slice())?)
    }

    async fn health(&self) -> Result<(), ProviderError> {
        Ok(())
    }
}

/// The parts of a keyfile-wrapped blob.
pub struct BlobParts<'a> {
    pub nonce: &'a [u8; NONCE_LEN],
    pub encrypted_key: &'a [u8; KEY_LEN],
    pub tag: &'a [u8; TAG_LEN],
}

/// Parses a keyfile-wrapped blob: exactly 61 bytes of format 1. Total, never panics.
pub fn parse_blob(blob: &[u8]) -> Option<BlobParts<'_>> {
    let (&format, rest) = blob.split_first()?;
    if format != BLOB_FORMAT_V1 || rest.len() != NONCE_LEN + KEY_LEN + TAG_LEN {
        return None;
    }
    let (nonce, rest) = rest.split_at(NONCE_LEN);
    let (encrypted_key, tag) = rest.split_at(KEY_LEN);
    Some(BlobParts {
        nonce: nonce.try_into().ok()?,
        encrypted_key: encrypted_key.try_into().ok()?,
        tag: tag.try_into().ok()?,
    })
}

#[cfg(test)]
#[path = "keyfile_tests.rs"]
mod tests;
