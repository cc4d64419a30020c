//! PKCS#11-wrapped DEK blobs on arbitrary bytes: the parser is total and strict, and encoding a
//! parsed blob gives back exactly the input.
#![no_main]

use kms_sidecar::providers::pkcs11::blob::Blob;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(blob) = Blob::parse(data) {
        assert_eq!(blob.encode(), data);
    }
});
