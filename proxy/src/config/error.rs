//! Why a configuration was refused: each variant names the file, key or value at fault.

use std::path::PathBuf;

use crate::names::NameError;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The config file is not valid TOML.
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    /// The config file has a key that names no setting.
    #[error(
        "invalid config file {path}: unknown key {key:?} (keys are the flag names with `_` for `-`, see `proxy serve --help`)"
    )]
    UnknownKey { path: PathBuf, key: String },
    /// A value in the config file is not of its setting's type.
    #[error("invalid config file {path}: {key} = {value}: {reason}")]
    FileValue {
        path: PathBuf,
        key: String,
        value: String,
        reason: String,
    },
    /// The command line or a `PROXY_*` environment variable is malformed (as clap says).
    #[error("{0}")]
    Flags(String),
    /// A name for the certificate is malformed.
    #[error("invalid name {name:?}: {source}")]
    Name { name: String, source: NameError },
    /// A value is out of its allowed range or inconsistent with another.
    #[error("invalid {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}
