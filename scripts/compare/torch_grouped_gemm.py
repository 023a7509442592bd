#!/usr/bin/env python3
"""PyTorch's grouped GEMMs on a CUDA device, for the figures beside moe-bench's.

Times, with CUDA events (median of --repeat after --warmup), at DeepSeek-V3's
expert shapes (H 7168, I 2048, E 256, k 8; other shapes with the flags):

- the device's ceilings: a dense 8192x8192x8192 bf16 matmul (TFLOP/s) and a
  device-to-device copy of 4 GiB (GB/s, bytes read plus bytes written);
- per token count T, the T*k routed rows (top-k of random scores per token,
  sorted by expert like moe-hal's permute):
  - ``torch._grouped_mm`` (where this PyTorch has it): gate/up with SwiGLU
    applied after it (silu(gate) * up, as moe-hal fuses it), and down;
  - a per-expert loop of ``x[a:b] @ W[e].T`` over the experts that got rows.

Prints a table and writes JSON records in ``moe-bench bench --json``'s format
(backend ``torch-grouped_mm`` / ``torch-loop``, kernels ``gemm_gate_up`` and
``gemm_down``, clock ``device``), so ``moe-bench compare`` can pair them with
``moe-bench bench --backend cuda --json``. gflops and gbps are counted as
moe-bench counts them: 2 * rows * K * N FLOPs; the weights of the experts
that got rows, the input rows and the output rows in bytes.

    python3 scripts/compare/torch_grouped_gemm.py --tokens 1,64,512,4096 --json torch-gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys


def timed(torch, fn, warmup: int, repeat: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeat):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return out


def record(backend, preset, tokens, kernel, ms, flops, nbytes):
    med = statistics.median(ms)
    return {
        "backend": backend,
        "preset": preset,
        "dtype": "bf16",
        "tokens": tokens,
        "kernel": kernel,
        "median_ms": med,
        "min_ms": min(ms),
        "max_ms": max(ms),
        "gflops": flops / (med * 1e-3) / 1e9,
        "gbps": nbytes / (med * 1e-3) / 1e9,
        "roofline_fraction": 0.0,
        "clock": "device",
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--inter", type=int, default=2048)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--preset", default="deepseek-v3", help="label of the records")
    p.add_argument("--tokens", default="1,64,512,4096")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    a = p.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("torch_grouped_gemm: no CUDA device", file=sys.stderr)
        return 1
    dev = torch.device("cuda")
    torch.manual_seed(a.seed)
    H, I, E, k = a.hidden, a.inter, a.experts, a.topk
    bf = torch.bfloat16
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)

    # Ceilings.
    n = 8192
    A = torch.randn(n, n, device=dev, dtype=bf)
    B = torch.randn(n, n, device=dev, dtype=bf)
    ms = timed(torch, lambda: A @ B, 3, 10)
    peak = 2 * n**3 / (statistics.median(ms) * 1e-3) / 1e12
    del A, B
    src = torch.empty(1 << 31, device=dev, dtype=torch.int16)  # 4 GiB
    src.random_(-1000, 1000)
    dst = torch.empty_like(src)
    ms = timed(torch, lambda: dst.copy_(src), 3, 10)
    bw = 2 * src.numel() * 2 / (statistics.median(ms) * 1e-3) / 1e9
    del src, dst
    torch.cuda.empty_cache()
    print(f"dense bf16 matmul {n}^3: {peak:.1f} TFLOP/s; device copy 4 GiB: {bw:.0f} GB/s (read + write)", flush=True)
    ceilings = {"dense_bf16_tflops": peak, "copy_gbps": bw}

    # Weights as checkpoints store them: gate/up [E, 2I, H] (gate rows then up rows), down [E, H, I].
    w_gu = (torch.rand(E, 2 * I, H, device=dev, dtype=bf) - 0.5) * (2 / H**0.5)
    w_dn = (torch.rand(E, H, I, device=dev, dtype=bf) - 0.5) * (2 / I**0.5)
    has_gmm = hasattr(torch, "_grouped_mm")
    records = []
    rows_out = []
    for T in [int(t) for t in a.tokens.split(",")]:
        ids = torch.rand(T, E, device=dev).topk(k, dim=1).indices.flatten()
        counts = torch.bincount(ids, minlength=E)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        rows = T * k
        x = torch.rand(rows, H, device=dev, dtype=bf) - 0.5
        act = torch.rand(rows, I, device=dev, dtype=bf) - 0.5
        active = int((counts > 0).sum())
        f_gu, f_dn = 2 * rows * H * 2 * I, 2 * rows * I * H
        b_gu = active * 2 * I * H * 2 + rows * H * 2 + rows * I * 2
        b_dn = active * H * I * 2 + rows * I * 2 + rows * H * 2
        bounds = [0] + offs.tolist()
        line = {"T": T, "rows": rows, "active": active}

        def loop_gu():
            out = torch.empty(rows, I, device=dev, dtype=bf)
            for e in range(E):
                lo, hi = bounds[e], bounds[e + 1]
                if hi > lo:
                    gu = x[lo:hi] @ w_gu[e].T
                    out[lo:hi] = torch.nn.functional.silu(gu[:, :I]) * gu[:, I:]
            return out

        def loop_dn():
            out = torch.empty(rows, H, device=dev, dtype=bf)
            for e in range(E):
                lo, hi = bounds[e], bounds[e + 1]
                if hi > lo:
                    out[lo:hi] = act[lo:hi] @ w_dn[e].T
            return out

        for name, fn, fl, nb in [("gemm_gate_up", loop_gu, f_gu, b_gu), ("gemm_down", loop_dn, f_dn, b_dn)]:
            ms = timed(torch, fn, a.warmup, a.repeat)
            records.append(record("torch-loop", a.preset, T, name, ms, fl, nb))
            line[f"loop {name}"] = statistics.median(ms)
        if has_gmm:
            try:

                def gmm_gu():
                    gu = torch._grouped_mm(x, w_gu.transpose(-2, -1), offs=offs)
                    return torch.nn.functional.silu(gu[:, :I]) * gu[:, I:]

                def gmm_dn():
                    return torch._grouped_mm(act, w_dn.transpose(-2, -1), offs=offs)

                # Correctness of the baseline against the loop, so a wrong call is not timed.
                ref = loop_gu().float()
                err = ((gmm_gu().float() - ref).norm() / ref.norm()).item()
                if not err < 2e-2:
                    raise RuntimeError(f"_grouped_mm differs from the loop: rel L2 {err:.3g}")
                for name, fn, fl, nb in [("gemm_gate_up", gmm_gu, f_gu, b_gu), ("gemm_down", gmm_dn, f_dn, b_dn)]:
                    ms = timed(torch, fn, a.warmup, a.repeat)
                    records.append(record("torch-grouped_mm", a.preset, T, name, ms, fl, nb))
                    line[f"gmm {name}"] = statistics.median(ms)
            except Exception as e:  # noqa: BLE001 - reported, the loop figures still stand
                print(f"T={T}: torch._grouped_mm unusable: {e}", file=sys.stderr)
                has_gmm = False
        rows_out.append(line)
        print(line, flush=True)

    print("\nbf16 median ms (TFLOP/s); ceilings: "
          f"dense {peak:.0f} TFLOP/s, copy {bw:.0f} GB/s")
    for r in records:
        print(f"  {r['backend']:<17} {r['kernel']:<13} T={r['tokens']:<5} {r['median_ms']:9.3f} ms "
              f"{r['gflops'] / 1e3:7.1f} TFLOP/s {r['gbps']:7.0f} GB/s")
    if a.json:
        # _grouped_mm first: `moe-bench compare` pairs the first record of each (preset, dtype, tokens, kernel).
        records.sort(key=lambda r: r["backend"] != "torch-grouped_mm")
        with open(a.json, "w") as f:
            json.dump(records, f, indent=1)
        with open(a.json.replace(".json", "") + "-ceilings.json", "w") as f:
            json.dump(ceilings, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
