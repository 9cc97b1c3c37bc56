#!/usr/bin/env bash
# Every CUDA test binary side by side, then the duration of every kernel of GPT-2 124M's
# training steps read by Nsight Compute (one metric, gpu__time_duration: one pass, no replay),
# with bf16 activations and with SMELT_BF16_ACTIVATIONS=0 (~3 minutes with the start; stage with
# bench/device/prepare.sh, carry ["device"]). Unlike `--profile` (each op synchronised from the
# host), these are the kernels' own times, one row per launch: $OUT/kernels_{bf16,f32}.csv, and
# a per-kernel summary from bench/device/kernel_table.py in $OUT/kernels.txt. PEER=1 then reads
# the peer's kernels (torch.compile's step under torch.profiler, bench/device/peer_kernels.py,
# ~1.5 minutes) into $OUT/peer_kernels.txt, by the same families as smelt's table.
set -u
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
export SMELT_CUDA_INCLUDE=${SMELT_CUDA_INCLUDE:-/usr/local/cuda/include}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOGS=$(mktemp -d)
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv 2>&1 | tee "$OUT/summary.txt"

source device/tests_side_by_side.sh

NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
echo "ncu: $NCU"
gpt=(device/smelt bench step --backend cuda --preset gpt2-124m --batch 16 --seq 1024 --vocab 50304 --warmup 1 --steps 1)
# VARIANTS: name=ENV pairs (ENV with + between several variables), each timed by ncu; DETAIL: a
# kernel-name regex whose first launch ncu profiles in depth (occupancy, warp stalls, memory).
VARIANTS=${VARIANTS:-"bf16= f32=SMELT_BF16_ACTIVATIONS=0"}
source device/kernel_variants.sh
if [ -n "${DETAIL:-}" ]; then
  echo "== ncu detail: $DETAIL"
  timeout "${DETAIL_TIMEOUT:-120}" "$NCU" --clock-control none -k "regex:$DETAIL" --launch-skip "${DETAIL_SKIP:-0}" \
    --launch-count "${DETAIL_COUNT:-3}" --section SpeedOfLight --section Occupancy --section LaunchStats \
    --section WarpStateStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
    "${gpt[@]}" > "$OUT/detail.txt" 2>&1
  echo "rc=$?"; grep -E "^  [a-z_]+.*\(|Duration|Registers|Achieved Occupancy|Theoretical Occupancy|Block Limit|Stall|Issue Slots|Throughput|Bank" "$OUT/detail.txt" | head -80
fi
if [ "${PEER:-0}" = 1 ]; then
  echo "== peer kernels (torch.compile under torch.profiler)"
  timeout "${PEER_TIMEOUT:-200}" python3 device/peer_kernels.py --B 16 --T 1024 > "$OUT/peer_kernels.txt" 2> "$LOGS/peer.err"
  echo "rc=$?"; tail -3 "$LOGS/peer.err"; head -24 "$OUT/peer_kernels.txt"
  # the first variant's families beside the peer's
  python3 device/kernel_table.py "${csvs[0]}" --peer "$OUT/peer_kernels.txt" | head -9 | tee "$OUT/versus_peer.txt"
fi
