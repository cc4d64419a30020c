//! Where and how the PostgreSQL engine connects: parses `store.url` (libpq URL syntax,
//! including `sslmode=verify-full` and `sslrootcert`), sets per-session bounds (statement and
//! lock timeouts), and builds the rustls connector and the connection pool. Never prints the
//! URL: it may hold a password.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres_rustls::MakeRustlsConnect;

/// How the sidecar reaches PostgreSQL; parsed and checked at configuration time.
#[derive(Clone)]
pub struct PostgresOptions {
    pub(super) pg: tokio_postgres::Config,
    /// PEM bundle of the CAs trusted for the server certificate (`sslrootcert`); the system's
    /// roots when unset.
    pub(super) ca_file: Option<PathBuf>,
    pub(super) pool_size: usize,
    pub(super) connect_timeout: Duration,
    pub(super) statement_timeout: Duration,
}

impl fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PostgresOptions({})", self.describe())
    }
}

impl PostgresOptions {
    /// Parses a `postgres://` URL. `sslmode` may be `disable`, `prefer` (the default),
    /// `require`, `verify-ca` or `verify-full`; whenever TLS is used, the server certificate
    /// is verified against the trusted roots *and* the host name (rustls has no unverified
    /// mode), so `require` and `verify-ca` behave as `verify-full`.
    pub fn new(
        url: &str,
        pool_size: usize,
        connect_timeout: Duration,
        statement_timeout: Duration,
    ) -> Result<Self, String> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err("must be a URL starting with postgres:// or postgresql://".into());
        }
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (url, None),
        };
        let mut kept = Vec::new();
        let mut ca_file = None;
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            match pair.split_once('=') {
                Some(("sslmode", "verify-ca" | "verify-full")) => kept.push("sslmode=require"),
                Some(("sslrootcert", path)) => {
                    if path.contains('%') {
                        return Err("sslrootcert: percent-encoded paths are not supported".into());
                    }
                    ca_file = Some(PathBuf::from(path));
                }
                _ => kept.push(pair),
            }
        }
        let rewritten = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        // tokio-postgres's messages (and their sources) name the bad option, never a value.
        let mut pg: tokio_postgres::Config = rewritten.parse().map_err(
            |e: tokio_postgres::Error| match std::error::Error::source(&e) {
                Some(cause) => format!("{e}: {cause}"),
                None => e.to_string(),
            },
        )?;
        if pg.get_hosts().is_empty() {
            return Err("no host given".into());
        }
        if pg.get_dbname().is_none() {
            return Err("no database name given (postgres://…/DBNAME)".into());
        }
        if pg.get_application_name().is_none() {
            pg.application_name("kms-sidecar");
        }
        pg.connect_timeout(connect_timeout);
        // A peer that vanishes without closing the connection is noticed within bounds.
        pg.tcp_user_timeout(connect_timeout + statement_timeout);
        pg.keepalives_idle(Duration::from_secs(30));
        let millis = statement_timeout.as_millis();
        let bounds = format!(
            "-c statement_timeout={millis} -c lock_timeout={millis} \
             -c idle_in_transaction_session_timeout={}",
            millis.saturating_mul(6)
        );
        let options = match pg.get_options() {
            Some(o) if !o.is_empty() => format!("{o} {bounds}"),
            _ => bounds,
        };
        pg.options(&options);
        Ok(PostgresOptions {
            pg,
            ca_file,
            pool_size,
            connect_timeout,
            statement_timeout,
        })
    }

    /// Host, port and database, for messages (never the user's password).
    pub fn describe(&self) -> String {
        let host = match self.pg.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "?".into(),
        };
        let port = self.pg.get_ports().first().copied().unwrap_or(5432);
        let tls = match self.pg.get_ssl_mode() {
            SslMode::Disable => "no TLS",
            SslMode::Prefer => "TLS if offered",
            _ => "TLS required",
        };
        format!(
            "postgres {host}:{port}/{} ({tls})",
            self.pg.get_dbname().unwrap_or("?")
        )
    }

    /// Whether a network attacker could strip TLS: not `require`/`verify-*`, and not on this
    /// machine.
    pub(super) fn tls_strippable(&self) -> bool {
        let local = self.pg.get_hosts().iter().all(|h| match h {
            Host::Unix(_) => true,
            Host::Tcp(h) => {
                h == "localhost"
                    || h.parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
        });
        !local && !matches!(self.pg.get_ssl_mode(), SslMode::Require)
    }

    /// The rustls connector: the CA file's certificates, or the system's roots.
    pub(super) fn tls(&self) -> Result<MakeRustlsConnect, String> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_file {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(format!(
                        "sslrootcert {}: no usable certificate",
                        path.display()
                    ));
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for e in &found.errors {
                    tracing::debug!(error = %e, "a system root certificate could not be read");
                }
                roots.add_parsable_certificates(found.certs);
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(MakeRustlsConnect::new(config))
    }

    /// A pool whose every wait is bounded: for a free connection, for a new one, and for the
    /// liveness check of a reused one.
    pub(super) fn pool(&self, tls: MakeRustlsConnect) -> Result<Pool, String> {
        let manager = Manager::from_config(
            self.pg.clone(),
            tls,
            ManagerConfig {
                // A connection closed by the server (restart, failover) is noticed by its
                // driver and dropped here; a live one costs no extra round trip.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        Pool::builder(manager)
            .max_size(self.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(self.connect_timeout))
            .create_timeout(Some(self.connect_timeout))
            .recycle_timeout(Some(self.connect_timeout))
            .build()
            .map_err(|e| format!("connection pool: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(url: &str) -> Result<PostgresOptions, String> {
        PostgresOptions::new(url, 4, Duration::from_secs(5), Duration::from_secs(5))
    }

    #[test]
    fn urls_parse_with_libpq_tls_modes() {
        let o = opts("postgres://kms:s3cret@db.internal:6432/kms?sslmode=verify-full&sslrootcert=/etc/ca.pem")
            .unwrap();
        assert_eq!(o.pg.get_ssl_mode(), SslMode::Require);
        assert_eq!(o.ca_file, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(o.pg.get_ports(), [6432]);
        assert!(!o.tls_strippable());
        let text = format!("{o:?} {}", o.describe());
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("db.internal:6432/kms"), "{text}");
        assert!(opts("postgres://db.internal/kms").unwrap().tls_strippable());
        assert!(
            !opts("postgres://127.0.0.1/kms?sslmode=disable")
                .unwrap()
                .tls_strippable()
        );
        let o = opts("postgres://h/kms?options=-c%20search_path%3Dkms").unwrap();
        let options = o.pg.get_options().unwrap();
        assert!(
            options.starts_with("-c search_path=kms -c statement_timeout=5000"),
            "{options}"
        );
    }

    #[test]
    fn bad_urls_are_refused_without_echoing_them() {
        for (url, want) in [
            ("mysql://u:pw@h/db", "postgres://"),
            ("postgres://u:pw@h/db?sslmode=sometimes", "sslmode"),
            ("postgres://u:pw@h", "database"),
            ("postgres://u:pw@h/db?bogus=1", "bogus"),
        ] {
            let e = opts(url).unwrap_err();
            assert!(e.contains(want), "{url}: {e}");
            assert!(!e.contains("pw"), "{e}");
        }
    }
}
