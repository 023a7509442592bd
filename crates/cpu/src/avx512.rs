//! AVX-512 dot-product kernel of the narrow grouped-matmul tiles: four input
//! rows against four weight rows at a time, 16 `zmm` accumulators, weights
//! read straight from the checkpoint layout (bf16 and f16 widened in
//! registers). Every output, whether computed in a 4x4 block or alone, is the
//! same sequence of fused multiply-adds over 16-lane chunks (the last one
//! masked) followed by the same lane reduction, so results do not depend on
//! how the tile is cut.

use half::{bf16, f16};
use std::arch::x86_64::*;

/// Sixteen weights as f32 lanes.
pub trait Load16: Copy {
    /// # Safety
    /// The lanes selected by `mask` must be readable from `p`.
    unsafe fn load(p: *const Self, mask: __mmask16) -> __m512;
}

impl Load16 for f32 {
    #[inline(always)]
    unsafe fn load(p: *const f32, mask: __mmask16) -> __m512 {
        _mm512_maskz_loadu_ps(mask, p)
    }
}

impl Load16 for bf16 {
    #[inline(always)]
    unsafe fn load(p: *const bf16, mask: __mmask16) -> __m512 {
        let h = _mm256_maskz_loadu_epi16(mask, p as *const i16);
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
    }
}

impl Load16 for f16 {
    #[inline(always)]
    unsafe fn load(p: *const f16, mask: __mmask16) -> __m512 {
        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p as *const i16))
    }
}

#[inline(always)]
fn mask_of(i: usize, full: usize, tail: __mmask16) -> __mmask16 {
    if i < full {
        0xffff
    } else {
        tail
    }
}

/// One output: `x · w` over `k`.
#[inline(always)]
unsafe fn dot1<W: Load16>(x: *const f32, w: *const W, k: usize) -> f32 {
    let (full, chunks, tail) = (k / 16, k.div_ceil(16), ((1u32 << (k % 16)) - 1) as __mmask16);
    let mut acc = _mm512_setzero_ps();
    for i in 0..chunks {
        let m = mask_of(i, full, tail);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x.add(i * 16)), W::load(w.add(i * 16), m), acc);
    }
    _mm512_reduce_add_ps(acc)
}

/// `out[r * cols + c] = x[r] · w[c]` for `rows` rows of `x` (`[rows, k]` f32) and `cols` rows of `w`
/// (`[cols, k]`).
///
/// # Safety
/// The CPU must have AVX-512 F, BW and VL; `x`, `w` and `out` must hold `rows * k`, `cols * k` and
/// `rows * cols` elements.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn dots<W: Load16>(x: &[f32], rows: usize, k: usize, w: &[W], cols: usize, out: &mut [f32]) {
    assert!(x.len() >= rows * k && w.len() >= cols * k && out.len() >= rows * cols);
    let (full, chunks, tail) = (k / 16, k.div_ceil(16), ((1u32 << (k % 16)) - 1) as __mmask16);
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    let mut c = 0;
    while c + 4 <= cols {
        let mut r = 0;
        while r + 4 <= rows {
            let mut acc = [_mm512_setzero_ps(); 16];
            for i in 0..chunks {
                let m = mask_of(i, full, tail);
                let o = i * 16;
                let ws = [
                    W::load(wp.add(c * k + o), m),
                    W::load(wp.add((c + 1) * k + o), m),
                    W::load(wp.add((c + 2) * k + o), m),
                    W::load(wp.add((c + 3) * k + o), m),
                ];
                for a in 0..4 {
                    let xv = _mm512_maskz_loadu_ps(m, xp.add((r + a) * k + o));
                    acc[a * 4] = _mm512_fmadd_ps(xv, ws[0], acc[a * 4]);
                    acc[a * 4 + 1] = _mm512_fmadd_ps(xv, ws[1], acc[a * 4 + 1]);
                    acc[a * 4 + 2] = _mm512_fmadd_ps(xv, ws[2], acc[a * 4 + 2]);
                    acc[a * 4 + 3] = _mm512_fmadd_ps(xv, ws[3], acc[a * 4 + 3]);
                }
            }
            for a in 0..4 {
                for b in 0..4 {
                    out[(r + a) * cols + c + b] = _mm512_reduce_add_ps(acc[a * 4 + b]);
                }
            }
            r += 4;
        }
        for rr in r..rows {
            for b in 0..4 {
                out[rr * cols + c + b] = dot1(xp.add(rr * k), wp.add((c + b) * k), k);
            }
        }
        c += 4;
    }
    for cc in c..cols {
        for rr in 0..rows {
            out[rr * cols + cc] = dot1(xp.add(rr * k), wp.add(cc * k), k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supported() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
    }

    /// Blocks and edges give the same bits as one output at a time, and match f64 closely.
    #[test]
    fn blocks_equal_single_outputs() {
        if !supported() {
            eprintln!("SKIPPED: no AVX-512 BW/VL on this CPU");
            return;
        }
        let (rows, cols, k) = (7, 9, 37);
        let x: Vec<f32> = (0..rows * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        let w32: Vec<f32> = (0..cols * k).map(|i| ((i * 53 % 97) as f32 - 48.0) / 23.0).collect();
        let wb: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
        let wh: Vec<f16> = w32.iter().map(|&v| f16::from_f32(v)).collect();
        fn check<W: Load16>(x: &[f32], w: &[W], rows: usize, cols: usize, k: usize, wide: impl Fn(W) -> f64) {
            let mut all = vec![0.0; rows * cols];
            // SAFETY: supported() was checked; the slices have the sizes given.
            unsafe { dots(x, rows, k, w, cols, &mut all) };
            for r in 0..rows {
                for c in 0..cols {
                    let mut one = [0.0f32];
                    // SAFETY: as above, one row against one weight row.
                    unsafe { dots(&x[r * k..(r + 1) * k], 1, k, &w[c * k..(c + 1) * k], 1, &mut one) };
                    assert_eq!(all[r * cols + c].to_bits(), one[0].to_bits(), "row {r} col {c}");
                    let exact: f64 = (0..k).map(|i| x[r * k + i] as f64 * wide(w[c * k + i])).sum();
                    assert!((all[r * cols + c] as f64 - exact).abs() < 1e-4 * (1.0 + exact.abs()));
                }
            }
        }
        check(&x, &w32, rows, cols, k, |v| v as f64);
        check(&x, &wb, rows, cols, k, |v| v.to_f64());
        check(&x, &wh, rows, cols, k, |v| v.to_f64());
    }
}
