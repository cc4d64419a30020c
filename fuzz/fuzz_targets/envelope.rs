//! Envelope parser and open on arbitrary bytes: must never panic, and must never open anything
//! not sealed under the fixed key (the fuzzer cannot forge a tag).
#![no_main]

use kms_sidecar::crypto::envelope::{self, Envelope, Purpose, SealContext};
use kms_sidecar::crypto::DataKey;
use kms_sidecar::tenant::TenantId;
use libfuzzer_sys::fuzz_target;
use kms_sidecar::crypto::SecretVec;

fuzz_target!(|data: &[u8]| {
    let key = DataKey::from_slice(&[7; 32]).unwrap();
    let tenant = TenantId::parse("fuzz").unwrap();
    let ctx = SealContext { tenant: &tenant, purpose: Purpose::Data, aad: b"" };
    // The in-place open (octet-stream and JSON open) on the same bytes: never opens either.
    assert!(
        envelope::open_owned(&key, &ctx, SecretVec::from(data.to_vec())).is_err(),
        "a random input opened in place"
    );
    let Ok(env) = Envelope::parse(data) else {
        return;
    };
    assert!(env.key_version() != 0);
    assert_eq!(env.plaintext_len() + 86, data.len());
    assert!(env.open(&key, &ctx).is_err(), "a random input opened");
});
