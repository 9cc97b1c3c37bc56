#!/usr/bin/env bash
# One device call for a round of GPT-2 step work (stop 27): every CUDA test binary side by side,
# the GPT-2 124M step as shipped and under STEP_VARIANTS, torch.compile's step in the same call,
# each kernel's own time with warm caches (Nsight Compute, --cache-control none), the rotary
# step's per-op timeline, and BERT-base / T5-small steps (smelt alone). ~5 minutes; stage with
# bench/device/prepare.sh, then `tar xzf device/bin.tgz -C device && bash device/cuda_round.sh`
# with carry ["device"], timeout_s ~420. $OUT: summary.txt, tests.log, gpt.txt, kernels*.csv,
# kernels.txt, rotary_timeline.txt, family.txt. EXTRA_TEST_ENV / EXTRA_TESTS: a second run of
# some test binaries under switches (tests_side_by_side.sh); KERNEL_VARIANTS: the Nsight table's
# variants (name=ENV pairs, default "warm=": the step as shipped).
set -u
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
export SMELT_CUDA_INCLUDE=${SMELT_CUDA_INCLUDE:-/usr/local/cuda/include}
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOGS=$(mktemp -d)
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv 2>&1 | tee "$OUT/summary.txt"
source device/tests_side_by_side.sh

gpt=(device/smelt bench step --backend cuda --preset gpt2-124m --batch 16 --seq 1024 --vocab 50304)
step() { # name, env (VAR=value, + between several; may be empty), then extra flags
  local name=$1 env_set=$2; shift 2
  echo "== gpt-2 124m: $name ${env_set:+($env_set)} $*" >> "$OUT/gpt.txt"
  env ${env_set//+/ } timeout 60 "${gpt[@]}" "$@" --warmup 3 --steps 10 --json > "$LOGS/$name.json" 2>> "$OUT/gpt.txt"
  cat "$LOGS/$name.json" >> "$OUT/gpt.txt"
  names+=("$name")
}
names=()
step shipped ""
for variant in ${STEP_VARIANTS:-}; do step "${variant%%=*}" "${variant#*=}"; done
step shipped2 ""
echo "== torch.compile peer" | tee -a "$OUT/summary.txt"
timeout 150 python3 device/torch_gpt2.py --B 16 --T 1024 --steps 30 --compile > "$LOGS/torch.txt" 2>&1
cat "$LOGS/torch.txt" >> "$OUT/gpt.txt"; tail -1 "$LOGS/torch.txt" | tee -a "$OUT/summary.txt"
for name in "${names[@]}"; do
  python3 device/step_line.py "$LOGS/$name.json" "$name" --peer "$LOGS/torch.txt" | tee -a "$OUT/summary.txt"
done

if [ "${KERNELS:-1}" = 1 ]; then
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
  NCU_CACHE=none VARIANTS=${KERNEL_VARIANTS:-warm=}
  gpt+=(--warmup 1 --steps 1)
  source device/kernel_variants.sh
  gpt=("${gpt[@]:0:${#gpt[@]}-4}")
fi

echo "== rotary timeline" | tee -a "$OUT/summary.txt"
timeout 60 "${gpt[@]}" --rotary --warmup 3 --steps 5 --timeline > "$OUT/rotary_timeline.txt" 2>&1
grep -E "rope|all ops|ms/step" "$OUT/rotary_timeline.txt" | tee -a "$OUT/summary.txt"

echo "== bert-base, t5-small (smelt)" | tee -a "$OUT/summary.txt"
for m in "bert --preset bert-base --batch 32 --seq 512" "t5 --preset t5-small --batch 64 --seq 512 --dec-seq 114"; do
  timeout 60 device/smelt bench step --backend cuda --arch $m --warmup 3 --steps 10 --json 2>/dev/null | tail -1 > "$LOGS/f.json"
  cat "$LOGS/f.json" >> "$OUT/family.txt"
  python3 device/step_line.py "$LOGS/f.json" | tee -a "$OUT/summary.txt"
done
echo "== summary"; cat "$OUT/summary.txt"
