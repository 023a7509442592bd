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
//! The layer is the backend's kernels in order; an engine may call them itself (here without a
//! shared expert; [`MoeLayer`]'s docs give the whole sequence) and gets the same bits:
//!
//! ```
//! use moe_hal::conformance::{layer_input, random_layer};
//! use moe_hal::{cpu::CpuBackend, Backend, DType, HostSlice, LayerShapes, MoeLayer, Permuted, RouterSpec};
//!
//! let (t, h, i, e, k) = (5, 32, 16, 8, 2);
//! let w = random_layer(1, RouterSpec::softmax_topk(e, k, true), h, i, None);
//! let b = CpuBackend::new()?;
//! let s = LayerShapes::new(t, h, i, e, k)?;
//! // Weights once, at load (`upload_weights` packs them for the backend's kernels).
//! let router = b.upload_weights(HostSlice::F32(&w.router_weight), s.router.as_gemm())?;
//! let gate_up = b.upload_weights(w.gate_up.as_slice(), s.gate_up)?;
//! let down = b.upload_weights(w.down.as_slice(), s.down)?;
//! // Work buffers, reusable for any token count up to the one they are sized for.
//! let mut logits = b.alloc(DType::F32, t * e)?;
//! let (mut ids, mut weights) = (b.alloc(DType::U32, t * k)?, b.alloc(DType::F32, t * k)?);
//! let mut perm = if b.permute_matmul_copies_rows(DType::F32, &gate_up) {
//!     Permuted::alloc(&b, s.permute, DType::F32)?
//! } else {
//!     Permuted::alloc_without_rows(&b, s.permute, DType::F32)?
//! };
//! let mut act = b.alloc(DType::F32, t * k * i)?;
//! let mut expert_out = b.alloc(DType::F32, t * k * h)?;
//! let mut out = b.alloc(DType::F32, t * h)?;
//!
//! let x = b.upload(HostSlice::F32(&layer_input(2, &w, t, DType::F32)?))?;
//! b.router_logits(&x, &router, &mut logits, s.router)?;
//! b.route(&logits, &w.router, t, &mut ids, &mut weights)?;
//! // `permute_matmul` (gate/up), then `grouped_matmul` (down): the same bits as those two calls.
//! let (mlp, shapes) = ((&gate_up, &down), (s.gate_up, s.down));
//! b.permute_mlp(&x, &ids, s.permute, &mut perm, mlp, &mut act, &mut expert_out, shapes)?;
//! b.combine(&expert_out, &ids, &weights, &perm.slot_of, &mut out, s.combine)?;
//!
//! let mut layer = MoeLayer::new(b.clone(), &w)?;
//! assert_eq!(b.download(&out)?, b.download(&layer.forward(&x, t)?)?);
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
