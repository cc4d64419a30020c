//! Keyfile-wrapped DEK blobs on arbitrary bytes: parse is total, and unwrap never succeeds on
//! anything the root did not wrap.
#![no_main]

use std::sync::LazyLock;

use kms_sidecar::providers::keyfile::{KeyfileRoot, parse_blob};
use kms_sidecar::providers::{RootProvider, WrapContext, WrapPurpose};
use kms_sidecar::tenant::TenantId;
use libfuzzer_sys::fuzz_target;

static ROOT: LazyLock<KeyfileRoot> = LazyLock::new(|| KeyfileRoot::from_key(&[3; 32]).unwrap());
static RT: LazyLock<tokio::runtime::Runtime> =
    LazyLock::new(|| tokio::runtime::Builder::new_current_thread().build().unwrap());

fuzz_target!(|data: &[u8]| {
    let parsed = parse_blob(data).is_some();
    assert_eq!(parsed, data.len() == 61 && data[0] == 1);
    let tenant = TenantId::parse("fuzz").unwrap();
    let ctx = WrapContext { tenant: &tenant, key_version: 1, purpose: WrapPurpose::TenantDek };
    assert!(RT.block_on(ROOT.unwrap(data, &ctx)).is_err(), "a random blob unwrapped");
});
