//! kms-sidecar: a localhost envelope-encryption sidecar. Layers point one way:
//! `crypto` ← `providers` ← `keyring` ← `store` ← `api` ← `main`.
#![forbid(unsafe_code)]

pub mod crypto;
pub mod keyring;
pub mod providers;
pub mod store;
pub mod tenant;
