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
        metric_value(&self.metrics().await, series).unwrap_or(0.0)
    }

    /// The whole `/metrics` text.
    pub async fn metrics(&self) -> String {
        let r = self.unix("GET", "/metrics", &[], Bytes::new()).await;
        assert_eq!(r.status, 200);
        String::from_utf8_lossy(&r.body).into_owned()
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

/// The value of one series in a `/metrics` text, if it is there.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn unb64(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

/// The server the PostgreSQL tests use (scripts/test.sh starts one and sets it).
pub const PG_ENV: &str = "KMS_TEST_PG";

fn pg_required() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// The same URL with another database name.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    format!("{}/{db}{query}", &base[..host_end])
}

/// A new, empty database of its own on the test server, dropped with this value. `None` (the
/// test is skipped) when `KMS_TEST_PG` is unset, except under `CI=true`, where that
/// fails the test.
pub struct PgDatabase {
    pub url: String,
    admin_url: String,
    name: String,
}

impl PgDatabase {
    pub async fn create() -> Option<PgDatabase> {
        let admin_url = match std::env::var(PG_ENV) {
            Ok(u) => u,
            Err(_) if pg_required() => {
                panic!("{PG_ENV} is not set under CI=true: the PostgreSQL tests must run")
            }
            Err(_) => {
                eprintln!("skipped: {PG_ENV} is not set (scripts/test.sh starts a server)");
                return None;
            }
        };
        let name = format!("kms_it_{}", hex::encode(rand_bytes::<8>()));
        let (client, conn) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("{PG_ENV}: cannot connect: {e}"));
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        Some(PgDatabase {
            url: with_database(&admin_url, &name),
            admin_url,
            name,
        })
    }

    /// The `[store]` table pointing a sidecar at this database.
    pub fn toml(&self) -> String {
        store_toml(&self.url)
    }
}

pub fn store_toml(url: &str) -> String {
    format!("[store]\nurl = {url:?}\nconnect_timeout_seconds = 2\nstatement_timeout_seconds = 2\n")
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let (url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs inside the test's runtime, which cannot block on itself.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok((client, conn)) =
                    tokio_postgres::connect(&url, tokio_postgres::NoTls).await
                {
                    tokio::spawn(conn);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

pub fn rand_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).unwrap();
    b
}

/// A PostgreSQL server of a test's own (for tests that stop it), in a temp dir on 127.0.0.1
/// and a free port, run as the `postgres` user when this process is root. Stopped and removed
/// on drop.
pub struct PgCluster {
    dir: TempDir,
    bin: PathBuf,
    pub port: u16,
    pub url: String,
    /// Extra server options (`-c ssl=on …`).
    extra: String,
}

fn pg_bin_dir() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("KMS_TEST_PG_BIN") {
        return Some(PathBuf::from(d));
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("pg_ctl").exists())
        .collect();
    found.sort();
    found.pop()
}

impl PgCluster {
    pub fn start() -> Option<PgCluster> {
        let cluster = Self::init()?;
        cluster.resume();
        Some(cluster)
    }

    /// A server with TLS on: a new CA (returned, PEM) signed its certificate for the host name
    /// `localhost` only. Made with the openssl command.
    pub fn start_tls() -> Option<(PgCluster, PathBuf)> {
        let mut cluster = Self::init()?;
        let dir = cluster.dir.path().to_owned();
        let openssl = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .current_dir(&dir)
                .args(args)
                .output()
                .expect("the openssl command");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.pem",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=kms-sidecar test CA",
                ],
            ]
            .concat(),
        );
        openssl(
            &[
                &["req"][..],
                &ec,
                &[
                    "-keyout",
                    "server.key",
                    "-out",
                    "server.csr",
                    "-subj",
                    "/CN=localhost",
                ],
            ]
            .concat(),
        );
        std::fs::write(dir.join("san.ext"), "subjectAltName=DNS:localhost\n").unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ]);
        if nix::unistd::geteuid().is_root() {
            let pg = nix::unistd::User::from_name("postgres")
                .unwrap()
                .expect("a postgres user");
            for f in ["server.key", "server.pem"] {
                std::os::unix::fs::chown(dir.join(f), Some(pg.uid.as_raw()), Some(pg.gid.as_raw()))
                    .unwrap();
            }
        }
        std::fs::set_permissions(
            dir.join("server.key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        cluster.extra = format!(
            " -c ssl=on -c ssl_cert_file={0}/server.pem -c ssl_key_file={0}/server.key",
            dir.display()
        );
        cluster.resume();
        Some((cluster, dir.join("ca.pem")))
    }

    fn init() -> Option<PgCluster> {
        let Some(bin) = pg_bin_dir() else {
            if pg_required() {
                panic!("PostgreSQL server binaries not found under CI=true");
            }
            eprintln!("skipped: no PostgreSQL server binaries (apt-get install postgresql)");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        if nix::unistd::geteuid().is_root() {
            let pg = nix::unistd::User::from_name("postgres")
                .unwrap()
                .expect("a postgres user");
            std::os::unix::fs::chown(dir.path(), Some(pg.uid.as_raw()), Some(pg.gid.as_raw()))
                .unwrap();
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cluster = PgCluster {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            dir,
            bin,
            port,
            extra: String::new(),
        };
        let data = cluster.data();
        cluster.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        Some(cluster)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let exe = self.bin.join(tool);
        let mut cmd = if nix::unistd::geteuid().is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            std::process::Command::new(&exe)
        };
        let out = cmd.args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts (or restarts) the server and waits until it accepts connections.
    pub fn resume(&self) {
        let data = self.data();
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off{}",
            self.port,
            self.dir.path().display(),
            self.extra
        );
        let log = self.dir.path().join("server.log").display().to_string();
        self.run(
            "pg_ctl",
            &["-D", &data, "-o", &opts, "-l", &log, "-w", "start"],
        );
    }

    /// Stops the server (fast shutdown: sessions are ended, as in a restart or failover).
    pub fn stop(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.data();
        let exe = self.bin.join("pg_ctl");
        let mut cmd = if nix::unistd::geteuid().is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            std::process::Command::new(&exe)
        };
        let _ = cmd.args(["-D", &data, "-m", "immediate", "stop"]).output();
    }
}

/// A sidecar as a separate process (the built binary), with its own data dir and socket and a
/// root keyfile it may share with others.
pub struct SidecarProcess {
    pub dir: TempDir,
    pub socket: PathBuf,
    child: std::process::Child,
}

impl SidecarProcess {
    pub async fn spawn(root_key: &Path, extra_toml: &str) -> SidecarProcess {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let socket = dir.path().join("s.sock");
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        let toml = format!(
            "data_dir = {:?}\nauto_create_tenants = true\n{extra_toml}\n[listen]\nunix_socket = {:?}\n\n[[roots]]\nkind = \"keyfile\"\npath = {:?}\n{}",
            data.display().to_string(),
            socket.display().to_string(),
            root_key.display().to_string(),
            default_principals(Some(uid())),
        );
        let config = dir.path().join("config.toml");
        std::fs::write(&config, toml).unwrap();
        let log = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_kms-sidecar"))
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .env("KMS_SIDECAR_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut p = SidecarProcess { dir, socket, child };
        let started = std::time::Instant::now();
        while !p.socket.exists() {
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("sidecar exited with {status}: {}", p.stderr());
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "sidecar did not start: {}",
                p.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        p
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// JSON POST over the socket, as the socket's uid or as a bearer token.
    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> Reply {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(a) = &auth {
            headers.push(("authorization", a.as_str()));
        }
        let stream = UnixStream::connect(&self.socket).await.unwrap();
        send(
            stream,
            "POST",
            path,
            &headers,
            Bytes::from(body.to_string()),
        )
        .await
    }
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
