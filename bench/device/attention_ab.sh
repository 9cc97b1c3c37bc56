#!/usr/bin/env bash
# A short device call for attention-backward work (stage with bench/device/prepare.sh): the
# CUDA tests that run attention (the default, version-2 backward), then GPT-2 124M's and
# BERT-base's per-op profiles with SMELT_ATTENTION_BACKWARD=v1 and with the default, and the
# step time of each. No PyTorch peer: cuda_all.sh measures the ratios.
set -u
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
export SMELT_CUDA_INCLUDE=${SMELT_CUDA_INCLUDE:-/usr/local/cuda/include}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for t in cuda_attention cuda_model cuda_family; do
  ( timeout 120 "device/tests/$t" --test-threads=1 > "$OUT/$t.log" 2>&1; echo "$t rc=$? $(grep -E '^test result' "$OUT/$t.log")" ) &
done
wait
grep -hE "FAILED|panicked" "$OUT"/cuda_*.log | head -20
for v in v1 v2; do
  for arch in "--preset gpt2-124m --batch 16 --seq 1024 --vocab 50304" "--arch bert --preset bert-base --batch 32 --seq 512"; do
    echo "== $v $arch"
    SMELT_ATTENTION_BACKWARD=$v timeout 60 device/smelt bench step --backend cuda $arch --warmup 2 --steps 2 --profile > "$OUT/p.txt" 2>&1
    grep -E "attention|all ops" "$OUT/p.txt"; cat "$OUT/p.txt" >> "$OUT/profiles.txt"
    SMELT_ATTENTION_BACKWARD=$v timeout 60 device/smelt bench step --backend cuda $arch --warmup 3 --steps 10 --json 2>/dev/null | tail -1 | python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print(f"step {d[\"ms_per_step\"]:.1f} ms, {d[\"tokens_per_s\"]:.0f} tok/s, MFU {100*d[\"mfu\"]:.1f}%")'
  done
done
rm -f "$OUT/p.txt"
