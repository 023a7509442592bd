//! Weighted un-permute with a fixed summation order.

use crate::matmul::{bf16_to_f32, f16_to_f32, f32_to_bf16, Floats};
use half::{bf16, f16};
use moe_hal_core::{CombineShape, HostVec};

/// Outputs per step of a token's row: the step's accumulators stay in registers while all `k`
/// expert rows are added, instead of one pass over a work row per expert. DeepSeek-V3 shape (H
/// 7168, k 8, bf16, slots in random order) at 4096 tokens, two threads on an AMD EPYC (Zen 5):
/// 37.8-39.6 ms with a pass per expert, 21.5-26.4 in steps, 13.8-15.5 in steps with the prefetch
/// ([`AHEAD_BYTES`]; 1 and 4 KiB ahead the same), against 11 ms for its 528 MB at 48 GB/s.
const STEP: usize = 64;

/// How far ahead [`token_row`] prefetches each expert row it reads (and, near a row's end, the
/// next token's rows): `k` scattered rows at a time are too many streams for the hardware
/// prefetchers to start on their own.
const AHEAD_BYTES: usize = 2 << 10;

/// Pulls the lines at element `at` of every row of `terms` into L1, or where `at` is past the row
/// (`h`), those at `at - h` of `next`'s rows. One line per 64 bytes of a step.
#[inline(always)]
fn prefetch<T>(y: &[T], terms: &[(usize, f32)], next: &[(usize, f32)], h: usize, at: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let (rows, at) = if at < h { (terms, at) } else { (next, at - h) };
        if at >= h {
            return;
        }
        for &(start, _) in rows {
            for line in (0..STEP * std::mem::size_of::<T>()).step_by(64) {
                // Only a hint: an address past the row's end names memory never read, which a
                // prefetch may name without faulting; `wrapping_add` computes it without UB.
                let p = (y.as_ptr().wrapping_add(start + at) as *const i8).wrapping_add(line);
                // SAFETY: prefetching has no effect the program can observe (SSE is baseline on
                // x86-64).
                unsafe { _mm_prefetch::<_MM_HINT_T0>(p) };
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (y, terms, next, h, at);
}

/// One token: `out[c] = store(sum over terms of w * widen(y[start + c]))`, the terms in the order
/// given, a multiply then an add each (no fused multiply-add), from 0.
#[inline(always)]
fn token_row<T: Copy, O>(
    y: &[T],
    terms: &[(usize, f32)],
    next: &[(usize, f32)],
    widen: impl Fn(T) -> f32 + Copy,
    out: &mut [O],
    store: impl Fn(&mut [O], &[f32]),
) {
    let h = out.len();
    let ahead = (AHEAD_BYTES / std::mem::size_of::<T>()).max(1);
    let mut acc = [0.0f32; STEP];
    let mut c0 = 0;
    while c0 + STEP <= h {
        prefetch(y, terms, next, h, c0 + ahead);
        acc.fill(0.0);
        for &(start, w) in terms {
            let src: &[T; STEP] = y[start + c0..start + c0 + STEP].try_into().expect("STEP elements");
            for (a, &x) in acc.iter_mut().zip(src) {
                *a += w * widen(x);
            }
        }
        store(&mut out[c0..c0 + STEP], &acc);
        c0 += STEP;
    }
    if c0 < h {
        let n = h - c0;
        acc[..n].fill(0.0);
        for &(start, w) in terms {
            for (a, &x) in acc[..n].iter_mut().zip(&y[start + c0..start + h]) {
                *a += w * widen(x);
            }
        }
        store(&mut out[c0..], &acc[..n]);
    }
}

/// Per token: `acc = sum_j w_j * y_j` in f32, terms in ascending expert id
/// (then ascending j); then `out = prev + acc` when accumulating; rounded once.
/// `avx512`: the CPU has AVX-512 F, BW and VL (the backend's SIMD level).
pub fn combine(
    y: Floats,
    ids: &[u32],
    weights: &[f32],
    slots: &[u32],
    out: &mut HostVec,
    s: CombineShape,
    avx512: bool,
) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = avx512;
    let (h, k) = (s.hidden, s.top_k);
    if h == 0 || s.tokens == 0 {
        return;
    }
    let acc = s.accumulate;
    let rows = s.tokens * h;
    // Per task: token t's terms (row start, weight), in the summation order.
    let terms = |order: &mut Vec<(u32, usize)>, terms: &mut Vec<(usize, f32)>, t: usize| {
        terms.clear();
        if t >= s.tokens {
            return;
        }
        order.clear();
        order.extend((0..k).map(|j| (ids[t * k + j], j)));
        order.sort_unstable();
        terms.extend(
            order
                .iter()
                .map(|&(_, j)| (slots[t * k + j] as usize * h, weights[t * k + j])),
        );
    };
    macro_rules! run {
        ($o:expr, $store:expr) => {
            crate::pool::for_chunks_mut_init(
                &mut $o[..rows],
                h,
                || {
                    (
                        Vec::with_capacity(k),
                        Vec::with_capacity(k),
                        Vec::with_capacity(k),
                        usize::MAX,
                    )
                },
                |(order, tv, nv, next_t), (t, r)| {
                    // This token's terms are the previous token's `next` when the task goes on
                    // to the following token, as it usually does.
                    if *next_t == t {
                        std::mem::swap(tv, nv);
                    } else {
                        terms(order, tv, t);
                    }
                    // The next token's rows, to prefetch.
                    terms(order, nv, t + 1);
                    *next_t = t + 1;
                    let mut row = || match y {
                        Floats::F32(v) => token_row(v, tv, nv, |x| x, r, $store),
                        Floats::BF16(v) => token_row(v, tv, nv, bf16_to_f32, r, $store),
                        Floats::F16(v) => token_row(v, tv, nv, f16_to_f32, r, $store),
                    };
                    // Compiled for AVX-512, the loops over a step run 16 lanes at a time, with the
                    // same bits. Qwen3-30B-A3B at 256 tokens (bf16, k 8, H 2048, in L3), two
                    // threads on an AMD EPYC (Zen 5): 0.10-0.12 ms against 0.24 on the baseline's
                    // SSE2 (the bench's combine record, from memory: 0.10 against 0.26-0.28). The
                    // DeepSeek-V3 shape at 4096 tokens waits on memory either way.
                    #[cfg(target_arch = "x86_64")]
                    if avx512 {
                        // SAFETY: `avx512` comes from the backend's SIMD level, detected at run
                        // time.
                        return unsafe { crate::avx512::compiled_for_avx512(row) };
                    }
                    row()
                },
            )
        };
    }
    match out {
        HostVec::F32(o) => run!(o, |d: &mut [f32], a: &[f32]| if acc {
            d.iter_mut().zip(a).for_each(|(d, &a)| *d += a)
        } else {
            d.copy_from_slice(a)
        }),
        HostVec::BF16(o) => run!(o, |d: &mut [bf16], a: &[f32]| d
            .iter_mut()
            .zip(a)
            .for_each(|(d, &a)| { *d = f32_to_bf16(if acc { bf16_to_f32(*d) + a } else { a }) })),
        HostVec::F16(o) => run!(o, |d: &mut [f16], a: &[f32]| d
            .iter_mut()
            .zip(a)
            .for_each(|(d, &a)| { *d = f16::from_f32(if acc { d.to_f32() + a } else { a }) })),
        HostVec::U32(_) => unreachable!("dtype checked before"),
    }
}
