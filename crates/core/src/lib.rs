//! moe-hal core: the routing contract ([`spec`]), the [`Backend`] trait, the
//! error type, the float64 [`reference`](mod@reference) of every kernel, and [`MoeLayer`].
//!
//! Read [`backend`] for the numerical contract that every backend meets.

pub mod backend;
pub mod check;
pub mod config;
pub mod conformance;
pub mod dtype;
pub mod error;
pub mod host;
pub mod layer;
pub mod reference;
pub mod spec;

pub use backend::{
    check_prefix, checked_mul, checked_product, tolerance, Activation, Backend, Capabilities, CombineShape,
    DeviceBuffer, GemmShape, Kernel, KernelCaps, LayerShapes, PermuteShape, Permuted, RouterShape,
};
pub use config::{ModelFamily, MoeConfig, SharedExpertConfig};
pub use dtype::{DType, Element, HostSlice, HostVec};
pub use error::{MoeError, Result};
pub use layer::{LayerScratch, LayerWeights, MoeLayer, SharedWeights};
pub use spec::{GroupScore, Grouping, Renorm, RouterSpec, Scoring};

pub use half::{bf16, f16};
pub use ndarray;
