#!/usr/bin/env bash
# AMX: the cpu test binaries (cargo test --release -p moe-hal-cpu --no-run, and the root
# conformance test) at the Amx level, then base (56b8b22) against amx (0127f5d). Run from devrun/.
set -u
cd "$(dirname "$0")"
mkdir -p res3
trap 'tar czf "$OUT/res3.tgz" res3' EXIT
./amx info --backend cpu 2>&1 | grep -i -E "cpu|amx" | head -5
export MOE_REQUIRE_BACKENDS=cpu MOE_GOLDEN_DIR=$PWD/../tests/fixtures/golden
for t in t_lib t_levels t_det t_conf; do
  timeout 120 ./$t > res3/$t.txt 2>&1; echo "$t rc $? $(grep -E 'test result' res3/$t.txt | tr '\n' ' ')"
  grep -E "panicked|FAILED|SKIPPED|Amx|AMX" res3/$t.txt | head -8
done
b() { # name bin dtype tokens
  local name=$1 bin=$2 dt=$3 tok=$4
  timeout 120 ./$bin bench --backend cpu --preset qwen3-30b-a3b --dtype $dt --tokens $tok --inputs 16 --json res3/$name.json > res3/$name.txt 2>&1
  echo "$name rc $? $(grep -E '^cpu +[0-9]+ +layer' res3/$name.txt | awk '{printf "T=%s %s ms %s  ", $2, $4, $9}')"
  grep -E "^cpu +256 +gemm" res3/$name.txt
}
for r in 1 2; do
  b base-$r base bf16 1,16,256
  b amx-$r amx bf16 1,16,256
done
MOE_CPU_AMX_ROWS=9 b amx9 amx bf16 16,256
