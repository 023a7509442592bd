//! Weighted un-permute with a fixed summation order.

use crate::matmul::Floats;
use half::{bf16, f16};
use moe_hal_core::{CombineShape, HostVec};
use rayon::prelude::*;

fn load(src: Floats, start: usize, dst: &mut [f32]) {
    match src {
        Floats::F32(v) => dst.copy_from_slice(&v[start..start + dst.len()]),
        Floats::BF16(v) => dst.iter_mut().zip(&v[start..]).for_each(|(d, s)| *d = s.to_f32()),
        Floats::F16(v) => dst.iter_mut().zip(&v[start..]).for_each(|(d, s)| *d = s.to_f32()),
    }
}

/// Per token: `acc = sum_j w_j * y_j` in f32, terms in ascending expert id
/// (then ascending j); then `out = prev + acc` when accumulating; rounded once.
pub fn combine(y: Floats, ids: &[u32], weights: &[f32], slots: &[u32], out: &mut HostVec, s: CombineShape) {
    let (h, k) = (s.hidden, s.top_k);
    if h == 0 || s.tokens == 0 {
        return;
    }
    // Per-task work rows (order, accumulator, widened expert row), reused across the task's tokens.
    let scratch = || (Vec::<usize>::with_capacity(k), vec![0.0f32; h], vec![0.0f32; h]);
    let token = |(order, acc, row): &mut (Vec<usize>, Vec<f32>, Vec<f32>), t: usize, prev: &mut [f32]| {
        order.clear();
        order.extend(0..k);
        order.sort_by_key(|&j| (ids[t * k + j], j));
        acc.fill(0.0);
        for &j in order.iter() {
            let f = t * k + j;
            load(y, slots[f] as usize * h, row);
            let w = weights[f];
            acc.iter_mut().zip(row.iter()).for_each(|(a, &v)| *a += w * v);
        }
        if s.accumulate {
            prev.iter_mut().zip(acc.iter()).for_each(|(p, &a)| *p += a);
        } else {
            prev.copy_from_slice(acc);
        }
    };
    let rows = s.tokens * h;
    match out {
        HostVec::F32(o) => o[..rows]
            .par_chunks_mut(h)
            .enumerate()
            .for_each_init(scratch, |sc, (t, r)| token(sc, t, r)),
        HostVec::BF16(o) => o[..rows].par_chunks_mut(h).enumerate().for_each_init(
            || (scratch(), vec![0.0f32; h]),
            |(sc, p), (t, r)| {
                p.iter_mut().zip(r.iter()).for_each(|(p, x)| *p = x.to_f32());
                token(sc, t, p);
                r.iter_mut().zip(p.iter()).for_each(|(d, &v)| *d = bf16::from_f32(v));
            },
        ),
        HostVec::F16(o) => o[..rows].par_chunks_mut(h).enumerate().for_each_init(
            || (scratch(), vec![0.0f32; h]),
            |(sc, p), (t, r)| {
                p.iter_mut().zip(r.iter()).for_each(|(p, x)| *p = x.to_f32());
                token(sc, t, p);
                r.iter_mut().zip(p.iter()).for_each(|(d, &v)| *d = f16::from_f32(v));
            },
        ),
        HostVec::U32(_) => unreachable!("dtype checked before"),
    }
}
