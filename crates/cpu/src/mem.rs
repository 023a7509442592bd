//! Large buffers on transparent huge pages (Linux).
//!
//! The layer streams its experts' weights from memory: over a gigabyte per call at a few hundred
//! tokens. On 4 KiB pages that is a TLB entry, and often a page walk, every 4 KiB (64 input
//! indices of a packed bf16 block). Buffers of at least [`HUGE_MIN_BYTES`]
//! are advised `MADV_HUGEPAGE` before their first write, so that Linux backs them with 2 MiB pages
//! where the system allows it (`/sys/kernel/mm/transparent_hugepage/enabled` at `madvise`, the
//! common default, or `always`; `never` keeps 4 KiB pages, and the advice then does nothing).
//!
//! Measured with the system setting alternated under one binary (`never` against `madvise`), bf16
//! packed weights in DRAM, qwen3-30b-a3b experts with about 16 rows each (ragged as routing gives
//! them), GFLOP/s gate/up / down, medians:
//! - one thread, 64 experts, 8 alternations: 106 / 100 on 4 KiB pages, 110 / 111 on 2 MiB pages;
//! - two threads, 128 experts, 6 alternations: 198 / 201 against 211 / 208;
//! - one row per expert (decode), two threads, gate/up: 30.4-34.4 against 29.5-32.2 ms.
//!
//! f32 weights as stored (8 KiB rows read as separate streams) showed no difference beyond noise.

/// Transparent huge page size on x86-64 and most aarch64 kernels.
const HUGE: usize = 2 << 20;
/// Smallest buffer advised: two huge pages, so that at least one aligned huge page lies inside.
const HUGE_MIN_BYTES: usize = 2 * HUGE;

/// `len` copies of `value`.
pub(crate) fn filled<T: Copy>(len: usize, value: T) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    advise(&v);
    v.resize(len, value);
    v
}

/// A copy of `src`.
pub(crate) fn copied<T: Copy>(src: &[T]) -> Vec<T> {
    let mut v = Vec::with_capacity(src.len());
    advise(&v);
    v.extend_from_slice(src);
    v
}

/// Advises huge pages for the whole 2 MiB pages inside `v`'s capacity (not yet written).
#[cfg(target_os = "linux")]
fn advise<T>(v: &Vec<T>) {
    let bytes = v.capacity() * std::mem::size_of::<T>();
    if bytes < HUGE_MIN_BYTES {
        return;
    }
    let start = v.as_ptr() as usize;
    let (lo, hi) = (start.next_multiple_of(HUGE), (start + bytes) / HUGE * HUGE);
    if hi > lo {
        // SAFETY: [lo, hi) lies inside the allocation `v` owns. MADV_HUGEPAGE is advice about how
        // to back those pages: it changes no contents and no mapping, and where transparent huge
        // pages are off it fails without effect (its result is ignored on purpose).
        unsafe { libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE) };
    }
}

#[cfg(not(target_os = "linux"))]
fn advise<T>(_: &Vec<T>) {}

/// Copies `src` into `dst` (same length) with non-temporal stores where the CPU has AVX-512:
/// the lines go to memory without being read first and without evicting the caches. For copies
/// whose destination is far larger than the caches (a permute of thousands of tokens), that
/// saves the read of every destination line and leaves the caches to the data still needed. The
/// unaligned head and the tail take ordinary stores. Ends with a store fence, so that the copy is
/// ordered before whatever this thread writes or publishes next (as a plain copy is).
pub(crate) fn copy_streaming<T: Copy>(dst: &mut [T], src: &[T]) {
    assert_eq!(dst.len(), src.len(), "copy_streaming: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if crate::avx512::has_avx512() {
        let bytes = std::mem::size_of_val(dst);
        let (d, s) = (dst.as_mut_ptr() as *mut u8, src.as_ptr() as *const u8);
        let head = d.align_offset(64).min(bytes);
        let body = (bytes - head) / 64 * 64;
        // SAFETY: `dst` and `src` are distinct slices (one is borrowed mutably) of `bytes` bytes
        // each, T is Copy (plain bytes to move), and every access below stays inside them:
        // `head + body <= bytes`. The streaming stores go to `d + head + i` with `i < body`, 64-byte
        // aligned by the choice of `head`; the CPU has AVX-512 F (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(s, d, head);
            stream_lines(d.add(head), s.add(head), body);
            std::ptr::copy_nonoverlapping(s.add(head + body), d.add(head + body), bytes - head - body);
        }
        return;
    }
    dst.copy_from_slice(src);
}

/// `bytes` (a multiple of 64) from `s` to the 64-byte aligned `d` with `vmovntdq`, then `sfence`.
///
/// # Safety
/// The CPU must have AVX-512 F; `s` must be readable and `d` writable for `bytes` bytes, and `d`
/// aligned to 64.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn stream_lines(d: *mut u8, s: *const u8, bytes: usize) {
    use std::arch::x86_64::*;
    for i in (0..bytes).step_by(64) {
        let v = _mm512_loadu_si512(s.add(i) as *const _);
        _mm512_stream_si512(d.add(i) as *mut _, v);
    }
    _mm_sfence();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filled_and_copied_hold_their_values() {
        for len in [0, 1, 1000, (HUGE_MIN_BYTES / 4) + 3, 3 * HUGE] {
            let v = filled(len, 1.5f32);
            assert!(v.len() == len && v.iter().all(|&x| x == 1.5));
            let src: Vec<u32> = (0..len as u32).collect();
            assert_eq!(copied(&src), src);
        }
    }

    /// Every offset and length around the 64-byte lines: the head, the streamed lines and the
    /// tail together copy exactly the slice, and nothing past it.
    #[test]
    fn copy_streaming_copies_exactly() {
        let src: Vec<u16> = (0..1000u16).map(|i| i.wrapping_mul(7919)).collect();
        for start in 0..40 {
            for len in [0, 1, 31, 32, 33, 64, 95, 96, 300, 900 - start] {
                let mut dst = vec![0xdeadu16; 1000];
                copy_streaming(&mut dst[start..start + len], &src[start..start + len]);
                assert!(dst[..start].iter().all(|&x| x == 0xdead), "before {start}+{len}");
                assert_eq!(&dst[start..start + len], &src[start..start + len], "{start}+{len}");
                assert!(dst[start + len..].iter().all(|&x| x == 0xdead), "after {start}+{len}");
            }
        }
    }
}
