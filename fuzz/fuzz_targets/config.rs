//! The configuration parser and validator on arbitrary text: an error or a config, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(c) = kms_sidecar::config::Config::from_toml_str("fuzz", text, Vec::new()) {
        let _ = c.principals();
        let _ = c.limits();
        let _ = c.audit_options();
    }
});
