//! `proxy serve`: load configuration and certificates, bind the listeners, serve until
//! SIGTERM/SIGINT, then drain. Start-up fails with one clear error; after start-up,
//! nothing a reload or a client does can stop the proxy serving.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::{Config, Reload};
use crate::ebpf;
use crate::http::server::Server;
use crate::http::upstream::{Upstream, UpstreamError};
use crate::lifecycle::listeners::{self, ListenError};
use crate::lifecycle::{handover, notify, signals};
use crate::telemetry::admin;
use crate::telemetry::labels::{LabelValue as _, Listener};
use crate::telemetry::metrics::Metrics;
use crate::tls;
use crate::tls::certificates::{self, CertError};
use crate::tls::renewal::TlsManager;
use crate::tls::resolver::CertStore;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// No certificate could be obtained.
    #[error(transparent)]
    Certificate(#[from] CertError),
    /// A listener could not be bound.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// rustls refused the TLS configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// `--ebpf required` and the kernel observer could not start.
    #[error("kernel observer (--ebpf required): {0}")]
    Ebpf(#[from] ebpf::EbpfError),
    /// A backend of the upstream pool could not be resolved.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The metrics registry refused a metric.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Resolves once a successor, started on SIGUSR2, serves on our listening sockets. A failed
/// handover is logged and the proxy keeps serving; waits forever without the signal handler.
async fn hand_over_on_sigusr2(listeners: &[Arc<tokio::net::TcpListener>; 3]) {
    let Some(mut usr2) = signals::user2() else {
        return std::future::pending().await;
    };
    while usr2.recv().await.is_some() {
        tracing::info!("SIGUSR2 received: starting a successor on the same listening sockets");
        let listeners = listeners.clone();
        let started = tokio::task::spawn_blocking(move || {
            let refs: Vec<&tokio::net::TcpListener> = listeners.iter().map(AsRef::as_ref).collect();
            handover::start_successor(&refs)
        })
        .await;
        match started {
            Ok(Ok(pid)) => {
                tracing::info!(successor = pid, "successor serving; draining and exiting");
                return;
            }
            Ok(Err(e)) => tracing::error!(error = %e, "handover failed; still serving"),
            Err(e) => tracing::error!(error = %e, "handover failed; still serving"),
        }
    }
    std::future::pending().await
}

/// Descriptors the proxy needs beyond its connections: listeners, the eBPF maps and
/// programs, health checks, logs, with room to spare.
const DESCRIPTOR_HEADROOM: u64 = 256;

/// The open files the connection cap needs: one per client connection, and in upstream mode
/// one more for the backend connection each may hold.
fn descriptors_needed(config: &Config) -> u64 {
    let per_connection = if config.upstream.is_some() { 2 } else { 1 };
    (config.limits.max_connections as u64)
        .saturating_mul(per_connection)
        .saturating_add(DESCRIPTOR_HEADROOM)
}

/// Raises the soft open-file limit towards what the connection cap needs (as far as the hard
/// limit allows), and warns when it stays below: past it, accepts and backend connects fail
/// with EMFILE instead of clients waiting in the kernel's queue.
fn warn_if_too_few_descriptors(config: &Config) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let needed = descriptors_needed(config);
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            tracing::debug!(error = %e, "could not read RLIMIT_NOFILE");
            return;
        }
    };
    let mut limit = soft;
    if soft < needed {
        let raised = needed.min(hard);
        if raised > soft && setrlimit(Resource::RLIMIT_NOFILE, raised, hard).is_ok() {
            tracing::info!(
                from = soft,
                to = raised,
                "raised the open-file limit for the connection cap"
            );
            limit = raised;
        }
    }
    if limit < needed {
        tracing::warn!(
            limit,
            needed,
            max_connections = config.limits.max_connections,
            "the open-file limit (RLIMIT_NOFILE) is below what the connection cap needs; raise it (systemd: LimitNOFILE=, containers: --ulimit nofile=) or lower --max-connections"
        );
    }
}

/// Serves until a termination signal, then drains in-flight requests.
pub(crate) async fn run(config: Config, reload: Reload) -> Result<(), ServeError> {
    let metrics = Metrics::new()?;
    metrics.set_connection_cap(config.limits.max_connections);
    // Before the listeners exist, so that the kernel observer sees them from the start.
    let kernel = ebpf::start(config.ebpf, metrics.registry())?;

    let initial = {
        let config = config.clone();
        certificates::off_thread(move || certificates::obtain(&config, &tls::provider())).await?
    };
    tracing::info!(serial = %initial.leaf.serial, names = ?initial.leaf.names.iter().map(ToString::to_string).collect::<Vec<_>>(), "certificate loaded");
    let certs = CertStore::new(initial);
    let manager = TlsManager::new(reload, config.clone(), certs.clone(), metrics.clone());

    let mut inherited = listeners::Inherited::from_env();
    let backlog = config.limits.listen_backlog;
    let http = listeners::listen(config.http_listen, backlog, &mut inherited)?;
    let https = listeners::listen(config.https_listen, backlog, &mut inherited)?;
    let admin_listener = listeners::listen(config.admin_listen, 128, &mut inherited)?;
    if !inherited.unclaimed().is_empty() {
        tracing::warn!(sockets = ?inherited.unclaimed(), "inherited sockets match no configured listener; closing them");
    }

    if let Some(kernel) = &kernel {
        for (listener, kind) in [(&http, Listener::Http), (&https, Listener::Https)] {
            if let Err(e) = kernel.register_listener(listener, kind.as_str()) {
                tracing::warn!(error = %e, "this listener's connections will not be measured in the kernel");
            }
        }
    }

    let upstream = match &config.upstream {
        Some(pool) => Some(
            Upstream::start(
                pool,
                config.timeouts.client_body,
                metrics.clone(),
                kernel.clone(),
            )
            .await?,
        ),
        None => None,
    };
    warn_if_too_few_descriptors(&config);
    let server = Server::new(
        &config,
        metrics.clone(),
        certs.clone(),
        kernel,
        upstream.clone(),
    )?;
    let ready = Arc::new(AtomicBool::new(false));
    // Shared with a successor on SIGUSR2; dropped here at shutdown so the ports close.
    let listeners = [Arc::new(http), Arc::new(https), Arc::new(admin_listener)];
    let [http, https, admin_listener] = listeners.clone();
    let accept = tokio::spawn(
        server
            .clone()
            .accept_loop(vec![(http, Listener::Http), (https, Listener::Https)]),
    );
    let ca_pem: admin::CaPem = {
        let certs = certs.clone();
        Arc::new(move || certs.current().ca_pem.clone())
    };
    let admin = tokio::spawn(admin::serve(
        admin_listener,
        metrics.clone(),
        ready.clone(),
        ca_pem,
    ));
    tokio::spawn({
        let manager = manager.clone();
        let shutdown = server.shutdown.clone();
        async move { manager.renew_forever(shutdown).await }
    });
    if let Some(mut hangups) = signals::hangups() {
        let manager = manager.clone();
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                tracing::info!("SIGHUP received: reloading configuration and certificates");
                notify::reloading();
                let reloaded = manager.reload().await;
                if let (Some(upstream), Some(pool)) = (
                    &upstream,
                    reloaded.as_ref().and_then(|c| c.upstream.as_ref()),
                ) {
                    upstream.reconfigure(pool).await;
                }
                notify::ready("serving (reloaded)");
            }
        });
    }

    ready.store(true, Ordering::Release);
    tracing::info!(
        http = %config.http_listen,
        https = %config.https_listen,
        admin = %config.admin_listen,
        upstream = ?config.upstream.as_ref().map(|u| u.backends.iter().map(|b| b.label.as_str()).collect::<Vec<_>>()),
        "proxy ready"
    );

    notify::ready("serving");

    let handed_over = tokio::select! {
        () = signals::terminate() => false,
        () = hand_over_on_sigusr2(&listeners) => true,
    };
    drop(listeners);
    if handed_over {
        // The successor answers health checks and accepts from here on.
        admin.abort();
    }
    notify::stopping();
    ready.store(false, Ordering::Release);
    server.shutdown.cancel();
    let _ = accept.await;
    server.connections.close();
    tracing::info!(in_flight = server.connections.len(), deadline = ?config.timeouts.drain, "draining connections");
    match tokio::time::timeout(config.timeouts.drain, server.connections.wait()).await {
        Ok(()) => tracing::info!("drained; exiting"),
        Err(_) => {
            server.abandon_connections();
            tracing::warn!(
                abandoned = server.connections.len(),
                "drain deadline passed; exiting"
            );
        }
    }
    Ok(())
}
