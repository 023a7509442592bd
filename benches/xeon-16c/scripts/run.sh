#!/usr/bin/env bash
# 16-core A/B of the decode tiling change (base = 982edf5's moe-bench, new = 56b8b22's), then
# thread scaling. Run on the device from devrun/ (ignored by git), binaries copied there.
set -u
cd "$(dirname "$0")"
mkdir -p res
trap 'tar czf "$OUT/res.tgz" res' EXIT
nproc; lscpu | grep -E "Model name|MHz"
b() { # name bin threads dtype tokens extra...
  local name=$1 bin=$2 th=$3 dt=$4 tok=$5; shift 5
  RAYON_NUM_THREADS=$th timeout 120 ./$bin bench --backend cpu --preset qwen3-30b-a3b --dtype $dt --tokens $tok --inputs 16 "$@" --json res/$name.json > res/$name.txt 2>&1
  echo "$name $(grep -E '^cpu +[0-9]+ +layer' res/$name.txt | awk '{printf "T=%s %s ms %s  ", $2, $4, $9}')"
}
for r in 1 2 3; do
  for dt in bf16 f32; do
    b ab-$dt-$r-base base 16 $dt 1,16
    b ab-$dt-$r-new new 16 $dt 1,16
  done
done
for th in 1 2 4 8 16; do
  for dt in bf16 f32; do
    b sc-$dt-$th new $th $dt 1,16,256 --repeat 5 --warmup 1
  done
done
