//! The HTTP API: a hyper server on a Unix socket (mode 0660, callers known by SO_PEERCRED) and,
//! optionally, TCP on loopback (callers known by bearer token). Owns listeners, connections and
//! shutdown; routes and handlers live in `routes`, the error mapping in `error`.

pub mod auth;
pub mod error;
pub mod routes;

use std::convert::Infallible;
use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, UnixListener};

use crate::keyring::Keyring;
use auth::{Authenticator, Peer};

/// Request limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_batch_items: usize,
    /// A client must finish sending its request head within this (slowloris bound).
    pub header_read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 4 * 1024 * 1024,
            max_batch_items: 1000,
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

/// What every request handler shares.
pub struct AppState {
    pub keyring: Keyring,
    pub auth: Authenticator,
    pub limits: Limits,
    pub audit: crate::audit::Audit,
    /// How long a shred request waits for its second admin.
    pub shred_window: Duration,
    pub vault: crate::vault::Vault,
}

/// Errors setting up listeners.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen on {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0} is not a loopback address; binding elsewhere needs TLS, which is not configured")]
    NotLoopback(String),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
}

/// Binds the Unix socket at `path` with `mode`, replacing a stale socket but nothing else.
pub fn bind_unix(path: &Path, mode: u32) -> Result<UnixListener, ListenError> {
    let io = |source| ListenError::Io {
        what: path.display().to_string(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(io)?,
        Ok(_) => return Err(ListenError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    Ok(listener)
}

/// Binds TCP, refusing any address that is not loopback.
pub async fn bind_tcp(addr: &str) -> Result<TcpListener, ListenError> {
    let parsed: std::net::SocketAddr = addr
        .parse()
        .map_err(|_| ListenError::NotLoopback(addr.to_owned()))?;
    if !parsed.ip().is_loopback() {
        return Err(ListenError::NotLoopback(addr.to_owned()));
    }
    TcpListener::bind(parsed)
        .await
        .map_err(|source| ListenError::Io {
            what: addr.to_owned(),
            source,
        })
}

/// Serves on the given listeners until `shutdown` completes, then drains open connections
/// (bounded by `drain`).
pub async fn serve(
    state: Arc<AppState>,
    unix: Option<UnixListener>,
    tcp: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(state.limits.header_read_timeout)
        .max_buf_size(64 * 1024)
        .keep_alive(true);
    builder.http2().max_concurrent_streams(256);
    tokio::pin!(shutdown);
    loop {
        let (io_peer, stream) = tokio::select! {
            () = &mut shutdown => break,
            accepted = accept_unix(unix.as_ref()) => match accepted {
                Some((peer, s)) => (peer, Conn::Unix(s)),
                None => continue,
            },
            accepted = accept_tcp(tcp.as_ref()) => match accepted {
                Some((peer, s)) => (peer, Conn::Tcp(s)),
                None => continue,
            },
        };
        let st = state.clone();
        let service = service_fn(move |req| {
            let st = st.clone();
            async move { Ok::<_, Infallible>(routes::handle(st, io_peer, req).await) }
        });
        match stream {
            Conn::Unix(s) => {
                let conn = builder
                    .serve_connection(TokioIo::new(s), service)
                    .into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            Conn::Tcp(s) => {
                let conn = builder
                    .serve_connection(TokioIo::new(s), service)
                    .into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
        }
    }
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(drain) => tracing::warn!("connections still open after the drain period"),
    }
}

enum Conn {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

async fn accept_unix(l: Option<&UnixListener>) -> Option<(Peer, tokio::net::UnixStream)> {
    let Some(l) = l else {
        return std::future::pending().await;
    };
    match l.accept().await {
        Ok((s, _)) => match s.peer_cred() {
            Ok(cred) => Some((
                Peer::Unix {
                    uid: cred.uid(),
                    gid: cred.gid(),
                    pid: cred.pid(),
                },
                s,
            )),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read peer credentials; dropping connection");
                None
            }
        },
        Err(e) => {
            accept_error(e).await;
            None
        }
    }
}

async fn accept_tcp(l: Option<&TcpListener>) -> Option<(Peer, tokio::net::TcpStream)> {
    let Some(l) = l else {
        return std::future::pending().await;
    };
    match l.accept().await {
        Ok((s, addr)) => {
            let _ = s.set_nodelay(true);
            Some((Peer::Tcp(addr), s))
        }
        Err(e) => {
            accept_error(e).await;
            None
        }
    }
}

/// Accept errors (e.g. out of file descriptors) are transient: back off briefly, keep serving.
async fn accept_error(e: std::io::Error) {
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}
