#!/usr/bin/env bash
# Per-op profiles of GPT-2 124M with bf16 activations and with SMELT_BF16_ACTIVATIONS=0, side by
# side in one call (~1.5 minutes with the start; stage with bench/device/prepare.sh, carry
# ["device"]): which kernels change with bf16 edges (run 9 onwards: the attention backward got
# slower with them, 7.7 -> 9.4 ms, bench/NOTES.md v7).
set -u
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
export SMELT_CUDA_INCLUDE=${SMELT_CUDA_INCLUDE:-/usr/local/cuda/include}
gpt=(device/smelt bench step --backend cuda --preset gpt2-124m --batch 16 --seq 1024 --vocab 50304 --warmup 2 --steps 3 --profile)
echo "== bf16 activations"
timeout 60 "${gpt[@]}" 2>&1 | grep -v WARN | head -32
echo "== SMELT_BF16_ACTIVATIONS=0"
SMELT_BF16_ACTIVATIONS=0 timeout 60 "${gpt[@]}" 2>&1 | grep -v WARN | head -32
