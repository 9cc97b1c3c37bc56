#!/usr/bin/env bash
# A device call (see prepare.sh): CUDA op/model tests, a real GPU job through the cluster
# (`smelt up --device cuda`), the step profile, and the step bench beside torch.compile.
set -u
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for t in ${TESTS:-cuda_ops cuda_model}; do
  echo "== $t"; timeout 120 "device/tests/$t" --test-threads=1 --nocapture > "$OUT/$t.log" 2>&1
  echo "rc=$? $(grep -E '^test result' "$OUT/$t.log" | tail -1)"; grep -E "FAILED|panicked|matmul .*out|worst" "$OUT/$t.log" | head -12
done
echo "== smelt up --device cuda (a GPU job through coordinator + worker)"
rm -rf .smelt
timeout 150 device/smelt up --device cuda --workers 1 --submit examples/shakespeare-char-gpu.toml > "$OUT/up.log" 2>&1
echo "rc=$?"; tail -4 "$OUT/up.log"; ls .smelt/jobs/*/ 2>&1 | head; tail -3 .smelt/logs/*worker* 2>/dev/null | cut -c1-300
timeout 60 device/smelt sample --model .smelt/jobs/job-000001/model.safetensors --prompt "ROMEO:" --tokens 200 2>&1 | tail -8
echo "== smelt up --device cuda: fine-tune job-000001 on the GPU (is the line a question?)"
# Labeled lines of the corpus: label 1 when the line ends with '?' (the pooled last token sees it).
python3 -c '
import json
lines = [l.strip() for l in open("data/tinyshakespeare.txt") if 10 <= len(l.strip()) <= 60]
with open("/tmp/questions.jsonl", "w") as f:
    for l in lines[:3000]:
        f.write(json.dumps({"text": l, "label": int(l.endswith("?"))}) + "\n")'
sed -e 's|^data = .*|data = "/tmp/questions.jsonl"|' -e 's|^world_size = .*|world_size = 1\ndevice = "cuda"|' \
  -e 's|^steps = .*|steps = 150|' examples/finetune-classify.toml > /tmp/ft-gpu.toml
timeout 120 device/smelt up --device cuda --workers 1 --submit /tmp/ft-gpu.toml > "$OUT/up_finetune.log" 2>&1
echo "rc=$?"; tail -4 "$OUT/up_finetune.log"; grep -h "fine-tuning started\|evaluated\|fine-tuned weights saved" .smelt/logs/*worker* 2>/dev/null | tail -5 | cut -c1-300
echo "== profile"
timeout 200 device/smelt bench step --backend cuda --preset gpt2-124m --batch 16 --seq 1024 --warmup 2 --steps 3 --profile 2>&1 | tee "$OUT/profile.txt" | head -24
echo "== smelt bench step (cuda)"
timeout 200 device/smelt bench step --backend cuda --preset gpt2-124m --batch 16 --seq 1024 --warmup 3 --steps 10 2>&1 | tee "$OUT/smelt_bench.txt" | tail -1
echo "== torch.compile peer"
timeout 240 python3 device/torch_gpt2.py --B 16 --T 1024 --steps 30 --compile 2>&1 | tee "$OUT/torch_bench.txt" | tail -1
