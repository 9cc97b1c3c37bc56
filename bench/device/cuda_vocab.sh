#!/usr/bin/env bash
# A device call (see prepare.sh): what GPT-2's odd vocabulary (50,257) costs the CUDA step,
# against the padded 50,304 the PyTorch peer uses, with the per-op profile of the padded run,
# and the peer itself in the same call.
set -u
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for v in 50257 50304; do
  echo "== smelt bench step (cuda) vocab $v"
  timeout 120 device/smelt bench step --backend cuda --preset gpt2-124m --vocab $v --batch 16 --seq 1024 --warmup 3 --steps 10 2>&1 | tee "$OUT/smelt_bench_$v.txt" | tail -1
done
echo "== profile, vocab 50304"
timeout 120 device/smelt bench step --backend cuda --preset gpt2-124m --vocab 50304 --batch 16 --seq 1024 --warmup 2 --steps 3 --profile 2>&1 | tee "$OUT/profile_50304.txt" | head -8
echo "== torch.compile peer"
timeout 200 python3 device/torch_gpt2.py --B 16 --T 1024 --steps 30 --compile 2>&1 | tee "$OUT/torch_bench.txt" | tail -1
