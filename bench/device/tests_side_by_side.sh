# Sourced by the device scripts (bash): every staged test binary in device/tests at once (they
# are small and the card has room), one log each in $LOGS; a line per binary in
# $OUT/summary.txt, every log in $OUT/tests.log. SKIP_TESTS=1 skips them, TEST_TIMEOUT bounds
# each (150 s). EXTRA_TEST_ENV (VAR=value, + between several) runs the binaries named in
# EXTRA_TESTS (default: cuda_model cuda_family cuda_bf16_activations) a second time under it, in
# the same side-by-side batch (logs named NAME+env).
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  echo "== tests (side by side)"
  start=$(date +%s)
  runs=()
  for t in device/tests/*; do
    name=$(basename "$t")
    ( timeout "${TEST_TIMEOUT:-150}" "$t" --test-threads=1 --nocapture > "$LOGS/$name.log" 2>&1
      echo "$?" > "$LOGS/$name.rc" ) &
    runs+=("$name")
  done
  if [ -n "${EXTRA_TEST_ENV:-}" ]; then
    for name in ${EXTRA_TESTS:-cuda_model cuda_family cuda_bf16_activations}; do
      [ -x "device/tests/$name" ] || continue
      ( env ${EXTRA_TEST_ENV//+/ } timeout "${TEST_TIMEOUT:-150}" "device/tests/$name" --test-threads=1 --nocapture \
          > "$LOGS/$name+env.log" 2>&1
        echo "$?" > "$LOGS/$name+env.rc" ) &
      runs+=("$name+env")
    done
  fi
  wait
  echo "tests took $(( $(date +%s) - start )) s${EXTRA_TEST_ENV:+ (+env: $EXTRA_TEST_ENV)}"
  for name in "${runs[@]}"; do
    line="$name rc=$(cat "$LOGS/$name.rc") $(grep -E '^test result' "$LOGS/$name.log" | tail -1)"
    echo "$line" | tee -a "$OUT/summary.txt"
    grep -E "^test .*FAILED|panicked|skipping" "$LOGS/$name.log" | head -8
    { echo "==== $name"; cat "$LOGS/$name.log"; } >> "$OUT/tests.log"
  done
fi
