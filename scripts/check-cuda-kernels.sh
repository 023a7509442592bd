#!/usr/bin/env bash
# Compiles every kernels/cuda/*.cu with NVRTC for sm_75, sm_80 and sm_90 (straight to
# cubin, as the CUDA backend does at run time) and fails on any error. Needs no
# GPU and no CUDA toolkit: NVRTC and the CUDA headers come from PyPI (the 13.0
# series, matching the GPU driver available to us) in .venv-nvrtc.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-nvrtc
pins=("nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*")
stamp="$venv/.moe-hal-pins"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "${pins[*]}" ]; then
  echo "== installing NVRTC and CUDA headers into $venv (${pins[*]})"
  if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
    sudo_ apt-get update -qq && sudo_ apt-get install -y -qq python3-venv >/dev/null
  fi
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "${pins[@]}"
  echo "${pins[*]}" > "$stamp"
fi
cu13="$(cd "$venv"/lib/python3*/site-packages/nvidia/cu13 && pwd)"
# libnvrtc loads its builtins library from its own folder: it must be on the path before the process starts.
export LD_LIBRARY_PATH="$cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ $# -eq 0 ]; then set -- sm_75 sm_80 sm_90; fi
exec "$venv/bin/python" scripts/check_cuda_kernels.py "$PWD" "$cu13/include" "$@"
