//! A kms-sidecar client in Rust over the Unix socket, with hyper: seal and open with an AAD,
//! a data key and its unwrap, and the one error code a failed open gives.
//!
//! Usage: `cargo run --example client -- [SOCKET]` (default `./data/kms-sidecar.sock`), against
//! `kms-sidecar serve --dev`. The socket identifies the caller by its uid, so no token is sent.

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::UnixStream;

/// An error answer of the sidecar: its stable code, and the request id to find it in the log.
#[derive(Debug)]
struct ApiError {
    status: u16,
    code: String,
    request_id: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} (request {})",
            self.status, self.code, self.request_id
        )
    }
}

impl std::error::Error for ApiError {}

type Error = Box<dyn std::error::Error + Send + Sync>;

struct KmsSidecar {
    socket: PathBuf,
}

impl KmsSidecar {
    fn new(socket: impl AsRef<Path>) -> Self {
        KmsSidecar {
            socket: socket.as_ref().to_owned(),
        }
    }

    /// One request on its own connection (keep one connection per task in real code).
    async fn post(&self, path: &str, body: Value) -> Result<Value, Error> {
        let stream = UnixStream::connect(&self.socket).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = Request::post(path)
            .header("host", "localhost")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body: Value = serde_json::from_slice(&resp.into_body().collect().await?.to_bytes())?;
        if status != 200 {
            let e = &body["error"];
            return Err(Box::new(ApiError {
                status,
                code: e["code"].as_str().unwrap_or_default().to_owned(),
                request_id: e["request_id"].as_str().unwrap_or_default().to_owned(),
            }));
        }
        Ok(body)
    }

    async fn seal(
        &self,
        tenant: &str,
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<(Vec<u8>, u64), Error> {
        let r = self
            .post(
                &format!("/v1/tenants/{tenant}/seal"),
                json!({ "plaintext": B64.encode(plaintext), "aad": B64.encode(aad) }),
            )
            .await?;
        let ct = B64.decode(r["ciphertext"].as_str().ok_or("no ciphertext")?)?;
        Ok((ct, r["key_version"].as_u64().ok_or("no key_version")?))
    }

    async fn open(&self, tenant: &str, ciphertext: &[u8], aad: &[u8]) -> Result<Vec<u8>, Error> {
        let r = self
            .post(
                &format!("/v1/tenants/{tenant}/open"),
                json!({ "ciphertext": B64.encode(ciphertext), "aad": B64.encode(aad) }),
            )
            .await?;
        Ok(B64.decode(r["plaintext"].as_str().ok_or("no plaintext")?)?)
    }

    /// A fresh data key for local encryption, and its wrapped form to store beside the data.
    async fn datakey(&self, tenant: &str) -> Result<(Vec<u8>, String), Error> {
        let r = self
            .post(&format!("/v1/tenants/{tenant}/datakey"), json!({}))
            .await?;
        let key = B64.decode(r["plaintext_key"].as_str().ok_or("no plaintext_key")?)?;
        Ok((
            key,
            r["wrapped_key"]
                .as_str()
                .ok_or("no wrapped_key")?
                .to_owned(),
        ))
    }

    async fn unwrap_datakey(&self, tenant: &str, wrapped: &str) -> Result<Vec<u8>, Error> {
        let r = self
            .post(
                &format!("/v1/tenants/{tenant}/datakey:unwrap"),
                json!({ "wrapped_key": wrapped }),
            )
            .await?;
        Ok(B64.decode(r["plaintext_key"].as_str().ok_or("no plaintext_key")?)?)
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let socket = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "./data/kms-sidecar.sock".into());
    let kms = KmsSidecar::new(socket);

    let (ct, version) = kms.seal("demo", b"jane@example.com", b"user-42").await?;
    println!("sealed {} bytes under key version {version}", ct.len());
    assert_eq!(
        kms.open("demo", &ct, b"user-42").await?,
        b"jane@example.com"
    );
    println!("opened it again");

    match kms.open("demo", &ct, b"user-43").await {
        Ok(_) => return Err("opened under the wrong AAD".into()),
        Err(e) => match e.downcast_ref::<ApiError>() {
            Some(api) if api.code == "decrypt_failed" => {
                println!("wrong AAD refused: {}", api.code)
            }
            _ => return Err(e),
        },
    }

    let (key, wrapped) = kms.datakey("demo").await?;
    assert_eq!(key.len(), 32);
    assert_eq!(kms.unwrap_datakey("demo", &wrapped).await?, key);
    println!("data key unwrapped to the same 32 bytes");
    Ok(())
}
