#!/usr/bin/env bash
# Builds, on a machine without a GPU, what scripts/gpu-check.sh runs on one:
# the conformance and golden test binaries and moe-bench, with the cuda
# feature, into gpu-bundle/ (ignored by git). Carry gpu-bundle to the GPU
# machine together with the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf gpu-bundle && mkdir -p gpu-bundle
cargo build --release -p moe-bench
cp target/release/moe-bench gpu-bundle/
for t in conformance golden; do
  exe=$(cargo test --release --features cuda --test "$t" --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])' | tail -1)
  cp "$exe" "gpu-bundle/$t"
done
ls -la gpu-bundle
