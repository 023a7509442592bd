#!/usr/bin/env python3
"""Times transformers' own MoE block for a moe-bench preset on PyTorch CPU.

Writes JSON records in the format of ``moe-bench bench --json`` (kernel
"layer", backend "torch"), so that ``moe-bench compare`` can put them beside
the Rust numbers::

    scripts/golden/setup.sh            # once: creates .venv-golden with torch + transformers
    .venv-golden/bin/python scripts/compare/torch_moe.py --preset qwen3-30b-a3b \\
        --tokens 1,16,256 --dtype f32 --json torch.json
    cargo run --release -p moe-bench -- bench --preset qwen3-30b-a3b --tokens 1,16,256 --backend cpu --json rust.json
    cargo run --release -p moe-bench -- compare torch.json rust.json

The block is the model's own class (``Qwen3MoeSparseMoeBlock``,
``MixtralSparseMoeBlock``, ``DeepseekV3MoE``) built from a config with the
preset's published shapes and ``experts_implementation="eager"``; its
weights (left uninitialised by transformers) are set here to uniform random
values of the same scale as moe-bench's. gflops counts the routed experts'
GEMMs (2 * T * k * 3 * I * H) plus the router and the shared expert; gbps
counts the weights of the experts that received tokens, the router and
shared weights, and the input/output activations. roofline_fraction is 0
(no ceilings are measured on the torch side).

``--hidden --inter --experts`` override the preset's shape (records are then
labelled ``custom-h..-i..-e..-k..-ROUTER`` as moe-bench labels them), e.g. a small
DeepSeek-V3-style block: ``--preset deepseek-v3 --experts 16 --hidden 256 --inter 64``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

PRESETS = {
    # name: (family, H, I, E, k, n_group, topk_group, n_shared, routed_scaling_factor)
    "deepseek-v3": ("deepseek_v3", 7168, 2048, 256, 8, 8, 4, 1, 2.5),
    "kimi-k2": ("deepseek_v3", 7168, 2048, 384, 8, 1, 1, 1, 2.827),
    "qwen3-30b-a3b": ("qwen3_moe", 2048, 768, 128, 8, 1, 1, 0, 1.0),
    "qwen3-235b-a22b": ("qwen3_moe", 4096, 1536, 128, 8, 1, 1, 0, 1.0),
    "mixtral-8x7b": ("mixtral", 4096, 14336, 8, 2, 1, 1, 0, 1.0),
}


def build_block(preset: str, dtype, hidden=None, inter=None, experts=None):
    import torch

    family, H, I, E, k, G, TG, S, scale = PRESETS[preset]
    H, I, E = hidden or H, inter or I, experts or E
    common = dict(
        hidden_size=H,
        num_experts_per_tok=k,
        hidden_act="silu",
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=64,
        experts_implementation="eager",
    )
    if family == "qwen3_moe":
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        cfg = Qwen3MoeConfig(num_experts=E, moe_intermediate_size=I, norm_topk_prob=True, **common)
        cls = Qwen3MoeSparseMoeBlock
    elif family == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        cfg = MixtralConfig(num_local_experts=E, intermediate_size=I, router_jitter_noise=0.0, **common)
        cls = MixtralSparseMoeBlock
    else:
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

        cfg = DeepseekV3Config(
            n_routed_experts=E,
            moe_intermediate_size=I,
            n_group=G,
            topk_group=TG,
            n_shared_experts=S,
            routed_scaling_factor=scale,
            norm_topk_prob=True,
            kv_lora_rank=16,
            q_lora_rank=24,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            **common,
        )
        cls = DeepseekV3MoE
    assert getattr(cfg, "_experts_implementation", "eager") == "eager"
    with torch.device("cpu"):
        block = cls(cfg).to(dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in list(block.named_parameters()) + list(block.named_buffers()):
            if "correction_bias" in name:
                p.copy_((torch.rand(p.shape, generator=g) * 0.1 - 0.05).to(p.dtype))
                continue
            # fan-in is the last dimension for every weight ([.., out, in]).
            bound = 1.0 / max(p.shape[-1], 1) ** 0.5
            if name.endswith("gate.weight"):
                bound *= 2.0
            p.copy_(((torch.rand(p.shape, generator=g) * 2 - 1) * bound).to(p.dtype))
    block.eval()
    return block, (H, I, E, k, S)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--tokens", default="1,2,4,8,16,32,64,128,256,512,1024,2048,4096")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads (0: the CPUs this process may run on, as moe-bench's pool takes)",
    )
    ap.add_argument("--json", required=True, help="output file (JSON array of moe-bench records)")
    ap.add_argument("--hidden", type=int, help="override the preset's hidden size (as moe-bench's --hidden)")
    ap.add_argument("--inter", type=int, help="override the preset's expert intermediate size")
    ap.add_argument("--experts", type=int, help="override the preset's routed expert count")
    a = ap.parse_args()
    try:
        tokens = sorted({int(t) for t in a.tokens.split(",")})
    except ValueError:
        ap.error(f"--tokens {a.tokens!r}: expected positive integers like 1,16,256")
    if not tokens or tokens[0] < 1:
        ap.error("--tokens: every token count must be at least 1")

    import torch

    # torch's own default is the physical cores; moe-bench's rayon pool takes every CPU the process
    # may run on, so the same count here unless told otherwise.
    torch.set_num_threads(a.threads if a.threads > 0 else len(os.sched_getaffinity(0)))
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    ds = torch.tensor([], dtype=dtype).element_size()
    block, (H, I, E, k, S) = build_block(a.preset, dtype, a.hidden, a.inter, a.experts)
    # moe-bench labels a preset with overridden fields the same way, router included
    family, _, _, _, _, G, TG = PRESETS[a.preset][:7]
    routing = "softmax" if family != "deepseek_v3" else (f"sigmoid-g{G}of{TG}" if G > 1 else "sigmoid")
    custom = f"custom-h{H}-i{I}-e{E}-k{k}-{routing}"
    label = a.preset if not (a.hidden or a.inter or a.experts) else custom
    gen = torch.Generator().manual_seed(1)
    records = []
    with torch.inference_mode():
        for T in tokens:
            x = ((torch.rand(1, T, H, generator=gen) * 2 - 1)).to(dtype)
            for _ in range(a.warmup):
                block(x)
            ms = []
            for _ in range(max(a.repeat, 1)):
                t0 = time.perf_counter()
                out = block(x)
                ms.append((time.perf_counter() - t0) * 1e3)
            out = out[0] if isinstance(out, tuple) else out
            assert out.shape[-1] == H
            # which experts received tokens (for the weight bytes actually touched)
            gate = block.gate
            logits = torch.nn.functional.linear(x.reshape(-1, H).float(), gate.weight.float())
            if hasattr(gate, "e_score_correction_bias"):
                scores = logits.sigmoid() + gate.e_score_correction_bias.float()
            else:
                scores = logits
            active = min(E, int(torch.unique(scores.topk(k, dim=-1).indices).numel()))
            flops = 2.0 * T * k * 3 * I * H + 2.0 * T * H * E + 2.0 * T * 3 * I * S * H
            weights = (active * 3 * I * H + S * 3 * I * H) * ds + E * H * ds
            acts = (2 * T * H + T * k * (2 * H + I)) * ds
            med = statistics.median(ms)
            records.append(
                dict(
                    backend="torch",
                    preset=label,
                    dtype=a.dtype,
                    tokens=T,
                    kernel="layer",
                    median_ms=med,
                    min_ms=min(ms),
                    max_ms=max(ms),
                    gflops=flops / (med * 1e-3) / 1e9,
                    gbps=(weights + acts) / (med * 1e-3) / 1e9,
                    roofline_fraction=0.0,
                )
            )
            print(
                f"torch {label} {a.dtype} tokens {T:>5}: median {med:.3f} ms "
                f"(min {min(ms):.3f}, max {max(ms):.3f}), {records[-1]['gflops']:.1f} GFLOP/s",
                flush=True,
            )
    tmp = a.json + f".tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(records, f, indent=2)
        f.write("\n")
    os.replace(tmp, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
