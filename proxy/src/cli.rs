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
    Check(CheckArgs),
    /// Run the small backing service that upstream mode proxies to.
    Backend(BackendArgs),
    /// Manage the local certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(CompletionsArgs),
    /// Print the manual page (roff), generated from these same definitions.
    #[command(hide = true)]
    Manpage(ManpageArgs),
}

/// Flags of `check`: the settings of `serve`, and what to print.
#[derive(Debug, Clone, Args)]
pub(crate) struct CheckArgs {
    #[command(flatten)]
    pub(crate) settings: Settings,
    /// Also print the configuration in effect, as a config file: every setting with its
    /// value and where it came from (flag, environment, file or default).
    #[arg(long)]
    pub(crate) print: bool,
}

/// Flags of `manpage`.
#[derive(Debug, Clone, Args)]
pub(crate) struct ManpageArgs {
    /// Write every page (proxy.8 and one per subcommand) into this directory instead.
    #[arg(long)]
    pub(crate) out_dir: Option<PathBuf>,
}

/// Flags of `completions`.
#[derive(Debug, Clone, Args)]
pub(crate) struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub(crate) shell: clap_complete::Shell,
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
        Ok(Self::matches_with_config(argv)?.0)
    }

    /// [`Cli::parse_with_config`], with the matches it parsed and the config file it read.
    fn matches_with_config<I, T>(
        argv: I,
    ) -> Result<(Cli, Option<(clap::ArgMatches, ConfigFile)>), CliError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
        let cli = Cli::try_parse_from(&argv)?;
        let (subcommand, settings) = match &cli.command {
            Command::Serve(settings) => ("serve", settings),
            Command::Check(args) => ("check", &args.settings),
            Command::Backend(_)
            | Command::Ca(_)
            | Command::Completions(_)
            | Command::Manpage(_) => {
                return Ok((cli, None));
            }
        };
        let Some(path) = &settings.config else {
            return Ok((cli, None));
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
        Ok((Cli::from_arg_matches(&matches)?, Some((matches, file))))
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
        Command::Serve(settings) | Command::Check(CheckArgs { settings, .. }) => {
            Config::from_settings(&settings, &crate::config::default_host_name())
        }
        Command::Backend(_) | Command::Ca(_) | Command::Completions(_) | Command::Manpage(_) => {
            Err(ConfigError::Flags(
                "this process is not `proxy serve`".into(),
            ))
        }
    }
}

/// The settings of this process's `check` as in effect, as a TOML config file that
/// `--config` reads back: each setting's values (as given, or its default) and, in a
/// comment, where they came from.
pub(crate) fn effective_check_settings() -> Result<String, CliError> {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let (_, with_file) = Cli::matches_with_config(&argv)?;
    let (matches, file) = match with_file {
        Some((matches, file)) => (matches, Some(file)),
        None => (Cli::command().try_get_matches_from(&argv)?, None),
    };
    let Some(check) = matches.subcommand_matches("check") else {
        return Ok(String::new());
    };
    let mut out = String::from(
        "# The configuration in effect: flags over environment over file over defaults.\n",
    );
    let command = Cli::command();
    let Some(check_command) = command.find_subcommand("check") else {
        return Ok(out);
    };
    for arg in check_command.get_arguments() {
        let key = arg.get_id().as_str();
        if ["config", "print", "help", "log_format"].contains(&key) {
            continue;
        }
        let values: Vec<String> = check
            .get_raw(key)
            .map(|raw| raw.map(|v| v.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let source = match check.value_source(key) {
            Some(clap::parser::ValueSource::CommandLine) => "flag".to_owned(),
            Some(clap::parser::ValueSource::EnvVariable) => format!(
                "environment {}",
                arg.get_env()
                    .map(|e| e.to_string_lossy())
                    .unwrap_or_default()
            ),
            Some(_) if file.as_ref().is_some_and(|f| f.sets(key)) => format!(
                "file {}",
                file.as_ref()
                    .map(|f| f.path().display().to_string())
                    .unwrap_or_default()
            ),
            _ => "default".to_owned(),
        };
        let value = match values.as_slice() {
            [] => {
                let _ = std::fmt::Write::write_fmt(
                    &mut out,
                    format_args!("# {key}: not set ({source})\n"),
                );
                continue;
            }
            // A list setting stays a list, even of one.
            [one] if !matches!(arg.get_action(), clap::ArgAction::Append) => toml_string(one),
            many => format!(
                "[{}]",
                many.iter()
                    .map(|v| toml_string(v))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let _ = std::fmt::Write::write_fmt(&mut out, format_args!("{key} = {value}  # {source}\n"));
    }
    Ok(out)
}

/// `text` as a TOML basic string.
fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

/// Writes the completion script for `shell` to stdout.
pub(crate) fn print_completions(shell: clap_complete::Shell) -> std::io::Result<()> {
    // Rendered first: clap_complete panics on a write error (`proxy completions bash | head`).
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "proxy", &mut script);
    std::io::Write::write_all(&mut std::io::stdout().lock(), &script)
}

/// The manual pages, section 8 (a system daemon and its administration): `proxy(8)` and one
/// per subcommand, `proxy-serve(8)`, `proxy-ca-init(8)`..., as (file name, roff).
pub(crate) fn manpages() -> std::io::Result<Vec<(String, Vec<u8>)>> {
    fn render(
        command: clap::Command,
        name: String,
        pages: &mut Vec<(String, Vec<u8>)>,
    ) -> std::io::Result<()> {
        let command = command.name(name.clone()).bin_name(name.replace('-', " "));
        let mut roff = Vec::new();
        clap_mangen::Man::new(command.clone())
            .section("8")
            .render(&mut roff)?;
        pages.push((format!("{name}.8"), roff));
        for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
            render(sub.clone(), format!("{name}-{}", sub.get_name()), pages)?;
        }
        Ok(())
    }
    let mut pages = Vec::new();
    render(Cli::command(), "proxy".to_owned(), &mut pages)?;
    Ok(pages)
}

/// `proxy manpage`: `proxy(8)` to stdout, or every page into `out_dir`.
pub(crate) fn write_manpages(out_dir: Option<&std::path::Path>) -> std::io::Result<()> {
    let pages = manpages()?;
    match out_dir {
        None => {
            let roff = pages
                .first()
                .map(|(_, roff)| roff.as_slice())
                .unwrap_or_default();
            std::io::Write::write_all(&mut std::io::stdout().lock(), roff)
        }
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            for (name, roff) in pages {
                std::fs::write(dir.join(name), roff)?;
            }
            Ok(())
        }
    }
}
