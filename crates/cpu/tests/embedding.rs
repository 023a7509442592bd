//! An inference engine embedding the CPU backend: calls from its own rayon pool, one layer shared
//! by threads, one scratch shared by layers. Every result must equal a plain serial forward's bits.

use moe_hal_core::conformance::{layer_input, random_layer, Rng};
use moe_hal_core::{Backend, DType, HostVec, LayerScratch, LayerWeights, MoeLayer, RouterSpec};
use moe_hal_cpu::{CpuBackend, CpuBuffer};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn weights(dtype: DType) -> LayerWeights {
    let spec = RouterSpec::deepseek_v3(64, 8, 8, 4, Some(Rng::new(3).vec(64, -0.2, 0.2)), true, 2.5);
    random_layer(9, spec, 200, 144, Some((144, false)))
        .to_dtype(dtype)
        .unwrap()
}

fn input(b: &CpuBackend, w: &LayerWeights, t: usize) -> CpuBuffer {
    let x = layer_input(4 + t as u64, w, t, w.dtype()).unwrap();
    b.upload(HostVec::from_f32(&x, w.dtype()).unwrap().as_slice()).unwrap()
}

fn bits(b: &CpuBackend, out: &CpuBuffer, len: usize) -> Vec<u32> {
    let v = b.download(out).unwrap().to_f32().unwrap();
    v[..len].iter().map(|v| v.to_bits()).collect()
}

/// Runs `f` on another thread and fails if it has not finished in `secs` (a deadlock would hang the
/// test binary instead of failing it).
fn within(secs: u64, what: &str, f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    assert!(
        rx.recv_timeout(Duration::from_secs(secs)).is_ok(),
        "{what} did not finish in {secs} s"
    );
}

/// rayon's `install` from another pool's worker runs that pool's other jobs while it waits: a job
/// holding the layer's lock met another job waiting for it on the same thread, and deadlocked.
#[test]
fn locked_layer_called_from_an_application_pool() {
    let w = weights(DType::F32);
    let b = CpuBackend::with_threads(2).unwrap();
    let want = {
        let mut l = MoeLayer::new(b.clone(), &w).unwrap();
        bits(&b, &l.forward(&input(&b, &w, 67), 67).unwrap(), 67 * 200)
    };
    let layer = Arc::new(Mutex::new(MoeLayer::new(b.clone(), &w).unwrap()));
    let x = Arc::new(input(&b, &w, 67));
    let got = Arc::new(Mutex::new(Vec::new()));
    let (l2, g2, b2) = (layer.clone(), got.clone(), b.clone());
    within(
        120,
        "64 forwards of a locked layer from a 2-thread application pool",
        move || {
            let app = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
            app.install(|| {
                (0..64).into_par_iter().for_each(|_| {
                    let mut l = l2.lock().unwrap();
                    let out = l.forward(&x, 67).unwrap();
                    g2.lock().unwrap().push(bits(&b2, &out, 67 * 200));
                })
            });
        },
    );
    let got = got.lock().unwrap();
    assert_eq!(got.len(), 64);
    assert!(
        got.iter().all(|g| *g == want),
        "a forward from the application pool changed the bits"
    );
}

/// `forward_with` takes `&self`: threads share one layer (no lock), a scratch each, and get the
/// serial bits; one scratch also serves two layers in turn.
#[test]
fn one_layer_many_threads_and_one_scratch_many_layers() {
    for dtype in [DType::F32, DType::BF16] {
        let w = weights(dtype);
        let b = CpuBackend::with_threads(2).unwrap();
        let tokens = [1usize, 5, 67, 300, 17];
        let serial: Vec<Vec<u32>> = tokens
            .iter()
            .map(|&t| {
                let mut l = MoeLayer::new(b.clone(), &w).unwrap();
                bits(&b, &l.forward(&input(&b, &w, t), t).unwrap(), t * 200)
            })
            .collect();
        let layer = MoeLayer::new(b.clone(), &w).unwrap();
        std::thread::scope(|s| {
            for th in 0..3 {
                let (layer, b, serial, w) = (&layer, &b, &serial, &w);
                s.spawn(move || {
                    let mut scratch = LayerScratch::new();
                    for round in 0..4 {
                        for (j, &t) in tokens.iter().enumerate().cycle().skip(th + round).take(tokens.len()) {
                            let mut out = b.alloc(dtype, t * 200).unwrap();
                            layer.forward_with(&mut scratch, &input(b, w, t), t, &mut out).unwrap();
                            assert_eq!(bits(b, &out, t * 200), serial[j], "{dtype} thread {th}, {t} tokens");
                        }
                    }
                    assert_eq!(scratch.capacity(), 300);
                });
            }
        });
        // Two layers (another router bias) through one scratch: each gives its own serial bits, and
        // the scratch's routing is the last layer's.
        let mut w2 = w.clone();
        w2.router.correction_bias = Some(Rng::new(8).vec(64, -0.2, 0.2));
        let other = MoeLayer::new(b.clone(), &w2).unwrap();
        let (x, t) = (input(&b, &w, 67), 67);
        let mut own = MoeLayer::new(b.clone(), &w2).unwrap();
        let want2 = bits(&b, &own.forward(&x, t).unwrap(), t * 200);
        let mut scratch = LayerScratch::new();
        for _ in 0..2 {
            let mut out = b.alloc(dtype, t * 200).unwrap();
            layer.forward_with(&mut scratch, &x, t, &mut out).unwrap();
            assert_eq!(bits(&b, &out, t * 200), serial[2]);
            other.forward_with(&mut scratch, &x, t, &mut out).unwrap();
            assert_eq!(bits(&b, &out, t * 200), want2);
        }
        assert_eq!(scratch.last_routing(&b).unwrap(), own.last_routing().unwrap());
        assert_eq!(scratch.capacity(), 67);
        scratch.clear();
        assert_eq!(scratch.capacity(), 0);
        own.release_scratch();
        assert_eq!(own.last_routing().unwrap().0.dim(), (0, 8));
    }
}

/// Kernels called directly from an application pool's workers, two backends (two pools) in turn,
/// give the bits of calls from a plain thread.
#[test]
fn kernels_from_an_application_pool_match() {
    let w = weights(DType::BF16);
    let (b1, b2) = (
        CpuBackend::with_threads(2).unwrap(),
        CpuBackend::with_threads(1).unwrap(),
    );
    let want = {
        let mut l = MoeLayer::new(b1.clone(), &w).unwrap();
        bits(&b1, &l.forward(&input(&b1, &w, 33), 33).unwrap(), 33 * 200)
    };
    let layers = [
        (b1.clone(), MoeLayer::new(b1.clone(), &w).unwrap()),
        (b2.clone(), MoeLayer::new(b2.clone(), &w).unwrap()),
    ];
    let app = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let got: Vec<Vec<u32>> = app.install(|| {
        (0..16)
            .into_par_iter()
            .map(|i| {
                let (b, l) = &layers[i % 2];
                let mut scratch = LayerScratch::new();
                let mut out = b.alloc(DType::BF16, 33 * 200).unwrap();
                l.forward_with(&mut scratch, &input(b, &w, 33), 33, &mut out).unwrap();
                bits(b, &out, 33 * 200)
            })
            .collect()
    });
    assert!(got.iter().all(|g| *g == want));
}

/// A gated shared expert's gate overwrites the shared weights an ungated one reads as 1: one
/// scratch through a gated layer then a plain one of the same sizes gave the plain one gated
/// outputs.
#[test]
fn one_scratch_through_gated_and_plain_shared_experts() {
    let b = CpuBackend::with_threads(2).unwrap();
    let spec = RouterSpec::softmax_topk(8, 2, true);
    let (gated, plain) = (
        random_layer(1, spec.clone(), 32, 16, Some((24, true))),
        random_layer(1, spec, 32, 16, Some((24, false))),
    );
    let x = input(&b, &gated, 9);
    let own = |w: &LayerWeights| {
        let mut l = MoeLayer::new(b.clone(), w).unwrap();
        bits(&b, &l.forward(&x, 9).unwrap(), 9 * 32)
    };
    let (want_g, want_p) = (own(&gated), own(&plain));
    let (lg, lp) = (
        MoeLayer::new(b.clone(), &gated).unwrap(),
        MoeLayer::new(b.clone(), &plain).unwrap(),
    );
    let mut scratch = LayerScratch::new();
    let mut out = b.alloc(DType::F32, 9 * 32).unwrap();
    for _ in 0..2 {
        lg.forward_with(&mut scratch, &x, 9, &mut out).unwrap();
        assert_eq!(bits(&b, &out, 9 * 32), want_g);
        lp.forward_with(&mut scratch, &x, 9, &mut out).unwrap();
        assert_eq!(
            bits(&b, &out, 9 * 32),
            want_p,
            "the plain shared expert after a gated one"
        );
    }
}

/// Calls that go from one backend's pool to another's and back finish, on one thread each (a
/// blocked wait there would leave no thread to run the inner call).
#[test]
fn calls_back_and_forth_between_backends() {
    within(60, "a.run(b.run(a.run(..))) on one-thread pools", || {
        let (a, b) = (
            CpuBackend::with_threads(1).unwrap(),
            CpuBackend::with_threads(1).unwrap(),
        );
        assert_eq!(a.run(|| b.run(|| a.run(|| 7))), 7);
        let w = weights(DType::F32);
        let la = MoeLayer::new(a.clone(), &w).unwrap();
        let x = input(&a, &w, 3);
        let mut out = a.alloc(DType::F32, 3 * 200).unwrap();
        b.run(|| la.forward_with(&mut LayerScratch::new(), &x, 3, &mut out))
            .unwrap();
    });
}
