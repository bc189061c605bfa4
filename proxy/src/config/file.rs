//! The optional TOML config file. Its keys are the settings' names; its values become the
//! defaults of the matching flags, so that flags and environment variables still win and
//! every value goes through the same parser as on the command line. A key that names no
//! setting, or a value no setting's parser takes, is refused naming the file and the key.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::error::{ContextKind, ContextValue};
use clap::{Args as _, Command, FromArgMatches as _};

use super::error::ConfigError;
use super::settings::Settings;

/// The settings a config file holds, as the command-line values they stand for.
#[derive(Debug, Clone)]
pub(crate) struct ConfigFile {
    path: PathBuf,
    /// (key, values): one value, or several for a list.
    values: Vec<(String, Vec<String>)>,
}

impl ConfigFile {
    /// Reads and parses the file at `path`.
    pub(crate) fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses `text`; `path` names it in errors.
    pub(crate) fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let table: toml::Table = text.parse().map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        let values = table
            .into_iter()
            .map(|(key, value)| match flag_values(&value) {
                Some(values) if !values.is_empty() => Ok((key, values)),
                shape => Err(ConfigError::FileValue {
                    path: path.to_owned(),
                    key,
                    value: value.to_string(),
                    reason: match shape {
                        Some(_) => "an empty list (leave the key out for the default)".into(),
                        None => "expected a string, a number or a list of them".into(),
                    },
                }),
            })
            .collect::<Result<_, _>>()?;
        Ok(ConfigFile {
            path: path.to_owned(),
            values,
        })
    }

    /// Whether the file sets `key`.
    pub(crate) fn sets(&self, key: &str) -> bool {
        self.values.iter().any(|(k, _)| k == key)
    }

    /// The file's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Fails on a key that names none of `command`'s settings (`config` itself included: a
    /// file cannot name another file).
    pub(crate) fn check_keys(&self, command: &Command) -> Result<(), ConfigError> {
        match self.values.iter().find(|(key, _)| {
            key == "config"
                || !command
                    .get_arguments()
                    .any(|arg| arg.get_id() == key.as_str())
        }) {
            Some((key, _)) => Err(ConfigError::UnknownKey {
                path: self.path.clone(),
                key: key.clone(),
            }),
            None => Ok(()),
        }
    }

    /// `command` with the file's values as the defaults of its arguments; keys that name
    /// none of them are left out ([`ConfigFile::check_keys`] refuses them).
    pub(crate) fn with_defaults(&self, mut command: Command) -> Command {
        for (key, values) in &self.values {
            if command
                .get_arguments()
                .any(|arg| arg.get_id() == key.as_str())
            {
                let values = values.clone();
                command = command.mut_arg(key.as_str(), |arg| arg.default_values(values));
            }
        }
        command
    }

    /// Explains why the settings of `command`, with the file's values as their defaults
    /// ([`ConfigFile::with_defaults`]), refused their arguments. Flags and environment were
    /// parsed once without the file, so a value that fails now is the file's.
    pub(crate) fn value_error(&self, command: &Command, error: &clap::Error) -> ConfigError {
        let context = |kind| match error.get(kind) {
            Some(ContextValue::String(text)) => Some(text.clone()),
            _ => None,
        };
        // clap names the argument as in usage ("--https-listen <HTTPS_LISTEN>").
        let key = context(ContextKind::InvalidArg).and_then(|shown| {
            let long = shown
                .strip_prefix("--")?
                .split([' ', '='])
                .next()?
                .to_owned();
            command
                .get_arguments()
                .find(|arg| arg.get_long() == Some(long.as_str()))
                .map(|arg| arg.get_id().to_string())
        });
        let reason = match (
            std::error::Error::source(error),
            error.get(ContextKind::ValidValue),
        ) {
            (Some(source), _) => source.to_string(),
            (None, Some(ContextValue::Strings(valid))) => {
                format!("expected one of {}", valid.join(", "))
            }
            _ => error.kind().to_string(),
        };
        match key {
            Some(key) => ConfigError::FileValue {
                path: self.path.clone(),
                value: format!(
                    "{:?}",
                    context(ContextKind::InvalidValue).unwrap_or_default()
                ),
                key,
                reason,
            },
            None => ConfigError::Flags(error.to_string()),
        }
    }
}

/// Parses `argv` (the program name first) as the flags of `serve`, with `file`'s values as
/// their defaults.
pub(crate) fn settings_with_file<I, T>(
    argv: I,
    file: Option<&ConfigFile>,
) -> Result<Settings, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut command = Settings::augment_args(Command::new("proxy"));
    if let Some(file) = file {
        file.check_keys(&command)?;
        command = file.with_defaults(command);
    }
    let matches = command
        .clone()
        .try_get_matches_from(argv)
        .map_err(|e| match file {
            Some(file) => file.value_error(&command, &e),
            None => ConfigError::Flags(e.to_string()),
        })?;
    Settings::from_arg_matches(&matches).map_err(|e| ConfigError::Flags(e.to_string()))
}

/// A TOML value as command-line values: strings as they are, integers in decimal, a list
/// item by item. Other shapes (booleans, tables, nested lists) fit no setting.
fn flag_values(value: &toml::Value) -> Option<Vec<String>> {
    let scalar = |value: &toml::Value| match value {
        toml::Value::String(text) => Some(text.clone()),
        toml::Value::Integer(number) => Some(number.to_string()),
        _ => None,
    };
    match value {
        toml::Value::Array(items) => items.iter().map(scalar).collect(),
        other => scalar(other).map(|value| vec![value]),
    }
}
