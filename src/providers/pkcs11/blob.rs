//! The PKCS#11 root's wrapped-key blob: one codec for both formats, and the context binding used
//! with AES key wrap (which has no AAD). Pure: no PKCS#11 calls, no I/O. Layout: docs/envelope.md.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::crypto::DataKey;
use crate::crypto::keys::KEY_LEN;

/// Format byte of a blob wrapped with CKM_AES_GCM.
pub const FORMAT_GCM: u8 = 0x01;
/// Format byte of a blob wrapped with CKM_AES_KEY_WRAP_PAD.
pub const FORMAT_KWP: u8 = 0x02;
/// GCM IV length: 96 bits, the only length every token supports.
pub const GCM_IV_LEN: usize = 12;
/// GCM tag length: 128 bits.
pub const GCM_TAG_LEN: usize = 16;
/// What KWP wraps: the DEK followed by SHA-256 of the wrap context.
pub const KWP_PLAIN_LEN: usize = KEY_LEN + 32;
/// RFC 5649 output for a 64-byte input: the input (already a multiple of 8) plus one 8-byte block.
pub const KWP_WRAPPED_LEN: usize = KWP_PLAIN_LEN + 8;
/// `format | iv | encrypted DEK | tag`.
pub const GCM_BLOB_LEN: usize = 1 + GCM_IV_LEN + KEY_LEN + GCM_TAG_LEN;
/// `format | RFC 5649 output`.
pub const KWP_BLOB_LEN: usize = 1 + KWP_WRAPPED_LEN;

/// How a DEK is wrapped inside the token. Stored as the blob's first byte, so unwrap picks the
/// mechanism the blob was made with, whatever the root is configured to wrap with today.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WrapMechanism {
    /// CKM_AES_GCM with the wrap context as AAD.
    AesGcm,
    /// CKM_AES_KEY_WRAP_PAD (RFC 5649) over `DEK || SHA-256(context)`.
    AesKeyWrapPad,
}

impl WrapMechanism {
    pub fn format(self) -> u8 {
        match self {
            WrapMechanism::AesGcm => FORMAT_GCM,
            WrapMechanism::AesKeyWrapPad => FORMAT_KWP,
        }
    }

    /// The config spelling, also used in messages.
    pub fn name(self) -> &'static str {
        match self {
            WrapMechanism::AesGcm => "aes-gcm",
            WrapMechanism::AesKeyWrapPad => "aes-key-wrap-pad",
        }
    }

    /// The PKCS#11 name, for messages to operators.
    pub fn ckm(self) -> &'static str {
        match self {
            WrapMechanism::AesGcm => "CKM_AES_GCM",
            WrapMechanism::AesKeyWrapPad => "CKM_AES_KEY_WRAP_PAD",
        }
    }
}

/// A parsed blob, borrowing from the bytes it was parsed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blob<'a> {
    Gcm {
        iv: &'a [u8; GCM_IV_LEN],
        /// The encrypted DEK followed by the tag, as C_Decrypt takes them.
        ciphertext_and_tag: &'a [u8; KEY_LEN + GCM_TAG_LEN],
    },
    Kwp {
        wrapped: &'a [u8; KWP_WRAPPED_LEN],
    },
}

impl<'a> Blob<'a> {
    /// Parses a blob. Total and strict: an unknown format byte or any length other than the
    /// format's exact length is rejected.
    pub fn parse(bytes: &'a [u8]) -> Option<Blob<'a>> {
        let (&format, rest) = bytes.split_first()?;
        match format {
            FORMAT_GCM => {
                let (iv, ct) = rest.split_at_checked(GCM_IV_LEN)?;
                Some(Blob::Gcm {
                    iv: iv.try_into().ok()?,
                    ciphertext_and_tag: ct.try_into().ok()?,
                })
            }
            FORMAT_KWP => Some(Blob::Kwp {
                wrapped: rest.try_into().ok()?,
            }),
            _ => None,
        }
    }

    pub fn mechanism(&self) -> WrapMechanism {
        match self {
            Blob::Gcm { .. } => WrapMechanism::AesGcm,
            Blob::Kwp { .. } => WrapMechanism::AesKeyWrapPad,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        match self {
            Blob::Gcm {
                iv,
                ciphertext_and_tag,
            } => {
                let mut out = Vec::with_capacity(GCM_BLOB_LEN);
                out.push(FORMAT_GCM);
                out.extend_from_slice(&iv[..]);
                out.extend_from_slice(&ciphertext_and_tag[..]);
                out
            }
            Blob::Kwp { wrapped } => {
                let mut out = Vec::with_capacity(KWP_BLOB_LEN);
                out.push(FORMAT_KWP);
                out.extend_from_slice(&wrapped[..]);
                out
            }
        }
    }
}

/// Builds a GCM blob from the IV the token used and what C_Encrypt returned; `None` if the token
/// returned something other than exactly the encrypted DEK and a 128-bit tag.
pub fn gcm_blob(iv: &[u8; GCM_IV_LEN], output: &[u8]) -> Option<Vec<u8>> {
    Some(
        Blob::Gcm {
            iv,
            ciphertext_and_tag: output.try_into().ok()?,
        }
        .encode(),
    )
}

/// Builds a KWP blob from what C_Encrypt returned; `None` on an unexpected length.
pub fn kwp_blob(output: &[u8]) -> Option<Vec<u8>> {
    Some(
        Blob::Kwp {
            wrapped: output.try_into().ok()?,
        }
        .encode(),
    )
}

/// What KWP encrypts: `DEK || SHA-256(aad)`. Key wrap has no associated data, so the hash of the
/// wrap context inside the wrapped bytes is what binds the blob to its tenant, version and purpose.
pub fn kwp_plaintext(dek: &DataKey, aad: &[u8]) -> Zeroizing<[u8; KWP_PLAIN_LEN]> {
    let mut out = Zeroizing::new([0u8; KWP_PLAIN_LEN]);
    out[..KEY_LEN].copy_from_slice(dek.expose());
    out[KEY_LEN..].copy_from_slice(&Sha256::digest(aad));
    out
}

/// Checks what KWP decrypted against the expected context, in constant time, and returns the
/// DEK. `None` for a wrong length or another context.
pub fn kwp_open(plain: &[u8], aad: &[u8]) -> Option<DataKey> {
    if plain.len() != KWP_PLAIN_LEN {
        return None;
    }
    let (dek, hash) = plain.split_at(KEY_LEN);
    let expected = Sha256::digest(aad);
    if !bool::from(hash.ct_eq(expected.as_slice())) {
        return None;
    }
    DataKey::from_slice(dek).ok()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn lengths_are_the_documented_ones() {
        assert_eq!(GCM_BLOB_LEN, 61);
        assert_eq!(KWP_BLOB_LEN, 73);
    }

    #[test]
    fn gcm_blob_round_trips() {
        let iv = [7u8; GCM_IV_LEN];
        let out = [9u8; KEY_LEN + GCM_TAG_LEN];
        let bytes = gcm_blob(&iv, &out).unwrap();
        assert_eq!(bytes.len(), GCM_BLOB_LEN);
        assert_eq!(bytes[0], FORMAT_GCM);
        let parsed = Blob::parse(&bytes).unwrap();
        assert_eq!(parsed.mechanism(), WrapMechanism::AesGcm);
        assert_eq!(
            parsed,
            Blob::Gcm {
                iv: &iv,
                ciphertext_and_tag: &out
            }
        );
        assert_eq!(parsed.encode(), bytes);
    }

    #[test]
    fn kwp_blob_round_trips() {
        let out = [3u8; KWP_WRAPPED_LEN];
        let bytes = kwp_blob(&out).unwrap();
        assert_eq!(bytes.len(), KWP_BLOB_LEN);
        assert_eq!(bytes[0], FORMAT_KWP);
        let parsed = Blob::parse(&bytes).unwrap();
        assert_eq!(parsed.mechanism(), WrapMechanism::AesKeyWrapPad);
        assert_eq!(parsed.encode(), bytes);
    }

    #[test]
    fn parse_rejects_unknown_formats_and_wrong_lengths() {
        assert_eq!(Blob::parse(&[]), None);
        for format in [0x00, 0x03, 0xff] {
            assert_eq!(Blob::parse(&[format; GCM_BLOB_LEN]), None);
            assert_eq!(Blob::parse(&[format; KWP_BLOB_LEN]), None);
        }
        let mut gcm = vec![FORMAT_GCM; GCM_BLOB_LEN];
        assert!(Blob::parse(&gcm).is_some());
        gcm.push(0);
        assert_eq!(Blob::parse(&gcm), None, "trailing byte");
        gcm.truncate(GCM_BLOB_LEN - 1);
        assert_eq!(Blob::parse(&gcm), None, "truncated");
        let mut kwp = vec![FORMAT_KWP; KWP_BLOB_LEN];
        assert!(Blob::parse(&kwp).is_some());
        kwp.push(0);
        assert_eq!(Blob::parse(&kwp), None, "trailing byte");
        // A GCM-length blob with the KWP format byte, and the other way round.
        assert_eq!(Blob::parse(&[&[FORMAT_KWP][..], &[0; 60]].concat()), None);
        assert_eq!(Blob::parse(&[&[FORMAT_GCM][..], &[0; 72]].concat()), None);
    }

    #[test]
    fn builders_refuse_unexpected_token_output() {
        assert_eq!(gcm_blob(&[0; GCM_IV_LEN], &[0; 47]), None);
        assert_eq!(gcm_blob(&[0; GCM_IV_LEN], &[0; 49]), None);
        assert_eq!(kwp_blob(&[0; 71]), None);
        assert_eq!(kwp_blob(&[0; 73]), None);
    }

    #[test]
    fn kwp_binding_opens_only_for_the_same_context() {
        let dek = DataKey::from_slice(&[0x42; 32]).unwrap();
        let plain = kwp_plaintext(&dek, b"ctx-a");
        assert_eq!(&plain[..KEY_LEN], dek.expose());
        assert_eq!(kwp_open(&plain[..], b"ctx-a").unwrap(), dek);
        assert!(kwp_open(&plain[..], b"ctx-b").is_none());
        assert!(kwp_open(&plain[..KWP_PLAIN_LEN - 1], b"ctx-a").is_none());
        let mut flipped = *plain;
        flipped[40] ^= 1;
        assert!(kwp_open(&flipped, b"ctx-a").is_none());
    }

    /// A software RFC 5649 wrap stands in for the token: what it outputs for `DEK || hash` must
    /// be exactly the KWP blob body, and the blob must open only for its own context.
    #[test]
    fn kwp_blob_carries_an_rfc5649_wrap_and_binds_the_context() {
        use aes_kw::KeyInit;
        let kek = aes_kw::KwpAes256::new_from_slice(&[0x11; 32]).unwrap();
        let dek = DataKey::from_slice(&[0x42; 32]).unwrap();
        let mut wrapped = [0u8; KWP_WRAPPED_LEN];
        let out = kek
            .wrap_key(&kwp_plaintext(&dek, b"ctx-a")[..], &mut wrapped)
            .unwrap();
        let bytes = kwp_blob(out).expect("RFC 5649 output of 64 bytes is 72 bytes");
        let Some(Blob::Kwp { wrapped }) = Blob::parse(&bytes) else {
            panic!("not a KWP blob");
        };
        let mut plain = [0u8; KWP_WRAPPED_LEN];
        let plain = kek.unwrap_key(&wrapped[..], &mut plain).unwrap();
        assert_eq!(kwp_open(plain, b"ctx-a").unwrap(), dek);
        assert!(
            kwp_open(plain, b"ctx-b").is_none(),
            "moved to another context"
        );
        for i in 1..bytes.len() {
            let mut tampered = bytes.clone();
            tampered[i] ^= 0x80;
            let Some(Blob::Kwp { wrapped }) = Blob::parse(&tampered) else {
                panic!("still a KWP blob");
            };
            let mut buf = [0u8; KWP_WRAPPED_LEN];
            assert!(kek.unwrap_key(&wrapped[..], &mut buf).is_err(), "byte {i}");
        }
    }

    proptest! {
        #[test]
        fn parse_is_total_and_encode_inverts_it(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            if let Some(blob) = Blob::parse(&bytes) {
                prop_assert_eq!(blob.encode(), bytes.clone());
                let expected_len = match blob.mechanism() {
                    WrapMechanism::AesGcm => GCM_BLOB_LEN,
                    WrapMechanism::AesKeyWrapPad => KWP_BLOB_LEN,
                };
                prop_assert_eq!(bytes.len(), expected_len);
                prop_assert_eq!(bytes[0], blob.mechanism().format());
            }
        }

        #[test]
        fn kwp_binding_rejects_any_other_context(
            key in proptest::array::uniform32(any::<u8>()),
            a in proptest::collection::vec(any::<u8>(), 0..64),
            b in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let dek = DataKey::from_slice(&key).unwrap();
            let plain = kwp_plaintext(&dek, &a);
            prop_assert!(kwp_open(&plain[..], &a).is_some());
            prop_assert_eq!(kwp_open(&plain[..], &b).is_some(), a == b);
        }
    }
}
