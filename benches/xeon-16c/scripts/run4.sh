#!/usr/bin/env bash
# AMX at large T (base = 56b8b22, amx = 0127f5d), and the scratch prefetch switch (amxpf: 0127f5d
# plus AMXPF=HINT:BYTES in amx::weight_steps_avx512, not committed). Run from devrun/.
set -u
cd "$(dirname "$0")"
mkdir -p res4
trap 'tar czf "$OUT/res4.tgz" res4' EXIT
b() { # name bin tokens
  local name=$1 bin=$2 tok=$3
  timeout 100 ./$bin bench --backend cpu --preset qwen3-30b-a3b --dtype bf16 --tokens $tok --inputs 16 --repeat 5 --warmup 1 --json res4/$name.json > res4/$name.txt 2>&1
  echo "$name rc $? $(grep -E '^cpu +[0-9]+ +layer' res4/$name.txt | awk '{printf "T=%s %s ms %s  ", $2, $4, $9}')"
  grep -E "^cpu +[0-9]+ +gemm" res4/$name.txt | awk '{printf "  %s %s %s ms %s GF/s %s GB/s\n", $2, $3, $4, $7, $8}'
}
b base base 256,1024,4096
b amx amx 256,1024,4096
AMXPF=T0:8192 b pf-t0-8k amxpf 256,1024
AMXPF=T0:16384 b pf-t0-16k amxpf 256
AMXPF=T1:65536 b pf-t1-64k amxpf 256
AMXPF=NTA:8192 b pf-nta-8k amxpf 256
b amx-again amx 256
