//! Secret key and plaintext types. They zeroize on drop, have no Debug/Display/Serialize that
//! shows their bytes, and compare in constant time. Knows nothing about where keys come from.

use std::fmt;

use secrecy::{ExposeSecret, SecretBox};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use super::{CryptoError, fill_random};

/// Length of every data key and root key, in bytes (AES-256).
pub const KEY_LEN: usize = 32;

/// A 256-bit tenant data key (DEK) in the clear. Lives only in memory, boxed so that moves do not
/// leave copies behind, and zeroized on drop.
pub struct DataKey(SecretBox<[u8; KEY_LEN]>);

impl DataKey {
    /// A fresh random key from the OS CSPRNG.
    pub fn generate() -> Result<Self, CryptoError> {
        let mut failed = false;
        let key = SecretBox::init_with_mut(|k: &mut [u8; KEY_LEN]| {
            failed = fill_random(k).is_err();
        });
        if failed {
            return Err(CryptoError::Random);
        }
        Ok(DataKey(key))
    }

    /// Copies a key out of `bytes`; the caller remains responsible for zeroizing its own copy.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, CryptoError> {
        if bytes.len() != KEY_LEN {
            return Err(CryptoError::KeyLength);
        }
        Ok(DataKey(SecretBox::init_with_mut(
            |k: &mut [u8; KEY_LEN]| k.copy_from_slice(bytes),
        )))
    }

    /// The key bytes, for the few places that must feed them to a primitive.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        self.0.expose_secret()
    }
}

/// The boxed bytes are wiped when the key drops (`SecretBox` zeroizes on drop).
impl zeroize::ZeroizeOnDrop for DataKey {}

impl PartialEq for DataKey {
    fn eq(&self, other: &Self) -> bool {
        self.expose().ct_eq(other.expose()).into()
    }
}
impl Eq for DataKey {}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(..)")
    }
}

/// Secret bytes of any length (plaintexts, unwrapped values), zeroized on drop.
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    pub fn new(bytes: Vec<u8>) -> Self {
        SecretBytes(Zeroizing::new(bytes))
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Hands the bytes on, still zeroizing, e.g. as the owner of a response body.
    pub fn into_zeroizing(self) -> Zeroizing<Vec<u8>> {
        self.0
    }
}

/// `Zeroizing` wipes the bytes when they drop.
impl zeroize::ZeroizeOnDrop for SecretBytes {}

impl From<Zeroizing<Vec<u8>>> for SecretBytes {
    fn from(v: Zeroizing<Vec<u8>>) -> Self {
        SecretBytes(v)
    }
}

impl PartialEq for SecretBytes {
    fn eq(&self, other: &Self) -> bool {
        self.expose().ct_eq(other.expose()).into()
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes({} bytes)", self.0.len())
    }
}

impl Zeroize for SecretBytes {
    fn zeroize(&mut self) {
        self.0.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_key_bytes() {
        let k = DataKey::from_slice(&[0xAB; 32]).unwrap();
        let shown = format!("{k:?}");
        assert_eq!(shown, "DataKey(..)");
        let s = SecretBytes::new(b"hunter2".to_vec());
        assert_eq!(format!("{s:?}"), "SecretBytes(7 bytes)");
    }

    /// Every type that holds key or value bytes wipes them on drop: checked at compile time.
    #[test]
    fn secret_types_zeroize_on_drop() {
        fn wipes<T: zeroize::ZeroizeOnDrop>() {}
        wipes::<DataKey>();
        wipes::<SecretBytes>();
        wipes::<zeroize::Zeroizing<[u8; KEY_LEN]>>();
        wipes::<secrecy::SecretString>();
        wipes::<aes_gcm::Aes256Gcm>();
    }

    #[test]
    fn generated_keys_differ_and_compare_by_value() {
        let a = DataKey::generate().unwrap();
        let b = DataKey::generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(a, DataKey::from_slice(a.expose()).unwrap());
        assert_eq!(
            DataKey::from_slice(&[1; 31]).unwrap_err(),
            CryptoError::KeyLength
        );
    }
}
