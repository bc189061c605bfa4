//! `proxy`: a TLS web server and reverse proxy that redirects plain HTTP to HTTPS, serves
//! HTTPS with a certificate from its own local CA, and exports its metrics to Prometheus.
//!
//! `main.rs` parses the command line and calls [`run`]; everything else lives here, one
//! responsibility per module (see ARCHITECTURE.md for the map).

pub mod activity;
pub mod admin;
pub mod backend;
pub mod ca;
pub mod cert_info;
pub mod certificates;
pub mod cli;
pub mod commands;
pub mod config;
pub mod ebpf;
pub mod handover;
pub mod listen_queue;
pub mod listeners;
pub mod logging;
pub mod metrics;
pub mod names;
pub mod redirect;
pub mod responses;
pub mod serve;
pub mod server;
pub mod signals;
pub mod state_dir;
pub mod supervisor;
pub mod tls;
pub mod tls_manager;
pub mod upstream;

/// Any error a subcommand ends with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Serve(#[from] serve::ServeError),
    #[error(transparent)]
    Command(#[from] commands::CommandError),
    #[error(transparent)]
    Listen(#[from] listeners::ListenError),
}

/// Runs the subcommand.
pub async fn run(command: cli::Command) -> Result<(), Error> {
    match command {
        cli::Command::Serve(args) => serve::run(args).await?,
        cli::Command::Check(args) => commands::check(&args)?,
        cli::Command::Backend(args) => backend::run(args).await?,
        cli::Command::Ca(command) => commands::ca(command)?,
    }
    Ok(())
}
