//! The resolved configuration: flags and environment over an optional TOML file over the
//! embedded defaults, validated once into a plain [`Config`] that is passed down.
//!
//! Resolution is pure ([`Config::resolve`] takes the file's text, not its path), so every
//! rule here is unit-tested without touching the filesystem or the environment.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::cli::ServeArgs;
use crate::names::{NameError, ServedName};

/// Where the local CA and its leaf live unless configured otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/proxy";
/// Leaves are short-lived: the CA refuses to issue for longer than this.
pub const MAX_LEAF_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);

/// Everything `serve` needs, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub http_listen: SocketAddr,
    pub https_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Port written into redirect Locations (omitted when 443).
    pub public_https_port: u16,
    pub state_dir: PathBuf,
    /// Where `ca.pem` and `ca.key` live: the state directory unless the CA is shared (for
    /// example mounted from a Kubernetes Secret).
    pub ca_dir: PathBuf,
    /// Names the local CA's leaf covers (ignored with bring-your-own certificates).
    pub names: Vec<ServedName>,
    pub leaf_lifetime: Duration,
    pub tls: TlsSource,
    pub upstream: Option<UpstreamConfig>,
    pub limits: Limits,
    pub timeouts: Timeouts,
    pub hsts_max_age: u64,
    /// Whether the kernel observer must, may or must not run.
    pub ebpf: EbpfMode,
    /// The file this came from, re-read on SIGHUP.
    pub config_file: Option<PathBuf>,
}

/// Whether to attach the eBPF kernel observer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EbpfMode {
    /// Attach if the kernel and privileges allow; otherwise serve without kernel metrics.
    #[default]
    Auto,
    /// Refuse to start without the kernel observer.
    Required,
    /// Do not attach (for example to measure the cost of observation).
    Off,
}

/// Where the served certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    /// A leaf issued and renewed by the local CA in the state directory.
    LocalCa,
    /// A PEM chain and key supplied by the operator, re-read on SIGHUP.
    Files { cert: PathBuf, key: PathBuf },
}

/// The backend that upstream mode forwards to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// `http://host:port`, without path.
    pub uri: http::Uri,
    pub timeout: Duration,
    pub connect_timeout: Duration,
}

/// Resource caps that keep one client from starving the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub listen_backlog: u32,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub h2_max_concurrent_streams: u32,
}

/// Deadlines for each phase of a connection's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub tls_handshake: Duration,
    pub header_read: Duration,
    pub idle: Duration,
    pub drain: Duration,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has unknown or mistyped keys.
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    /// A name for the certificate is malformed.
    #[error("invalid name {name:?}: {source}")]
    Name { name: String, source: NameError },
    /// A value is out of its allowed range or inconsistent with another.
    #[error("invalid {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// The config file's shape: every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    http_listen: Option<SocketAddr>,
    https_listen: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
    public_https_port: Option<u16>,
    state_dir: Option<PathBuf>,
    ca_dir: Option<PathBuf>,
    names: Option<Vec<String>>,
    #[serde(default, with = "humantime_serde")]
    leaf_lifetime: Option<Duration>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    upstream: Option<String>,
    #[serde(default, with = "humantime_serde")]
    upstream_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    upstream_connect_timeout: Option<Duration>,
    max_connections: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    tls_handshake_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    header_read_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    drain_timeout: Option<Duration>,
    max_header_bytes: Option<usize>,
    max_headers: Option<usize>,
    listen_backlog: Option<u32>,
    h2_max_concurrent_streams: Option<u32>,
    hsts_max_age: Option<u64>,
    ebpf: Option<EbpfMode>,
}

impl Config {
    /// Reads the config file named by `args` (if any) and resolves.
    pub fn load(args: &ServeArgs) -> Result<Self, ConfigError> {
        let text = match &args.config {
            Some(path) => {
                Some(
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                        path: path.clone(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        Self::resolve(args, text.as_deref(), &default_host_name())
    }

    /// Layers `args` over the config file's text over the defaults and validates the result.
    /// `host_name` is the machine's name, one of the default certificate names.
    pub fn resolve(
        args: &ServeArgs,
        file_text: Option<&str>,
        host_name: &str,
    ) -> Result<Self, ConfigError> {
        let file: FileConfig = match file_text {
            Some(text) => toml::from_str(text).map_err(|source| ConfigError::Parse {
                path: args.config.clone().unwrap_or_default(),
                source: Box::new(source),
            })?,
            None => FileConfig::default(),
        };
        let any = |ip: IpAddr, port| SocketAddr::new(ip, port);
        let unspecified = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

        let https_listen = args
            .https_listen
            .or(file.https_listen)
            .unwrap_or(any(unspecified, 443));
        let state_dir = args
            .state_dir
            .clone()
            .or(file.state_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        let names_raw: Vec<String> = if !args.names.is_empty() {
            args.names.clone()
        } else {
            file.names.unwrap_or_else(|| default_names(host_name))
        };
        let names = parse_names(&names_raw)?;

        let tls = match (
            args.tls_cert.clone().or(file.tls_cert),
            args.tls_key.clone().or(file.tls_key),
        ) {
            (Some(cert), Some(key)) => TlsSource::Files { cert, key },
            (None, None) => TlsSource::LocalCa,
            _ => {
                return Err(ConfigError::Invalid {
                    key: "tls_cert",
                    reason: "tls_cert and tls_key go together".into(),
                });
            }
        };

        let leaf_lifetime = args
            .leaf_lifetime
            .or(file.leaf_lifetime)
            .unwrap_or(Duration::from_secs(30 * 24 * 3600));
        if leaf_lifetime > MAX_LEAF_LIFETIME || leaf_lifetime < Duration::from_secs(10) {
            return Err(ConfigError::Invalid {
                key: "leaf_lifetime",
                reason: format!(
                    "{} is outside 10s..=90d",
                    humantime::format_duration(leaf_lifetime)
                ),
            });
        }

        let upstream = match args.upstream.clone().or(file.upstream) {
            Some(raw) => Some(UpstreamConfig {
                uri: parse_upstream(&raw)?,
                timeout: args
                    .upstream_timeout
                    .or(file.upstream_timeout)
                    .unwrap_or(Duration::from_secs(10)),
                connect_timeout: args
                    .upstream_connect_timeout
                    .or(file.upstream_connect_timeout)
                    .unwrap_or(Duration::from_secs(2)),
            }),
            None => None,
        };

        let limits = Limits {
            listen_backlog: positive(
                "listen_backlog",
                args.listen_backlog.or(file.listen_backlog).unwrap_or(4096) as usize,
            )? as u32,
            max_connections: positive(
                "max_connections",
                args.max_connections
                    .or(file.max_connections)
                    .unwrap_or(10_000),
            )?,
            // hyper's read buffer cannot go below 8 KiB.
            max_header_bytes: at_least(
                "max_header_bytes",
                args.max_header_bytes
                    .or(file.max_header_bytes)
                    .unwrap_or(16 * 1024),
                8192,
            )?,
            max_headers: positive(
                "max_headers",
                args.max_headers.or(file.max_headers).unwrap_or(100),
            )?,
            h2_max_concurrent_streams: positive(
                "h2_max_concurrent_streams",
                args.h2_max_concurrent_streams
                    .or(file.h2_max_concurrent_streams)
                    .unwrap_or(100) as usize,
            )? as u32,
        };
        let timeouts = Timeouts {
            tls_handshake: nonzero(
                "tls_handshake_timeout",
                args.tls_handshake_timeout
                    .or(file.tls_handshake_timeout)
                    .unwrap_or(Duration::from_secs(10)),
            )?,
            header_read: nonzero(
                "header_read_timeout",
                args.header_read_timeout
                    .or(file.header_read_timeout)
                    .unwrap_or(Duration::from_secs(10)),
            )?,
            idle: nonzero(
                "idle_timeout",
                args.idle_timeout
                    .or(file.idle_timeout)
                    .unwrap_or(Duration::from_secs(60)),
            )?,
            drain: args
                .drain_timeout
                .or(file.drain_timeout)
                .unwrap_or(Duration::from_secs(30)),
        };

        Ok(Config {
            http_listen: args
                .http_listen
                .or(file.http_listen)
                .unwrap_or(any(unspecified, 80)),
            https_listen,
            admin_listen: args
                .admin_listen
                .or(file.admin_listen)
                .unwrap_or(any(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9090)),
            public_https_port: positive(
                "public_https_port",
                usize::from(
                    args.public_https_port
                        .or(file.public_https_port)
                        .unwrap_or(https_listen.port()),
                ),
            )? as u16,
            ca_dir: args
                .ca_dir
                .clone()
                .or(file.ca_dir)
                .unwrap_or_else(|| state_dir.clone()),
            state_dir,
            names,
            leaf_lifetime,
            tls,
            upstream,
            limits,
            timeouts,
            hsts_max_age: args
                .hsts_max_age
                .or(file.hsts_max_age)
                .unwrap_or(31_536_000),
            ebpf: args.ebpf.or(file.ebpf).unwrap_or_default(),
            config_file: args.config.clone(),
        })
    }

    /// The settings a SIGHUP cannot change without a restart, described for a warning.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        if self.http_listen != new.http_listen {
            changed.push("http_listen");
        }
        if self.https_listen != new.https_listen {
            changed.push("https_listen");
        }
        if self.admin_listen != new.admin_listen {
            changed.push("admin_listen");
        }
        if self.upstream != new.upstream {
            changed.push("upstream");
        }
        if self.limits != new.limits {
            changed.push("limits");
        }
        if self.timeouts != new.timeouts {
            changed.push("timeouts");
        }
        if self.public_https_port != new.public_https_port {
            changed.push("public_https_port");
        }
        changed
    }
}

/// Parses the configured certificate names.
pub fn parse_names(raw: &[String]) -> Result<Vec<ServedName>, ConfigError> {
    if raw.is_empty() {
        return Err(ConfigError::Invalid {
            key: "names",
            reason: "at least one name is needed".into(),
        });
    }
    raw.iter()
        .map(|name| {
            ServedName::parse(name.trim()).map_err(|source| ConfigError::Name {
                name: name.clone(),
                source,
            })
        })
        .collect()
}

/// The default certificate names: loopback names plus the machine's host name.
pub fn default_names(host_name: &str) -> Vec<String> {
    let mut names = vec!["localhost".to_owned()];
    if ServedName::parse(host_name).is_ok() && host_name != "localhost" {
        names.push(host_name.to_owned());
    }
    names.extend(["127.0.0.1".to_owned(), "::1".to_owned()]);
    names
}

/// The machine's host name, or `localhost` when it cannot be read.
pub fn default_host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .map(|name| name.to_ascii_lowercase())
        .unwrap_or_else(|| "localhost".to_owned())
}

fn parse_upstream(raw: &str) -> Result<http::Uri, ConfigError> {
    let invalid = |reason: &str| ConfigError::Invalid {
        key: "upstream",
        reason: format!("{raw:?}: {reason}"),
    };
    let uri: http::Uri = raw.parse().map_err(|_| invalid("not a URL"))?;
    if uri.scheme_str() != Some("http") {
        return Err(invalid("only http:// upstreams are supported"));
    }
    let authority = uri.authority().ok_or_else(|| invalid("missing host"))?;
    if authority.port_u16().is_none() {
        return Err(invalid("missing port"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(invalid("must not have a path or query"));
    }
    http::Uri::builder()
        .scheme("http")
        .authority(authority.as_str())
        .path_and_query("/")
        .build()
        .map_err(|_| invalid("not a URL"))
}

fn positive(key: &'static str, value: usize) -> Result<usize, ConfigError> {
    at_least(key, value, 1)
}

fn at_least(key: &'static str, value: usize, min: usize) -> Result<usize, ConfigError> {
    if value < min {
        return Err(ConfigError::Invalid {
            key,
            reason: format!("{value} is below the minimum {min}"),
        });
    }
    Ok(value)
}

fn nonzero(key: &'static str, value: Duration) -> Result<Duration, ConfigError> {
    if value.is_zero() {
        return Err(ConfigError::Invalid {
            key,
            reason: "must be more than zero".into(),
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(args: ServeArgs, file: Option<&str>) -> Result<Config, String> {
        Config::resolve(&args, file, "box1").map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_need_no_file() {
        let config = resolve(ServeArgs::default(), None).expect("defaults are valid");
        assert_eq!(config.http_listen, "[::]:80".parse().expect("addr"));
        assert_eq!(config.https_listen, "[::]:443".parse().expect("addr"));
        assert_eq!(config.admin_listen, "127.0.0.1:9090".parse().expect("addr"));
        assert_eq!(config.public_https_port, 443);
        assert_eq!(config.tls, TlsSource::LocalCa);
        let names: Vec<String> = config.names.iter().map(|n| n.to_string()).collect();
        assert_eq!(names, ["localhost", "box1", "127.0.0.1", "::1"]);
        assert!(config.upstream.is_none());
    }

    #[test]
    fn flags_beat_file_beats_defaults() {
        let file = "https_listen = \"127.0.0.1:8443\"\nhttp_listen = \"127.0.0.1:8080\"\nidle_timeout = \"5s\"\nnames = [\"a.example\"]";
        let args = ServeArgs {
            http_listen: Some("127.0.0.1:81".parse().expect("addr")),
            ..Default::default()
        };
        let config = resolve(args, Some(file)).expect("valid");
        assert_eq!(config.http_listen.port(), 81);
        assert_eq!(config.https_listen.port(), 8443);
        assert_eq!(
            config.public_https_port, 8443,
            "public port follows the listener"
        );
        assert_eq!(config.timeouts.idle, Duration::from_secs(5));
        assert_eq!(config.names, vec![ServedName::Dns("a.example".into())]);
    }

    fn check_invalid(args: ServeArgs, file: Option<&str>, expected_fragment: &str) {
        let err = resolve(args, file).expect_err("should be refused");
        assert!(
            err.contains(expected_fragment),
            "error {err:?} should mention {expected_fragment:?}"
        );
    }

    #[test]
    fn bad_input_is_refused_with_a_reason() {
        check_invalid(
            ServeArgs::default(),
            Some("https_listen = \"nonsense\""),
            "https_listen",
        );
        check_invalid(ServeArgs::default(), Some("no_such_key = 1"), "no_such_key");
        check_invalid(
            ServeArgs::default(),
            Some("leaf_lifetime = \"91d\""),
            "leaf_lifetime",
        );
        check_invalid(
            ServeArgs::default(),
            Some("names = [\"bad name\"]"),
            "bad name",
        );
        check_invalid(
            ServeArgs::default(),
            Some("tls_cert = \"/x.pem\""),
            "tls_key",
        );
        check_invalid(
            ServeArgs::default(),
            Some("upstream = \"https://a:1\""),
            "http://",
        );
        check_invalid(
            ServeArgs::default(),
            Some("upstream = \"http://a\""),
            "port",
        );
        check_invalid(
            ServeArgs::default(),
            Some("upstream = \"http://a:1/path\""),
            "path",
        );
        check_invalid(
            ServeArgs::default(),
            Some("max_connections = 0"),
            "max_connections",
        );
        check_invalid(
            ServeArgs::default(),
            Some("idle_timeout = \"0s\""),
            "idle_timeout",
        );
        // Found by fuzzing: port 0 would put ":0" into every redirect.
        check_invalid(
            ServeArgs::default(),
            Some("public_https_port = 0"),
            "public_https_port",
        );
    }

    #[test]
    fn upstream_is_normalised() {
        let args = ServeArgs {
            upstream: Some("http://127.0.0.1:8080".into()),
            ..Default::default()
        };
        let upstream = resolve(args, None).expect("valid").upstream.expect("set");
        assert_eq!(upstream.uri.to_string(), "http://127.0.0.1:8080/");
        assert_eq!(upstream.timeout, Duration::from_secs(10));
    }
}
