//! POSIX shared memory for the `system_shared_memory` extension of the protocol (as Triton
//! defines it): a client on the same host writes tensors into a shared-memory object, registers
//! it once, and names regions of it in requests, so a 15 MB batch never travels through gRPC.
//!
//! An input or requested output names its region with three parameters: [`PARAM_REGION`]
//! (string), [`PARAM_BYTE_SIZE`] and, optionally, [`PARAM_OFFSET`] (int64). The client must not
//! write a region while a request naming it is in flight.

use crate::kserve::infer_parameter::ParameterChoice;
use crate::kserve::InferParameter;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::PathBuf;

/// Tensor parameter: name of a registered region holding (or receiving) the tensor.
pub const PARAM_REGION: &str = "shared_memory_region";
/// Tensor parameter: bytes of the region the tensor occupies.
pub const PARAM_BYTE_SIZE: &str = "shared_memory_byte_size";
/// Tensor parameter: offset of the tensor inside the region (default 0).
pub const PARAM_OFFSET: &str = "shared_memory_offset";

/// The parameters placing a tensor at `offset` in region `region`, as requests and responses
/// carry them.
pub fn tensor_params(
    region: &str,
    byte_size: usize,
    offset: usize,
) -> HashMap<String, InferParameter> {
    let p = |c| InferParameter {
        parameter_choice: Some(c),
    };
    HashMap::from([
        (
            PARAM_REGION.to_string(),
            p(ParameterChoice::StringParam(region.to_string())),
        ),
        (
            PARAM_BYTE_SIZE.to_string(),
            p(ParameterChoice::Int64Param(byte_size as i64)),
        ),
        (
            PARAM_OFFSET.to_string(),
            p(ParameterChoice::Int64Param(offset as i64)),
        ),
    ])
}

/// Where Linux keeps POSIX shared-memory objects (`shm_open` names).
const SHM_DIR: &str = "/dev/shm";

/// Why a shared-memory object cannot be opened or accessed.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    #[error("key '{0}' is not a shared-memory name: use one component such as '/framecast_in'")]
    BadKey(String),
    #[error("shared-memory key '{key}': {source}")]
    Open { key: String, source: io::Error },
    #[error("shared-memory key '{key}' holds {size} bytes; offset {offset} + byte_size {len} does not fit")]
    TooSmall {
        key: String,
        size: u64,
        offset: u64,
        len: u64,
    },
    #[error("bytes {offset}..{end} lie outside the {len}-byte region")]
    OutOfRange { offset: u64, end: u64, len: u64 },
}

/// The file behind an `shm_open` name: one path component, never a path into the file system.
pub fn key_path(key: &str) -> Result<PathBuf, ShmError> {
    let name = key.strip_prefix('/').unwrap_or(key);
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 255
        && !name.contains(['/', '\0']);
    if ok {
        Ok(PathBuf::from(SHM_DIR).join(name))
    } else {
        Err(ShmError::BadKey(key.to_string()))
    }
}

/// A mapped window `[offset, offset + len)` of a shared-memory object.
pub struct Mapping {
    map: memmap2::MmapRaw,
}

impl Mapping {
    /// Maps part of an existing object, read-write.
    pub fn open(key: &str, offset: u64, len: u64) -> Result<Self, ShmError> {
        let path = key_path(key)?;
        let open_err = |source| ShmError::Open {
            key: key.to_string(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(open_err)?;
        let size = file.metadata().map_err(open_err)?.len();
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(ShmError::TooSmall {
                key: key.to_string(),
                size,
                offset,
                len,
            });
        }
        Self::map(&file, offset, len).map_err(open_err)
    }

    fn map(file: &File, offset: u64, len: u64) -> io::Result<Self> {
        let len = usize::try_from(len).map_err(|_| io::Error::other("region too large"))?;
        let map = memmap2::MmapOptions::new()
            .offset(offset)
            .len(len)
            .map_raw(file)?;
        Ok(Mapping { map })
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), ShmError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(ShmError::OutOfRange {
                offset: offset as u64,
                end: offset as u64 + len as u64,
                len: self.len() as u64,
            }),
        }
    }

    /// Copies `data` into the mapping at `offset`.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), ShmError> {
        self.check(offset, data.len())?;
        // SAFETY: the range was checked against the mapping; raw copies (no references into
        // memory another process may write) keep this sound whatever that process does.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.map.as_mut_ptr().add(offset),
                data.len(),
            )
        };
        Ok(())
    }

    /// Copies `out.len()` bytes at `offset` out of the mapping.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<(), ShmError> {
        self.check(offset, out.len())?;
        // SAFETY: as in `write`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.map.as_ptr().add(offset),
                out.as_mut_ptr(),
                out.len(),
            )
        };
        Ok(())
    }

    /// The mapping as a slice. Sound while no process writes the range, which the protocol
    /// requires of clients for regions named by in-flight requests.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping lives as long as `self`; see the method's contract.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr(), self.map.len()) }
    }
}

/// A shared-memory object this process created; removed from `/dev/shm` on drop.
pub struct OwnedObject {
    key: String,
    path: PathBuf,
    mapping: Mapping,
}

impl OwnedObject {
    /// Creates (or truncates) the object `key` with `size` zero bytes and maps all of it.
    pub fn create(key: &str, size: u64) -> Result<Self, ShmError> {
        let path = key_path(key)?;
        let open_err = |source| ShmError::Open {
            key: key.to_string(),
            source,
        };
        if size == 0 {
            return Err(open_err(io::Error::other(
                "an object needs at least one byte",
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(open_err)?;
        file.set_len(size).map_err(open_err)?;
        // Reserve the pages now: tmpfs hands out sparse files, and touching a page past a full
        // /dev/shm (64 MiB in a default container) kills the process with SIGBUS instead of
        // failing here with ENOSPC.
        let len = libc::off_t::try_from(size)
            .map_err(|_| open_err(io::Error::other("object too large")))?;
        // SAFETY: plain system call on a descriptor we own.
        let rc = unsafe { libc::posix_fallocate(std::os::fd::AsRawFd::as_raw_fd(&file), 0, len) };
        if rc != 0 {
            let _ = std::fs::remove_file(&path);
            return Err(open_err(io::Error::from_raw_os_error(rc)));
        }
        let mapping = Mapping::map(&file, 0, size).map_err(open_err)?;
        Ok(OwnedObject {
            key: key.to_string(),
            path,
            mapping,
        })
    }

    /// The `shm_open` name to register with a server.
    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn mapping(&self) -> &Mapping {
        &self.mapping
    }
}

impl Drop for OwnedObject {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_single_components() {
        assert_eq!(key_path("/a_b").unwrap(), PathBuf::from("/dev/shm/a_b"));
        assert_eq!(key_path("a_b").unwrap(), PathBuf::from("/dev/shm/a_b"));
        for bad in ["", "/", "/..", "..", "/a/b", "a/../b", "/.", "a\0b"] {
            assert!(key_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_mapping_sees_what_the_owner_wrote_and_refuses_out_of_range() {
        let key = format!("/framecast_test_{}", std::process::id());
        let owner = OwnedObject::create(&key, 8192).unwrap();
        owner.mapping().write(4096, b"frame").unwrap();
        let view = Mapping::open(&key, 4096, 100).unwrap();
        assert_eq!(&view.as_slice()[..5], b"frame");
        let mut back = [0u8; 5];
        view.read(0, &mut back).unwrap();
        assert_eq!(&back, b"frame");
        assert!(view.write(96, b"too long").is_err());
        assert!(matches!(
            Mapping::open(&key, 8000, 500),
            Err(ShmError::TooSmall { .. })
        ));
        drop(owner);
        assert!(matches!(
            Mapping::open(&key, 0, 1),
            Err(ShmError::Open { .. })
        ));
    }
}
