#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and no Rust toolchain: runs the prebuilt
# binaries of scripts/build-gpu-bundle.sh. The conformance suite and the
# golden tests must pass on cpu and cuda (MOE_REQUIRE_BACKENDS=cpu,cuda), then
# the CUDA benchmarks run at DeepSeek-V3's shapes, beside PyTorch's grouped
# GEMMs (scripts/compare/torch_grouped_gemm.py) where python3 has torch.
#
# NVRTC and the CUDA headers come from the CUDA toolkit (/usr/local/cuda) or
# from Python wheels (site-packages/nvidia/cu13/{lib,include}); set
# PYTHON_SITE to choose the site-packages. Full logs and JSON go to gpu-out/,
# and into $OUT/gpu-check.tgz where $OUT is set. Exits non-zero when a test
# step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
bundle=gpu-bundle
out=gpu-out
rm -rf "$out" && mkdir -p "$out"
# Everything under gpu-out/ in one archive in $OUT (the device tool returns a few files only).
trap '[ -n "${OUT:-}" ] && tar czf "$OUT/gpu-check.tgz" "$out"' EXIT
[ -x "$bundle/conformance" ] || { echo "gpu-check: no $bundle/ (run scripts/build-gpu-bundle.sh first)"; exit 1; }

site="${PYTHON_SITE:-$(python3 -c 'import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))' 2>/dev/null)}"
[ -n "$site" ] || site="$(find /opt /usr -maxdepth 9 -type d -path '*site-packages/nvidia/cu13' 2>/dev/null | head -1 | sed 's|/nvidia/cu13$||')"
libs=""
for d in "$site/nvidia/cu13/lib" /usr/local/cuda/lib64 /usr/local/nvidia/lib64; do
  [ -d "$d" ] && libs="${libs:+$libs:}$d"
done
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Headers: the first folder with cuda_bf16.h, mma.h and crt/mma.h.
for d in "${MOE_CUDA_INCLUDE:-}" "${CUDA_HOME:-/usr/local/cuda}/include" /usr/local/cuda/include "$site/nvidia/cu13/include"; do
  if [ -n "$d" ] && [ -f "$d/cuda_bf16.h" ] && [ -f "$d/mma.h" ] && [ -f "$d/crt/mma.h" ]; then
    export MOE_CUDA_INCLUDE="$d"
    break
  fi
done
echo "== libraries: $LD_LIBRARY_PATH; headers: ${MOE_CUDA_INCLUDE:-none found}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader || true

export MOE_REQUIRE_BACKENDS=cpu,cuda MOE_GOLDEN_DIR="$PWD/tests/fixtures/golden"
failed=()
step() { # name, timeout (s), command...
  local name=$1 limit=$2
  shift 2
  echo "== $name"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "   rc $rc after $((SECONDS - t0)) s (log: $out/$name.log)"
  [ $rc -eq 0 ] || failed+=("$name (rc $rc)")
  return $rc
}

step info 60 "$bundle/moe-bench" info --backend cuda; tail -5 "$out/info.log"
step conformance 120 "$bundle/conformance" --test-threads 1
grep -E "^test |passed|SKIPPED|panicked|FAIL|error" "$out/conformance.log" | head -60
# Every grouped_matmul kernel family, forced (auto picks by rows per expert; see crates/cuda/src/launch.rs).
for g in rows tc128 tc32 tiles; do
  MOE_CUDA_GEMM=$g step "conformance-$g" 120 "$bundle/conformance" --test-threads 1 cuda::
  grep -E "test result|panicked|FAIL" "$out/conformance-$g.log" | head -10
done
step golden 60 "$bundle/golden" --nocapture
grep -E "cuda|test result|FAIL|panicked" "$out/golden.log" | tail -30
step verify 60 "$bundle/moe-bench" verify --backend cuda
tail -15 "$out/verify.log"
tokens=1,64,128,256,512,1024,4096
step bench 180 "$bundle/moe-bench" bench --backend cuda --preset deepseek-v3 --dtype bf16 --tokens $tokens \
  --json "$out/cuda-deepseek-bf16.json"
tail -48 "$out/bench.log"
# GPU_CHECK_SWEEP="rows tc128 ...": the same sweep with each of these MOE_CUDA_GEMM values, to place the
# auto thresholds.
if [ -n "${GPU_CHECK_SWEEP:-}" ]; then
  for g in $GPU_CHECK_SWEEP; do
    MOE_CUDA_GEMM=$g step "bench-$g" 180 "$bundle/moe-bench" bench --backend cuda --preset deepseek-v3 --dtype bf16 \
      --tokens 64,128,256,512,1024,4096 --repeat 5 --warmup 1 --json "$out/cuda-deepseek-bf16-$g.json"
    grep -E "route|gemm_(gate_up|down)" "$out/bench-$g.log"
  done
fi
if python3 -c 'import torch' 2>/dev/null; then
  export PYTHONUNBUFFERED=1
  step torch 150 python3 scripts/compare/torch_grouped_gemm.py --tokens $tokens \
    --json "$out/torch-deepseek-bf16.json"
  tail -22 "$out/torch.log"
  if [ -f "$out/torch-deepseek-bf16.json" ] && [ -f "$out/cuda-deepseek-bf16.json" ]; then
    "$bundle/moe-bench" compare "$out/torch-deepseek-bf16.json" "$out/cuda-deepseek-bf16.json" 2>&1 | tail -30
  fi
else
  echo "== torch: python3 has no torch; PyTorch comparison skipped"
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu-check: FAILED: ${failed[*]}"
  exit 1
fi
echo "gpu-check: all steps passed"
