//! The audit-line checker on arbitrary text: never panics; a line it accepts carries a hash that
//! matches its content.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else { return };
    let _ = kms_sidecar::audit::check_line(line);
});
