//! The process's life: `proxy serve` from start-up to drain (`serve.rs`, read it first), the
//! listening sockets (bound, or inherited through `LISTEN_FDS`), the handover of those
//! sockets to a successor on SIGUSR2, the signals, the service manager's notify protocol,
//! and `proxy backend`, the small backing service.

pub(crate) mod backend;
pub(crate) mod handover;
pub(crate) mod listeners;
pub(crate) mod notify;
pub(crate) mod serve;
pub(crate) mod signals;
