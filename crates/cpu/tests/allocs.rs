//! Heap allocations of a decode forward with a warm scratch: the per-call cost an engine pays on
//! every token besides the kernels. Each kernel call used to build the backend's capabilities
//! (a dozen small vectors) for its checks: 67 allocations a one-token forward, 27 without.

use moe_hal_core::conformance::{layer_input, random_layer};
use moe_hal_core::{Backend, DType, HostVec, LayerScratch, MoeLayer, RouterSpec};
use moe_hal_cpu::CpuBackend;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);
static TRACE: AtomicBool = AtomicBool::new(false);
static SITES: Mutex<Vec<String>> = Mutex::new(Vec::new());
thread_local! { static TRACING: Cell<bool> = const { Cell::new(false) }; }

/// Where an allocation came from (the innermost frames of this workspace), while `TRACE` is set.
fn trace(size: usize) {
    if !TRACE.load(Relaxed) || TRACING.with(|c| c.replace(true)) {
        return;
    }
    let bt = std::backtrace::Backtrace::force_capture().to_string();
    let frames: Vec<&str> = bt
        .lines()
        .map(str::trim)
        .filter(|l| l.contains("moe_hal") && !l.starts_with("at "))
        .take(3)
        .collect();
    SITES
        .lock()
        .unwrap()
        .push(format!("{size} B <- {}", frames.join(" <- ")));
    TRACING.with(|c| c.set(false));
}

// SAFETY: every call goes to the system allocator unchanged; this only counts (and, while tracing,
// allocates for its record on a thread whose re-entry it stops).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        trace(l.size());
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        trace(n);
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

#[test]
fn one_token_forward_allocates_little() {
    const MOST: usize = 40;
    for dt in [DType::F32, DType::BF16] {
        let w = random_layer(1, RouterSpec::softmax_topk(128, 8, true), 256, 96, None)
            .to_dtype(dt)
            .unwrap();
        let b = CpuBackend::with_threads(2).unwrap();
        let layer = MoeLayer::new(b.clone(), &w).unwrap();
        let x = layer_input(2, &w, 1, dt).unwrap();
        let x = b.upload(HostVec::from_f32(&x, dt).unwrap().as_slice()).unwrap();
        let mut out = b.alloc(dt, 256).unwrap();
        let mut s = LayerScratch::new();
        for _ in 0..3 {
            layer.forward_with(&mut s, &x, 1, &mut out).unwrap();
        }
        let before = ALLOCS.load(Relaxed);
        for _ in 0..10 {
            layer.forward_with(&mut s, &x, 1, &mut out).unwrap();
        }
        let each = (ALLOCS.load(Relaxed) - before) / 10;
        if each > MOST {
            TRACE.store(true, Relaxed);
            layer.forward_with(&mut s, &x, 1, &mut out).unwrap();
            TRACE.store(false, Relaxed);
            let sites = SITES.lock().unwrap().join("\n  ");
            panic!("{dt:?}: {each} allocations a one-token forward, expected at most {MOST}:\n  {sites}");
        }
    }
}
