//! Keeps the served certificate fresh without a restart: renews the local CA's leaf when a
//! third of its lifetime remains, and re-reads configuration and certificates on SIGHUP.
//! Any failure keeps the current material serving, is logged and counted in
//! `proxy_reloads_total{what, result="failure"}`; reload and renewal never run at once.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Reload};
use crate::telemetry::labels::{Certificate, LabelValue as _, Reloaded};
use crate::telemetry::metrics::Metrics;
use crate::tls::certificates::{self, CertError, ServingCert, rfc3339};
use crate::tls::resolver::CertStore;

/// Longest sleep between checks, so that clock jumps are noticed.
const MAX_SLEEP: Duration = Duration::from_secs(3600);

/// Owner of the certificate store's updates.
pub(crate) struct TlsManager {
    /// Reads the configuration again for a reload.
    load: Reload,
    /// The configuration in force; replaced by a successful reload. Holding the lock
    /// serialises reloads and renewals.
    config: Mutex<Config>,
    certs: Arc<CertStore>,
    metrics: Metrics,
    reloaded: Notify,
}

impl TlsManager {
    pub(crate) fn new(
        load: Reload,
        config: Config,
        certs: Arc<CertStore>,
        metrics: Metrics,
    ) -> Arc<Self> {
        record_served(&metrics, &certs.current());
        Arc::new(TlsManager {
            load,
            config: Mutex::new(config),
            certs,
            metrics,
            reloaded: Notify::new(),
        })
    }

    /// SIGHUP: re-read the config file, then the certificates it names. Returns the new
    /// configuration when it was read, for the other layers to apply.
    pub(crate) async fn reload(&self) -> Option<Config> {
        let mut config = self.config.lock().await;
        let mut reloaded = None;
        let load = self.load.clone();
        match tokio::task::spawn_blocking(move || load()).await {
            Ok(Ok(new)) => {
                let restart_only = config.restart_only_changes(&new);
                if !restart_only.is_empty() {
                    tracing::warn!(settings = ?restart_only, "these settings change only at restart; keeping the running values");
                }
                *config = new.clone();
                reloaded = Some(new);
                self.metrics.reloaded(Reloaded::Config, true);
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "config reload failed; keeping the running configuration");
                self.metrics.reloaded(Reloaded::Config, false);
            }
            Err(e) => {
                tracing::error!(error = %e, "config reload panicked; keeping the running configuration");
                self.metrics.reloaded(Reloaded::Config, false);
            }
        }
        let snapshot = config.clone();
        let outcome =
            certificates::off_thread(move || certificates::obtain(&snapshot, &super::provider()))
                .await;
        self.apply(Reloaded::Tls, outcome);
        self.reloaded.notify_one();
        reloaded
    }

    /// Renews the leaf whenever it falls due, until `shutdown`.
    pub(crate) async fn renew_forever(&self, shutdown: CancellationToken) {
        loop {
            let due = self.certs.current().renew_at;
            let wait = due.map_or(MAX_SLEEP, |at| {
                at.duration_since(SystemTime::now()).unwrap_or_default()
            });
            tokio::select! {
                () = tokio::time::sleep(wait.min(MAX_SLEEP)) => {}
                () = self.reloaded.notified() => continue,
                () = shutdown.cancelled() => return,
            }
            let Some(due) = self.certs.current().renew_at else {
                continue;
            };
            if SystemTime::now() < due {
                continue;
            }
            let config = self.config.lock().await;
            let snapshot = config.clone();
            let renewed = certificates::off_thread(move || {
                certificates::renew(&snapshot, &super::provider())
            })
            .await;
            if !self.apply(Reloaded::Renewal, renewed) {
                // Keep serving the current leaf and try again soon, well before it expires.
                let retry = (config.leaf_lifetime / 10)
                    .clamp(Duration::from_secs(1), Duration::from_secs(30));
                drop(config);
                tokio::select! {
                    () = tokio::time::sleep(retry) => {}
                    () = shutdown.cancelled() => return,
                }
            }
        }
    }

    fn apply(&self, what: Reloaded, outcome: Result<ServingCert, CertError>) -> bool {
        match outcome {
            Ok(serving) => {
                tracing::info!(what = what.as_str(), serial = %serving.leaf.serial, not_after = %rfc3339(serving.leaf.not_after), "serving new certificate");
                record_served(&self.metrics, &serving);
                self.certs.replace(serving);
                self.metrics.reloaded(what, true);
                true
            }
            Err(e) => {
                tracing::error!(what = what.as_str(), error = %e, "certificate update failed; still serving the previous certificate");
                self.metrics.reloaded(what, false);
                false
            }
        }
    }
}

/// Sets `proxy_certificate_expiry_timestamp_seconds` for the leaf and, when known, its CA, and
/// counts a new leaf the state directory could not store.
pub(crate) fn record_served(metrics: &Metrics, serving: &ServingCert) {
    if !serving.persisted {
        metrics.state_write_failed();
    }
    metrics.certificate_expires(Certificate::Leaf, serving.leaf.not_after_unix());
    if let Some(ca) = &serving.ca {
        metrics.certificate_expires(Certificate::Ca, ca.not_after_unix());
    }
}
