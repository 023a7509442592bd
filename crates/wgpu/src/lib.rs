//! WebGPU backend: WGSL compute kernels on `wgpu` (Vulkan, Metal, DX12;
//! software Vulkan such as Mesa's lavapipe works too).
//!
//! # What runs
//!
//! Every kernel of [`Backend`], one WGSL file each under `kernels/wgsl/`,
//! all on the device with no read-back between kernels:
//!
//! - `route.wgsl`: one invocation per token, loop-based selection over all
//!   experts (any `E`, any `k`); scores, groups and top-k follow
//!   [`moe_hal_core::spec`] exactly, comparing floats through integer keys
//!   built from their bits (NaN and infinities are recognised from bits too).
//! - `topk.wgsl`: one invocation per row, the same selection.
//! - `permute.wgsl`: counting sort in five dispatches over chunks of the flat
//!   ids (count per chunk and expert, scan over the chunks, scan over the
//!   experts, stable slot assignment per chunk and expert in ascending flat
//!   index, gather), so that no invocation walks all `T * k` ids.
//! - `grouped_matmul.wgsl`: 32x32 output tiles staged through workgroup
//!   memory, fused SwiGLU; the grid is sized from the row upper bound and
//!   each workgroup finds its expert by walking `offsets` on the device.
//! - `combine.wgsl`: one invocation per output word (one f32 or two 16-bit
//!   elements), terms summed in f32 in ascending expert id.
//! - `router_logits.wgsl`: the same tiled GEMM with one group.
//!
//! # Dtypes and limits
//!
//! router_logits, permute, grouped_matmul and combine run in **f32, bf16 and
//! f16**; route and topk in f32 (as on every backend). bf16/f16 buffers keep
//! their dtype on the device (two elements per u32 word, no WGSL `f16`
//! feature needed): shaders **unpack** them to f32 on load, accumulate in
//! f32, and round once to nearest even on store (bf16 by bit arithmetic, f16
//! by an exact software conversion that matches the `half` crate). Each
//! kernel with dtype variants is one WGSL file compiled three times through
//! the `DTYPE` pipeline-overridable constant. Writers of 16-bit data own
//! whole u32 words (permute, combine) or replace their half-word with an
//! atomic compare-exchange (grouped matmul), so neighbours never race.
//!
//! Buffers may be as large as the adapter's `max_buffer_size`. Kernels bind
//! buffers whole, so a kernel refuses (with `MoeError::Unsupported`) any
//! buffer above `min(max_storage_buffer_binding_size, 2^32 - 1)` bytes (u32
//! indices in the shaders), except grouped-matmul weights: those are bound a
//! group of experts at a time, one dispatch per group, when one expert's
//! weights fit in a binding and their size is a multiple of the adapter's
//! `min_storage_buffer_offset_alignment` (true of every real model shape). `num_experts` up to 2^16 and `top_k`
//! up to 2^10 are reported: the shaders handle any value, but selection costs
//! grow as `E * k` per token and `k^2` per combined element.
//!
//! Mesa's llvmpipe (lavapipe) stops an invocation's loops after 65535 iterations in all and goes
//! on with wrong values, so on it a call whose invocations would loop more (route with about
//! `(4 + k) * E` past that, topk `k * cols`, combine `k^2` per element, permute to 65535 experts
//! or more, GEMMs with `K` past about 55 000) is refused with `MoeError::Unsupported`, saying so.
//! Model shapes are far inside it.
//!
//! Every call runs inside a wgpu error scope, so that a validation error comes back as this call's
//! `MoeError`. wgpu 30 keeps error scopes per thread (a map keyed by thread id) and never drops a
//! thread's entry: about 320 bytes stay for each thread that ever called the backend. Engines
//! should call it from long-lived threads rather than a new thread per request.
//!
//! # Timing
//!
//! Where the adapter offers `TIMESTAMP_QUERY` and `TIMESTAMP_QUERY_INSIDE_ENCODERS` (Vulkan, DX12,
//! Metal on AMD and Intel; lavapipe too), the device is created with them and
//! [`Backend::device_time_ms`] writes a timestamp in a submission of its own before and after the
//! work, so the time excludes host-side encoding and validation; elsewhere it returns `None` and
//! callers use a wall clock ([`WgpuBackend::has_device_clock`] says which).
//!
//! # Errors
//!
//! No adapter gives `MoeError::BackendUnavailable` (set `WGPU_BACKEND` to
//! choose the API). Pipeline creation and every dispatch run inside error
//! scopes, so validation and out-of-memory errors become `MoeError::Device`;
//! errors outside a scope are recorded and returned by the next call.
//!
//! The device cannot report bad *values* without a read-back, so those that
//! only the device sees are made harmless instead of being errors (the CPU
//! backend returns errors for them): permute leaves ids `>= E` uncounted
//! with `slot_of = u32::MAX`, combine skips slots outside `expert_out`, and
//! grouped matmul clamps offsets to `[0, rows]` (decreasing offsets give
//! unspecified values, never an out-of-bounds write).

mod gpu;

use gpu::{variant, Gpu, Step, FLOAT_VARIANTS, NAME, TILE, WG};
use moe_hal_core::{
    check, Activation, Backend, Capabilities, CombineShape, DType, DeviceBuffer, GemmShape, GroupScore, HostSlice,
    HostVec, MoeError, PermuteShape, Permuted, Renorm, Result, RouterShape, RouterSpec, Scoring,
};
use std::sync::Arc;

/// Flat ids per chunk of the permute (`permute.wgsl`): the most ids one invocation walks, well
/// inside llvmpipe's loop budget, and `C * E` invocations share the counting.
const PERMUTE_CHUNK: usize = 4096;
/// Most chunk counts (chunks x experts, u32 each) a permute keeps: 64 MiB.
const PERMUTE_CHUNK_COUNTS: u64 = 1 << 24;

/// Loop iterations of the tiled GEMMs' invocations over `k` inputs: the tiles of k, two loads and
/// [`TILE_K`] products each.
fn tile_loops(k: usize) -> u64 {
    let tiles = k.div_ceil(TILE_K) as u64;
    tiles * (1 + 2 + TILE_K as u64)
}

/// The k tile of `grouped_matmul.wgsl` and `router_logits.wgsl` (`TK`).
const TILE_K: usize = 16;

/// The WebGPU backend. Cheap to clone: clones share the device, queue and pipelines.
#[derive(Clone)]
pub struct WgpuBackend {
    gpu: Arc<Gpu>,
    /// What [`Backend::capabilities`] returns (fixed by the device): built once, since every
    /// kernel call checks against it.
    caps: Arc<Capabilities>,
}

/// A device buffer: at least 4 bytes on the device (wgpu refuses empty
/// buffers, and sizes are multiples of 4), with its logical dtype and length.
#[derive(Debug)]
pub struct WgpuBuffer {
    buf: wgpu::Buffer,
    dtype: DType,
    len: usize,
    /// The device it lives on ([`gpu::Gpu::id`]): a wgpu buffer id means another buffer, or
    /// nothing, on another device, so every call checks it ([`WgpuBackend::mine`]).
    device: u64,
}

impl DeviceBuffer for WgpuBuffer {
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn len(&self) -> usize {
        self.len
    }
}

impl WgpuBuffer {
    /// The underlying `wgpu` buffer.
    pub fn raw(&self) -> &wgpu::Buffer {
        &self.buf
    }
}

fn bytes_of(data: HostSlice<'_>) -> &[u8] {
    match data {
        HostSlice::F32(v) => bytemuck::cast_slice(v),
        HostSlice::BF16(v) => bytemuck::cast_slice(v),
        HostSlice::F16(v) => bytemuck::cast_slice(v),
        HostSlice::U32(v) => bytemuck::cast_slice(v),
    }
}

fn host_from_bytes(dtype: DType, bytes: &[u8]) -> HostVec {
    match dtype {
        DType::F32 => HostVec::F32(bytemuck::pod_collect_to_vec(bytes)),
        DType::BF16 => HostVec::BF16(bytemuck::pod_collect_to_vec(bytes)),
        DType::F16 => HostVec::F16(bytemuck::pod_collect_to_vec(bytes)),
        DType::U32 => HostVec::U32(bytemuck::pod_collect_to_vec(bytes)),
    }
}

fn pad4(n: u64) -> u64 {
    n.max(4).div_ceil(4) * 4
}

fn usize_u32(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| MoeError::unsupported(NAME, format!("{what} = {v}"), "u32 indices on the device"))
}

fn too_many_columns(kernel: &str, cols: usize) -> MoeError {
    MoeError::unsupported(
        NAME,
        format!("{kernel} with {cols} output columns"),
        "at most one workgroup row of 32-column tiles (max_compute_workgroups_per_dimension)",
    )
}

impl WgpuBackend {
    /// Opens the first WebGPU adapter (high-performance preferred) among the
    /// backends in `WGPU_BACKEND` (default: Vulkan, Metal, DX12).
    pub fn new() -> Result<Self> {
        Ok(Self::on(Gpu::new(None, true)?))
    }

    fn on(gpu: Gpu) -> Self {
        let caps = Capabilities::with_floats(&FLOAT_VARIANTS, gpu.max_buffer_bytes(), 1 << 16, 1 << 10)
            .binding_limit(gpu.max_binding);
        WgpuBackend {
            gpu: Arc::new(gpu),
            caps: Arc::new(caps),
        }
    }

    /// Destroys the device, as a driver reset would (tests of device loss).
    #[doc(hidden)]
    pub fn destroy_device_for_tests(&self) {
        self.gpu.device.destroy();
    }

    /// Like [`WgpuBackend::new`], with the per-binding limit lowered to
    /// `bytes`: for tests of the paths that big buffers take on real devices.
    #[doc(hidden)]
    pub fn with_binding_limit(bytes: u64) -> Result<Self> {
        Ok(Self::on(Gpu::new(Some(bytes), true)?))
    }

    /// Like [`WgpuBackend::new`], without asking for timestamp queries: for tests of the
    /// wall-clock fallback of [`Backend::device_time_ms`] on adapters that have them.
    #[doc(hidden)]
    pub fn without_device_clock_for_tests() -> Result<Self> {
        Ok(Self::on(Gpu::new(None, false)?))
    }

    /// Whether [`Backend::device_time_ms`] reads the device clock: the adapter offers
    /// `TIMESTAMP_QUERY` and `TIMESTAMP_QUERY_INSIDE_ENCODERS`, and the device was created with them.
    pub fn has_device_clock(&self) -> bool {
        self.gpu.timestamps
    }

    /// The adapter's limits, as requested for the device.
    pub fn limits(&self) -> wgpu::Limits {
        self.gpu.limits.clone()
    }

    fn byte_size(&self, dtype: DType, len: usize) -> Result<u64> {
        let bytes = (len as u64).checked_mul(dtype.size() as u64);
        let max = self.gpu.max_buffer_bytes();
        match bytes {
            Some(b) if pad4(b) <= max => Ok(pad4(b)),
            _ => Err(MoeError::unsupported(
                NAME,
                format!("a buffer of {len} {dtype} elements"),
                format!("this adapter creates buffers of at most {max} bytes"),
            )),
        }
    }

    fn usage() -> wgpu::BufferUsages {
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST
    }

    /// Copies `size` bytes at `offset` (both multiples of 4) of `buf` to the host.
    fn read_bytes(&self, buf: &wgpu::Buffer, offset: u64, size: u64) -> Result<Vec<u8>> {
        let staging = self.gpu.scoped("download", || {
            let staging = self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("moe-hal download"),
                size,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let mut encoder = self.gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("download"),
            });
            encoder.copy_buffer_to_buffer(buf, offset, &staging, 0, size);
            self.gpu.queue.submit([encoder.finish()]);
            staging
        })?;
        self.gpu.map_read("download", &staging)
    }

    /// Refuses buffers made by another `WgpuBackend` (another device): their ids name other
    /// buffers here, or none (wgpu then panics).
    fn mine(&self, bufs: &[(&str, &WgpuBuffer)]) -> Result<()> {
        match bufs.iter().find(|(_, b)| b.device != self.gpu.id) {
            Some((what, _)) => Err(MoeError::unsupported(
                NAME,
                format!("{what} from another WgpuBackend"),
                "a buffer belongs to the device of the backend that made it (and its clones); upload it to this one",
            )),
            None => Ok(()),
        }
    }

    fn caps(&self) -> &Capabilities {
        &self.caps
    }
}

impl Backend for WgpuBackend {
    type Buffer = WgpuBuffer;

    fn name(&self) -> &'static str {
        NAME
    }

    fn device_name(&self) -> String {
        let i = &self.gpu.info;
        let driver = if i.driver.is_empty() {
            String::new()
        } else {
            format!(", {} {}", i.driver, i.driver_info)
        };
        let clock = if self.gpu.timestamps {
            "device clock: timestamp queries"
        } else {
            "no device clock (timed by wall clock)"
        };
        format!("{} ({:?}, {:?}{}); {clock}", i.name, i.backend, i.device_type, driver)
    }

    fn capabilities(&self) -> Capabilities {
        (*self.caps).clone()
    }

    fn alloc(&self, dtype: DType, len: usize) -> Result<WgpuBuffer> {
        let size = self.byte_size(dtype, len)?;
        // wgpu zero-initialises new buffers.
        let buf = self.gpu.scoped("alloc", || {
            self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size,
                usage: Self::usage(),
                mapped_at_creation: false,
            })
        })?;
        Ok(WgpuBuffer {
            buf,
            dtype,
            len,
            device: self.gpu.id,
        })
    }

    fn upload(&self, data: HostSlice<'_>) -> Result<WgpuBuffer> {
        let size = self.byte_size(data.dtype(), data.len())?;
        let mut bytes = bytes_of(data).to_vec();
        bytes.resize(size as usize, 0);
        // create_buffer + write_buffer rather than create_buffer_init, which panics on a lost device.
        let buf = self.gpu.scoped("upload", || {
            let buf = self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size,
                usage: Self::usage(),
                mapped_at_creation: false,
            });
            self.gpu.queue.write_buffer(&buf, 0, &bytes);
            buf
        })?;
        Ok(WgpuBuffer {
            buf,
            dtype: data.dtype(),
            len: data.len(),
            device: self.gpu.id,
        })
    }

    fn write(&self, buf: &mut WgpuBuffer, data: HostSlice<'_>) -> Result<()> {
        self.mine(&[("write destination", buf)])?;
        check::buffer("write destination", buf, data.dtype(), data.len())?;
        let src = bytes_of(data);
        if src.is_empty() {
            return Ok(());
        }
        let aligned = src.len() / 4 * 4;
        let mut bytes = src.to_vec();
        if aligned != src.len() {
            // A 2-byte dtype with an odd count: complete the last 4-byte word
            // with the element already on the device, unless it is padding.
            let logical_end = buf.len * buf.dtype.size();
            let tail = if logical_end > src.len() {
                self.read_bytes(&buf.buf, aligned as u64, 4)?
            } else {
                vec![0; 4]
            };
            bytes.extend_from_slice(&tail[src.len() - aligned..]);
        }
        self.gpu
            .scoped("write", || self.gpu.queue.write_buffer(&buf.buf, 0, &bytes))
    }

    fn download(&self, buf: &WgpuBuffer) -> Result<HostVec> {
        self.download_prefix(buf, buf.len)
    }

    fn download_prefix(&self, buf: &WgpuBuffer, len: usize) -> Result<HostVec> {
        self.mine(&[("download source", buf)])?;
        moe_hal_core::check_prefix(buf, len)?;
        let bytes = len * buf.dtype.size();
        if bytes == 0 {
            self.gpu.wait()?;
            return Ok(host_from_bytes(buf.dtype, &[]));
        }
        // Whole words: the buffer's own size is a multiple of 4 (`pad4` at allocation).
        let data = self.read_bytes(&buf.buf, 0, pad4(bytes as u64))?;
        Ok(host_from_bytes(buf.dtype, &data[..bytes]))
    }

    fn synchronize(&self) -> Result<()> {
        self.gpu.wait()
    }

    /// Timestamp queries around `f` where the adapter offers `TIMESTAMP_QUERY` and
    /// `TIMESTAMP_QUERY_INSIDE_ENCODERS` (see [`WgpuBackend::has_device_clock`]); `None` elsewhere.
    fn device_time_ms(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<Option<f64>> {
        self.gpu.time(f)
    }

    fn router_logits(
        &self,
        hidden: &WgpuBuffer,
        weight: &WgpuBuffer,
        logits: &mut WgpuBuffer,
        s: RouterShape,
    ) -> Result<()> {
        self.mine(&[("hidden", hidden), ("router weight", weight), ("logits", logits)])?;
        check::router_logits(NAME, self.caps(), hidden, weight, logits, s)?;
        if s.tokens == 0 {
            return Ok(());
        }
        self.gpu.check_loops(
            format_args!("router_logits with hidden {}", s.hidden),
            tile_loops(s.hidden),
        )?;
        let params = [
            usize_u32("tokens", s.tokens)?,
            usize_u32("hidden", s.hidden)?,
            usize_u32("experts", s.experts)?,
        ];
        let mut groups = self
            .gpu
            .grid("router_logits", s.tokens.div_ceil(TILE as usize) as u64, 1)?;
        // Row tiles along y (spilling into z), column tiles along x.
        let cols = self
            .gpu
            .grid("router_logits", s.experts.div_ceil(TILE as usize) as u64, 1)?;
        if cols[1] > 1 {
            return Err(too_many_columns("router_logits", s.experts));
        }
        groups = [cols[0], groups[0], groups[1]];
        self.gpu.run(
            "router_logits",
            &self.gpu.kernels.router_logits,
            &[Step {
                entry: 0,
                variant: variant(hidden.dtype),
                groups,
            }],
            &params,
            &[&hidden.buf, &weight.buf, &logits.buf],
        )
    }

    fn route(
        &self,
        logits: &WgpuBuffer,
        spec: &RouterSpec,
        tokens: usize,
        ids: &mut WgpuBuffer,
        weights: &mut WgpuBuffer,
    ) -> Result<()> {
        self.mine(&[("logits", logits), ("ids", ids), ("weights", weights)])?;
        check::route(NAME, self.caps(), logits, spec, tokens, ids, weights)?;
        if tokens == 0 {
            return Ok(());
        }
        let e = spec.num_experts;
        let (n_group, topk_group, group_score) = match spec.grouping {
            None => (1, 1, 0),
            Some(g) => (
                g.n_group,
                g.topk_group,
                match g.score {
                    GroupScore::Top2Sum => 1,
                    GroupScore::Max => 2,
                },
            ),
        };
        // Per token: scores (up to three passes over E), group scores and their selection, then k
        // passes over E.
        let loops = (4 + spec.top_k as u64) * e as u64
            + (n_group * (topk_group + 1) + topk_group) as u64
            + 2 * spec.top_k as u64;
        self.gpu
            .check_loops(format_args!("route of {e} experts, k {}", spec.top_k), loops)?;
        let stride = e + 2 * n_group;
        // The scratch binds at once: tokens in dispatches of as many as it holds.
        let per = ((self.gpu.max_binding / 4) as usize / stride).max(1).min(tokens);
        let scratch = self.alloc(DType::U32, per.saturating_mul(stride))?;
        let bias = spec
            .correction_bias
            .as_ref()
            .map(|b| self.upload(HostSlice::F32(b)))
            .transpose()?;
        let (renorm, eps) = match spec.renorm {
            Renorm::None => (0, 0.0f32),
            Renorm::Sum => (1, 0.0),
            Renorm::SumEps(eps) => (2, eps),
        };
        let params = [
            usize_u32("tokens", tokens)?,
            usize_u32("experts", e)?,
            usize_u32("top_k", spec.top_k)?,
            match spec.scoring {
                Scoring::Softmax => 0,
                Scoring::Sigmoid => 1,
            },
            bias.is_some() as u32,
            usize_u32("n_group", n_group)?,
            usize_u32("topk_group", topk_group)?,
            group_score,
            renorm,
            eps.to_bits(),
            spec.routed_scaling_factor.to_bits(),
            usize_u32("scratch stride", stride)?,
            0,
            0,
        ];
        let bias_buf = bias.as_ref().map_or(&self.gpu.dummy, |b| &b.buf);
        for t0 in (0..tokens).step_by(per) {
            let (mut params, n) = (params, per.min(tokens - t0));
            params[12] = usize_u32("first token", t0)?;
            params[13] = usize_u32("end token", t0 + n)?;
            let groups = self.gpu.grid("route", n as u64, WG)?;
            self.gpu.run(
                "route",
                &self.gpu.kernels.route,
                &[Step {
                    entry: 0,
                    variant: 0,
                    groups,
                }],
                &params,
                &[&logits.buf, bias_buf, &ids.buf, &weights.buf, &scratch.buf],
            )?;
        }
        Ok(())
    }

    fn topk(
        &self,
        values: &WgpuBuffer,
        rows: usize,
        cols: usize,
        k: usize,
        ids: &mut WgpuBuffer,
        out: &mut WgpuBuffer,
    ) -> Result<()> {
        self.mine(&[("values", values), ("ids", ids), ("out", out)])?;
        check::topk(NAME, self.caps(), values, rows, cols, k, ids, out)?;
        if rows == 0 {
            return Ok(());
        }
        self.gpu.check_loops(
            format_args!("topk of {k} in {cols} columns"),
            (k as u64) * (cols as u64 + 1),
        )?;
        let params = [usize_u32("rows", rows)?, usize_u32("cols", cols)?, usize_u32("k", k)?];
        let groups = self.gpu.grid("topk", rows as u64, WG)?;
        self.gpu.run(
            "topk",
            &self.gpu.kernels.topk,
            &[Step {
                entry: 0,
                variant: 0,
                groups,
            }],
            &params,
            &[&values.buf, &ids.buf, &out.buf],
        )
    }

    fn permute(
        &self,
        hidden: &WgpuBuffer,
        ids: &WgpuBuffer,
        s: PermuteShape,
        out: &mut Permuted<WgpuBuffer>,
    ) -> Result<()> {
        self.mine(&[("hidden", hidden), ("ids", ids)])?;
        self.mine(&out.named())?;
        check::permute(NAME, self.caps(), hidden, ids, s, out)?;
        let n = s.tokens * s.top_k;
        let elements = n.saturating_mul(s.hidden);
        // Chunks of the flat ids (permute.wgsl): PERMUTE_CHUNK each, longer where the chunk
        // counts (chunks x experts) would pass PERMUTE_CHUNK_COUNTS.
        let chunk = PERMUTE_CHUNK.max((n as u64 * s.experts as u64).div_ceil(PERMUTE_CHUNK_COUNTS) as usize);
        let chunks = n.div_ceil(chunk);
        self.gpu.check_loops(
            format_args!("permute of {n} rows to {} experts", s.experts),
            chunk.min(n).max(chunks).max(s.experts + 1) as u64,
        )?;
        let params = [
            usize_u32("tokens * top_k", n)?,
            usize_u32("experts", s.experts)?,
            usize_u32("hidden", s.hidden)?,
            usize_u32("top_k", s.top_k)?,
            usize_u32("permute chunk", chunk)?,
            usize_u32("permute chunks", chunks)?,
        ];
        let chunk_counts = self.alloc(DType::U32, (chunks * s.experts).max(1))?;
        let count = self.gpu.grid("permute", (chunks * s.experts) as u64, WG)?;
        let experts = self.gpu.grid("permute", s.experts as u64, WG)?;
        let assign = self.gpu.grid("permute", (chunks * (s.experts + 1)) as u64, WG)?;
        // One invocation per u32 word of the permuted rows (two elements in 16-bit dtypes).
        let words = elements.div_ceil(4 / hidden.dtype.size());
        let gather = self.gpu.grid("permute gather", words as u64, WG)?;
        let v = variant(hidden.dtype);
        self.gpu.run(
            "permute",
            &self.gpu.kernels.permute,
            &[
                Step {
                    entry: 0,
                    variant: v,
                    groups: count,
                },
                Step {
                    entry: 1,
                    variant: v,
                    groups: experts,
                },
                Step {
                    entry: 2,
                    variant: v,
                    groups: [1, 1, 1],
                },
                Step {
                    entry: 3,
                    variant: v,
                    groups: assign,
                },
                Step {
                    entry: 4,
                    variant: v,
                    groups: gather,
                },
            ],
            &params,
            &[
                &hidden.buf,
                &ids.buf,
                &out.counts.buf,
                &out.offsets.buf,
                &out.slot_of.buf,
                &out.source_of.buf,
                &out.rows.buf,
                &chunk_counts.buf,
            ],
        )
    }

    fn grouped_matmul(
        &self,
        input: &WgpuBuffer,
        offsets: &WgpuBuffer,
        weight: &WgpuBuffer,
        output: &mut WgpuBuffer,
        s: GemmShape,
    ) -> Result<()> {
        self.mine(&[
            ("input", input),
            ("offsets", offsets),
            ("weight", weight),
            ("output", output),
        ])?;
        check::grouped_matmul(NAME, self.caps(), input, offsets, weight, output, s)?;
        if s.rows == 0 {
            return Ok(());
        }
        let elem = input.dtype.size() as u64;
        let per_expert = (s.weight_rows() * s.in_features) as u64 * elem;
        let whole = weight.buf.size();
        // The bytes the experts use (a weight buffer may be longer), in whole words.
        let needed = (s.experts as u64 * per_expert).next_multiple_of(4).min(whole);
        // Experts per dispatch: all of them when their weights bind at once, else
        // as many as one binding holds, at offsets the adapter accepts.
        let per_chunk = if needed <= self.gpu.max_binding {
            s.experts
        } else {
            let align = self.gpu.limits.min_storage_buffer_offset_alignment as u64;
            if !per_expert.is_multiple_of(align) || per_expert > self.gpu.max_binding {
                return Err(MoeError::unsupported(
                    NAME,
                    format!("grouped_matmul on a weight of {whole} bytes"),
                    format!(
                        "weights above {} bytes are bound per group of experts, which needs one expert's \
                         {per_expert} bytes to fit and to be a multiple of {align}",
                        self.gpu.max_binding
                    ),
                ));
            }
            (self.gpu.max_binding / per_expert) as usize
        };
        let cols = self
            .gpu
            .grid("grouped_matmul", s.out_features.div_ceil(TILE as usize) as u64, 1)?;
        if cols[1] > 1 {
            return Err(too_many_columns("grouped_matmul", s.out_features));
        }
        for e0 in (0..s.experts).step_by(per_chunk.max(1)) {
            let e1 = (e0 + per_chunk).min(s.experts);
            let range = if per_chunk < s.experts {
                let offset = e0 as u64 * per_expert;
                Some((offset, ((e1 - e0) as u64 * per_expert).min(whole - offset)))
            } else {
                // All experts at once: the used bytes only where the whole buffer would not bind.
                (whole > self.gpu.max_binding).then_some((0, needed))
            };
            let params = [
                usize_u32("rows", s.rows)?,
                usize_u32("in_features", s.in_features)?,
                usize_u32("out_features", s.out_features)?,
                usize_u32("experts", e0)?,
                (s.activation == Activation::SwiGlu) as u32,
                usize_u32("experts", e1)?,
            ];
            // The first invocation of a workgroup walks the group's experts, then every invocation
            // the tiles of k.
            self.gpu.check_loops(
                format_args!(
                    "grouped_matmul of {} experts with in_features {}",
                    e1 - e0,
                    s.in_features
                ),
                (e1 - e0) as u64 + tile_loops(s.in_features),
            )?;
            // Each expert adds at most one partial row tile to the full ones.
            let row_tiles = s.rows.div_ceil(TILE as usize) as u64 + (e1 - e0) as u64;
            let yz = self.gpu.grid("grouped_matmul", row_tiles, 1)?;
            self.gpu.run_bound(
                "grouped_matmul",
                &self.gpu.kernels.grouped_matmul,
                &[Step {
                    entry: 0,
                    variant: variant(input.dtype),
                    groups: [cols[0], yz[0], yz[1]],
                }],
                &params,
                &[
                    (&input.buf, None),
                    (&offsets.buf, None),
                    (&weight.buf, range),
                    (&output.buf, None),
                ],
            )?;
        }
        Ok(())
    }

    fn combine(
        &self,
        expert_out: &WgpuBuffer,
        ids: &WgpuBuffer,
        weights: &WgpuBuffer,
        slot_of: &WgpuBuffer,
        output: &mut WgpuBuffer,
        s: CombineShape,
    ) -> Result<()> {
        self.mine(&[
            ("expert_out", expert_out),
            ("ids", ids),
            ("weights", weights),
            ("slot_of", slot_of),
            ("output", output),
        ])?;
        check::combine(NAME, self.caps(), expert_out, ids, weights, slot_of, output, s)?;
        let elements = s.tokens * s.hidden;
        if elements == 0 {
            return Ok(());
        }
        // Per element, k picks over the k slots in ascending expert id; two elements per word in
        // 16-bit dtypes.
        let k = s.top_k as u64;
        self.gpu.check_loops(
            format_args!("combine with top_k {k}"),
            (4 / output.dtype.size()) as u64 * k * (k + 1),
        )?;
        let params = [
            usize_u32("tokens", s.tokens)?,
            usize_u32("hidden", s.hidden)?,
            usize_u32("top_k", s.top_k)?,
            s.accumulate as u32,
            usize_u32("expert_out rows", expert_out.len / s.hidden)?,
        ];
        // One invocation per u32 word of the output (two elements in 16-bit dtypes).
        let words = elements.div_ceil(4 / output.dtype.size());
        let groups = self.gpu.grid("combine", words as u64, WG)?;
        self.gpu.run(
            "combine",
            &self.gpu.kernels.combine,
            &[Step {
                entry: 0,
                variant: variant(output.dtype),
                groups,
            }],
            &params,
            &[&expert_out.buf, &ids.buf, &weights.buf, &slot_of.buf, &output.buf],
        )
    }
}
