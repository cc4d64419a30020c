//! The primitives under the envelope, checked against Google's Wycheproof vectors:
//! AES-256-GCM (96-bit nonce, 128-bit tag) from both ring (the envelope) and RustCrypto (the
//! keyfile root), and HKDF-SHA256.

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use hkdf::Hkdf;
use sha2::Sha256;
use wycheproof::TestResult;

/// (key, nonce, aad, plaintext) -> (ciphertext, tag).
type Encrypt = fn(&[u8], &[u8], &[u8], &[u8]) -> (Vec<u8>, Vec<u8>);
/// (key, nonce, aad, ciphertext, tag) -> plaintext if authentic.
type Decrypt = fn(&[u8], &[u8], &[u8], &[u8], &[u8]) -> Option<Vec<u8>>;

fn check_aes_256_gcm(encrypt: Encrypt, decrypt: Decrypt) {
    let set = wycheproof::aead::TestSet::load(wycheproof::aead::TestName::AesGcm).unwrap();
    let mut checked = 0;
    for group in set.test_groups {
        if group.key_size != 256 || group.nonce_size != 96 || group.tag_size != 128 {
            continue;
        }
        for t in group.tests {
            let (ct, tag) = encrypt(&t.key, &t.nonce, &t.aad, &t.pt);
            let matches = ct == *t.ct && tag == *t.tag;
            let opened = decrypt(&t.key, &t.nonce, &t.aad, &t.ct, &t.tag);
            match t.result {
                TestResult::Valid => {
                    assert!(matches, "tc {} encrypt", t.tc_id);
                    assert_eq!(opened.as_deref(), Some(&t.pt[..]), "tc {} decrypt", t.tc_id);
                }
                TestResult::Invalid => assert!(opened.is_none(), "tc {} must not decrypt", t.tc_id),
                TestResult::Acceptable => {}
            }
            checked += 1;
        }
    }
    assert!(checked > 50, "only {checked} AES-256-GCM vectors");
}

/// RustCrypto's AES-GCM: the keyfile root's wrapping of data keys.
#[test]
fn aes_256_gcm_matches_wycheproof() {
    check_aes_256_gcm(
        |key, nonce, aad, pt| {
            let cipher = Aes256Gcm::new_from_slice(key).unwrap();
            let nonce = Nonce::try_from(nonce).unwrap();
            let mut buf = pt.to_vec();
            let tag = cipher
                .encrypt_inout_detached(&nonce, aad, buf.as_mut_slice().into())
                .unwrap();
            (buf, tag.to_vec())
        },
        |key, nonce, aad, ct, tag| {
            let cipher = Aes256Gcm::new_from_slice(key).unwrap();
            let nonce = Nonce::try_from(nonce).unwrap();
            let tag = Tag::try_from(tag).unwrap();
            let mut buf = ct.to_vec();
            cipher
                .decrypt_inout_detached(&nonce, aad, buf.as_mut_slice().into(), &tag)
                .ok()
                .map(|()| buf)
        },
    );
}

/// ring's AES-GCM: the envelope's cipher.
#[test]
fn ring_aes_256_gcm_matches_wycheproof() {
    use ring::aead::{
        AES_256_GCM, Aad, LessSafeKey, Nonce as RingNonce, Tag as RingTag, UnboundKey,
    };
    fn key(k: &[u8]) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, k).unwrap())
    }
    check_aes_256_gcm(
        |k, nonce, aad, pt| {
            let mut buf = pt.to_vec();
            let tag = key(k)
                .seal_in_place_separate_tag(
                    RingNonce::try_assume_unique_for_key(nonce).unwrap(),
                    Aad::from(aad),
                    &mut buf,
                )
                .unwrap();
            (buf, tag.as_ref().to_vec())
        },
        |k, nonce, aad, ct, tag| {
            let mut buf = ct.to_vec();
            let len = key(k)
                .open_in_place_separate_tag(
                    RingNonce::try_assume_unique_for_key(nonce).unwrap(),
                    Aad::from(aad),
                    RingTag::try_from(tag).unwrap(),
                    &mut buf,
                    0..,
                )
                .ok()?
                .len();
            buf.truncate(len);
            Some(buf)
        },
    );
}

#[test]
fn hkdf_sha256_matches_wycheproof() {
    let set = wycheproof::hkdf::TestSet::load(wycheproof::hkdf::TestName::HkdfSha256).unwrap();
    let mut checked = 0;
    for group in set.test_groups {
        for t in group.tests {
            let hk = Hkdf::<Sha256>::new(Some(&t.salt), &t.ikm);
            let mut okm = vec![0u8; t.size];
            let ok = hk.expand(&t.info, &mut okm).is_ok();
            match t.result {
                TestResult::Valid => assert!(ok && okm == *t.okm, "tc {}", t.tc_id),
                TestResult::Invalid => assert!(!ok, "tc {} must fail", t.tc_id),
                TestResult::Acceptable => {}
            }
            checked += 1;
        }
    }
    assert!(checked > 50, "only {checked} HKDF vectors");
}
