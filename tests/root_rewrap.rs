//! Root (KEK) rotation survives `kill -9` at any point: the real binary runs
//! `roots rewrap`, the harness kills it at a random moment, a rerun finishes the job, and every
//! ciphertext sealed before opens under the new root alone. 20+ trials, alternating direction.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kms_sidecar::config::Config;
use kms_sidecar::crypto::{Purpose, SecretBytes};
use kms_sidecar::keyring::{KeyState, Keyring, KeyringOptions, KeyringStore};
use kms_sidecar::providers::keyfile::create_keyfile;
use kms_sidecar::server::{load_roots, open_store};
use kms_sidecar::tenant::TenantId;

const BIN: &str = env!("CARGO_BIN_EXE_kms-sidecar");
const TENANTS: usize = 120;
const TRIALS: usize = 22;

fn config(dir: &Path, name: &str, roots: &[&str]) -> (std::path::PathBuf, Config) {
    let mut toml = format!(
        "data_dir = {:?}\n[listen]\nunix_socket = \"\"\n",
        dir.join("data").display().to_string()
    );
    for r in roots {
        toml.push_str(&format!(
            "[[roots]]\nkind = \"keyfile\"\npath = {:?}\n",
            dir.join(r).display().to_string()
        ));
    }
    let path = dir.join(name);
    std::fs::write(&path, toml).unwrap();
    let c = Config::load(Some(&path), Vec::new()).unwrap();
    (path, c)
}

async fn keyring(c: &Config) -> Keyring {
    let store: Arc<dyn KeyringStore> = open_store(c).await.unwrap();
    let options = KeyringOptions {
        auto_create_tenants: true,
        ..KeyringOptions::default()
    };
    Keyring::new(store, load_roots(c).unwrap(), options).unwrap()
}

fn random_below(n: u64) -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).unwrap();
    u64::from_le_bytes(b) % n.max(1)
}

fn rewrap(cfg: &Path, to: &str, from: &str) -> Command {
    let mut c = Command::new(BIN);
    c.args([
        "--config",
        cfg.to_str().unwrap(),
        "roots",
        "rewrap",
        "--to",
        to,
        "--from",
        from,
    ]);
    c.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rewrap_finishes_after_kill_9_at_any_point() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    for k in ["a.key", "b.key"] {
        create_keyfile(&dir.path().join(k), None, Default::default()).unwrap();
    }
    let (_, only_a) = config(dir.path(), "a.toml", &["a.key"]);
    let (both_path, both) = config(dir.path(), "ab.toml", &["a.key", "b.key"]);
    let (_, only_b) = config(dir.path(), "b.toml", &["b.key"]);
    let roots = load_roots(&both).unwrap();
    let (id_a, id_b) = (roots[0].id().to_string(), roots[1].id().to_string());

    // Tenants with two versions each, all wrapped under root A only.
    let kr = keyring(&only_a).await;
    let mut sealed = Vec::new();
    for i in 0..TENANTS {
        let t = TenantId::parse(&format!("tenant-{i}")).unwrap();
        for round in 0..2 {
            let pt = format!("{t} round {round}");
            let (ct, _) = kr
                .seal(
                    &t,
                    Purpose::Data,
                    b"",
                    SecretBytes::new(pt.clone().into_bytes()),
                )
                .await
                .unwrap();
            sealed.push((t.clone(), ct, pt));
            if round == 0 {
                kr.rotate(&t).await.unwrap();
            }
        }
    }
    drop(kr);

    // Calibrate on the fastest of three whole runs (A → B → A → B), so that the random kill
    // points fall inside a run even when the machine is busy with other tests.
    let mut full = Duration::MAX;
    for (to, from) in [("1", &id_a), ("0", &id_b), ("1", &id_a)] {
        let start = Instant::now();
        assert!(rewrap(&both_path, to, from).status().unwrap().success());
        full = full.min(start.elapsed());
    }
    let mut target_is_b = true;
    let mut killed_mid_job = 0;
    for trial in 0..=TRIALS {
        if trial > 0 {
            // Alternate direction each trial; kill at a random moment within a full run's time.
            target_is_b = !target_is_b;
            let (to, from) = if target_is_b {
                ("1", id_a.as_str())
            } else {
                ("0", id_b.as_str())
            };
            let mut child = rewrap(&both_path, to, from).spawn().unwrap();
            let delay = Duration::from_micros(random_below(full.as_micros() as u64 + 1));
            std::thread::sleep(delay);
            let finished_before_kill = child.try_wait().unwrap().is_some();
            let _ = child.kill();
            let _ = child.wait();
            if !finished_before_kill {
                killed_mid_job += 1;
            }
            let status = rewrap(&both_path, to, from).status().unwrap();
            assert!(
                status.success(),
                "trial {trial}: the rerun must finish the job"
            );
        }
        // Every ciphertext opens with the target root alone, and each live version has exactly
        // one wrap, under the target.
        let target_cfg = if target_is_b { &only_b } else { &only_a };
        let target_id = if target_is_b { &id_b } else { &id_a };
        let kr = keyring(target_cfg).await;
        for (t, ct, pt) in &sealed {
            let opened = kr
                .open(t, Purpose::Data, b"", ct)
                .await
                .unwrap_or_else(|e| panic!("trial {trial}: {t}: {e}"));
            assert_eq!(opened.expose(), pt.as_bytes());
        }
        let store = open_store(target_cfg).await.unwrap();
        for t in store.tenants().await.unwrap() {
            for v in store.key_versions(&t.tenant).await.unwrap() {
                assert_ne!(v.state, KeyState::Destroyed);
                let roots: Vec<String> = v.wrappings.iter().map(|w| w.root.to_string()).collect();
                assert_eq!(
                    roots,
                    vec![target_id.clone()],
                    "trial {trial}: {} v{}",
                    t.tenant,
                    v.version
                );
            }
        }
    }
    assert!(
        killed_mid_job >= TRIALS / 2,
        "only {killed_mid_job} of {TRIALS} kills landed mid-job (full run {full:?})"
    );
    // The audit chain survived the kills.
    let out = Command::new(BIN)
        .args(["--config", both_path.to_str().unwrap(), "audit", "verify"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "{TRIALS} trials, {killed_mid_job} killed mid-job; a full run of {} versions takes {full:?}",
        TENANTS * 2
    );
}
