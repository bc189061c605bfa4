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
pub(crate) use settings::{Balance, DEFAULT_LEAF_LIFETIME, DEFAULT_STATE_DIR, EbpfMode, Settings};

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

/// The pool of backends that upstream mode forwards to, and how it is run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UpstreamConfig {
    /// At least one; no two the same.
    pub(crate) backends: Vec<BackendAddress>,
    pub(crate) balance: Balance,
    /// Deadline for a response head.
    pub(crate) timeout: Duration,
    pub(crate) connect_timeout: Duration,
    /// Longest wait between two pieces of a response body.
    pub(crate) body_timeout: Duration,
    pub(crate) health: HealthCheck,
    /// Consecutive failures in live traffic that eject a backend; 0 turns ejection off.
    pub(crate) eject_after: u32,
    /// Retries allowed as a percentage of recent requests.
    pub(crate) retry_budget_percent: u32,
}

/// A configured backend: `host:port` as written (its metrics label) and its parts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct BackendAddress {
    /// `host:port`, as configured: the `backend` label.
    pub(crate) label: String,
    pub(crate) host: String,
    pub(crate) port: u16,
    /// The label parsed once, for the target of every forwarded request.
    pub(crate) authority: http::uri::Authority,
}

/// The active health check of every backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HealthCheck {
    pub(crate) path: http::uri::PathAndQuery,
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
    pub(crate) healthy_threshold: u32,
    pub(crate) unhealthy_threshold: u32,
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
    /// Longest wait between two pieces of a request body.
    pub(crate) client_body: Duration,
    /// Longest a response may wait for the client to read it.
    pub(crate) send: Duration,
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
        let upstream = upstream_config(settings)?;
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
            client_body: nonzero("client_body_timeout", settings.client_body_timeout)?,
            send: nonzero("send_timeout", settings.send_timeout)?,
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
        // The pool follows a reload; whether there is one is the mode the proxy runs in.
        if self.upstream.is_some() != new.upstream.is_some() {
            changed.push("upstream");
        }
        if self.limits != new.limits {
            changed.push("limits");
        }
        if self.timeouts != new.timeouts {
            // They are read when a connection starts; taking them from a reload would make
            // one connection's deadlines depend on when it came.
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

/// The upstream pool, if any backend is configured. Its other settings are checked either
/// way, so that a mistake shows before the pool is turned on.
fn upstream_config(settings: &Settings) -> Result<Option<UpstreamConfig>, ConfigError> {
    let mut backends: Vec<BackendAddress> = Vec::new();
    for raw in &settings.upstream {
        let backend = parse_upstream(raw.trim())?;
        if backends.contains(&backend) {
            return Err(ConfigError::Invalid {
                key: "upstream",
                reason: format!("{raw:?} is listed twice"),
            });
        }
        backends.push(backend);
    }
    let path: http::uri::PathAndQuery =
        settings
            .health_check_path
            .parse()
            .map_err(|_| ConfigError::Invalid {
                key: "health_check_path",
                reason: format!("{:?} is not a path", settings.health_check_path),
            })?;
    if !path.as_str().starts_with('/') {
        return Err(ConfigError::Invalid {
            key: "health_check_path",
            reason: format!("{:?} must start with /", settings.health_check_path),
        });
    }
    let health = HealthCheck {
        path,
        interval: nonzero("health_check_interval", settings.health_check_interval)?,
        timeout: nonzero("health_check_timeout", settings.health_check_timeout)?,
        healthy_threshold: at_least("healthy_threshold", settings.healthy_threshold, 1)?,
        unhealthy_threshold: at_least("unhealthy_threshold", settings.unhealthy_threshold, 1)?,
    };
    if settings.retry_budget_percent > 100 {
        return Err(ConfigError::Invalid {
            key: "retry_budget_percent",
            reason: format!("{} is above 100", settings.retry_budget_percent),
        });
    }
    let config = UpstreamConfig {
        backends,
        balance: settings.balance,
        timeout: nonzero("upstream_timeout", settings.upstream_timeout)?,
        connect_timeout: nonzero(
            "upstream_connect_timeout",
            settings.upstream_connect_timeout,
        )?,
        body_timeout: nonzero("upstream_body_timeout", settings.upstream_body_timeout)?,
        health,
        eject_after: settings.eject_after,
        retry_budget_percent: settings.retry_budget_percent,
    };
    Ok((!config.backends.is_empty()).then_some(config))
}

fn parse_upstream(raw: &str) -> Result<BackendAddress, ConfigError> {
    let invalid = |reason: &str| ConfigError::Invalid {
        key: "upstream",
        reason: format!("{raw:?}: {reason}"),
    };
    let uri: http::Uri = raw.parse().map_err(|_| invalid("not a URL"))?;
    if uri.scheme_str() != Some("http") {
        return Err(invalid("only http:// upstreams are supported"));
    }
    let authority = uri.authority().ok_or_else(|| invalid("missing host"))?;
    let port = authority
        .port_u16()
        .ok_or_else(|| invalid("missing port"))?;
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(invalid("must not have a path or query"));
    }
    if authority.as_str().contains('@') {
        return Err(invalid("must not hold credentials"));
    }
    // IPv6 literals keep their brackets in the label but not in the host to resolve.
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(invalid("missing host"));
    }
    let label = authority.as_str().to_ascii_lowercase();
    Ok(BackendAddress {
        authority: label.parse().map_err(|_| invalid("not a URL"))?,
        label,
        host: host.to_ascii_lowercase(),
        port,
    })
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
        check_invalid(
            &[],
            Some("upstream = [\"http://a:1\", \"http://A:1\"]"),
            "twice",
        );
        check_invalid(&[], Some("upstream = \"http://u:p@a:1\""), "credentials");
        check_invalid(
            &[],
            Some("health_check_path = \"healthz\""),
            "health_check_path",
        );
        check_invalid(&[], Some("healthy_threshold = 0"), "healthy_threshold");
        check_invalid(
            &[],
            Some("retry_budget_percent = 101"),
            "retry_budget_percent",
        );
        check_invalid(&[], Some("send_timeout = \"0s\""), "send_timeout");
        check_invalid(&[], Some("max_connections = 0"), "max_connections");
        check_invalid(&[], Some("max_header_bytes = 100"), "max_header_bytes");
        check_invalid(&[], Some("idle_timeout = \"0s\""), "idle_timeout");
        check_invalid(&[], Some("ebpf = \"sometimes\""), "ebpf");
        check_invalid(&[], Some("not toml"), "test.toml");
        // Found by fuzzing: port 0 would put ":0" into every redirect.
        check_invalid(&[], Some("public_https_port = 0"), "public_https_port");
    }

    #[test]
    fn upstream_is_a_pool() {
        let upstream = resolve(&["--upstream", "http://127.0.0.1:8080"], None)
            .expect("valid")
            .upstream
            .expect("set");
        let labels: Vec<&str> = upstream.backends.iter().map(|b| b.label.as_str()).collect();
        assert_eq!(labels, ["127.0.0.1:8080"]);
        assert_eq!(upstream.timeout, Duration::from_secs(10));
        assert_eq!(upstream.body_timeout, Duration::from_secs(60));
        assert_eq!(upstream.health.path.as_str(), "/");

        let file = "upstream = [\"http://a.example:80\", \"http://[::1]:81/\"]";
        let upstream = resolve(&[], Some(file))
            .expect("valid")
            .upstream
            .expect("set");
        let backends: Vec<(&str, &str, u16)> = upstream
            .backends
            .iter()
            .map(|b| (b.label.as_str(), b.host.as_str(), b.port))
            .collect();
        assert_eq!(
            backends,
            [("a.example:80", "a.example", 80), ("[::1]:81", "::1", 81)]
        );
        let flags = resolve(&["--upstream", "http://b:1,http://c:2"], Some(file))
            .expect("valid")
            .upstream
            .expect("set");
        assert_eq!(flags.backends.len(), 2, "flags replace the file's list");
        assert_eq!(flags.backends[0].label, "b:1");
    }
}
