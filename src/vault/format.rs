//! Token formats: pure functions that turn a value and a byte source into a token of the
//! requested shape. No I/O; randomness comes from the caller (the OS CSPRNG for random tokens,
//! an HMAC stream keyed per tenant for deterministic ones).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Shortest digits value accepted: below it, the token space (10^n) is too small to keep
/// tokens unique and unguessable.
pub const MIN_DIGITS: usize = 6;
const OPAQUE_BYTES: usize = 24;
const EMAIL_LOCAL_LEN: usize = 16;
const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// The shape of a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `tok_` and 192 random bits, URL-safe.
    Opaque,
    /// Digits only, as long as the value.
    Digits,
    /// A Luhn-valid card number of the value's length that keeps its last four digits and starts
    /// with 9 (ISO/IEC 7812's national-use range), so it never carries the original issuer's BIN.
    Card,
    /// A random local part at the value's domain (or at a random `.invalid` domain).
    Email { keep_domain: bool },
}

impl Format {
    pub fn name(&self) -> &'static str {
        match self {
            Format::Opaque => "opaque",
            Format::Digits => "digits",
            Format::Card => "card",
            Format::Email { keep_domain: true } => "email",
            Format::Email { keep_domain: false } => "email-domain",
        }
    }

    pub fn from_name(name: &str) -> Option<Format> {
        Some(match name {
            "opaque" => Format::Opaque,
            "digits" => Format::Digits,
            "card" => Format::Card,
            "email" => Format::Email { keep_domain: true },
            "email-domain" => Format::Email { keep_domain: false },
            _ => return None,
        })
    }
}

/// Why a value cannot be tokenized in a format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    SpaceTooSmall(String),
}

/// A source of token bytes.
pub trait TokenBytes {
    fn fill(&mut self, out: &mut [u8]);
}

/// Checks a value against a format and returns its normal form (card separators removed).
pub fn normalize(format: Format, value: &str) -> Result<String, FormatError> {
    match format {
        Format::Opaque => Ok(value.to_owned()),
        Format::Digits => {
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(FormatError::Invalid(
                    "digits values must be digits only".into(),
                ));
            }
            if value.len() < MIN_DIGITS {
                return Err(FormatError::SpaceTooSmall(format!(
                    "digits values need at least {MIN_DIGITS} digits: a shorter token space cannot stay unique"
                )));
            }
            Ok(value.to_owned())
        }
        Format::Card => {
            let digits: String = value.chars().filter(|c| !matches!(c, ' ' | '-')).collect();
            if !digits.bytes().all(|b| b.is_ascii_digit()) || !(13..=19).contains(&digits.len()) {
                return Err(FormatError::Invalid(
                    "card values must be 13 to 19 digits (spaces and dashes allowed)".into(),
                ));
            }
            Ok(digits)
        }
        Format::Email { .. } => {
            let (local, domain) = value
                .rsplit_once('@')
                .ok_or_else(|| FormatError::Invalid("email values need an @".into()))?;
            if local.is_empty() || domain.is_empty() || value.len() > 254 || !domain.contains('.') {
                return Err(FormatError::Invalid("not an email address".into()));
            }
            Ok(value.to_owned())
        }
    }
}

/// Makes a token for a normalised value. Never returns the value itself.
pub fn make_token(format: Format, value: &str, bytes: &mut dyn TokenBytes) -> String {
    loop {
        let token = match format {
            Format::Opaque => {
                let mut raw = [0u8; OPAQUE_BYTES];
                bytes.fill(&mut raw);
                format!("tok_{}", URL_SAFE_NO_PAD.encode(raw))
            }
            Format::Digits => random_digits(value.len(), bytes),
            Format::Card => card(value, bytes),
            Format::Email { keep_domain } => {
                let domain = match value.rsplit_once('@') {
                    Some((_, d)) if keep_domain => d.to_owned(),
                    _ => format!("{}.invalid", random_alnum(12, bytes)),
                };
                format!("{}@{domain}", random_alnum(EMAIL_LOCAL_LEN, bytes))
            }
        };
        if token != value {
            return token;
        }
    }
}

/// The mask of a revealed value: everything but the last four characters as `*`.
pub fn mask_last4(value: &str) -> String {
    let n = value.chars().count();
    value
        .chars()
        .enumerate()
        .map(|(i, c)| if i + 4 < n { '*' } else { c })
        .collect()
}

/// Unbiased digits by rejection sampling.
fn random_digits(n: usize, bytes: &mut dyn TokenBytes) -> String {
    let mut out = String::with_capacity(n);
    let mut buf = [0u8; 32];
    while out.len() < n {
        bytes.fill(&mut buf);
        for b in buf {
            if b < 250 && out.len() < n {
                out.push(char::from(b'0' + b % 10));
            }
        }
    }
    out
}

fn random_alnum(n: usize, bytes: &mut dyn TokenBytes) -> String {
    let mut out = String::with_capacity(n);
    let mut buf = [0u8; 32];
    // 252 = 7 * 36: rejection above keeps the alphabet unbiased.
    while out.len() < n {
        bytes.fill(&mut buf);
        for b in buf {
            if b < 252 && out.len() < n {
                out.push(char::from(ALNUM[usize::from(b % 36)]));
            }
        }
    }
    out
}

/// `9`, random digits, one digit fixed for Luhn, then the value's last four.
fn card(value: &str, bytes: &mut dyn TokenBytes) -> String {
    let n = value.len();
    let last4 = &value[n - 4..];
    let middle = random_digits(n - 6, bytes);
    let mut digits: Vec<u8> = Vec::with_capacity(n);
    digits.push(9);
    digits.extend(middle.bytes().map(|b| b - b'0'));
    digits.push(0); // the Luhn digit, fixed below
    digits.extend(last4.bytes().map(|b| b - b'0'));
    let luhn_at = n - 5;
    for d in 0..10u8 {
        digits[luhn_at] = d;
        if luhn_valid(&digits) {
            break;
        }
    }
    digits.iter().map(|d| char::from(b'0' + d)).collect()
}

/// The Luhn check over decimal digits.
pub fn luhn_valid(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    struct Os;
    impl TokenBytes for Os {
        fn fill(&mut self, out: &mut [u8]) {
            getrandom::fill(out).unwrap();
        }
    }

    fn digits_of(s: &str) -> Vec<u8> {
        s.bytes().map(|b| b - b'0').collect()
    }

    #[test]
    fn luhn_matches_known_numbers() {
        assert!(luhn_valid(&digits_of("4111111111111111")));
        assert!(luhn_valid(&digits_of("79927398713")));
        assert!(!luhn_valid(&digits_of("4111111111111112")));
    }

    #[test]
    fn short_digits_are_refused_as_too_small_a_space() {
        assert!(matches!(
            normalize(Format::Digits, "12345"),
            Err(FormatError::SpaceTooSmall(_))
        ));
        assert!(matches!(
            normalize(Format::Digits, "12a456"),
            Err(FormatError::Invalid(_))
        ));
        assert!(matches!(
            normalize(Format::Card, "4111"),
            Err(FormatError::Invalid(_))
        ));
        assert!(matches!(
            normalize(Format::Email { keep_domain: true }, "nobody"),
            Err(FormatError::Invalid(_))
        ));
    }

    #[test]
    fn masks_keep_the_last_four() {
        assert_eq!(mask_last4("4111111111111111"), "************1111");
        assert_eq!(mask_last4("abc"), "abc");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn digits_tokens_keep_length_and_alphabet(v in "[0-9]{6,40}") {
            let t = make_token(Format::Digits, &normalize(Format::Digits, &v).unwrap(), &mut Os);
            prop_assert_eq!(t.len(), v.len());
            prop_assert!(t.bytes().all(|b| b.is_ascii_digit()));
            prop_assert_ne!(t, v);
        }

        #[test]
        fn card_tokens_keep_last4_pass_luhn_and_hide_the_bin(v in "[0-9]{13,19}", sep in prop::bool::ANY) {
            let shown = if sep { format!("{} {}", &v[..4], &v[4..]) } else { v.clone() };
            let norm = normalize(Format::Card, &shown).unwrap();
            prop_assert_eq!(&norm, &v);
            let t = make_token(Format::Card, &norm, &mut Os);
            prop_assert_eq!(t.len(), v.len());
            prop_assert_eq!(&t[t.len() - 4..], &v[v.len() - 4..]);
            prop_assert!(luhn_valid(&digits_of(&t)));
            prop_assert!(t.starts_with('9'));
            prop_assert_ne!(&t[..6], &v[..6]);
        }

        #[test]
        fn email_tokens_keep_or_hide_the_domain(local in "[a-z0-9._+-]{1,30}", domain in "[a-z0-9-]{1,20}\\.[a-z]{2,6}") {
            let v = format!("{local}@{domain}");
            let kept = make_token(Format::Email { keep_domain: true }, &v, &mut Os);
            let (tl, td) = kept.rsplit_once('@').unwrap();
            prop_assert_eq!(td, domain.as_str());
            prop_assert_eq!(tl.len(), 16);
            prop_assert_ne!(tl, local.as_str());
            let hidden = make_token(Format::Email { keep_domain: false }, &v, &mut Os);
            prop_assert!(hidden.ends_with(".invalid"));
            prop_assert!(!hidden.contains(&domain));
        }

        #[test]
        fn opaque_tokens_are_prefixed_and_url_safe(v in "\\PC{1,64}") {
            let t = make_token(Format::Opaque, &v, &mut Os);
            prop_assert!(t.starts_with("tok_"));
            prop_assert_eq!(t.len(), 4 + 32);
            prop_assert!(t[4..].bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        }
    }
}
