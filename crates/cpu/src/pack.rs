//! Expert weights packed once at upload ([`crate::CpuBackend`]'s `upload_weights`), for the
//! packed kernels of the grouped matmul. The backend packs bf16 and f16 weights with AVX-512, and
//! f32 as well with AVX2 (see `upload_weights` for the measurements); the layout and every kernel
//! take all three, and the tests run each.
//!
//! Each expert's weight rows (the output columns) are cut into blocks of [`PACK_ROWS`], the last
//! one zero-padded, and each block is stored `[k][PACK_ROWS]`: for every input index, the block's
//! 32 weights side by side. A kernel then reads one contiguous stream per block, holds 32 output
//! columns of an input row in two vector registers, and broadcasts the input rows, so that every
//! input row count is a whole number of register blocks (the checkpoint layout needs lane blocks
//! of 16 input rows, where a partial one costs a full one).
//!
//! bf16 pairs row `j` with row `16 + j` in one 32-bit lane (`j` in the low half), so that a shift
//! and a mask widen both exactly; f32 and f16 keep the rows in order. The storage dtype does not
//! change: packing costs the padding of the last block only.
//!
//! bf16 has a second layout, [`Packing::kpairs`], for `vdpbf16ps` ([`crate::avx512::packed_dp`]):
//! each block is `[k / 2][32][2]`, a 32-bit lane holding inputs `2p` (low half) and `2p + 1` of
//! one weight row, `k` padded to even with a zero. The backend picks it where `vdpbf16ps` issues
//! as fast as an f32 FMA (`crate::avx512::dpbf16_fast`), so that each instruction does twice the
//! products.
//!
//! Every packed output is one multiply-add chain over `k` in ascending order (fused with AVX-512
//! and AVX2, a multiply then an add at the portable level), whatever the blocking; so results do
//! not depend on the tile grid or the thread count. With [`Packing::kpairs`] the chain takes each
//! pair odd input first (`vdpbf16ps`'s order: `2p + 1`, then `2p`), with bf16 denormals as zero.

use crate::matmul::{bf16_to_f32, f16_to_f32, Floats};
use half::{bf16, f16};
use moe_hal_core::{HostSlice, HostVec, Result};

/// Weight rows per packed block: two `zmm` of f32.
pub const PACK_ROWS: usize = 32;

/// Input rows per lane block of the packed kernel's interleaved input, and most rows of one
/// register block: `2 * 14` accumulators, the two widened weight vectors (or `vdpbf16ps`'s two
/// weight vectors) and the input's broadcast fit the 32 `zmm` (`objdump`: no stack access in the
/// loops of 13 and 14 rows). Lane blocks of 16 ran as 8 + 8 rows (one thread, 8 experts of
/// qwen3-30b-a3b, bf16, GFLOP/s at 12 rows 131-134, at 16 rows 91-128, at 128 rows 118-122). 14
/// instead of 12 runs 13 and 14 rows (about 15% of the experts at 256 tokens) in one pass instead
/// of two of 6-7, and 25-28 in two instead of three. On the Intel Xeon (Ice Lake) VM, bf16 widened,
/// 128 experts from DRAM, paired against 12 (`PAIRED_BLOCK=4 scripts/paired.sh`, medians of the
/// time ratios): gate/up at 13 rows 0.849, 14 rows 0.858, 28 rows 0.941, as routed at 256 tokens
/// 0.970; `down` at 13 rows 0.874, at 256 tokens 1.016 and 0.981; 16 rows (the same passes) 1.007;
/// the layer at 256 tokens 0.982, 16 tokens 0.999 (1.043 in a disturbed run), one token 0.998.
pub const PACKED_LANES: usize = 14;

/// Rows per lane block of a packed tile of `rows` rows: as few lane blocks of at most
/// [`PACKED_LANES`] as hold them, filled evenly (16 rows as 8 + 8, not 12 + 4). A register block of
/// `r` rows by one weight block has `2r` accumulator chains, and on AMD Zen 5 `vdpbf16ps` needs
/// about 12 in flight to issue every cycle: 4 rows left most of a pass waiting on latency. Two
/// threads, 2 experts of qwen3-30b-a3b gate/up in L3, GFLOP/s best of 400 calls, 12 + rest
/// against even, two runs: bf16 at 13 rows 641-643 against 757-765, 16 rows 721-748 against
/// 787-841, 20 rows 780-806 against 810-824; f32 at 13 rows 393-410 against 438-440, 16 and 20
/// the same within noise. From DRAM (128 experts, 16 rows) bf16 gained 4-5% and f32 none (it
/// waits on memory there). On the Intel Xeon of the earlier sessions, whose bf16 kernel widened
/// to FMAs, even blocks were slower or equal from DRAM (RESULTS.md).
pub fn packed_lanes(rows: usize) -> usize {
    rows.div_ceil(rows.div_ceil(PACKED_LANES).max(1)).max(1)
}

/// The packed layout of `experts` experts of `rows` weight rows of `k` inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packing {
    pub experts: usize,
    pub rows: usize,
    pub k: usize,
    /// bf16 blocks stored `[k / 2][32][2]` for [`crate::avx512::packed_dp`] instead of `[k][32]`.
    pub kpairs: bool,
}

impl Packing {
    /// Blocks of [`PACK_ROWS`] rows per expert.
    pub fn blocks(&self) -> usize {
        self.rows.div_ceil(PACK_ROWS)
    }

    /// Inputs per block row as stored: `k`, rounded up to even for [`Packing::kpairs`].
    pub fn k_stored(&self) -> usize {
        if self.kpairs {
            self.k.next_multiple_of(2)
        } else {
            self.k
        }
    }

    /// Elements of one expert, packed.
    pub fn expert_len(&self) -> usize {
        self.blocks() * PACK_ROWS * self.k_stored()
    }

    /// Where weight row `j` of a block (0 to 31), input `i`, lies in the block; `pairs` is the
    /// bf16 row pairing of [`Packing::lane`].
    #[inline(always)]
    fn at(&self, pairs: bool, j: usize, i: usize) -> usize {
        if self.kpairs {
            (i / 2) * 2 * PACK_ROWS + j * 2 + i % 2
        } else {
            i * PACK_ROWS + Self::lane(pairs, j)
        }
    }

    /// Elements of the weights in the checkpoint layout.
    pub fn logical_len(&self) -> usize {
        self.experts * self.rows * self.k
    }

    /// The position of row `j` of a block within its 32 values of one input index.
    #[inline(always)]
    pub fn lane(pairs: bool, j: usize) -> usize {
        if pairs {
            (j % 16) * 2 + j / 16
        } else {
            j
        }
    }

    /// `data` (checkpoint layout, [`Packing::logical_len`] elements) packed, or an error where
    /// the memory for it cannot be had.
    pub fn pack(&self, data: HostSlice<'_>) -> Result<HostVec> {
        Ok(match data {
            HostSlice::F32(v) => HostVec::F32(self.pack_with(v, false)?),
            HostSlice::BF16(v) => HostVec::BF16(self.pack_with(v, true)?),
            HostSlice::F16(v) => HostVec::F16(self.pack_with(v, false)?),
            HostSlice::U32(v) => HostVec::U32(crate::mem::try_copied(v)?),
        })
    }

    /// Packed `data` back in the checkpoint layout.
    pub fn unpack(&self, data: &HostVec) -> HostVec {
        match data {
            HostVec::F32(v) => HostVec::F32(self.unpack_with(v, false)),
            HostVec::BF16(v) => HostVec::BF16(self.unpack_with(v, true)),
            HostVec::F16(v) => HostVec::F16(self.unpack_with(v, false)),
            HostVec::U32(v) => HostVec::U32(v.clone()),
        }
    }

    fn pack_with<T: Copy + Default + Send + Sync>(&self, src: &[T], pairs: bool) -> Result<Vec<T>> {
        let (k, blocks) = (self.k, self.blocks());
        let mut dst = crate::mem::try_filled(self.experts * self.expert_len(), T::default())?;
        if k == 0 {
            return Ok(dst);
        }
        crate::pool::for_chunks_mut(&mut dst, PACK_ROWS * self.k_stored(), |eb, blk| {
            let (e, b) = (eb / blocks, eb % blocks);
            for j in 0..PACK_ROWS.min(self.rows - b * PACK_ROWS) {
                let row = &src[(e * self.rows + b * PACK_ROWS + j) * k..][..k];
                for (i, &v) in row.iter().enumerate() {
                    blk[self.at(pairs, j, i)] = v;
                }
            }
        });
        Ok(dst)
    }

    fn unpack_with<T: Copy + Default + Send + Sync>(&self, src: &[T], pairs: bool) -> Vec<T> {
        let (k, blocks) = (self.k, self.blocks());
        let mut dst = vec![T::default(); self.logical_len()];
        if k == 0 {
            return dst;
        }
        crate::pool::for_chunks_mut(&mut dst, k, |er, row| {
            let (e, r) = (er / self.rows, er % self.rows);
            let blk = &src[(e * blocks + r / PACK_ROWS) * PACK_ROWS * self.k_stored()..];
            for (i, d) in row.iter_mut().enumerate() {
                *d = blk[self.at(pairs, r % PACK_ROWS, i)];
            }
        });
        dst
    }
}

/// Copies a packed kernel's results for the weight rows `first .. first + cols` that fall in the
/// blocks from `b` up to `end` (exclusive, a weight row): `io` holds `stride` f32 per input row,
/// the first one for weight row `b * PACK_ROWS`; `out` holds `cols` per input row.
#[allow(clippy::too_many_arguments)]
pub(crate) fn copy_block_cols(
    io: &[f32],
    stride: usize,
    b: usize,
    end: usize,
    rows: usize,
    first: usize,
    cols: usize,
    out: &mut [f32],
) {
    let (lo, hi) = (first.max(b * PACK_ROWS), (first + cols).min(end));
    let at = |row: usize, c: usize| row * stride + c - b * PACK_ROWS;
    for row in 0..rows {
        out[row * cols + lo - first..row * cols + hi - first].copy_from_slice(&io[at(row, lo)..at(row, hi)]);
    }
}

/// `out[r * cols + c] = x[r] · weight row (first + c)` for `rows` input rows `x` (f32, `[rows][k]`)
/// against one expert's packed weights `w` ([`Packing::expert_len`] elements): the portable
/// level's kernel, one multiply then one add per step, each output summed over `k` in ascending
/// order. It also runs [`Packing::kpairs`] weights where `vdpbf16ps` is not used (a backend
/// without AVX512-BF16 given weights packed by one with it), in the same order.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn product_portable(
    x: &[f32],
    rows: usize,
    p: &Packing,
    w: Floats,
    first: usize,
    cols: usize,
    out: &mut [f32],
) {
    let k = p.k;
    match w {
        Floats::BF16(v) if p.kpairs => product_kpairs(x, rows, p, v, first, cols, out),
        Floats::F32(v) => product_with(x, rows, k, v, false, first, cols, out, |v| v),
        Floats::BF16(v) => product_with(x, rows, k, v, true, first, cols, out, |v: bf16| bf16_to_f32(v)),
        Floats::F16(v) => product_with(x, rows, k, v, false, first, cols, out, |v: f16| f16_to_f32(v)),
    }
}

/// [`product_portable`] for [`Packing::kpairs`] weights.
#[allow(clippy::too_many_arguments)]
fn product_kpairs(x: &[f32], rows: usize, p: &Packing, w: &[bf16], first: usize, cols: usize, out: &mut [f32]) {
    let (k, ks) = (p.k, p.k_stored());
    for c in first..first + cols {
        let blk = &w[c / PACK_ROWS * PACK_ROWS * ks..][..PACK_ROWS * ks];
        for r in 0..rows {
            let mut acc = 0.0f32;
            for (i, &xv) in x[r * k..(r + 1) * k].iter().enumerate() {
                acc += xv * bf16_to_f32(blk[p.at(true, c % PACK_ROWS, i)]);
            }
            out[r * cols + c - first] = acc;
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn product_with<T: Copy>(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[T],
    pairs: bool,
    first: usize,
    cols: usize,
    out: &mut [f32],
    wide: impl Fn(T) -> f32,
) {
    let end = first + cols;
    for b in first / PACK_ROWS..end.div_ceil(PACK_ROWS) {
        let blk = &w[b * PACK_ROWS * k..(b + 1) * PACK_ROWS * k];
        let (lo, hi) = (first.max(b * PACK_ROWS), end.min((b + 1) * PACK_ROWS));
        for r in 0..rows {
            let mut acc = [0.0f32; PACK_ROWS];
            for (&xv, ws) in x[r * k..(r + 1) * k].iter().zip(blk.chunks_exact(PACK_ROWS)) {
                for (a, &wv) in acc.iter_mut().zip(ws) {
                    *a += xv * wide(wv);
                }
            }
            for c in lo..hi {
                out[r * cols + c - first] = acc[Packing::lane(pairs, c - b * PACK_ROWS)];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packing then unpacking gives the weights back for every dtype, with partial last blocks.
    #[test]
    fn unpack_inverts_pack() {
        for (experts, rows, k) in [(1, 1, 1), (2, 33, 5), (3, 64, 7), (1, 70, 16)] {
            for kpairs in [false, true] {
                let p = Packing {
                    experts,
                    rows,
                    k,
                    kpairs,
                };
                let f: Vec<f32> = (0..p.logical_len()).map(|i| i as f32 * 0.5 - 3.0).collect();
                let b: Vec<bf16> = f.iter().map(|&v| bf16::from_f32(v)).collect();
                let h: Vec<f16> = f.iter().map(|&v| f16::from_f32(v)).collect();
                for data in [HostSlice::F32(&f), HostSlice::BF16(&b), HostSlice::F16(&h)] {
                    let packed = p.pack(data).unwrap();
                    assert_eq!(packed.len(), experts * p.expert_len());
                    assert_eq!(
                        p.unpack(&packed),
                        data.to_vec(),
                        "{experts} x {rows} x {k} {:?} kpairs {kpairs}",
                        data.dtype()
                    );
                }
            }
        }
    }

    /// bf16 pairs row j with row 16 + j in one 32-bit lane, low half first.
    #[test]
    fn bf16_pairs_rows_sixteen_apart() {
        let p = Packing {
            experts: 1,
            rows: 32,
            k: 1,
            kpairs: false,
        };
        let v: Vec<bf16> = (0..32).map(|i| bf16::from_f32(i as f32)).collect();
        let HostVec::BF16(packed) = p.pack(HostSlice::BF16(&v)).unwrap() else {
            unreachable!()
        };
        assert_eq!(packed[0].to_f32(), 0.0);
        assert_eq!(packed[1].to_f32(), 16.0);
        assert_eq!(packed[2].to_f32(), 1.0);
        assert_eq!(packed[31].to_f32(), 31.0);
    }

    /// kpairs holds inputs 2p and 2p + 1 of one row in one 32-bit lane, `k` padded to even.
    #[test]
    fn kpairs_pairs_consecutive_inputs() {
        let p = Packing {
            experts: 1,
            rows: 33,
            k: 3,
            kpairs: true,
        };
        let v: Vec<bf16> = (0..33 * 3).map(|i| bf16::from_f32(i as f32)).collect();
        let HostVec::BF16(packed) = p.pack(HostSlice::BF16(&v)).unwrap() else {
            unreachable!()
        };
        assert_eq!(packed.len(), 2 * 32 * 4);
        // Row 0: inputs 0, 1, then row 1: inputs 0, 1 (value 3, 4).
        assert_eq!([0, 1, 2, 3].map(|i| packed[i].to_f32()), [0.0, 1.0, 3.0, 4.0]);
        // Second pair of row 0: input 2, then the zero padding.
        assert_eq!([64, 65].map(|i| packed[i].to_f32()), [2.0, 0.0]);
        // Row 32 starts the second block.
        assert_eq!(packed[128].to_f32(), 96.0);
    }
}
