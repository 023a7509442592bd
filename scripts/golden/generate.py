#!/usr/bin/env python3
"""Generate golden MoE fixtures with Hugging Face transformers' own MoE blocks.

For every case below this script

1. builds the family's config class (DeepseekV3Config, MixtralConfig,
   Qwen2MoeConfig, Qwen3MoeConfig) with small sizes and
   ``experts_implementation="eager"``,
2. constructs the MoE block class directly (DeepseekV3MoE,
   MixtralSparseMoeBlock, Qwen2MoeSparseMoeBlock, Qwen3MoeSparseMoeBlock) in
   float32 and sets every parameter and buffer from seeded random tensors
   (transformers leaves the fused expert weights uninitialised),
3. runs it on a seeded input and captures, with a forward hook on the block's
   router (``block.gate``), the experts and weights the block actually used,
4. writes ``tests/fixtures/golden/<case>/``: config.json, model.safetensors
   (only that layer's tensors, per-expert, under real checkpoint names),
   io.safetensors (input, output, router choice) and meta.json.

Self-checks run for every case (the script fails if one does not hold):
* an independent float64 re-implementation of shared/docs/routing-spec.md, fed the
  checkpoint-format tensors, picks the same expert sets and weights and gives
  the same output;
* ``<Family>ForCausalLM.from_pretrained(<case dir>)`` loads the written
  checkpoint (transformers' own name mapping and expert fusion) into exactly the
  block's parameters, and layer 0 is dense where the family allows it;
* DeepSeek cases: for some tokens the correction bias, the group mask, ... do
  change the chosen set (asserted where the case is meant to show it).

Deterministic: same files byte for byte on every run (seeded generators, one
CPU thread, sorted JSON keys).

Usage: .venv-golden/bin/python scripts/golden/generate.py [--out DIR] [--only CASE ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import (  # noqa: E402
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MLP, DeepseekV3MoE  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeMLP, Qwen2MoeSparseMoeBlock  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeMLP, Qwen3MoeSparseMoeBlock  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "tests" / "fixtures" / "golden"
BASE_SEED = 20250101
LAYER = 1  # the MoE layer every fixture stores; layer 0 is dense where the family allows it
MAX_TOTAL_BYTES = 5 * 1024 * 1024


# --------------------------------------------------------------------------------------
# cases


@dataclasses.dataclass
class Case:
    name: str
    family: str  # deepseek_v3 | mixtral | qwen2_moe | qwen3_moe
    tokens: int
    hidden: int
    inter: int  # moe_intermediate_size (intermediate_size for Mixtral)
    experts: int
    top_k: int
    config: dict[str, Any]  # extra config kwargs
    router_std: float = 1.5  # std of router logits for a unit-variance input
    bias: Callable[[np.random.Generator, int], torch.Tensor] | None = None  # DeepSeek correction bias
    bf16: bool = False  # store the checkpoint in bf16 (reference uses the bf16-rounded weights)
    sharded: bool = False  # two shards + index + a decoy tensor from layer 0
    model_type_override: str | None = None  # written into config.json instead of the class's
    must_differ: tuple[str, ...] = ()  # DeepSeek diagnostics that must change >= 1 token's set
    notes: str = ""


def bias_uniform(lo: float, hi: float):
    def make(g: np.random.Generator, n: int) -> torch.Tensor:
        return torch.from_numpy(g.uniform(lo, hi, size=n).astype(np.float32))

    return make


CASES: list[Case] = [
    Case(
        name="deepseek_v3_groups_norm",
        family="deepseek_v3",
        tokens=64,
        hidden=64,
        inter=32,
        experts=32,
        top_k=4,
        config=dict(n_group=4, topk_group=2, norm_topk_prob=True, n_shared_experts=1, routed_scaling_factor=2.5),
        bias=bias_uniform(-0.05, 0.05),
        must_differ=("no_bias", "no_group_mask"),
        notes="DeepSeek-V3 noaux_tc routing: 4 groups of 8, keep 2, k=4, norm_topk_prob, routed_scaling_factor 2.5, "
        "1 shared expert. The correction bias and the group mask each change the chosen set for some tokens "
        "(asserted; counts in diagnostics).",
    ),
    Case(
        name="deepseek_v3_nonorm_2shared",
        family="deepseek_v3",
        tokens=17,
        hidden=32,
        inter=16,
        experts=64,
        top_k=8,
        config=dict(n_group=8, topk_group=4, norm_topk_prob=False, n_shared_experts=2, routed_scaling_factor=1.5),
        # negative bias: many biased scores c = s + b are < 0, so masking excluded groups to 0 instead of
        # -inf picks a different set (asserted). A constant offset of the bias never changes transformers'
        # choice (-inf masking, top-2-sum group scores are shift invariant), only the broken 0-masking one.
        bias=bias_uniform(-1.6, -0.4),
        must_differ=("no_bias", "no_group_mask", "mask_to_zero"),
        notes="DeepSeek-V3 routing without norm_topk_prob (weights = sigmoid * routed_scaling_factor 1.5), "
        "8 groups of 8, keep 4, k=8, 2 shared experts (shared intermediate = 2 * moe_intermediate_size). "
        "Negative correction bias (U(-1.6,-0.4)): masking excluded groups to 0 instead of -inf changes the choice (asserted).",
    ),
    Case(
        name="kimi_k2_style",
        family="deepseek_v3",
        tokens=5,
        hidden=32,
        inter=16,
        experts=48,
        top_k=8,
        config=dict(n_group=1, topk_group=1, norm_topk_prob=True, n_shared_experts=1, routed_scaling_factor=2.827),
        bias=bias_uniform(-0.05, 0.05),
        model_type_override="kimi_k2",
        must_differ=("no_bias",),
        notes="Kimi-K2 style: DeepSeek-V3 architecture (transformers' DeepseekV3MoE computes it) with a single group "
        "(n_group 1, topk_group 1), E=48, k=8, routed_scaling_factor 2.827. config.json says model_type kimi_k2 "
        "(transformers has no kimi_k2 config class; the file was produced by DeepseekV3Config and the model_type "
        "overwritten, as in the released Kimi-K2 config which also names DeepseekV3ForCausalLM).",
    ),
    Case(
        name="mixtral_top1",
        family="mixtral",
        tokens=5,
        hidden=32,
        inter=32,
        experts=8,
        top_k=1,
        config=dict(),
        notes="Mixtral with num_experts_per_tok 1: the renormalised weight is exactly 1.0.",
    ),
    Case(
        name="mixtral_top2",
        family="mixtral",
        tokens=17,
        hidden=48,
        inter=32,
        experts=8,
        top_k=2,
        config=dict(),
        bf16=True,
        notes="Mixtral top-2. Checkpoint stored in bfloat16; the expected output was computed by transformers in "
        "float32 with the bf16-rounded weights (so converting the checkpoint to f32 exactly reproduces it). "
        "hidden_states are float32 and not rounded.",
    ),
    Case(
        name="qwen2_moe_shared_gated",
        family="qwen2_moe",
        tokens=64,
        hidden=48,
        inter=16,
        experts=24,
        top_k=4,
        config=dict(shared_expert_intermediate_size=64, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[0]),
        notes="Qwen2-MoE (Qwen1.5-MoE style): softmax top-4 of 24 without renormalisation, plus a shared expert "
        "(intermediate 64) gated per token by sigmoid(x . shared_expert_gate).",
    ),
    Case(
        name="qwen3_moe_norm",
        family="qwen3_moe",
        tokens=17,
        hidden=32,
        inter=16,
        experts=64,
        top_k=8,
        config=dict(norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[0]),
        sharded=True,
        notes="Qwen3-MoE, softmax top-8 of 64 renormalised (norm_topk_prob true). Sharded checkpoint: "
        "model.safetensors.index.json + 2 shards; shard 2 also holds model.layers.0.mlp.gate_proj.weight, a tensor "
        "of the dense layer 0 that a loader of layer 1 must ignore.",
    ),
    Case(
        name="qwen3_moe_nonorm",
        family="qwen3_moe",
        tokens=1,
        hidden=32,
        inter=24,
        experts=32,
        top_k=6,
        config=dict(norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[], num_hidden_layers=3),
        notes="Qwen3-MoE with norm_topk_prob false (raw softmax probabilities of the 6 chosen of 32); one token. "
        "Layers 0 and 2 are dense through decoder_sparse_step 2 (not mlp_only_layers).",
    ),
]


# --------------------------------------------------------------------------------------
# families


@dataclasses.dataclass
class Family:
    config_cls: type
    block_cls: type
    causal_lm_cls: type
    dense_mlp_cls: type | None
    moe_prefix: str  # module path of the MoE block inside a decoder layer, as named in checkpoints
    expert_names: tuple[str, str, str]  # checkpoint names of (gate, up, down)
    experts_key: str  # config key of the expert count
    inter_key: str  # config key of the expert intermediate size
    architecture: str


FAMILIES = {
    "deepseek_v3": Family(
        DeepseekV3Config, DeepseekV3MoE, DeepseekV3ForCausalLM, DeepseekV3MLP, "mlp",
        ("gate_proj", "up_proj", "down_proj"), "n_routed_experts", "moe_intermediate_size", "DeepseekV3ForCausalLM",
    ),
    "mixtral": Family(
        MixtralConfig, MixtralSparseMoeBlock, MixtralForCausalLM, None, "block_sparse_moe",
        ("w1", "w3", "w2"), "num_local_experts", "intermediate_size", "MixtralForCausalLM",
    ),
    "qwen2_moe": Family(
        Qwen2MoeConfig, Qwen2MoeSparseMoeBlock, Qwen2MoeForCausalLM, Qwen2MoeMLP, "mlp",
        ("gate_proj", "up_proj", "down_proj"), "num_experts", "moe_intermediate_size", "Qwen2MoeForCausalLM",
    ),
    "qwen3_moe": Family(
        Qwen3MoeConfig, Qwen3MoeSparseMoeBlock, Qwen3MoeForCausalLM, Qwen3MoeMLP, "mlp",
        ("gate_proj", "up_proj", "down_proj"), "num_experts", "moe_intermediate_size", "Qwen3MoeForCausalLM",
    ),
}


def build_config(case: Case, fam: Family):
    """A small but complete config of the family (the whole tiny model is loadable from it)."""
    common = dict(
        vocab_size=64,
        hidden_size=case.hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        num_experts_per_tok=case.top_k,
        hidden_act="silu",
        tie_word_embeddings=False,
        architectures=[fam.architecture],
        experts_implementation="eager",  # -> config._experts_implementation (dispatch of the @use_experts_implementation experts)
    )
    common[fam.experts_key] = case.experts
    common[fam.inter_key] = case.inter
    if case.family == "deepseek_v3":
        common.update(
            intermediate_size=3 * case.hidden,  # dense MLP of layer 0
            first_k_dense_replace=LAYER,
            num_key_value_heads=2,
            kv_lora_rank=16,
            q_lora_rank=24,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            # fields of the released DeepSeek-V3 config.json that DeepseekV3Config does not define; transformers
            # always computes sigmoid / noaux_tc / every layer after first_k_dense_replace
            scoring_func="sigmoid",
            topk_method="noaux_tc",
            moe_layer_freq=1,
        )
    elif case.family == "mixtral":
        common.update(router_jitter_noise=0.0)
    else:
        common.update(intermediate_size=3 * case.hidden)  # dense MLP of layer 0
    common.update(case.config)
    cfg = fam.config_cls(**common)
    cfg.dtype = torch.bfloat16 if case.bf16 else torch.float32  # serialised as the checkpoint dtype
    assert cfg._experts_implementation == "eager", cfg._experts_implementation
    return cfg


def expert_count(cfg, fam: Family) -> int:
    return getattr(cfg, fam.experts_key)


# --------------------------------------------------------------------------------------
# weights: generated in checkpoint form, then fused into the block's own layout


def randn(g: np.random.Generator, *shape: int, std: float) -> torch.Tensor:
    # numpy's PCG64 + float64 normals: the same bits on every CPU (torch.randn is not: its vectorised
    # sampler gives other values under another ATEN_CPU_CAPABILITY)
    return torch.from_numpy((g.standard_normal(shape) * std).astype(np.float32))


def make_checkpoint(case: Case, fam: Family, cfg, g: np.random.Generator) -> dict[str, torch.Tensor]:
    """Tensor name (without the model.layers.{L}. prefix) -> float32 tensor."""
    H, I, E = case.hidden, case.inter, case.experts
    p = fam.moe_prefix
    ck: dict[str, torch.Tensor] = {}
    ck[f"{p}.gate.weight"] = randn(g, E, H, std=case.router_std / H**0.5)
    if case.family == "deepseek_v3":
        ck[f"{p}.gate.e_score_correction_bias"] = case.bias(g, E)
    gn, un, dn = fam.expert_names
    for e in range(E):
        ck[f"{p}.experts.{e}.{gn}.weight"] = randn(g, I, H, std=1.0 / H**0.5)
        ck[f"{p}.experts.{e}.{un}.weight"] = randn(g, I, H, std=1.0 / H**0.5)
        ck[f"{p}.experts.{e}.{dn}.weight"] = randn(g, H, I, std=1.0 / I**0.5)
    if case.family == "deepseek_v3":
        Is = I * cfg.n_shared_experts
        ck[f"{p}.shared_experts.gate_proj.weight"] = randn(g, Is, H, std=1.0 / H**0.5)
        ck[f"{p}.shared_experts.up_proj.weight"] = randn(g, Is, H, std=1.0 / H**0.5)
        ck[f"{p}.shared_experts.down_proj.weight"] = randn(g, H, Is, std=1.0 / Is**0.5)
    if case.family == "qwen2_moe":
        Is = cfg.shared_expert_intermediate_size
        ck[f"{p}.shared_expert.gate_proj.weight"] = randn(g, Is, H, std=1.0 / H**0.5)
        ck[f"{p}.shared_expert.up_proj.weight"] = randn(g, Is, H, std=1.0 / H**0.5)
        ck[f"{p}.shared_expert.down_proj.weight"] = randn(g, H, Is, std=1.0 / Is**0.5)
        ck[f"{p}.shared_expert_gate.weight"] = randn(g, 1, H, std=1.0 / H**0.5)
    if case.bf16:
        ck = {k: v.to(torch.bfloat16).to(torch.float32) for k, v in ck.items()}
    return ck


def block_state(case: Case, fam: Family, ck: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> the block's state_dict (transformers 5 fused expert layout)."""
    p = fam.moe_prefix + "."
    gn, un, dn = fam.expert_names
    E = case.experts
    sd = {}
    for k, v in ck.items():
        if ".experts." in k:
            continue
        sd[k[len(p):]] = v
    # gate_up_proj [E, 2I, H]: gate rows first, then up rows; down_proj [E, H, I]
    sd["experts.gate_up_proj"] = torch.stack(
        [torch.cat([ck[f"{p}experts.{e}.{gn}.weight"], ck[f"{p}experts.{e}.{un}.weight"]], dim=0) for e in range(E)]
    )
    sd["experts.down_proj"] = torch.stack([ck[f"{p}experts.{e}.{dn}.weight"] for e in range(E)])
    return sd


# --------------------------------------------------------------------------------------
# independent reference (shared/docs/routing-spec.md), float64, from the checkpoint tensors


def _topk_desc(v: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, ties to the lower index."""
    order = sorted(range(len(v)), key=lambda i: (-v[i], i))
    return np.array(order[:k], dtype=np.int64)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _mlp(x, gate, up, down):
    return (_silu(x @ gate.T) * (x @ up.T)) @ down.T


def reference(case: Case, fam: Family, cfg, ck: dict[str, torch.Tensor], x: torch.Tensor):
    c64 = {k: v.double().numpy() for k, v in ck.items()}
    p = fam.moe_prefix + "."
    gn, un, dn = fam.expert_names
    X = x.double().numpy()
    T, E, k = X.shape[0], case.experts, case.top_k
    ids = np.zeros((T, k), np.int64)
    wts = np.zeros((T, k), np.float64)
    out = np.zeros_like(X)
    margin = np.inf  # smallest gap at any selection boundary (kept/dropped group, chosen/next expert)
    for t in range(T):
        logits = c64[p + "gate.weight"] @ X[t]
        if case.family == "deepseek_v3":
            s = 1.0 / (1.0 + np.exp(-logits))
            c = s + c64[p + "gate.e_score_correction_bias"]
            G = cfg.n_group
            grp = c.reshape(G, E // G)
            gscore = np.sort(grp, axis=1)[:, -2:].sum(axis=1)
            keep = _topk_desc(gscore, cfg.topk_group)
            if cfg.topk_group < G:
                gs = np.sort(gscore)[::-1]
                margin = min(margin, gs[cfg.topk_group - 1] - gs[cfg.topk_group])
            masked = np.full(E, -np.inf)
            for gi in keep:
                masked[gi * (E // G):(gi + 1) * (E // G)] = c[gi * (E // G):(gi + 1) * (E // G)]
            sel = _topk_desc(masked, k)
            ms = np.sort(masked)[::-1]
            if np.isfinite(ms[k]):
                margin = min(margin, ms[k - 1] - ms[k])
            w = s[sel]
            if cfg.norm_topk_prob:
                w = w / (w.sum() + 1e-20)
            w = w * cfg.routed_scaling_factor
        else:
            pr = np.exp(logits - logits.max())
            pr = pr / pr.sum()
            sel = _topk_desc(pr, k)
            ps = np.sort(pr)[::-1]
            margin = min(margin, ps[k - 1] - ps[k])
            w = pr[sel]
            if case.family == "mixtral" or cfg.norm_topk_prob:
                w = w / w.sum()
        ids[t], wts[t] = sel, w
        for j in np.argsort(sel):  # ascending expert id, like transformers
            e = sel[j]
            out[t] += w[j] * _mlp(
                X[t], c64[f"{p}experts.{e}.{gn}.weight"], c64[f"{p}experts.{e}.{un}.weight"], c64[f"{p}experts.{e}.{dn}.weight"]
            )
        if case.family == "deepseek_v3":
            out[t] += _mlp(X[t], c64[p + "shared_experts.gate_proj.weight"], c64[p + "shared_experts.up_proj.weight"],
                           c64[p + "shared_experts.down_proj.weight"])
        if case.family == "qwen2_moe":
            gate = 1.0 / (1.0 + np.exp(-(c64[p + "shared_expert_gate.weight"] @ X[t])[0]))
            out[t] += gate * _mlp(X[t], c64[p + "shared_expert.gate_proj.weight"], c64[p + "shared_expert.up_proj.weight"],
                                  c64[p + "shared_expert.down_proj.weight"])
    return ids, wts, out, float(margin)


# --------------------------------------------------------------------------------------
# DeepSeek diagnostics: how many tokens would get another expert set under a variant rule


def deepseek_variants(router, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Chosen index sets (sorted) under transformers' rule and deliberate variants of it (float32)."""
    E, G, TG, k = router.num_experts, router.num_group, router.topk_group, router.top_k
    logits = torch.nn.functional.linear(x.float(), router.weight.float())
    s = logits.sigmoid()
    out = {}

    def choose(c, group_rule="top2sum", mask="neginf", use_groups=True):
        if use_groups:
            grp = c.view(-1, G, E // G)
            gs = grp.topk(2, dim=-1)[0].sum(-1) if group_rule == "top2sum" else grp.max(-1)[0]
            gidx = torch.topk(gs, k=TG, dim=-1)[1]
            gmask = torch.zeros_like(gs).scatter_(1, gidx, 1)
            smask = gmask.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E).bool()
            c = c.masked_fill(~smask, float("-inf")) if mask == "neginf" else c * smask
        return torch.topk(c, k=k, dim=-1)[1].sort(-1)[0]

    b = router.e_score_correction_bias
    out["transformers"] = choose(s + b)
    out["no_bias"] = choose(s)
    out["no_group_mask"] = choose(s + b, use_groups=False)
    out["mask_to_zero"] = choose(s + b, mask="zero")
    out["group_max"] = choose(s + b, group_rule="max")
    return out


# --------------------------------------------------------------------------------------
# writing


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=True) + "\n")


def config_dict(case: Case, cfg) -> dict:
    d = cfg.to_dict()
    if case.model_type_override:
        d["model_type"] = case.model_type_override
    return d


def write_checkpoint(case: Case, fam: Family, cfg, ck: dict[str, torch.Tensor], d: Path) -> list[str]:
    prefix = f"model.layers.{LAYER}."
    dtype = torch.bfloat16 if case.bf16 else torch.float32
    tensors = {prefix + k: v.to(dtype).contiguous() for k, v in ck.items()}
    meta = {"format": "pt"}
    if not case.sharded:
        save_file(tensors, str(d / "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    # two shards in name order, split so that one expert's projections straddle the two files; shard 2 also gets
    # a decoy from layer 0
    names = sorted(tensors)
    half = len(names) // 2 + 1
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    shards = [{n: tensors[n] for n in names[:half]}, {n: tensors[n] for n in names[half:]}]
    decoy_name = "model.layers.0.mlp.gate_proj.weight"  # dense MLP of layer 0: [intermediate_size, hidden]
    g = np.random.Generator(np.random.PCG64(BASE_SEED + 999))
    shards[1][decoy_name] = randn(g, cfg.intermediate_size, case.hidden, std=1.0 / case.hidden**0.5).to(dtype)
    weight_map = {}
    total = 0
    for f, sh in zip(files, shards):
        save_file(sh, str(d / f), metadata=meta)
        for n, t in sh.items():
            weight_map[n] = f
            total += t.numel() * t.element_size()
    write_json(d / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return files + ["model.safetensors.index.json"]


def sort_choice(ids: torch.Tensor, w: torch.Tensor):
    """Per token: weight descending, ties to the lower id."""
    ids_o, w_o = ids.clone(), w.clone()
    for t in range(ids.shape[0]):
        order = sorted(range(ids.shape[1]), key=lambda j: (-float(w[t, j]), int(ids[t, j])))
        ids_o[t] = ids[t, order]
        w_o[t] = w[t, order]
    return ids_o, w_o


# --------------------------------------------------------------------------------------
# checks against transformers' own loader


def check_from_pretrained(case: Case, fam: Family, cfg, block, d: Path, x: torch.Tensor, y: torch.Tensor) -> None:
    model = fam.causal_lm_cls.from_pretrained(str(d), config=cfg, dtype=torch.float32, experts_implementation="eager")
    layers = model.model.layers
    loaded = layers[LAYER].mlp
    assert isinstance(loaded, fam.block_cls), type(loaded)
    if fam.dense_mlp_cls is not None:
        assert isinstance(layers[0].mlp, fam.dense_mlp_cls), f"layer 0 should be dense, is {type(layers[0].mlp)}"
    want = block.state_dict()
    got = loaded.state_dict()
    assert sorted(want) == sorted(got), (sorted(want), sorted(got))
    for k in want:
        assert torch.equal(want[k], got[k]), f"{case.name}: from_pretrained gives another {k}"
    with torch.no_grad():
        y2 = loaded(x.unsqueeze(0)).reshape(y.shape)
    assert torch.equal(y2, y), f"{case.name}: the from_pretrained block gives another output"


# --------------------------------------------------------------------------------------


def generate(case: Case, index: int, out_root: Path, verify_load: bool) -> dict:
    fam = FAMILIES[case.family]
    seed = BASE_SEED + 1000 * index
    g = np.random.Generator(np.random.PCG64(seed))
    cfg = build_config(case, fam)
    assert expert_count(cfg, fam) == case.experts

    ck = make_checkpoint(case, fam, cfg, g)
    block = fam.block_cls(cfg).to(torch.float32).eval()
    sd = block_state(case, fam, ck)
    own = block.state_dict()
    assert sorted(own) == sorted(sd), f"{case.name}: block has {sorted(own)}, we set {sorted(sd)}"
    for k, v in sd.items():
        assert own[k].shape == v.shape, (k, own[k].shape, v.shape)
    block.load_state_dict(sd, strict=True)
    for k, v in block.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, sd[k]), k

    x = randn(g, case.tokens, case.hidden, std=1.0)

    captured = {}

    def hook(_mod, _inp, outp):
        logits, weights, idx = outp
        captured["logits"], captured["weights"], captured["ids"] = logits.detach().clone(), weights.detach().clone(), idx.detach().clone()

    h = block.gate.register_forward_hook(hook)
    with torch.no_grad():
        y = block(x.unsqueeze(0))  # the Mixtral/Qwen blocks unpack [batch, seq, hidden]
    h.remove()
    assert isinstance(y, torch.Tensor), f"{case.name}: block returned {type(y)}"
    y = y.reshape(case.tokens, case.hidden)
    ids, w, logits = captured["ids"], captured["weights"], captured["logits"]
    assert ids.shape == (case.tokens, case.top_k) and w.shape == ids.shape
    assert w.dtype == torch.float32 and logits.dtype == torch.float32, (w.dtype, logits.dtype)

    # independent float64 reference from the checkpoint tensors
    r_ids, r_w, r_out, margin = reference(case, fam, cfg, ck, x)
    # no near-ties: an f32 implementation that sums in another order must still pick the same experts
    assert margin > 1e-5, f"{case.name}: selection margin {margin} too small; change the seed"

    for t in range(case.tokens):
        a = dict(zip(ids[t].tolist(), w[t].double().tolist()))
        b = dict(zip(r_ids[t].tolist(), r_w[t].tolist()))
        assert sorted(a) == sorted(b), f"{case.name} token {t}: transformers {sorted(a)} vs reference {sorted(b)}"
        for e in a:
            assert abs(a[e] - b[e]) <= 1e-6 * max(1.0, abs(b[e])), (case.name, t, e, a[e], b[e])
    err = float(np.max(np.abs(y.double().numpy() - r_out)))
    assert err < 1e-5, f"{case.name}: output differs from the float64 reference by {err}"

    # (the exact max difference depends on the CPU's kernels, so it is printed, not stored: meta.json stays
    # byte-identical across machines)
    print(f"  {case.name}: output max |transformers - float64 reference| = {err:.3g}")
    diagnostics = {
        "output_matches_float64_reference_within": 1e-5,
        "min_selection_margin": float(f"{margin:.2g}"),
    }
    if case.family == "deepseek_v3":
        with torch.no_grad():
            var = deepseek_variants(block.gate, x)
        assert torch.equal(var["transformers"], ids.sort(-1)[0]), f"{case.name}: variant replay disagrees"
        for name in ("no_bias", "no_group_mask", "mask_to_zero", "group_max"):
            n = int((var[name] != var["transformers"]).any(-1).sum())
            diagnostics[f"tokens_whose_set_changes_with_{name}"] = n
            if name in case.must_differ:
                assert n > 0, f"{case.name}: {name} changes no token's chosen set; adjust the case"

    s_ids, s_w = sort_choice(ids, w)

    d = out_root / case.name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    write_json(d / "config.json", config_dict(case, cfg))
    files = write_checkpoint(case, fam, cfg, ck, d)
    save_file(
        {
            "hidden_states": x.contiguous(),
            "output": y.contiguous(),
            "router.topk_ids": s_ids.to(torch.int64).contiguous(),
            "router.topk_weights": s_w.contiguous(),
            "router.logits": logits.contiguous(),
        },
        str(d / "io.safetensors"),
        metadata={"format": "pt"},
    )
    meta = {
        "family": case.family,
        "model_type": config_dict(case, cfg)["model_type"],
        "transformers_block": fam.block_cls.__name__,
        "layer": LAYER,
        "tokens": case.tokens,
        "top_k": case.top_k,
        "num_experts": case.experts,
        "hidden_size": case.hidden,
        "expert_intermediate_size": case.inter,
        "checkpoint_dtype": "bfloat16" if case.bf16 else "float32",
        "checkpoint_files": files,
        "sharded": case.sharded,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "seed": seed,
        "notes": case.notes,
        "diagnostics": diagnostics,
    }
    write_json(d / "meta.json", meta)

    if verify_load:
        check_from_pretrained(case, fam, cfg, block, d, x, y)
    return meta


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixture root (default: tests/fixtures/golden)")
    ap.add_argument("--only", nargs="*", help="generate only these cases")
    ap.add_argument("--no-load-check", action="store_true", help="skip the from_pretrained round trip")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    args.out.mkdir(parents=True, exist_ok=True)

    names = {c.name for c in CASES}
    for n in args.only or []:
        if n not in names:
            ap.error(f"unknown case {n}; known: {sorted(names)}")
    for i, case in enumerate(CASES):
        if args.only and case.name not in args.only:
            continue
        meta = generate(case, i, args.out, not args.no_load_check)
        print(f"{case.name:28s} T={case.tokens:<3d} E={case.experts:<3d} k={case.top_k}  {meta['diagnostics']}")

    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"total fixture size: {total} bytes")
    if total > MAX_TOTAL_BYTES:
        print(f"error: fixtures exceed {MAX_TOTAL_BYTES} bytes", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
