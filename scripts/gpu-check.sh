#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and no Rust toolchain: runs the prebuilt
# binaries of scripts/build-gpu-bundle.sh. The conformance suite and the
# golden tests must pass on cpu and cuda (MOE_REQUIRE_BACKENDS=cpu,cuda), then
# the CUDA benchmarks run and print a short table.
#
# NVRTC and the CUDA headers often come from Python wheels
# (site-packages/nvidia/cu13/{lib,include}); they are looked for under
# $PYTHON_SITE (default: the first site-packages found under /opt and /usr).
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=gpu-bundle
[ -x "$bundle/conformance" ] || { echo "gpu-check: no $bundle/ (run scripts/build-gpu-bundle.sh first)"; exit 1; }
site="${PYTHON_SITE:-$(find /opt /usr -maxdepth 6 -type d -path '*site-packages/nvidia/cu13' 2>/dev/null | head -1 | sed 's|/nvidia/cu13$||')}"
if [ -n "$site" ]; then
  export LD_LIBRARY_PATH="$site/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  [ -f "$site/nvidia/cu13/include/cuda_bf16.h" ] && export MOE_CUDA_INCLUDE="$site/nvidia/cu13/include"
fi
echo "== NVRTC from: ${site:-system}; headers: ${MOE_CUDA_INCLUDE:-search}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
export MOE_REQUIRE_BACKENDS=cpu,cuda MOE_GOLDEN_DIR="$PWD/tests/fixtures/golden"
"$bundle/moe-bench" info --backend cuda
echo "== conformance (cpu, cuda)"
"$bundle/conformance" --test-threads 1 2>&1 | tail -25
echo "== golden (transformers fixtures)"
"$bundle/golden" --nocapture 2>&1 | grep -E "cuda|result|FAIL|panicked" | tail -40
echo "== moe-bench verify --backend cuda"
"$bundle/moe-bench" verify --backend cuda
echo "== benchmarks: DeepSeek-V3 expert shapes, bf16"
"$bundle/moe-bench" bench --backend cuda --preset deepseek-v3 --dtype bf16 --tokens 1,64,512,4096 \
  --json "${OUT:-.}/cuda-deepseek-bf16.json" || echo "gpu-check: benchmark failed"
