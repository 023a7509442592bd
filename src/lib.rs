//! # moe-hal
//!
//! Mixture-of-Experts hot-path kernels (route, top-k, permute, grouped
//! matmul, combine) and a whole MoE layer, behind one [`Backend`] trait with
//! one numerical contract (see [`backend`]) checked on every backend.
//!
//! ```
//! use moe_hal::{cpu::CpuBackend, conformance::random_layer, MoeLayer, RouterSpec};
//! use moe_hal::ndarray::Array2;
//!
//! let weights = random_layer(0, RouterSpec::softmax_topk(8, 2, true), 16, 8, None);
//! let mut layer = MoeLayer::new(CpuBackend::new()?, &weights)?;
//! let out = layer.forward_host(Array2::<f32>::ones((3, 16)).view())?;
//! assert_eq!(out.dim(), (3, 16));
//! # Ok::<(), moe_hal::MoeError>(())
//! ```
//!
//! Backends are cargo features (`cpu` by default; `wgpu`, `cuda`, `cann`);
//! [`registry::probe_all`] says which are compiled in and which can run here.

pub use moe_hal_core::*;

#[cfg(feature = "cpu")]
pub use moe_hal_cpu as cpu;

#[cfg(feature = "cann")]
pub use moe_hal_cann as cann;

#[cfg(feature = "wgpu")]
pub use moe_hal_wgpu as wgpu;

#[cfg(feature = "cuda")]
pub use moe_hal_cuda as cuda;

pub mod checkpoint;
pub mod registry;
