//! Pure cryptography: data-key types, the v1 sealed envelope, and the OS random source.
//! No I/O beyond the OS CSPRNG, no async, no clock, no logging, no knowledge of storage or HTTP.

pub mod envelope;
pub mod keys;

pub use envelope::{Envelope, Purpose, SealContext};
pub use keys::{DataKey, SecretBytes};

/// Errors of the crypto layer. Deliberately coarse: callers must not learn which check failed.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    /// The bytes are not a well-formed envelope or blob of a known version.
    #[error("malformed or unsupported ciphertext")]
    Malformed,
    /// Commitment or authentication tag did not verify.
    #[error("decryption failed")]
    DecryptFailed,
    /// A key of the wrong length was supplied.
    #[error("invalid key length")]
    KeyLength,
    /// The OS random source failed.
    #[error("the operating system's random source failed")]
    Random,
}

/// Fills `buf` with public randomness (envelope salts): bytes from the OS CSPRNG, drawn 4 KiB
/// at a time into a per-thread pool so a seal costs no system call. Only for values that are
/// published anyway (the salt is in the envelope header in clear); keys use `fill_random`.
pub fn fill_public_random(buf: &mut [u8]) -> Result<(), CryptoError> {
    const POOL: usize = 4096;
    thread_local! {
        static PUBLIC: std::cell::RefCell<(Box<[u8; POOL]>, usize)> =
            std::cell::RefCell::new((Box::new([0; POOL]), POOL));
    }
    if buf.len() > POOL / 4 {
        return fill_random(buf);
    }
    PUBLIC.with(|pool| {
        let mut pool = pool.borrow_mut();
        let (bytes, used) = &mut *pool;
        if POOL - *used < buf.len() {
            fill_random(&mut bytes[..])?;
            *used = 0;
        }
        let start = *used;
        buf.copy_from_slice(&bytes[start..start + buf.len()]);
        // Each byte is handed out once: overwrite what was taken.
        bytes[start..start + buf.len()].fill(0);
        *used += buf.len();
        Ok(())
    })
}

/// Fills `buf` from the operating system's CSPRNG.
pub fn fill_random(buf: &mut [u8]) -> Result<(), CryptoError> {
    getrandom::fill(buf).map_err(|_| CryptoError::Random)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_randomness_never_repeats_across_pool_refills() {
        let mut seen = std::collections::HashSet::new();
        // 32-byte draws over ten refills of the 4 KiB pool, plus odd sizes that straddle one.
        for i in 0..1300 {
            let mut salt = [0u8; 32];
            fill_public_random(&mut salt).unwrap();
            assert_ne!(salt, [0u8; 32], "draw {i} is all zeros");
            assert!(seen.insert(salt), "draw {i} repeats an earlier one");
            let mut odd = vec![0u8; 1 + i % 7];
            fill_public_random(&mut odd).unwrap();
        }
        let mut big = vec![0u8; 2048];
        fill_public_random(&mut big).unwrap();
        assert!(big.iter().any(|b| *b != 0));
    }
}
