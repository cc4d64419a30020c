//! Secret key and plaintext types. They zeroize on drop, have no Debug/Display/Serialize that
//! shows their bytes, and compare in constant time. Knows nothing about where keys come from.

use std::fmt;

use secrecy::{ExposeSecret, SecretBox};
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

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

/// A growable byte buffer that is wiped, with its spare capacity, when it drops.
///
/// `Zeroizing<Vec<u8>>` wipes a vector one volatile byte store at a time, which costs as much
/// as a 1 MiB request's encryption; this wipes the same bytes with `zeroize`'s slice path (a
/// memset behind an optimisation barrier). Growing it by hand (`reserve`, `extend_from_slice`
/// past its capacity) can leave copies in freed memory, like any `Vec`: callers that grow
/// buffers holding secrets move them into a new `SecretVec` instead.
#[derive(Default)]
pub struct SecretVec(Vec<u8>);

impl SecretVec {
    pub fn new() -> Self {
        SecretVec(Vec::new())
    }

    pub fn with_capacity(capacity: usize) -> Self {
        SecretVec(Vec::with_capacity(capacity))
    }
}

impl From<Vec<u8>> for SecretVec {
    fn from(v: Vec<u8>) -> Self {
        SecretVec(v)
    }
}

impl std::ops::Deref for SecretVec {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl std::ops::DerefMut for SecretVec {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

impl AsRef<[u8]> for SecretVec {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Zeroize for SecretVec {
    fn zeroize(&mut self) {
        self.0.as_mut_slice().zeroize();
        self.0.spare_capacity_mut().zeroize();
        self.0.clear();
    }
}

impl Drop for SecretVec {
    fn drop(&mut self) {
        self.zeroize();
    }
}

impl zeroize::ZeroizeOnDrop for SecretVec {}

impl fmt::Debug for SecretVec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretVec({} bytes)", self.0.len())
    }
}

/// Secret bytes of any length (plaintexts, unwrapped values), zeroized on drop.
pub struct SecretBytes(SecretVec);

impl SecretBytes {
    pub fn new(bytes: Vec<u8>) -> Self {
        SecretBytes(SecretVec::from(bytes))
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

    /// Hands the bytes on, still wiped on drop, e.g. as the owner of a response body.
    pub fn into_secret_vec(self) -> SecretVec {
        self.0
    }
}

/// `SecretVec` wipes the bytes when they drop.
impl zeroize::ZeroizeOnDrop for SecretBytes {}

impl From<SecretVec> for SecretBytes {
    fn from(v: SecretVec) -> Self {
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
        let v = SecretVec::from(b"hunter2".to_vec());
        assert_eq!(format!("{v:?}"), "SecretVec(7 bytes)");
    }

    #[test]
    fn a_wiped_secret_vec_is_empty_and_keeps_its_allocation() {
        let mut v = SecretVec::with_capacity(64);
        v.extend_from_slice(&[0xA5; 48]);
        v.truncate(16);
        let (ptr, cap) = (v.as_ptr(), v.capacity());
        v.zeroize();
        assert!(v.is_empty());
        // Same allocation: wiping never moves (and so never copies) the bytes.
        assert_eq!((v.as_ptr(), v.capacity()), (ptr, cap));
        let s = SecretBytes::from(SecretVec::from(b"abc".to_vec()));
        assert_eq!(s.expose(), b"abc");
        assert_eq!(s.into_secret_vec().as_slice(), b"abc");
    }

    /// Every type that holds key or value bytes wipes them on drop: checked at compile time.
    #[test]
    fn secret_types_zeroize_on_drop() {
        fn wipes<T: zeroize::ZeroizeOnDrop>() {}
        wipes::<DataKey>();
        wipes::<SecretBytes>();
        wipes::<SecretVec>();
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
