//! The certificate resolver: the material being served, swapped atomically while serving.
//!
//! A swap takes effect for the next handshake; handshakes already under way finish with
//! the material they started with, so a reload or renewal never fails a connection.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::names::ServedName;
use crate::tls::certificates::ServingCert;

/// Holds the material being served; readers never block, writers replace it whole.
#[derive(Debug)]
pub(crate) struct CertStore {
    current: ArcSwap<ServingCert>,
}

impl CertStore {
    pub(crate) fn new(initial: ServingCert) -> Arc<Self> {
        Arc::new(CertStore {
            current: ArcSwap::from_pointee(initial),
        })
    }

    /// The material served now.
    pub(crate) fn current(&self) -> Arc<ServingCert> {
        self.current.load_full()
    }

    /// Serves `next` from the next handshake on.
    pub(crate) fn replace(&self, next: ServingCert) {
        self.current.store(Arc::new(next));
    }

    /// Whether the served certificate covers `host` (redirects go only to such hosts).
    pub(crate) fn serves(&self, host: &ServedName) -> bool {
        self.current.load().leaf.covers(host)
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().certified_key.clone())
    }
}
