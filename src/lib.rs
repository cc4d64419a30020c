//! kms-sidecar: a localhost envelope-encryption sidecar. Layers point one way:
//! `crypto` ← `providers` ← `keyring` ← `vault` ← `store` ← `api` ← `main`; `metrics` is a leaf
//! every layer may count into.
#![forbid(unsafe_code)]

pub mod api;
pub mod audit;
pub mod config;
pub mod crypto;
pub mod keyring;
pub mod metrics;
pub mod os;
pub mod providers;
pub mod server;
pub mod store;
pub mod tenant;
pub mod vault;
