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
    let token = |t: usize, prev: &mut [f32]| {
        let mut order: Vec<usize> = (0..k).collect();
        order.sort_by_key(|&j| (ids[t * k + j], j));
        let mut acc = vec![0.0f32; h];
        let mut row = vec![0.0f32; h];
        for j in order {
            let f = t * k + j;
            load(y, slots[f] as usize * h, &mut row);
            let w = weights[f];
            acc.iter_mut().zip(&row).for_each(|(a, &v)| *a += w * v);
        }
        if s.accumulate {
            prev.iter_mut().zip(&acc).for_each(|(p, &a)| *p += a);
        } else {
            prev.copy_from_slice(&acc);
        }
    };
    match out {
        HostVec::F32(o) => o[..s.tokens * h]
            .par_chunks_mut(h)
            .enumerate()
            .for_each(|(t, r)| token(t, r)),
        HostVec::BF16(o) => o[..s.tokens * h].par_chunks_mut(h).enumerate().for_each(|(t, r)| {
            let mut p: Vec<f32> = r.iter().map(|x| x.to_f32()).collect();
            token(t, &mut p);
            r.iter_mut().zip(&p).for_each(|(d, &v)| *d = bf16::from_f32(v));
        }),
        HostVec::F16(o) => o[..s.tokens * h].par_chunks_mut(h).enumerate().for_each(|(t, r)| {
            let mut p: Vec<f32> = r.iter().map(|x| x.to_f32()).collect();
            token(t, &mut p);
            r.iter_mut().zip(&p).for_each(|(d, &v)| *d = f16::from_f32(v));
        }),
        HostVec::U32(_) => unreachable!("dtype checked before"),
    }
}
