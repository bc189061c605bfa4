//! Keeps the served certificate fresh without a restart: renews the local CA's leaf when a
//! third of its lifetime remains, and re-reads configuration and certificates on SIGHUP.
//! Any failure keeps the current material serving, is logged and counted in
//! `proxy_reloads_total{what, result="failure"}`; reload and renewal never run at once.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;

use crate::certificates::{self, CertError, ServingCert, rfc3339};
use crate::cli::ServeArgs;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::tls::{self, CertStore};

/// Longest sleep between checks, so that clock jumps are noticed.
const MAX_SLEEP: Duration = Duration::from_secs(3600);

/// Owner of the certificate store's updates.
pub struct TlsManager {
    args: ServeArgs,
    /// The configuration in force; replaced by a successful reload. Holding the lock
    /// serialises reloads and renewals.
    config: Mutex<Config>,
    certs: Arc<CertStore>,
    metrics: Metrics,
    reloaded: Notify,
}

impl TlsManager {
    pub fn new(
        args: ServeArgs,
        config: Config,
        certs: Arc<CertStore>,
        metrics: Metrics,
    ) -> Arc<Self> {
        record_served(&metrics, &certs.current());
        Arc::new(TlsManager {
            args,
            config: Mutex::new(config),
            certs,
            metrics,
            reloaded: Notify::new(),
        })
    }

    /// SIGHUP: re-read the config file, then the certificates it names.
    pub async fn reload(&self) {
        let mut config = self.config.lock().await;
        let args = self.args.clone();
        match tokio::task::spawn_blocking(move || Config::load(&args)).await {
            Ok(Ok(new)) => {
                let restart_only = config.restart_only_changes(&new);
                if !restart_only.is_empty() {
                    tracing::warn!(settings = ?restart_only, "these settings change only at restart; keeping the running values");
                }
                *config = new;
                self.metrics.count_reload("config", true);
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "config reload failed; keeping the running configuration");
                self.metrics.count_reload("config", false);
            }
            Err(e) => {
                tracing::error!(error = %e, "config reload panicked; keeping the running configuration");
                self.metrics.count_reload("config", false);
            }
        }
        let snapshot = config.clone();
        let outcome =
            certificates::off_thread(move || certificates::obtain(&snapshot, &tls::provider()))
                .await;
        self.apply("tls", outcome);
        self.reloaded.notify_one();
    }

    /// Renews the leaf whenever it falls due, until `shutdown`.
    pub async fn renew_forever(&self, shutdown: CancellationToken) {
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
            let renewed =
                certificates::off_thread(move || certificates::renew(&snapshot, &tls::provider()))
                    .await;
            if !self.apply("renewal", renewed) {
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

    fn apply(&self, what: &str, outcome: Result<ServingCert, CertError>) -> bool {
        match outcome {
            Ok(serving) => {
                tracing::info!(what, serial = %serving.leaf.serial, not_after = %rfc3339(serving.leaf.not_after), "serving new certificate");
                record_served(&self.metrics, &serving);
                self.certs.replace(serving);
                self.metrics.count_reload(what, true);
                true
            }
            Err(e) => {
                tracing::error!(what, error = %e, "certificate update failed; still serving the previous certificate");
                self.metrics.count_reload(what, false);
                false
            }
        }
    }
}

/// Sets `proxy_certificate_expiry_timestamp_seconds` for the leaf and, when known, its CA, and
/// counts a new leaf the state directory could not store.
pub fn record_served(metrics: &Metrics, serving: &ServingCert) {
    if !serving.persisted {
        metrics.state_write_failures.inc();
    }
    metrics
        .certificate_expiry
        .with_label_values(&["leaf"])
        .set(serving.leaf.not_after_unix());
    if let Some(ca) = &serving.ca {
        metrics
            .certificate_expiry
            .with_label_values(&["ca"])
            .set(ca.not_after_unix());
    }
}
