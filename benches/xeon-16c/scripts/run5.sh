#!/usr/bin/env bash
# Software prefetch in the AMX weight rewrite, alternated: none, T1 64 KiB, T0 16 KiB ahead. $OUT/res5.tgz
set -u
cd "$(dirname "$0")"
mkdir -p res5
trap 'tar czf "$OUT/res5.tgz" res5' EXIT
b() { # name tokens
  local name=$1 tok=$2
  timeout 100 ./amxpf bench --backend cpu --preset qwen3-30b-a3b --dtype bf16 --tokens $tok --inputs 16 --repeat 5 --warmup 1 --json res5/$name.json > res5/$name.txt 2>&1
  echo "$name rc $? $(grep -E '^cpu +[0-9]+ +(layer|gemm)' res5/$name.txt | awk '{printf "%s %s %s | ", $2, $3, $4}')"
}
for r in 1 2 3; do
  AMXPF=none b none-$r 256,1024
  AMXPF=T1:65536 b t1-64k-$r 256,1024
  AMXPF=T0:16384 b t0-16k-$r 256,1024
done
