//! Adversarial checks of the real binary: no core dumps, no secret in its output even at debug
//! level, and DoS limits (idle and slow-drip connections, connection and in-flight caps).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_kms-sidecar");

struct Proc {
    child: Child,
    dir: tempfile::TempDir,
}

impl Proc {
    fn socket(&self) -> PathBuf {
        self.dir.path().join("data/kms-sidecar.sock")
    }

    /// Stops it and returns everything it printed.
    fn finish(mut self) -> String {
        use std::io::Read;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        let mut out = String::new();
        let _ = self.child.stdout.take().unwrap().read_to_string(&mut out);
        let _ = self.child.stderr.take().unwrap().read_to_string(&mut out);
        out
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(env: &[(&str, &str)]) -> Proc {
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(BIN)
        .args(["serve", "--dev"])
        .current_dir(dir.path())
        .env("KMS_SIDECAR_LISTEN__TCP", "127.0.0.1:0")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let p = Proc { child, dir };
    let start = Instant::now();
    while !p.socket().exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "sidecar did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

async fn metrics(socket: &Path) -> String {
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let r = send(stream, "GET", "/metrics", &[], Default::default()).await;
    assert_eq!(r.status, 200);
    String::from_utf8_lossy(&r.body).into_owned()
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
async fn core_dumps_are_disabled() {
    let p = serve(&[]);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", p.child.id())).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(&fields[4..6], ["0", "0"], "{core}");
    let out = p.finish();
    assert!(out.contains("core_dumps_disabled=true"), "{out}");
}

/// Every key and value the sidecar handles, in every printable form, is absent from its output
/// at debug level.
#[tokio::test]
async fn debug_output_holds_no_key_or_value() {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    let p = serve(&[("KMS_SIDECAR_LOG", "debug")]);
    let s = p.socket();
    let mut secrets: Vec<Vec<u8>> = Vec::new();
    let plaintext = b"leak-scan plaintext 4111111111111111".to_vec();
    let r = post(
        &s,
        "/v1/tenants/scan/seal",
        json!({ "plaintext": b64(&plaintext), "aad": b64(b"ctx") }),
    )
    .await;
    let ct = r.str("ciphertext");
    let r = post(
        &s,
        "/v1/tenants/scan/open",
        json!({ "ciphertext": ct, "aad": b64(b"ctx") }),
    )
    .await;
    assert_eq!(unb64(&r.str("plaintext")), plaintext);
    secrets.push(plaintext);
    let r = post(&s, "/v1/tenants/scan/datakey", json!({})).await;
    let dk = unb64(&r.str("plaintext_key"));
    let r = post(
        &s,
        "/v1/tenants/scan/datakey:unwrap",
        json!({ "wrapped_key": r.str("wrapped_key") }),
    )
    .await;
    assert_eq!(unb64(&r.str("plaintext_key")), dk);
    secrets.push(dk);
    let value = "jane.leakscan@example.com";
    let r = post(
        &s,
        "/v1/tenants/scan/tokens",
        json!({ "value": value, "format": "email" }),
    )
    .await;
    let token = r.str("token");
    let r = post(
        &s,
        "/v1/tenants/scan/tokens:reveal",
        json!({ "tokens": [token] }),
    )
    .await;
    assert_eq!(r.json()["values"][0]["value"], value);
    secrets.push(value.as_bytes().to_vec());
    // The tenant's data key and the root key, recovered the way the sidecar gets them.
    use kms_sidecar::keyring::KeyringStore;
    use kms_sidecar::providers::{RootProvider, WrapContext, WrapPurpose};
    let data = p.dir.path().join("data");
    let root_key = kms_sidecar::providers::keyfile::parse_keyfile(
        &std::fs::read(data.join("root.key")).unwrap(),
        None,
    )
    .unwrap();
    let root = kms_sidecar::providers::keyfile::KeyfileRoot::from_key(&root_key).unwrap();
    let store = kms_sidecar::store::SqliteStore::open(&data.join("store.db")).unwrap();
    let tenant = kms_sidecar::tenant::TenantId::parse("scan").unwrap();
    let v = store.key_version(&tenant, 1).await.unwrap().unwrap();
    let ctx = WrapContext {
        tenant: &tenant,
        key_version: 1,
        purpose: WrapPurpose::TenantDek,
    };
    let dek = root.unwrap(&v.wrappings[0].blob, &ctx).await.unwrap();
    secrets.push(dek.expose().to_vec());
    secrets.push(root_key.to_vec());
    let out = p.finish();
    assert!(out.contains("DEBUG"), "debug logging was on: {out}");
    for secret in &secrets {
        let forms = [
            hex::encode(secret),
            hex::encode_upper(secret),
            STANDARD.encode(secret),
            URL_SAFE_NO_PAD.encode(secret),
            String::from_utf8_lossy(secret).into_owned(),
        ];
        for f in forms {
            if f.len() >= 8 {
                assert!(
                    !out.contains(&f),
                    "a secret appeared in the output as {f:?}"
                );
            }
        }
    }
}

#[tokio::test]
async fn idle_and_slow_drip_connections_do_not_starve_others() {
    let p = serve(&[("KMS_SIDECAR_LIMITS__HEADER_READ_TIMEOUT_SECONDS", "2")]);
    let s = p.socket();
    let _ = post(&s, "/v1/tenants/dos/seal", json!({ "plaintext": "AA==" })).await;
    let mut baseline = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        assert_eq!(
            post(&s, "/v1/tenants/dos/seal", json!({ "plaintext": "AA==" }))
                .await
                .status,
            200
        );
        baseline.push(t.elapsed());
    }
    // 1,000 connections that never send a byte, and one that drips a header byte by byte.
    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(tokio::net::UnixStream::connect(&s).await.unwrap());
    }
    let drip_socket = s.clone();
    let drip = tokio::spawn(async move {
        let mut c = tokio::net::UnixStream::connect(&drip_socket).await.unwrap();
        let started = Instant::now();
        for b in
            b"POST /v1/tenants/dos/seal HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\nx-pad: "
                .iter()
                .cycle()
        {
            if c.write_all(&[*b]).await.is_err() || started.elapsed() > Duration::from_secs(15) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        started.elapsed()
    });
    let mut loaded = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        let r = post(&s, "/v1/tenants/dos/seal", json!({ "plaintext": "AA==" })).await;
        assert_eq!(r.status, 200);
        loaded.push(t.elapsed());
    }
    let cut = drip.await.unwrap();
    assert!(
        cut < Duration::from_secs(6),
        "the slow-drip connection was cut after {cut:?}"
    );
    // Idle connections are closed by the header timeout as well.
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(5), idle[0].read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "idle connection still open"
    );
    baseline.sort();
    loaded.sort();
    let p99 = |v: &[Duration]| v[v.len() * 99 / 100 - 1];
    println!(
        "seal latency p50/p99: alone {:?}/{:?}; beside 1000 idle + slowloris {:?}/{:?}; drip cut after {cut:?}",
        baseline[baseline.len() / 2],
        p99(&baseline),
        loaded[loaded.len() / 2],
        p99(&loaded)
    );
    // Bounded, not a benchmark: every request was answered, none waited for the idle ones.
    assert!(loaded.iter().all(|d| *d < Duration::from_secs(2)));
}

#[tokio::test]
async fn beyond_the_in_flight_cap_requests_get_503_overloaded() {
    let p = serve(&[("KMS_SIDECAR_LIMITS__MAX_IN_FLIGHT", "1")]);
    let s = p.socket();
    // Batches of 1000 seals take milliseconds each, yet their bodies fit in the socket buffer,
    // so a 503 sent before the body is read still reaches the client.
    let items: Vec<serde_json::Value> = (0..1000).map(|_| json!({ "plaintext": "AAAA" })).collect();
    let body = json!({ "items": items }).to_string();
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let (s, body) = (s.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::UnixStream::connect(&s).await.unwrap();
            send(
                stream,
                "POST",
                "/v1/tenants/busy/seal:batch",
                &[("content-type", "application/json")],
                body.into(),
            )
            .await
        }));
    }
    let (mut ok, mut overloaded) = (0, 0);
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            200 => ok += 1,
            503 => {
                assert_eq!(r.code(), "overloaded");
                assert_eq!(r.headers["retry-after"], "1");
                overloaded += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(
        ok >= 1 && overloaded >= 1,
        "ok {ok}, overloaded {overloaded}"
    );
    let text = metrics(&s).await;
    let requests = |outcome: &str| {
        metric_value(
            &text,
            &format!(r#"kms_sidecar_requests_total{{op="seal",outcome="{outcome}"}}"#),
        )
    };
    assert_eq!(requests("overloaded"), Some(overloaded as f64), "{text}");
    assert_eq!(requests("ok"), Some(ok as f64));
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed_at_once() {
    let p = serve(&[("KMS_SIDECAR_LIMITS__MAX_CONNECTIONS", "8")]);
    let s = p.socket();
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(tokio::net::UnixStream::connect(&s).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = tokio::net::UnixStream::connect(&s).await.unwrap();
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(2), extra.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "the 9th connection was not closed"
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        post(&s, "/v1/tenants/cap/seal", json!({ "plaintext": "AA==" }))
            .await
            .status,
        200
    );
    let text = metrics(&s).await;
    assert_eq!(
        metric_value(&text, "kms_sidecar_connections_refused_total"),
        Some(1.0),
        "{text}"
    );
}

async fn get_padded(socket: &Path, pad: usize) -> u16 {
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let pad = "a".repeat(pad);
    send(
        stream,
        "GET",
        "/healthz",
        &[("x-pad", &pad)],
        Default::default(),
    )
    .await
    .status
}

async fn octets(socket: &Path, path: &str, body: Vec<u8>) -> Reply {
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    send(
        stream,
        "POST",
        path,
        &[("content-type", "application/octet-stream")],
        body.into(),
    )
    .await
}

#[tokio::test]
async fn the_read_buffer_bounds_the_request_head_and_carries_large_bodies() {
    // The default (64 KiB): a 100 KiB head is refused with 431, a 16 KiB one is served.
    let p = serve(&[]);
    assert_eq!(get_padded(&p.socket(), 100 << 10).await, 431);
    assert_eq!(get_padded(&p.socket(), 16 << 10).await, 200);
    drop(p);

    // 1 MiB: the same 100 KiB head is served, and a 1 MiB body round-trips through
    // octet-stream seal and open, arriving in reads of up to 1 MiB.
    let p = serve(&[("KMS_SIDECAR_LIMITS__READ_BUFFER_BYTES", "1048576")]);
    let s = p.socket();
    assert_eq!(get_padded(&s, 100 << 10).await, 200);
    let plaintext: Vec<u8> = (0..1usize << 20).map(|i| (i * 7 % 251) as u8).collect();
    let sealed = octets(&s, "/v1/tenants/bulk/seal", plaintext.clone()).await;
    assert_eq!(sealed.status, 200);
    assert_eq!(sealed.body.len(), plaintext.len() + 70 + 16);
    let opened = octets(&s, "/v1/tenants/bulk/open", sealed.body.to_vec()).await;
    assert_eq!(opened.status, 200);
    assert!(opened.body[..] == plaintext[..], "1 MiB did not round-trip");
}

#[test]
fn a_read_buffer_outside_its_bounds_stops_the_start() {
    for bad in ["8191", "2097153"] {
        let out = Command::new(BIN)
            .args(["serve", "--dev"])
            .current_dir(tempfile::tempdir().unwrap().path())
            .env("KMS_SIDECAR_LIMITS__READ_BUFFER_BYTES", bad)
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "started with read_buffer_bytes = {bad}"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("limits.read_buffer_bytes"), "{err}");
    }
}
