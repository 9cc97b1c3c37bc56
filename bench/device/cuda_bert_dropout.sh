#!/usr/bin/env bash
# BERT-base MLM with and without hidden dropout 0.1 beside the Hugging Face peer (which trains
# with dropout 0.1), one call (~2.5 minutes with the start; stage with bench/device/prepare.sh,
# carry ["device"]). Also GPT-2's per-op profile. Output: the JSON lines and the peer's line.
set -u
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
export SMELT_CUDA_INCLUDE=${SMELT_CUDA_INCLUDE:-/usr/local/cuda/include}
export PYTHONUNBUFFERED=1
for d in "" "--dropout 0.1"; do
  timeout 60 device/smelt bench step --backend cuda --arch bert --preset bert-base --batch 32 --seq 512 $d \
    --warmup 3 --steps 10 --json 2>/dev/null | tail -1
done
timeout 150 python3 - <<'PY' 2>&1 | grep -E "^hf-|Error"
import sys
sys.path.insert(0, "device")
import torch_family as tf
run = tf.bench
def bench(name, *rest):
    if name.startswith("bert"):
        run(name, *rest)
tf.bench = bench
sys.argv = ["torch_family.py", "--compile", "--steps", "20"]
tf.main()
PY
timeout 45 device/smelt bench step --backend cuda --preset gpt2-124m --batch 16 --seq 1024 --vocab 50304 \
  --warmup 2 --steps 2 --profile 2>&1 | grep -vE "WARN" | head -32
