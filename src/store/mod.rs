//! Storage engines: tenants and wrapped key versions (never a plaintext key). One trait,
//! `Store`, extends every layer's storage port; SQLite is the embedded default and PostgreSQL
//! will implement the same trait. Knows nothing about HTTP or key unwrapping.

pub mod sqlite;

pub use sqlite::SqliteStore;

use crate::keyring::KeyringStore;

/// Everything a sidecar keeps: the key ring's records today; vault and approvals join here.
pub trait Store: KeyringStore {}

impl<T: KeyringStore> Store for T {}
