#!/usr/bin/env bash
# f32 and bf16 layer at 256 tokens on 16 cores: base (0127f5d, rayon) against new (0e5d1a7, the
# pool) and new with MOE_CPU_SPIN_US=500, alternated four rounds. Run from devrun/.
set -u
cd "$(dirname "$0")"
mkdir -p res7
trap 'tar czf "$OUT/res7.tgz" res7' EXIT
b() { # name bin dtype
  local name=$1 bin=$2 dt=$3
  timeout 60 ./$bin bench --backend cpu --preset qwen3-30b-a3b --dtype $dt --tokens 256 --inputs 16 --json res7/$name.json > res7/$name.txt 2>&1
  echo "$name rc $? $(grep -E '^cpu +256' res7/$name.txt | awk '{printf "%s %s | ", $3, $4}')"
}
for r in 1 2 3 4; do
  b base-f32-$r base f32
  b new-f32-$r new f32
  MOE_CPU_SPIN_US=500 b spin500-f32-$r new f32
done
for r in 1 2; do
  b base-bf16-$r base bf16
  b new-bf16-$r new bf16
  MOE_CPU_SPIN_US=500 b spin500-bf16-$r new bf16
done
