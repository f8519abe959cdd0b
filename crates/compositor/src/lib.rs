//! framecast-compositor: the CPU half of framecast.
//!
//! It keeps each avatar's background frames in RAM (`avatar_store`, `avatar`), sends the
//! model's face inputs to the inference service (`inference`, whose replicas `discovery`
//! finds), pastes the generated crops back with a feathered mask (`blend`, `mask`), encodes
//! JPEG in parallel (`encode`) and streams frames in order (`render`). `rpc` is the gRPC
//! edge, where the crate's one [`error::Error`] becomes a status; `server` is the transport.

pub mod avatar;
pub mod avatar_store;
pub mod blend;
pub mod demo;
pub mod discovery;
pub mod encode;
pub mod error;
pub mod face_contract;
pub mod face_detect;
#[doc(hidden)]
pub mod fuzzing;
pub mod idle_frames;
pub mod import;
pub mod inference;
pub mod manifest;
pub mod mask;
pub mod metrics;
pub mod planes;
pub mod prepared;
pub mod raw_frame;
pub mod render;
pub mod rpc;
pub mod segments;
pub mod server;
pub mod shm_pool;
pub mod speech;
pub mod testing;

/// Accepts only names that are one safe path component: `[A-Za-z0-9._-]`, not starting
/// with '.', so a request can never reach outside the avatar root.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} must be letters, digits, '.', '_' or '-'"))
    }
}
