//! `proxy`: a TLS web server and reverse proxy that redirects plain HTTP to HTTPS, serves
//! HTTPS with a certificate from its own local CA, and exports its metrics, and what the
//! kernel sees of its connections (eBPF), to Prometheus.
//!
//! The folders are layers, and imports run one way, from the top down (the test
//! `tests/architecture.rs` keeps it so):
//!
//! - `cli`, `commands`: the command line and the one-shot subcommands;
//! - `lifecycle`: `proxy serve` from start-up to drain, listeners, handover, signals;
//!   `trust`: installing the CA certificate into this machine's trust stores;
//! - `http`: connections, deadlines, requests, redirect, upstream;
//! - `tls`: the local CA, certificates, their renewal and the resolver;
//! - `telemetry`: metrics and their labels, the admin listener, logging;
//! - `ebpf`: the kernel observer;
//! - `config`, `names`, `error_chain`: plain values every layer reads.
//!
//! `main.rs` parses the command line and calls [`run`]. Besides that, the library exposes
//! only what the fuzz targets drive: the parsers of untrusted input.

mod cli;
mod commands;
mod config;
mod ebpf;
mod error_chain;
mod http;
mod lifecycle;
mod names;
mod telemetry;
mod tls;
mod trust;

use std::sync::Arc;

pub use cli::{Cli, CliError};
pub use commands::CommandError;
pub use config::{ConfigError, check_file_text};
pub use ebpf::EbpfError;
pub use http::redirect::{Decision, decide};
pub use lifecycle::listeners::ListenError;
pub use lifecycle::serve::ServeError;
pub use names::{NameError, ServedName, parse_host_header};
pub use telemetry::logging::LogFormat;
pub use tls::ca::CaError;
pub use tls::cert_info::CertParseError;
pub use tls::certificates::{CertError, check_untrusted_certificate};
pub use tls::state_dir::WriteError;
pub use trust::TrustError;

/// Any error a subcommand ends with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error(transparent)]
    Listen(#[from] ListenError),
}

/// Installs logging in the format `cli` asks for. Call once, before [`run`].
pub fn init_logging(cli: &Cli) {
    telemetry::logging::init(cli.log_format());
}

/// Runs the subcommand.
pub async fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        cli::Command::Serve(settings) => {
            let config = config::Config::from_settings(&settings, &config::default_host_name())?;
            lifecycle::serve::run(config, Arc::new(cli::reload_serve_config)).await?;
        }
        cli::Command::Check(args) => {
            // The configuration first: it shows what a failing check was given.
            if args.print {
                let effective = cli::effective_check_settings()
                    .map_err(|e| ConfigError::Flags(e.to_string()))?;
                drop(std::io::Write::write_all(
                    &mut std::io::stdout().lock(),
                    effective.as_bytes(),
                ));
            }
            commands::check(&args.settings)?;
        }
        // A closed stdout (`proxy completions bash | head`) is not worth reporting.
        cli::Command::Completions(args) => drop(cli::print_completions(args.shell)),
        cli::Command::Manpage(args) => cli::write_manpages(args.out_dir.as_deref())
            .map_err(|e| ConfigError::Flags(format!("writing the manual pages: {e}")))?,
        cli::Command::Backend(args) => lifecycle::backend::run(args.listen).await?,
        cli::Command::Ca(command) => commands::ca(command)?,
    }
    Ok(())
}
