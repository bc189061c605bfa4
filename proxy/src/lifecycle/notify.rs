//! Telling a service manager what the proxy is doing (systemd's `Type=notify` protocol):
//! ready once every listener serves, reloading during SIGHUP, stopping while it drains.
//! Without `NOTIFY_SOCKET` (not under systemd) every call does nothing.

use sd_notify::NotifyState;

/// Every listener is serving.
pub(crate) fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload started; [`ready`] ends it.
pub(crate) fn reloading() {
    let mut states = vec![NotifyState::Reloading];
    // systemd wants the reload's start time with RELOADING=1 (Type=notify-reload).
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    send(&states);
}

/// Draining before exit.
pub(crate) fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("draining in-flight requests"),
    ]);
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "cannot notify the service manager");
    }
}
