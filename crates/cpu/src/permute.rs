//! Stable dispatch by counting sort.

use crate::CpuBuffer;
use moe_hal_core::{HostVec, MoeError, PermuteShape, Permuted, Result};
use rayon::prelude::*;

fn u32s(b: &mut CpuBuffer) -> &mut [u32] {
    match b {
        CpuBuffer(HostVec::U32(v), _) => v,
        _ => unreachable!("dtype checked before"),
    }
}

fn gather<T: Copy + Send + Sync>(src: &[T], dst: &mut [T], h: usize, k: usize, source_of: &[u32]) {
    if h == 0 {
        return;
    }
    dst.par_chunks_mut(h).zip(source_of.par_iter()).for_each(|(row, &f)| {
        let t = f as usize / k;
        row.copy_from_slice(&src[t * h..(t + 1) * h]);
    });
}

pub fn permute(hidden: &CpuBuffer, ids: &[u32], s: PermuteShape, out: &mut Permuted<CpuBuffer>) -> Result<()> {
    let n = s.tokens * s.top_k;
    let ids = &ids[..n];
    if let Some((i, &e)) = ids.iter().enumerate().find(|(_, &e)| e as usize >= s.experts) {
        return Err(MoeError::shape(
            format!("ids[{i}]"),
            e,
            format!("an expert id below {}", s.experts),
        ));
    }
    let counts = &mut u32s(&mut out.counts)[..s.experts];
    counts.fill(0);
    for &e in ids {
        counts[e as usize] += 1;
    }
    let offsets = &mut u32s(&mut out.offsets)[..s.experts + 1];
    offsets[0] = 0;
    for e in 0..s.experts {
        offsets[e + 1] = offsets[e] + counts[e];
    }
    // Visiting flat indices in order makes the sort stable: token order within each expert.
    let mut cursor = offsets[..s.experts].to_vec();
    let slot_of = &mut u32s(&mut out.slot_of)[..n];
    let source_of = &mut u32s(&mut out.source_of)[..n];
    for (f, &e) in ids.iter().enumerate() {
        let slot = cursor[e as usize];
        cursor[e as usize] += 1;
        slot_of[f] = slot;
        source_of[slot as usize] = f as u32;
    }
    let source_of = &*source_of;
    let h = s.hidden;
    match (&hidden.0, &mut out.rows.0) {
        (HostVec::F32(a), HostVec::F32(b)) => gather(a, &mut b[..n * h], h, s.top_k, source_of),
        (HostVec::BF16(a), HostVec::BF16(b)) => gather(a, &mut b[..n * h], h, s.top_k, source_of),
        (HostVec::F16(a), HostVec::F16(b)) => gather(a, &mut b[..n * h], h, s.top_k, source_of),
        _ => unreachable!("dtypes checked before"),
    }
    Ok(())
}
