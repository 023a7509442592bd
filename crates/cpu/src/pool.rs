//! The backend's threads: the calling thread and `threads - 1` workers of its own.
//!
//! A kernel's parallel section ([`broadcast`]) runs its job on the caller and on every worker, and
//! returns once all have ended it. Workers spin for a while ([`spin`]) after a section before they
//! sleep, so the sections of one forward (router GEMM, routing, matmul tiles, combine) start on
//! threads that are awake, and the caller never sleeps waiting for them. rayon's `install`, which
//! this replaces, ran the forward on a worker while the caller slept: two wake-ups a call (about 3
//! and 13 µs on the 2-vCPU VM, RESULTS.md), and the caller's core idle meanwhile. A stand-in on
//! rayon (`use_current_thread`) took 0.956-0.964 of the time of a bf16 layer at one token in the
//! VM's fast memory mode, but rayon leaks such a pool and deadlocks calls from other threads.
//!
//! Calls from several threads at once take turns a section at a time ([`Pool`]'s lock). A section
//! started inside another (a job that calls a kernel, or a call from inside a job of any pool) runs
//! its job inline, on the current thread: nothing waits on a pool that is waiting on it. A thread
//! that a job starts and waits for is not inside the section: a kernel it called on the same
//! backend would wait for the section's turn, held by the job's caller (no job of this crate
//! starts threads).

use std::any::Any;
use std::cell::{Cell, UnsafeCell};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a worker keeps spinning for the next section before it sleeps, and how long the caller
/// spins for the workers to end one before it yields between checks: 50 µs, or
/// `MOE_CPU_SPIN_US` (an engine that runs other work on the same cores between calls may want
/// less; 0 sleeps at once).
fn spin() -> Duration {
    static SPIN: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *SPIN.get_or_init(|| {
        let us = std::env::var("MOE_CPU_SPIN_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(50);
        Duration::from_micros(us)
    })
}

type Job<'a> = dyn Fn(usize) + Sync + 'a;
type Panic = Box<dyn Any + Send>;

struct Shared {
    /// Bumped to start a section; each worker runs each section's job once.
    epoch: AtomicUsize,
    /// The section's job, lifetime erased: written only while no section runs, under `Pool::turn`,
    /// before `epoch` is bumped (release), read by workers after they see it (acquire).
    job: UnsafeCell<Option<*const Job<'static>>>,
    /// Workers that have not ended the current section.
    pending: AtomicUsize,
    /// The first panic of a worker's job in the current section.
    panic: Mutex<Option<Panic>>,
    /// Sleeping workers wait on `wake`, under `sleep`.
    sleep: Mutex<()>,
    wake: Condvar,
    sleepers: AtomicUsize,
    stop: AtomicBool,
}

// SAFETY: `job` is the only field that is not Sync by itself. It is written only by the thread
// that holds `Pool::turn` while `pending` is 0 (no worker reads it then), and read by workers only
// between seeing a new `epoch` (acquire, after the write's release) and decrementing `pending`.
// The pointee is `Sync` and outlives every read (the writer waits for `pending` to reach 0).
unsafe impl Sync for Shared {}
// SAFETY: as above; the raw pointer is only dereferenced under that protocol.
unsafe impl Send for Shared {}

/// A pool of `threads - 1` workers plus the calling thread.
pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<std::thread::JoinHandle<()>>,
    /// One section at a time.
    turn: Mutex<()>,
    threads: usize,
}

thread_local! {
    /// The pool whose threads this thread's kernels use ([`Pool::install`]); null outside.
    static CURRENT: Cell<*const Pool> = const { Cell::new(std::ptr::null()) };
    /// This thread is running a section's job (of any pool): sections inside it run inline.
    static IN_SECTION: Cell<bool> = const { Cell::new(false) };
}

impl Pool {
    /// A pool of `threads` threads (at least 1), the caller being one of them.
    pub fn new(threads: usize, name: impl Fn(usize) -> String) -> std::io::Result<Pool> {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            pending: AtomicUsize::new(0),
            panic: Mutex::new(None),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
            sleepers: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let mut pool = Pool {
            shared: shared.clone(),
            workers: Vec::new(),
            turn: Mutex::new(()),
            threads,
        };
        for i in 1..threads {
            let s = shared.clone();
            // On an error the pool drops: the workers started so far are stopped and joined.
            let w = std::thread::Builder::new().name(name(i)).spawn(move || worker(&s, i))?;
            pool.workers.push(w);
        }
        Ok(pool)
    }

    /// Threads that run a section, the caller included.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f` on this thread with this pool as the one its kernels' sections use.
    pub fn install<R>(&self, f: impl FnOnce() -> R) -> R {
        struct Restore(*const Pool);
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT.set(self.0);
            }
        }
        let _restore = Restore(CURRENT.replace(self));
        f()
    }

    /// Runs `job(i)` for every `i` in `0..threads`: 0 on this thread, the others on the workers,
    /// and returns once all have ended; a panic in any of them is raised here after that.
    fn section(&self, job: &Job<'_>) {
        if self.threads == 1 || IN_SECTION.get() {
            return inline(job);
        }
        let _turn = self.turn.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY: only the lifetime changes. Workers read the pointer only during this section,
        // and this function returns (or unwinds) only after every worker has ended it (`pending`
        // back to 0 below), so `job` outlives every use. No worker reads `job` now: the previous
        // section ended with `pending` at 0, and we hold the turn.
        unsafe {
            let erased: *const Job<'static> = std::mem::transmute::<&Job<'_>, &'static Job<'static>>(job);
            *s.job.get() = Some(erased);
        }
        s.pending.store(self.threads - 1, Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.sleep.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        let own = run_job(job, 0);
        let start = Instant::now();
        while s.pending.load(Ordering::Acquire) > 0 {
            if start.elapsed() < spin() {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        // SAFETY: every worker has ended the section (pending is 0): nobody reads `job`.
        unsafe { *s.job.get() = None };
        let theirs = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(p) = own.err().or(theirs) {
            std::panic::resume_unwind(p);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _g = self.shared.sleep.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Runs `job(i)` marked as inside a section; a panic comes back as the error.
fn run_job(job: &Job<'_>, i: usize) -> Result<(), Panic> {
    let was = IN_SECTION.replace(true);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(i)));
    IN_SECTION.set(was);
    r
}

/// A section on this thread alone: `job(0)`. Every job takes its work from a shared counter or
/// share ([`for_each`], the layer's tile list), so index 0 alone does all of it.
fn inline(job: &Job<'_>) {
    if let Err(p) = run_job(job, 0) {
        std::panic::resume_unwind(p);
    }
}

fn worker(s: &Shared, i: usize) {
    let mut seen = 0;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            if s.stop.load(Ordering::Acquire) {
                return;
            }
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) || start.elapsed() < spin() {
                std::hint::spin_loop();
                continue;
            }
            let mut g = s.sleep.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, Ordering::SeqCst);
            while s.epoch.load(Ordering::SeqCst) == seen && !s.stop.load(Ordering::SeqCst) {
                g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            s.sleepers.fetch_sub(1, Ordering::SeqCst);
        }
        // SAFETY: a new epoch was published after `job` was written (acquire above), and the
        // section's caller keeps the job alive until this worker decrements `pending`.
        let job = unsafe { (*s.job.get()).map(|p| &*p) };
        if let Some(job) = job {
            if let Err(p) = run_job(job, i) {
                let mut first = s.panic.lock().unwrap_or_else(|e| e.into_inner());
                if first.is_none() {
                    *first = Some(p);
                } else {
                    // Dropping a payload runs its `Drop`, which may panic itself and take this
                    // worker down before it ends the section: a second payload is leaked.
                    std::mem::forget(p);
                }
            }
        }
        s.pending.fetch_sub(1, Ordering::Release);
    }
}

/// Threads of the pool this thread's kernels use (1 outside [`Pool::install`] and inside a
/// section, where [`broadcast`] runs on this thread alone).
pub fn threads() -> usize {
    let p = CURRENT.get();
    if p.is_null() || IN_SECTION.get() {
        1
    } else {
        // SAFETY: CURRENT points to a pool only inside its `install`, which borrows it.
        unsafe { (*p).threads }
    }
}

/// Runs `job(i)` for `i` in `0..threads()` on the current pool's threads, `job(0)` on this one;
/// outside [`Pool::install`] or inside another section, `job(0)` alone, on this thread. A job must
/// therefore take its work from what all indices share, not from its index.
pub fn broadcast(job: impl Fn(usize) + Sync) {
    let p = CURRENT.get();
    if p.is_null() || IN_SECTION.get() {
        return inline(&job);
    }
    // SAFETY: CURRENT points to a pool only inside its `install`, which borrows it.
    unsafe { (*p).section(&job) }
}

/// Items `front .. back` of one thread's share in [`for_each`], packed in one word so that the
/// owner (from the front) and thieves (from the back) take each item once.
struct Span(AtomicU64);

impl Span {
    fn new(a: usize, b: usize) -> Self {
        Span(AtomicU64::new(((a as u64) << 32) | b as u64))
    }

    fn take(&self, front: bool) -> Option<usize> {
        let mut v = self.0.load(Ordering::Relaxed);
        loop {
            let (a, b) = (v >> 32, v & 0xffff_ffff);
            if a >= b {
                return None;
            }
            let (next, item) = if front {
                (((a + 1) << 32) | b, a)
            } else {
                ((a << 32) | (b - 1), b - 1)
            };
            match self
                .0
                .compare_exchange_weak(v, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(item as usize),
                Err(now) => v = now,
            }
        }
    }
}

/// Calls `f(i)` for every `i` in `0..n` on the current pool's threads: thread `t` takes the `t`-th
/// share of the items in order, then takes items from the back of the others' shares. Neighbouring
/// items mostly run on one thread, one after another (a grouped matmul lists a range's tiles
/// together, and a thread reuses the rows it interleaved for the previous one), and no thread
/// idles while another has items left.
pub fn for_each(n: usize, f: impl Fn(usize) + Sync) {
    let t = threads();
    if t == 1 || n <= 1 || n > u32::MAX as usize {
        (0..n).for_each(f);
        return;
    }
    let spans: Vec<Span> = (0..t).map(|i| Span::new(i * n / t, (i + 1) * n / t)).collect();
    broadcast(|i| {
        while let Some(j) = spans[i].take(true) {
            f(j);
        }
        for k in (1..t).map(|d| (i + d) % t) {
            while let Some(j) = spans[k].take(false) {
                f(j);
            }
        }
    });
}

/// Calls `f` on consecutive ranges of `0..n`, `grain` items each (the last may be shorter), spread
/// over the current pool's threads as [`for_each`] spreads items.
pub fn for_ranges(n: usize, grain: usize, f: impl Fn(Range<usize>) + Sync) {
    let grain = grain.max(1);
    for_each(n.div_ceil(grain), |r| f(r * grain..((r + 1) * grain).min(n)));
}

/// A grain for [`for_ranges`] over `n` items: about eight ranges a thread.
pub fn grain(n: usize) -> usize {
    n.div_ceil(threads() * 8).max(1)
}

/// A slice borrowed mutably for `'a`, that sections write disjoint chunks of.
pub struct Chunks<'a, T> {
    ptr: *mut T,
    len: usize,
    chunk: usize,
    _slice: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: chunks handed out by `get` are disjoint for distinct indices, and its callers take each
// index once, so no element is reachable from two threads; `T: Send` lets a chunk be written on
// another thread.
unsafe impl<T: Send> Sync for Chunks<'_, T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for Chunks<'_, T> {}

impl<'a, T> Chunks<'a, T> {
    /// `v` in pieces of `chunk` (the last may be shorter), borrowed for as long as the view lives.
    pub fn new(v: &'a mut [T], chunk: usize) -> Self {
        Chunks {
            ptr: v.as_mut_ptr(),
            len: v.len(),
            chunk: chunk.max(1),
            _slice: std::marker::PhantomData,
        }
    }

    /// Chunk `i`.
    ///
    /// # Safety
    /// No other live reference to chunk `i` may exist.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn get(&self, i: usize) -> &mut [T] {
        let a = i
            .checked_mul(self.chunk)
            .filter(|&a| a < self.len)
            .unwrap_or_else(|| panic!("chunk {i} past the slice"));
        let n = self.chunk.min(self.len - a);
        // SAFETY: `a + n <= len`, within the slice borrowed for 'a (which outlives `&self`); the
        // caller guarantees no other reference to these elements.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(a), n) }
    }
}

/// Calls `f(i, chunk)` for every `chunk`-long piece of `v` (the last may be shorter), spread over
/// the current pool's threads.
pub fn for_chunks_mut<T: Send>(v: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    for_chunks_mut_init(v, chunk, || (), |_, (i, c)| f(i, c));
}

/// [`for_chunks_mut`] with a state made by `init` once per run of consecutive chunks (rayon's
/// `for_each_init`): `f(state, (i, chunk))`.
pub fn for_chunks_mut_init<T: Send, S>(
    v: &mut [T],
    chunk: usize,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, (usize, &mut [T])) + Sync,
) {
    let n = v.len().div_ceil(chunk.max(1));
    let c = Chunks::new(v, chunk);
    for_ranges(n, grain(n), |r| {
        let mut state = init();
        for i in r {
            // SAFETY: every chunk index is in exactly one range, and each range is taken once.
            f(&mut state, (i, unsafe { c.get(i) }))
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize) -> Pool {
        Pool::new(n, |i| format!("test-{i}")).unwrap()
    }

    /// Every index runs once a section, on as many threads as the pool has, many sections in a
    /// row and after the workers have gone to sleep.
    #[test]
    fn each_index_once_per_section() {
        for n in [1, 2, 3, 8] {
            let p = pool(n);
            p.install(|| {
                assert_eq!(threads(), n);
                for round in 0..2000 {
                    if round % 500 == 499 {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                    let ids = Mutex::new(std::collections::HashSet::new());
                    broadcast(|i| {
                        hits[i].fetch_add(1, Ordering::Relaxed);
                        ids.lock().unwrap().insert(std::thread::current().id());
                    });
                    assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "{n} threads");
                    assert_eq!(ids.lock().unwrap().len(), n, "{n} threads, round {round}");
                }
            });
        }
        assert_eq!(threads(), 1);
    }

    /// A panic in a worker's job or the caller's comes back to the caller, once every thread has
    /// ended the section, and the pool still works after it.
    #[test]
    fn panics_reach_the_caller() {
        let p = pool(3);
        p.install(|| {
            for bad in 0..3 {
                let ended = AtomicUsize::new(0);
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    broadcast(|i| {
                        if i == bad {
                            panic!("job {i}");
                        }
                        std::thread::sleep(Duration::from_millis(1));
                        ended.fetch_add(1, Ordering::SeqCst);
                    })
                }));
                let msg = r.unwrap_err().downcast::<String>().unwrap();
                assert_eq!(*msg, format!("job {bad}"));
                assert_eq!(ended.load(Ordering::SeqCst), 2);
            }
            let sum = AtomicUsize::new(0);
            for_ranges(1000, 7, |r| {
                sum.fetch_add(r.sum::<usize>(), Ordering::Relaxed);
            });
            assert_eq!(sum.into_inner(), 999 * 1000 / 2);
        });
    }

    /// Sections inside sections run once, inline; sections from several threads at once take
    /// turns; chunks cover the slice once.
    #[test]
    fn nested_and_concurrent_sections() {
        let p = pool(2);
        std::thread::scope(|sc| {
            for t in 0..3 {
                let p = &p;
                sc.spawn(move || {
                    p.install(|| {
                        for _ in 0..200 {
                            let inner = AtomicUsize::new(0);
                            broadcast(|_| {
                                broadcast(|_| {
                                    inner.fetch_add(1, Ordering::Relaxed);
                                })
                            });
                            assert_eq!(inner.into_inner(), 2, "thread {t}");
                            let mut v = vec![0u32; 1001];
                            for_chunks_mut(&mut v, 10, |i, c| c.iter_mut().for_each(|x| *x += i as u32 + 1));
                            assert!(v.iter().enumerate().all(|(j, &x)| x == (j / 10) as u32 + 1));
                        }
                    })
                });
            }
        });
    }

    /// `for_each` runs every item once, each thread's share first in order.
    #[test]
    fn for_each_runs_every_item_once() {
        let p = pool(3);
        p.install(|| {
            for n in [0, 1, 2, 3, 7, 100, 1000] {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                for_each(n, |i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "{n} items");
            }
        });
    }

    /// Outside `install`, and with one thread, everything runs on the caller.
    #[test]
    fn no_pool_runs_inline() {
        let me = std::thread::current().id();
        broadcast(|i| {
            assert_eq!(i, 0);
            assert_eq!(std::thread::current().id(), me);
        });
        pool(1).install(|| {
            for_ranges(100, 3, |_| assert_eq!(std::thread::current().id(), me));
        });
    }
}
