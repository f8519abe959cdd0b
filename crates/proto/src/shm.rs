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

/// `statfs.f_type` of tmpfs, the file system behind `/dev/shm`.
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Why a shared-memory object cannot be opened or accessed.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    #[error("key '{0}' is not a shared-memory name: use one component such as '/framecast_in'")]
    BadKey(String),
    #[error("shared-memory key '{key}': {source}")]
    Open { key: String, source: io::Error },
    #[error("shared-memory key '{key}' refused: {reason}")]
    NotAnObject { key: String, reason: &'static str },
    #[error("shared-memory key '{key}' holds {size} bytes; offset {offset} + byte_size {len} does not fit")]
    TooSmall {
        key: String,
        size: u64,
        offset: u64,
        len: u64,
    },
    #[error("bytes {offset}..{end} lie outside the {len}-byte region")]
    OutOfRange { offset: u64, end: u64, len: u64 },
    #[error("shared-memory key '{key}': the object shrank under the mapping while it was in use (its pages were replaced with zeros)")]
    Shrunk { key: String },
    #[error("shared-memory key '{key}': {guarded} objects are mapped already, the most this process guards")]
    TooManyMappings { key: String, guarded: usize },
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

/// Opens `path` as a client's shared-memory object, refusing anything else a local user could
/// plant under that name: a symbolic link (`O_NOFOLLOW`), a FIFO or device (`O_NONBLOCK`, then
/// only regular files), or a file outside tmpfs.
fn open_object(key: &str, path: &std::path::Path) -> Result<File, ShmError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let refuse = |reason| ShmError::NotAnObject {
        key: key.to_string(),
        reason,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::ELOOP) => refuse("it is a symbolic link"),
            _ => ShmError::Open {
                key: key.to_string(),
                source,
            },
        })?;
    let kind = file
        .metadata()
        .map_err(|source| ShmError::Open {
            key: key.to_string(),
            source,
        })?
        .file_type();
    if !kind.is_file() {
        return Err(refuse(if kind.is_dir() {
            "it is a directory"
        } else if kind.is_fifo() || kind.is_socket() {
            "it is a FIFO or socket, not a regular file"
        } else {
            "it is not a regular file"
        }));
    }
    if !on_tmpfs(&file) {
        return Err(refuse("it is not on the shared-memory file system (tmpfs)"));
    }
    Ok(file)
}

/// Whether `file` lives on tmpfs (`fstatfs`).
fn on_tmpfs(file: &File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: fstatfs writes into the zeroed struct we own, on a descriptor we own.
    unsafe {
        let mut fs: libc::statfs = std::mem::zeroed();
        libc::fstatfs(file.as_raw_fd(), &mut fs) == 0 && fs.f_type as i64 == TMPFS_MAGIC
    }
}

/// A mapped window `[offset, offset + len)` of a shared-memory object.
///
/// The object belongs to another process, which may shrink it at any time: [`Mapping::check`]
/// compares its size now with the window before a use, and a fault during a use is caught by
/// the [`fault_guard`](crate::fault_guard) (the copy completes with zeros and
/// [`Mapping::is_broken`] turns true).
pub struct Mapping {
    key: String,
    offset: u64,
    // Declared before `map`: the guard is released before the pages are unmapped.
    guard: crate::fault_guard::Guard,
    map: memmap2::MmapRaw,
    file: File,
}

impl Mapping {
    /// Maps part of an existing object, read-write.
    pub fn open(key: &str, offset: u64, len: u64) -> Result<Self, ShmError> {
        let path = key_path(key)?;
        let file = open_object(key, &path)?;
        let size = object_size(key, &file)?;
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(ShmError::TooSmall {
                key: key.to_string(),
                size,
                offset,
                len,
            });
        }
        Self::map(key, file, offset, len)
    }

    fn map(key: &str, file: File, offset: u64, len: u64) -> Result<Self, ShmError> {
        let open_err = |source| ShmError::Open {
            key: key.to_string(),
            source,
        };
        let len =
            usize::try_from(len).map_err(|_| open_err(io::Error::other("region too large")))?;
        let map = memmap2::MmapOptions::new()
            .offset(offset)
            .len(len)
            .map_raw(&file)
            .map_err(open_err)?;
        let guard = crate::fault_guard::Guard::new(map.as_ptr(), map.len()).ok_or_else(|| {
            ShmError::TooManyMappings {
                key: key.to_string(),
                guarded: crate::fault_guard::CAPACITY,
            }
        })?;
        Ok(Mapping {
            key: key.to_string(),
            offset,
            guard,
            map,
            file,
        })
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// Whether the object shrank under a use of this mapping; see [`Mapping`].
    pub fn is_broken(&self) -> bool {
        self.guard.is_broken()
    }

    /// Whether the whole window is still backed by the object (it may have been truncated
    /// since it was mapped) and no use has faulted. One `fstat`.
    pub fn check(&self) -> Result<(), ShmError> {
        let size = object_size(&self.key, &self.file)?;
        let needed = self.offset + self.map.len() as u64;
        if self.is_broken() || size < needed {
            return Err(ShmError::TooSmall {
                key: self.key.clone(),
                size,
                offset: self.offset,
                len: self.map.len() as u64,
            });
        }
        Ok(())
    }

    /// Whether the object has been removed from `/dev/shm` (every name of it unlinked): its
    /// owner is gone or cleaned up.
    pub fn is_unlinked(&self) -> bool {
        self.file
            .metadata()
            .map_or(true, |m| std::os::unix::fs::MetadataExt::nlink(&m) == 0)
    }

    fn in_range(&self, offset: usize, len: usize) -> Result<(), ShmError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(ShmError::OutOfRange {
                offset: offset as u64,
                end: offset as u64 + len as u64,
                len: self.len() as u64,
            }),
        }
    }

    fn unbroken(&self) -> Result<(), ShmError> {
        if self.is_broken() {
            return Err(ShmError::Shrunk {
                key: self.key.clone(),
            });
        }
        Ok(())
    }

    /// Copies `data` into the mapping at `offset`.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), ShmError> {
        self.in_range(offset, data.len())?;
        // SAFETY: the range was checked against the mapping; raw copies (no references into
        // memory another process may write) keep this sound whatever that process does, and
        // the fault guard turns a truncated object's SIGBUS into `Shrunk`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.map.as_mut_ptr().add(offset),
                data.len(),
            )
        };
        self.unbroken()
    }

    /// Copies `out.len()` bytes at `offset` out of the mapping.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<(), ShmError> {
        self.in_range(offset, out.len())?;
        // SAFETY: as in `write`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.map.as_ptr().add(offset),
                out.as_mut_ptr(),
                out.len(),
            )
        };
        self.unbroken()
    }

    /// The mapping as a slice. Sound while no process writes the range, which the protocol
    /// requires of clients for regions named by in-flight requests; a reader checks
    /// [`Mapping::is_broken`] after use, since a truncated object reads as zeros.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping lives as long as `self`; see the method's contract.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr(), self.map.len()) }
    }
}

fn object_size(key: &str, file: &File) -> Result<u64, ShmError> {
    file.metadata()
        .map(|m| m.len())
        .map_err(|source| ShmError::Open {
            key: key.to_string(),
            source,
        })
}

/// A shared-memory object this process created; removed from `/dev/shm` on drop.
pub struct OwnedObject {
    key: String,
    path: PathBuf,
    mapping: Mapping,
}

impl OwnedObject {
    /// Creates the object `key` with `size` zero bytes, replacing any object of that name,
    /// and maps all of it. The old name is unlinked and the new object created exclusively
    /// (`O_EXCL | O_NOFOLLOW`, mode 0600), so a link planted under the name by another local
    /// user is removed, never followed.
    pub fn create(key: &str, size: u64) -> Result<Self, ShmError> {
        use std::os::unix::fs::OpenOptionsExt;
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
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(open_err(e)),
            _ => {}
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
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
        let mapping = Mapping::map(key, file, 0, size).inspect_err(|_| {
            let _ = std::fs::remove_file(&path);
        })?;
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

    fn unique_key(what: &str) -> String {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        format!("/framecast_test_{what}_{}_{n}", std::process::id())
    }

    fn refusal(r: Result<Mapping, ShmError>) -> &'static str {
        match r {
            Err(ShmError::NotAnObject { reason, .. }) => reason,
            Err(e) => panic!("expected a refusal, got {e}"),
            Ok(_) => panic!("expected a refusal, got a mapping"),
        }
    }

    #[test]
    fn a_symbolic_link_in_dev_shm_is_refused_not_followed() {
        let target = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(target.path(), vec![7u8; 4096]).unwrap();
        let key = unique_key("link");
        let link = key_path(&key).unwrap();
        std::os::unix::fs::symlink(target.path(), &link).unwrap();
        let reason = refusal(Mapping::open(&key, 0, 4096));
        std::fs::remove_file(&link).unwrap();
        assert!(reason.contains("symbolic link"), "{reason}");
    }

    #[test]
    fn fifos_directories_and_files_off_tmpfs_are_refused() {
        let key = unique_key("fifo");
        let path = key_path(&key).unwrap();
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo on a path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let reason = refusal(Mapping::open(&key, 0, 1));
        std::fs::remove_file(&path).unwrap();
        assert!(reason.contains("FIFO"), "{reason}");

        let key = unique_key("dir");
        let path = key_path(&key).unwrap();
        std::fs::create_dir(&path).unwrap();
        let r = Mapping::open(&key, 0, 1);
        std::fs::remove_dir(&path).unwrap();
        assert!(r.is_err());

        // The crate's own source file sits on a disk file system, not tmpfs.
        let on_disk = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let e = open_object("/x", std::path::Path::new(on_disk)).unwrap_err();
        assert!(
            matches!(e, ShmError::NotAnObject { reason, .. } if reason.contains("tmpfs")),
            "{on_disk}"
        );
    }

    #[test]
    fn creating_an_object_replaces_a_planted_link_instead_of_truncating_its_target() {
        let target = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(target.path(), b"precious").unwrap();
        let key = unique_key("plant");
        std::os::unix::fs::symlink(target.path(), key_path(&key).unwrap()).unwrap();
        let owned = OwnedObject::create(&key, 4096).unwrap();
        assert_eq!(std::fs::read(target.path()).unwrap(), b"precious");
        assert!(!std::fs::symlink_metadata(key_path(&key).unwrap())
            .unwrap()
            .file_type()
            .is_symlink());
        drop(owned);
    }

    #[test]
    fn an_object_truncated_under_a_mapping_breaks_the_mapping_instead_of_killing_the_process() {
        let key = unique_key("shrink");
        let owner = OwnedObject::create(&key, 3 * 4096).unwrap();
        owner.mapping().write(0, &[9u8; 3 * 4096]).unwrap();
        let view = Mapping::open(&key, 0, 3 * 4096).unwrap();
        view.check().unwrap();
        OpenOptions::new()
            .write(true)
            .open(key_path(&key).unwrap())
            .unwrap()
            .set_len(4096)
            .unwrap();
        // Caught before a use: the size is checked against the object as it is now.
        assert!(matches!(
            view.check(),
            Err(ShmError::TooSmall { size: 4096, .. })
        ));
        // Used anyway (the race the check cannot close): the fault is survived, the copy
        // completes with zeros, and the mapping says it is broken.
        let mut out = vec![1u8; 3 * 4096];
        assert!(matches!(
            view.read(0, &mut out),
            Err(ShmError::Shrunk { .. })
        ));
        assert!(view.is_broken());
        // Pages the object lost can only have been read after the repair: zeros.
        assert!(
            out[4096..].iter().all(|&b| b == 0),
            "a broken mapping reads zeros"
        );
        assert!(view.write(8192, b"gone").is_err());
        // Other mappings are untouched by the repair.
        let other_key = unique_key("other");
        let other = OwnedObject::create(&other_key, 4096).unwrap();
        other.mapping().write(0, b"fine").unwrap();
        assert!(!other.mapping().is_broken());
        drop(view);
        drop(owner);
    }
}
