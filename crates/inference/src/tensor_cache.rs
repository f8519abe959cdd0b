//! The tensor cache extension (`framecast.tensorcache.v1`): tensors a client registers once,
//! whose rows its requests then name instead of sending (an avatar's face inputs: 600 KB a
//! frame at S = 320 that never change). Names are per client ([`Owner`]).
//!
//! Tensors are held in host memory under their own budget (`--tensor-cache-mib`, what
//! registrations may take of the host's memory), least recently used evicted first, and each
//! is charged to the device-memory budget the models are under (`--memory-budget-mib`,
//! [`TensorCache::share`]): models and tensors evict each other there, least recently used
//! first. A request holds a lease on each tensor it names from the time it is validated until
//! its batch has run ([`Rows`]), so an eviction cannot touch it; a name evicted before gets
//! NOT_FOUND with a reason the client acts on (register again).
//!
//! The first batch that uses a tensor on a CUDA device copies it there once and keeps the copy
//! with the tensor ([`Cached::on_device`]); batches then gather their rows on the device, so
//! a referenced input never crosses the host-to-device copy again. On the CPU a batch copies
//! its rows straight from the registered bytes into its input. Device copies go when the
//! tensor goes. A tensor is charged its size once against the per-device budget whether or
//! not a batch has used it on a device yet (the models' rule too: a model is charged what it
//! holds on any one device).

use crate::error::{invalid, Error};
use crate::rpc::owner_of;
use crate::shared_memory::Owner;
use bytes::{Bytes, BytesMut};
use framecast_cache::{BudgetCache, CacheError, Events, SharedBudget, TenantLimits};
use framecast_proto::echo;
use framecast_proto::kserve::infer_parameter::ParameterChoice;
use framecast_proto::kserve::ModelInferRequest;
use framecast_proto::tensor::{self, DataType};
use framecast_proto::tensorcache::v1;
use framecast_proto::tensorcache::PARAM_TENSOR;
use framecast_telemetry::prometheus::IntGauge;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Device, Tensor};
use tonic::{Request, Response, Status};

/// One registered tensor.
pub struct Cached {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
    pub data: Bytes,
    /// Its copies on the devices batches have used it on (see [`Cached::on_device`]).
    resident: parking_lot::Mutex<Vec<(Device, Tensor)>>,
}

impl Cached {
    fn row_bytes(&self) -> usize {
        self.data.len() / (self.shape[0].max(1) as usize)
    }

    /// The tensor on `device`: copied there by the first caller, the same copy after that.
    /// On the CPU it is a view of [`Cached::data`] where the bytes are aligned for the
    /// datatype (a copy where not). Callers read it, never write it.
    pub fn on_device(&self, device: Device) -> Result<Tensor, String> {
        let mut resident = self.resident.lock();
        if let Some((_, t)) = resident.iter().find(|(d, _)| *d == device) {
            return Ok(t.shallow_clone());
        }
        let kind = crate::torch_model::kind_of(self.datatype).ok_or_else(|| {
            format!(
                "tensor '{}': libtorch cannot hold {}",
                self.name, self.datatype
            )
        })?;
        let aligned = (self.data.as_ptr() as usize).is_multiple_of(self.datatype.size().max(1));
        let host = if aligned {
            let mut strides = vec![1i64; self.shape.len()];
            for i in (0..self.shape.len().saturating_sub(1)).rev() {
                strides[i] = strides[i + 1] * self.shape[i + 1];
            }
            // SAFETY: `data` holds exactly the tensor's bytes (checked at registration),
            // aligned for its element type, and lives as long as `self`, which owns every
            // copy of the view (`resident`) and outlives every batch using it (they hold a
            // lease). libtorch only reads it: gathers allocate their own output.
            unsafe {
                Tensor::f_from_blob(self.data.as_ptr(), &self.shape, &strides, kind, Device::Cpu)
            }
            .map_err(|e| format!("tensor '{}': {e}", self.name))?
        } else {
            let t = Tensor::empty(self.shape.as_slice(), (kind, Device::Cpu));
            // SAFETY: `t` was just allocated contiguous with exactly `data.len()` bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.data.as_ptr(),
                    t.data_ptr() as *mut u8,
                    self.data.len(),
                )
            };
            t
        };
        let t = if device == Device::Cpu {
            host
        } else {
            host.to_device(device)
        };
        resident.push((device, t.shallow_clone()));
        Ok(t)
    }
}

/// Rows of a cached tensor that one request names, in its order; holds the tensor (it cannot
/// be evicted) until the request's batch has run.
pub struct Rows {
    lease: framecast_cache::Lease<Cached, String>,
    /// Row indices, each checked against the tensor's first dimension.
    pub index: Vec<i64>,
}

impl Rows {
    pub fn tensor(&self) -> &Cached {
        &self.lease
    }

    pub fn byte_len(&self) -> usize {
        self.index.len() * self.lease.row_bytes()
    }

    /// Each row's bytes on the host, in order.
    pub fn slices(&self) -> impl Iterator<Item = &[u8]> {
        let per = self.lease.row_bytes();
        self.index
            .iter()
            .map(move |&r| &self.lease.data[r as usize * per..(r as usize + 1) * per])
    }

    /// The rows end to end on the host (a copy).
    pub fn gather(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.byte_len());
        self.slices().for_each(|s| out.extend_from_slice(s));
        out.freeze()
    }
}

/// Tensors a request names, kept from eviction while it lives ([`TensorCache::hold`]).
pub struct Held(#[allow(dead_code)] Vec<framecast_cache::Lease<Cached, String>>);

/// What the tensor cache may hold, in all and per client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorLimits {
    /// Bytes all clients' tensors may hold (`--tensor-cache-mib`), registrations in parts
    /// under way included. Always finite.
    pub budget: u64,
    /// Bytes one client's tensors may hold (`--tensor-cache-client-mib`).
    pub client_bytes: u64,
    /// Tensors one client may hold (`--tensor-cache-max-names`).
    pub client_names: usize,
}

impl TensorLimits {
    /// `budget` in all, half of it per client, [`DEFAULT_CLIENT_NAMES`] names per client.
    pub fn new(budget: u64) -> TensorLimits {
        TensorLimits {
            budget,
            client_bytes: budget / 2,
            client_names: DEFAULT_CLIENT_NAMES,
        }
    }
}

impl Default for TensorLimits {
    fn default() -> Self {
        TensorLimits::new(DEFAULT_BUDGET)
    }
}

/// `--tensor-cache-mib`'s default: 4 GiB.
pub const DEFAULT_BUDGET: u64 = 4 << 30;
/// `--tensor-cache-max-names`' default: a compositor registers one tensor per avatar and model.
pub const DEFAULT_CLIENT_NAMES: usize = 4096;
/// Registrations in parts one client may have under way at once.
pub const MAX_PENDING_PER_CLIENT: usize = 16;
/// Bytes each tensor is charged beyond its data: its name, shape and bookkeeping, so that
/// names alone cannot hold memory the budget does not see.
pub const ENTRY_OVERHEAD: u64 = 256;

pub struct TensorCache {
    cache: Arc<BudgetCache<Cached, String>>,
    limits: TensorLimits,
    /// Registrations in parts under way, by owner and name: each is independent of every
    /// other, whoever registers it.
    pending: parking_lot::Mutex<HashMap<String, Pending>>,
}

/// A tensor registered in parts, until its last row arrives.
struct Pending {
    /// The client whose share it counts against.
    client: String,
    datatype: DataType,
    shape: Vec<i64>,
    /// Its whole size, held in the budget (and the client's share) from its first part on,
    /// so that parts under way and cached tensors together stay within them.
    _room: framecast_cache::Reservation<Cached, String>,
    /// The rows received so far: it grows as parts arrive (by exactly each part), never to
    /// what a client declared before it sends it.
    data: Vec<u8>,
    /// When its last part arrived: an abandoned registration is dropped after
    /// [`PENDING_TIMEOUT`].
    touched: Instant,
}

/// How long a registration in parts may wait for its next part before it is dropped.
pub const PENDING_TIMEOUT: Duration = Duration::from_secs(60);

/// Keeps the bytes gauge current.
struct Gauge(IntGauge);

/// A key's name: keys start with the owner's credential, which is never logged.
fn name_of(key: &str) -> &str {
    key.rsplit_once('/').map_or("", |(_, n)| n)
}

impl Events for Gauge {
    fn evicted(&self, key: &str, freed: u64, for_entry: &str) {
        tracing::info!(tensor = %name_of(key), freed, to_make_room_for = %for_entry, "tensor evicted (least recently used)");
    }

    fn label(&self, key: &str) -> String {
        format!("tensor '{}'", name_of(key))
    }

    fn changed(&self, reserved: u64, _ready: usize) {
        self.0.set(reserved as i64);
    }
}

/// The cache key: the owner's and the name's, so that one client's names never meet
/// another's.
fn key(owner: &Owner, name: &str) -> String {
    format!("{}/{name}", owner.key())
}

impl TensorCache {
    /// A cache under `limits`; `bytes_gauge` follows what it holds.
    pub fn new(limits: TensorLimits, bytes_gauge: IntGauge) -> TensorCache {
        let cache = BudgetCache::new(
            Some(limits.budget),
            |_, _| false,
            Arc::new(Gauge(bytes_gauge)),
        )
        .with_tenant_limits(TenantLimits {
            max_bytes: limits.client_bytes.min(limits.budget),
            max_entries: limits.client_names,
        });
        TensorCache {
            cache: Arc::new(cache),
            limits,
            pending: Default::default(),
        }
    }

    /// A cache whose size no metric follows.
    pub fn unmetered(limits: TensorLimits) -> TensorCache {
        let gauge = IntGauge::new("tensor_cache_bytes", "unregistered").expect("valid metric");
        Self::new(limits, gauge)
    }

    /// Registers (or replaces) `name` for `owner`, or a part of it: `data` holds the rows
    /// from `first_row` on (all of them when `first_row` is 0 and they are all there).
    /// `client` is whose share it counts against ([`framecast_proto::client`]). Returns the
    /// bytes received so far of the tensor.
    #[allow(clippy::too_many_arguments)]
    pub async fn register(
        &self,
        owner: &Owner,
        client: &str,
        name: &str,
        datatype: &str,
        shape: Vec<i64>,
        first_row: u64,
        data: Bytes,
    ) -> Result<u64, Error> {
        check_name(name)?;
        let datatype = DataType::parse(datatype)
            .map_err(|e| invalid(format!("datatype: {}", echo(&e.to_string()))))?;
        if shape.is_empty() || shape.iter().any(|&d| d < 0) || shape[0] < 1 {
            return Err(invalid(format!(
                "shape {}: at least one dimension, none negative, at least one row",
                echo(&format!("{shape:?}"))
            )));
        }
        let total =
            tensor::byte_len(datatype, &shape).map_err(|e| invalid(format!("shape: {e}")))?;
        if total == 0 {
            return Err(invalid(format!(
                "shape {}: the tensor holds no bytes",
                echo(&format!("{shape:?}"))
            )));
        }
        let rows = shape[0] as u64;
        let per_row = total / rows as usize;
        // Too large for any budget it must fit: refused at the first part, not after the
        // last, and before anything is held for it.
        let charge = total as u64 + ENTRY_OVERHEAD;
        let budgets = [
            (Some(self.limits.budget), Budget::Cache),
            (
                Some(self.limits.client_bytes.min(self.limits.budget)),
                Budget::Client,
            ),
            (self.cache.shared().map(|b| b.budget()), Budget::Device),
        ];
        for (budget, which) in budgets {
            if let Some(budget) = budget.filter(|&b| charge > b) {
                return Err(Error::Exhausted(format!(
                    "tensor '{name}' is {charge} bytes with its bookkeeping; {} is {budget} bytes",
                    which.describe()
                )));
            }
        }
        if data.is_empty() || !data.len().is_multiple_of(per_row) {
            return Err(invalid(format!(
                "data: {} bytes is not a whole number of rows of {per_row} bytes",
                data.len()
            )));
        }
        let last = first_row.saturating_add((data.len() / per_row) as u64);
        if last > rows {
            return Err(invalid(format!(
                "data: rows {first_row}..{last} run past the tensor's {rows}"
            )));
        }
        let k = key(owner, name);
        let whole = if first_row == 0 && last == rows {
            // A whole tensor in one message replaces a registration in parts of it, if any.
            self.pending.lock().remove(&k);
            data
        } else {
            let part = PartOf {
                client,
                datatype,
                shape: &shape,
                first_row,
                per_row,
            };
            match self.add_part(&k, name, part, data)? {
                Some(whole) => whole,
                None => return Ok(last * per_row as u64),
            }
        };
        let size = whole.len() as u64;
        self.cache.remove(&k);
        let value = Cached {
            name: name.to_string(),
            datatype,
            shape,
            data: whole,
            resident: Default::default(),
        };
        let charge = size + ENTRY_OVERHEAD;
        let lease = self
            .cache
            .get_or_load_for(
                Some(client),
                &k,
                || Ok(charge),
                |_| async move { Ok((value, charge)) },
            )
            .await
            .map_err(|e| self.refusal(name, e))?;
        drop(lease);
        Ok(size)
    }

    /// Adds a part of a registration in parts of `name` (key `k`); the whole tensor once its
    /// last part is in. The first part holds the tensor's whole size in the budget and the
    /// client's share (making room as a registration would); the bytes come as they arrive.
    fn add_part(
        &self,
        k: &str,
        name: &str,
        part: PartOf<'_>,
        data: Bytes,
    ) -> Result<Option<Bytes>, Error> {
        let mut pending = self.pending.lock();
        if part.first_row == 0 {
            // A new registration of this name replaces the one under way, if any.
            pending.remove(k);
            let mine = pending.values().filter(|p| p.client == part.client).count();
            if mine >= MAX_PENDING_PER_CLIENT {
                return Err(Error::Exhausted(format!(
                    "tensor '{name}': this client has {mine} registrations in parts under way, the most it may (finish or abandon one; abandoned ones go after {} s)",
                    PENDING_TIMEOUT.as_secs()
                )));
            }
            let total = part.shape[0] as u64 * part.per_row as u64 + ENTRY_OVERHEAD;
            let room = self
                .cache
                .reserve_for(Some(part.client), k, total)
                .map_err(|e| self.refusal(name, e))?;
            pending.insert(
                k.to_string(),
                Pending {
                    client: part.client.to_string(),
                    datatype: part.datatype,
                    shape: part.shape.to_vec(),
                    _room: room,
                    data: Vec::new(),
                    touched: Instant::now(),
                },
            );
        }
        let Some(p) = pending.get_mut(k) else {
            return Err(invalid(format!(
                "first_row {}: no registration in parts of '{name}' is under way (start with first_row 0)",
                part.first_row
            )));
        };
        let next = (p.data.len() / part.per_row) as u64;
        if p.datatype != part.datatype || p.shape != part.shape || next != part.first_row {
            return Err(invalid(format!(
                "first_row {}: the registration of '{name}' under way is {} {:?}, next row {next}",
                part.first_row, p.datatype, p.shape
            )));
        }
        p.data.reserve_exact(data.len());
        p.data.extend_from_slice(&data);
        p.touched = Instant::now();
        if p.data.len() < part.shape[0] as usize * part.per_row {
            return Ok(None);
        }
        // Whole: its room is given back as the tensor takes its place in the cache.
        Ok(pending.remove(k).map(|p| Bytes::from(p.data)))
    }

    /// Bytes the registrations in parts under way have allocated.
    pub fn pending_capacity(&self) -> usize {
        self.pending
            .lock()
            .values()
            .map(|p| p.data.capacity())
            .sum()
    }

    /// Drops registrations in parts that have waited longer than `idle` for their next part
    /// (a client that went away must not hold their memory); returns how many.
    pub fn forget_stale(&self, idle: Duration) -> usize {
        let mut pending = self.pending.lock();
        let before = pending.len();
        pending.retain(|_, p| p.touched.elapsed() < idle);
        before - pending.len()
    }

    /// Every `period`, for as long as the cache lives, [`Self::forget_stale`] with
    /// [`PENDING_TIMEOUT`].
    pub fn sweep_every(self: &Arc<Self>, period: Duration) {
        framecast_telemetry::periodic::every(self, period, |cache| async move {
            let dropped = cache.forget_stale(PENDING_TIMEOUT);
            if dropped > 0 {
                tracing::info!(dropped, "abandoned tensor registrations in parts dropped");
            }
            true
        });
    }

    fn refusal(&self, name: &str, e: CacheError<String>) -> Error {
        let which = |shared: bool| match shared {
            true => Budget::Device.describe(),
            false => Budget::Cache.describe(),
        };
        match e {
            CacheError::Load(e) => Error::Internal(e),
            CacheError::TooLarge {
                need,
                budget,
                shared,
            } => Error::Exhausted(format!(
                "tensor '{name}' is {need} bytes; {} is {budget} bytes",
                which(shared)
            )),
            CacheError::NoRoom {
                need,
                free,
                budget,
                shared,
            } => Error::Exhausted(format!(
                "tensor '{name}' is {need} bytes; {free} of the {budget} bytes of {} are free and the rest is in use or other clients' fair share",
                which(shared)
            )),
            CacheError::TenantBytes { need, used, limit } => Error::Exhausted(format!(
                "tensor '{name}' is {need} bytes; this client's other tensors in use hold {used} of the {limit} bytes of {}",
                Budget::Client.describe()
            )),
            CacheError::TenantEntries { limit } => Error::Exhausted(format!(
                "tensor '{name}': this client holds {limit} tensors, all in use, the most it may (--tensor-cache-max-names)"
            )),
        }
    }

    /// Charges every tensor to `budget` too, the device memory the models are under: models
    /// and tensors make room for each other there, least recently used first. False if the
    /// cache already shares one.
    pub fn share(&self, budget: &Arc<SharedBudget>) -> bool {
        self.cache.join(budget)
    }

    /// Forgets `name` of `owner`; false if it was not there.
    pub fn unregister(&self, owner: &Owner, name: &str) -> bool {
        self.cache.remove(&key(owner, name))
    }

    /// `owner`'s tensors, by name.
    pub fn list(&self, owner: &Owner) -> Vec<Arc<Cached>> {
        let prefix = key(owner, "");
        self.cache
            .ready()
            .into_iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(_, v)| v)
            .collect()
    }

    /// Leases on the tensors `req` names, taken as it arrives: the model it runs on may have
    /// to be loaded first, and that load must not evict them to make room (the request is
    /// using them). Names not held are skipped: validation reports them.
    pub fn hold(&self, owner: &Owner, req: &ModelInferRequest) -> Held {
        Held(
            req.inputs
                .iter()
                .filter_map(
                    |i| match &i.parameters.get(PARAM_TENSOR)?.parameter_choice {
                        Some(ParameterChoice::StringParam(name)) => {
                            self.cache.lease_ready(&key(owner, name))
                        }
                        _ => None,
                    },
                )
                .collect(),
        )
    }

    /// Bytes all tensors hold (with their bookkeeping, and those replaced or unregistered
    /// while a request still uses them), and the budget.
    pub fn usage(&self) -> (u64, u64) {
        (self.cache.reserved(), self.limits.budget)
    }

    /// The rows `rows` (comma-separated indices) of `owner`'s tensor `name`, for an input of
    /// `datatype` and `shape` (`field` names it in errors), leased until they are dropped.
    pub fn rows(
        &self,
        owner: &Owner,
        field: &str,
        name: &str,
        rows: &str,
        datatype: DataType,
        shape: &[i64],
    ) -> Result<Rows, Error> {
        let lease = self
            .cache
            .lease_ready(&key(owner, name))
            .ok_or_else(|| {
                Error::TensorUnknown(format!(
                    "{field}: tensor '{}' is not in the tensor cache (never registered, evicted, or the server restarted): register it again",
                    echo(name)
                ))
            })?;
        let t = &*lease;
        if t.datatype != datatype || shape.get(1..) != t.shape.get(1..) {
            return Err(invalid(format!(
                "{field}: {datatype} {} does not match tensor '{}' ({} {:?}) past its first dimension",
                echo(&format!("{shape:?}")),
                t.name,
                t.datatype,
                t.shape
            )));
        }
        let count = shape.first().copied().unwrap_or(0).max(0) as usize;
        let mut index = Vec::with_capacity(count);
        for (i, r) in rows.split(',').enumerate() {
            let row = r
                .trim()
                .parse::<i64>()
                .ok()
                .filter(|row| (0..t.shape[0]).contains(row))
                .ok_or_else(|| {
                    invalid(format!(
                        "{field}: framecast_rows[{i}] = {} is not a row of tensor '{}' (0..{})",
                        echo(r),
                        t.name,
                        t.shape[0]
                    ))
                })?;
            if i >= count {
                return Err(invalid(format!(
                    "{field}: framecast_rows names more than the input's {count} rows"
                )));
            }
            index.push(row);
        }
        if index.len() != count {
            return Err(invalid(format!(
                "{field}: framecast_rows names {} rows; the input's shape has {count}",
                index.len()
            )));
        }
        Ok(Rows { lease, index })
    }
}

/// A part of a registration in parts, as [`TensorCache::add_part`] needs it.
struct PartOf<'a> {
    client: &'a str,
    datatype: DataType,
    shape: &'a [i64],
    first_row: u64,
    per_row: usize,
}

/// The budgets a tensor must fit, for refusals that name the flag to change.
enum Budget {
    Cache,
    Client,
    Device,
}

impl Budget {
    fn describe(&self) -> &'static str {
        match self {
            Budget::Cache => "the tensor cache's budget (--tensor-cache-mib)",
            Budget::Client => "one client's share of the tensor cache (--tensor-cache-client-mib)",
            Budget::Device => {
                "the device-memory budget models and tensors share (--memory-budget-mib)"
            }
        }
    }
}

/// Names follow the rule of model names (letters, digits, `.`, `_`, `-`; 1 to 255; not
/// starting with `.`).
fn check_name(name: &str) -> Result<(), Error> {
    use crate::repository::RepoError;
    crate::repository::check_name(name).map_err(|e| match e {
        RepoError::InvalidName { name, reason } => {
            invalid(format!("name {name:?} is invalid: {reason}"))
        }
        other => invalid(format!("name: {other}")),
    })
}

/// The extension's RPCs.
pub struct TensorCacheService {
    cache: Arc<TensorCache>,
    scoped_by_token: bool,
}

impl TensorCacheService {
    /// `scoped_by_token`: authentication is on, so a caller's token names its tensors.
    pub fn new(cache: Arc<TensorCache>, scoped_by_token: bool) -> Self {
        TensorCacheService {
            cache,
            scoped_by_token,
        }
    }
}

#[tonic::async_trait]
impl v1::tensor_cache_server::TensorCache for TensorCacheService {
    async fn register(
        &self,
        req: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        let owner = owner_of(&req, self.scoped_by_token);
        let client = framecast_proto::client::of(&req, self.scoped_by_token);
        let r = req.into_inner();
        let byte_size = self
            .cache
            .register(
                &owner,
                &client,
                &r.name,
                &r.datatype,
                r.shape,
                r.first_row,
                r.data,
            )
            .await?;
        Ok(Response::new(v1::RegisterResponse { byte_size }))
    }

    async fn unregister(
        &self,
        req: Request<v1::UnregisterRequest>,
    ) -> Result<Response<v1::UnregisterResponse>, Status> {
        let owner = owner_of(&req, self.scoped_by_token);
        let name = req.into_inner().name;
        if self.cache.unregister(&owner, &name) {
            Ok(Response::new(v1::UnregisterResponse {}))
        } else {
            Err(
                Error::TensorUnknown(format!("name: tensor '{}' is not registered", echo(&name)))
                    .into(),
            )
        }
    }

    async fn status(
        &self,
        req: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        let owner = owner_of(&req, self.scoped_by_token);
        let (used, budget) = self.cache.usage();
        Ok(Response::new(v1::StatusResponse {
            tensors: self
                .cache
                .list(&owner)
                .iter()
                .map(|t| v1::status_response::Tensor {
                    name: t.name.clone(),
                    datatype: t.datatype.as_str().to_string(),
                    shape: t.shape.clone(),
                    byte_size: t.data.len() as u64,
                })
                .collect(),
            bytes_used: used,
            bytes_budget: budget,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache with room for `data` bytes of tensors besides `names` tensors' bookkeeping,
    /// all of it for one client.
    fn cache_for(data: u64, names: u64) -> TensorCache {
        let budget = data + names * ENTRY_OVERHEAD;
        TensorCache::unmetered(TensorLimits {
            budget,
            client_bytes: budget,
            client_names: 100,
        })
    }

    fn cache() -> TensorCache {
        cache_for(1 << 20, 100)
    }

    const CLIENT: &str = "address 127.0.0.1";

    fn rows(n: u8) -> Bytes {
        Bytes::from((0..n).flat_map(|r| [r; 4]).collect::<Vec<u8>>())
    }

    #[tokio::test]
    async fn rows_are_gathered_in_the_order_named_and_names_are_per_owner() {
        let c = cache();
        let (a, b) = (
            Owner::from_credentials([("token", &b"a"[..])]),
            Owner::from_credentials([("token", &b"b"[..])]),
        );
        c.register(&a, CLIENT, "faces", "UINT8", vec![5, 2, 2], 0, rows(5))
            .await
            .unwrap();
        let got = c
            .rows(&a, "in", "faces", "3,0,3", DataType::U8, &[3, 2, 2])
            .unwrap()
            .gather();
        assert_eq!(&got[..], &[3, 3, 3, 3, 0, 0, 0, 0, 3, 3, 3, 3]);
        let e = c
            .rows(&b, "in", "faces", "0", DataType::U8, &[1, 2, 2])
            .err()
            .unwrap();
        assert!(matches!(e, Error::TensorUnknown(_)), "{e}");
        assert_eq!(c.list(&a).len(), 1);
        assert!(c.list(&b).is_empty());
    }

    #[tokio::test]
    async fn bad_rows_shapes_and_names_are_refused_naming_the_field() {
        let c = cache();
        let o = Owner::anonymous();
        c.register(&o, CLIENT, "faces", "UINT8", vec![5, 2, 2], 0, rows(5))
            .await
            .unwrap();
        let err = |rows: &str, shape: &[i64], dt| {
            c.rows(&o, "inputs[0] 'face'", "faces", rows, dt, shape)
                .err()
                .unwrap()
                .to_string()
        };
        assert!(err("1,5", &[2, 2, 2], DataType::U8).contains("framecast_rows[1] = 5"));
        assert!(err("1,x", &[2, 2, 2], DataType::U8).contains("framecast_rows[1]"));
        assert!(err("1", &[2, 2, 2], DataType::U8).contains("names 1 rows"));
        assert!(err("1,2,3", &[2, 2, 2], DataType::U8).contains("more than"));
        assert!(err("1", &[1, 4], DataType::U8).contains("does not match"));
        assert!(err("1", &[1, 2, 2], DataType::F32).contains("does not match"));
        for (name, shape, len) in [
            ("../x", vec![1], 1),
            ("ok", vec![], 0),
            ("ok", vec![2], 3),
            ("ok", vec![5, 0], 5),
        ] {
            let e = c
                .register(
                    &o,
                    CLIENT,
                    name,
                    "UINT8",
                    shape,
                    0,
                    Bytes::from(vec![0; len]),
                )
                .await
                .err()
                .unwrap();
            assert!(matches!(e, Error::Invalid(_)), "{e}");
        }
    }

    /// A tensor registered in parts is usable once its last row is in, not before; parts out
    /// of order are refused, naming the row expected.
    #[tokio::test]
    async fn a_tensor_registered_in_parts_is_whole_once_its_last_part_arrives() {
        let c = cache();
        let o = Owner::anonymous();
        let all = rows(5);
        let part = |a: usize, b: usize| all.slice(a * 4..b * 4);
        let reg =
            |first: u64, data: Bytes| c.register(&o, CLIENT, "p", "UINT8", vec![5, 4], first, data);
        assert_eq!(reg(0, part(0, 2)).await.unwrap(), 8);
        let e = c
            .rows(&o, "in", "p", "0", DataType::U8, &[1, 4])
            .err()
            .unwrap();
        assert!(
            matches!(e, Error::TensorUnknown(_)),
            "usable before its last part: {e}"
        );
        let e = reg(3, part(3, 5)).await.err().unwrap();
        assert!(e.to_string().contains("next row 2"), "{e}");
        assert_eq!(reg(2, part(2, 4)).await.unwrap(), 16);
        assert_eq!(reg(4, part(4, 5)).await.unwrap(), 20);
        let got = c
            .rows(&o, "in", "p", "4,1", DataType::U8, &[2, 4])
            .unwrap()
            .gather();
        assert_eq!(&got[..], &[4, 4, 4, 4, 1, 1, 1, 1]);
        let e = reg(1, part(1, 2)).await.err().unwrap();
        assert!(e.to_string().contains("start with first_row 0"), "{e}");
        let e = reg(0, Bytes::from(vec![0; 3])).await.err().unwrap();
        assert!(e.to_string().contains("whole number of rows"), "{e}");
        // An abandoned registration in parts is dropped by the sweep, not held forever.
        reg(0, part(0, 2)).await.unwrap();
        assert_eq!(c.forget_stale(PENDING_TIMEOUT), 0);
        assert_eq!(c.forget_stale(Duration::ZERO), 1);
        let e = reg(2, part(2, 5)).await.err().unwrap();
        assert!(e.to_string().contains("start with first_row 0"), "{e}");
    }

    #[tokio::test]
    async fn past_the_budget_is_refused_with_the_numbers_and_old_tensors_are_evicted() {
        let c = cache_for(30, 1);
        let o = Owner::anonymous();
        c.register(&o, CLIENT, "a", "UINT8", vec![5, 4], 0, rows(5))
            .await
            .unwrap();
        let e = c
            .register(
                &o,
                CLIENT,
                "huge",
                "UINT8",
                vec![40],
                0,
                Bytes::from(vec![0; 40]),
            )
            .await
            .err()
            .unwrap();
        assert!(matches!(e, Error::Exhausted(_)));
        let (need, budget) = (40 + ENTRY_OVERHEAD, 30 + ENTRY_OVERHEAD);
        assert!(
            e.to_string().contains(&format!("{need} bytes"))
                && e.to_string().contains(&format!("{budget} bytes")),
            "{e}"
        );
        c.register(&o, CLIENT, "b", "UINT8", vec![5, 4], 0, rows(5))
            .await
            .unwrap();
        // a is evicted for b: its rows are gone, and the request says so.
        let e = c
            .rows(&o, "in", "a", "0", DataType::U8, &[1, 4])
            .err()
            .unwrap();
        assert!(matches!(e, Error::TensorUnknown(_)));
        assert_eq!(c.usage(), (20 + ENTRY_OVERHEAD, 30 + ENTRY_OVERHEAD));
        assert!(c.unregister(&o, "b"));
        assert_eq!(c.usage().0, 0);
    }

    /// Rows gathered from the tensor's device copy are the rows gathered on the host, for
    /// aligned and unaligned registrations alike; a tensor a request holds rows of is not
    /// evicted for another (the newcomer is refused), and is once the request is done.
    #[tokio::test]
    async fn device_gathers_match_the_host_and_rows_in_use_pin_their_tensor() {
        let c = cache_for(40, 2);
        let o = Owner::anonymous();
        let data: Vec<u8> = (0..20u8).collect();
        // Offset by one byte: an F32 view would be unaligned, so the CPU copy is made.
        let unaligned = Bytes::from([&[0u8][..], &data].concat()).slice(1..);
        c.register(
            &o,
            CLIENT,
            "u8",
            "UINT8",
            vec![5, 4],
            0,
            Bytes::from(data.clone()),
        )
        .await
        .unwrap();
        c.register(&o, CLIENT, "f32", "FP32", vec![5, 1], 0, unaligned)
            .await
            .unwrap();
        for (name, dt, shape) in [
            ("u8", DataType::U8, [3i64, 4]),
            ("f32", DataType::F32, [3, 1]),
        ] {
            let rows = c.rows(&o, "in", name, "4,0,2", dt, &shape).unwrap();
            let t = rows.tensor().on_device(Device::Cpu).unwrap();
            let again = rows.tensor().on_device(Device::Cpu).unwrap();
            assert_eq!(t.data_ptr(), again.data_ptr(), "one copy per device");
            let idx = Tensor::from_slice(&rows.index);
            let got = t.index_select(0, &idx).contiguous();
            let mut bytes = vec![0u8; rows.byte_len()];
            got.copy_data_u8(&mut bytes, got.numel());
            assert_eq!(bytes, rows.gather().to_vec(), "{name}");
        }
        let held = c.rows(&o, "in", "u8", "1", DataType::U8, &[1, 4]).unwrap();
        let big = Bytes::from(vec![0u8; 36]);
        let e = c
            .register(&o, CLIENT, "big", "UINT8", vec![36], 0, big.clone())
            .await
            .err()
            .unwrap();
        assert!(matches!(e, Error::Exhausted(_)), "{e}");
        drop(held);
        // f32 (the least recently used, unleased) goes first, then u8: both fit again.
        c.register(&o, CLIENT, "big", "UINT8", vec![36], 0, big)
            .await
            .unwrap();
    }

    /// A registration in parts holds what has arrived, never what it declares: a declared
    /// terabyte is refused at once (it fits no budget), and a declared gigabyte that fits
    /// holds only its first part's bytes.
    #[tokio::test]
    async fn a_declared_size_is_never_allocated_before_it_arrives() {
        let c = TensorCache::unmetered(TensorLimits::new(4 << 30));
        let o = Owner::anonymous();
        let mib = Bytes::from(vec![7u8; 1 << 20]);
        let e = c
            .register(
                &o,
                CLIENT,
                "tib",
                "UINT8",
                vec![1 << 20, 1 << 20],
                0,
                mib.clone(),
            )
            .await
            .err()
            .unwrap();
        assert!(matches!(e, Error::Exhausted(_)), "{e}");
        assert!(e.to_string().contains("--tensor-cache-mib"), "{e}");
        // 1 GiB declared, within budget and share: 1 MiB arrives, about 1 MiB is held.
        c.register(
            &o,
            CLIENT,
            "gib",
            "UINT8",
            vec![1024, 1 << 20],
            0,
            mib.clone(),
        )
        .await
        .unwrap();
        let held = c.pending_capacity();
        assert!(
            (1 << 20..4 << 20).contains(&held),
            "a registration in parts holds {held} bytes after its first MiB"
        );
    }

    /// Registrations in parts are keyed by name: two under way for one owner (two
    /// compositors on one token, or none) complete independently, and restarting one does
    /// not touch the other.
    #[tokio::test]
    async fn registrations_in_parts_of_different_names_are_independent() {
        let c = cache();
        let o = Owner::anonymous();
        let all = rows(4);
        let part = |a: usize, b: usize| all.slice(a * 4..b * 4);
        let reg = |client: &'static str, name: &'static str, first: u64, data: Bytes| {
            c.register(&o, client, name, "UINT8", vec![4, 4], first, data)
        };
        reg("address 10.0.0.1", "x", 0, part(0, 2)).await.unwrap();
        reg("address 10.0.0.2", "y", 0, part(0, 1)).await.unwrap();
        // y starts over; x's registration is not disturbed.
        reg("address 10.0.0.2", "y", 0, part(0, 2)).await.unwrap();
        assert_eq!(
            reg("address 10.0.0.1", "x", 2, part(2, 4)).await.unwrap(),
            16
        );
        assert_eq!(
            reg("address 10.0.0.2", "y", 2, part(2, 4)).await.unwrap(),
            16
        );
        for name in ["x", "y"] {
            let got = c
                .rows(&o, "in", name, "3", DataType::U8, &[1, 4])
                .unwrap()
                .gather();
            assert_eq!(&got[..], &[3, 3, 3, 3], "{name}");
        }
        // A part that does not continue its own registration names that registration.
        reg("address 10.0.0.1", "x", 0, part(0, 1)).await.unwrap();
        let e = reg("address 10.0.0.2", "x", 3, part(3, 4))
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains("next row 1"), "{e}");
    }

    /// Re-registering a name while a request still uses the old copy keeps the old copy's
    /// bytes counted until the request is done: the budget bounds memory, not the listing.
    #[tokio::test]
    async fn a_replaced_tensor_in_use_stays_counted_until_released() {
        let one = 20 + ENTRY_OVERHEAD;
        let c = cache();
        let o = Owner::anonymous();
        c.register(&o, CLIENT, "t", "UINT8", vec![5, 4], 0, rows(5))
            .await
            .unwrap();
        let held = c.rows(&o, "in", "t", "1", DataType::U8, &[1, 4]).unwrap();
        c.register(&o, CLIENT, "t", "UINT8", vec![5, 4], 0, rows(5))
            .await
            .unwrap();
        assert_eq!(c.usage().0, 2 * one, "the old copy is still in use");
        drop(held);
        assert_eq!(c.usage().0, one);
        // Under a budget of just under two copies, replacing one in use is refused.
        let tight = cache_for(2 * 20 - 1, 2);
        tight
            .register(&o, CLIENT, "t", "UINT8", vec![5, 4], 0, rows(5))
            .await
            .unwrap();
        let held = tight
            .rows(&o, "in", "t", "1", DataType::U8, &[1, 4])
            .unwrap();
        let e = tight
            .register(&o, CLIENT, "t", "UINT8", vec![5, 4], 0, rows(5))
            .await
            .err()
            .unwrap();
        assert!(matches!(e, Error::Exhausted(_)), "{e}");
        drop(held);
        tight
            .register(&o, CLIENT, "t", "UINT8", vec![5, 4], 0, rows(5))
            .await
            .unwrap();
        assert_eq!(tight.usage().0, one);
    }

    /// One client cannot evict another's tensors while that one holds no more than its
    /// fair share, nor hold more names or bytes than its own share.
    #[tokio::test]
    async fn clients_get_shares_of_names_and_bytes() {
        let one = 20 + ENTRY_OVERHEAD;
        let c = TensorCache::unmetered(TensorLimits {
            budget: 4 * one,
            client_bytes: 3 * one,
            client_names: 2,
        });
        let (a, b) = (
            Owner::from_credentials([("token", &b"a"[..])]),
            Owner::from_credentials([("token", &b"b"[..])]),
        );
        let c = &c;
        let reg = |o: &Owner, client: &'static str, name: &'static str| {
            let o = o.clone();
            async move {
                c.register(&o, client, name, "UINT8", vec![5, 4], 0, rows(5))
                    .await
            }
        };
        reg(&a, "a", "face").await.unwrap();
        reg(&b, "b", "b1").await.unwrap();
        reg(&b, "b", "b2").await.unwrap();
        // b at its two names: its own oldest makes room, never a's.
        reg(&b, "b", "b3").await.unwrap();
        assert!(c.rows(&a, "in", "face", "0", DataType::U8, &[1, 4]).is_ok());
        assert!(c.rows(&b, "in", "b1", "0", DataType::U8, &[1, 4]).is_err());
        assert_eq!(c.cache.tenant_usage("b"), (2 * one, 2));
        // A large tensor of b's: past its share of 3, refused whatever else is free.
        let e = c
            .register(
                &b,
                "b",
                "big",
                "UINT8",
                vec![3 * one as i64],
                0,
                Bytes::from(vec![0; 3 * one as usize]),
            )
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains("--tensor-cache-client-mib"), "{e}");
        assert!(c.rows(&a, "in", "face", "0", DataType::U8, &[1, 4]).is_ok());
    }
}
