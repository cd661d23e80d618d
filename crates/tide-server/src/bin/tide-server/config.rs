//! The configuration file: every setting's flag name is its key (`listen`,
//! `tombstone-horizon-seqs`, ...). A flag on the command line wins over its
//! environment variable, which wins over the file, which wins over the
//! default. `tide-server config check` prints the effective settings and
//! where each came from, secrets masked.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Command};

/// The environment variable naming the configuration file.
pub(crate) const CONFIG_ENV: &str = "TIDE_SERVER_CONFIG";

/// Settings whose values are never printed.
const SECRETS: [&str; 3] = ["jwt-secret", "tokens", "database-url"];

/// Flags that are actions, not settings: no key in the file.
const ACTIONS: [&str; 2] = ["config", "collect"];

/// The process's arguments with the configuration file's settings put
/// first (as flags), so that flags given after them win; a setting whose
/// environment variable is set is left out, so the variable wins. Also the
/// keys taken from the file.
pub(crate) fn argv(command: &Command) -> Result<(Vec<OsString>, Vec<String>), String> {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    let Some(path) = config_path(&args) else { return Ok((args, Vec::new())) };
    let text = std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut settings = Vec::new();
    let mut keys = Vec::new();
    for (key, value) in table {
        let Some(arg) = command.get_arguments().find(|a| a.get_long() == Some(key.as_str())) else {
            return Err(format!("{}: unknown setting {key:?}; {}", path.display(), known(command)));
        };
        if ACTIONS.contains(&key.as_str()) {
            return Err(format!("{}: {key:?} is an action, not a setting", path.display()));
        }
        let given = args.iter().skip(1).any(|a| {
            let a = a.to_string_lossy();
            a == format!("--{key}") || a.starts_with(&format!("--{key}="))
        });
        if given || arg.get_env().is_some_and(|var| std::env::var_os(var).is_some()) {
            continue;
        }
        keys.push(key.clone());
        let text = match (&value, arg.get_action()) {
            (toml::Value::Boolean(true), ArgAction::SetTrue) => {
                settings.push(OsString::from(format!("--{key}")));
                continue;
            }
            (toml::Value::Boolean(false), ArgAction::SetTrue) => continue,
            (toml::Value::String(s), _) => s.clone(),
            (toml::Value::Integer(i), _) => i.to_string(),
            (toml::Value::Float(f), _) => f.to_string(),
            (other, _) => {
                return Err(format!("{}: {key} = {other:?}: expected a string, a number or true", path.display()));
            }
        };
        settings.push(OsString::from(format!("--{key}={text}")));
    }
    args.splice(1..1, settings);
    Ok((args, keys))
}

/// The file named by `--config` (or its environment variable).
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let a = a.to_string_lossy();
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(path) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(path));
        }
    }
    std::env::var_os(CONFIG_ENV).map(PathBuf::from)
}

fn known(command: &Command) -> String {
    let keys: Vec<&str> =
        command.get_arguments().filter_map(|a| a.get_long()).filter(|k| !ACTIONS.contains(k)).collect();
    format!("the settings are: {}", keys.join(", "))
}

/// Every setting's effective value and where it came from, secrets masked:
/// `(key, value, source)`.
pub(crate) fn effective(
    command: &Command,
    matches: &ArgMatches,
    from_file: &[String],
) -> Vec<(String, String, &'static str)> {
    let mut out = Vec::new();
    for arg in command.get_arguments() {
        let (Some(key), id) = (arg.get_long(), arg.get_id().as_str()) else { continue };
        if ACTIONS.contains(&key) || key == "help" || key == "version" {
            continue;
        }
        let source = match matches.value_source(id) {
            Some(ValueSource::CommandLine) if from_file.iter().any(|k| k == key) => "file",
            Some(ValueSource::CommandLine) => "flag",
            Some(ValueSource::EnvVariable) => "environment",
            Some(ValueSource::DefaultValue) => "default",
            _ => "unset",
        };
        let value = matches
            .get_raw(id)
            .map(|vs| vs.map(|v| v.to_string_lossy().into_owned()).collect::<Vec<_>>().join(","))
            .unwrap_or_default();
        let value = if SECRETS.contains(&key) && !value.is_empty() { mask(key, &value) } else { value };
        out.push((key.to_owned(), value, source));
    }
    out
}

/// A secret as it may be shown: a database URL keeps all but its password.
fn mask(key: &str, value: &str) -> String {
    if key == "database-url"
        && let Some((scheme, rest)) = value.split_once("://")
        && let Some((userinfo, host)) = rest.split_once('@')
    {
        let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
        return format!("{scheme}://{user}:***@{host}");
    }
    if key == "database-url" {
        return value.to_owned();
    }
    "***".into()
}
