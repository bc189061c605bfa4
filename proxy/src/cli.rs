//! The command line: subcommands and their flags. The settings of `serve` and `check` are
//! declared once in `config::Settings`; here the config file named by `--config` is read and
//! its values become those flags' defaults, so clap applies flags over environment over file
//! over the built-in defaults.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand};

use crate::config::{
    Config, ConfigError, ConfigFile, DEFAULT_LEAF_LIFETIME, DEFAULT_STATE_DIR, Settings,
};
use crate::telemetry::logging::LogFormat;

/// TLS web server and reverse proxy that observes its own sockets in the kernel.
#[derive(Debug, Parser)]
#[command(name = "proxy", version = version(), about)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "PROXY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub(crate) log_format: LogFormat,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Serve HTTP (redirects) and HTTPS.
    Serve(Settings),
    /// Validate the configuration and certificates without serving.
    Check(Settings),
    /// Run the small backing service that upstream mode proxies to.
    Backend(BackendArgs),
    /// Manage the local certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
}

/// Flags of `backend`.
#[derive(Debug, Clone, Args)]
pub(crate) struct BackendArgs {
    /// Address to listen on.
    #[arg(long, env = "PROXY_BACKEND_LISTEN", default_value = "127.0.0.1:8080")]
    pub(crate) listen: SocketAddr,
}

#[derive(Debug, Subcommand)]
pub(crate) enum CaCommand {
    /// Create the local CA, so that several instances can share it.
    Init(CaInitArgs),
    /// Print the CA certificate and its SHA-256 fingerprint, to install it as trusted.
    Export(CaStateArgs),
    /// Install the CA certificate as trusted on this machine: the system trust store
    /// (Debian/Ubuntu, Fedora/RHEL, Arch) and the NSS databases of Firefox and Chromium.
    Trust(CaTrustArgs),
    /// Remove exactly what `proxy ca trust` installed for this CA.
    Untrust(CaTrustArgs),
    /// Issue a leaf from the local CA into files (bring-your-own material for an instance).
    Issue(CaIssueArgs),
}

#[derive(Debug, Clone, Args)]
pub(crate) struct CaStateArgs {
    /// State directory of the proxy; holds the CA unless --ca-dir names another.
    #[arg(long, env = "PROXY_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub(crate) state_dir: PathBuf,
    /// Directory holding the shared CA's ca.pem and ca.key [default: the state directory].
    #[arg(long, env = "PROXY_CA_DIR")]
    pub(crate) ca_dir: Option<PathBuf>,
}

impl CaStateArgs {
    /// Where the CA is: the same rule as `serve` (`--ca-dir`, else the state directory).
    pub(crate) fn ca_dir(&self) -> &Path {
        self.ca_dir.as_deref().unwrap_or(&self.state_dir)
    }
}

#[derive(Debug, Clone, Args)]
pub(crate) struct CaTrustArgs {
    #[command(flatten)]
    pub(crate) state: CaStateArgs,
    /// A PEM CA certificate to use instead of the CA directory's (e.g. one downloaded from
    /// the admin listener's /ca.pem).
    #[arg(long, value_name = "FILE")]
    pub(crate) cert: Option<PathBuf>,
    /// Leave the system trust store alone (it needs root; the NSS databases do not).
    #[arg(long)]
    pub(crate) no_system: bool,
    /// Leave the NSS databases of Firefox and Chromium under $HOME alone.
    #[arg(long)]
    pub(crate) no_nss: bool,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct CaInitArgs {
    #[command(flatten)]
    pub(crate) state: CaStateArgs,
    /// Names the CA may sign for (name constraints); a DNS name also permits its subdomains
    /// [default: the --name values or their defaults].
    #[arg(long, value_delimiter = ',')]
    pub(crate) permit: Vec<String>,
    /// Names the proxy will serve (used for --permit's default)
    /// [default: localhost, the host name, 127.0.0.1, ::1].
    #[arg(long = "name", env = "PROXY_NAMES", value_delimiter = ',')]
    pub(crate) names: Vec<String>,
    /// Replace an existing CA (every leaf it issued stops being trusted).
    #[arg(long)]
    pub(crate) force: bool,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct CaIssueArgs {
    #[command(flatten)]
    pub(crate) state: CaStateArgs,
    /// Names the leaf covers.
    #[arg(long = "name", required = true, value_delimiter = ',')]
    pub(crate) names: Vec<String>,
    /// Where to write the PEM certificate chain.
    #[arg(long)]
    pub(crate) cert_out: PathBuf,
    /// Where to write the PEM private key (mode 0600).
    #[arg(long)]
    pub(crate) key_out: PathBuf,
    /// Lifetime of the leaf, at most 90 days.
    #[arg(long, default_value = DEFAULT_LEAF_LIFETIME, value_parser = humantime::parse_duration)]
    pub(crate) lifetime: Duration,
}

/// Why the command line could not be turned into a command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Malformed flags, or `--help`/`--version`: clap prints it and exits.
    #[error(transparent)]
    Usage(#[from] clap::Error),
    /// The config file named by `--config` is unreadable or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl CliError {
    /// Prints the error (or the help it stands for) and exits with clap's status for usage
    /// errors, 1 for a bad config file.
    pub fn exit(self) -> ! {
        match self {
            CliError::Usage(e) => e.exit(),
            CliError::Config(e) => {
                eprintln!("proxy: {e}");
                std::process::exit(1)
            }
        }
    }
}

impl Cli {
    /// Parses `argv` (the program name first). For `serve` and `check` with `--config`, it
    /// is parsed twice: once to find the file, then with the file's values as defaults.
    pub fn parse_with_config<I, T>(argv: I) -> Result<Cli, CliError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
        let cli = Cli::try_parse_from(&argv)?;
        let (subcommand, settings) = match &cli.command {
            Command::Serve(settings) => ("serve", settings),
            Command::Check(settings) => ("check", settings),
            Command::Backend(_) | Command::Ca(_) => return Ok(cli),
        };
        let Some(path) = &settings.config else {
            return Ok(cli);
        };
        let file = ConfigFile::read(path)?;
        let mut command = Cli::command();
        let settings_command = command
            .find_subcommand(subcommand)
            .cloned()
            .unwrap_or_else(|| clap::Command::new(subcommand));
        file.check_keys(&settings_command)?;
        command = command.mut_subcommand(subcommand, |sub| file.with_defaults(sub));
        let matches = command
            .try_get_matches_from(&argv)
            .map_err(|e| file.value_error(&settings_command, &e))?;
        Ok(Cli::from_arg_matches(&matches)?)
    }

    /// The log format asked for.
    pub fn log_format(&self) -> LogFormat {
        self.log_format
    }
}

/// What `--version` says: the version, the source revision, and whether the eBPF object is
/// embedded (the same facts as `proxy_build_info`).
fn version() -> String {
    format!(
        "{} (revision {}, eBPF {})",
        env!("CARGO_PKG_VERSION"),
        env!("PROXY_REVISION"),
        crate::ebpf::BUILD
    )
}

/// Reads the configuration of this process's `serve` again: the same flags and environment
/// over the config file as it is now (SIGHUP).
pub(crate) fn reload_serve_config() -> Result<Config, ConfigError> {
    let cli = Cli::parse_with_config(std::env::args_os()).map_err(|e| match e {
        CliError::Config(e) => e,
        CliError::Usage(e) => ConfigError::Flags(e.to_string()),
    })?;
    match cli.command {
        Command::Serve(settings) | Command::Check(settings) => {
            Config::from_settings(&settings, &crate::config::default_host_name())
        }
        Command::Backend(_) | Command::Ca(_) => Err(ConfigError::Flags(
            "this process is not `proxy serve`".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve_settings(argv: &[&str]) -> Settings {
        match Cli::parse_with_config(argv.iter().copied())
            .expect("valid command line")
            .command
        {
            Command::Serve(settings) => settings,
            other => panic!("not serve: {other:?}"),
        }
    }

    #[test]
    fn the_config_file_sits_under_flags() {
        let dir = std::env::temp_dir().join(format!("proxy-cli-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("proxy.toml");
        std::fs::write(
            &file,
            "idle_timeout = \"5s\"\nhttp_listen = \"127.0.0.1:8080\"\n",
        )
        .expect("write config");
        let path = file.to_str().expect("utf-8 path");
        // Global flags may come after the subcommand; the file still applies.
        let settings = serve_settings(&[
            "proxy",
            "serve",
            "--config",
            path,
            "--http-listen",
            "127.0.0.1:81",
            "--log-format",
            "json",
        ]);
        assert_eq!(settings.idle_timeout, Duration::from_secs(5));
        assert_eq!(settings.http_listen.port(), 81, "a flag beats the file");
        let settings = serve_settings(&["proxy", "serve", "--config", path]);
        assert_eq!(
            settings.http_listen.port(),
            8080,
            "the file beats the default"
        );

        std::fs::write(&file, "idle_timeout = \"soon\"\n").expect("write config");
        let err = Cli::parse_with_config(["proxy", "check", "--config", path])
            .expect_err("a bad duration is refused");
        let text = err.to_string();
        assert!(
            text.contains("idle_timeout") && text.contains(path),
            "{text}"
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn help_shows_each_default_once_from_its_declaration() {
        let mut command = Cli::command();
        let help = command
            .find_subcommand_mut("serve")
            .expect("serve")
            .render_help()
            .to_string();
        for default in [
            "[default: [::]:80]",
            "[default: 10s]",
            "[default: /var/lib/proxy]",
            "[default: auto]",
        ] {
            assert!(help.contains(default), "{default} missing from:\n{help}");
        }
    }
}
