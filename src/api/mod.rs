//! The HTTP API: a hyper server on a Unix socket (mode 0660, callers known by SO_PEERCRED) and,
//! optionally, TCP on loopback (callers known by bearer token). Owns listeners, connections and
//! shutdown; routes and handlers live in `routes`, the error mapping in `error`.

pub mod auth;
pub mod b64;
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
    /// A client must finish sending its request head within this (slowloris bound); it also
    /// closes keep-alive connections idle for that long.
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    pub max_in_flight: usize,
    pub max_headers: usize,
    /// SO_SNDBUF of accepted Unix-socket connections (0: the kernel's default). Larger
    /// buffers let a large answer go out in fewer writes and wake-ups.
    pub unix_send_buffer_bytes: usize,
    /// The most a connection reads from its socket at once (hyper's `max_buf_size`), which is
    /// also the largest request head accepted. A 1 MiB body arrives in fewer, larger reads
    /// with a larger buffer, but each connection may then hold that much while its client
    /// sends a head.
    pub read_buffer_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 4 * 1024 * 1024,
            max_batch_items: 1000,
            header_read_timeout: Duration::from_secs(10),
            max_connections: 4096,
            max_in_flight: 512,
            max_headers: 64,
            unix_send_buffer_bytes: 0,
            read_buffer_bytes: 64 * 1024,
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
        .max_buf_size(state.limits.read_buffer_bytes.max(8192))
        .max_headers(state.limits.max_headers)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(64 * 1024)
        .keep_alive_interval(Some(state.limits.header_read_timeout))
        .keep_alive_timeout(state.limits.header_read_timeout);
    let connections = Arc::new(tokio::sync::Semaphore::new(state.limits.max_connections));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(state.limits.max_in_flight));
    tokio::pin!(shutdown);
    loop {
        let (io_peer, stream) = tokio::select! {
            () = &mut shutdown => break,
            accepted = accept_unix(unix.as_ref()) => match accepted {
                Some((peer, s)) => {
                    set_send_buffer(&s, state.limits.unix_send_buffer_bytes);
                    (peer, Conn::Unix(s))
                }
                None => continue,
            },
            accepted = accept_tcp(tcp.as_ref()) => match accepted {
                Some((peer, s)) => (peer, Conn::Tcp(s)),
                None => continue,
            },
        };
        // Past the connection limit the stream is dropped at once, so a flood of connections
        // costs a file descriptor for microseconds, not a task and buffers.
        let Ok(conn_permit) = connections.clone().try_acquire_owned() else {
            state.keyring.metrics().connection_refused();
            tracing::warn!(peer = %io_peer, "connection limit reached; closing a new connection");
            continue;
        };
        // Held by the connection's task, so it is dropped however that task ends.
        let open = (conn_permit, state.keyring.metrics().connection_opened());
        let idle = state.limits.header_read_timeout;
        let st = state.clone();
        let in_flight = in_flight.clone();
        let service = service_fn(move |req| {
            let st = st.clone();
            let permit = in_flight.clone().try_acquire_owned();
            async move {
                let Ok(_permit) = permit else {
                    return Ok::<_, Infallible>(routes::overloaded(&st, &req));
                };
                // Boxed, so that hyper holds and moves a pointer, not the handler's
                // kilobytes of state, for each request.
                Ok::<_, Infallible>(Box::pin(routes::handle(st, io_peer, req)).await)
            }
        });
        match stream {
            Conn::Unix(s) => {
                let conn = builder
                    .serve_connection(TokioIo::new(IdleGuard::new(s, idle)), service)
                    .into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    drop(open);
                });
            }
            Conn::Tcp(s) => {
                let conn = builder
                    .serve_connection(TokioIo::new(IdleGuard::new(s, idle)), service)
                    .into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    drop(open);
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

/// Sets a connection's SO_SNDBUF (the kernel caps it at `net.core.wmem_max`); 0 leaves it.
fn set_send_buffer(s: &tokio::net::UnixStream, bytes: usize) {
    if bytes == 0 {
        return;
    }
    if let Err(e) = socket2::SockRef::from(s).set_send_buffer_size(bytes) {
        tracing::debug!(error = %e, "cannot set the connection's send buffer size");
    }
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

/// Closes a connection whose peer sends nothing for `idle` after connecting or after the last
/// response: hyper's own header timer starts only at a request's first byte, so without this a
/// silent connection (or an idle keep-alive one) would be held forever. The deadline is disarmed
/// while a request is being read or handled, so slow handlers are never cut.
///
/// One timer serves the connection's whole life: re-arming moves its deadline later, which
/// tokio does without taking the timer wheel's lock, where a new timer per response would
/// cost an allocation and a lock to insert and another to remove.
struct IdleGuard<S> {
    inner: S,
    idle: Duration,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    armed: bool,
}

impl<S> IdleGuard<S> {
    fn new(inner: S, idle: Duration) -> Self {
        IdleGuard {
            inner,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
            armed: true,
        }
    }

    /// A response went out: the peer now has `idle` to send the next request.
    fn rearm(&mut self) {
        let at = tokio::time::Instant::now() + self.idle;
        self.deadline.as_mut().reset(at);
        self.armed = true;
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for IdleGuard<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::future::Future;
        use std::task::Poll;
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    // Disarmed, not dropped: if it fires while a request is handled, the
                    // task is polled once for nothing.
                    self.armed = false;
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                let expired = self.armed && self.deadline.as_mut().poll(cx).is_ready();
                if expired {
                    Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "idle connection",
                    )))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for IdleGuard<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, std::task::Poll::Ready(Ok(_))) {
            self.rearm();
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, std::task::Poll::Ready(Ok(_))) {
            self.rearm();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::{IdleGuard, set_send_buffer};
    use std::time::Duration;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Reads until the guard cuts the connection, failing past `bound` (so a guard that stopped
    /// cutting fails the test instead of hanging it); returns the time since `since`.
    async fn cut(
        g: &mut IdleGuard<tokio::net::UnixStream>,
        since: Instant,
        bound: Duration,
    ) -> Duration {
        let mut buf = [0u8; 8];
        let e = tokio::time::timeout(bound, g.read(&mut buf))
            .await
            .expect("the idle connection was not cut")
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        since.elapsed()
    }

    // Real time, lower bounds only: tokio never fires a timer before its deadline.
    #[tokio::test]
    async fn the_idle_deadline_runs_between_requests_only_and_moves_with_each_response() {
        let idle = Duration::from_millis(300);
        let bound = idle * 5;
        let mut buf = [0u8; 8];

        // Silent from the start: cut after `idle`.
        let (a, _peer) = tokio::net::UnixStream::pair().unwrap();
        let t = Instant::now();
        let mut g = IdleGuard::new(a, idle);
        assert!(cut(&mut g, t, bound).await >= idle);

        // A request's first bytes disarm it, even once its timer is registered (polled) and
        // past its deadline: a handler may take longer than `idle`.
        let (a, mut peer) = tokio::net::UnixStream::pair().unwrap();
        let mut g = IdleGuard::new(a, idle);
        let early = tokio::time::timeout(idle / 3, g.read(&mut buf)).await;
        assert!(early.is_err(), "cut early: {early:?}");
        peer.write_all(b"GET").await.unwrap();
        assert_eq!(g.read(&mut buf).await.unwrap(), 3);
        let waited = tokio::time::timeout(idle * 3, g.read(&mut buf)).await;
        assert!(waited.is_err(), "cut while a request was open: {waited:?}");

        // A response re-arms it from that moment, though it fired while disarmed above.
        let t = Instant::now();
        g.write_all(b"200").await.unwrap();
        assert!(cut(&mut g, t, bound).await >= idle);

        // Each response moves the deadline: had the second not, the cut would come 100 ms
        // after it.
        let (a, _peer) = tokio::net::UnixStream::pair().unwrap();
        let mut g = IdleGuard::new(a, idle);
        g.write_all(b"200").await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t = Instant::now();
        g.write_all(b"200").await.unwrap();
        let after = cut(&mut g, t, bound).await;
        assert!(after >= idle, "cut {after:?} after the last response");
    }

    #[tokio::test]
    async fn accepted_unix_connections_get_the_configured_send_buffer() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let default = socket2::SockRef::from(&b).send_buffer_size().unwrap();
        set_send_buffer(&a, 0);
        assert_eq!(
            socket2::SockRef::from(&a).send_buffer_size().unwrap(),
            default
        );
        // Below net.core.wmem_max on any stock kernel; Linux reports twice what was asked.
        set_send_buffer(&a, 100_000);
        assert_eq!(
            socket2::SockRef::from(&a).send_buffer_size().unwrap(),
            200_000
        );
    }
}
