//! Router spec → CANN gating-operator attributes, per model family, against
//! values checked by hand against the aclnnMoeGatingTopK / SoftmaxV2 pages.

use moe_hal_cann::ops::{self, softmax_v1_k};
use moe_hal_cann::{
    check_route_spec, grouped_matmul_attrs, plan_route, route_attrs, route_attrs_for, softmax_v2_attrs, GatingRelease,
    GroupedMatmulAttrs, MoeGatingTopKAttrs, MoeGatingTopKSoftmaxV2Attrs, RouteCall,
};
use moe_hal_core::{Activation, GroupScore, Grouping, MoeError, Renorm, RouterSpec, Scoring};

/// DeepSeek-V3 / R1: 256 experts, top-8, 8 groups keep 4 (top-2 sum),
/// sigmoid with correction bias, renorm with eps 1e-20, scale 2.5.
fn deepseek_v3() -> RouterSpec {
    RouterSpec::deepseek_v3(256, 8, 8, 4, Some(vec![0.01; 256]), true, 2.5)
}

/// Mixtral-8x7B: softmax top-2, renormalised.
fn mixtral() -> RouterSpec {
    RouterSpec::softmax_topk(8, 2, true)
}

/// Qwen3-30B-A3B: softmax top-8 of 128 (norm_topk_prob true or false).
fn qwen3(norm_topk_prob: bool) -> RouterSpec {
    RouterSpec::softmax_topk(128, 8, norm_topk_prob)
}

fn all_ops(_: &str) -> bool {
    true
}

fn reason(e: MoeError) -> String {
    match e {
        MoeError::Unsupported { backend, reason, .. } => {
            assert_eq!(backend, "cann");
            reason
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

#[test]
fn deepseek_v3_maps_to_grouped_sigmoid_gating() {
    let a = route_attrs(&deepseek_v3()).unwrap();
    assert_eq!(
        a,
        MoeGatingTopKAttrs {
            k: 8,
            k_group: 4,
            group_count: 8,
            group_select_mode: 1,
            renorm: 0,
            norm_type: 1,
            out_flag: false,
            routed_scaling_factor: 2.5,
            eps: 1e-20f32 as f64,
            with_bias: true,
        }
    );
    // The f32 eps travels unchanged (the operator keeps eps as a float).
    assert_eq!(a.eps as f32, 1e-20f32);
    // The DeepSeek-V3 shape is the one the early releases handle.
    for r in [GatingRelease::Early, GatingRelease::SigmoidOnly, GatingRelease::Current] {
        assert_eq!(route_attrs_for(&deepseek_v3(), r).unwrap(), a, "{r:?}");
    }
    assert_eq!(
        plan_route(&deepseek_v3(), GatingRelease::Early, &all_ops).unwrap(),
        RouteCall::GatingTopK(a)
    );
    // The softmax-only fallbacks cannot express it, and say why.
    assert!(reason(softmax_v2_attrs(&deepseek_v3()).unwrap_err()).contains("softmax only"));
}

#[test]
fn group_score_max_maps_to_select_mode_0() {
    let spec = RouterSpec {
        grouping: Some(Grouping {
            n_group: 8,
            topk_group: 4,
            score: GroupScore::Max,
        }),
        ..deepseek_v3()
    };
    let a = route_attrs(&spec).unwrap();
    assert_eq!((a.group_select_mode, a.k_group, a.group_count), (0, 4, 8));
    // Early releases only do the top-2-sum variant.
    assert!(reason(route_attrs_for(&spec, GatingRelease::Early).unwrap_err()).contains("E = 256"));
}

#[test]
fn deepseek_without_norm_topk_prob_is_unsupported_with_reason() {
    let spec = RouterSpec::deepseek_v3(256, 8, 8, 4, Some(vec![0.0; 256]), false, 2.5);
    let r = reason(route_attrs(&spec).unwrap_err());
    assert!(r.contains("always divides"), "{r}");
    let r = reason(check_route_spec(&spec).unwrap_err());
    for op in [
        "aclnnMoeGatingTopK:",
        "aclnnMoeGatingTopKSoftmaxV2:",
        "aclnnMoeGatingTopKSoftmax:",
    ] {
        assert!(r.contains(op), "{r} should name {op}");
    }
}

#[test]
fn mixtral_maps_to_softmax_gating_with_plain_sum() {
    let a = route_attrs(&mixtral()).unwrap();
    assert_eq!(
        a,
        MoeGatingTopKAttrs {
            k: 2,
            k_group: 1,
            group_count: 1,
            group_select_mode: 0,
            renorm: 0,
            norm_type: 0,
            out_flag: false,
            routed_scaling_factor: 1.0,
            eps: 0.0,
            with_bias: false,
        }
    );
    // Softmax over the top-k logits = top-k probabilities / their sum.
    assert_eq!(
        softmax_v2_attrs(&mixtral()).unwrap(),
        MoeGatingTopKSoftmaxV2Attrs {
            k: 2,
            renorm: 1,
            output_softmax_result_flag: false
        }
    );
    // Early and 8.2-8.4 releases: softmax goes to the V2 fallback.
    for r in [GatingRelease::Early, GatingRelease::SigmoidOnly] {
        assert!(route_attrs_for(&mixtral(), r).is_err());
        assert_eq!(
            plan_route(&mixtral(), r, &all_ops).unwrap().operator(),
            "aclnnMoeGatingTopKSoftmaxV2",
            "{r:?}"
        );
    }
    assert_eq!(
        plan_route(&mixtral(), GatingRelease::Current, &all_ops).unwrap(),
        RouteCall::GatingTopK(a)
    );
    // The v1 operator does not renormalise.
    assert!(softmax_v1_k(&mixtral()).is_err());
}

#[test]
fn qwen3_with_norm_topk_prob() {
    let a = route_attrs(&qwen3(true)).unwrap();
    assert_eq!((a.k, a.k_group, a.group_count, a.norm_type, a.renorm), (8, 1, 1, 0, 0));
    assert_eq!((a.eps, a.routed_scaling_factor, a.with_bias), (0.0, 1.0, false));
    assert_eq!(softmax_v2_attrs(&qwen3(true)).unwrap().renorm, 1);
}

#[test]
fn qwen3_without_norm_topk_prob_uses_the_softmax_fallback() {
    let spec = qwen3(false);
    let err = route_attrs(&spec).unwrap_err();
    assert!(err.to_string().contains("Renorm::None"), "{err}");
    assert!(reason(err).contains("always divides"));
    let v2 = softmax_v2_attrs(&spec).unwrap();
    assert_eq!(
        v2,
        MoeGatingTopKSoftmaxV2Attrs {
            k: 8,
            renorm: 0,
            output_softmax_result_flag: false
        }
    );
    assert_eq!(softmax_v1_k(&spec).unwrap(), 8);
    for r in [GatingRelease::Early, GatingRelease::SigmoidOnly, GatingRelease::Current] {
        assert_eq!(plan_route(&spec, r, &all_ops).unwrap(), RouteCall::SoftmaxV2(v2));
    }
    // Only the v1 operator installed: it still routes.
    let v1_only = |op: &str| op == "aclnnMoeGatingTopKSoftmax";
    assert_eq!(
        plan_route(&spec, GatingRelease::Current, &v1_only).unwrap(),
        RouteCall::Softmax { k: 8 }
    );
    check_route_spec(&spec).unwrap();
}

#[test]
fn kimi_k2_needs_a_current_release() {
    // 384 experts, one group, sigmoid + bias, eps renorm, scale 2.827.
    let spec = RouterSpec::deepseek_v3(384, 8, 1, 1, Some(vec![0.0; 384]), true, 2.827);
    let a = route_attrs(&spec).unwrap();
    assert_eq!(
        (a.k, a.k_group, a.group_count, a.group_select_mode, a.norm_type),
        (8, 1, 1, 0, 1)
    );
    assert_eq!(a.routed_scaling_factor, 2.827f32 as f64);
    route_attrs_for(&spec, GatingRelease::SigmoidOnly).unwrap();
    let r = reason(plan_route(&spec, GatingRelease::Early, &all_ops).unwrap_err());
    assert!(r.contains("E = 256"), "{r}");
}

#[test]
fn operator_limits_are_reported() {
    // More than 2048 experts.
    let r = reason(route_attrs(&RouterSpec::deepseek_v3(4096, 8, 1, 1, None, true, 1.0)).unwrap_err());
    assert!(r.contains("2048"), "{r}");
    // Groups of 40 round up to 64: 64 * 40 groups = 2560 > 2048.
    let spec = RouterSpec::deepseek_v3(1600, 8, 40, 4, None, true, 1.0);
    let r = reason(route_attrs(&spec).unwrap_err());
    assert!(r.contains("rounded up to 32"), "{r}");
    // Softmax with a scale or a bias has no fallback.
    let scaled = RouterSpec {
        routed_scaling_factor: 2.0,
        ..qwen3(false)
    };
    assert!(reason(softmax_v2_attrs(&scaled).unwrap_err()).contains("scaling"));
    let biased = RouterSpec {
        correction_bias: Some(vec![0.0; 128]),
        scoring: Scoring::Softmax,
        ..qwen3(false)
    };
    assert!(reason(softmax_v2_attrs(&biased).unwrap_err()).contains("bias"));
    // An invalid spec is InvalidSpec, not Unsupported.
    assert!(matches!(
        route_attrs(&RouterSpec::softmax_topk(8, 0, true)),
        Err(MoeError::InvalidSpec { .. })
    ));
    // A missing operator is named.
    let none = |_: &str| false;
    let r = reason(plan_route(&mixtral(), GatingRelease::Current, &none).unwrap_err());
    assert!(r.contains("not found in the installed CANN"), "{r}");
}

#[test]
fn renorm_sum_eps_zero_is_plain_sum() {
    let spec = RouterSpec {
        renorm: Renorm::SumEps(0.0),
        ..mixtral()
    };
    assert_eq!(route_attrs(&spec).unwrap().eps, 0.0);
    assert_eq!(softmax_v2_attrs(&spec).unwrap().renorm, 1);
    let spec = RouterSpec {
        renorm: Renorm::SumEps(1e-6),
        ..mixtral()
    };
    assert!(softmax_v2_attrs(&spec).is_err());
}

#[test]
fn release_from_version_strings() {
    assert_eq!(GatingRelease::from_version("8.0.RC3"), Some(GatingRelease::Early));
    assert_eq!(GatingRelease::from_version("8.1.RC1"), Some(GatingRelease::Early));
    assert_eq!(GatingRelease::from_version("8.2.RC1"), Some(GatingRelease::SigmoidOnly));
    assert_eq!(
        GatingRelease::from_version("8.3.RC1.alpha001"),
        Some(GatingRelease::SigmoidOnly)
    );
    assert_eq!(GatingRelease::from_version("8.5.0"), Some(GatingRelease::Current));
    assert_eq!(GatingRelease::from_version("9.0.0"), Some(GatingRelease::Current));
    assert_eq!(GatingRelease::from_version("7.0.0"), Some(GatingRelease::Early));
    assert_eq!(GatingRelease::from_version("latest"), None);
}

#[test]
fn grouped_matmul_attrs_per_activation() {
    let plain = GroupedMatmulAttrs {
        split_item: 2,
        group_type: 0,
        group_list_type: 0,
        act_type: 0,
        transpose_weight: true,
        then_swiglu: false,
    };
    assert_eq!(grouped_matmul_attrs(Activation::None), plain);
    assert_eq!(
        grouped_matmul_attrs(Activation::SwiGlu),
        GroupedMatmulAttrs {
            then_swiglu: true,
            ..plain
        }
    );
}

#[test]
fn workspace_symbol_names() {
    assert_eq!(
        ops::workspace_symbol("aclnnMoeGatingTopK"),
        "aclnnMoeGatingTopKGetWorkspaceSize"
    );
}
