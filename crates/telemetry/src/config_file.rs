//! Settings from a TOML file, under the same names as the flags.
//!
//! Every setting of a service is a flag, an environment variable and a key of the file given
//! with `--config` (or `FRAMECAST_CONFIG`): the key is the long flag name, with `-` or `_`.
//! Precedence: flag, then environment, then file, then default. The file's values are passed
//! through the flags' environment variables, so each is parsed and checked by the same code as
//! a flag, and a bad value fails at start-up naming the flag.

use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};

/// Environment variable naming the configuration file.
pub const CONFIG_ENV: &str = "FRAMECAST_CONFIG";

/// Applies the file named by `--config` (or `FRAMECAST_CONFIG`), if any, to the flags of
/// subcommand `sub` of the command line `C`. Call first thing in `main`, then parse.
pub fn apply_for<C: clap::CommandFactory>(sub: &str) -> Result<()> {
    let Some(path) = path_from_args() else {
        return Ok(());
    };
    match C::command().find_subcommand(sub) {
        Some(cmd) => apply(cmd, &path),
        None => Ok(()),
    }
}

/// [`apply_for`] for a command line without subcommands (the gateway's).
pub fn apply_for_root<C: clap::CommandFactory>() -> Result<()> {
    match path_from_args() {
        Some(path) => apply(&C::command(), &path),
        None => Ok(()),
    }
}

/// The `--config` path on the command line (or `FRAMECAST_CONFIG`), if any.
fn path_from_args() -> Option<PathBuf> {
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        let a = a.to_string_lossy().into_owned();
        if a == "--config" {
            return args.next().map(PathBuf::from);
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
    }
    std::env::var_os(CONFIG_ENV).map(PathBuf::from)
}

/// Sets the environment variable of each flag of `cmd` that `path` gives a value to, unless
/// the environment already sets it. Call before any thread starts, then parse the command line.
pub fn apply(cmd: &clap::Command, path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("config: cannot read {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("config: {} is not valid TOML", path.display()))?;
    for (key, value) in table {
        let id = key.replace('-', "_");
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_id().as_str() == id && a.get_long().is_some())
            .ok_or_else(|| {
                let keys: Vec<_> = cmd.get_arguments().filter_map(|a| a.get_long()).collect();
                anyhow!(
                    "config: {}: unknown key '{key}' (keys are the flag names: {})",
                    path.display(),
                    keys.join(", ")
                )
            })?;
        let Some(env) = arg.get_env() else {
            bail!(
                "config: {}: '{key}' cannot be set from a file",
                path.display()
            );
        };
        if std::env::var_os(env).is_some() {
            continue;
        }
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Array(items) => items
                .into_iter()
                .map(|v| match v {
                    toml::Value::String(s) => Ok(s),
                    toml::Value::Integer(i) => Ok(i.to_string()),
                    other => Err(anyhow!(
                        "config: {}: '{key}': list items must be strings or integers, not {other}",
                        path.display()
                    )),
                })
                .collect::<Result<Vec<_>>>()?
                .join(","),
            other => bail!(
                "config: {}: '{key}' must be a string, number, boolean or list, not {other}",
                path.display()
            ),
        };
        std::env::set_var(env, text);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, Command};

    fn cmd() -> Command {
        Command::new("serve")
            .arg(
                Arg::new("max_queue")
                    .long("max-queue")
                    .env("FC_TEST_MAX_QUEUE"),
            )
            .arg(Arg::new("load").long("load").env("FC_TEST_LOAD"))
            .arg(Arg::new("slow").long("slow").env("FC_TEST_SLOW"))
    }

    #[test]
    fn file_values_reach_the_flags_and_the_environment_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "max-queue = 7\nload = [\"a\", \"b\"]\nslow = 5\n").unwrap();
        std::env::set_var("FC_TEST_SLOW", "9");
        apply(&cmd(), &path).unwrap();
        let m = cmd().try_get_matches_from(["serve"]).unwrap();
        assert_eq!(m.get_one::<String>("max_queue").unwrap(), "7");
        assert_eq!(m.get_one::<String>("load").unwrap(), "a,b");
        assert_eq!(
            m.get_one::<String>("slow").unwrap(),
            "9",
            "environment beats file"
        );
        let m = cmd()
            .try_get_matches_from(["serve", "--max-queue", "3"])
            .unwrap();
        assert_eq!(
            m.get_one::<String>("max_queue").unwrap(),
            "3",
            "flag beats file"
        );
    }

    #[test]
    fn unknown_keys_and_bad_toml_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "max-qeue = 7\n").unwrap();
        let e = apply(&cmd(), &path).unwrap_err().to_string();
        assert!(
            e.contains("unknown key 'max-qeue'") && e.contains("max-queue"),
            "{e}"
        );
        std::fs::write(&path, "max-queue = \n").unwrap();
        let e = format!("{:#}", apply(&cmd(), &path).unwrap_err());
        assert!(e.contains("not valid TOML"), "{e}");
    }
}
