//! Model lifecycle: load on request or on demand (concurrent callers wait for one load),
//! warm-up before ready, unload when asked. Each loaded model owns its worker threads.

use crate::batcher::{self, Job, JobOutput};
use crate::config::ModelConfig;
use crate::repository::{RepoError, Repository};
use crate::stats::ModelStats;
use crate::torch_model::TorchModel;
use bytes::Bytes;
use crossbeam_channel::Sender;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::Device;
use tokio::sync::{oneshot, OnceCell};

/// Why a model cannot serve.
#[derive(Debug, thiserror::Error, Clone)]
pub enum ModelError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("model '{name}' failed to load: {reason}")]
    LoadFailed { name: String, reason: String },
    #[error("model '{0}' is not loaded")]
    NotLoaded(String),
}

/// A model with its workers running, warm and ready.
pub struct LoadedModel {
    pub name: String,
    pub config: Arc<ModelConfig>,
    pub stats: Arc<ModelStats>,
    pub load_time: Duration,
    pub warmup_time: Duration,
    queue: Sender<Job>,
}

impl LoadedModel {
    /// Queues one validated request and waits for its share of a batch.
    pub async fn infer(&self, batch: usize, inputs: Vec<Bytes>) -> Result<JobOutput, String> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            batch,
            inputs,
            enqueued: Instant::now(),
            reply,
        };
        self.queue
            .send(job)
            .map_err(|_| "model workers have stopped".to_string())?;
        rx.await
            .map_err(|_| "model worker dropped the request".to_string())?
    }
}

type LoadResult = Result<Arc<LoadedModel>, ModelError>;

#[derive(Default)]
struct Slot {
    cell: OnceCell<LoadResult>,
}

/// Where and how models run.
#[derive(Debug, Clone)]
pub struct ExecOptions {
    pub devices: Vec<Device>,
    pub instances: usize,
}

/// All models this server knows of, loaded or not.
pub struct ModelManager {
    repo: Repository,
    exec: ExecOptions,
    load_on_demand: bool,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

impl ModelManager {
    pub fn new(repo: Repository, exec: ExecOptions, load_on_demand: bool) -> Self {
        ModelManager {
            repo,
            exec,
            load_on_demand,
            slots: Mutex::new(HashMap::new()),
        }
    }

    pub fn repository(&self) -> &Repository {
        &self.repo
    }

    /// The model, ready; loads it first if on-demand loading is on.
    pub async fn get(&self, name: &str) -> LoadResult {
        // Known models skip the filesystem: the hot path is one map lookup.
        let known = self.slots.lock().get(name).cloned();
        let slot = match known {
            Some(s) => s,
            None => {
                self.repo.model_dir(name)?;
                if !self.load_on_demand {
                    return Err(ModelError::NotLoaded(name.to_string()));
                }
                self.slots
                    .lock()
                    .entry(name.to_string())
                    .or_default()
                    .clone()
            }
        };
        self.resolve(name, &slot).await
    }

    /// Loads `name` now (or returns it if loaded); a previous failure is retried.
    pub async fn load(&self, name: &str) -> LoadResult {
        self.repo.model_dir(name)?;
        let slot = {
            let mut slots = self.slots.lock();
            let failed = slots
                .get(name)
                .and_then(|s| s.cell.get())
                .is_some_and(|r| r.is_err());
            if failed {
                slots.remove(name);
            }
            slots.entry(name.to_string()).or_default().clone()
        };
        self.resolve(name, &slot).await
    }

    /// Forgets `name`; its workers stop once requests already queued are answered.
    pub fn unload(&self, name: &str) -> Result<(), ModelError> {
        crate::repository::check_name(name)?;
        match self.slots.lock().remove(name) {
            Some(_) => Ok(()),
            None => Err(ModelError::NotLoaded(name.to_string())),
        }
    }

    /// The model if it is loaded and ready, without loading it.
    pub fn ready(&self, name: &str) -> Option<Arc<LoadedModel>> {
        let slots = self.slots.lock();
        match slots.get(name)?.cell.get()? {
            Ok(m) => Some(m.clone()),
            Err(_) => None,
        }
    }

    /// State of a model known to the manager: "READY", "LOADING", "UNAVAILABLE" with reason.
    pub fn state(&self, name: &str) -> Option<(&'static str, String)> {
        let slots = self.slots.lock();
        let slot = slots.get(name)?;
        Some(match slot.cell.get() {
            None => ("LOADING", String::new()),
            Some(Ok(_)) => ("READY", String::new()),
            Some(Err(e)) => ("UNAVAILABLE", e.to_string()),
        })
    }

    /// Every ready model.
    pub fn loaded(&self) -> Vec<Arc<LoadedModel>> {
        let slots = self.slots.lock();
        let mut v: Vec<_> = slots
            .values()
            .filter_map(|s| s.cell.get().and_then(|r| r.as_ref().ok()).cloned())
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    async fn resolve(&self, name: &str, slot: &Slot) -> LoadResult {
        slot.cell
            .get_or_init(|| async {
                let dir = self.repo.model_dir(name)?;
                let exec = self.exec.clone();
                let owned = name.to_string();
                let result =
                    tokio::task::spawn_blocking(move || load_blocking(&owned, &dir, &exec))
                        .await
                        .unwrap_or_else(|e| Err(format!("loader panicked: {e}")));
                match result {
                    Ok(m) => {
                        tracing::info!(
                            model = name,
                            load_ms = m.load_time.as_millis() as u64,
                            warmup_ms = m.warmup_time.as_millis() as u64,
                            "model ready"
                        );
                        Ok(Arc::new(m))
                    }
                    Err(reason) => {
                        tracing::warn!(model = name, %reason, "model failed to load");
                        Err(ModelError::LoadFailed {
                            name: name.to_string(),
                            reason,
                        })
                    }
                }
            })
            .await
            .clone()
    }
}

/// Loads one model: config, then one worker thread per device and instance, each loading its
/// own module and warming up at max batch before it reports ready.
fn load_blocking(
    name: &str,
    dir: &std::path::Path,
    exec: &ExecOptions,
) -> Result<LoadedModel, String> {
    let started = Instant::now();
    let config = Arc::new(ModelConfig::load(dir).map_err(|e| e.to_string())?);
    let stats = Arc::new(ModelStats::default());
    let (tx, rx) = batcher::queue();
    let mut ready = Vec::new();
    for &device in &exec.devices {
        for instance in 0..exec.instances.max(1) {
            let (rtx, rrx) = std::sync::mpsc::channel::<Result<(Duration, Duration), String>>();
            let (config, stats, rx, dir) =
                (config.clone(), stats.clone(), rx.clone(), dir.to_path_buf());
            std::thread::Builder::new()
                .name(format!("{name}-{device:?}-{instance}"))
                .spawn(move || {
                    let _no_grad = tch::no_grad_guard();
                    let t0 = Instant::now();
                    let model = match TorchModel::load(&dir, (*config).clone(), device) {
                        Ok(m) => m,
                        Err(e) => {
                            let _ = rtx.send(Err(e));
                            return;
                        }
                    };
                    let loaded = t0.elapsed();
                    let t1 = Instant::now();
                    if let Err(e) = model.warm_up(config.max_batch_size) {
                        let _ = rtx.send(Err(format!(
                            "warm-up at batch {} failed; does config.toml match model.pt? {e}",
                            config.max_batch_size
                        )));
                        return;
                    }
                    let _ = rtx.send(Ok((loaded, t1.elapsed())));
                    batcher::run_worker(model, config, stats, rx);
                })
                .map_err(|e| format!("cannot start worker thread: {e}"))?;
            ready.push(rrx);
        }
    }
    drop(rx);
    let mut warmup_time = Duration::ZERO;
    for r in ready {
        let (_, warm) = r
            .recv()
            .map_err(|_| "worker thread died while loading".to_string())??;
        warmup_time = warmup_time.max(warm);
    }
    Ok(LoadedModel {
        name: name.to_string(),
        config,
        stats,
        load_time: started.elapsed(),
        warmup_time,
        queue: tx,
    })
}
