//! The one TLS stack of every taskfleet process, rustls with ring's cryptography, and the CA
//! certificate a fleet's connections to RabbitMQ and Redis trust (`TASKFLEET_CA_CERT`).
//!
//! This module reads and checks that certificate once, at start; it opens no connection. Each
//! client library gets it in its own form where the connection is opened (`crate::amqp`,
//! `crate::redis_connection`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Makes ring the process's rustls crypto provider. Call it first thing in `main`: the clients
/// that take the process's provider (Redis, HTTP) find no other. Calling it again does nothing.
pub fn install_crypto_provider() {
    // An error means a provider is installed already, which is all this asks for.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A CA certificate file (PEM, one certificate or several) that a fleet's TLS connections to
/// its services trust, read and checked once at start.
#[derive(Clone)]
pub struct CaCertificate {
    path: PathBuf,
    pem: Arc<str>,
}

impl CaCertificate {
    /// Reads the PEM file at `path` and checks that it holds at least one certificate and that
    /// every certificate in it can serve as a trust anchor; other PEM sections (a key, say) are
    /// ignored.
    pub fn read(path: &Path) -> Result<Self, CaCertificateError> {
        let path = path.to_owned();
        let pem = match std::fs::read_to_string(&path) {
            Ok(pem) => pem,
            Err(source) => return Err(CaCertificateError::Read { path, source }),
        };
        let mut anchors = rustls::RootCertStore::empty();
        for certificate in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let added = certificate
                .map_err(|error| error.to_string())
                .and_then(|certificate| {
                    anchors.add(certificate).map_err(|error| error.to_string())
                });
            if let Err(detail) = added {
                return Err(CaCertificateError::Invalid { path, detail });
            }
        }
        if anchors.is_empty() {
            return Err(CaCertificateError::NoCertificate { path });
        }
        Ok(Self {
            path,
            pem: pem.into(),
        })
    }

    /// Returns the file the certificate was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns the file's text, PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }
}

impl std::fmt::Debug for CaCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CaCertificate").field(&self.path).finish()
    }
}

/// Why a CA certificate file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CaCertificateError {
    /// The file cannot be read (missing, unreadable, not text).
    #[error("reading {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What reading it answered.
        #[source]
        source: std::io::Error,
    },
    /// The file holds no PEM certificate.
    #[error("{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A certificate in the file is malformed, or cannot be a trust anchor.
    #[error("{} holds a certificate that cannot be used: {detail}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A self-signed CA certificate (ECDSA P-256, valid until 2126), made once for these tests
    /// with `openssl req -x509`.
    const CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBnjCCAUWgAwIBAgIUY4Bsb8sxtRiXs/LGqzeCfQiUnVswCgYIKoZIzj0EAwIw
HDEaMBgGA1UEAwwRdGFza2ZsZWV0IHRlc3QgQ0EwIBcNMjYxMjA1MjI1NzQ3WhgP
MjEyNjExMTEyMjU3NDdaMBwxGjAYBgNVBAMMEXRhc2tmbGVldCB0ZXN0IENBMFkw
EwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEF+IYyrBo12L/NgHcTdsc3c41t2VpZ46N
hNfpqSXwi4ITM/DdGKiEAUD4nTStcOK636Zf8DBvJSQbtcXX9Zs8BqNjMGEwHQYD
VR0OBBYEFMzI+tHtk5DEWslpYDRVPBkAmzdLMB8GA1UdIwQYMBaAFMzI+tHtk5DE
WslpYDRVPBkAmzdLMA8GA1UdEwEB/wQFMAMBAf8wDgYDVR0PAQH/BAQDAgEGMAoG
CCqGSM49BAMCA0cAMEQCIGixPJ4iTtRWYSe95aRXm3G85oGMoOKqxE/dcf82eO5o
AiBYEeuHPrP5GCKFeyyJaBydvyYkRnKazWCHd5D7kjk/Qw==
-----END CERTIFICATE-----
";

    /// Returns a usable CA certificate, from a file of this process's own.
    pub(crate) fn ca_certificate() -> CaCertificate {
        let path = std::env::temp_dir().join(format!("taskfleet-io-ca-{}.pem", std::process::id()));
        std::fs::write(&path, CA_PEM).expect("writing the file");
        let ca = CaCertificate::read(&path).expect("a usable certificate");
        let _ = std::fs::remove_file(&path);
        ca
    }

    fn check(contents: &str, expected: Result<(), &str>) {
        let dir = std::env::temp_dir().join(format!(
            "taskfleet-io-tls-{}-{}",
            std::process::id(),
            contents.len()
        ));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let path = dir.join("ca.pem");
        std::fs::write(&path, contents).expect("writing the file");
        let read = CaCertificate::read(&path);
        let _ = std::fs::remove_dir_all(&dir);
        match (read, expected) {
            (Ok(ca), Ok(())) => {
                assert_eq!(ca.path(), path);
                assert_eq!(ca.pem(), contents);
            }
            (Err(error), Err(wording)) => {
                let message = error.to_string();
                assert!(message.contains(wording), "{message}");
                assert!(message.contains(&path.display().to_string()), "{message}");
            }
            (read, expected) => panic!("{contents:?}: {read:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn a_ca_file_must_hold_usable_certificates() {
        check(CA_PEM, Ok(()));
        check(&format!("{CA_PEM}{CA_PEM}"), Ok(()));
        let key =
            "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n";
        check(&format!("{key}{CA_PEM}"), Ok(()));
        check("", Err("holds no PEM certificate"));
        check("not a certificate\n", Err("holds no PEM certificate"));
        check(key, Err("holds no PEM certificate"));
        check(
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
            Err("holds a certificate that cannot be used"),
        );
        check(
            "-----BEGIN CERTIFICATE-----\nno base64 here!\n",
            Err("holds a certificate that cannot be used"),
        );
    }

    #[test]
    fn a_missing_ca_file_is_named() {
        let path = Path::new("/nonexistent/taskfleet/ca.pem");
        let error = CaCertificate::read(path).expect_err("no such file");
        let message = error.to_string();
        assert!(
            message.starts_with("reading /nonexistent/taskfleet/ca.pem: "),
            "{message}"
        );
    }
}
