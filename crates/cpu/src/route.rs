//! Routing and generic top-k, one token (row) per task.

use moe_hal_core::{GroupScore, Renorm, RouterSpec, Scoring};
use rayon::prelude::*;

/// Scores of one token into `s`, with the contract's non-finite rules.
fn scores(logits: &[f32], scoring: Scoring, s: &mut [f32]) {
    let clean = |x: f32| if x.is_nan() { f32::NEG_INFINITY } else { x };
    match scoring {
        Scoring::Sigmoid => s
            .iter_mut()
            .zip(logits)
            .for_each(|(s, &x)| *s = 1.0 / (1.0 + (-clean(x)).exp())),
        Scoring::Softmax => {
            let m = logits.iter().map(|&x| clean(x)).fold(f32::NEG_INFINITY, f32::max);
            if m == f32::INFINITY {
                let n = logits.iter().filter(|&&x| x == f32::INFINITY).count() as f32;
                s.iter_mut()
                    .zip(logits)
                    .for_each(|(s, &x)| *s = if x == f32::INFINITY { 1.0 / n } else { 0.0 });
            } else if m == f32::NEG_INFINITY {
                s.fill(0.0);
            } else {
                let mut sum = 0.0f32;
                for (s, &x) in s.iter_mut().zip(logits) {
                    *s = (clean(x) - m).exp();
                    sum += *s;
                }
                s.iter_mut().for_each(|s| *s /= sum);
            }
        }
    }
}

/// Ids of the `k` best of `cand` by `better`, best first.
fn select(cand: impl Iterator<Item = usize>, k: usize, better: impl Fn(usize, usize) -> bool, out: &mut Vec<usize>) {
    out.clear();
    for i in cand {
        if out.len() == k && !better(i, out[k - 1]) {
            continue;
        }
        if out.len() == k {
            out.pop();
        }
        let pos = out.iter().position(|&j| better(i, j)).unwrap_or(out.len());
        out.insert(pos, i);
    }
}

/// Top-k by sorting when k is large (insertion is O(E * k)).
fn select_any(
    n: usize,
    allowed: impl Fn(usize) -> bool,
    k: usize,
    better: impl Fn(usize, usize) -> bool,
    out: &mut Vec<usize>,
) {
    if k <= 32 {
        select((0..n).filter(|&i| allowed(i)), k, better, out);
    } else {
        out.clear();
        out.extend((0..n).filter(|&i| allowed(i)));
        out.sort_by(|&a, &b| {
            if better(a, b) {
                std::cmp::Ordering::Less
            } else {
                std::cmp::Ordering::Greater
            }
        });
        out.truncate(k);
    }
}

/// Per-thread buffers of [`route_token`], reused from token to token: at 4096 tokens of 256
/// experts, allocating them per token took about half of the routing time.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    chosen_by: Vec<f32>,
    gscore: Vec<f32>,
    kept: Vec<usize>,
    chosen: Vec<usize>,
}

fn route_token(logits: &[f32], spec: &RouterSpec, ids: &mut [u32], weights: &mut [f32], m: &mut Scratch) {
    let e = spec.num_experts;
    m.scores.resize(e, 0.0);
    scores(logits, spec.scoring, &mut m.scores);
    let s = &m.scores;
    m.chosen_by.clear();
    match &spec.correction_bias {
        Some(b) => m.chosen_by.extend(s.iter().zip(b).map(|(s, b)| s + b)),
        None => m.chosen_by.extend_from_slice(s),
    }
    let c = &m.chosen_by;
    // c is finite (scores in [0, 1], bias finite), so `>` is a total order with the id tie-break.
    let better = |a: usize, b: usize| c[a] > c[b] || (c[a] == c[b] && a < b);
    match spec.grouping {
        None => select_any(e, |_| true, spec.top_k, better, &mut m.chosen),
        Some(g) => {
            let size = e / g.n_group;
            m.gscore.clear();
            m.gscore.extend(c.chunks(size).map(|grp| {
                let (mut m1, mut m2) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                for &v in grp {
                    if v > m1 {
                        m2 = m1;
                        m1 = v;
                    } else if v > m2 {
                        m2 = v;
                    }
                }
                match g.score {
                    GroupScore::Max => m1,
                    GroupScore::Top2Sum => m1 + m2,
                }
            }));
            let gs = &m.gscore;
            let gbetter = |a: usize, b: usize| gs[a] > gs[b] || (gs[a] == gs[b] && a < b);
            select_any(g.n_group, |_| true, g.topk_group, gbetter, &mut m.kept);
            // The kept groups' experts only, in id order (`better` is a strict total order, so the
            // visiting order does not change the choice).
            m.kept.sort_unstable();
            let kept = &m.kept;
            let cand = kept.iter().flat_map(|&grp| grp * size..(grp + 1) * size);
            if spec.top_k <= 32 {
                select(cand, spec.top_k, better, &mut m.chosen);
            } else {
                m.chosen.clear();
                m.chosen.extend(cand);
                m.chosen.sort_by(|&a, &b| {
                    if better(a, b) {
                        std::cmp::Ordering::Less
                    } else {
                        std::cmp::Ordering::Greater
                    }
                });
                m.chosen.truncate(spec.top_k);
            }
        }
    }
    let mut sum = 0.0f32;
    for (j, &i) in m.chosen.iter().enumerate() {
        ids[j] = i as u32;
        weights[j] = s[i];
        sum += s[i];
    }
    let div = match spec.renorm {
        Renorm::None => 1.0,
        Renorm::Sum => {
            if sum > 0.0 {
                sum
            } else {
                1.0
            }
        }
        Renorm::SumEps(eps) => sum + eps,
    };
    let scale = spec.routed_scaling_factor;
    weights.iter_mut().for_each(|w| *w = *w / div * scale);
}

pub fn route(logits: &[f32], spec: &RouterSpec, tokens: usize, ids: &mut [u32], weights: &mut [f32]) {
    let (e, k) = (spec.num_experts, spec.top_k);
    logits[..tokens * e]
        .par_chunks(e)
        .zip(ids[..tokens * k].par_chunks_mut(k))
        .zip(weights[..tokens * k].par_chunks_mut(k))
        .for_each_init(Scratch::default, |m, ((l, i), w)| route_token(l, spec, i, w, m));
}

pub fn topk(values: &[f32], rows: usize, cols: usize, k: usize, ids: &mut [u32], out: &mut [f32]) {
    if rows == 0 {
        return;
    }
    values[..rows * cols]
        .par_chunks(cols)
        .zip(ids[..rows * k].par_chunks_mut(k))
        .zip(out[..rows * k].par_chunks_mut(k))
        .for_each(|((v, ids), out)| {
            // NaN ranks below every number; ties go to the lower index.
            let better = |a: usize, b: usize| match (v[a].is_nan(), v[b].is_nan()) {
                (false, true) => true,
                (true, false) => false,
                (true, true) => a < b,
                _ => v[a] > v[b] || (v[a] == v[b] && a < b),
            };
            let mut chosen = Vec::with_capacity(k);
            select_any(cols, |_| true, k, better, &mut chosen);
            for (j, &i) in chosen.iter().enumerate() {
                ids[j] = i as u32;
                out[j] = v[i];
            }
        });
}
