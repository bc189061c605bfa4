//! The command line: subcommands and the flags of `serve`, each with a `PROXY_*` environment
//! fallback. Everything here is optional so that `config` can layer flags and environment
//! over a config file over the embedded defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// TLS web server and reverse proxy that observes its own sockets in the kernel.
#[derive(Debug, Parser)]
#[command(name = "proxy", version, about)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "PROXY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve HTTP (redirects) and HTTPS.
    Serve(ServeArgs),
    /// Validate the configuration and certificates without serving.
    Check(ServeArgs),
    /// Run the small backing service that upstream mode proxies to.
    Backend(BackendArgs),
    /// Manage the local certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
}

/// Flags of `serve` and `check`. Unset values fall back to the config file, then defaults.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// TOML configuration file (keys are the flag names with `_` for `-`).
    #[arg(long, env = "PROXY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address of the plain-HTTP listener that redirects to HTTPS [default: [::]:80].
    #[arg(long, env = "PROXY_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Address of the HTTPS listener [default: [::]:443].
    #[arg(long, env = "PROXY_HTTPS_LISTEN")]
    pub https_listen: Option<SocketAddr>,
    /// Address of the admin listener (/metrics, /healthz, /readyz) [default: 127.0.0.1:9090].
    #[arg(long, env = "PROXY_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// HTTPS port written into redirects, when a port forward makes it differ from the
    /// listening one [default: the port of --https-listen].
    #[arg(long, env = "PROXY_PUBLIC_HTTPS_PORT")]
    pub public_https_port: Option<u16>,
    /// Directory for the local CA and leaf (created 0700) [default: /var/lib/proxy].
    #[arg(long, env = "PROXY_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Directory holding the shared CA's ca.pem and ca.key [default: the state directory].
    #[arg(long, env = "PROXY_CA_DIR")]
    pub ca_dir: Option<PathBuf>,
    /// Names the leaf certificate covers; repeat or comma-separate
    /// [default: localhost, the host name, 127.0.0.1, ::1].
    #[arg(long = "name", env = "PROXY_NAMES", value_delimiter = ',')]
    pub names: Vec<String>,
    /// Lifetime of leaves issued by the local CA, at most 90 days [default: 30d].
    #[arg(long, env = "PROXY_LEAF_LIFETIME", value_parser = humantime::parse_duration)]
    pub leaf_lifetime: Option<Duration>,
    /// PEM certificate chain to serve instead of the local CA's leaf (with --tls-key).
    #[arg(long, env = "PROXY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "PROXY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Proxy `GET /` and everything else to this backend (http://HOST:PORT) instead of the
    /// static answer.
    #[arg(long, env = "PROXY_UPSTREAM")]
    pub upstream: Option<String>,
    /// Deadline for a whole upstream response head [default: 10s].
    #[arg(long, env = "PROXY_UPSTREAM_TIMEOUT", value_parser = humantime::parse_duration)]
    pub upstream_timeout: Option<Duration>,
    /// Deadline for connecting to the upstream [default: 2s].
    #[arg(long, env = "PROXY_UPSTREAM_CONNECT_TIMEOUT", value_parser = humantime::parse_duration)]
    pub upstream_connect_timeout: Option<Duration>,
    /// Connections served at once; at the cap the proxy stops accepting [default: 10000].
    #[arg(long, env = "PROXY_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Deadline for a TLS handshake [default: 10s].
    #[arg(long, env = "PROXY_TLS_HANDSHAKE_TIMEOUT", value_parser = humantime::parse_duration)]
    pub tls_handshake_timeout: Option<Duration>,
    /// Deadline for the first request of a connection and for each request head [default: 10s].
    #[arg(long, env = "PROXY_HEADER_READ_TIMEOUT", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Option<Duration>,
    /// A connection with no request in flight for this long is closed [default: 60s].
    #[arg(long, env = "PROXY_IDLE_TIMEOUT", value_parser = humantime::parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish [default: 30s].
    #[arg(long, env = "PROXY_DRAIN_TIMEOUT", value_parser = humantime::parse_duration)]
    pub drain_timeout: Option<Duration>,
    /// Largest request head in bytes, at least 8192; beyond it 431 [default: 16384].
    #[arg(long, env = "PROXY_MAX_HEADER_BYTES")]
    pub max_header_bytes: Option<usize>,
    /// Accept-queue length of the listeners (the kernel caps it at net.core.somaxconn)
    /// [default: 4096].
    #[arg(long, env = "PROXY_LISTEN_BACKLOG")]
    pub listen_backlog: Option<u32>,
    /// Most header fields in a request; beyond it 431 [default: 100].
    #[arg(long, env = "PROXY_MAX_HEADERS")]
    pub max_headers: Option<usize>,
    /// Concurrent streams per HTTP/2 connection [default: 100].
    #[arg(long, env = "PROXY_H2_MAX_CONCURRENT_STREAMS")]
    pub h2_max_concurrent_streams: Option<u32>,
    /// max-age of Strict-Transport-Security, in seconds [default: 31536000].
    #[arg(long, env = "PROXY_HSTS_MAX_AGE")]
    pub hsts_max_age: Option<u64>,
    /// Kernel metrics from eBPF: attach when possible, require, or turn off [default: auto].
    #[arg(long, env = "PROXY_EBPF", value_enum)]
    pub ebpf: Option<crate::config::EbpfMode>,
}

/// Flags of `backend`.
#[derive(Debug, Clone, Args)]
pub struct BackendArgs {
    /// Address to listen on.
    #[arg(long, env = "PROXY_BACKEND_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create the local CA, so that several instances can share it.
    Init(CaInitArgs),
    /// Print the CA certificate and its SHA-256 fingerprint, to install it as trusted.
    Export(CaStateArgs),
    /// Issue a leaf from the local CA into files (bring-your-own material for an instance).
    Issue(CaIssueArgs),
}

#[derive(Debug, Clone, Args)]
pub struct CaStateArgs {
    /// Directory holding the CA [default: /var/lib/proxy].
    #[arg(long, env = "PROXY_STATE_DIR", default_value = crate::config::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct CaInitArgs {
    #[command(flatten)]
    pub state: CaStateArgs,
    /// Names the CA may sign for (name constraints); a DNS name also permits its subdomains
    /// [default: the --name values or their defaults].
    #[arg(long, value_delimiter = ',')]
    pub permit: Vec<String>,
    /// Names the proxy will serve (used for --permit's default).
    #[arg(long = "name", env = "PROXY_NAMES", value_delimiter = ',')]
    pub names: Vec<String>,
    /// Replace an existing CA (every leaf it issued stops being trusted).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Clone, Args)]
pub struct CaIssueArgs {
    #[command(flatten)]
    pub state: CaStateArgs,
    /// Names the leaf covers.
    #[arg(long = "name", required = true, value_delimiter = ',')]
    pub names: Vec<String>,
    /// Where to write the PEM certificate chain.
    #[arg(long)]
    pub cert_out: PathBuf,
    /// Where to write the PEM private key (mode 0600).
    #[arg(long)]
    pub key_out: PathBuf,
    /// Lifetime of the leaf, at most 90 days.
    #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
    pub lifetime: Duration,
}
