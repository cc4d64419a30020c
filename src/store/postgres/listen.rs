//! Change notifications for the fleet: one dedicated connection per sidecar LISTENs on the
//! channel every key-ring mutation NOTIFYs (inside its own transaction, so a notice means a
//! committed change). On every (re)subscription the key ring is told to drop everything, since
//! notices sent while the connection was down are lost; a periodic ping notices a silent peer.
//! Knows nothing about caches: it only reports.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;

use super::connect::PostgresOptions;
use crate::keyring::StoreChange;
use crate::tenant::TenantId;

/// The NOTIFY channel; the payload is the tenant id.
pub(super) const CHANNEL: &str = "kms_sidecar_keys";

/// How often an idle listening connection is checked.
const PING_EVERY: Duration = Duration::from_secs(5);
/// Reconnection back-off bounds.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Listens until `tx` is closed, reconnecting with back-off whenever the connection is lost.
pub(super) async fn listen(
    options: Arc<PostgresOptions>,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    tx: mpsc::Sender<StoreChange>,
) {
    let mut retry = RETRY_FIRST;
    loop {
        match session(&options, &tls, &tx, &mut retry).await {
            Ok(()) => return,
            Err(e) => tracing::warn!(store = %options.describe(), error = %e,
                "change notifications interrupted; reconnecting (caches expire by TTL meanwhile)"),
        }
        tokio::select! {
            _ = tx.closed() => return,
            _ = tokio::time::sleep(retry) => {}
        }
        retry = (retry * 2).min(RETRY_MAX);
    }
}

/// One listening connection: `Ok` when the subscriber went away, `Err` when the connection did.
async fn session(
    options: &PostgresOptions,
    tls: &tokio_postgres_rustls::MakeRustlsConnect,
    tx: &mpsc::Sender<StoreChange>,
    retry: &mut Duration,
) -> Result<(), String> {
    let bound = options.connect_timeout + options.statement_timeout;
    let (client, mut connection) = tokio::time::timeout(bound, options.pg.connect(tls.clone()))
        .await
        .map_err(|_| "connecting timed out".to_string())?
        .map_err(|e| format!("connecting: {e}"))?;
    // The connection is driven by its own task, which forwards notices and ends with it.
    let (notices_tx, mut notices) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if notices_tx.send(Ok(n.payload().to_owned())).is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    let _ = notices_tx.send(Err(e.to_string()));
                    return;
                }
                None => return,
            }
        }
    });
    let _stop_driver = AbortOnDrop(driver);
    tokio::time::timeout(bound, client.batch_execute(&format!("LISTEN {CHANNEL}")))
        .await
        .map_err(|_| "LISTEN timed out".to_string())?
        .map_err(|e| format!("LISTEN: {e}"))?;
    tracing::info!(store = %options.describe(), "listening for key changes of other sidecars");
    *retry = RETRY_FIRST;
    // Whatever changed while nobody listened is unknown: start clean.
    if tx.send(StoreChange::All).await.is_err() {
        return Ok(());
    }
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    loop {
        tokio::select! {
            _ = tx.closed() => return Ok(()),
            notice = notices.recv() => {
                let change = match notice {
                    Some(Ok(payload)) => match TenantId::parse(&payload) {
                        Ok(t) => StoreChange::Tenant(t),
                        Err(_) => StoreChange::All,
                    },
                    Some(Err(e)) => return Err(e),
                    None => return Err("connection closed".into()),
                };
                if tx.send(change).await.is_err() {
                    return Ok(());
                }
            }
            _ = ping.tick() => {
                tokio::time::timeout(bound, client.simple_query("SELECT 1"))
                    .await
                    .map_err(|_| "ping timed out".to_string())?
                    .map_err(|e| format!("ping: {e}"))?;
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
