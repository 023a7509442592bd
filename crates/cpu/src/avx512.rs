//! AVX-512 kernels of the grouped-matmul tiles: straight on the
//! checkpoint-layout weight rows ([`dots`], [`dots_bf16`], [`bcast_pairs`], [`bcast`]), or on
//! weights packed at upload ([`packed`], see `crate::pack`).
//!
//! **Dot products** ([`dots`], [`dots_bf16`]) for short tiles (decode and the
//! sparse experts of small batches). Outputs are computed in register blocks
//! of up to 4 input rows by 6 weight rows (24 `zmm` accumulators), so that
//! every weight chunk loaded is used by every input row of the block and even
//! a single input row keeps several independent accumulation chains in
//! flight. Two steps:
//! - [`Fma`]: f32 inputs, weights of any dtype widened to f32 in registers,
//!   one fused multiply-add per 16 lanes;
//! - [`DpBf16`]: bf16 inputs and bf16 weights, `vdpbf16ps` (AVX512-BF16) on
//!   32 lanes: bf16 products are exact in f32 and accumulate in f32, with no
//!   widening step (denormal bf16 inputs count as zero and denormal sums are
//!   flushed to zero, whatever MXCSR says, as on every AVX512-BF16 unit).
//!
//! Every dot-product output, whatever block it is computed in, is the same
//! sequence of steps over its lane chunks (the last one masked) followed by
//! the same lane reduction.
//!
//! **The k-pair broadcast kernel** ([`bcast_pairs`]) for taller tiles of f32 inputs against f32
//! weights: blocks of 8 input rows hold two consecutive inputs of each row, so each output is the
//! FMA chain over its even inputs plus the one over its odd inputs, whatever the blocking.
//!
//! **The broadcast kernel** ([`bcast`]) for taller tiles of other dtypes: input rows
//! interleaved in 16-lane blocks, each weight element (f32, or 16-bit widened
//! exactly to f32 a chunk at a time) broadcast against a block; every output
//! is one FMA chain over `k` in ascending order, whatever the blocking.
//!
//! So within a kernel results do not depend on how the tile is cut. Which
//! kernel computes a row depends on its tile's height (and `k`), which the
//! tile grid fixes independently of the thread count (`crate::matmul`).

use crate::matmul::LANE_ROWS;
use half::{bf16, f16};
use std::arch::x86_64::*;

/// One accumulation step over a chunk of lanes.
pub trait Step {
    /// Input element.
    type X: Copy;
    /// Weight element.
    type W: Copy;
    /// Input and weight chunks in registers.
    type XV: Copy;
    type WV: Copy;
    /// Elements per chunk.
    const LANES: usize;
    /// An all-zero weight vector (placeholder before the loads).
    fn zero_w() -> Self::WV;
    /// # Safety
    /// The elements selected by `mask` (bit i: element i) must be readable from `p`.
    unsafe fn load_x(p: *const Self::X, mask: u32) -> Self::XV;
    /// # Safety
    /// As [`Step::load_x`].
    unsafe fn load_w(p: *const Self::W, mask: u32) -> Self::WV;
    /// # Safety
    /// The CPU must have the step's features.
    unsafe fn madd(acc: __m512, x: Self::XV, w: Self::WV) -> __m512;
}

/// f32 inputs against f32, bf16 or f16 weights: one FMA per 16 lanes.
pub struct Fma<W>(std::marker::PhantomData<W>);

/// Sixteen weights as f32 lanes.
pub trait Load16: Copy {
    /// # Safety
    /// The lanes selected by `mask` must be readable from `p`.
    unsafe fn load(p: *const Self, mask: __mmask16) -> __m512;
}

/// Sixteen 16-bit values, plain load when every lane is wanted.
#[inline(always)]
unsafe fn load_half(p: *const i16, mask: __mmask16) -> __m256i {
    if mask == u16::MAX {
        _mm256_loadu_si256(p as *const __m256i)
    } else {
        _mm256_maskz_loadu_epi16(mask, p)
    }
}

impl Load16 for f32 {
    #[inline(always)]
    unsafe fn load(p: *const f32, mask: __mmask16) -> __m512 {
        if mask == u16::MAX {
            _mm512_loadu_ps(p)
        } else {
            _mm512_maskz_loadu_ps(mask, p)
        }
    }
}

impl Load16 for bf16 {
    #[inline(always)]
    unsafe fn load(p: *const bf16, mask: __mmask16) -> __m512 {
        let h = load_half(p as *const i16, mask);
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
    }
}

impl Load16 for f16 {
    #[inline(always)]
    unsafe fn load(p: *const f16, mask: __mmask16) -> __m512 {
        _mm512_cvtph_ps(load_half(p as *const i16, mask))
    }
}

impl<W: Load16> Step for Fma<W> {
    type X = f32;
    type W = W;
    type XV = __m512;
    type WV = __m512;
    const LANES: usize = 16;
    #[inline(always)]
    fn zero_w() -> __m512 {
        // SAFETY: an all-zero __m512 is a valid value.
        unsafe { std::mem::zeroed() }
    }
    #[inline(always)]
    unsafe fn load_x(p: *const f32, mask: u32) -> __m512 {
        f32::load(p, mask as __mmask16)
    }
    #[inline(always)]
    unsafe fn load_w(p: *const W, mask: u32) -> __m512 {
        W::load(p, mask as __mmask16)
    }
    #[inline(always)]
    unsafe fn madd(acc: __m512, x: __m512, w: __m512) -> __m512 {
        _mm512_fmadd_ps(x, w, acc)
    }
}

/// bf16 inputs against bf16 weights: `vdpbf16ps`, 32 lanes (16 pairs) per step.
pub struct DpBf16;

impl Step for DpBf16 {
    type X = bf16;
    type W = bf16;
    type XV = __m512bh;
    type WV = __m512bh;
    const LANES: usize = 32;
    #[inline(always)]
    fn zero_w() -> __m512bh {
        // SAFETY: an all-zero __m512bh is a valid value.
        unsafe { std::mem::zeroed() }
    }
    #[inline(always)]
    unsafe fn load_x(p: *const bf16, mask: u32) -> __m512bh {
        let v = if mask == u32::MAX {
            _mm512_loadu_si512(p as *const __m512i)
        } else {
            _mm512_maskz_loadu_epi16(mask, p as *const i16)
        };
        // SAFETY: __m512i and __m512bh are both 64-byte vectors of plain bits.
        std::mem::transmute::<__m512i, __m512bh>(v)
    }
    #[inline(always)]
    unsafe fn load_w(p: *const bf16, mask: u32) -> __m512bh {
        Self::load_x(p, mask)
    }
    #[inline(always)]
    unsafe fn madd(acc: __m512, x: __m512bh, w: __m512bh) -> __m512 {
        _mm512_dpbf16_ps(acc, x, w)
    }
}

/// Chunk count and mask of the last chunk for `k` elements.
#[inline(always)]
fn chunks<S: Step>(k: usize) -> (usize, usize, u32) {
    let full = k / S::LANES;
    let rem = k % S::LANES;
    (
        full,
        k.div_ceil(S::LANES),
        if rem == 0 { u32::MAX } else { (1u32 << rem) - 1 },
    )
}

/// Bytes to pull into L2 while a block computes: the weight rows of the next block, so that the
/// memory stream overlaps the arithmetic of the row blocks that reuse the cached ones (measured on
/// qwen3-30b-a3b shapes, one thread: 16 rows per expert 39 -> 46 GFLOP/s (gate/up) and 41 -> 58
/// (down) in f32; into L1 instead evicts the rows in use when K is 2048). With a single input row
/// it helps bf16 decode a little when the weights are not cached (15-16 -> 16-18 GB/s).
#[derive(Clone, Copy)]
struct Prefetch {
    base: *const i8,
    len: usize,
}

impl Prefetch {
    const NONE: Prefetch = Prefetch {
        base: std::ptr::null(),
        len: 0,
    };
}

/// How many blocks of weight rows ahead the first row block of a block of f32 weight rows
/// prefetches, line for line (`prefetcht0` of the line at the same offset of row `c + C *
/// DOT_AHEAD` for each row `c` it reads): on top of [`Prefetch`]'s pull of the next block into
/// L2, so that many more lines are in flight than the rows' own streams and the L2 streamer keep.
/// The layer of qwen3-30b-a3b with f32 weights as stored (the Intel default), 16 token batches,
/// on the Intel Xeon (Ice Lake, 2 vCPUs) of 2026-12-01, paired against none (`PAIRED_BLOCK=4
/// scripts/paired.sh`, medians of the time ratios): one token 0.855 (0.816 with the first row
/// block of one input row only), 16 tokens 0.847, 256 tokens 1.007 (within the spread). One block
/// ahead was 0.874 / 0.937, four 0.872 / 0.962; into L2 (`prefetcht1`) 0.855 / 0.881. The same
/// two blocks ahead into L2 for `bcast_pairs` instead of [`BCAST_AHEAD`] lost at 256 tokens
/// (gate/up 1.057). Only within the tile: past its last rows lie other experts' weights, which
/// another thread may read or none; against prefetching past it, one token 0.976, 256 tokens 0.995.
const DOT_AHEAD: usize = 2;

/// An `R x C` block: `out[(r0 + a) * cols + c0 + b] = x[r0 + a] · w[c0 + b]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn block<S: Step, const R: usize, const C: usize>(
    xp: *const S::X,
    wp: *const S::W,
    k: usize,
    r0: usize,
    c0: usize,
    cols: usize,
    pf: Prefetch,
    out: &mut [f32],
) {
    let (full, n, tail) = chunks::<S>(k);
    let per = pf.len.div_ceil(64).div_ceil(n);
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    // Full chunks with plain loads (a masked load costs an extra vector uop), then the masked tail.
    for i in 0..full {
        for l in 0..per {
            let at = (i * per + l) * 64;
            if at < pf.len {
                _mm_prefetch::<_MM_HINT_T1>(pf.base.wrapping_add(at));
            }
        }
        // f32 weights (a chunk is a line); the row blocks after the first read the rows from cache.
        // Rows `c0 + C * DOT_AHEAD + b` exist in the tile for every `b` where this holds.
        if r0 == 0 && std::mem::size_of::<S::W>() == 4 && c0 + C * (DOT_AHEAD + 1) <= cols {
            for b in 0..C {
                _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add((c0 + b + C * DOT_AHEAD) * k + i * S::LANES) as *const i8);
            }
        }
        chunk::<S, R, C>(&mut acc, xp, wp, k, r0, c0, i * S::LANES, u32::MAX);
    }
    if n > full {
        chunk::<S, R, C>(&mut acc, xp, wp, k, r0, c0, full * S::LANES, tail);
    }
    for (a, row) in acc.iter().enumerate() {
        for (b, v) in row.iter().enumerate() {
            out[(r0 + a) * cols + c0 + b] = _mm512_reduce_add_ps(*v);
        }
    }
}

/// One chunk of lanes at element offset `o` into every accumulator of the block.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn chunk<S: Step, const R: usize, const C: usize>(
    acc: &mut [[__m512; C]; R],
    xp: *const S::X,
    wp: *const S::W,
    k: usize,
    r0: usize,
    c0: usize,
    o: usize,
    m: u32,
) {
    let mut ws = [S::zero_w(); C];
    for (b, w) in ws.iter_mut().enumerate() {
        *w = S::load_w(wp.add((c0 + b) * k + o), m);
    }
    for (a, row) in acc.iter_mut().enumerate() {
        let xv = S::load_x(xp.add((r0 + a) * k + o), m);
        for b in 0..C {
            row[b] = S::madd(row[b], xv, ws[b]);
        }
    }
}

/// The rows `r0 .. r0 + r` (r <= 4) against weight rows `c0 .. c0 + C`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_block<S: Step, const C: usize>(
    xp: *const S::X,
    wp: *const S::W,
    k: usize,
    r0: usize,
    r: usize,
    c0: usize,
    cols: usize,
    pf: Prefetch,
    out: &mut [f32],
) {
    match r {
        4 => block::<S, 4, C>(xp, wp, k, r0, c0, cols, pf, out),
        3 => block::<S, 3, C>(xp, wp, k, r0, c0, cols, pf, out),
        2 => block::<S, 2, C>(xp, wp, k, r0, c0, cols, pf, out),
        _ => block::<S, 1, C>(xp, wp, k, r0, c0, cols, pf, out),
    }
}

/// `out[r * cols + c] = x[r] · w[c]` for `rows` rows of `x` (`[rows, k]`) and `cols` rows of `w`
/// (`[cols, k]`).
#[inline(always)]
unsafe fn dots_with<S: Step>(x: &[S::X], rows: usize, k: usize, w: &[S::W], cols: usize, out: &mut [f32]) {
    assert!(x.len() >= rows * k && w.len() >= cols * k && out.len() >= rows * cols);
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    // Six weight rows per block where they fit (24 accumulators: each input chunk loaded feeds six
    // products; f32 at 16 rows per expert, one thread: 38-41 -> 53 GFLOP/s on qwen3 gate/up), then
    // four, then one.
    let c = col_blocks::<S, 6>(xp, wp, rows, k, 0, cols, out);
    let c = col_blocks::<S, 4>(xp, wp, rows, k, c, cols, out);
    for c in c..cols {
        for r0 in (0..rows).step_by(4) {
            rows_block::<S, 1>(xp, wp, k, r0, (rows - r0).min(4), c, cols, Prefetch::NONE, out);
        }
    }
}

/// Blocks of `C` weight rows from `c` while they fit; returns where they stopped.
#[inline(always)]
unsafe fn col_blocks<S: Step, const C: usize>(
    xp: *const S::X,
    wp: *const S::W,
    rows: usize,
    k: usize,
    mut c: usize,
    cols: usize,
    out: &mut [f32],
) -> usize {
    let blocks = rows.div_ceil(4);
    while c + C <= cols {
        // The next weight rows are contiguous: each row block prefetches its share of them.
        let next = (cols - c - C).min(C) * k * std::mem::size_of::<S::W>();
        let base = wp.wrapping_add((c + C) * k) as *const i8;
        for (j, r0) in (0..rows).step_by(4).enumerate() {
            let (lo, hi) = (next * j / blocks, next * (j + 1) / blocks);
            let pf = Prefetch {
                base: base.wrapping_add(lo),
                len: hi - lo,
            };
            rows_block::<S, C>(xp, wp, k, r0, (rows - r0).min(4), c, cols, pf, out);
        }
        c += C;
    }
    c
}

/// [`dots_with`] for f32 inputs.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn dots<W: Load16>(x: &[f32], rows: usize, k: usize, w: &[W], cols: usize, out: &mut [f32]) {
    dots_with::<Fma<W>>(x, rows, k, w, cols, out)
}

/// [`dots_with`] for bf16 inputs and weights.
///
/// # Safety
/// The CPU must have AVX-512 F, BW, VL and BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn dots_bf16(x: &[bf16], rows: usize, k: usize, w: &[bf16], cols: usize, out: &mut [f32]) {
    dots_with::<DpBf16>(x, rows, k, w, cols, out)
}

/// How far ahead (in elements) the broadcast kernel prefetches each f32 weight row.
const BCAST_AHEAD: usize = 128;
/// Elements of `k` per step of [`bcast_one`].
const BCAST_K: usize = 8;
/// Weight rows per [`bcast_one`] block on f32 weights, read as stored: 8 rows in flight stream
/// better than 16 (one thread, qwen3 gate/up at 16 rows per expert: 92 GFLOP/s with 8, 86-88 with
/// 12, 74-76 with 16; `down` 91-93 against 96-97 with 16).
const ONE_C: usize = 8;
/// [`ONE_C`] for widened 16-bit weights: they come from L1, where 16 rows beat 8 (bf16, one thread,
/// qwen3 shapes at 16 rows per expert, 6 alternations of 15 runs, best three: gate/up 90-94 against
/// 78-86 GFLOP/s, `down` 67-98 against 55-85).
const WIDE_ONE_C: usize = 16;
/// Elements of `k` per chunk of 16-bit weight rows widened at a time: up to 16 rows of 256 f32
/// (16 KiB) stay in L1 while the lane blocks use them, and widening costs two vector ops per 16
/// elements against 16 FMAs or more.
const WIDE_K: usize = 256;
/// Weight rows per block of a pair of lane blocks: 2 x 12 accumulators, 14 loads per 24 FMAs.
const PAIR_C: usize = 12;
/// Most weight rows in one block of the broadcast kernel: the rows of the buffer a chunk is
/// widened into ([`rows_f32`] checks every block against it when it is compiled).
const MAX_C: usize = if WIDE_ONE_C > PAIR_C { WIDE_ONE_C } else { PAIR_C };

/// Weight rows that the broadcast kernel reads: f32 as stored, 16-bit widened to f32 (exactly) a
/// chunk of [`WIDE_K`] elements at a time.
pub trait BcastWeight: Load16 {
    /// Whether rows are widened before use.
    const WIDE: bool;
}

impl BcastWeight for f32 {
    const WIDE: bool = false;
}

impl BcastWeight for bf16 {
    const WIDE: bool = true;
}

impl BcastWeight for f16 {
    const WIDE: bool = true;
}

/// At every cache line of element `i`, pulls the line ahead in each of the `C` weight rows from `w0`
/// into L2: [`BCAST_AHEAD`] elements ahead in f32 rows, the next chunk ([`WIDE_K`]) in 16-bit ones,
/// so that widening it reads from L2. Past the end of the rows, the start of the `C` rows after them
/// (the next block's, usually).
#[inline(always)]
unsafe fn prefetch_rows<W: BcastWeight, const C: usize>(w0: *const W, k: usize, i: usize) {
    if i.is_multiple_of(64 / std::mem::size_of::<W>()) {
        let at = i + if W::WIDE { WIDE_K } else { BCAST_AHEAD };
        // Rows are `k` apart: offset `at - k` of row `b + C` is `(C - 1) * k` past `b * k + at`.
        let skip = if at < k { 0 } else { (C - 1) * k };
        for b in 0..C {
            // Only a hint: past the last row it names memory the kernel never reads, which cannot fault.
            _mm_prefetch::<_MM_HINT_T1>(w0.wrapping_add(b * k + at + skip) as *const i8);
        }
    }
}

/// Elements `k0 .. k0 + kc` of the `C` weight rows from `w0` (`k` apart) as f32: the first row and
/// the distance between rows, where they are stored (f32) or widened into `buf` ([`MAX_C`] rows of
/// [`WIDE_K`]; `kc <= WIDE_K` then).
#[inline(always)]
unsafe fn rows_f32<W: BcastWeight, const C: usize>(
    w0: *const W,
    k: usize,
    (k0, kc): (usize, usize),
    buf: *mut f32,
) -> (*const f32, usize) {
    // `buf` holds MAX_C rows: a wider block would write past it.
    const { assert!(C <= MAX_C) };
    if !W::WIDE {
        // W is f32 here.
        return (w0.add(k0) as *const f32, k);
    }
    for b in 0..C {
        let (src, dst) = (w0.add(b * k + k0), buf.add(b * WIDE_K));
        // Whole vectors, then a masked tail (a mask per vector costs more than the conversion).
        let full = kc / 16 * 16;
        for i in (0..full).step_by(16) {
            _mm512_storeu_ps(dst.add(i), W::load(src.add(i), u16::MAX));
        }
        if full < kc {
            let m = (1u16 << (kc - full)) - 1;
            _mm512_mask_storeu_ps(dst.add(full), m, W::load(src.add(full), m));
        }
    }
    (buf, WIDE_K)
}

/// Where [`rows_f32`] widens a chunk: on cache lines, so that none of its vector stores is split
/// over two.
#[repr(C, align(64))]
struct WideBuf([f32; MAX_C * WIDE_K]);

/// The chunks of `k` that [`rows_f32`] takes: all of it for f32 rows.
#[inline(always)]
fn chunk_len<W: BcastWeight>(k: usize) -> usize {
    if W::WIDE {
        WIDE_K
    } else {
        k.max(1)
    }
}

/// Groups of `RB` lane blocks computed against one widened chunk before the next is widened.
const GROUPS: usize = 4;

/// The lane blocks `b_lo .. b_hi` (at most [`GROUPS`] groups of `RB`) against the `C` weight rows
/// from `c0`: for each `k` one vector load per lane block and one broadcast weight per column,
/// `RB * C` FMAs per group. Each group runs over a whole chunk of `k` with its accumulators in
/// registers, which wait in `accs` between chunks, so that a widened chunk serves every group
/// (DeepSeek-V3 `down` at 128 rows, one thread: 121 GFLOP/s, against 108 with each chunk widened
/// again for every pair); f32 rows are one chunk.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn bcast_block<W: BcastWeight, const RB: usize, const C: usize>(
    xt: *const f32,
    wp: *const W,
    k: usize,
    (b_lo, b_hi): (usize, usize),
    rows: usize,
    c0: usize,
    cols: usize,
    out: &mut [f32],
) {
    let groups = (b_hi - b_lo) / RB;
    let mut accs = [[[_mm512_setzero_ps(); C]; RB]; GROUPS];
    let w0 = wp.add(c0 * k);
    let mut buf = std::mem::MaybeUninit::<WideBuf>::uninit();
    for k0 in (0..k).step_by(chunk_len::<W>(k)) {
        let kc = chunk_len::<W>(k).min(k - k0);
        // Only the rows and elements just written are read from `buf`.
        let (wc, stride) = rows_f32::<W, C>(w0, k, (k0, kc), buf.as_mut_ptr() as *mut f32);
        for (g, saved) in accs.iter_mut().enumerate().take(groups) {
            let xb = xt.add((b_lo + g * RB) * LANE_ROWS * k);
            let mut acc = *saved;
            for i in 0..kc {
                // The first group pulls the rows ahead into L2; the others find them there.
                if g == 0 {
                    prefetch_rows::<W, C>(w0, k, k0 + i);
                }
                let mut xv = [_mm512_setzero_ps(); RB];
                for (a, v) in xv.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(xb.add((a * k + k0 + i) * LANE_ROWS));
                }
                // Index loops: each broadcast feeds one column of the block across its lane blocks.
                #[allow(clippy::needless_range_loop)]
                for b in 0..C {
                    let wv = _mm512_set1_ps(*wc.add(b * stride + i));
                    for a in 0..RB {
                        acc[a][b] = _mm512_fmadd_ps(xv[a], wv, acc[a][b]);
                    }
                }
            }
            *saved = acc;
        }
    }
    for (g, acc) in accs.iter().enumerate().take(groups) {
        store_lanes(acc, b_lo + g * RB, rows, c0, cols, out);
    }
}

/// One lane block from `b0` against the `C` weight rows from `c0`, `k` in chunks of [`BCAST_K`]: the
/// chunk's input vectors stay in registers while each weight row's run of `BCAST_K` elements is
/// broadcast from one pointer with constant offsets (per-element addressing of `C` strided rows
/// costs more instructions than the FMAs at one lane block). The FMAs go element by element across
/// the `C` accumulators, so that `C` independent chains are in flight at each step (row by row, the
/// core had to look 64 FMAs ahead to find them: bf16 at 16 rows per expert, one thread, best of 4 x
/// 15, 93 -> 102 GFLOP/s gate/up, 97 -> 106 `down`). Same order of steps per output as
/// [`bcast_block`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn bcast_one<W: BcastWeight, const C: usize>(
    xt: *const f32,
    wp: *const W,
    k: usize,
    b0: usize,
    rows: usize,
    c0: usize,
    cols: usize,
    out: &mut [f32],
) {
    let mut acc = [_mm512_setzero_ps(); C];
    let xb = xt.add(b0 * LANE_ROWS * k);
    let w0 = wp.add(c0 * k);
    let mut buf = std::mem::MaybeUninit::<WideBuf>::uninit();
    for k0 in (0..k).step_by(chunk_len::<W>(k)) {
        let kc = chunk_len::<W>(k).min(k - k0);
        // As in bcast_block.
        let (wc, stride) = rows_f32::<W, C>(w0, k, (k0, kc), buf.as_mut_ptr() as *mut f32);
        let full = kc / BCAST_K * BCAST_K;
        for i in (0..full).step_by(BCAST_K) {
            prefetch_rows::<W, C>(w0, k, k0 + i);
            let mut xv = [_mm512_setzero_ps(); BCAST_K];
            for (j, v) in xv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(xb.add((k0 + i + j) * LANE_ROWS));
            }
            for (j, v) in xv.iter().enumerate() {
                for (b, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(*v, _mm512_set1_ps(*wc.add(b * stride + i + j)), *a);
                }
            }
        }
        for i in full..kc {
            let v = _mm512_loadu_ps(xb.add((k0 + i) * LANE_ROWS));
            for (b, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(v, _mm512_set1_ps(*wc.add(b * stride + i)), *a);
            }
        }
    }
    store_lanes(&[acc], b0, rows, c0, cols, out);
}

/// `out[r * cols + c0 + b] = acc[a][b][l]` for `r = (b0 + a) * LANE_ROWS + l < rows`.
#[inline(always)]
unsafe fn store_lanes<const RB: usize, const C: usize>(
    acc: &[[__m512; C]; RB],
    b0: usize,
    rows: usize,
    c0: usize,
    cols: usize,
    out: &mut [f32],
) {
    let mut lanes = [0.0f32; LANE_ROWS];
    for (a, row) in acc.iter().enumerate() {
        for (b, v) in row.iter().enumerate() {
            _mm512_storeu_ps(lanes.as_mut_ptr(), *v);
            for (l, &x) in lanes.iter().enumerate() {
                let r = (b0 + a) * LANE_ROWS + l;
                if r < rows {
                    out[r * cols + c0 + b] = x;
                }
            }
        }
    }
}

/// Blocks of `C` weight rows from `c` while they fit, each against the lane blocks `b0 .. b1`
/// `RB` at a time (weights outermost, so that a block of weight rows is read from memory once and
/// then from cache); returns where they stopped.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn bcast_cols<W: BcastWeight, const RB: usize, const C: usize>(
    xt: *const f32,
    wp: *const W,
    k: usize,
    (b0, b1): (usize, usize),
    rows: usize,
    mut c: usize,
    cols: usize,
    out: &mut [f32],
) -> usize {
    while c + C <= cols {
        for b in (b0..b1).step_by(RB * GROUPS) {
            bcast_block::<W, RB, C>(xt, wp, k, (b, b1.min(b + RB * GROUPS)), rows, c, cols, out);
        }
        c += C;
    }
    c
}

/// `out[r * cols + c] = x[r] · w[c]` for `rows` input rows given interleaved ([`crate::matmul::interleave`]) as
/// `xt`, and `cols` weight rows (`[cols, k]`, as stored; 16-bit ones widened exactly to f32 in
/// chunks). Each output is one f32 FMA chain over `k` in ascending order (one lane of one
/// accumulator), so it does not depend on the blocking or on the widening.
///
/// This is the kernel for tiles of 14 rows and more with 16-bit inputs or weights (see
/// `crate::matmul`): the weights stream once per pair of lane blocks, and every weight element
/// loaded is a broadcast operand of the FMAs of 16 input rows, instead of the input rows being
/// re-read from L2 for every block of weight rows as in [`dots`].
///
/// # Safety
/// The CPU must have AVX-512 F, BW and VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn bcast<W: BcastWeight>(xt: &[f32], rows: usize, k: usize, w: &[W], cols: usize, out: &mut [f32]) {
    let blocks = rows.div_ceil(LANE_ROWS);
    assert!(
        xt.len() >= crate::matmul::interleaved_len(rows, k, LANE_ROWS)
            && w.len() >= cols * k
            && out.len() >= rows * cols
    );
    let (xp, wp) = (xt.as_ptr(), w.as_ptr());
    // Pairs of lane blocks, then the odd one.
    let pairs = (0, blocks / 2 * 2);
    let c = bcast_cols::<W, 2, PAIR_C>(xp, wp, k, pairs, rows, 0, cols, out);
    let c = bcast_cols::<W, 2, 4>(xp, wp, k, pairs, rows, c, cols, out);
    bcast_cols::<W, 2, 1>(xp, wp, k, pairs, rows, c, cols, out);
    // The odd lane block: input vectors held in registers over k chunks.
    if blocks % 2 == 1 {
        let (b0, mut c) = (blocks - 1, 0);
        if W::WIDE {
            while c + WIDE_ONE_C <= cols {
                bcast_one::<W, WIDE_ONE_C>(xp, wp, k, b0, rows, c, cols, out);
                c += WIDE_ONE_C;
            }
        }
        while c + ONE_C <= cols {
            bcast_one::<W, ONE_C>(xp, wp, k, b0, rows, c, cols, out);
            c += ONE_C;
        }
        let c = bcast_cols::<W, 1, 4>(xp, wp, k, (b0, blocks), rows, c, cols, out);
        bcast_cols::<W, 1, 1>(xp, wp, k, (b0, blocks), rows, c, cols, out);
    }
}

/// Input rows per block of [`bcast_pairs`]: eight rows of two consecutive inputs fill one `zmm`.
pub const PAIR_ROWS: usize = 8;

/// f32 values of `rows` input rows of `k` elements interleaved for [`bcast_pairs`] (whole blocks of
/// [`PAIR_ROWS`], `k` rounded up to even).
pub fn pairs_len(rows: usize, k: usize) -> usize {
    rows.div_ceil(PAIR_ROWS) * PAIR_ROWS * k.next_multiple_of(2)
}

/// [`interleave_pairs`] element by element, its reference in the tests.
#[cfg(test)]
pub fn interleave_pairs_portable(x: &[f32], rows: usize, k: usize, dst: &mut [f32]) {
    assert!(x.len() >= rows * k && dst.len() >= pairs_len(rows, k));
    let steps = k.div_ceil(2);
    for (b, blk) in dst
        .chunks_exact_mut(steps * 16)
        .take(rows.div_ceil(PAIR_ROWS))
        .enumerate()
    {
        for i in 0..PAIR_ROWS {
            let r = b * PAIR_ROWS + i;
            let row = if r < rows { &x[r * k..(r + 1) * k] } else { &[][..] };
            for s in 0..steps {
                blk[s * 16 + 2 * i] = row.get(2 * s).copied().unwrap_or(0.0);
                blk[s * 16 + 2 * i + 1] = row.get(2 * s + 1).copied().unwrap_or(0.0);
            }
        }
    }
}

/// `r[j]` becomes the vector of the `j`-th 64-bit element of every `r[i]` (an 8 x 8 transpose):
/// pairs, then 128-bit quarters twice.
#[inline(always)]
unsafe fn transpose8_pd(r: &mut [__m512d; 8]) {
    let mut t = [_mm512_setzero_pd(); 8];
    for i in (0..8).step_by(2) {
        t[i] = _mm512_unpacklo_pd(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_pd(r[i], r[i + 1]);
    }
    // u[0..4] from rows 0-3, u[4..8] from rows 4-7: elements (0, 4), (2, 6), (1, 5), (3, 7).
    let mut u = [_mm512_setzero_pd(); 8];
    for h in [0, 4] {
        u[h] = _mm512_shuffle_f64x2::<0x88>(t[h], t[h + 2]);
        u[h + 1] = _mm512_shuffle_f64x2::<0xdd>(t[h], t[h + 2]);
        u[h + 2] = _mm512_shuffle_f64x2::<0x88>(t[h + 1], t[h + 3]);
        u[h + 3] = _mm512_shuffle_f64x2::<0xdd>(t[h + 1], t[h + 3]);
    }
    for (j, (lo, hi)) in [(0, 4), (2, 6), (1, 5), (3, 7)].into_iter().enumerate() {
        r[lo] = _mm512_shuffle_f64x2::<0x88>(u[j], u[j + 4]);
        r[hi] = _mm512_shuffle_f64x2::<0xdd>(u[j], u[j + 4]);
    }
}

/// Interleaves `rows` rows of `x` (`[rows, k]`) for [`bcast_pairs`]: block `b` is
/// `[k.div_ceil(2)][PAIR_ROWS][2]`, with inputs `2s` and `2s + 1` of row `b * PAIR_ROWS + i` in lanes
/// `2i` and `2i + 1` of step `s`; lanes past `rows` or past `k` are zero. `dst` holds
/// [`pairs_len`]`(rows, k)` values. 8 rows by 16 inputs at a time, as an 8 x 8 transpose of input
/// pairs in registers (a 256-token gate/up input, one thread: 3.4-3.9 ms, as [`interleave`]'s
/// 16-row blocks; element by element it took 6.8).
///
/// # Safety
/// The CPU must have AVX-512 F.
#[target_feature(enable = "avx512f")]
pub unsafe fn interleave_pairs(x: &[f32], rows: usize, k: usize, dst: &mut [f32]) {
    assert!(x.len() >= rows * k && dst.len() >= pairs_len(rows, k));
    let steps = k.div_ceil(2);
    let (xp, dp) = (x.as_ptr(), dst.as_mut_ptr());
    for b in 0..rows.div_ceil(PAIR_ROWS) {
        let live = (rows - b * PAIR_ROWS).min(PAIR_ROWS);
        let (src, out) = (xp.add(b * PAIR_ROWS * k), dp.add(b * steps * 16));
        for k0 in (0..k).step_by(16) {
            let kc = (k - k0).min(16);
            let m = first_lanes(kc);
            let mut r = [_mm512_setzero_pd(); 8];
            for (l, v) in r.iter_mut().enumerate().take(live) {
                *v = _mm512_castps_pd(_mm512_maskz_loadu_ps(m, src.add(l * k + k0)));
            }
            transpose8_pd(&mut r);
            for (j, v) in r.iter().enumerate().take(kc.div_ceil(2)) {
                _mm512_storeu_pd(out.add((k0 / 2 + j) * 16) as *mut f64, *v);
            }
        }
    }
}

/// Weight rows per pass of [`bcast_pairs`] for one, two, three and four blocks: 16, 24, 24 and 24
/// accumulators.
const PAIRS_C: [usize; 4] = [16, 12, 8, 6];
/// Weight rows per panel of [`bcast_pairs`]: every group of blocks runs over a panel before the
/// next, so that a panel (a multiple of each of [`PAIRS_C`]) is read from memory once and then
/// from L2 (384 KiB at `k` 2048; 48 = 6 x 8 = 4 x 12 = 3 x 16).
pub const PAIRS_PANEL: usize = 48;

/// Weights `2s` and `2s + 1` of a row in every pair of lanes (one 8-byte broadcast load).
#[inline(always)]
unsafe fn pair_of(p: *const f32) -> __m512 {
    _mm512_castpd_ps(_mm512_set1_pd(std::ptr::read_unaligned(p as *const f64)))
}

/// `NB` blocks of [`PAIR_ROWS`] rows from block `b0` against the `C` weight rows from `c0`: each
/// broadcast pair of weights feeds the `NB` blocks (one load per `NB` FMAs, plus the input
/// vectors), and no lanes go to rows beyond the next multiple of eight.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pairs_block<const NB: usize, const C: usize>(
    xt: *const f32,
    wp: *const f32,
    k: usize,
    b0: usize,
    rows: usize,
    c0: usize,
    cols: usize,
    out: &mut [f32],
) {
    let (steps, full) = (k.div_ceil(2), k / 2);
    let w0 = wp.add(c0 * k);
    let xb = xt.add(b0 * steps * 16);
    let mut acc = [[_mm512_setzero_ps(); C]; NB];
    for s in 0..full {
        prefetch_rows::<f32, C>(w0, k, 2 * s);
        let mut xv = [_mm512_setzero_ps(); NB];
        for (n, v) in xv.iter_mut().enumerate() {
            *v = _mm512_loadu_ps(xb.add((n * steps + s) * 16));
        }
        // Index loops: each broadcast pair feeds one column of the block across its blocks.
        #[allow(clippy::needless_range_loop)]
        for b in 0..C {
            let wv = pair_of(w0.add(b * k + 2 * s));
            for n in 0..NB {
                acc[n][b] = _mm512_fmadd_ps(xv[n], wv, acc[n][b]);
            }
        }
    }
    if steps > full {
        // Odd `k`: the last weight into the even lanes only (a pair would read past the row). The
        // odd lanes are left as they are: adding 0 * 0 would turn a -0.0 chain into +0.0.
        for (n, row) in acc.iter_mut().enumerate() {
            let xv = _mm512_loadu_ps(xb.add((n * steps + full) * 16));
            for (b, a) in row.iter_mut().enumerate() {
                *a = _mm512_mask3_fmadd_ps(xv, _mm512_set1_ps(*w0.add(b * k + k - 1)), *a, 0x5555);
            }
        }
    }
    let mut lanes = [0.0f32; 16];
    for (n, row) in acc.iter().enumerate() {
        for (b, v) in row.iter().enumerate() {
            // Lane 2i: the even chain plus the odd chain of row i.
            _mm512_storeu_ps(lanes.as_mut_ptr(), _mm512_add_ps(*v, _mm512_permute_ps::<0xB1>(*v)));
            for i in 0..PAIR_ROWS {
                let r = (b0 + n) * PAIR_ROWS + i;
                if r < rows {
                    out[r * cols + c0 + b] = lanes[2 * i];
                }
            }
        }
    }
}

/// The weight rows `c .. end` against blocks `b0 .. b0 + NB`, `C` rows at a time, then four, then one.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pairs_cols<const NB: usize, const C: usize>(
    xt: *const f32,
    wp: *const f32,
    k: usize,
    b0: usize,
    rows: usize,
    (mut c, end): (usize, usize),
    cols: usize,
    out: &mut [f32],
) {
    while c + C <= end {
        pairs_block::<NB, C>(xt, wp, k, b0, rows, c, cols, out);
        c += C;
    }
    while c + 4 <= end {
        pairs_block::<NB, 4>(xt, wp, k, b0, rows, c, cols, out);
        c += 4;
    }
    while c < end {
        pairs_block::<NB, 1>(xt, wp, k, b0, rows, c, cols, out);
        c += 1;
    }
}

/// `out[r * cols + c] = x[r] · w[c]` for `rows` input rows given interleaved by
/// [`interleave_pairs`] as `xt`, and `cols` f32 weight rows (`[cols, k]`, as stored). Each output
/// is two f32 FMA chains, over the even and over the odd inputs in ascending order, then their
/// sum (even plus odd), whatever the blocking.
///
/// The kernel for f32 tiles of 5 rows and more (10 up to `k` 1024; see `crate::matmul`). Against [`bcast`], whose lane
/// blocks hold 16 rows and take one broadcast load per FMA when a tile has one block, a block here
/// holds 8 rows of two inputs each: a pair of weights broadcast in one load feeds up to four
/// blocks, and a tile wastes at most 7 rows of lanes instead of 15 (one thread, weights in L2,
/// 64 weight rows of `k` 2048: 16 rows 50 us against 67-70 for `bcast`, 24 rows 69-71 against 105
/// for `bcast`'s two lane blocks; from DRAM, qwen3-30b-a3b at 256 tokens, as routed, two threads:
/// gate/up and `down` 0.89 and 0.90 of `bcast`'s time, alternated call by call).
///
/// # Safety
/// The CPU must have AVX-512 F, BW and VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn bcast_pairs(xt: &[f32], rows: usize, k: usize, w: &[f32], cols: usize, out: &mut [f32]) {
    assert!(xt.len() >= pairs_len(rows, k) && w.len() >= cols * k && out.len() >= rows * cols);
    let (xp, wp) = (xt.as_ptr(), w.as_ptr());
    let blocks = rows.div_ceil(PAIR_ROWS);
    for c in (0..cols).step_by(PAIRS_PANEL) {
        let panel = (c, cols.min(c + PAIRS_PANEL));
        let mut b = 0;
        while b < blocks {
            // Fours, but threes where a lone block would be left (it takes a load per FMA).
            let nb = match blocks - b {
                n @ 1..=3 => n,
                5 | 6 => 3,
                _ => 4,
            };
            match nb {
                1 => pairs_cols::<1, { PAIRS_C[0] }>(xp, wp, k, b, rows, panel, cols, out),
                2 => pairs_cols::<2, { PAIRS_C[1] }>(xp, wp, k, b, rows, panel, cols, out),
                3 => pairs_cols::<3, { PAIRS_C[2] }>(xp, wp, k, b, rows, panel, cols, out),
                _ => pairs_cols::<4, { PAIRS_C[3] }>(xp, wp, k, b, rows, panel, cols, out),
            }
            b += nb;
        }
    }
}

/// `r[j]` becomes the vector of lane `j` of every `r[i]` (a 16 x 16 transpose): pairs, then
/// quadruples, then 128-bit quarters, then halves.
#[inline(always)]
unsafe fn transpose16(r: &mut [__m512; 16]) {
    let mut t = [_mm512_setzero_ps(); 16];
    for i in (0..16).step_by(2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for i in (0..16).step_by(4) {
        for j in 0..2 {
            let (a, b) = (_mm512_castps_pd(t[i + j]), _mm512_castps_pd(t[i + j + 2]));
            r[i + 2 * j] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
            r[i + 2 * j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
        }
    }
    for h in (0..16).step_by(8) {
        for j in 0..4 {
            t[h + j] = _mm512_shuffle_f32x4::<0x88>(r[h + j], r[h + j + 4]);
            t[h + j + 4] = _mm512_shuffle_f32x4::<0xdd>(r[h + j], r[h + j + 4]);
        }
    }
    for j in 0..8 {
        r[j] = _mm512_shuffle_f32x4::<0x88>(t[j], t[j + 8]);
        r[j + 8] = _mm512_shuffle_f32x4::<0xdd>(t[j], t[j + 8]);
    }
}

/// [`crate::matmul::interleave`] for the CPUs that run [`bcast`] and [`packed`], of `rows` rows of
/// `x` (`[_, k]`; the `r`-th is row `at(r)`, checked to lie in `x`): each lane block is
/// written as 16 x 16 tiles transposed in registers, of which lane blocks of 12 rows store 12
/// lanes a step (element by element with strided stores, a 2048-token gate/up input took 3.7-4.2
/// ms on two threads).
///
/// # Safety
/// The CPU must have AVX-512 F, BW and VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn interleave<X: Load16>(
    x: &[X],
    at: impl Fn(usize) -> usize,
    rows: usize,
    k: usize,
    lanes: usize,
    dst: &mut [f32],
) {
    assert!(lanes <= LANE_ROWS && dst.len() >= crate::matmul::interleaved_len(rows, k, lanes));
    let (xp, dp) = (x.as_ptr(), dst.as_mut_ptr());
    let keep = ((1u32 << lanes) - 1) as __mmask16;
    for b in 0..rows.div_ceil(lanes) {
        let live = (rows - b * lanes).min(lanes);
        let out = dp.add(b * lanes * k);
        // Each live row's start, checked to lie in `x` with its `k` values.
        let mut src = [xp; 16];
        for (l, s) in src.iter_mut().enumerate().take(live) {
            let row = at(b * lanes + l);
            assert!((row + 1) * k <= x.len(), "input row {row} past the input");
            *s = xp.add(row * k);
        }
        for k0 in (0..k).step_by(16) {
            let kc = (k - k0).min(16);
            let m = first_lanes(kc);
            let mut v = [_mm512_setzero_ps(); 16];
            for (v, s) in v.iter_mut().zip(&src).take(live) {
                *v = X::load(s.add(k0), m);
            }
            transpose16(&mut v);
            for (j, v) in v.iter().enumerate().take(kc) {
                if lanes == LANE_ROWS {
                    _mm512_storeu_ps(out.add((k0 + j) * LANE_ROWS), *v);
                } else {
                    // Only this step's lanes: the next step's follow them.
                    _mm512_mask_storeu_ps(out.add((k0 + j) * lanes), keep, *v);
                }
            }
        }
    }
}

/// Thirty-two packed weights of one input index ([`crate::pack`]) as f32 in two registers:
/// rows 0-15 and 16-31 of the block.
pub trait Wide32: Copy {
    /// Cache lines of 32 weights.
    const LINES: usize = 32 * std::mem::size_of::<Self>() / 64;
    /// # Safety
    /// 32 elements must be readable from `p`; the CPU must have AVX-512 F and BW.
    unsafe fn load32(p: *const Self) -> (__m512, __m512);
}

impl Wide32 for f32 {
    #[inline(always)]
    unsafe fn load32(p: *const f32) -> (__m512, __m512) {
        (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
    }
}

impl Wide32 for bf16 {
    /// Rows `j` and `16 + j` share lane `j` (low and high half): the high half is already an f32
    /// once the low bits are masked off, and the low half is one after a shift. Two integer
    /// operations per 32 weights, no shuffle.
    #[inline(always)]
    unsafe fn load32(p: *const bf16) -> (__m512, __m512) {
        let raw = _mm512_loadu_si512(p as *const _);
        let hi = _mm512_and_si512(raw, _mm512_set1_epi32(0xffff_0000u32 as i32));
        (
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(raw)),
            _mm512_castsi512_ps(hi),
        )
    }
}

impl Wide32 for f16 {
    #[inline(always)]
    unsafe fn load32(p: *const f16) -> (__m512, __m512) {
        let (a, b) = (
            _mm256_loadu_si256(p as *const __m256i),
            _mm256_loadu_si256(p.add(16) as *const __m256i),
        );
        (_mm512_cvtph_ps(a), _mm512_cvtph_ps(b))
    }
}

/// Most packed blocks of one register block (for blocks of at most 3 rows).
const PACKED_NB: usize = 4;
/// Bytes of each block ahead that [`packed_rows`] and [`packed_dp_rows`] prefetch their weights in
/// a tile of one lane block (tiles of several: [`Ahead`]), as [`OnePass`] says: one
/// stream per block was too few for the Intel Xeon's hardware prefetchers to keep up. On the Intel Xeon of the earlier sessions (one thread, 8
/// experts of qwen3-30b-a3b gate/up in DRAM, bf16, GFLOP/s at 8 / 16 rows; standalone copy of the
/// kernel): none 41-70 / 71-74, 2 KiB 134-139 / 97-107, 4 KiB 141-145 / 121-141, 8 KiB 128-144 /
/// 110-141. On an AMD EPYC (Zen 5; two threads, 8 experts of gate/up from DRAM, three runs
/// alternated, ms): bf16 (`vdpbf16ps`) at 16 rows each 2.12-2.15 with 4 KiB, 2.01-2.04 with 8 KiB,
/// 2.02-2.03 with 16 KiB; 24 rows 2.23-2.50, 2.13-2.20, 2.14-2.23; f32 (8 KiB was 64 inputs ahead
/// before this counted bytes) at 16 and 24 rows 3.51-3.73 with 8 KiB against 3.49-3.80 with 16 KiB,
/// at one row 2.10-2.22 against 2.23-2.37.
const PACKED_AHEAD_BYTES: usize = 8 << 10;

/// How a packed register block prefetches its weights: the kernels' `PF`, a constant, since
/// computing the spread addresses for the one-pass kernels too made decode 4-5% slower.
/// - [`PF_T0`]: one pass, [`PACKED_AHEAD_BYTES`] ahead of each step's weights, into L1.
/// - [`PF_NTA`]: the same, non-temporal (`prefetchnta`): a one-pass tile reads each weight line
///   once, and what stays cached from call to call (the router's weight, the activations) then
///   stays ([`OnePass`]). The `vdpbf16ps` kernel's, against T0 on an AMD EPYC (Zen 5),
///   qwen3-30b-a3b's layer, 16 token batches, paired: bf16 at one token 0.988-0.995 in the fast
///   bandwidth mode (three runs), 0.976 in the slow one; 16 tokens 0.972-0.988 fast, 1.000 slow;
///   256 tokens 0.990-0.997 fast.
/// - [`PF_SPREAD`]: a pass among several, spread over the range after next ([`Ahead`]).
const PF_T0: u8 = 0;
const PF_NTA: u8 = 1;
const PF_SPREAD: u8 = 2;

/// How the packed kernel on widened weights ([`packed`]) streams the weights of a tile of one
/// pass (up to [`crate::pack::PACKED_LANES`] rows). The `vdpbf16ps` kernel ([`packed_dp`]) always runs
/// [`OnePass::OneStreamNta`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum OnePass {
    /// Tiles of up to 3 rows (decode) in register blocks of four weight blocks (four streams),
    /// every one-pass tile prefetching into L1 (`prefetcht0`). The Intel Xeon of the earlier
    /// sessions needed the prefetches (one thread, bf16 gate/up at 8 rows, see
    /// [`PACKED_AHEAD_BYTES`]: 41-70 GFLOP/s without, 128-144 with).
    FourStreamsT0,
    /// Tiles of up to 3 rows in register blocks of one weight block, so that a tile reads its
    /// weights as one stream (block after block, as they lie), and every one-pass tile
    /// prefetching non-temporally ([`PF_NTA`]). On the AMD EPYC (Zen 5) VM, qwen3-30b-a3b's layer
    /// with f32 weights, 16 token batches, paired against four blocks with no software prefetch
    /// (the AMD default until then, whose hardware prefetchers kept up with four streams better
    /// than with T0 prefetches; `PAIRED_BLOCK=4 scripts/paired.sh`, medians of the time ratios):
    /// 16 tokens 0.956-0.970 in the VM's fast bandwidth mode (four runs), 0.975-0.994 in the slow
    /// one (six), but 1.016-1.027 in one slow stretch (four); one token 0.997-1.002; 256 tokens
    /// 0.996-1.004 (one-pass tiles of 4 to 12 rows, non-temporal there too). One block with T0
    /// prefetches instead was 0.994-1.013; four blocks with the non-temporal ones gained as much
    /// as one (0.959-0.977): the gain is the hint, and one stream keeps one scheme with
    /// [`packed_dp`].
    OneStreamNta,
}

impl OnePass {
    /// Weight blocks per register block in tiles of up to 3 rows ([`packed_nb`]).
    fn decode_blocks(self) -> usize {
        match self {
            OnePass::FourStreamsT0 => 4,
            OnePass::OneStreamNta => 1,
        }
    }

    /// The kernels' prefetch constant for a tile of one pass.
    fn prefetch(self) -> u8 {
        match self {
            OnePass::FourStreamsT0 => PF_T0,
            OnePass::OneStreamNta => PF_NTA,
        }
    }
}

/// [`OnePass`] for [`packed`] on this CPU: [`OnePass::OneStreamNta`] on AMD CPUs,
/// [`OnePass::FourStreamsT0`] elsewhere; `MOE_CPU_DECODE_STREAMS=1` or `4` pins one.
pub fn one_pass_scheme() -> OnePass {
    static SCHEME: std::sync::OnceLock<OnePass> = std::sync::OnceLock::new();
    *SCHEME.get_or_init(|| match std::env::var("MOE_CPU_DECODE_STREAMS").as_deref() {
        Ok("1") => OnePass::OneStreamNta,
        Ok("4") => OnePass::FourStreamsT0,
        _ if crate::is_amd() => OnePass::OneStreamNta,
        _ => OnePass::FourStreamsT0,
    })
}

/// Prefetches the line at `p` as the one-pass mode `PF` says ([`PF_T0`] or [`PF_NTA`]).
#[inline(always)]
fn prefetch_one_pass<const PF: u8>(p: *const i8) {
    // SAFETY: a prefetch touches no memory the program sees and does not fault, whatever `p`.
    unsafe {
        if PF == PF_NTA {
            _mm_prefetch::<_MM_HINT_NTA>(p);
        } else {
            _mm_prefetch::<_MM_HINT_T0>(p);
        }
    }
}

/// Where a packed register block prefetches its weights.
///
/// - A tile of one lane block prefetches [`PACKED_AHEAD_BYTES`] ahead of each step's weights (an
///   offset of the load's own address). In the last range of a block that is not the tile's
///   last, the `vdpbf16ps` kernel adds `extra`: its stream j then pulls the start of block j of
///   the next register block, not block j + 1, which another stream of this one reads already, so
///   that register blocks after the first no longer start cold. Past the tile's last one this
///   thread goes on elsewhere (the up product, or another tile), and pulling the next tile's
///   blocks made f32 gate/up at two rows per expert 8% slower; the f32 kernel does not add
///   `extra` at all (the runtime offset cost it about 1% at one row, for no measured gain).
/// - With several lane blocks, the first pass over a range used to pull the whole next range (two
///   lines a step) and the other passes none. Now each of the `n` passes pulls `1 / n` of the
///   range [`SPREAD_LEAD`] ranges ahead, one prefetch a step, so that the requests reach memory
///   evenly over the range's time.
///
/// The kernels take the kind as a constant ([`PF_T0`], [`PF_NTA`], [`PF_SPREAD`]).
///
/// Measured on 128 experts of qwen3-30b-a3b from DRAM, two threads on an AMD EPYC (Zen 5). The
/// kernels of 67b140b and these were alternated call by call in one process, each on its own
/// copy of the weights (`scripts/paired.sh 67b140b gemm ...`). Figures are median time ratios
/// new/old over 58 pairs, mostly in the slow bandwidth mode.
/// - bf16: 16 rows per expert 0.940 (gate/up) and 0.916 (`down`); ragged 6 to 26 rows 0.951 and
///   0.938; `down` at two rows 0.970; 8 random experts of one row 0.963 (`down`) and 1.000.
/// - f32: 16 rows 0.949 and 0.951; ragged 0.959 and 0.961; one row 1.000-1.008.
/// - The bf16 figures include the vector bf16 stores of the same change set.
/// - Spread against the one-pass scheme alone, call by call: bf16 gate/up 0.924-0.979 from 14 to
///   24 rows, 0.988-0.998 at 64 and 128. The one loss was 13 rows (passes of 7 and 6) in the slow
///   mode, 1.034-1.064 (0.942-0.950 in the fast one).
#[derive(Clone, Copy)]
struct Ahead {
    /// The `vdpbf16ps` kernel with one lane block: bytes added to [`PACKED_AHEAD_BYTES`] ahead of
    /// the step's weights (the distance to the next register block's, in a block's last range).
    extra: usize,
    /// Kernels of a pass among several: from each block's start, the first step's address and
    /// the bytes between steps.
    at: usize,
    step: usize,
}

/// How many ranges ahead the passes of a tile with several lane blocks prefetch ([`Ahead`]): one
/// range ahead was 2-3% slower than two at 16 to 20 rows (2% faster at 24), three 0.3-0.8% slower
/// than two on ragged rows.
const SPREAD_LEAD: usize = 2;

/// How many ranges ahead the passes of a tile with several lane blocks also prefetch into L2
/// (`prefetcht1`, one more instruction a step), so that the stream has more requests in flight
/// than L1's fill buffers take. qwen3-30b-a3b, 128 experts from DRAM, two threads on an AMD EPYC
/// (Zen 5), paired call by call against none (`scripts/paired.sh`, medians of the time ratios):
/// whole layer at 256 tokens bf16 0.975 (3 ranges 0.985, 5 0.986), f32 0.980; gate/up at 16
/// rows 0.983-0.984 (6 ranges 0.990, 8 0.990, 16 1.005, 32 1.034), `down` 0.985. The same line
/// twice (T1 at [`SPREAD_LEAD`]) cost 1.008: the gain is the distance, not the hint.
const L2_LEAD: usize = 4;

/// Bytes from a pass's L1 prefetch to its L2 one: [`L2_LEAD`] against [`SPREAD_LEAD`] ranges of
/// [`PACKED_CHUNK_BYTES`].
const L2_AHEAD_BYTES: usize = (L2_LEAD - SPREAD_LEAD) * PACKED_CHUNK_BYTES;

/// Outputs per row of a register block's results.
const PACKED_OUT: usize = PACKED_NB * 32;

/// A packed register block's accumulators: zero, or (`carry`, a later range of `k`) the partial
/// sums [`packed_store`] left in `io`, `r * PACKED_OUT + j * 32` for row `r` and block `j`.
///
/// # Safety
/// The CPU must have AVX-512 F; with `carry`, `io` must hold `R * PACKED_OUT` f32.
#[inline(always)]
unsafe fn packed_acc<const R: usize, const NB: usize>(carry: bool, io: *const f32) -> [[[__m512; 2]; NB]; R] {
    let mut acc = [[[_mm512_setzero_ps(); 2]; NB]; R];
    if carry {
        for (r, a) in acc.iter_mut().enumerate() {
            for (j, a) in a.iter_mut().enumerate() {
                let o = io.add(r * PACKED_OUT + j * 32);
                *a = [_mm512_loadu_ps(o), _mm512_loadu_ps(o.add(16))];
            }
        }
    }
    acc
}

/// Stores a register block's accumulators where [`packed_acc`] reads them.
///
/// # Safety
/// The CPU must have AVX-512 F; `io` must hold `R * PACKED_OUT` f32.
#[inline(always)]
unsafe fn packed_store<const R: usize, const NB: usize>(acc: &[[[__m512; 2]; NB]; R], io: *mut f32) {
    for (r, a) in acc.iter().enumerate() {
        for (j, a) in a.iter().enumerate() {
            let o = io.add(r * PACKED_OUT + j * 32);
            _mm512_storeu_ps(o, a[0]);
            _mm512_storeu_ps(o.add(16), a[1]);
        }
    }
}

/// Accumulates `R` interleaved input rows from `x` (lane stride `lanes`) against `NB` packed
/// blocks from `w` (`stride` elements apart) over the input indices `k0 .. k1`, into
/// `io[r * PACKED_OUT + c]` (zero first when `k0` is 0): per input index, one 32-weight load per
/// block widened once, then `R` broadcasts of an input each feeding `2 * NB` FMAs. Each output is
/// one FMA chain over `k` in ascending order, held in a register within the range and in `io`
/// between ranges. Each step prefetches its blocks' weights where `pf` says.
///
/// Short blocks (decode) take several weight blocks at once: one input row against one block has
/// two dependent FMA chains and one memory stream.
///
/// # Safety
/// The CPU must have AVX-512 F and BW; `x` must be readable up to `x[(k1 - 1) * lanes + R - 1]`,
/// `w` up to `w[(NB - 1) * stride + 32 * k1 - 1]`, and `io` must hold `R * PACKED_OUT` f32.
#[inline(always)]
unsafe fn packed_rows<W: Wide32, const R: usize, const NB: usize, const PF: u8>(
    x: *const f32,
    lanes: usize,
    (k0, k1): (usize, usize),
    w: *const W,
    stride: usize,
    io: *mut f32,
    pf: Ahead,
) {
    let mut acc = packed_acc::<R, NB>(k0 > 0, io);
    for i in k0..k1 {
        let mut wv = [[_mm512_setzero_ps(); 2]; NB];
        for j in 0..NB {
            if PF == PF_SPREAD {
                let base = w.wrapping_add(j * stride) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(pf.at + (i - k0) * pf.step));
                _mm_prefetch::<_MM_HINT_T1>(base.wrapping_add(pf.at + L2_AHEAD_BYTES + (i - k0) * pf.step));
            } else {
                let ahead = (w.wrapping_add(j * stride + i * 32) as *const i8).wrapping_add(PACKED_AHEAD_BYTES);
                for l in 0..W::LINES {
                    prefetch_one_pass::<PF>(ahead.wrapping_add(l * 64));
                }
            }
        }
        for (j, v) in wv.iter_mut().enumerate() {
            let (a, b) = W::load32(w.add(j * stride + i * 32));
            *v = [a, b];
        }
        let mut xp = x.add(i * lanes);
        for a in acc.iter_mut() {
            let b = _mm512_set1_ps(*xp);
            for (a, v) in a.iter_mut().zip(&wv) {
                a[0] = _mm512_fmadd_ps(b, v[0], a[0]);
                a[1] = _mm512_fmadd_ps(b, v[1], a[1]);
            }
            xp = xp.add(1);
        }
    }
    packed_store(&acc, io);
}

/// A packed register-block kernel, by its rows `R` and weight blocks `NB`: [`packed_rows`] on
/// weights widened to f32 ([`Widen`]) or [`packed_dp_rows`] on `vdpbf16ps` ([`DpPairs`]), so
/// that [`packed_rows_n`] dispatches both.
trait PackedBlock {
    /// An interleaved input value and a weight.
    type X;
    type W;
    /// Weights of one block per step of the kernel (one input, or one pair of inputs).
    const STEP: usize;
    /// # Safety
    /// As the kernel it runs.
    unsafe fn run<const R: usize, const NB: usize, const PF: u8>(
        x: *const Self::X,
        lanes: usize,
        range: (usize, usize),
        w: *const Self::W,
        stride: usize,
        io: *mut f32,
        pf: Ahead,
    );
}

/// [`packed_rows`] on weights `W`.
struct Widen<W>(std::marker::PhantomData<W>);

impl<W: Wide32> PackedBlock for Widen<W> {
    type X = f32;
    type W = W;
    const STEP: usize = 32;
    #[inline(always)]
    unsafe fn run<const R: usize, const NB: usize, const PF: u8>(
        x: *const f32,
        lanes: usize,
        k: (usize, usize),
        w: *const W,
        stride: usize,
        io: *mut f32,
        pf: Ahead,
    ) {
        packed_rows::<W, R, NB, PF>(x, lanes, k, w, stride, io, pf)
    }
}

/// [`packed_dp_rows`].
struct DpPairs;

impl PackedBlock for DpPairs {
    type X = u32;
    type W = bf16;
    const STEP: usize = 64;
    #[inline(always)]
    unsafe fn run<const R: usize, const NB: usize, const PF: u8>(
        x: *const u32,
        lanes: usize,
        p: (usize, usize),
        w: *const bf16,
        stride: usize,
        io: *mut f32,
        pf: Ahead,
    ) {
        packed_dp_rows::<R, NB, PF>(x, lanes, p, w, stride, io, pf)
    }
}

/// `K`'s kernel for `r` rows (1 to [`crate::pack::PACKED_LANES`]) and `nb` blocks ([`packed_nb`]).
///
/// # Safety
/// As `K`'s kernel, whose `R` is `r` and `NB` is `nb`; `r` as [`packed_nb`] pairs it with `nb`: up
/// to [`crate::pack::PACKED_LANES`] with one block, 6 with two, 3 with four.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn packed_rows_n<K: PackedBlock>(
    (r, nb): (usize, usize),
    x: *const K::X,
    lanes: usize,
    range: (usize, usize),
    w: *const K::W,
    stride: usize,
    out: *mut f32,
    (pf, mode): (Ahead, u8),
) {
    match mode {
        PF_SPREAD => {
            // A pass of several: a tile of 15 rows or more, so one block at a time and 6 rows or more
            // (tiles of up to 128 rows; 118 run as 8 passes of 14 and one of 6).
            match r {
                6 => K::run::<6, 1, PF_SPREAD>(x, lanes, range, w, stride, out, pf),
                7 => K::run::<7, 1, PF_SPREAD>(x, lanes, range, w, stride, out, pf),
                8 => K::run::<8, 1, PF_SPREAD>(x, lanes, range, w, stride, out, pf),
                9 => K::run::<9, 1, PF_SPREAD>(x, lanes, range, w, stride, out, pf),
                10 => K::run::<10, 1, PF_SPREAD>(x, lanes, range, w, stride, out, pf),
                11 => K::run::<11, 1, PF_SPREAD>(x, lanes, range, w, stride, out, pf),
                12 => K::run::<12, 1, PF_SPREAD>(x, lanes, range, w, stride, out, pf),
                13 => K::run::<13, 1, PF_SPREAD>(x, lanes, range, w, stride, out, pf),
                14 => K::run::<14, 1, PF_SPREAD>(x, lanes, range, w, stride, out, pf),
                // Not reached (packed_lanes); the one-pass kernels compute the same outputs.
                _ => one_pass::<K, PF_NTA>((r, nb), x, lanes, range, w, stride, out, pf),
            }
        }
        PF_T0 => one_pass::<K, PF_T0>((r, nb), x, lanes, range, w, stride, out, pf),
        _ => one_pass::<K, PF_NTA>((r, nb), x, lanes, range, w, stride, out, pf),
    }
}

/// [`packed_rows_n`] for a tile of one pass, prefetching as `PF` says.
///
/// # Safety
/// As [`packed_rows_n`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn one_pass<K: PackedBlock, const PF: u8>(
    (r, nb): (usize, usize),
    x: *const K::X,
    lanes: usize,
    range: (usize, usize),
    w: *const K::W,
    stride: usize,
    out: *mut f32,
    pf: Ahead,
) {
    match (nb, r) {
        (4, 1) => K::run::<1, 4, PF>(x, lanes, range, w, stride, out, pf),
        (4, 2) => K::run::<2, 4, PF>(x, lanes, range, w, stride, out, pf),
        (4, 3) => K::run::<3, 4, PF>(x, lanes, range, w, stride, out, pf),
        (2, 1) => K::run::<1, 2, PF>(x, lanes, range, w, stride, out, pf),
        (2, 2) => K::run::<2, 2, PF>(x, lanes, range, w, stride, out, pf),
        (2, 3) => K::run::<3, 2, PF>(x, lanes, range, w, stride, out, pf),
        (2, 4) => K::run::<4, 2, PF>(x, lanes, range, w, stride, out, pf),
        (2, 5) => K::run::<5, 2, PF>(x, lanes, range, w, stride, out, pf),
        (2, 6) => K::run::<6, 2, PF>(x, lanes, range, w, stride, out, pf),
        (1, 1) => K::run::<1, 1, PF>(x, lanes, range, w, stride, out, pf),
        (1, 2) => K::run::<2, 1, PF>(x, lanes, range, w, stride, out, pf),
        (1, 3) => K::run::<3, 1, PF>(x, lanes, range, w, stride, out, pf),
        (1, 4) => K::run::<4, 1, PF>(x, lanes, range, w, stride, out, pf),
        (1, 5) => K::run::<5, 1, PF>(x, lanes, range, w, stride, out, pf),
        (1, 6) => K::run::<6, 1, PF>(x, lanes, range, w, stride, out, pf),
        (1, 7) => K::run::<7, 1, PF>(x, lanes, range, w, stride, out, pf),
        (1, 8) => K::run::<8, 1, PF>(x, lanes, range, w, stride, out, pf),
        (1, 9) => K::run::<9, 1, PF>(x, lanes, range, w, stride, out, pf),
        (1, 10) => K::run::<10, 1, PF>(x, lanes, range, w, stride, out, pf),
        (1, 11) => K::run::<11, 1, PF>(x, lanes, range, w, stride, out, pf),
        (1, 12) => K::run::<12, 1, PF>(x, lanes, range, w, stride, out, pf),
        (1, 13) => K::run::<13, 1, PF>(x, lanes, range, w, stride, out, pf),
        (1, 14) => K::run::<14, 1, PF>(x, lanes, range, w, stride, out, pf),
        // `packed` and `packed_dp` pick nb from the tile's rows (packed_nb), so the rows of a
        // register block are at most PACKED_LANES, 6 or 3 for 1, 2 or 4 blocks: anything else
        // would read and write past the buffers sized for them.
        _ => unreachable!("packed register block of {r} rows by {nb} blocks"),
    }
}

/// Blocks per register block for `rows` rows with `left` blocks to go: the accumulators stay at
/// most 28 `zmm` (24 with several blocks), and there is no 3-block kernel. Up to 3 rows (decode), `decode` blocks
/// ([`OnePass`]): 4 for [`OnePass::FourStreamsT0`], else 1, so that a tile reads its weights as one stream (block after
/// block, as they lie), prefetched [`PACKED_AHEAD_BYTES`] ahead across the blocks' ends. With four
/// blocks, three streams started cold at each register block (every 512 KiB of qwen3-30b-a3b
/// gate/up, 192 KiB of `down`). The layer on an AMD EPYC (Zen 5), 16 token batches, paired against
/// 4 blocks without prefetch (`PAIRED_BLOCK=3|4 scripts/paired.sh`, medians of the time ratios):
/// `vdpbf16ps` at one token 0.971-1.003 in six runs (four of 0.971-0.986), 16 tokens 0.964-0.982
/// in four; one block without prefetch was 1.005-1.016 and 1.038-1.042 against one block with it.
/// The kernel on widened weights: [`OnePass::OneStreamNta`].
fn packed_nb(rows: usize, left: usize, decode: usize) -> usize {
    let nb = match rows {
        0..=3 => decode,
        4..=6 => 2,
        _ => 1,
    };
    match nb.min(left) {
        3 => 2,
        nb => nb,
    }
}

/// Weight bytes per block that [`packed`] runs every register block of a tile over before the
/// next range of `k`: the range stays in L1, so a tile streams its weights from memory once
/// whatever its rows, instead of the first register block running at the memory's pace and the
/// others after it. The range's inputs must stay there too: a lane block of f32 inputs takes 1.5
/// times the range's bytes for bf16 weights. On an AMD EPYC (Zen 5, 48 KiB L1d; two threads, 8
/// experts of qwen3-30b-a3b gate/up from DRAM, three runs alternated, ms) 8 KiB against 16 KiB:
/// bf16 at 16 rows each 1.27-1.31 against 1.39-1.42, at 24 rows 1.56-1.58 against 1.66-1.81; f32
/// 2.31-2.60 against 2.51-2.66 and 2.78-2.95 against 2.95-3.16; 4 KiB about as 8; 1, 8 and 128
/// rows the same within noise. On the Intel Xeon of the earlier sessions (48 KiB L1d) 4, 8 and 32
/// KiB were within 2% of 16.
const PACKED_CHUNK_BYTES: usize = 8 << 10;

/// `out[r * cols + c] = x[r] · weight row (first + c)` for `rows` input rows given interleaved
/// ([`crate::matmul::interleave`]) in lane blocks of [`crate::pack::packed_lanes`] as `xt`, against
/// one expert's packed weights `w` ([`crate::pack`]). A register block is one lane block (up to 14
/// input rows)
/// by one 32-row weight block, or by 2 of them for tiles of 4 to 6 rows and, for 3 rows or fewer,
/// by as many as `scheme` says ([`OnePass`]; [`one_pass_scheme`] for the layer);
/// every register block
/// goes over one range of `k` before the next. Each output is one f32 FMA chain over `k` in
/// ascending order, so it does not depend on the blocking, nor on `scheme`.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn packed<W: Wide32>(
    xt: &[f32],
    rows: usize,
    k: usize,
    w: &[W],
    first: usize,
    cols: usize,
    io: &mut Vec<f32>,
    out: &mut [f32],
    scheme: OnePass,
) {
    let b1 = (first + cols).div_ceil(crate::pack::PACK_ROWS);
    assert!(
        xt.len() >= crate::matmul::interleaved_len(rows, k, crate::pack::packed_lanes(rows))
            && w.len() >= b1 * crate::pack::PACK_ROWS * k
            && out.len() >= rows * cols
    );
    packed_blocks::<Widen<W>>(xt.as_ptr(), rows, k, w.as_ptr(), (first, cols), io, out, scheme)
}

/// The loop of [`packed`] and [`packed_dp`]: `K`'s register blocks over `steps` steps (inputs or
/// pairs of inputs) of the blocks that hold the weight rows `first .. first + cols`, every register
/// block of a range of steps before the next range, then the wanted columns into `out`. `x` is
/// the interleaved input (lane blocks of `lanes`, `steps` values per lane), `w` one expert's
/// packed weights (`steps * K::STEP` per block); `scheme` as for [`packed`].
///
/// # Safety
/// The CPU must have `K`'s features; `x`, `w` and `out` must hold what the callers check.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn packed_blocks<K: PackedBlock>(
    x: *const K::X,
    rows: usize,
    steps: usize,
    w: *const K::W,
    (first, cols): (usize, usize),
    io: &mut Vec<f32>,
    out: &mut [f32],
    scheme: OnePass,
) {
    use crate::pack::PACK_ROWS;
    let (b0, b1) = (first / PACK_ROWS, (first + cols).div_ceil(PACK_ROWS));
    io.resize(rows * PACKED_OUT, 0.0);
    let lanes = crate::pack::packed_lanes(rows);
    let (stride, chunk) = (
        steps * K::STEP,
        (PACKED_CHUNK_BYTES / (K::STEP * std::mem::size_of::<K::W>())).max(1),
    );
    let mut b = b0;
    while b < b1 {
        let nb = packed_nb(rows, b1 - b, scheme.decode_blocks());
        let wp = w.add(b * stride);
        let (passes, step_bytes) = (rows.div_ceil(lanes), K::STEP * std::mem::size_of::<K::W>());
        let block_bytes = steps * step_bytes;
        // A range is PACKED_CHUNK_BYTES of each block, which L2_AHEAD_BYTES counts in.
        debug_assert_eq!(chunk * step_bytes, PACKED_CHUNK_BYTES);
        for s0 in (0..steps).step_by(chunk) {
            let range = (s0, (s0 + chunk).min(steps));
            for lb in 0..passes {
                let r = (rows - lb * lanes).min(lanes);
                let (xl, o) = (x.add(lb * lanes * steps), io.as_mut_ptr().add(lb * lanes * PACKED_OUT));
                let pf = if passes == 1 {
                    // Past its block, stream j pulls the start of block j of the next register
                    // block, not the block after its own, which another stream of this register
                    // block reads. Not past the tile's last one: this thread goes on elsewhere
                    // (the up product, or another tile), and pulling the next tile's blocks there
                    // made f32 gate/up at two rows per expert 8% slower.
                    let past = s0 * step_bytes + PACKED_AHEAD_BYTES >= block_bytes && b + nb < b1;
                    Ahead {
                        extra: if past { (nb - 1) * block_bytes } else { 0 },
                        at: 0,
                        step: 0,
                    }
                } else {
                    // Pass lb pulls its share of the range after next ([`Ahead`]).
                    Ahead {
                        extra: 0,
                        at: (s0 + SPREAD_LEAD * chunk) * step_bytes + lb * chunk * step_bytes / passes,
                        step: step_bytes / passes,
                    }
                };
                let mode = if passes == 1 { scheme.prefetch() } else { PF_SPREAD };
                packed_rows_n::<K>((r, nb), xl, lanes, range, wp, stride, o, (pf, mode));
            }
        }
        // The wanted columns of the nb blocks.
        crate::pack::copy_block_cols(io, PACKED_OUT, b, (b + nb) * PACK_ROWS, rows, first, cols, out);
        b += nb;
    }
}

/// [`packed_rows`] for bf16 inputs against [`crate::pack::Packing::kpairs`] weights: `x` holds
/// each input row as 32-bit pairs `(x[2p], x[2p + 1])` in lane blocks of `lanes` rows
/// ([`interleave_bf16_pairs`]), `(p0, p1)` is a range of pairs, and each step is one `vdpbf16ps`
/// per 16 outputs: two products exact in f32, added to the chain odd input first.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and BF16; `x` must be readable up to
/// `x[(p1 - 1) * lanes + R - 1]`, `w` up to `w[(NB - 1) * stride + 64 * p1 - 1]`, and `io` must
/// hold `R * PACKED_OUT` f32.
#[inline(always)]
unsafe fn packed_dp_rows<const R: usize, const NB: usize, const PF: u8>(
    x: *const u32,
    lanes: usize,
    (p0, p1): (usize, usize),
    w: *const bf16,
    stride: usize,
    io: *mut f32,
    pf: Ahead,
) {
    let mut acc = packed_acc::<R, NB>(p0 > 0, io);
    // SAFETY (transmutes below): __m512i and __m512bh are both 64-byte vectors of plain bits.
    let bh = |v: __m512i| std::mem::transmute::<__m512i, __m512bh>(v);
    for p in p0..p1 {
        let mut wv = [[bh(_mm512_setzero_si512()); 2]; NB];
        for (j, v) in wv.iter_mut().enumerate() {
            if PF == PF_SPREAD {
                let base = w.wrapping_add(j * stride) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(pf.at + (p - p0) * pf.step));
                _mm_prefetch::<_MM_HINT_T1>(base.wrapping_add(pf.at + L2_AHEAD_BYTES + (p - p0) * pf.step));
            } else {
                // 128 bytes per pair of inputs and block of 32 rows.
                let ahead =
                    (w.wrapping_add(j * stride + p * 64) as *const i8).wrapping_add(PACKED_AHEAD_BYTES + pf.extra);
                prefetch_one_pass::<PF>(ahead);
                prefetch_one_pass::<PF>(ahead.wrapping_add(64));
            }
            let at = w.add(j * stride + p * 64);
            *v = [
                bh(_mm512_loadu_si512(at as *const _)),
                bh(_mm512_loadu_si512(at.add(32) as *const _)),
            ];
        }
        let mut xp = x.add(p * lanes);
        for a in acc.iter_mut() {
            let b = bh(_mm512_set1_epi32(*xp as i32));
            for (a, v) in a.iter_mut().zip(&wv) {
                a[0] = _mm512_dpbf16_ps(a[0], v[0], b);
                a[1] = _mm512_dpbf16_ps(a[1], v[1], b);
            }
            xp = xp.add(1);
        }
    }
    packed_store(&acc, io);
}

/// f32 values (each holding the bits of one bf16 pair) of `rows` rows of `k` inputs interleaved
/// by [`interleave_bf16_pairs`].
pub fn bf16_pairs_len(rows: usize, k: usize) -> usize {
    crate::matmul::interleaved_len(rows, k.div_ceil(2), crate::pack::packed_lanes(rows))
}

/// `rows` rows of `x` (`[_, k]` bf16; the `r`-th is row `at(r)`) in lane blocks of
/// [`crate::pack::packed_lanes`] rows for [`packed_dp`]:
/// per block and pair `p`, each row's inputs `2p` (low half) and `2p + 1` as one 32-bit value,
/// stored in an f32's bits; missing rows and the input past an odd `k` are zero. For even `k` a
/// row's pairs are its bf16 values read 32 bits at a time, so [`interleave`] moves them as f32 bits
/// (16 x 16 transposes). One thread, in cache, best of 200: 16 rows of 2048 in 1.7 us against 12.9
/// element by element (this function's odd-`k` path), 128 rows of 7168 in 50 us against 361. On
/// two threads, qwen3-30b-a3b gate/up at 16 rows for each of 128 experts from DRAM took 19.8-20.5
/// ms against 20.1-21.5 (four alternations), `down` 10.1-10.4 against 10.2-10.6.
pub fn interleave_bf16_pairs(x: &[bf16], at: impl Fn(usize) -> usize, rows: usize, k: usize, dst: &mut [f32]) {
    let kp = k.div_ceil(2);
    assert!(dst.len() >= bf16_pairs_len(rows, k));
    let lanes = crate::pack::packed_lanes(rows);
    if k.is_multiple_of(2) && has_avx512() {
        // SAFETY: Bf16Pair is two bf16 (size 4, alignment 2), so the first x.len() / 2 * 2 bf16
        // of x are x.len() / 2 pairs, and row r's kp pairs start at pair r * kp (k is even);
        // `interleave` checks each row against them; the CPU has AVX-512 F, BW and VL
        // (has_avx512).
        unsafe {
            let pairs = std::slice::from_raw_parts(x.as_ptr() as *const Bf16Pair, x.len() / 2);
            interleave(pairs, at, rows, kp, lanes, dst);
        }
        return;
    }
    interleave_bf16_pairs_portable(x, at, rows, k, dst)
}

/// [`interleave_bf16_pairs`] element by element (odd `k`, and the reference of its test).
pub fn interleave_bf16_pairs_portable(x: &[bf16], at: impl Fn(usize) -> usize, rows: usize, k: usize, dst: &mut [f32]) {
    let kp = k.div_ceil(2);
    assert!(dst.len() >= bf16_pairs_len(rows, k));
    let lanes = crate::pack::packed_lanes(rows);
    for (lb, blk) in dst[..bf16_pairs_len(rows, k)].chunks_exact_mut(lanes * kp).enumerate() {
        blk.fill(0.0);
        for r in 0..(rows - lb * lanes).min(lanes) {
            let row = &x[at(lb * lanes + r) * k..][..k];
            for (p, pair) in row.chunks(2).enumerate() {
                let hi = pair.get(1).map_or(0, |v| v.to_bits() as u32);
                blk[p * lanes + r] = f32::from_bits(pair[0].to_bits() as u32 | hi << 16);
            }
        }
    }
}

/// Two consecutive bf16 inputs, moved as one 32-bit lane by [`interleave`] (never computed on).
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Bf16Pair([bf16; 2]);

impl Load16 for Bf16Pair {
    #[inline(always)]
    unsafe fn load(p: *const Bf16Pair, mask: __mmask16) -> __m512 {
        // Unaligned 32-bit lanes; the bits go through unchanged (no arithmetic, so no NaN is
        // quieted).
        <f32 as Load16>::load(p as *const f32, mask)
    }
}

/// [`packed`] for bf16 inputs against [`crate::pack::Packing::kpairs`] weights, on `vdpbf16ps`:
/// `xt` from [`interleave_bf16_pairs`], `w` one expert's weights (`32 * k.next_multiple_of(2)`
/// per block). The same register blocks as [`packed`] with [`OnePass::OneStreamNta`], over
/// ranges of pairs of the same bytes.
///
/// # Safety
/// The CPU must have AVX-512 F, BW, VL and BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn packed_dp(
    xt: &[f32],
    rows: usize,
    k: usize,
    w: &[bf16],
    first: usize,
    cols: usize,
    io: &mut Vec<f32>,
    out: &mut [f32],
) {
    let kp = k.div_ceil(2);
    let b1 = (first + cols).div_ceil(crate::pack::PACK_ROWS);
    assert!(
        xt.len() >= bf16_pairs_len(rows, k)
            && w.len() >= b1 * crate::pack::PACK_ROWS * 2 * kp
            && out.len() >= rows * cols
    );
    packed_blocks::<DpPairs>(
        xt.as_ptr() as *const u32,
        rows,
        kp,
        w.as_ptr(),
        (first, cols),
        io,
        out,
        OnePass::OneStreamNta,
    )
}

/// Whether `vdpbf16ps` issues about as fast as an f32 FMA on this CPU, so that [`packed_dp`] (two
/// products per lane and instruction) beats [`packed`]: timed once per process on register-only
/// loops, 12 chains each, alternated, best of 5, and true when it does at least 1.4 times the
/// FMAs' products per second (the threshold sits far from both CPUs measured, so that a disturbed
/// timing does not flip the choice; `MOE_CPU_PACKED_DPBF16` pins it). AMD Zen 5, 2 cores: 494 against 266 GFLOP/s on one core (1.86); the Intel Xeon
/// (family 6, model 207) of the earlier sessions issues one every other cycle (0.46: 86 against 188 GFLOP/s), where
/// [`packed`] stays faster.
pub fn dpbf16_fast() -> bool {
    static FAST: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FAST.get_or_init(|| {
        if !has_avx512_bf16() {
            return false;
        }
        let time = |f: &dyn Fn() -> f32| {
            let t = std::time::Instant::now();
            std::hint::black_box(f());
            t.elapsed().as_secs_f64()
        };
        // Alternated, so that a disturbance reaches both; the best of each.
        let (mut fma, mut dp) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..5 {
            // SAFETY: has_avx512_bf16() was checked above.
            fma = fma.min(time(&|| unsafe { chains_fma() }));
            // SAFETY: as above.
            dp = dp.min(time(&|| unsafe { chains_dp() }));
        }
        // Equal instruction counts: dp does twice the products per instruction.
        2.0 * fma / dp >= 1.4
    })
}

/// Iterations of the calibration loops: 12 x 4096 instructions, tens of microseconds.
const CALIBRATE_STEPS: usize = 4096;

#[target_feature(enable = "avx512f")]
unsafe fn chains_fma() -> f32 {
    let mut a = [_mm512_set1_ps(1e-3); 12];
    let (b, c) = (std::hint::black_box(_mm512_set1_ps(0.999)), _mm512_set1_ps(1e-6));
    for _ in 0..CALIBRATE_STEPS {
        for v in a.iter_mut() {
            *v = _mm512_fmadd_ps(*v, b, c);
        }
    }
    a.iter().map(|&v| _mm512_reduce_add_ps(v)).sum()
}

#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn chains_dp() -> f32 {
    let mut a = [_mm512_set1_ps(1e-3); 12];
    // SAFETY: __m512i and __m512bh are both 64-byte vectors of plain bits.
    let b: __m512bh = std::mem::transmute(std::hint::black_box(_mm512_set1_epi16(0x3f80)));
    for _ in 0..CALIBRATE_STEPS {
        for v in a.iter_mut() {
            *v = _mm512_dpbf16_ps(*v, b, b);
        }
    }
    a.iter().map(|&v| _mm512_reduce_add_ps(v)).sum()
}

/// `out[i] = 1 / (1 + exp(-x[i]))`, NaN counted as minus infinity (the routing contract's rule), 16
/// at a time. exp is Cephes' `expf` (Cody-Waite reduction by ln 2, a degree-6 polynomial,
/// `vscalefps` for the power of two, which also gives 0 and infinity past the range); each result
/// is within 3 f32 epsilons (relative) of the exact sigmoid (tested). The scalar path
/// (`crate::route::exp`) does the same operations, so the bits do not depend on the SIMD level.
/// At 4096 tokens of DeepSeek-V3 (256 experts) the scalar loop (then on the C library's `expf`)
/// took about a fifth of the routing time.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[target_feature(enable = "avx512f")]
pub unsafe fn sigmoid(x: &[f32], out: &mut [f32]) {
    assert!(out.len() >= x.len());
    for i in (0..x.len()).step_by(16) {
        let m = first_lanes(x.len() - i);
        let v = _mm512_maskz_loadu_ps(m, x.as_ptr().add(i));
        // NaN -> -inf. Then exp(-v): v = -inf clamps to exp(89) = inf (sigmoid 0), v = +inf to
        // exp(-104), about 0 (sigmoid 1).
        let v = _mm512_mask_mov_ps(
            v,
            _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v),
            _mm512_set1_ps(f32::NEG_INFINITY),
        );
        let e = exp_cephes(_mm512_sub_ps(_mm512_setzero_ps(), v));
        let one = _mm512_set1_ps(1.0);
        _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), m, _mm512_div_ps(one, _mm512_add_ps(one, e)));
    }
}

/// Softmax of `x` into `out` where the largest of `x` (NaN counted as minus infinity) is finite:
/// `out[i] = e[i] / sum(e)` with `e[i] = exp(x[i] - max)` on [`sigmoid`]'s exp, the sum in 16
/// lanes then across them as the scalar path adds them (the same bits on every SIMD level). Returns false, writing nothing, where the largest is infinite or `x`
/// is empty (the contract's rules for those take the scalar path). Equal logits give equal
/// scores, so ties stay ties. qwen3-30b-a3b's routing of 256 tokens (128 experts, two threads on
/// an AMD EPYC, Zen 5, with the call into the pool): 0.055-0.070 ms against 0.106-0.110 with the
/// scalar loop on the C library's `expf`.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[target_feature(enable = "avx512f")]
pub unsafe fn softmax(x: &[f32], out: &mut [f32]) -> bool {
    assert!(out.len() >= x.len());
    let load = |i: usize| {
        let m = first_lanes(x.len() - i);
        // Lanes past the end read as minus infinity, as NaN does: neither is the largest, and
        // both give exp 0.
        let v = _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), m, x.as_ptr().add(i));
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        (m, _mm512_mask_mov_ps(v, nan, _mm512_set1_ps(f32::NEG_INFINITY)))
    };
    let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
    for i in (0..x.len()).step_by(16) {
        mx = _mm512_max_ps(mx, load(i).1);
    }
    let m = _mm512_reduce_max_ps(mx);
    if !m.is_finite() {
        return false;
    }
    let (mv, mut sum) = (_mm512_set1_ps(m), _mm512_setzero_ps());
    for i in (0..x.len()).step_by(16) {
        let (k, v) = load(i);
        let e = exp_cephes(_mm512_sub_ps(v, mv));
        sum = _mm512_add_ps(sum, e);
        _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), k, e);
    }
    // The lanes added in the scalar path's order (crate::route::lane_sum), for the same bits.
    let mut lanes = [0.0f32; 16];
    _mm512_storeu_ps(lanes.as_mut_ptr(), sum);
    let sum = _mm512_set1_ps(crate::route::lane_sum(lanes));
    for i in (0..x.len()).step_by(16) {
        let k = first_lanes(x.len() - i);
        let e = _mm512_maskz_loadu_ps(k, out.as_ptr().add(i));
        _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), k, _mm512_div_ps(e, sum));
    }
    true
}

/// SwiGLU in place: `gate[i] = gate[i] / (1 + exp(-gate[i])) * up[i]`, 16 at a time, with the exp
/// of [`sigmoid`] (so within a few f32 epsilons of the C library's `expf` that the scalar path
/// calls). A NaN gate stays NaN (it is the numerator), -inf gives NaN and +inf gives inf, as the
/// scalar formula does. Every lane computes the same operations whatever its position, so the
/// bits do not depend on the tiling. One core: 0.18 against 1.44-1.46 ns an element for the scalar loop
/// (qwen3-30b-a3b gate/up at 256 tokens holds 1.6 M of them), measured when exp still fused its
/// multiply-adds (since e5f8336 they are apart, for the routing scores' sake: a few more
/// instructions an element, and last-bit changes in the outputs).
///
/// # Safety
/// The CPU must have AVX-512 F.
#[target_feature(enable = "avx512f")]
pub unsafe fn swiglu(gate: &mut [f32], up: &[f32]) {
    assert!(up.len() >= gate.len());
    for i in (0..gate.len()).step_by(16) {
        let m = first_lanes(gate.len() - i);
        let g = _mm512_maskz_loadu_ps(m, gate.as_ptr().add(i));
        let u = _mm512_maskz_loadu_ps(m, up.as_ptr().add(i));
        let e = exp_cephes(_mm512_sub_ps(_mm512_setzero_ps(), g));
        let silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0), e));
        _mm512_mask_storeu_ps(gate.as_mut_ptr().add(i), m, _mm512_mul_ps(silu, u));
    }
}

/// The mask of the first `n` of 16 lanes (all of them from 16 up).
#[inline(always)]
fn first_lanes(n: usize) -> __mmask16 {
    if n >= 16 {
        u16::MAX
    } else {
        (1u16 << n) - 1
    }
}

/// Cephes `expf` on 16 lanes (see [`sigmoid`]): `y` is clamped to [-104, 89], whose ends give 0
/// and infinity after the scaling, as exp does.
#[inline(always)]
unsafe fn exp_cephes(y: __m512) -> __m512 {
    use crate::route::{EXP_POLY, EXP_RANGE, LN2_PARTS};
    let y = _mm512_min_ps(
        _mm512_max_ps(y, _mm512_set1_ps(EXP_RANGE.0)),
        _mm512_set1_ps(EXP_RANGE.1),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        y,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
    ));
    // Multiplies and adds apart, as the scalar `crate::route::exp`.
    let r = _mm512_sub_ps(y, _mm512_mul_ps(n, _mm512_set1_ps(LN2_PARTS.0)));
    let r = _mm512_sub_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(LN2_PARTS.1)));
    let mut p = _mm512_set1_ps(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(c));
    }
    let e = _mm512_add_ps(
        _mm512_add_ps(_mm512_mul_ps(p, _mm512_mul_ps(r, r)), r),
        _mm512_set1_ps(1.0),
    );
    _mm512_scalef_ps(e, n)
}

/// `f()`, compiled for AVX-512 F, BW and VL: `f` is inlined here (the combine and bf16-store
/// instances are, in the disassembly: `zmm` throughout), so that loops written in plain Rust, which
/// the crate's x86-64 baseline build compiles to SSE2, vectorise on `zmm` with the same operations
/// per element, and so the same bits.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn compiled_for_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Whether this CPU runs [`dots`].
pub fn has_avx512() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl")
}

/// Whether this CPU runs [`dots_bf16`].
pub fn has_avx512_bf16() -> bool {
    has_avx512() && is_x86_feature_detected!("avx512bf16")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the CPU lacks AVX-512 BW/VL, said loudly: the caller's test then has nothing to run.
    fn skipped_without_avx512() -> bool {
        let lacks = !has_avx512();
        if lacks {
            eprintln!("SKIPPED: no AVX-512 BW/VL on this CPU");
        }
        lacks
    }

    /// -104 to 104 in steps of 5e-4, the edges (NaN, the infinities, signed zeros, tiny values,
    /// past exp's range), then a tail of 5 past the last whole vector with the edges again.
    fn exp_inputs() -> Vec<f32> {
        let mut x: Vec<f32> = (-208_000..=208_000).map(|i| i as f32 * 5e-4).collect();
        x.extend([
            f32::NAN,
            f32::NEG_INFINITY,
            f32::INFINITY,
            0.0,
            -0.0,
            1e-30,
            -1e-30,
            88.7,
            -88.7,
            200.0,
            -200.0,
        ]);
        x.truncate(x.len() / 16 * 16 + 5);
        x.extend([f32::NAN, f32::NEG_INFINITY, f32::INFINITY, 0.0, -200.0]);
        x
    }

    /// Softmax: rows of every length up to 300 (whole vectors and tails), within 4 f32 epsilons
    /// (relative, of the largest score) of f64's softmax; NaN and minus infinity give 0, equal
    /// logits equal scores, nothing is written past the row, and an infinite largest logit (or an
    /// empty row) is declined with nothing written.
    #[test]
    fn softmax_matches_f64() {
        if skipped_without_avx512() {
            return;
        }
        for n in (1..=40).chain([127, 128, 129, 256, 300]) {
            let mut x: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
            if n > 5 {
                x[1] = f32::NAN;
                x[3] = f32::NEG_INFINITY;
                x[4] = x[n - 1];
                x[2] = -1e30;
            }
            let mut got = vec![-1.0f32; n + 3];
            // SAFETY: the CPU has AVX-512 F (checked above).
            assert!(unsafe { softmax(&x, &mut got) }, "n = {n}");
            assert!(got[n..].iter().all(|&v| v == -1.0), "wrote past the row, n = {n}");
            let clean = |v: f32| if v.is_nan() { f64::NEG_INFINITY } else { v as f64 };
            let m = x.iter().map(|&v| clean(v)).fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = x.iter().map(|&v| (clean(v) - m).exp()).collect();
            let (sum, top) = (e.iter().sum::<f64>(), e.iter().fold(0.0f64, |a, &b| a.max(b)));
            for (i, (&g, &e)) in got.iter().zip(&e).enumerate() {
                let err = (g as f64 - e / sum).abs() / (top / sum);
                assert!(
                    err <= 4.0 * f32::EPSILON as f64,
                    "n = {n}, x[{i}] = {}: {g} vs {}",
                    x[i],
                    e / sum
                );
            }
            if n > 5 {
                assert_eq!((got[1], got[3], got[4].to_bits()), (0.0, 0.0, got[n - 1].to_bits()));
            }
        }
        for x in [vec![1.0, f32::INFINITY, 2.0], vec![f32::NAN, f32::NEG_INFINITY], vec![]] {
            let mut got = vec![-1.0f32; 4];
            // SAFETY: as above.
            assert!(!unsafe { softmax(&x, &mut got) }, "{x:?}");
            assert!(got.iter().all(|&v| v == -1.0), "{x:?}: wrote {got:?}");
        }
    }

    /// Within 3 f32 epsilons (relative) of the exact sigmoid from -87 to 87, the scalar formula's
    /// value (1, or subnormal to 0) past that, and the
    /// contract's values at the edges: NaN and -inf give 0, +inf 1, 0 one half.
    #[test]
    fn sigmoid_matches_the_scalar_formula() {
        if skipped_without_avx512() {
            return;
        }
        let x = exp_inputs();
        let mut got = vec![f32::NAN; x.len() + 3];
        // SAFETY: the CPU has AVX-512 F (checked above).
        unsafe { sigmoid(&x, &mut got) };
        assert!(got[x.len()..].iter().all(|v| v.is_nan()), "wrote past the inputs");
        let mut worst = 0.0f64;
        for (&v, &g) in x.iter().zip(&got) {
            let clean = if v.is_nan() { f32::NEG_INFINITY } else { v };
            if clean.abs() > 87.0 {
                // 1 + exp(-x) rounds to 1, or the result is subnormal or 0 (exp(-x) overflows f32
                // from 88.7): the scalar formula's value, to a few subnormals (1.4e-45 each).
                let want = 1.0 / (1.0 + (-clean).exp());
                assert!((g - want).abs() <= 1e-44, "sigmoid({v}) = {g}, want {want}");
                continue;
            }
            let want = 1.0 / (1.0 + (-clean as f64).exp());
            let err = (g as f64 - want).abs() / want;
            assert!(err <= 3.0 * f32::EPSILON as f64, "sigmoid({v}) = {g}, want {want}");
            worst = worst.max(err);
        }
        let at = |v: f32| got[x.iter().rposition(|&y| y.to_bits() == v.to_bits()).unwrap()];
        assert_eq!(
            (at(f32::NAN), at(f32::NEG_INFINITY), at(f32::INFINITY), at(0.0)),
            (0.0, 0.0, 1.0, 0.5)
        );
        eprintln!("worst relative error: {worst:.2e}");
    }

    /// The routing scores on 16 lanes and in the scalar path (`crate::route`): the same bits,
    /// for exp over its whole range and the edges, for sigmoid, and for softmax rows of every
    /// length up to 40 and a few longer, so that `route` chooses the same from the same logits at
    /// every SIMD level.
    #[test]
    fn routing_scores_have_the_scalar_bits() {
        if skipped_without_avx512() {
            return;
        }
        let x = exp_inputs();
        let mut got = vec![0.0f32; x.len() + 15];
        for i in (0..x.len()).step_by(16) {
            // SAFETY: the CPU has AVX-512 F; the store is of 16 lanes within `got`.
            unsafe {
                let m = first_lanes(x.len() - i);
                let v = exp_cephes(_mm512_maskz_loadu_ps(m, x.as_ptr().add(i)));
                _mm512_storeu_ps(got.as_mut_ptr().add(i), v);
            }
        }
        for (&v, &g) in x.iter().zip(&got) {
            let want = crate::route::exp(v);
            assert!(
                g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                "exp({v}): {g} vs {want}"
            );
        }
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for scoring in [moe_hal_core::Scoring::Sigmoid, moe_hal_core::Scoring::Softmax] {
            for n in (1..=40).chain([127, 128, 129, 256, 384]) {
                let row: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 11.0).collect();
                let mut row2 = row.clone();
                row2.iter_mut().step_by(5).for_each(|v| *v = -*v * 0.01);
                for r in [&row, &row2, &x[..n.min(x.len())].to_vec()] {
                    let (mut a, mut b) = (vec![0.0f32; n], vec![0.0f32; n]);
                    crate::route::scores(r, scoring, &mut a, true);
                    crate::route::scores(r, scoring, &mut b, false);
                    assert_eq!(bits(&a), bits(&b), "{scoring:?} n = {n}");
                }
            }
        }
    }

    /// SwiGLU: within 4 f32 epsilons (relative) of f64's `g / (1 + exp(-g)) * u` from g = -87 up,
    /// tiny or zero below (as the scalar formula, whose exp overflows there), the same bits
    /// in a vector and alone (tails), nothing written past the gates, and the scalar formula's
    /// values at NaN and the infinities.
    #[test]
    fn swiglu_matches_the_formula() {
        if skipped_without_avx512() {
            return;
        }
        let g = exp_inputs();
        let u: Vec<f32> = (0..g.len()).map(|i| ((i * 53 % 97) as f32 - 48.0) / 23.0).collect();
        let mut got = g.clone();
        got.extend([f32::NAN; 3]);
        // SAFETY: the CPU has AVX-512 F (checked above).
        unsafe { swiglu(&mut got[..g.len()], &u) };
        assert!(got[g.len()..].iter().all(|v| v.is_nan()), "wrote past the gates");
        let mut worst = 0.0f64;
        for (i, (&x, &y)) in g.iter().zip(&got).enumerate() {
            let mut one = [x];
            // SAFETY: as above.
            unsafe { swiglu(&mut one, &u[i..i + 1]) };
            assert_eq!(one[0].to_bits(), y.to_bits(), "swiglu({x}) alone and in a vector");
            let scalar = x / (1.0 + (-x).exp()) * u[i];
            if !x.is_finite() {
                assert_eq!(
                    y.is_nan(),
                    scalar.is_nan(),
                    "swiglu({x}) = {y}, the formula gives {scalar}"
                );
                if !scalar.is_nan() {
                    assert_eq!(y, scalar, "swiglu({x})");
                }
                continue;
            }
            let want = x as f64 / (1.0 + (-x as f64).exp()) * u[i] as f64;
            if x < -87.0 {
                // exp(-g) overflows f32 from g = -88.7, and the scalar formula gives 0 there too;
                // the exact value is below 88.7 * exp(-87) * |u|, 1.5e-36 * |u|.
                let tiny = 2e-36 * u[i].abs().max(1.0);
                assert!(
                    y.abs() <= tiny && scalar.abs() <= tiny,
                    "swiglu({x}) = {y}, want {want}"
                );
                continue;
            }
            if want == 0.0 {
                assert_eq!(y, 0.0, "swiglu({x}) * {}", u[i]);
                continue;
            }
            let err = (y as f64 - want).abs() / want.abs();
            assert!(
                err <= 4.0 * f32::EPSILON as f64,
                "swiglu({x}) * {} = {y}, want {want}",
                u[i]
            );
            worst = worst.max(err);
        }
        eprintln!("worst relative error: {worst:.2e}");
    }

    /// Blocks and edges give the same bits as one output at a time, and match f64 closely.
    #[test]
    fn blocks_equal_single_outputs() {
        if skipped_without_avx512() {
            return;
        }
        for (rows, cols, k) in [(7, 9, 37), (1, 5, 2048), (2, 4, 33), (3, 7, 16), (5, 3, 1), (6, 15, 40)] {
            let x: Vec<f32> = (0..rows * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
            let w32: Vec<f32> = (0..cols * k).map(|i| ((i * 53 % 97) as f32 - 48.0) / 23.0).collect();
            let wb: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
            let wh: Vec<f16> = w32.iter().map(|&v| f16::from_f32(v)).collect();
            fn check<W: Load16>(x: &[f32], w: &[W], rows: usize, cols: usize, k: usize, wide: impl Fn(W) -> f64) {
                let mut all = vec![0.0; rows * cols];
                // SAFETY: has_avx512() was checked; the slices have the sizes given.
                unsafe { dots(x, rows, k, w, cols, &mut all) };
                for r in 0..rows {
                    for c in 0..cols {
                        let mut one = [0.0f32];
                        // SAFETY: as above, one row against one weight row.
                        unsafe { dots(&x[r * k..(r + 1) * k], 1, k, &w[c * k..(c + 1) * k], 1, &mut one) };
                        assert_eq!(all[r * cols + c].to_bits(), one[0].to_bits(), "row {r} col {c}");
                        let exact: f64 = (0..k).map(|i| x[r * k + i] as f64 * wide(w[c * k + i])).sum();
                        let scale: f64 = (0..k).map(|i| (x[r * k + i] as f64 * wide(w[c * k + i])).abs()).sum();
                        assert!((all[r * cols + c] as f64 - exact).abs() <= 1e-6 * (1.0 + scale));
                    }
                }
            }
            check(&x, &w32, rows, cols, k, |v| v as f64);
            check(&x, &wb, rows, cols, k, |v| v.to_f64());
            check(&x, &wh, rows, cols, k, |v| v.to_f64());
        }
    }

    /// bf16 pairs interleaved with transposes (even `k`) are bit for bit the element-by-element
    /// layout, NaN payloads and negative zeros included, with partial lane blocks and `k` not a
    /// multiple of 32; odd `k` takes the element path.
    #[test]
    fn bf16_pairs_interleave_equals_the_portable_layout() {
        if skipped_without_avx512() {
            return;
        }
        for (rows, k) in [
            (1, 2),
            (3, 34),
            (12, 64),
            (13, 2048),
            (16, 40),
            (17, 98),
            (29, 6),
            (128, 66),
            (5, 7),
        ] {
            let x: Vec<bf16> = (0..rows * k)
                .map(|i| match i % 11 {
                    3 => bf16::from_bits(0x7fc1 + (i % 5) as u16), // NaN payloads
                    7 => bf16::from_bits(0x8000),                  // -0.0
                    _ => bf16::from_f32((i as f32 * 0.37).sin() * 3.0),
                })
                .collect();
            let len = bf16_pairs_len(rows, k);
            let (mut want, mut got) = (vec![f32::NAN; len], vec![f32::NAN; len]);
            interleave_bf16_pairs_portable(&x, |r| r, rows, k, &mut want);
            interleave_bf16_pairs(&x, |r| r, rows, k, &mut got);
            let same = want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{rows} rows, k {k}");
        }
    }

    /// The bf16 dot-product step: bits independent of the block, close to f64 of the bf16 values.
    #[test]
    fn bf16_blocks_equal_single_outputs() {
        if !has_avx512_bf16() {
            eprintln!("SKIPPED: no AVX512-BF16 on this CPU");
            return;
        }
        for (rows, cols, k) in [(7, 9, 37), (1, 5, 2048), (2, 4, 65), (3, 7, 32), (5, 3, 1), (6, 15, 70)] {
            let x: Vec<bf16> = (0..rows * k)
                .map(|i| bf16::from_f32(((i * 37 % 101) as f32 - 50.0) / 17.0))
                .collect();
            let w: Vec<bf16> = (0..cols * k)
                .map(|i| bf16::from_f32(((i * 53 % 97) as f32 - 48.0) / 23.0))
                .collect();
            let mut all = vec![0.0; rows * cols];
            // SAFETY: has_avx512_bf16() was checked; the slices have the sizes given.
            unsafe { dots_bf16(&x, rows, k, &w, cols, &mut all) };
            for r in 0..rows {
                for c in 0..cols {
                    let mut one = [0.0f32];
                    // SAFETY: as above, one row against one weight row.
                    unsafe { dots_bf16(&x[r * k..(r + 1) * k], 1, k, &w[c * k..(c + 1) * k], 1, &mut one) };
                    assert_eq!(all[r * cols + c].to_bits(), one[0].to_bits(), "row {r} col {c}");
                    let prods = (0..k).map(|i| x[r * k + i].to_f64() * w[c * k + i].to_f64());
                    let exact: f64 = prods.clone().sum();
                    let scale: f64 = prods.map(f64::abs).sum();
                    assert!(
                        (all[r * cols + c] as f64 - exact).abs() <= 1e-6 * (1.0 + scale),
                        "{rows}x{cols}x{k}"
                    );
                }
            }
        }
    }

    /// The k-pair broadcast kernel: every output is the FMA chain over the even inputs plus the one
    /// over the odd inputs, bit for bit, whatever the number of blocks (one to seven, groups of
    /// one to four), column blocks, panels, odd `k` and rows short of a block; the interleaving
    /// in registers gives the same bits as element by element.
    #[test]
    fn bcast_pairs_equals_even_plus_odd_chains() {
        if skipped_without_avx512() {
            return;
        }
        let cases = [
            (1, 1, 1),
            (3, 5, 2),
            (8, 17, 3),
            (9, 16, 37),
            (16, 64, 2048),
            (17, 13, 40),
            (24, 49, 768),
            (31, 100, 9),
            (40, 7, 16),
            (56, 21, 33),
            (128, 50, 18),
            (44, 9, 5),
            (0, 3, 5),
        ];
        for (rows, cols, k) in cases {
            let x: Vec<f32> = (0..rows * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
            let w: Vec<f32> = (0..cols * k).map(|i| ((i * 53 % 97) as f32 - 48.0) / 23.0).collect();
            let mut xt = vec![f32::NAN; pairs_len(rows, k)];
            let mut portable = vec![f32::NAN; pairs_len(rows, k)];
            // SAFETY: has_avx512() was checked; the slices have the sizes given.
            unsafe { interleave_pairs(&x, rows, k, &mut xt) };
            interleave_pairs_portable(&x, rows, k, &mut portable);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&xt), bits(&portable), "interleaved {rows}x{k}");
            check_pairs(&x, &xt, &w, rows, cols, k);
        }
        // Signed zeros: products that underflow to -0.0, with odd and even `k`, must stay -0.0.
        for k in [1, 2, 3, 4, 5] {
            let (rows, cols) = (9, 3);
            let x = vec![-1e-30f32; rows * k];
            let w = vec![1e-30f32; cols * k];
            let mut xt = vec![f32::NAN; pairs_len(rows, k)];
            // SAFETY: has_avx512() was checked; the slices have the sizes given.
            unsafe { interleave_pairs(&x, rows, k, &mut xt) };
            check_pairs(&x, &xt, &w, rows, cols, k);
        }
    }

    /// [`bcast_pairs`] on interleaved `xt` of `x` against `w`, bit for bit against the even chain
    /// plus the odd chain of every output.
    fn check_pairs(x: &[f32], xt: &[f32], w: &[f32], rows: usize, cols: usize, k: usize) {
        let mut out = vec![f32::NAN; rows * cols];
        // SAFETY: has_avx512() was checked by the caller; the slices have the sizes given.
        unsafe { bcast_pairs(xt, rows, k, w, cols, &mut out) };
        for r in 0..rows {
            for c in 0..cols {
                let chain = |from: usize| {
                    (from..k)
                        .step_by(2)
                        .fold(0.0f32, |a, i| x[r * k + i].mul_add(w[c * k + i], a))
                };
                let want = chain(0) + chain(1);
                assert_eq!(
                    out[r * cols + c].to_bits(),
                    want.to_bits(),
                    "{rows}x{cols}x{k}: row {r} col {c}"
                );
            }
        }
    }

    /// The broadcast kernel: every output is the f32 fused multiply-add chain over `k` in ascending
    /// order, bit for bit, whatever the lane blocks, column blocks, tails and (for 16-bit weights)
    /// chunks of widened weights.
    #[test]
    fn bcast_equals_sequential_fma_chains() {
        if skipped_without_avx512() {
            return;
        }
        let cases: [(usize, usize, usize); 14] = [
            (1, 1, 1),
            (8, 5, 37),
            (15, 29, 9),
            (16, 16, 8),
            (17, 12, 2048),
            (33, 64, 40),
            (48, 17, 16),
            (64, 4, 7),
            (128, 66, 24),
            // Chunks of widened weights: one and a tail, several with a tail not a multiple of 16.
            (16, 9, WIDE_K + 44),
            (40, 13, 2 * WIDE_K + 5),
            (24, 25, WIDE_K),
            (16, 2 * WIDE_ONE_C + ONE_C + 5, 2 * WIDE_K + 9),
            // More lane blocks than one call of bcast_block takes (GROUPS pairs and one more).
            (2 * GROUPS * LANE_ROWS + 20, 13, WIDE_K + 3),
        ];
        fn check<W: BcastWeight>(rows: usize, cols: usize, k: usize, w: &[W], wide: impl Fn(W) -> f32) {
            let x: Vec<f32> = (0..rows * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
            let mut xt = vec![f32::NAN; crate::matmul::interleaved_len(rows, k, LANE_ROWS)];
            crate::matmul::interleave(
                crate::matmul::Floats::F32(&x),
                crate::matmul::InputRows::InOrder,
                0,
                rows,
                k,
                LANE_ROWS,
                &mut xt,
            );
            let mut out = vec![f32::NAN; rows * cols];
            // SAFETY: has_avx512() was checked; the slices have the sizes given.
            unsafe { bcast(&xt, rows, k, w, cols, &mut out) };
            for r in 0..rows {
                for c in 0..cols {
                    let want = (0..k).fold(0.0f32, |a, i| x[r * k + i].mul_add(wide(w[c * k + i]), a));
                    assert_eq!(
                        out[r * cols + c].to_bits(),
                        want.to_bits(),
                        "{} {rows}x{cols}x{k}: row {r} col {c}",
                        std::any::type_name::<W>()
                    );
                }
            }
        }
        for (rows, cols, k) in cases {
            let w: Vec<f32> = (0..cols * k).map(|i| ((i * 53 % 97) as f32 - 48.0) / 23.0).collect();
            check(rows, cols, k, &w, |v| v);
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            check(rows, cols, k, &wb, |v| v.to_f32());
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            check(rows, cols, k, &wh, |v| v.to_f32());
        }
    }

    /// The kernel on widened weights gives the same bits in both [`OnePass`] schemes (one block
    /// or four a register block at decode, T0 or non-temporal prefetches; [`one_pass_scheme`]
    /// picks one per CPU, so a machine runs only one of them in a layer), and the passes of
    /// taller tiles too, at heights of 1 to 29 rows, `k` over many ranges, columns starting
    /// inside a block. It and the `vdpbf16ps` kernel agree with f64 sums.
    #[test]
    fn one_pass_schemes_give_the_same_bits() {
        use crate::matmul::{interleave, interleaved_len, Floats, InputRows};
        use crate::pack::{packed_lanes, Packing};
        use moe_hal_core::{HostSlice, HostVec};
        if skipped_without_avx512() {
            return;
        }
        let (k, n, first, cols) = (3001, 224, 5, 200);
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 53 % 97) as f32 - 48.0) / 230.0).collect();
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let packing = |kpairs| Packing {
            experts: 1,
            rows: n,
            k,
            kpairs,
        };
        let Ok(HostVec::F32(pw)) = packing(false).pack(HostSlice::F32(&w)) else {
            panic!("f32 weights pack as f32");
        };
        let Ok(HostVec::BF16(pb)) = packing(true).pack(HostSlice::BF16(&wb)) else {
            panic!("bf16 weights pack as bf16");
        };
        for rows in [1, 2, 3, 4, 6, 7, 12, 13, 14, 15, 28, 29] {
            let x: Vec<f32> = (0..rows * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 170.0).collect();
            let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            let mut xt = vec![0.0; interleaved_len(rows, k, packed_lanes(rows))];
            interleave(
                Floats::F32(&x),
                InputRows::InOrder,
                0,
                rows,
                k,
                packed_lanes(rows),
                &mut xt,
            );
            let mut xp = vec![0.0; bf16_pairs_len(rows, k)];
            interleave_bf16_pairs(&xb, |r| r, rows, k, &mut xp);
            let run = |dp: bool, scheme: OnePass| {
                let (mut io, mut out) = (Vec::new(), vec![f32::NAN; rows * cols]);
                // SAFETY: AVX-512 was checked above, AVX512-BF16 before each `packed_dp`; the
                // kernels check the slices' lengths.
                unsafe {
                    if dp {
                        packed_dp(&xp, rows, k, &pb, first, cols, &mut io, &mut out)
                    } else {
                        packed(&xt, rows, k, &pw, first, cols, &mut io, &mut out, scheme)
                    }
                }
                out
            };
            // `vdpbf16ps` (dp) only where the CPU has AVX512-BF16.
            let kernels: &[bool] = if has_avx512_bf16() { &[false, true] } else { &[false] };
            for &dp in kernels {
                // `packed_dp` has one scheme.
                let with = run(dp, OnePass::OneStreamNta);
                let four = if dp {
                    with.clone()
                } else {
                    run(dp, OnePass::FourStreamsT0)
                };
                if let Some(i) = (0..with.len()).find(|&i| with[i].to_bits() != four[i].to_bits()) {
                    panic!(
                        "{rows} rows: output {i} is {} with one stream, {} with four",
                        with[i], four[i]
                    );
                }
                let round = |v: f32| if dp { bf16::from_f32(v).to_f64() } else { v as f64 };
                for r in 0..rows {
                    for c in 0..cols {
                        let row = &w[(first + c) * k..][..k];
                        let (want, mag) = row.iter().zip(&x[r * k..]).fold((0.0, 0.0), |(s, m), (&a, &b)| {
                            let p = round(a) * round(b);
                            (s + p, m + p.abs())
                        });
                        let got = with[r * cols + c] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * mag,
                            "{rows} rows, vdpbf16ps {dp}, output ({r}, {c}): {got}, want {want}"
                        );
                    }
                }
            }
        }
    }
}
