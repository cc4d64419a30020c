//! Standard base64 with padding (RFC 4648 §4), as the JSON bodies carry bytes: through
//! base64-simd, which the default build already had (the AWS SDK's smithy types use it), as the
//! scalar `base64` engine was about 9 % of the server's CPU on 1 KiB seals and opens.
//!
//! What is accepted is exactly what `base64::engine::general_purpose::STANDARD` accepts: padding
//! required and canonical, no whitespace, no non-zero trailing bits. Differential proptests
//! below hold the two to that, on the instruction set the tests run on (base64-simd picks
//! AVX2, SSSE3 or its scalar code at run time; the last partial group always goes through the
//! scalar code). Nothing here panics on any input or output size.

use base64_simd::{AsOut, STANDARD};

use crate::crypto::keys::SecretVec;

/// The input is not canonical padded standard base64 (or the output room is too small).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalid;

/// The exact number of bytes `b64` decodes to, if its length and padding are well formed (the
/// characters themselves are checked by the decoding).
pub fn decoded_len(b64: &[u8]) -> Result<usize, Invalid> {
    STANDARD.decoded_length(b64).map_err(|_| Invalid)
}

/// Decodes `b64` into the start of `out`; returns the bytes written. What `out` held past
/// them is left alone; on an error, part of `out` may have been written.
pub fn decode_into(b64: &[u8], out: &mut [u8]) -> Result<usize, Invalid> {
    let n = decoded_len(b64)?;
    let room = out.get_mut(..n).ok_or(Invalid)?;
    STANDARD
        .decode(b64, room.as_out())
        .map(|d| d.len())
        .map_err(|_| Invalid)
}

/// Decodes into a buffer of the exact size that zeroizes itself when dropped.
pub fn decode(b64: &[u8]) -> Result<SecretVec, Invalid> {
    let mut out = SecretVec::from(vec![0u8; decoded_len(b64)?]);
    decode_into(b64, &mut out)?;
    Ok(out)
}

/// The encoded length of `n` bytes, with padding; `None` past what a slice can hold.
pub fn encoded_len(n: usize) -> Option<usize> {
    if n > usize::MAX / 2 {
        return None;
    }
    Some(STANDARD.encoded_length(n))
}

/// Encodes `src` into the start of `out`; returns the bytes written.
pub fn encode_into(src: &[u8], out: &mut [u8]) -> Result<usize, Invalid> {
    let n = encoded_len(src.len()).ok_or(Invalid)?;
    let room = out.get_mut(..n).ok_or(Invalid)?;
    Ok(STANDARD.encode(src, room.as_out()).len())
}

/// Encodes `src` into a new string (for bytes that are not secret, or that the caller wraps).
pub fn encode(src: impl AsRef<[u8]>) -> String {
    STANDARD.encode_to_string(src)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as REFERENCE;
    use proptest::prelude::*;

    #[test]
    fn known_vectors_from_rfc_4648() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(encode(plain.as_bytes()), enc);
            assert_eq!(&decode(enc.as_bytes()).unwrap()[..], plain.as_bytes());
        }
    }

    #[test]
    fn rejects_what_the_strict_decoder_rejects() {
        for bad in [
            "Zg", "Zg=", "Zh==", "Zm9=", "Zm9v\n", " Zm9v", "Zm9v=", "====", "Z===", "Zm-v",
            "Zm_v", "Zm9vY", "A=A=", "Zg==Zg==",
        ] {
            assert_eq!(decode(bad.as_bytes()).unwrap_err(), Invalid, "{bad:?}");
            assert!(REFERENCE.decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn short_output_room_is_an_error_not_a_panic() {
        assert_eq!(decode_into(b"Zm9vYmFy", &mut [0u8; 5]), Err(Invalid));
        assert_eq!(decode_into(b"Zm9vYmFy", &mut [0u8; 6]), Ok(6));
        assert_eq!(encode_into(b"foobar", &mut [0u8; 7]), Err(Invalid));
        assert_eq!(encode_into(b"foobar", &mut [0u8; 9]), Ok(8));
        assert_eq!(encoded_len(usize::MAX), None);
    }

    fn alphabet_soup() -> impl Strategy<Value = Vec<u8>> {
        // Mostly the alphabet and '=', sometimes anything: where the decoders could disagree.
        let byte = prop_oneof![
            8 => prop::sample::select(
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=".to_vec()
            ),
            1 => any::<u8>(),
        ];
        prop::collection::vec(byte, 0..80)
    }

    fn padded_length_soup() -> impl Strategy<Value = Vec<u8>> {
        // Lengths that are multiples of 4, so the padding and character checks are what decide.
        alphabet_soup().prop_map(|mut v| {
            v.truncate(v.len() / 4 * 4);
            v
        })
    }

    proptest! {
        #[test]
        fn round_trips_and_matches_the_reference_encoder(data in prop::collection::vec(any::<u8>(), 0..300)) {
            let enc = encode(&data);
            prop_assert_eq!(&enc, &REFERENCE.encode(&data));
            prop_assert_eq!(encoded_len(data.len()), Some(enc.len()));
            prop_assert_eq!(&decode(enc.as_bytes()).unwrap()[..], &data[..]);
        }

        #[test]
        fn accepts_exactly_what_the_reference_decoder_accepts(input in alphabet_soup()) {
            let ours = decode(&input).map(|v| v.to_vec());
            let reference = REFERENCE.decode(&input).map_err(|_| Invalid);
            prop_assert_eq!(ours, reference);
        }

        #[test]
        fn padded_lengths_are_judged_like_the_reference(input in padded_length_soup()) {
            let ours = decode(&input).map(|v| v.to_vec());
            let reference = REFERENCE.decode(&input).map_err(|_| Invalid);
            prop_assert_eq!(ours, reference);
        }

        #[test]
        fn a_flipped_character_is_caught_like_the_reference(
            data in prop::collection::vec(any::<u8>(), 1..100),
            at in any::<prop::sample::Index>(),
            to in any::<u8>(),
        ) {
            let mut enc = REFERENCE.encode(&data).into_bytes();
            let i = at.index(enc.len());
            enc[i] = to;
            let ours = decode(&enc).map(|v| v.to_vec());
            let reference = REFERENCE.decode(&enc).map_err(|_| Invalid);
            prop_assert_eq!(ours, reference);
        }
    }
}
