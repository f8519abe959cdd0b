//! Avatars in memory: loaded at start-up or at first request (concurrent requests for an
//! avatar that is loading wait for that one load), and evicted least-recently-used first
//! when a RAM budget, counted in exact bytes, would be exceeded. An avatar in use by a render
//! is never evicted.

use crate::avatar::Avatar;
use crate::encode::Subsampling;
use crate::manifest::{self, Manifest, MANIFEST_FILE};
use crate::metrics::Metrics;
use framecast_cache::{BudgetCache, CacheError, Events, Lease, State};
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// An avatar in use by a render: while it lives the avatar is never evicted.
pub type AvatarLease = Lease<Avatar, AvatarError>;

pub struct AvatarStore {
    root: PathBuf,
    load_on_demand: bool,
    subsampling: Subsampling,
    cache: BudgetCache<Avatar, AvatarError>,
    metrics: Arc<Metrics>,
}

/// What `list` reports per avatar.
#[derive(Clone)]
pub struct AvatarStatus {
    pub id: String,
    pub state: &'static str,
    pub reason: String,
    pub avatar: Option<Arc<Avatar>>,
    /// Not in memory: its manifest and frame count as the bundle on disk says.
    pub on_disk: Option<(Manifest, u32)>,
}

/// An avatar's manifest and frame count from its bundle, without loading it (a small file
/// and a directory listing); the first problem otherwise.
fn on_disk_facts(dir: &Path) -> Result<(Manifest, u32), String> {
    let manifest = Manifest::load(dir).map_err(|problems| problems.join("; "))?;
    let frames = manifest::frame_files(dir)?;
    Ok((manifest, frames.len().min(u32::MAX as usize) as u32))
}

/// Evictions and totals, to the logs and metrics.
struct CacheEvents(Arc<Metrics>);

impl Events for CacheEvents {
    fn evicted(&self, key: &str, _freed: u64, for_key: &str) {
        self.0.avatar_evictions.inc();
        tracing::info!(avatar = %key, for_avatar = for_key, "evicted (least recently used)");
    }

    fn changed(&self, reserved: u64, _ready: usize) {
        self.0.avatar_bytes.set(reserved as i64);
    }
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
        let cache = BudgetCache::new(
            budget,
            |_: &str, _: &Avatar| false,
            Arc::new(CacheEvents(metrics.clone())),
        );
        Ok(AvatarStore {
            root,
            load_on_demand,
            subsampling: Subsampling::S420,
            cache,
            metrics,
        })
    }

    /// Prepares avatars' frames for output at `subsampling` (4:2:0 unless set), so that
    /// frames rendered at that subsampling and the avatar's quality are spliced.
    pub fn with_subsampling(mut self, subsampling: Subsampling) -> Self {
        self.subsampling = subsampling;
        self
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

    /// A lease on the avatar, loading it first if on-demand loading is on.
    pub async fn get(&self, id: &str) -> Result<AvatarLease, AvatarError> {
        if let Some(lease) = self.cache.lease_ready(id) {
            self.metrics.avatar_hits.inc();
            return Ok(lease);
        }
        if self.cache.state(id).is_none() {
            self.dir(id)?;
            if !self.load_on_demand {
                return Err(AvatarError::NotLoaded(id.to_string()));
            }
        }
        self.metrics.avatar_misses.inc();
        self.resolve(id).await
    }

    /// Loads `id` now; a previous failure is retried.
    pub async fn load(&self, id: &str) -> LoadResult {
        self.dir(id)?;
        self.cache.forget_failure(id);
        Ok(self.resolve(id).await?.value().clone())
    }

    /// Drops `id` from memory; renders holding it finish first.
    pub fn unload(&self, id: &str) -> Result<(), AvatarError> {
        crate::check_name(id)
            .map_err(|_| AvatarError::InvalidName(framecast_proto::echo(id).into_owned()))?;
        if self.cache.remove(id) {
            return Ok(());
        }
        // Not in memory: NOT_FOUND if there is no such avatar at all.
        self.dir(id)?;
        Err(AvatarError::NotLoaded(id.to_string()))
    }

    /// Bytes held by loaded and loading avatars.
    pub fn bytes_in_use(&self) -> u64 {
        self.cache.reserved()
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
        Ok(ids
            .into_iter()
            .map(|id| {
                let (mut s, mut reason, avatar) = match self.cache.state(&id) {
                    None => ("available", String::new(), None),
                    Some(State::Loading) => ("loading", String::new(), None),
                    Some(State::Ready(a)) => ("ready", String::new(), Some(a)),
                    Some(State::Failed(e)) => ("failed", e.to_string(), None),
                };
                let mut on_disk = None;
                if avatar.is_none() {
                    match on_disk_facts(&self.root.join(&id)) {
                        Ok(facts) => on_disk = Some(facts),
                        // A bundle that cannot load says so before anyone asks for it.
                        Err(problem) if reason.is_empty() => {
                            (s, reason) = ("failed", problem);
                        }
                        Err(_) => {}
                    }
                }
                AvatarStatus {
                    id,
                    state: s,
                    reason,
                    avatar,
                    on_disk,
                }
            })
            .collect())
    }

    /// A lease on `id`, loaded by this call or by the one already under way.
    async fn resolve(&self, id: &str) -> Result<AvatarLease, AvatarError> {
        let dir = self.dir(id)?;
        let subsampling = self.subsampling;
        let estimate = || {
            Avatar::footprint(&dir, subsampling).map_err(|problems| AvatarError::LoadFailed {
                id: id.to_string(),
                problems,
            })
        };
        let load = |_need| async {
            let owned = id.to_string();
            let dir = dir.clone();
            let result = tokio::task::spawn_blocking(move || Avatar::load_with(&dir, subsampling))
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
                        source = ?a.source,
                        mib = a.resident_bytes() as f64 / (1 << 20) as f64,
                        load_ms = a.load_time.as_millis() as u64,
                        "avatar ready"
                    );
                    let bytes = a.resident_bytes();
                    Ok((a, bytes))
                }
                Err(problems) => {
                    tracing::warn!(avatar = %owned, ?problems, "avatar failed to load");
                    Err(AvatarError::LoadFailed {
                        id: owned,
                        problems,
                    })
                }
            }
        };
        self.cache
            .get_or_load(id, estimate, load)
            .await
            .map_err(|e| match e {
                CacheError::Load(e) => e,
                CacheError::TooLarge { need, budget, .. } => AvatarError::TooLarge {
                    id: id.to_string(),
                    need,
                    budget,
                },
                CacheError::NoRoom {
                    need, free, budget, ..
                } => AvatarError::NoRoom {
                    id: id.to_string(),
                    need,
                    free,
                    budget,
                },
                // Avatars are loaded for no tenant: these limits never apply to them.
                CacheError::TenantBytes { need, used, limit } => AvatarError::NoRoom {
                    id: id.to_string(),
                    need,
                    free: limit.saturating_sub(used),
                    budget: limit,
                },
                CacheError::TenantEntries { .. } => AvatarError::NoRoom {
                    id: id.to_string(),
                    need: 0,
                    free: 0,
                    budget: 0,
                },
            })
    }
}
