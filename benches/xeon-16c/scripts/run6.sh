#!/usr/bin/env bash
# The backend's own threads on 16 cores: the cpu tests (cargo test --release -p moe-hal-cpu
# --no-run, and the root conformance test, copied in as t_NAME), then base (0127f5d: rayon, AMX)
# against new (0e5d1a7, the pool), alternated; and the pool with MOE_CPU_SPIN_US=0. Run from devrun/.
set -u
cd "$(dirname "$0")"
mkdir -p res6
trap 'tar czf "$OUT/res6.tgz" res6' EXIT
export MOE_REQUIRE_BACKENDS=cpu MOE_GOLDEN_DIR=$PWD/../tests/fixtures/golden
for t in t_moe_hal_cpu t_levels t_determinism t_embedding t_allocs t_conformance; do
  timeout 150 ./$t > res6/$t.txt 2>&1; echo "$t rc $? $(grep -E 'test result' res6/$t.txt | tr '\n' ' ')"
  grep -E "panicked|FAILED|SKIPPED" res6/$t.txt | head -5
done
unset MOE_REQUIRE_BACKENDS
b() { # name bin dtype tokens
  local name=$1 bin=$2 dt=$3 tok=$4
  timeout 100 ./$bin bench --backend cpu --preset qwen3-30b-a3b --dtype $dt --tokens $tok --inputs 16 --json res6/$name.json > res6/$name.txt 2>&1
  echo "$name rc $? $(grep -E '^cpu +[0-9]+ +layer' res6/$name.txt | awk '{printf "T=%s %s ms %s  ", $2, $4, $9}')"
}
for r in 1 2; do
  for dt in bf16 f32; do
    b base-$dt-$r base $dt 1,16,256
    b new-$dt-$r new $dt 1,16,256
  done
done
MOE_CPU_SPIN_US=0 b spin0-bf16 new bf16 1,16,256
