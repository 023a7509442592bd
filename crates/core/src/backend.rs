//! The backend trait: device buffers and the MoE hot-path kernels.
//!
//! # Contract (every backend, checked by the conformance suite)
//!
//! - **Routing** follows [`crate::spec`]: ids ordered by selection score
//!   descending, **ties to the lower expert id**, NaN logits treated as `-inf`.
//!   Expert ids equal the float64 reference exactly.
//! - **Permute** is a stable counting sort: expert `e`'s rows occupy slots
//!   `offsets[e] .. offsets[e+1]`, in ascending flat index `t * k + j`.
//! - **Grouped matmul** accumulates in f32 whatever the storage dtype and
//!   rounds once when storing; SwiGLU is `silu(gate) * up` in f32.
//! - **Combine** sums each token's `k` contributions in f32, **in ascending
//!   expert id** (then ascending `j` for a repeated id), then adds the
//!   previous output when accumulating, and rounds once when storing.
//! - **Router GEMM** runs in f32 whatever the activation dtype.
//! - **Tolerances** against float64, as relative L2 error (NaN never passes):
//!   see [`tolerance`]. Results are deterministic: the same inputs give the
//!   same bits on the same backend, whatever the thread count. Not across
//!   batches: a backend picks kernels by the rows each expert gets, so one
//!   token's output may differ in its last bits with the other tokens of
//!   its batch. bf16 products on x86's `vdpbf16ps` (the CPU backend, where
//!   the CPU has AVX512-BF16) take inputs and results below bf16's normal
//!   range (about 1.2e-38) as 0, as that instruction does.
//! - **Bad input** (lengths, dtypes, ranges) is a [`MoeError`], never a panic.
//!
//! Buffers are flat and typed; shapes travel as small `*Shape` structs so that
//! one buffer can be reused for any token count up to its capacity (a buffer
//! may be longer than a kernel needs; never shorter).

use crate::dtype::{DType, HostSlice, HostVec};
use crate::error::{MoeError, Result};
use crate::spec::RouterSpec;
use std::fmt;

/// Relative L2 error allowed against the float64 reference for results
/// stored in `dtype` (routing weights are always f32).
///
/// f32: 1e-5. bf16: 1.6e-2 (8-bit mantissa, a few roundings of intermediate
/// activations). f16: 4e-3 (11-bit mantissa).
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 | DType::U32 => 1e-5,
        DType::BF16 => 1.6e-2,
        DType::F16 => 4e-3,
    }
}

/// What a device buffer knows about itself.
pub trait DeviceBuffer: Send + Sync {
    fn dtype(&self) -> DType;
    /// Length in elements.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The kernels of the trait, for capability queries and error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    RouterLogits,
    Route,
    TopK,
    Permute,
    GroupedMatmul,
    Combine,
}

impl Kernel {
    pub const ALL: [Kernel; 6] = [
        Kernel::RouterLogits,
        Kernel::Route,
        Kernel::TopK,
        Kernel::Permute,
        Kernel::GroupedMatmul,
        Kernel::Combine,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kernel::RouterLogits => "router_logits",
            Kernel::Route => "route",
            Kernel::TopK => "topk",
            Kernel::Permute => "permute",
            Kernel::GroupedMatmul => "grouped_matmul",
            Kernel::Combine => "combine",
        }
    }
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which activation/weight dtypes a kernel accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelCaps {
    pub kernel: Kernel,
    /// Storage dtypes of the kernel's activations (and weights, which match them).
    pub dtypes: Vec<DType>,
}

/// What a backend can do; ask before dispatching.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capabilities {
    pub kernels: Vec<KernelCaps>,
    /// Largest single buffer in bytes.
    pub max_buffer_bytes: u64,
    /// Most bytes of one buffer that one kernel takes at once (a GPU API's per-binding limit):
    /// a larger activation buffer is refused by the kernels, while grouped-matmul weights past
    /// it are taken a group of experts at a time. [`Capabilities::with_floats`] sets it to
    /// `max_buffer_bytes`.
    pub max_binding_bytes: u64,
    /// Largest `num_experts` the route kernel handles.
    pub max_experts: usize,
    /// Largest `top_k` the route and topk kernels handle.
    pub max_top_k: usize,
    /// Weight dtypes that [`Backend::upload_weights`] stores in a layout of the backend's own
    /// (packed once at load); for any other dtype it stores what [`Backend::upload`] stores. Lets
    /// callers skip comparing the two uploads where they are the same.
    pub packed_weights: Vec<DType>,
}

impl Capabilities {
    /// Every kernel, with route and topk in f32 (logits are f32 by contract) and the others in
    /// `floats`: what each backend reports, up to its dtypes and limits.
    pub fn with_floats(floats: &[DType], max_buffer_bytes: u64, max_experts: usize, max_top_k: usize) -> Self {
        Capabilities {
            kernels: Kernel::ALL
                .into_iter()
                .map(|kernel| KernelCaps {
                    kernel,
                    dtypes: match kernel {
                        Kernel::Route | Kernel::TopK => vec![DType::F32],
                        _ => floats.to_vec(),
                    },
                })
                .collect(),
            max_buffer_bytes,
            max_binding_bytes: max_buffer_bytes,
            max_experts,
            max_top_k,
            packed_weights: Vec::new(),
        }
    }

    /// The same, with kernels taking at most `bytes` of a buffer at once (at most
    /// `max_buffer_bytes`).
    pub fn binding_limit(mut self, bytes: u64) -> Self {
        self.max_binding_bytes = bytes.min(self.max_buffer_bytes);
        self
    }

    /// The same, with `upload_weights` packing weights of `dtypes`.
    pub fn packing(mut self, dtypes: &[DType]) -> Self {
        self.packed_weights = dtypes.to_vec();
        self
    }

    pub fn kernel(&self, kernel: Kernel) -> Option<&KernelCaps> {
        self.kernels.iter().find(|k| k.kernel == kernel)
    }

    pub fn supports(&self, kernel: Kernel, dtype: DType) -> bool {
        self.kernel(kernel).is_some_and(|k| k.dtypes.contains(&dtype))
    }

    /// `Ok` when `kernel` runs in `dtype`, else an `Unsupported` error naming both.
    pub fn check(&self, backend: &str, kernel: Kernel, dtype: DType) -> Result<()> {
        match self.kernel(kernel) {
            None => Err(MoeError::unsupported(backend, kernel, "the kernel is not available")),
            Some(k) if !k.dtypes.contains(&dtype) => Err(MoeError::unsupported(
                backend,
                format!("{kernel} in {dtype}"),
                format!(
                    "supported dtypes are {}",
                    k.dtypes.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
                ),
            )),
            Some(_) => Ok(()),
        }
    }

    /// `Ok` when the route kernel handles `spec`.
    pub fn check_route(&self, backend: &str, spec: &RouterSpec) -> Result<()> {
        if spec.num_experts > self.max_experts {
            return Err(MoeError::unsupported(
                backend,
                format!("route with {} experts", spec.num_experts),
                format!("at most {} experts", self.max_experts),
            ));
        }
        if spec.top_k > self.max_top_k {
            return Err(MoeError::unsupported(
                backend,
                format!("route with top_k = {}", spec.top_k),
                format!("top_k at most {}", self.max_top_k),
            ));
        }
        Ok(())
    }
}

/// Router GEMM: `logits[T, E] = hidden[T, H] · weight[E, H]^T`, in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouterShape {
    pub tokens: usize,
    pub hidden: usize,
    pub experts: usize,
}

impl RouterShape {
    /// The router GEMM as a grouped matmul of one expert: `tokens` rows against an
    /// `experts x hidden` weight, no activation.
    pub fn as_gemm(self) -> GemmShape {
        GemmShape {
            rows: self.tokens,
            in_features: self.hidden,
            out_features: self.experts,
            experts: 1,
            activation: Activation::None,
        }
    }
}

/// Dispatch of `tokens` rows of width `hidden`, each to `top_k` of `experts`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PermuteShape {
    pub tokens: usize,
    pub hidden: usize,
    pub top_k: usize,
    pub experts: usize,
}

/// Epilogue of a grouped matmul.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `out = x · W_e^T` with `W` `[E, N, K]`.
    None,
    /// `out = silu(x · G_e^T) * (x · U_e^T)` with `W` `[E, 2N, K]`, gate rows first.
    SwiGlu,
}

/// One GEMM per expert over ragged row groups.
///
/// `input` is `[rows, in_features]`; rows `offsets[e] .. offsets[e+1]` belong
/// to expert `e`; `output` is `[rows, out_features]`. Rows beyond
/// `offsets[experts]` are left untouched. Offsets must be non-decreasing with
/// `offsets[experts] <= rows` (as `permute` writes them). They live on the
/// device: the CPU backend checks them and returns an error, the device
/// backends cannot without a read-back and clamp each to `rows` instead, so
/// other offsets stay in bounds but give backend-dependent results.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmShape {
    pub rows: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub experts: usize,
    pub activation: Activation,
}

impl GemmShape {
    /// Rows of each expert's weight matrix (`2N` for SwiGLU). Saturates at `usize::MAX` where
    /// `2N` overflows: no buffer is that long, so the length checks refuse such a shape.
    pub fn weight_rows(&self) -> usize {
        match self.activation {
            Activation::None => self.out_features,
            Activation::SwiGlu => self.out_features.saturating_mul(2),
        }
    }
}

/// Weighted un-permute of `tokens * top_k` expert rows back to `tokens` rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CombineShape {
    pub tokens: usize,
    pub hidden: usize,
    pub top_k: usize,
    /// Add into the existing output instead of overwriting it.
    pub accumulate: bool,
}

/// The shapes of the routed kernels of one MoE layer at `tokens` tokens, in the order the layer
/// calls them: router GEMM, permute, gate/up GEMM with SwiGLU, down GEMM, combine (overwriting).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerShapes {
    pub router: RouterShape,
    pub permute: PermuteShape,
    pub gate_up: GemmShape,
    pub down: GemmShape,
    pub combine: CombineShape,
}

impl LayerShapes {
    /// The shapes at `tokens` tokens; an error where `tokens * top_k` overflows.
    pub fn new(tokens: usize, hidden: usize, inter: usize, experts: usize, top_k: usize) -> Result<Self> {
        let rows = checked_mul(tokens, top_k, "tokens * top_k")?;
        Ok(LayerShapes {
            router: RouterShape {
                tokens,
                hidden,
                experts,
            },
            permute: PermuteShape {
                tokens,
                hidden,
                top_k,
                experts,
            },
            gate_up: GemmShape {
                rows,
                in_features: hidden,
                out_features: inter,
                experts,
                activation: Activation::SwiGlu,
            },
            down: GemmShape {
                rows,
                in_features: inter,
                out_features: hidden,
                experts,
                activation: Activation::None,
            },
            combine: CombineShape {
                tokens,
                hidden,
                top_k,
                accumulate: false,
            },
        })
    }
}

/// Outputs of [`Backend::permute`].
pub struct Permuted<B> {
    /// `[E]` u32: rows per expert.
    pub counts: B,
    /// `[E + 1]` u32: exclusive prefix sum of `counts`; `offsets[E] = T * k`.
    pub offsets: B,
    /// `[T * k]` u32: for flat index `t * k + j`, its slot in permuted order.
    pub slot_of: B,
    /// `[T * k]` u32: for each slot, its flat index `t * k + j` (inverse of `slot_of`).
    pub source_of: B,
    /// `[T * k, H]`: the gathered hidden rows, in the hidden dtype.
    pub rows: B,
}

impl<B: DeviceBuffer> Permuted<B> {
    /// Every buffer with its name, for checks that go over all of them (a device backend's check
    /// that each is its own, say).
    pub fn named(&self) -> [(&'static str, &B); 5] {
        [
            ("counts", &self.counts),
            ("offsets", &self.offsets),
            ("slot_of", &self.slot_of),
            ("source_of", &self.source_of),
            ("rows", &self.rows),
        ]
    }

    /// Allocates outputs for `shape` with rows in `dtype`.
    pub fn alloc<K: Backend<Buffer = B> + ?Sized>(backend: &K, shape: PermuteShape, dtype: DType) -> Result<Self> {
        let tk = checked_mul(shape.tokens, shape.top_k, "tokens * top_k")?;
        Self::with_rows(
            backend,
            shape,
            dtype,
            checked_mul(tk, shape.hidden, "tokens * top_k * hidden")?,
        )
    }

    /// [`Permuted::alloc`] with an empty `rows`: for [`Backend::permute_matmul`] where
    /// [`Backend::permute_matmul_copies_rows`] says it writes none.
    pub fn alloc_without_rows<K: Backend<Buffer = B> + ?Sized>(
        backend: &K,
        shape: PermuteShape,
        dtype: DType,
    ) -> Result<Self> {
        Self::with_rows(backend, shape, dtype, 0)
    }

    fn with_rows<K: Backend<Buffer = B> + ?Sized>(
        backend: &K,
        shape: PermuteShape,
        dtype: DType,
        rows: usize,
    ) -> Result<Self> {
        let tk = checked_mul(shape.tokens, shape.top_k, "tokens * top_k")?;
        Ok(Permuted {
            counts: backend.alloc(DType::U32, shape.experts)?,
            offsets: backend.alloc(DType::U32, shape.experts + 1)?,
            slot_of: backend.alloc(DType::U32, tk)?,
            source_of: backend.alloc(DType::U32, tk)?,
            rows: backend.alloc(dtype, rows)?,
        })
    }
}

/// `len` elements fit in `buf` (for [`Backend::download_prefix`]).
pub fn check_prefix<B: DeviceBuffer + ?Sized>(buf: &B, len: usize) -> Result<()> {
    if len > buf.len() {
        return Err(MoeError::shape(
            "download length",
            len,
            format!("at most the buffer's {} elements", buf.len()),
        ));
    }
    Ok(())
}

/// `a * b`, or a shape error when it overflows.
pub fn checked_mul(a: usize, b: usize, what: &str) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| MoeError::shape(what, format!("{a} * {b}"), "a product that fits in usize"))
}

/// The product of `dims`, or an error naming `what` where it overflows usize.
pub fn checked_product(what: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| MoeError::shape(what, format!("{dims:?}"), "a product that fits in usize"))
}

/// One accelerator (or the CPU) behind the MoE hot-path kernels.
///
/// Every kernel checks its arguments (see [`crate::check`]) and returns an
/// error for bad input. Kernels may run asynchronously; [`Backend::download`]
/// and [`Backend::synchronize`] wait for them.
pub trait Backend: Send + Sync {
    type Buffer: DeviceBuffer;

    /// Short name: `cpu`, `wgpu`, `cuda`, `cann`.
    fn name(&self) -> &'static str;
    /// The device, in words.
    fn device_name(&self) -> String;
    fn capabilities(&self) -> Capabilities;
    /// Whether [`Backend::route`] can run `spec`, asked before any buffer exists (a layer's
    /// construction, a benchmark's setup): the capability query for routers. The default checks
    /// [`Capabilities::max_experts`] and [`Capabilities::max_top_k`]; a backend whose limits depend
    /// on more of the spec (the CANN slot's gating operators, by CANN release) adds them here, so
    /// that they are known up front and not only when `route` runs.
    fn check_router(&self, spec: &RouterSpec) -> Result<()> {
        self.capabilities().check_route(self.name(), spec)
    }

    /// A zero-filled buffer of `len` elements.
    fn alloc(&self, dtype: DType, len: usize) -> Result<Self::Buffer>;
    fn upload(&self, data: HostSlice<'_>) -> Result<Self::Buffer>;
    /// Uploads expert weights (`[E, N, K]`, or `[E, 2N, K]` for SwiGLU, as checkpoints store them)
    /// for [`Backend::grouped_matmul`] calls of `shape` (its `rows` is ignored), in whatever layout
    /// that backend's kernels read fastest: weights are packed once here, never at call time. The
    /// buffer is for grouped matmuls with the same experts, weight rows and `K` (another shape may
    /// get an error, and other kernels may refuse it), [`Backend::download`] returns the
    /// checkpoint layout, and [`Backend::write`] takes it too. The default checks the length and
    /// calls [`Backend::upload`]; the CPU packs bf16 and f16 weights where it has AVX-512, and f32
    /// as well with AVX2, or with AVX-512 unless the CPU is an Intel one with AVX512-BF16. A
    /// backend that packs a dtype lists it in [`Capabilities::packed_weights`].
    fn upload_weights(&self, data: HostSlice<'_>, shape: GemmShape) -> Result<Self::Buffer> {
        crate::check::weights(&data, shape)?;
        self.upload(data)
    }
    /// Overwrites the first `data.len()` elements of `buf`.
    fn write(&self, buf: &mut Self::Buffer, data: HostSlice<'_>) -> Result<()>;
    /// Waits for pending work and copies the whole buffer to the host.
    fn download(&self, buf: &Self::Buffer) -> Result<HostVec>;
    /// Waits for pending work and copies the first `len` elements of `buf` to the host (of a
    /// buffer from [`Backend::upload_weights`], those of the checkpoint layout): a result in a
    /// buffer sized for a larger batch, without the rest. `len` past the buffer is an error. The
    /// default downloads the whole buffer and keeps the prefix; the CPU and wgpu copy only it.
    fn download_prefix(&self, buf: &Self::Buffer, len: usize) -> Result<HostVec> {
        check_prefix(buf, len)?;
        Ok(self.download(buf)?.as_slice().prefix(len).to_vec())
    }
    /// Waits for all pending work.
    fn synchronize(&self) -> Result<()>;

    /// Runs `f`, a sequence of this backend's kernels, as one piece of work. The default calls `f`.
    /// The CPU backend runs it on the calling thread with its own threads installed; its kernels'
    /// parallel sections run on the caller and those threads, which stay awake between the
    /// sections of one call. [`crate::MoeLayer`] runs its forward pass this way.
    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R
    where
        Self: Sized,
    {
        f()
    }

    /// Runs `f`, which enqueues work on this backend, waits for that work to finish, and returns how
    /// long the device spent on it in milliseconds, measured with the device's own clock (CUDA
    /// events, WebGPU timestamp queries) around the work `f` enqueued.
    ///
    /// A device clock excludes what a wall clock around `f` and [`Backend::synchronize`] also counts:
    /// host-side launch and validation overhead, the wait for the host to notice completion, and
    /// the read-back of the timestamps themselves. Work enqueued before `f` should be finished
    /// first (call [`Backend::synchronize`]), or the interval may include its tail. The clock is the
    /// device queue's (CUDA: the context's one stream, which every clone of the backend shares), so
    /// work that another thread enqueues on the same device while `f` runs is counted too.
    ///
    /// `Ok(None)`: this backend (or this device) has no usable device clock; the work is still
    /// done and waited for, so the caller times the call with a wall clock instead. The default
    /// (CPU and any backend without timestamps) is `f` then [`Backend::synchronize`], and `None`.
    /// Errors of `f`, and device errors while timing, are returned as they are.
    fn device_time_ms(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<Option<f64>> {
        f()?;
        self.synchronize()?;
        Ok(None)
    }

    /// `logits[T, E]` (f32) `= hidden[T, H] · weight[E, H]^T`; `weight` is f32,
    /// `hidden` any float dtype, accumulated in f32. `weight` may come from
    /// [`Backend::upload_weights`] for [`RouterShape::as_gemm`] (any token count), packed where
    /// the backend packs f32 weights ([`crate::MoeLayer`] uploads it so).
    fn router_logits(
        &self,
        hidden: &Self::Buffer,
        weight: &Self::Buffer,
        logits: &mut Self::Buffer,
        shape: RouterShape,
    ) -> Result<()>;

    /// Routes `tokens` rows of f32 `logits[T, E]` into `ids[T, k]` (u32) and
    /// `weights[T, k]` (f32) as [`crate::spec`] says.
    fn route(
        &self,
        logits: &Self::Buffer,
        spec: &RouterSpec,
        tokens: usize,
        ids: &mut Self::Buffer,
        weights: &mut Self::Buffer,
    ) -> Result<()>;

    /// Top-`k` of each row of f32 `values[rows, cols]`: `ids[rows, k]` (u32),
    /// `out[rows, k]` (f32), descending, ties to the lower index, NaN ranked
    /// below every number.
    #[allow(clippy::too_many_arguments)]
    fn topk(
        &self,
        values: &Self::Buffer,
        rows: usize,
        cols: usize,
        k: usize,
        ids: &mut Self::Buffer,
        out: &mut Self::Buffer,
    ) -> Result<()>;

    /// Stable dispatch of `hidden[T, H]` by `ids[T, k]` (u32, each `< E`). An id `>= E` is an
    /// error where the ids are on the host (the CPU); device backends, which do not read their
    /// buffers back, drop it instead: it is not counted, its `slot_of` is `0xFFFFFFFF`, and
    /// `combine` skips it.
    fn permute(
        &self,
        hidden: &Self::Buffer,
        ids: &Self::Buffer,
        shape: PermuteShape,
        out: &mut Permuted<Self::Buffer>,
    ) -> Result<()>;

    /// One GEMM per expert: `weight` is `[E, N, K]` (`[E, 2N, K]` for SwiGLU),
    /// stored like checkpoints store Linear weights; `offsets` is u32 `[E + 1]`.
    /// `input`, `weight` and `output` share one float dtype.
    fn grouped_matmul(
        &self,
        input: &Self::Buffer,
        offsets: &Self::Buffer,
        weight: &Self::Buffer,
        output: &mut Self::Buffer,
        shape: GemmShape,
    ) -> Result<()>;

    /// [`Backend::permute`], then [`Backend::grouped_matmul`] on its rows (the layer's gate/up):
    /// `gemm`'s input is `out.rows`, its offsets `out.offsets`. A backend whose matmul reads each
    /// row where it lies in `hidden` (row `r` is `hidden[out.source_of[r] / top_k]`) skips
    /// copying them and leaves `out.rows` as it was; `output` and the other outputs of the
    /// permute are the same bits either way.
    #[allow(clippy::too_many_arguments)]
    fn permute_matmul(
        &self,
        hidden: &Self::Buffer,
        ids: &Self::Buffer,
        shape: PermuteShape,
        out: &mut Permuted<Self::Buffer>,
        weight: &Self::Buffer,
        output: &mut Self::Buffer,
        gemm: GemmShape,
    ) -> Result<()> {
        crate::check::permute_matmul(shape, gemm)?;
        self.permute(hidden, ids, shape, out)?;
        self.grouped_matmul(&out.rows, &out.offsets, weight, output, gemm)
    }

    /// The routed experts' MLP: [`Backend::permute_matmul`] (`gemms.0`, gate/up with SwiGLU, into
    /// `act`), then [`Backend::grouped_matmul`] of `act` by `down` (`gemms.1`) into `expert_out` on
    /// the permute's offsets: the same outputs and bits as those two calls, which the default
    /// makes. A backend may run the two as one piece of work per expert: the CPU does at decode,
    /// where a join between them idled a core (see its `matmul::mlp`).
    #[allow(clippy::too_many_arguments)]
    fn permute_mlp(
        &self,
        hidden: &Self::Buffer,
        ids: &Self::Buffer,
        shape: PermuteShape,
        out: &mut Permuted<Self::Buffer>,
        (gate_up, down): (&Self::Buffer, &Self::Buffer),
        act: &mut Self::Buffer,
        expert_out: &mut Self::Buffer,
        gemms: (GemmShape, GemmShape),
    ) -> Result<()> {
        self.permute_matmul(hidden, ids, shape, out, gate_up, act, gemms.0)?;
        self.grouped_matmul(act, &out.offsets, down, expert_out, gemms.1)
    }

    /// Whether [`Backend::permute_matmul`] on `hidden` of this dtype and these weights writes
    /// `out.rows`, the permuted copy of the hidden rows. Where it does not (its matmul reads each
    /// row where it lies in `hidden`), `out.rows` may be empty ([`Permuted::alloc_without_rows`]),
    /// which saves `T * k * H` elements: [`crate::MoeLayer`] asks this. Default: true.
    fn permute_matmul_copies_rows(&self, hidden: DType, weight: &Self::Buffer) -> bool {
        let _ = (hidden, weight);
        true
    }

    /// `output[t] (+)= sum_j weights[t, j] * expert_out[slot_of[t*k + j]]`,
    /// summed in f32 in ascending expert id. `expert_out` and `output` share
    /// one float dtype. A slot past `expert_out`'s rows is an error on the CPU
    /// and skipped (its term left out) on device backends, as `permute` marks
    /// the ids it drops.
    #[allow(clippy::too_many_arguments)]
    fn combine(
        &self,
        expert_out: &Self::Buffer,
        ids: &Self::Buffer,
        weights: &Self::Buffer,
        slot_of: &Self::Buffer,
        output: &mut Self::Buffer,
        shape: CombineShape,
    ) -> Result<()>;
}
