//! Token formats on arbitrary values and byte streams: normalise and make never panic, and a
//! token is never the value itself and keeps its format's shape.
#![no_main]

use kms_sidecar::vault::format::{Format, TokenBytes, luhn_valid, make_token, normalize};
use libfuzzer_sys::fuzz_target;

/// Replays the fuzzer's bytes as the token byte source (cycling, so it never runs dry).
struct Replay<'a>(&'a [u8], usize);

impl TokenBytes for Replay<'_> {
    fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            *b = if self.0.is_empty() { self.1 as u8 } else { self.0[self.1 % self.0.len()].wrapping_add((self.1 / self.0.len()) as u8) };
            self.1 += 1;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let split = rest.len() / 2;
    let (value, stream) = rest.split_at(split);
    let Ok(value) = std::str::from_utf8(value) else { return };
    let format = match selector % 5 {
        0 => Format::Opaque,
        1 => Format::Digits,
        2 => Format::Card,
        3 => Format::Email { keep_domain: true },
        _ => Format::Email { keep_domain: false },
    };
    let Ok(norm) = normalize(format, value) else { return };
    let token = make_token(format, &norm, &mut Replay(stream, 0));
    assert_ne!(token, norm);
    match format {
        Format::Digits => assert!(token.len() == norm.len() && token.bytes().all(|b| b.is_ascii_digit())),
        Format::Card => {
            let digits: Vec<u8> = token.bytes().map(|b| b - b'0').collect();
            assert!(luhn_valid(&digits));
            assert_eq!(&token[token.len() - 4..], &norm[norm.len() - 4..]);
        }
        Format::Opaque => assert!(token.starts_with("tok_")),
        Format::Email { .. } => assert!(token.contains('@')),
    }
});
