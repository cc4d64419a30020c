//! Property tests of the vault itself (key ring, SQLite store, formats together): every format
//! round-trips generated values of its shape; deterministic tokens are stable per tenant.

use std::sync::{Arc, LazyLock};

use kms_sidecar::keyring::{Keyring, KeyringOptions, KeyringStore};
use kms_sidecar::providers::RootProvider;
use kms_sidecar::providers::keyfile::KeyfileRoot;
use kms_sidecar::store::SqliteStore;
use kms_sidecar::tenant::TenantId;
use kms_sidecar::vault::format::Format;
use kms_sidecar::vault::{TokenizeItem, Vault, VaultStore};
use proptest::prelude::*;
use zeroize::Zeroizing;

struct World {
    rt: tokio::runtime::Runtime,
    vault: Vault,
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
    let root: Arc<dyn RootProvider> = Arc::new(KeyfileRoot::from_key(&[5; 32]).unwrap());
    let ks: Arc<dyn KeyringStore> = store.clone();
    let options = KeyringOptions {
        auto_create_tenants: true,
        ..KeyringOptions::default()
    };
    let keyring = Keyring::new(ks, vec![root], options).unwrap();
    let vs: Arc<dyn VaultStore> = store;
    World {
        rt,
        vault: Vault::new(keyring, vs),
        _dir: dir,
    }
});

fn round_trip(tenant: &str, value: &str, format: Format, deterministic: bool) -> (String, String) {
    let w = &*WORLD;
    let t = TenantId::parse(tenant).unwrap();
    let item = TokenizeItem {
        value: Zeroizing::new(value.to_owned()),
        format,
        deterministic,
        ttl: None,
    };
    let issued =
        w.rt.block_on(w.vault.tokenize(&t, vec![item]))
            .unwrap()
            .pop()
            .unwrap()
            .unwrap();
    let revealed =
        w.rt.block_on(
            w.vault
                .reveal(&t, std::slice::from_ref(&issued.token), false),
        )
        .unwrap();
    let value = revealed.into_iter().next().unwrap().unwrap();
    (issued.token, value.to_string())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn opaque_round_trips(v in "\\PC{1,200}", det in any::<bool>()) {
        let (token, back) = round_trip("props", &v, Format::Opaque, det);
        prop_assert_eq!(back, v);
        prop_assert!(token.starts_with("tok_"));
    }

    #[test]
    fn digits_round_trip(v in "[0-9]{6,30}", det in any::<bool>()) {
        let (token, back) = round_trip("props", &v, Format::Digits, det);
        prop_assert_eq!(token.len(), v.len());
        prop_assert_eq!(back, v);
    }

    #[test]
    fn cards_round_trip_to_their_digits(v in "[0-9]{4}[ -]?[0-9]{4}[ -]?[0-9]{4}[ -]?[0-9]{4}") {
        let digits: String = v.chars().filter(char::is_ascii_digit).collect();
        let (token, back) = round_trip("props", &v, Format::Card, false);
        prop_assert_eq!(&token[12..], &digits[12..]);
        prop_assert_eq!(back, digits);
    }

    #[test]
    fn emails_round_trip(local in "[a-z0-9._+-]{1,30}", domain in "[a-z0-9-]{1,20}\\.[a-z]{2,6}", keep in any::<bool>()) {
        let v = format!("{local}@{domain}");
        let (token, back) = round_trip("props", &v, Format::Email { keep_domain: keep }, false);
        prop_assert_eq!(token.ends_with(&format!("@{domain}")), keep);
        prop_assert_eq!(back, v);
    }

    #[test]
    fn deterministic_tokens_are_stable_per_tenant_and_differ_across(v in "[0-9]{9}") {
        let (a, _) = round_trip("det-a", &v, Format::Digits, true);
        let (a2, _) = round_trip("det-a", &v, Format::Digits, true);
        let (b, _) = round_trip("det-b", &v, Format::Digits, true);
        prop_assert_eq!(&a, &a2);
        prop_assert_ne!(a, b);
    }
}
