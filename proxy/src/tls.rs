//! The rustls server configuration (TLS 1.2 and 1.3, AEAD suites, ALPN h2 and http/1.1)
//! and the certificate resolver whose material can be swapped atomically while serving.
//!
//! A swap takes effect for the next handshake; handshakes already under way finish with
//! the material they started with, so a reload or renewal never fails a connection.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, version};

use crate::certificates::ServingCert;
use crate::names::ServedName;

/// The crypto provider every TLS object here uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Holds the material being served; readers never block, writers replace it whole.
#[derive(Debug)]
pub struct CertStore {
    current: ArcSwap<ServingCert>,
}

impl CertStore {
    pub fn new(initial: ServingCert) -> Arc<Self> {
        Arc::new(CertStore {
            current: ArcSwap::from_pointee(initial),
        })
    }

    /// The material served now.
    pub fn current(&self) -> Arc<ServingCert> {
        self.current.load_full()
    }

    /// Serves `next` from the next handshake on.
    pub fn replace(&self, next: ServingCert) {
        self.current.store(Arc::new(next));
    }

    /// Whether the served certificate covers `host` (redirects go only to such hosts).
    pub fn serves(&self, host: &ServedName) -> bool {
        self.current.load().leaf.covers(host)
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().certified_key.clone())
    }
}

/// Builds the server configuration around `store`.
pub fn server_config(store: Arc<CertStore>) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&version::TLS13, &version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Every value [`failure_reason`] returns, so the metric exports them all from the start.
pub const FAILURE_REASONS: [&str; 11] = [
    "timeout",
    "eof",
    "io",
    "protocol_version",
    "incompatible",
    "certificate_rejected",
    "alert_received",
    "invalid_message",
    "peer_misbehaved",
    "no_application_protocol",
    "other",
];

/// A bounded label for why a handshake failed.
pub fn failure_reason(error: &std::io::Error) -> &'static str {
    use rustls::{AlertDescription, Error, PeerIncompatible, PeerMisbehaved};
    let Some(tls) = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<Error>())
    else {
        return match error.kind() {
            std::io::ErrorKind::UnexpectedEof => "eof",
            std::io::ErrorKind::TimedOut => "timeout",
            _ => "io",
        };
    };
    match tls {
        Error::PeerIncompatible(PeerIncompatible::SupportedVersionsExtensionRequired)
        | Error::PeerIncompatible(PeerIncompatible::Tls12NotOffered)
        | Error::PeerIncompatible(PeerIncompatible::Tls12NotOfferedOrEnabled) => "protocol_version",
        Error::PeerIncompatible(_) => "incompatible",
        Error::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown,
        ) => "certificate_rejected",
        Error::AlertReceived(_) => "alert_received",
        Error::InvalidMessage(_)
        | Error::PeerMisbehaved(PeerMisbehaved::IllegalMiddleboxChangeCipherSpec) => {
            "invalid_message"
        }
        Error::PeerMisbehaved(_) => "peer_misbehaved",
        Error::NoApplicationProtocol => "no_application_protocol",
        _ => "other",
    }
}
