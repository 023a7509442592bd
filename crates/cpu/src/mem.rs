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

use moe_hal_core::{MoeError, Result};

/// Transparent huge page size on x86-64 and most aarch64 kernels.
const HUGE: usize = 2 << 20;
/// Smallest buffer advised: two huge pages, so that at least one aligned huge page lies inside.
const HUGE_MIN_BYTES: usize = 2 * HUGE;

/// `len` copies of `value`, or an error where the allocator refuses the memory, instead of
/// aborting the process.
pub(crate) fn try_filled<T: Copy>(len: usize, value: T) -> Result<Vec<T>> {
    let mut v = reserved(len)?;
    v.resize(len, value);
    Ok(v)
}

/// A copy of `src`, or an error as [`try_filled`].
pub(crate) fn try_copied<T: Copy>(src: &[T]) -> Result<Vec<T>> {
    let mut v = reserved(src.len())?;
    v.extend_from_slice(src);
    Ok(v)
}

/// An empty vector with room for `len`, advised onto huge pages.
fn reserved<T>(len: usize) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|e| MoeError::Device {
        backend: crate::NAME.into(),
        message: format!(
            "cannot allocate {len} elements of {} bytes: {e}",
            std::mem::size_of::<T>()
        ),
    })?;
    advise(&v);
    Ok(v)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filled_and_copied_hold_their_values() {
        for len in [0, 1, 1000, (HUGE_MIN_BYTES / 4) + 3, 3 * HUGE] {
            let v = try_filled(len, 1.5f32).unwrap();
            assert!(v.len() == len && v.iter().all(|&x| x == 1.5));
            let src: Vec<u32> = (0..len as u32).collect();
            assert_eq!(try_copied(&src).unwrap(), src);
        }
        // More than any address space: an error, not an abort.
        assert!(try_filled(1usize << 60, 0.0f32).is_err());
    }
}
