//! Pure cryptography: data-key types, the v1 sealed envelope, and the OS random source.
//! No I/O beyond the OS CSPRNG, no async, no clock, no logging, no knowledge of storage or HTTP.

pub mod envelope;
pub mod keys;

pub use envelope::{Envelope, Purpose, SealContext};
pub use keys::{DataKey, SecretBytes, SecretVec};

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

/// Fills `buf` from the operating system's CSPRNG.
pub fn fill_random(buf: &mut [u8]) -> Result<(), CryptoError> {
    getrandom::fill(buf).map_err(|_| CryptoError::Random)
}
