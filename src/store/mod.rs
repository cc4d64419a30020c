//! Storage engines: tenants, wrapped key versions, approvals, the change feed and sealed token
//! values (never a plaintext key or value). One trait, `Store`, extends every layer's storage
//! port; SQLite is the embedded default, PostgreSQL serves a fleet of sidecars sharing one
//! database. Both pass one behaviour suite (`suite.rs`). Knows nothing about HTTP or key
//! unwrapping.

pub mod postgres;
pub mod sqlite;
#[cfg(test)]
pub(crate) mod suite;

pub use postgres::{PostgresOptions, PostgresStore};
pub use sqlite::SqliteStore;

use crate::keyring::KeyringStore;
use crate::vault::VaultStore;

/// Everything a sidecar keeps: key rings, approvals, the change feed and the token vault.
pub trait Store: KeyringStore + VaultStore {}

impl<T: KeyringStore + VaultStore> Store for T {}
