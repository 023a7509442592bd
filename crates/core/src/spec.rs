//! The routing contract.
//!
//! A [`RouterSpec`] says how one token's router logits become `k` expert ids
//! and `k` f32 weights. Every backend computes exactly this:
//!
//! 1. **Non-finite logits.** A NaN logit is treated as `-inf` (NaN is never
//!    preferred over a number). Softmax over a row whose maximum is `+inf`
//!    gives the `+inf` entries equal shares and every other entry 0; softmax
//!    over a row that is all `-inf` gives 0 everywhere. Sigmoid maps `+inf` to
//!    1 and `-inf` to 0. Scores are therefore always finite, in `[0, 1]`.
//! 2. **Scores** `s = softmax(logits)` or `sigmoid(logits)`, in f32. A score below f32's
//!    normal range (`f32::MIN_POSITIVE`, about 1.2e-38: a softmax entry about 87 below the row's
//!    largest, a sigmoid below about -87.3) is 0, so that no backend's treatment of subnormals
//!    (GPU drivers may flush them) changes a choice.
//! 3. **Selection scores** `c = s + b` where `b` is the optional correction
//!    bias. `b` changes which experts are chosen, never their weights.
//! 4. **Groups** (optional): the `E` experts form `n_group` equal groups of
//!    consecutive ids. A group's score is the sum of its two largest `c`
//!    ([`GroupScore::Top2Sum`]) or its largest `c` ([`GroupScore::Max`]). The
//!    `topk_group` best groups are kept (ties: lower group id); experts of
//!    other groups can never be chosen.
//! 5. **Top-k**: the `k` experts with the largest `c` among the kept ones,
//!    returned in descending `c`; **ties go to the lower expert id**. Ties are f32 ties: scores
//!    that round to the same f32 (saturated sigmoids, scores flushed to 0, group sums that
//!    overflow) are equal, whatever their logits. Each backend computes `exp` its own way, within
//!    a few f32 epsilons, so scores that close may be ordered differently on different backends;
//!    the CPU backend's `route` orders them the same, from the same logits, on every CPU and SIMD
//!    level.
//! 6. **Weights** are the unbiased `s` of the chosen experts, renormalised as
//!    [`Renorm`] says (a zero sum leaves the weights at 0), then multiplied by
//!    `routed_scaling_factor`.

use crate::error::{MoeError, Result};

/// How router logits become scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scoring {
    /// Softmax over all `E` logits (Mixtral, Qwen).
    Softmax,
    /// Element-wise sigmoid (DeepSeek-V3, Kimi-K2).
    Sigmoid,
}

/// How a group of experts is scored for group selection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupScore {
    /// Sum of the two largest selection scores (transformers' DeepSeek-V3).
    Top2Sum,
    /// Largest selection score (original DeepSeek code without bias).
    Max,
}

/// DeepSeek-style group-limited routing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grouping {
    pub n_group: usize,
    pub topk_group: usize,
    pub score: GroupScore,
}

/// Renormalisation of the chosen weights.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Renorm {
    /// Keep the scores as they are (Qwen with `norm_topk_prob = false`).
    None,
    /// `w / sum(w)` (Mixtral, Qwen with `norm_topk_prob = true`); a zero sum leaves 0.
    Sum,
    /// `w / (sum(w) + eps)` (DeepSeek-V3 with `norm_topk_prob`, eps = 1e-20); with eps 0 a zero
    /// sum leaves 0, as [`Renorm::Sum`].
    SumEps(f32),
}

/// One router: every router of the public models (the module docs above say what each computes).
#[derive(Clone, Debug, PartialEq)]
pub struct RouterSpec {
    pub num_experts: usize,
    pub top_k: usize,
    pub scoring: Scoring,
    /// Selection-only correction bias, `[num_experts]`.
    pub correction_bias: Option<Vec<f32>>,
    pub grouping: Option<Grouping>,
    pub renorm: Renorm,
    pub routed_scaling_factor: f32,
}

/// DeepSeek's renormalisation epsilon.
pub const DEEPSEEK_RENORM_EPS: f32 = 1e-20;

impl RouterSpec {
    /// The gate of Qwen2-MoE's shared expert as a one-expert router: `route` on its one logit gives
    /// `sigmoid(logit)`, the weight [`crate::MoeLayer`] gives the shared expert's output.
    pub fn shared_expert_gate() -> Self {
        RouterSpec {
            scoring: Scoring::Sigmoid,
            renorm: Renorm::None,
            ..RouterSpec::softmax_topk(1, 1, false)
        }
    }

    /// Softmax top-k with optional plain renormalisation (Mixtral, Qwen).
    pub fn softmax_topk(num_experts: usize, top_k: usize, renormalize: bool) -> Self {
        RouterSpec {
            num_experts,
            top_k,
            scoring: Scoring::Softmax,
            correction_bias: None,
            grouping: None,
            renorm: if renormalize { Renorm::Sum } else { Renorm::None },
            routed_scaling_factor: 1.0,
        }
    }

    /// DeepSeek-V3 "noaux_tc": sigmoid, bias, top-2-sum groups, eps renorm, scaling.
    #[allow(clippy::too_many_arguments)]
    pub fn deepseek_v3(
        num_experts: usize,
        top_k: usize,
        n_group: usize,
        topk_group: usize,
        correction_bias: Option<Vec<f32>>,
        norm_topk_prob: bool,
        routed_scaling_factor: f32,
    ) -> Self {
        RouterSpec {
            num_experts,
            top_k,
            scoring: Scoring::Sigmoid,
            correction_bias,
            grouping: (n_group > 1).then_some(Grouping {
                n_group,
                topk_group,
                score: GroupScore::Top2Sum,
            }),
            renorm: if norm_topk_prob {
                Renorm::SumEps(DEEPSEEK_RENORM_EPS)
            } else {
                Renorm::None
            },
            routed_scaling_factor,
        }
    }

    /// Experts per group (all experts when there are no groups).
    pub fn group_size(&self) -> usize {
        match self.grouping {
            Some(g) if g.n_group > 0 => self.num_experts / g.n_group,
            _ => self.num_experts,
        }
    }

    /// Refuses every spec that cannot route: the error names the value and
    /// what was expected.
    pub fn validate(&self) -> Result<()> {
        let e = self.num_experts;
        if e == 0 {
            return Err(MoeError::spec("num_experts", e, "at least 1"));
        }
        if e > u32::MAX as usize / 2 {
            return Err(MoeError::spec("num_experts", e, "below 2^31"));
        }
        if self.top_k == 0 || self.top_k > e {
            return Err(MoeError::spec("top_k", self.top_k, format!("1 ..= num_experts ({e})")));
        }
        if !self.routed_scaling_factor.is_finite() {
            return Err(MoeError::spec(
                "routed_scaling_factor",
                self.routed_scaling_factor,
                "a finite number",
            ));
        }
        if let Renorm::SumEps(eps) = self.renorm {
            if !eps.is_finite() || eps < 0.0 {
                return Err(MoeError::spec("renorm eps", eps, "a finite number >= 0"));
            }
        }
        if let Some(bias) = &self.correction_bias {
            if bias.len() != e {
                return Err(MoeError::spec(
                    "correction_bias length",
                    bias.len(),
                    format!("num_experts ({e})"),
                ));
            }
            if let Some((i, b)) = bias.iter().enumerate().find(|(_, b)| !b.is_finite()) {
                return Err(MoeError::spec(
                    "correction_bias",
                    format!("{b} at expert {i}"),
                    "finite values",
                ));
            }
        }
        if let Some(g) = self.grouping {
            if g.n_group == 0 || !e.is_multiple_of(g.n_group) {
                return Err(MoeError::spec(
                    "n_group",
                    g.n_group,
                    format!("a divisor of num_experts ({e})"),
                ));
            }
            if g.topk_group == 0 || g.topk_group > g.n_group {
                return Err(MoeError::spec(
                    "topk_group",
                    g.topk_group,
                    format!("1 ..= n_group ({})", g.n_group),
                ));
            }
            let size = e / g.n_group;
            if g.score == GroupScore::Top2Sum && size < 2 {
                return Err(MoeError::spec(
                    "group size",
                    size,
                    "at least 2 experts per group for top-2-sum group scores",
                ));
            }
            if g.topk_group * size < self.top_k {
                return Err(MoeError::spec(
                    "top_k",
                    self.top_k,
                    format!(
                        "at most the {} experts inside the {} kept groups",
                        g.topk_group * size,
                        g.topk_group
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ds() -> RouterSpec {
        RouterSpec::deepseek_v3(16, 4, 4, 2, Some(vec![0.0; 16]), true, 2.5)
    }

    #[test]
    fn valid_specs_pass() {
        ds().validate().unwrap();
        RouterSpec::softmax_topk(8, 2, true).validate().unwrap();
        RouterSpec::softmax_topk(8, 8, false).validate().unwrap();
    }

    #[test]
    fn invalid_specs_name_the_value() {
        let cases: Vec<(RouterSpec, &str)> = vec![
            (RouterSpec::softmax_topk(8, 0, true), "top_k = 0"),
            (RouterSpec::softmax_topk(8, 9, true), "top_k = 9"),
            (RouterSpec::softmax_topk(0, 1, true), "num_experts = 0"),
            (
                RouterSpec {
                    grouping: Some(Grouping {
                        n_group: 3,
                        topk_group: 1,
                        score: GroupScore::Max,
                    }),
                    ..ds()
                },
                "n_group = 3",
            ),
            (
                RouterSpec {
                    grouping: Some(Grouping {
                        n_group: 4,
                        topk_group: 0,
                        score: GroupScore::Max,
                    }),
                    ..ds()
                },
                "topk_group = 0",
            ),
            (
                RouterSpec {
                    grouping: Some(Grouping {
                        n_group: 4,
                        topk_group: 5,
                        score: GroupScore::Max,
                    }),
                    ..ds()
                },
                "topk_group = 5",
            ),
            (RouterSpec { top_k: 9, ..ds() }, "at most the 8 experts"),
            (
                RouterSpec {
                    grouping: Some(Grouping {
                        n_group: 16,
                        topk_group: 8,
                        score: GroupScore::Top2Sum,
                    }),
                    ..ds()
                },
                "group size = 1",
            ),
            (
                RouterSpec {
                    routed_scaling_factor: f32::NAN,
                    ..ds()
                },
                "routed_scaling_factor = NaN",
            ),
            (
                RouterSpec {
                    correction_bias: Some({
                        let mut b = vec![0.0; 16];
                        b[3] = f32::INFINITY;
                        b
                    }),
                    ..ds()
                },
                "inf at expert 3",
            ),
            (
                RouterSpec {
                    correction_bias: Some(vec![0.0; 15]),
                    ..ds()
                },
                "correction_bias length = 15",
            ),
        ];
        for (spec, needle) in cases {
            let msg = spec.validate().unwrap_err().to_string();
            assert!(msg.contains(needle), "{msg:?} should contain {needle:?}");
        }
    }
}
