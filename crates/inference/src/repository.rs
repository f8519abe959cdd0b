//! The model repository: one directory per model under a root, indexed lazily (a repository
//! may hold thousands of models; nothing is read until a model is named).

use crate::config::CONFIG_FILE;
use std::path::{Path, PathBuf};

/// Why a model name does not resolve to a directory.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RepoError {
    #[error("model name {name:?} is invalid: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("model '{0}' is not in the repository")]
    NotFound(String),
}

/// A directory of model directories.
#[derive(Debug, Clone)]
pub struct Repository {
    root: PathBuf,
}

impl Repository {
    pub fn open(root: &Path) -> std::io::Result<Self> {
        let root = root.canonicalize()?;
        if !root.is_dir() {
            return Err(std::io::Error::other(format!(
                "{} is not a directory",
                root.display()
            )));
        }
        Ok(Repository { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of model `name`. Names are single path components of
    /// `[A-Za-z0-9._-]`, so a request can never reach outside the repository root.
    pub fn model_dir(&self, name: &str) -> Result<PathBuf, RepoError> {
        check_name(name)?;
        let dir = self.root.join(name);
        if dir.join(CONFIG_FILE).is_file() {
            Ok(dir)
        } else {
            Err(RepoError::NotFound(name.to_string()))
        }
    }

    /// Names of every directory holding a config, sorted.
    pub fn list(&self) -> std::io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.root)? {
            let entry = entry?;
            if let Some(name) = entry.file_name().to_str() {
                if check_name(name).is_ok() && entry.path().join(CONFIG_FILE).is_file() {
                    names.push(name.to_string());
                }
            }
        }
        names.sort();
        Ok(names)
    }
}

/// Accepts only names that are one safe path component.
pub fn check_name(name: &str) -> Result<(), RepoError> {
    let bad = |reason| {
        Err(RepoError::InvalidName {
            name: framecast_proto::echo(name).into_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > 255 {
        return bad("longer than 255 bytes");
    }
    if name == "." || name == ".." || name.starts_with('.') {
        return bad("must not start with '.'");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad("only letters, digits, '.', '_' and '-' are allowed (no path separators)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_escape_the_root() {
        for bad in [
            "", "..", ".", "../etc", "a/b", "a\\b", ".hidden", "a b", "x\0",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["lipsync-ref", "m_1.v2", "A"] {
            assert!(check_name(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn lists_only_model_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("a")).unwrap();
        std::fs::write(tmp.path().join("a").join(CONFIG_FILE), "").unwrap();
        std::fs::create_dir(tmp.path().join("empty")).unwrap();
        let repo = Repository::open(tmp.path()).unwrap();
        assert_eq!(repo.list().unwrap(), vec!["a".to_string()]);
        assert!(repo.model_dir("a").is_ok());
        assert_eq!(
            repo.model_dir("empty"),
            Err(RepoError::NotFound("empty".into()))
        );
    }
}
