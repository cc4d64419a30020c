//! The primitives under the envelope, checked against Google's Wycheproof vectors:
//! AES-256-GCM (96-bit nonce, 128-bit tag) and HKDF-SHA256.

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use hkdf::Hkdf;
use sha2::Sha256;
use wycheproof::TestResult;

#[test]
fn aes_256_gcm_matches_wycheproof() {
    let set = wycheproof::aead::TestSet::load(wycheproof::aead::TestName::AesGcm).unwrap();
    let mut checked = 0;
    for group in set.test_groups {
        if group.key_size != 256 || group.nonce_size != 96 || group.tag_size != 128 {
            continue;
        }
        for t in group.tests {
            let cipher = Aes256Gcm::new_from_slice(&t.key).unwrap();
            let nonce = Nonce::try_from(&t.nonce[..]).unwrap();
            let mut buf = t.pt.to_vec();
            let tag = cipher
                .encrypt_inout_detached(&nonce, &t.aad, buf.as_mut_slice().into())
                .unwrap();
            let matches = buf == *t.ct && tag.as_slice() == &t.tag[..];
            let mut opened = t.ct.to_vec();
            let tag_in = Tag::try_from(&t.tag[..]).unwrap();
            let decrypted = cipher
                .decrypt_inout_detached(&nonce, &t.aad, opened.as_mut_slice().into(), &tag_in)
                .is_ok();
            match t.result {
                TestResult::Valid => {
                    assert!(matches, "tc {} encrypt", t.tc_id);
                    assert!(decrypted && opened == *t.pt, "tc {} decrypt", t.tc_id);
                }
                TestResult::Invalid => assert!(!decrypted, "tc {} must not decrypt", t.tc_id),
                TestResult::Acceptable => {}
            }
            checked += 1;
        }
    }
    assert!(checked > 50, "only {checked} AES-256-GCM vectors");
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
