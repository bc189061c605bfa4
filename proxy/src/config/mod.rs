//! The resolved configuration: [`Settings`] (flags over environment over the optional TOML
//! file over the defaults, all applied by clap) validated once into a plain [`Config`] that
//! is passed down.
//!
//! Validation is pure ([`Config::from_settings`] takes the host name instead of reading it),
//! so every rule here is unit-tested without touching the filesystem or the environment.

mod error;
mod file;
mod settings;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use error::ConfigError;
pub(crate) use file::ConfigFile;
pub(crate) use settings::{DEFAULT_LEAF_LIFETIME, DEFAULT_STATE_DIR, EbpfMode, Settings};

use crate::names::ServedName;

/// Leaves are short-lived: the CA refuses to issue for longer than this.
pub(crate) const MAX_LEAF_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
/// The shortest leaf lifetime accepted (tests use seconds-long leaves to watch renewal).
const MIN_LEAF_LIFETIME: Duration = Duration::from_secs(10);
/// hyper's read buffer cannot go below 8 KiB.
const MIN_HEADER_BYTES: usize = 8192;

/// Everything `serve` needs, validated.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Config {
    pub(crate) http_listen: SocketAddr,
    pub(crate) https_listen: SocketAddr,
    pub(crate) admin_listen: SocketAddr,
    /// Port written into redirect Locations (omitted when 443).
    pub(crate) public_https_port: u16,
    pub(crate) state_dir: PathBuf,
    /// Where `ca.pem` and `ca.key` live: the state directory unless the CA is shared (for
    /// example mounted from a Kubernetes Secret).
    pub(crate) ca_dir: PathBuf,
    /// Names the local CA's leaf covers (ignored with bring-your-own certificates).
    pub(crate) names: Vec<ServedName>,
    pub(crate) leaf_lifetime: Duration,
    pub(crate) tls: TlsSource,
    pub(crate) upstream: Option<UpstreamConfig>,
    pub(crate) limits: Limits,
    pub(crate) timeouts: Timeouts,
    pub(crate) hsts_max_age: u64,
    /// Whether the kernel observer must, may or must not run.
    pub(crate) ebpf: EbpfMode,
}

/// Where the served certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TlsSource {
    /// A leaf issued and renewed by the local CA in the state directory.
    LocalCa,
    /// A PEM chain and key supplied by the operator, re-read on SIGHUP.
    Files { cert: PathBuf, key: PathBuf },
}

/// The backend that upstream mode forwards to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UpstreamConfig {
    /// `http://host:port`, without path.
    pub(crate) uri: http::Uri,
    pub(crate) timeout: Duration,
    pub(crate) connect_timeout: Duration,
}

/// Resource caps that keep one client from starving the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub(crate) max_connections: usize,
    pub(crate) listen_backlog: u32,
    pub(crate) max_header_bytes: usize,
    pub(crate) max_headers: usize,
    pub(crate) h2_max_concurrent_streams: u32,
}

/// Deadlines for each phase of a connection's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timeouts {
    pub(crate) tls_handshake: Duration,
    pub(crate) header_read: Duration,
    pub(crate) idle: Duration,
    pub(crate) drain: Duration,
}

/// Loads the configuration again (SIGHUP): the same flags and environment over the file as
/// it is now.
pub(crate) type Reload = std::sync::Arc<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

impl Config {
    /// Validates `settings`. `host_name` is the machine's name, one of the default
    /// certificate names.
    pub(crate) fn from_settings(settings: &Settings, host_name: &str) -> Result<Self, ConfigError> {
        let names_raw = if settings.names.is_empty() {
            default_names(host_name)
        } else {
            settings.names.clone()
        };
        let tls = match (&settings.tls_cert, &settings.tls_key) {
            (Some(cert), Some(key)) => TlsSource::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            (None, None) => TlsSource::LocalCa,
            _ => {
                return Err(ConfigError::Invalid {
                    key: "tls_cert",
                    reason: "tls_cert and tls_key go together".into(),
                });
            }
        };
        let leaf_lifetime = settings.leaf_lifetime;
        if !(MIN_LEAF_LIFETIME..=MAX_LEAF_LIFETIME).contains(&leaf_lifetime) {
            return Err(ConfigError::Invalid {
                key: "leaf_lifetime",
                reason: format!(
                    "{} is outside 10s..=90d",
                    humantime::format_duration(leaf_lifetime)
                ),
            });
        }
        let upstream = match &settings.upstream {
            Some(raw) => Some(UpstreamConfig {
                uri: parse_upstream(raw)?,
                timeout: settings.upstream_timeout,
                connect_timeout: settings.upstream_connect_timeout,
            }),
            None => None,
        };
        let limits = Limits {
            listen_backlog: at_least("listen_backlog", settings.listen_backlog, 1)?,
            max_connections: at_least("max_connections", settings.max_connections, 1)?,
            max_header_bytes: at_least(
                "max_header_bytes",
                settings.max_header_bytes,
                MIN_HEADER_BYTES,
            )?,
            max_headers: at_least("max_headers", settings.max_headers, 1)?,
            h2_max_concurrent_streams: at_least(
                "h2_max_concurrent_streams",
                settings.h2_max_concurrent_streams,
                1,
            )?,
        };
        let timeouts = Timeouts {
            tls_handshake: nonzero("tls_handshake_timeout", settings.tls_handshake_timeout)?,
            header_read: nonzero("header_read_timeout", settings.header_read_timeout)?,
            idle: nonzero("idle_timeout", settings.idle_timeout)?,
            drain: settings.drain_timeout,
        };
        Ok(Config {
            http_listen: settings.http_listen,
            https_listen: settings.https_listen,
            admin_listen: settings.admin_listen,
            // Found by fuzzing: port 0 would put ":0" into every redirect.
            public_https_port: at_least(
                "public_https_port",
                settings
                    .public_https_port
                    .unwrap_or(settings.https_listen.port()),
                1,
            )?,
            state_dir: settings.state_dir.clone(),
            ca_dir: settings
                .ca_dir
                .clone()
                .unwrap_or_else(|| settings.state_dir.clone()),
            names: parse_names(&names_raw)?,
            leaf_lifetime,
            tls,
            upstream,
            limits,
            timeouts,
            hsts_max_age: settings.hsts_max_age,
            ebpf: settings.ebpf,
        })
    }

    /// The settings a SIGHUP cannot change without a restart, described for a warning.
    pub(crate) fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
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

/// Validates a configuration file's text as `proxy serve` would read it with no flags set,
/// the environment's `PROXY_*` variables applied (for the fuzz target and tests).
pub fn check_file_text(text: &str, host_name: &str) -> Result<(), ConfigError> {
    let file = ConfigFile::parse(std::path::Path::new("config.toml"), text)?;
    let settings = file::settings_with_file(["proxy"], Some(&file))?;
    Config::from_settings(&settings, host_name).map(drop)
}

/// Parses the configured certificate names.
pub(crate) fn parse_names(raw: &[String]) -> Result<Vec<ServedName>, ConfigError> {
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
pub(crate) fn default_names(host_name: &str) -> Vec<String> {
    let mut names = vec!["localhost".to_owned()];
    if ServedName::parse(host_name).is_ok() && host_name != "localhost" {
        names.push(host_name.to_owned());
    }
    names.extend(["127.0.0.1".to_owned(), "::1".to_owned()]);
    names
}

/// The machine's host name, or `localhost` when it cannot be read.
pub(crate) fn default_host_name() -> String {
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

fn at_least<T: PartialOrd + std::fmt::Display>(
    key: &'static str,
    value: T,
    min: T,
) -> Result<T, ConfigError> {
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

    /// Resolves `proxy serve ARGS` over a config file with `file_text`, on host `box1`.
    fn resolve(args: &[&str], file_text: Option<&str>) -> Result<Config, String> {
        let file = file_text
            .map(|text| ConfigFile::parse(std::path::Path::new("test.toml"), text))
            .transpose()
            .map_err(|e| e.to_string())?;
        let argv = std::iter::once("proxy").chain(args.iter().copied());
        let settings = file::settings_with_file(argv, file.as_ref()).map_err(|e| e.to_string())?;
        Config::from_settings(&settings, "box1").map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_need_no_file() {
        let config = resolve(&[], None).expect("defaults are valid");
        assert_eq!(config.http_listen, "[::]:80".parse().expect("addr"));
        assert_eq!(config.https_listen, "[::]:443".parse().expect("addr"));
        assert_eq!(config.admin_listen, "127.0.0.1:9090".parse().expect("addr"));
        assert_eq!(config.public_https_port, 443);
        assert_eq!(config.tls, TlsSource::LocalCa);
        assert_eq!(config.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(config.ca_dir, config.state_dir);
        assert_eq!(config.leaf_lifetime, Duration::from_secs(30 * 24 * 3600));
        assert_eq!(config.timeouts.idle, Duration::from_secs(60));
        assert_eq!(config.limits.max_connections, 10_000);
        assert_eq!(config.ebpf, EbpfMode::Auto);
        let names: Vec<String> = config.names.iter().map(|n| n.to_string()).collect();
        assert_eq!(names, ["localhost", "box1", "127.0.0.1", "::1"]);
        assert!(config.upstream.is_none());
    }

    #[test]
    fn flags_beat_file_beats_defaults() {
        let file = "https_listen = \"127.0.0.1:8443\"\nhttp_listen = \"127.0.0.1:8080\"\nidle_timeout = \"5s\"\nnames = [\"a.example\"]\nmax_headers = 50";
        let config = resolve(&["--http-listen", "127.0.0.1:81"], Some(file)).expect("valid");
        assert_eq!(config.http_listen.port(), 81);
        assert_eq!(config.https_listen.port(), 8443);
        assert_eq!(
            config.public_https_port, 8443,
            "public port follows the listener"
        );
        assert_eq!(config.timeouts.idle, Duration::from_secs(5));
        assert_eq!(config.limits.max_headers, 50);
        assert_eq!(config.names, vec![ServedName::Dns("a.example".into())]);
        let config = resolve(&["--name", "b.example,c.example"], Some(file)).expect("valid");
        assert_eq!(config.names.len(), 2, "flags replace the file's list");
    }

    fn check_invalid(args: &[&str], file: Option<&str>, expected_fragment: &str) {
        let err = resolve(args, file).expect_err("should be refused");
        assert!(
            err.contains(expected_fragment),
            "error {err:?} should mention {expected_fragment:?}"
        );
    }

    #[test]
    fn bad_input_is_refused_with_a_reason() {
        check_invalid(&[], Some("https_listen = \"nonsense\""), "https_listen");
        check_invalid(&[], Some("https_listen = \"nonsense\""), "test.toml");
        check_invalid(&[], Some("no_such_key = 1"), "no_such_key");
        check_invalid(&[], Some("config = \"other.toml\""), "config");
        check_invalid(&[], Some("names = [[\"a\"]]"), "names");
        check_invalid(&[], Some("max_connections = true"), "max_connections");
        check_invalid(&[], Some("max_connections = -1"), "max_connections");
        check_invalid(&[], Some("leaf_lifetime = \"91d\""), "leaf_lifetime");
        check_invalid(&[], Some("names = [\"bad name\"]"), "bad name");
        check_invalid(&[], Some("tls_cert = \"/x.pem\""), "tls_key");
        check_invalid(&[], Some("upstream = \"https://a:1\""), "http://");
        check_invalid(&[], Some("upstream = \"http://a\""), "port");
        check_invalid(&[], Some("upstream = \"http://a:1/path\""), "path");
        check_invalid(&[], Some("max_connections = 0"), "max_connections");
        check_invalid(&[], Some("max_header_bytes = 100"), "max_header_bytes");
        check_invalid(&[], Some("idle_timeout = \"0s\""), "idle_timeout");
        check_invalid(&[], Some("ebpf = \"sometimes\""), "ebpf");
        check_invalid(&[], Some("not toml"), "test.toml");
        // Found by fuzzing: port 0 would put ":0" into every redirect.
        check_invalid(&[], Some("public_https_port = 0"), "public_https_port");
    }

    #[test]
    fn upstream_is_normalised() {
        let upstream = resolve(&["--upstream", "http://127.0.0.1:8080"], None)
            .expect("valid")
            .upstream
            .expect("set");
        assert_eq!(upstream.uri.to_string(), "http://127.0.0.1:8080/");
        assert_eq!(upstream.timeout, Duration::from_secs(10));
    }
}
