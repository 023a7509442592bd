//! Criterion benches of every CPU kernel and the whole layer at a small and a
//! medium shape (f32). Run: `cargo bench -p moe-bench --bench kernels`
//! (add `-- route` etc. to filter). The full model-shape sweeps are
//! `moe-bench bench` (see benches/README.md at the repository root).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use moe_hal::conformance::{random_layer, Rng};
use moe_hal::cpu::CpuBackend;
use moe_hal::{
    Activation, Backend, CombineShape, DType, GemmShape, HostSlice, MoeLayer, PermuteShape, Permuted, RouterShape,
    RouterSpec,
};
use std::hint::black_box;
use std::time::Duration;

/// (name, hidden, inter, experts, top_k, tokens)
const SHAPES: [(&str, usize, usize, usize, usize, usize); 2] =
    [("small", 256, 128, 16, 2, 16), ("medium", 1024, 512, 64, 8, 128)];

fn kernels(c: &mut Criterion) {
    let b = CpuBackend::new().expect("the CPU backend is always available");
    for (name, h, i, e, k, t) in SHAPES {
        let spec = RouterSpec::softmax_topk(e, k, true);
        let w = random_layer(1, spec.clone(), h, i, None);
        let mut rng = Rng::new(2);
        let x = b.upload(HostSlice::F32(&rng.vec(t * h, -1.0, 1.0))).unwrap();
        let router_w = b.upload(HostSlice::F32(&w.router_weight)).unwrap();
        let gate_up = b.upload(w.gate_up.as_slice()).unwrap();
        let down = b.upload(w.down.as_slice()).unwrap();
        let mut logits = b.alloc(DType::F32, t * e).unwrap();
        let mut ids = b.alloc(DType::U32, t * k).unwrap();
        let mut rw = b.alloc(DType::F32, t * k).unwrap();
        let pshape = PermuteShape {
            tokens: t,
            hidden: h,
            top_k: k,
            experts: e,
        };
        let mut perm = Permuted::alloc(&b, pshape, DType::F32).unwrap();
        let mut act = b.alloc(DType::F32, t * k * i).unwrap();
        let mut eout = b.alloc(DType::F32, t * k * h).unwrap();
        let mut out = b.alloc(DType::F32, t * h).unwrap();
        let rshape = RouterShape {
            tokens: t,
            hidden: h,
            experts: e,
        };
        let gu = GemmShape {
            rows: t * k,
            in_features: h,
            out_features: i,
            experts: e,
            activation: Activation::SwiGlu,
        };
        let dn = GemmShape {
            rows: t * k,
            in_features: i,
            out_features: h,
            experts: e,
            activation: Activation::None,
        };
        let cs = CombineShape {
            tokens: t,
            hidden: h,
            top_k: k,
            accumulate: false,
        };
        b.router_logits(&x, &router_w, &mut logits, rshape).unwrap();
        b.route(&logits, &spec, t, &mut ids, &mut rw).unwrap();
        b.permute(&x, &ids, pshape, &mut perm).unwrap();
        b.grouped_matmul(&perm.rows, &perm.offsets, &gate_up, &mut act, gu)
            .unwrap();
        b.grouped_matmul(&act, &perm.offsets, &down, &mut eout, dn).unwrap();

        let id = format!("{name}/h{h}-i{i}-e{e}-k{k}-t{t}");
        let mut g = c.benchmark_group("kernels");
        g.sample_size(20)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1));
        g.throughput(Throughput::Elements(t as u64));
        g.bench_function(BenchmarkId::new("route", &id), |bn| {
            bn.iter(|| {
                b.router_logits(&x, &router_w, &mut logits, rshape).unwrap();
                b.route(black_box(&logits), &spec, t, &mut ids, &mut rw).unwrap();
            })
        });
        g.bench_function(BenchmarkId::new("permute", &id), |bn| {
            bn.iter(|| b.permute(black_box(&x), &ids, pshape, &mut perm).unwrap())
        });
        g.bench_function(BenchmarkId::new("gemm_gate_up", &id), |bn| {
            bn.iter(|| {
                b.grouped_matmul(black_box(&perm.rows), &perm.offsets, &gate_up, &mut act, gu)
                    .unwrap()
            })
        });
        g.bench_function(BenchmarkId::new("gemm_down", &id), |bn| {
            bn.iter(|| {
                b.grouped_matmul(black_box(&act), &perm.offsets, &down, &mut eout, dn)
                    .unwrap()
            })
        });
        g.bench_function(BenchmarkId::new("combine", &id), |bn| {
            bn.iter(|| {
                b.combine(black_box(&eout), &ids, &rw, &perm.slot_of, &mut out, cs)
                    .unwrap()
            })
        });
        let mut layer = MoeLayer::new(b.clone(), &w).unwrap();
        g.bench_function(BenchmarkId::new("layer", &id), |bn| {
            bn.iter(|| layer.forward_into(black_box(&x), t, &mut out).unwrap())
        });
        g.finish();
    }
}

criterion_group!(benches, kernels);
criterion_main!(benches);
