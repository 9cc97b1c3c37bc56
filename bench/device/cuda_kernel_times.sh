#!/usr/bin/env bash
# Every CUDA test binary side by side, then the duration of every kernel of GPT-2 124M's
# training steps read by Nsight Compute (one metric, gpu__time_duration: one pass, no replay),
# with bf16 activations and with SMELT_BF16_ACTIVATIONS=0 (~3 minutes with the start; stage with
# bench/device/prepare.sh, carry ["device"]). Unlike `--profile` (each op synchronised from the
# host), these are the kernels' own times, one row per launch: $OUT/kernels_{bf16,f32}.csv, and
# a per-kernel summary from bench/device/kernel_table.py in $OUT/kernels.txt.
set -u
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
export SMELT_CUDA_INCLUDE=${SMELT_CUDA_INCLUDE:-/usr/local/cuda/include}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOGS=$(mktemp -d)
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv 2>&1 | tee "$OUT/summary.txt"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  echo "== tests (side by side)"
  start=$(date +%s)
  for t in device/tests/*; do
    name=$(basename "$t")
    ( timeout "${TEST_TIMEOUT:-150}" "$t" --test-threads=1 --nocapture > "$LOGS/$name.log" 2>&1
      echo "$?" > "$LOGS/$name.rc" ) &
  done
  wait
  echo "tests took $(( $(date +%s) - start )) s"
  for t in device/tests/*; do
    name=$(basename "$t")
    line="$name rc=$(cat "$LOGS/$name.rc") $(grep -E '^test result' "$LOGS/$name.log" | tail -1)"
    echo "$line" | tee -a "$OUT/summary.txt"
    grep -E "^test .*FAILED|panicked|skipping" "$LOGS/$name.log" | head -8
    { echo "==== $name"; cat "$LOGS/$name.log"; } >> "$OUT/tests.log"
  done
fi

NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
echo "ncu: $NCU"
gpt=(device/smelt bench step --backend cuda --preset gpt2-124m --batch 16 --seq 1024 --vocab 50304 --warmup 1 --steps 1)
for mode in bf16 f32; do
  env_set=""; [ "$mode" = f32 ] && env_set="SMELT_BF16_ACTIVATIONS=0"
  echo "== ncu $mode"
  start=$(date +%s)
  env $env_set timeout "${NCU_TIMEOUT:-100}" "$NCU" --clock-control none --metrics gpu__time_duration.sum \
    --csv --print-units base "${gpt[@]}" > "$OUT/kernels_$mode.csv" 2> "$LOGS/ncu_$mode.err"
  echo "rc=$? took $(( $(date +%s) - start )) s, $(grep -c gpu__time_duration "$OUT/kernels_$mode.csv") kernels"
  tail -3 "$LOGS/ncu_$mode.err"
done
python3 device/kernel_table.py "$OUT/kernels_bf16.csv" "$OUT/kernels_f32.csv" | tee "$OUT/kernels.txt" | head -60
