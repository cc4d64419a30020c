//! One harness for integration tests: starts a real sidecar (in process, or the built binary),
//! talks HTTP/1.1 to it over its Unix socket or loopback TCP, and snapshots its store. For the
//! AWS KMS tests: moto (`moto`) and a fault-injecting proxy in front of it (`kms_proxy`).
#![allow(dead_code)]

pub mod kms_proxy;
#[cfg(feature = "aws")]
pub mod moto;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use kms_sidecar::config::Config;
use kms_sidecar::keyring::KeyringStore;
use kms_sidecar::server::{self, Running};
use kms_sidecar::store::SqliteStore;
use serde_json::Value;
use tempfile::TempDir;
use tokio::net::{TcpStream, UnixStream};

pub const TOKEN_ADMIN: &str = "tok-admin-0123456789";
pub const TOKEN_A: &str = "tok-tenant-a-0123456789";
pub const TOKEN_SEAL_ONLY: &str = "tok-seal-only-0123456789";
pub const TOKEN_ADMIN2: &str = "tok-admin-two-0123456789";
pub const TOKEN_REWRAP_ONLY: &str = "tok-rewrap-only-0123456789";
pub const TOKEN_TOKENIZER: &str = "tok-tokenizer-0123456789";
pub const TOKEN_MASKED: &str = "tok-masked-reveal-0123456789";

pub fn sha(t: &str) -> String {
    hex::encode(kms_sidecar::api::auth::token_sha256(t))
}

pub fn uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

/// The principals every test sidecar has, unless a test passes its own.
pub fn default_principals(socket_uid: Option<u32>) -> String {
    let uids = socket_uid
        .map(|u| format!("unix_uids = [{u}]\n"))
        .unwrap_or_default();
    format!(
        r#"
[[principals]]
name = "admin"
{uids}token_sha256 = ["{admin}"]
tenants = ["*"]
operations = ["*"]

[[principals]]
name = "tenant-a"
token_sha256 = ["{a}"]
tenants = ["a-*"]
operations = ["*"]

[[principals]]
name = "seal-only"
token_sha256 = ["{seal}"]
tenants = ["*"]
operations = ["seal"]

[[principals]]
name = "admin2"
token_sha256 = ["{admin2}"]
tenants = ["*"]
operations = ["*"]

[[principals]]
name = "rewrap-only"
token_sha256 = ["{rewrap}"]
tenants = ["*"]
operations = ["rewrap"]

[[principals]]
name = "tokenizer"
token_sha256 = ["{tokenizer}"]
tenants = ["*"]
operations = ["tokenize"]

[[principals]]
name = "masked"
token_sha256 = ["{masked}"]
tenants = ["*"]
operations = ["reveal.masked"]
"#,
        admin = sha(TOKEN_ADMIN),
        a = sha(TOKEN_A),
        seal = sha(TOKEN_SEAL_ONLY),
        admin2 = sha(TOKEN_ADMIN2),
        rewrap = sha(TOKEN_REWRAP_ONLY),
        tokenizer = sha(TOKEN_TOKENIZER),
        masked = sha(TOKEN_MASKED),
    )
}

pub struct Sidecar {
    pub dir: TempDir,
    pub running: Option<Running>,
    pub socket: PathBuf,
    pub tcp: std::net::SocketAddr,
    data: PathBuf,
}

pub struct Options {
    /// Share another sidecar's data dir (store, root key, audit log) instead of a fresh one.
    pub share: Option<PathBuf>,
    pub auto_create: bool,
    /// uid allowed on the socket; `None` leaves the socket with no principal.
    pub socket_uid: Option<u32>,
    /// Top-level keys and tables; `{data}` stands for the data dir.
    pub extra_toml: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            share: None,
            auto_create: true,
            socket_uid: Some(uid()),
            extra_toml: String::new(),
        }
    }
}

impl Sidecar {
    pub async fn start() -> Sidecar {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(opts: Options) -> Sidecar {
        let dir = tempfile::tempdir().unwrap();
        let data = match &opts.share {
            Some(shared) => shared.clone(),
            None => {
                let data = dir.path().join("data");
                std::fs::create_dir(&data).unwrap();
                kms_sidecar::providers::keyfile::create_keyfile(
                    &data.join("root.key"),
                    None,
                    Default::default(),
                )
                .unwrap();
                data
            }
        };
        let toml = format!(
            "data_dir = {:?}\nauto_create_tenants = {}\n{}\n[listen]\ntcp = \"127.0.0.1:0\"\nunix_socket = {:?}\n{}",
            data.display().to_string(),
            opts.auto_create,
            opts.extra_toml
                .replace("{data}", &data.display().to_string()),
            dir.path().join("s.sock").display().to_string(),
            default_principals(opts.socket_uid),
        );
        let path = dir.path().join("config.toml");
        std::fs::write(&path, toml).unwrap();
        let config = Config::load(Some(&path), Vec::new()).unwrap();
        let running = server::start(&config).await.unwrap();
        let socket = running.unix_socket.clone().unwrap();
        let tcp = running.tcp_addr.unwrap();
        Sidecar {
            dir,
            running: Some(running),
            socket,
            tcp,
            data,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data.clone()
    }

    /// The config file this sidecar was started from.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    /// The value of one series of `/metrics` (0 when absent), e.g.
    /// `kms_sidecar_root_calls_total{root="aws-kms:…",op="unwrap"}`.
    pub async fn metric(&self, series: &str) -> f64 {
        let r = self.unix("GET", "/metrics", &[], Bytes::new()).await;
        assert_eq!(r.status, 200);
        let text = String::from_utf8_lossy(&r.body).into_owned();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }

    /// A request over TCP as `token`, JSON body.
    pub async fn as_token(&self, token: &str, method: &str, path: &str, body: Value) -> Reply {
        let b = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        self.tcp(Some(token), method, path, b).await
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
    }

    /// A request over the Unix socket (identified by this process's uid).
    pub async fn unix(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        let stream = UnixStream::connect(&self.socket).await.unwrap();
        send(stream, method, path, headers, body.into()).await
    }

    /// A request over TCP, with a bearer token if given.
    pub async fn tcp(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: impl Into<Bytes>,
    ) -> Reply {
        let stream = TcpStream::connect(self.tcp).await.unwrap();
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(a) = &auth {
            headers.push(("authorization", a.as_str()));
        }
        send(stream, method, path, &headers, body.into()).await
    }

    /// JSON POST over the socket.
    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.unix(
            "POST",
            path,
            &[("content-type", "application/json")],
            body.to_string(),
        )
        .await
    }

    /// Everything the store holds, for before/after comparisons.
    pub async fn snapshot(&self) -> String {
        snapshot(&self.data_dir().join("store.db")).await
    }
}

pub async fn snapshot(db: &Path) -> String {
    let store = SqliteStore::open(db).unwrap();
    let mut out = String::new();
    for t in store.tenants().await.unwrap() {
        out.push_str(&format!("{t:?}\n"));
        for v in store.key_versions(&t.tenant).await.unwrap() {
            out.push_str(&format!("  {} {:?} {}", v.version, v.state, v.created_at));
            for w in v.wrappings {
                out.push_str(&format!(" {}={}", w.root, hex::encode(&w.blob)));
            }
            out.push('\n');
        }
    }
    out
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// The stable error code of an error reply.
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    pub fn str(&self, field: &str) -> String {
        self.json()[field]
            .as_str()
            .unwrap_or_else(|| panic!("no {field} in {}", String::from_utf8_lossy(&self.body)))
            .to_owned()
    }
}

pub async fn send<S>(
    stream: S,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Reply
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(30),
        sender.send_request(req.body(Full::new(body)).unwrap()),
    )
    .await
    .expect("request timed out")
    .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn unb64(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}
