//! Every SIMD level and packing option of this CPU (vdpbf16ps packing on and off, f32 packed and
//! as stored) at the edge shapes of its tiles (in_features 1-2049, heights 0-257 per expert,
//! empty experts, offsets not starting at 0), in f32, bf16 and f16, against the float64 reference
//! element by element; rows outside the offsets stay untouched. The conformance suite runs the
//! default level only for some of these (router_logits, permute_matmul's bits); this file runs
//! them all. From an unsafe-code review, which found nothing these tests or AddressSanitizer
//! showed wrong.

use moe_hal_core::conformance::Rng;
use moe_hal_core::{reference, Activation, Backend, DType, GemmShape, HostSlice, HostVec, PermuteShape, Permuted};
use moe_hal_cpu::{CpuBackend, CpuBuffer, Simd};

fn configs(threads: usize) -> Vec<(String, CpuBackend)> {
    let mut v = Vec::new();
    for simd in Simd::supported() {
        for pf32 in [false, true] {
            if pf32 && simd == Simd::Portable {
                continue;
            }
            for dp in [false, true] {
                if dp && !simd.has_bf16() {
                    continue;
                }
                let b = CpuBackend::with_threads(threads)
                    .unwrap()
                    .with_simd(simd)
                    .unwrap()
                    .with_packed_f32(pf32)
                    .unwrap()
                    .with_packed_dpbf16(dp)
                    .unwrap();
                v.push((format!("{simd:?} pf32={pf32} dp={dp}"), b));
            }
        }
    }
    v
}

fn tol(d: DType) -> f64 {
    match d {
        DType::F32 => 2e-4,
        DType::BF16 => 3e-2,
        DType::F16 => 4e-3,
        DType::U32 => unreachable!(),
    }
}

struct Case {
    x: HostVec,
    w: HostVec,
    offsets: Vec<u32>,
    s: GemmShape,
    want: Vec<f64>,
}

#[allow(clippy::too_many_arguments)]
fn case(dtype: DType, k: usize, n: usize, act: Activation, lead: usize, per: &[usize], tail: usize, seed: u64) -> Case {
    let mut rng = Rng::new(seed);
    let mut offsets = vec![lead as u32];
    for &p in per {
        offsets.push(offsets.last().unwrap() + p as u32);
    }
    let rows = *offsets.last().unwrap() as usize + tail;
    let s = GemmShape {
        rows,
        in_features: k,
        out_features: n,
        experts: per.len(),
        activation: act,
    };
    let scale = 1.0 / (k as f32).sqrt();
    let x = HostVec::from_f32(&rng.vec(rows * k, -1.0, 1.0), dtype).unwrap();
    let w = HostVec::from_f32(&rng.vec(per.len() * s.weight_rows() * k, -scale, scale), dtype).unwrap();
    let want = reference::grouped_matmul(&x.to_f64(), &offsets, &w.to_f64(), s);
    Case { x, w, offsets, s, want }
}

const SENTINEL: f32 = 7.0;

/// Expert weights of `s` by `upload_weights` where `packed`, else as a plain buffer.
fn weights(b: &CpuBackend, w: &HostVec, s: GemmShape, packed: bool) -> CpuBuffer {
    if packed {
        b.upload_weights(w.as_slice(), GemmShape { rows: 0, ..s }).unwrap()
    } else {
        b.upload(w.as_slice()).unwrap()
    }
}

/// Fails with the first 40 failures listed.
fn report(fails: &[String]) {
    let shown: Vec<&str> = fails.iter().take(40).map(String::as_str).collect();
    assert!(fails.is_empty(), "{} failures:\n{}", fails.len(), shown.join("\n"));
}

/// `got` within `tol` of `want`, relative above 1 and absolute below; NaN is never close.
fn close(got: f64, want: f64, tol: f64) -> bool {
    (got - want).abs() <= tol * (1.0 + want.abs())
}

/// Inputs `k`, outputs `n`, activation, rows before the first expert's, rows per expert, rows
/// after the last expert's.
type Shape = (usize, usize, Activation, usize, Vec<usize>, usize);

fn run_case(b: &CpuBackend, c: &Case, packed: bool) -> Result<(), String> {
    let s = c.s;
    let dtype = c.x.dtype();
    let xb = b.upload(c.x.as_slice()).unwrap();
    let ob = b.upload(HostSlice::U32(&c.offsets)).unwrap();
    let wb = weights(b, &c.w, GemmShape { rows: 0, ..s }, packed);
    let n = s.out_features;
    let init = HostVec::from_f32(&vec![SENTINEL; s.rows * n], dtype).unwrap();
    let mut yb = b.upload(init.as_slice()).unwrap();
    b.grouped_matmul(&xb, &ob, &wb, &mut yb, s).map_err(|e| e.to_string())?;
    let got = b.download(&yb).unwrap().to_f64();
    let (lo, hi) = (c.offsets[0] as usize, c.offsets[s.experts] as usize);
    for r in 0..s.rows {
        for o in 0..n {
            let g = got[r * n + o];
            if r < lo || r >= hi {
                if g != SENTINEL as f64 {
                    return Err(format!("row {r} col {o} outside offsets written: {g}"));
                }
                continue;
            }
            let w = c.want[r * n + o];
            if !close(g, w, tol(dtype)) {
                let e = c.offsets.iter().rposition(|&v| v as usize <= r).unwrap();
                return Err(format!("row {r} (expert {e}) col {o}: got {g}, want {w}"));
            }
        }
    }
    Ok(())
}

fn sweep(name: &str, cases: &[Shape], threads: usize) {
    let cfgs = configs(threads);
    let mut fails = Vec::new();
    for (ci, (k, n, act, lead, per, tail)) in cases.iter().enumerate() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let c = case(dtype, *k, *n, *act, *lead, per, *tail, 1000 + ci as u64);
            for (cname, b) in &cfgs {
                for packed in [false, true] {
                    if let Err(e) = run_case(b, &c, packed) {
                        fails.push(format!(
                            "{name}: {cname} {dtype} packed={packed} k={k} n={n} {act:?} lead={lead} per={per:?}: {e}"
                        ));
                    }
                }
            }
        }
    }
    eprintln!("{name}: {} cases x {} configs", cases.len(), cfgs.len());
    report(&fails);
}

/// Per-expert row counts covering every tile-height regime, experts with no rows between.
fn per_all() -> Vec<usize> {
    vec![
        0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 20, 21, 24, 25, 0, 29, 33, 65, 129,
    ]
}

#[test]
fn small_k_all_heights() {
    let mut cases = Vec::new();
    for k in [1, 2, 3, 15, 17, 31, 33, 63, 65] {
        for n in [1, 17, 33, 65] {
            for act in [Activation::None, Activation::SwiGlu] {
                cases.push((k, n, act, 0, per_all(), 0));
            }
        }
    }
    sweep("small_k", &cases, 2);
}

#[test]
fn long_k_wide_n() {
    let per = vec![1, 4, 5, 8, 9, 12, 13, 16, 17, 24, 25, 33];
    let mut cases = Vec::new();
    for (k, n) in [(257, 300), (1025, 70), (1031, 300), (2049, 40), (130, 513), (64, 1000)] {
        for act in [Activation::None, Activation::SwiGlu] {
            cases.push((k, n, act, 0, per.clone(), 0));
        }
    }
    sweep("long_k", &cases, 2);
}

#[test]
fn offsets_not_starting_at_zero_and_tails() {
    let cases = vec![
        (33, 19, Activation::SwiGlu, 3, vec![1, 0, 17, 13], 5),
        (64, 40, Activation::None, 20, vec![16, 9], 7),
        (1030, 16, Activation::None, 9, vec![8, 12], 3),
    ];
    sweep("offsets", &cases, 2);
}

#[test]
fn many_experts_few_rows() {
    let mut per = vec![0usize; 3000];
    per[0] = 1;
    per[1234] = 3;
    per[2999] = 20;
    per[1500] = 1;
    let cases = vec![(40, 24, Activation::SwiGlu, 0, per, 0)];
    sweep("many_experts", &cases, 2);
}

/// A fused permute + gate/up case: routing, inputs and weights of `(tokens, hidden, top_k,
/// experts, inter, activation)`.
struct Fused {
    p: PermuteShape,
    g: GemmShape,
    ids: Vec<u32>,
    x: HostVec,
    w: HostVec,
}

fn fused(
    seed: u64,
    dtype: DType,
    (t, h, topk, e, inter, act): (usize, usize, usize, usize, usize, Activation),
) -> Fused {
    let mut rng = Rng::new(seed);
    let p = PermuteShape {
        tokens: t,
        hidden: h,
        top_k: topk,
        experts: e,
    };
    let g = GemmShape {
        rows: t * topk,
        in_features: h,
        out_features: inter,
        experts: e,
        activation: act,
    };
    let ids: Vec<u32> = (0..t).flat_map(|_| rng.distinct(e, topk)).collect();
    let scale = 1.0 / (h as f32).sqrt();
    let x = HostVec::from_f32(&rng.vec(t * h, -1.0, 1.0), dtype).unwrap();
    let w = HostVec::from_f32(&rng.vec(e * g.weight_rows() * h, -scale, scale), dtype).unwrap();
    Fused { p, g, ids, x, w }
}

/// permute_matmul (gathered where the backend gathers) against the reference, at every level.
#[test]
fn permute_matmul_every_level() {
    let cfgs = configs(2);
    let mut fails = Vec::new();
    for (ci, &(t, h, topk, e, inter, act)) in [
        (1usize, 33usize, 2usize, 4usize, 19usize, Activation::SwiGlu),
        (13, 65, 4, 8, 40, Activation::None),
        (40, 17, 8, 16, 33, Activation::SwiGlu),
        (64, 130, 2, 3, 300, Activation::SwiGlu),
        (3, 2050, 2, 2, 17, Activation::None),
        (0, 16, 2, 4, 8, Activation::SwiGlu),
    ]
    .iter()
    .enumerate()
    {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let Fused { p, g, ids, x, w } = fused(77 + ci as u64, dtype, (t, h, topk, e, inter, act));
            let m = reference::permute_maps(&ids, t, topk, e);
            let rows = reference::gather(&x.to_f64(), h, topk, &m.source_of);
            let want = reference::grouped_matmul(&rows, &m.offsets, &w.to_f64(), g);
            for (cname, b) in &cfgs {
                for packed in [false, true] {
                    let xb = b.upload(x.as_slice()).unwrap();
                    let ib = b.upload(HostSlice::U32(&ids)).unwrap();
                    let wb = weights(b, &w, g, packed);
                    let mut perm = if b.permute_matmul_copies_rows(dtype, &wb) {
                        Permuted::alloc(b, p, dtype).unwrap()
                    } else {
                        Permuted::alloc_without_rows(b, p, dtype).unwrap()
                    };
                    let mut y = b.alloc(dtype, t * topk * inter).unwrap();
                    if let Err(err) = b.permute_matmul(&xb, &ib, p, &mut perm, &wb, &mut y, g) {
                        fails.push(format!("{cname} {dtype} packed={packed} case {ci}: error {err}"));
                        continue;
                    }
                    let got = b.download(&y).unwrap().to_f64();
                    if let Some(i) = (0..want.len()).find(|&i| !close(got[i], want[i], tol(dtype))) {
                        fails.push(format!(
                            "{cname} {dtype} packed={packed} case {ci}: [{i}] got {} want {}",
                            got[i], want[i]
                        ));
                    }
                }
            }
        }
    }
    report(&fails);
}

/// router_logits (f32 weights as uploaded, and as `upload_weights` packs them where the level
/// packs f32; hidden of any dtype) at every level against f64.
#[test]
fn router_logits_every_level() {
    use moe_hal_core::RouterShape;
    let cfgs = configs(2);
    let mut fails = Vec::new();
    let mut seed = 5u64;
    for &tokens in &[0usize, 1, 2, 5, 7, 8, 9, 10, 13, 14, 16, 17, 20, 33, 129, 200] {
        for &(hidden, experts) in &[
            (1usize, 3usize),
            (3, 17),
            (17, 16),
            (64, 1),
            (65, 64),
            (1025, 257),
            (2050, 9),
            (300, 600),
        ] {
            seed += 1;
            let mut rng = Rng::new(seed);
            let scale = 1.0 / (hidden as f32).sqrt();
            let wv = rng.vec(experts * hidden, -scale, scale);
            let xv = rng.vec(tokens * hidden, -1.0, 1.0);
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let x = HostVec::from_f32(&xv, dtype).unwrap();
                let xd = x.to_f64();
                let s = RouterShape {
                    tokens,
                    hidden,
                    experts,
                };
                for ((cname, b), packed) in cfgs.iter().flat_map(|c| [(c, false), (c, true)]) {
                    let xb = b.upload(x.as_slice()).unwrap();
                    let wb = if packed {
                        b.upload_weights(HostSlice::F32(&wv), s.as_gemm()).unwrap()
                    } else {
                        b.upload(HostSlice::F32(&wv)).unwrap()
                    };
                    let cname = format!("{cname}{}", if packed { " upload_weights" } else { "" });
                    let mut lb = b.upload(HostSlice::F32(&vec![SENTINEL; tokens * experts + 3])).unwrap();
                    b.router_logits(&xb, &wb, &mut lb, s).unwrap();
                    let got = b.download(&lb).unwrap().to_f64();
                    if got[tokens * experts..].iter().any(|&v| v != SENTINEL as f64) {
                        fails.push(format!("{cname} {dtype} T={tokens} H={hidden} E={experts}: wrote past"));
                    }
                    'o: for t in 0..tokens {
                        for e in 0..experts {
                            let want: f64 = (0..hidden)
                                .map(|i| xd[t * hidden + i] * wv[e * hidden + i] as f64)
                                .sum();
                            let g = got[t * experts + e];
                            if !close(g, want, 1e-4) {
                                fails.push(format!(
                                    "{cname} {dtype} T={tokens} H={hidden} E={experts}: [{t},{e}] got {g} want {want}"
                                ));
                                break 'o;
                            }
                        }
                    }
                }
            }
        }
    }
    report(&fails);
}

/// permute_matmul gives the bits of permute then grouped_matmul at every level (the conformance
/// suite checks this at the default level only), and 1 vs 3 threads give the same bits.
#[test]
fn permute_matmul_bits_every_level_and_threads() {
    let mut fails = Vec::new();
    for threads in [1usize, 3] {
        for (cname, b) in configs(threads) {
            for (ci, &(t, h, topk, e, inter, act)) in [
                (13usize, 65usize, 4usize, 8usize, 40usize, Activation::None),
                (40, 18, 8, 16, 33, Activation::SwiGlu),
                (64, 130, 2, 3, 300, Activation::SwiGlu),
                (5, 2049, 3, 4, 17, Activation::SwiGlu),
            ]
            .iter()
            .enumerate()
            {
                for dtype in [DType::F32, DType::BF16, DType::F16] {
                    let Fused { p, g, ids, x, w } = fused(99 + ci as u64, dtype, (t, h, topk, e, inter, act));
                    for packed in [false, true] {
                        let xb = b.upload(x.as_slice()).unwrap();
                        let ib = b.upload(HostSlice::U32(&ids)).unwrap();
                        let wb = weights(&b, &w, g, packed);
                        let mut p1 = Permuted::alloc(&b, p, dtype).unwrap();
                        let mut y1 = b.alloc(dtype, t * topk * inter).unwrap();
                        b.permute(&xb, &ib, p, &mut p1).unwrap();
                        b.grouped_matmul(&p1.rows, &p1.offsets, &wb, &mut y1, g).unwrap();
                        let mut p2 = Permuted::alloc(&b, p, dtype).unwrap();
                        let mut y2 = b.alloc(dtype, t * topk * inter).unwrap();
                        b.permute_matmul(&xb, &ib, p, &mut p2, &wb, &mut y2, g).unwrap();
                        let (a, c) = (b.download(&y1).unwrap(), b.download(&y2).unwrap());
                        if a != c {
                            fails.push(format!(
                                "{cname} threads={threads} {dtype} packed={packed} case {ci}: bits differ"
                            ));
                        }
                    }
                }
            }
        }
    }
    report(&fails);
}

/// Packed tiles of many lane blocks with short last passes (122 rows: 10 x 12 + 2), ranges of k.
#[test]
fn tall_tiles_short_last_pass() {
    let per = vec![122, 97, 100, 110, 121, 125, 128, 255, 256, 257];
    let mut cases = Vec::new();
    for (k, n) in [(300, 40), (7, 33), (129, 257)] {
        for act in [Activation::None, Activation::SwiGlu] {
            cases.push((k, n, act, 0, per.clone(), 0));
        }
    }
    sweep("tall", &cases, 2);
}

fn bits_of(b: &CpuBackend, c: &Case, packed: bool) -> HostVec {
    let s = c.s;
    let xb = b.upload(c.x.as_slice()).unwrap();
    let ob = b.upload(HostSlice::U32(&c.offsets)).unwrap();
    let wb = weights(b, &c.w, GemmShape { rows: 0, ..s }, packed);
    let mut yb = b.alloc(c.x.dtype(), s.rows * s.out_features).unwrap();
    b.grouped_matmul(&xb, &ob, &wb, &mut yb, s).unwrap();
    b.download(&yb).unwrap()
}

/// The same bits with 1, 2 and 5 threads, every level and option.
#[test]
fn bits_do_not_depend_on_threads() {
    let cfg: Vec<_> = [1usize, 2, 5].iter().map(|&t| configs(t)).collect();
    let mut fails = Vec::new();
    for (ci, &(k, n, act)) in [
        (17usize, 65usize, Activation::SwiGlu),
        (1031, 300, Activation::None),
        (64, 1000, Activation::SwiGlu),
    ]
    .iter()
    .enumerate()
    {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let c = case(
                dtype,
                k,
                n,
                act,
                0,
                &[1, 5, 8, 9, 13, 16, 17, 24, 33, 129],
                0,
                500 + ci as u64,
            );
            for i in 0..cfg[0].len() {
                for packed in [false, true] {
                    let base = bits_of(&cfg[0][i].1, &c, packed);
                    for t in 1..cfg.len() {
                        if bits_of(&cfg[t][i].1, &c, packed) != base {
                            fails.push(format!(
                                "{} {dtype} k={k} n={n} packed={packed}: thread set {t} differs",
                                cfg[0][i].0
                            ));
                        }
                    }
                }
            }
        }
    }
    report(&fails);
}

/// Non-finite inputs propagate as in the f64 reference (no NaN from padding lanes).
#[test]
fn non_finite_inputs() {
    let cfgs = configs(2);
    let mut fails = Vec::new();
    for (k, n) in [(1usize, 1usize), (3, 17), (17, 33), (33, 40), (65, 65)] {
        {
            let per = [1usize, 3, 8, 9, 13, 17, 20, 25, 33];
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let mut c = case(dtype, k, n, Activation::None, 0, &per, 0, 3);
                // One +inf per input row, at a varying position; weights strictly positive.
                let mut xf = c.x.to_f32().unwrap();
                let rows = c.s.rows;
                for r in 0..rows {
                    xf[r * k + (r * 7) % k] = f32::INFINITY;
                    for i in 0..k {
                        if i != (r * 7) % k {
                            xf[r * k + i] = xf[r * k + i].abs();
                        }
                    }
                }
                let wf: Vec<f32> = c.w.to_f32().unwrap().iter().map(|v| v.abs() + 0.01).collect();
                c.x = HostVec::from_f32(&xf, dtype).unwrap();
                c.w = HostVec::from_f32(&wf, dtype).unwrap();
                for (cname, b) in &cfgs {
                    for packed in [false, true] {
                        let got = bits_of(b, &c, packed).to_f64();
                        if let Some(i) = got.iter().position(|&v| v != f64::INFINITY) {
                            fails.push(format!(
                                "{cname} {dtype} packed={packed} k={k} n={n}: [{i}] = {}",
                                got[i]
                            ));
                        }
                    }
                }
            }
        }
    }
    report(&fails);
}
