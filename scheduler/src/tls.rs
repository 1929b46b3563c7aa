//! Serving the API over TLS (`docs/security.md`): the certificate and key from PEM files, TLS 1.3
//! only unless 1.2 is allowed, and a listener that completes each handshake on a task of its
//! own, so that a slow or silent client never holds up the others.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// How long a client has to complete its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections whose handshake is done, waiting for the server to take them.
const ACCEPTED_BACKLOG: usize = 128;
/// The most handshakes under way at once; past it, new connections wait in the kernel's
/// backlog, so silent clients cannot take every file descriptor.
const MAX_HANDSHAKES: usize = 256;

/// The oldest TLS version the API accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MinVersion {
    /// TLS 1.3 only.
    #[value(name = "1.3")]
    Tls13,
    /// TLS 1.2 and 1.3.
    #[value(name = "1.2")]
    Tls12,
}

/// Where the API's certificate and key are, and the oldest version it accepts.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// The certificate chain, PEM, the server's certificate first.
    pub cert: PathBuf,
    /// The private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The oldest TLS version accepted.
    pub min_version: MinVersion,
}

/// Why TLS cannot be set up; each names the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file cannot be read or holds no certificate.
    #[error("TASKFLEET_TLS_CERT {path}: {reason}")]
    Cert {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key file cannot be read or holds no private key.
    #[error("TASKFLEET_TLS_KEY {path}: {reason}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key does not go with the certificate, or rustls refuses them.
    #[error("TASKFLEET_TLS_CERT and TASKFLEET_TLS_KEY cannot be used together: {0}")]
    Config(String),
}

/// Returns the acceptor for `settings`, checking the files now, at start.
pub fn acceptor(settings: &TlsSettings) -> Result<TlsAcceptor, TlsError> {
    let cert_error = |reason: String| TlsError::Cert {
        path: settings.cert.clone(),
        reason,
    };
    let certs = read_certs(&settings.cert).map_err(cert_error)?;
    let key = PrivateKeyDer::from_pem_file(&settings.key).map_err(|error| TlsError::Key {
        path: settings.key.clone(),
        reason: pem_reason(&error, "private key"),
    })?;
    let versions: &[&rustls::SupportedProtocolVersion] = match settings.min_version {
        MinVersion::Tls13 => &[&rustls::version::TLS13],
        MinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|error| TlsError::Config(error.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|error| TlsError::Config(error.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Returns the certificates of a PEM file, or why there are none.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|error| pem_reason(&error, "certificate"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| pem_reason(&error, "certificate"))?;
    if certs.is_empty() {
        return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".to_owned());
    }
    Ok(certs)
}

/// Returns what a PEM reading error means for a file that should hold a `what`.
fn pem_reason(error: &rustls::pki_types::pem::Error, what: &str) -> String {
    match error {
        rustls::pki_types::pem::Error::Io(io) => format!("cannot be read: {io}"),
        rustls::pki_types::pem::Error::NoItemsFound => format!("holds no PEM {what}"),
        other => format!("is not a PEM {what}: {other:?}"),
    }
}

/// A listener of TLS connections for `axum::serve`: it accepts TCP connections and hands over
/// those whose handshake completes within [`HANDSHAKE_TIMEOUT`].
pub struct TlsListener {
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Serves TLS on `tcp` with `acceptor` until `shutdown`.
    pub fn new(
        tcp: TcpListener,
        acceptor: TlsAcceptor,
        shutdown: CancellationToken,
    ) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (sender, accepted) = mpsc::channel(ACCEPTED_BACKLOG);
        let handshakes = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let permit = tokio::select! {
                    () = shutdown.cancelled() => return,
                    permit = handshakes.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => return,
                    },
                };
                let (stream, peer) = tokio::select! {
                    () = shutdown.cancelled() => return,
                    accepted = tcp.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(error) => {
                            // Out of file descriptors, most often: wait rather than spin.
                            tracing::warn!(%error, "accepting a connection");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let acceptor = acceptor.clone();
                let sender = sender.clone();
                tokio::spawn(async move {
                    let handshake =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
                    drop(permit);
                    match handshake {
                        Ok(Ok(tls)) => {
                            let _ = sender.send((tls, peer)).await;
                        }
                        Ok(Err(error)) => {
                            tracing::debug!(%error, %peer, "TLS handshake failed");
                        }
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { accepted, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(connection) => connection,
            // The accept loop has stopped (the scheduler is stopping): no more connections.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}
