#!/usr/bin/env bash
# One device call (see bench/device/prepare.sh): GPU facts, the CUDA tests, then smelt's GPT-2
# 124M step beside PyTorch's (torch.compile) on the same card in the same call. Logs go to $OUT.
set -u
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
export SMELT_CUDA_INCLUDE=${SMELT_CUDA_INCLUDE:-/usr/local/cuda/include}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"
summary=()
for t in device/tests/*; do
  name=$(basename "$t")
  echo "== $name"
  timeout "${TEST_TIMEOUT:-150}" "$t" --test-threads=1 --nocapture > "$OUT/$name.log" 2>&1
  rc=$?
  grep -E "^test |rel|max|skipping|panicked|error" "$OUT/$name.log" | head -60
  summary+=("$name rc=$rc $(grep -E '^test result' "$OUT/$name.log" | tail -1)")
done
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  echo "== smelt bench step (cuda)"
  timeout 240 device/smelt bench step --backend cuda --preset gpt2-124m --batch "${B:-16}" --seq 1024 --vocab "${VOCAB:-50304}" --warmup 3 --steps 10 --json 2>&1 | tee "$OUT/smelt_bench.txt" | tail -5
  echo "== torch.compile peer"
  timeout 240 python3 device/torch_gpt2.py --B "${B:-16}" --T 1024 --steps 30 --compile 2>&1 | tee "$OUT/torch_bench.txt" | tail -3
fi
echo "== summary"
printf '%s\n' "${summary[@]}"
tail -1 "$OUT/smelt_bench.txt" 2>/dev/null; tail -1 "$OUT/torch_bench.txt" 2>/dev/null
