//! Criterion benches of every kernel and the whole layer (f32), one generic
//! function for every backend: the CPU at a small and a medium shape (group
//! `kernels`), WebGPU at the small shape (group `kernels-wgpu`; skipped with
//! the reason when there is no adapter). Run: `cargo bench -p moe-bench --bench
//! kernels` (add `-- route`, `-- wgpu` etc. to filter; `WGPU_BACKEND=vulkan`
//! picks Vulkan, e.g. Mesa's lavapipe). The group `kernels-bf16-weights` runs
//! the CPU's bf16 grouped matmuls on weights as uploaded and as
//! `upload_weights` packs them (`-- bf16-weights`); on an x86-64 CPU with AVX2 and a better level,
//! the group `kernels-avx2-weights` does the same for f32 and bf16 at the AVX2 level (`-- avx2`),
//! which packs f32 on every CPU (AVX-512 packs it on AMD only). The full model-shape sweeps are
//! `moe-bench bench` (see benches/README.md at the repository root).
//!
//! Each call is timed on its own and waits for its work: with the device clock
//! where the backend has one (`Backend::device_time_ms`: WebGPU timestamp
//! queries, CUDA events), else with the wall clock around the call.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use moe_hal::conformance::{random_layer, Rng};
use moe_hal::cpu::CpuBackend;
use moe_hal::wgpu::WgpuBackend;
use moe_hal::{Backend, DType, HostSlice, HostVec, LayerShapes, MoeLayer, PermuteShape, Permuted, RouterSpec};
use std::hint::black_box;
use std::time::{Duration, Instant};

/// A bench shape: name, hidden, inter, experts, top_k, tokens.
type Shape = (&'static str, usize, usize, usize, usize, usize);

const SMALL: Shape = ("small", 256, 128, 16, 2, 16);
const MEDIUM: Shape = ("medium", 1024, 512, 64, 8, 128);

fn kernels(c: &mut Criterion) {
    match CpuBackend::new() {
        Ok(b) => {
            bench_backend(c, "kernels", &b, &[SMALL, MEDIUM]);
            if let Err(e) = bench_uploads(c, "kernels-bf16-weights", &b, MEDIUM, &[DType::BF16]) {
                eprintln!("kernels-bf16-weights: SKIPPED: {e}");
            }
            bench_avx2(c);
        }
        Err(e) => eprintln!("kernels (cpu): SKIPPED: {e}"),
    }
    // A software adapter is slow: the small shape only.
    match WgpuBackend::new() {
        Ok(b) => bench_backend(c, "kernels-wgpu", &b, &[SMALL]),
        Err(e) => eprintln!("kernels-wgpu: SKIPPED (no WebGPU adapter): {e}"),
    }
}

/// Every shape of `shapes` on `b`, in the criterion group `group`; a shape the backend
/// refuses is skipped with the reason.
fn bench_backend<B: Backend + Clone>(c: &mut Criterion, group: &str, b: &B, shapes: &[Shape]) {
    eprintln!(
        "{group}: {} ({}), timed with the {} clock",
        b.name(),
        b.device_name(),
        match b.device_time_ms(&mut || Ok(())) {
            Ok(Some(_)) => "device",
            Ok(None) => "wall",
            Err(e) => {
                eprintln!("{group}: SKIPPED: {e}");
                return;
            }
        }
    );
    for &shape in shapes {
        if let Err(e) = bench_shape(c, group, b, shape) {
            eprintln!("{group}/{}: SKIPPED: {e}", shape.0);
        }
    }
}

/// `iters` calls of `f`, each waited for and timed with the backend's device clock where it
/// has one, else with the wall clock around the call.
fn timed<B: Backend>(b: &B, iters: u64, f: &mut dyn FnMut() -> moe_hal::Result<()>) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let start = Instant::now();
        // The same calls succeeded while the buffers were prepared: an error here is a device failure.
        match b.device_time_ms(f) {
            Ok(Some(ms)) => total += Duration::from_secs_f64(ms.max(0.0) * 1e-3),
            Ok(None) => total += start.elapsed(),
            Err(e) => panic!("{} failed during the benchmark: {e}", b.name()),
        }
    }
    total
}

fn bench_shape<B: Backend + Clone>(c: &mut Criterion, group: &str, b: &B, shape: Shape) -> moe_hal::Result<()> {
    let (name, h, i, e, k, t) = shape;
    let spec = RouterSpec::softmax_topk(e, k, true);
    let w = random_layer(1, spec.clone(), h, i, None);
    let mut rng = Rng::new(2);
    let x = b.upload(HostSlice::F32(&rng.vec(t * h, -1.0, 1.0)))?;
    let router_w = b.upload(HostSlice::F32(&w.router_weight))?;
    let gate_up = b.upload(w.gate_up.as_slice())?;
    let down = b.upload(w.down.as_slice())?;
    let mut logits = b.alloc(DType::F32, t * e)?;
    let mut ids = b.alloc(DType::U32, t * k)?;
    let mut rw = b.alloc(DType::F32, t * k)?;
    let pshape = PermuteShape {
        tokens: t,
        hidden: h,
        top_k: k,
        experts: e,
    };
    let mut perm = Permuted::alloc(b, pshape, DType::F32)?;
    let mut act = b.alloc(DType::F32, t * k * i)?;
    let mut eout = b.alloc(DType::F32, t * k * h)?;
    let mut out = b.alloc(DType::F32, t * h)?;
    let LayerShapes {
        router: rshape,
        permute: pshape,
        gate_up: gu,
        down: dn,
        combine: cs,
    } = LayerShapes::new(t, h, i, e, k)?;
    // One pass fills every buffer (and checks every call) before timing.
    b.router_logits(&x, &router_w, &mut logits, rshape)?;
    b.route(&logits, &spec, t, &mut ids, &mut rw)?;
    b.permute(&x, &ids, pshape, &mut perm)?;
    b.grouped_matmul(&perm.rows, &perm.offsets, &gate_up, &mut act, gu)?;
    b.grouped_matmul(&act, &perm.offsets, &down, &mut eout, dn)?;
    b.combine(&eout, &ids, &rw, &perm.slot_of, &mut out, cs)?;
    let mut layer = MoeLayer::new(b.clone(), &w)?;
    layer.forward_into(&x, t, &mut out)?;
    b.synchronize()?;

    let id = format!("{name}/h{h}-i{i}-e{e}-k{k}-t{t}");
    let mut g = c.benchmark_group(group);
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    g.throughput(Throughput::Elements(t as u64));
    g.bench_function(BenchmarkId::new("route", &id), |bn| {
        bn.iter_custom(|n| {
            timed(b, n, &mut || {
                b.router_logits(&x, &router_w, &mut logits, rshape)?;
                b.route(black_box(&logits), &spec, t, &mut ids, &mut rw)
            })
        })
    });
    g.bench_function(BenchmarkId::new("permute", &id), |bn| {
        bn.iter_custom(|n| timed(b, n, &mut || b.permute(black_box(&x), &ids, pshape, &mut perm)))
    });
    g.bench_function(BenchmarkId::new("gemm_gate_up", &id), |bn| {
        bn.iter_custom(|n| {
            timed(b, n, &mut || {
                b.grouped_matmul(black_box(&perm.rows), &perm.offsets, &gate_up, &mut act, gu)
            })
        })
    });
    g.bench_function(BenchmarkId::new("gemm_down", &id), |bn| {
        bn.iter_custom(|n| {
            timed(b, n, &mut || {
                b.grouped_matmul(black_box(&act), &perm.offsets, &down, &mut eout, dn)
            })
        })
    });
    g.bench_function(BenchmarkId::new("combine", &id), |bn| {
        bn.iter_custom(|n| {
            timed(b, n, &mut || {
                b.combine(black_box(&eout), &ids, &rw, &perm.slot_of, &mut out, cs)
            })
        })
    });
    g.bench_function(BenchmarkId::new("layer", &id), |bn| {
        bn.iter_custom(|n| timed(b, n, &mut || layer.forward_into(black_box(&x), t, &mut out)))
    });
    g.finish();
    Ok(())
}

/// The CPU's AVX2 level where the CPU has AVX2 and a better level (where AVX2 is the best, the
/// group `kernels` runs it already).
fn bench_avx2(c: &mut Criterion) {
    #[cfg(target_arch = "x86_64")]
    {
        use moe_hal::cpu::Simd;
        if Simd::detect() == Simd::Avx2 || !Simd::supported().contains(&Simd::Avx2) {
            eprintln!("kernels-avx2-weights: SKIPPED: AVX2 is this CPU's best level or missing");
            return;
        }
        let mut run = || -> moe_hal::Result<()> {
            let b = CpuBackend::new()?.with_simd(Simd::Avx2)?;
            bench_uploads(c, "kernels-avx2-weights", &b, MEDIUM, &[DType::F32, DType::BF16])
        };
        if let Err(e) = run() {
            eprintln!("kernels-avx2-weights: SKIPPED: {e}");
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = c;
}

/// Grouped matmuls (gate/up with SwiGLU, then down) in each of `dtypes` on expert weights as
/// uploaded and as `upload_weights` packs them, side by side in the criterion group `group` (the
/// medium shape has 16 rows per expert, as qwen3-30b-a3b at 256 tokens).
fn bench_uploads<B: Backend>(
    c: &mut Criterion,
    group: &str,
    b: &B,
    shape: Shape,
    dtypes: &[DType],
) -> moe_hal::Result<()> {
    for &dtype in dtypes {
        // A group of one dtype keeps ids without it (those of `kernels-bf16-weights` before).
        bench_upload(c, group, b, shape, dtype, dtypes.len() > 1)?;
    }
    Ok(())
}

fn bench_upload<B: Backend>(
    c: &mut Criterion,
    group: &str,
    b: &B,
    shape: Shape,
    dtype: DType,
    name_dtype: bool,
) -> moe_hal::Result<()> {
    let (name, h, i, e, k, t) = shape;
    let w = random_layer(1, RouterSpec::softmax_topk(e, k, true), h, i, None);
    let mut rng = Rng::new(2);
    let rows = t * k;
    let cast = |v: &[f32]| HostVec::from_f32(v, dtype).expect("a float dtype");
    let x = b.upload(cast(&rng.vec(rows * h, -1.0, 1.0)).as_slice())?;
    let per = (0..=e).map(|j| (j * rows / e) as u32).collect::<Vec<_>>();
    let offsets = b.upload(HostSlice::U32(&per))?;
    let LayerShapes {
        gate_up: gu, down: dn, ..
    } = LayerShapes::new(t, h, i, e, k)?;
    let (gate_up, down) = (
        cast(&w.gate_up.to_f32().expect("f32 weights")),
        cast(&w.down.to_f32().expect("f32 weights")),
    );
    let mut act = b.alloc(dtype, rows * i)?;
    let mut y = b.alloc(dtype, rows * h)?;
    let id = if name_dtype {
        format!("{name}-{dtype}/h{h}-i{i}-e{e}-rows{}", rows / e)
    } else {
        format!("{name}/h{h}-i{i}-e{e}-rows{}", rows / e)
    };
    let mut g = c.benchmark_group(group);
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    g.throughput(Throughput::Elements(rows as u64));
    for packed in [false, true] {
        let up = |v: &HostVec, s| {
            if packed {
                b.upload_weights(v.as_slice(), s)
            } else {
                b.upload(v.as_slice())
            }
        };
        let (wg, wd) = (up(&gate_up, gu)?, up(&down, dn)?);
        b.grouped_matmul(&x, &offsets, &wg, &mut act, gu)?;
        b.grouped_matmul(&act, &offsets, &wd, &mut y, dn)?;
        let how = if packed { "upload_weights" } else { "upload" };
        g.bench_function(BenchmarkId::new(format!("gemm_gate_up/{how}"), &id), |bn| {
            bn.iter_custom(|n| {
                timed(b, n, &mut || {
                    b.grouped_matmul(black_box(&x), &offsets, &wg, &mut act, gu)
                })
            })
        });
        g.bench_function(BenchmarkId::new(format!("gemm_down/{how}"), &id), |bn| {
            bn.iter_custom(|n| {
                timed(b, n, &mut || {
                    b.grouped_matmul(black_box(&act), &offsets, &wd, &mut y, dn)
                })
            })
        });
    }
    g.finish();
    Ok(())
}

criterion_group!(benches, kernels);
criterion_main!(benches);
