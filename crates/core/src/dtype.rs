//! Element types and host-side data.

use half::{bf16, f16};
use std::fmt;

/// Element type of a device buffer.
///
/// Floating types carry activations and weights; `U32` carries expert ids,
/// offsets and slot maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
    U32,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }

    /// The floating types a layer can compute in.
    pub const FLOATS: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

    pub fn is_float(self) -> bool {
        !matches!(self, DType::U32)
    }

    /// Parses `f32`, `bf16`, `f16` or `u32`.
    pub fn parse(s: &str) -> Option<DType> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Some(DType::F32),
            "bf16" | "bfloat16" => Some(DType::BF16),
            "f16" | "float16" => Some(DType::F16),
            "u32" => Some(DType::U32),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::U32 => "u32",
        })
    }
}

/// Borrowed host data to upload.
#[derive(Clone, Copy, Debug)]
pub enum HostSlice<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
    F16(&'a [f16]),
    U32(&'a [u32]),
}

/// Owned host data, as downloaded from a device.
#[derive(Clone, Debug, PartialEq)]
pub enum HostVec {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    U32(Vec<u32>),
}

impl<'a> HostSlice<'a> {
    /// The first `len` elements (all of them if there are fewer).
    pub fn prefix(&self, len: usize) -> HostSlice<'a> {
        match *self {
            HostSlice::F32(v) => HostSlice::F32(&v[..len.min(v.len())]),
            HostSlice::BF16(v) => HostSlice::BF16(&v[..len.min(v.len())]),
            HostSlice::F16(v) => HostSlice::F16(&v[..len.min(v.len())]),
            HostSlice::U32(v) => HostSlice::U32(&v[..len.min(v.len())]),
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            HostSlice::F32(_) => DType::F32,
            HostSlice::BF16(_) => DType::BF16,
            HostSlice::F16(_) => DType::F16,
            HostSlice::U32(_) => DType::U32,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            HostSlice::F32(v) => v.len(),
            HostSlice::BF16(v) => v.len(),
            HostSlice::F16(v) => v.len(),
            HostSlice::U32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn to_vec(&self) -> HostVec {
        match *self {
            HostSlice::F32(v) => HostVec::F32(v.to_vec()),
            HostSlice::BF16(v) => HostVec::BF16(v.to_vec()),
            HostSlice::F16(v) => HostVec::F16(v.to_vec()),
            HostSlice::U32(v) => HostVec::U32(v.to_vec()),
        }
    }

    /// Values widened to f64 (exact for every dtype).
    pub fn to_f64(&self) -> Vec<f64> {
        match *self {
            HostSlice::F32(v) => v.iter().map(|&x| x as f64).collect(),
            HostSlice::BF16(v) => v.iter().map(|x| x.to_f64()).collect(),
            HostSlice::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
            HostSlice::U32(v) => v.iter().map(|&x| x as f64).collect(),
        }
    }
}

impl HostVec {
    pub fn as_slice(&self) -> HostSlice<'_> {
        match self {
            HostVec::F32(v) => HostSlice::F32(v),
            HostVec::BF16(v) => HostSlice::BF16(v),
            HostVec::F16(v) => HostSlice::F16(v),
            HostVec::U32(v) => HostSlice::U32(v),
        }
    }

    pub fn dtype(&self) -> DType {
        self.as_slice().dtype()
    }

    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn to_f64(&self) -> Vec<f64> {
        self.as_slice().to_f64()
    }

    /// Rounds f32 values to `dtype` (round to nearest even). `U32` is refused.
    pub fn from_f32(values: &[f32], dtype: DType) -> Option<HostVec> {
        Some(match dtype {
            DType::F32 => HostVec::F32(values.to_vec()),
            DType::BF16 => HostVec::BF16(values.iter().map(|&x| bf16::from_f32(x)).collect()),
            DType::F16 => HostVec::F16(values.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::U32 => return None,
        })
    }

    /// Values widened to f32; `None` for `U32`.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        Some(match self {
            HostVec::F32(v) => v.clone(),
            HostVec::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            HostVec::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            HostVec::U32(_) => return None,
        })
    }

    pub fn into_u32(self) -> Option<Vec<u32>> {
        match self {
            HostVec::U32(v) => Some(v),
            _ => None,
        }
    }
}

/// A Rust element type that maps onto a [`DType`], for typed host interop.
pub trait Element: Copy + Send + Sync + 'static {
    const DTYPE: DType;
    fn host_slice(values: &[Self]) -> HostSlice<'_>;
    fn from_host(values: HostVec) -> Option<Vec<Self>>;
}

macro_rules! element {
    ($t:ty, $variant:ident) => {
        impl Element for $t {
            const DTYPE: DType = DType::$variant;
            fn host_slice(values: &[Self]) -> HostSlice<'_> {
                HostSlice::$variant(values)
            }
            fn from_host(values: HostVec) -> Option<Vec<Self>> {
                match values {
                    HostVec::$variant(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}
element!(f32, F32);
element!(bf16, BF16);
element!(f16, F16);
element!(u32, U32);
