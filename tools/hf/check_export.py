#!/usr/bin/env python3
"""Loads a `smelt export hf` directory with Hugging Face transformers as GPT2LMHeadModel and
compares its logits with smelt's own (`smelt export logits`) on the same token ids; for a GPT
fine-tuned as a classifier (`--model` such a file), as GPT2ForSequenceClassification against
`smelt export logits --classifier`, for one sequence and, when the export names a pad id, for a
right-padded batch of two (transformers pools each one's last token that is not the pad id).

Independent of smelt's code: transformers' GPT-2 implementation computes the logits from the
exported files alone. Skips (exit 0, with a message) when torch or transformers is missing.

    python3 tools/hf/check_export.py [--smelt target/release/smelt] [--model model.safetensors] [--classifier] [--rotary]

A model with rotary positions exports as GPT-NeoX and is loaded as GPTNeoXForCausalLM (--rotary
trains the tiny model with rotary positions).

Without --model, trains a tiny model with `smelt train` first; with --classifier it then makes
that model a classifier as a fine-tuning job's file holds one (3 labels, a random
`score.weight`, `smelt.head` and `smelt.num_labels`), its vocabulary one id larger so that the
end-of-text id exists and the export names it as the pad id. Exits 1 when the largest absolute
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
    ap.add_argument("--classifier", action="store_true", help="check a classifier made from the tiny model")
    ap.add_argument("--rotary", action="store_true", help="train the tiny model with rotary positions (a GPT-NeoX export)")
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
                 "--seq", "32", "--lr", "3e-3", "--warmup", "5", "--eval-interval", "0", "--out", os.path.join(tmp, "run")]
                + (["--rotary"] if args.rotary else []))
            model = os.path.join(tmp, "run", "model.safetensors")
            if args.classifier:
                model = make_classifier(model, os.path.join(tmp, "classifier.safetensors"))

        out = os.path.join(tmp, "hf")
        run([args.smelt, "export", "hf", model, out])
        with open(os.path.join(out, "config.json")) as f:
            cfg = json.load(f)
        rng = np.random.default_rng(0)
        t = min(cfg.get("n_positions") or cfg["max_position_embeddings"], 32)
        ids = rng.integers(0, cfg["vocab_size"], size=t).tolist()
        npy = os.path.join(tmp, "logits.npy")
        run([args.smelt, "export", "logits", model, npy, "--ids", ",".join(map(str, ids))])
        ours = np.load(npy)

        if cfg["architectures"] == ["GPT2ForSequenceClassification"]:
            return check_classifier(args, model, out, cfg, ids, tmp)
        if cfg["architectures"] == ["GPTNeoXForCausalLM"]:
            from transformers import GPTNeoXForCausalLM
            hf, info = GPTNeoXForCausalLM.from_pretrained(out, output_loading_info=True)
            embed = hf.gpt_neox.embed_in
        else:
            hf, info = GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
            embed = hf.transformer.wte
        problems = {k: v for k, v in info.items() if v}
        if problems:
            sys.exit(f"transformers reported loading problems: {problems}")
        hf.eval()
        assert hf.lm_head.weight.data_ptr() == embed.weight.data_ptr(), "lm_head is not tied to the token embeddings"
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


def make_classifier(model, path, num_labels=3):
    """The GPT at `model` as a fine-tuned classifier's file: one more vocabulary row (the
    end-of-text id), a random score.weight (num_labels, C), the head's metadata."""
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    with safe_open(model, "np") as f:
        meta = dict(f.metadata())
    tensors = load_file(model)
    config = json.loads(meta["smelt.config"])
    config["vocab_size"] += 1
    meta["smelt.config"] = json.dumps(config)
    wte = tensors["transformer.wte.weight"]
    rng = np.random.default_rng(1)
    tensors["transformer.wte.weight"] = np.concatenate([wte, 0.02 * rng.standard_normal((1, wte.shape[1]), dtype=np.float32)])
    tensors["score.weight"] = (0.5 * rng.standard_normal((num_labels, wte.shape[1]))).astype(np.float32)
    meta.update({"smelt.head": "classification", "smelt.num_labels": str(num_labels), "smelt.kind": "finetune"})
    save_file(tensors, path, metadata=meta)
    return path


def check_classifier(args, model, out, cfg, ids, tmp):
    import torch
    import transformers
    from transformers import GPT2ForSequenceClassification

    def ours(seq):
        npy = os.path.join(tmp, "class_logits.npy")
        run([args.smelt, "export", "logits", model, npy, "--classifier", "--ids", ",".join(map(str, seq))])
        return np.load(npy)[0]

    hf, info = GPT2ForSequenceClassification.from_pretrained(out, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        sys.exit(f"transformers reported loading problems: {problems}")
    hf.eval()
    # text ids only (the tokenizer's): never the pad / end-of-text id
    pad = cfg.get("pad_token_id")
    text_ids = [i for i in ids if i != pad]
    cases = [("one sequence", [text_ids], [ours(text_ids)])]
    if pad is not None:
        short = text_ids[: len(text_ids) // 2]
        batch = [text_ids, short + [pad] * (len(text_ids) - len(short))]
        cases.append(("a right-padded batch of two", batch, [ours(text_ids), ours(short)]))
    worst = 0.0
    for name, batch, want in cases:
        with torch.no_grad():
            theirs = hf(torch.tensor(batch)).logits.numpy()
        want = np.stack(want)
        if theirs.shape != want.shape:
            sys.exit(f"{name}: logit shapes differ: transformers {theirs.shape}, smelt {want.shape}")
        diff = float(np.abs(theirs.astype(np.float64) - want.astype(np.float64)).max())
        worst = max(worst, diff)
        print(f"transformers {transformers.__version__}, torch {torch.__version__}: GPT2ForSequenceClassification, {name} "
              f"({len(batch[0])} tokens, {cfg['num_labels']} labels): max |difference| = {diff:.3e} (tolerance {args.tol:g})")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
