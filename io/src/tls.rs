//! The one TLS stack of every taskfleet process: rustls with ring's cryptography.

/// Makes ring the process's rustls crypto provider. Call it first thing in `main`: the clients
/// that take the process's provider (Redis, HTTP) find no other. Calling it again does nothing.
pub fn install_crypto_provider() {
    // An error means a provider is installed already, which is all this asks for.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
