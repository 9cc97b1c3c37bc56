#!/usr/bin/env python3
"""Loads a `smelt export hf` directory with Hugging Face transformers as GPT2LMHeadModel and
compares its logits with smelt's own (`smelt export logits`) on the same token ids.

Independent of smelt's code: transformers' GPT-2 implementation computes the logits from the
exported files alone. Skips (exit 0, with a message) when torch or transformers is missing.

    python3 tools/hf/check_export.py [--smelt target/release/smelt] [--model model.safetensors]

Without --model, trains a tiny model with `smelt train` first. Exits 1 when the largest absolute
logit difference exceeds --tol (1e-4).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "RUST_LOG": "warn"})
    if r.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{r.stdout}{r.stderr}")
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smelt", default="target/release/smelt")
    ap.add_argument("--model", help="a smelt model.safetensors (default: train a tiny one)")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()

    try:
        import torch
        import transformers
        from transformers import GPT2LMHeadModel
    except ImportError as e:
        print(f"skipped: {e.name} is not installed (pip install torch transformers)")
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            text = os.path.join(tmp, "text.txt")
            with open(text, "w") as f:
                f.write("the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs!\n" * 40)
            run([args.smelt, "train", "--text", text, "--preset", "test", "--steps", "30", "--batch", "8",
                 "--seq", "32", "--lr", "3e-3", "--warmup", "5", "--eval-interval", "0", "--out", os.path.join(tmp, "run")])
            model = os.path.join(tmp, "run", "model.safetensors")

        out = os.path.join(tmp, "hf")
        run([args.smelt, "export", "hf", model, out])
        with open(os.path.join(out, "config.json")) as f:
            cfg = json.load(f)
        rng = np.random.default_rng(0)
        t = min(cfg["n_positions"], 32)
        ids = rng.integers(0, cfg["vocab_size"], size=t).tolist()
        npy = os.path.join(tmp, "logits.npy")
        run([args.smelt, "export", "logits", model, npy, "--ids", ",".join(map(str, ids))])
        ours = np.load(npy)

        hf, info = GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
        problems = {k: v for k, v in info.items() if v}
        if problems:
            sys.exit(f"transformers reported loading problems: {problems}")
        hf.eval()
        assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr(), "lm_head is not tied to wte"
        with torch.no_grad():
            theirs = hf(torch.tensor([ids])).logits[0].numpy()

        if theirs.shape != ours.shape:
            sys.exit(f"logit shapes differ: transformers {theirs.shape}, smelt {ours.shape}")
        diff = float(np.abs(theirs.astype(np.float64) - ours.astype(np.float64)).max())
        print(f"transformers {transformers.__version__}, torch {torch.__version__}: {t} tokens x {cfg['vocab_size']} logits, "
              f"max |difference| = {diff:.3e} (tolerance {args.tol:g})")
        if not diff <= args.tol:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
