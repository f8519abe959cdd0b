//! Tensor datatypes of the KServe v2 protocol and their raw little-endian encoding.
//!
//! Tensors travel as one contiguous byte buffer each (`raw_input_contents`), never element by
//! element; these helpers check lengths and convert typed slices to and from that form.

use bytes::Bytes;
use std::fmt;

/// Element types a tensor can carry on the wire (the protocol's `datatype` strings).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataType {
    Bool,
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
    F16,
    BF16,
    F32,
    F64,
}

impl DataType {
    /// Every datatype, in protocol order.
    pub const ALL: [DataType; 13] = [
        DataType::Bool,
        DataType::U8,
        DataType::U16,
        DataType::U32,
        DataType::U64,
        DataType::I8,
        DataType::I16,
        DataType::I32,
        DataType::I64,
        DataType::F16,
        DataType::BF16,
        DataType::F32,
        DataType::F64,
    ];

    /// Parses a protocol datatype name such as `"FP32"` or `"UINT8"`.
    pub fn parse(name: &str) -> Result<Self, TensorError> {
        Self::ALL
            .into_iter()
            .find(|d| d.as_str() == name)
            .ok_or_else(|| TensorError::UnknownDatatype(name.to_string()))
    }

    /// The protocol name of this datatype.
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::U8 => "UINT8",
            DataType::U16 => "UINT16",
            DataType::U32 => "UINT32",
            DataType::U64 => "UINT64",
            DataType::I8 => "INT8",
            DataType::I16 => "INT16",
            DataType::I32 => "INT32",
            DataType::I64 => "INT64",
            DataType::F16 => "FP16",
            DataType::BF16 => "BF16",
            DataType::F32 => "FP32",
            DataType::F64 => "FP64",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DataType::Bool | DataType::U8 | DataType::I8 => 1,
            DataType::U16 | DataType::I16 | DataType::F16 | DataType::BF16 => 2,
            DataType::U32 | DataType::I32 | DataType::F32 => 4,
            DataType::U64 | DataType::I64 | DataType::F64 => 8,
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a tensor description or payload is not acceptable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TensorError {
    #[error("unsupported datatype {0:?} (expected one of BOOL, UINT8..UINT64, INT8..INT64, FP16, BF16, FP32, FP64)")]
    UnknownDatatype(String),
    #[error("dimension {index} is {value}; dimensions must be non-negative")]
    NegativeDimension { index: usize, value: i64 },
    #[error("shape {0:?} holds more elements than fit in memory")]
    TooLarge(Vec<i64>),
    #[error("payload is {actual} bytes; shape and datatype call for {expected}")]
    ByteLength { expected: usize, actual: usize },
    #[error("datatype is {actual}, not {expected}")]
    WrongDatatype {
        expected: DataType,
        actual: DataType,
    },
}

/// Number of elements in `shape`, rejecting negative dimensions and overflow.
pub fn element_count(shape: &[i64]) -> Result<usize, TensorError> {
    shape
        .iter()
        .enumerate()
        .try_fold(1usize, |acc, (index, &value)| {
            let dim = usize::try_from(value)
                .map_err(|_| TensorError::NegativeDimension { index, value })?;
            acc.checked_mul(dim)
                .ok_or_else(|| TensorError::TooLarge(shape.to_vec()))
        })
}

/// Bytes a dense tensor of `datatype` and `shape` occupies.
pub fn byte_len(datatype: DataType, shape: &[i64]) -> Result<usize, TensorError> {
    element_count(shape)?
        .checked_mul(datatype.size())
        .ok_or_else(|| TensorError::TooLarge(shape.to_vec()))
}

/// Checks that `payload` is exactly as long as `datatype` and `shape` call for.
pub fn check_byte_len(
    datatype: DataType,
    shape: &[i64],
    payload: usize,
) -> Result<(), TensorError> {
    let expected = byte_len(datatype, shape)?;
    if expected != payload {
        return Err(TensorError::ByteLength {
            expected,
            actual: payload,
        });
    }
    Ok(())
}

/// A Rust element type with a fixed little-endian wire form.
pub trait Element: Copy {
    const DATATYPE: DataType;
    fn write_le(self, out: &mut Vec<u8>);
    fn read_le(bytes: &[u8]) -> Self;
}

macro_rules! element {
    ($t:ty, $dt:expr) => {
        impl Element for $t {
            const DATATYPE: DataType = $dt;
            fn write_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn read_le(bytes: &[u8]) -> Self {
                let mut a = [0u8; std::mem::size_of::<$t>()];
                a.copy_from_slice(bytes);
                <$t>::from_le_bytes(a)
            }
        }
    };
}

element!(u8, DataType::U8);
element!(u16, DataType::U16);
element!(u32, DataType::U32);
element!(u64, DataType::U64);
element!(i8, DataType::I8);
element!(i16, DataType::I16);
element!(i32, DataType::I32);
element!(i64, DataType::I64);
element!(half::f16, DataType::F16);
element!(half::bf16, DataType::BF16);
element!(f32, DataType::F32);
element!(f64, DataType::F64);

impl Element for bool {
    const DATATYPE: DataType = DataType::Bool;
    fn write_le(self, out: &mut Vec<u8>) {
        out.push(self as u8);
    }
    fn read_le(bytes: &[u8]) -> Self {
        bytes[0] != 0
    }
}

/// Encodes typed values as one raw little-endian buffer.
pub fn encode<T: Element>(values: &[T]) -> Bytes {
    let mut out = Vec::with_capacity(values.len() * T::DATATYPE.size());
    for v in values {
        v.write_le(&mut out);
    }
    Bytes::from(out)
}

/// Decodes a raw buffer of `datatype` into typed values.
pub fn decode<T: Element>(datatype: DataType, raw: &[u8]) -> Result<Vec<T>, TensorError> {
    if datatype != T::DATATYPE {
        return Err(TensorError::WrongDatatype {
            expected: T::DATATYPE,
            actual: datatype,
        });
    }
    let size = datatype.size();
    if !raw.len().is_multiple_of(size) {
        return Err(TensorError::ByteLength {
            expected: raw.len() / size * size,
            actual: raw.len(),
        });
    }
    Ok(raw.chunks_exact(size).map(T::read_le).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Element + PartialEq + fmt::Debug>(values: &[T]) {
        let raw = encode(values);
        assert_eq!(raw.len(), values.len() * T::DATATYPE.size());
        assert_eq!(decode::<T>(T::DATATYPE, &raw).unwrap(), values);
    }

    #[test]
    fn every_datatype_round_trips() {
        round_trip(&[true, false, true]);
        round_trip(&[0u8, 1, 255]);
        round_trip(&[0u16, 1, u16::MAX]);
        round_trip(&[0u32, 7, u32::MAX]);
        round_trip(&[0u64, 9, u64::MAX]);
        round_trip(&[i8::MIN, 0, i8::MAX]);
        round_trip(&[i16::MIN, -1, i16::MAX]);
        round_trip(&[i32::MIN, -1, i32::MAX]);
        round_trip(&[i64::MIN, -1, i64::MAX]);
        round_trip(&[half::f16::from_f32(-1.5), half::f16::MAX]);
        round_trip(&[half::bf16::from_f32(2.25), half::bf16::MIN]);
        round_trip(&[-0.5f32, f32::MAX, f32::MIN_POSITIVE]);
        round_trip(&[-0.25f64, f64::MAX]);
    }

    #[test]
    fn names_parse_back() {
        for d in DataType::ALL {
            assert_eq!(DataType::parse(d.as_str()).unwrap(), d);
        }
        assert!(matches!(
            DataType::parse("BYTES"),
            Err(TensorError::UnknownDatatype(_))
        ));
    }

    #[test]
    fn lengths_are_checked() {
        assert_eq!(byte_len(DataType::F32, &[2, 3]).unwrap(), 24);
        assert_eq!(
            check_byte_len(DataType::U8, &[2, 3], 5),
            Err(TensorError::ByteLength {
                expected: 6,
                actual: 5
            })
        );
        assert!(matches!(
            element_count(&[2, -1]),
            Err(TensorError::NegativeDimension {
                index: 1,
                value: -1
            })
        ));
        assert!(matches!(
            element_count(&[i64::MAX, i64::MAX]),
            Err(TensorError::TooLarge(_))
        ));
        assert!(decode::<f32>(DataType::U8, &[0; 4]).is_err());
        assert!(decode::<f32>(DataType::F32, &[0; 5]).is_err());
    }
}
