//! Avatars in memory: loaded at start-up or at first request (concurrent requests for an
//! avatar that is loading wait for that one load), and evicted least-recently-used first
//! when a RAM budget, counted in exact bytes, would be exceeded. An avatar in use by a render
//! is never evicted.

use crate::avatar::Avatar;
use crate::manifest::{self, Manifest, MANIFEST_FILE};
use crate::metrics::Metrics;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
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
    #[error("avatar '{id}' needs {need} bytes but the avatar RAM budget is {budget} bytes")]
    TooLarge { id: String, need: u64, budget: u64 },
    #[error("avatar '{id}' needs {need} bytes; {free} of the {budget}-byte budget are free and every other avatar is in use")]
    NoRoom {
        id: String,
        need: u64,
        free: u64,
        budget: u64,
    },
}

type LoadResult = Result<Arc<Avatar>, AvatarError>;

#[derive(Default)]
struct Slot {
    cell: OnceCell<LoadResult>,
    last_used: AtomicU64,
}

struct State {
    slots: HashMap<String, Arc<Slot>>,
    reserved: HashMap<String, u64>,
}

pub struct AvatarStore {
    root: PathBuf,
    load_on_demand: bool,
    budget: Option<u64>,
    state: Mutex<State>,
    clock: AtomicU64,
    metrics: Arc<Metrics>,
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
    /// `budget`: bytes of RAM for decoded avatars; `None` is unlimited.
    pub fn new(
        root: &Path,
        load_on_demand: bool,
        budget: Option<u64>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let root = root.canonicalize()?;
        metrics.avatar_budget_bytes.set(budget.unwrap_or(0) as i64);
        Ok(AvatarStore {
            root,
            load_on_demand,
            budget,
            state: Mutex::new(State {
                slots: HashMap::new(),
                reserved: HashMap::new(),
            }),
            clock: AtomicU64::new(1),
            metrics,
        })
    }

    fn dir(&self, id: &str) -> Result<PathBuf, AvatarError> {
        crate::check_name(id)
            .map_err(|_| AvatarError::InvalidName(framecast_proto::echo(id).into_owned()))?;
        let dir = self.root.join(id);
        if dir.join(MANIFEST_FILE).is_file() {
            Ok(dir)
        } else {
            Err(AvatarError::NotFound(id.to_string()))
        }
    }

    fn touch(&self, slot: &Slot) {
        slot.last_used.store(
            self.clock.fetch_add(1, Ordering::Relaxed),
            Ordering::Relaxed,
        );
    }

    /// The avatar, loading it first if on-demand loading is on.
    pub async fn get(&self, id: &str) -> LoadResult {
        let known = self.state.lock().slots.get(id).cloned();
        let slot = match known {
            Some(s) => {
                if let Some(Ok(a)) = s.cell.get() {
                    self.touch(&s);
                    self.metrics.avatar_hits.inc();
                    return Ok(a.clone());
                }
                s
            }
            None => {
                self.dir(id)?;
                if !self.load_on_demand {
                    return Err(AvatarError::NotLoaded(id.to_string()));
                }
                self.state
                    .lock()
                    .slots
                    .entry(id.to_string())
                    .or_default()
                    .clone()
            }
        };
        self.metrics.avatar_misses.inc();
        self.resolve(id, &slot).await
    }

    /// Loads `id` now; a previous failure is retried.
    pub async fn load(&self, id: &str) -> LoadResult {
        self.dir(id)?;
        let slot = {
            let mut state = self.state.lock();
            if state
                .slots
                .get(id)
                .and_then(|s| s.cell.get())
                .is_some_and(|r| r.is_err())
            {
                state.slots.remove(id);
            }
            state.slots.entry(id.to_string()).or_default().clone()
        };
        self.resolve(id, &slot).await
    }

    /// Drops `id` from memory; renders holding it finish first.
    pub fn unload(&self, id: &str) -> Result<(), AvatarError> {
        crate::check_name(id)
            .map_err(|_| AvatarError::InvalidName(framecast_proto::echo(id).into_owned()))?;
        let mut state = self.state.lock();
        state
            .slots
            .remove(id)
            .ok_or_else(|| AvatarError::NotLoaded(id.to_string()))?;
        state.reserved.remove(id);
        self.publish(&state);
        Ok(())
    }

    /// Bytes held by loaded and loading avatars.
    pub fn bytes_in_use(&self) -> u64 {
        self.state.lock().reserved.values().sum()
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
        let state = self.state.lock();
        Ok(ids
            .into_iter()
            .map(|id| {
                let (s, reason, avatar) = match state.slots.get(&id).map(|s| s.cell.get()) {
                    None => ("available", String::new(), None),
                    Some(None) => ("loading", String::new(), None),
                    Some(Some(Ok(a))) => ("ready", String::new(), Some(a.clone())),
                    Some(Some(Err(e))) => ("failed", e.to_string(), None),
                };
                AvatarStatus {
                    id,
                    state: s,
                    reason,
                    avatar,
                }
            })
            .collect())
    }

    fn publish(&self, state: &State) {
        self.metrics
            .avatar_bytes
            .set(state.reserved.values().sum::<u64>() as i64);
    }

    /// Reserves `need` bytes, evicting idle avatars least recently used first.
    fn reserve(&self, id: &str, need: u64) -> Result<(), AvatarError> {
        let mut state = self.state.lock();
        if let Some(budget) = self.budget {
            if need > budget {
                return Err(AvatarError::TooLarge {
                    id: id.to_string(),
                    need,
                    budget,
                });
            }
            loop {
                let used: u64 = state.reserved.values().sum();
                if used + need <= budget {
                    break;
                }
                // In use = some render holds a reference besides the store's own.
                let victim = state
                    .slots
                    .iter()
                    .filter(|(n, _)| n.as_str() != id)
                    .filter_map(|(n, s)| match s.cell.get() {
                        Some(Ok(a)) if Arc::strong_count(a) == 1 => {
                            Some((s.last_used.load(Ordering::Relaxed), n.clone()))
                        }
                        _ => None,
                    })
                    .min();
                let Some((_, victim)) = victim else {
                    return Err(AvatarError::NoRoom {
                        id: id.to_string(),
                        need,
                        free: budget.saturating_sub(used),
                        budget,
                    });
                };
                state.slots.remove(&victim);
                state.reserved.remove(&victim);
                self.metrics.avatar_evictions.inc();
                tracing::info!(avatar = %victim, for_avatar = id, "evicted (least recently used)");
            }
        }
        state.reserved.insert(id.to_string(), need);
        self.publish(&state);
        Ok(())
    }

    async fn resolve(&self, id: &str, slot: &Arc<Slot>) -> LoadResult {
        self.touch(slot);
        let result = slot
            .cell
            .get_or_init(|| async {
                let dir = self.dir(id)?;
                let need = footprint(&dir).map_err(|problems| AvatarError::LoadFailed {
                    id: id.to_string(),
                    problems,
                })?;
                self.reserve(id, need)?;
                let owned = id.to_string();
                let result = tokio::task::spawn_blocking(move || Avatar::load(&dir))
                    .await
                    .unwrap_or_else(|e| Err(vec![format!("loader panicked: {e}")]));
                match result {
                    Ok(a) => {
                        self.metrics
                            .avatar_load_seconds
                            .observe(a.load_time.as_secs_f64());
                        tracing::info!(
                            avatar = %owned,
                            frames = a.frames.len(),
                            mib = a.resident_bytes() as f64 / (1 << 20) as f64,
                            load_ms = a.load_time.as_millis() as u64,
                            "avatar ready"
                        );
                        let mut state = self.state.lock();
                        state.reserved.insert(owned, a.resident_bytes());
                        self.publish(&state);
                        Ok(Arc::new(a))
                    }
                    Err(problems) => {
                        tracing::warn!(avatar = %owned, ?problems, "avatar failed to load");
                        let mut state = self.state.lock();
                        state.reserved.remove(&owned);
                        self.publish(&state);
                        Err(AvatarError::LoadFailed {
                            id: owned,
                            problems,
                        })
                    }
                }
            })
            .await
            .clone();
        if matches!(
            result,
            Err(AvatarError::NoRoom { .. } | AvatarError::TooLarge { .. })
        ) {
            // Lack of room is transient: forget the attempt so a later request tries again.
            let mut state = self.state.lock();
            if state.slots.get(id).is_some_and(|s| Arc::ptr_eq(s, slot)) {
                state.slots.remove(id);
            }
        }
        result
    }
}

/// Exact bytes an avatar will hold once decoded, from its manifest and frame count alone.
pub fn footprint(dir: &Path) -> Result<u64, Vec<String>> {
    let m = Manifest::load(dir)?;
    let frames = manifest::frame_files(dir).map_err(|e| vec![e])?.len() as u64;
    let boxes = manifest::load_boxes(dir).map_err(|e| vec![e])?;
    let mut sizes: Vec<(u32, u32)> = boxes.iter().map(|b| (b.w, b.h)).collect();
    sizes.sort_unstable();
    sizes.dedup();
    // Per distinct box size: alpha, and alpha repeated per colour channel.
    let box_masks: u64 = sizes.iter().map(|&(w, h)| w as u64 * h as u64 * 4).sum();
    let s = m.crop_size as u64;
    let frame = m.width as u64 * m.height as u64 * 3;
    let box_size = std::mem::size_of::<manifest::FaceBox>() as u64;
    Ok(frames * (frame + 6 * s * s + box_size) + s * s + box_masks)
}
