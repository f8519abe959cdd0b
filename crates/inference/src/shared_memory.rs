//! Registered system shared-memory regions (the protocol's `system_shared_memory` extension).
//!
//! A region stays mapped while any request still holds it, so unregistering one under load is
//! safe: in-flight requests finish with the mapping they started with.

use bytes::Bytes;
use framecast_proto::shm::{Mapping, ShmError};
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;
use tonic::Status;

/// One registered region.
pub struct Region {
    pub name: String,
    pub key: String,
    pub offset: u64,
    pub mapping: Mapping,
}

/// A tensor's place inside a region: `[offset, offset + len)`.
#[derive(Clone)]
pub struct Slot {
    pub region: Arc<Region>,
    pub offset: usize,
    pub len: usize,
}

impl Slot {
    /// The slot's bytes without a copy; the mapping lives as long as the returned `Bytes`.
    pub fn bytes(&self) -> Bytes {
        Bytes::from_owner(self.clone())
    }

    /// Writes a result into the slot; `data` may be shorter than the slot.
    pub fn write(&self, data: &[u8]) -> Result<(), ShmError> {
        if data.len() > self.len {
            return Err(ShmError::OutOfRange {
                offset: self.offset as u64,
                end: (self.offset + data.len()) as u64,
                len: (self.offset + self.len) as u64,
            });
        }
        self.region.mapping.write(self.offset, data)
    }
}

impl AsRef<[u8]> for Slot {
    fn as_ref(&self) -> &[u8] {
        &self.region.mapping.as_slice()[self.offset..self.offset + self.len]
    }
}

/// The server's table of regions, by name.
#[derive(Default)]
pub struct SharedMemory {
    regions: RwLock<HashMap<String, Arc<Region>>>,
}

impl SharedMemory {
    pub fn register(&self, name: &str, key: &str, offset: u64, len: u64) -> Result<(), Status> {
        if name.is_empty() {
            return Err(Status::invalid_argument("name: a region needs a name"));
        }
        if self.regions.read().contains_key(name) {
            return Err(Status::already_exists(format!(
                "shared-memory region '{name}' is already registered"
            )));
        }
        let mapping = Mapping::open(key, offset, len).map_err(|e| match e {
            ShmError::Open { ref source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                Status::not_found(format!("key: {e}"))
            }
            _ => Status::invalid_argument(format!("key: {e}")),
        })?;
        let region = Arc::new(Region {
            name: name.to_string(),
            key: key.to_string(),
            offset,
            mapping,
        });
        let mut regions = self.regions.write();
        // A region whose object is gone from /dev/shm belongs to a client that cleaned up (or
        // died) without unregistering: forget it rather than keep its memory mapped forever.
        regions.retain(|_, r| framecast_proto::shm::key_path(&r.key).is_ok_and(|p| p.exists()));
        if regions.contains_key(name) {
            return Err(Status::already_exists(format!(
                "shared-memory region '{name}' is already registered"
            )));
        }
        regions.insert(name.to_string(), region);
        tracing::info!(
            region = name,
            key,
            offset,
            bytes = len,
            "shared memory registered"
        );
        Ok(())
    }

    /// Forgets `name`, or every region when `name` is empty; unknown names are not an error.
    pub fn unregister(&self, name: &str) {
        let mut regions = self.regions.write();
        if name.is_empty() {
            regions.clear();
        } else {
            regions.remove(name);
        }
    }

    /// Regions named `name`, or all of them when it is empty.
    pub fn status(&self, name: &str) -> Result<Vec<Arc<Region>>, Status> {
        let regions = self.regions.read();
        if name.is_empty() {
            return Ok(regions.values().cloned().collect());
        }
        regions
            .get(name)
            .map(|r| vec![r.clone()])
            .ok_or_else(|| not_registered(name))
    }

    /// The slot `[offset, offset + len)` of region `name`; `field` names the request field in
    /// errors.
    pub fn slot(&self, field: &str, name: &str, offset: u64, len: u64) -> Result<Slot, Status> {
        let region = self
            .regions
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| not_registered(name))
            .map_err(|s| Status::new(s.code(), format!("{field}: {}", s.message())))?;
        let size = region.mapping.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Status::invalid_argument(format!(
                "{field}: offset {offset} + byte_size {len} exceeds region '{name}' ({size} bytes)"
            )));
        }
        Ok(Slot {
            region,
            offset: offset as usize,
            len: len as usize,
        })
    }
}

fn not_registered(name: &str) -> Status {
    Status::not_found(format!("shared-memory region '{name}' is not registered"))
}
