//! The `kms-sidecar` command line: parses arguments, loads configuration once, and runs one
//! command. Exit codes: 0 ok, 2 usage or configuration error, 1 runtime failure.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use secrecy::SecretString;

use kms_sidecar::api::auth::token_sha256;
use kms_sidecar::config::{Config, RootConfig};
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
    /// Destroy key material, with a second admin's approval (through the running sidecar).
    Shred {
        #[command(subcommand)]
        command: ShredCommand,
    },
    /// Root keys: move every stored key version to another root.
    Roots {
        #[command(subcommand)]
        command: RootsCommand,
    },
    /// The audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// PKCS#11 HSM roots: check the setup, create the root key.
    Hsm {
        #[command(subcommand)]
        command: HsmCommand,
    },
    /// Health probe for supervisors (Kubernetes exec probes): GET /healthz (or /readyz with
    /// --ready) over the Unix socket; exit 0 if it answers 200 within 3 s, 1 otherwise.
    Probe {
        /// Ask /readyz (store and first root reachable) instead of /healthz (process alive).
        #[arg(long)]
        ready: bool,
        #[command(flatten)]
        remote: Remote,
    },
}

/// How admin commands reach the running sidecar.
#[derive(clap::Args)]
struct Remote {
    /// The sidecar's Unix socket (default: the configured one). The caller is identified by
    /// its uid, as any socket client.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Environment variable holding a bearer token to identify as instead of the uid.
    #[arg(long)]
    token_env: Option<String>,
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
    /// Bind a tenant to its own AWS KMS key (BYOK) and rewrap its existing key versions under
    /// it alone, through the running sidecar. Creates the tenant if it does not exist.
    SetRoot {
        tenant: String,
        /// Key ARN, alias (alias/NAME) or key id of the customer-managed key.
        #[arg(long)]
        aws_kms_key: String,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// List a tenant's key versions, states and roots.
    List { tenant: String },
    /// Make a new version active (older ones keep opening), through the running sidecar.
    Rotate {
        /// The tenant to rotate.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        tenant: Option<String>,
        /// Rotate every tenant the caller may rotate.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Refuse opens of versions below N (`key_version_retired`), through the running sidecar.
    Retire {
        tenant: String,
        #[arg(long)]
        below: u32,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Subcommand)]
enum ShredCommand {
    /// Ask to destroy a tenant's keys (or one version); prints the approval id.
    Request {
        tenant: String,
        #[arg(long)]
        version: Option<u32>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Approve (and so execute) another admin's request.
    Approve {
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Pending requests.
    List {
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Subcommand)]
enum RootsCommand {
    /// Rewrap every stored key version under root TO (a root id, or its index in [[roots]]),
    /// removing wraps under FROM in the same step. Resumable: rerun after a crash.
    Rewrap {
        #[arg(long)]
        to: String,
        #[arg(long)]
        from: Option<String>,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify the hash chain; with no FILE, the configured log and its rotated files in order.
    Verify { files: Vec<PathBuf> },
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
    runtime_with(0)
}

/// A runtime with `workers` threads (0: one per core).
fn runtime_with(workers: usize) -> Result<tokio::runtime::Runtime, StartError> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if workers > 0 {
        b.worker_threads(workers);
    }
    b.enable_all()
        .build()
        .map_err(|e| StartError::Runtime(format!("cannot start the runtime: {e}")))
}

fn run(cli: Cli) -> Result<(), StartError> {
    match &cli.command {
        Command::Serve { dev } => {
            let mut config = load_config(&cli)?;
            init_logging(&config.log)?;
            // Before any key is loaded: no core dumps, memory locked where permitted.
            let hardening =
                kms_sidecar::os::harden(config.memory.lock).map_err(StartError::Config)?;
            tracing::info!(
                core_dumps_disabled = hardening.core_dumps_disabled,
                memory_locked = hardening.memory_locked,
                open_files_limit = hardening.open_files_limit,
                "process hardened"
            );
            if let Some(note) = &hardening.memory_note {
                tracing::warn!("{note}");
            }
            let dev = if *dev {
                Some(server::prepare_dev(
                    &mut config,
                    nix::unistd::getuid().as_raw(),
                )?)
            } else {
                None
            };
            let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
            let workers = config.serving_workers(cpus);
            tracing::info!(workers, cpus, "serving threads");
            runtime_with(workers)?.block_on(serve(config, dev))
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
                let store = server::open_store(&config).await?;
                let tenants = store
                    .tenants()
                    .await
                    .map_err(|e| StartError::Runtime(e.to_string()))?;
                println!(
                    "{:<40} {:>14} {:>12}  ROOT",
                    "TENANT", "ACTIVE_VERSION", "CREATED_AT"
                );
                for t in tenants {
                    // Tenants without their own root use the configured [[roots]].
                    let root = t.root.as_ref().map_or("-", |r| r.as_str());
                    println!(
                        "{:<40} {:>14} {:>12}  {root}",
                        t.tenant, t.active_version, t.created_at
                    );
                }
                Ok(())
            })
        }
        Command::Tenants {
            command:
                TenantsCommand::SetRoot {
                    tenant,
                    aws_kms_key,
                    remote,
                },
        } => {
            let config = load_config(&cli)?;
            runtime()?.block_on(async {
                let body = serde_json::json!({ "aws_kms_key": aws_kms_key }).to_string();
                let v = admin_call(
                    &config,
                    remote,
                    "POST",
                    &format!("/v1/tenants/{tenant}/root"),
                    Some(&body),
                )
                .await?;
                println!(
                    "{tenant}: root {}; {} live versions under it alone, {} rewrapped now",
                    v["root"].as_str().unwrap_or("?"),
                    v["versions"],
                    v["rewrapped"]
                );
                Ok(())
            })
        }
        Command::Keys {
            command:
                KeysCommand::Rotate {
                    tenant,
                    all,
                    remote,
                },
        } => {
            let config = load_config(&cli)?;
            runtime()?.block_on(async {
                let tenants = match (tenant, all) {
                    (Some(t), _) => vec![t.clone()],
                    (None, _) => {
                        let v = admin_call(&config, remote, "GET", "/v1/tenants", None).await?;
                        v["tenants"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter(|t| t["destroyed_at"].is_null())
                            .filter_map(|t| t["tenant"].as_str().map(str::to_owned))
                            .collect()
                    }
                };
                let mut failed = 0;
                for t in &tenants {
                    match admin_call(
                        &config,
                        remote,
                        "POST",
                        &format!("/v1/tenants/{t}/keys:rotate"),
                        Some("{}"),
                    )
                    .await
                    {
                        Ok(v) => println!("{t}: active version {}", v["active_version"]),
                        Err(e) => {
                            failed += 1;
                            eprintln!("{t}: {e}");
                        }
                    }
                }
                println!(
                    "rotated {} of {} tenants",
                    tenants.len() - failed,
                    tenants.len()
                );
                if failed > 0 {
                    return Err(StartError::Runtime(format!("{failed} rotations failed")));
                }
                Ok(())
            })
        }
        Command::Keys {
            command:
                KeysCommand::Retire {
                    tenant,
                    below,
                    remote,
                },
        } => {
            let config = load_config(&cli)?;
            runtime()?.block_on(async {
                let body = format!("{{\"min_decrypt_version\":{below}}}");
                let v = admin_call(
                    &config,
                    remote,
                    "POST",
                    &format!("/v1/tenants/{tenant}/keys:retire"),
                    Some(&body),
                )
                .await?;
                println!(
                    "{tenant}: versions below {} no longer open",
                    v["min_decrypt_version"]
                );
                Ok(())
            })
        }
        Command::Probe { ready, remote } => {
            let config = load_config(&cli)?;
            let path = if *ready { "/readyz" } else { "/healthz" };
            runtime()?.block_on(async {
                let call = admin_call(&config, remote, "GET", path, None);
                match tokio::time::timeout(std::time::Duration::from_secs(3), call).await {
                    Ok(Ok(_)) => {
                        println!("{path}: ok");
                        Ok(())
                    }
                    Ok(Err(e)) => Err(StartError::Runtime(format!("{path}: {e}"))),
                    Err(_) => Err(StartError::Runtime(format!("{path}: no answer within 3 s"))),
                }
            })
        }
        Command::Shred { command } => {
            let config = load_config(&cli)?;
            runtime()?.block_on(async {
                match command {
                    ShredCommand::Request {
                        tenant,
                        version,
                        remote,
                    } => {
                        let body = match version {
                            Some(v) => format!("{{\"version\":{v}}}"),
                            None => "{}".into(),
                        };
                        let v = admin_call(
                            &config,
                            remote,
                            "POST",
                            &format!("/v1/tenants/{tenant}:shred"),
                            Some(&body),
                        )
                        .await?;
                        println!(
                            "approval {} pending until {} (unix); a different admin runs:",
                            v["approval_id"].as_str().unwrap_or("?"),
                            v["expires_at"]
                        );
                        println!(
                            "  kms-sidecar shred approve {}",
                            v["approval_id"].as_str().unwrap_or("?")
                        );
                    }
                    ShredCommand::Approve { id, remote } => {
                        let v = admin_call(
                            &config,
                            remote,
                            "POST",
                            &format!("/v1/approvals/{id}:approve"),
                            Some("{}"),
                        )
                        .await?;
                        println!(
                            "shredded {} ({}), requested by {}, approved by {}",
                            v["tenant"].as_str().unwrap_or("?"),
                            v["action"].as_str().unwrap_or("?"),
                            v["requested_by"].as_str().unwrap_or("?"),
                            v["approved_by"].as_str().unwrap_or("?")
                        );
                    }
                    ShredCommand::List { remote } => {
                        let v = admin_call(&config, remote, "GET", "/v1/approvals", None).await?;
                        println!(
                            "{:<38} {:<14} {:<30} {:<16} {:>12}",
                            "APPROVAL", "ACTION", "TENANT", "REQUESTED_BY", "EXPIRES_AT"
                        );
                        for a in v["approvals"].as_array().into_iter().flatten() {
                            println!(
                                "{:<38} {:<14} {:<30} {:<16} {:>12}",
                                a["approval_id"].as_str().unwrap_or(""),
                                a["action"].as_str().unwrap_or(""),
                                a["tenant"].as_str().unwrap_or(""),
                                a["requested_by"].as_str().unwrap_or(""),
                                a["expires_at"]
                            );
                        }
                    }
                }
                Ok(())
            })
        }
        Command::Roots {
            command: RootsCommand::Rewrap { to, from },
        } => {
            let config = load_config(&cli)?;
            init_logging(&config.log)?;
            runtime()?.block_on(roots_rewrap(&config, to, from.as_deref()))
        }
        Command::Audit {
            command: AuditCommand::Verify { files },
        } => {
            let config = load_config(&cli)?;
            let files = if files.is_empty() {
                let path = config.audit_options().path;
                let mut all = kms_sidecar::audit::rotated_files(&path)
                    .map_err(|e| StartError::Runtime(e.to_string()))?;
                all.push(path);
                all
            } else {
                files.clone()
            };
            match kms_sidecar::audit::verify(&files) {
                Ok(v) => {
                    println!(
                        "ok: {} records (seq {}..{}) in {} file(s); last hash {}",
                        v.records,
                        v.first_seq,
                        v.last_seq,
                        files.len(),
                        v.last_hash
                    );
                    Ok(())
                }
                Err(e) => Err(StartError::Runtime(format!("audit chain broken: {e}"))),
            }
        }
        Command::Keys {
            command: KeysCommand::List { tenant },
        } => {
            let config = load_config(&cli)?;
            let tenant =
                TenantId::parse(tenant).map_err(|e| StartError::Config(format!("TENANT: {e}")))?;
            runtime()?.block_on(async {
                let store = server::open_store(&config).await?;
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

/// Calls the running sidecar's API over its Unix socket; non-2xx answers become errors carrying
/// the API's code and message.
async fn admin_call(
    config: &Config,
    remote: &Remote,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<serde_json::Value, StartError> {
    use http_body_util::{BodyExt, Full};
    let socket = remote
        .socket
        .clone()
        .or_else(|| config.unix_socket())
        .ok_or_else(|| StartError::Config("no Unix socket configured; pass --socket".into()))?;
    let stream = tokio::net::UnixStream::connect(&socket)
        .await
        .map_err(|e| {
            StartError::Runtime(format!(
                "cannot reach the sidecar at {}: {e}",
                socket.display()
            ))
        })?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| StartError::Runtime(format!("handshake: {e}")))?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json");
    if let Some(var) = &remote.token_env {
        let token = std::env::var(var)
            .map_err(|_| StartError::Config(format!("--token-env: {var} is not set")))?;
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let req = req
        .body(Full::new(bytes::Bytes::from(body.unwrap_or("").to_owned())))
        .map_err(|e| StartError::Runtime(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| StartError::Runtime(format!("request failed: {e}")))?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| StartError::Runtime(e.to_string()))?
        .to_bytes();
    let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    if !status.is_success() {
        return Err(StartError::Runtime(format!(
            "{} {}: {}",
            status.as_u16(),
            value["error"]["code"].as_str().unwrap_or("error"),
            value["error"]["message"].as_str().unwrap_or("")
        )));
    }
    Ok(value)
}

/// Picks a configured root by id or by index in `[[roots]]`.
fn pick_root(
    roots: &[std::sync::Arc<dyn kms_sidecar::providers::RootProvider>],
    which: &str,
    flag: &str,
) -> Result<std::sync::Arc<dyn kms_sidecar::providers::RootProvider>, StartError> {
    let found = match which.parse::<usize>() {
        Ok(i) => roots.get(i),
        Err(_) => roots.iter().find(|r| r.id().as_str() == which),
    };
    found.cloned().ok_or_else(|| {
        let known: Vec<String> = roots
            .iter()
            .enumerate()
            .map(|(i, r)| format!("{i}={}", r.id()))
            .collect();
        StartError::Config(format!(
            "{flag}: no configured root {which:?} (configured: {})",
            known.join(", ")
        ))
    })
}

async fn roots_rewrap(config: &Config, to: &str, from: Option<&str>) -> Result<(), StartError> {
    use kms_sidecar::keyring::{RewrapPlan, rewrap_roots};
    let roots = server::load_roots(config)?;
    let target = pick_root(&roots, to, "--to")?;
    let drop = match from {
        Some(f) => Some(match pick_root(&roots, f, "--from") {
            Ok(r) => r.id().clone(),
            // A root no longer configured can still be named by id, to drop its wraps.
            Err(_) if f.contains(':') => kms_sidecar::providers::RootId::new(f),
            Err(e) => return Err(e),
        }),
        None => None,
    };
    let store = server::open_store(config).await?;
    let audit = kms_sidecar::audit::Audit::open(config.audit_options())
        .map_err(|e| StartError::Runtime(format!("audit: {e}")))?;
    let user = format!("cli:uid={}", nix::unistd::getuid().as_raw());
    let detail = format!(
        "to {}{}",
        target.id(),
        drop.as_ref()
            .map(|d| format!(", dropping {d}"))
            .unwrap_or_default()
    );
    audit
        .admin(kms_sidecar::audit::Record {
            operation: "admin.roots.rewrap".into(),
            outcome: "started".into(),
            principal: Some(user.clone()),
            detail: Some(detail.clone()),
            ..Default::default()
        })
        .await
        .map_err(|e| StartError::Runtime(format!("audit: {e}; nothing was changed")))?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} key versions ({eta} left)")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let plan = RewrapPlan {
        roots: roots.clone(),
        to: target.clone(),
        drop,
    };
    let summary = rewrap_roots(store.as_ref(), &plan, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .await
    .map_err(|e| StartError::Runtime(e.to_string()))?;
    bar.finish_and_clear();
    println!(
        "root rewrap {detail}: {} live versions, {} rewrapped now, {} already done, {} destroyed skipped, {} under tenants' own roots skipped, {} failed",
        summary.versions,
        summary.rewrapped,
        summary.already_done,
        summary.destroyed,
        summary.customer_managed,
        summary.failed
    );
    let outcome = if summary.failed == 0 { "ok" } else { "error" };
    audit
        .admin(kms_sidecar::audit::Record {
            operation: "admin.roots.rewrap".into(),
            outcome: outcome.into(),
            principal: Some(user),
            count: Some(summary.rewrapped),
            detail: Some(detail),
            ..Default::default()
        })
        .await
        .map_err(|e| StartError::Runtime(format!("audit: {e}")))?;
    match summary.first_error {
        Some(e) => Err(StartError::Runtime(format!(
            "{} versions failed (first: {e}); fix the cause and rerun: finished versions are skipped",
            summary.failed
        ))),
        None => Ok(()),
    }
}
