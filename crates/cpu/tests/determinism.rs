//! CPU-specific guarantees: bit-identical results whatever the thread count,
//! and the documented summation order of combine, checked bit for bit.

use moe_hal_core::conformance::{layer_input, random_layer, Rng};
use moe_hal_core::{Backend, CombineShape, DType, HostSlice, HostVec, MoeLayer, RouterSpec};
use moe_hal_cpu::CpuBackend;

fn layer_bits(threads: usize, dtype: DType, tokens: usize) -> Vec<u32> {
    let spec = RouterSpec::deepseek_v3(64, 8, 8, 4, Some(Rng::new(3).vec(64, -0.2, 0.2)), true, 2.5);
    let w = random_layer(9, spec, 200, 144, Some((144, false)))
        .to_dtype(dtype)
        .unwrap();
    let x = layer_input(4, &w, tokens, dtype).unwrap();
    let b = CpuBackend::with_threads(threads).unwrap();
    let mut layer = MoeLayer::new(b.clone(), &w).unwrap();
    let xb = b.upload(HostVec::from_f32(&x, dtype).unwrap().as_slice()).unwrap();
    let out = layer.forward(&xb, tokens).unwrap();
    b.download(&out)
        .unwrap()
        .to_f32()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

/// 1, 2 and 16 threads: on 16, decode tiles are narrower (enough for every thread) and the
/// layer's `down` tiles lag further behind the gate/up ones.
#[test]
fn layer_is_bit_identical_for_1_2_and_16_threads() {
    for dtype in [DType::F32, DType::BF16] {
        for tokens in [1, 67, 300] {
            let one = layer_bits(1, dtype, tokens);
            for threads in [2, 16] {
                assert_eq!(
                    one,
                    layer_bits(threads, dtype, tokens),
                    "{dtype} T={tokens}, {threads} threads"
                );
            }
        }
    }
}

/// Bit for bit the contract's order: per token and column, from 0, `w * y` added term by term in
/// ascending expert id, then added to the previous output when accumulating, rounded once. Rows
/// shorter and longer than the kernel's steps of 64 columns (with a tail), f32 and bf16, expert
/// rows in a shuffled order.
#[test]
fn combine_sums_in_ascending_expert_id() {
    use half::bf16;
    let (t, k) = (33, 4);
    for h in [24, 2 * 64 + 5] {
        for dtype in [DType::F32, DType::BF16] {
            for accumulate in [false, true] {
                let mut rng = Rng::new(5 + h as u64);
                let ids: Vec<u32> = (0..t).flat_map(|_| rng.distinct(16, k)).collect();
                let n = (t * k) as u32;
                let slot_of: Vec<u32> = (0..n).map(|f| (f * 7 + 3) % n).collect();
                let round = |v: Vec<f32>| match dtype {
                    DType::BF16 => v.into_iter().map(|x| bf16::from_f32(x).to_f32()).collect(),
                    _ => v,
                };
                let (y, w, prev) = (
                    round(rng.vec(t * k * h, -3.0, 3.0)),
                    rng.vec(t * k, 0.0, 2.0),
                    round(rng.vec(t * h, -1.0, 1.0)),
                );
                let host = |v: &[f32]| moe_hal_core::HostVec::from_f32(v, dtype).unwrap();
                let b = CpuBackend::new().unwrap();
                let (yb, ib, wb, sb) = (
                    b.upload(host(&y).as_slice()).unwrap(),
                    b.upload(HostSlice::U32(&ids)).unwrap(),
                    b.upload(HostSlice::F32(&w)).unwrap(),
                    b.upload(HostSlice::U32(&slot_of)).unwrap(),
                );
                let mut out = b.upload(host(&prev).as_slice()).unwrap();
                let s = CombineShape {
                    tokens: t,
                    hidden: h,
                    top_k: k,
                    accumulate,
                };
                b.combine(&yb, &ib, &wb, &sb, &mut out, s).unwrap();
                let got = b.download(&out).unwrap().to_f32().unwrap();
                for tok in 0..t {
                    let mut js: Vec<usize> = (0..k).collect();
                    js.sort_by_key(|&j| ids[tok * k + j]);
                    for c in 0..h {
                        let mut acc = 0.0f32;
                        for &j in &js {
                            let f = tok * k + j;
                            acc += w[f] * y[slot_of[f] as usize * h + c];
                        }
                        let v = if accumulate { prev[tok * h + c] + acc } else { acc };
                        let want = round(vec![v])[0];
                        assert_eq!(
                            want.to_bits(),
                            got[tok * h + c].to_bits(),
                            "{dtype:?} h {h} accumulate {accumulate}: token {tok} column {c}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn out_of_range_ids_and_offsets_are_errors() {
    use moe_hal_core::{Activation, GemmShape, PermuteShape, Permuted};
    let b = CpuBackend::new().unwrap();
    let x = b.alloc(DType::F32, 8).unwrap();
    let ids = b.upload(HostSlice::U32(&[0, 9])).unwrap();
    let s = PermuteShape {
        tokens: 2,
        hidden: 4,
        top_k: 1,
        experts: 4,
    };
    let mut p = Permuted::alloc(&b, s, DType::F32).unwrap();
    let e = b.permute(&x, &ids, s, &mut p).unwrap_err().to_string();
    assert!(e.contains("ids[1]") && e.contains("below 4"), "{e}");
    let off = b.upload(HostSlice::U32(&[0, 2, 1])).unwrap();
    let w = b.alloc(DType::F32, 2 * 3 * 4).unwrap();
    let mut y = b.alloc(DType::F32, 2 * 3).unwrap();
    let gs = GemmShape {
        rows: 2,
        in_features: 4,
        out_features: 3,
        experts: 2,
        activation: Activation::None,
    };
    let e = b.grouped_matmul(&x, &off, &w, &mut y, gs).unwrap_err().to_string();
    assert!(e.contains("offsets[2]"), "{e}");
    let off = b.upload(HostSlice::U32(&[0, 2, 5])).unwrap();
    let e = b.grouped_matmul(&x, &off, &w, &mut y, gs).unwrap_err().to_string();
    assert!(e.contains("at most rows = 2"), "{e}");
}

/// The shared conformance suites on every instruction-set level this CPU has: grouped matmul, the
/// permute fused with it, and layer each with f32 weights packed and as stored, and bf16 ones packed for `vdpbf16ps` and not
/// where the level has it; routing and combine once per level (the default run covers only the
/// best level with this CPU's default choices).
#[test]
fn conformance_on_every_simd_level() {
    use moe_hal_core::conformance;
    use moe_hal_cpu::Simd;
    for simd in Simd::supported() {
        for (f32, dp) in [(false, false), (true, false), (false, true), (true, true)] {
            let b = CpuBackend::new().unwrap().with_simd(simd).unwrap();
            let b = match b.with_packed_f32(f32).and_then(|b| b.with_packed_dpbf16(dp)) {
                Ok(b) => b,
                Err(e) => {
                    // The only refusals: packed f32 at the portable level, vdpbf16ps without AVX512-BF16.
                    assert!(
                        (f32 && simd == Simd::Portable) || (dp && !simd.has_bf16()),
                        "{simd:?}: {e}"
                    );
                    continue;
                }
            };
            for report in [
                conformance::gemm_suite(&b, false),
                conformance::permute_matmul_suite(&b, false),
                conformance::layer_suite(&b, true),
            ] {
                assert!(report.passed(), "{simd:?}, packed f32 {f32}, vdpbf16ps {dp}:\n{report}");
            }
            eprintln!(
                "{simd:?}, packed f32 {f32}, vdpbf16ps {dp}: grouped_matmul, permute_matmul and layer suites pass"
            );
        }
        // Routing (softmax and sigmoid on 16 lanes at the AVX-512 levels) and combine (compiled for
        // AVX-512 there) do not depend on the weights' packing.
        let b = CpuBackend::new().unwrap().with_simd(simd).unwrap();
        for report in [
            conformance::route_suite(&b, false),
            conformance::combine_suite(&b, false),
        ] {
            assert!(report.passed(), "{simd:?}:\n{report}");
        }
    }
}

/// Layers on one backend from several threads at once: rayon may run one call's tiles on a thread
/// that waits inside another call, so per-thread buffers must not be held across parallel sections
/// (a held borrow would panic). Every thread gets the single-threaded bits.
#[test]
fn concurrent_layers_on_one_backend() {
    let want = layer_bits(1, DType::F32, 300);
    let b = CpuBackend::with_threads(2).unwrap();
    let spec = RouterSpec::deepseek_v3(64, 8, 8, 4, Some(Rng::new(3).vec(64, -0.2, 0.2)), true, 2.5);
    let w = random_layer(9, spec, 200, 144, Some((144, false)));
    let x = layer_input(4, &w, 300, DType::F32).unwrap();
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                let mut layer = MoeLayer::new(b.clone(), &w).unwrap();
                let xb = b.upload(HostSlice::F32(&x)).unwrap();
                for _ in 0..10 {
                    let out = layer.forward(&xb, 300).unwrap();
                    let bits: Vec<u32> = b
                        .download(&out)
                        .unwrap()
                        .to_f32()
                        .unwrap()
                        .iter()
                        .map(|v| v.to_bits())
                        .collect();
                    assert_eq!(bits, want);
                }
            });
        }
    });
}
