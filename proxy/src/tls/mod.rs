//! TLS: the local CA and the facts of certificates, obtaining and storing the material to
//! serve, the resolver that swaps it while serving, its renewal and reload, and the rustls
//! server configuration (TLS 1.2 and 1.3, AEAD suites, ALPN h2 and http/1.1).

pub(crate) mod ca;
pub(crate) mod cert_info;
pub(crate) mod certificates;
pub(crate) mod handshake_failure;
pub(crate) mod renewal;
pub(crate) mod resolver;
pub(crate) mod state_dir;

use std::sync::Arc;

use rustls::{ServerConfig, version};

use resolver::CertStore;

/// The crypto provider every TLS object here uses.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the server configuration around `store`.
pub(crate) fn server_config(store: Arc<CertStore>) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&version::TLS13, &version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
