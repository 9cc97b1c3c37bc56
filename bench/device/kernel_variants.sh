# Sourced by the device scripts (bash): each kernel's own time in GPT-2 124M steps, read by
# Nsight Compute (gpu__time_duration: one pass, no replay), once per variant, then the table
# (kernel_table.py) in $OUT/kernels.txt. Needs $OUT, $LOGS, $NCU and the step command in the
# array `gpt`; VARIANTS holds name=ENV pairs (+ between several variables, ENV may be empty).
# NCU_CACHE=none keeps the caches warm between kernels (ncu flushes them by default, so a GEMM
# reads its operands cold there, unlike in a real step).
csvs=()
for variant in $VARIANTS; do
  mode=${variant%%=*}; env_set=${variant#*=}
  echo "== ncu $mode ${env_set:+($env_set)}"
  start=$(date +%s)
  env ${env_set//+/ } timeout "${NCU_TIMEOUT:-100}" "$NCU" --clock-control none ${NCU_CACHE:+--cache-control "$NCU_CACHE"} --metrics gpu__time_duration.sum \
    --csv --print-units base "${gpt[@]}" > "$OUT/kernels_$mode.csv" 2> "$LOGS/ncu_$mode.err"
  echo "rc=$? took $(( $(date +%s) - start )) s, $(grep -c gpu__time_duration "$OUT/kernels_$mode.csv") kernels"
  tail -3 "$LOGS/ncu_$mode.err"
  csvs+=("$OUT/kernels_$mode.csv")
done
python3 device/kernel_table.py "${csvs[@]}" > "$OUT/kernels.txt"
head -45 "$OUT/kernels.txt"
