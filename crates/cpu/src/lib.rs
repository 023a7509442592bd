//! The CPU backend: always present, the embedded default.
//!
//! Multithreaded on the backend's own threads (the caller and `threads - 1` workers, `pool`).
//! Grouped matmuls cut
//! the output into a fixed grid of tiles (one expert, up to 128 rows, 64
//! output columns, 256 for packed weights, more for decode and for the k-pair kernel's short
//! weight rows) spread over
//! the pool. With AVX-512, f32 tiles of 10 rows or
//! more (5 when K > 1024) run the k-pair broadcast kernel: the input rows are
//! interleaved once per range and thread into blocks of 8 rows of two consecutive inputs, and
//! each pair of weights, as stored, is broadcast in one load against up to four
//! such blocks (each output: the chain over its even inputs plus the one over its
//! odd inputs). Other dtypes' tiles of 14 rows or more run a broadcast kernel on
//! 16-lane blocks, each weight element (16-bit ones widened to f32 in L1 a chunk
//! at a time) broadcast against 16 rows at a time.
//! Shorter tiles (decode, the sparse experts of small batches), and, for other
//! dtypes than f32, the last few rows past a full lane block (up to 4, or 8 with
//! 16-bit weights), run
//! register-blocked dot products straight on the checkpoint-layout weight
//! rows (blocks of up to 4x6 fused multiply-adds, bf16/f16 widened in
//! registers, or `vdpbf16ps` for bf16 inputs on bf16 weights under 8 rows where the CPU
//! has AVX512-BF16). Without AVX-512: AVX2 and portable dot products, and the
//! `gemm` crate's cache-blocked kernels for tiles taller than 64 rows, on weights as stored; with
//! AVX2, FMA and F16C, weights from `upload_weights` are packed (below) and run an AVX2 packed
//! kernel at every height.
//! Tile heights, which pick the kernels, do not depend on the thread count (the widths of decode
//! tiles do, and no output column depends on its tile's width), so results are
//! bit-identical whatever the number of threads. Accumulation is always f32;
//! work buffers are per thread and reused across calls.
//!
//! With AVX-512, bf16 expert weights uploaded with `upload_weights` (as
//! [`moe_hal_core::MoeLayer`] does) are packed once: each expert's rows in blocks of 32,
//! `[k][32]`. Their tiles run the packed kernel at every height: input rows interleaved in lane
//! blocks of up to 14, filled evenly (16 rows as 8 + 8), each input broadcast against 32 output columns held in two registers (2 blocks
//! at once for tiles of 4-6 rows, 4 for up to 3 on CPUs other than AMD ones, else 1), the weights
//! prefetched ahead in one stream per block and widened with a shift and a mask. Where `vdpbf16ps` issues as fast as an f32 FMA (AMD
//! Zen 4/5; timed once per process), bf16 blocks are stored `[k / 2][32][2]` instead and each
//! instruction adds two products per output (`CpuBackend::with_packed_dpbf16`).
//!
//! Where the CPU has AMX-BF16 and Linux grants the tile state (`Simd::Amx`, Intel Sapphire
//! Rapids and later), packed bf16 tiles of 16 or more bf16 rows run `tdpbf16ps` instead (the
//! crate's `amx` module); `MOE_CPU_AMX=0` keeps the AVX-512 kernels.
//!
//! Buffers of 4 MiB or more are advised onto transparent huge pages on Linux (`mem`): the
//! weights stream with fewer TLB misses.

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod combine;
mod matmul;
mod mem;
mod pack;
mod permute;
mod pool;
mod route;

pub use matmul::Simd;

use moe_hal_core::{
    check, Backend, Capabilities, CombineShape, DType, DeviceBuffer, GemmShape, HostSlice, HostVec, MoeError,
    PermuteShape, Permuted, Result, RouterShape, RouterSpec,
};
use pack::Packing;
use std::sync::Arc;

const NAME: &str = "cpu";

/// [`avx512::dpbf16_fast`] where there is one.
fn dpbf16_fast() -> bool {
    #[cfg(target_arch = "x86_64")]
    return avx512::dpbf16_fast();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A host-memory buffer: as uploaded, or expert weights packed by `upload_weights` (bf16 and f16
/// with AVX-512; f32, bf16 and f16 with AVX2): each expert's rows in blocks of 32, the last
/// zero-padded, each block `[k][32]` (bf16 with rows `j` and `16 + j` side by side, or `[k / 2][32][2]`
/// for `vdpbf16ps`).
#[derive(Clone, Debug, PartialEq)]
pub struct CpuBuffer(HostVec, Option<Packing>);

impl CpuBuffer {
    /// The data, for zero-copy host access; in the packed layout for weights from
    /// `upload_weights` ([`CpuBuffer::is_packed`]; [`Backend::download`] unpacks).
    pub fn host(&self) -> &HostVec {
        &self.0
    }

    /// Whether this buffer holds expert weights packed by `upload_weights`.
    pub fn is_packed(&self) -> bool {
        self.1.is_some()
    }
}

impl DeviceBuffer for CpuBuffer {
    fn dtype(&self) -> DType {
        self.0.dtype()
    }
    /// Elements in the layout it was uploaded in (for packed weights, not counting the padding).
    fn len(&self) -> usize {
        match self.1 {
            Some(p) => p.logical_len(),
            None => self.0.len(),
        }
    }
}

/// `b` as uploaded: packed weights are only the weights of grouped matmuls.
fn plain(what: &str, b: &CpuBuffer) -> Result<()> {
    if b.is_packed() {
        return Err(MoeError::unsupported(
            NAME,
            format!("{what} holding expert weights packed by upload_weights"),
            "packed weights are only the weight of grouped_matmul; pass a buffer from alloc or upload",
        ));
    }
    Ok(())
}

/// Weight dtypes that `upload_weights` packs at `simd` ([`pack`]; its doc says why these), as
/// reported in [`Capabilities::packed_weights`]: f32 too where `f32` says so
/// ([`CpuBackend::with_packed_f32`]).
fn packed_dtypes(simd: Simd, f32: bool) -> &'static [DType] {
    match simd {
        Simd::Portable => &[],
        _ if f32 => &[DType::F32, DType::BF16, DType::F16],
        _ => &[DType::BF16, DType::F16],
    }
}

/// Whether `upload_weights` packs f32 weights at `simd` by default: with AVX2 (no AVX-512) always;
/// with AVX-512 on AMD CPUs (Zen 5: the packed kernel beat `avx512::bcast_pairs` at every token
/// count) and on Intel ones without AVX512-BF16 (Ice Lake: it won on routed heights, from 16 tokens
/// up, though `bcast_pairs` stays faster where every expert gets a multiple of 8 rows), but not on
/// Intel ones with AVX512-BF16, where it lost from 12 rows per expert (a Xeon of family 6 model
/// 207, measured before the packed register blocks of 13 and 14 rows; see `upload_weights`).
/// `MOE_CPU_PACKED_F32=0` or `1` sets the default.
fn packs_f32(simd: Simd) -> bool {
    match std::env::var("MOE_CPU_PACKED_F32").as_deref() {
        Ok("0") => return false,
        Ok("1") => return simd != Simd::Portable,
        _ => {}
    }
    #[cfg(target_arch = "x86_64")]
    {
        simd == Simd::Avx2 || (simd.avx512() && (is_amd() || !simd.has_bf16()))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the CPU is an AMD one (CPUID vendor "AuthenticAMD"): some defaults were measured to
/// differ between the AMD and Intel CPUs of our VMs ([`packs_f32`],
/// [`avx512::one_pass_scheme`]).
#[cfg(target_arch = "x86_64")]
fn is_amd() -> bool {
    // SAFETY: CPUID leaf 0 (the vendor string) exists on every x86-64 CPU. (`__cpuid` is a safe
    // function from some Rust version on; the block keeps older compilers within rust-version.)
    #[allow(unused_unsafe)]
    let id = unsafe { std::arch::x86_64::__cpuid(0) };
    (id.ebx, id.edx, id.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163) // "AuthenticAMD"
}

fn caps_for(simd: Simd, pack_f32: bool) -> Arc<Capabilities> {
    Arc::new(
        Capabilities::with_floats(&DType::FLOATS, isize::MAX as u64, 1 << 20, 1 << 20)
            .packing(packed_dtypes(simd, pack_f32)),
    )
}

/// The CPU backend. Cheap to clone: clones share the thread pool and work buffers.
#[derive(Clone)]
pub struct CpuBackend {
    pool: Arc<pool::Pool>,
    simd: Simd,
    /// bf16 weights are packed for `vdpbf16ps` ([`CpuBackend::with_packed_dpbf16`]).
    dp_packed: bool,
    /// f32 weights are packed ([`CpuBackend::with_packed_f32`]).
    pack_f32: bool,
    /// What [`Backend::capabilities`] returns, built when `simd` or `pack_f32` change: every
    /// kernel call checks against it, and building it takes a dozen small allocations.
    caps: Arc<Capabilities>,
}

impl CpuBackend {
    /// A backend using every core.
    pub fn new() -> Result<Self> {
        Self::with_threads(0)
    }

    /// A backend running its kernels on `threads` threads, the calling thread one of them (0: one
    /// per core, or `RAYON_NUM_THREADS` where set, as before the backend had its own pool).
    pub fn with_threads(threads: usize) -> Result<Self> {
        let threads = match threads {
            0 => std::env::var("RAYON_NUM_THREADS")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|&n| n > 0)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            n => n,
        };
        let pool = pool::Pool::new(threads, |i| format!("moe-hal-cpu-{i}")).map_err(|e| MoeError::Device {
            backend: NAME.into(),
            message: format!("cannot start {} worker threads: {e}", threads - 1),
        })?;
        let simd = Simd::detect();
        let dp_packed = match std::env::var("MOE_CPU_PACKED_DPBF16").as_deref() {
            Ok("0") => false,
            Ok("1") => simd.has_bf16(),
            _ => simd.has_bf16() && dpbf16_fast(),
        };
        Ok(CpuBackend {
            pool: Arc::new(pool),
            simd,
            dp_packed,
            pack_f32: packs_f32(simd),
            caps: caps_for(simd, packs_f32(simd)),
        })
    }

    /// Runs `f` on this thread with the backend's threads as the ones its kernels' sections use
    /// (the `pool` module). Nothing is handed to another thread, so a call from any thread, an
    /// engine's rayon worker holding a lock included, blocks only while a section of its own or
    /// of another caller of this backend runs; calls from several threads take turns a section at
    /// a time.
    fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    /// The same backend with bf16 expert weights from `upload_weights` packed for, or not for,
    /// `vdpbf16ps` (the `kpairs` layout of the crate's `pack` module, two products per lane and instruction; other dtypes
    /// are unchanged). By default it is on where the CPU has AVX512-BF16 and `vdpbf16ps` issues
    /// about as fast as an f32 FMA (timed once per process, a few tens of microseconds; AMD Zen 5:
    /// 1.86 times the FMAs' products per second, the Intel Xeon of the earlier sessions 0.46);
    /// `MOE_CPU_PACKED_DPBF16=0` or `1` sets the default. Weights keep the layout they were uploaded
    /// in: a backend that does not run `vdpbf16ps` computes them on a slow portable path.
    pub fn with_packed_dpbf16(mut self, on: bool) -> Result<Self> {
        if on && !self.simd.has_bf16() {
            return Err(MoeError::unsupported(
                NAME,
                format!("vdpbf16ps on packed weights at the {:?} level", self.simd),
                "it needs the Avx512Bf16 level (a CPU with AVX512-BF16)",
            ));
        }
        self.dp_packed = on;
        Ok(self)
    }

    /// The same backend with f32 expert weights from `upload_weights` packed or kept as stored
    /// (the default depends on the CPU: `packs_f32`). Packed f32 runs the packed kernel at every
    /// tile height; as stored, AVX-512 runs `bcast_pairs` and dot products. The portable level
    /// packs nothing.
    pub fn with_packed_f32(mut self, on: bool) -> Result<Self> {
        if on && self.simd == Simd::Portable {
            return Err(MoeError::unsupported(
                NAME,
                "packed f32 weights at the Portable level",
                "it needs the Avx2 level or better",
            ));
        }
        self.pack_f32 = on;
        Ok(self.with_caps())
    }

    /// Whether bf16 weights from `upload_weights` are packed for `vdpbf16ps`
    /// ([`CpuBackend::with_packed_dpbf16`]).
    pub fn packed_dpbf16(&self) -> bool {
        self.dp_packed
    }

    /// The same backend with the dot-product kernels of `simd` (one of [`Simd::supported`]); the
    /// conformance tests run every level the CPU has. f32 packing goes back to that level's default
    /// (call [`CpuBackend::with_packed_f32`] after this to choose), and `vdpbf16ps` packing stays
    /// on only where the level has AVX512-BF16.
    pub fn with_simd(mut self, simd: Simd) -> Result<Self> {
        if !Simd::supported().contains(&simd) {
            return Err(MoeError::unsupported(
                NAME,
                format!("{simd:?} kernels"),
                "this CPU lacks the instructions",
            ));
        }
        self.simd = simd;
        self.dp_packed &= simd.has_bf16();
        self.pack_f32 = packs_f32(simd);
        Ok(self.with_caps())
    }

    fn with_caps(mut self) -> Self {
        self.caps = caps_for(self.simd, self.pack_f32);
        self
    }

    /// Threads that run the kernels' parallel sections, the calling thread included.
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// A grouped matmul's checks but its offsets' (a fused permute writes them after): the shared
    /// ones, plain input and output buffers, and packed weights packed for `s`'s shape.
    fn check_matmul(
        &self,
        input: &CpuBuffer,
        offsets: &CpuBuffer,
        weight: &CpuBuffer,
        output: &CpuBuffer,
        s: GemmShape,
    ) -> Result<()> {
        check::grouped_matmul(NAME, &self.caps, input, offsets, weight, output, s)?;
        plain("input", input)?;
        Self::check_weight_output(weight, output, s)
    }

    /// The checks of a `permute_matmul` that gathers its rows (no permuted copy), but the
    /// offsets' contents, which the permute writes.
    #[allow(clippy::too_many_arguments)]
    fn check_gathered(
        &self,
        hidden: &CpuBuffer,
        ids: &CpuBuffer,
        shape: PermuteShape,
        out: &Permuted<CpuBuffer>,
        weight: &CpuBuffer,
        output: &CpuBuffer,
        gemm: GemmShape,
    ) -> Result<()> {
        check::permute_without_rows(NAME, &self.caps, hidden, ids, shape, out)?;
        plain("hidden", hidden)?;
        check::grouped_matmul_gathered(NAME, &self.caps, hidden.0.dtype(), &out.offsets, weight, output, gemm)?;
        Self::check_weight_output(weight, output, gemm)
    }

    /// The permute's index outputs (no rows), and the offsets checked for `gemm`.
    fn index_gathered(
        &self,
        ids: &CpuBuffer,
        shape: PermuteShape,
        out: &mut Permuted<CpuBuffer>,
        gemm: GemmShape,
    ) -> Result<Vec<usize>> {
        self.install(|| permute::index(u32_slice(ids), shape, out))?;
        matmul::checked_offsets(&u32_slice(&out.offsets)[..gemm.experts + 1], gemm.rows)
    }

    /// The output is plain and packed weights are of the shape `s`.
    fn check_weight_output(weight: &CpuBuffer, output: &CpuBuffer, s: GemmShape) -> Result<()> {
        plain("output", output)?;
        Self::check_packed_shape(weight, s)
    }

    /// Weights packed by `upload_weights` were packed for the shape `s` (plain ones pass).
    fn check_packed_shape(weight: &CpuBuffer, s: GemmShape) -> Result<()> {
        if let Some(p) = weight.1 {
            if (p.experts, p.rows, p.k) != (s.experts, s.weight_rows(), s.in_features) {
                return Err(MoeError::shape(
                    "packed weight",
                    format!("{} experts of {} rows x {} inputs", p.experts, p.rows, p.k),
                    format!(
                        "the shape's {} experts of {} rows x {} inputs (weights are packed for one shape)",
                        s.experts,
                        s.weight_rows(),
                        s.in_features
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The rows a gate/up matmul gathers from the hidden rows by the permute's `source_of`.
fn gathered_rows<'a>(out: &'a Permuted<CpuBuffer>, shape: PermuteShape, gemm: GemmShape) -> matmul::InputRows<'a> {
    matmul::InputRows::Gathered {
        source_of: &u32_slice(&out.source_of)[..gemm.rows],
        top_k: shape.top_k,
    }
}

fn float_slice(b: &CpuBuffer) -> matmul::Floats<'_> {
    match &b.0 {
        HostVec::F32(v) => matmul::Floats::F32(v),
        HostVec::BF16(v) => matmul::Floats::BF16(v),
        HostVec::F16(v) => matmul::Floats::F16(v),
        HostVec::U32(_) => unreachable!("dtype checked before"),
    }
}

fn u32_slice(b: &CpuBuffer) -> &[u32] {
    match &b.0 {
        HostVec::U32(v) => v,
        _ => unreachable!("dtype checked before"),
    }
}

fn f32_slice(b: &CpuBuffer) -> &[f32] {
    match &b.0 {
        HostVec::F32(v) => v,
        _ => unreachable!("dtype checked before"),
    }
}

fn u32_mut(b: &mut CpuBuffer) -> &mut [u32] {
    match &mut b.0 {
        HostVec::U32(v) => v,
        _ => unreachable!("dtype checked before"),
    }
}

fn f32_mut(b: &mut CpuBuffer) -> &mut [f32] {
    match &mut b.0 {
        HostVec::F32(v) => v,
        _ => unreachable!("dtype checked before"),
    }
}

impl Backend for CpuBackend {
    type Buffer = CpuBuffer;

    fn name(&self) -> &'static str {
        NAME
    }

    fn device_name(&self) -> String {
        let dp = if self.dp_packed {
            " (vdpbf16ps on packed bf16)"
        } else {
            ""
        };
        format!("host CPU, {} threads, {}{dp}", self.threads(), self.simd.label())
    }

    fn capabilities(&self) -> Capabilities {
        (*self.caps).clone()
    }

    /// Runs `f` on this thread with the backend's threads installed, so that the kernels inside
    /// find them without a lookup each (see the private `CpuBackend::install`).
    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.install(f)
    }

    fn alloc(&self, dtype: DType, len: usize) -> Result<CpuBuffer> {
        if len.checked_mul(dtype.size()).is_none_or(|b| b > isize::MAX as usize) {
            return Err(MoeError::shape("buffer length", len, "a size that fits in memory"));
        }
        let zeros = match dtype {
            DType::F32 => HostVec::F32(mem::try_filled(len, 0.0)?),
            DType::BF16 => HostVec::BF16(mem::try_filled(len, half::bf16::ZERO)?),
            DType::F16 => HostVec::F16(mem::try_filled(len, half::f16::ZERO)?),
            DType::U32 => HostVec::U32(mem::try_filled(len, 0)?),
        };
        Ok(CpuBuffer(zeros, None))
    }

    fn upload(&self, data: HostSlice<'_>) -> Result<CpuBuffer> {
        Ok(CpuBuffer(
            match data {
                HostSlice::F32(v) => HostVec::F32(mem::try_copied(v)?),
                HostSlice::BF16(v) => HostVec::BF16(mem::try_copied(v)?),
                HostSlice::F16(v) => HostVec::F16(mem::try_copied(v)?),
                HostSlice::U32(v) => HostVec::U32(mem::try_copied(v)?),
            },
            None,
        ))
    }

    /// Packs bf16 and f16 weights on the backend's threads where the CPU has AVX-512, and f32 too
    /// where it has AVX2, FMA and F16C but not AVX-512 (`avx2::packed`; the portable level keeps
    /// the weights as stored): each expert's rows in blocks of 32, `[k][32]`, read by the packed
    /// kernel as one stream per block.
    ///
    /// With AVX2 (measured on this AVX-512 machine at that level), 128 experts of qwen3-30b-a3b as
    /// routed at 256 tokens, one thread, packed and as stored alternated call by call, time ratios
    /// gate/up / `down`: f32 0.44 / 0.41, bf16 0.39 / 0.37; at 1024 tokens (42-83 rows) 0.49 /
    /// 0.46 and 0.51 / 0.49; one row each (decode), two threads: 0.77 / 0.74 and 0.59 / 0.58.
    /// f32 tiles of 128-256 rows run 63 GFLOP/s packed against 68 in `gemm` (8 experts, in
    /// cache): prefill-sized tiles lose 8% there, every smaller one gains (16 rows 46 against
    /// 18).
    ///
    /// With AVX-512: bf16 gains at every height
    /// (one thread, 8 experts of qwen3-30b-a3b gate/up, K 2048, best of 3, GFLOP/s packed against
    /// as stored: 8 rows 125 against 74, 16 rows 118 against 99, 24 rows 123 against 92, 128 rows
    /// 129 against 125). f16 gains where experts get uneven or few rows, as routing gives them, and
    /// loses where every expert gets many (its conversion takes the FMA ports). 128 experts from
    /// DRAM, packed and as stored alternated call by call, time ratios gate/up / `down`:
    /// - as routed at 256 tokens (8-27 rows): 0.85 / 0.72 on one thread, 0.78 / 0.62 on two;
    /// - every expert 16 rows: 1.01 / 0.89; 32 rows: 1.05 / 0.95; 64 rows: 1.15 / 1.06;
    ///   128 rows: 1.12 / 1.03.
    ///
    /// The layer (`--inputs 16`, alternated twice) took 37 ms at 16 tokens against 41-43 as stored,
    /// 130-142 at 256 against 156-195, and the same at one token. On that Intel Xeon f32 weights
    /// stay as stored with AVX-512, for `avx512::bcast_pairs` (the packed kernel lost from 12 rows
    /// even against the 16-row lane blocks before it: 16 rows 65 against 92-145 GFLOP/s, 128 rows
    /// 119 against 130). On an AMD EPYC (Zen 5, 2 cores) packed f32 won at every token count: the
    /// layer at 1, 16 and 256 tokens (`--inputs 16`, alternated twice) took 2.39-2.41 ms against
    /// 2.97-3.07, 22.8-23.2 against 29.8-30.1 and 54.5-56.4 against 68.1, so `packs_f32` packs
    /// them on AMD CPUs. So it does on an Intel Xeon without AVX512-BF16 (Ice Lake, 2 vCPUs,
    /// after the register blocks of 13 and 14 rows): paired against `bcast_pairs` in one process
    /// (`PAIRED_BLOCK=4 scripts/paired.sh`, medians of the time ratios), the layer at 1, 16 and
    /// 256 tokens 0.93-1.00, 0.965-0.983 and 0.90-1.00 (two to four runs each); gate/up / `down`
    /// as routed at 16 tokens 0.950 / 0.922, at 256 0.930-0.936 / 0.898-1.014, gate/up at 1024
    /// 0.904; but 1.04-1.17 where every expert gets 8, 12, 14, 16, 24 or 32 rows, which
    /// `bcast_pairs` computes without padded lanes. On the AMD EPYC bf16 runs on `vdpbf16ps` too
    /// ([`CpuBackend::with_packed_dpbf16`]): 8 experts of gate/up from DRAM, 16 / 24 / 128 rows
    /// each, 0.70-0.81 / 0.64-0.69 / 0.55 of the time of the widening kernel, one row the same; the
    /// layer at 256 tokens 35.6-38.5 ms against 49.3-49.9.
    fn upload_weights(&self, data: HostSlice<'_>, s: GemmShape) -> Result<CpuBuffer> {
        check::weights(&data, s)?;
        if !packed_dtypes(self.simd, self.pack_f32).contains(&data.dtype()) {
            return self.upload(data);
        }
        let p = Packing {
            experts: s.experts,
            rows: s.weight_rows(),
            k: s.in_features,
            kpairs: self.dp_packed && data.dtype() == DType::BF16,
        };
        Ok(CpuBuffer(self.install(|| p.pack(data))?, Some(p)))
    }

    fn write(&self, buf: &mut CpuBuffer, data: HostSlice<'_>) -> Result<()> {
        check::buffer("write destination", buf, data.dtype(), data.len())?;
        if let Some(p) = buf.1 {
            // Rare (weights change between calls): unpack, overwrite, pack again.
            let mut plain = CpuBuffer(self.install(|| p.unpack(&buf.0)), None);
            self.write(&mut plain, data)?;
            buf.0 = self.install(|| p.pack(plain.0.as_slice()))?;
            return Ok(());
        }
        match (&mut buf.0, data) {
            (HostVec::F32(d), HostSlice::F32(s)) => d[..s.len()].copy_from_slice(s),
            (HostVec::BF16(d), HostSlice::BF16(s)) => d[..s.len()].copy_from_slice(s),
            (HostVec::F16(d), HostSlice::F16(s)) => d[..s.len()].copy_from_slice(s),
            (HostVec::U32(d), HostSlice::U32(s)) => d[..s.len()].copy_from_slice(s),
            _ => unreachable!("dtype checked above"),
        }
        Ok(())
    }

    fn download(&self, buf: &CpuBuffer) -> Result<HostVec> {
        Ok(match buf.1 {
            Some(p) => self.install(|| p.unpack(&buf.0)),
            None => buf.0.clone(),
        })
    }

    fn download_prefix(&self, buf: &CpuBuffer, len: usize) -> Result<HostVec> {
        moe_hal_core::check_prefix(buf, len)?;
        match buf.1 {
            Some(_) => Ok(self.download(buf)?.as_slice().prefix(len).to_vec()),
            None => Ok(buf.0.as_slice().prefix(len).to_vec()),
        }
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn router_logits(
        &self,
        hidden: &CpuBuffer,
        weight: &CpuBuffer,
        logits: &mut CpuBuffer,
        s: RouterShape,
    ) -> Result<()> {
        check::router_logits(NAME, &self.caps, hidden, weight, logits, s)?;
        plain("hidden", hidden)?;
        plain("logits", logits)?;
        Self::check_packed_shape(weight, s.as_gemm())?;
        let out = matmul::OutPtr::new(f32_mut(logits));
        self.install(|| {
            matmul::router_logits(self.simd, float_slice(hidden), (f32_slice(weight), weight.1), out, s);
        });
        Ok(())
    }

    fn route(
        &self,
        logits: &CpuBuffer,
        spec: &RouterSpec,
        tokens: usize,
        ids: &mut CpuBuffer,
        weights: &mut CpuBuffer,
    ) -> Result<()> {
        check::route(NAME, &self.caps, logits, spec, tokens, ids, weights)?;
        plain("logits", logits)?;
        plain("weights", weights)?;
        let (ids, weights) = (u32_mut(ids), f32_mut(weights));
        self.install(|| route::route(f32_slice(logits), spec, tokens, self.simd.avx512(), ids, weights));
        Ok(())
    }

    fn topk(
        &self,
        values: &CpuBuffer,
        rows: usize,
        cols: usize,
        k: usize,
        ids: &mut CpuBuffer,
        out: &mut CpuBuffer,
    ) -> Result<()> {
        check::topk(NAME, &self.caps, values, rows, cols, k, ids, out)?;
        plain("values", values)?;
        plain("out", out)?;
        let (ids, out) = (u32_mut(ids), f32_mut(out));
        self.install(|| route::topk(f32_slice(values), rows, cols, k, ids, out));
        Ok(())
    }

    fn permute(
        &self,
        hidden: &CpuBuffer,
        ids: &CpuBuffer,
        s: PermuteShape,
        out: &mut Permuted<CpuBuffer>,
    ) -> Result<()> {
        check::permute(NAME, &self.caps, hidden, ids, s, out)?;
        plain("hidden", hidden)?;
        plain("permuted rows", &out.rows)?;
        self.install(|| permute::permute(hidden, u32_slice(ids), s, out))
    }

    fn grouped_matmul(
        &self,
        input: &CpuBuffer,
        offsets: &CpuBuffer,
        weight: &CpuBuffer,
        output: &mut CpuBuffer,
        s: GemmShape,
    ) -> Result<()> {
        self.check_matmul(input, offsets, weight, output, s)?;
        let offsets = matmul::checked_offsets(&u32_slice(offsets)[..s.experts + 1], s.rows)?;
        let out = matmul::OutPtr::from_buffer(&mut output.0);
        self.install(|| {
            matmul::grouped_matmul(
                self.simd,
                float_slice(input),
                matmul::InputRows::InOrder,
                &offsets,
                float_slice(weight),
                weight.1,
                out,
                s,
            )
        });
        Ok(())
    }

    /// With packed weights and AVX-512, the matmul's interleave reads each expert's rows from
    /// `hidden` by `source_of`, and the permute only sorts: no copy of the rows (8 MiB at 256
    /// tokens of qwen3-30b-a3b in bf16, 470 MiB at 4096 tokens of DeepSeek-V3) is written to
    /// memory and read back. Otherwise it permutes and multiplies as two calls.
    fn permute_matmul(
        &self,
        hidden: &CpuBuffer,
        ids: &CpuBuffer,
        shape: PermuteShape,
        out: &mut Permuted<CpuBuffer>,
        weight: &CpuBuffer,
        output: &mut CpuBuffer,
        gemm: GemmShape,
    ) -> Result<()> {
        // Both calls' checks but the offsets' (which the permute writes), before anything is
        // written; the permuted rows' only where they are written.
        check::permute_matmul(shape, gemm)?;
        if self.permute_matmul_copies_rows(hidden.0.dtype(), weight) {
            check::permute(NAME, &self.caps, hidden, ids, shape, out)?;
            plain("hidden", hidden)?;
            self.check_matmul(&out.rows, &out.offsets, weight, output, gemm)?;
            self.permute(hidden, ids, shape, out)?;
            return self.grouped_matmul(&out.rows, &out.offsets, weight, output, gemm);
        }
        self.check_gathered(hidden, ids, shape, out, weight, output, gemm)?;
        let offsets = self.index_gathered(ids, shape, out, gemm)?;
        let src = gathered_rows(out, shape, gemm);
        let dst = matmul::OutPtr::from_buffer(&mut output.0);
        self.install(|| {
            matmul::grouped_matmul(
                self.simd,
                float_slice(hidden),
                src,
                &offsets,
                float_slice(weight),
                weight.1,
                dst,
                gemm,
            )
        });
        Ok(())
    }

    /// At decode on packed weights with AVX-512 (every expert with at most 8 rows), the gate/up and
    /// `down` tiles run as one list, each expert's `down` after its gate/up; otherwise the two
    /// calls.
    fn permute_mlp(
        &self,
        hidden: &CpuBuffer,
        ids: &CpuBuffer,
        shape: PermuteShape,
        out: &mut Permuted<CpuBuffer>,
        (gate_up, down): (&CpuBuffer, &CpuBuffer),
        act: &mut CpuBuffer,
        expert_out: &mut CpuBuffer,
        (up, dn): (GemmShape, GemmShape),
    ) -> Result<()> {
        // `down` must read the gate/up output as it lies for one list; otherwise (or to get the
        // second call's own error) the two calls.
        let chained = (dn.rows, dn.experts, dn.in_features) == (up.rows, up.experts, up.out_features);
        if !chained || self.permute_matmul_copies_rows(hidden.0.dtype(), gate_up) {
            self.permute_matmul(hidden, ids, shape, out, gate_up, act, up)?;
            return self.grouped_matmul(act, &out.offsets, down, expert_out, dn);
        }
        // Both calls' checks but the offsets' contents (which the permute writes), before
        // anything is written.
        check::permute_matmul(shape, up)?;
        self.check_gathered(hidden, ids, shape, out, gate_up, act, up)?;
        self.check_matmul(act, &out.offsets, down, expert_out, dn)?;
        let offsets = self.index_gathered(ids, shape, out, up)?;
        let src = gathered_rows(out, shape, up);
        let (act, expert_out) = (
            matmul::OutPtr::from_buffer(&mut act.0),
            matmul::OutPtr::from_buffer(&mut expert_out.0),
        );
        self.install(|| {
            matmul::mlp(
                self.simd,
                float_slice(hidden),
                src,
                &offsets,
                (float_slice(gate_up), gate_up.1),
                act,
                (float_slice(down), down.1),
                expert_out,
                (up, dn),
            )
        });
        Ok(())
    }

    /// False where the packed kernels read the hidden rows by index (packed
    /// weights with AVX-512).
    fn permute_matmul_copies_rows(&self, hidden: DType, weight: &CpuBuffer) -> bool {
        let input = match hidden {
            DType::F32 => matmul::Floats::F32(&[]),
            DType::BF16 => matmul::Floats::BF16(&[]),
            DType::F16 => matmul::Floats::F16(&[]),
            DType::U32 => return true,
        };
        !(weight.0.dtype().is_float() && matmul::gathers(self.simd, input, float_slice(weight), weight.1))
    }

    fn combine(
        &self,
        expert_out: &CpuBuffer,
        ids: &CpuBuffer,
        weights: &CpuBuffer,
        slot_of: &CpuBuffer,
        output: &mut CpuBuffer,
        s: CombineShape,
    ) -> Result<()> {
        check::combine(NAME, &self.caps, expert_out, ids, weights, slot_of, output, s)?;
        plain("expert_out", expert_out)?;
        plain("weights", weights)?;
        plain("output", output)?;
        let rows = expert_out.len() / s.hidden.max(1);
        let slots = &u32_slice(slot_of)[..s.tokens * s.top_k];
        // Rows of no width are never read: any slot names one.
        if let Some((i, &v)) = slots
            .iter()
            .enumerate()
            .find(|(_, &v)| s.hidden > 0 && v as usize >= rows)
        {
            return Err(MoeError::shape(
                format!("slot_of[{i}]"),
                v,
                format!("below the {rows} rows of expert_out"),
            ));
        }
        self.install(|| {
            combine::combine(
                float_slice(expert_out),
                u32_slice(ids),
                f32_slice(weights),
                slots,
                &mut output.0,
                s,
                self.simd.avx512(),
            )
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;
    use moe_hal_core::Activation;

    /// A router weight packed by `upload_weights` for one shape is refused for another of the same
    /// length, and the same weight packed for another GEMM (two experts) too, with an error.
    #[test]
    fn packed_router_weight_of_another_shape_is_an_error() {
        use moe_hal_core::RouterShape;
        let b = CpuBackend::new().unwrap().with_packed_f32(true).unwrap();
        let w = vec![0.5f32; 16 * 8];
        let s = RouterShape {
            tokens: 2,
            hidden: 8,
            experts: 16,
        };
        let packed = b.upload_weights(HostSlice::F32(&w), s.as_gemm()).unwrap();
        if packed.1.is_none() {
            return; // a level that does not pack f32
        }
        let two = b
            .upload_weights(
                HostSlice::F32(&w),
                GemmShape {
                    experts: 2,
                    out_features: 8,
                    ..s.as_gemm()
                },
            )
            .unwrap();
        let x = b.upload(HostSlice::F32(&[1.0; 2 * 16])).unwrap();
        let mut l = b.alloc(DType::F32, 2 * 16).unwrap();
        let other = RouterShape {
            hidden: 16,
            experts: 8,
            ..s
        };
        assert!(b.router_logits(&x, &packed, &mut l, other).is_err());
        assert!(b.router_logits(&x, &two, &mut l, s).is_err());
        b.router_logits(&x, &packed, &mut l, s).unwrap();
        let got = b.download(&l).unwrap().to_f64();
        assert!(got[..2 * 16].iter().all(|&v| v == 4.0), "{got:?}");
    }

    /// Packed weights with AVX-512 gather the hidden rows (no permuted copy); weights as stored,
    /// and every level without AVX-512, copy them. The conformance suite checks both answers'
    /// behaviour at every level.
    #[test]
    fn permute_matmul_copies_rows_where_it_does_not_gather() {
        let shape = GemmShape {
            rows: 0,
            in_features: 64,
            out_features: 32,
            experts: 2,
            activation: Activation::SwiGlu,
        };
        let w: Vec<bf16> = (0..2 * 64 * 64).map(|i| bf16::from_f32((i % 7) as f32 * 0.1)).collect();
        for simd in Simd::supported() {
            let b = CpuBackend::new().unwrap().with_simd(simd).unwrap();
            let plain = b.upload(HostSlice::BF16(&w)).unwrap();
            let packed = b.upload_weights(HostSlice::BF16(&w), shape).unwrap();
            assert!(b.permute_matmul_copies_rows(DType::BF16, &plain), "{simd:?}");
            assert_eq!(
                b.permute_matmul_copies_rows(DType::BF16, &packed),
                !(simd.avx512() && packed.1.is_some()),
                "{simd:?}"
            );
            assert!(b.permute_matmul_copies_rows(DType::U32, &packed));
        }
    }

    /// `run` executes on the calling thread with the backend's threads installed, and kernels
    /// called inside it still work and give the same bits as outside.
    #[test]
    fn run_executes_on_the_pool() {
        let b = CpuBackend::with_threads(2).unwrap();
        let me = std::thread::current().id();
        assert_eq!(pool::threads(), 1);
        assert!(b.run(|| pool::threads() == 2 && std::thread::current().id() == me));
        assert_eq!(pool::threads(), 1);
        let x = b.upload(HostSlice::F32(&[1.0, 2.0, 3.0, 4.0])).unwrap();
        let w = b.upload(HostSlice::F32(&[0.5, -1.0, 2.0, 0.25])).unwrap();
        let off = b.upload(HostSlice::U32(&[0, 2])).unwrap();
        let shape = GemmShape {
            rows: 2,
            in_features: 2,
            out_features: 2,
            experts: 1,
            activation: Activation::None,
        };
        let mut outside = b.alloc(DType::F32, 4).unwrap();
        b.grouped_matmul(&x, &off, &w, &mut outside, shape).unwrap();
        let mut inside = b.alloc(DType::F32, 4).unwrap();
        b.run(|| b.grouped_matmul(&x, &off, &w, &mut inside, shape)).unwrap();
        let (a, c) = (b.download(&outside).unwrap(), b.download(&inside).unwrap());
        assert_eq!(a.to_f32(), Some(vec![-1.5, 2.5, -2.5, 7.0]));
        assert_eq!(a.to_f32(), c.to_f32());
    }

    /// A combine of rows of no width reads nothing, so any slot is fine (it once refused every
    /// slot as past the zero rows of `expert_out`); a slot past the rows of a real width is
    /// refused.
    #[test]
    fn combine_of_zero_width_accepts_any_slot() {
        let b = CpuBackend::with_threads(2).unwrap();
        let ids = b.upload(HostSlice::U32(&[0, 1, 1, 0])).unwrap();
        let w = b.upload(HostSlice::F32(&[0.5, 0.5, 0.25, 0.75])).unwrap();
        let slots = b.upload(HostSlice::U32(&[0, 1, 2, 3])).unwrap();
        let s = CombineShape {
            tokens: 2,
            hidden: 0,
            top_k: 2,
            accumulate: false,
        };
        let (eo, mut out) = (b.alloc(DType::F32, 0).unwrap(), b.alloc(DType::F32, 0).unwrap());
        b.combine(&eo, &ids, &w, &slots, &mut out, s).unwrap();
        let s = CombineShape { hidden: 2, ..s };
        let (eo, mut out) = (b.alloc(DType::F32, 4 * 2).unwrap(), b.alloc(DType::F32, 2 * 2).unwrap());
        b.combine(&eo, &ids, &w, &slots, &mut out, s).unwrap();
        let past = b.upload(HostSlice::U32(&[0, 1, 2, 4])).unwrap();
        let e = b.combine(&eo, &ids, &w, &past, &mut out, s).unwrap_err();
        assert!(e.to_string().contains("slot_of[3]"), "{e}");
    }

    /// `Capabilities::packed_weights` lists exactly the dtypes whose `upload_weights` buffers come
    /// back packed, at every SIMD level.
    #[test]
    fn packed_weights_capability_says_what_upload_weights_does() {
        let s = GemmShape {
            rows: 0,
            in_features: 4,
            out_features: 2,
            experts: 1,
            activation: Activation::None,
        };
        let f = [0.25f32; 8];
        for (simd, f32) in Simd::supported().into_iter().flat_map(|s| [(s, false), (s, true)]) {
            let b = CpuBackend::with_threads(1).unwrap().with_simd(simd).unwrap();
            let b = match b.with_packed_f32(f32) {
                Ok(b) => b,
                Err(e) => {
                    assert!(simd == Simd::Portable && f32, "{simd:?}: {e}");
                    assert!(e.to_string().contains("Avx2 level or better"), "{e}");
                    continue;
                }
            };
            let caps = b.capabilities();
            assert_eq!(caps.packed_weights.contains(&DType::F32), f32, "{simd:?}");
            for data in [
                HostVec::from_f32(&f, DType::F32),
                HostVec::from_f32(&f, DType::BF16),
                HostVec::from_f32(&f, DType::F16),
            ] {
                let data = data.unwrap();
                let packed = b.upload_weights(data.as_slice(), s).unwrap().is_packed();
                assert_eq!(
                    caps.packed_weights.contains(&data.dtype()),
                    packed,
                    "{simd:?} {}",
                    data.dtype()
                );
            }
        }
    }

    /// At every level that packs (AVX-512: bf16 and f16; AVX2: f32 too): bf16 and f16 weights from
    /// `upload_weights` are packed, f32 ones as the capability says, download and `write` see the
    /// checkpoint layout, a grouped matmul of another shape and every other use get errors, and
    /// the packed product matches the plain one within f32 rounding.
    #[test]
    fn packed_weights_round_trip_and_refuse_other_uses() {
        let levels: Vec<Simd> = Simd::supported().into_iter().filter(|&s| s != Simd::Portable).collect();
        if levels.is_empty() {
            eprintln!("SKIPPED: no AVX2 or AVX-512 on this CPU, so weights are not packed");
            return;
        }
        for simd in levels {
            for dp in [false, true] {
                if dp && !simd.has_bf16() {
                    let b = CpuBackend::with_threads(1).unwrap().with_simd(simd).unwrap();
                    let e = b.with_packed_dpbf16(true).err().expect("refused without AVX512-BF16");
                    assert!(e.to_string().contains("AVX512-BF16"), "{simd:?}: {e}");
                    continue;
                }
                packed_round_trip(simd, dp);
            }
        }
    }

    /// bf16 weights packed for `vdpbf16ps` by one backend give the same results at every level,
    /// within f32 rounding (the other levels run them on the portable path), and an f32 reference.
    #[test]
    fn kpairs_weights_run_at_every_level() {
        let Some(dp) = CpuBackend::with_threads(2).unwrap().with_packed_dpbf16(true).ok() else {
            eprintln!("SKIPPED: no AVX512-BF16 on this CPU, so no weights are packed for vdpbf16ps");
            return;
        };
        let s = GemmShape {
            rows: 20,
            in_features: 67,
            out_features: 40,
            experts: 3,
            activation: Activation::SwiGlu,
        };
        let w: Vec<bf16> = (0..3 * 80 * 67)
            .map(|i| bf16::from_f32((i as f32 * 0.37).sin() * 0.3))
            .collect();
        let x: Vec<bf16> = (0..20 * 67).map(|i| bf16::from_f32((i as f32 * 0.11).cos())).collect();
        let packed = dp.upload_weights(HostSlice::BF16(&w), s).unwrap();
        assert_eq!(dp.download(&packed).unwrap(), HostVec::BF16(w.clone()));
        let off = dp.upload(HostSlice::U32(&[0, 1, 14, 20])).unwrap();
        let xb = dp.upload(HostSlice::BF16(&x)).unwrap();
        // f32 reference of the bf16 values.
        let (xf, wf): (Vec<f32>, Vec<f32>) = (
            x.iter().map(|v| v.to_f32()).collect(),
            w.iter().map(|v| v.to_f32()).collect(),
        );
        let expert = |r: usize| [0usize, 1, 14, 20].iter().rposition(|&o| o <= r).unwrap();
        let dot = |r: usize, row: usize| {
            (0..67)
                .map(|i| xf[r * 67 + i] as f64 * wf[row * 67 + i] as f64)
                .sum::<f64>()
        };
        for simd in Simd::supported() {
            let b = dp.clone().with_simd(simd).unwrap();
            let mut yb = b.alloc(DType::BF16, 20 * 40).unwrap();
            b.grouped_matmul(&xb, &off, &packed, &mut yb, s).unwrap();
            let got = b.download(&yb).unwrap().to_f32().unwrap();
            for r in 0..20 {
                let e = expert(r);
                for c in 0..40 {
                    let (g, u) = (dot(r, e * 80 + c), dot(r, e * 80 + 40 + c));
                    let want = g / (1.0 + (-g).exp()) * u;
                    let v = got[r * 40 + c] as f64;
                    assert!(
                        (v - want).abs() <= 8e-3 * want.abs().max(0.05),
                        "{simd:?} row {r} col {c}: {v} vs {want}"
                    );
                }
            }
        }
    }

    fn packed_round_trip(simd: Simd, dp: bool) {
        let b = CpuBackend::with_threads(2)
            .unwrap()
            .with_simd(simd)
            .unwrap()
            .with_packed_dpbf16(dp)
            .unwrap();
        assert_eq!(b.packed_dpbf16(), dp);
        let s = GemmShape {
            rows: 3,
            in_features: 5,
            out_features: 3,
            experts: 2,
            activation: Activation::SwiGlu,
        };
        let w: Vec<bf16> = (0..2 * 6 * 5).map(|i| bf16::from_f32((i as f32 * 0.7).sin())).collect();
        let mut packed = b.upload_weights(HostSlice::BF16(&w), s).unwrap();
        assert!(packed.is_packed() && packed.len() == w.len());
        assert_eq!(b.download(&packed).unwrap(), HostVec::BF16(w.clone()));
        let nine = [bf16::from_f32(9.0), bf16::from_f32(8.0)];
        b.write(&mut packed, HostSlice::BF16(&nine)).unwrap();
        let mut w2 = w.clone();
        w2[..2].copy_from_slice(&nine);
        assert_eq!(b.download(&packed).unwrap(), HostVec::BF16(w2.clone()));
        let f: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
        assert_eq!(
            b.upload_weights(HostSlice::F32(&f), s).unwrap().is_packed(),
            b.capabilities().packed_weights.contains(&DType::F32),
            "{simd:?}: f32 weights packed as the capability says"
        );
        let h: Vec<half::f16> = f.iter().map(|&v| half::f16::from_f32(v)).collect();
        let packed_h = b.upload_weights(HostSlice::F16(&h), s).unwrap();
        assert!(packed_h.is_packed(), "f16 weights are packed");
        assert_eq!(b.download(&packed_h).unwrap(), HostVec::F16(h.clone()));

        let x = b.upload(HostSlice::BF16(&[bf16::from_f32(0.5); 18])).unwrap();
        let off = b.upload(HostSlice::U32(&[0, 1, 3])).unwrap();
        let (mut y, mut want) = (b.alloc(DType::BF16, 9).unwrap(), b.alloc(DType::BF16, 9).unwrap());
        b.grouped_matmul(&x, &off, &packed, &mut y, s).unwrap();
        let plain = b.upload(HostSlice::BF16(&w2)).unwrap();
        b.grouped_matmul(&x, &off, &plain, &mut want, s).unwrap();
        let (y, want) = (
            b.download(&y).unwrap().to_f32().unwrap(),
            b.download(&want).unwrap().to_f32().unwrap(),
        );
        assert!(
            y.iter()
                .zip(&want)
                .all(|(a, b)| (a - b).abs() <= 1e-2 * b.abs().max(1.0)),
            "{y:?} vs {want:?}"
        );

        let mut out = b.alloc(DType::BF16, 15).unwrap();
        let other = GemmShape {
            in_features: 6,
            out_features: 5,
            activation: Activation::None,
            ..s
        };
        let e = b.grouped_matmul(&x, &off, &packed, &mut out, other).unwrap_err();
        assert!(e.to_string().contains("packed for one shape"), "{e}");
        let e = b.grouped_matmul(&packed, &off, &plain, &mut out, s).unwrap_err();
        assert!(e.to_string().contains("upload_weights"), "{e}");
        // The fused permute checks the same, whichever way it runs, before writing anything.
        let ps = moe_hal_core::PermuteShape {
            tokens: 3,
            hidden: 6,
            top_k: 1,
            experts: 2,
        };
        let ids = b.upload(HostSlice::U32(&[1, 0, 1])).unwrap();
        let mut perm = moe_hal_core::Permuted::alloc(&b, ps, DType::BF16).unwrap();
        let gs = GemmShape { rows: 3, ..other };
        let mut fused = |hidden: &CpuBuffer, weight: &CpuBuffer| {
            b.permute_matmul(hidden, &ids, ps, &mut perm, weight, &mut out, gs)
                .unwrap_err()
        };
        let e = fused(&x, &packed);
        assert!(e.to_string().contains("packed for one shape"), "{e}");
        let e = fused(&packed, &plain);
        assert_eq!(
            b.download(&perm.offsets).unwrap(),
            HostVec::U32(vec![0; 3]),
            "offsets written"
        );
        assert!(e.to_string().contains("upload_weights"), "{e}");
        let e = b.upload_weights(HostSlice::BF16(&w[..59]), s).unwrap_err().to_string();
        assert!(e.contains("expert weights length"), "{e}");
    }
}
