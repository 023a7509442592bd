//! The operator map, as data: for each kernel, the `aclnn` operator a real
//! implementation calls, its fallbacks, and how our specs become the
//! operator's attributes.
//!
//! Sources: the public `aclnn` API pages and the open-source operator code
//! (ops-transformer) as of CANN 8.1–8.5, and public integrations that call
//! these operators. **Nothing here has been run on Ascend hardware**; every
//! value marked "unverified" must be confirmed by the conformance suite on a
//! real device (see `docs/cann.md`).

use moe_hal_core::{Activation, GroupScore, Kernel, MoeError, Renorm, Result, RouterSpec, Scoring};
use std::fmt;

/// Name of this backend in errors and capability reports.
pub const BACKEND: &str = "cann";

/// `libascendcl.so`: device, stream, memory and error text.
pub const ASCENDCL_LIB: &str = "libascendcl.so";
/// `libnnopbase.so`: `aclTensor` and friends, which every `aclnn` call takes.
pub const NNOPBASE_LIB: &str = "libnnopbase.so";
/// Newer CANN moves the MoE and grouped-matmul operators here; probed first.
pub const OPAPI_TRANSFORMER_LIB: &str = "libopapi_transformer.so";
/// The `aclnn*` operators (all of them on CANN 8.x before the split).
pub const OPAPI_LIB: &str = "libopapi.so";

/// Operator libraries, in the order in which operators are looked up.
pub const OPERATOR_LIBS: [&str; 2] = [OPAPI_TRANSFORMER_LIB, OPAPI_LIB];

/// Runtime entry points the slot needs from `libascendcl.so`.
pub const ASCENDCL_SYMBOLS: &[&str] = &[
    "aclInit",
    "aclFinalize",
    "aclrtSetDevice",
    "aclrtResetDevice",
    "aclrtCreateStream",
    "aclrtDestroyStream",
    "aclrtSynchronizeStream",
    "aclrtMalloc",
    "aclrtFree",
    "aclrtMemset",
    "aclrtMemcpy",
    "aclrtMemcpyAsync",
    "aclGetRecentErrMsg",
];

/// Tensor-object entry points the slot needs from `libnnopbase.so`.
pub const NNOPBASE_SYMBOLS: &[&str] = &[
    "aclCreateTensor",
    "aclDestroyTensor",
    "aclCreateIntArray",
    "aclDestroyIntArray",
    "aclCreateScalar",
    "aclDestroyScalar",
    "aclCreateTensorList",
    "aclDestroyTensorList",
];

/// A step of the slot: the six trait kernels plus the helper operators and
/// the expert-parallel pair that the trait does not have yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SlotKernel {
    RouterLogits,
    Route,
    TopK,
    Permute,
    /// Per-expert counts from sorted ids (helper of permute).
    ExpertCounts,
    GroupedMatmul,
    /// The SwiGLU between the two grouped matmuls.
    SwiGlu,
    Combine,
    /// Expert-parallel dispatch across devices (not in the trait yet).
    EpDispatch,
    /// Expert-parallel combine across devices (not in the trait yet).
    EpCombine,
}

impl SlotKernel {
    pub const ALL: [SlotKernel; 10] = [
        SlotKernel::RouterLogits,
        SlotKernel::Route,
        SlotKernel::TopK,
        SlotKernel::Permute,
        SlotKernel::ExpertCounts,
        SlotKernel::GroupedMatmul,
        SlotKernel::SwiGlu,
        SlotKernel::Combine,
        SlotKernel::EpDispatch,
        SlotKernel::EpCombine,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SlotKernel::RouterLogits => "router_logits",
            SlotKernel::Route => "route",
            SlotKernel::TopK => "topk",
            SlotKernel::Permute => "permute",
            SlotKernel::ExpertCounts => "expert_counts",
            SlotKernel::GroupedMatmul => "grouped_matmul",
            SlotKernel::SwiGlu => "swiglu",
            SlotKernel::Combine => "combine",
            SlotKernel::EpDispatch => "ep_dispatch",
            SlotKernel::EpCombine => "ep_combine",
        }
    }

    /// The trait kernel this step implements, if it is one.
    pub fn trait_kernel(self) -> Option<Kernel> {
        match self {
            SlotKernel::RouterLogits => Some(Kernel::RouterLogits),
            SlotKernel::Route => Some(Kernel::Route),
            SlotKernel::TopK => Some(Kernel::TopK),
            SlotKernel::Permute => Some(Kernel::Permute),
            SlotKernel::GroupedMatmul => Some(Kernel::GroupedMatmul),
            SlotKernel::Combine => Some(Kernel::Combine),
            SlotKernel::ExpertCounts | SlotKernel::SwiGlu | SlotKernel::EpDispatch | SlotKernel::EpCombine => None,
        }
    }

    /// The slot step of a trait kernel.
    pub fn of(kernel: Kernel) -> SlotKernel {
        match kernel {
            Kernel::RouterLogits => SlotKernel::RouterLogits,
            Kernel::Route => SlotKernel::Route,
            Kernel::TopK => SlotKernel::TopK,
            Kernel::Permute => SlotKernel::Permute,
            Kernel::GroupedMatmul => SlotKernel::GroupedMatmul,
            Kernel::Combine => SlotKernel::Combine,
        }
    }
}

impl fmt::Display for SlotKernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One row of the operator map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpEntry {
    pub kernel: SlotKernel,
    /// The operator to call when present (`aclnnXxx`; its first phase is
    /// `aclnnXxxGetWorkspaceSize`).
    pub preferred: &'static str,
    /// Older or narrower operators that do the same job, in order.
    pub fallbacks: &'static [&'static str],
    /// Further operators the kernel needs around the main one (casts, prefix sums).
    pub helpers: &'static [&'static str],
    /// Where the public docs put the operator.
    pub library: &'static str,
    /// How our arguments and specs become the operator's inputs and attributes.
    pub attrs: &'static str,
    /// What is inferred rather than documented, and what a device run must confirm.
    pub notes: &'static str,
}

impl OpEntry {
    /// The preferred operator, then its fallbacks.
    pub fn candidates(&self) -> impl Iterator<Item = &'static str> {
        std::iter::once(self.preferred).chain(self.fallbacks.iter().copied())
    }
}

/// `aclnnXxx` → `aclnnXxxGetWorkspaceSize`, the first of the two calls.
pub fn workspace_symbol(op: &str) -> String {
    format!("{op}GetWorkspaceSize")
}

const TRANSFORMER_OR_OPAPI: &str = "libopapi_transformer.so, else libopapi.so";

/// The whole map, one entry per slot step, in pipeline order.
pub const OP_MAP: &[OpEntry] = &[
    OpEntry {
        kernel: SlotKernel::RouterLogits,
        preferred: "aclnnMatmul",
        fallbacks: &["aclnnMm"],
        helpers: &["aclnnCast"],
        library: OPAPI_LIB,
        attrs: "self = hidden [T, H] (cast to f32 with aclnnCast first when bf16/f16); mat2 = router weight [E, H] \
                viewed as [H, E] through strides {1, H}; out = logits [T, E] f32; cubeMathType = 0 (KEEP_DTYPE, \
                so f32 is not computed in HF32)",
        notes: "cubeMathType semantics per the aclnnMatmul page; unverified that KEEP_DTYPE meets the f32 tolerance",
    },
    OpEntry {
        kernel: SlotKernel::Route,
        preferred: "aclnnMoeGatingTopK",
        fallbacks: &["aclnnMoeGatingTopKSoftmaxV2", "aclnnMoeGatingTopKSoftmax"],
        helpers: &[],
        library: TRANSFORMER_OR_OPAPI,
        attrs: "x = logits [T, E] f32; biasOptional = correction_bias [E] f32; k = top_k; kGroup = topk_group (1); \
                groupCount = n_group (1); groupSelectMode: Max 0, Top2Sum 1; renorm = 0; normType: softmax 0, \
                sigmoid 1; outFlag = false; routedScalingFactor; eps: SumEps(e) e, Sum 0 (Renorm::None is not \
                expressible); yOut = weights f32, expertIdxOut = ids (int32 into the u32 buffer). Fallbacks \
                (softmax, no bias, no groups, scale 1): SoftmaxV2 renorm 0 = Renorm::None, renorm 1 = Renorm::Sum; \
                Softmax (v1) = Renorm::None",
        notes: "yOut = y / (sum(y) + eps) * routedScalingFactor is the documented formula: the weights are always \
                renormalised; 'renorm' selects norm-before-top-k and only 0 is accepted by every release. \
                normType 0 (softmax) is documented from CANN 8.5; releases before 8.2 handle only the \
                DeepSeek-V3 shape (E 256, 8 groups, 4 kept, top-2 sum, sigmoid). Tie order and NaN handling \
                unverified",
    },
    OpEntry {
        kernel: SlotKernel::TopK,
        preferred: "aclnnTopk",
        fallbacks: &[],
        helpers: &["aclnnCast"],
        library: OPAPI_LIB,
        attrs: "self = values [rows, cols] f32; k; dim = -1; largest = true; sorted = true; valuesOut = out f32; \
                indicesOut int64, then aclnnCast to int32 into the u32 ids buffer",
        notes: "tie order (lower index first) and NaN ranking are not documented; unverified",
    },
    OpEntry {
        kernel: SlotKernel::Permute,
        preferred: "aclnnMoeInitRoutingV3",
        fallbacks: &["aclnnMoeInitRoutingV2"],
        helpers: &["aclnnCumsum", "aclnnScatter", "aclnnArange"],
        library: TRANSFORMER_OR_OPAPI,
        attrs: "x = hidden [T, H]; expertIdx = ids [T, k] int32; activeNum = T * k; expertCapacity = 0; \
                expertNum = E; dropPadMode = 0 (dropless); expertTokensNumType = 1 (count) -> counts; \
                rowIdxType = 1 (scatter: expandedRowIdx[t*k + j] = slot) -> slot_of; activeExpertRange = [0, E); \
                quantMode = -1. offsets = [0, cumsum(counts)] (aclrtMemset + aclnnCumsum); \
                source_of = inverse of slot_of (aclnnArange + aclnnScatter). V2: expertTokensCountOrCumsumFlag = 2 \
                (count), expandedRowIdx is the scatter form",
        notes: "V2 docs: sortedExpertIdx, sortedRowIdx = keyValueSort(expertIdx) over the row-major [T, k] index, \
                expandedRowIdx[sortedRowIdx[i]] = i; that the sort is stable (our contract) is unverified",
    },
    OpEntry {
        kernel: SlotKernel::ExpertCounts,
        preferred: "aclnnMoeComputeExpertTokens",
        fallbacks: &[],
        helpers: &[],
        library: TRANSFORMER_OR_OPAPI,
        attrs: "sortedExperts int32 [T * k]; numExperts = E (<= 2048); out = per-expert end offsets",
        notes: "only needed when the routing operator does not return counts",
    },
    OpEntry {
        kernel: SlotKernel::GroupedMatmul,
        preferred: "aclnnGroupedMatmulV5",
        fallbacks: &["aclnnGroupedMatmulV4"],
        helpers: &["aclnnCast"],
        library: TRANSFORMER_OR_OPAPI,
        attrs: "x = [input [rows, K]] (list of one); weight = [W] (one [E, K, N'] view of our [E, N', K] \
                through strides {N'K, 1, K}); groupListOptional = offsets[1..=E] cast to int64; splitItem = 2 \
                (one output tensor); groupType = 0 (split M); groupListType = 0 (cumsum); actType = 0; \
                y = [output] (SwiGLU: a [rows, 2N] scratch, then aclnnSwiGlu)",
        notes: "actType cannot express SwiGLU (silu(gate) * up needs both halves), so SwiGLU is a second op; \
                transposed-weight views and rows past offsets[E] being left untouched are unverified",
    },
    OpEntry {
        kernel: SlotKernel::SwiGlu,
        preferred: "aclnnSwiGlu",
        fallbacks: &[],
        helpers: &[],
        library: TRANSFORMER_OR_OPAPI,
        attrs: "x = [rows, 2N] (gate columns first, as our weight stores gate rows first); dim = -1; \
                out = silu(first half) * second half, [rows, N]",
        notes: "operator name from the slot notes (unverified); which half is gated is unverified",
    },
    OpEntry {
        kernel: SlotKernel::Combine,
        preferred: "aclnnMoeTokenUnpermute",
        fallbacks: &["aclnnMoeFinalizeRoutingV2"],
        helpers: &["aclnnInplaceAdd"],
        library: TRANSFORMER_OR_OPAPI,
        attrs: "permutedTokens = expert_out [T * k, H]; sortedIndices = slot_of int32; probsOptional = weights \
                [T, k] f32; paddedMode = false; restoreShapeOptional = null; out = output [T, H]; accumulate: \
                aclnnInplaceAdd(output, scratch). FinalizeRoutingV2: expandedX = expert_out, expandedRowIdx = \
                slot_of, x1Optional = output when accumulating, scalesOptional = weights, expertIdxOptional = ids, \
                dropPadMode = 0",
        notes: "summation order (ours: ascending expert id, in f32) and whether sortedIndices takes the gather \
                or the scatter form are unverified; one public integration avoids FinalizeRouting for accuracy",
    },
    OpEntry {
        kernel: SlotKernel::EpDispatch,
        preferred: "aclnnMoeDistributeDispatchV2",
        fallbacks: &["aclnnMoeDistributeDispatch"],
        helpers: &[],
        library: TRANSFORMER_OR_OPAPI,
        attrs: "groupEp = HCCL group name; epWorldSize; epRankId; moeExpertNum; tpWorldSize = 1; \
                sharedExpertNum = 0; quantMode = 0; globalBs",
        notes: "for a later expert-parallel trait; needs libhccl.so and an HCCL communicator (not probed)",
    },
    OpEntry {
        kernel: SlotKernel::EpCombine,
        preferred: "aclnnMoeDistributeCombineV2",
        fallbacks: &["aclnnMoeDistributeCombine"],
        helpers: &[],
        library: TRANSFORMER_OR_OPAPI,
        attrs: "the same group, ranks and expert count as the dispatch; expertScales = weights",
        notes: "for a later expert-parallel trait",
    },
];

/// The map entry of `kernel`.
pub fn entry(kernel: SlotKernel) -> &'static OpEntry {
    OP_MAP
        .iter()
        .find(|e| e.kernel == kernel)
        .expect("OP_MAP has one entry per SlotKernel (checked by a test)")
}

// ---------------------------------------------------------------- route

/// Which releases of `aclnnMoeGatingTopK` the limits are taken from.
///
/// The operator grew over releases: the 8.1 kernel is written for exactly
/// the DeepSeek-V3 router; the 8.2/8.3 docs describe sigmoid only; the 8.5
/// docs add softmax (`normType` 0). The capability query uses the limits of
/// the toolkit it found, so that a spec the operator cannot run is refused
/// before dispatch, not by a tiling error on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GatingRelease {
    /// CANN 8.0 / 8.1: E = 256, 8 groups, 4 kept, top-2-sum groups, sigmoid,
    /// k <= 32. Inferred from the 8.1.RC1 kernel (fixed 8 x 32 sort and 4-way
    /// merge) and one public integration that only calls it for E = 256.
    Early,
    /// CANN 8.2 to 8.4: the documented general limits, sigmoid only.
    SigmoidOnly,
    /// CANN 8.5 and later: the documented limits, softmax or sigmoid.
    Current,
}

impl GatingRelease {
    /// Release from a toolkit version string such as `8.1.RC1` or `8.5.0`.
    pub fn from_version(version: &str) -> Option<GatingRelease> {
        let mut parts = version.trim().split(['.', '-']);
        let major: u32 = parts.next()?.trim().parse().ok()?;
        let minor: u32 = parts.next()?.trim().parse().ok()?;
        Some(match (major, minor) {
            (m, _) if m < 8 => GatingRelease::Early,
            (8, 0) | (8, 1) => GatingRelease::Early,
            (8, 2..=4) => GatingRelease::SigmoidOnly,
            _ => GatingRelease::Current,
        })
    }

    pub fn describe(self) -> &'static str {
        match self {
            GatingRelease::Early => {
                "early (CANN <= 8.1): aclnnMoeGatingTopK only for E = 256, 8 groups, 4 kept, top-2-sum, sigmoid, k <= 32"
            }
            GatingRelease::SigmoidOnly => "CANN 8.2-8.4: aclnnMoeGatingTopK with sigmoid scoring only",
            GatingRelease::Current => "CANN 8.5+: aclnnMoeGatingTopK with softmax or sigmoid scoring",
        }
    }
}

/// Largest expert count `aclnnMoeGatingTopK` and `aclnnMoeComputeExpertTokens` accept.
pub const MAX_GATING_EXPERTS: usize = 2048;
/// Largest `k` of `aclnnMoeGatingTopKSoftmax[V2]`.
pub const MAX_SOFTMAX_TOPK_K: usize = 1024;

/// Attributes of one `aclnnMoeGatingTopKGetWorkspaceSize` call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MoeGatingTopKAttrs {
    pub k: i64,
    pub k_group: i64,
    pub group_count: i64,
    /// 0: group score = max; 1: sum of the top two.
    pub group_select_mode: i64,
    /// 0: norm (softmax/sigmoid) before top-k; the only value every release accepts.
    pub renorm: i64,
    /// 0: softmax; 1: sigmoid.
    pub norm_type: i64,
    /// Whether `outOut` (the normed scores) is written; we do not need it.
    pub out_flag: bool,
    pub routed_scaling_factor: f64,
    /// `yOut = y / (sum(y) + eps) * routedScalingFactor`.
    pub eps: f64,
    /// Whether `biasOptional` gets the correction bias (else a null tensor).
    pub with_bias: bool,
}

impl fmt::Display for MoeGatingTopKAttrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "k={}, kGroup={}, groupCount={}, groupSelectMode={}, renorm={}, normType={}, outFlag={}, \
             routedScalingFactor={}, eps={:e}, bias={}",
            self.k,
            self.k_group,
            self.group_count,
            self.group_select_mode,
            self.renorm,
            self.norm_type,
            self.out_flag,
            self.routed_scaling_factor,
            self.eps,
            if self.with_bias { "given" } else { "null" }
        )
    }
}

/// Attributes of `aclnnMoeGatingTopKSoftmaxV2`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeGatingTopKSoftmaxV2Attrs {
    pub k: i64,
    /// 0: softmax then top-k (raw probabilities); 1: top-k then softmax over
    /// the k logits, which equals the top-k probabilities divided by their sum.
    pub renorm: i64,
    pub output_softmax_result_flag: bool,
}

/// One routing call: which operator, with which attributes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RouteCall {
    GatingTopK(MoeGatingTopKAttrs),
    SoftmaxV2(MoeGatingTopKSoftmaxV2Attrs),
    /// `aclnnMoeGatingTopKSoftmax`: softmax then top-k, no renormalisation.
    Softmax {
        k: i64,
    },
}

impl RouteCall {
    pub fn operator(&self) -> &'static str {
        match self {
            RouteCall::GatingTopK(_) => "aclnnMoeGatingTopK",
            RouteCall::SoftmaxV2(_) => "aclnnMoeGatingTopKSoftmaxV2",
            RouteCall::Softmax { .. } => "aclnnMoeGatingTopKSoftmax",
        }
    }
}

impl fmt::Display for RouteCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteCall::GatingTopK(a) => write!(f, "{} ({a})", self.operator()),
            RouteCall::SoftmaxV2(a) => write!(
                f,
                "{} (k={}, renorm={}, outputSoftmaxResultFlag={})",
                self.operator(),
                a.k,
                a.renorm,
                a.output_softmax_result_flag
            ),
            RouteCall::Softmax { k } => write!(f, "{} (k={k})", self.operator()),
        }
    }
}

fn unsupported(what: impl ToString, reason: impl ToString) -> MoeError {
    MoeError::unsupported(BACKEND, what, reason)
}

/// `spec` as `aclnnMoeGatingTopK` attributes, under the documented limits of
/// the current release (see [`route_attrs_for`]).
pub fn route_attrs(spec: &RouterSpec) -> Result<MoeGatingTopKAttrs> {
    route_attrs_for(spec, GatingRelease::Current)
}

/// `spec` as `aclnnMoeGatingTopK` attributes under the limits of `release`,
/// or `Unsupported` with the reason the operator cannot express it.
pub fn route_attrs_for(spec: &RouterSpec, release: GatingRelease) -> Result<MoeGatingTopKAttrs> {
    spec.validate()?;
    let op = "aclnnMoeGatingTopK";
    let e = spec.num_experts;
    let eps = match spec.renorm {
        Renorm::SumEps(eps) => eps as f64,
        Renorm::Sum => 0.0,
        Renorm::None => {
            return Err(unsupported(
                format!("route with Renorm::None on {op}"),
                "the operator always divides the chosen weights by their sum plus eps \
                 (yOut = y / (sum(y) + eps) * routedScalingFactor); its renorm attribute only orders norm \
                 and top-k, and 0 is the only value every release accepts",
            ))
        }
    };
    let norm_type = match spec.scoring {
        Scoring::Softmax => 0,
        Scoring::Sigmoid => 1,
    };
    if e > MAX_GATING_EXPERTS {
        return Err(unsupported(
            format!("route with {e} experts on {op}"),
            format!("at most {MAX_GATING_EXPERTS} experts"),
        ));
    }
    let (group_count, k_group, group_select_mode) = match spec.grouping {
        None => (1, 1, 0),
        Some(g) => (
            g.n_group,
            g.topk_group,
            match g.score {
                GroupScore::Max => 0,
                GroupScore::Top2Sum => 1,
            },
        ),
    };
    // Documented: when groups are selected, each group's size rounded up to
    // 32, times the group count, must fit in 2048.
    if group_count > 1 && k_group != group_count {
        let aligned = (e / group_count).div_ceil(32) * 32 * group_count;
        if aligned > MAX_GATING_EXPERTS {
            return Err(unsupported(
                format!("route with {group_count} groups of {} experts on {op}", e / group_count),
                format!("the group size rounded up to 32, times the group count, is {aligned}; at most 2048"),
            ));
        }
    }
    match release {
        GatingRelease::Current => {}
        GatingRelease::SigmoidOnly if spec.scoring == Scoring::Softmax => {
            return Err(unsupported(
                format!("route with softmax scoring on {op}"),
                "this CANN release documents sigmoid scoring only (normType 0 is documented from CANN 8.5)",
            ))
        }
        GatingRelease::SigmoidOnly => {}
        GatingRelease::Early => {
            let ds_v3_shape = e == 256
                && spec.scoring == Scoring::Sigmoid
                && spec.top_k <= 32
                && spec
                    .grouping
                    .is_some_and(|g| g.n_group == 8 && g.topk_group == 4 && g.score == GroupScore::Top2Sum);
            if !ds_v3_shape {
                return Err(unsupported(
                    format!("this router on {op} of CANN <= 8.1"),
                    "early releases handle only E = 256 with 8 groups, 4 kept, top-2-sum group scores, sigmoid \
                     and k <= 32 (the DeepSeek-V3 router)",
                ));
            }
        }
    }
    Ok(MoeGatingTopKAttrs {
        k: spec.top_k as i64,
        k_group: k_group as i64,
        group_count: group_count as i64,
        group_select_mode,
        renorm: 0,
        norm_type,
        out_flag: false,
        routed_scaling_factor: spec.routed_scaling_factor as f64,
        eps,
        with_bias: spec.correction_bias.is_some(),
    })
}

/// Why a softmax-only gating operator cannot run `spec`, if it cannot.
fn softmax_only_limits(spec: &RouterSpec, op: &str) -> Result<()> {
    let what = || format!("this router on {op}");
    if spec.scoring != Scoring::Softmax {
        return Err(unsupported(what(), "the operator scores with softmax only"));
    }
    if spec.correction_bias.is_some() {
        return Err(unsupported(what(), "the operator takes no correction bias"));
    }
    if spec.grouping.is_some() {
        return Err(unsupported(what(), "the operator has no group selection"));
    }
    if spec.routed_scaling_factor != 1.0 {
        return Err(unsupported(what(), "the operator has no routed scaling factor"));
    }
    if spec.top_k > MAX_SOFTMAX_TOPK_K {
        return Err(unsupported(what(), format!("k at most {MAX_SOFTMAX_TOPK_K}")));
    }
    Ok(())
}

/// `spec` as `aclnnMoeGatingTopKSoftmaxV2` attributes (first fallback).
pub fn softmax_v2_attrs(spec: &RouterSpec) -> Result<MoeGatingTopKSoftmaxV2Attrs> {
    spec.validate()?;
    let op = "aclnnMoeGatingTopKSoftmaxV2";
    softmax_only_limits(spec, op)?;
    let renorm = match spec.renorm {
        Renorm::None => 0,
        Renorm::Sum | Renorm::SumEps(0.0) => 1,
        Renorm::SumEps(eps) => {
            return Err(unsupported(
                format!("route with renorm eps {eps:e} on {op}"),
                "its renormalisation (softmax over the top-k logits) has no eps",
            ))
        }
    };
    Ok(MoeGatingTopKSoftmaxV2Attrs {
        k: spec.top_k as i64,
        renorm,
        output_softmax_result_flag: false,
    })
}

/// `spec` as `aclnnMoeGatingTopKSoftmax` (second fallback): `k` only.
pub fn softmax_v1_k(spec: &RouterSpec) -> Result<i64> {
    spec.validate()?;
    let op = "aclnnMoeGatingTopKSoftmax";
    softmax_only_limits(spec, op)?;
    if spec.renorm != Renorm::None {
        return Err(unsupported(
            format!("renormalised routing on {op}"),
            "the operator does not renormalise",
        ));
    }
    Ok(spec.top_k as i64)
}

/// The routing call for `spec`: the preferred operator when it is
/// `available` and can express the spec, else the first fallback that can.
/// `Unsupported` names every operator tried and why each was refused.
pub fn plan_route(spec: &RouterSpec, release: GatingRelease, available: &dyn Fn(&str) -> bool) -> Result<RouteCall> {
    spec.validate()?;
    let tries: [(&str, Result<RouteCall>); 3] = [
        (
            "aclnnMoeGatingTopK",
            route_attrs_for(spec, release).map(RouteCall::GatingTopK),
        ),
        (
            "aclnnMoeGatingTopKSoftmaxV2",
            softmax_v2_attrs(spec).map(RouteCall::SoftmaxV2),
        ),
        (
            "aclnnMoeGatingTopKSoftmax",
            softmax_v1_k(spec).map(|k| RouteCall::Softmax { k }),
        ),
    ];
    let mut reasons = Vec::new();
    for (op, call) in tries {
        match call {
            Ok(call) if available(op) => return Ok(call),
            Ok(_) => reasons.push(format!("{op}: not found in the installed CANN")),
            Err(MoeError::Unsupported { reason, .. }) => reasons.push(format!("{op}: {reason}")),
            Err(other) => return Err(other),
        }
    }
    Err(unsupported(route_summary(spec), reasons.join("; ")))
}

/// Whether some CANN gating operator can express `spec`, per the documented
/// limits of the current release: `Ok`, or `Unsupported` with the reasons.
pub fn check_route_spec(spec: &RouterSpec) -> Result<()> {
    plan_route(spec, GatingRelease::Current, &|_| true).map(|_| ())
}

/// A short description of a router for error messages.
pub fn route_summary(spec: &RouterSpec) -> String {
    let scoring = match spec.scoring {
        Scoring::Softmax => "softmax",
        Scoring::Sigmoid => "sigmoid",
    };
    let groups = match spec.grouping {
        Some(g) => format!(", {}/{} groups ({:?})", g.topk_group, g.n_group, g.score),
        None => String::new(),
    };
    let bias = if spec.correction_bias.is_some() { ", bias" } else { "" };
    format!(
        "route ({scoring} E={} k={}{groups}{bias}, {:?}, scale {})",
        spec.num_experts, spec.top_k, spec.renorm, spec.routed_scaling_factor
    )
}

// ---------------------------------------------------------------- grouped matmul

/// Attributes of one `aclnnGroupedMatmulV4/V5` call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupedMatmulAttrs {
    /// 2: one output tensor for all groups (2 and 3 both mean that in the docs).
    pub split_item: i64,
    /// 0: groups split the M (row) axis.
    pub group_type: i64,
    /// 0: the group list holds cumulative row ends (our `offsets[1..=E]`); 1: counts.
    pub group_list_type: i64,
    /// 0: no epilogue activation.
    pub act_type: i64,
    /// The weight is passed as a transposed view (ours is `[E, N, K]`, the operator's `[E, K, N]`).
    pub transpose_weight: bool,
    /// An `aclnnSwiGlu` follows on a `[rows, 2N]` scratch.
    pub then_swiglu: bool,
}

impl fmt::Display for GroupedMatmulAttrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "splitItem={}, groupType={}, groupListType={}, actType={}, weight {}{}",
            self.split_item,
            self.group_type,
            self.group_list_type,
            self.act_type,
            if self.transpose_weight {
                "transposed view"
            } else {
                "as stored"
            },
            if self.then_swiglu { ", then aclnnSwiGlu" } else { "" }
        )
    }
}

/// Grouped-matmul attributes for an epilogue. `actType` stays 0 for SwiGLU:
/// the operator's activations apply to one GEMM output, while SwiGLU needs
/// `silu(gate) * up` over both halves, so `aclnnSwiGlu` runs afterwards.
pub fn grouped_matmul_attrs(activation: Activation) -> GroupedMatmulAttrs {
    GroupedMatmulAttrs {
        split_item: 2,
        group_type: 0,
        group_list_type: 0,
        act_type: 0,
        transpose_weight: true,
        then_swiglu: activation == Activation::SwiGlu,
    }
}
