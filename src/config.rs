//! Configuration: one TOML file plus `KMS_SIDECAR_*` environment overrides, parsed once into
//! typed structs and validated at start with messages that name the key. Nothing else in the
//! program reads configuration files or environment variables.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::api::Limits;
use crate::api::auth::{Operation, Principal, TenantPattern};
use crate::keyring::KeyringOptions;

/// Prefix of environment overrides; `__` separates nested keys
/// (`KMS_SIDECAR_CACHE__TTL_SECONDS=60` sets `cache.ttl_seconds`).
pub const ENV_PREFIX: &str = "KMS_SIDECAR_";
/// A week: the cache TTL is the revocation bound, so a longer one is a mistake.
pub const MAX_TTL_SECONDS: u64 = 7 * 24 * 3600;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the store, keyfile, socket and dev token live by default.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Create tenants on first seal/datakey instead of answering 404 `tenant_not_found`.
    #[serde(default)]
    pub auto_create_tenants: bool,
    /// tracing filter, e.g. `info` or `kms_sidecar=debug`.
    #[serde(default = "default_log")]
    pub log: String,
    /// Threads serving requests; 0 (default) means half the CPUs this process may use (at
    /// least one): see [`Config::serving_workers`].
    #[serde(default)]
    pub worker_threads: usize,
    #[serde(default)]
    pub listen: ListenConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub store: StoreConfig,
    /// Root keys in unwrap-preference order; new key versions are wrapped under all of them.
    /// Default: one keyfile root at `<data_dir>/root.key`.
    #[serde(default)]
    pub roots: Vec<RootConfig>,
    #[serde(default)]
    pub principals: Vec<PrincipalConfig>,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub shred: ShredConfig,
    #[serde(default)]
    pub rotation: RotationConfig,
    #[serde(default)]
    pub vault: VaultConfig,
    #[serde(default)]
    pub memory: MemoryConfig,
    /// The AWS connection used by `aws-kms` roots and by customer-managed keys bound to
    /// tenants (BYOK). Absent: no AWS root can be used.
    #[serde(default)]
    pub aws: Option<AwsConfig>,
    /// Passphrases of sealed keyfile roots, read from the variables they name at load time.
    #[serde(skip)]
    pub passphrases: std::collections::BTreeMap<String, std::sync::Arc<secrecy::SecretString>>,
    /// User PINs of PKCS#11 roots with `pin_env`, read from the variables they name at load time.
    #[serde(skip)]
    pub pins: std::collections::BTreeMap<String, std::sync::Arc<secrecy::SecretString>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// Unix socket path; default `<data_dir>/kms-sidecar.sock`; `""` disables it.
    pub unix_socket: Option<PathBuf>,
    /// Octal file mode of the socket.
    #[serde(default = "default_socket_mode")]
    pub unix_socket_mode: String,
    /// TCP address (loopback only), e.g. `127.0.0.1:8787`; unset means no TCP listener.
    pub tcp: Option<String>,
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            unix_socket: None,
            unix_socket_mode: default_socket_mode(),
            tcp: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    #[serde(default = "default_max_batch")]
    pub max_batch_items: usize,
    #[serde(default = "default_header_timeout")]
    pub header_read_timeout_seconds: u64,
    /// Open connections beyond this are closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Requests being handled at once; beyond it, 503 `overloaded` without queueing.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// SO_SNDBUF of accepted Unix-socket connections; 0 keeps the kernel's default.
    #[serde(default)]
    pub unix_send_buffer_bytes: usize,
    /// The most a connection reads from its socket at once; also the largest request head.
    #[serde(default = "default_read_buffer")]
    pub read_buffer_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_body_bytes: default_max_body(),
            max_batch_items: default_max_batch(),
            header_read_timeout_seconds: default_header_timeout(),
            max_connections: default_max_connections(),
            max_in_flight: default_max_in_flight(),
            max_headers: default_max_headers(),
            unix_send_buffer_bytes: 0,
            read_buffer_bytes: default_read_buffer(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    #[serde(default = "default_cache_entries")]
    pub max_entries: u64,
    /// Bound on how long an unwrapped key is used before its root is asked again.
    #[serde(default = "default_cache_ttl")]
    pub ttl_seconds: u64,
    /// How long past the TTL a cached key may still be used while its roots are unreachable
    /// (never when a root refuses); 0 = off.
    #[serde(default)]
    pub stale_if_error_seconds: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_entries: default_cache_entries(),
            ttl_seconds: default_cache_ttl(),
            stale_if_error_seconds: 0,
        }
    }
}

/// How to reach AWS KMS. Unset region and credentials come from the standard AWS chain
/// (environment, shared profile, web identity, ECS, instance metadata).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    pub region: Option<String>,
    /// Endpoint override: moto, LocalStack, a VPC endpoint.
    pub endpoint_url: Option<String>,
    /// Static credentials (emulators, tests); both or neither with `secret_access_key`.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<secrecy::SecretString>,
    pub session_token: Option<secrecy::SecretString>,
    #[serde(default = "default_aws_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// Bound on one HTTP attempt.
    #[serde(default = "default_aws_attempt_timeout")]
    pub attempt_timeout_ms: u64,
    /// Bound on a whole call, retries and backoff included.
    #[serde(default = "default_aws_operation_timeout")]
    pub operation_timeout_ms: u64,
    /// Attempts per call, the first included.
    #[serde(default = "default_aws_max_attempts")]
    pub max_attempts: u32,
    #[serde(default = "default_aws_initial_backoff")]
    pub initial_backoff_ms: u64,
    #[serde(default = "default_aws_max_backoff")]
    pub max_backoff_ms: u64,
}

impl AwsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |k: &str, m: &str| Err(ConfigError(format!("aws.{k}: {m}")));
        if let Some(r) = &self.region
            && (r.is_empty()
                || !r
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'))
        {
            return bad("region", "must look like us-east-1");
        }
        if let Some(u) = &self.endpoint_url
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            return bad("endpoint_url", "must be an http:// or https:// URL");
        }
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            return bad(
                "access_key_id",
                "set both access_key_id and secret_access_key, or neither (standard chain)",
            );
        }
        if self.session_token.is_some() && self.access_key_id.is_none() {
            return bad("session_token", "needs access_key_id and secret_access_key");
        }
        if !(1..=60_000).contains(&self.connect_timeout_ms) {
            return bad("connect_timeout_ms", "must be between 1 and 60000");
        }
        if !(1..=60_000).contains(&self.attempt_timeout_ms) {
            return bad("attempt_timeout_ms", "must be between 1 and 60000");
        }
        if !(self.attempt_timeout_ms..=300_000).contains(&self.operation_timeout_ms) {
            return bad(
                "operation_timeout_ms",
                "must be at least attempt_timeout_ms and at most 300000",
            );
        }
        if !(1..=10).contains(&self.max_attempts) {
            return bad("max_attempts", "must be between 1 and 10");
        }
        if self.initial_backoff_ms > self.max_backoff_ms || self.max_backoff_ms > 60_000 {
            return bad(
                "max_backoff_ms",
                "must be at least initial_backoff_ms and at most 60000",
            );
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Default `<data_dir>/audit.jsonl`; rotated files sit beside it as `<name>.<last seq>`.
    pub path: Option<PathBuf>,
    #[serde(default = "default_fsync")]
    pub fsync: crate::audit::FsyncPolicy,
    #[serde(default = "default_audit_file_bytes")]
    pub max_file_bytes: u64,
    #[serde(default = "default_data_plane")]
    pub data_plane: crate::audit::DataPlane,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            path: None,
            fsync: default_fsync(),
            max_file_bytes: default_audit_file_bytes(),
            data_plane: default_data_plane(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShredConfig {
    /// How long a shred request waits for a second admin's approval.
    #[serde(default = "default_approval_window")]
    pub approval_window_seconds: u64,
}

impl Default for ShredConfig {
    fn default() -> Self {
        ShredConfig {
            approval_window_seconds: default_approval_window(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationConfig {
    /// Rotate every tenant whose active key is older than this; 0 = never automatically.
    #[serde(default)]
    pub period_seconds: u64,
    /// Per-tenant periods; the first matching pattern wins over `period_seconds`.
    #[serde(default)]
    pub tenants: Vec<TenantRotation>,
    #[serde(default = "default_rotation_check")]
    pub check_interval_seconds: u64,
}

impl Default for RotationConfig {
    fn default() -> Self {
        RotationConfig {
            period_seconds: 0,
            tenants: Vec::new(),
            check_interval_seconds: default_rotation_check(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// `auto` (lock when permitted, warn once otherwise), `required`, or `off`.
    #[serde(default = "default_memory_lock")]
    pub lock: crate::os::MemoryLock,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            lock: default_memory_lock(),
        }
    }
}

fn default_memory_lock() -> crate::os::MemoryLock {
    crate::os::MemoryLock::Auto
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    /// How often expired tokens are deleted.
    #[serde(default = "default_sweep")]
    pub sweep_interval_seconds: u64,
}

impl Default for VaultConfig {
    fn default() -> Self {
        VaultConfig {
            sweep_interval_seconds: default_sweep(),
        }
    }
}

fn default_sweep() -> u64 {
    60
}

fn default_pool_size() -> usize {
    16
}

fn default_store_timeout() -> u64 {
    5
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantRotation {
    pub pattern: String,
    /// 0 = never for these tenants.
    pub period_seconds: u64,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// SQLite file; default `<data_dir>/store.db`. Mutually exclusive with `url`.
    pub sqlite_path: Option<PathBuf>,
    /// PostgreSQL instead of SQLite: `postgres://user:password@host:5432/db?sslmode=verify-full`.
    /// It may carry a password, so it is never printed.
    pub url: Option<String>,
    /// PostgreSQL connections per sidecar (plus one for change notifications).
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Bound on opening a PostgreSQL connection, and on waiting for a free one.
    #[serde(default = "default_store_timeout")]
    pub connect_timeout_seconds: u64,
    /// Bound on one PostgreSQL statement (and on waiting for a row lock).
    #[serde(default = "default_store_timeout")]
    pub statement_timeout_seconds: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            sqlite_path: None,
            url: None,
            pool_size: default_pool_size(),
            connect_timeout_seconds: default_store_timeout(),
            statement_timeout_seconds: default_store_timeout(),
        }
    }
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("sqlite_path", &self.sqlite_path)
            .field("url", &self.url.as_ref().map(|_| "<redacted>"))
            .field("pool_size", &self.pool_size)
            .field("connect_timeout_seconds", &self.connect_timeout_seconds)
            .field("statement_timeout_seconds", &self.statement_timeout_seconds)
            .finish()
    }
}

/// Which engine holds the store, as configured.
#[derive(Debug, Clone)]
pub enum StoreEngine {
    Sqlite(PathBuf),
    Postgres(Box<crate::store::PostgresOptions>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "kebab-case")]
pub enum RootConfig {
    /// An offline keyfile made by `kms-sidecar keyfile new`.
    Keyfile {
        path: PathBuf,
        /// Environment variable holding the passphrase of a sealed keyfile.
        passphrase_env: Option<String>,
    },
    /// A key in a PKCS#11 token (HSM); see hsm/README.md.
    Pkcs11(crate::providers::pkcs11::Pkcs11Config),
    /// A key in AWS KMS, reached through the `[aws]` connection.
    AwsKms {
        /// Key ARN, key id, or alias (`alias/NAME` or its ARN).
        key_id: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalConfig {
    pub name: String,
    #[serde(default)]
    pub unix_uids: Vec<u32>,
    #[serde(default)]
    pub unix_gids: Vec<u32>,
    /// Hex SHA-256 of each bearer token (`kms-sidecar token new` prints both).
    #[serde(default)]
    pub token_sha256: Vec<String>,
    /// Tenant patterns; `*` matches any run of characters.
    pub tenants: Vec<String>,
    /// Operations, or `"*"` for all.
    pub operations: Vec<String>,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./data")
}
fn default_log() -> String {
    "info".into()
}
fn default_socket_mode() -> String {
    "0660".into()
}
fn default_max_body() -> usize {
    4 * 1024 * 1024
}
fn default_max_batch() -> usize {
    1000
}
fn default_header_timeout() -> u64 {
    10
}
fn default_max_connections() -> usize {
    4096
}
fn default_max_in_flight() -> usize {
    512
}
/// Bound on `limits.unix_send_buffer_bytes`: the kernel may hold this much (twice, with its
/// bookkeeping) for every connection whose client stops reading.
const MAX_SEND_BUFFER: usize = 16 << 20;
/// Bounds on `limits.read_buffer_bytes`: hyper needs at least 8 KiB; each connection may hold
/// the maximum while a client sends its request head (times `max_connections`: 8 GiB at 2 MiB
/// and 4,096 connections), so the ceiling stays low.
const MIN_READ_BUFFER: usize = 8 << 10;
const MAX_READ_BUFFER: usize = 2 << 20;

fn default_read_buffer() -> usize {
    64 << 10
}

fn default_max_headers() -> usize {
    64
}
fn default_cache_entries() -> u64 {
    100_000
}
fn default_cache_ttl() -> u64 {
    300
}
fn default_fsync() -> crate::audit::FsyncPolicy {
    crate::audit::FsyncPolicy::Always
}
fn default_audit_file_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_data_plane() -> crate::audit::DataPlane {
    crate::audit::DataPlane::Aggregate
}
fn default_approval_window() -> u64 {
    24 * 3600
}
fn default_rotation_check() -> u64 {
    60
}
fn default_aws_connect_timeout() -> u64 {
    1000
}
fn default_aws_attempt_timeout() -> u64 {
    2000
}
fn default_aws_operation_timeout() -> u64 {
    5000
}
fn default_aws_max_attempts() -> u32 {
    3
}
fn default_aws_initial_backoff() -> u64 {
    100
}
fn default_aws_max_backoff() -> u64 {
    1000
}

/// A configuration error; the message names the key.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Loads `file` (or an empty config) and applies overrides from `env`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = match file {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|e| ConfigError(format!("cannot read config {}: {e}", p.display())))?,
            None => String::new(),
        };
        let name = file.map(|p| p.display().to_string()).unwrap_or_default();
        Self::from_toml_str(&name, &text, env)
    }

    /// Parses configuration text (`name` only labels errors) and applies overrides from `env`.
    pub fn from_toml_str(
        name: &str,
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError(format!("config {name}: {e}")))?;
        let env_snapshot: std::collections::BTreeMap<String, zeroize::Zeroizing<String>> = env
            .into_iter()
            .map(|(k, v)| (k, zeroize::Zeroizing::new(v)))
            .collect();
        for (name, value) in &env_snapshot {
            let Some(key) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let path: Vec<String> = key.split("__").map(|s| s.to_ascii_lowercase()).collect();
            if path.iter().any(String::is_empty) {
                return Err(ConfigError(format!("{name}: malformed override name")));
            }
            set_path(&mut table, &path, env_value(value))
                .map_err(|m| ConfigError(format!("{name}: {m}")))?;
        }
        let mut config: Config = table
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError(format!("configuration: {e}")))?;
        for (i, root) in config.roots.iter().enumerate() {
            let RootConfig::Keyfile {
                passphrase_env: Some(var),
                ..
            } = root
            else {
                continue;
            };
            if var.starts_with(ENV_PREFIX) {
                return Err(ConfigError(format!(
                    "roots[{i}].passphrase_env: {var} must not start with {ENV_PREFIX}, which is for overrides"
                )));
            }
            let value = env_snapshot.get(var).ok_or_else(|| {
                ConfigError(format!(
                    "roots[{i}].passphrase_env: environment variable {var} is not set"
                ))
            })?;
            config.passphrases.insert(
                var.clone(),
                std::sync::Arc::new(secrecy::SecretString::from(value.as_str())),
            );
        }
        for (i, root) in config.roots.iter().enumerate() {
            let RootConfig::Pkcs11(p) = root else {
                continue;
            };
            p.validate()
                .map_err(|(key, m)| ConfigError(format!("roots[{i}].{key}: {m}")))?;
            let Some(var) = &p.pin_env else {
                continue;
            };
            if var.starts_with(ENV_PREFIX) {
                return Err(ConfigError(format!(
                    "roots[{i}].pin_env: {var} must not start with {ENV_PREFIX}, which is for overrides"
                )));
            }
            let value = env_snapshot.get(var).ok_or_else(|| {
                ConfigError(format!(
                    "roots[{i}].pin_env: environment variable {var} is not set"
                ))
            })?;
            config.pins.insert(
                var.clone(),
                std::sync::Arc::new(secrecy::SecretString::from(value.as_str())),
            );
        }
        config.validate()?;
        Ok(config)
    }

    /// The worker threads to serve with: `worker_threads`, or for 0 half of `cpus` (the CPUs
    /// this process may use, cgroup quota included), at least one. A sidecar's callers run on
    /// the same host, and each call costs the caller about as much CPU as the sidecar spends
    /// answering it; workers beyond that share only contend with the callers. Measured on 2
    /// cores with the caller beside it (1 KiB seals, 32 connections): one worker served about
    /// 1.3x the requests of two, at half the p99, with 11.5 against 17.5 us of CPU each.
    pub fn serving_workers(&self, cpus: usize) -> usize {
        if self.worker_threads > 0 {
            self.worker_threads
        } else {
            (cpus / 2).max(1)
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.socket_mode()?;
        if self.worker_threads > 256 {
            return Err(ConfigError("worker_threads must be at most 256".into()));
        }
        if self.limits.max_body_bytes == 0 || self.limits.max_body_bytes > 1 << 30 {
            return Err(ConfigError(
                "limits.max_body_bytes must be positive and at most 1 GiB".into(),
            ));
        }
        if self.limits.max_connections == 0 || self.limits.max_in_flight == 0 {
            return Err(ConfigError(
                "limits.max_connections and limits.max_in_flight must be positive".into(),
            ));
        }
        if self.limits.unix_send_buffer_bytes > MAX_SEND_BUFFER {
            return Err(ConfigError(format!(
                "limits.unix_send_buffer_bytes must be at most {MAX_SEND_BUFFER}"
            )));
        }
        if !(MIN_READ_BUFFER..=MAX_READ_BUFFER).contains(&self.limits.read_buffer_bytes) {
            return Err(ConfigError(format!(
                "limits.read_buffer_bytes must be between {MIN_READ_BUFFER} and {MAX_READ_BUFFER}"
            )));
        }
        if !(8..=1024).contains(&self.limits.max_headers) {
            return Err(ConfigError(
                "limits.max_headers must be between 8 and 1024".into(),
            ));
        }
        if self.limits.max_batch_items == 0 {
            return Err(ConfigError(
                "limits.max_batch_items must be positive".into(),
            ));
        }
        if self.cache.max_entries == 0 {
            return Err(ConfigError("cache.max_entries must be positive".into()));
        }
        if !(1..=MAX_TTL_SECONDS).contains(&self.cache.ttl_seconds) {
            return Err(ConfigError(format!(
                "cache.ttl_seconds must be between 1 and {MAX_TTL_SECONDS}"
            )));
        }
        if self.cache.stale_if_error_seconds > MAX_TTL_SECONDS {
            return Err(ConfigError(format!(
                "cache.stale_if_error_seconds must be at most {MAX_TTL_SECONDS}"
            )));
        }
        if let Some(aws) = &self.aws {
            aws.validate()?;
        }
        for (i, root) in self.roots.iter().enumerate() {
            if let RootConfig::AwsKms { key_id } = root {
                crate::providers::aws_kms_root_id(key_id)
                    .map_err(|m| ConfigError(format!("roots[{i}].key_id: {m}")))?;
                if self.aws.is_none() {
                    return Err(ConfigError(format!(
                        "roots[{i}]: kind = \"aws-kms\" needs an [aws] section (it may be empty)"
                    )));
                }
            }
        }
        if !(1..=3600).contains(&self.limits.header_read_timeout_seconds) {
            return Err(ConfigError(
                "limits.header_read_timeout_seconds must be between 1 and 3600".into(),
            ));
        }
        if let Some(tcp) = &self.listen.tcp {
            let addr: std::net::SocketAddr = tcp.parse().map_err(|_| {
                ConfigError(format!(
                    "listen.tcp: {tcp:?} is not an address like 127.0.0.1:8787"
                ))
            })?;
            if !addr.ip().is_loopback() {
                return Err(ConfigError(format!(
                    "listen.tcp: {tcp} is not a loopback address (TLS is not configured)"
                )));
            }
        }
        if self.shred.approval_window_seconds == 0 {
            return Err(ConfigError(
                "shred.approval_window_seconds must be positive".into(),
            ));
        }
        if self.vault.sweep_interval_seconds == 0 {
            return Err(ConfigError(
                "vault.sweep_interval_seconds must be positive".into(),
            ));
        }
        if self.rotation.check_interval_seconds == 0 {
            return Err(ConfigError(
                "rotation.check_interval_seconds must be positive".into(),
            ));
        }
        if self.audit.max_file_bytes < 4096 {
            return Err(ConfigError(
                "audit.max_file_bytes must be at least 4096".into(),
            ));
        }
        for (i, r) in self.rotation.tenants.iter().enumerate() {
            TenantPattern::parse(&r.pattern)
                .map_err(|m| ConfigError(format!("rotation.tenants[{i}].pattern: {m}")))?;
        }
        let mut names = BTreeSet::new();
        for (i, p) in self.principals.iter().enumerate() {
            if !names.insert(p.name.as_str()) {
                return Err(ConfigError(format!(
                    "principals[{i}].name: duplicate principal {:?}",
                    p.name
                )));
            }
        }
        self.principals()?;
        self.store_engine()?;
        Ok(())
    }

    /// The configured store engine, validated: SQLite unless `store.url` is set.
    pub fn store_engine(&self) -> Result<StoreEngine, ConfigError> {
        let s = &self.store;
        let Some(url) = &s.url else {
            return Ok(StoreEngine::Sqlite(self.sqlite_path()));
        };
        if s.sqlite_path.is_some() {
            return Err(ConfigError(
                "store.url: set either store.url (PostgreSQL) or store.sqlite_path (SQLite), not both"
                    .into(),
            ));
        }
        if !(1..=1000).contains(&s.pool_size) {
            return Err(ConfigError(
                "store.pool_size must be between 1 and 1000".into(),
            ));
        }
        for (key, v) in [
            ("connect_timeout_seconds", s.connect_timeout_seconds),
            ("statement_timeout_seconds", s.statement_timeout_seconds),
        ] {
            if !(1..=300).contains(&v) {
                return Err(ConfigError(format!(
                    "store.{key} must be between 1 and 300"
                )));
            }
        }
        let options = crate::store::PostgresOptions::new(
            url,
            s.pool_size,
            Duration::from_secs(s.connect_timeout_seconds),
            Duration::from_secs(s.statement_timeout_seconds),
        )
        .map_err(|m| ConfigError(format!("store.url: {m}")))?;
        Ok(StoreEngine::Postgres(Box::new(options)))
    }

    pub fn socket_mode(&self) -> Result<u32, ConfigError> {
        u32::from_str_radix(&self.listen.unix_socket_mode, 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                ConfigError(format!(
                    "listen.unix_socket_mode: {:?} is not an octal mode like \"0660\"",
                    self.listen.unix_socket_mode
                ))
            })
    }

    pub fn unix_socket(&self) -> Option<PathBuf> {
        match &self.listen.unix_socket {
            Some(p) if p.as_os_str().is_empty() => None,
            Some(p) => Some(p.clone()),
            None => Some(self.data_dir.join("kms-sidecar.sock")),
        }
    }

    pub fn sqlite_path(&self) -> PathBuf {
        self.store
            .sqlite_path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("store.db"))
    }

    pub fn passphrase(&self, var: &str) -> Option<&secrecy::SecretString> {
        self.passphrases.get(var).map(|p| p.as_ref())
    }

    /// The PIN read from `pin_env` of a PKCS#11 root.
    pub fn pin(&self, var: &str) -> Option<&secrecy::SecretString> {
        self.pins.get(var).map(|p| p.as_ref())
    }

    pub fn roots(&self) -> Vec<RootConfig> {
        if self.roots.is_empty() {
            vec![RootConfig::Keyfile {
                path: self.data_dir.join("root.key"),
                passphrase_env: None,
            }]
        } else {
            self.roots.clone()
        }
    }

    pub fn audit_options(&self) -> crate::audit::AuditOptions {
        crate::audit::AuditOptions {
            path: self
                .audit
                .path
                .clone()
                .unwrap_or_else(|| self.data_dir.join("audit.jsonl")),
            fsync: self.audit.fsync,
            max_file_bytes: self.audit.max_file_bytes,
            data_plane: self.audit.data_plane,
        }
    }

    /// The automatic rotation period of a tenant, if any.
    pub fn rotation_period(&self, tenant: &crate::tenant::TenantId) -> Option<Duration> {
        let secs = self
            .rotation
            .tenants
            .iter()
            .find(|r| TenantPattern::parse(&r.pattern).is_ok_and(|p| p.matches(tenant)))
            .map_or(self.rotation.period_seconds, |r| r.period_seconds);
        (secs > 0).then(|| Duration::from_secs(secs))
    }

    /// Whether any automatic rotation is configured.
    pub fn rotation_enabled(&self) -> bool {
        self.rotation.period_seconds > 0
            || self.rotation.tenants.iter().any(|t| t.period_seconds > 0)
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_body_bytes: self.limits.max_body_bytes,
            max_batch_items: self.limits.max_batch_items,
            header_read_timeout: Duration::from_secs(self.limits.header_read_timeout_seconds),
            max_connections: self.limits.max_connections,
            max_in_flight: self.limits.max_in_flight,
            max_headers: self.limits.max_headers,
            unix_send_buffer_bytes: self.limits.unix_send_buffer_bytes,
            read_buffer_bytes: self.limits.read_buffer_bytes,
        }
    }

    pub fn keyring_options(&self) -> KeyringOptions {
        KeyringOptions {
            auto_create_tenants: self.auto_create_tenants,
            cache_max_entries: self.cache.max_entries,
            cache_ttl: Duration::from_secs(self.cache.ttl_seconds),
            stale_if_error: Duration::from_secs(self.cache.stale_if_error_seconds),
        }
    }

    /// The principals, validated.
    pub fn principals(&self) -> Result<Vec<Principal>, ConfigError> {
        self.principals
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let key = |k: &str| format!("principals[{i}].{k}");
                let token_hashes = p
                    .token_sha256
                    .iter()
                    .map(|h| {
                        let mut out = [0u8; 32];
                        hex::decode_to_slice(h, &mut out).map_err(|_| {
                            ConfigError(format!(
                                "{}: must be 64 hex characters (SHA-256 of the token)",
                                key("token_sha256")
                            ))
                        })?;
                        if out == crate::api::auth::token_sha256("") {
                            return Err(ConfigError(format!(
                                "{}: that is the hash of an empty token",
                                key("token_sha256")
                            )));
                        }
                        Ok(out)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let tenants = p
                    .tenants
                    .iter()
                    .map(|t| {
                        TenantPattern::parse(t)
                            .map_err(|m| ConfigError(format!("{}: {m}", key("tenants"))))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let mut operations = BTreeSet::new();
                for op in &p.operations {
                    if op == "*" {
                        operations.extend(Operation::ALL);
                    } else {
                        operations.insert(
                            op.parse()
                                .map_err(|m| ConfigError(format!("{}: {m}", key("operations"))))?,
                        );
                    }
                }
                Ok(Principal {
                    name: p.name.clone(),
                    unix_uids: p.unix_uids.clone(),
                    unix_gids: p.unix_gids.clone(),
                    token_hashes,
                    tenants,
                    operations,
                })
            })
            .collect()
    }
}

/// An override's value as TOML when it parses as a scalar or array (`60`, `true`, `[1, 2]`),
/// otherwise as a plain string (paths, addresses).
fn env_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_owned())),
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    match path {
        [] => Err("empty key".into()),
        [last] => {
            table.insert(last.clone(), value);
            Ok(())
        }
        [head, rest @ ..] => {
            let entry = table
                .entry(head.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry {
                toml::Value::Table(t) => set_path(t, rest, value),
                _ => Err(format!("`{head}` is not a table")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, toml).unwrap();
        Config::load(
            Some(&p),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn defaults_follow_the_design() {
        let c = Config::load(None, Vec::new()).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert_eq!(
            c.unix_socket(),
            Some(PathBuf::from("./data/kms-sidecar.sock"))
        );
        assert_eq!(c.sqlite_path(), PathBuf::from("./data/store.db"));
        assert_eq!(c.limits.max_body_bytes, 4 * 1024 * 1024);
        assert_eq!(c.socket_mode().unwrap(), 0o660);
        assert!(!c.auto_create_tenants);
        assert!(c.listen.tcp.is_none());
        assert_eq!(c.worker_threads, 0);
    }

    #[test]
    fn the_default_worker_count_is_half_the_cpus_and_at_least_one() {
        let c = Config::load(None, Vec::new()).unwrap();
        assert_eq!(c.worker_threads, 0);
        assert_eq!(c.serving_workers(1), 1);
        assert_eq!(c.serving_workers(2), 1);
        assert_eq!(c.serving_workers(3), 1);
        assert_eq!(c.serving_workers(8), 4);
        assert_eq!(c.serving_workers(64), 32);
    }

    #[test]
    fn the_unix_send_buffer_is_optional_and_bounded() {
        assert_eq!(
            Config::load(None, Vec::new())
                .unwrap()
                .limits()
                .unix_send_buffer_bytes,
            0
        );
        let c = load("[limits]\nunix_send_buffer_bytes = 1048576\n", &[]).unwrap();
        assert_eq!(c.limits().unix_send_buffer_bytes, 1 << 20);
        let e = load("[limits]\nunix_send_buffer_bytes = 16777217\n", &[]).unwrap_err();
        assert!(e.0.contains("unix_send_buffer_bytes"), "{}", e.0);
    }

    #[test]
    fn the_read_buffer_defaults_to_64_kib_and_is_bounded() {
        let c = Config::load(None, Vec::new()).unwrap();
        assert_eq!(c.limits().read_buffer_bytes, 64 << 10);
        let c = load("[limits]\nread_buffer_bytes = 1048576\n", &[]).unwrap();
        assert_eq!(c.limits().read_buffer_bytes, 1 << 20);
        let c = load("", &[("KMS_SIDECAR_LIMITS__READ_BUFFER_BYTES", "8192")]).unwrap();
        assert_eq!(c.limits().read_buffer_bytes, 8192);
        let c = load("[limits]\nread_buffer_bytes = 2097152\n", &[]).unwrap();
        assert_eq!(c.limits().read_buffer_bytes, 2 << 20);
        for bad in ["0", "8191", "2097153"] {
            let e = load(&format!("[limits]\nread_buffer_bytes = {bad}\n"), &[]).unwrap_err();
            assert!(e.0.contains("limits.read_buffer_bytes"), "{}", e.0);
        }
    }

    #[test]
    fn worker_threads_is_bounded() {
        let c = load("worker_threads = 1\n", &[]).unwrap();
        assert_eq!(c.worker_threads, 1);
        let c = load("", &[("KMS_SIDECAR_WORKER_THREADS", "3")]).unwrap();
        assert_eq!(c.worker_threads, 3);
        assert_eq!(c.serving_workers(16), 3);
        let e = load("worker_threads = 257\n", &[]).unwrap_err();
        assert!(e.0.contains("worker_threads"), "{}", e.0);
        let e = load("[limits]\nmax_body_bytes = 1073741825\n", &[]).unwrap_err();
        assert!(e.0.contains("max_body_bytes"), "{}", e.0);
    }

    #[test]
    fn env_overrides_nested_keys_with_types() {
        let c = load(
            "[cache]\nttl_seconds = 5\n",
            &[
                ("KMS_SIDECAR_CACHE__TTL_SECONDS", "60"),
                ("KMS_SIDECAR_AUTO_CREATE_TENANTS", "true"),
                ("KMS_SIDECAR_LISTEN__TCP", "127.0.0.1:9999"),
                ("KMS_SIDECAR_DATA_DIR", "/var/lib/kms"),
                ("UNRELATED", "x"),
            ],
        )
        .unwrap();
        assert_eq!(c.cache.ttl_seconds, 60);
        assert!(c.auto_create_tenants);
        assert_eq!(c.listen.tcp.as_deref(), Some("127.0.0.1:9999"));
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/kms"));
    }

    #[test]
    fn errors_name_the_bad_key() {
        let e = load("bogus = 1\n", &[]).unwrap_err().0;
        assert!(e.contains("bogus"), "{e}");
        let e = load("", &[("KMS_SIDECAR_CACHE__NOPE", "1")]).unwrap_err().0;
        assert!(e.contains("nope"), "{e}");
        let e = load("[listen]\ntcp = \"0.0.0.0:80\"\n", &[]).unwrap_err().0;
        assert!(e.contains("listen.tcp"), "{e}");
        let e = load("[cache]\nttl_seconds = 99999999999\n", &[])
            .unwrap_err()
            .0;
        assert!(e.contains("cache.ttl_seconds"), "{e}");
        let e = load("[limits]\nheader_read_timeout_seconds = 0\n", &[])
            .unwrap_err()
            .0;
        assert!(e.contains("header_read_timeout_seconds"), "{e}");
        let empty = hex::encode(crate::api::auth::token_sha256(""));
        let e = load(
            &format!("[[principals]]\nname = \"a\"\ntoken_sha256 = [\"{empty}\"]\ntenants = [\"*\"]\noperations = [\"*\"]\n"),
            &[],
        )
        .unwrap_err()
        .0;
        assert!(e.contains("empty token"), "{e}");
        let e = load("[limits]\nmax_body_bytes = \"big\"\n", &[])
            .unwrap_err()
            .0;
        assert!(e.contains("max_body_bytes"), "{e}");
        let e = load(
            "[[principals]]\nname = \"a\"\ntenants = [\"*\"]\noperations = [\"fly\"]\n",
            &[],
        )
        .unwrap_err()
        .0;
        assert!(e.contains("principals[0].operations"), "{e}");
        let e = load(
            "[[principals]]\nname = \"a\"\ntoken_sha256 = [\"zz\"]\ntenants = [\"*\"]\noperations = [\"*\"]\n",
            &[],
        )
        .unwrap_err()
        .0;
        assert!(e.contains("principals[0].token_sha256"), "{e}");
    }

    #[test]
    fn aws_roots_need_a_connection_and_a_key_shape() {
        let c = load(
            "[aws]\nregion = \"us-east-1\"\nendpoint_url = \"http://127.0.0.1:4566\"\naccess_key_id = \"testing\"\nsecret_access_key = \"testing\"\n[[roots]]\nkind = \"aws-kms\"\nkey_id = \"alias/sidecar\"\n",
            &[],
        )
        .unwrap();
        let aws = c.aws.as_ref().unwrap();
        assert_eq!(aws.max_attempts, 3);
        assert_eq!(aws.operation_timeout_ms, 5000);
        assert!(
            matches!(&c.roots()[0], RootConfig::AwsKms { key_id } if key_id == "alias/sidecar")
        );
        let e = load("[[roots]]\nkind = \"aws-kms\"\nkey_id = \"alias/x\"\n", &[])
            .unwrap_err()
            .0;
        assert!(e.contains("roots[0]") && e.contains("[aws]"), "{e}");
        let e = load(
            "[aws]\n[[roots]]\nkind = \"aws-kms\"\nkey_id = \"not a key\"\n",
            &[],
        )
        .unwrap_err()
        .0;
        assert!(e.contains("roots[0].key_id"), "{e}");
        let e = load("[aws]\naccess_key_id = \"x\"\n", &[]).unwrap_err().0;
        assert!(e.contains("aws.access_key_id"), "{e}");
        let e = load(
            "[aws]\nattempt_timeout_ms = 5000\noperation_timeout_ms = 1000\n",
            &[],
        )
        .unwrap_err()
        .0;
        assert!(e.contains("aws.operation_timeout_ms"), "{e}");
        let e = load("[aws]\nmax_attempts = 0\n", &[]).unwrap_err().0;
        assert!(e.contains("aws.max_attempts"), "{e}");
        let c = load("", &[("KMS_SIDECAR_AWS__REGION", "eu-west-1")]).unwrap();
        assert_eq!(c.aws.unwrap().region.as_deref(), Some("eu-west-1"));
    }

    #[test]
    fn principals_and_roots_parse() {
        let c = load(
            r#"
[[roots]]
kind = "keyfile"
path = "/etc/kms/root.key"
passphrase_env = "ROOT_PASS"

[[principals]]
name = "billing"
unix_uids = [1000]
tenants = ["acme-*"]
operations = ["seal", "open"]
"#,
            &[("ROOT_PASS", "correct horse")],
        )
        .unwrap();
        assert!(c.passphrase("ROOT_PASS").is_some());
        let e = load(
            "[[roots]]\nkind = \"keyfile\"\npath = \"k\"\npassphrase_env = \"NOPE\"\n",
            &[],
        )
        .unwrap_err()
        .0;
        assert!(
            e.contains("roots[0].passphrase_env") && e.contains("NOPE"),
            "{e}"
        );
        let p = &c.principals().unwrap()[0];
        assert_eq!(p.unix_uids, vec![1000]);
        assert!(p.operations.contains(&Operation::Seal));
        assert!(!p.operations.contains(&Operation::Datakey));
        assert!(
            matches!(&c.roots()[0], RootConfig::Keyfile { passphrase_env: Some(v), .. } if v == "ROOT_PASS")
        );
    }

    #[test]
    fn store_url_selects_postgres_and_excludes_sqlite_path() {
        let c = Config::load(None, Vec::new()).unwrap();
        assert!(
            matches!(c.store_engine().unwrap(), StoreEngine::Sqlite(p) if p == Path::new("./data/store.db"))
        );
        let c = load(
            "[store]\nurl = \"postgres://kms:pw-123@db.internal/kms?sslmode=verify-full\"\n",
            &[],
        )
        .unwrap();
        assert!(matches!(
            c.store_engine().unwrap(),
            StoreEngine::Postgres(_)
        ));
        assert!(
            !format!("{c:?}").contains("pw-123"),
            "the URL's password is never printed"
        );
        let e = load(
            "[store]\nurl = \"postgres://db/kms\"\nsqlite_path = \"/x.db\"\n",
            &[],
        )
        .unwrap_err()
        .0;
        assert!(
            e.contains("store.url") && e.contains("store.sqlite_path"),
            "{e}"
        );
        let e = load("", &[("KMS_SIDECAR_STORE__URL", "mysql://u:pw-123@db/kms")])
            .unwrap_err()
            .0;
        assert!(e.starts_with("store.url") && !e.contains("pw-123"), "{e}");
        let e = load("[store]\nurl = \"postgres://db/kms\"\npool_size = 0\n", &[])
            .unwrap_err()
            .0;
        assert!(e.contains("store.pool_size"), "{e}");
        let e = load(
            "[store]\nurl = \"postgres://db/kms\"\nstatement_timeout_seconds = 0\n",
            &[],
        )
        .unwrap_err()
        .0;
        assert!(e.contains("store.statement_timeout_seconds"), "{e}");
    }
}
