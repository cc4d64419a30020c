//! The PKCS#11 root against a real SoftHSM 2 token: HSM-rooted tenants across restarts, the
//! session pool under 64 concurrent cold unwraps, clear startup errors, recovery from sessions
//! closed or logged out underneath, tampered and moved blobs, and the `hsm` commands.
//!
//! SoftHSM reads SOFTHSM2_CONF once, at C_Initialize, and C_Initialize happens once per process,
//! while the tests of this file run as threads of one process. So the process gets one token
//! directory (under CARGO_TARGET_TMPDIR, named by pid), set up once by `hsm()` before the module
//! is loaded, holding one token per test, so that tests that close sessions or log out underneath
//! disturb no other test. Every test calls `hsm()` (through `with_hsm`) before anything else.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::Ulong;
use kms_sidecar::config::Config;
use kms_sidecar::crypto::DataKey;
use kms_sidecar::providers::pkcs11::blob::WrapMechanism;
use kms_sidecar::providers::pkcs11::{self, MechanismChoice, Pkcs11Config, Pkcs11Root, module};
use kms_sidecar::providers::{ProviderError, RootProvider, WrapContext, WrapPurpose};
use kms_sidecar::server::{self, StartError};
use kms_sidecar::tenant::TenantId;
use secrecy::SecretString;
use serde_json::json;
use support::*;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/hsm/softhsm-token.sh");
const BIN: &str = env!("CARGO_BIN_EXE_kms-sidecar");
const KEK: &str = "kek";
/// One token per test (labels are at most 32 bytes).
const TOKENS: &[&str] = &[
    "restart",
    "pool",
    "bad-pin",
    "close-all",
    "logout",
    "tamper",
    "moved",
    "kwp",
    "config",
];

struct Hsm {
    dir: PathBuf,
}

impl Hsm {
    fn conf(&self) -> PathBuf {
        self.dir.join("softhsm2.conf")
    }

    fn pin_file(&self, token: &str) -> PathBuf {
        self.dir.join(format!("{token}.pin"))
    }

    fn pin(&self, token: &str) -> SecretString {
        let text = std::fs::read_to_string(self.pin_file(token)).unwrap();
        SecretString::from(text.trim_end())
    }

    fn config(&self, token: &str) -> Pkcs11Config {
        Pkcs11Config {
            module: MODULE.into(),
            token_label: Some(token.into()),
            slot_id: None,
            pin_file: Some(self.pin_file(token)),
            pin_env: None,
            key_label: Some(KEK.into()),
            key_id: None,
            sessions: pkcs11::DEFAULT_SESSIONS,
            mechanism: MechanismChoice::Auto,
        }
    }

    /// A `[[roots]]` entry for the harness's `extra_toml`, with more keys of that root appended.
    fn root_toml(&self, token: &str, more: &str) -> String {
        format!(
            "[[roots]]\nkind = \"pkcs11\"\nmodule = {MODULE:?}\ntoken_label = {token:?}\npin_file = {:?}\nkey_label = {KEK:?}\n{more}\n",
            self.pin_file(token).display().to_string()
        )
    }
}

fn require_softhsm() {
    let missing = !Path::new(MODULE).exists()
        || Command::new("softhsm2-util")
            .arg("--version")
            .output()
            .is_err();
    assert!(
        !missing,
        "SoftHSM 2 is not installed ({MODULE}, softhsm2-util): apt-get install -y softhsm2 opensc \
         (./scripts/test.sh installs it)"
    );
}

fn hsm() -> &'static Hsm {
    static HSM: OnceLock<Hsm> = OnceLock::new();
    HSM.get_or_init(|| {
        require_softhsm();
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        // Directories of earlier runs whose process is gone.
        if let Ok(entries) = std::fs::read_dir(base) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("softhsm-")
                    && !Path::new("/proc").join(pid).exists()
                {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = base.join(format!("softhsm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for token in TOKENS {
            let out = Command::new(SCRIPT).arg(&dir).arg(token).output().unwrap();
            assert!(
                out.status.success(),
                "{SCRIPT} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                format!(
                    "export SOFTHSM2_CONF={}",
                    dir.join("softhsm2.conf").display()
                )
            );
        }
        // SAFETY: every test of this binary calls `hsm()` first, so the other test threads are
        // blocked in this OnceLock and no thread of the process reads the environment while it
        // is written; SoftHSM reads it afterwards, in the C_Initialize of `create_key` below.
        unsafe { std::env::set_var("SOFTHSM2_CONF", dir.join("softhsm2.conf")) };
        let hsm = Hsm { dir };
        for token in TOKENS {
            pkcs11::create_key(&hsm.config(token), &hsm.pin(token), KEK, None).unwrap();
        }
        hsm
    })
}

/// Sets the token directory up (once), then runs `test` on a multi-threaded runtime.
fn with_hsm<F, Fut>(test: F)
where
    F: FnOnce(&'static Hsm) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let h = hsm();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(test(h));
}

async fn start(h: &Hsm, token: &str, more_root: &str, more_toml: &str) -> Sidecar {
    Sidecar::start_with(Options {
        extra_toml: format!("{more_toml}\n{}", h.root_toml(token, more_root)),
        ..Options::default()
    })
    .await
}

async fn seal(s: &Sidecar, tenant: &str, pt: &[u8]) -> String {
    let r = s
        .post(
            &format!("/v1/tenants/{tenant}/seal"),
            json!({ "plaintext": b64(pt) }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.str("ciphertext")
}

async fn open(s: &Sidecar, tenant: &str, ct: &str) -> Reply {
    s.post(
        &format!("/v1/tenants/{tenant}/open"),
        json!({ "ciphertext": ct }),
    )
    .await
}

async fn opens_to(s: &Sidecar, tenant: &str, ct: &str, pt: &[u8]) {
    let r = open(s, tenant, ct).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(unb64(&r.str("plaintext")), pt);
}

fn slot_of(token: &str) -> Slot {
    let m = module::module(Path::new(MODULE)).unwrap();
    m.get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| m.get_token_info(*s).unwrap().label().trim_end() == token)
        .unwrap_or_else(|| panic!("no token {token}"))
}

/// A session of this test on the token (through the process's one module handle), logged in.
fn test_session(h: &Hsm, token: &str) -> Session {
    let m = module::module(Path::new(MODULE)).unwrap();
    let s = m.open_ro_session(slot_of(token)).unwrap();
    match s.login(UserType::User, Some(&h.pin(token))) {
        Ok(()) | Err(Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("login: {e}"),
    }
    s
}

fn kek_handle(s: &Session) -> cryptoki::object::ObjectHandle {
    let found = s
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Label(KEK.as_bytes().to_vec()),
        ])
        .unwrap();
    assert_eq!(found.len(), 1);
    found[0]
}

fn ctx<'a>(tenant: &'a TenantId, version: u32) -> WrapContext<'a> {
    WrapContext {
        tenant,
        key_version: version,
        purpose: WrapPurpose::TenantDek,
    }
}

async fn connect(cfg: Pkcs11Config, pin: SecretString) -> Result<Pkcs11Root, ProviderError> {
    tokio::task::spawn_blocking(move || Pkcs11Root::connect(&cfg, pin))
        .await
        .unwrap()
}

/// The store's only wrapped key of `tenant`: (root id, blob).
async fn stored_wrap(db: &Path, tenant: &str) -> (String, Vec<u8>) {
    use kms_sidecar::keyring::KeyringStore;
    let store = kms_sidecar::store::SqliteStore::open(db).unwrap();
    let versions = store
        .key_versions(&TenantId::parse(tenant).unwrap())
        .await
        .unwrap();
    assert_eq!(versions.len(), 1);
    assert_eq!(versions[0].wrappings.len(), 1);
    let w = &versions[0].wrappings[0];
    (w.root.to_string(), w.blob.clone())
}

#[test]
fn hsm_rooted_tenant_opens_after_a_restart_and_the_kek_never_leaves_the_token() {
    with_hsm(|h| async move {
        let shared = tempfile::tempdir().unwrap();
        let db = shared.path().join("store.db");
        let store_toml = format!("[store]\nsqlite_path = {:?}\n", db.display().to_string());

        let mut first = start(h, "restart", "", &store_toml).await;
        let ct = seal(&first, "acme", b"card 4111 1111 1111 1111").await;
        opens_to(&first, "acme", &ct, b"card 4111 1111 1111 1111").await;
        first.stop().await;

        // The data key is wrapped by the HSM: GCM format, under the stable root id.
        let (root, blob) = stored_wrap(&db, "acme").await;
        assert_eq!(root, "pkcs11:restart/kek");
        assert_eq!(blob.len(), 61);
        assert_eq!(blob[0], 0x01, "GCM format");

        let mut second = start(h, "restart", "", &store_toml).await;
        opens_to(&second, "acme", &ct, b"card 4111 1111 1111 1111").await;

        // The KEK: sensitive, never extractable, generated in the token, encrypt/decrypt only.
        let s = test_session(h, "restart");
        let kek = kek_handle(&s);
        let attrs = s
            .get_attributes(
                kek,
                &[
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::AlwaysSensitive,
                    AttributeType::NeverExtractable,
                    AttributeType::Local,
                    AttributeType::Token,
                    AttributeType::Private,
                    AttributeType::Encrypt,
                    AttributeType::Decrypt,
                    AttributeType::Wrap,
                    AttributeType::Unwrap,
                    AttributeType::ValueLen,
                ],
            )
            .unwrap();
        for a in &attrs {
            match a {
                Attribute::Sensitive(v) => assert!(*v, "CKA_SENSITIVE"),
                Attribute::Extractable(v) => assert!(!*v, "CKA_EXTRACTABLE"),
                Attribute::AlwaysSensitive(v) => assert!(*v, "CKA_ALWAYS_SENSITIVE"),
                Attribute::NeverExtractable(v) => assert!(*v, "CKA_NEVER_EXTRACTABLE"),
                Attribute::Local(v) => assert!(*v, "CKA_LOCAL: generated in the token"),
                Attribute::Token(v) => assert!(*v, "CKA_TOKEN"),
                Attribute::Private(v) => assert!(*v, "CKA_PRIVATE"),
                Attribute::Encrypt(v) => assert!(*v, "CKA_ENCRYPT"),
                Attribute::Decrypt(v) => assert!(*v, "CKA_DECRYPT"),
                Attribute::Wrap(v) => assert!(!*v, "CKA_WRAP"),
                Attribute::Unwrap(v) => assert!(!*v, "CKA_UNWRAP"),
                Attribute::ValueLen(v) => assert_eq!(**v, 32, "AES-256"),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(attrs.len(), 12);
        // Asking for the key's value is refused by the token.
        let value = s.get_attributes(kek, &[AttributeType::Value]);
        assert!(
            !matches!(&value, Ok(v) if !v.is_empty()),
            "CKA_VALUE must not be readable: {value:?}"
        );

        // The stored blob is C_Decrypt-able by the token's key, with the tenant's context as
        // AAD, and not with another tenant's.
        let acme = TenantId::parse("acme").unwrap();
        let other = TenantId::parse("acme2").unwrap();
        let hsm_open = |aad: Vec<u8>| {
            let mut iv: [u8; 12] = blob[1..13].try_into().unwrap();
            let params = GcmParams::new(&mut iv, &aad, Ulong::from(128)).unwrap();
            s.decrypt(&Mechanism::AesGcm(params), kek, &blob[13..])
        };
        assert_eq!(hsm_open(ctx(&acme, 1).aad()).unwrap().len(), 32);
        // What SoftHSM answers to a failed tag, which the root maps to UnwrapFailed.
        assert!(
            matches!(
                hsm_open(ctx(&other, 1).aad()),
                Err(Error::Pkcs11(RvError::GeneralError, _))
            ),
            "SoftHSM 2.6 reports a failed GCM tag as CKR_GENERAL_ERROR"
        );
        second.stop().await;
    });
}

#[test]
fn sixty_four_concurrent_cold_unwraps_complete_through_the_session_pool() {
    with_hsm(|h| async move {
        let shared = tempfile::tempdir().unwrap();
        let db = shared.path().join("store.db");
        let store_toml = format!("[store]\nsqlite_path = {:?}\n", db.display().to_string());
        let mut first = std::sync::Arc::new(start(h, "pool", "sessions = 4", &store_toml).await);
        let mut sealing = tokio::task::JoinSet::new();
        for i in 0..64 {
            let s = first.clone();
            sealing.spawn(async move {
                let pt = format!("message of tenant {i}");
                (i, seal(&s, &format!("t{i}"), pt.as_bytes()).await)
            });
        }
        let mut cts = sealing.join_all().await;
        cts.sort();
        std::sync::Arc::get_mut(&mut first).unwrap().stop().await;

        // A fresh sidecar has no key cached: each open below is a first use, unwrapped by the HSM.
        let second = std::sync::Arc::new(start(h, "pool", "sessions = 4", &store_toml).await);
        let started = Instant::now();
        let mut opening = tokio::task::JoinSet::new();
        for (i, ct) in cts {
            let s = second.clone();
            opening.spawn(async move {
                let r = open(&s, &format!("t{i}"), &ct).await;
                (i, r.status, r.body)
            });
        }
        let results = tokio::time::timeout(Duration::from_secs(60), opening.join_all())
            .await
            .expect("64 concurrent unwraps did not finish: deadlock?");
        let elapsed = started.elapsed();
        assert_eq!(results.len(), 64);
        for (i, status, body) in results {
            assert_eq!(
                status,
                200,
                "tenant t{i}: {}",
                String::from_utf8_lossy(&body)
            );
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(
                unb64(v["plaintext"].as_str().unwrap()),
                format!("message of tenant {i}").as_bytes()
            );
        }
        eprintln!("64 concurrent cold opens (4 sessions) took {elapsed:?}");
    });
}

fn write_config(dir: &Path, root: &str) -> Config {
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            "data_dir = {:?}\n[listen]\nunix_socket = {:?}\n{root}",
            dir.join("data").display().to_string(),
            dir.join("s.sock").display().to_string()
        ),
    )
    .unwrap();
    Config::load(Some(&path), Vec::new()).unwrap()
}

async fn start_error(config: &Config) -> String {
    match server::start(config).await {
        Err(StartError::Config(m)) => m,
        Err(StartError::Runtime(m)) => panic!("a runtime error, not a config error: {m}"),
        Ok(r) => {
            r.stop().await;
            panic!("started")
        }
    }
}

#[test]
fn wrong_pin_missing_token_or_missing_key_are_clear_startup_errors() {
    with_hsm(|h| async move {
        let dir = tempfile::tempdir().unwrap();
        let bad_pin = dir.path().join("bad.pin");
        std::fs::write(&bad_pin, "not-the-pin\n").unwrap();
        std::fs::set_permissions(
            &bad_pin,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let root = |token: &str, pin: &Path, key: &str| {
            format!(
                "[[roots]]\nkind = \"pkcs11\"\nmodule = {MODULE:?}\ntoken_label = {token:?}\npin_file = {:?}\nkey_label = {key:?}\n",
                pin.display().to_string()
            )
        };

        let e = start_error(&write_config(dir.path(), &root("bad-pin", &bad_pin, KEK))).await;
        assert!(
            e.contains("roots[0]")
                && e.contains("token \"bad-pin\"")
                && e.contains("wrong user PIN (CKR_PIN_INCORRECT)"),
            "{e}"
        );
        let good = h.pin_file("bad-pin");
        let e = start_error(&write_config(
            dir.path(),
            &root("bad-pin", &good, "no-such-key"),
        ))
        .await;
        assert!(
            e.contains("token \"bad-pin\"")
                && e.contains("no AES secret key with label \"no-such-key\""),
            "{e}"
        );
        let e = start_error(&write_config(
            dir.path(),
            &root("no-such-token", &good, KEK),
        ))
        .await;
        assert!(
            e.contains("no token labelled \"no-such-token\"") && e.contains("\"bad-pin\""),
            "names the missing token and lists those present: {e}"
        );
        let e = start_error(&write_config(
            dir.path(),
            &root("bad-pin", &good, KEK).replace(MODULE, "/nonexistent/libpkcs11.so"),
        ))
        .await;
        assert!(e.contains("/nonexistent/libpkcs11.so"), "{e}");

        // A PIN file others can read is refused before the token is asked.
        let loose = dir.path().join("loose.pin");
        std::fs::copy(&good, &loose).unwrap();
        std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        let e = start_error(&write_config(dir.path(), &root("bad-pin", &loose, KEK))).await;
        assert!(e.contains("loose.pin") && e.contains("chmod 600"), "{e}");

        // After all that, the right settings start.
        let ok = write_config(dir.path(), &root("bad-pin", &good, KEK));
        server::start(&ok)
            .await
            .map_err(|e| e.to_string())
            .unwrap()
            .stop()
            .await;
    });
}

#[test]
fn serve_with_a_wrong_pin_exits_2_naming_the_token() {
    with_hsm(|h| async move {
        let dir = tempfile::tempdir().unwrap();
        let bad_pin = dir.path().join("bad.pin");
        std::fs::write(&bad_pin, "wrong-pin-q7x3\n").unwrap();
        std::fs::set_permissions(
            &bad_pin,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = {:?}\n[[roots]]\nkind = \"pkcs11\"\nmodule = {MODULE:?}\ntoken_label = \"bad-pin\"\npin_file = {:?}\nkey_label = {KEK:?}\n",
                dir.path().join("data").display().to_string(),
                bad_pin.display().to_string()
            ),
        )
        .unwrap();
        let out = Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .env("SOFTHSM2_CONF", h.conf())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("token \"bad-pin\": login refused: wrong user PIN (CKR_PIN_INCORRECT)"),
            "{stderr}"
        );
        assert!(
            !stderr.contains("wrong-pin-q7x3"),
            "the PIN is never printed: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    });
}

/// `C_CloseAllSessions` through the same library image the sidecar uses: dlopen of a loaded
/// library returns that library, with its state. cryptoki has no safe wrapper for it.
fn close_all_sessions(slot: Slot) {
    let canonical = std::fs::canonicalize(MODULE).unwrap();
    // SAFETY: the module is already loaded and initialised in this process (by the registry),
    // so this dlopen only takes another reference to it; C_CloseAllSessions takes a slot id by
    // value and touches no memory of ours.
    let rv = unsafe {
        let lib = cryptoki_sys::Pkcs11::new(&canonical).unwrap();
        lib.C_CloseAllSessions(slot.id())
    };
    assert_eq!(rv, cryptoki_sys::CKR_OK);
}

#[test]
fn sessions_closed_underneath_are_reopened_by_the_next_requests() {
    with_hsm(|h| async move {
        let mut s = start(h, "close-all", "", "[cache]\nttl_seconds = 1\n").await;
        let ct = seal(&s, "before", b"sealed before the sessions closed").await;

        let witness = test_session(h, "close-all");
        close_all_sessions(slot_of("close-all"));
        assert!(
            matches!(
                witness.get_session_info(),
                Err(Error::Pkcs11(RvError::SessionHandleInvalid, _))
            ),
            "the sidecar's module saw C_CloseAllSessions"
        );
        std::mem::forget(witness);

        // A wrap (new tenant) and, once the cached key expired, an unwrap: both recover.
        seal(&s, "after", b"x").await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        opens_to(&s, "before", &ct, b"sealed before the sessions closed").await;
        let r = s.tcp(None, "GET", "/readyz", "").await;
        assert_eq!(r.status, 200);

        // And again: recovery is not a one-off.
        close_all_sessions(slot_of("close-all"));
        let r = s.tcp(None, "GET", "/readyz", "").await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        tokio::time::sleep(Duration::from_millis(1200)).await;
        opens_to(&s, "before", &ct, b"sealed before the sessions closed").await;
        s.stop().await;
    });
}

#[test]
fn a_logout_underneath_is_recovered_by_logging_in_again() {
    with_hsm(|h| async move {
        let mut s = start(h, "logout", "", "[cache]\nttl_seconds = 1\n").await;
        let ct = seal(&s, "before", b"sealed before the logout").await;
        // Login state belongs to the token: one logout logs every session of the process out.
        let mine = test_session(h, "logout");
        mine.logout().unwrap();
        drop(mine);

        tokio::time::sleep(Duration::from_millis(1200)).await;
        opens_to(&s, "before", &ct, b"sealed before the logout").await;
        seal(&s, "after", b"x").await;
        let r = s.tcp(None, "GET", "/readyz", "").await;
        assert_eq!(r.status, 200);
        s.stop().await;
    });
}

/// Every single-byte change of a blob, and every other context, fails as UnwrapFailed.
async fn assert_bound(root: &Pkcs11Root, blob: &[u8], tenant: &TenantId) {
    let unwrap_failed =
        |r: Result<DataKey, ProviderError>| matches!(r, Err(ProviderError::UnwrapFailed { .. }));
    for i in 0..blob.len() {
        for bit in [0x01, 0x80] {
            let mut t = blob.to_vec();
            t[i] ^= bit;
            assert!(
                unwrap_failed(root.unwrap(&t, &ctx(tenant, 1)).await),
                "byte {i} bit {bit:#x}"
            );
        }
    }
    let mut longer = blob.to_vec();
    longer.push(0);
    assert!(unwrap_failed(root.unwrap(&longer, &ctx(tenant, 1)).await));
    assert!(unwrap_failed(
        root.unwrap(&blob[..blob.len() - 1], &ctx(tenant, 1)).await
    ));
    let other = TenantId::parse("globex").unwrap();
    assert!(
        unwrap_failed(root.unwrap(blob, &ctx(&other, 1)).await),
        "another tenant"
    );
    assert!(
        unwrap_failed(root.unwrap(blob, &ctx(tenant, 2)).await),
        "another version"
    );
}

#[test]
fn tampered_or_moved_gcm_blobs_fail_to_unwrap() {
    with_hsm(|h| async move {
        let root = connect(h.config("tamper"), h.pin("tamper")).await.unwrap();
        assert_eq!(root.mechanism(), WrapMechanism::AesGcm);
        assert_eq!(root.id().as_str(), "pkcs11:tamper/kek");
        let acme = TenantId::parse("acme").unwrap();
        let dek = DataKey::generate().unwrap();
        let blob = root.wrap(&dek, &ctx(&acme, 1)).await.unwrap();
        assert_eq!((blob.len(), blob[0]), (61, 0x01));
        assert_eq!(root.unwrap(&blob, &ctx(&acme, 1)).await.unwrap(), dek);
        // A fresh IV per wrap: the same key wraps differently.
        assert_ne!(root.wrap(&dek, &ctx(&acme, 1)).await.unwrap(), blob);
        assert_bound(&root, &blob, &acme).await;
        // The root is still healthy after all those failed tags.
        root.health().await.unwrap();
        assert_eq!(root.unwrap(&blob, &ctx(&acme, 1)).await.unwrap(), dek);
    });
}

#[test]
fn aes_key_wrap_pad_is_used_when_forced_or_refused_clearly_when_the_token_lacks_it() {
    with_hsm(|h| async move {
        let auto = connect(h.config("kwp"), h.pin("kwp")).await.unwrap();
        let acme = TenantId::parse("acme").unwrap();
        let mut forced = h.config("kwp");
        forced.mechanism = MechanismChoice::AesKeyWrapPad;
        if auto
            .supported_mechanisms()
            .contains(&WrapMechanism::AesKeyWrapPad)
        {
            let root = connect(forced, h.pin("kwp")).await.unwrap();
            let dek = DataKey::generate().unwrap();
            let blob = root.wrap(&dek, &ctx(&acme, 1)).await.unwrap();
            assert_eq!((blob.len(), blob[0]), (73, 0x02));
            assert_eq!(root.unwrap(&blob, &ctx(&acme, 1)).await.unwrap(), dek);
            assert_bound(&root, &blob, &acme).await;
            // A root configured for GCM still unwraps it: the blob names its mechanism.
            assert_eq!(auto.unwrap(&blob, &ctx(&acme, 1)).await.unwrap(), dek);
        } else {
            // SoftHSM 2.6.1 as built by Debian 12 offers no CKM_AES_KEY_WRAP_PAD at all.
            let e = match connect(forced, h.pin("kwp")).await {
                Err(ProviderError::Setup(m)) => m,
                Err(e) => panic!("{e}"),
                Ok(_) => panic!("connected"),
            };
            assert!(
                e.contains("token \"kwp\"") && e.contains("CKM_AES_KEY_WRAP_PAD"),
                "{e}"
            );
            let s = test_session(h, "kwp");
            let kek = kek_handle(&s);
            assert!(matches!(
                s.encrypt(&Mechanism::AesKeyWrapPad, kek, &[0u8; 64]),
                Err(Error::Pkcs11(RvError::MechanismInvalid, _))
            ));
            // A KWP blob reaching such a token is refused as not unwrappable, not as an outage.
            let mut blob = vec![0x02];
            blob.extend_from_slice(&[0x5a; 72]);
            assert!(matches!(
                auto.unwrap(&blob, &ctx(&acme, 1)).await,
                Err(ProviderError::UnwrapFailed { .. })
            ));
            eprintln!(
                "note: this SoftHSM lacks CKM_AES_KEY_WRAP_PAD; the KWP format is covered by unit tests"
            );
        }
    });
}

#[test]
fn a_wrapped_key_moved_to_another_tenant_in_the_store_does_not_open() {
    with_hsm(|h| async move {
        let shared = tempfile::tempdir().unwrap();
        let db = shared.path().join("store.db");
        let store_toml = format!("[store]\nsqlite_path = {:?}\n", db.display().to_string());
        let mut s = start(h, "moved", "", &store_toml).await;
        let ct_a = seal(&s, "alpha", b"alpha's secret").await;
        let ct_b = seal(&s, "beta", b"beta's secret").await;
        s.stop().await;

        let (_, alpha_blob) = stored_wrap(&db, "alpha").await;
        let (_, beta_blob) = stored_wrap(&db, "beta").await;
        let set_blob = |tenant: &str, blob: &[u8]| {
            let conn = rusqlite::Connection::open(&db).unwrap();
            let n = conn
                .execute(
                    "UPDATE key_wrappings SET blob = ?1 WHERE tenant = ?2",
                    rusqlite::params![blob, tenant],
                )
                .unwrap();
            assert_eq!(n, 1);
        };
        // beta's row now holds alpha's wrapped key; alpha's a tampered copy of its own.
        set_blob("beta", &alpha_blob);
        let mut tampered = alpha_blob.clone();
        tampered[20] ^= 0x04;
        set_blob("alpha", &tampered);

        let mut s = start(h, "moved", "", &store_toml).await;
        for (tenant, ct) in [("beta", &ct_b), ("alpha", &ct_a)] {
            let r = open(&s, tenant, ct).await;
            assert_eq!(
                (r.status, r.code().as_str()),
                (400, "decrypt_failed"),
                "{tenant}"
            );
        }
        s.stop().await;

        // Put back, both open again: nothing but the blobs was wrong.
        set_blob("beta", &beta_blob);
        set_blob("alpha", &alpha_blob);
        let mut s = start(h, "moved", "", &store_toml).await;
        opens_to(&s, "alpha", &ct_a, b"alpha's secret").await;
        opens_to(&s, "beta", &ct_b, b"beta's secret").await;
        s.stop().await;
    });
}

#[test]
fn pkcs11_config_errors_name_the_key() {
    with_hsm(|h| async move {
        let dir = tempfile::tempdir().unwrap();
        let load = |root_more: &str, env: Vec<(String, String)>| {
            let path = dir.path().join("c.toml");
            std::fs::write(&path, h.root_toml("config", root_more)).unwrap();
            Config::load(Some(&path), env).map(|_| ()).unwrap_err().0
        };
        let e = load("slot_id = 1", vec![]);
        assert!(e.contains("roots[0].token_label"), "{e}");
        let e = load("sessions = 0", vec![]);
        assert!(e.contains("roots[0].sessions"), "{e}");
        let e = load("key_id = \"zz\"", vec![]);
        assert!(e.contains("roots[0].key_id"), "{e}");
        let e = load("mechanism = \"des\"", vec![]);
        assert!(e.contains("mechanism") || e.contains("des"), "{e}");
        let e = load("bogus = 1", vec![]);
        assert!(e.contains("bogus"), "{e}");

        // pin_env instead of pin_file: read once, at load.
        let path = dir.path().join("env.toml");
        let text = h.root_toml("config", "pin_env = \"TEST_HSM_PIN\"").replace(
            &format!(
                "pin_file = {:?}\n",
                h.pin_file("config").display().to_string()
            ),
            "",
        );
        std::fs::write(&path, &text).unwrap();
        let e = Config::load(Some(&path), vec![]).unwrap_err().0;
        assert!(
            e.contains("roots[0].pin_env") && e.contains("TEST_HSM_PIN"),
            "{e}"
        );
        let pin = std::fs::read_to_string(h.pin_file("config")).unwrap();
        let env = vec![("TEST_HSM_PIN".to_string(), pin.trim_end().to_string())];
        let c = Config::load(Some(&path), env).unwrap();
        let roots = tokio::task::spawn_blocking(move || server::load_roots(&c).map(|r| r.len()))
            .await
            .unwrap()
            .map_err(|e| e.to_string())
            .unwrap();
        assert_eq!(roots, 1);
    });
}

/// `hsm init-key` and `hsm check` from the binary, on a token of their own; the key's
/// attributes checked by another tool, OpenSC's pkcs11-tool.
#[test]
fn hsm_init_key_and_check_work_from_the_command_line() {
    with_hsm(|_| async move {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(SCRIPT)
            .arg(dir.path())
            .arg("cli")
            .output()
            .unwrap();
        assert!(out.status.success());
        let conf = dir.path().join("softhsm2.conf");
        let pin_file = dir.path().join("cli.pin");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = {:?}\n[[roots]]\nkind = \"pkcs11\"\nmodule = {MODULE:?}\ntoken_label = \"cli\"\npin_file = {:?}\nkey_label = \"root-1\"\n",
                dir.path().join("data").display().to_string(),
                pin_file.display().to_string()
            ),
        )
        .unwrap();
        let run = |args: &[&str]| {
            let out = Command::new(BIN)
                .arg("--config")
                .arg(&config)
                .args(args)
                .env("SOFTHSM2_CONF", &conf)
                .output()
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        };

        // Before the key exists, check says so.
        let (code, stdout, stderr) = run(&["hsm", "check"]);
        assert_eq!(code, Some(2), "{stdout}{stderr}");
        assert!(
            stdout.contains("ok    module")
                && stdout.contains("ok    token")
                && stdout.contains("ok    login"),
            "{stdout}"
        );
        assert!(
            stderr.contains("no AES secret key with label \"root-1\""),
            "{stderr}"
        );

        let (code, stdout, stderr) =
            run(&["hsm", "init-key", "--label", "root-1", "--id", "c0ffee"]);
        assert_eq!(code, Some(0), "{stdout}{stderr}");
        assert!(
            stdout.contains("created AES-256 key \"root-1\" (id c0ffee) on token \"cli\""),
            "{stdout}"
        );
        let (code, _, stderr) = run(&["hsm", "init-key", "--label", "root-1"]);
        assert_eq!(code, Some(2));
        assert!(stderr.contains("already exists"), "{stderr}");

        let (code, stdout, stderr) = run(&["hsm", "check"]);
        assert_eq!(code, Some(0), "{stdout}{stderr}");
        for step in ["module", "token", "login", "key", "mechanism", "self-test"] {
            assert!(
                stdout.contains(&format!("ok    {step}")),
                "{step}: {stdout}"
            );
        }
        assert!(stdout.contains("sensitive, not extractable"), "{stdout}");
        assert!(stdout.contains("root id: pkcs11:cli/root-1"), "{stdout}");

        // Flags override the config: the key by id, a wrong PIN through --pin-env.
        let (code, stdout, _) = run(&["hsm", "check", "--key-id", "c0ffee"]);
        assert_eq!(code, Some(0), "{stdout}");
        assert!(stdout.contains("root id: pkcs11:cli/id=c0ffee"), "{stdout}");
        let out = Command::new(BIN)
            .args(["--config"])
            .arg(&config)
            .args(["hsm", "check", "--pin-env", "WRONG_PIN"])
            .env("SOFTHSM2_CONF", &conf)
            .env("WRONG_PIN", "1111")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("token \"cli\": login refused"));

        // OpenSC reads the attributes back independently.
        let pin = std::fs::read_to_string(&pin_file).unwrap();
        let out = Command::new("pkcs11-tool")
            .args([
                "--module",
                MODULE,
                "--token-label",
                "cli",
                "--login",
                "--pin",
            ])
            .arg(pin.trim_end())
            .args(["--list-objects", "--type", "secrkey"])
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .expect("pkcs11-tool (opensc) is installed");
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(
            listing.contains("root-1") && listing.contains("AES length 32"),
            "{listing}"
        );
        let access = listing
            .lines()
            .find(|l| l.trim_start().starts_with("Access:"))
            .unwrap_or_default();
        assert!(
            access.contains("sensitive") && access.contains("never extractable"),
            "{listing}"
        );
        let usage = listing
            .lines()
            .find(|l| l.trim_start().starts_with("Usage:"))
            .unwrap_or_default();
        assert!(
            usage.contains("encrypt") && usage.contains("decrypt") && !usage.contains("wrap"),
            "{listing}"
        );
    });
}
