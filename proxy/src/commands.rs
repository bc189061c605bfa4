//! The one-shot subcommands: `check` and `ca init|export|issue`. Each prints what it did
//! on stdout and returns an error (non-zero exit) on any problem.

use std::io::Write;

use crate::cli::CaCommand;
use crate::config::{self, Config, ConfigError, Settings};
use crate::tls;
use crate::tls::ca::{CaError, LocalCa};
use crate::tls::certificates::{self, CertError, rfc3339};
use crate::tls::state_dir::{self, CERT_MODE, KEY_MODE};

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
            let ca = LocalCa::init(&args.state.state_dir, &permitted, args.force)?;
            println!("created CA in {}", args.state.state_dir.display());
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
            let ca = LocalCa::load(&args.state_dir)?;
            print!("{}", ca.cert_pem());
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
            let ca = LocalCa::load(&args.state.state_dir)?;
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
    }
    Ok(())
}
