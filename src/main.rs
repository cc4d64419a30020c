//! The `kms-sidecar` command line: parses arguments, loads configuration once, and runs one
//! command. Exit codes: 0 ok, 2 usage or configuration error, 1 runtime failure.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use secrecy::SecretString;

use kms_sidecar::api::auth::token_sha256;
use kms_sidecar::config::Config;
use kms_sidecar::keyring::KeyringStore;
use kms_sidecar::providers::keyfile::{KdfParams, create_keyfile};
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
