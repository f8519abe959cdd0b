//! Model lifecycle: load on request or on demand (concurrent callers wait for one load),
//! warm-up before ready, LRU eviction under a device-memory budget, unload when asked.
//!
//! Memory accounting: a model occupies the size of its `model.pt` (its parameters and buffers
//! as serialized; halved for fp16) plus a configured working overhead, on every device it runs
//! on. Room is reserved before a load starts, so concurrent loads never over-commit; when the
//! budget is full, the least recently used models that are ready, unpinned and idle (no
//! request in flight) are evicted until the new one fits. The budget is shared with the
//! tensors clients register ([`crate::tensor_cache`]), which live on the same devices: a
//! model load may evict an idle tensor and a registration an idle model, least recently used
//! first either way.

use crate::backend::Payload;
use crate::batcher::{self, Delivery, Job, JobError, JobOutput};
use crate::config::{ModelConfig, Precision, MODEL_FILE};
use crate::gpu;
use crate::metrics::Metrics;
use crate::repository::{RepoError, Repository};
use crate::stats::ModelStats;
use crate::torch_model::TorchModel;
use crossbeam_channel::Sender;
use crossbeam_channel::TrySendError;
use framecast_cache::{BudgetCache, CacheError, Events, Lease, SharedBudget, State};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::Device;
use tokio::sync::oneshot;

/// Why a model cannot serve.
#[derive(Debug, thiserror::Error, Clone)]
pub enum ModelError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("model '{name}' failed to load: {reason}")]
    LoadFailed { name: String, reason: String },
    #[error("model '{0}' is not loaded")]
    NotLoaded(String),
    #[error("model '{name}' needs {need} bytes but the device-memory budget is {budget} bytes")]
    TooLarge {
        name: String,
        need: u64,
        budget: u64,
    },
    #[error("model '{name}' needs {need} bytes; {free} of the {budget}-byte budget are free and every other model and cached tensor is pinned or in use")]
    NoRoom {
        name: String,
        need: u64,
        free: u64,
        budget: u64,
    },
}

/// A model with its workers running, warm and ready.
pub struct LoadedModel {
    pub name: String,
    pub config: Arc<ModelConfig>,
    pub stats: Arc<ModelStats>,
    pub load_time: Duration,
    pub warmup_time: Duration,
    /// Bytes accounted against the per-device budget: the most the model holds on any one
    /// device.
    pub bytes: u64,
    /// What the model holds on each device it runs on, all its instances there together:
    /// measured around the loads on CUDA devices (see [`gpu::measure_load`]), estimated
    /// elsewhere.
    pub memory: Vec<(Device, u64)>,
    queue: Sender<Job>,
}

impl LoadedModel {
    /// Queues one validated request and waits for its share of a batch; `deliver` says, per
    /// config output, how the request wants its share.
    pub async fn infer(
        &self,
        batch: usize,
        inputs: Vec<Payload>,
        deliver: Vec<Delivery>,
        deadline: Option<Instant>,
    ) -> Result<JobOutput, JobError> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            batch,
            inputs,
            deliver,
            enqueued: Instant::now(),
            deadline,
            reply,
        };
        self.queue.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => JobError::QueueFull {
                capacity: self.queue.capacity().unwrap_or(0),
            },
            TrySendError::Disconnected(_) => JobError::Stopped("model workers have stopped"),
        })?;
        self.stats.record_queue_depth(self.queue.len());
        rx.await
            .map_err(|_| JobError::Stopped("model worker dropped the request"))?
    }
}

impl Drop for LoadedModel {
    fn drop(&mut self) {
        // Unloaded or evicted: nothing waits for it any more.
        self.stats.record_queue_depth(0);
    }
}

/// A model in use by one request: while it lives the model is never evicted.
pub struct ModelLease(Lease<LoadedModel, ModelError>);

impl std::ops::Deref for ModelLease {
    type Target = LoadedModel;
    fn deref(&self) -> &LoadedModel {
        &self.0
    }
}

type LoadResult = Result<Arc<LoadedModel>, ModelError>;

/// Where and how models run.
#[derive(Debug, Clone)]
pub struct ExecOptions {
    pub devices: Vec<Device>,
    pub instances: usize,
    /// Per-device budget for model memory; `None` is unlimited.
    pub memory_budget: Option<u64>,
    /// Working memory (activations, workspaces) accounted per model on top of its weights.
    pub model_overhead: u64,
    /// Models that are never evicted, in addition to those whose config says `pinned`.
    pub pinned: HashSet<String>,
    /// Requests a model's queue holds; past it requests are refused at once.
    pub max_queue: usize,
}

impl ExecOptions {
    /// Where each worker runs: every device, once per instance.
    fn workers(&self) -> impl Iterator<Item = Device> + '_ {
        self.devices
            .iter()
            .flat_map(|&d| std::iter::repeat_n(d, self.instances.max(1)))
    }

    /// Copies of a model's module on its busiest device (each instance loads its own).
    fn copies_per_device(&self) -> u64 {
        let workers: Vec<_> = self.workers().map(|d| (d, None)).collect();
        gpu::per_device(&workers, 1)
            .into_iter()
            .map(|(_, n)| n)
            .max()
            .unwrap_or(1)
    }
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions {
            devices: vec![Device::Cpu],
            instances: 1,
            memory_budget: None,
            model_overhead: 64 << 20,
            pinned: HashSet::new(),
            max_queue: 256,
        }
    }
}

/// All models this server knows of, loaded or not.
pub struct ModelManager {
    repo: Repository,
    exec: ExecOptions,
    load_on_demand: bool,
    cache: Arc<BudgetCache<LoadedModel, ModelError>>,
    /// The device-memory budget (`memory_budget`), shared with the tensor cache.
    device_budget: Option<Arc<SharedBudget>>,
    metrics: Arc<Metrics>,
}

/// Evictions and totals, to the logs and metrics.
struct CacheEvents(Arc<Metrics>);

impl Events for CacheEvents {
    fn evicted(&self, key: &str, freed: u64, for_entry: &str) {
        self.0.evictions.inc();
        tracing::info!(
            model = key,
            freed,
            to_make_room_for = for_entry,
            "evicted (least recently used)"
        );
    }

    fn label(&self, key: &str) -> String {
        format!("model '{key}'")
    }

    fn changed(&self, reserved: u64, ready: usize) {
        self.0.models_loaded.set(ready as i64);
        self.0.memory_used_bytes.set(reserved as i64);
    }
}

impl ModelManager {
    pub fn new(
        repo: Repository,
        exec: ExecOptions,
        load_on_demand: bool,
        metrics: Arc<Metrics>,
    ) -> Self {
        metrics
            .memory_budget_bytes
            .set(exec.memory_budget.unwrap_or(0) as i64);
        metrics.queue_capacity.set(exec.max_queue as i64);
        let pinned = exec.pinned.clone();
        // The budget is the device's, shared with the tensors cached there: the cache
        // itself has none of its own.
        let cache = Arc::new(BudgetCache::new(
            None,
            move |name: &str, m: &LoadedModel| m.config.pinned || pinned.contains(name),
            Arc::new(CacheEvents(metrics.clone())),
        ));
        let device_budget = exec.memory_budget.map(SharedBudget::new);
        if let Some(b) = &device_budget {
            cache.join(b);
        }
        ModelManager {
            repo,
            exec,
            load_on_demand,
            cache,
            device_budget,
            metrics,
        }
    }

    pub fn repository(&self) -> &Repository {
        &self.repo
    }

    /// Where and how many times each model runs.
    pub fn exec(&self) -> &ExecOptions {
        &self.exec
    }

    /// The device-memory budget models share with the tensors cached on their devices
    /// (`None`: unlimited): a [`crate::tensor_cache::TensorCache`] joins it.
    pub fn device_budget(&self) -> Option<&Arc<SharedBudget>> {
        self.device_budget.as_ref()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Leases the model for one request, loading it first if on-demand loading is on.
    pub async fn get(&self, name: &str) -> Result<ModelLease, ModelError> {
        if let Some(lease) = self.cache.lease_ready(name) {
            return Ok(ModelLease(lease));
        }
        if self.cache.state(name).is_none() {
            self.repo.model_dir(name)?;
            if !self.load_on_demand {
                return Err(ModelError::NotLoaded(name.to_string()));
            }
        }
        self.resolve(name).await.map(ModelLease)
    }

    /// Loads `name` now (or returns it if loaded); a previous failure is retried.
    pub async fn load(&self, name: &str) -> LoadResult {
        self.repo.model_dir(name)?;
        self.cache.forget_failure(name);
        Ok(self.resolve(name).await?.value().clone())
    }

    /// Forgets `name`; its workers stop once requests already queued are answered.
    pub fn unload(&self, name: &str) -> Result<(), ModelError> {
        crate::repository::check_name(name)?;
        if self.cache.remove(name) {
            Ok(())
        } else {
            Err(ModelError::NotLoaded(name.to_string()))
        }
    }

    /// The model if it is loaded and ready, without loading it.
    pub fn ready(&self, name: &str) -> Option<Arc<LoadedModel>> {
        self.cache.peek(name)
    }

    /// State of a model known to the manager: "READY", "LOADING", "UNAVAILABLE" with reason.
    pub fn state(&self, name: &str) -> Option<(&'static str, String)> {
        Some(match self.cache.state(name)? {
            State::Loading => ("LOADING", String::new()),
            State::Ready(_) => ("READY", String::new()),
            State::Failed(e) => ("UNAVAILABLE", e.to_string()),
        })
    }

    /// Every ready model.
    pub fn loaded(&self) -> Vec<Arc<LoadedModel>> {
        self.cache.ready().into_iter().map(|(_, m)| m).collect()
    }

    /// Bytes reserved per device by loaded and loading models.
    pub fn memory_used(&self) -> u64 {
        self.cache.reserved()
    }

    /// Bytes `name` will occupy per device, from its files.
    fn footprint(&self, dir: &std::path::Path) -> Result<u64, ModelError> {
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let config = ModelConfig::load(dir).map_err(|e| ModelError::LoadFailed {
            name: name.clone(),
            reason: e.to_string(),
        })?;
        let path = dir.join(MODEL_FILE);
        let file = std::fs::metadata(&path).map_err(|e| ModelError::LoadFailed {
            name,
            reason: format!("{}: {e}", path.display()),
        })?;
        let weights = match config.precision {
            Precision::Fp32 => file.len(),
            Precision::Fp16 => file.len() / 2,
        };
        Ok((weights + self.exec.model_overhead) * self.exec.copies_per_device())
    }

    /// A lease on `name`, loaded by this call or by the one already under way.
    async fn resolve(&self, name: &str) -> Result<Lease<LoadedModel, ModelError>, ModelError> {
        let dir = self.repo.model_dir(name)?;
        let dir = dir.as_path();
        let estimate = || self.footprint(dir);
        let load = |need| async move {
            let (exec, owned, dir) = (self.exec.clone(), name.to_string(), dir.to_path_buf());
            let stats = Arc::new(ModelStats::new(&self.metrics, name));
            let loaded = tokio::task::spawn_blocking(move || {
                load_blocking(&owned, &dir, &exec, need, stats)
            })
            .await
            .unwrap_or_else(|e| Err(format!("loader panicked: {e}")));
            match loaded {
                Ok(m) => {
                    tracing::info!(
                        model = name,
                        mib = m.bytes as f64 / (1 << 20) as f64,
                        load_ms = m.load_time.as_millis() as u64,
                        warmup_ms = m.warmup_time.as_millis() as u64,
                        "model ready"
                    );
                    self.metrics.loads.with_label_values(&["ok"]).inc();
                    self.metrics
                        .load_seconds
                        .with_label_values(&[name])
                        .observe(m.load_time.as_secs_f64());
                    let bytes = m.bytes;
                    Ok((m, bytes))
                }
                Err(reason) => {
                    tracing::warn!(model = name, %reason, "model failed to load");
                    self.metrics.loads.with_label_values(&["failed"]).inc();
                    Err(ModelError::LoadFailed {
                        name: name.to_string(),
                        reason,
                    })
                }
            }
        };
        self.cache
            .get_or_load(name, estimate, load)
            .await
            .map_err(|e| {
                let e = match e {
                    CacheError::Load(e) => return e,
                    CacheError::TooLarge { need, budget, .. } => ModelError::TooLarge {
                        name: name.to_string(),
                        need,
                        budget,
                    },
                    CacheError::NoRoom {
                        need, free, budget, ..
                    } => ModelError::NoRoom {
                        name: name.to_string(),
                        need,
                        free,
                        budget,
                    },
                    // Models are loaded for no tenant: these limits never apply to them.
                    CacheError::TenantBytes { need, used, limit } => ModelError::NoRoom {
                        name: name.to_string(),
                        need,
                        free: limit.saturating_sub(used),
                        budget: limit,
                    },
                    CacheError::TenantEntries { .. } => ModelError::NoRoom {
                        name: name.to_string(),
                        need: 0,
                        free: 0,
                        budget: 0,
                    },
                };
                self.metrics.loads.with_label_values(&["refused"]).inc();
                tracing::warn!(model = name, error = %e, "model refused");
                e
            })
    }
}

/// Loads one model: config, then one worker thread per device and instance, each loading its
/// own module and warming up at max batch before it reports ready. `estimate` is what the
/// budget reserved; what the model is charged once loaded is measured where it can be.
fn load_blocking(
    name: &str,
    dir: &std::path::Path,
    exec: &ExecOptions,
    estimate: u64,
    stats: Arc<ModelStats>,
) -> Result<LoadedModel, String> {
    let started = Instant::now();
    let config = Arc::new(ModelConfig::load(dir).map_err(|e| e.to_string())?);
    let (tx, rx) = batcher::queue(exec.max_queue);
    let mut ready = Vec::new();
    for (worker, device) in exec.workers().enumerate() {
        let (model_config, dir) = ((*config).clone(), dir.to_path_buf());
        let start = move || {
            let (model, grew) = gpu::measure_load(device, || {
                let model = TorchModel::load(&dir, model_config, device)?;
                let t = Instant::now();
                let batch = model.config().max_batch_size;
                model.warm_up(batch).map_err(|e| {
                    format!("warm-up at batch {batch} failed; does config.toml match model.pt? {e}")
                })?;
                Ok::<_, String>((model, t.elapsed()))
            });
            let (model, warm_up) = model?;
            Ok((model, (device, warm_up, grew)))
        };
        ready.push(batcher::spawn_worker(
            format!("{name}-{device:?}-{worker}"),
            start,
            config.clone(),
            stats.clone(),
            rx.clone(),
        )?);
    }
    drop(rx);
    let mut warmup_time = Duration::ZERO;
    let mut loads = Vec::new();
    for r in ready {
        let (device, warm, grew) = r
            .recv()
            .map_err(|_| "worker thread died while loading".to_string())??;
        warmup_time = warmup_time.max(warm);
        loads.push((device, grew));
    }
    let memory = gpu::per_device(&loads, estimate / exec.copies_per_device());
    for &(device, bytes) in &memory {
        let measured = loads.iter().any(|&(d, grew)| d == device && grew.is_some());
        tracing::info!(
            model = name,
            device = ?device,
            mib = bytes as f64 / (1 << 20) as f64,
            measured,
            "model device memory"
        );
    }
    let bytes = memory.iter().map(|&(_, b)| b).max().unwrap_or(estimate);
    Ok(LoadedModel {
        name: name.to_string(),
        config,
        stats,
        load_time: started.elapsed(),
        warmup_time,
        bytes,
        memory,
        queue: tx,
    })
}
