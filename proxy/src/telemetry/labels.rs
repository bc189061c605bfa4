//! The values of the application metrics' labels, each label an enum whose variants are all
//! the values it takes (`Listener`, `TlsFailure`, `Outcome`, `UpstreamFailure`, `Reloaded`,
//! `Certificate`): the code that counts passes a variant, so a value nobody declared cannot
//! be counted, and `metrics.rs` can export every declared one from the start.

use strum::IntoEnumIterator;

/// A bounded label value: an enum whose variants are all the values the label takes.
pub(crate) trait LabelValue: Copy + Into<&'static str> + IntoEnumIterator {
    /// The label value as exported.
    fn as_str(self) -> &'static str {
        self.into()
    }
}

/// The listener a connection came in on: label `listener`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::EnumIter, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub(crate) enum Listener {
    /// Plain HTTP: everything is redirected.
    Http,
    /// HTTPS: the site or the upstream.
    Https,
}
impl LabelValue for Listener {}

/// Why a TLS handshake failed: label `reason` of `proxy_tls_handshake_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::EnumIter, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub(crate) enum TlsFailure {
    /// The handshake deadline passed.
    Timeout,
    /// The client closed the connection mid-handshake.
    Eof,
    /// Any other socket error.
    Io,
    /// The client offered no TLS version we accept.
    ProtocolVersion,
    /// No cipher suite, group or signature scheme in common.
    Incompatible,
    /// The client refused our certificate (it does not trust the CA).
    CertificateRejected,
    /// The client sent another alert.
    AlertReceived,
    /// Not TLS, or malformed TLS.
    InvalidMessage,
    /// The client broke the protocol.
    PeerMisbehaved,
    /// No application protocol in common (ALPN).
    NoApplicationProtocol,
    /// Anything rustls reports that the reasons above do not cover.
    Other,
}
impl LabelValue for TlsFailure {}

/// How a response ended: label `outcome` of `proxy_http_requests_total`. Only `complete`
/// reached the client whole; the availability SLI counts the upstream's and the proxy's
/// failures as bad, not the client's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::EnumIter, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub(crate) enum Outcome {
    /// The whole response was handed to the client's connection.
    Complete,
    /// The backend broke its response off after its head was sent (closed, reset, bad framing).
    UpstreamError,
    /// The backend stalled mid-body beyond the body deadline.
    UpstreamTimeout,
    /// The client read nothing for the send deadline, or sent its body too slowly.
    ClientTimeout,
    /// The client went away before the end.
    ClientClosed,
    /// The proxy broke it off: the drain deadline at shutdown.
    Aborted,
}
impl LabelValue for Outcome {}

/// Why an upstream request failed: label `kind` of `proxy_upstream_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::EnumIter, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub(crate) enum UpstreamFailure {
    /// The connection could not be opened.
    Connect,
    /// No response head before the deadline.
    Timeout,
    /// The upstream broke HTTP or the connection before a response head.
    Protocol,
    /// The response body stalled beyond the body deadline.
    BodyTimeout,
    /// The connection broke in the middle of the response body.
    BodyError,
}
impl LabelValue for UpstreamFailure {}

/// What a reload replaced: label `what` of `proxy_reloads_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::EnumIter, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub(crate) enum Reloaded {
    /// The config file (SIGHUP).
    Config,
    /// The certificate and key (SIGHUP).
    Tls,
    /// The local CA's leaf, renewed before expiry.
    Renewal,
}
impl LabelValue for Reloaded {}

/// Which certificate: label `cert` of `proxy_certificate_expiry_timestamp_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::EnumIter, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub(crate) enum Certificate {
    /// The served leaf.
    Leaf,
    /// Its issuing CA.
    Ca,
}
impl LabelValue for Certificate {}
