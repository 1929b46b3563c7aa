//! Reaching Redis: the client both binaries open from their URL (with TLS for `rediss://`,
//! trusting the fleet's CA certificate when one is set), and the managed connection
//! (reconnecting on its own) they send commands through.

use redis::aio::ConnectionManager;
use redis::{ConnectionAddr, IntoConnectionInfo};

use crate::tls::CaCertificate;

/// A Redis URL, with the CA certificate its `rediss://` connections trust.
#[derive(Debug, Clone)]
pub struct RedisUrl {
    url: String,
    ca_certificate: Option<CaCertificate>,
}

impl RedisUrl {
    /// Describes Redis at `url`. With a `rediss://` URL and `ca_certificate`, TLS connections
    /// trust that certificate instead of the system's CA certificates (redis-rs takes the one
    /// or the other); without it, the system's. A `redis://` URL is plain TCP either way.
    pub fn new(url: impl Into<String>, ca_certificate: Option<CaCertificate>) -> Self {
        Self {
            url: url.into(),
            ca_certificate,
        }
    }

    /// Returns the URL.
    pub fn as_str(&self) -> &str {
        &self.url
    }

    /// Returns a client for the URL; connecting is left to its first use. Every connection of
    /// the client (commands, pub/sub, reconnections) uses the same TLS settings.
    pub fn client(&self) -> Result<redis::Client, redis::RedisError> {
        let info = self.url.as_str().into_connection_info()?;
        match &self.ca_certificate {
            Some(ca) if matches!(info.addr(), ConnectionAddr::TcpTls { .. }) => {
                let certificates = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.pem().as_bytes().to_vec()),
                };
                redis::Client::build_with_tls(info, certificates)
            }
            _ => redis::Client::open(info),
        }
    }
}

/// Opens a client for `url` and its managed connection; the client also serves pub/sub
/// subscriptions (see [`crate::pubsub`]).
pub async fn connect(url: &RedisUrl) -> Result<(redis::Client, ConnectionManager), ConnectError> {
    let client = url.client().map_err(ConnectError::Url)?;
    let connection = client
        .get_connection_manager()
        .await
        .map_err(ConnectError::Connect)?;
    Ok((client, connection))
}

/// Why Redis could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL does not parse, or its TLS settings cannot be used.
    #[error("parsing the redis url: {0}")]
    Url(#[source] redis::RedisError),
    /// The server did not answer, or the TLS handshake failed.
    #[error("connecting to redis: {0}")]
    Connect(#[source] redis::RedisError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_tls(client: &redis::Client) -> bool {
        matches!(
            client.get_connection_info().addr(),
            ConnectionAddr::TcpTls { .. }
        )
    }

    #[test]
    fn the_scheme_decides_tls_with_or_without_a_ca() {
        for ca in [None, Some(crate::tls::tests::ca_certificate())] {
            let plain = RedisUrl::new("redis://127.0.0.1:6379/0", ca.clone());
            assert!(!is_tls(&plain.client().expect("a client")), "{ca:?}");
            let tls = RedisUrl::new("rediss://localhost:6380/0", ca.clone());
            assert!(is_tls(&tls.client().expect("a client")), "{ca:?}");
            assert!(RedisUrl::new("nowhere", ca).client().is_err());
        }
    }
}
