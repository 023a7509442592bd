//! AMX (Intel's tile matrix unit, Sapphire Rapids and later) for bf16 tiles of many rows.
//!
//! One `tdpbf16ps` multiplies a 16 x 32 bf16 tile of inputs by a 32 x 16 one of weights into 16 x
//! 16 f32 sums: 16384 FLOPs an instruction, about 940 GFLOP/s a core on the 16-core Xeon of the
//! GPU machine against 110 for the AVX-512 kernels (`scripts/amx_probe.c`, RESULTS.md).
//!
//! [`packed`] runs a tile of bf16 input rows against bf16 weights packed `[k][32]`
//! ([`crate::pack::Packing`], not `kpairs`): for each 32 weight rows it rewrites their packed
//! block, a `k`-pair at a time, into the pair-interleaved layout the unit reads (two 16-row
//! weight tiles a 32-input step; 2 KiB a step, in L1 or L2), then runs 32 input rows at a time
//! (two input tiles, four accumulator tiles) over every step, and stores the sums. Input rows come
//! as bf16, padded with zeros to whole tiles: 16 rows, 32 inputs ([`rows_len`]).
//!
//! Summation order: each output is the unit's own (per step of two inputs, both products added
//! to the f32 sum; bf16 denormals as zero), which is none of the FMA chains of the AVX-512
//! kernels (the probe found 146 of 256 outputs equal to the odd-first chain). Which rows run it
//! depends only on their tile's height ([`crate::matmul`]), so results stay the same whatever the
//! thread count; a machine without AMX computes the same rows with the other kernels, whose bits
//! differ, within the dtype's tolerance.
//!
//! The tile instructions are written with `asm!`: Rust's AMX intrinsics are unstable. Each block
//! declares every tile register clobbered, but the tiles' contents carry from one block to the
//! next ([`Hw`]), which the `asm!` rules leave undefined. It holds because nothing between the
//! blocks of one call touches a tile register (the compiler allocates none outside AMX intrinsics,
//! which this crate does not use), and the OS saves them across context switches once the process
//! has asked for them ([`available`]). One `asm!` loop per block of sums would follow the rules; it
//! is not written, since no machine here has AMX to test it on. `Emu` computes the same steps in plain Rust, so that the data layout is
//! tested on every machine.

use half::bf16;
use std::sync::OnceLock;

/// Input rows a tile of the unit holds.
pub const TILE_ROWS: usize = 16;
/// Inputs (bf16) a tile row holds: 64 bytes.
pub const TILE_K: usize = 32;

/// Whether this CPU and OS run AMX-BF16: CPUID says AMX-TILE and AMX-BF16, the CPU has AVX-512
/// (the weight rewrite uses it) and Linux grants the process the tile data state
/// (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, asked once). `MOE_CPU_AMX=0` says no.
pub fn available() -> bool {
    std::env::var("MOE_CPU_AMX").as_deref() != Ok("0") && hardware_granted()
}

/// [`available`] without the environment: the conformance tests run the level wherever it can.
pub fn hardware_granted() -> bool {
    static GRANTED: OnceLock<bool> = OnceLock::new();
    *GRANTED.get_or_init(hardware)
}

fn hardware() -> bool {
    if !crate::avx512::has_avx512_bf16() {
        return false;
    }
    // CPUID leaf 7 exists on every x86-64 CPU with AVX-512 (checked above).
    let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
    let (amx_bf16, amx_tile) = ((leaf7.edx >> 22) & 1 == 1, (leaf7.edx >> 24) & 1 == 1);
    if !(amx_bf16 && amx_tile) {
        return false;
    }
    permission()
}

#[cfg(target_os = "linux")]
fn permission() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only asks the kernel to enable a state component for
    // this process; it reads and writes no memory of ours.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn permission() -> bool {
    false
}

/// Least rows of a tile for [`packed`]: `MOE_CPU_AMX_ROWS`, default 16 (one whole input tile;
/// below it the other kernels stream the weights at least as fast).
pub fn min_rows() -> usize {
    static ROWS: OnceLock<usize> = OnceLock::new();
    *ROWS.get_or_init(|| {
        std::env::var("MOE_CPU_AMX_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(16)
            .max(crate::matmul::STREAM_ROWS + 1)
    })
}

/// f32 slots that `rows` input rows of `k` bf16 inputs take in the layout of [`packed`]: rows
/// padded to [`TILE_ROWS`], inputs to [`TILE_K`], two bf16 a slot.
pub fn rows_len(rows: usize, k: usize) -> usize {
    rows.next_multiple_of(TILE_ROWS) * k.next_multiple_of(TILE_K) / 2
}

/// Copies rows `at(0) .. at(rows - 1)` of `x` (`[_, k]`) into `dst` ([`rows_len`] slots) as
/// [`packed`] reads them: row `r` at bf16 `r * kp`, `kp` = `k` rounded up to [`TILE_K`], zeros in
/// the padding.
pub fn copy_rows(x: &[bf16], at: impl Fn(usize) -> usize, rows: usize, k: usize, dst: &mut [f32]) {
    let kp = k.next_multiple_of(TILE_K);
    let dst: &mut [u16] = bytemuck_u16(dst);
    for (r, d) in dst.chunks_exact_mut(kp).enumerate() {
        if r < rows {
            let src = &x[at(r) * k..at(r) * k + k];
            for (d, s) in d.iter_mut().zip(src) {
                *d = s.to_bits();
            }
            d[k..].fill(0);
        } else {
            d.fill(0);
        }
    }
}

/// `f32` slots seen as pairs of `u16`.
fn bytemuck_u16(v: &mut [f32]) -> &mut [u16] {
    // SAFETY: u16 has no invalid bit patterns, f32's alignment covers u16's, and the new slice
    // covers exactly the same bytes, borrowed mutably for the same lifetime.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u16>(), v.len() * 2) }
}

/// The tile register operations [`packed`] uses: the unit's ([`Hw`]) or their plain-Rust model
/// (`Emu`). Tiles are 16 rows of 64 bytes: 0-3 sums, 4-5 inputs, 6-7 weights.
pub trait Tiles {
    /// Sets every tile to 16 rows of 64 bytes.
    ///
    /// # Safety
    /// For [`Hw`], the CPU must have AMX and the process the permission ([`available`]).
    unsafe fn config(&mut self);
    /// Tile `t` (0-3) to zeros.
    ///
    /// # Safety
    /// As [`Tiles::config`], after it.
    unsafe fn zero(&mut self, t: usize);
    /// Tile `t` from 16 rows of 64 bytes, row `r` at `src + r * stride`.
    ///
    /// # Safety
    /// As [`Tiles::config`]; every row must be readable.
    unsafe fn load(&mut self, t: usize, src: *const u8, stride: usize);
    /// Sum tile `c` += input tile `a` x weight tile `b`, bf16 pairs.
    ///
    /// # Safety
    /// As [`Tiles::config`].
    unsafe fn dp(&mut self, c: usize, a: usize, b: usize);
    /// Tile `t` to 16 rows of 64 bytes at `dst + r * stride`.
    ///
    /// # Safety
    /// As [`Tiles::config`]; every row must be writable.
    unsafe fn store(&mut self, t: usize, dst: *mut u8, stride: usize);
    /// Gives the tile state back (the next use configures again).
    ///
    /// # Safety
    /// As [`Tiles::config`].
    unsafe fn release(&mut self);
}

/// The AMX unit.
pub struct Hw;

/// `asm!` with every tile register declared clobbered (the module docs say what that covers);
/// `[...]` holds the other operands.
macro_rules! tile_asm {
    ($tmpl:literal, [], options($($opt:ident),*)) => {
        std::arch::asm!(
            $tmpl,
            out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
            out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
            options($($opt),*)
        )
    };
    ($tmpl:literal, [$($op:tt)*], options($($opt:ident),*)) => {
        std::arch::asm!(
            $tmpl,
            $($op)*,
            out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
            out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
            options($($opt),*)
        )
    };
}

macro_rules! tile_match {
    ($t:expr, $($n:pat => $asm:expr),+ $(,)?) => {
        match $t {
            $($n => $asm,)+
            t => unreachable!("tiles {:?}", t),
        }
    };
}

impl Tiles for Hw {
    unsafe fn config(&mut self) {
        // Palette 1; bytes 16.. hold each tile's bytes per row (u16), 48.. its rows (u8).
        let mut cfg = [0u8; 64];
        cfg[0] = 1;
        for t in 0..8 {
            cfg[16 + 2 * t] = 64;
            cfg[48 + t] = TILE_ROWS as u8;
        }
        tile_asm!("ldtilecfg [{0}]", [in(reg) cfg.as_ptr()], options(nostack, readonly));
    }

    unsafe fn zero(&mut self, t: usize) {
        tile_match!(t,
            0 => tile_asm!("tilezero tmm0", [], options(nostack, nomem)),
            1 => tile_asm!("tilezero tmm1", [], options(nostack, nomem)),
            2 => tile_asm!("tilezero tmm2", [], options(nostack, nomem)),
            3 => tile_asm!("tilezero tmm3", [], options(nostack, nomem)),
        )
    }

    unsafe fn load(&mut self, t: usize, src: *const u8, stride: usize) {
        tile_match!(t,
            4 => tile_asm!("tileloadd tmm4, [{0} + {1} * 1]", [in(reg) src, in(reg) stride], options(nostack, readonly)),
            5 => tile_asm!("tileloadd tmm5, [{0} + {1} * 1]", [in(reg) src, in(reg) stride], options(nostack, readonly)),
            6 => tile_asm!("tileloadd tmm6, [{0} + {1} * 1]", [in(reg) src, in(reg) stride], options(nostack, readonly)),
            7 => tile_asm!("tileloadd tmm7, [{0} + {1} * 1]", [in(reg) src, in(reg) stride], options(nostack, readonly)),
        )
    }

    unsafe fn dp(&mut self, c: usize, a: usize, b: usize) {
        tile_match!((c, a, b),
            (0, 4, 6) => tile_asm!("tdpbf16ps tmm0, tmm4, tmm6", [], options(nostack, nomem)),
            (1, 4, 7) => tile_asm!("tdpbf16ps tmm1, tmm4, tmm7", [], options(nostack, nomem)),
            (2, 5, 6) => tile_asm!("tdpbf16ps tmm2, tmm5, tmm6", [], options(nostack, nomem)),
            (3, 5, 7) => tile_asm!("tdpbf16ps tmm3, tmm5, tmm7", [], options(nostack, nomem)),
        )
    }

    unsafe fn store(&mut self, t: usize, dst: *mut u8, stride: usize) {
        tile_match!(t,
            0 => tile_asm!("tilestored [{0} + {1} * 1], tmm0", [in(reg) dst, in(reg) stride], options(nostack)),
            1 => tile_asm!("tilestored [{0} + {1} * 1], tmm1", [in(reg) dst, in(reg) stride], options(nostack)),
            2 => tile_asm!("tilestored [{0} + {1} * 1], tmm2", [in(reg) dst, in(reg) stride], options(nostack)),
            3 => tile_asm!("tilestored [{0} + {1} * 1], tmm3", [in(reg) dst, in(reg) stride], options(nostack)),
        )
    }

    unsafe fn release(&mut self) {
        tile_asm!("tilerelease", [], options(nostack, nomem));
    }
}

/// The tile operations in plain Rust (sums in the order of the unit's documented pseudo-code:
/// even input of a pair, then odd, each product added to the f32 sum), for tests on any CPU.
#[cfg(test)]
pub struct Emu {
    t: [[u8; 1024]; 8],
}

#[cfg(test)]
impl Default for Emu {
    fn default() -> Self {
        Emu { t: [[0; 1024]; 8] }
    }
}

#[cfg(test)]
impl Emu {
    fn f32_at(&self, t: usize, i: usize) -> f32 {
        f32::from_le_bytes(self.t[t][4 * i..4 * i + 4].try_into().unwrap())
    }
    fn bf16_at(&self, t: usize, i: usize) -> f32 {
        bf16::from_bits(u16::from_le_bytes([self.t[t][2 * i], self.t[t][2 * i + 1]])).to_f32()
    }
}

#[cfg(test)]
impl Tiles for Emu {
    unsafe fn config(&mut self) {}

    unsafe fn zero(&mut self, t: usize) {
        self.t[t] = [0; 1024];
    }

    unsafe fn load(&mut self, t: usize, src: *const u8, stride: usize) {
        for r in 0..TILE_ROWS {
            // SAFETY: the caller makes every row readable.
            let row = unsafe { std::slice::from_raw_parts(src.add(r * stride), 64) };
            self.t[t][r * 64..(r + 1) * 64].copy_from_slice(row);
        }
    }

    unsafe fn dp(&mut self, c: usize, a: usize, b: usize) {
        for m in 0..TILE_ROWS {
            for n in 0..16 {
                let mut s = self.f32_at(c, m * 16 + n);
                for p in 0..16 {
                    s += self.bf16_at(a, m * 32 + 2 * p) * self.bf16_at(b, p * 32 + 2 * n);
                    s += self.bf16_at(a, m * 32 + 2 * p + 1) * self.bf16_at(b, p * 32 + 2 * n + 1);
                }
                self.t[c][4 * (m * 16 + n)..4 * (m * 16 + n) + 4].copy_from_slice(&s.to_le_bytes());
            }
        }
    }

    unsafe fn store(&mut self, t: usize, dst: *mut u8, stride: usize) {
        for r in 0..TILE_ROWS {
            // SAFETY: the caller makes every row writable.
            let row = unsafe { std::slice::from_raw_parts_mut(dst.add(r * stride), 64) };
            row.copy_from_slice(&self.t[t][r * 64..(r + 1) * 64]);
        }
    }

    unsafe fn release(&mut self) {}
}

/// Scratch f32 slots [`packed`] needs for `rows` rows of `k` inputs: the weight steps of one
/// block (`kp / 32` steps of two 1 KiB tiles), the sums of the tile's rows (padded to 16) by 32
/// columns, and 64 bytes to align both.
fn scratch_len(rows: usize, k: usize) -> usize {
    k.next_multiple_of(TILE_K) * 16 + rows.next_multiple_of(TILE_ROWS) * 32 + 32
}

/// `dst[r * cols + c]` = input row `r` · weight row `first + c` of `w`, one expert's bf16 weights
/// packed `[k][32]` with rows paired in lanes ([`crate::pack::Packing::lane`]), for `rows` input
/// rows laid out by [`copy_rows`] in `x`. `scratch` grows as needed.
///
/// # Safety
/// For [`Hw`], the CPU must have AMX and AVX-512 and the process the permission ([`available`]).
#[allow(clippy::too_many_arguments)]
pub unsafe fn packed<T: Tiles>(
    tiles: &mut T,
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[bf16],
    first: usize,
    cols: usize,
    scratch: &mut Vec<f32>,
    dst: &mut [f32],
) {
    let (kp, rp) = (k.next_multiple_of(TILE_K), rows.next_multiple_of(TILE_ROWS));
    assert!(x.len() >= rows_len(rows, k), "input rows shorter than the tile");
    assert!(dst.len() >= rows * cols, "output shorter than the tile");
    let blocks = w.len() / (32 * k).max(1);
    assert!(
        k == 0 || (first + cols).div_ceil(32) <= blocks,
        "weight rows past the expert's blocks"
    );
    if scratch.len() < scratch_len(rows, k) {
        scratch.resize(scratch_len(rows, k), 0.0);
    }
    let skip = scratch.as_ptr().align_offset(64).min(16);
    let (steps, sums) = scratch[skip..].split_at_mut(kp * 16);
    let (steps, sums) = (&mut steps[..kp * 16], &mut sums[..rp * 32]);
    let xp = x.as_ptr().cast::<u8>();
    tiles.config();
    for c0 in (0..cols).step_by(32) {
        let n = 32.min(cols - c0);
        weight_steps(w, k, first + c0, n, steps);
        let wp = steps.as_ptr().cast::<u8>();
        for g in (0..rp).step_by(32) {
            let two = rp - g >= 32;
            tiles.zero(0);
            tiles.zero(1);
            if two {
                tiles.zero(2);
                tiles.zero(3);
            }
            for s in 0..kp / TILE_K {
                // Input tile: rows g.., inputs s * 32..; each row kp bf16 apart.
                tiles.load(4, xp.add((g * kp + s * TILE_K) * 2), kp * 2);
                tiles.load(6, wp.add(s * 2048), 64);
                tiles.load(7, wp.add(s * 2048 + 1024), 64);
                tiles.dp(0, 4, 6);
                tiles.dp(1, 4, 7);
                if two {
                    tiles.load(5, xp.add(((g + 16) * kp + s * TILE_K) * 2), kp * 2);
                    tiles.dp(2, 5, 6);
                    tiles.dp(3, 5, 7);
                }
            }
            let sp = sums.as_mut_ptr().cast::<u8>();
            tiles.store(0, sp.add(g * 128), 128);
            tiles.store(1, sp.add(g * 128 + 64), 128);
            if two {
                tiles.store(2, sp.add((g + 16) * 128), 128);
                tiles.store(3, sp.add((g + 16) * 128 + 64), 128);
            }
        }
        for r in 0..rows {
            dst[r * cols + c0..r * cols + c0 + n].copy_from_slice(&sums[r * 32..r * 32 + n]);
        }
    }
    tiles.release();
}

/// Weight rows `row0 .. row0 + n` (n <= 32) of `w` rewritten as the unit's weight tiles, into
/// `steps` (`kp * 16` slots): step `s` (inputs `32s ..`) is two tiles of 1 KiB, rows `row0 ..
/// row0 + 16` then the next 16; tile row `p` holds, per weight row, its inputs `32s + 2p` (low
/// half) and `+ 1`. Rows past `n`, and inputs past `k`, are zeros or rows that are not used.
fn weight_steps(w: &[bf16], k: usize, row0: usize, n: usize, steps: &mut [f32]) {
    let steps: &mut [u32] = {
        // SAFETY: u32 and f32 have the same size and alignment, and every bit pattern is valid.
        unsafe { std::slice::from_raw_parts_mut(steps.as_mut_ptr().cast::<u32>(), steps.len()) }
    };
    let kp = k.next_multiple_of(TILE_K);
    if row0.is_multiple_of(32) {
        let block = &w[row0 / 32 * 32 * k..(row0 / 32 + 1) * 32 * k];
        if crate::avx512::has_avx512() {
            // SAFETY: the CPU has AVX-512 (checked just above).
            unsafe { weight_steps_avx512(block, k, kp, steps) };
        } else {
            weight_steps_portable(w, k, row0, 32, steps);
        }
        return;
    }
    weight_steps_portable(w, k, row0, n, steps);
}

/// [`weight_steps`] one value at a time, for any `row0` (the up rows of a gate/up matmul whose
/// intermediate size is not a multiple of 32 start inside a block).
fn weight_steps_portable(w: &[bf16], k: usize, row0: usize, n: usize, steps: &mut [u32]) {
    let kp = k.next_multiple_of(TILE_K);
    let at = |j: usize, i: usize| -> u32 {
        if j >= n || i >= k {
            return 0;
        }
        let r = row0 + j;
        let lane = crate::pack::Packing::lane(true, r % 32);
        u32::from(w[r / 32 * 32 * k + i * 32 + lane].to_bits())
    };
    for s in 0..kp / TILE_K {
        for half in 0..2 {
            for p in 0..16 {
                for j in 0..16 {
                    let (jj, i) = (half * 16 + j, s * TILE_K + 2 * p);
                    steps[s * 512 + half * 256 + p * 16 + j] = at(jj, i) | at(jj, i + 1) << 16;
                }
            }
        }
    }
}

/// [`weight_steps`] for a whole packed block (`row0` a multiple of 32): block row `i` holds 16
/// u32, the `d`-th with weight row `d` in its low half and row `d + 16` in its high half, so two
/// block rows give a tile row of each weight tile with two masks and two shifts.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[target_feature(enable = "avx512f")]
unsafe fn weight_steps_avx512(block: &[bf16], k: usize, kp: usize, steps: &mut [u32]) {
    use std::arch::x86_64::*;
    assert!(block.len() >= 32 * k && steps.len() >= kp * 16);
    let lo = _mm512_set1_epi32(0xffff);
    let hi = _mm512_set1_epi32(0xffff_0000u32 as i32);
    let src = block.as_ptr();
    for i in (0..kp).step_by(2) {
        // Block rows past k are zeros; rows below k lie within `block` (asserted above).
        let a = if i < k {
            _mm512_loadu_si512(src.add(i * 32).cast())
        } else {
            _mm512_setzero_si512()
        };
        let b = if i + 1 < k {
            _mm512_loadu_si512(src.add((i + 1) * 32).cast())
        } else {
            _mm512_setzero_si512()
        };
        let (s, p) = (i / TILE_K, (i % TILE_K) / 2);
        let t0 = _mm512_or_si512(_mm512_and_si512(a, lo), _mm512_slli_epi32::<16>(b));
        let t1 = _mm512_or_si512(_mm512_srli_epi32::<16>(a), _mm512_and_si512(b, hi));
        let d = steps.as_mut_ptr().add(s * 512 + p * 16);
        _mm512_storeu_si512(d.cast(), t0);
        _mm512_storeu_si512(d.add(256).cast(), t1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::Packing;

    /// One expert of `rows` bf16 weight rows of `k` inputs, packed `[k][32]`.
    fn pack(w: &[bf16], rows: usize, k: usize) -> Vec<bf16> {
        let p = Packing {
            experts: 1,
            rows,
            k,
            kpairs: false,
        };
        match p.pack(moe_hal_core::HostSlice::BF16(w)).unwrap() {
            moe_hal_core::HostVec::BF16(v) => v,
            _ => unreachable!("bf16 packs to bf16"),
        }
    }

    /// [`packed`] through the model of the unit, against f64 sums of the same bf16 values, for
    /// row counts around the tile edges, `k` not a multiple of 32, and weight rows starting inside
    /// a block; the AVX-512 and portable weight rewrites give the same steps.
    #[test]
    fn packed_on_the_model_matches_f64() {
        let mut seed = 7u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        for (rows, k, wrows, first, cols) in [
            (16, 32, 32, 0, 32),
            (1, 40, 64, 0, 48),
            (17, 64, 96, 0, 96),
            (33, 70, 72, 24, 40),
            (48, 2048 / 16, 160, 32, 128),
        ] {
            let x: Vec<bf16> = (0..rows * k).map(|_| bf16::from_f32(next())).collect();
            let wl: Vec<bf16> = (0..wrows * k).map(|_| bf16::from_f32(next())).collect();
            let packed_w = pack(&wl, wrows, k);
            let mut xr = vec![f32::NAN; rows_len(rows, k)];
            copy_rows(&x, |r| r, rows, k, &mut xr);
            let mut dst = vec![f32::NAN; rows * cols];
            let mut scratch = Vec::new();
            // SAFETY: Emu runs on any CPU.
            unsafe {
                packed(
                    &mut Emu::default(),
                    &xr,
                    rows,
                    k,
                    &packed_w,
                    first,
                    cols,
                    &mut scratch,
                    &mut dst,
                )
            };
            for r in 0..rows {
                for c in 0..cols {
                    let want: f64 = (0..k)
                        .map(|i| x[r * k + i].to_f64() * wl[(first + c) * k + i].to_f64())
                        .sum();
                    let got = dst[r * cols + c] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "rows {rows} k {k} first {first}: ({r}, {c}) {got} against {want}"
                    );
                }
            }
            if first.is_multiple_of(32) && crate::avx512::has_avx512() {
                let kp = k.next_multiple_of(TILE_K);
                let (mut a, mut b) = (vec![0u32; kp * 16], vec![0u32; kp * 16]);
                let block = &packed_w[first / 32 * 32 * k..(first / 32 + 1) * 32 * k];
                // SAFETY: the CPU has AVX-512 (checked above).
                unsafe { weight_steps_avx512(block, k, kp, &mut a) };
                weight_steps_portable(&packed_w, k, first, 32, &mut b);
                assert_eq!(a, b, "k {k} first {first}");
            }
        }
    }

    /// On a CPU with AMX, the unit gives what its model gives within f32 rounding (the model's
    /// order is the documented one; the unit's own rounding differs, RESULTS.md), and zeros where
    /// the inputs are zero.
    #[test]
    fn packed_on_the_unit_matches_the_model() {
        if !available() {
            eprintln!("SKIPPED: no AMX on this CPU (or no permission for it)");
            return;
        }
        let (rows, k, wrows) = (40, 96, 64);
        let x: Vec<bf16> = (0..rows * k)
            .map(|i| bf16::from_f32(((i * 37 % 101) as f32 - 50.0) / 64.0))
            .collect();
        let wl: Vec<bf16> = (0..wrows * k)
            .map(|i| bf16::from_f32(((i * 53 % 97) as f32 - 48.0) / 64.0))
            .collect();
        let packed_w = pack(&wl, wrows, k);
        let mut xr = vec![0.0; rows_len(rows, k)];
        copy_rows(&x, |r| r, rows, k, &mut xr);
        let (mut hw, mut emu) = (vec![f32::NAN; rows * wrows], vec![f32::NAN; rows * wrows]);
        let mut scratch = Vec::new();
        // SAFETY: `available` holds (checked above); Emu runs anywhere.
        unsafe {
            packed(&mut Hw, &xr, rows, k, &packed_w, 0, wrows, &mut scratch, &mut hw);
            packed(
                &mut Emu::default(),
                &xr,
                rows,
                k,
                &packed_w,
                0,
                wrows,
                &mut scratch,
                &mut emu,
            );
        }
        for (i, (h, e)) in hw.iter().zip(&emu).enumerate() {
            assert!((h - e).abs() <= 1e-5 * (1.0 + e.abs()), "{i}: unit {h}, model {e}");
        }
    }
}
