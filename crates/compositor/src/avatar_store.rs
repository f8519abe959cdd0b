//! Avatars in memory: loaded at start-up or at first request; concurrent requests for an
//! avatar that is loading wait for that one load.

use crate::avatar::Avatar;
use crate::manifest::MANIFEST_FILE;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::OnceCell;

#[derive(Debug, Clone, thiserror::Error)]
pub enum AvatarError {
    #[error("avatar_id {0:?} is invalid: only letters, digits, '.', '_' and '-' are allowed")]
    InvalidName(String),
    #[error("avatar '{0}' is not in the avatar root")]
    NotFound(String),
    #[error("avatar '{id}' failed to load: {}", problems.join("; "))]
    LoadFailed { id: String, problems: Vec<String> },
    #[error("avatar '{0}' is not loaded")]
    NotLoaded(String),
}

type Slot = Arc<OnceCell<Result<Arc<Avatar>, AvatarError>>>;

pub struct AvatarStore {
    root: PathBuf,
    load_on_demand: bool,
    slots: Mutex<HashMap<String, Slot>>,
}

/// What `list` reports per avatar.
#[derive(Clone)]
pub struct AvatarStatus {
    pub id: String,
    pub state: &'static str,
    pub reason: String,
    pub avatar: Option<Arc<Avatar>>,
}

impl AvatarStore {
    pub fn new(root: &Path, load_on_demand: bool) -> std::io::Result<Self> {
        let root = root.canonicalize()?;
        Ok(AvatarStore {
            root,
            load_on_demand,
            slots: Mutex::new(HashMap::new()),
        })
    }

    fn dir(&self, id: &str) -> Result<PathBuf, AvatarError> {
        crate::check_name(id).map_err(|_| AvatarError::InvalidName(id.to_string()))?;
        let dir = self.root.join(id);
        if dir.join(MANIFEST_FILE).is_file() {
            Ok(dir)
        } else {
            Err(AvatarError::NotFound(id.to_string()))
        }
    }

    /// The avatar, loading it first if on-demand loading is on.
    pub async fn get(&self, id: &str) -> Result<Arc<Avatar>, AvatarError> {
        let dir = self.dir(id)?;
        let slot = {
            let mut slots = self.slots.lock();
            match slots.get(id) {
                Some(s) => s.clone(),
                None if self.load_on_demand => slots.entry(id.to_string()).or_default().clone(),
                None => return Err(AvatarError::NotLoaded(id.to_string())),
            }
        };
        resolve(id, dir, &slot).await
    }

    /// Loads `id` now; a previous failure is retried.
    pub async fn load(&self, id: &str) -> Result<Arc<Avatar>, AvatarError> {
        let dir = self.dir(id)?;
        let slot = {
            let mut slots = self.slots.lock();
            if slots
                .get(id)
                .and_then(|s| s.get())
                .is_some_and(|r| r.is_err())
            {
                slots.remove(id);
            }
            slots.entry(id.to_string()).or_default().clone()
        };
        resolve(id, dir, &slot).await
    }

    /// Drops `id` from memory; renders holding it finish first.
    pub fn unload(&self, id: &str) -> Result<(), AvatarError> {
        crate::check_name(id).map_err(|_| AvatarError::InvalidName(id.to_string()))?;
        self.slots
            .lock()
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| AvatarError::NotLoaded(id.to_string()))
    }

    /// Every avatar on disk or in memory with its state.
    pub fn list(&self) -> std::io::Result<Vec<AvatarStatus>> {
        let mut ids: Vec<String> = std::fs::read_dir(&self.root)?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join(MANIFEST_FILE).is_file())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|id| crate::check_name(id).is_ok())
            .collect();
        ids.sort();
        let slots = self.slots.lock();
        Ok(ids
            .into_iter()
            .map(|id| {
                let (state, reason, avatar) = match slots.get(&id).map(|s| s.get()) {
                    None => ("available", String::new(), None),
                    Some(None) => ("loading", String::new(), None),
                    Some(Some(Ok(a))) => ("ready", String::new(), Some(a.clone())),
                    Some(Some(Err(e))) => ("failed", e.to_string(), None),
                };
                AvatarStatus {
                    id,
                    state,
                    reason,
                    avatar,
                }
            })
            .collect())
    }
}

async fn resolve(id: &str, dir: PathBuf, slot: &Slot) -> Result<Arc<Avatar>, AvatarError> {
    slot.get_or_init(|| async move {
        let owned = id.to_string();
        let result = tokio::task::spawn_blocking(move || Avatar::load(&dir))
            .await
            .unwrap_or_else(|e| Err(vec![format!("loader panicked: {e}")]));
        match result {
            Ok(a) => {
                tracing::info!(
                    avatar = %owned,
                    frames = a.frames.len(),
                    mib = a.resident_bytes() as f64 / (1 << 20) as f64,
                    load_ms = a.load_time.as_millis() as u64,
                    "avatar ready"
                );
                Ok(Arc::new(a))
            }
            Err(problems) => {
                tracing::warn!(avatar = %owned, ?problems, "avatar failed to load");
                Err(AvatarError::LoadFailed {
                    id: owned,
                    problems,
                })
            }
        }
    })
    .await
    .clone()
}
