//! Every setting of `proxy serve` and `proxy check`, each declared once: its flag, its
//! `PROXY_*` environment variable, its key in the config file (the field's name) and its
//! default, which `--help` shows. The file's values become the flags' defaults
//! (see `file.rs`), so clap itself applies the precedence: flag, then environment, then
//! file, then the default written here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

/// Where the local CA and its leaf live unless configured otherwise.
pub(crate) const DEFAULT_STATE_DIR: &str = "/var/lib/proxy";
/// Lifetime of the leaves the local CA issues unless configured otherwise.
pub(crate) const DEFAULT_LEAF_LIFETIME: &str = "30d";

/// The settings of `serve` and `check`, as parsed (validated into a `Config` afterwards).
#[derive(Debug, Clone, Args)]
pub(crate) struct Settings {
    /// TOML configuration file: keys are the flag names with `_` for `-`; flags and
    /// environment variables override it.
    #[arg(long, env = "PROXY_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Address of the plain-HTTP listener that redirects to HTTPS.
    #[arg(long, env = "PROXY_HTTP_LISTEN", default_value = "[::]:80")]
    pub(crate) http_listen: SocketAddr,
    /// Address of the HTTPS listener.
    #[arg(long, env = "PROXY_HTTPS_LISTEN", default_value = "[::]:443")]
    pub(crate) https_listen: SocketAddr,
    /// Address of the admin listener (/metrics, /healthz, /readyz, /ca.pem).
    #[arg(long, env = "PROXY_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    pub(crate) admin_listen: SocketAddr,
    /// HTTPS port written into redirects, when a port forward makes it differ from the
    /// listening one [default: the port of --https-listen].
    #[arg(long, env = "PROXY_PUBLIC_HTTPS_PORT")]
    pub(crate) public_https_port: Option<u16>,
    /// Directory for the local CA and leaf (created 0700).
    #[arg(long, env = "PROXY_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub(crate) state_dir: PathBuf,
    /// Directory holding the shared CA's ca.pem and ca.key [default: the state directory].
    #[arg(long, env = "PROXY_CA_DIR")]
    pub(crate) ca_dir: Option<PathBuf>,
    /// Names the leaf certificate covers; repeat or comma-separate
    /// [default: localhost, the host name, 127.0.0.1, ::1].
    #[arg(
        long = "name",
        id = "names",
        env = "PROXY_NAMES",
        value_delimiter = ','
    )]
    pub(crate) names: Vec<String>,
    /// Lifetime of leaves issued by the local CA, at most 90 days.
    #[arg(long, env = "PROXY_LEAF_LIFETIME", default_value = DEFAULT_LEAF_LIFETIME, value_parser = humantime::parse_duration)]
    pub(crate) leaf_lifetime: Duration,
    /// PEM certificate chain to serve instead of the local CA's leaf (with --tls-key).
    #[arg(long, env = "PROXY_TLS_CERT")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "PROXY_TLS_KEY")]
    pub(crate) tls_key: Option<PathBuf>,
    /// Proxy `GET /` and everything else to these backends (http://HOST:PORT; repeat or
    /// comma-separate for a pool) instead of the static answer. Names are resolved at start
    /// and at reload.
    #[arg(long, env = "PROXY_UPSTREAM", value_delimiter = ',')]
    pub(crate) upstream: Vec<String>,
    /// How a request's backend is chosen: the less loaded of two drawn at random, or each
    /// in turn.
    #[arg(long, env = "PROXY_BALANCE", value_enum, default_value = "p2c")]
    pub(crate) balance: Balance,
    /// Deadline for a backend's response head, counted from the end of the request body.
    #[arg(long, env = "PROXY_UPSTREAM_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) upstream_timeout: Duration,
    /// Deadline for connecting to a backend.
    #[arg(long, env = "PROXY_UPSTREAM_CONNECT_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub(crate) upstream_connect_timeout: Duration,
    /// Longest wait for the next piece of a backend's response body; beyond it the response
    /// is broken off (like nginx's proxy_read_timeout).
    #[arg(long, env = "PROXY_UPSTREAM_BODY_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub(crate) upstream_body_timeout: Duration,
    /// Longest wait for the next piece of a client's request body; beyond it 408, or the
    /// exchange is broken off.
    #[arg(long, env = "PROXY_CLIENT_BODY_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub(crate) client_body_timeout: Duration,
    /// A client that reads none of its response for this long has its connection closed.
    #[arg(long, env = "PROXY_SEND_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub(crate) send_timeout: Duration,
    /// Path of the active health check (GET; any 2xx or 3xx is healthy).
    #[arg(long, env = "PROXY_HEALTH_CHECK_PATH", default_value = "/")]
    pub(crate) health_check_path: String,
    /// Time between two active health checks of a backend.
    #[arg(long, env = "PROXY_HEALTH_CHECK_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub(crate) health_check_interval: Duration,
    /// Deadline of one active health check.
    #[arg(long, env = "PROXY_HEALTH_CHECK_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub(crate) health_check_timeout: Duration,
    /// Consecutive passed checks that bring a backend (back) into the pool.
    #[arg(long, env = "PROXY_HEALTHY_THRESHOLD", default_value = "2")]
    pub(crate) healthy_threshold: u32,
    /// Consecutive failed checks that take a backend out of the pool.
    #[arg(long, env = "PROXY_UNHEALTHY_THRESHOLD", default_value = "3")]
    pub(crate) unhealthy_threshold: u32,
    /// Consecutive connect failures or 5xx answers in live traffic that take a backend out
    /// of the pool until its health check passes again (0: never).
    #[arg(long, env = "PROXY_EJECT_AFTER", default_value = "3")]
    pub(crate) eject_after: u32,
    /// Retries allowed, as a percentage of the requests of the last 10 s (plus 10 per 10 s).
    #[arg(long, env = "PROXY_RETRY_BUDGET_PERCENT", default_value = "20")]
    pub(crate) retry_budget_percent: u32,
    /// Connections served at once; at the cap the proxy stops accepting and the kernel
    /// queues new clients.
    #[arg(long, env = "PROXY_MAX_CONNECTIONS", default_value = "10000")]
    pub(crate) max_connections: usize,
    /// Deadline for a TLS handshake.
    #[arg(long, env = "PROXY_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) tls_handshake_timeout: Duration,
    /// Deadline for a connection's first request head (later ones fall under the idle
    /// timeout).
    #[arg(long, env = "PROXY_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed (a keep-alive wait
    /// and a later request's head included).
    #[arg(long, env = "PROXY_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub(crate) idle_timeout: Duration,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish.
    #[arg(long, env = "PROXY_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub(crate) drain_timeout: Duration,
    /// Largest request head in bytes, at least 8192; beyond it 431.
    #[arg(long, env = "PROXY_MAX_HEADER_BYTES", default_value = "16384")]
    pub(crate) max_header_bytes: usize,
    /// Accept-queue length of the listeners (the kernel caps it at net.core.somaxconn).
    #[arg(long, env = "PROXY_LISTEN_BACKLOG", default_value = "4096")]
    pub(crate) listen_backlog: u32,
    /// Most header fields in a request; beyond it 431.
    #[arg(long, env = "PROXY_MAX_HEADERS", default_value = "100")]
    pub(crate) max_headers: usize,
    /// Concurrent streams per HTTP/2 connection.
    #[arg(long, env = "PROXY_H2_MAX_CONCURRENT_STREAMS", default_value = "100")]
    pub(crate) h2_max_concurrent_streams: u32,
    /// max-age of Strict-Transport-Security, in seconds.
    #[arg(long, env = "PROXY_HSTS_MAX_AGE", default_value = "31536000")]
    pub(crate) hsts_max_age: u64,
    /// Kernel metrics from eBPF: attach when possible, require, or turn off.
    #[arg(long, env = "PROXY_EBPF", value_enum, default_value = "auto")]
    pub(crate) ebpf: EbpfMode,
}

/// How the upstream pool picks a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Balance {
    /// Power of two choices: of two healthy backends drawn at random, the one with fewer
    /// requests in flight.
    P2c,
    /// Each healthy backend in turn, whatever its load.
    RoundRobin,
}

/// Whether to attach the eBPF kernel observer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum EbpfMode {
    /// Attach if the kernel and privileges allow; otherwise serve without kernel metrics.
    Auto,
    /// Refuse to start without the kernel observer.
    Required,
    /// Do not attach (for example to measure the cost of observation).
    Off,
}
