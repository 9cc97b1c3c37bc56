# Sourced by the device scripts (bash): every staged test binary in device/tests at once (they
# are small and the card has room), one log each in $LOGS; a line per binary in
# $OUT/summary.txt, every log in $OUT/tests.log. SKIP_TESTS=1 skips them, TEST_TIMEOUT bounds
# each (150 s).
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
