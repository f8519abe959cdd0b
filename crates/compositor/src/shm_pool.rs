//! Shared-memory slots for batches sent to an inference replica on the same host.
//!
//! With a replica on this host, a batch's 15 MB of face crops and 7 MB of results need not
//! travel through HTTP/2 (four copies each way): the inputs are copied once into a slot the
//! server has mapped, the server writes the results into the same slot, and the blend reads
//! them from there. gRPC then carries only the request's description. Slots are created on
//! demand, registered once, reused batch after batch, and returned when the last reader of a
//! result drops it.
//!
//! The first registration decides: if the server cannot map our objects (another host, a
//! container without a shared `/dev/shm`, a server without the extension), the pool switches
//! itself off and batches go over gRPC as before.

use bytes::Bytes;
use framecast_proto::auth::authorize;
use framecast_proto::kserve::grpc_inference_service_client::GrpcInferenceServiceClient;
use framecast_proto::kserve::model_infer_request::InferRequestedOutputTensor;
use framecast_proto::kserve::{
    ModelInferRequest, SystemSharedMemoryRegisterRequest, SystemSharedMemoryUnregisterRequest,
};
use framecast_proto::shm::{tensor_params, OwnedObject, ShmError};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use tonic::transport::Channel;
use tonic::Request;

/// Slots per replica at most; past that, batches go over gRPC rather than wait.
const MAX_SLOTS: usize = 16;
/// Slot sizes round up to this, so batches of slightly different sizes share slots.
const GRANULE: usize = 1 << 20;

const UNKNOWN: u8 = 0;
const ON: u8 = 1;
const OFF: u8 = 2;

struct Slot {
    object: OwnedObject,
    name: String,
    /// Pool generation at registration; older slots were forgotten by a restarted server.
    generation: u64,
}

/// The shared-memory slots of one replica.
pub struct ShmPool {
    client: GrpcInferenceServiceClient<Channel>,
    token: Option<String>,
    url: String,
    prefix: String,
    state: AtomicU8,
    generation: AtomicU64,
    next: AtomicU64,
    live: AtomicUsize,
    free: Mutex<Vec<Slot>>,
}

/// A slot lent to one batch; back to the pool on drop.
pub struct Lease {
    pool: Arc<ShmPool>,
    slot: Option<Slot>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            if slot.generation == self.pool.generation.load(Ordering::Acquire) {
                self.pool.free.lock().push(slot);
            } else {
                self.pool.live.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

impl Lease {
    fn slot(&self) -> &Slot {
        // A lease holds its slot from creation until drop.
        self.slot.as_ref().expect("lease without slot")
    }

    /// Moves the request's tensors into the slot: every raw input, then room for `output`.
    pub fn attach(
        &self,
        req: &mut ModelInferRequest,
        output: &str,
        output_bytes: usize,
    ) -> Result<(), ShmError> {
        let slot = self.slot();
        let raw = std::mem::take(&mut req.raw_input_contents);
        let mut offset = 0;
        // Inputs named from the replica's tensor cache carry no bytes.
        let with_bytes = req.inputs.iter_mut().filter(|i| {
            !i.parameters
                .contains_key(framecast_proto::tensorcache::PARAM_TENSOR)
        });
        for (input, data) in with_bytes.zip(&raw) {
            slot.object.mapping().write(offset, data)?;
            input.parameters = tensor_params(&slot.name, data.len(), offset);
            offset += data.len();
        }
        req.outputs = vec![InferRequestedOutputTensor {
            name: output.to_string(),
            parameters: tensor_params(&slot.name, output_bytes, offset),
        }];
        Ok(())
    }

    /// The result the server wrote at `offset`, without a copy; the slot returns to the pool
    /// when every clone of the returned `Bytes` is dropped.
    pub fn result(self, offset: usize, len: usize) -> Result<Bytes, ShmError> {
        let size = self.slot().object.mapping().len();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(ShmError::OutOfRange {
                offset: offset as u64,
                end: offset as u64 + len as u64,
                len: size as u64,
            });
        }
        Ok(Bytes::from_owner(View {
            lease: self,
            offset,
            len,
        }))
    }
}

struct View {
    lease: Lease,
    offset: usize,
    len: usize,
}

impl AsRef<[u8]> for View {
    fn as_ref(&self) -> &[u8] {
        &self.lease.slot().object.mapping().as_slice()[self.offset..self.offset + self.len]
    }
}

impl ShmPool {
    pub fn new(
        client: GrpcInferenceServiceClient<Channel>,
        token: Option<String>,
        url: &str,
        replica: u64,
    ) -> Self {
        ShmPool {
            client,
            token,
            url: url.to_string(),
            // pid and a clock nonce: two compositors on one host never share a name.
            prefix: format!(
                "framecast_{}_{:x}_r{replica}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos())
                    .unwrap_or(0)
            ),
            state: AtomicU8::new(UNKNOWN),
            generation: AtomicU64::new(0),
            next: AtomicU64::new(0),
            live: AtomicUsize::new(0),
            free: Mutex::new(Vec::new()),
        }
    }

    /// Whether batches to this replica use shared memory (false until the first succeeds).
    pub fn active(&self) -> bool {
        self.state.load(Ordering::Acquire) == ON
    }

    /// Whether batches may still go through shared memory (not known to be unavailable).
    pub fn usable(&self) -> bool {
        self.state.load(Ordering::Acquire) != OFF
    }

    /// A registered slot of at least `bytes`, or None: pool off, full, or registration failed.
    pub async fn lease(self: &Arc<Self>, bytes: usize) -> Option<Lease> {
        if self.state.load(Ordering::Acquire) == OFF {
            return None;
        }
        let generation = self.generation.load(Ordering::Acquire);
        let (fit, too_small) = {
            let mut free = self.free.lock();
            let fit = free
                .iter()
                .position(|s| s.object.mapping().len() >= bytes)
                .map(|i| free.swap_remove(i));
            // Every slot too small for this batch and no room for another: replace one.
            let full = self.live.load(Ordering::Acquire) >= MAX_SLOTS;
            let too_small = if fit.is_none() && full {
                free.pop()
            } else {
                None
            };
            (fit, too_small)
        };
        if let Some(slot) = fit {
            return Some(self.lend(slot));
        }
        if let Some(slot) = too_small {
            self.live.fetch_sub(1, Ordering::AcqRel);
            self.forget(slot);
        }
        if self.live.fetch_add(1, Ordering::AcqRel) >= MAX_SLOTS {
            self.live.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        match self.create(bytes, generation).await {
            Ok(slot) => {
                if self.state.swap(ON, Ordering::AcqRel) == UNKNOWN {
                    tracing::info!(replica = %self.url, "batches travel through shared memory");
                }
                Some(self.lend(slot))
            }
            Err(e) => {
                self.live.fetch_sub(1, Ordering::AcqRel);
                if self.state.load(Ordering::Acquire) == UNKNOWN {
                    self.state.store(OFF, Ordering::Release);
                    tracing::info!(replica = %self.url, reason = %e, "shared memory unavailable; batches travel over gRPC");
                } else {
                    tracing::warn!(replica = %self.url, error = %e, "shared-memory slot not created");
                }
                None
            }
        }
    }

    /// The server forgot our regions (it restarted): drop every slot; new ones register anew.
    pub fn reset(&self) {
        drop(self.retire_slots());
    }

    /// The replica left the pool: unregister the idle slots from it. Slots still lent to
    /// batches are dropped when they come back.
    pub fn retire(&self) {
        for slot in self.retire_slots() {
            self.forget(slot);
        }
    }

    /// Starts a new generation (slots of older ones are not reused) and hands over the idle
    /// slots of the old one.
    fn retire_slots(&self) -> Vec<Slot> {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let stale: Vec<Slot> = std::mem::take(&mut *self.free.lock());
        self.live.fetch_sub(stale.len(), Ordering::AcqRel);
        stale
    }

    fn lend(self: &Arc<Self>, slot: Slot) -> Lease {
        Lease {
            pool: self.clone(),
            slot: Some(slot),
        }
    }

    async fn create(&self, bytes: usize, generation: u64) -> Result<Slot, String> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}_s{n}", self.prefix);
        let key = format!("/{name}");
        let size = bytes.div_ceil(GRANULE).max(1) * GRANULE;
        let object = tokio::task::spawn_blocking(move || OwnedObject::create(&key, size as u64))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let register = SystemSharedMemoryRegisterRequest {
            name: name.clone(),
            key: object.key().to_string(),
            offset: 0,
            byte_size: size as u64,
        };
        let register = authorize(Request::new(register), self.token.as_deref())
            .map_err(|s| s.message().to_string())?;
        self.client
            .clone()
            .system_shared_memory_register(register)
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
        Ok(Slot {
            object,
            name,
            generation,
        })
    }

    /// Unregisters a slot we no longer use; its object is removed when `slot` drops.
    fn forget(&self, slot: Slot) {
        let mut client = self.client.clone();
        let token = self.token.clone();
        tokio::spawn(async move {
            let request = SystemSharedMemoryUnregisterRequest {
                name: slot.name.clone(),
            };
            if let Ok(request) = authorize(Request::new(request), token.as_deref()) {
                let _ = client.system_shared_memory_unregister(request).await;
            }
            drop(slot);
        });
    }
}
