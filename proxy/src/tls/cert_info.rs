//! What the proxy needs to know about a certificate, read once from its DER: serial,
//! validity, the names it covers, and (for a CA) the names it may sign for.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::names::ServedName;

/// Facts read from one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CertInfo {
    /// Serial number as lowercase hex, colon-free.
    pub(crate) serial: String,
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
    /// DNS and IP subject alternative names.
    pub(crate) names: Vec<ServedName>,
    pub(crate) is_ca: bool,
    /// Name constraints, if the certificate carries them.
    pub(crate) constraints: Option<NameConstraints>,
    /// The DER of the subject public key info, to match a private key against.
    pub(crate) public_key_raw: Vec<u8>,
}

/// The permitted and excluded subtrees of a CA's name constraints (DNS and IP only).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct NameConstraints {
    pub(crate) permitted: Vec<Subtree>,
    pub(crate) excluded: Vec<Subtree>,
}

/// One name-constraint subtree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Subtree {
    /// A DNS name and every name below it.
    Dns(String),
    /// An address range: network address and mask, same length.
    Ip { addr: Vec<u8>, mask: Vec<u8> },
}

/// The certificate could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("malformed certificate: {0}")]
pub struct CertParseError(String);

impl CertInfo {
    /// Parses a DER certificate.
    pub(crate) fn from_der(der: &[u8]) -> Result<Self, CertParseError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| CertParseError(e.to_string()))?;
        let mut names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(dns) => {
                        if let Ok(parsed) = ServedName::parse(dns) {
                            names.push(parsed);
                        }
                    }
                    GeneralName::IPAddress(bytes) => {
                        if let Some(ip) = ip_from_bytes(bytes) {
                            names.push(ServedName::Ip(ip));
                        }
                    }
                    _ => {}
                }
            }
        }
        let constraints = match cert.name_constraints() {
            Ok(Some(ext)) => Some(NameConstraints {
                permitted: subtrees(ext.value.permitted_subtrees.as_deref()),
                excluded: subtrees(ext.value.excluded_subtrees.as_deref()),
            }),
            _ => None,
        };
        Ok(CertInfo {
            serial: hex(cert.raw_serial()),
            not_before: to_system_time(cert.validity().not_before.timestamp()),
            not_after: to_system_time(cert.validity().not_after.timestamp()),
            names,
            is_ca: cert.is_ca(),
            constraints,
            public_key_raw: cert.public_key().subject_public_key.data.to_vec(),
        })
    }

    /// Seconds since the Unix epoch of `not_after`, for the expiry metric.
    pub(crate) fn not_after_unix(&self) -> f64 {
        self.not_after
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    }

    /// Whether the certificate's names cover `host`.
    pub(crate) fn covers(&self, host: &ServedName) -> bool {
        self.names.iter().any(|name| name.covers(host))
    }
}

impl NameConstraints {
    /// Whether a leaf naming `name` would pass these constraints (RFC 5280 4.2.1.10).
    pub(crate) fn permits(&self, name: &ServedName) -> bool {
        let name = match name {
            ServedName::Dns(dns) => ServedName::Dns(dns.trim_start_matches("*.").to_owned()),
            ip => ip.clone(),
        };
        let same_kind = |tree: &&Subtree| {
            matches!(
                (tree, &name),
                (Subtree::Dns(_), ServedName::Dns(_)) | (Subtree::Ip { .. }, ServedName::Ip(_))
            )
        };
        if self
            .excluded
            .iter()
            .filter(same_kind)
            .any(|tree| tree.contains(&name))
        {
            return false;
        }
        let mut permitted = self.permitted.iter().filter(same_kind).peekable();
        // No permitted subtree of this kind means this kind is unconstrained.
        permitted.peek().is_none() || permitted.any(|tree| tree.contains(&name))
    }
}

impl Subtree {
    fn contains(&self, name: &ServedName) -> bool {
        match (self, name) {
            (Subtree::Dns(base), ServedName::Dns(dns)) => {
                base.is_empty() || dns == base || dns.ends_with(&format!(".{base}"))
            }
            (Subtree::Ip { addr, mask }, ServedName::Ip(ip)) => {
                let octets = match ip {
                    IpAddr::V4(v4) => v4.octets().to_vec(),
                    IpAddr::V6(v6) => v6.octets().to_vec(),
                };
                octets.len() == addr.len()
                    && octets
                        .iter()
                        .zip(addr)
                        .zip(mask)
                        .all(|((o, a), m)| o & m == a & m)
            }
            _ => false,
        }
    }
}

fn subtrees(trees: Option<&[x509_parser::extensions::GeneralSubtree<'_>]>) -> Vec<Subtree> {
    trees
        .unwrap_or_default()
        .iter()
        .filter_map(|tree| match &tree.base {
            GeneralName::DNSName(dns) => Some(Subtree::Dns(
                dns.trim_start_matches('.').to_ascii_lowercase(),
            )),
            GeneralName::IPAddress(bytes) if bytes.len() == 8 || bytes.len() == 32 => {
                let (addr, mask) = bytes.split_at(bytes.len() / 2);
                Some(Subtree::Ip {
                    addr: addr.to_vec(),
                    mask: mask.to_vec(),
                })
            }
            _ => None,
        })
        .collect()
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

fn to_system_time(unix: i64) -> SystemTime {
    match u64::try_from(unix) {
        Ok(secs) => UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => UNIX_EPOCH,
    }
}

/// Lowercase hex of bytes.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
