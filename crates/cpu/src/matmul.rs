//! Grouped matmul and the router GEMM.
//!
//! The output is cut into a fixed grid of tiles (one expert, up to
//! `TILE_ROWS` rows, up to `TILE_COLS` output columns, more for packed weights, for the short
//! tiles of decode and for the k-pair kernel's short weight rows: [`tile_cols`]); the backend's
//! threads share the tiles out (`crate::pool::for_each`), so work is balanced by rows times columns rather than by
//! expert. Only the widths of decode tiles depend on the thread count (enough of them for every
//! thread: [`stream_tile_bytes`]); every output column is computed alike whatever tile holds it,
//! so no result bit depends on it. A tile is single-threaded, and which kernel runs it depends
//! only on the dtypes, the instruction set, `k` and the tile's height:
//! - with AVX-512, f32 input against f32 weights, tiles of [`BCAST_ROWS_F32`] rows or more
//!   ([`BCAST_ROWS_LONG_K`] past [`SHORT_K`] inputs): the k-pair broadcast kernel
//!   ([`crate::avx512::bcast_pairs`]) on input rows interleaved by the thread that runs their
//!   tiles ([`Parts`]) in blocks of 8 rows
//!   of input pairs, against the weight rows as stored; each output is the FMA chain over its
//!   even inputs plus the one over its odd inputs;
//! - with AVX-512, other dtypes, tiles of [`BCAST_ROWS`] rows or more: the broadcast kernel
//!   ([`crate::avx512::bcast`]) on input rows interleaved (and widened) the same way in lane
//!   blocks of 16, against the weight rows as stored (16-bit ones widened in L1 a chunk at a
//!   time; each output one FMA chain over `k`); a last lane block of at most [`SPLIT_ROWS`] rows
//!   ([`SPLIT_ROWS_WIDE`] with 16-bit weights) past a full one is split off into a tile of its
//!   own for the dot products;
//! - bf16 against bf16 with AVX512-BF16, under [`DP_BF16_ROWS`] rows: `vdpbf16ps`
//!   dot products;
//! - other tiles of at most [`NARROW_ROWS`] rows: register-blocked dot
//!   products on the weight rows as stored (16-lane partial sums);
//! - the rest: `gemm`'s cache-blocked kernels.
//!
//! Weights packed at upload ([`crate::pack`]) take none of these: with AVX-512 every tile runs
//! [`crate::avx512::packed`] on input rows interleaved in lane blocks of up to
//! [`crate::pack::PACKED_LANES`] rows ([`crate::pack::packed_lanes`]), with AVX2 [`crate::avx2::packed`] on the input rows as they are,
//! otherwise [`crate::pack::product_portable`]. Each output is one multiply-add chain over `k`
//! every way.

use crate::pack::{packed_lanes, Packing};
use half::{bf16, f16};
use moe_hal_core::{Activation, GemmShape, HostVec, MoeError, Result, RouterShape};
use std::cell::RefCell;

const TILE_ROWS: usize = 128;
const TILE_COLS: usize = 64;
/// Tiles of at most this many rows (decode) only stream their weights once: they are cut into
/// [`STREAM_TILE_BYTES`] of weight rows instead of [`TILE_COLS`] columns.
pub(crate) const STREAM_ROWS: usize = 8;
/// Weight bytes per tile of at most [`STREAM_ROWS`] rows: each tile starts with its first weight
/// rows not yet fetched, so fewer, larger tiles stall less. Two threads, 64 experts with weights in
/// DRAM, one row each, 5 runs of best of 15, median (min) ms against 64-column tiles: bf16 `down`
/// (512 columns) 8.62 (8.07) against 9.18 (9.06), gate/up (256) 17.61 (17.23) against 17.58
/// (16.63); f32 `down` 16.84 (15.98) against 16.90 (16.64), gate/up (128) 34.6 (30.7) against 34.4
/// (33.4); two rows each, f32 `down` 17.7 against 19.2. At one token that leaves 24-48 tiles.
const STREAM_TILE_BYTES: usize = 2 << 20;
/// Fewest decode tiles per thread of the pool: where [`STREAM_TILE_BYTES`] would leave fewer, the
/// tiles shrink (down to [`TILE_COLS`] columns). A thread's last tile ends when it ends, so with
/// few tiles a thread the others wait up to a whole tile at the end. On 16 cores (the Intel Xeon of
/// the GPU machine, one token, 8 experts of qwen3-30b-a3b) 2 MiB tiles left 3.5 a thread. Two
/// threads keep 2 MiB tiles at every shape of the presets.
const DECODE_TILES_PER_THREAD: usize = 8;
/// Output columns per tile of the packed kernels above [`STREAM_ROWS`] rows: each tile pays a task,
/// its first weight range unfetched and its columns' copy, so fewer, longer tiles stream better.
/// Two threads, 128 experts of qwen3-30b-a3b from DRAM, the two widths alternated call by call
/// (58 pairs; median of the paired time ratios against 64 columns): 16 rows each, bf16 gate/up
/// 0.977 (256) and 0.978 (512), `down` 0.975, f32 gate/up 0.991 and `down` 0.978; 12 rows 0.986,
/// 32 rows 0.998; bf16 `down` at 128 rows 0.965. 512 against 256: 1.003.
const PACKED_TILE_COLS: usize = 256;
/// Most columns in a tile.
const MAX_TILE_COLS: usize = 512;
/// Least weight bytes per tile of [`crate::avx512::bcast_pairs`] (gate and up rows together): a
/// tile of short weight rows is widened to whole panels ([`crate::avx512::PAIRS_PANEL`]) until it
/// holds this much, so that it streams longer and ends on no short pass. qwen3-30b-a3b `down` (K
/// 768) at 256 tokens, as routed, 128 experts from DRAM, 64 columns (192 KiB) against 144 and 192,
/// alternated call by call, median time ratios: one thread (CPU time) 0.972 and 0.964, two threads
/// 0.972 and 0.967; gate/up (K 2048, 1 MiB at 64 columns) is unchanged.
#[cfg(target_arch = "x86_64")]
const PAIRS_TILE_BYTES: usize = 512 << 10;
/// Tiles with at most this many rows (decode, sparse experts) run dot products straight on the
/// weight rows instead of calling `gemm`, whose packing costs more than the math there (measured on
/// qwen3-30b-a3b at 256 tokens: 8 rows 341 ms, 64 rows 286 ms in f32; 341 vs 227 ms in bf16).
const NARROW_ROWS: usize = 64;
/// Tiles with at least this many rows run the broadcast kernel ([`crate::avx512::bcast`]) where
/// the CPU has AVX-512, on input rows interleaved in lane blocks of 16. A lane block costs the same
/// whatever its rows (one thread, qwen3-30b-a3b shapes, 8 experts, best of 15, first version of the
/// kernel: gate/up 10.7 ms, down 4.2 ms for 8 to 16 rows per expert), against dot products at
/// 7.3 / 2.9 ms for 8 rows, 10.2 / 3.6 for 12 and 14.2 / 4.5 for 16. Whole blocks beat `gemm` at
/// every height (32 rows: 112 against 64 GFLOP/s gate/up; 128 rows: 89-114 against 69).
///
/// bf16 against bf16 meets `vdpbf16ps` dot products at the same height: one `vdpbf16ps` (32
/// products) issues every other cycle here, two f32 FMAs (16 products each) every cycle (register
/// loop, one core: 86 against 188 GFLOP/s), so past the widening the FMAs win (gate/up / down,
/// same measure, GFLOP/s: 12 rows 60 / 63 against 73 / 72; 14 rows 73 / 73 against 73 / 72; 15 rows
/// 78 / 78 against 76 / 73; 16 rows 81 / 84 against 73 / 74; 24 rows 80 / 80 against 77 / 74; 32
/// rows 111 / 109 against 83 / 85 with a whole tile widened beforehand, as until 2026-11-29).
/// Measured for bf16 against bf16 only; f16, mixed dtypes and CPUs without AVX512-BF16 use the
/// same threshold.
const BCAST_ROWS: usize = 14;
/// [`BCAST_ROWS_F32`] where `k` is above [`SHORT_K`]: the dot products' input rows no longer stay
/// in L1, and from 5 rows one block of [`crate::avx512::bcast_pairs`] is cheaper. qwen3-30b-a3b
/// gate/up (K 2048), 128 experts from DRAM, one thread, CPU time, the two alternated call by call,
/// median time ratio pairs / dot products: 2 rows 1.06, 3 rows 1.04, 4 rows 1.07, 5 rows 0.85,
/// 6 rows 0.86, 8 rows 0.80.
const BCAST_ROWS_LONG_K: usize = 5;
/// [`BCAST_ROWS`] for f32 inputs and weights up to [`SHORT_K`]: the broadcast kernels beat the dot
/// products from about 8 to 10 rows. With the 16-row lane blocks of [`crate::avx512::bcast`]
/// (ff26870, 68f5e94; one thread, 8 experts, best of 5 x 15, GFLOP/s at K 768 / K 1024: 10 rows 67 /
/// 69 against 64 / 58, 12 rows 83 / 80 against 68 / 71, 13 rows 87 / 87 against 63 / 66); with
/// [`crate::avx512::bcast_pairs`], `down` (K 768) as for [`BCAST_ROWS_LONG_K`]: 5 rows 1.06, 6 rows
/// 1.05, 8 rows 0.99 against the dot products.
const BCAST_ROWS_F32: usize = 10;
/// bf16-against-bf16 tiles under this many rows (and under [`BCAST_ROWS`]) run `vdpbf16ps` dot
/// products; from it, the f32 dot products on bf16 weights widened in registers, which issue twice
/// as many FMAs per cycle once the rows reuse each weight (see [`BCAST_ROWS`]; one thread,
/// qwen3-30b-a3b gate/up / down, best of 4 x 15, GFLOP/s: 2 rows 32 / 35 against 44 / 39 with
/// `vdpbf16ps`; 4 rows 64 / 64 against 64 / 64; 8 rows 77 / 80 against 73 / 70; 12 rows 80 / 81
/// against 72 / 73).
const DP_BF16_ROWS: usize = 8;
/// Longest `k` at which the dot products' four input rows stay in L1 next to the weight rows.
const SHORT_K: usize = 1024;
/// A last lane block of at most this many rows past a full one runs on dot products instead, for
/// f32 weights under an input of another dtype (f32 inputs run [`crate::avx512::bcast_pairs`],
/// which splits nothing off). Measured with f32 inputs before that kernel (one thread, f32, 8
/// experts, best of 15: gate/up at 17 / 18 / 20 rows per expert 10.8-11.0 / 11.3 / 11.9-12.1 ms
/// against 13.7-13.9 for two lane blocks, `down` 5.5-5.7 / 5.4-5.5 / 5.8 against 6.7-7.0; with 6
/// or 8 rows left, gate/up is slower split: 22 rows 14.2-14.5 against 13.8).
const SPLIT_ROWS: usize = 4;
/// [`SPLIT_ROWS`] for 16-bit weights, whose lane blocks pay for widening too: up to 8 rows left
/// run cheaper as dot products (one thread, 8 experts, best of 5 x 15, gate/up / down GFLOP/s: bf16
/// 21 rows 95 / 95 against 80 / 76 for two lane blocks, 23 rows 91 / 92 against 88 / 85, 24 rows
/// 96 / 94 against 93 / 85; f16 21 rows 88 / 78 against 81 / 67; f32 weights were slower split
/// at 22-24 rows: 80-92 against 91-101).
const SPLIT_ROWS_WIDE: usize = 8;

/// f16 bits to f32, exact, with integer ops and one multiply so that loops of it vectorise
/// (half's per-element conversion dispatches on F16C at run time and does not).
#[inline(always)]
pub(crate) fn f16_to_f32(h: f16) -> f32 {
    let h = h.to_bits() as u32;
    let em = h & 0x7fff;
    // Normal and subnormal: place the bits in an f32 and rescale the exponent bias by 2^112.
    let v = f32::from_bits(em << 13) * f32::from_bits(0x7780_0000);
    let v = if em >= 0x7c00 {
        f32::from_bits((em << 13) | 0x7f80_0000)
    } else {
        v
    };
    f32::from_bits(v.to_bits() | ((h & 0x8000) << 16))
}

/// bf16 bits to f32: bf16 is the top half of an f32.
#[inline(always)]
pub(crate) fn bf16_to_f32(b: bf16) -> f32 {
    f32::from_bits((b.to_bits() as u32) << 16)
}

/// f32 to bf16, rounded to nearest even, NaN kept quiet: the same bits as `bf16::from_f32`, without
/// branches so that loops of it vectorise.
#[inline(always)]
pub(crate) fn f32_to_bf16(v: f32) -> bf16 {
    let x = v.to_bits();
    let nan = x & 0x7fff_ffff > 0x7f80_0000;
    // Up when the dropped half is above a half unit, or exactly half with an odd kept part.
    let up = (x & 0x8000 != 0 && x & 0x1_7fff != 0) as u32;
    bf16::from_bits(if nan { (x >> 16) | 0x40 } else { (x >> 16) + up } as u16)
}

/// `d[i] = f32_to_bf16(v[i])`, 16 lanes at a time at the AVX-512 levels: every bf16 output of a
/// grouped matmul goes through it (6 M at 256 tokens of qwen3-30b-a3b). One core of an AMD EPYC
/// (Zen 5), 256 values in L1: 0.048 ns a value, against 0.26 for the baseline's SSE2.
fn to_bf16(simd: Simd, d: &mut [bf16], v: &[f32]) {
    let mut run = || d.iter_mut().zip(v).for_each(|(d, &v)| *d = f32_to_bf16(v));
    #[cfg(target_arch = "x86_64")]
    if simd.avx512() {
        // SAFETY: the AVX-512 levels are only chosen where the CPU has F, BW and VL.
        return unsafe { crate::avx512::compiled_for_avx512(run) };
    }
    let _ = simd;
    run()
}

/// Input rows per lane block of the broadcast kernel: one `zmm` of f32.
pub const LANE_ROWS: usize = 16;

/// f32 values of `rows` interleaved input rows of `k` elements (whole lane blocks of `lanes`).
pub fn interleaved_len(rows: usize, k: usize, lanes: usize) -> usize {
    rows.div_ceil(lanes) * lanes * k
}

/// The rows a grouped matmul reads from its input: its own, in order, or (gate/up fused with the
/// permute, [`crate::CpuBackend`]'s `permute_matmul`) row `r` of the permuted order is the
/// input's row `source_of[r] / top_k`, the hidden row that the permute would have copied there.
#[derive(Clone, Copy)]
pub enum InputRows<'a> {
    InOrder,
    Gathered { source_of: &'a [u32], top_k: usize },
}

impl InputRows<'_> {
    /// The input row that row `r` reads.
    #[inline(always)]
    pub fn row(self, r: usize) -> usize {
        match self {
            InputRows::InOrder => r,
            InputRows::Gathered { source_of, top_k } => source_of[r] as usize / top_k,
        }
    }
}

/// Interleaves the rows `row0 .. row0 + rows` (of `[_, k]`, read where `src` says), widened to
/// f32, into the lane blocks the broadcast kernel ([`LANE_ROWS`] lanes) and the packed kernel
/// ([`crate::pack::packed_lanes`]) read: block `b` is `[k][lanes]` with row `row0 + b * lanes + l`
/// in lane `l`; lanes past `rows` are zero. `dst` holds [`interleaved_len`]`(rows, k, lanes)`
/// values; `lanes` is at most 16.
pub fn interleave(x: Floats, src: InputRows, row0: usize, rows: usize, k: usize, lanes: usize, dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::avx512::has_avx512() {
        let at = |r: usize| src.row(row0 + r);
        // SAFETY: the CPU has AVX-512 F, BW and VL (checked just above).
        unsafe {
            match x {
                Floats::F32(v) => crate::avx512::interleave(v, at, rows, k, lanes, dst),
                Floats::BF16(v) => crate::avx512::interleave(v, at, rows, k, lanes, dst),
                Floats::F16(v) => crate::avx512::interleave(v, at, rows, k, lanes, dst),
            }
        }
        return;
    }
    interleave_portable(x, src, row0, rows, k, lanes, dst)
}

/// [`interleave`] element by element (the reference of its tests, and the path without AVX-512).
pub fn interleave_portable(
    x: Floats,
    src: InputRows,
    row0: usize,
    rows: usize,
    k: usize,
    lanes: usize,
    dst: &mut [f32],
) {
    let at = |r: usize| src.row(row0 + r);
    match x {
        Floats::F32(v) => interleave_with(v, at, rows, k, lanes, dst, |v| v),
        Floats::BF16(v) => interleave_with(v, at, rows, k, lanes, dst, bf16_to_f32),
        Floats::F16(v) => interleave_with(v, at, rows, k, lanes, dst, f16_to_f32),
    }
}

#[inline(always)]
fn interleave_with<T: Copy>(
    x: &[T],
    at: impl Fn(usize) -> usize,
    rows: usize,
    k: usize,
    lanes: usize,
    dst: &mut [f32],
    wide: impl Fn(T) -> f32,
) {
    assert!(dst.len() >= interleaved_len(rows, k, lanes));
    for (b, blk) in dst.chunks_exact_mut(lanes * k).take(rows.div_ceil(lanes)).enumerate() {
        for l in 0..lanes {
            let r = b * lanes + l;
            if r < rows {
                let row = &x[at(r) * k..][..k];
                for (d, &v) in blk[l..].iter_mut().step_by(lanes).zip(row) {
                    *d = wide(v);
                }
            } else {
                blk[l..].iter_mut().step_by(lanes).for_each(|d| *d = 0.0);
            }
        }
    }
}

/// A read-only float buffer of any storage dtype.
#[derive(Clone, Copy)]
pub enum Floats<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
    F16(&'a [f16]),
}

impl Floats<'_> {
    /// Bytes per element.
    fn elem_size(&self) -> usize {
        match self {
            Floats::F32(_) => 4,
            Floats::BF16(_) | Floats::F16(_) => 2,
        }
    }

    /// Widens `len` elements from `start` into `dst` (cleared first). Inlined so that it is
    /// vectorised with the caller's target features.
    #[inline(always)]
    fn widen(&self, start: usize, len: usize, dst: &mut Vec<f32>) {
        dst.clear();
        match self {
            Floats::F32(v) => dst.extend_from_slice(&v[start..start + len]),
            Floats::BF16(v) => dst.extend(v[start..start + len].iter().map(|&x| bf16_to_f32(x))),
            Floats::F16(v) => dst.extend(v[start..start + len].iter().map(|&x| f16_to_f32(x))),
        }
    }

    /// A pointer to `len` f32 values from `start`, widening into `scratch` when stored narrower.
    fn as_f32(&self, start: usize, len: usize, scratch: &mut Vec<f32>) -> *const f32 {
        match self {
            Floats::F32(v) => v[start..start + len].as_ptr(),
            _ => {
                self.widen(start, len, scratch);
                scratch.as_ptr()
            }
        }
    }
}

/// A raw view of an output buffer that tiles write disjoint parts of.
#[derive(Clone, Copy)]
pub enum OutPtr {
    F32(*mut f32, usize),
    BF16(*mut bf16, usize),
    F16(*mut f16, usize),
}

// SAFETY: an OutPtr is only built from a `&mut` buffer that outlives the
// parallel section using it, and every tile writes a disjoint index range.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    pub fn new(v: &mut [f32]) -> Self {
        OutPtr::F32(v.as_mut_ptr(), v.len())
    }

    pub fn from_buffer(v: &mut HostVec) -> Self {
        match v {
            HostVec::F32(v) => OutPtr::F32(v.as_mut_ptr(), v.len()),
            HostVec::BF16(v) => OutPtr::BF16(v.as_mut_ptr(), v.len()),
            HostVec::F16(v) => OutPtr::F16(v.as_mut_ptr(), v.len()),
            HostVec::U32(_) => unreachable!("dtype checked before"),
        }
    }

    /// Stores `vals` at `start..start + vals.len()`, rounding to the buffer's dtype.
    ///
    /// # Safety
    /// No other thread may access that range during the call.
    unsafe fn store(self, simd: Simd, start: usize, vals: &[f32]) {
        let end = start + vals.len();
        match self {
            OutPtr::F32(p, n) => {
                assert!(end <= n);
                std::slice::from_raw_parts_mut(p.add(start), vals.len()).copy_from_slice(vals)
            }
            OutPtr::BF16(p, n) => {
                assert!(end <= n);
                to_bf16(simd, std::slice::from_raw_parts_mut(p.add(start), vals.len()), vals);
            }
            OutPtr::F16(p, n) => {
                assert!(end <= n);
                let d = std::slice::from_raw_parts_mut(p.add(start), vals.len());
                d.iter_mut().zip(vals).for_each(|(d, &v)| *d = f16::from_f32(v));
            }
        }
    }
}

impl OutPtr {
    /// Elements `start .. start + len` as a read-only buffer.
    ///
    /// # Safety
    /// No thread may write that range while the result lives.
    unsafe fn view<'a>(self, start: usize, len: usize) -> Floats<'a> {
        let end = start + len;
        match self {
            OutPtr::F32(p, n) => {
                assert!(end <= n);
                Floats::F32(std::slice::from_raw_parts(p.add(start), len))
            }
            OutPtr::BF16(p, n) => {
                assert!(end <= n);
                Floats::BF16(std::slice::from_raw_parts(p.add(start), len))
            }
            OutPtr::F16(p, n) => {
                assert!(end <= n);
                Floats::F16(std::slice::from_raw_parts(p.add(start), len))
            }
        }
    }
}

/// Offsets as usize after checking they are non-decreasing and end within `rows`.
pub fn checked_offsets(offsets: &[u32], rows: usize) -> Result<Vec<usize>> {
    let off: Vec<usize> = offsets.iter().map(|&o| o as usize).collect();
    if let Some(e) = (0..off.len() - 1).find(|&e| off[e] > off[e + 1]) {
        return Err(MoeError::shape(
            format!("offsets[{}]", e + 1),
            off[e + 1],
            format!(">= offsets[{e}] = {}", off[e]),
        ));
    }
    let last = off[off.len() - 1];
    if last > rows {
        return Err(MoeError::shape(
            format!("offsets[{}]", off.len() - 1),
            last,
            format!("at most rows = {rows}"),
        ));
    }
    Ok(off)
}

struct Tile {
    expert: usize,
    row0: usize,
    rows: usize,
    col0: usize,
    cols: usize,
    /// The tile's range of interleaved input rows in its batch ([`Parts`]), for the broadcast and
    /// packed kernels.
    xt: Option<usize>,
    /// The range is laid out for AMX ([`Layout::Amx`]): the tile runs [`crate::amx::packed`].
    amx: bool,
}

#[derive(Default)]
struct Scratch {
    lhs: Vec<f32>,
    gate_w: Vec<f32>,
    up_w: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
}

thread_local! {
    // Per-thread work buffers, reused across calls (the pool's threads live as long as the backend).
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// `dst[m, n] = lhs[m, k] · w[n, k]^T`, row-major, single-threaded.
///
/// # Safety
/// `lhs` points to `m * k` readable f32, `w` to `n * k`, `dst` to `m * n` writable.
unsafe fn gemm_nt(m: usize, n: usize, k: usize, lhs: *const f32, w: *const f32, dst: *mut f32) {
    ::gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        n as isize,
        false,
        lhs,
        1,
        k as isize,
        w,
        k as isize,
        1,
        0.0,
        1.0,
        false,
        false,
        false,
        ::gemm::Parallelism::None,
    )
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `gate[i] = silu(gate[i]) * up[i]`: 16 lanes at a time with AVX-512
/// ([`crate::avx512::swiglu`]), else the scalar formula with the C library's `expf`.
fn swiglu(simd: Simd, gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd.avx512() {
        // SAFETY: Simd levels with AVX-512 are chosen only where the CPU has it.
        unsafe { crate::avx512::swiglu(gate, up) };
        return;
    }
    let _ = simd;
    gate.iter_mut().zip(up).for_each(|(g, &u)| *g = silu(*g) * u);
}

/// Output columns per tile of `rows` rows: [`TILE_COLS`] ([`PACKED_TILE_COLS`] for packed tiles),
/// or for short tiles enough for about `stream_bytes` of weights (gate and up rows together; see
/// [`stream_tile_bytes`]), in whole multiples of `TILE_COLS`; tiles of the k-pair kernel (`layout`)
/// at least [`PAIRS_TILE_BYTES`], in whole panels. Only the widths of short tiles depend on the
/// thread count: a tile's height picks its kernel, and every output column is computed alike in
/// whatever tile holds it, so the bits do not.
fn tile_cols(rows: usize, k: usize, weight: Floats, swiglu: bool, layout: Layout, stream_bytes: usize) -> usize {
    let per_col = (k * weight.elem_size() * if swiglu { 2 } else { 1 }).max(1);
    if rows <= STREAM_ROWS {
        return (stream_bytes / per_col).clamp(TILE_COLS, MAX_TILE_COLS) / TILE_COLS * TILE_COLS;
    }
    match layout {
        #[cfg(target_arch = "x86_64")]
        Layout::Pairs if TILE_COLS * per_col < PAIRS_TILE_BYTES => {
            use crate::avx512::PAIRS_PANEL;
            (PAIRS_TILE_BYTES.div_ceil(per_col).next_multiple_of(PAIRS_PANEL))
                .min(MAX_TILE_COLS / PAIRS_PANEL * PAIRS_PANEL)
        }
        Layout::Packed => PACKED_TILE_COLS,
        #[cfg(target_arch = "x86_64")]
        Layout::Bf16Pairs | Layout::Amx => PACKED_TILE_COLS,
        _ => TILE_COLS,
    }
}

/// Weight bytes per decode tile of a matmul whose decode tiles (experts of at most [`STREAM_ROWS`]
/// rows) read `bytes` of weights in all, on `threads` threads: [`STREAM_TILE_BYTES`], less where
/// that leaves fewer than [`DECODE_TILES_PER_THREAD`] tiles a thread.
fn stream_tile_bytes(bytes: usize, threads: usize) -> usize {
    (bytes / (threads.max(1) * DECODE_TILES_PER_THREAD)).min(STREAM_TILE_BYTES)
}

/// Whether every tile of a grouped matmul on these weights runs the packed kernels on interleaved
/// rows, which can be gathered from anywhere ([`InputRows::Gathered`]): the other kernels read
/// the input rows in place.
fn packed_interleaved(simd: Simd, layout: Layout, w: Weights) -> bool {
    match w.packed {
        Some(p) if p.kpairs => layout.bf16_pairs(),
        Some(_) => simd.avx512(),
        None => false,
    }
}

/// Whether [`grouped_matmul`] can read `input`'s rows where [`InputRows::Gathered`] says on these
/// weights (packed, with AVX-512), so that the permute need not copy them.
pub fn gathers(simd: Simd, input: Floats, weight: Floats, packed: Option<Packing>) -> bool {
    let w = Weights { floats: weight, packed };
    packed_interleaved(simd, Layout::of(simd, input, w), w)
}

/// Runs every tile of a grouped matmul; `groups[e]` is expert `e`'s row range, whose rows `src`
/// places in `input`.
fn run_tiles(
    simd: Simd,
    input: Floats,
    src: InputRows,
    groups: &[(usize, usize)],
    w: Weights,
    out: OutPtr,
    s: GemmShape,
) {
    let plan = Plan::new(simd, input, src, groups, w, out, s);
    let parts = plan.parts(plan.input, 0);
    crate::pool::for_each(plan.tiles.len(), |i| plan.run(&parts, &plan.tiles[i]));
}

/// A grouped matmul cut into tiles: [`run_tiles`] runs them all, [`mlp`] two matmuls' tiles
/// interleaved by expert.
struct Plan<'a> {
    simd: Simd,
    input: Floats<'a>,
    src: InputRows<'a>,
    w: Weights<'a>,
    out: OutPtr,
    s: GemmShape,
    tiles: Vec<Tile>,
    /// The row ranges of the broadcast and packed tiles, and how each is interleaved ([`Parts`]).
    ranges: Vec<(usize, usize, Layout)>,
    call: u64,
}

impl<'a> Plan<'a> {
    /// The tiles of the matmul; `groups[e]` is expert `e`'s row range, whose rows `src` places in
    /// `input`.
    fn new(
        simd: Simd,
        input: Floats<'a>,
        src: InputRows<'a>,
        groups: &[(usize, usize)],
        w: Weights<'a>,
        out: OutPtr,
        s: GemmShape,
    ) -> Self {
        let (k, n, weight) = (s.in_features, s.out_features, w.floats);
        let layout = Layout::of(simd, input, w);
        let interleaved = packed_interleaved(simd, layout, w);
        // The tiles that read their rows in place cannot gather them.
        assert!(
            interleaved || matches!(src, InputRows::InOrder),
            "gathered rows need packed kernels"
        );
        let swiglu = s.activation == Activation::SwiGlu;
        let decode_experts = groups
            .iter()
            .filter(|&&(a, b)| (1..=STREAM_ROWS).contains(&(b - a)))
            .count();
        let stream_bytes = stream_tile_bytes(
            decode_experts * n * k * weight.elem_size() * if swiglu { 2 } else { 1 },
            crate::pool::threads(),
        );
        // Packed bf16 tiles of bf16 rows run on AMX from `amx::min_rows` rows, where the level has it.
        #[cfg(target_arch = "x86_64")]
        let amx_rows = (simd.amx()
            && interleaved
            && matches!((input, weight), (Floats::BF16(_), Floats::BF16(_)))
            && w.packed.is_some_and(|p| !p.kpairs))
        .then(crate::amx::min_rows);
        let (mut tiles, mut ranges) = (Vec::new(), Vec::new());
        for (expert, &(a, b)) in groups.iter().enumerate() {
            for row0 in (a..b).step_by(TILE_ROWS) {
                let rows = TILE_ROWS.min(b - row0);
                let head = match w.packed {
                    _ if interleaved => rows,
                    Some(_) => 0,
                    None => simd.bcast_rows(input, weight, rows, k),
                };
                #[cfg(target_arch = "x86_64")]
                let layout = match amx_rows {
                    Some(min) if head >= min => Layout::Amx,
                    _ => layout,
                };
                let xt = (head > 0).then(|| {
                    ranges.push((row0, head, layout));
                    ranges.len() - 1
                });
                // Only tiles whose rows run the broadcast kernels take their layout's width (a short
                // f32 tile on dot products keeps the dot products' grid).
                let kernel = if head > 0 { layout } else { Layout::Lanes(LANE_ROWS) };
                let width = tile_cols(rows, k, weight, swiglu, kernel, stream_bytes);
                // A decode GEMM with few columns (the router's 128 at one token) in two tiles at least,
                // so that both cores stream its weights: qwen3-30b-a3b's bf16 layer at one token,
                // paired against one tile, about 0.994 (0.982-0.984 against 0.988-0.992 beside the
                // older kernels). Expert GEMMs have more columns than two decode tiles take.
                let width = if rows <= STREAM_ROWS {
                    width.min(n.div_ceil(2).next_multiple_of(TILE_COLS))
                } else {
                    width
                };
                for col0 in (0..n).step_by(width) {
                    let cols = width.min(n - col0);
                    // The broadcast rows, then the rest on dot products, next to each other in the list
                    // so that the same thread tends to run both while the weights are in its cache.
                    for (row0, rows, xt) in [(row0, head, xt), (row0 + head, rows - head, None)] {
                        if rows > 0 {
                            tiles.push(Tile {
                                expert,
                                row0,
                                rows,
                                col0,
                                cols,
                                xt,
                                amx: xt.is_some() && kernel.amx(),
                            });
                        }
                    }
                }
            }
        }
        Plan {
            simd,
            input,
            src,
            w,
            out,
            s,
            tiles,
            ranges,
            call: CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// The interleaving of this plan's row ranges from `input`, whose row 0 is the plan's row
    /// `base` ([`Parts::base`]).
    fn parts<'p>(&'p self, input: Floats<'p>, base: usize) -> Parts<'p> {
        Parts {
            call: self.call,
            ranges: &self.ranges,
            base,
            input,
            src: self.src,
            k: self.s.in_features,
        }
    }

    /// Computes tile `t`, reading its input rows through `parts` (whose `base` is 0 unless the
    /// tile reads interleaved rows).
    fn run(&self, parts: &Parts, t: &Tile) {
        assert!(
            parts.base == 0 || t.xt.is_some(),
            "only interleaved rows are read from an offset"
        );
        let (s, w, out, input) = (self.s, self.w, self.out, parts.input);
        let (k, n) = (s.in_features, s.out_features);
        let wrows = s.weight_rows();
        // Packed weights never take the bf16 dot products.
        let simd = if w.packed.is_some() {
            self.simd.without_bf16()
        } else {
            self.simd
        };
        let weight = w.floats;
        // The tile's interleaved rows, for the broadcast and packed kernels.
        let run = |xt: Option<&[f32]>| {
            SCRATCH.with(|sc| {
                let sc = &mut *sc.borrow_mut();
                let wbase = t.expert * wrows;
                // bf16 dot products read the bf16 input as it is; every other path reads it as f32.
                let lhs = if simd.bf16_direct(input, weight, t.rows) || xt.is_some() {
                    std::ptr::null()
                } else {
                    input.as_f32(t.row0 * k, t.rows * k, &mut sc.lhs)
                };
                sc.gate.resize(t.rows * t.cols, 0.0);
                product(
                    simd,
                    input,
                    lhs,
                    xt,
                    w,
                    wbase + t.col0,
                    t,
                    k,
                    &mut sc.gate_w,
                    &mut sc.gate,
                );
                if s.activation == Activation::SwiGlu {
                    sc.up.resize(t.rows * t.cols, 0.0);
                    product(
                        simd,
                        input,
                        lhs,
                        xt,
                        w,
                        wbase + n + t.col0,
                        t,
                        k,
                        &mut sc.up_w,
                        &mut sc.up,
                    );
                    swiglu(simd, &mut sc.gate, &sc.up);
                }
                for r in 0..t.rows {
                    // SAFETY: tile (row0 + r, col0 .. col0 + cols) belongs to this tile only.
                    unsafe { out.store(simd, (t.row0 + r) * n + t.col0, &sc.gate[r * t.cols..(r + 1) * t.cols]) };
                }
            })
        };
        match t.xt {
            Some(p) => parts.with(p, |xt| run(Some(xt))),
            None => run(None),
        }
    }
}

/// Calls of [`run_tiles`] so far: with a range's index, the key of a thread's interleaved rows.
static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

thread_local! {
    /// This thread's interleaved input rows: the `(call, range)` they hold, and the buffer (which
    /// only grows).
    static ROWS: RefCell<((u64, usize), Vec<f32>)> = const { RefCell::new(((u64::MAX, 0), Vec::new())) };
}

/// The row ranges of a call's broadcast and packed tiles, `(first row, rows)`, each interleaved by
/// a tile that reads it into its thread's buffer ([`ROWS`]), where the thread's next tiles, which
/// are mostly of the same range (the list holds a range's tiles one after another, and
/// `crate::pool::for_each` gives each thread runs of it), find it.
///
/// A buffer per call, each range interleaved once into it by the first tile that read it, was
/// 8 MiB at 256 tokens of qwen3-30b-a3b gate/up in bf16 (16 in f32): written once, read by the
/// range's tiles, then pushed to memory by the weights streaming through, and read back from it
/// to be written over by the next call, about 2 bytes of traffic for each byte of it. A thread's
/// buffer stays in its L2. Two threads, 128 experts from DRAM, the two alternated call by call
/// (58 pairs, median of the time ratios, per-thread against per-call): 16 rows each, bf16 gate/up
/// 0.975, `down` 0.987-0.998; f32 0.982 and 0.989; one row 0.996. Before that buffer, a separate
/// pass over every range first waited on memory with no tile running.
struct Parts<'a> {
    call: u64,
    ranges: &'a [(usize, usize, Layout)],
    /// The range's row that is `input`'s row 0: 0, or (the `down` tiles of [`mlp`]) the first row
    /// of the one expert whose rows `input` holds.
    base: usize,
    input: Floats<'a>,
    src: InputRows<'a>,
    k: usize,
}

impl Parts<'_> {
    /// Runs `f` on range `part` interleaved, in this thread's buffer: as a previous tile of this
    /// thread left it, or interleaved now.
    fn with<R>(&self, part: usize, f: impl FnOnce(&[f32]) -> R) -> R {
        let (row0, rows, layout) = self.ranges[part];
        let len = layout.len(rows, self.k);
        ROWS.with(|c| {
            let (key, buf) = &mut *c.borrow_mut();
            // The lane blocks start on a cache line: each of their vector loads then reads one
            // line instead of two (the allocator aligns large buffers to 16 bytes only).
            if buf.len() < len + LINE_F32 {
                buf.resize(len + LINE_F32, 0.0);
            }
            let skip = buf.as_ptr().align_offset(64).min(LINE_F32);
            let xt = &mut buf[skip..skip + len];
            if *key != (self.call, part) {
                layout.interleave(self.input, self.src, row0 - self.base, rows, self.k, xt);
                *key = (self.call, part);
            }
            f(xt)
        })
    }
}

/// How the input rows of broadcast and packed tiles are interleaved.
#[derive(Clone, Copy)]
enum Layout {
    /// Lane blocks of this many rows ([`interleave`]).
    Lanes(usize),
    /// Blocks of eight rows of input pairs, for [`crate::avx512::bcast_pairs`].
    #[cfg(target_arch = "x86_64")]
    Pairs,
    /// Lane blocks of [`crate::pack::packed_lanes`] rows, for [`crate::avx512::packed`].
    Packed,
    /// bf16 input pairs in lane blocks of [`crate::pack::packed_lanes`] rows, for
    /// [`crate::avx512::packed_dp`].
    #[cfg(target_arch = "x86_64")]
    Bf16Pairs,
    /// bf16 rows as they are, padded to whole tiles, for [`crate::amx::packed`] (a range at a time:
    /// the plan's other ranges keep the plan's layout).
    #[cfg(target_arch = "x86_64")]
    Amx,
}

impl Layout {
    fn of(simd: Simd, input: Floats, w: Weights) -> Layout {
        if let Some(p) = w.packed {
            #[cfg(target_arch = "x86_64")]
            if p.kpairs && simd.has_bf16() && matches!((input, w.floats), (Floats::BF16(_), Floats::BF16(_))) {
                return Layout::Bf16Pairs;
            }
            let _ = p;
            return Layout::Packed;
        }
        #[cfg(target_arch = "x86_64")]
        if simd.pairs(input, w.floats) {
            return Layout::Pairs;
        }
        let _ = (simd, input);
        Layout::Lanes(LANE_ROWS)
    }

    /// Whether the range's tiles run on AMX.
    fn amx(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if let Layout::Amx = self {
            return true;
        }
        false
    }

    /// Whether packed tiles run [`crate::avx512::packed_dp`].
    fn bf16_pairs(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if let Layout::Bf16Pairs = self {
            return true;
        }
        false
    }

    /// f32 values of `rows` interleaved rows of `k` inputs.
    fn len(self, rows: usize, k: usize) -> usize {
        match self {
            Layout::Lanes(lanes) => interleaved_len(rows, k, lanes),
            Layout::Packed => interleaved_len(rows, k, packed_lanes(rows)),
            #[cfg(target_arch = "x86_64")]
            Layout::Pairs => crate::avx512::pairs_len(rows, k),
            #[cfg(target_arch = "x86_64")]
            Layout::Bf16Pairs => crate::avx512::bf16_pairs_len(rows, k),
            #[cfg(target_arch = "x86_64")]
            Layout::Amx => crate::amx::rows_len(rows, k),
        }
    }

    fn interleave(self, x: Floats, src: InputRows, row0: usize, rows: usize, k: usize, dst: &mut [f32]) {
        match (self, x) {
            #[cfg(target_arch = "x86_64")]
            (Layout::Pairs, Floats::F32(v)) => {
                // Pairs serve weights as stored, which `gathers` turns down.
                assert!(
                    matches!(src, InputRows::InOrder),
                    "the pairs kernel reads its rows in order"
                );
                // SAFETY: pairs are chosen only where the CPU has AVX-512 (Simd::pairs).
                unsafe { crate::avx512::interleave_pairs(&v[row0 * k..], rows, k, dst) }
            }
            #[cfg(target_arch = "x86_64")]
            (Layout::Pairs, _) => unreachable!("pairs are chosen for f32 inputs only"),
            #[cfg(target_arch = "x86_64")]
            (Layout::Bf16Pairs, Floats::BF16(v)) => {
                crate::avx512::interleave_bf16_pairs(v, |r| src.row(row0 + r), rows, k, dst)
            }
            #[cfg(target_arch = "x86_64")]
            (Layout::Bf16Pairs, _) => unreachable!("bf16 pairs are chosen for bf16 inputs only"),
            #[cfg(target_arch = "x86_64")]
            (Layout::Amx, Floats::BF16(v)) => crate::amx::copy_rows(v, |r| src.row(row0 + r), rows, k, dst),
            #[cfg(target_arch = "x86_64")]
            (Layout::Amx, _) => unreachable!("AMX is chosen for bf16 inputs only"),
            (Layout::Lanes(lanes), _) => interleave(x, src, row0, rows, k, lanes, dst),
            (Layout::Packed, _) => interleave(x, src, row0, rows, k, packed_lanes(rows), dst),
        }
    }
}

/// f32 per cache line.
const LINE_F32: usize = 64 / std::mem::size_of::<f32>();

/// The weights of a grouped matmul: as stored, or packed at upload ([`crate::pack`]).
#[derive(Clone, Copy)]
struct Weights<'a> {
    floats: Floats<'a>,
    packed: Option<Packing>,
}

/// `dst[r, c] = input[t.row0 + r] · weight row (wrow + c)` over the tile's rows and columns, where
/// `wrow` counts the rows of every expert. `lhs` is the tile's input rows as f32 (null when
/// [`Simd::bf16_direct`] holds or the tile has interleaved rows), `xt` the tile's interleaved rows
/// for the broadcast and packed kernels (its [`Parts`] range); `wscratch` receives
/// widened weights for `gemm`, or the packed kernel's accumulators.
#[allow(clippy::too_many_arguments)]
fn product(
    simd: Simd,
    input: Floats,
    lhs: *const f32,
    xt: Option<&[f32]>,
    w: Weights,
    wrow: usize,
    t: &Tile,
    k: usize,
    wscratch: &mut Vec<f32>,
    dst: &mut [f32],
) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = xt;
    let (weight, at) = (w.floats, wrow * k);
    if let Some(p) = w.packed {
        let (e, first) = (wrow / p.rows, wrow % p.rows);
        #[cfg(target_arch = "x86_64")]
        let scheme = crate::avx512::one_pass_scheme();
        let span = e * p.expert_len()..(e + 1) * p.expert_len();
        #[cfg(target_arch = "x86_64")]
        if let (Some(xt), true, Floats::BF16(v)) = (xt, t.amx, weight) {
            // SAFETY: tiles run on AMX only at the Amx level (Plan::new), which `amx::available`
            // grants; `packed` checks the slices' lengths.
            unsafe {
                crate::amx::packed(
                    &mut crate::amx::Hw,
                    xt,
                    t.rows,
                    k,
                    &v[span],
                    first,
                    t.cols,
                    wscratch,
                    dst,
                )
            };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if let (Some(xt), true, Floats::BF16(v)) = (xt, p.kpairs, weight) {
            // SAFETY: kpairs tiles get interleaved rows only with Layout::Bf16Pairs, chosen where
            // the level has AVX512-BF16 (Layout::of); `packed_dp` checks the slices' lengths.
            unsafe { crate::avx512::packed_dp(xt, t.rows, k, &v[span], first, t.cols, wscratch, dst) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(xt) = xt {
            // SAFETY: tiles get interleaved rows with packed weights only where the CPU has
            // AVX-512 (Simd::avx512 in run_tiles); `packed` checks the slices' lengths.
            unsafe {
                match weight {
                    Floats::F32(v) => {
                        crate::avx512::packed(xt, t.rows, k, &v[span], first, t.cols, wscratch, dst, scheme)
                    }
                    Floats::BF16(v) => {
                        crate::avx512::packed(xt, t.rows, k, &v[span], first, t.cols, wscratch, dst, scheme)
                    }
                    Floats::F16(v) => {
                        crate::avx512::packed(xt, t.rows, k, &v[span], first, t.cols, wscratch, dst, scheme)
                    }
                }
            }
            return;
        }
        // SAFETY: lhs covers the tile's rows * k f32 (as_f32 in the caller).
        let x = unsafe { std::slice::from_raw_parts(lhs, t.rows * k) };
        let w = match weight {
            Floats::F32(v) => Floats::F32(&v[span]),
            Floats::BF16(v) => Floats::BF16(&v[span]),
            Floats::F16(v) => Floats::F16(&v[span]),
        };
        simd.packed(x, t.rows, &p, w, first, t.cols, wscratch, dst);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if let (Some(xt), true, Floats::F32(w)) = (xt, simd.pairs(input, weight), weight) {
        // SAFETY: tiles get interleaved rows only where the CPU has AVX-512 (Simd::bcast_rows), in
        // pairs for f32 input and weights (Layout::of); the slices are sized for the tile.
        unsafe { crate::avx512::bcast_pairs(xt, t.rows, k, &w[at..at + t.cols * k], t.cols, dst) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(xt) = xt {
        let n = t.cols * k;
        // SAFETY: tiles get interleaved rows only where the CPU has AVX-512 (Simd::bcast_rows); the
        // slices are sized for the tile.
        unsafe {
            match weight {
                Floats::F32(w) => crate::avx512::bcast(xt, t.rows, k, &w[at..at + n], t.cols, dst),
                Floats::BF16(w) => crate::avx512::bcast(xt, t.rows, k, &w[at..at + n], t.cols, dst),
                Floats::F16(w) => crate::avx512::bcast(xt, t.rows, k, &w[at..at + n], t.cols, dst),
            }
        };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if simd.bf16_direct(input, weight, t.rows) {
        if let (Floats::BF16(x), Floats::BF16(w)) = (input, weight) {
            let (x, w) = (&x[t.row0 * k..(t.row0 + t.rows) * k], &w[at..at + t.cols * k]);
            // SAFETY: bf16_direct holds only where the CPU has AVX512-BF16; the slices are sized.
            unsafe { crate::avx512::dots_bf16(x, t.rows, k, w, t.cols, dst) };
            return;
        }
    }
    // SAFETY: lhs covers the tile's rows * k f32 (as_f32 in the caller).
    let x = unsafe { std::slice::from_raw_parts(lhs, t.rows * k) };
    if t.rows <= NARROW_ROWS {
        simd.dots(x, t.rows, k, weight, at, t.cols, dst);
    } else {
        let w = weight.as_f32(at, t.cols * k, wscratch);
        // SAFETY: x covers rows*k, w covers cols*k, dst holds rows*cols (all sized by the caller).
        unsafe { gemm_nt(t.rows, t.cols, k, x.as_ptr(), w, dst.as_mut_ptr()) };
    }
}

/// Instruction set of the narrow-tile dot products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Simd {
    /// [`Simd::Avx512Bf16`], plus AMX for packed bf16 tiles of many bf16 rows
    /// (the crate's `amx` module; Intel Sapphire Rapids and later, where Linux grants the tile state).
    #[cfg(target_arch = "x86_64")]
    Amx,
    /// [`Simd::Avx512`], plus `vdpbf16ps` dot products for short tiles of bf16 inputs against bf16
    /// weights.
    #[cfg(target_arch = "x86_64")]
    Avx512Bf16,
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

/// `sum a[i] * b[i]` with 32 independent lanes (so that it vectorises) summed in a fixed order.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 32;
    let mut acc = [0.0f32; L];
    let n = a.len() / L * L;
    for (ca, cb) in a[..n].chunks_exact(L).zip(b[..n].chunks_exact(L)) {
        for l in 0..L {
            acc[l] += ca[l] * cb[l];
        }
    }
    let mut tail = 0.0f32;
    for j in n..a.len() {
        tail += a[j] * b[j];
    }
    acc.iter().sum::<f32>() + tail
}

/// [`dot`] against 16-bit weights widened in registers.
#[inline(always)]
fn dot_wide<T: Copy>(a: &[f32], b: &[T], wide: impl Fn(T) -> f32) -> f32 {
    const L: usize = 32;
    let mut acc = [0.0f32; L];
    let n = a.len() / L * L;
    for (ca, cb) in a[..n].chunks_exact(L).zip(b[..n].chunks_exact(L)) {
        for l in 0..L {
            acc[l] += ca[l] * wide(cb[l]);
        }
    }
    let mut tail = 0.0f32;
    for j in n..a.len() {
        tail += a[j] * wide(b[j]);
    }
    acc.iter().sum::<f32>() + tail
}

/// `out[r, c] = x[r] · W[row0 + c]` for `rows` input rows: each weight row is read once.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dots_body(x: &[f32], rows: usize, k: usize, w: Floats, start: usize, cols: usize, out: &mut [f32]) {
    for c in 0..cols {
        let at = start + c * k;
        match w {
            Floats::F32(v) => {
                for r in 0..rows {
                    out[r * cols + c] = dot(&x[r * k..(r + 1) * k], &v[at..at + k]);
                }
            }
            Floats::BF16(v) => {
                for r in 0..rows {
                    out[r * cols + c] = dot_wide(&x[r * k..(r + 1) * k], &v[at..at + k], bf16_to_f32);
                }
            }
            Floats::F16(v) => {
                for r in 0..rows {
                    out[r * cols + c] = dot_wide(&x[r * k..(r + 1) * k], &v[at..at + k], f16_to_f32);
                }
            }
        }
    }
}

impl Simd {
    /// Every level this CPU can run, best first (the conformance tests run each).
    pub fn supported() -> Vec<Simd> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if crate::amx::hardware_granted() {
                v.push(Simd::Amx);
            }
            if crate::avx512::has_avx512_bf16() {
                v.push(Simd::Avx512Bf16);
            }
            if crate::avx512::has_avx512() {
                v.push(Simd::Avx512);
            }
            if crate::avx2::has_avx2() {
                v.push(Simd::Avx2);
            }
        }
        v.push(Simd::Portable);
        v
    }

    /// The best level this CPU has (AMX unless `MOE_CPU_AMX=0`).
    pub fn detect() -> Simd {
        #[cfg(target_arch = "x86_64")]
        {
            if crate::amx::available() {
                return Simd::Amx;
            }
            if crate::avx512::has_avx512_bf16() {
                return Simd::Avx512Bf16;
            }
            if crate::avx512::has_avx512() {
                return Simd::Avx512;
            }
            if crate::avx2::has_avx2() {
                return Simd::Avx2;
            }
        }
        Simd::Portable
    }

    /// The instruction set in words, for `device_name`.
    pub fn label(self) -> &'static str {
        match self {
            #[cfg(target_arch = "x86_64")]
            Simd::Amx => "AVX-512 + AVX512-BF16 + AMX-BF16",
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512Bf16 => "AVX-512 + AVX512-BF16",
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => "AVX-512",
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => "AVX2+FMA+F16C",
            Simd::Portable => "portable SIMD",
        }
    }

    /// Whether a tile of `rows` rows that does not run the broadcast kernel ([`Simd::bcast_rows`])
    /// runs `vdpbf16ps` dot products on the bf16 input as it is: with AVX512-BF16, bf16 against bf16,
    /// under [`DP_BF16_ROWS`] rows.
    #[inline]
    fn bf16_direct(self, input: Floats, weight: Floats, rows: usize) -> bool {
        self.has_bf16() && rows < DP_BF16_ROWS && matches!((input, weight), (Floats::BF16(_), Floats::BF16(_)))
    }

    /// How many of a tile's `rows` rows (of `k` inputs) run the broadcast kernel (the first ones;
    /// dot products run the rest): with AVX-512, all of them from [`BCAST_ROWS`] rows (f32 input
    /// and weights: [`BCAST_ROWS_F32`], [`BCAST_ROWS_LONG_K`] past [`SHORT_K`] inputs), except, for
    /// other dtypes than f32 against f32, a last lane block of at most [`SPLIT_ROWS`]
    /// ([`SPLIT_ROWS_WIDE`]) rows past a full one.
    #[inline]
    fn bcast_rows(self, input: Floats, weight: Floats, rows: usize, k: usize) -> usize {
        #[cfg(target_arch = "x86_64")]
        if self.avx512() {
            let min = match (input, weight) {
                (Floats::F32(_), Floats::F32(_)) if k > SHORT_K => BCAST_ROWS_LONG_K,
                (Floats::F32(_), Floats::F32(_)) => BCAST_ROWS_F32,
                _ => BCAST_ROWS,
            };
            let split = match weight {
                Floats::F32(_) => SPLIT_ROWS,
                _ => SPLIT_ROWS_WIDE,
            };
            let part = rows % LANE_ROWS;
            return match rows {
                r if r < min => 0,
                // Blocks of eight rows (bcast_pairs): at most seven rows of lanes wasted, nothing split off.
                r if self.pairs(input, weight) => r,
                r if r > LANE_ROWS && part <= split => r - part,
                r => r,
            };
        }
        let _ = (input, weight, rows, k);
        0
    }

    /// Whether broadcast tiles run [`crate::avx512::bcast_pairs`]: f32 input against f32 weights
    /// as stored, with AVX-512.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    fn pairs(self, input: Floats, weight: Floats) -> bool {
        matches!((input, weight), (Floats::F32(_), Floats::F32(_))) && self.avx512()
    }

    /// Whether this level runs the AVX-512 kernels (broadcast, packed).
    #[inline]
    pub(crate) fn avx512(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if matches!(self, Simd::Avx512 | Simd::Avx512Bf16 | Simd::Amx) {
            return true;
        }
        false
    }

    /// Whether this level has AVX512-BF16 (`vdpbf16ps`).
    #[inline]
    pub fn has_bf16(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if matches!(self, Simd::Avx512Bf16 | Simd::Amx) {
            return true;
        }
        false
    }

    /// Whether this level runs tall packed bf16 tiles on AMX.
    #[inline]
    pub fn amx(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if self == Simd::Amx {
            return true;
        }
        false
    }

    /// The same level without `vdpbf16ps` dot products (packed weights never take them; their AMX
    /// tiles are chosen by the plan, [`Tile::amx`]).
    #[inline]
    fn without_bf16(self) -> Simd {
        #[cfg(target_arch = "x86_64")]
        if matches!(self, Simd::Avx512Bf16 | Simd::Amx) {
            return Simd::Avx512;
        }
        self
    }

    /// Tiles of packed weights where the CPU lacks AVX-512 (that level runs
    /// [`crate::avx512::packed`] on interleaved rows): [`crate::avx2::packed`] with AVX2, else
    /// [`crate::pack::product_portable`]. `io` is the kernel's scratch.
    #[allow(clippy::too_many_arguments)]
    fn packed(
        self,
        x: &[f32],
        rows: usize,
        p: &Packing,
        w: Floats,
        first: usize,
        cols: usize,
        io: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let k = p.k;
        match (self, w) {
            // Laid out for `vdpbf16ps`, which this level does not run.
            (_, Floats::BF16(_)) if p.kpairs => crate::pack::product_portable(x, rows, p, w, first, cols, out),
            // SAFETY (all three): Avx2 is only chosen after detecting AVX2, FMA and F16C on this
            // CPU; `packed` checks the slices' lengths.
            #[cfg(target_arch = "x86_64")]
            (Simd::Avx2, Floats::F32(v)) => unsafe { crate::avx2::packed(x, rows, k, v, first, cols, io, out) },
            #[cfg(target_arch = "x86_64")]
            (Simd::Avx2, Floats::BF16(v)) => unsafe { crate::avx2::packed(x, rows, k, v, first, cols, io, out) },
            #[cfg(target_arch = "x86_64")]
            (Simd::Avx2, Floats::F16(v)) => unsafe { crate::avx2::packed(x, rows, k, v, first, cols, io, out) },
            _ => {
                let _ = (io, k);
                crate::pack::product_portable(x, rows, p, w, first, cols, out)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn dots(self, x: &[f32], rows: usize, k: usize, w: Floats, start: usize, cols: usize, out: &mut [f32]) {
        match self {
            // SAFETY: the variant is only chosen after detecting the feature on this CPU.
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 | Simd::Avx512Bf16 | Simd::Amx => unsafe { dots_avx512(x, rows, k, w, start, cols, out) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => unsafe { dots_avx2(x, rows, k, w, start, cols, out) },
            Simd::Portable => dots_body(x, rows, k, w, start, cols, out),
        }
    }
}

/// # Safety
/// The CPU must have AVX-512 F, BW and VL.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn dots_avx512(x: &[f32], rows: usize, k: usize, w: Floats, start: usize, cols: usize, out: &mut [f32]) {
    let n = cols * k;
    match w {
        Floats::F32(v) => crate::avx512::dots(x, rows, k, &v[start..start + n], cols, out),
        Floats::BF16(v) => crate::avx512::dots(x, rows, k, &v[start..start + n], cols, out),
        Floats::F16(v) => crate::avx512::dots(x, rows, k, &v[start..start + n], cols, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn dots_avx2(x: &[f32], rows: usize, k: usize, w: Floats, start: usize, cols: usize, out: &mut [f32]) {
    dots_body(x, rows, k, w, start, cols, out)
}

/// `packed`: `weight` is packed ([`crate::pack`]) in that layout, which the caller checked against
/// `s`. `src` says where the rows are: [`InputRows::Gathered`] only where [`gathers`] holds.
#[allow(clippy::too_many_arguments)]
pub fn grouped_matmul(
    simd: Simd,
    input: Floats,
    src: InputRows,
    offsets: &[usize],
    weight: Floats,
    packed: Option<Packing>,
    out: OutPtr,
    s: GemmShape,
) {
    let groups: Vec<(usize, usize)> = offsets.windows(2).map(|w| (w[0], w[1])).collect();
    run_tiles(simd, input, src, &groups, Weights { floats: weight, packed }, out, s);
}

/// Whether [`mlp`] interleaves the two matmuls of these experts' rows (`offsets`, as
/// [`grouped_matmul`] takes them) on these weights: where every expert has at most
/// [`STREAM_ROWS`] rows (decode), and both matmuls run the packed kernels on interleaved rows.
fn mlp_interleaves(simd: Simd, input: Floats, offsets: &[usize], gate_up: Weights, down: Weights) -> bool {
    let decode = offsets.windows(2).all(|w| w[1] - w[0] <= STREAM_ROWS);
    decode
        && packed_interleaved(simd, Layout::of(simd, input, gate_up), gate_up)
        && packed_interleaved(simd, Layout::of(simd, input, down), down)
}

/// The routed experts' MLP: [`grouped_matmul`] of `input` (rows where `src` says) by `gate_up`
/// (SwiGLU) into `act`, then of `act` by `down` into `out`, with the same bits as those two calls.
/// Where [`mlp_interleaves`] holds, the two run as one list of tiles: an expert's `down` tiles
/// follow later experts' gate/up tiles (at least a tile per thread of the pool), and a thread that
/// takes one first waits for its own expert's gate/up tiles to end (usually done by then). Decode streams every chosen expert's
/// weights once, and a join between the two matmuls left one core idle while the other ended its
/// last tile, then started both on cold streams. Elsewhere it makes the two calls.
#[allow(clippy::too_many_arguments)]
pub fn mlp(
    simd: Simd,
    input: Floats,
    src: InputRows,
    offsets: &[usize],
    (gate_up, gate_up_packed): (Floats, Option<Packing>),
    act: OutPtr,
    (down, down_packed): (Floats, Option<Packing>),
    out: OutPtr,
    (s_up, s_down): (GemmShape, GemmShape),
) {
    let groups: Vec<(usize, usize)> = offsets.windows(2).map(|w| (w[0], w[1])).collect();
    let gate_up = Weights {
        floats: gate_up,
        packed: gate_up_packed,
    };
    let down = Weights {
        floats: down,
        packed: down_packed,
    };
    if !mlp_interleaves(simd, input, offsets, gate_up, down) {
        run_tiles(simd, input, src, &groups, gate_up, act, s_up);
        // SAFETY: the gate/up tiles have all ended; nothing writes `act` while `down` reads it.
        let act_in = unsafe { act.view(0, s_down.rows * s_down.in_features) };
        run_tiles(simd, act_in, InputRows::InOrder, &groups, down, out, s_down);
        return;
    }
    let up = Plan::new(simd, input, src, &groups, gate_up, act, s_up);
    // `act`'s rows are read per expert, through views made once its gate/up tiles have ended; the
    // plan takes an empty buffer of its dtype for the layout.
    let none = match input {
        Floats::F32(_) => Floats::F32(&[]),
        Floats::BF16(_) => Floats::BF16(&[]),
        Floats::F16(_) => Floats::F16(&[]),
    };
    let dn = Plan::new(simd, none, InputRows::InOrder, &groups, down, out, s_down);
    // Each plan lists its tiles expert by expert: gate/up of e0, e1, then down of e0, gate/up of
    // e2, down of e1, ...
    let spans = |p: &Plan| {
        let mut at = vec![0usize; groups.len() + 1];
        for t in &p.tiles {
            at[t.expert + 1] += 1;
        }
        for e in 0..groups.len() {
            at[e + 1] += at[e];
        }
        at
    };
    let (su, sd) = (spans(&up), spans(&dn));
    let busy: Vec<usize> = (0..groups.len()).filter(|&e| sd[e + 1] > sd[e]).collect();
    let mut order = Vec::with_capacity(up.tiles.len() + dn.tiles.len());
    // An expert's `down` tiles go in once at least as many tiles as the pool has threads follow its
    // last gate/up tile: by the time a thread takes one, every thread has taken a tile since, so
    // that gate/up tile has usually ended. With two threads and three gate/up tiles an expert, that
    // is right after the next expert's gate/up tiles; on 16 cores a lag of one expert left most
    // threads spinning (qwen3-30b-a3b, 16 tokens: the layer took 7.2 ms against 4.5 for its
    // matmuls apart).
    let lag = crate::pool::threads();
    let mut pending = std::collections::VecDeque::new();
    for &e in &busy {
        order.extend((su[e]..su[e + 1]).map(|t| (true, t)));
        while let Some(&(p, at)) = pending.front() {
            if order.len() - at < lag {
                break;
            }
            order.extend((sd[p]..sd[p + 1]).map(|t| (false, t)));
            pending.pop_front();
        }
        pending.push_back((e, order.len()));
    }
    for (p, _) in pending {
        order.extend((sd[p]..sd[p + 1]).map(|t| (false, t)));
    }
    use std::sync::atomic::{AtomicUsize, Ordering};
    let ended: Vec<AtomicUsize> = (0..groups.len()).map(|_| AtomicUsize::new(0)).collect();
    let next = AtomicUsize::new(0);
    let up_parts = up.parts(up.input, 0);
    let k = s_down.in_features;
    crate::pool::broadcast(|_| loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(&(is_up, t)) = order.get(i) else { break };
        if is_up {
            let t = &up.tiles[t];
            // Counted as ended even if it unwinds, so that no `down` tile waits for it forever
            // (the pool raises the panic once every thread is out).
            struct End<'a>(&'a AtomicUsize);
            impl Drop for End<'_> {
                fn drop(&mut self) {
                    self.0.fetch_add(1, Ordering::Release);
                }
            }
            let _end = End(&ended[t.expert]);
            up.run(&up_parts, t);
        } else {
            let t = &dn.tiles[t];
            let e = t.expert;
            while ended[e].load(Ordering::Acquire) < su[e + 1] - su[e] {
                std::hint::spin_loop();
            }
            let (a, b) = groups[e];
            // SAFETY: expert e's gate/up tiles, the only writers of its rows of `act`, have
            // ended (the acquire above pairs with their release), and no tile writes them again.
            let rows = unsafe { act.view(a * k, (b - a) * k) };
            dn.run(&dn.parts(rows, a), t);
        }
    });
}

/// `logits = hidden · weight^T`, one expert of every token row; `weight` as stored or packed (for
/// `s.as_gemm()`, which the caller checked).
pub fn router_logits(
    simd: Simd,
    hidden: Floats,
    (weight, packed): (&[f32], Option<Packing>),
    out: OutPtr,
    s: RouterShape,
) {
    let shape = s.as_gemm();
    let w = Weights {
        floats: Floats::F32(weight),
        packed,
    };
    run_tiles(simd, hidden, InputRows::InOrder, &[(0, s.tokens)], w, out, shape);
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_hal_core::HostSlice;

    #[test]
    fn f16_conversion_is_exact_for_every_bit_pattern() {
        for bits in 0..=u16::MAX {
            let h = f16::from_bits(bits);
            let (got, want) = (f16_to_f32(h), h.to_f32());
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{bits:#06x}: {got} vs {want}"
            );
        }
    }

    /// The same bits as `bf16::from_f32` (every 7th f32 bit pattern, which covers both signs, every
    /// exponent, NaN payloads, ties to even and carries into the exponent), and the AVX-512 loop
    /// the same as the scalar one.
    #[test]
    fn f32_to_bf16_matches_half() {
        let edges = [
            0x7f7f_ffffu32,
            0x7f7f_8000,
            0x3f80_8000,
            0x3f81_8000,
            0x0000_8001,
            0x7fc0_0001,
            0xff80_0001,
        ];
        let bits = (0..=u32::MAX).step_by(7).chain(edges);
        for b in bits {
            let v = f32::from_bits(b);
            assert_eq!(f32_to_bf16(v).to_bits(), bf16::from_f32(v).to_bits(), "{b:#010x}");
        }
        let v: Vec<f32> = (0..1000u32)
            .map(|i| f32::from_bits(i.wrapping_mul(0x9e37_79b9)))
            .collect();
        for simd in Simd::supported() {
            let mut d = vec![bf16::ZERO; v.len()];
            to_bf16(simd, &mut d, &v);
            for (d, &v) in d.iter().zip(&v) {
                assert_eq!(
                    d.to_bits(),
                    bf16::from_f32(v).to_bits(),
                    "{simd:?}, {:#010x}",
                    v.to_bits()
                );
            }
        }
    }

    #[test]
    fn bf16_conversion_is_exact() {
        for bits in (0..=u16::MAX).step_by(7) {
            let b = bf16::from_bits(bits);
            let (got, want) = (bf16_to_f32(b), b.to_f32());
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{bits:#06x}"
            );
        }
    }

    /// Interleaving puts row `row0 + b * 16 + l` in lane `l` of block `b`, widens 16-bit values
    /// exactly and zeroes the lanes past the last row.
    #[test]
    fn interleave_layout() {
        let (rows, k, row0) = (19, 3, 2);
        let x: Vec<bf16> = (0..(row0 + rows) * k)
            .map(|i| bf16::from_f32(i as f32 * 0.5 - 7.0))
            .collect();
        let mut dst = vec![f32::NAN; 2 * LANE_ROWS * k];
        interleave(Floats::BF16(&x), InputRows::InOrder, row0, rows, k, LANE_ROWS, &mut dst);
        for b in 0..2 {
            for kk in 0..k {
                for l in 0..LANE_ROWS {
                    let r = b * LANE_ROWS + l;
                    let want = if r < rows { x[(row0 + r) * k + kk].to_f32() } else { 0.0 };
                    let got = dst[(b * k + kk) * LANE_ROWS + l];
                    assert_eq!(got.to_bits(), want.to_bits(), "block {b} k {kk} lane {l}");
                }
            }
        }
    }

    /// The AVX-512 interleave (16 x 16 transposes) writes the same bits as the element-by-element
    /// one, for every dtype, partial lane blocks and `k` not a multiple of 16.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn interleave_transposed_equals_portable() {
        if !crate::avx512::has_avx512() {
            eprintln!("SKIPPED: no AVX-512 on this CPU");
            return;
        }
        for (rows, k, row0) in [
            (1, 1, 0),
            (16, 16, 0),
            (19, 3, 2),
            (5, 17, 1),
            (33, 40, 3),
            (48, 64, 0),
            (31, 100, 5),
        ] {
            let v: Vec<f32> = (0..(row0 + rows) * k).map(|i| (i as f32 * 0.37).sin() * 9.0).collect();
            let vb: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
            let vh: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
            for x in [Floats::F32(&v), Floats::BF16(&vb), Floats::F16(&vh)] {
                for lanes in [LANE_ROWS, crate::pack::PACKED_LANES, 7] {
                    let mut want = vec![f32::NAN; interleaved_len(rows, k, lanes)];
                    interleave_portable(x, InputRows::InOrder, row0, rows, k, lanes, &mut want);
                    let mut got = vec![f32::NAN; interleaved_len(rows, k, lanes)];
                    interleave(x, InputRows::InOrder, row0, rows, k, lanes, &mut got);
                    let same = want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{rows} rows, k {k}, row0 {row0}, {lanes} lanes");
                }
            }
        }
    }

    /// Tiles of the pairs kernel hold at least [`PAIRS_TILE_BYTES`] of weights in whole panels;
    /// packed ones [`PACKED_TILE_COLS`], others [`TILE_COLS`], and decode tiles their stream width.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn tile_widths() {
        let (w, pairs, lanes) = (Floats::F32(&[]), Layout::Pairs, Layout::Lanes(LANE_ROWS));
        // qwen3-30b-a3b down (K 768): 171 columns make 512 KiB, rounded up to 4 panels.
        assert_eq!(tile_cols(16, 768, w, false, pairs, STREAM_TILE_BYTES), 192);
        assert_eq!(tile_cols(16, 768, w, false, lanes, STREAM_TILE_BYTES), TILE_COLS);
        // gate/up (K 2048, two rows per column): 1 MiB at TILE_COLS already.
        assert_eq!(tile_cols(16, 2048, w, true, pairs, STREAM_TILE_BYTES), TILE_COLS);
        // Short rows stop at the widest tile, in whole panels.
        assert_eq!(tile_cols(16, 8, w, false, pairs, STREAM_TILE_BYTES), 480);
        // Decode tiles stream about 2 MiB whatever the kernel.
        assert_eq!(tile_cols(8, 768, w, false, pairs, STREAM_TILE_BYTES), 512);
        assert_eq!(tile_cols(8, 2048, w, true, pairs, STREAM_TILE_BYTES), 128);
        // Packed tiles above the decode heights take PACKED_TILE_COLS; at decode, the stream width.
        for packed in [Layout::Packed, Layout::Bf16Pairs] {
            assert_eq!(
                tile_cols(16, 2048, w, true, packed, STREAM_TILE_BYTES),
                PACKED_TILE_COLS
            );
            assert_eq!(
                tile_cols(128, 768, w, false, packed, STREAM_TILE_BYTES),
                PACKED_TILE_COLS
            );
            assert_eq!(tile_cols(8, 2048, w, true, packed, STREAM_TILE_BYTES), 128);
        }
    }

    /// A thread's interleaved rows are only reused within a call: the same shapes on other inputs
    /// get their own rows (a stale buffer would give the first call's outputs again).
    #[test]
    fn interleaved_rows_do_not_outlive_their_call() {
        let Some(&simd) = Simd::supported().first() else {
            return;
        };
        let (rows, k, n) = (40usize, 96usize, 70usize);
        let s = GemmShape {
            rows,
            in_features: k,
            out_features: n,
            experts: 2,
            activation: Activation::None,
        };
        let off = [0, 24, rows];
        let w: Vec<f32> = (0..2 * n * k).map(|i| ((i * 53 % 97) as f32 - 48.0) / 23.0).collect();
        let x1: Vec<f32> = (0..rows * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        let x2: Vec<f32> = x1.iter().map(|v| v * 0.5 + 1.0).collect();
        let run = |x: &[f32]| {
            let mut y = vec![f32::NAN; rows * n];
            grouped_matmul(
                simd,
                Floats::F32(x),
                InputRows::InOrder,
                &off,
                Floats::F32(&w),
                None,
                OutPtr::new(&mut y),
                s,
            );
            y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        let first = run(&x2);
        assert_ne!(run(&x1), first);
        assert_eq!(run(&x2), first, "{simd:?}");
    }

    /// Calls of many broadcast tiles over ten experts' ranges compute bit for bit what the kernels
    /// do: f32 against f32 in pairs (each output the chain over even inputs
    /// plus the one over odd inputs; every row of a broadcast tile, from 5 rows at `k` 1031 and 10
    /// at `k` 64), and otherwise one FMA chain per broadcast row, with the rows split off to dot
    /// products (bf16 input on f32 weights: 33 = 32 + 1, 17 = 16 + 1, 20 = 16 + 4; f32 input on
    /// bf16 weights: 40 = 32 + 8) checked against f64.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn broadcast_tiles_of_many_ranges() {
        if !Simd::supported().contains(&Simd::Avx512) {
            eprintln!("SKIPPED: no AVX-512 on this CPU");
            return;
        }
        // 150 columns: two tiles of the pairs kernel at `k` 1031 (144 + 6), one at `k` 64.
        let (n, per) = (150usize, [40usize, 14, 33, 0, 20, 128, 17, 12, 6, 3]);
        let mut off = vec![0];
        per.iter().for_each(|r| off.push(off.last().unwrap() + r));
        let rows = *off.last().unwrap();
        for k in [64usize, 1031] {
            let x: Vec<f32> = (0..rows * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
            let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            let xbw: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
            let w: Vec<f32> = (0..per.len() * n * k)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 23.0)
                .collect();
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let wbw: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            let s = GemmShape {
                rows,
                in_features: k,
                out_features: n,
                experts: per.len(),
                activation: Activation::None,
            };
            let cases = [
                (Floats::F32(&x), &x, Floats::F32(&w), &w),
                (Floats::F32(&x), &x, Floats::BF16(&wb), &wbw),
                (Floats::BF16(&xb), &xbw, Floats::F32(&w), &w),
            ];
            for (input, xv, weight, wv) in cases {
                let pairs = Simd::Avx512.pairs(input, weight);
                let mut y = vec![f32::NAN; rows * n];
                grouped_matmul(
                    Simd::Avx512,
                    input,
                    InputRows::InOrder,
                    &off,
                    weight,
                    None,
                    OutPtr::new(&mut y),
                    s,
                );
                for e in 0..per.len() {
                    let head = Simd::Avx512.bcast_rows(input, weight, per[e], k);
                    for r in off[e]..off[e + 1] {
                        for c in 0..n {
                            let wr = &wv[(e * n + c) * k..(e * n + c + 1) * k];
                            let at = format!("k {k}, pairs {pairs}, expert {e} row {r} col {c}");
                            if r - off[e] >= head {
                                // Dot products: 16-lane partial sums, checked against f64.
                                let exact: f64 = (0..k).map(|i| xv[r * k + i] as f64 * wr[i] as f64).sum();
                                assert!((y[r * n + c] as f64 - exact).abs() < 1e-3, "{at}");
                                continue;
                            }
                            let chain = |from: usize, step: usize| {
                                (from..k)
                                    .step_by(step)
                                    .fold(0.0f32, |a, i| xv[r * k + i].mul_add(wr[i], a))
                            };
                            let want = if pairs { chain(0, 2) + chain(1, 2) } else { chain(0, 1) };
                            assert_eq!(y[r * n + c].to_bits(), want.to_bits(), "{at}");
                        }
                    }
                }
            }
        }
    }

    /// The expert offsets and the shape of a grouped matmul whose experts get `per` rows each.
    fn grouped_case(k: usize, n: usize, act: Activation, per: &[usize]) -> (Vec<usize>, GemmShape) {
        let mut off = vec![0];
        per.iter().for_each(|r| off.push(off.last().unwrap() + r));
        let s = GemmShape {
            rows: *off.last().unwrap(),
            in_features: k,
            out_features: n,
            experts: per.len(),
            activation: act,
        };
        (off, s)
    }

    /// Asserts that every output of a grouped matmul `y` (`off` the experts' rows, `n` outputs of
    /// `wrows` weight rows each) has the bits of `chain(row, weight row)`, SwiGLU applied as the
    /// kernels apply it.
    fn assert_chains(
        simd: Simd,
        y: &[f32],
        off: &[usize],
        n: usize,
        act: Activation,
        chain: impl Fn(usize, usize) -> f32,
        what: &str,
    ) {
        let wrows = match act {
            Activation::None => n,
            Activation::SwiGlu => 2 * n,
        };
        for e in 0..off.len() - 1 {
            for r in off[e]..off[e + 1] {
                for c in 0..n {
                    let want = match act {
                        Activation::None => chain(r, e * wrows + c),
                        Activation::SwiGlu => {
                            // The kernel's SwiGLU for this level, one element.
                            let mut g = [chain(r, e * wrows + c)];
                            swiglu(simd, &mut g, &[chain(r, e * wrows + n + c)]);
                            g[0]
                        }
                    };
                    let got = y[r * n + c];
                    assert_eq!(got.to_bits(), want.to_bits(), "{what} expert {e} row {r} col {c}");
                }
            }
        }
    }

    /// Packed weights ([`crate::pack`]): at every SIMD level, for f32, bf16 and f16 weights, every
    /// output is one multiply-add chain over its input row in ascending `k` (fused with AVX-512 and
    /// AVX2, a multiply then an add in the portable code), bit for bit, then SwiGLU as the kernel applies it, whatever
    /// the rows per expert (register blocks of 1-14 rows, several lane blocks of up to 14, decode tiles
    /// taking 2 and 4 weight blocks at once), with weight rows in partial blocks, tiles and the up
    /// half that start inside a block, `k` over several ranges, and several batches.
    #[test]
    fn packed_weights_are_one_chain_per_output() {
        let cases: [(usize, usize, Activation, &[usize]); 3] = [
            (40, 70, Activation::None, &[40, 14, 33, 0, 20, 128, 17, 12, 1, 13, 5]),
            (600, 170, Activation::SwiGlu, &[1, 2, 3, 5, 6, 0, 7, 14]),
            // Several packed tiles across the columns (PACKED_TILE_COLS), gate and up.
            (24, 600, Activation::SwiGlu, &[9, 16, 3, 25]),
        ];
        for (k, n, act, per) in cases {
            let (off, s) = grouped_case(k, n, act, per);
            let (rows, wrows) = (s.rows, s.weight_rows());
            let x: Vec<f32> = (0..rows * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 170.0).collect();
            let w: Vec<f32> = (0..per.len() * wrows * k)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 230.0)
                .collect();
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let p = Packing {
                experts: per.len(),
                rows: wrows,
                k,
                kpairs: false,
            };
            for simd in Simd::supported() {
                for data in [HostSlice::F32(&w), HostSlice::BF16(&wb), HostSlice::F16(&wh)] {
                    let (packed, wv) = (p.pack(data).unwrap(), data.to_vec().to_f32().unwrap());
                    let weight = match &packed {
                        HostVec::F32(v) => Floats::F32(v),
                        HostVec::BF16(v) => Floats::BF16(v),
                        HostVec::F16(v) => Floats::F16(v),
                        HostVec::U32(_) => unreachable!(),
                    };
                    let mut y = vec![f32::NAN; rows * n];
                    grouped_matmul(
                        simd,
                        Floats::F32(&x),
                        InputRows::InOrder,
                        &off,
                        weight,
                        Some(p),
                        OutPtr::new(&mut y),
                        s,
                    );
                    let chain = |r: usize, wr: usize| {
                        let (xr, wr) = (&x[r * k..(r + 1) * k], &wv[wr * k..(wr + 1) * k]);
                        if simd != Simd::Portable {
                            (0..k).fold(0.0f32, |a, i| xr[i].mul_add(wr[i], a))
                        } else {
                            (0..k).fold(0.0f32, |a, i| a + xr[i] * wr[i])
                        }
                    };
                    assert_chains(
                        simd,
                        &y,
                        &off,
                        n,
                        act,
                        chain,
                        &format!("{simd:?} {:?} k {k}", data.dtype()),
                    );
                }
            }
        }
    }

    /// bf16 inputs against [`Packing::kpairs`] weights: with AVX512-BF16 every output is
    /// `vdpbf16ps`'s chain (per pair of inputs the odd product, then the even one, each added with
    /// one rounding: bf16 products are exact in f32), at every height and blocking, with odd `k`,
    /// partial blocks and several batches; at the other levels (weights packed by a backend that
    /// runs `vdpbf16ps`, computed by one that does not) the portable chain in ascending `k`.
    #[test]
    fn kpairs_weights_are_the_vdpbf16ps_chain() {
        let cases: [(usize, usize, Activation, &[usize]); 3] = [
            (41, 70, Activation::None, &[40, 14, 33, 0, 20, 128, 17, 12, 1, 13, 5]),
            (600, 170, Activation::SwiGlu, &[1, 2, 3, 5, 6, 0, 7, 14]),
            (24, 600, Activation::SwiGlu, &[9, 16, 3, 25]),
        ];
        for (k, n, act, per) in cases {
            let (off, s) = grouped_case(k, n, act, per);
            let (rows, wrows) = (s.rows, s.weight_rows());
            let x: Vec<bf16> = (0..rows * k)
                .map(|i| bf16::from_f32(((i * 37 % 101) as f32 - 50.0) / 170.0))
                .collect();
            let wb: Vec<bf16> = (0..per.len() * wrows * k)
                .map(|i| bf16::from_f32(((i * 53 % 97) as f32 - 48.0) / 230.0))
                .collect();
            let p = Packing {
                experts: per.len(),
                rows: wrows,
                k,
                kpairs: true,
            };
            let HostVec::BF16(packed) = p.pack(HostSlice::BF16(&wb)).unwrap() else {
                unreachable!()
            };
            for simd in Simd::supported() {
                let mut y = vec![f32::NAN; rows * n];
                grouped_matmul(
                    simd,
                    Floats::BF16(&x),
                    InputRows::InOrder,
                    &off,
                    Floats::BF16(&packed),
                    Some(p),
                    OutPtr::new(&mut y),
                    s,
                );
                let chain = |r: usize, wr: usize| {
                    let prod = |i: usize| x[r * k + i].to_f32() * wb[wr * k + i].to_f32();
                    if simd.has_bf16() {
                        (0..k.div_ceil(2)).fold(0.0f32, |a, q| {
                            let a = if 2 * q + 1 < k { a + prod(2 * q + 1) } else { a };
                            a + prod(2 * q)
                        })
                    } else {
                        (0..k).fold(0.0f32, |a, i| a + prod(i))
                    }
                };
                assert_chains(simd, &y, &off, n, act, chain, &format!("{simd:?} k {k}"));
            }
        }
    }
}
