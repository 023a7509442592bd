#!/usr/bin/env bash
# AMX probe (scripts/amx_probe.c, built static here); moe-hal (56b8b22) beside transformers'
# Qwen3MoeSparseMoeBlock on the 16 cores. Run from devrun/.
set -u
cd "$(dirname "$0")"
mkdir -p res2
trap 'tar czf "$OUT/res2.tgz" res2' EXIT
timeout 60 ./amx_probe 2>&1 | tee res2/amx.txt
export PYTHONUNBUFFERED=1
for dt in bf16 f32; do
  timeout 150 python3 ../scripts/compare/torch_moe.py --preset qwen3-30b-a3b --tokens 1,16,256 --dtype $dt --json res2/torch-$dt.json > res2/torch-$dt.txt 2>&1
  echo "torch $dt rc $?"; tail -4 res2/torch-$dt.txt
  timeout 120 ./new bench --backend cpu --preset qwen3-30b-a3b --dtype $dt --tokens 1,16,256 --json res2/warm-$dt.json > res2/warm-$dt.txt 2>&1
  timeout 120 ./new bench --backend cpu --preset qwen3-30b-a3b --dtype $dt --tokens 1,16,256 --inputs 16 --json res2/cold-$dt.json > res2/cold-$dt.txt 2>&1
  grep -E "ceilings" res2/cold-$dt.txt | cut -c1-200
  grep -E "^cpu +[0-9]+ +layer" res2/warm-$dt.txt res2/cold-$dt.txt
  ./new compare res2/torch-$dt.json res2/warm-$dt.json 2>&1 | grep layer
done
