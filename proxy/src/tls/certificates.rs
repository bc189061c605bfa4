//! Obtaining the certificate to serve: from the local CA (reusing a good leaf on disk,
//! issuing a new one when it is missing, wrong or due) or from bring-your-own PEM files.
//!
//! Everything here either returns complete, validated material or an error; the caller
//! keeps serving the old material on error, so a broken file never takes the proxy down.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{Config, TlsSource};
use crate::tls::ca::{CaError, LocalCa};
use crate::tls::cert_info::{CertInfo, CertParseError};
use crate::tls::state_dir::{self, CERT_MODE, KEY_MODE};

/// A leaf is renewed when less than this share of its configured lifetime remains.
const RENEW_WHEN_REMAINING: u32 = 3;

/// Why certificate material could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The local CA failed.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// A PEM file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A new leaf could not be written to the state directory.
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The PEM holds no certificate, no key, or something malformed.
    #[error("invalid PEM in {path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    /// rustls refused the key, or the key does not match the certificate.
    #[error("certificate and key in {path} do not work together: {source}")]
    Key {
        path: PathBuf,
        source: rustls::Error,
    },
    /// The certificate has expired or is not yet valid.
    #[error("certificate {path} is not valid now (valid {from} to {until})")]
    NotValidNow {
        path: PathBuf,
        from: String,
        until: String,
    },
    /// A certificate did not parse.
    #[error(transparent)]
    Parse(#[from] CertParseError),
    /// The background task doing the work panicked or was cancelled.
    #[error("certificate task failed: {0}")]
    Task(String),
}

/// Runs certificate work (file reads, key generation) off the async workers.
pub(crate) async fn off_thread(
    work: impl FnOnce() -> Result<ServingCert, CertError> + Send + 'static,
) -> Result<ServingCert, CertError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(CertError::Task(e.to_string())))
}

/// Certificate material ready to serve.
#[derive(Debug, Clone)]
pub(crate) struct ServingCert {
    pub(crate) certified_key: Arc<CertifiedKey>,
    pub(crate) leaf: CertInfo,
    /// The issuing CA, when known (always for the local CA; the last chain element for
    /// bring-your-own chains that include it).
    pub(crate) ca: Option<CertInfo>,
    /// The local CA's certificate in PEM, for the admin listener's `/ca.pem`; `None` for
    /// bring-your-own material, whose last chain element need not be a root anyone should
    /// install.
    pub(crate) ca_pem: Option<Arc<str>>,
    /// When this material should be replaced by a renewal; `None` when the operator owns it.
    pub(crate) renew_at: Option<SystemTime>,
    /// False when a newly issued leaf could not be written to the state directory (read-only
    /// or full) and lives only in memory.
    pub(crate) persisted: bool,
}

/// Obtains the material `config` asks for. In local-CA mode this may create the CA and
/// write a new leaf into the state directory.
pub(crate) fn obtain(config: &Config, provider: &CryptoProvider) -> Result<ServingCert, CertError> {
    match &config.tls {
        TlsSource::Files { cert, key } => load_files(cert, key, provider),
        TlsSource::LocalCa => obtain_from_local_ca(config, provider, false),
    }
}

/// Issues a fresh leaf from the local CA whatever the state of the current one.
pub(crate) fn renew(config: &Config, provider: &CryptoProvider) -> Result<ServingCert, CertError> {
    obtain_from_local_ca(config, provider, true)
}

/// Validates what `obtain` would use without writing anything (for `proxy check`).
pub(crate) fn check(config: &Config, provider: &CryptoProvider) -> Result<String, CertError> {
    match &config.tls {
        TlsSource::Files { cert, key } => {
            let serving = load_files(cert, key, provider)?;
            Ok(format!(
                "certificate {} valid until {}",
                cert.display(),
                rfc3339(serving.leaf.not_after)
            ))
        }
        TlsSource::LocalCa => match LocalCa::load(&config.ca_dir) {
            Ok(ca) => Ok(format!(
                "local CA in {} valid until {} (SHA-256 {})",
                config.ca_dir.display(),
                rfc3339(ca.info().not_after),
                ca.fingerprint_sha256()
            )),
            Err(CaError::Missing(dir)) => Ok(format!(
                "no CA yet in {}: one is created on first start",
                dir.display()
            )),
            Err(e) => Err(e.into()),
        },
    }
}

/// Loads a PEM chain and key supplied by the operator.
pub(crate) fn load_files(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<ServingCert, CertError> {
    let cert_pem = std::fs::read(cert).map_err(|source| CertError::Read {
        path: cert.to_owned(),
        source,
    })?;
    let key_pem = std::fs::read(key).map_err(|source| CertError::Read {
        path: key.to_owned(),
        source,
    })?;
    from_pem(cert, &cert_pem, &key_pem, provider)
}

/// Validates a PEM chain and key as `load_files` does, from bytes; `origin` names them in
/// errors. The chain's last certificate, if it is not the leaf, is taken as the CA.
pub(crate) fn from_pem(
    origin: &Path,
    cert_pem: &[u8],
    key_pem: &[u8],
    provider: &CryptoProvider,
) -> Result<ServingCert, CertError> {
    let serving = build(origin, cert_pem, key_pem, provider, None)?;
    let ca = match serving.certified_key.cert.as_slice() {
        [_, .., last] => Some(CertInfo::from_der(last)?),
        _ => None,
    };
    Ok(ServingCert { ca, ..serving })
}

fn obtain_from_local_ca(
    config: &Config,
    provider: &CryptoProvider,
    force_new: bool,
) -> Result<ServingCert, CertError> {
    let ca = LocalCa::load_or_init(&config.ca_dir, &config.names)?;
    let leaf_path = config.state_dir.join("leaf.pem");
    let key_path = config.state_dir.join("leaf.key");
    if !force_new
        && let Some(existing) = reusable_leaf(config, &ca, &leaf_path, &key_path, provider)
    {
        return Ok(existing);
    }
    let issued = ca.issue_leaf(&config.names, config.leaf_lifetime)?;
    let serving = build(
        &leaf_path,
        issued.cert_pem.as_bytes(),
        issued.key_pem.as_bytes(),
        provider,
        Some(&ca),
    )?;
    let serving = ServingCert {
        renew_at: Some(renew_at(&serving.leaf, config.leaf_lifetime)),
        ..serving
    };
    // The leaf is only a cache: when the state directory is read-only or full, serve the
    // new leaf from memory rather than stop serving. Key and certificate are replaced
    // together or not at all.
    let stored = state_dir::write_all_atomic(&[
        (&key_path, issued.key_pem.as_bytes(), KEY_MODE),
        (&leaf_path, issued.cert_pem.as_bytes(), CERT_MODE),
    ]);
    if let Err(e) = &stored {
        tracing::warn!(error = %e, "cannot store the new leaf in the state directory; serving it from memory");
    }
    tracing::info!(serial = %serving.leaf.serial, not_after = %rfc3339(serving.leaf.not_after), "issued leaf certificate");
    Ok(ServingCert {
        persisted: stored.is_ok(),
        ..serving
    })
}

/// The leaf on disk, if it is readable, signed by this CA, covers exactly the configured
/// names and is not yet due for renewal.
fn reusable_leaf(
    config: &Config,
    ca: &LocalCa,
    leaf_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Option<ServingCert> {
    let cert_pem = std::fs::read(leaf_path).ok()?;
    let key_pem = std::fs::read(key_path).ok()?;
    let serving = match build(leaf_path, &cert_pem, &key_pem, provider, Some(ca)) {
        Ok(serving) => serving,
        Err(e) => {
            tracing::warn!(error = %e, "leaf on disk is unusable; issuing a new one");
            return None;
        }
    };
    let signed_by_ca = webpki_verifies(&serving, ca, provider);
    let names_match = serving.leaf.names == config.names;
    let renew_at = renew_at(&serving.leaf, config.leaf_lifetime);
    (signed_by_ca && names_match && SystemTime::now() < renew_at).then_some(ServingCert {
        renew_at: Some(renew_at),
        ..serving
    })
}

fn webpki_verifies(serving: &ServingCert, ca: &LocalCa, provider: &CryptoProvider) -> bool {
    let mut roots = rustls::RootCertStore::empty();
    if roots.add(ca.cert_der().clone()).is_err() {
        return false;
    }
    let Some(leaf) = serving.certified_key.cert.first() else {
        return false;
    };
    // The same provider as everything else, not the process default (none is installed).
    let Ok(verifier) = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(provider.clone()),
    )
    .build() else {
        return false;
    };
    let Some(name) = serving.leaf.names.first() else {
        return false;
    };
    let Ok(server_name) = rustls_pki_types::ServerName::try_from(name.to_string()) else {
        return false;
    };
    rustls::client::danger::ServerCertVerifier::verify_server_cert(
        verifier.as_ref(),
        leaf,
        &[],
        &server_name,
        &[],
        rustls_pki_types::UnixTime::now(),
    )
    .is_ok()
}

/// When a leaf should be renewed: once a third of its configured lifetime remains.
fn renew_at(leaf: &CertInfo, lifetime: Duration) -> SystemTime {
    leaf.not_after - lifetime / RENEW_WHEN_REMAINING
}

fn build(
    path: &Path,
    cert_pem: &[u8],
    key_pem: &[u8],
    provider: &CryptoProvider,
    ca: Option<&LocalCa>,
) -> Result<ServingCert, CertError> {
    let pem_err = |reason: String| CertError::Pem {
        path: path.to_owned(),
        reason,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err(e.to_string()))?;
    if chain.is_empty() {
        return Err(pem_err("no certificate found".into()));
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| pem_err(format!("private key: {e}")))?;
    let leaf = CertInfo::from_der(&chain[0])?;
    let now = SystemTime::now();
    if now < leaf.not_before || now >= leaf.not_after {
        return Err(CertError::NotValidNow {
            path: path.to_owned(),
            from: rfc3339(leaf.not_before),
            until: rfc3339(leaf.not_after),
        });
    }
    let certified_key =
        CertifiedKey::from_der(chain, key, provider).map_err(|source| CertError::Key {
            path: path.to_owned(),
            source,
        })?;
    Ok(ServingCert {
        certified_key: Arc::new(certified_key),
        leaf,
        ca: ca.map(|ca| ca.info().clone()),
        ca_pem: ca.map(|ca| Arc::from(ca.cert_pem())),
        renew_at: None,
        persisted: true,
    })
}

/// A timestamp for messages.
pub(crate) fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

/// Validates untrusted certificate bytes as a reload would: `cert_pem` and `key_pem` as a
/// bring-your-own chain and key, and `cert_pem` alone as a DER certificate (the fuzz
/// target's entry).
pub fn check_untrusted_certificate(cert_pem: &[u8], key_pem: &[u8]) -> Result<(), CertError> {
    let as_der = CertInfo::from_der(cert_pem).map(drop);
    from_pem(
        Path::new("untrusted.pem"),
        cert_pem,
        key_pem,
        &super::provider(),
    )?;
    Ok(as_der?)
}
