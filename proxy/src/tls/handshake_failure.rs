//! Why a TLS handshake failed, as a bounded label ([`TlsFailure`]) for
//! `proxy_tls_handshake_failures_total`.

use crate::telemetry::labels::TlsFailure;

/// A bounded label for why a handshake failed.
pub(crate) fn failure_reason(error: &std::io::Error) -> TlsFailure {
    use rustls::{AlertDescription, Error, PeerIncompatible, PeerMisbehaved};
    let Some(tls) = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<Error>())
    else {
        return match error.kind() {
            std::io::ErrorKind::UnexpectedEof => TlsFailure::Eof,
            std::io::ErrorKind::TimedOut => TlsFailure::Timeout,
            _ => TlsFailure::Io,
        };
    };
    match tls {
        Error::PeerIncompatible(PeerIncompatible::SupportedVersionsExtensionRequired)
        | Error::PeerIncompatible(PeerIncompatible::Tls12NotOffered)
        | Error::PeerIncompatible(PeerIncompatible::Tls12NotOfferedOrEnabled) => {
            TlsFailure::ProtocolVersion
        }
        Error::PeerIncompatible(_) => TlsFailure::Incompatible,
        Error::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown,
        ) => TlsFailure::CertificateRejected,
        Error::AlertReceived(_) => TlsFailure::AlertReceived,
        Error::InvalidMessage(_)
        | Error::PeerMisbehaved(PeerMisbehaved::IllegalMiddleboxChangeCipherSpec) => {
            TlsFailure::InvalidMessage
        }
        Error::PeerMisbehaved(_) => TlsFailure::PeerMisbehaved,
        Error::NoApplicationProtocol => TlsFailure::NoApplicationProtocol,
        _ => TlsFailure::Other,
    }
}
