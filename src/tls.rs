//! TLS set-up: rustls with the ring crypto provider, for every HTTPS client and server.

/// Installs ring as the process-wide rustls provider. Safe to call more than once.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
