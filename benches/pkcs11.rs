//! Unwraps (and wraps) per second through the PKCS#11 root on SoftHSM 2, beside the keyfile root
//! on the same data key and context, so the cost of the token reads as a ratio. The PKCS#11 figures
//! include the hop to tokio's blocking pool that every HSM call takes in the sidecar. Also 64
//! concurrent unwraps through 1 and through 4 sessions. Needs SoftHSM 2 (`apt-get install -y
//! softhsm2`); the token lives in a temporary directory. Run: `cargo bench --bench pkcs11`.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use criterion::{Criterion, Throughput};
use kms_sidecar::crypto::DataKey;
use kms_sidecar::providers::keyfile::KeyfileRoot;
use kms_sidecar::providers::pkcs11::{self, MechanismChoice, Pkcs11Config, Pkcs11Root};
use kms_sidecar::providers::{RootProvider, WrapContext, WrapPurpose};
use kms_sidecar::tenant::TenantId;
use secrecy::SecretString;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const TOKEN: &str = "bench";

fn config(dir: &Path, sessions: usize) -> Pkcs11Config {
    Pkcs11Config {
        module: MODULE.into(),
        token_label: Some(TOKEN.into()),
        slot_id: None,
        pin_file: Some(dir.join(format!("{TOKEN}.pin"))),
        pin_env: None,
        key_label: Some("kek".into()),
        key_id: None,
        sessions,
        mechanism: MechanismChoice::Auto,
    }
}

fn benches(c: &mut Criterion, dir: &Path) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pin = || {
        let text = std::fs::read_to_string(dir.join(format!("{TOKEN}.pin"))).unwrap();
        SecretString::from(text.trim_end())
    };
    let hsm = Arc::new(Pkcs11Root::connect(&config(dir, 4), pin()).unwrap());
    let hsm_one = Arc::new(Pkcs11Root::connect(&config(dir, 1), pin()).unwrap());
    let keyfile = Arc::new(KeyfileRoot::from_key(&[7; 32]).unwrap());
    let tenant = TenantId::parse("acme").unwrap();
    let ctx = WrapContext {
        tenant: &tenant,
        key_version: 1,
        purpose: WrapPurpose::TenantDek,
    };
    let dek = DataKey::generate().unwrap();
    let hsm_blob = rt.block_on(hsm.wrap(&dek, &ctx)).unwrap();
    let keyfile_blob = rt.block_on(keyfile.wrap(&dek, &ctx)).unwrap();

    let mut g = c.benchmark_group("unwrap");
    g.throughput(Throughput::Elements(1));
    g.bench_function("keyfile", |b| {
        b.iter(|| rt.block_on(keyfile.unwrap(&keyfile_blob, &ctx)).unwrap())
    });
    g.bench_function("pkcs11_softhsm_gcm", |b| {
        b.iter(|| rt.block_on(hsm.unwrap(&hsm_blob, &ctx)).unwrap())
    });
    g.finish();

    let mut g = c.benchmark_group("wrap");
    g.throughput(Throughput::Elements(1));
    g.bench_function("keyfile", |b| {
        b.iter(|| rt.block_on(keyfile.wrap(&dek, &ctx)).unwrap())
    });
    g.bench_function("pkcs11_softhsm_gcm", |b| {
        b.iter(|| rt.block_on(hsm.wrap(&dek, &ctx)).unwrap())
    });
    g.finish();

    let mut g = c.benchmark_group("unwrap_64_concurrent");
    g.throughput(Throughput::Elements(64));
    for (name, root) in [("sessions_1", &hsm_one), ("sessions_4", &hsm)] {
        g.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let mut set = tokio::task::JoinSet::new();
                    for _ in 0..64 {
                        let root = Arc::clone(root);
                        let blob = hsm_blob.clone();
                        set.spawn(async move {
                            let t = TenantId::parse("acme").unwrap();
                            let ctx = WrapContext {
                                tenant: &t,
                                key_version: 1,
                                purpose: WrapPurpose::TenantDek,
                            };
                            root.unwrap(&blob, &ctx).await.unwrap();
                        });
                    }
                    set.join_all().await;
                })
            })
        });
    }
    g.finish();
}

fn main() {
    assert!(
        Path::new(MODULE).exists(),
        "SoftHSM 2 is not installed: apt-get install -y softhsm2"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/hsm/softhsm-token.sh"))
        .arg(dir.path())
        .arg(TOKEN)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // SAFETY: nothing else runs yet: no runtime, no criterion threads, no module loaded.
    unsafe { std::env::set_var("SOFTHSM2_CONF", dir.path().join("softhsm2.conf")) };
    let pin = std::fs::read_to_string(dir.path().join(format!("{TOKEN}.pin"))).unwrap();
    pkcs11::create_key(
        &config(dir.path(), 1),
        &SecretString::from(pin.trim_end()),
        "kek",
        None,
    )
    .unwrap();

    let mut c = Criterion::default().configure_from_args();
    benches(&mut c, dir.path());
    c.final_summary();
}
