#!/usr/bin/env bash
# Every test, from a fresh machine: installs what the tests need, then runs
# the format check, clippy, the docs and the whole workspace's tests (conformance suite,
# property tests, per-crate tests). CI (.ci/run) calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi; }

# The CANN slot's fake-install test builds a tiny shared library with the C compiler.
if ! command -v cc >/dev/null; then
  echo "== installing a C compiler (gcc) for the CANN fake-install test"
  # One command a line: set -e does not stop at a failing `update` inside an && list.
  as_root apt-get update -qq
  as_root apt-get install -y -qq gcc >/dev/null
fi
# WebGPU runs for real on Mesa's software Vulkan driver (lavapipe); WGPU_BACKEND=vulkan keeps wgpu
# from falling back silently to GL.
if ! ldconfig -p 2>/dev/null | grep libvulkan.so.1 >/dev/null || ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then
  echo "== installing Mesa's software Vulkan driver (mesa-vulkan-drivers, libvulkan1)"
  as_root apt-get update -qq
  as_root apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
fi
export WGPU_BACKEND="${WGPU_BACKEND:-vulkan}"
for c in rustfmt clippy; do
  rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
done

# Backends whose absence fails the run (the conformance suite skips absent ones otherwise).
export MOE_REQUIRE_BACKENDS="${MOE_REQUIRE_BACKENDS:-cpu,wgpu}"

echo "== CUDA kernels compile with NVRTC (sm_80, sm_90)"
scripts/check-cuda-kernels.sh
# The CUDA crate's own NVRTC test compiles through cudarc too; libnvrtc must be on the path before cargo starts.
cu13="$(cd .venv-nvrtc/lib/python3*/site-packages/nvidia/cu13 && pwd)"
export LD_LIBRARY_PATH="$cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --all-features -- -D warnings
echo "== cargo doc -D warnings (no broken or private links in the public docs)"
RUSTDOCFLAGS="-D warnings" cargo doc -q --workspace --all-features --no-deps
echo "== backends present (MOE_REQUIRE_BACKENDS=$MOE_REQUIRE_BACKENDS)"
cargo test -q --all-features --test conformance backends_present -- --nocapture
echo "== cargo test --workspace"
cargo test --workspace --all-features
echo "all tests passed"
