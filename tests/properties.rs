//! Property tests: random shapes and specs never panic (bad ones give errors),
//! permute then combine with unit weights is the identity, and per-expert
//! counts sum to T * k.

use moe_hal::conformance::Rng;
use moe_hal::cpu::CpuBackend;
use moe_hal::{
    Activation, Backend, CombineShape, DType, GemmShape, GroupScore, Grouping, HostSlice, HostVec, PermuteShape,
    Permuted, Renorm, RouterSpec, Scoring,
};
use proptest::prelude::*;

fn spec_strategy() -> impl Strategy<Value = RouterSpec> {
    (
        0usize..40,
        0usize..12,
        any::<bool>(),
        prop::option::of((0usize..9, 0usize..9, any::<bool>())),
        0u8..3,
        prop_oneof![
            Just(1.0f32),
            Just(2.5),
            Just(f32::NAN),
            Just(f32::INFINITY),
            -3.0f32..3.0
        ],
        prop::option::of(prop_oneof![Just(0.0f32), Just(f32::NAN), -1.0f32..1.0]),
    )
        .prop_map(|(e, k, sigmoid, groups, renorm, scale, bias)| RouterSpec {
            num_experts: e,
            top_k: k,
            scoring: if sigmoid { Scoring::Sigmoid } else { Scoring::Softmax },
            correction_bias: bias.map(|b| vec![b; e]),
            grouping: groups.map(|(n, t, top2)| Grouping {
                n_group: n,
                topk_group: t,
                score: if top2 { GroupScore::Top2Sum } else { GroupScore::Max },
            }),
            renorm: [Renorm::None, Renorm::Sum, Renorm::SumEps(1e-20)][renorm as usize],
            routed_scaling_factor: scale,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Any spec either routes (valid) or is refused with an error; never a panic.
    #[test]
    fn route_never_panics(spec in spec_strategy(), tokens in 0usize..9, seed in any::<u64>(), short in any::<bool>()) {
        let b = CpuBackend::with_threads(1).unwrap();
        let mut rng = Rng::new(seed);
        let e = spec.num_experts.max(1);
        let n = tokens * e - if short && tokens > 0 { 1 } else { 0 };
        let mut logits = rng.vec(n, -5.0, 5.0);
        if let Some(x) = logits.first_mut() { *x = f32::NAN; }
        let l = b.upload(HostSlice::F32(&logits)).unwrap();
        let kk = spec.top_k.max(1);
        let mut ids = b.alloc(DType::U32, tokens * kk).unwrap();
        let mut w = b.alloc(DType::F32, tokens * kk).unwrap();
        let r = b.route(&l, &spec, tokens, &mut ids, &mut w);
        if spec.validate().is_err() || (short && tokens > 0) {
            prop_assert!(r.is_err());
        } else {
            prop_assert!(r.is_ok(), "{:?}", r);
            let ids = b.download(&ids).unwrap().into_u32().unwrap();
            prop_assert!(ids.iter().all(|&i| (i as usize) < spec.num_experts));
            let w = b.download(&w).unwrap().to_f32().unwrap();
            prop_assert!(w.iter().all(|x| x.is_finite()));
        }
    }

    /// Permute then combine with unit weights gives back the input (k = 1),
    /// or k times the input; counts sum to T * k.
    #[test]
    fn permute_then_combine_is_identity(tokens in 0usize..40, hidden in 1usize..20, e in 1usize..12, k in 1usize..4, seed in any::<u64>(), dt in 0usize..3) {
        let k = k.min(e);
        let dtype = DType::FLOATS[dt];
        let b = CpuBackend::new().unwrap();
        let mut rng = Rng::new(seed);
        let ids: Vec<u32> = (0..tokens).flat_map(|_| rng.distinct(e, k)).collect();
        // Values exactly representable in every dtype, so that k * x is exact too.
        let x: Vec<f32> = (0..tokens * hidden).map(|_| (rng.below(64) as f32 - 32.0) / 8.0).collect();
        let xb = b.upload(HostVec::from_f32(&x, dtype).unwrap().as_slice()).unwrap();
        let ib = b.upload(HostSlice::U32(&ids)).unwrap();
        let s = PermuteShape { tokens, hidden, top_k: k, experts: e };
        let mut p = Permuted::alloc(&b, s, dtype).unwrap();
        b.permute(&xb, &ib, s, &mut p).unwrap();
        let counts = b.download(&p.counts).unwrap().into_u32().unwrap();
        prop_assert_eq!(counts.iter().sum::<u32>() as usize, tokens * k);
        let ones = b.upload(HostSlice::F32(&vec![1.0; tokens * k])).unwrap();
        let mut out = b.alloc(dtype, tokens * hidden).unwrap();
        b.combine(&p.rows, &ib, &ones, &p.slot_of, &mut out, CombineShape { tokens, hidden, top_k: k, accumulate: false }).unwrap();
        let got = b.download(&out).unwrap().to_f32().unwrap();
        let want: Vec<f32> = x.iter().map(|v| v * k as f32).collect();
        prop_assert_eq!(got, want);
    }

    /// Random grouped-matmul shapes and buffer sizes: an error or a result, never a panic.
    #[test]
    fn grouped_matmul_never_panics(rows in 0usize..20, kf in 0usize..9, n in 0usize..9, e in 0usize..4, swiglu in any::<bool>(), wlen in 0usize..400, olen in 0usize..200, off in prop::collection::vec(0u32..25, 0..6)) {
        let b = CpuBackend::with_threads(1).unwrap();
        let x = b.alloc(DType::F32, rows * kf).unwrap();
        let w = b.alloc(DType::F32, wlen).unwrap();
        let o = b.upload(HostSlice::U32(&off)).unwrap();
        let mut y = b.alloc(DType::F32, olen).unwrap();
        let act = if swiglu { Activation::SwiGlu } else { Activation::None };
        let _ = b.grouped_matmul(&x, &o, &w, &mut y, GemmShape { rows, in_features: kf, out_features: n, experts: e, activation: act });
    }

    /// Random shapes for packed bf16 weights (`upload_weights`, then used with a shape that may
    /// differ): an error or a result, never a panic.
    #[test]
    fn packed_weights_never_panic(rows in 0usize..20, kf in 0usize..9, n in 0usize..9, e in 0usize..4, swiglu in any::<bool>(), wlen in 0usize..400, exact in any::<bool>(), kf2 in 0usize..9, olen in 0usize..200, off in prop::collection::vec(0u32..25, 0..6)) {
        let b = CpuBackend::with_threads(1).unwrap();
        let act = if swiglu { Activation::SwiGlu } else { Activation::None };
        let s = GemmShape { rows, in_features: kf, out_features: n, experts: e, activation: act };
        // Half the cases have the right length, so that they reach the packed matmul.
        let wlen = if exact { e * s.weight_rows() * kf } else { wlen };
        let Ok(w) = b.upload_weights(HostSlice::BF16(&vec![moe_hal::bf16::ONE; wlen]), s) else { return Ok(()) };
        prop_assert_eq!(b.download(&w).unwrap().len(), wlen);
        let x = b.alloc(DType::BF16, rows * kf2).unwrap();
        let o = b.upload(HostSlice::U32(&off)).unwrap();
        let mut y = b.alloc(DType::BF16, olen).unwrap();
        let _ = b.grouped_matmul(&x, &o, &w, &mut y, GemmShape { in_features: kf2, ..s });
    }
}
