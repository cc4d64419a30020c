//! The real binary: `serve --dev` on a fresh directory, restart persistence, CLI commands and
//! exit codes.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_kms-sidecar");

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve_dev(dir: &Path) -> Proc {
    let child = Command::new(BIN)
        .args(["serve", "--dev"])
        .current_dir(dir)
        // Port 0: tests run in parallel with other sidecars; the socket is what they use.
        .env("KMS_SIDECAR_LISTEN__TCP", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let socket = dir.join("data/kms-sidecar.sock");
    let start = Instant::now();
    while !socket.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "sidecar did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Proc(child)
}

/// SIGTERM, then the exit status must be success; returns what it printed.
fn stop(mut p: Proc) -> String {
    use std::io::Read;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(p.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = p.0.wait().unwrap();
    assert!(status.success(), "sidecar exited with {status}");
    let mut out = String::new();
    p.0.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    out
}

async fn post(socket: &Path, path: &str, body: serde_json::Value) -> Reply {
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    send(
        stream,
        "POST",
        path,
        &[("content-type", "application/json")],
        body.to_string().into(),
    )
    .await
}

#[tokio::test]
async fn serve_dev_persists_keys_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("data/kms-sidecar.sock");

    let first = serve_dev(dir.path());
    let r = post(
        &socket,
        "/v1/tenants/demo/seal",
        json!({ "plaintext": b64(b"survives restarts") }),
    )
    .await;
    assert_eq!(r.status, 200);
    let ct = r.str("ciphertext");
    let out = stop(first);
    let token = std::fs::read_to_string(dir.path().join("data/dev-token")).unwrap();
    assert!(
        out.contains(token.trim()),
        "the first start prints the token: {out}"
    );
    assert!(out.contains("curl"), "{out}");
    assert!(!socket.exists(), "the socket is removed on shutdown");

    let key_before = std::fs::read(dir.path().join("data/root.key")).unwrap();
    let second = serve_dev(dir.path());
    let r = post(
        &socket,
        "/v1/tenants/demo/open",
        json!({ "ciphertext": ct }),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(unb64(&r.str("plaintext")), b"survives restarts");
    let out = stop(second);
    assert!(!out.contains(token.trim()), "the token is shown once only");
    assert_eq!(
        std::fs::read(dir.path().join("data/root.key")).unwrap(),
        key_before
    );

    use std::os::unix::fs::PermissionsExt;
    for f in ["root.key", "dev-token", "store.db"] {
        let mode = std::fs::metadata(dir.path().join("data").join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    let mode = std::fs::metadata(dir.path().join("data"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);

    // The offline commands read the same store.
    let out = Command::new(BIN)
        .args(["tenants", "list"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()[..2] == ["demo", "1"]),
        "{text}"
    );
    let out = Command::new(BIN)
        .args(["keys", "list", "demo"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("active") && text.contains("keyfile:"),
        "{text}"
    );
    let out = Command::new(BIN)
        .args(["keys", "list", "nope"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

fn run(args: &[&str], env: &[(&str, &str)], dir: &Path) -> (i32, String) {
    let out = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn configuration_errors_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.toml"), "[cache]\nttl_secs = 5\n").unwrap();
    let (code, msg) = run(&["--config", "bad.toml", "serve"], &[], dir.path());
    assert_eq!(code, 2, "{msg}");
    assert!(msg.contains("ttl_secs"), "{msg}");
    let (code, msg) = run(
        &["serve", "--dev"],
        &[("KMS_SIDECAR_LISTEN__TCP", "0.0.0.0:8787")],
        dir.path(),
    );
    assert_eq!(code, 2, "{msg}");
    assert!(msg.contains("listen.tcp"), "{msg}");
    let (code, msg) = run(
        &["serve"],
        &[("KMS_SIDECAR_CACHE__TTL_SECONDS", "soon")],
        dir.path(),
    );
    assert_eq!(code, 2, "{msg}");
    assert!(msg.contains("ttl_seconds"), "{msg}");
    // Without --dev, a missing keyfile is a configuration error naming the root.
    let (code, msg) = run(&["serve"], &[], dir.path());
    assert_eq!(code, 2, "{msg}");
    assert!(
        msg.contains("roots[0]") && msg.contains("root.key"),
        "{msg}"
    );
    let (code, _) = run(&["frobnicate"], &[], dir.path());
    assert_eq!(code, 2);
}

#[test]
fn keyfile_new_writes_a_private_sealed_key() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (code, msg) = run(&["keyfile", "new", "--out", "plain.key"], &[], dir.path());
    assert_eq!(code, 0, "{msg}");
    let (code, msg) = run(&["keyfile", "new", "--out", "plain.key"], &[], dir.path());
    assert_eq!(code, 1, "never overwrites: {msg}");
    let (code, msg) = run(
        &[
            "keyfile",
            "new",
            "--out",
            "sealed.key",
            "--passphrase-env",
            "ROOT_PASS",
        ],
        &[("ROOT_PASS", "a long passphrase")],
        dir.path(),
    );
    assert_eq!(code, 0, "{msg}");
    let text = std::fs::read_to_string(dir.path().join("sealed.key")).unwrap();
    assert!(text.contains("argon2id") && text.contains("sealed_key") && !text.contains("\"key\""));
    let mode = std::fs::metadata(dir.path().join("sealed.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let (code, msg) = run(
        &[
            "keyfile",
            "new",
            "--out",
            "x.key",
            "--passphrase-env",
            "UNSET_VAR",
        ],
        &[],
        dir.path(),
    );
    assert_eq!(code, 2, "{msg}");

    // A sealed root serves only with its passphrase.
    let config = "[[roots]]\nkind = \"keyfile\"\npath = \"sealed.key\"\npassphrase_env = \"ROOT_PASS\"\n[listen]\nunix_socket = \"s.sock\"\n";
    std::fs::write(dir.path().join("c.toml"), config).unwrap();
    let (code, msg) = run(
        &["--config", "c.toml", "serve"],
        &[("ROOT_PASS", "wrong")],
        dir.path(),
    );
    assert_eq!(code, 2, "{msg}");
    assert!(msg.contains("wrong passphrase"), "{msg}");
    assert!(!msg.contains("a long passphrase"));
}

#[test]
fn token_new_prints_a_token_and_its_hash() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = run(&["token", "new"], &[], dir.path());
    assert_eq!(code, 0);
    let token = out
        .lines()
        .find_map(|l| l.strip_prefix("token:"))
        .unwrap()
        .trim()
        .to_owned();
    let hash = out
        .lines()
        .find_map(|l| l.strip_prefix("token_sha256:"))
        .unwrap()
        .trim()
        .to_owned();
    assert!(token.starts_with("kms_") && token.len() > 40);
    assert_eq!(hash, sha(&token));
}

#[test]
fn secret_files_open_to_others_or_empty_tokens_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (code, msg) = run(&["keyfile", "new", "--out", "root.key"], &[], dir.path());
    assert_eq!(code, 0, "{msg}");
    std::fs::set_permissions(
        dir.path().join("root.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("c.toml"),
        "[[roots]]\nkind = \"keyfile\"\npath = \"root.key\"\n",
    )
    .unwrap();
    let (code, msg) = run(&["--config", "c.toml", "serve"], &[], dir.path());
    assert_eq!(code, 2, "{msg}");
    assert!(
        msg.contains("roots[0]") && msg.contains("group or others"),
        "{msg}"
    );
    assert!(
        !dir.path().join("data").exists(),
        "a refused start creates nothing"
    );

    // A dev token file left empty (say, by a crash) must not become a blank credential.
    std::fs::create_dir(dir.path().join("data")).unwrap();
    let token = dir.path().join("data/dev-token");
    std::fs::write(&token, "\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, msg) = run(
        &["serve", "--dev"],
        &[("KMS_SIDECAR_LISTEN__TCP", "127.0.0.1:0")],
        dir.path(),
    );
    assert_eq!(code, 1, "{msg}");
    assert!(msg.contains("does not hold a usable token"), "{msg}");
}

#[tokio::test]
async fn admin_commands_go_through_the_running_sidecar() {
    let dir = tempfile::tempdir().unwrap();
    let second = "tok-second-admin-0123456789";
    std::fs::write(
        dir.path().join("extra.toml"),
        format!(
            "[[principals]]\nname = \"second-admin\"\ntoken_sha256 = [\"{}\"]\ntenants = [\"*\"]\noperations = [\"admin.shred\", \"keys.read\"]\n",
            sha(second)
        ),
    )
    .unwrap();
    let child = Command::new(BIN)
        .args(["--config", "extra.toml", "serve", "--dev"])
        .current_dir(dir.path())
        .env("KMS_SIDECAR_LISTEN__TCP", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Proc(child);
    let socket = dir.path().join("data/kms-sidecar.sock");
    let start = Instant::now();
    while !socket.exists() {
        assert!(start.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = post(
        &socket,
        "/v1/tenants/demo/seal",
        json!({ "plaintext": "AA==" }),
    )
    .await;
    let old = r.str("ciphertext");
    let cli = |args: &[&str], env: &[(&str, &str)]| {
        let mut all = vec!["--config", "extra.toml"];
        all.extend_from_slice(args);
        run(&all, env, dir.path())
    };
    let (code, out) = cli(&["keys", "rotate", "demo"], &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("demo: active version 2"), "{out}");
    let (code, out) = cli(&["keys", "rotate", "--all"], &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("rotated 1 of 1 tenants"), "{out}");
    let (code, out) = cli(&["keys", "retire", "demo", "--below", "2"], &[]);
    assert_eq!(code, 0, "{out}");
    let r = post(
        &socket,
        "/v1/tenants/demo/open",
        json!({ "ciphertext": old }),
    )
    .await;
    assert_eq!(r.code(), "key_version_retired");

    // Four eyes: the dev principal (by uid) requests, it cannot approve, the second admin can.
    let (code, out) = cli(&["shred", "request", "demo"], &[]);
    assert_eq!(code, 0, "{out}");
    let id = out.split_whitespace().nth(1).unwrap().to_owned();
    assert!(id.starts_with("apr_"), "{out}");
    let (code, out) = cli(
        &["shred", "list", "--token-env", "SECOND"],
        &[("SECOND", second)],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&id) && out.contains("dev"), "{out}");
    let (code, out) = cli(&["shred", "approve", &id], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("approval_same_principal"), "{out}");
    let (code, out) = cli(
        &["shred", "approve", &id, "--token-env", "SECOND"],
        &[("SECOND", second)],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("requested by dev, approved by second-admin"),
        "{out}"
    );
    let r = post(
        &socket,
        "/v1/tenants/demo/seal",
        json!({ "plaintext": "AA==" }),
    )
    .await;
    assert_eq!(r.code(), "tenant_destroyed");
    drop(server);

    let (code, out) = run(&["audit", "verify"], &[], dir.path());
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("ok: "), "{out}");
    // Tampering with the real log is caught by the CLI.
    let log = dir.path().join("data/audit.jsonl");
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::write(&log, text.replacen("second-admin", "second-admiN", 1)).unwrap();
    let (code, out) = run(&["audit", "verify"], &[], dir.path());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("edited"), "{out}");
}
