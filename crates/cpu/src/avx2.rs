//! The packed-weights kernel for CPUs with AVX2, FMA and F16C but not AVX-512 (most AMD Zen 2/3
//! and Intel client cores): `upload_weights` packs f32, bf16 and f16 expert weights there
//! ([`crate::pack`]), and every tile of them runs [`packed`].

use crate::pack::PACK_ROWS;
use half::{bf16, f16};
use std::arch::x86_64::*;

/// Packed weights that [`packed`] widens to f32 (exactly), one input index of a block at a time.
pub trait Wide8: Copy {
    /// Cache lines per input index of a block.
    const LINES: usize;
    /// The [`PACK_ROWS`] weights of one input index at `p` as f32: rows 0-7, 8-15, 16-23, 24-31.
    ///
    /// # Safety
    /// `p` must be readable for [`PACK_ROWS`] elements; the CPU must have AVX2 and F16C.
    unsafe fn load4(p: *const Self) -> [__m256; 4];
}

impl Wide8 for f32 {
    const LINES: usize = 2;
    #[inline(always)]
    unsafe fn load4(p: *const f32) -> [__m256; 4] {
        [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ]
    }
}

impl Wide8 for bf16 {
    const LINES: usize = 1;
    /// bf16 blocks pair row `j` (low half) with row `16 + j` (high half) in 32-bit lane `j`
    /// ([`crate::pack::Packing::lane`]): a shift and a mask widen both.
    #[inline(always)]
    unsafe fn load4(p: *const bf16) -> [__m256; 4] {
        let (a, b) = (
            _mm256_loadu_si256(p as *const __m256i),
            _mm256_loadu_si256(p.add(16) as *const __m256i),
        );
        let high = _mm256_set1_epi32(0xffff_0000u32 as i32);
        [
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(a)),
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(b)),
            _mm256_castsi256_ps(_mm256_and_si256(a, high)),
            _mm256_castsi256_ps(_mm256_and_si256(b, high)),
        ]
    }
}

impl Wide8 for f16 {
    const LINES: usize = 1;
    #[inline(always)]
    unsafe fn load4(p: *const f16) -> [__m256; 4] {
        let h = |o: usize| _mm256_cvtph_ps(_mm_loadu_si128(p.add(o) as *const __m128i));
        [h(0), h(8), h(16), h(24)]
    }
}

/// Where a pass of [`rows_block`] prefetches its weights: `step` 0 for a tile of one pass, which
/// prefetches [`AHEAD`] of each step's weights; else `at` for its first input index, then `step`
/// bytes further each index. Each of the `n` passes over a range of f32 weights (or of narrow
/// ones widened, [`WIDEN_PASSES`]) pulls `1 / n` of the next range (the scheme of the AVX-512
/// kernel's `Ahead`), so the next range's reads overlap all the passes' FMAs; before, only the
/// first pass over a range read it, and waited.
///
/// qwen3-30b-a3b gate/up as routed at 256 tokens, 128 experts from DRAM, two threads on an AMD
/// EPYC (Zen 1, 32 KiB L1d), paired call by call against 6686fc0 (`PAIRED_BLOCK=4
/// scripts/paired.sh 6686fc0 gemm f32 t256 gateup`, medians of the time ratios): f32 0.868 with
/// ranges of 16 KiB one range ahead (0.875 two ranges ahead, 0.894-0.898 with 8 KiB, 0.958 with
/// another `prefetcht1` two ranges further). bf16 widened in each pass gained nothing from it (1.004
/// and 1.012, one and two ranges ahead): its FMAs waited on the widening, not on memory. It spreads
/// since it is widened once ([`WIDEN_PASSES`]).
#[derive(Clone, Copy)]
struct Spread {
    at: *const i8,
    step: usize,
}

/// Fewest passes (of two input rows) of a tile over a range of bf16 or f16 weights that widen the
/// range once into f32 and run the other passes on that copy, instead of widening in each pass:
/// the first pass stores the f32 weights it widens ([`rows_block`]'s `KEEP`). On the AMD EPYC
/// (Zen 1) the widening (a shift and a mask per vector, or `vcvtph2ps`) competes with the FMAs for
/// the vector ports: bf16 gate/up ran at 48-49 GFLOP/s against f32's 66 from 16 rows up.
///
/// qwen3-30b-a3b gate/up, 128 experts from DRAM, two threads, paired call by call against 6686fc0
/// (`PAIRED_BLOCK=4 scripts/paired.sh 6686fc0 gemm bf16 H gateup`, medians of the time ratios):
/// from 2 passes, 3 rows 0.978, 4 rows 0.929, 6 rows 0.869, 8 rows 0.832, as routed at 16 tokens
/// 0.999 (most tiles of one pass) and at 256 tokens 0.808 and 0.821. Widened in a loop of its own
/// before the passes instead, which waits for memory with nothing to overlap, as routed at 256
/// tokens 0.858-0.883 from 3 or 5 passes, and 4 rows 1.186, 6 rows 1.049, 8 rows 1.017 from 2, 3
/// and 4 passes.
const WIDEN_PASSES: usize = 2;

/// Input indices ahead that [`rows_block`] prefetches its block's weights (as the AVX-512 packed
/// kernel does: one stream per block is too few for the hardware prefetchers).
const AHEAD: usize = 64;
/// Weight bytes of a block that every pair of input rows runs over before the next range of `k`,
/// so that the range is read from memory once and then from L1.
const CHUNK_BYTES: usize = 16 << 10;

/// `R` input rows from `x` (`k` apart) against one packed block over the input indices `k0 ..
/// k1`, whose weights start at `w` (the weights of index `k0`), into `io[r * PACK_ROWS + c]`
/// (started from zero when `k0` is 0): per input index, the block's 32 weights in four vectors,
/// each feeding `R` FMAs with a broadcast input. Each output is one FMA chain over `k` in ascending
/// order, carried in `io` between ranges. Each step prefetches where `pf` says; with `KEEP` it
/// also stores the widened weights at `keep` (`(k1 - k0) * PACK_ROWS` f32, the f32 packed layout).
#[inline(always)]
unsafe fn rows_block<W: Wide8, const R: usize, const KEEP: bool>(
    x: *const f32,
    k: usize,
    (k0, k1): (usize, usize),
    w: *const W,
    io: *mut f32,
    pf: Spread,
    keep: *mut f32,
) {
    let mut acc = [[_mm256_setzero_ps(); 4]; R];
    if k0 > 0 {
        for (r, a) in acc.iter_mut().enumerate() {
            for (j, a) in a.iter_mut().enumerate() {
                *a = _mm256_loadu_ps(io.add(r * PACK_ROWS + j * 8));
            }
        }
    }
    for i in 0..k1 - k0 {
        if pf.step == 0 {
            // Past the block's end this names the next block, which follows it; a prefetch never
            // faults.
            let ahead = w.wrapping_add((i + AHEAD) * PACK_ROWS);
            for l in 0..W::LINES {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(l * 64 / std::mem::size_of::<W>()) as *const i8);
            }
        } else {
            _mm_prefetch::<_MM_HINT_T0>(pf.at.wrapping_add(i * pf.step));
        }
        let wv = W::load4(w.add(i * PACK_ROWS));
        if KEEP {
            for (j, v) in wv.iter().enumerate() {
                _mm256_storeu_ps(keep.add(i * PACK_ROWS + j * 8), *v);
            }
        }
        for (r, a) in acc.iter_mut().enumerate() {
            let b = _mm256_broadcast_ss(&*x.add(r * k + k0 + i));
            for (a, v) in a.iter_mut().zip(&wv) {
                *a = _mm256_fmadd_ps(b, *v, *a);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        for (j, a) in a.iter().enumerate() {
            _mm256_storeu_ps(io.add(r * PACK_ROWS + j * 8), *a);
        }
    }
}

/// `out[r * cols + c] = x[r] · weight row (first + c)` for `rows` input rows `x` (f32,
/// `[rows][k]`) against one expert's packed weights `w` ([`crate::pack`]): per block of
/// [`PACK_ROWS`] weight rows and range of `k` ([`CHUNK_BYTES`]), input rows two at a time (8 `ymm`
/// accumulators, four weight vectors). Each output is one f32 FMA chain over `k` in ascending
/// order, so it does not depend on the blocking (and equals the AVX-512 packed kernel's, bit for
/// bit). Over narrow weights, tiles of [`WIDEN_PASSES`] passes or more keep the first pass's
/// widened range in `io` for the others. `io` is scratch (`rows * PACK_ROWS` f32, plus a range of f32 weights when widening).
///
/// Two rows at a time fill 8 of the 16 `ymm` with accumulators; three spilled (f32, one thread, 8
/// experts of qwen3-30b-a3b gate/up in cache: 16 rows 37 against 46 GFLOP/s, 128 rows 47 against
/// 63).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn packed<W: Wide8>(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[W],
    first: usize,
    cols: usize,
    io: &mut Vec<f32>,
    out: &mut [f32],
) {
    let end = first + cols;
    let (b0, b1) = (first / PACK_ROWS, end.div_ceil(PACK_ROWS));
    assert!(x.len() >= rows * k && w.len() >= b1 * PACK_ROWS * k && out.len() >= rows * cols);
    let passes = rows.div_ceil(2);
    let widen = W::LINES == 1 && passes >= WIDEN_PASSES;
    // Steps per range: CHUNK_BYTES of the weights as the passes read them.
    let chunk = (CHUNK_BYTES / (PACK_ROWS * if widen { 4 } else { std::mem::size_of::<W>() })).max(1);
    io.resize(rows * PACK_ROWS + if widen { chunk * PACK_ROWS } else { 0 }, 0.0);
    // No input index at all: every output is the empty sum.
    io.fill(0.0);
    let step_bytes = PACK_ROWS * std::mem::size_of::<W>();
    let (xp, iop) = (x.as_ptr(), io.as_mut_ptr());
    let wide = iop.add(rows * PACK_ROWS);
    for b in b0..b1 {
        let wp = w.as_ptr().add(b * PACK_ROWS * k);
        for k0 in (0..k).step_by(chunk) {
            let ks = (k0, (k0 + chunk).min(k));
            let wr = wp.add(k0 * PACK_ROWS);
            // Pass p pulls its share of the next range, which the next block's first range follows
            // in memory; a tile of one pass prefetches AHEAD.
            let spread = |p: usize| {
                if passes == 1 {
                    Spread {
                        at: std::ptr::null(),
                        step: 0,
                    }
                } else {
                    Spread {
                        at: (wr as *const i8).wrapping_add(chunk * step_bytes + p * chunk * step_bytes / passes),
                        step: (step_bytes / passes).max(1),
                    }
                }
            };
            if widen {
                // The first pass widens as it goes and keeps the f32 weights for the others.
                let r0 = rows.min(2);
                if r0 == 2 {
                    rows_block::<W, 2, true>(xp, k, ks, wr, iop, spread(0), wide);
                } else {
                    rows_block::<W, 1, true>(xp, k, ks, wr, iop, spread(0), wide);
                }
                passes_over::<f32>(xp, rows, k, ks, wide, iop, |p| spread(p + 1), r0);
            } else {
                passes_over::<W>(xp, rows, k, ks, wr, iop, spread, 0);
            }
        }
        crate::pack::copy_block_cols(io, PACK_ROWS, b, (b + 1) * PACK_ROWS, rows, first, cols, out);
    }
}

/// Every pass of [`rows_block`] (two input rows each, one for an odd last) over one range, from
/// input row `from`; `spread` is given the pass's index among them.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn passes_over<W: Wide8>(
    xp: *const f32,
    rows: usize,
    k: usize,
    ks: (usize, usize),
    w: *const W,
    iop: *mut f32,
    spread: impl Fn(usize) -> Spread,
    from: usize,
) {
    let mut r = from;
    let null = std::ptr::null_mut();
    while r + 2 <= rows {
        rows_block::<W, 2, false>(
            xp.add(r * k),
            k,
            ks,
            w,
            iop.add(r * PACK_ROWS),
            spread((r - from) / 2),
            null,
        );
        r += 2;
    }
    if r < rows {
        rows_block::<W, 1, false>(
            xp.add(r * k),
            k,
            ks,
            w,
            iop.add(r * PACK_ROWS),
            spread((r - from) / 2),
            null,
        );
    }
}

/// Whether this CPU runs [`packed`] (and the other AVX2 paths).
pub fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}
