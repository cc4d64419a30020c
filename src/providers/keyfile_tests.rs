use proptest::prelude::*;
use secrecy::SecretString;

use super::*;
use crate::providers::WrapPurpose;
use crate::tenant::TenantId;

/// Small Argon2 costs keep the unit tests fast; production files use `KdfParams::default()`.
const CHEAP: KdfParams = KdfParams {
    m_kib: 64,
    t: 1,
    p: 1,
};

fn ctx(t: &TenantId, v: u32) -> WrapContext<'_> {
    WrapContext {
        tenant: t,
        key_version: v,
        purpose: WrapPurpose::TenantDek,
    }
}

fn root(b: u8) -> KeyfileRoot {
    KeyfileRoot::from_key(&[b; 32]).unwrap()
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn wrap_then_unwrap_round_trips_and_blob_is_61_bytes() {
    let t = TenantId::parse("acme").unwrap();
    let dek = DataKey::generate().unwrap();
    let r = root(1);
    let blob = block_on(r.wrap(&dek, &ctx(&t, 1))).unwrap();
    assert_eq!(blob.len(), BLOB_LEN);
    assert_eq!(BLOB_LEN, 61);
    assert_ne!(
        &blob[13..45],
        dek.expose(),
        "the key must not appear in clear"
    );
    assert_eq!(block_on(r.unwrap(&blob, &ctx(&t, 1))).unwrap(), dek);
}

#[test]
fn unwrap_fails_for_another_tenant_version_or_root() {
    let t = TenantId::parse("acme").unwrap();
    let other = TenantId::parse("acme2").unwrap();
    let dek = DataKey::generate().unwrap();
    let blob = block_on(root(1).wrap(&dek, &ctx(&t, 1))).unwrap();
    let denied = |r: &KeyfileRoot, c: WrapContext<'_>| {
        matches!(
            block_on(r.unwrap(&blob, &c)),
            Err(ProviderError::UnwrapFailed { .. })
        )
    };
    assert!(denied(&root(1), ctx(&other, 1)));
    assert!(denied(&root(1), ctx(&t, 2)));
    assert!(denied(&root(2), ctx(&t, 1)));
}

#[test]
fn root_id_is_stable_and_differs_per_key() {
    assert_eq!(root(1).id(), root(1).id());
    assert_ne!(root(1).id(), root(2).id());
    assert!(root(1).id().as_str().starts_with("keyfile:"));
    assert_eq!(root(1).id().as_str().len(), "keyfile:".len() + 16);
}

#[test]
fn plain_keyfile_round_trips() {
    let json = new_keyfile_json(None, CHEAP).unwrap();
    let a = parse_keyfile(json.as_bytes(), None).unwrap();
    let b = parse_keyfile(json.as_bytes(), None).unwrap();
    assert_eq!(*a, *b);
}

#[test]
fn sealed_keyfile_needs_the_right_passphrase() {
    let pass = SecretString::from("correct horse battery staple");
    let json = new_keyfile_json(Some(&pass), CHEAP).unwrap();
    assert!(
        !json.contains("\"key\""),
        "a sealed file holds no plain key"
    );
    let key = parse_keyfile(json.as_bytes(), Some(&pass)).unwrap();
    assert_eq!(key.len(), 32);
    let wrong = SecretString::from("Correct horse battery staple");
    assert_eq!(
        parse_keyfile(json.as_bytes(), Some(&wrong)).unwrap_err(),
        "wrong passphrase or damaged keyfile"
    );
    assert!(
        parse_keyfile(json.as_bytes(), None)
            .unwrap_err()
            .contains("passphrase is required")
    );
}

#[test]
fn keyfile_errors_never_echo_key_material() {
    let json = new_keyfile_json(None, CHEAP).unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let key = v["key"].as_str().unwrap().to_string();
    let tampered = json.replace(
        "\"kms_sidecar_keyfile\":1",
        "\"kms_sidecar_keyfile\":1,\"x\":1",
    );
    let err = parse_keyfile(tampered.as_bytes(), None).unwrap_err();
    assert!(!err.contains(&key), "{err}");
    for bad in [
        r#"{"kms_sidecar_keyfile":2,"key":"AAAA"}"#,
        r#"{"kms_sidecar_keyfile":1,"key":"AAAA"}"#,
        r#"{"kms_sidecar_keyfile":1,"key":"!!"}"#,
        r#"{"kms_sidecar_keyfile":1}"#,
        "not json",
    ] {
        assert!(parse_keyfile(bad.as_bytes(), None).is_err(), "{bad}");
    }
}

#[test]
fn create_keyfile_writes_mode_0600_and_refuses_to_overwrite() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("root.key");
    create_keyfile(&path, None, CHEAP).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let before = std::fs::read(&path).unwrap();
    assert!(create_keyfile(&path, None, CHEAP).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert!(KeyfileRoot::load(&path, None).is_ok());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    #[test]
    fn parse_blob_is_total_and_strict(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
        let parsed = parse_blob(&bytes).is_some();
        prop_assert_eq!(parsed, bytes.len() == 61 && bytes[0] == 1);
    }

    #[test]
    fn any_flipped_bit_of_a_blob_fails(bit in 0usize..61 * 8) {
        let t = TenantId::parse("acme").unwrap();
        let r = root(7);
        let dek = DataKey::from_slice(&[3; 32]).unwrap();
        let mut blob = block_on(r.wrap(&dek, &ctx(&t, 1))).unwrap();
        blob[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(block_on(r.unwrap(&blob, &ctx(&t, 1))).is_err());
    }
}
