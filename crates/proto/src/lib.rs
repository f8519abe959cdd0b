//! Generated protocol code for framecast and the tensor helpers both services share.
//!
//! - [`kserve`]: the KServe v2 / Open Inference Protocol (`package inference`).
//! - [`compositor::v1`]: the compositor's `Render` and avatar management API.
//! - [`tensorcache::v1`]: the inference service's tensor cache extension.
//! - [`tensor`]: datatype names, byte-length checks and typed little-endian encoding of
//!   `raw_input_contents` / `raw_output_contents`.

/// KServe v2 / Open Inference Protocol messages, client and server.
pub mod kserve {
    #![allow(clippy::large_enum_variant, clippy::doc_lazy_continuation)]
    tonic::include_proto!("inference");
}

/// The compositor's API.
pub mod compositor {
    /// Version 1 of the compositor API.
    pub mod v1 {
        #![allow(clippy::large_enum_variant, clippy::doc_lazy_continuation)]
        tonic::include_proto!("framecast.compositor.v1");
    }
}

/// framecast's tensor cache extension of the inference protocol.
pub mod tensorcache {
    /// Version 1.
    pub mod v1 {
        #![allow(clippy::doc_lazy_continuation)]
        tonic::include_proto!("framecast.tensorcache.v1");
    }
    /// Input parameter: the registered tensor's name.
    pub const PARAM_TENSOR: &str = "framecast_tensor";
    /// Input parameter: the rows, comma-separated indices.
    pub const PARAM_ROWS: &str = "framecast_rows";
    /// The extension's name in `ServerMetadata.extensions`.
    pub const EXTENSION: &str = "framecast_tensor_cache";
}

pub mod auth;
pub mod client;
pub mod deadline;
pub mod fault_guard;
pub mod i420;
pub mod shm;
pub mod status;
pub mod tensor;

/// Encoded `FileDescriptorSet` of every proto file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));

/// Largest gRPC message either service accepts or sends by default: a 48-frame batch of
/// 6x320x320 u8 faces is ~30 MB, so the 4 MiB tonic default is far too small.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

impl kserve::model_infer_request::InferInputTensor {
    /// Describes an input whose data travels in `raw_input_contents`.
    pub fn new(name: &str, datatype: tensor::DataType, shape: Vec<i64>) -> Self {
        Self {
            name: name.to_string(),
            datatype: datatype.as_str().to_string(),
            shape,
            ..Default::default()
        }
    }
}

/// Longest piece of a client's string (a name, an id, a key) an error message repeats.
pub const ECHO_MAX_BYTES: usize = 128;

/// `s` as an error message may repeat it: whole when short, else its first
/// [`ECHO_MAX_BYTES`] bytes (on a character boundary) and its length. A status message must
/// stay small: standard clients drop responses whose metadata passes 16 KiB, so an echoed
/// 100 KB name would turn INVALID_ARGUMENT into a transport error.
pub fn echo(s: &str) -> std::borrow::Cow<'_, str> {
    if s.len() <= ECHO_MAX_BYTES {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut end = ECHO_MAX_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}... ({} bytes)", &s[..end], s.len()))
}

#[cfg(test)]
mod echo_tests {
    use super::*;

    #[test]
    fn long_strings_are_cut_on_a_character_boundary_and_say_their_length() {
        assert_eq!(echo("lipsync-ref"), "lipsync-ref");
        let long = "é".repeat(50_000);
        let e = echo(&long);
        assert!(e.len() < ECHO_MAX_BYTES + 32, "{}", e.len());
        assert!(e.ends_with("... (100000 bytes)"), "{e}");
    }
}
