#!/usr/bin/env python3
"""Independent JAX (float64, CPU) reference for the tiny GPT-2 golden fixtures.

Writes <out>/gpt_tiny_preln.safetensors, <out>/gpt_tiny_postln.safetensors and
<out>/gpt_tiny_rotary.safetensors (pre-LN with rotary positions instead of a position table).
See tools/golden/README.md for the exact contents.

    pip install jax jaxlib numpy safetensors
    python3 tools/golden/gpt_jax.py --out engine/tests/fixtures
"""
import argparse
import json
import math
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

# ---------------------------------------------------------------- config
BASE_CONFIG = dict(
    vocab_size=37,
    block_size=16,
    n_layer=2,
    n_embd=24,
    n_head=3,
    batch=3,
    seq_len=11,
    ln_eps=1e-5,
    gelu="tanh",
    tied_lm_head=True,
    steps=3,
    lr=1e-2,
    beta1=0.9,
    beta2=0.95,
    adam_eps=1e-8,
    weight_decay=0.1,
    grad_clip=1.0,
    clip_eps=1e-6,
    init_std_matrix=0.2,
    init_std_bias=0.1,
    init_ln_weight="1 + normal(0, 0.1)",
    init_ln_bias_std=0.1,
    init_note="draws in param_table order then tokens then targets; params rounded to f32 before use",
)
VARIANTS = {"preln": 1234, "postln": 4321, "rotary": 777}
ROPE_BASE = 10000.0

BLOCK_SUFFIXES = [
    ("ln_1.weight", "ln_w"),
    ("ln_1.bias", "ln_b"),
    ("attn.c_attn.weight", "mat"),
    ("attn.c_attn.bias", "bias"),
    ("attn.c_proj.weight", "mat"),
    ("attn.c_proj.bias", "bias"),
    ("ln_2.weight", "ln_w"),
    ("ln_2.bias", "ln_b"),
    ("mlp.c_fc.weight", "mat"),
    ("mlp.c_fc.bias", "bias"),
    ("mlp.c_proj.weight", "mat"),
    ("mlp.c_proj.bias", "bias"),
]
DECAYED_SUFFIXES = {"attn.c_attn.weight", "attn.c_proj.weight",
                    "mlp.c_fc.weight", "mlp.c_proj.weight"}


def param_table(cfg):
    """Ordered list of (name, shape, kind). Order == RNG draw order. Rotary: no wpe."""
    V, P, L, C = cfg["vocab_size"], cfg["block_size"], cfg["n_layer"], cfg["n_embd"]
    shapes = {
        "ln_1.weight": (C,), "ln_1.bias": (C,),
        "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
        "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,),
        "ln_2.weight": (C,), "ln_2.bias": (C,),
        "mlp.c_fc.weight": (C, 4 * C), "mlp.c_fc.bias": (4 * C,),
        "mlp.c_proj.weight": (4 * C, C), "mlp.c_proj.bias": (C,),
    }
    t = [("transformer.wte.weight", (V, C), "mat")]
    if cfg.get("variant") != "rotary":
        t.append(("transformer.wpe.weight", (P, C), "mat"))
    for i in range(L):
        for suf, kind in BLOCK_SUFFIXES:
            t.append((f"transformer.h.{i}.{suf}", shapes[suf], kind))
    t.append(("transformer.ln_f.weight", (C,), "ln_w"))
    t.append(("transformer.ln_f.bias", (C,), "ln_b"))
    return t


def weight_decay_of(name, cfg):
    if name.startswith("transformer.h.") and name.split(".", 3)[3] in DECAYED_SUFFIXES:
        return cfg["weight_decay"]
    return 0.0


def init(cfg, seed):
    rs = np.random.RandomState(seed)
    params = {}
    for name, shape, kind in param_table(cfg):
        if kind == "mat":
            a = rs.normal(0.0, cfg["init_std_matrix"], size=shape)
        elif kind == "bias":
            a = rs.normal(0.0, cfg["init_std_bias"], size=shape)
        elif kind == "ln_w":
            a = 1.0 + rs.normal(0.0, 0.1, size=shape)
        elif kind == "ln_b":
            a = rs.normal(0.0, cfg["init_ln_bias_std"], size=shape)
        else:
            raise ValueError(kind)
        # Round to float32 first: the stored float32 params are then the exact
        # inputs of the float64 computation (a consumer loading them reproduces it).
        params[name] = np.asarray(a, dtype=np.float32).astype(np.float64)
    B, T, V = cfg["batch"], cfg["seq_len"], cfg["vocab_size"]
    tokens = rs.randint(0, V, size=(B, T)).astype(np.int64)
    targets = rs.randint(0, V, size=(B, T)).astype(np.int64)
    return params, tokens, targets


# ---------------------------------------------------------------- model
def layer_norm(x, w, b, eps):
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean((x - mu) ** 2, axis=-1, keepdims=True)  # biased, like torch
    return (x - mu) / jnp.sqrt(var + eps) * w + b


def gelu_tanh(x):
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def rope(x):
    """Rotary position embedding of (B, H, T, D) by position t (RoFormer, "rotate half" layout of
    GPT-NeoX): channel i < D/2 pairs with i + D/2, the pair turned by angle t * base^(-2i/D)."""
    T, D = x.shape[2], x.shape[3]
    half = D // 2
    inv_freq = ROPE_BASE ** (-np.arange(0, half, dtype=np.float64) * 2.0 / D)
    angle = np.arange(T, dtype=np.float64)[:, None] * inv_freq[None, :]  # (T, half)
    cos, sin = jnp.asarray(np.cos(angle)), jnp.asarray(np.sin(angle))
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(x, p, pre, cfg):
    B, T, C = x.shape
    H = cfg["n_head"]
    D = C // H
    qkv = x @ p[pre + "attn.c_attn.weight"] + p[pre + "attn.c_attn.bias"]
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    # (B,T,C) -> (B,H,T,D); head h = columns h*D..(h+1)*D
    q = q.reshape(B, T, H, D).transpose(0, 2, 1, 3)
    k = k.reshape(B, T, H, D).transpose(0, 2, 1, 3)
    v = v.reshape(B, T, H, D).transpose(0, 2, 1, 3)
    if cfg.get("variant") == "rotary":
        q, k = rope(q), rope(k)
    s = jnp.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(D)
    mask = jnp.tril(jnp.ones((T, T), dtype=bool))  # allowed: j <= i
    s = jnp.where(mask, s, -jnp.inf)
    s = s - jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s)
    a = e / jnp.sum(e, axis=-1, keepdims=True)
    y = jnp.einsum("bhij,bhjd->bhid", a, v)
    y = y.transpose(0, 2, 1, 3).reshape(B, T, C)
    return y @ p[pre + "attn.c_proj.weight"] + p[pre + "attn.c_proj.bias"]


def mlp(x, p, pre):
    h = gelu_tanh(x @ p[pre + "mlp.c_fc.weight"] + p[pre + "mlp.c_fc.bias"])
    return h @ p[pre + "mlp.c_proj.weight"] + p[pre + "mlp.c_proj.bias"]


def forward(p, tokens, cfg, variant):
    T = tokens.shape[1]
    eps = cfg["ln_eps"]
    x = p["transformer.wte.weight"][tokens]
    if variant != "rotary":
        x = x + p["transformer.wpe.weight"][:T][None]
    for i in range(cfg["n_layer"]):
        pre = f"transformer.h.{i}."
        ln1 = lambda z: layer_norm(z, p[pre + "ln_1.weight"], p[pre + "ln_1.bias"], eps)  # noqa: E731
        ln2 = lambda z: layer_norm(z, p[pre + "ln_2.weight"], p[pre + "ln_2.bias"], eps)  # noqa: E731
        if variant in ("preln", "rotary"):
            x = x + attention(ln1(x), p, pre, cfg)
            x = x + mlp(ln2(x), p, pre)
        elif variant == "postln":
            x = ln1(x + attention(x, p, pre, cfg))
            x = ln2(x + mlp(x, p, pre))
        else:
            raise ValueError(variant)
    h = layer_norm(x, p["transformer.ln_f.weight"], p["transformer.ln_f.bias"], eps)
    return h @ p["transformer.wte.weight"].T


def loss_fn(p, tokens, targets, cfg, variant):
    logits = forward(p, tokens, cfg, variant)
    z = logits - jnp.max(logits, axis=-1, keepdims=True)
    logp = z - jnp.log(jnp.sum(jnp.exp(z), axis=-1, keepdims=True))
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.mean(nll)


# ---------------------------------------------------------------- training
def global_norm(g):
    return jnp.sqrt(sum(jnp.sum(v ** 2) for v in g.values()))


def train(params, tokens, targets, cfg, variant):
    vg = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, tokens, targets, cfg, variant)))
    lr, b1, b2, eps = cfg["lr"], cfg["beta1"], cfg["beta2"], cfg["adam_eps"]
    p = {k: jnp.asarray(v) for k, v in params.items()}
    m = {k: jnp.zeros_like(v) for k, v in p.items()}
    s = {k: jnp.zeros_like(v) for k, v in p.items()}
    losses, norms = [], []
    for t in range(1, cfg["steps"] + 1):
        loss, g = vg(p)
        norm = global_norm(g)
        losses.append(float(loss))
        norms.append(float(norm))
        scale = jnp.minimum(1.0, cfg["grad_clip"] / (norm + cfg["clip_eps"]))
        g = {k: v * scale for k, v in g.items()}
        for k in p:
            wd = weight_decay_of(k, cfg)
            pk = p[k] - lr * wd * p[k]
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            s[k] = b2 * s[k] + (1 - b2) * g[k] ** 2
            mhat = m[k] / (1 - b1 ** t)
            vhat = s[k] / (1 - b2 ** t)
            p[k] = pk - lr * mhat / (jnp.sqrt(vhat) + eps)
    return p, np.array(losses), np.array(norms)


# ---------------------------------------------------------------- checks
def self_check(params, tokens, targets, cfg, variant, rs):
    p = {k: jnp.asarray(v) for k, v in params.items()}
    f = lambda q: loss_fn(q, tokens, targets, cfg, variant)  # noqa: E731
    g = jax.grad(f)(p)
    # 1. central finite differences on a few entries of several params
    h = 1e-5
    worst = 0.0
    worst_abs = 0.0
    names = ["transformer.wte.weight"] + (["transformer.wpe.weight"] if variant != "rotary" else []) + [
             "transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.bias",
             "transformer.h.0.ln_1.weight", "transformer.h.1.ln_2.bias",
             "transformer.ln_f.weight", "transformer.h.1.attn.c_proj.weight"]
    for name in names:
        for _ in range(3):
            idx = tuple(rs.randint(0, n) for n in params[name].shape)
            if name == "transformer.wpe.weight":
                idx = (rs.randint(0, tokens.shape[1]),) + idx[1:]
            base = np.array(params[name])
            up, dn = base.copy(), base.copy()
            up[idx] += h
            dn[idx] -= h
            fu = float(f({**p, name: jnp.asarray(up)}))
            fd = float(f({**p, name: jnp.asarray(dn)}))
            fdv = (fu - fd) / (2 * h)
            an = float(g[name][idx])
            diff = abs(fdv - an)
            worst_abs = max(worst_abs, diff)
            # relative error, floored so near-zero entries are judged absolutely
            worst = max(worst, diff / max(1e-3, abs(fdv) + abs(an)))
    assert worst < 1e-6, f"finite-difference mismatch: rel err {worst}"
    if variant != "rotary":
        # unused wpe rows (>= T) must get zero gradient
        assert np.all(np.asarray(g["transformer.wpe.weight"])[tokens.shape[1]:] == 0.0)
    else:
        # rotary scores depend on relative positions only: q at m against k at n scores as
        # q at m + s against k at n + s
        rq = np.random.RandomState(5)
        qv, kv = rq.normal(size=(1, 1, 1, 8)), rq.normal(size=(1, 1, 1, 8))
        seq = lambda v, at, T: jnp.asarray(np.concatenate([np.zeros((1, 1, at, 8)), v, np.zeros((1, 1, T - at - 1, 8))], axis=2))  # noqa: E731
        def score(m, n, T=12):
            return float(jnp.sum(rope(seq(qv, m, T))[0, 0, m] * rope(seq(kv, n, T))[0, 0, n]))
        assert abs(score(7, 3) - score(4, 0)) < 1e-12 and abs(score(7, 3) - score(9, 5)) < 1e-12
        assert abs(score(7, 3) - score(7, 4)) > 1e-6, "rotary has no effect"
    # 2. causality: changing token at position j must not change logits at < j
    logits = np.asarray(forward(p, tokens, cfg, variant))
    T = tokens.shape[1]
    for j in [1, 4, T - 1]:
        tk = np.array(tokens)
        tk[:, j] = (tk[:, j] + 1) % cfg["vocab_size"]
        l2 = np.asarray(forward(p, jnp.asarray(tk), cfg, variant))
        assert np.max(np.abs(l2[:, :j] - logits[:, :j])) < 1e-12, "causal leak"
        assert np.max(np.abs(l2[:, j] - logits[:, j])) > 1e-6, "token has no effect"
    # 3. loss of an independent numpy cross-entropy on the logits
    z = logits - logits.max(-1, keepdims=True)
    lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    ce = -np.take_along_axis(lp, np.asarray(targets)[..., None], -1).mean()
    assert abs(ce - float(f(p))) < 1e-12
    return worst, worst_abs


# ---------------------------------------------------------------- main
def build(variant, seed, out_dir):
    cfg = dict(BASE_CONFIG)
    cfg.update(variant=variant, seed=seed)
    params, tokens, targets = init(cfg, seed)
    tok = jnp.asarray(tokens)
    tgt = jnp.asarray(targets)

    fd_rel, fd_abs = self_check(params, tok, tgt, cfg, variant, np.random.RandomState(0))

    p0 = {k: jnp.asarray(v) for k, v in params.items()}
    logits = np.asarray(forward(p0, tok, cfg, variant))
    loss, grads = jax.value_and_grad(lambda p: loss_fn(p, tok, tgt, cfg, variant))(p0)
    final, step_loss, step_norm = train(params, tok, tgt, cfg, variant)
    assert abs(step_loss[0] - float(loss)) < 1e-12

    names = [n for n, _, _ in param_table(cfg)]
    f32 = lambda a: np.ascontiguousarray(np.asarray(a, dtype=np.float64).astype(np.float32))  # noqa: E731
    tensors = {
        "tokens": tokens.astype(np.int32),
        "targets": targets.astype(np.int32),
        "logits": f32(logits),
        "loss": f32(np.array([float(loss)])),
        "step_loss": f32(step_loss),
        "step_grad_norm": f32(step_norm),
    }
    for n in names:
        tensors["param." + n] = f32(params[n])
        tensors["grad." + n] = f32(grads[n])
        tensors["final." + n] = f32(final[n])

    meta_cfg = dict(cfg)
    meta_cfg["weight_decay_params"] = [n for n in names if weight_decay_of(n, cfg) > 0]
    meta_cfg["generator"] = "tools/golden/gpt_jax.py (JAX float64, stored as float32)"
    meta_cfg["jax_version"] = jax.__version__
    meta_cfg["numpy_version"] = np.__version__
    path = os.path.join(out_dir, f"gpt_tiny_{variant}.safetensors")
    save_file(tensors, path, metadata={"config": json.dumps(meta_cfg, sort_keys=True)})
    os.chmod(path, 0o644)

    print(f"[{variant}] seed={seed} -> {path} ({os.path.getsize(path)} bytes)")
    print(f"  grad vs central FD (24 entries): max abs err {fd_abs:.2e}, "
          f"max rel err {fd_rel:.2e}; causal mask OK")
    print(f"  initial loss     : {float(loss):.10f}  (ln V = {math.log(cfg['vocab_size']):.6f})")
    print(f"  step_loss        : {', '.join(f'{x:.10f}' for x in step_loss)}")
    print(f"  step_grad_norm   : {', '.join(f'{x:.10f}' for x in step_norm)}")
    print(f"  final loss       : {float(loss_fn(final, tok, tgt, cfg, variant)):.10f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="engine/tests/fixtures")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for variant in args.variants.split(","):
        build(variant, VARIANTS[variant], args.out)


if __name__ == "__main__":
    sys.exit(main())
