//! The local certificate authority: an ECDSA P-256 root, name-constrained to the names it
//! may sign for (users install it as a trusted root, so it must not be able to vouch for
//! anything else), and the short-lived leaves it issues.
//!
//! Files in the state directory: `ca.pem`, `ca.key` (0600), `leaf.pem`, `leaf.key` (0600).
//! The CA key is read and written only here and never leaves the state directory.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    NameConstraints, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;

use crate::names::ServedName;
use crate::tls::cert_info::{CertInfo, CertParseError};
use crate::tls::state_dir::{self, CERT_MODE, KEY_MODE};

/// How long a CA created here is valid.
const CA_LIFETIME: Duration = Duration::from_secs(5 * 365 * 24 * 3600);

/// Why the CA could not be created, loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file in the state directory could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// No CA exists in the state directory.
    #[error("no CA in {0} (create one with `proxy ca init --state-dir {0}`)")]
    Missing(PathBuf),
    /// The directory named for the CA holds no CA certificate (export and trust only read it).
    #[error(
        "no CA certificate in {0} (`proxy serve` or `proxy ca init` creates one; a CA kept elsewhere is named with --ca-dir or PROXY_CA_DIR)"
    )]
    NoCertificate(PathBuf),
    /// `ca init` found a CA and was not told to replace it.
    #[error(
        "a CA already exists in {0}; pass --force to replace it (leaves it issued stop being trusted)"
    )]
    Exists(PathBuf),
    /// The CA certificate or key is malformed or they do not belong together.
    #[error("invalid CA in {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    /// rcgen refused to build a certificate.
    #[error("cannot issue certificate: {0}")]
    Issue(#[from] rcgen::Error),
    /// A requested leaf name is outside the CA's name constraints.
    #[error(
        "name {name} is outside this CA's name constraints; create a CA that permits it (`proxy ca init --force --permit {name}`)"
    )]
    NotPermitted { name: ServedName },
    /// The CA has expired or will before the leaf would.
    #[error(
        "the CA expires before the leaf would ({0}); create a new CA with `proxy ca init --force`"
    )]
    Expiring(String),
    /// The CA has expired: it can sign nothing any client accepts.
    #[error(
        "the CA expired on {0}; create a new CA with `proxy ca init --force` (clients must trust the new one)"
    )]
    Expired(String),
    /// A certificate did not parse.
    #[error(transparent)]
    Parse(#[from] CertParseError),
    /// The CA could not be written to its directory.
    #[error(transparent)]
    Write(#[from] state_dir::WriteError),
    /// There was no CA, and a new one could not be created (a read-only or full directory).
    #[error("cannot create the local CA in {dir} (it must be writable on first start): {source}")]
    Create { dir: PathBuf, source: Box<CaError> },
}

/// A leaf freshly issued by the CA, in PEM.
#[derive(Debug, Clone)]
pub(crate) struct IssuedLeaf {
    pub(crate) cert_pem: String,
    pub(crate) key_pem: String,
}

/// A CA certificate alone, without its key: what clients install as trusted.
#[derive(Debug, Clone)]
pub(crate) struct CaCertificate {
    pem: String,
    der: CertificateDer<'static>,
    info: CertInfo,
}

impl CaCertificate {
    /// Reads `ca.pem` of `dir`; the key is neither needed nor read.
    pub(crate) fn read(dir: &Path) -> Result<Self, CaError> {
        let path = LocalCa::cert_path(dir);
        match std::fs::read_to_string(&path) {
            Ok(pem) => Self::from_pem(dir, pem),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(CaError::NoCertificate(dir.to_owned()))
            }
            Err(source) => Err(CaError::Io {
                action: "read",
                path,
                source,
            }),
        }
    }

    /// Reads a PEM CA certificate from `path` (one downloaded from the admin listener).
    pub(crate) fn read_file(path: &Path) -> Result<Self, CaError> {
        let pem = std::fs::read_to_string(path).map_err(io_err("read", path))?;
        Self::from_pem(path, pem)
    }

    /// Parses the first certificate of `pem`, which must be a CA; `origin` names it in errors.
    fn from_pem(origin: &Path, pem: String) -> Result<Self, CaError> {
        let invalid = |reason: String| CaError::Invalid {
            path: origin.to_owned(),
            reason,
        };
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
            .map(|der: CertificateDer<'_>| der.into_owned())
            .map_err(|e| invalid(format!("ca.pem: {e}")))?;
        let info = CertInfo::from_der(&der)?;
        if !info.is_ca {
            return Err(invalid("ca.pem is not a CA certificate".into()));
        }
        Ok(CaCertificate { pem, der, info })
    }

    /// The certificate in PEM, as read.
    pub(crate) fn pem(&self) -> &str {
        &self.pem
    }

    /// The certificate in DER.
    pub(crate) fn der(&self) -> &CertificateDer<'static> {
        &self.der
    }

    /// Facts about the certificate.
    pub(crate) fn info(&self) -> &CertInfo {
        &self.info
    }

    /// SHA-256 fingerprint as colon-separated uppercase hex, the form browsers and
    /// `openssl x509 -fingerprint` show.
    pub(crate) fn fingerprint_sha256(&self) -> String {
        sha256_fingerprint(&self.der)
    }
}

/// The local CA, loaded with its key.
pub(crate) struct LocalCa {
    dir: PathBuf,
    cert: CaCertificate,
    key: KeyPair,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa")
            .field("dir", &self.dir)
            .field("serial", &self.cert.info.serial)
            .finish_non_exhaustive()
    }
}

impl LocalCa {
    /// Path of the CA certificate in `dir`.
    pub(crate) fn cert_path(dir: &Path) -> PathBuf {
        dir.join("ca.pem")
    }

    fn key_path(dir: &Path) -> PathBuf {
        dir.join("ca.key")
    }

    /// Creates a CA in `dir` permitted to sign for `permitted` (a DNS name also covers its
    /// subdomains). Refuses to replace an existing CA unless `force`.
    pub(crate) fn init(dir: &Path, permitted: &[ServedName], force: bool) -> Result<Self, CaError> {
        // Either file counts: a key without its certificate is still someone's CA key.
        if !force && (Self::cert_path(dir).exists() || Self::key_path(dir).exists()) {
            return Err(CaError::Exists(dir.to_owned()));
        }
        state_dir::ensure_private_dir(dir).map_err(io_err("prepare", dir))?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(&format!(
            "proxy local CA {}",
            crate::config::default_host_name()
        ));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.name_constraints = Some(name_constraints(permitted));
        params.serial_number = Some(random_serial());
        params.not_before = (now - Duration::from_secs(3600)).into();
        params.not_after = (now + CA_LIFETIME).into();
        let cert = params.self_signed(&key)?;
        // Both are written out before either is renamed into place, so a full disk cannot
        // leave a key without its certificate (which `load` rightly refuses to replace). Key
        // first: a certificate without its key would be an unusable CA.
        state_dir::write_all_atomic(&[
            (
                &Self::key_path(dir),
                key.serialize_pem().as_bytes(),
                KEY_MODE,
            ),
            (&Self::cert_path(dir), cert.pem().as_bytes(), CERT_MODE),
        ])?;
        Self::load(dir)
    }

    /// Loads the CA from `dir`, checking that the key belongs to the certificate.
    pub(crate) fn load(dir: &Path) -> Result<Self, CaError> {
        let cert_path = Self::cert_path(dir);
        if !cert_path.exists() {
            if Self::key_path(dir).exists() {
                // Never generate over a surviving key: restoring ca.pem must stay possible.
                return Err(CaError::Invalid {
                    path: dir.to_owned(),
                    reason: "ca.key exists but ca.pem is missing; restore ca.pem, or move ca.key away to create a new CA".into(),
                });
            }
            return Err(CaError::Missing(dir.to_owned()));
        }
        let cert = CaCertificate::read(dir)?;
        let key_pem = std::fs::read_to_string(Self::key_path(dir))
            .map_err(io_err("read", &Self::key_path(dir)))?;
        let invalid = |reason: String| CaError::Invalid {
            path: dir.to_owned(),
            reason,
        };
        let key = KeyPair::from_pem(&key_pem).map_err(|e| invalid(format!("ca.key: {e}")))?;
        if cert.info.public_key_raw != key.public_key_raw() {
            return Err(invalid("ca.key does not belong to ca.pem".into()));
        }
        Ok(LocalCa {
            dir: dir.to_owned(),
            cert,
            key,
        })
    }

    /// Loads the CA, creating one permitted for `names` if the directory has none.
    pub(crate) fn load_or_init(dir: &Path, names: &[ServedName]) -> Result<Self, CaError> {
        match Self::load(dir) {
            Err(CaError::Missing(_)) => {
                tracing::info!(dir = %dir.display(), "creating local CA");
                Self::init(dir, names, false).map_err(|e| CaError::Create {
                    dir: dir.to_owned(),
                    source: Box::new(e),
                })
            }
            other => other,
        }
    }

    /// Issues a leaf for `names`, valid from now for `lifetime`.
    pub(crate) fn issue_leaf(
        &self,
        names: &[ServedName],
        lifetime: Duration,
    ) -> Result<IssuedLeaf, CaError> {
        let ca_info = &self.cert.info;
        if let Some(constraints) = &ca_info.constraints
            && let Some(name) = names.iter().find(|name| !constraints.permits(name))
        {
            return Err(CaError::NotPermitted { name: name.clone() });
        }
        let now = SystemTime::now();
        let not_after = now + lifetime;
        let ca_end = humantime::format_rfc3339_seconds(ca_info.not_after).to_string();
        if now >= ca_info.not_after {
            return Err(CaError::Expired(ca_end));
        }
        if not_after > ca_info.not_after {
            return Err(CaError::Expiring(ca_end));
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = names
            .iter()
            .map(|name| match name {
                ServedName::Dns(dns) => Ok(SanType::DnsName(dns.as_str().try_into()?)),
                ServedName::Ip(ip) => Ok(SanType::IpAddress(*ip)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        let common_name = names.first().map(ToString::to_string).unwrap_or_default();
        params.distinguished_name = distinguished_name(&common_name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        // Backdate a little for clients whose clocks lag, but never by much of a short lifetime.
        params.not_before = (now - (lifetime / 10).min(Duration::from_secs(300))).into();
        params.not_after = not_after.into();
        let issuer = Issuer::from_ca_cert_der(&self.cert.der, &self.key)?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(IssuedLeaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// The CA certificate in PEM.
    pub(crate) fn cert_pem(&self) -> &str {
        self.cert.pem()
    }

    /// The CA certificate in DER.
    pub(crate) fn cert_der(&self) -> &CertificateDer<'static> {
        self.cert.der()
    }

    /// Facts about the CA certificate.
    pub(crate) fn info(&self) -> &CertInfo {
        self.cert.info()
    }

    /// SHA-256 fingerprint of the CA certificate (see [`CaCertificate::fingerprint_sha256`]).
    pub(crate) fn fingerprint_sha256(&self) -> String {
        self.cert.fingerprint_sha256()
    }
}

/// SHA-256 fingerprint of DER bytes, `AA:BB:...`.
pub(crate) fn sha256_fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "proxy");
    dn.push(DnType::CommonName, common_name);
    dn
}

fn name_constraints(permitted: &[ServedName]) -> NameConstraints {
    let mut permitted_subtrees = Vec::new();
    let mut any_ip = false;
    for name in permitted {
        match name {
            ServedName::Dns(dns) => permitted_subtrees.push(GeneralSubtree::DnsName(
                dns.trim_start_matches("*.").to_owned(),
            )),
            ServedName::Ip(ip) => {
                any_ip = true;
                let prefix = if ip.is_ipv4() { 32 } else { 128 };
                permitted_subtrees.push(GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(
                    *ip, prefix,
                )));
            }
        }
    }
    // With no IP permitted, IP names would be unconstrained: exclude them all instead.
    let excluded_subtrees = if any_ip {
        Vec::new()
    } else {
        vec![
            GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(IpAddr::from([0u8; 4]), 0)),
            GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(IpAddr::from([0u8; 16]), 0)),
        ]
    };
    NameConstraints {
        permitted_subtrees,
        excluded_subtrees,
    }
}

/// A random positive 127-bit serial (RFC 5280: positive, at most 20 octets).
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // SystemRandom only fails if the OS RNG is unusable; a zero serial stays valid then.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> CaError + use<'a> {
    move |source| CaError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("proxy-ca-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn names(list: &[&str]) -> Vec<ServedName> {
        list.iter()
            .map(|n| ServedName::parse(n).expect("valid name"))
            .collect()
    }

    #[test]
    fn ca_is_created_once_and_reused() {
        let dir = temp_dir("reuse");
        let first = LocalCa::load_or_init(&dir, &names(&["localhost", "127.0.0.1"])).expect("init");
        let second = LocalCa::load_or_init(&dir, &names(&["localhost"])).expect("load");
        assert_eq!(first.fingerprint_sha256(), second.fingerprint_sha256());
        assert!(matches!(
            LocalCa::init(&dir, &[], false),
            Err(CaError::Exists(_))
        ));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("ca.key"))
            .expect("key")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn leaves_stay_inside_the_name_constraints() {
        let dir = temp_dir("constraints");
        let ca = LocalCa::init(&dir, &names(&["example.internal", "::1"]), false).expect("init");
        let leaf = ca
            .issue_leaf(
                &names(&["www.example.internal", "::1"]),
                Duration::from_secs(60),
            )
            .expect("issue");
        let der: CertificateDer<'_> =
            rustls_pki_types::pem::PemObject::from_pem_slice(leaf.cert_pem.as_bytes())
                .expect("pem");
        let info = CertInfo::from_der(&der).expect("parse");
        assert!(!info.is_ca);
        assert_eq!(info.names.len(), 2);
        let lifetime = info
            .not_after
            .duration_since(SystemTime::now())
            .expect("future");
        assert!(lifetime <= Duration::from_secs(60));
        for outside in ["evil.example", "127.0.0.1", "internal"] {
            let err = ca
                .issue_leaf(&names(&[outside]), Duration::from_secs(60))
                .expect_err(outside);
            assert!(
                matches!(err, CaError::NotPermitted { .. }),
                "{outside}: {err}"
            );
        }
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn a_key_without_its_certificate_is_never_overwritten() {
        let dir = temp_dir("orphan-key");
        LocalCa::init(&dir, &names(&["localhost"]), false).expect("init");
        let key_before = std::fs::read(dir.join("ca.key")).expect("key");
        std::fs::remove_file(dir.join("ca.pem")).expect("remove ca.pem");
        let err =
            LocalCa::load_or_init(&dir, &names(&["localhost"])).expect_err("must not re-create");
        assert!(err.to_string().contains("ca.pem is missing"), "{err}");
        assert!(matches!(
            LocalCa::init(&dir, &[], false),
            Err(CaError::Exists(_))
        ));
        assert_eq!(
            std::fs::read(dir.join("ca.key")).expect("key"),
            key_before,
            "the CA key was overwritten"
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn a_mismatched_key_is_refused() {
        let dir = temp_dir("mismatch");
        LocalCa::init(&dir, &names(&["localhost"]), false).expect("init");
        let other = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        std::fs::write(dir.join("ca.key"), other.serialize_pem()).expect("write");
        let err = LocalCa::load(&dir).expect_err("mismatch");
        assert!(err.to_string().contains("does not belong"), "{err}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
