#!/usr/bin/env bash
# A device call for speed work (see prepare.sh): where a GPT-2 124M step's time goes, op by op
# (`bench step --profile`), then the plain step beside PyTorch's torch.compile in the same call.
# The vocabulary is the peer's padded 50,304 (`pad_vocab_to = 64`); VOCAB=50257 for GPT-2's own.
set -u
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for t in ${TESTS:-}; do
  echo "== $t"; timeout 120 "device/tests/$t" --test-threads=1 --nocapture > "$OUT/$t.log" 2>&1
  echo "rc=$? $(grep -E '^test result' "$OUT/$t.log" | tail -1)"; grep -E "FAILED|panicked" "$OUT/$t.log" | head -5
done
echo "== profile"
timeout 200 device/smelt bench step --backend cuda --preset gpt2-124m --batch "${B:-16}" --seq 1024 --vocab "${VOCAB:-50304}" --warmup 2 --steps 3 --profile 2>&1 | tee "$OUT/profile.txt" | head -45
echo "== smelt bench step (cuda)"
timeout 200 device/smelt bench step --backend cuda --preset gpt2-124m --batch "${B:-16}" --seq 1024 --vocab "${VOCAB:-50304}" --warmup 3 --steps 10 2>&1 | tee "$OUT/smelt_bench.txt" | tail -2
if [ "${TORCH:-1}" = 1 ]; then
  echo "== torch.compile peer"
  timeout 240 python3 device/torch_gpt2.py --B "${B:-16}" --T 1024 --steps 30 --compile 2>&1 | tee "$OUT/torch_bench.txt" | tail -1
fi
