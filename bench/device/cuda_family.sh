#!/usr/bin/env bash
# One device call for BERT and T5 on CUDA (issue 7; stage it with bench/device/prepare.sh).
#  1. Tests: device/tests/cuda_family (both models on CUDA against the CPU: every loss and
#     gradient, f32 and bf16), then the ops they add over GPT from cuda_ops (tanh) and
#     cuda_attention (key padding masks, bidirectional and cross attention). FULL=1 runs all of
#     cuda_ops and cuda_attention instead; SKIP_TESTS=1 none (after cuda_check.sh ran them all).
#  2. smelt's steps at the peers' shapes: BERT-base masked LM 32 x 512, T5-small 64 x 512 -> 114
#     (bf16 matmuls, 3 warm-up + 10 timed steps, median). PROFILE=1 adds a per-op profile of each;
#     PAD_VOCAB=1 adds BERT with its vocabulary padded to 30,528 (what the odd 30,522 costs).
#  3. The Hugging Face peers in the same call: torch_family.py --compile --steps 20 (it runs
#     GPT-2 124M first; it has no switch to skip it).
#  4. smelt / peer tokens/s for each (input tokens: BERT B*T, T5 B*Te), against the 1.15x goal.
# Expected wall time ~5 minutes (most of it torch.compile). $OUT gets at most 7 files (the device
# tool brings back 8): tests.log, smelt_{bert,t5}.json, smelt.err (stderr, profiles),
# torch_family.txt, ratio.txt, and smelt_bert_30528.json with PAD_VOCAB=1.
set -u
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
export SMELT_CUDA_INCLUDE=${SMELT_CUDA_INCLUDE:-/usr/local/cuda/include}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOGS=$(mktemp -d)
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv 2>&1 | tee "$LOGS/gpu.txt"

summary=()
run_test() { # name timeout [filters...]
  local name=$1 limit=$2; shift 2
  echo "== $name $*"
  timeout "$limit" "device/tests/$name" --test-threads=1 --nocapture "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  grep -E "panicked|FAILED|worst|skipping|loss cpu" "$LOGS/$name.log" | head -40
  summary+=("$name rc=$rc $(grep -E '^test result' "$LOGS/$name.log" | tail -1)")
  { echo "==== $name $*"; cat "$LOGS/$name.log"; } >> "$OUT/tests.log"
}
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  run_test cuda_family 90
  if [ "${FULL:-0}" = 1 ]; then
    run_test cuda_ops 120
    run_test cuda_attention 120
  else
    run_test cuda_ops 45 tanh gelu_and_residual
    run_test cuda_attention 60 key_padding bidirectional cross
  fi
fi

bench() { # arch, then smelt's flags
  local arch=$1; shift
  echo "== smelt bench step --backend cuda --arch $arch $*"
  echo "==== $arch $*" >> "$OUT/smelt.err"
  timeout 100 device/smelt bench step --backend cuda --arch "$arch" "$@" --warmup 3 --steps 10 --json \
    > "$OUT/smelt_$arch.json" 2> "$LOGS/err"
  echo "rc=$? $(tail -c 600 "$OUT/smelt_$arch.json")"
  grep -m3 -E "^Error|panicked" -A2 "$LOGS/err"; cat "$LOGS/err" >> "$OUT/smelt.err"
  if [ "${PROFILE:-0}" = 1 ]; then
    echo "==== profile $arch $*" >> "$OUT/smelt.err"
    timeout 100 device/smelt bench step --backend cuda --arch "$arch" "$@" --warmup 2 --steps 2 --profile \
      > "$LOGS/profile" 2>&1
    head -25 "$LOGS/profile"; cat "$LOGS/profile" >> "$OUT/smelt.err"
  fi
}
bench bert --preset bert-base --batch 32 --seq 512
bench t5 --preset t5-small --batch 64 --seq 512 --dec-seq 114
if [ "${PAD_VOCAB:-0}" = 1 ]; then
  # what BERT's odd vocabulary (30,522) costs: the same step with it padded to a multiple of 8
  cp "$OUT/smelt_bert.json" "$OUT/smelt_bert_30522.json"
  bench bert --preset bert-base --batch 32 --seq 512 --vocab 30528
  mv "$OUT/smelt_bert.json" "$OUT/smelt_bert_30528.json"; mv "$OUT/smelt_bert_30522.json" "$OUT/smelt_bert.json"
fi

echo "== torch_family.py --compile --steps 20 (Hugging Face peers)"
timeout 260 python3 device/torch_family.py --compile --steps 20 2>&1 | tee "$OUT/torch_family.txt" | grep -E "^hf-|Error|error" | tail -5

echo "== summary"
{ cat "$LOGS/gpu.txt"; printf '%s\n' "${summary[@]}"; } | tee "$OUT/ratio.txt"
python3 - "$OUT" <<'EOF' | tee -a "$OUT/ratio.txt"
import json, pathlib, re, sys
out = pathlib.Path(sys.argv[1])
peer = {}
try:
    for line in (out / "torch_family.txt").read_text(errors="replace").splitlines():
        m = re.match(r"hf-(\S+?)(-compile)? N=\S+ step=([\d.]+)ms tok/s=(\d+)", line)
        if m:
            peer[m.group(1)] = (float(m.group(4)), float(m.group(3)))
except OSError as e:
    print(f"no peer output: {e}")
# (arch, peer name, the issue's H200 reference in tokens/s)
for arch, name, ref in [("bert", "bert-base-mlm", 308e3), ("t5", "t5-small-denoise", 721e3)]:
    try:
        s = json.loads((out / f"smelt_{arch}.json").read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError) as e:
        print(f"{arch}: no smelt result ({e})")
        continue
    line = (f"{arch}: smelt {s['tokens_per_s']:.0f} tok/s ({s['ms_per_step']:.1f} ms/step, "
            f"MFU {100 * s['mfu']:.1f}%, {s['device']})")
    if name in peer:
        tok, ms = peer[name]
        r = s["tokens_per_s"] / tok
        line += f"; hf {name} compiled {tok:.0f} tok/s ({ms:.1f} ms); ratio {r:.2f}x ({'meets' if r >= 1.15 else 'below'} the 1.15x goal)"
    else:
        line += f"; no peer figure this run (issue's H200 reference: {ref:.0f} tok/s)"
    print(line)
EOF
