//! Unix signals the processes react to: SIGTERM/SIGINT (drain and exit), SIGHUP (reload) and
//! SIGUSR2 (hand the listening sockets to a successor, then drain and exit).

use tokio::signal::unix::{SignalKind, signal};

/// Resolves at the first SIGTERM or SIGINT.
pub(crate) async fn terminate() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the default action (exit) still applies.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

/// A stream of SIGUSR2s (hand over to a successor); `None` without a handler.
pub(crate) fn user2() -> Option<tokio::signal::unix::Signal> {
    signal(SignalKind::user_defined2()).ok()
}

/// A stream of SIGHUPs; `None` if the handler cannot be installed.
pub(crate) fn hangups() -> Option<tokio::signal::unix::Signal> {
    signal(SignalKind::hangup()).ok()
}
