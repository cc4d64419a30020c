//! Assembles a running sidecar from a `Config`: opens the store, loads the roots, builds the key
//! ring and principals, prepares `--dev` defaults, binds the listeners and serves until stopped.
//! Used by `main` and by the integration tests, so both start the same thing.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use zeroize::Zeroizing;

use crate::api::auth::{Authenticator, Principal, token_sha256};
use crate::api::{self, AppState};
use crate::config::{Config, RootConfig, StoreEngine};
use crate::keyring::{Keyring, KeyringStore};
use crate::providers::RootProvider;
use crate::providers::keyfile::{KdfParams, KeyfileRoot, create_keyfile};
use crate::providers::pkcs11::{Pkcs11Config, Pkcs11Root};
use crate::store::{PostgresStore, SqliteStore, Store};

/// Why a sidecar could not start: `Config` errors exit 2, `Runtime` errors exit 1.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Runtime(String),
}

/// What `--dev` set up, for printing. No `Debug`: it may hold the new token.
pub struct DevSetup {
    pub token_path: PathBuf,
    /// The token, only when it was created by this start (shown once).
    pub new_token: Option<String>,
    pub created_keyfile: Option<PathBuf>,
}

/// Applies the `--dev` defaults: data dir, keyfile root (created if missing), auto-created
/// tenants, TCP on 127.0.0.1:8787 unless configured, and a `dev` principal allowed everything:
/// this process's uid on the socket and a bearer token kept in `<data_dir>/dev-token` (0600).
pub fn prepare_dev(config: &mut Config, uid: u32) -> Result<DevSetup, StartError> {
    ensure_private_dir(&config.data_dir)?;
    config.auto_create_tenants = true;
    if config.listen.tcp.is_none() {
        config.listen.tcp = Some("127.0.0.1:8787".into());
    }
    let mut created_keyfile = None;
    for root in config.roots() {
        let RootConfig::Keyfile {
            path,
            passphrase_env: None,
        } = root
        else {
            continue;
        };
        if !path.exists() {
            create_keyfile(&path, None, KdfParams::default()).map_err(StartError::Runtime)?;
            created_keyfile = Some(path);
        }
    }
    let token_path = config.data_dir.join("dev-token");
    let (token, new_token) = match std::fs::read_to_string(&token_path) {
        Ok(t) => {
            check_private_file(&token_path)?;
            let t = Zeroizing::new(t.trim().to_owned());
            if !crate::api::auth::plausible_token(&t) {
                return Err(StartError::Runtime(format!(
                    "{} does not hold a usable token; delete it to make a new one",
                    token_path.display()
                )));
            }
            (t, None)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = new_token().map_err(StartError::Runtime)?;
            write_private(&token_path, format!("{}\n", token.as_str()).as_bytes())?;
            (token.clone(), Some(token.to_string()))
        }
        Err(e) => {
            return Err(StartError::Runtime(format!(
                "cannot read {}: {e}",
                token_path.display()
            )));
        }
    };
    config.principals.retain(|p| p.name != "dev");
    config.principals.push(crate::config::PrincipalConfig {
        name: "dev".into(),
        unix_uids: vec![uid],
        unix_gids: vec![],
        token_sha256: vec![hex::encode(token_sha256(&token))],
        tenants: vec!["*".into()],
        operations: vec!["*".into()],
    });
    Ok(DevSetup {
        token_path,
        new_token,
        created_keyfile,
    })
}

/// A new random bearer token: `kms_` and 256 bits, URL-safe base64.
pub fn new_token() -> Result<Zeroizing<String>, String> {
    let mut raw = Zeroizing::new([0u8; 32]);
    crate::crypto::fill_random(raw.as_mut_slice()).map_err(|e| e.to_string())?;
    Ok(Zeroizing::new(format!(
        "kms_{}",
        URL_SAFE_NO_PAD.encode(raw.as_slice())
    )))
}

/// Refuses a secret file that another user owns or that group or others may access, as ssh
/// does for private keys: such a file may have been planted or read.
pub fn check_private_file(path: &Path) -> Result<(), StartError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| StartError::Config(format!("cannot read {}: {e}", path.display())))?;
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(StartError::Config(format!(
            "{} is owned by uid {}, not by this process",
            path.display(),
            meta.uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(StartError::Config(format!(
            "{} is accessible by group or others (mode {:o}); chmod 600 it",
            path.display(),
            meta.mode() & 0o777
        )));
    }
    Ok(())
}

fn ensure_private_dir(dir: &Path) -> Result<(), StartError> {
    if dir.is_dir() {
        use std::os::unix::fs::MetadataExt;
        if let Ok(meta) = std::fs::metadata(dir)
            && meta.mode() & 0o022 != 0
        {
            tracing::warn!(dir = %dir.display(), mode = format!("{:o}", meta.mode() & 0o777),
                "data directory is writable by group or others");
        }
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| StartError::Runtime(format!("cannot create {}: {e}", dir.display())))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), StartError> {
    let err =
        |e: std::io::Error| StartError::Runtime(format!("cannot write {}: {e}", path.display()));
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(err)
}

/// The AWS connection type; uninhabited in builds without the `aws` feature.
#[cfg(feature = "aws")]
pub type AwsConnection = crate::providers::aws_kms::AwsConnection;
#[cfg(not(feature = "aws"))]
pub type AwsConnection = std::convert::Infallible;

/// The configured AWS connection (`[aws]`), shared by `aws-kms` roots and customer-managed keys.
#[cfg(not(feature = "aws"))]
pub fn aws_connection(_config: &Config) -> Option<AwsConnection> {
    None
}

/// The configured AWS connection (`[aws]`), shared by `aws-kms` roots and customer-managed keys.
#[cfg(feature = "aws")]
pub fn aws_connection(config: &Config) -> Option<AwsConnection> {
    use crate::providers::aws_kms::{AwsSettings, StaticCredentials};
    let aws = config.aws.as_ref()?;
    let ms = Duration::from_millis;
    let credentials = match (&aws.access_key_id, &aws.secret_access_key) {
        (Some(id), Some(secret)) => Some(StaticCredentials {
            access_key_id: id.clone(),
            secret_access_key: secret.clone(),
            session_token: aws.session_token.clone(),
        }),
        _ => None,
    };
    Some(AwsConnection::new(AwsSettings {
        region: aws.region.clone(),
        endpoint_url: aws.endpoint_url.clone(),
        credentials,
        connect_timeout: ms(aws.connect_timeout_ms),
        attempt_timeout: ms(aws.attempt_timeout_ms),
        operation_timeout: ms(aws.operation_timeout_ms),
        max_attempts: aws.max_attempts,
        initial_backoff: ms(aws.initial_backoff_ms),
        max_backoff: ms(aws.max_backoff_ms),
    }))
}

/// What makes the roots tenants are bound to (BYOK): the AWS connection, if configured.
#[cfg(feature = "aws")]
fn root_factory(aws: Option<AwsConnection>) -> Option<Arc<dyn crate::providers::RootFactory>> {
    aws.map(|c| Arc::new(c) as Arc<dyn crate::providers::RootFactory>)
}

#[cfg(not(feature = "aws"))]
fn root_factory(_aws: Option<AwsConnection>) -> Option<Arc<dyn crate::providers::RootFactory>> {
    None
}

/// Loads every configured root, in order.
pub fn load_roots(config: &Config) -> Result<Vec<Arc<dyn RootProvider>>, StartError> {
    load_roots_with(config, aws_connection(config).as_ref())
}

/// Loads every configured root, in order; `aws-kms` roots use `aws`.
pub fn load_roots_with(
    config: &Config,
    aws: Option<&AwsConnection>,
) -> Result<Vec<Arc<dyn RootProvider>>, StartError> {
    config
        .roots()
        .iter()
        .enumerate()
        .map(|(i, root)| match root {
            RootConfig::Keyfile {
                path,
                passphrase_env,
            } => {
                let pass = passphrase_env.as_deref().and_then(|v| config.passphrase(v));
                check_private_file(path)
                    .map_err(|e| StartError::Config(format!("roots[{i}]: {e}")))?;
                KeyfileRoot::load(path, pass)
                    .map(|r| Arc::new(r) as Arc<dyn RootProvider>)
                    .map_err(|e| StartError::Config(format!("roots[{i}]: {e}")))
            }
            RootConfig::Pkcs11(p) => {
                let pin = pkcs11_pin(config, p)
                    .map_err(|e| StartError::Config(format!("roots[{i}]: {e}")))?;
                Pkcs11Root::connect(p, pin)
                    .map(|r| Arc::new(r) as Arc<dyn RootProvider>)
                    .map_err(|e| StartError::Config(format!("roots[{i}]: {e}")))
            }
            #[cfg(feature = "aws")]
            RootConfig::AwsKms { key_id } => {
                let conn = aws.ok_or_else(|| {
                    StartError::Config(format!("roots[{i}]: kind = \"aws-kms\" needs [aws]"))
                })?;
                conn.root(key_id)
                    .map(|r| Arc::new(r) as Arc<dyn RootProvider>)
                    .map_err(|e| StartError::Config(format!("roots[{i}]: {e}")))
            }
            #[cfg(not(feature = "aws"))]
            RootConfig::AwsKms { .. } => {
                let _ = aws;
                Err(StartError::Config(format!(
                    "roots[{i}]: kind = \"aws-kms\" needs a build with the `aws` cargo feature"
                )))
            }
        })
        .collect()
}

/// The user PIN of a PKCS#11 root: from `pin_file` (which must be private to this user, like a
/// keyfile; one trailing newline is ignored) or from the variable `pin_env` named at load time.
pub fn pkcs11_pin(config: &Config, p: &Pkcs11Config) -> Result<secrecy::SecretString, StartError> {
    match (&p.pin_file, &p.pin_env) {
        (Some(path), _) => {
            check_private_file(path)?;
            let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
                StartError::Config(format!("pin_file {}: cannot read: {e}", path.display()))
            })?);
            let pin = text
                .strip_suffix('\n')
                .map(|t| t.strip_suffix('\r').unwrap_or(t))
                .unwrap_or(&text);
            if pin.is_empty() {
                return Err(StartError::Config(format!(
                    "pin_file {}: the file is empty",
                    path.display()
                )));
            }
            Ok(secrecy::SecretString::from(pin))
        }
        (None, Some(var)) => config.pin(var).cloned().ok_or_else(|| {
            StartError::Config(format!("pin_env: environment variable {var} is not set"))
        }),
        (None, None) => Err(StartError::Config("set pin_file or pin_env".into())),
    }
}

/// Opens the configured store: the SQLite file, or the PostgreSQL database (connecting and
/// migrating, bounded by `store.connect_timeout_seconds`).
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, StartError> {
    match config
        .store_engine()
        .map_err(|e| StartError::Config(e.to_string()))?
    {
        StoreEngine::Sqlite(path) => {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                ensure_private_dir(parent)?;
            }
            SqliteStore::open(&path)
                .map(|s| Arc::new(s) as Arc<dyn Store>)
                .map_err(|e| StartError::Runtime(format!("store {}: {e}", path.display())))
        }
        StoreEngine::Postgres(options) => PostgresStore::connect(&options)
            .await
            .map(|s| Arc::new(s) as Arc<dyn Store>)
            .map_err(|e| StartError::Runtime(format!("store {}: {e}", options.describe()))),
    }
}

/// A sidecar serving in the background.
pub struct Running {
    pub unix_socket: Option<PathBuf>,
    pub tcp_addr: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    /// Change feed, audit aggregation, automatic rotation.
    background: Vec<JoinHandle<()>>,
    audit: crate::audit::Audit,
}

impl Running {
    /// Stops accepting, drains connections (bounded), removes the socket file.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
        for t in &self.background {
            t.abort();
        }
        self.audit.flush_aggregate();
        if let Err(e) = self.audit.flush().await {
            tracing::error!(error = %e, "audit records may be lost at shutdown");
        }
        if let Some(p) = &self.unix_socket {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Waits until the server stops on its own (it does not, unless stopped).
    pub async fn wait(&mut self) {
        let _ = (&mut self.task).await;
    }
}

/// Builds everything from `config`, binds the listeners and starts serving.
pub async fn start(config: &Config) -> Result<Running, StartError> {
    let principals: Vec<Principal> = config
        .principals()
        .map_err(|e| StartError::Config(e.to_string()))?;
    // Roots first: a refused root must not leave a fresh data dir or store behind. Loading
    // blocks (Argon2id, PKCS#11 login and self-test), so it runs off the reactor.
    let aws = aws_connection(config);
    let roots = {
        let (config, aws) = (config.clone(), aws.clone());
        tokio::task::spawn_blocking(move || load_roots_with(&config, aws.as_ref()))
            .await
            .map_err(|e| StartError::Runtime(format!("loading the roots failed: {e}")))??
    };
    #[cfg(feature = "aws")]
    if let Some(aws) = &aws {
        aws.check()
            .await
            .map_err(|e| StartError::Config(e.to_string()))?;
    }
    let store = open_store(config).await?;
    let vault_store: Arc<dyn crate::vault::VaultStore> = store.clone();
    let store: Arc<dyn KeyringStore> = store;
    let keyring = Keyring::with_parts(
        store,
        roots,
        root_factory(aws),
        config.keyring_options(),
        Arc::new(crate::metrics::Metrics::default()),
    )
    .map_err(|e| StartError::Config(e.to_string()))?;
    let audit = crate::audit::Audit::open(config.audit_options())
        .map_err(|e| StartError::Runtime(format!("audit: {e}")))?;
    let mut background = vec![keyring.follow_changes(Duration::from_millis(250))];
    {
        let audit = audit.clone();
        background.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                audit.flush_aggregate();
            }
        }));
    }
    if config.rotation_enabled() {
        let (kr, cfg, audit) = (keyring.clone(), config.clone(), audit.clone());
        background.push(tokio::spawn(async move {
            let mut tick =
                tokio::time::interval(Duration::from_secs(cfg.rotation.check_interval_seconds));
            loop {
                tick.tick().await;
                match kr.rotate_due(|t| cfg.rotation_period(t)).await {
                    Ok(rotated) => {
                        for t in rotated {
                            audit.event(crate::audit::Record {
                                operation: "admin.rotate".into(),
                                outcome: "ok".into(),
                                principal: Some("auto-rotation".into()),
                                tenant: Some(t.to_string()),
                                ..Default::default()
                            });
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "automatic rotation failed"),
                }
            }
        }));
    }
    let vault = crate::vault::Vault::new(keyring.clone(), vault_store);
    {
        let (vault, every) = (vault.clone(), config.vault.sweep_interval_seconds);
        background.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(every));
            loop {
                tick.tick().await;
                match vault.sweep().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(tokens = n, "expired tokens deleted"),
                    Err(e) => tracing::warn!(error = %e, "token sweep failed"),
                }
            }
        }));
    }
    let state = Arc::new(AppState {
        keyring,
        auth: Authenticator::new(principals),
        limits: config.limits(),
        audit: audit.clone(),
        shred_window: Duration::from_secs(config.shred.approval_window_seconds),
        vault,
    });
    let mode = config
        .socket_mode()
        .map_err(|e| StartError::Config(e.to_string()))?;
    let unix_socket = config.unix_socket();
    let unix = match &unix_socket {
        Some(p) => Some(api::bind_unix(p, mode).map_err(|e| StartError::Runtime(e.to_string()))?),
        None => None,
    };
    let tcp = match &config.listen.tcp {
        Some(addr) => Some(
            api::bind_tcp(addr)
                .await
                .map_err(|e| StartError::Config(format!("listen.tcp: {e}")))?,
        ),
        None => None,
    };
    let tcp_addr = tcp.as_ref().and_then(|l| l.local_addr().ok());
    if unix.is_none() && tcp.is_none() {
        return Err(StartError::Config(
            "listen: neither a Unix socket nor TCP is configured".into(),
        ));
    }
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(api::serve(
        state,
        unix,
        tcp,
        async move {
            let _ = rx.await;
        },
        Duration::from_secs(10),
    ));
    Ok(Running {
        unix_socket,
        tcp_addr,
        stop: Some(tx),
        task,
        background,
        audit,
    })
}
