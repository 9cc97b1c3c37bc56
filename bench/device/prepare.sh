#!/usr/bin/env bash
# Builds here what a device call needs and stages it in ./device/ (ignored by git, named in the
# device tool's `carry`): the smelt binary and the CUDA test binaries, stripped, plus the PyTorch
# peers (GPT-2; BERT and T5) and the device scripts. The device machine has no Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/../.."
# device/ must not travel as part of the tree (it is carried): ignore it in this clone
mkdir -p .git/info && { grep -qx '/device/' .git/info/exclude 2>/dev/null || echo /device/ >> .git/info/exclude; }
rm -rf device && mkdir -p device/tests
cargo build --release -p smelt --features cuda
strip -o device/smelt "${CARGO_TARGET_DIR:-target}/release/smelt"
# Test binaries: cargo prints each one's path as JSON; keep the CUDA ones (and op_gradcheck,
# whose op checks also run on the CUDA backend), less the emulated ones (host-only: they need
# g++, and run in CI).
cargo test --release -p smelt-engine --features cuda --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and ((m["target"]["name"].startswith("cuda_") and not m["target"]["name"].startswith("cuda_emulated")) or m["target"]["name"] == "op_gradcheck"):
        print(m["target"]["name"], m["executable"])' \
  | while read -r name exe; do strip -o "device/tests/$name" "$exe"; done
cp ../shared/anchors/torch_gpt2.py ../shared/anchors/torch_family.py device/
cp bench/device/cuda_round.sh bench/device/step_line.py bench/device/cuda_all.sh bench/device/tests_side_by_side.sh bench/device/kernel_variants.sh bench/device/cuda_kernel_times.sh bench/device/kernel_table.py bench/device/peer_kernels.py bench/device/cuda_bert_dropout.sh bench/device/cuda_profile_pair.sh bench/device/cuda_check.sh bench/device/cuda_perf.sh bench/device/cuda_e2e.sh bench/device/cuda_vocab.sh bench/device/cuda_family.sh device/
ls -la device device/tests
# The binaries go packed (62 MB unpacked with the tree's 6 MB is over the device tool's 64 MiB
# per call): every device command starts with `tar xzf device/bin.tgz -C device &&`.
tar czf device/bin.tgz -C device smelt tests && rm -rf device/smelt device/tests
du -sh device
