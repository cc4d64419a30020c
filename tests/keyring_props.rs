//! Tampering properties through the key ring itself (store, root, cache and envelope together),
//! 10,000 cases each: every change to a ciphertext or its context is `decrypt_failed`.

use std::sync::{Arc, LazyLock};

use kms_sidecar::api::error::ApiError;
use kms_sidecar::crypto::{Purpose, SecretBytes};
use kms_sidecar::keyring::{Keyring, KeyringError, KeyringOptions};
use kms_sidecar::providers::RootProvider;
use kms_sidecar::providers::keyfile::KeyfileRoot;
use kms_sidecar::store::SqliteStore;
use kms_sidecar::tenant::TenantId;
use proptest::prelude::*;

struct World {
    rt: tokio::runtime::Runtime,
    keyring: Keyring,
    _dir: tempfile::TempDir,
}

static WORLD: LazyLock<World> = LazyLock::new(|| {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("store.db")).unwrap());
    let root: Arc<dyn RootProvider> = Arc::new(KeyfileRoot::from_key(&[9; 32]).unwrap());
    let keyring = Keyring::new(
        store,
        vec![root],
        KeyringOptions {
            auto_create_tenants: true,
            ..KeyringOptions::default()
        },
    )
    .unwrap();
    World {
        rt,
        keyring,
        _dir: dir,
    }
});

fn tenant(i: u8) -> TenantId {
    TenantId::parse(&format!("tenant-{i}")).unwrap()
}

fn seal(t: &TenantId, aad: &[u8], pt: &[u8]) -> Vec<u8> {
    let w = &*WORLD;
    w.rt.block_on(
        w.keyring
            .seal(t, Purpose::Data, aad, SecretBytes::new(pt.to_vec())),
    )
    .unwrap()
    .0
}

/// The stable API code an open ends with.
fn open_code(t: &TenantId, aad: &[u8], ct: &[u8]) -> Result<Vec<u8>, &'static str> {
    let w = &*WORLD;
    w.rt.block_on(w.keyring.open(t, Purpose::Data, aad, ct))
        .map(|p| p.expose().to_vec())
        .map_err(|e: KeyringError| ApiError::from(e).status_and_code().1)
}

fn case() -> impl Strategy<Value = (u8, Vec<u8>, Vec<u8>)> {
    (
        0u8..8,
        proptest::collection::vec(any::<u8>(), 0..32),
        proptest::collection::vec(any::<u8>(), 0..256),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    #[test]
    fn round_trips((t, aad, pt) in case()) {
        let ct = seal(&tenant(t), &aad, &pt);
        prop_assert_eq!(open_code(&tenant(t), &aad, &ct), Ok(pt));
    }

    #[test]
    fn flipped_bit_is_decrypt_failed((t, aad, pt) in case(), bit in any::<prop::sample::Index>()) {
        let mut ct = seal(&tenant(t), &aad, &pt);
        let i = bit.index(ct.len() * 8);
        ct[i / 8] ^= 1 << (i % 8);
        prop_assert_eq!(open_code(&tenant(t), &aad, &ct), Err("decrypt_failed"));
    }

    #[test]
    fn truncation_is_decrypt_failed((t, aad, pt) in case(), cut in any::<prop::sample::Index>()) {
        let ct = seal(&tenant(t), &aad, &pt);
        prop_assert_eq!(open_code(&tenant(t), &aad, &ct[..cut.index(ct.len())]), Err("decrypt_failed"));
    }

    #[test]
    fn extension_is_decrypt_failed((t, aad, pt) in case(), extra in proptest::collection::vec(any::<u8>(), 1..33)) {
        let mut ct = seal(&tenant(t), &aad, &pt);
        ct.extend_from_slice(&extra);
        prop_assert_eq!(open_code(&tenant(t), &aad, &ct), Err("decrypt_failed"));
    }

    #[test]
    fn another_tenant_is_decrypt_failed((t, aad, pt) in case(), shift in 1u8..8) {
        let other = (t + shift) % 8;
        let ct = seal(&tenant(t), &aad, &pt);
        // Make sure the other tenant exists, so the failure is the open, not a missing tenant.
        seal(&tenant(other), b"", b"");
        prop_assert_eq!(open_code(&tenant(other), &aad, &ct), Err("decrypt_failed"));
    }

    #[test]
    fn another_aad_is_decrypt_failed((t, aad, pt) in case(), other in proptest::collection::vec(any::<u8>(), 0..32)) {
        prop_assume!(other != aad);
        let ct = seal(&tenant(t), &aad, &pt);
        prop_assert_eq!(open_code(&tenant(t), &other, &ct), Err("decrypt_failed"));
    }

    #[test]
    fn another_key_version_is_decrypt_failed((t, aad, pt) in case(), v in 2u32..) {
        let mut ct = seal(&tenant(t), &aad, &pt);
        ct[2..6].copy_from_slice(&v.to_be_bytes());
        prop_assert_eq!(open_code(&tenant(t), &aad, &ct), Err("decrypt_failed"));
    }
}
