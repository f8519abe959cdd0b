//! Registered system shared-memory regions (the protocol's `system_shared_memory` extension).
//!
//! A region stays mapped while any request still holds it, so unregistering one under load is
//! safe: in-flight requests finish with the mapping they started with.
//!
//! Regions belong to an [`Owner`]: the credential that registered them. Without authentication
//! every caller is the same anonymous owner and the table is global, as in Triton. With a
//! bearer token or a client certificate, a caller sees, uses and unregisters only its own
//! regions; another owner's names answer NOT_FOUND as if they did not exist.

use crate::error::{invalid, Error};
use bytes::Bytes;
use framecast_proto::shm::{Mapping, ShmError};
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;

/// Regions a server keeps registered unless told otherwise (`--max-shm-regions`).
pub const DEFAULT_MAX_REGIONS: usize = 1024;
/// Regions one client may hold unless told otherwise (`--max-shm-regions-per-client`): a
/// compositor holds a few per replica.
pub const DEFAULT_MAX_REGIONS_PER_CLIENT: usize = 256;

/// Who registered a region: the caller's credential bytes (bearer token and/or client
/// certificate), empty for an anonymous caller on a server without authentication.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Owner(Arc<[u8]>);

impl Owner {
    /// The owner of every region on a server without authentication.
    pub fn anonymous() -> Owner {
        Owner::default()
    }

    /// An owner named by its credential parts (token, certificate); empty parts are skipped.
    pub fn from_credentials<'a>(parts: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Owner {
        let mut key = Vec::new();
        for (kind, bytes) in parts {
            if !bytes.is_empty() {
                key.extend_from_slice(kind.as_bytes());
                key.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
                key.extend_from_slice(bytes);
            }
        }
        Owner(key.into())
    }

    /// The owner as a string key (hex), for maps keyed by strings. It holds the credential:
    /// never log it.
    pub fn key(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Debug for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the credential itself.
        f.write_str(if self.0.is_empty() {
            "Owner(anonymous)"
        } else {
            "Owner(credential)"
        })
    }
}

/// One registered region.
pub struct Region {
    pub name: String,
    pub key: String,
    pub offset: u64,
    pub mapping: Mapping,
    owner: Owner,
    /// Whose share it counts against ([`framecast_proto::client`]).
    client: String,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("name", &self.name)
            .field("key", &self.key)
            .field("bytes", &self.mapping.len())
            .finish()
    }
}

/// A tensor's place inside a region: `[offset, offset + len)`.
#[derive(Clone, Debug)]
pub struct Window {
    pub region: Arc<Region>,
    pub offset: usize,
    pub len: usize,
}

impl Window {
    /// The window's bytes without a copy; the mapping lives as long as the returned `Bytes`.
    pub fn bytes(&self) -> Bytes {
        Bytes::from_owner(self.clone())
    }

    /// Writes a result into the window; `data` may be shorter than the window.
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

impl AsRef<[u8]> for Window {
    fn as_ref(&self) -> &[u8] {
        &self.region.mapping.as_slice()[self.offset..self.offset + self.len]
    }
}

/// The server's table of regions, by owner and name.
pub struct SharedMemory {
    regions: RwLock<Table>,
    max_regions: usize,
    per_client: usize,
}

#[derive(Default)]
struct Table {
    by_owner: HashMap<Owner, HashMap<String, Arc<Region>>>,
    count: usize,
    by_client: HashMap<String, usize>,
}

impl Default for SharedMemory {
    fn default() -> Self {
        SharedMemory::new(DEFAULT_MAX_REGIONS, DEFAULT_MAX_REGIONS_PER_CLIENT)
    }
}

impl SharedMemory {
    /// A table holding at most `max_regions` regions, all owners together, and at most
    /// `per_client` of one client.
    pub fn new(max_regions: usize, per_client: usize) -> Self {
        SharedMemory {
            regions: RwLock::default(),
            max_regions,
            per_client: per_client.clamp(1, max_regions.max(1)),
        }
    }

    /// Registers `name` for `owner`, counted against `client`'s share; O(1) in the number of
    /// regions already registered.
    pub fn register(
        &self,
        owner: &Owner,
        client: &str,
        name: &str,
        key: &str,
        offset: u64,
        len: u64,
    ) -> Result<(), Error> {
        if name.is_empty() {
            return Err(invalid("name: a region needs a name"));
        }
        let full = |count| {
            Error::Exhausted(format!(
                "name: {count} shared-memory regions are registered, the server's limit (--max-shm-regions {}); unregister regions you no longer use",
                self.max_regions
            ))
        };
        let client_full = |count| {
            Error::Exhausted(format!(
                "name: this client has {count} shared-memory regions registered, its share (--max-shm-regions-per-client {}); unregister regions you no longer use",
                self.per_client
            ))
        };
        let room = |table: &Table| {
            if table.get(owner, name).is_some() {
                return Err(already(name));
            }
            if table.count >= self.max_regions {
                return Err(full(table.count));
            }
            let mine = table.by_client.get(client).copied().unwrap_or(0);
            if mine >= self.per_client {
                return Err(client_full(mine));
            }
            Ok(())
        };
        room(&self.regions.read())?;
        let mapping = Mapping::open(key, offset, len).map_err(|e| match e {
            ShmError::Open { ref source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                Error::NotFound(format!("key: {}", framecast_proto::echo(&e.to_string())))
            }
            ShmError::TooManyMappings { .. } => Error::Exhausted(format!("key: {e}")),
            _ => invalid(format!("key: {}", framecast_proto::echo(&e.to_string()))),
        })?;
        let region = Arc::new(Region {
            name: name.to_string(),
            key: key.to_string(),
            offset,
            mapping,
            owner: owner.clone(),
            client: client.to_string(),
        });
        let mut table = self.regions.write();
        // Checked again under the write lock: another registration may have come between.
        room(&table)?;
        table
            .by_owner
            .entry(owner.clone())
            .or_default()
            .insert(name.to_string(), region);
        table.count += 1;
        *table.by_client.entry(client.to_string()).or_default() += 1;
        tracing::info!(
            region = framecast_proto::echo(name).as_ref(),
            key = framecast_proto::echo(key).as_ref(),
            offset,
            bytes = len,
            "shared memory registered"
        );
        Ok(())
    }

    /// Forgets `owner`'s region `name`, or all of `owner`'s regions when `name` is empty;
    /// unknown names are not an error.
    pub fn unregister(&self, owner: &Owner, name: &str) {
        let mut table = self.regions.write();
        let Some(mine) = table.by_owner.get_mut(owner) else {
            return;
        };
        let removed: Vec<Arc<Region>> = if name.is_empty() {
            std::mem::take(mine).into_values().collect()
        } else {
            mine.remove(name).into_iter().collect()
        };
        if mine.is_empty() {
            table.by_owner.remove(owner);
        }
        for r in &removed {
            table.forget_client(&r.client);
        }
    }

    /// `owner`'s regions named `name`, or all of them when it is empty.
    pub fn status(&self, owner: &Owner, name: &str) -> Result<Vec<Arc<Region>>, Error> {
        let table = self.regions.read();
        if name.is_empty() {
            return Ok(table
                .by_owner
                .get(owner)
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default());
        }
        table
            .get(owner, name)
            .map(|r| vec![r.clone()])
            .ok_or_else(|| Error::RegionUnknown(not_registered(name)))
    }

    /// The window `[offset, offset + len)` of `owner`'s region `name`; `field` names the request
    /// field in errors. The region's object is checked to still cover the registered window
    /// (a client may have shrunk it since): if not, the region is unregistered and the request
    /// refused.
    pub fn window(
        &self,
        owner: &Owner,
        field: &str,
        name: &str,
        offset: u64,
        len: u64,
    ) -> Result<Window, Error> {
        let region = self
            .regions
            .read()
            .get(owner, name)
            .cloned()
            .ok_or_else(|| Error::RegionUnknown(format!("{field}: {}", not_registered(name))))?;
        if let Err(e) = region.mapping.check() {
            self.forget(&region);
            return Err(invalid(format!(
                "{field}: {e}; region '{}' was unregistered",
                framecast_proto::echo(name)
            )));
        }
        let size = region.mapping.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(invalid(format!(
                "{field}: offset {offset} + byte_size {len} exceeds region '{}' ({size} bytes)",
                framecast_proto::echo(name)
            )));
        }
        Ok(Window {
            region,
            offset: offset as usize,
            len: len as usize,
        })
    }

    /// After a request used `regions`: an error naming the first whose object shrank during
    /// the use (its pages were replaced with zeros, so what was read or written is void), which
    /// is then unregistered.
    pub fn check_used<'a>(
        &self,
        regions: impl IntoIterator<Item = &'a Arc<Region>>,
    ) -> Result<(), Error> {
        for r in regions {
            if r.mapping.is_broken() {
                self.forget(r);
                return Err(invalid(format!(
                    "shared-memory region '{}': its object shrank while this request used it (key '{}'); the region was unregistered",
                    framecast_proto::echo(&r.name),
                    framecast_proto::echo(&r.key)
                )));
            }
        }
        Ok(())
    }

    /// Unregisters this very region (not a newer one registered under its name since).
    fn forget(&self, region: &Arc<Region>) {
        if self.regions.write().remove_exact(region) {
            tracing::warn!(
                region = framecast_proto::echo(&region.name).as_ref(),
                "shared memory unregistered: its object shrank"
            );
        }
    }

    /// Forgets regions whose object is gone from `/dev/shm` (a client that cleaned up or died
    /// without unregistering) or shrank below its window; returns how many. Runs off the
    /// request path, on [`SharedMemory::sweep_every`]'s task.
    pub fn sweep(&self) -> usize {
        let stale: Vec<Arc<Region>> = {
            let table = self.regions.read();
            table
                .by_owner
                .values()
                .flat_map(HashMap::values)
                .filter(|r| r.mapping.is_unlinked() || r.mapping.check().is_err())
                .cloned()
                .collect()
        };
        let mut table = self.regions.write();
        let removed = stale.iter().filter(|r| table.remove_exact(r)).count();
        if removed > 0 {
            tracing::info!(removed, "stale shared-memory regions swept");
        }
        removed
    }

    /// Sweeps every `period` on a task of its own, for as long as the table exists.
    pub fn sweep_every(self: &Arc<Self>, period: std::time::Duration) {
        framecast_telemetry::periodic::every(self, period, |shm| async move {
            // Each region costs an fstat: keep it off the async workers.
            tokio::task::spawn_blocking(move || shm.sweep())
                .await
                .is_ok()
        });
    }

    /// Regions registered, all owners together.
    pub fn len(&self) -> usize {
        self.regions.read().count
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Table {
    fn get(&self, owner: &Owner, name: &str) -> Option<&Arc<Region>> {
        self.by_owner.get(owner).and_then(|m| m.get(name))
    }

    /// Removes this very region (not a newer one registered under its name since); false if
    /// it is no longer in the table.
    fn remove_exact(&mut self, region: &Arc<Region>) -> bool {
        let Some(mine) = self.by_owner.get_mut(&region.owner) else {
            return false;
        };
        if !mine
            .get(&region.name)
            .is_some_and(|r| Arc::ptr_eq(r, region))
        {
            return false;
        }
        mine.remove(&region.name);
        if mine.is_empty() {
            self.by_owner.remove(&region.owner);
        }
        self.forget_client(&region.client);
        true
    }

    /// One region of `client` fewer.
    fn forget_client(&mut self, client: &str) {
        self.count -= 1;
        if let Some(n) = self.by_client.get_mut(client) {
            *n -= 1;
            if *n == 0 {
                self.by_client.remove(client);
            }
        }
    }
}

fn already(name: &str) -> Error {
    Error::RegionExists(format!(
        "shared-memory region '{}' is already registered",
        framecast_proto::echo(name)
    ))
}

fn not_registered(name: &str) -> String {
    format!(
        "shared-memory region '{}' is not registered",
        framecast_proto::echo(name)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use framecast_proto::shm::OwnedObject;

    fn object(tag: &str) -> OwnedObject {
        let key = format!("/framecast_sm_{tag}_{}", std::process::id());
        OwnedObject::create(&key, 8192).unwrap()
    }

    #[test]
    fn registrations_past_the_limit_are_refused_and_unregistering_frees_room() {
        let shm = SharedMemory::new(2, 2);
        let o = object("limit");
        let me = Owner::anonymous();
        shm.register(&me, "address 127.0.0.1", "a", o.key(), 0, 4096)
            .unwrap();
        shm.register(&me, "address 127.0.0.1", "b", o.key(), 4096, 4096)
            .unwrap();
        let e = shm
            .register(&me, "address 127.0.0.1", "c", o.key(), 0, 1)
            .unwrap_err();
        assert!(matches!(e, Error::Exhausted(_)), "{e:?}");
        assert!(e.to_string().contains("--max-shm-regions 2"), "{e}");
        shm.unregister(&me, "a");
        shm.register(&me, "address 127.0.0.1", "c", o.key(), 0, 1)
            .unwrap();
        assert_eq!(shm.len(), 2);
        shm.unregister(&me, "");
        assert!(shm.is_empty());
    }

    #[test]
    fn owners_see_and_touch_only_their_own_regions() {
        let shm = SharedMemory::default();
        let o = object("owners");
        let alice = Owner::from_credentials([("token", b"alice".as_slice())]);
        let bob = Owner::from_credentials([("token", b"bob".as_slice())]);
        shm.register(&alice, "address 127.0.0.1", "r", o.key(), 0, 4096)
            .unwrap();
        assert!(shm.status(&bob, "").unwrap().is_empty());
        assert_eq!(
            shm.status(&bob, "r").unwrap_err().to_string(),
            "shared-memory region 'r' is not registered"
        );
        let e = shm.window(&bob, "inputs[0]", "r", 0, 16).unwrap_err();
        assert!(matches!(e, Error::RegionUnknown(_)), "{e:?}");
        // Bob's "unregister everything" is his everything.
        shm.unregister(&bob, "");
        shm.unregister(&bob, "r");
        assert_eq!(shm.status(&alice, "").unwrap().len(), 1);
        // Names are per owner: Bob may use the same one.
        shm.register(&bob, "address 127.0.0.1", "r", o.key(), 4096, 4096)
            .unwrap();
        assert_eq!(
            shm.window(&alice, "x", "r", 0, 16).unwrap().region.offset,
            0
        );
        assert_eq!(
            shm.window(&bob, "x", "r", 0, 16).unwrap().region.offset,
            4096
        );
    }

    #[test]
    fn the_sweep_forgets_regions_whose_object_was_removed_or_shrank() {
        let shm = SharedMemory::default();
        let me = Owner::anonymous();
        let gone = object("gone");
        let shrunk = object("shrunk");
        let kept = object("kept");
        shm.register(&me, "address 127.0.0.1", "gone", gone.key(), 0, 4096)
            .unwrap();
        shm.register(&me, "address 127.0.0.1", "shrunk", shrunk.key(), 0, 8192)
            .unwrap();
        shm.register(&me, "address 127.0.0.1", "kept", kept.key(), 0, 4096)
            .unwrap();
        assert_eq!(shm.sweep(), 0);
        drop(gone);
        std::fs::OpenOptions::new()
            .write(true)
            .open(framecast_proto::shm::key_path(shrunk.key()).unwrap())
            .unwrap()
            .set_len(100)
            .unwrap();
        assert_eq!(shm.sweep(), 2);
        let left: Vec<String> = shm
            .status(&me, "")
            .unwrap()
            .iter()
            .map(|r| r.name.clone())
            .collect();
        assert_eq!(left, ["kept"]);
    }

    #[test]
    fn a_shrunk_object_is_refused_at_use_and_unregistered() {
        let shm = SharedMemory::default();
        let me = Owner::anonymous();
        let o = object("use");
        shm.register(&me, "address 127.0.0.1", "r", o.key(), 0, 8192)
            .unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(framecast_proto::shm::key_path(o.key()).unwrap())
            .unwrap()
            .set_len(0)
            .unwrap();
        let e = shm.window(&me, "inputs[0] 'x'", "r", 0, 16).unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e:?}");
        assert!(e.to_string().starts_with("inputs[0] 'x'"), "{e}");
        assert!(shm.is_empty());
    }

    /// One client (one token, or one address without authentication) cannot take every
    /// region: past its share it is refused, naming the share, and others still register.
    #[test]
    fn each_client_has_a_share_of_the_regions() {
        let shm = SharedMemory::new(4, 2);
        let o = object("share");
        let me = Owner::anonymous();
        shm.register(&me, "address 10.0.0.1", "a", o.key(), 0, 4096)
            .unwrap();
        shm.register(&me, "address 10.0.0.1", "b", o.key(), 0, 4096)
            .unwrap();
        let e = shm
            .register(&me, "address 10.0.0.1", "c", o.key(), 0, 4096)
            .unwrap_err();
        assert!(matches!(e, Error::Exhausted(_)), "{e}");
        assert!(
            e.to_string().contains("--max-shm-regions-per-client 2"),
            "{e}"
        );
        shm.register(&me, "address 10.0.0.2", "c", o.key(), 0, 4096)
            .unwrap();
        // Unregistering gives the share back.
        shm.unregister(&me, "a");
        shm.register(&me, "address 10.0.0.1", "d", o.key(), 0, 4096)
            .unwrap();
        assert_eq!(shm.len(), 3);
    }
}
