//! HTTP: the accept loop and the life of each client connection (connection cap, TLS
//! handshake deadline, HTTP/1.1 or HTTP/2 by ALPN, drain), the first-request and idle
//! deadlines, HTTP/2 streams run by their connection's task, request dispatch with its metrics and access log, the plain-HTTP redirect,
//! the static answers, and the upstream client.

pub(crate) mod deadlines;
mod exchange;
pub(crate) mod redirect;
mod request;
pub(crate) mod responses;
pub(crate) mod server;
mod streams;
pub(crate) mod upstream;
