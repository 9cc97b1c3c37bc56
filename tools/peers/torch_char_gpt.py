#!/usr/bin/env python3
"""A nanoGPT-style character-level GPT trainer in plain PyTorch, configured like `smelt train`.

It is the yardstick for smelt's training quality: same model (GPT-2 block, pre-LN, learned
positions, tied LM head, GELU tanh, LN eps 1e-5, dropout 0, GPT-2 init), same optimizer
(AdamW, betas (0.9, 0.95), eps 1e-8, decay on matmul weights only, global-norm clip 1.0),
same learning-rate schedule (linear warm-up `lr*(step+1)/warmup`, cosine to min_lr at `steps`),
same char tokenizer and 90/10 split, and validation loss on exactly smelt's evaluation windows
(`TokenWindows::eval_batch` in engine/src/data.rs) at the same steps. Training windows are
drawn with torch's own RNG, so the sample order differs from smelt's: this compares the
quality of training, not bits.

Prints one JSON line per evaluation ({"step", "train_loss", "val_loss", ...}) and a final
summary line ({"summary": true, ..., "tokens_per_s"}). tokens_per_s counts the training tokens
over the wall time of the whole loop, evaluations included, as smelt's metrics.jsonl does.
"""

import argparse
import json
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd, eps=1e-5)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.ln_2 = nn.LayerNorm(n_embd, eps=1e-5)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd)

    def attn(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd):
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, eps=1e-5)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        # GPT-2 init: N(0, 0.02) everywhere, residual projections N(0, 0.02/sqrt(2L)), biases 0, LN 1/0.
        resid_std = 0.02 / math.sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") or name.endswith("mlp_proj.weight"):
                nn.init.normal_(p, 0.0, resid_std)
            elif name in ("wte.weight", "wpe.weight") or (p.dim() == 2):
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, idx, targets):
        b, t = idx.shape
        pos = torch.arange(t, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def param_groups(self, weight_decay, decay_embeddings):
        """smelt's groups: decay on matmul weights (nn.Linear), never biases or LayerNorm;
        embeddings (and so the tied head) only with decay_embeddings."""
        embeddings = {id(self.wte.weight), id(self.wpe.weight)}
        decay, no_decay = [], []
        for m in self.modules():
            for pname, p in m.named_parameters(recurse=False):
                if id(p) in embeddings:
                    continue
                (decay if isinstance(m, nn.Linear) and pname == "weight" else no_decay).append(p)
        (decay if decay_embeddings else no_decay).extend([self.wte.weight, self.wpe.weight])
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step, max_lr, min_lr, warmup, decay_steps):
    """engine/src/optim.rs LrSchedule::lr_at, 0-based step."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if step >= decay_steps or decay_steps <= warmup:
        return max_lr if decay_steps == 0 else min_lr
    progress = (step - warmup) / (decay_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def windows(data, starts, seq):
    idx = starts.view(-1, 1) + torch.arange(seq + 1).view(1, -1)
    w = data[idx]
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def eval_starts(n_tokens, i, n_batches, batch, seq):
    """engine/src/data.rs TokenWindows::eval_batch: windows evenly spread over the stream."""
    n = n_tokens - seq
    total = max(n_batches * batch, 1)
    return torch.tensor([min((k * n) // total, n - 1) for k in range(i * batch, (i + 1) * batch)], dtype=torch.long)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", required=True)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=None, help="default: the block size")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr", type=float, default=None, help="default: lr / 10")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--decay-embeddings", action="store_true")
    ap.add_argument("--beta1", type=float, default=0.9)
    ap.add_argument("--beta2", type=float, default=0.95)
    ap.add_argument("--grad-clip", type=float, default=1.0, help="0 disables")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--eval-interval", type=int, default=100)
    ap.add_argument("--eval-batches", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--metrics", default=None, help="also write the JSON lines to this file")
    a = ap.parse_args()

    if a.threads:
        torch.set_num_threads(a.threads)
        torch.set_num_interop_threads(1)
    torch.manual_seed(a.seed)
    seq = a.seq or a.block_size
    min_lr = a.lr / 10.0 if a.min_lr is None else a.min_lr

    # The char tokenizer: vocabulary = sorted distinct characters (code points) of the whole text.
    with open(a.text, encoding="utf-8", newline="") as f:
        text = f.read()
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    tokens = torch.tensor([stoi[ch] for ch in text], dtype=torch.long)
    split = int(len(tokens) * (1.0 - a.val_fraction))
    train, val = tokens[:split], tokens[split:]
    assert len(train) > seq and len(val) > seq, "text too short for --seq"

    model = GPT(len(chars), a.block_size, a.n_layer, a.n_head, a.n_embd)
    opt = torch.optim.AdamW(model.param_groups(a.weight_decay, a.decay_embeddings), lr=a.lr,
                            betas=(a.beta1, a.beta2), eps=1e-8)
    gen = torch.Generator().manual_seed(a.seed)
    out = open(a.metrics, "w") if a.metrics else None

    def emit(rec):
        line = json.dumps(rec)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    emit({"config": vars(a), "torch": torch.__version__, "threads": torch.get_num_threads(),
          "vocab": len(chars), "params": sum(p.numel() for p in model.parameters()),
          "train_tokens": len(train), "val_tokens": len(val)})

    @torch.no_grad()
    def evaluate():
        model.eval()
        n = max(a.eval_batches, 1)
        total = 0.0
        for i in range(n):
            x, y = windows(val, eval_starts(len(val), i, n, a.batch, seq), seq)
            total += model(x, y).item()
        model.train()
        return total / n

    n_starts = len(train) - seq
    started = time.perf_counter()
    eval_seconds = 0.0
    tokens_seen = 0
    val_loss = None
    for step in range(a.steps):
        x, y = windows(train, torch.randint(n_starts, (a.batch,), generator=gen), seq)
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip if a.grad_clip > 0 else float("inf"))
        lr = lr_at(step, a.lr, min_lr, a.warmup, a.steps)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        tokens_seen += a.batch * seq
        last = step + 1 == a.steps
        if a.val_fraction > 0 and (last or (a.eval_interval > 0 and (step + 1) % a.eval_interval == 0)):
            t0 = time.perf_counter()
            val_loss = evaluate()
            eval_seconds += time.perf_counter() - t0
            elapsed = time.perf_counter() - started
            emit({"step": step + 1, "train_loss": loss.item(), "val_loss": val_loss, "lr": lr,
                  "grad_norm": norm.item(), "tokens_per_s": tokens_seen / elapsed})
    seconds = time.perf_counter() - started
    emit({"summary": True, "steps": a.steps, "final_val_loss": val_loss, "seconds": seconds,
          "tokens_per_s": tokens_seen / seconds,
          "train_only_tokens_per_s": tokens_seen / (seconds - eval_seconds),
          "torch": torch.__version__, "threads": torch.get_num_threads()})


if __name__ == "__main__":
    sys.exit(main())
