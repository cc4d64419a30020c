//! A fault-injecting HTTP proxy between a sidecar and moto's KMS, on loopback only. It forwards
//! every request unchanged until told otherwise; then it answers with KMS's real error shapes
//! (`{"__type": ..., "message": ...}` and the status KMS uses), stalls, or drops connections.
//! It can also be killed (its port refuses connections) and restarted on the same port, which is
//! what a KMS endpoint going down and coming back looks like to the sidecar. It counts the KMS
//! operations (`X-Amz-Target`) that reach it. moto 5.2.5 ignores key state and key policies in
//! `Decrypt`, and loses its keys when it restarts, so revocation and outages are simulated here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// What the proxy does with the next requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Forward to moto.
    None,
    /// Answer with this KMS error, e.g. `(400, "DisabledException")`.
    Kms { status: u16, kind: &'static str },
    /// Read the request and never answer (the connection stays open for a minute).
    Stall,
    /// Close the connection without answering.
    Refuse,
}

impl Fault {
    pub fn kms(kind: &'static str) -> Fault {
        Fault::Kms { status: 400, kind }
    }
}

pub struct KmsProxy {
    addr: std::net::SocketAddr,
    upstream: String,
    fault: Arc<Mutex<Fault>>,
    calls: Arc<Mutex<HashMap<String, u64>>>,
    /// The accept loop and every connection task, so that `kill` can end them all.
    tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Drop for KmsProxy {
    fn drop(&mut self) {
        self.kill();
    }
}

impl KmsProxy {
    /// Starts a proxy to `upstream` (`http://127.0.0.1:PORT`).
    pub async fn start(upstream: &str) -> KmsProxy {
        let upstream = upstream
            .strip_prefix("http://")
            .expect("moto is reached over http")
            .trim_end_matches('/')
            .to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = KmsProxy {
            addr: listener.local_addr().unwrap(),
            upstream,
            fault: Arc::new(Mutex::new(Fault::None)),
            calls: Arc::new(Mutex::new(HashMap::new())),
            tasks: Arc::new(Mutex::new(Vec::new())),
        };
        proxy.serve(listener);
        proxy
    }

    fn serve(&self, listener: TcpListener) {
        let (f, c, tasks, upstream) = (
            self.fault.clone(),
            self.calls.clone(),
            self.tasks.clone(),
            self.upstream.clone(),
        );
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                if *f.lock().unwrap() == Fault::Refuse {
                    drop(stream);
                    continue;
                }
                let (f, c, upstream) = (f.clone(), c.clone(), upstream.clone());
                let conn = tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let (f, c, upstream) = (f.clone(), c.clone(), upstream.clone());
                        async move { handle(req, &f, &c, &upstream).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                tasks.lock().unwrap().push(conn.abort_handle());
            }
        });
        self.tasks.lock().unwrap().push(accept.abort_handle());
    }

    /// Like a killed server: the port stops listening (connects are refused) and every open
    /// connection is closed.
    pub fn kill(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    /// Like a restarted server: listens again on the same port.
    pub async fn restart(&self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }

    /// Requests for a KMS operation (e.g. `Decrypt`) that reached the proxy, answered or not.
    pub fn calls(&self, op: &str) -> u64 {
        self.calls.lock().unwrap().get(op).copied().unwrap_or(0)
    }

    pub fn reset_calls(&self) {
        self.calls.lock().unwrap().clear();
    }
}

#[derive(Debug)]
struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by the fault proxy")
    }
}

impl std::error::Error for Dropped {}

async fn handle(
    req: Request<Incoming>,
    fault: &Mutex<Fault>,
    calls: &Mutex<HashMap<String, u64>>,
    upstream: &str,
) -> Result<Response<Full<Bytes>>, Dropped> {
    let op = req
        .headers()
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| t.rsplit('.').next())
        .unwrap_or("")
        .to_owned();
    *calls.lock().unwrap().entry(op.clone()).or_default() += 1;
    let current = fault.lock().unwrap().clone();
    match current {
        Fault::None => forward(req, upstream).await.map_err(|_| Dropped),
        Fault::Kms { status, kind } => {
            let body = serde_json::json!({
                "__type": kind,
                "message": format!("{op} refused by the test proxy ({kind})"),
            });
            let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
            *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
            resp.headers_mut().insert(
                "content-type",
                "application/x-amz-json-1.1".parse().unwrap(),
            );
            resp.headers_mut()
                .insert("x-amzn-requestid", "proxy-fault".parse().unwrap());
            Ok(resp)
        }
        Fault::Stall => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Err(Dropped)
        }
        Fault::Refuse => Err(Dropped),
    }
}

async fn forward(
    req: Request<Incoming>,
    upstream: &str,
) -> Result<Response<Full<Bytes>>, Box<dyn std::error::Error + Send + Sync>> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let stream = TcpStream::connect(upstream).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut out = Request::builder().method(parts.method).uri(parts.uri);
    for (k, v) in &parts.headers {
        out = out.header(k, v);
    }
    let resp = sender.send_request(out.body(Full::new(body))?).await?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Response::from_parts(parts, Full::new(body)))
}
