//! The one-shot subcommands: `check` and `ca init|export|issue|trust|untrust`. Each prints what it did
//! on stdout and returns an error (non-zero exit) on any problem.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::cli::{CaCommand, CaTrustArgs};
use crate::config::{self, Config, ConfigError, Settings};
use crate::tls;
use crate::tls::ca::{CaCertificate, CaError, LocalCa};
use crate::tls::certificates::{self, CertError, rfc3339};
use crate::tls::state_dir::{self, CERT_MODE, KEY_MODE};
use crate::trust::{self, Stores, TrustError};

/// Why a one-shot command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Certificate(#[from] CertError),
    #[error(transparent)]
    Ca(#[from] CaError),
    /// Writing an output file failed.
    #[error(transparent)]
    Write(#[from] state_dir::WriteError),
    /// Trusting or untrusting the CA failed.
    #[error(transparent)]
    Trust(#[from] TrustError),
}

/// `proxy check`: validate configuration and certificates without serving.
pub(crate) fn check(settings: &Settings) -> Result<(), CommandError> {
    let config = Config::from_settings(settings, &config::default_host_name())?;
    let certificate = certificates::check(&config, &tls::provider())?;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "configuration ok");
    let _ = writeln!(
        out,
        "  http {}  https {}  admin {}",
        config.http_listen, config.https_listen, config.admin_listen
    );
    let _ = writeln!(out, "  {certificate}");
    if let Some(upstream) = &config.upstream {
        for backend in &upstream.backends {
            let _ = writeln!(out, "  upstream http://{}", backend.label);
        }
    }
    Ok(())
}

/// `proxy ca ...`.
pub(crate) fn ca(command: CaCommand) -> Result<(), CommandError> {
    match command {
        CaCommand::Init(args) => {
            let names = if args.names.is_empty() {
                config::default_names(&config::default_host_name())
            } else {
                args.names
            };
            let permitted = config::parse_names(if args.permit.is_empty() {
                &names
            } else {
                &args.permit
            })?;
            let ca = LocalCa::init(args.state.ca_dir(), &permitted, args.force)?;
            println!("created CA in {}", args.state.ca_dir().display());
            println!(
                "permitted names: {}",
                permitted
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            println!("valid until {}", rfc3339(ca.info().not_after));
            println!("SHA-256 Fingerprint: {}", ca.fingerprint_sha256());
        }
        CaCommand::Export(args) => {
            // Only the certificate: the key may be unreadable here, and is not needed.
            let ca = CaCertificate::read(args.ca_dir())?;
            print!("{}", ca.pem());
            println!("SHA-256 Fingerprint: {}", ca.fingerprint_sha256());
        }
        CaCommand::Issue(args) => {
            if args.lifetime > config::MAX_LEAF_LIFETIME {
                return Err(ConfigError::Invalid {
                    key: "lifetime",
                    reason: "leaves live at most 90 days".into(),
                }
                .into());
            }
            let names = config::parse_names(&args.names)?;
            let ca = LocalCa::load(args.state.ca_dir())?;
            let leaf = ca.issue_leaf(&names, args.lifetime)?;
            state_dir::write_all_atomic(&[
                (&args.key_out, leaf.key_pem.as_bytes(), KEY_MODE),
                (&args.cert_out, leaf.cert_pem.as_bytes(), CERT_MODE),
            ])?;
            println!(
                "issued {} and {}",
                args.cert_out.display(),
                args.key_out.display()
            );
        }
        CaCommand::Trust(args) => {
            let (ca, source) = trusted_certificate(&args)?;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "CA certificate {}", source.display());
            let _ = writeln!(out, "SHA-256 Fingerprint: {}", ca.fingerprint_sha256());
            trust::trust(&ca, stores(&args), &command_line("trust", &args), &mut out)?;
            let _ = writeln!(out, "undo: {}", command_line("untrust", &args));
        }
        CaCommand::Untrust(args) => {
            let (ca, source) = trusted_certificate(&args)?;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "CA certificate {}", source.display());
            let _ = writeln!(out, "SHA-256 Fingerprint: {}", ca.fingerprint_sha256());
            let removed = trust::untrust(
                &ca,
                stores(&args),
                &command_line("untrust", &args),
                &mut out,
            )?;
            if !removed {
                let _ = writeln!(out, "nothing to remove: this CA was not trusted here");
            }
        }
    }
    Ok(())
}

/// The certificate `trust`/`untrust` act on, and the file it came from.
fn trusted_certificate(args: &CaTrustArgs) -> Result<(CaCertificate, PathBuf), CaError> {
    match &args.cert {
        Some(file) => Ok((CaCertificate::read_file(file)?, file.clone())),
        None => Ok((
            CaCertificate::read(args.state.ca_dir())?,
            LocalCa::cert_path(args.state.ca_dir()),
        )),
    }
}

fn stores(args: &CaTrustArgs) -> Stores {
    Stores {
        system: !args.no_system,
        nss: !args.no_nss,
    }
}

/// `proxy ca VERB` with the flags that name the same certificate and stores, to show the
/// command that undoes or repeats this one.
fn command_line(verb: &str, args: &CaTrustArgs) -> String {
    let program = std::env::args().next().unwrap_or_else(|| "proxy".into());
    let mut words = vec![program, "ca".into(), verb.into()];
    let mut flag = |name: &str, path: &Path| {
        words.push(name.into());
        words.push(path.display().to_string());
    };
    if let Some(cert) = &args.cert {
        flag("--cert", cert);
    } else if let Some(ca_dir) = &args.state.ca_dir {
        flag("--ca-dir", ca_dir);
    } else if args.state.state_dir != Path::new(config::DEFAULT_STATE_DIR) {
        flag("--state-dir", &args.state.state_dir);
    }
    for (set, name) in [(args.no_system, "--no-system"), (args.no_nss, "--no-nss")] {
        if set {
            words.push(name.into());
        }
    }
    words
        .iter()
        .map(|w| shell_word(w))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `word` quoted for a POSIX shell when it needs to be.
fn shell_word(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-:=,+@".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}
