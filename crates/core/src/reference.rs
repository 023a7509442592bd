//! The float64 reference: every kernel and the whole layer, written to be
//! obviously correct rather than fast. It is the oracle of every test.
//!
//! It is public so that embedders can check a backend the way the conformance suite does, but it
//! is a test oracle, not an API for untrusted input: its kernel functions take well-formed
//! arguments (lengths and ids as their kernels' checks require) and may panic or read only part
//! of malformed ones. `LayerWeights::reference_forward` and `reference_logits` check their input
//! and return errors.

use crate::backend::{Activation, CombineShape, GemmShape};
use crate::spec::{GroupScore, Renorm, RouterSpec, Scoring};
use std::cmp::Ordering;

/// Descending by value, NaN below every number, ties to the lower index.
fn rank(values: &[f64], a: usize, b: usize) -> Ordering {
    let (x, y) = (values[a], values[b]);
    match (x.is_nan(), y.is_nan()) {
        (true, true) => a.cmp(&b),
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        _ => y.partial_cmp(&x).unwrap().then(a.cmp(&b)),
    }
}

/// Indices of `values` in rank order: descending, NaN below every number, ties to the lower index.
pub fn ranked(values: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| rank(values, a, b));
    idx
}

/// Router scores of one token, with the non-finite rules of [`crate::spec`] and its flush of
/// scores below f32's normal range.
pub fn scores(logits: &[f64], scoring: Scoring) -> Vec<f64> {
    let mut s = scores_unflushed(logits, scoring);
    s.iter_mut().for_each(|v| {
        if *v < f32::MIN_POSITIVE as f64 {
            *v = 0.0;
        }
    });
    s
}

fn scores_unflushed(logits: &[f64], scoring: Scoring) -> Vec<f64> {
    let l: Vec<f64> = logits
        .iter()
        .map(|&x| if x.is_nan() { f64::NEG_INFINITY } else { x })
        .collect();
    match scoring {
        Scoring::Sigmoid => l.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect(),
        Scoring::Softmax => {
            let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            if m == f64::INFINITY {
                let n = l.iter().filter(|&&x| x == f64::INFINITY).count() as f64;
                l.iter()
                    .map(|&x| if x == f64::INFINITY { 1.0 / n } else { 0.0 })
                    .collect()
            } else if m == f64::NEG_INFINITY {
                vec![0.0; l.len()]
            } else {
                let e: Vec<f64> = l.iter().map(|&x| (x - m).exp()).collect();
                let s: f64 = e.iter().sum();
                e.iter().map(|x| x / s).collect()
            }
        }
    }
}

/// Everything the router decides for one token.
#[derive(Clone, Debug)]
pub struct RouteDetail {
    pub ids: Vec<u32>,
    pub weights: Vec<f64>,
    /// Selection scores `c = s + b` of all experts.
    pub selection: Vec<f64>,
    /// Group scores (empty without groups).
    pub group_scores: Vec<f64>,
}

/// Routes one token's logits.
pub fn route_token(logits: &[f64], spec: &RouterSpec) -> RouteDetail {
    let e = spec.num_experts;
    let s = scores(logits, spec.scoring);
    // The choice is made on the selection scores as the contract computes them, in f32 (each
    // value rounded once): scores that f32 cannot tell apart (saturated sigmoids, softmax entries
    // past f32's range, group sums that overflow) tie there, and the tie goes to the lower id as on
    // every backend. The weights keep the float64 scores.
    let f32r = |v: f64| v as f32 as f64;
    let selection: Vec<f64> = match &spec.correction_bias {
        Some(b) => s.iter().zip(b).map(|(&s, &b)| f32r(f32r(s) + b as f64)).collect(),
        None => s.iter().map(|&s| f32r(s)).collect(),
    };
    let mut allowed = vec![true; e];
    let mut group_scores = Vec::new();
    if let Some(g) = spec.grouping {
        let size = e / g.n_group;
        for grp in selection.chunks(size) {
            let order = ranked(grp);
            group_scores.push(match g.score {
                GroupScore::Max => grp[order[0]],
                GroupScore::Top2Sum => f32r(grp[order[0]] + grp[order[1]]),
            });
        }
        let kept = &ranked(&group_scores)[..g.topk_group];
        for (i, a) in allowed.iter_mut().enumerate() {
            *a = kept.contains(&(i / size));
        }
    }
    let ids: Vec<u32> = ranked(&selection)
        .into_iter()
        .filter(|&i| allowed[i])
        .take(spec.top_k)
        .map(|i| i as u32)
        .collect();
    let mut weights: Vec<f64> = ids.iter().map(|&i| s[i as usize]).collect();
    let sum: f64 = weights.iter().sum();
    match spec.renorm {
        Renorm::None => {}
        Renorm::Sum => {
            if sum > 0.0 {
                weights.iter_mut().for_each(|w| *w /= sum);
            }
        }
        Renorm::SumEps(eps) => {
            if sum + eps as f64 > 0.0 {
                weights.iter_mut().for_each(|w| *w /= sum + eps as f64);
            }
        }
    }
    let scale = spec.routed_scaling_factor as f64;
    weights.iter_mut().for_each(|w| *w *= scale);
    RouteDetail {
        ids,
        weights,
        selection,
        group_scores,
    }
}

/// Routes `tokens` rows of `logits[T, E]`: ids and weights, each `[T, k]`.
pub fn route(logits: &[f64], tokens: usize, spec: &RouterSpec) -> (Vec<u32>, Vec<f64>) {
    let mut ids = Vec::with_capacity(tokens * spec.top_k);
    let mut weights = Vec::with_capacity(tokens * spec.top_k);
    for row in logits.chunks(spec.num_experts).take(tokens) {
        let d = route_token(row, spec);
        ids.extend(d.ids);
        weights.extend(d.weights);
    }
    (ids, weights)
}

/// Top-`k` of each row: ids and values, descending, ties to the lower index, NaN last.
pub fn topk(values: &[f64], rows: usize, cols: usize, k: usize) -> (Vec<u32>, Vec<f64>) {
    let mut ids = Vec::new();
    let mut out = Vec::new();
    for row in values.chunks(cols).take(rows) {
        for i in ranked(row).into_iter().take(k) {
            ids.push(i as u32);
            out.push(row[i]);
        }
    }
    (ids, out)
}

/// The integer part of a permute.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PermuteMaps {
    pub counts: Vec<u32>,
    pub offsets: Vec<u32>,
    pub slot_of: Vec<u32>,
    pub source_of: Vec<u32>,
}

/// Stable dispatch: slots ordered by expert, then by flat index `t * k + j`.
pub fn permute_maps(ids: &[u32], tokens: usize, top_k: usize, experts: usize) -> PermuteMaps {
    let n = tokens * top_k;
    let mut counts = vec![0u32; experts];
    for &e in &ids[..n] {
        counts[e as usize] += 1;
    }
    let mut offsets = vec![0u32; experts + 1];
    for e in 0..experts {
        offsets[e + 1] = offsets[e] + counts[e];
    }
    let mut source_of: Vec<u32> = (0..n as u32).collect();
    source_of.sort_by_key(|&f| (ids[f as usize], f));
    let mut slot_of = vec![0u32; n];
    for (slot, &f) in source_of.iter().enumerate() {
        slot_of[f as usize] = slot as u32;
    }
    PermuteMaps {
        counts,
        offsets,
        slot_of,
        source_of,
    }
}

/// Gathers `hidden[T, H]` rows into permuted order: `[T * k, H]`.
pub fn gather(hidden: &[f64], h: usize, top_k: usize, source_of: &[u32]) -> Vec<f64> {
    source_of
        .iter()
        .flat_map(|&f| {
            let t = f as usize / top_k;
            hidden[t * h..(t + 1) * h].iter().cloned()
        })
        .collect()
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Grouped matmul; rows outside `offsets[0] .. offsets[E]` stay 0.
pub fn grouped_matmul(input: &[f64], offsets: &[u32], weight: &[f64], s: GemmShape) -> Vec<f64> {
    let (kf, n) = (s.in_features, s.out_features);
    let wrows = s.weight_rows();
    let mut out = vec![0.0; s.rows * n];
    for e in 0..s.experts {
        let w = &weight[e * wrows * kf..(e + 1) * wrows * kf];
        for r in offsets[e] as usize..offsets[e + 1] as usize {
            let x = &input[r * kf..(r + 1) * kf];
            for o in 0..n {
                let g = dot(x, &w[o * kf..(o + 1) * kf]);
                out[r * n + o] = match s.activation {
                    Activation::None => g,
                    Activation::SwiGlu => silu(g) * dot(x, &w[(n + o) * kf..(n + o + 1) * kf]),
                };
            }
        }
    }
    out
}

/// Weighted un-permute, each token's terms in ascending expert id.
pub fn combine(
    expert_out: &[f64],
    ids: &[u32],
    weights: &[f64],
    slot_of: &[u32],
    s: CombineShape,
    prev: Option<&[f64]>,
) -> Vec<f64> {
    let (h, k) = (s.hidden, s.top_k);
    let mut out = match prev {
        Some(p) if s.accumulate => p[..s.tokens * h].to_vec(),
        _ => vec![0.0; s.tokens * h],
    };
    for t in 0..s.tokens {
        let mut js: Vec<usize> = (0..k).collect();
        js.sort_by_key(|&j| (ids[t * k + j], j));
        for j in js {
            let slot = slot_of[t * k + j] as usize;
            let w = weights[t * k + j];
            for c in 0..h {
                out[t * h + c] += w * expert_out[slot * h + c];
            }
        }
    }
    out
}

/// One SwiGLU MLP on one row: `down(silu(gate x) * up x)` with `gate_up` `[2I, H]`, `down` `[H, I]`.
pub fn mlp(x: &[f64], gate_up: &[f64], down: &[f64], inter: usize) -> Vec<f64> {
    let h = x.len();
    let act: Vec<f64> = (0..inter)
        .map(|i| silu(dot(x, &gate_up[i * h..(i + 1) * h])) * dot(x, &gate_up[(inter + i) * h..(inter + i + 1) * h]))
        .collect();
    (0..h).map(|o| dot(&act, &down[o * inter..(o + 1) * inter])).collect()
}

/// Output of [`crate::layer::LayerWeights::reference_forward`].
#[derive(Clone, Debug)]
pub struct LayerRef {
    pub output: Vec<f64>,
    pub ids: Vec<u32>,
    pub weights: Vec<f64>,
    /// f64 router logits `[T, E]`.
    pub logits: Vec<f64>,
}

/// L2 norm of `a - b` over the L2 norm of `b`; `INFINITY` when `a` has a NaN
/// or the lengths differ, so NaN never passes. Two all-zero vectors give 0.
pub fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() || a.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    if num == 0.0 {
        0.0
    } else if den == 0.0 {
        f64::INFINITY
    } else {
        (num / den).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nan_never_passes() {
        assert_eq!(rel_l2(&[f64::NAN], &[1.0]), f64::INFINITY);
        assert_eq!(rel_l2(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!(rel_l2(&[1.0, 2.1], &[1.0, 2.0]) > 0.04);
    }

    #[test]
    fn ties_go_to_lower_id_and_nan_last() {
        assert_eq!(ranked(&[1.0, 3.0, 3.0, f64::NAN, 2.0]), vec![1, 2, 4, 0, 3]);
    }

    #[test]
    fn deepseek_group_mask_uses_neg_inf_not_zero() {
        // All scores negative after bias: masking to 0 would let an excluded expert win.
        let spec = RouterSpec::deepseek_v3(4, 1, 2, 1, Some(vec![-5.0, -5.0, -9.0, -9.0]), true, 1.0);
        let d = route_token(&[0.0, 0.0, 5.0, 5.0], &spec);
        assert_eq!(d.ids, vec![0]);
        assert!((d.weights[0] - 1.0).abs() < 1e-12);
    }

    #[test]
    fn softmax_non_finite_rules() {
        assert_eq!(
            scores(&[f64::INFINITY, 0.0, f64::INFINITY], Scoring::Softmax),
            vec![0.5, 0.0, 0.5]
        );
        assert_eq!(scores(&[f64::NAN, f64::NEG_INFINITY], Scoring::Softmax), vec![0.0, 0.0]);
        assert_eq!(scores(&[f64::NAN], Scoring::Sigmoid), vec![0.0]);
    }

    #[test]
    fn permute_is_stable() {
        let m = permute_maps(&[2, 0, 0, 2, 1, 0], 3, 2, 4);
        assert_eq!(m.counts, vec![3, 1, 2, 0]);
        assert_eq!(m.offsets, vec![0, 3, 4, 6, 6]);
        assert_eq!(m.source_of, vec![1, 2, 5, 4, 0, 3]);
        assert_eq!(m.slot_of, vec![4, 0, 1, 5, 3, 2]);
    }
}
