//! The conformance suite, written once and run against every backend (by
//! `tests/conformance.rs` and by `moe-bench verify`).
//!
//! Cases are generated from fixed seeds. Expert ids must equal the float64
//! reference exactly; values must be within [`tolerance`] (relative L2, NaN
//! never passes). Random router inputs are drawn so that every routing
//! decision is either an exact tie (built on purpose by copying logits, bias
//! or whole groups, so that every precision sees the same tie) or separated by
//! a clear margin; ties are then decided by the contract (lower id wins), not
//! by rounding luck.

use crate::backend::{
    tolerance, Activation, Backend, CombineShape, GemmShape, Kernel, PermuteShape, Permuted, RouterShape,
};
use crate::dtype::{DType, HostSlice, HostVec};
use crate::error::{MoeError, Result};
use crate::layer::{LayerWeights, MoeLayer, SharedWeights};
use crate::reference::{self, rel_l2, RouteDetail};
use crate::spec::{GroupScore, Grouping, Renorm, RouterSpec, Scoring};
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Deterministic generator (splitmix64): the same cases on every machine.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
    /// `k` distinct values below `n`, in random order.
    pub fn distinct(&mut self, n: usize, k: usize) -> Vec<u32> {
        let mut all: Vec<u32> = (0..n as u32).collect();
        for i in 0..k {
            let j = i + self.below(n - i);
            all.swap(i, j);
        }
        all.truncate(k);
        all
    }
}

/// One case's outcome.
#[derive(Clone, Debug)]
pub struct CaseResult {
    pub kernel: &'static str,
    pub case: String,
    pub dtype: DType,
    /// Worst relative L2 error seen (0 for exact comparisons).
    pub error: f64,
    pub tolerance: f64,
    /// `None` when the case passed.
    pub failure: Option<String>,
}

/// Outcomes of a suite run on one backend.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub backend: String,
    pub results: Vec<CaseResult>,
}

impl Report {
    pub fn failures(&self) -> Vec<&CaseResult> {
        self.results.iter().filter(|r| r.failure.is_some()).collect()
    }
    pub fn passed(&self) -> bool {
        self.failures().is_empty() && !self.results.is_empty()
    }
    fn push(
        &mut self,
        kernel: &'static str,
        case: String,
        dtype: DType,
        f: impl FnOnce() -> Result<(f64, f64), String>,
    ) {
        let (error, tolerance, failure) = match catch_unwind(AssertUnwindSafe(f)) {
            Ok(Ok((err, tol))) if err <= tol => (err, tol, None),
            Ok(Ok((err, tol))) => (
                err,
                tol,
                Some(format!("relative L2 error {err:.3e} > tolerance {tol:.1e}")),
            ),
            Ok(Err(msg)) => (f64::NAN, f64::NAN, Some(msg)),
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "non-string panic".into());
                (f64::NAN, f64::NAN, Some(format!("PANIC: {msg}")))
            }
        };
        self.results.push(CaseResult {
            kernel,
            case,
            dtype,
            error,
            tolerance,
            failure,
        });
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "backend {}: {} cases, {} failed",
            self.backend,
            self.results.len(),
            self.failures().len()
        )?;
        for r in &self.results {
            let status = match &r.failure {
                None => "ok".to_string(),
                Some(m) => format!("FAIL: {m}"),
            };
            writeln!(
                f,
                "  {:<15} {:<5} {:<48} err {:>9.2e}  {}",
                r.kernel, r.dtype, r.case, r.error, status
            )?;
        }
        Ok(())
    }
}

fn e2s(e: MoeError) -> String {
    e.to_string()
}

fn floats<B: Backend>(b: &B, buf: &B::Buffer, n: usize) -> Result<Vec<f64>, String> {
    let v = b.download(buf).map_err(e2s)?;
    if v.len() < n {
        return Err(format!("buffer holds {} elements; expected at least {n}", v.len()));
    }
    Ok(v.to_f64()[..n].to_vec())
}

fn u32s<B: Backend>(b: &B, buf: &B::Buffer, n: usize) -> Result<Vec<u32>, String> {
    let v = b.download(buf).map_err(e2s)?;
    let got = v.dtype();
    let v = v
        .into_u32()
        .ok_or_else(|| format!("expected a u32 buffer, got {got}"))?;
    if v.len() < n {
        return Err(format!("buffer holds {} elements; expected at least {n}", v.len()));
    }
    Ok(v[..n].to_vec())
}

fn exact(what: &str, got: &[u32], want: &[u32], row: usize) -> Result<(), String> {
    if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
        let r = i / row.max(1);
        let (a, z) = (r * row, ((r + 1) * row).min(want.len()));
        return Err(format!(
            "{what} differ at row {r}: got {:?}, reference {:?}",
            &got[a..z],
            &want[a..z]
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------- margins

/// True when `a` and `b` are exactly equal or clearly apart.
fn separated(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() > 1e-5 * a.abs().max(b.abs()) + 1e-6
}

/// True when every decision the router makes for this token is robust to
/// f32 rounding: the kept/dropped group boundary, and the order of the chosen
/// experts down to the first expert left out.
pub fn decisive(d: &RouteDetail, spec: &RouterSpec) -> bool {
    if let Some(g) = spec.grouping {
        let order = reference::ranked(&d.group_scores);
        if g.topk_group < g.n_group
            && !separated(
                d.group_scores[order[g.topk_group - 1]],
                d.group_scores[order[g.topk_group]],
            )
        {
            return false;
        }
    }
    // Chosen experts in order, then the best one left out (conservatively, from any group).
    let mut line: Vec<f64> = d.ids.iter().map(|&i| d.selection[i as usize]).collect();
    if let Some(&next) = reference::ranked(&d.selection)
        .iter()
        .find(|&&i| !d.ids.contains(&(i as u32)))
    {
        line.push(d.selection[next]);
    }
    line.windows(2).all(|w| separated(w[0], w[1]))
}

/// Redraws the rows of `logits` (via `draw`) until every token's routing is decisive.
fn make_decisive(logits: &mut [f32], tokens: usize, spec: &RouterSpec, mut draw: impl FnMut(&mut [f32])) {
    let e = spec.num_experts;
    for t in 0..tokens {
        for _ in 0..200 {
            let row: Vec<f64> = logits[t * e..(t + 1) * e].iter().map(|&x| x as f64).collect();
            if decisive(&reference::route_token(&row, spec), spec) {
                break;
            }
            draw(&mut logits[t * e..(t + 1) * e]);
        }
    }
}

// ---------------------------------------------------------------- route

/// A named router case: the spec and its logits.
pub struct RouteCase {
    pub name: String,
    pub spec: RouterSpec,
    pub tokens: usize,
    pub logits: Vec<f32>,
}

/// Copies some logits (and bias) onto other experts so that exact ties occur.
fn plant_ties(rng: &mut Rng, logits: &mut [f32], e: usize, bias: &mut Option<Vec<f32>>) {
    for row in logits.chunks_mut(e) {
        for _ in 0..(e / 4).max(1) {
            let (a, b) = (rng.below(e), rng.below(e));
            row[b] = row[a];
        }
    }
    if let Some(bias) = bias {
        // A shared bias value keeps copied logits tied after the bias.
        let v = bias[0];
        bias.iter_mut().for_each(|x| *x = v);
    }
}

fn route_case(seed: u64, name: &str, spec: RouterSpec, tokens: usize, ties: bool) -> RouteCase {
    let mut rng = Rng::new(seed);
    let e = spec.num_experts;
    let mut spec = spec;
    let mut logits = rng.vec(tokens * e, -4.0, 4.0);
    if ties {
        plant_ties(&mut rng, &mut logits, e, &mut spec.correction_bias);
    } else {
        make_decisive(&mut logits, tokens, &spec, |row| {
            row.iter_mut().for_each(|x| *x = rng.uniform(-4.0, 4.0))
        });
    }
    RouteCase {
        name: format!("{name} T={tokens}"),
        spec,
        tokens,
        logits,
    }
}

fn deepseek(e: usize, k: usize, groups: usize, keep: usize, rng: &mut Rng, score: GroupScore) -> RouterSpec {
    let bias = rng.vec(e, -0.3, 0.3);
    let mut s = RouterSpec::deepseek_v3(e, k, groups, keep, Some(bias), true, 2.5);
    if let Some(g) = &mut s.grouping {
        g.score = score;
    }
    s
}

/// The router cases of the suite.
pub fn route_cases(quick: bool) -> Vec<RouteCase> {
    let mut rng = Rng::new(7);
    let token_counts: &[usize] = if quick { &[1, 7] } else { &[0, 1, 7, 257] };
    let mut cases = Vec::new();
    for &t in token_counts {
        cases.push(route_case(
            1,
            "mixtral softmax E=8 k=2",
            RouterSpec::softmax_topk(8, 2, true),
            t,
            false,
        ));
        cases.push(route_case(
            2,
            "qwen softmax E=64 k=8 no-renorm",
            RouterSpec::softmax_topk(64, 8, false),
            t,
            false,
        ));
        cases.push(route_case(
            3,
            "softmax k=1 E=16",
            RouterSpec::softmax_topk(16, 1, true),
            t,
            false,
        ));
        cases.push(route_case(
            4,
            "softmax k=E=16",
            RouterSpec::softmax_topk(16, 16, false),
            t,
            false,
        ));
        cases.push(route_case(
            5,
            "deepseek E=64 g8/4 k=8 bias",
            deepseek(64, 8, 8, 4, &mut rng, GroupScore::Top2Sum),
            t,
            false,
        ));
        cases.push(route_case(
            6,
            "deepseek E=384 g8/4 k=8 bias",
            deepseek(384, 8, 8, 4, &mut rng, GroupScore::Top2Sum),
            t,
            false,
        ));
        cases.push(route_case(
            7,
            "deepseek E=64 g8/3 k=6 max-group",
            deepseek(64, 6, 8, 3, &mut rng, GroupScore::Max),
            t,
            false,
        ));
        let kimi = RouterSpec::deepseek_v3(384, 8, 1, 1, Some(rng.vec(384, -0.3, 0.3)), true, 2.827);
        cases.push(route_case(8, "kimi-k2 E=384 k=8 no-groups", kimi, t, false));
        let plain = RouterSpec {
            renorm: Renorm::None,
            routed_scaling_factor: 1.0,
            ..deepseek(32, 4, 4, 2, &mut rng, GroupScore::Top2Sum)
        };
        cases.push(route_case(9, "deepseek E=32 no-renorm scale=1", plain, t, false));
        cases.push(route_case(
            10,
            "ties softmax E=32 k=4",
            RouterSpec::softmax_topk(32, 4, true),
            t,
            true,
        ));
        cases.push(route_case(
            11,
            "ties sigmoid groups E=64 k=8",
            deepseek(64, 8, 8, 4, &mut rng, GroupScore::Top2Sum),
            t,
            true,
        ));
    }
    cases.push(group_tie_case());
    cases.push(group_tie_case_max());
    cases.extend(non_finite_cases());
    cases.extend(f32_edge_cases());
    cases.extend(shape_and_option_cases(quick));
    cases
}

/// Shapes and options the model cases above leave out: k past 32 (the CPU's sorting path), E not
/// a multiple of 8 (Qwen1.5-MoE's 60), every group kept, a single group, softmax with a bias and
/// groups, a renormalisation epsilon large enough to change the weights, and ties under a bias
/// that differs between experts.
fn shape_and_option_cases(quick: bool) -> Vec<RouteCase> {
    let mut rng = Rng::new(31);
    let t = if quick { 7 } else { 65 };
    let mut cases = vec![
        route_case(
            40,
            "softmax E=64 k=40",
            RouterSpec::softmax_topk(64, 40, true),
            t,
            false,
        ),
        route_case(
            41,
            "sigmoid E=384 k=33 bias",
            RouterSpec::deepseek_v3(384, 33, 1, 1, Some(rng.vec(384, -0.3, 0.3)), true, 1.0),
            t,
            false,
        ),
        route_case(
            42,
            "qwen1.5 softmax E=60 k=4",
            RouterSpec::softmax_topk(60, 4, false),
            t,
            false,
        ),
        route_case(
            43,
            "deepseek E=60 g6/6 k=5 (all groups kept)",
            deepseek(60, 5, 6, 6, &mut rng, GroupScore::Top2Sum),
            t,
            false,
        ),
        route_case(
            44,
            "deepseek E=24 g1/1 k=3 (one group)",
            RouterSpec {
                grouping: Some(Grouping {
                    n_group: 1,
                    topk_group: 1,
                    score: GroupScore::Top2Sum,
                }),
                ..deepseek(24, 3, 1, 1, &mut rng, GroupScore::Top2Sum)
            },
            t,
            false,
        ),
        route_case(
            45,
            "softmax bias groups E=32 g4/2 k=4 max-group",
            RouterSpec {
                scoring: Scoring::Softmax,
                ..deepseek(32, 4, 4, 2, &mut rng, GroupScore::Max)
            },
            t,
            false,
        ),
        route_case(
            46,
            "sigmoid renorm eps 0.5 E=16 k=4",
            RouterSpec {
                renorm: Renorm::SumEps(0.5),
                ..RouterSpec::deepseek_v3(16, 4, 1, 1, None, true, 1.0)
            },
            t,
            false,
        ),
    ];
    // Ties under a bias that differs between experts: logits and bias copied together.
    let mut c = route_case(
        47,
        "ties sigmoid groups varied bias E=64 k=8",
        deepseek(64, 8, 8, 4, &mut rng, GroupScore::Top2Sum),
        t,
        false,
    );
    let e = c.spec.num_experts;
    let bias = c.spec.correction_bias.as_mut().expect("deepseek has a bias");
    for _ in 0..e / 4 {
        let (a, b) = (rng.below(e), rng.below(e));
        bias[b] = bias[a];
        for row in c.logits.chunks_mut(e) {
            row[b] = row[a];
        }
    }
    cases.push(c);
    cases
}

/// Scores at the edges of f32 (finite logits): ties that only f32 makes, and subnormal scores.
fn f32_edge_cases() -> Vec<RouteCase> {
    let case = |name: &str, spec: RouterSpec, rows: &[&[f32]]| RouteCase {
        name: format!("f32 edges: {name}"),
        tokens: rows.len(),
        logits: rows.concat(),
        spec,
    };
    vec![
        // sigmoid(20) and sigmoid(21) are both 1 in f32: a tie, to the lower id.
        case(
            "saturated sigmoids tie",
            RouterSpec::deepseek_v3(4, 1, 1, 1, None, false, 1.0),
            &[&[20.0, 21.0, -5.0, -6.0], &[-6.0, 30.0, 25.0, 1.0]],
        ),
        // Softmax entries past f32's range (e^-110, e^-120) are 0, and so are scores below its
        // normal range (e^-90, e^-95, and e^-87 / 2 once divided by the sum): all tie at 0, to the
        // lower id, on every backend whether or not its driver flushes subnormals.
        case(
            "softmax underflow and subnormal scores",
            RouterSpec::softmax_topk(4, 3, false),
            &[
                &[0.0, -120.0, -110.0, -130.0],
                &[0.0, -130.0, -90.0, -95.0],
                &[0.0, 0.0, -200.0, -87.0],
                &[-90.0, 0.0, -200.0, -96.0],
            ],
        ),
        // sigmoid(-88) and sigmoid(-87.5) are subnormal: 0, as sigmoid(-100) (whose exp(100)
        // overflows f32); sigmoid(-87) is normal.
        case(
            "subnormal sigmoids",
            RouterSpec::deepseek_v3(4, 2, 1, 1, None, false, 1.0),
            &[&[-200.0, -100.0, -88.0, -99.0], &[-88.0, -87.0, -300.0, -87.5]],
        ),
        // Group sums that overflow to +inf tie, to the lower group; within it, the two biased
        // scores tie at the bias, to the lower expert id.
        case(
            "group sums overflow",
            RouterSpec::deepseek_v3(4, 1, 2, 1, Some(vec![2e38, 2e38, 3e38, 3e38]), false, 1.0),
            &[&[0.0, 0.0, 0.0, 0.0], &[1.0, -1.0, 2.0, 3.0]],
        ),
    ]
}

/// Whole groups copied onto each other: group ties must go to the lower group id.
fn group_tie_case() -> RouteCase {
    let (e, groups, t) = (32, 8, 9);
    let mut rng = Rng::new(99);
    let size = e / groups;
    let bias_group = rng.vec(size, -0.2, 0.2);
    let bias: Vec<f32> = (0..e).map(|i| bias_group[i % size]).collect();
    let spec = RouterSpec::deepseek_v3(e, 4, groups, 2, Some(bias), true, 1.0);
    let mut logits = rng.vec(t * e, -4.0, 4.0);
    for row in logits.chunks_mut(e) {
        let src = rng.below(groups);
        for g in 0..groups {
            if g != src && rng.below(2) == 0 {
                let (a, b) = (src * size, g * size);
                for i in 0..size {
                    row[b + i] = row[a + i];
                }
            }
        }
    }
    RouteCase {
        name: format!("tied groups E={e} g{groups}/2 k=4 T={t}"),
        spec,
        tokens: t,
        logits,
    }
}

/// [`group_tie_case`] with groups scored by their largest score.
fn group_tie_case_max() -> RouteCase {
    let mut c = group_tie_case();
    if let Some(g) = &mut c.spec.grouping {
        g.score = GroupScore::Max;
    }
    c.name = c.name.replace("tied groups", "tied groups max-group");
    c
}

/// NaN and infinite logits: the documented behaviour, the same everywhere.
fn non_finite_cases() -> Vec<RouteCase> {
    let (nan, inf) = (f32::NAN, f32::INFINITY);
    let e = 8;
    let rows: Vec<[f32; 8]> = vec![
        [nan, 1.0, 0.5, nan, -1.0, 2.0, nan, 0.0],
        [nan; 8],
        [inf, 1.0, inf, 0.0, -inf, nan, 3.0, 2.0],
        [-inf; 8],
        [-inf, -inf, 0.5, -inf, nan, -inf, -inf, 1.0],
        [1e30, -1e30, 0.0, 1.0, 88.0, 89.0, -88.0, 3.0],
    ];
    let logits: Vec<f32> = rows.iter().flatten().copied().collect();
    let t = rows.len();
    let mut cases = Vec::new();
    for (name, spec) in [
        ("softmax renorm", RouterSpec::softmax_topk(e, 3, true)),
        ("softmax no-renorm", RouterSpec::softmax_topk(e, 3, false)),
        (
            "sigmoid groups bias",
            RouterSpec::deepseek_v3(
                e,
                3,
                4,
                2,
                Some(vec![0.01, 0.0, 0.02, 0.0, 0.0, 0.01, 0.0, 0.0]),
                true,
                2.0,
            ),
        ),
        ("sigmoid k=E", RouterSpec::deepseek_v3(e, e, 1, 1, None, false, 1.0)),
        // All-minus-infinity rows give a zero sum: with eps 0 the weights stay 0, not 0 / 0.
        (
            "softmax renorm eps 0",
            RouterSpec {
                renorm: Renorm::SumEps(0.0),
                ..RouterSpec::softmax_topk(e, 3, true)
            },
        ),
        (
            "sigmoid renorm eps 0",
            RouterSpec {
                renorm: Renorm::SumEps(0.0),
                ..RouterSpec::deepseek_v3(e, 3, 1, 1, None, true, 1.0)
            },
        ),
    ] {
        cases.push(RouteCase {
            name: format!("non-finite logits {name}"),
            spec,
            tokens: t,
            logits: logits.clone(),
        });
    }
    cases
}

fn check_route<B: Backend>(b: &B, c: &RouteCase) -> Result<(f64, f64), String> {
    let k = c.spec.top_k;
    let logits = b.upload(HostSlice::F32(&c.logits)).map_err(e2s)?;
    let mut ids = b.alloc(DType::U32, c.tokens * k).map_err(e2s)?;
    let mut w = b.alloc(DType::F32, c.tokens * k).map_err(e2s)?;
    b.route(&logits, &c.spec, c.tokens, &mut ids, &mut w).map_err(e2s)?;
    let l64: Vec<f64> = c.logits.iter().map(|&x| x as f64).collect();
    let (rid, rw) = reference::route(&l64, c.tokens, &c.spec);
    exact("expert ids", &u32s(b, &ids, c.tokens * k)?, &rid, k)?;
    Ok((rel_l2(&floats(b, &w, c.tokens * k)?, &rw), tolerance(DType::F32)))
}

fn check_topk<B: Backend>(b: &B, rows: usize, cols: usize, k: usize, vals: &[f32]) -> Result<(f64, f64), String> {
    let v = b.upload(HostSlice::F32(vals)).map_err(e2s)?;
    let mut ids = b.alloc(DType::U32, rows * k).map_err(e2s)?;
    let mut out = b.alloc(DType::F32, rows * k).map_err(e2s)?;
    b.topk(&v, rows, cols, k, &mut ids, &mut out).map_err(e2s)?;
    let v64: Vec<f64> = vals.iter().map(|&x| x as f64).collect();
    let (rid, rv) = reference::topk(&v64, rows, cols, k);
    exact("top-k ids", &u32s(b, &ids, rows * k)?, &rid, k)?;
    // Values are copies: compare bits (NaN equal to NaN here).
    let got = floats(b, &out, rows * k)?;
    if got.iter().zip(&rv).any(|(a, b)| !(a == b || a.is_nan() && b.is_nan())) {
        return Err("top-k values are not exact copies of the inputs".into());
    }
    Ok((0.0, 0.0))
}

// ---------------------------------------------------------------- permute / gemm / combine

fn host_in(values: &[f32], dtype: DType) -> HostVec {
    HostVec::from_f32(values, dtype).expect("float dtype")
}

fn random_ids(rng: &mut Rng, tokens: usize, k: usize, e: usize, skewed: bool) -> Vec<u32> {
    let mut ids = Vec::with_capacity(tokens * k);
    for _ in 0..tokens {
        if skewed {
            // Only the first half of the experts receive tokens.
            ids.extend(rng.distinct(e / 2, k));
        } else {
            ids.extend(rng.distinct(e, k));
        }
    }
    ids
}

/// The permute's index outputs against the reference's for `ids`; the reference's maps.
fn check_permute_index<B: Backend>(
    b: &B,
    out: &Permuted<B::Buffer>,
    ids: &[u32],
    s: PermuteShape,
) -> Result<reference::PermuteMaps, String> {
    let m = reference::permute_maps(ids, s.tokens, s.top_k, s.experts);
    let tk = s.tokens * s.top_k;
    exact("counts", &u32s(b, &out.counts, s.experts)?, &m.counts, s.experts)?;
    exact(
        "offsets",
        &u32s(b, &out.offsets, s.experts + 1)?,
        &m.offsets,
        s.experts + 1,
    )?;
    exact("slot_of", &u32s(b, &out.slot_of, tk)?, &m.slot_of, s.top_k)?;
    exact("source_of", &u32s(b, &out.source_of, tk)?, &m.source_of, s.top_k)?;
    Ok(m)
}

fn check_permute<B: Backend>(
    b: &B,
    dtype: DType,
    s: PermuteShape,
    skewed: bool,
    seed: u64,
) -> Result<(f64, f64), String> {
    let (ids, x, xb, idb) = permute_inputs(b, &mut Rng::new(seed), s, dtype, (skewed, 2.0))?;
    let mut out = Permuted::alloc(b, s, dtype).map_err(e2s)?;
    b.permute(&xb, &idb, s, &mut out).map_err(e2s)?;
    let m = check_permute_index(b, &out, &ids, s)?;
    let tk = s.tokens * s.top_k;
    let want = reference::gather(&x.to_f64(), s.hidden, s.top_k, &m.source_of);
    if floats(b, &out.rows, tk * s.hidden)? != want {
        return Err("gathered rows are not exact copies of the hidden rows".into());
    }
    Ok((0.0, 0.0))
}

/// Expert weights for `s` on the backend: by [`Backend::upload_weights`] when `packed`, else as a
/// plain buffer.
fn upload_expert_weights<B: Backend>(b: &B, w: &HostVec, s: GemmShape, packed: bool) -> Result<B::Buffer, String> {
    if packed {
        b.upload_weights(w.as_slice(), GemmShape { rows: 0, ..s })
    } else {
        b.upload(w.as_slice())
    }
    .map_err(e2s)
}

/// A permute case's inputs drawn from `rng`: the expert ids (`skewed` as for `random_ids`) and the
/// hidden rows, uniform in `[-amp, amp]` (host), then both uploaded.
#[allow(clippy::type_complexity)]
fn permute_inputs<B: Backend>(
    b: &B,
    rng: &mut Rng,
    p: PermuteShape,
    dtype: DType,
    (skewed, amp): (bool, f32),
) -> Result<(Vec<u32>, HostVec, B::Buffer, B::Buffer), String> {
    let ids = random_ids(rng, p.tokens, p.top_k, p.experts, skewed);
    let x = host_in(&rng.vec(p.tokens * p.hidden, -amp, amp), dtype);
    let xb = b.upload(x.as_slice()).map_err(e2s)?;
    let idb = b.upload(HostSlice::U32(&ids)).map_err(e2s)?;
    Ok((ids, x, xb, idb))
}

/// The gate/up GEMM on a permute's rows: `inter` outputs (each of gate and up with SwiGLU).
fn gate_up_shape(p: PermuteShape, inter: usize, activation: Activation) -> GemmShape {
    GemmShape {
        rows: p.tokens * p.top_k,
        in_features: p.hidden,
        out_features: inter,
        experts: p.experts,
        activation,
    }
}

/// [`Backend::permute_matmul`] against the two calls it replaces, on separate outputs: the same
/// index outputs (and the reference's), the same bits of the matmul, and the matmul within
/// tolerance of float64 on the gathered rows. `packed`: weights by [`Backend::upload_weights`].
fn check_permute_matmul<B: Backend>(
    b: &B,
    dtype: DType,
    p: PermuteShape,
    (inter, act): (usize, Activation),
    seed: u64,
    packed: bool,
) -> Result<(f64, f64), String> {
    let mut rng = Rng::new(seed);
    let (ids, x, xb, idb) = permute_inputs(b, &mut rng, p, dtype, (false, 1.0))?;
    let tk = p.tokens * p.top_k;
    let g = gate_up_shape(p, inter, act);
    let scale = 1.0 / (p.hidden as f32).sqrt();
    let w = host_in(&rng.vec(p.experts * g.weight_rows() * p.hidden, -scale, scale), dtype);
    let wb = upload_expert_weights(b, &w, g, packed)?;
    let (mut p1, mut p2) = (
        Permuted::alloc(b, p, dtype).map_err(e2s)?,
        Permuted::alloc(b, p, dtype).map_err(e2s)?,
    );
    let (mut y1, mut y2) = (
        b.alloc(dtype, tk * inter).map_err(e2s)?,
        b.alloc(dtype, tk * inter).map_err(e2s)?,
    );
    b.permute(&xb, &idb, p, &mut p1).map_err(e2s)?;
    b.grouped_matmul(&p1.rows, &p1.offsets, &wb, &mut y1, g).map_err(e2s)?;
    b.permute_matmul(&xb, &idb, p, &mut p2, &wb, &mut y2, g).map_err(e2s)?;
    let m = check_permute_index(b, &p2, &ids, p)?;
    let got = floats(b, &y2, tk * inter)?;
    same_bits(
        &got,
        "fused",
        &floats(b, &y1, tk * inter)?,
        "from permute then grouped_matmul",
    )?;
    // Where the backend says it writes no permuted rows, it takes an empty `rows` and gives the
    // same bits; where it says it does, an empty one is refused.
    let mut p3 = Permuted::alloc_without_rows(b, p, dtype).map_err(e2s)?;
    let mut y3 = b.alloc(dtype, tk * inter).map_err(e2s)?;
    let without = b.permute_matmul(&xb, &idb, p, &mut p3, &wb, &mut y3, g);
    match (b.permute_matmul_copies_rows(dtype, &wb), without) {
        (false, Ok(())) => {
            check_permute_index(b, &p3, &ids, p)?;
            same_bits(&floats(b, &y3, tk * inter)?, "without permuted rows", &got, "with them")?;
        }
        (false, Err(e)) => return Err(format!("permute_matmul said it copies no rows, then refused none: {e}")),
        (true, Ok(())) if tk > 0 => return Err("permute_matmul that copies rows took an empty rows buffer".into()),
        (true, _) => {}
    }
    let rows = reference::gather(&x.to_f64(), p.hidden, p.top_k, &m.source_of);
    let want = reference::grouped_matmul(&rows, &m.offsets, &w.to_f64(), g);
    Ok((rel_l2(&got, &want), tolerance(dtype)))
}

/// [`Backend::permute_mlp`] against the calls it replaces (`permute_matmul`, then `grouped_matmul`
/// down), on separate outputs: the same index outputs, the same bits of the gate/up output and of
/// the expert outputs, and those within tolerance of float64 (gate/up with SwiGLU, then down, on
/// the gathered rows; the reference does not round between the two).
fn check_permute_mlp<B: Backend>(
    b: &B,
    dtype: DType,
    p: PermuteShape,
    inter: usize,
    seed: u64,
    packed: bool,
) -> Result<(f64, f64), String> {
    let mut rng = Rng::new(seed);
    let (ids, x, xb, idb) = permute_inputs(b, &mut rng, p, dtype, (false, 1.0))?;
    let tk = p.tokens * p.top_k;
    let up = gate_up_shape(p, inter, Activation::SwiGlu);
    let dn = GemmShape {
        in_features: inter,
        out_features: p.hidden,
        activation: Activation::None,
        ..up
    };
    let (su, sd) = (1.0 / (p.hidden as f32).sqrt(), 1.0 / (inter as f32).sqrt());
    let wu = host_in(&rng.vec(p.experts * up.weight_rows() * p.hidden, -su, su), dtype);
    let wd = host_in(&rng.vec(p.experts * p.hidden * inter, -sd, sd), dtype);
    let (wub, wdb) = (
        upload_expert_weights(b, &wu, up, packed)?,
        upload_expert_weights(b, &wd, dn, packed)?,
    );
    let mut pm = Vec::new();
    let mut outs = Vec::new();
    for fused in [false, true] {
        let mut perm = if b.permute_matmul_copies_rows(dtype, &wub) {
            Permuted::alloc(b, p, dtype)
        } else {
            Permuted::alloc_without_rows(b, p, dtype)
        }
        .map_err(e2s)?;
        let mut act = b.alloc(dtype, tk * inter).map_err(e2s)?;
        let mut y = b.alloc(dtype, tk * p.hidden).map_err(e2s)?;
        if fused {
            b.permute_mlp(&xb, &idb, p, &mut perm, (&wub, &wdb), &mut act, &mut y, (up, dn))
                .map_err(e2s)?;
        } else {
            b.permute_matmul(&xb, &idb, p, &mut perm, &wub, &mut act, up)
                .map_err(e2s)?;
            b.grouped_matmul(&act, &perm.offsets, &wdb, &mut y, dn).map_err(e2s)?;
        }
        outs.push((floats(b, &act, tk * inter)?, floats(b, &y, tk * p.hidden)?));
        pm.push(perm);
    }
    let m = check_permute_index(b, &pm[1], &ids, p)?;
    same_bits(&outs[1].0, "gate/up in permute_mlp", &outs[0].0, "from permute_matmul")?;
    same_bits(&outs[1].1, "down in permute_mlp", &outs[0].1, "from grouped_matmul")?;
    let rows = reference::gather(&x.to_f64(), p.hidden, p.top_k, &m.source_of);
    let act = reference::grouped_matmul(&rows, &m.offsets, &wu.to_f64(), up);
    let want = reference::grouped_matmul(&act, &m.offsets, &wd.to_f64(), dn);
    Ok((rel_l2(&outs[1].1, &want), tolerance(dtype)))
}

/// The first element where two runs of a kernel differ in their bits, named by how each ran.
fn same_bits(a: &[f64], how_a: &str, b: &[f64], how_b: &str) -> Result<(), String> {
    if a.len() != b.len() {
        return Err(format!("{} outputs {how_a}, {} {how_b}", a.len(), b.len()));
    }
    match (0..a.len()).find(|&i| a[i].to_bits() != b[i].to_bits()) {
        Some(i) => Err(format!("output[{i}] is {} {how_a}, {} {how_b}", a[i], b[i])),
        None => Ok(()),
    }
}

fn ragged_offsets(rng: &mut Rng, rows: usize, experts: usize, used: usize) -> Vec<u32> {
    // `used` rows are spread over experts, some of which receive none.
    let mut counts = vec![0u32; experts];
    for _ in 0..used {
        let e = if experts > 2 && rng.below(3) == 0 {
            0
        } else {
            rng.below(experts)
        };
        counts[e] += 1;
    }
    if experts > 2 {
        let empty = 1 + rng.below(experts - 1);
        counts[0] += counts[empty];
        counts[empty] = 0;
    }
    let _ = rows;
    let mut off = vec![0u32];
    for c in counts {
        off.push(off.last().unwrap() + c);
    }
    off
}

/// `packed`: the weights go up with [`Backend::upload_weights`] (and must download unchanged).
fn check_gemm<B: Backend>(
    b: &B,
    dtype: DType,
    s: GemmShape,
    used: usize,
    seed: u64,
    packed: bool,
) -> Result<(f64, f64), String> {
    let mut rng = Rng::new(seed);
    let offsets = ragged_offsets(&mut rng, s.rows, s.experts, used);
    let scale = 1.0 / (s.in_features as f32).sqrt();
    let x = host_in(&rng.vec(s.rows * s.in_features, -1.0, 1.0), dtype);
    let w = host_in(
        &rng.vec(s.experts * s.weight_rows() * s.in_features, -scale, scale),
        dtype,
    );
    let sentinel = 7.0f32;
    let out0 = host_in(&vec![sentinel; s.rows * s.out_features], dtype);
    let (xb, ob, wb) = (
        b.upload(x.as_slice()).map_err(e2s)?,
        b.upload(HostSlice::U32(&offsets)).map_err(e2s)?,
        upload_expert_weights(b, &w, s, packed)?,
    );
    if packed && b.download(&wb).map_err(e2s)? != w {
        return Err("upload_weights then download did not give the weights back".into());
    }
    let mut yb = b.upload(out0.as_slice()).map_err(e2s)?;
    b.grouped_matmul(&xb, &ob, &wb, &mut yb, s).map_err(e2s)?;
    let got = floats(b, &yb, s.rows * s.out_features)?;
    let mut want = reference::grouped_matmul(&x.to_f64(), &offsets, &w.to_f64(), s);
    let n = s.out_features;
    let done = offsets[s.experts] as usize;
    if got[done * n..].iter().any(|&v| v != sentinel as f64) {
        return Err(format!("rows beyond offsets[E] = {done} were written"));
    }
    want.truncate(done * n);
    // A prefix is the whole download's prefix, for outputs and for weights in the backend's layout.
    let whole = b.download(&yb).map_err(e2s)?;
    for len in [0, whole.len().min(1), done * n] {
        if b.download_prefix(&yb, len).map_err(e2s)? != whole.as_slice().prefix(len).to_vec() {
            return Err(format!(
                "download_prefix of {len} elements is not the download's first {len}"
            ));
        }
    }
    let half = w.len() / 2 + 1;
    if packed && b.download_prefix(&wb, half).map_err(e2s)? != w.as_slice().prefix(half).to_vec() {
        return Err("download_prefix of weights from upload_weights is not the weights' prefix".into());
    }
    Ok((rel_l2(&got[..done * n], &want), tolerance(dtype)))
}

fn check_combine<B: Backend>(b: &B, dtype: DType, s: CombineShape, seed: u64) -> Result<(f64, f64), String> {
    let mut rng = Rng::new(seed);
    let e = (s.top_k * 3).max(4);
    let ids = random_ids(&mut rng, s.tokens, s.top_k, e, false);
    let m = reference::permute_maps(&ids, s.tokens, s.top_k, e);
    let tk = s.tokens * s.top_k;
    let y = host_in(&rng.vec(tk * s.hidden, -2.0, 2.0), dtype);
    let w = rng.vec(tk, 0.0, 1.0);
    let prev = host_in(&rng.vec(s.tokens * s.hidden, -1.0, 1.0), dtype);
    let yb = b.upload(y.as_slice()).map_err(e2s)?;
    let idb = b.upload(HostSlice::U32(&ids)).map_err(e2s)?;
    let wb = b.upload(HostSlice::F32(&w)).map_err(e2s)?;
    let sb = b.upload(HostSlice::U32(&m.slot_of)).map_err(e2s)?;
    let mut ob = b.upload(prev.as_slice()).map_err(e2s)?;
    b.combine(&yb, &idb, &wb, &sb, &mut ob, s).map_err(e2s)?;
    let w64: Vec<f64> = w.iter().map(|&x| x as f64).collect();
    let want = reference::combine(&y.to_f64(), &ids, &w64, &m.slot_of, s, Some(&prev.to_f64()));
    Ok((rel_l2(&floats(b, &ob, s.tokens * s.hidden)?, &want), tolerance(dtype)))
}

// ---------------------------------------------------------------- layer

/// A family-shaped layer with random weights.
pub struct LayerCase {
    pub name: String,
    pub weights: LayerWeights,
    pub tokens: usize,
    /// `[T, H]`, already rounded to the layer dtype.
    pub input: Vec<f32>,
}

/// Random layer weights for `spec` (f32), shaped like the model families: hidden size `h`,
/// expert intermediate size `i`, and `shared: Some((intermediate size, gated))` for a shared
/// expert (gated: Qwen2-MoE's sigmoid gate; not gated: DeepSeek's plain one).
pub fn random_layer(seed: u64, spec: RouterSpec, h: usize, i: usize, shared: Option<(usize, bool)>) -> LayerWeights {
    let mut rng = Rng::new(seed);
    let e = spec.num_experts;
    let (sh, si) = (1.0 / (h as f32).sqrt(), 1.0 / (i as f32).sqrt());
    LayerWeights {
        hidden_size: h,
        intermediate_size: i,
        router_weight: rng.vec(e * h, -2.0 * sh, 2.0 * sh),
        gate_up: HostVec::F32(rng.vec(e * 2 * i * h, -sh, sh)),
        down: HostVec::F32(rng.vec(e * h * i, -si, si)),
        shared: shared.map(|(is, gated)| SharedWeights {
            intermediate_size: is,
            gate_up: HostVec::F32(rng.vec(2 * is * h, -sh, sh)),
            down: HostVec::F32(rng.vec(h * is, -1.0 / (is as f32).sqrt(), 1.0 / (is as f32).sqrt())),
            gate: gated.then(|| rng.vec(h, -sh, sh)),
        }),
        router: spec,
    }
}

/// Inputs in `dtype` whose routing is decisive under `w`; an error where `w` does not validate
/// or `dtype` is not a float.
pub fn layer_input(seed: u64, w: &LayerWeights, tokens: usize, dtype: DType) -> Result<Vec<f32>> {
    w.validate()?;
    if !dtype.is_float() {
        return Err(MoeError::DType {
            what: "layer input".into(),
            got: dtype,
            expected: "f32, bf16 or f16".into(),
        });
    }
    let mut rng = Rng::new(seed);
    let h = w.hidden_size;
    let round = |v: Vec<f32>| host_in(&v, dtype).to_f32().expect("a float dtype");
    let mut x = round(rng.vec(tokens * h, -1.0, 1.0));
    for t in 0..tokens {
        for _ in 0..200 {
            let row: Vec<f64> = x[t * h..(t + 1) * h].iter().map(|&v| v as f64).collect();
            let d = reference::route_token(&w.reference_logits(&row, 1)?, &w.router);
            if decisive(&d, &w.router) {
                break;
            }
            let fresh = round(rng.vec(h, -1.0, 1.0));
            x[t * h..(t + 1) * h].copy_from_slice(&fresh);
        }
    }
    Ok(x)
}

/// The layer cases: each model family, every dtype the backend supports.
pub fn layer_cases(quick: bool) -> Vec<(String, LayerWeights, Vec<usize>)> {
    let mut rng = Rng::new(11);
    let tokens: Vec<usize> = if quick { vec![1, 7] } else { vec![0, 1, 7, 257] };
    let ds = RouterSpec::deepseek_v3(32, 4, 4, 2, Some(rng.vec(32, -0.2, 0.2)), true, 2.5);
    vec![
        (
            "deepseek-v3 E=32 g4/2 k=4 +1 shared".into(),
            random_layer(1, ds.clone(), 36, 20, Some((20, false))),
            tokens.clone(),
        ),
        (
            "deepseek-v3 no-renorm +2 shared".into(),
            random_layer(
                2,
                RouterSpec {
                    renorm: Renorm::None,
                    ..ds
                },
                40,
                16,
                Some((32, false)),
            ),
            tokens.clone(),
        ),
        (
            "mixtral E=8 k=2".into(),
            random_layer(3, RouterSpec::softmax_topk(8, 2, true), 44, 24, None),
            tokens.clone(),
        ),
        (
            "mixtral E=8 k=1".into(),
            random_layer(4, RouterSpec::softmax_topk(8, 1, true), 24, 16, None),
            tokens.clone(),
        ),
        (
            "qwen2-moe E=16 k=4 gated shared".into(),
            random_layer(5, RouterSpec::softmax_topk(16, 4, false), 36, 12, Some((28, true))),
            tokens.clone(),
        ),
        (
            "qwen3-moe E=32 k=8 renorm".into(),
            random_layer(6, RouterSpec::softmax_topk(32, 8, true), 33, 20, None),
            tokens.clone(),
        ),
        (
            "qwen3-moe E=16 k=16 (k=E)".into(),
            random_layer(7, RouterSpec::softmax_topk(16, 16, false), 20, 8, None),
            vec![3],
        ),
    ]
}

fn check_layer<B: Backend + Clone>(
    b: &B,
    w: &LayerWeights,
    tokens: usize,
    dtype: DType,
    seed: u64,
) -> Result<(f64, f64), String> {
    let w = w.to_dtype(dtype).map_err(e2s)?;
    let x = layer_input(seed, &w, tokens, dtype).map_err(e2s)?;
    let mut layer = MoeLayer::new(b.clone(), &w).map_err(e2s)?;
    let xb = b.upload(host_in(&x, dtype).as_slice()).map_err(e2s)?;
    let out = layer.forward(&xb, tokens).map_err(e2s)?;
    let h = w.hidden_size;
    let got = floats(b, &out, tokens * h)?;
    let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let r = w.reference_forward(&x64, tokens).map_err(e2s)?;
    let (ids, wts) = layer.last_routing().map_err(e2s)?;
    let k = w.router.top_k;
    exact("layer expert ids", ids.as_slice().unwrap(), &r.ids, k)?;
    let wg: Vec<f64> = wts.iter().map(|&v| v as f64).collect();
    let werr = rel_l2(&wg, &r.weights);
    if werr > tolerance(DType::F32) {
        return Err(format!(
            "routing weights relative L2 error {werr:.3e} > {:.1e}",
            tolerance(DType::F32)
        ));
    }
    // A second forward with the same layer reuses its work buffers and must give the same bits.
    let again = floats(b, &layer.forward(&xb, tokens).map_err(e2s)?, tokens * h)?;
    if again != got {
        return Err("a second forward on the same input gave different results".into());
    }
    Ok((rel_l2(&got, &r.output), tolerance(dtype)))
}

// ---------------------------------------------------------------- bad input

/// Each call must return an error (not panic, not succeed).
type Outcome = Result<(f64, f64), String>;

fn check_bad_input<B: Backend + Clone>(b: &B) -> Vec<(String, Outcome)> {
    let mut out = Vec::new();
    let mut expect_err = |name: &str, r: Result<()>| {
        out.push((
            name.to_string(),
            match r {
                Err(_) => Ok((0.0, 0.0)),
                Ok(()) => Err(format!("{name}: accepted bad input")),
            },
        ));
    };
    let f = |n: usize| b.alloc(DType::F32, n);
    let u = |n: usize| b.alloc(DType::U32, n);
    let run = || -> Result<Vec<(String, Result<()>)>> {
        let mut v = Vec::new();
        let logits = f(4 * 8)?;
        let (mut ids, mut w) = (u(4 * 2)?, f(4 * 2)?);
        let spec = RouterSpec::softmax_topk(8, 2, true);
        v.push((
            "route: logits too short".into(),
            b.route(&logits, &spec, 5, &mut ids, &mut w),
        ));
        v.push((
            "route: k = 0".into(),
            b.route(
                &logits,
                &RouterSpec {
                    top_k: 0,
                    ..spec.clone()
                },
                4,
                &mut ids,
                &mut w,
            ),
        ));
        v.push((
            "route: ids buffer is f32".into(),
            b.route(&logits, &spec, 4, &mut w.clone_shape(b)?, &mut w),
        ));
        let bad_groups = RouterSpec::deepseek_v3(8, 2, 3, 1, None, true, 1.0);
        v.push((
            "route: n_group does not divide E".into(),
            b.route(&logits, &bad_groups, 4, &mut ids, &mut w),
        ));
        let mut small = u(3)?;
        v.push((
            "download_prefix past the buffer".into(),
            b.download_prefix(&ids, crate::DeviceBuffer::len(&ids) + 1).map(|_| ()),
        ));
        v.push(("topk: k > cols".into(), b.topk(&logits, 4, 8, 9, &mut ids, &mut w)));
        // No rows, so every buffer is long enough: the columns alone do not fit the u32 ids.
        v.push((
            "topk: cols past u32 ids".into(),
            b.topk(&logits, 0, (1 << 32) + 1, 2, &mut ids, &mut w),
        ));
        v.push((
            "topk: ids too short".into(),
            b.topk(&logits, 4, 8, 2, &mut small, &mut w),
        ));
        let x = f(4 * 6)?;
        let s = PermuteShape {
            tokens: 4,
            hidden: 6,
            top_k: 2,
            experts: 8,
        };
        let mut p = Permuted::alloc(b, s, DType::F32)?;
        v.push((
            "permute: hidden too short".into(),
            b.permute(&x, &ids, PermuteShape { hidden: 7, ..s }, &mut p),
        ));
        v.push(("permute: ids are f32".into(), b.permute(&x, &w, s, &mut p)));
        v.push((
            "permute: experts = 0".into(),
            b.permute(&x, &ids, PermuteShape { experts: 0, ..s }, &mut p),
        ));
        let gs = GemmShape {
            rows: 4,
            in_features: 6,
            out_features: 3,
            experts: 2,
            activation: Activation::SwiGlu,
        };
        let off = b.upload(HostSlice::U32(&[0, 2, 4]))?;
        let (wt, mut y) = (f(2 * 6 * 6)?, f(4 * 3)?);
        v.push((
            "grouped_matmul: SwiGLU weight too short".into(),
            b.grouped_matmul(&x, &off, &f(2 * 3 * 6)?, &mut y, gs),
        ));
        v.push((
            "grouped_matmul: offsets too short".into(),
            b.grouped_matmul(&x, &u(2)?, &wt, &mut y, gs),
        ));
        let wb = b.alloc(DType::BF16, 2 * 6 * 6)?;
        v.push((
            "grouped_matmul: mixed dtypes".into(),
            b.grouped_matmul(&x, &off, &wb, &mut y, gs),
        ));
        v.push((
            "upload_weights: length is not experts * weight rows * K".into(),
            b.upload_weights(HostSlice::F32(&[0.0; 5]), gs).map(|_| ()),
        ));
        v.push((
            "upload_weights: u32 weights".into(),
            b.upload_weights(HostSlice::U32(&[0; 72]), gs).map(|_| ()),
        ));
        v.push((
            "grouped_matmul: in_features = 0".into(),
            b.grouped_matmul(&x, &off, &wt, &mut y, GemmShape { in_features: 0, ..gs }),
        ));
        // The permute's shape (4 tokens of 6, k 2, 8 experts) and a gate/up GEMM on its rows.
        let pg = GemmShape {
            rows: 8,
            in_features: 6,
            out_features: 3,
            experts: 8,
            activation: Activation::SwiGlu,
        };
        let (pw, mut py) = (f(8 * 6 * 6)?, f(8 * 3)?);
        v.push((
            "permute_matmul: gate/up rows are not tokens * top_k".into(),
            b.permute_matmul(&x, &ids, s, &mut p, &pw, &mut py, GemmShape { rows: 7, ..pg }),
        ));
        v.push((
            "permute_matmul: in_features is not hidden".into(),
            b.permute_matmul(
                &x,
                &ids,
                s,
                &mut p,
                &f(8 * 6 * 5)?,
                &mut py,
                GemmShape { in_features: 5, ..pg },
            ),
        ));
        v.push((
            "permute_matmul: output too short".into(),
            b.permute_matmul(&x, &ids, s, &mut p, &pw, &mut f(8 * 3 - 1)?, pg),
        ));
        // down on the gate/up output: 6 outputs of 3 inputs per expert.
        let dg = GemmShape {
            in_features: 3,
            out_features: 6,
            activation: Activation::None,
            ..pg
        };
        let (dw, short_dw, mut dy, mut short_dy) = (f(8 * 6 * 3)?, f(8 * 6 * 3 - 1)?, f(8 * 6)?, f(8 * 6 - 1)?);
        let mut mlp = |down: &B::Buffer, dy: &mut B::Buffer, shapes| {
            b.permute_mlp(&x, &ids, s, &mut p, (&pw, down), &mut py, dy, shapes)
        };
        for (what, r) in [
            (
                "permute_mlp: down rows are not the gate/up rows",
                mlp(&dw, &mut dy, (pg, GemmShape { rows: 9, ..dg })),
            ),
            ("permute_mlp: down output too short", mlp(&dw, &mut short_dy, (pg, dg))),
            ("permute_mlp: down weight too short", mlp(&short_dw, &mut dy, (pg, dg))),
            (
                "permute_mlp: gate/up rows are not tokens * top_k",
                mlp(&dw, &mut dy, (GemmShape { rows: 7, ..pg }, dg)),
            ),
        ] {
            v.push((what.into(), r));
        }
        let cs = CombineShape {
            tokens: 4,
            hidden: 6,
            top_k: 2,
            accumulate: false,
        };
        let (eo, sl) = (f(8 * 6)?, u(8)?);
        let mut o = f(4 * 6)?;
        v.push((
            "combine: output too short".into(),
            b.combine(&eo, &ids, &w, &sl, &mut f(5)?, cs),
        ));
        v.push((
            "combine: weights are u32".into(),
            b.combine(&eo, &ids, &sl, &sl, &mut o, cs),
        ));
        v.push((
            "combine: expert_out too short".into(),
            b.combine(&f(7)?, &ids, &w, &sl, &mut o, cs),
        ));
        // Sizes whose products overflow, and memory no machine has: errors, never a panic or an
        // abort.
        for (name, shape) in [
            (
                "grouped_matmul: experts + 1 offsets overflow",
                GemmShape {
                    rows: 0,
                    experts: usize::MAX,
                    activation: Activation::None,
                    ..gs
                },
            ),
            (
                "grouped_matmul: 2 * out_features overflows",
                GemmShape {
                    out_features: usize::MAX / 2 + 1,
                    ..gs
                },
            ),
        ] {
            v.push((name.into(), b.grouped_matmul(&x, &off, &wt, &mut y, shape)));
        }
        v.push((
            "route: tokens * experts overflows".into(),
            b.route(&logits, &spec, usize::MAX / 4, &mut ids, &mut w),
        ));
        v.push((
            "permute: tokens * top_k overflows".into(),
            b.permute(
                &x,
                &ids,
                PermuteShape {
                    tokens: usize::MAX / 2 + 1,
                    ..s
                },
                &mut p,
            ),
        ));
        v.push((
            "combine: tokens * top_k * hidden overflows".into(),
            b.combine(
                &eo,
                &ids,
                &w,
                &sl,
                &mut o,
                CombineShape {
                    tokens: usize::MAX / 4,
                    ..cs
                },
            ),
        ));
        v.push(("alloc: 2^60 f32".into(), b.alloc(DType::F32, 1 << 60).map(|_| ())));
        v.push((
            "alloc: bytes past usize".into(),
            b.alloc(DType::F32, usize::MAX / 4 + 1).map(|_| ()),
        ));
        // Where f32 weights are packed, such a buffer is only a grouped matmul's weight.
        if b.capabilities().packed_weights.contains(&DType::F32) {
            let packed = b.upload_weights(HostSlice::F32(&[0.0; 72]), gs)?;
            let mut pw = packed;
            v.push((
                "route: weights output is packed expert weights".into(),
                b.route(&logits, &spec, 4, &mut ids, &mut pw),
            ));
        }
        // The layer: weights whose sizes overflow, a token count whose buffers would, and the
        // float64 reference on too short an input.
        let lw = random_layer(1, RouterSpec::softmax_topk(4, 2, true), 4, 3, None);
        let huge = LayerWeights {
            intermediate_size: usize::MAX / 2,
            ..lw.clone()
        };
        v.push((
            "MoeLayer::new: E * 2I * H overflows".into(),
            MoeLayer::new(b.clone(), &huge).map(|_| ()),
        ));
        v.push((
            "reference_forward: x shorter than T * H".into(),
            lw.reference_forward(&[0.0; 3], 1).map(|_| ()),
        ));
        let mut layer = MoeLayer::new(b.clone(), &lw)?;
        let lx = f(2 * 4)?;
        v.push((
            "MoeLayer::forward: tokens * hidden overflows".into(),
            layer.forward(&lx, usize::MAX / 2 + 1).map(|_| ()),
        ));
        // Checked before the output is allocated (and, on the CPU, filled) for that many tokens.
        v.push((
            "MoeLayer::forward: more tokens than the input holds".into(),
            match layer.forward(&lx, 1 << 40) {
                Err(e) if e.to_string().contains("layer input") => Err(e),
                _ => Ok(()),
            },
        ));
        v.push((
            "download_array: a shape whose product overflows".into(),
            crate::host::download_array::<B, f32>(b, &lx, &[1 << 63, 2]).map(|_| ()),
        ));
        let mut lg = f(4 * 8)?;
        v.push((
            "router_logits: weight too short".into(),
            b.router_logits(
                &x,
                &f(5)?,
                &mut lg,
                RouterShape {
                    tokens: 4,
                    hidden: 6,
                    experts: 8,
                },
            ),
        ));
        Ok(v)
    };
    match catch_unwind(AssertUnwindSafe(run)) {
        Ok(Ok(v)) => v.into_iter().for_each(|(n, r)| expect_err(&n, r)),
        Ok(Err(e)) => out.push(("bad-input setup".into(), Err(e.to_string()))),
        Err(_) => out.push(("bad-input".into(), Err("PANIC on bad input".into()))),
    }
    out
}

trait CloneShape<B: Backend> {
    fn clone_shape(&self, b: &B) -> Result<B::Buffer>;
}
impl<B: Backend> CloneShape<B> for B::Buffer {
    fn clone_shape(&self, b: &B) -> Result<B::Buffer> {
        b.alloc(
            crate::backend::DeviceBuffer::dtype(self),
            crate::backend::DeviceBuffer::len(self),
        )
    }
}

// ---------------------------------------------------------------- suites

fn dtypes<B: Backend>(b: &B, kernel: Kernel) -> Vec<DType> {
    let caps = b.capabilities();
    DType::FLOATS
        .into_iter()
        .filter(|&d| caps.supports(kernel, d))
        .collect()
}

pub fn route_suite<B: Backend>(b: &B, quick: bool) -> Report {
    let mut r = Report {
        backend: b.name().into(),
        ..Default::default()
    };
    for c in route_cases(quick) {
        r.push("route", c.name.clone(), DType::F32, || check_route(b, &c));
    }
    let mut rng = Rng::new(21);
    for (rows, cols, k) in [(0, 5, 2), (1, 7, 3), (33, 64, 8), (5, 384, 32), (9, 16, 16)] {
        let mut vals = rng.vec(rows * cols, -3.0, 3.0);
        for row in vals.chunks_mut(cols) {
            let a = rng.below(cols);
            row[rng.below(cols)] = row[a];
            row[rng.below(cols)] = f32::NAN;
        }
        r.push(
            "topk",
            format!("rows={rows} cols={cols} k={k} ties+NaN"),
            DType::F32,
            || check_topk(b, rows, cols, k, &vals),
        );
    }
    r
}

pub fn permute_suite<B: Backend>(b: &B, quick: bool) -> Report {
    let mut r = Report {
        backend: b.name().into(),
        ..Default::default()
    };
    let tokens: &[usize] = if quick { &[1, 7] } else { &[0, 1, 7, 257] };
    for dtype in dtypes(b, Kernel::Permute) {
        for &t in tokens {
            for (hidden, k, e, skewed) in [(13, 2, 8, false), (8, 1, 4, false), (5, 4, 64, true), (3, 8, 8, false)] {
                let s = PermuteShape {
                    tokens: t,
                    hidden,
                    top_k: k,
                    experts: e,
                };
                let name = format!(
                    "T={t} H={hidden} k={k} E={e}{}",
                    if skewed { " empty experts" } else { "" }
                );
                r.push("permute", name, dtype, || {
                    check_permute(b, dtype, s, skewed, (t * 31 + e) as u64)
                });
            }
        }
    }
    r
}

pub fn gemm_suite<B: Backend>(b: &B, quick: bool) -> Report {
    let mut r = Report {
        backend: b.name().into(),
        ..Default::default()
    };
    let rows: &[usize] = if quick { &[1, 7] } else { &[0, 1, 7, 257] };
    for dtype in dtypes(b, Kernel::GroupedMatmul) {
        for &m in rows {
            for (kf, n, e, act) in [
                (37, 19, 4, Activation::None),
                (37, 19, 4, Activation::SwiGlu),
                (64, 48, 1, Activation::SwiGlu),
                (20, 9, 16, Activation::None),
                (130, 70, 3, Activation::SwiGlu),
            ] {
                let s = GemmShape {
                    rows: m,
                    in_features: kf,
                    out_features: n,
                    experts: e,
                    activation: act,
                };
                for packed in [false, true] {
                    let how = if packed { "upload_weights" } else { "upload" };
                    let name = format!("rows={m} K={kf} N={n} E={e} {act:?} weights by {how}");
                    r.push("grouped_matmul", name, dtype, || {
                        check_gemm(b, dtype, s, m, (m * 7 + kf + e) as u64, packed)
                    });
                }
            }
        }
        let s = GemmShape {
            rows: 20,
            in_features: 16,
            out_features: 8,
            experts: 3,
            activation: Activation::None,
        };
        r.push(
            "grouped_matmul",
            "offsets[E] < rows (tail untouched)".into(),
            dtype,
            || check_gemm(b, dtype, s, 13, 5, false),
        );
    }
    r
}

/// [`Backend::permute_matmul`] against permute then grouped matmul, and [`Backend::permute_mlp`]
/// against `permute_matmul` then `grouped_matmul` (same index outputs and output bits).
pub fn permute_matmul_suite<B: Backend>(b: &B, quick: bool) -> Report {
    let mut r = Report {
        backend: b.name().into(),
        ..Default::default()
    };
    let tokens: &[usize] = if quick { &[1, 7] } else { &[0, 1, 7, 257] };
    let caps = b.capabilities();
    for dtype in dtypes(b, Kernel::GroupedMatmul) {
        if !caps.supports(Kernel::Permute, dtype) {
            continue;
        }
        for &t in tokens {
            for (hidden, k, e, inter, act) in [
                (37, 2, 4, 19, Activation::SwiGlu),
                (64, 8, 16, 24, Activation::SwiGlu),
                (130, 4, 8, 70, Activation::None),
                (20, 1, 3, 9, Activation::SwiGlu),
            ] {
                let s = PermuteShape {
                    tokens: t,
                    hidden,
                    top_k: k,
                    experts: e,
                };
                for packed in [false, true] {
                    let how = if packed { "upload_weights" } else { "upload" };
                    let name = format!("T={t} H={hidden} k={k} E={e} I={inter} {act:?} weights by {how}");
                    let seed = (t * 13 + hidden + e) as u64;
                    if act == Activation::SwiGlu {
                        r.push("permute_mlp", name.clone(), dtype, || {
                            check_permute_mlp(b, dtype, s, inter, seed, packed)
                        });
                    }
                    r.push("permute_matmul", name, dtype, || {
                        check_permute_matmul(b, dtype, s, (inter, act), seed, packed)
                    });
                }
            }
        }
    }
    r
}

pub fn combine_suite<B: Backend>(b: &B, quick: bool) -> Report {
    let mut r = Report {
        backend: b.name().into(),
        ..Default::default()
    };
    let tokens: &[usize] = if quick { &[1, 7] } else { &[0, 1, 7, 257] };
    for dtype in dtypes(b, Kernel::Combine) {
        for &t in tokens {
            for (h, k, acc) in [(13, 2, false), (13, 2, true), (40, 8, false), (7, 1, true)] {
                let s = CombineShape {
                    tokens: t,
                    hidden: h,
                    top_k: k,
                    accumulate: acc,
                };
                let name = format!("T={t} H={h} k={k}{}", if acc { " accumulate" } else { "" });
                r.push("combine", name, dtype, || {
                    check_combine(b, dtype, s, (t + h * 3 + k) as u64)
                });
            }
        }
    }
    r
}

pub fn layer_suite<B: Backend + Clone>(b: &B, quick: bool) -> Report {
    let mut r = Report {
        backend: b.name().into(),
        ..Default::default()
    };
    for dtype in dtypes(b, Kernel::GroupedMatmul) {
        for (name, w, tokens) in layer_cases(quick) {
            for t in tokens {
                // Large token counts in half precision add little beyond f32 and cost time.
                if dtype != DType::F32 && t > 64 {
                    continue;
                }
                r.push("layer", format!("{name} T={t}"), dtype, || {
                    check_layer(b, &w, t, dtype, t as u64 + 100)
                });
            }
        }
    }
    r
}

pub fn bad_input_suite<B: Backend + Clone>(b: &B) -> Report {
    let mut r = Report {
        backend: b.name().into(),
        ..Default::default()
    };
    for (name, res) in check_bad_input(b) {
        r.push("bad-input", name, DType::F32, || res);
    }
    r
}

/// Every suite; `quick` trims token counts.
pub fn run_all<B: Backend + Clone>(b: &B, quick: bool) -> Report {
    let mut r = Report {
        backend: b.name().into(),
        ..Default::default()
    };
    for part in [
        route_suite(b, quick),
        permute_suite(b, quick),
        gemm_suite(b, quick),
        permute_matmul_suite(b, quick),
        combine_suite(b, quick),
        layer_suite(b, quick),
        bad_input_suite(b),
    ] {
        r.results.extend(part.results);
    }
    r
}

/// Backends named in `MOE_REQUIRE_BACKENDS` (comma separated, any case): the ones whose absence
/// fails a test run instead of skipping (CI requires `cpu,wgpu`).
pub fn required_backends() -> Vec<String> {
    std::env::var("MOE_REQUIRE_BACKENDS")
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

/// For a test harness whose backend `name` cannot run here: panics if [`required_backends`]
/// names it, else prints `SKIPPED backend {name}: {why}` so that the skip is seen in the log.
pub fn absent_backend(name: &str, why: impl std::fmt::Display) {
    if required_backends().iter().any(|r| r == name) {
        panic!("backend {name} is required by MOE_REQUIRE_BACKENDS but unavailable: {why}");
    }
    eprintln!("SKIPPED backend {name}: {why}");
}

/// Group scoring check helper for tests: how many tokens change choice when
/// the bias or the group mask is removed (a case that never changes proves nothing).
pub fn bias_and_groups_matter(c: &RouteCase) -> (usize, usize) {
    let e = c.spec.num_experts;
    let no_bias = RouterSpec {
        correction_bias: None,
        ..c.spec.clone()
    };
    let no_groups = RouterSpec {
        grouping: None::<Grouping>,
        ..c.spec.clone()
    };
    let (mut by_bias, mut by_groups) = (0, 0);
    for row in c.logits.chunks(e).take(c.tokens) {
        let l: Vec<f64> = row.iter().map(|&x| x as f64).collect();
        let mut base = reference::route_token(&l, &c.spec).ids;
        base.sort();
        let mut a = reference::route_token(&l, &no_bias).ids;
        a.sort();
        let mut g = reference::route_token(&l, &no_groups).ids;
        g.sort();
        by_bias += (a != base) as usize;
        by_groups += (g != base) as usize;
    }
    (by_bias, by_groups)
}

#[cfg(test)]
mod tests {
    use super::same_bits;

    #[test]
    fn same_bits_names_the_first_difference() {
        assert!(same_bits(&[1.0, f64::NAN], "a", &[1.0, f64::NAN], "b").is_ok());
        let e = same_bits(&[1.0, 0.0, 2.0], "fused", &[1.0, -0.0, 3.0], "apart").unwrap_err();
        assert_eq!(e, "output[1] is 0 fused, -0 apart");
        assert!(same_bits(&[1.0], "a", &[1.0, 2.0], "b").is_err());
    }
}
