//! The `kms-sidecar` command line: parses arguments, loads configuration once, and runs one
//! command. Exit codes: 0 ok, 2 usage or configuration error, 1 runtime failure.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use secrecy::SecretString;

use kms_sidecar::api::auth::token_sha256;
use kms_sidecar::config::{Config, RootConfig};
use kms_sidecar::keyring::KeyringStore;
use kms_sidecar::providers::RootProvider;
use kms_sidecar::providers::keyfile::{KdfParams, create_keyfile};
use kms_sidecar::providers::pkcs11::{self, Pkcs11Config, Pkcs11Root};
use kms_sidecar::server::{self, StartError};
use kms_sidecar::tenant::TenantId;

#[derive(Parser)]
#[command(
    name = "kms-sidecar",
    version,
    about = "Envelope-encryption sidecar: per-tenant data keys under a root key, AES-256-GCM seal/open over HTTP"
)]
struct Cli {
    /// TOML configuration file (every key can be overridden by KMS_SIDECAR_* variables).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Data directory (overrides `data_dir`).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API on the Unix socket and (optionally) loopback TCP.
    Serve {
        /// Development defaults: ./data, a keyfile root created if missing, auto-created
        /// tenants, TCP 127.0.0.1:8787 and a `dev` principal allowed everything.
        #[arg(long)]
        dev: bool,
    },
    /// Offline keyfile roots.
    Keyfile {
        #[command(subcommand)]
        command: KeyfileCommand,
    },
    /// Bearer tokens for principals.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Tenants in the store.
    Tenants {
        #[command(subcommand)]
        command: TenantsCommand,
    },
    /// Key versions of a tenant.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// PKCS#11 HSM roots: check the setup, create the root key.
    Hsm {
        #[command(subcommand)]
        command: HsmCommand,
    },
}

#[derive(Subcommand)]
enum HsmCommand {
    /// Load the module, find the token, log in, find the key, and run a wrap/unwrap self-test
    /// with every mechanism the token offers, printing each step.
    Check {
        #[command(flatten)]
        root: HsmRootArgs,
    },
    /// Create the root key: AES-256, a token object, private, sensitive, not extractable,
    /// usable only to encrypt and decrypt. Refuses a label already in use.
    InitKey {
        /// CKA_LABEL of the new key (put it in `key_label`).
        #[arg(long)]
        label: String,
        /// CKA_ID of the new key, in hex (default: 8 random bytes).
        #[arg(long)]
        id: Option<String>,
        #[command(flatten)]
        root: HsmRootArgs,
    },
}

/// The PKCS#11 root to use: the configuration's first `kind = "pkcs11"` root, with these
/// flags overriding its settings (or standing in for it when the configuration has none).
#[derive(clap::Args)]
struct HsmRootArgs {
    /// PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so.
    #[arg(long)]
    module: Option<PathBuf>,
    #[arg(long, conflicts_with = "slot_id")]
    token_label: Option<String>,
    #[arg(long)]
    slot_id: Option<u64>,
    /// File holding the user PIN (mode 0600).
    #[arg(long, conflicts_with = "pin_env")]
    pin_file: Option<PathBuf>,
    /// Environment variable holding the user PIN.
    #[arg(long)]
    pin_env: Option<String>,
    #[arg(long)]
    key_label: Option<String>,
    /// CKA_ID in hex.
    #[arg(long)]
    key_id: Option<String>,
}

#[derive(Subcommand)]
enum KeyfileCommand {
    /// Write a new 256-bit root key to FILE (mode 0600; never overwrites).
    New {
        #[arg(long)]
        out: PathBuf,
        /// Seal the key under the passphrase in this environment variable (Argon2id).
        #[arg(long)]
        passphrase_env: Option<String>,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a new random bearer token and the SHA-256 to put in `token_sha256`.
    New,
}

#[derive(Subcommand)]
enum TenantsCommand {
    /// List tenants with their active key version.
    List,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// List a tenant's key versions, states and roots.
    List { tenant: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(StartError::Config(m)) => {
            eprintln!("kms-sidecar: {m}");
            ExitCode::from(2)
        }
        Err(StartError::Runtime(m)) => {
            eprintln!("kms-sidecar: {m}");
            ExitCode::from(1)
        }
    }
}

fn load_config(cli: &Cli) -> Result<Config, StartError> {
    // vars_os: an unrelated variable that is not UTF-8 must not abort the start.
    let env = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
    let mut config =
        Config::load(cli.config.as_deref(), env).map_err(|e| StartError::Config(e.to_string()))?;
    if let Some(dir) = &cli.data_dir {
        config.data_dir = dir.clone();
    }
    Ok(config)
}

fn runtime() -> Result<tokio::runtime::Runtime, StartError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| StartError::Runtime(format!("cannot start the runtime: {e}")))
}

fn run(cli: Cli) -> Result<(), StartError> {
    match &cli.command {
        Command::Serve { dev } => {
            let mut config = load_config(&cli)?;
            init_logging(&config.log)?;
            let dev = if *dev {
                Some(server::prepare_dev(
                    &mut config,
                    nix::unistd::getuid().as_raw(),
                )?)
            } else {
                None
            };
            runtime()?.block_on(serve(config, dev))
        }
        Command::Keyfile {
            command:
                KeyfileCommand::New {
                    out,
                    passphrase_env,
                },
        } => {
            let pass = match passphrase_env {
                Some(var) => Some(SecretString::from(std::env::var(var).map_err(|_| {
                    StartError::Config(format!(
                        "--passphrase-env: environment variable {var} is not set"
                    ))
                })?)),
                None => None,
            };
            create_keyfile(out, pass.as_ref(), KdfParams::default())
                .map_err(StartError::Runtime)?;
            println!(
                "wrote a new root key to {}{}",
                out.display(),
                if pass.is_some() {
                    " (sealed with Argon2id)"
                } else {
                    ""
                }
            );
            Ok(())
        }
        Command::Token {
            command: TokenCommand::New,
        } => {
            let token = server::new_token().map_err(StartError::Runtime)?;
            println!("token:        {}", token.as_str());
            println!("token_sha256: {}", hex::encode(token_sha256(&token)));
            Ok(())
        }
        Command::Tenants {
            command: TenantsCommand::List,
        } => {
            let config = load_config(&cli)?;
            runtime()?.block_on(async {
                let store = server::open_store(&config)?;
                let tenants = store
                    .tenants()
                    .await
                    .map_err(|e| StartError::Runtime(e.to_string()))?;
                println!(
                    "{:<40} {:>14} {:>12}",
                    "TENANT", "ACTIVE_VERSION", "CREATED_AT"
                );
                for t in tenants {
                    println!(
                        "{:<40} {:>14} {:>12}",
                        t.tenant, t.active_version, t.created_at
                    );
                }
                Ok(())
            })
        }
        Command::Keys {
            command: KeysCommand::List { tenant },
        } => {
            let config = load_config(&cli)?;
            let tenant =
                TenantId::parse(tenant).map_err(|e| StartError::Config(format!("TENANT: {e}")))?;
            runtime()?.block_on(async {
                let store = server::open_store(&config)?;
                let versions = store
                    .key_versions(&tenant)
                    .await
                    .map_err(|e| StartError::Runtime(e.to_string()))?;
                if versions.is_empty() {
                    return Err(StartError::Runtime(format!("tenant {tenant} not found")));
                }
                println!(
                    "{:>8} {:<13} {:>12}  ROOTS",
                    "VERSION", "STATE", "CREATED_AT"
                );
                for v in versions {
                    let roots: Vec<String> =
                        v.wrappings.iter().map(|w| w.root.to_string()).collect();
                    println!(
                        "{:>8} {:<13} {:>12}  {}",
                        v.version,
                        v.state,
                        v.created_at,
                        roots.join(",")
                    );
                }
                Ok(())
            })
        }
        Command::Hsm { command } => {
            let mut config = load_config(&cli)?;
            hsm(&mut config, command)
        }
    }
}

/// The PKCS#11 settings for `hsm` commands: the config's first pkcs11 root, then the flags.
fn hsm_root(config: &mut Config, args: &HsmRootArgs) -> Result<Pkcs11Config, StartError> {
    let base = config.roots.iter().find_map(|r| match r {
        RootConfig::Pkcs11(p) => Some(p.clone()),
        _ => None,
    });
    let mut p = match (base, &args.module) {
        (Some(p), _) => p,
        (None, Some(module)) => Pkcs11Config {
            module: module.clone(),
            token_label: None,
            slot_id: None,
            pin_file: None,
            pin_env: None,
            key_label: None,
            key_id: None,
            sessions: pkcs11::DEFAULT_SESSIONS,
            mechanism: Default::default(),
        },
        (None, None) => {
            return Err(StartError::Config(
                "no [[roots]] with kind = \"pkcs11\" in the configuration: pass --config, or --module with --token-label/--slot-id and --pin-file/--pin-env".into(),
            ));
        }
    };
    if let Some(m) = &args.module {
        p.module = m.clone();
    }
    if args.token_label.is_some() || args.slot_id.is_some() {
        p.token_label = args.token_label.clone();
        p.slot_id = args.slot_id;
    }
    if args.pin_file.is_some() || args.pin_env.is_some() {
        p.pin_file = args.pin_file.clone();
        p.pin_env = args.pin_env.clone();
    }
    if args.key_label.is_some() || args.key_id.is_some() {
        p.key_label = args.key_label.clone();
        p.key_id = args.key_id.clone();
    }
    if let Some(var) = &args.pin_env {
        let pin = std::env::var(var).map_err(|_| {
            StartError::Config(format!("--pin-env: environment variable {var} is not set"))
        })?;
        config
            .pins
            .insert(var.clone(), std::sync::Arc::new(SecretString::from(pin)));
    }
    Ok(p)
}

fn hsm(config: &mut Config, command: &HsmCommand) -> Result<(), StartError> {
    match command {
        HsmCommand::Check { root } => {
            let p = hsm_root(config, root)?;
            p.validate()
                .map_err(|(k, m)| StartError::Config(format!("pkcs11 {k}: {m}")))?;
            let pin = server::pkcs11_pin(config, &p)?;
            println!("checking the PKCS#11 root");
            let root = Pkcs11Root::connect_reporting(&p, pin, &mut |step, detail| {
                println!("  ok    {step:<10} {detail}");
            })
            .map_err(|e| {
                println!("  FAIL  {e}");
                StartError::Config(e.to_string())
            })?;
            runtime()?.block_on(async {
                for &m in root.supported_mechanisms() {
                    if m == root.mechanism() {
                        continue;
                    }
                    match root.self_test(m).await {
                        Ok(()) => println!(
                            "  ok    {:<10} {} also round-trips (usable with mechanism = {:?})",
                            "self-test",
                            m.ckm(),
                            m.name()
                        ),
                        Err(e) => {
                            println!("  FAIL  self-test with {}: {e}", m.ckm());
                            return Err(StartError::Runtime(e.to_string()));
                        }
                    }
                }
                Ok(())
            })?;
            println!("root id: {}", root.id());
            Ok(())
        }
        HsmCommand::InitKey { label, id, root } => {
            let mut p = hsm_root(config, root)?;
            p.key_label = Some(label.clone());
            p.key_id = id.clone();
            p.validate()
                .map_err(|(k, m)| StartError::Config(format!("pkcs11 {k}: {m}")))?;
            let id = id
                .as_deref()
                .map(hex::decode)
                .transpose()
                .map_err(|_| StartError::Config("--id: not hex".into()))?;
            let pin = server::pkcs11_pin(config, &p)?;
            let key = pkcs11::create_key(&p, &pin, label, id)
                .map_err(|e| StartError::Config(e.to_string()))?;
            println!(
                "created AES-256 key {:?} (id {}) on token {:?}: token object, private, sensitive, not extractable, encrypt/decrypt only",
                key.label,
                hex::encode(&key.id),
                key.token_label
            );
            println!(
                "root config: kind = \"pkcs11\", key_label = {:?}, key_id = \"{}\"",
                key.label,
                hex::encode(&key.id)
            );
            Ok(())
        }
    }
}

fn init_logging(filter: &str) -> Result<(), StartError> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| StartError::Config(format!("log: {e}")))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    Ok(())
}

async fn serve(config: Config, dev: Option<server::DevSetup>) -> Result<(), StartError> {
    let running = server::start(&config).await?;
    println!("kms-sidecar serving");
    if let Some(p) = &running.unix_socket {
        println!("  unix socket: {}", p.display());
    }
    if let Some(a) = running.tcp_addr {
        println!("  tcp:         http://{a}");
    }
    if let Some(dev) = &dev {
        if let Some(k) = &dev.created_keyfile {
            println!("  created a development root key at {}", k.display());
        }
        match &dev.new_token {
            Some(t) => println!(
                "  dev token:   {t}\n               (shown once; saved to {})",
                dev.token_path.display()
            ),
            None => println!("  dev token:   in {}", dev.token_path.display()),
        }
        println!("Try:");
        if let Some(p) = &running.unix_socket {
            println!(
                "  curl -s --unix-socket {} -X POST http://localhost/v1/tenants/demo/seal -H 'content-type: application/json' -d '{{\"plaintext\":\"aGVsbG8=\"}}'",
                p.display()
            );
        }
        if let Some(a) = running.tcp_addr {
            println!(
                "  curl -s -H \"Authorization: Bearer $(cat {})\" -X POST http://{a}/v1/tenants/demo/seal -H 'content-type: application/json' -d '{{\"plaintext\":\"aGVsbG8=\"}}'",
                dev.token_path.display()
            );
        }
    }
    tracing::info!("serving");
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| StartError::Runtime(format!("cannot install SIGTERM handler: {e}")))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = sigterm.recv() => {}
    }
    tracing::info!("shutting down");
    running.stop().await;
    Ok(())
}
