//! Every JSON request body of the API on arbitrary bytes: parsers never panic and errors are
//! the stable `invalid_request` (the hook also checks messages never quote values).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kms_sidecar::api::routes::fuzz_request_bodies(data);
});
