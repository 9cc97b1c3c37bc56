#!/usr/bin/env python3
"""Loads a `smelt export hf` directory of a BERT with Hugging Face transformers (the class its
config.json names: BertForPreTraining or BertForMaskedLM) and compares its masked-LM logits with
smelt's own (`smelt export logits`) on the same token ids: one unpadded sequence, segment 0,
[CLS] ... [MASK] ... [SEP].

Independent of smelt's code: transformers' BERT computes the logits from the exported files
alone. Skips (exit 0, with a message) when torch or transformers is missing.

    python3 tools/hf/check_bert_export.py [--smelt target/release/smelt] [--model model.safetensors]

Without --model, trains a tiny BERT first (`smelt up` with one CPU worker: bert-tiny, char
tokenizer, masked LM + next-sentence prediction, post-LN). Exits 1 when the largest absolute
logit difference exceeds --tol (1e-4).

Recorded results (transformers 5.24.0, torch 2.15.0, CPU, f32; 64 tokens, [CLS] first, [SEP]
last, one [MASK]):
- bert-tiny (2 layers, 128 wide, 2 heads, 128 positions; 66 ids: 62 characters of Tiny
  Shakespeare + [PAD] [CLS] [SEP] [MASK]) trained 300 steps, MLM + NSP, loss 3.75, exported as
  BertForPreTraining: logits in -7.4..5.7, max |difference| = 2.9e-06.
- the same with objective = "mlm" and dropout = 0.1, 100 steps, exported as BertForMaskedLM
  (hidden_dropout_prob 0.1; both sides in eval mode): max |difference| = 1.9e-06.
- this script without --model (100 steps on a pangram, 34 ids): max |difference| = 1.4e-06.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "RUST_LOG": "warn"})
    if r.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{r.stdout}{r.stderr}")
    return r


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SPEC = """name = "bert-export-check"
seed = 7

[model]
arch = "bert"
preset = "bert-tiny"
objective = "mlm+nsp"
ln_placement = "post"

[data]
text = "{text}"
tokenizer = "char"

[train]
steps = {steps}
global_batch = 16
micro_batch = 16
seq_len = 64
lr = 2e-3
warmup_steps = 5
eval_interval = 0

[cluster]
world_size = 1
"""


def train(smelt, tmp, steps):
    """A tiny trained BERT's model.safetensors, by a one-worker local cluster."""
    text = os.path.join(tmp, "text.txt")
    with open(text, "w") as f:
        f.write("the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs!\n" * 200)
    spec = os.path.join(tmp, "bert.toml")
    with open(spec, "w") as f:
        f.write(SPEC.format(text=text, steps=steps))
    data = os.path.join(tmp, "cluster")
    run([smelt, "up", "--workers", "1", "--device", "cpu", "--data-dir", data,
         "--listen", f"127.0.0.1:{free_port()}", "--submit", spec])
    jobs = os.path.join(data, "jobs")
    (job,) = os.listdir(jobs)
    return os.path.join(jobs, job, "model.safetensors")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smelt", default="target/release/smelt")
    ap.add_argument("--model", help="a smelt bert/1 model.safetensors or checkpoint (default: train a tiny one)")
    ap.add_argument("--steps", type=int, default=100, help="training steps without --model")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()

    try:
        import torch
        import transformers
    except ImportError as e:
        print(f"skipped: {e.name} is not installed (pip install torch transformers)")
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or train(args.smelt, tmp, args.steps)
        out = os.path.join(tmp, "hf")
        run([args.smelt, "export", "hf", model, out])
        with open(os.path.join(out, "config.json")) as f:
            cfg = json.load(f)
        (arch,) = cfg["architectures"]
        if arch == "BertForSequenceClassification":
            sys.exit("a classifier exports without its masked-LM head: there are no MLM logits to compare")
        sp = cfg["smelt_specials"]

        # [CLS] text ... [MASK] ... [SEP]: the ids a masked-LM query has.
        rng = np.random.default_rng(0)
        t = min(cfg["max_position_embeddings"], 64)
        ids = rng.integers(0, sp["base_vocab"], size=t)
        ids[0], ids[-1], ids[t // 3] = sp["cls"], sp["sep"], sp["mask"]
        ids = ids.tolist()
        npy = os.path.join(tmp, "logits.npy")
        run([args.smelt, "export", "logits", model, npy, "--ids", ",".join(map(str, ids))])
        ours = np.load(npy)

        cls = getattr(transformers, arch)
        hf, info = cls.from_pretrained(out, output_loading_info=True)
        problems = {k: v for k, v in info.items() if v}
        if problems:
            sys.exit(f"transformers reported loading problems: {problems}")
        hf.eval()
        dec = hf.cls.predictions.decoder
        assert dec.weight.data_ptr() == hf.bert.embeddings.word_embeddings.weight.data_ptr(), "MLM decoder is not tied to the word embeddings"
        assert torch.equal(dec.bias, hf.cls.predictions.bias), "MLM decoder bias is not cls.predictions.bias"
        with torch.no_grad():
            o = hf(input_ids=torch.tensor([ids]))
        theirs = (o.prediction_logits if arch == "BertForPreTraining" else o.logits)[0].numpy()

        if theirs.shape != ours.shape:
            sys.exit(f"logit shapes differ: transformers {theirs.shape}, smelt {ours.shape}")
        diff = float(np.abs(theirs.astype(np.float64) - ours.astype(np.float64)).max())
        print(f"transformers {transformers.__version__}, torch {torch.__version__}: {arch}, {t} tokens x {cfg['vocab_size']} "
              f"logits (range {ours.min():.2f}..{ours.max():.2f}), max |difference| = {diff:.3e} (tolerance {args.tol:g})")
        if not diff <= args.tol:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
