//! What the proxy says about itself: the application metrics and their label values, the
//! admin listener that serves them with the health endpoints, the accept-queue counters of
//! the proxy's network namespace, and logging (plain or JSON lines, the access log).

pub(crate) mod admin;
pub(crate) mod labels;
pub(crate) mod listen_queue;
pub(crate) mod logging;
pub(crate) mod metrics;
