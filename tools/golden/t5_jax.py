#!/usr/bin/env python3
"""Golden values for smelt's T5-style encoder-decoder: an independent JAX float64 implementation.

Writes engine/tests/fixtures/t5_tiny_<variant>.safetensors: parameters, a padded batch, the
decoder logits, the loss and the gradient of the loss for every parameter. See
tools/golden/README.md for the definitions. Run from the repository root:

    python3 tools/golden/t5_jax.py --out engine/tests/fixtures
"""
import argparse
import json
import os
import sys

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

# the layer math is BERT's (same definitions), imported from its golden script
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bert_jax import ce_rows, gelu_tanh, layer_norm, linear, scores_of, sinusoidal, token_scale  # noqa: E402

BASE = dict(vocab_size=31, max_positions=12, n_layer=2, n_decoder_layer=2, n_head=3, n_embd=12,
            n_inner=20, batch=3, enc_len=8, dec_len=6, ln_eps=1e-5, scaled_head=True)

VARIANTS = {
    "pre_dot": dict(seed=11, ln="pre", positions="sinusoidal", scores="dot", additive_width=0),
    "post_general": dict(seed=22, ln="post", positions="learned", scores="general", additive_width=0),
    "pre_additive": dict(seed=33, ln="pre", positions="learned", scores="additive", additive_width=4),
}


def score_params(p, cfg):
    H, D = cfg["n_head"], cfg["n_embd"] // cfg["n_head"]
    if cfg["scores"] == "general":
        return [(p + ".score.weight", (H, D, D), "general")]
    if cfg["scores"] == "additive":
        A = cfg["additive_width"]
        return [(p + ".score.wq", (H, D, A), "add"), (p + ".score.wk", (H, D, A), "add"), (p + ".score.v", (H, A), "add")]
    return []


def param_table(cfg):
    V, P, C, F = cfg["vocab_size"], cfg["max_positions"], cfg["n_embd"], cfg["n_inner"]
    lin = lambda n, o, i: [(n + ".weight", (o, i), "mat"), (n + ".bias", (o,), "bias")]  # noqa: E731
    ln = lambda n: [(n + ".weight", (C,), "ln_w"), (n + ".bias", (C,), "ln_b")]  # noqa: E731
    t = [("shared.weight", (V, C), "emb")]
    if cfg["positions"] == "learned":
        t += [("encoder.embed_positions.weight", (P, C), "emb"), ("decoder.embed_positions.weight", (P, C), "emb")]

    def attn(a):
        return lin(a + ".q", C, C) + lin(a + ".k", C, C) + lin(a + ".v", C, C) + score_params(a, cfg) + lin(a + ".o", C, C)

    def ffn(f):
        return lin(f + ".wi", F, C) + lin(f + ".wo", C, F)

    for i in range(cfg["n_layer"]):
        p = f"encoder.block.{i}.layer"
        t += attn(p + ".0.SelfAttention") + ln(p + ".0.layer_norm") + ffn(p + ".1.DenseReluDense") + ln(p + ".1.layer_norm")
    t += ln("encoder.final_layer_norm")
    for i in range(cfg["n_decoder_layer"]):
        p = f"decoder.block.{i}.layer"
        t += attn(p + ".0.SelfAttention") + ln(p + ".0.layer_norm")
        t += attn(p + ".1.EncDecAttention") + ln(p + ".1.layer_norm")
        t += ffn(p + ".2.DenseReluDense") + ln(p + ".2.layer_norm")
    t += ln("decoder.final_layer_norm")
    return t


def init(cfg):
    rs = np.random.RandomState(cfg["seed"])
    params = {}
    for name, shape, kind in param_table(cfg):
        a = {"emb": lambda: rs.normal(0.0, 0.5, size=shape),
             "mat": lambda: rs.normal(0.0, 0.3, size=shape),
             "bias": lambda: rs.normal(0.0, 0.1, size=shape),
             "ln_w": lambda: 1.0 + rs.normal(0.0, 0.1, size=shape),
             "ln_b": lambda: rs.normal(0.0, 0.1, size=shape),
             "general": lambda: np.broadcast_to(np.eye(shape[1]), shape) + rs.normal(0.0, 0.3, size=shape),
             "add": lambda: rs.normal(0.0, 0.6, size=shape)}[kind]()
        params[name] = np.asarray(a, dtype=np.float32).astype(np.float64)
    B, Te, Td, V = cfg["batch"], cfg["enc_len"], cfg["dec_len"], cfg["vocab_size"]
    enc_lens = np.array([Te, 5, 3])[:B]
    dec_lens = np.array([Td, 4, 5])[:B]
    enc_tokens = rs.randint(0, V, size=(B, Te))
    dec_tokens = rs.randint(0, V, size=(B, Td))
    targets = rs.randint(0, V, size=(B, Td))
    for b in range(B):
        targets[b, dec_lens[b]:] = -1
    return params, dict(enc_tokens=enc_tokens, enc_lens=enc_lens, dec_tokens=dec_tokens, targets=targets)


def attention(xq, xkv, p, a, cfg, mask):
    """xq (B,Tq,C) queries, xkv (B,Tk,C) keys/values; mask (B,Tq,Tk) visible."""
    B, Tq, C = xq.shape
    Tk = xkv.shape[1]
    H = cfg["n_head"]
    D = C // H
    split = lambda z, T: z.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # noqa: E731
    q = split(linear(p, a + ".q", xq), Tq)
    k = split(linear(p, a + ".k", xkv), Tk)
    v = split(linear(p, a + ".v", xkv), Tk)
    s = scores_of(q, k, p, a + ".", cfg)
    s = jnp.where(mask[:, None], s, -jnp.inf)
    y = jnp.einsum("bhij,bhjd->bhid", jax.nn.softmax(s, axis=-1), v).transpose(0, 2, 1, 3).reshape(B, Tq, C)
    return linear(p, a + ".o", y)


def sublayer(x, f, p, ln_name, cfg):
    ln = lambda z: layer_norm(z, p[ln_name + ".weight"], p[ln_name + ".bias"], cfg["ln_eps"])  # noqa: E731
    return x + f(ln(x)) if cfg["ln"] == "pre" else ln(x + f(x))


def forward(p, batch, cfg):
    enc_tok, dec_tok, enc_lens = batch["enc_tokens"], batch["dec_tokens"], batch["enc_lens"]
    B, Te = enc_tok.shape
    Td = dec_tok.shape[1]
    eps = cfg["ln_eps"]
    if cfg["positions"] == "learned":
        pe, pd = p["encoder.embed_positions.weight"][:Te], p["decoder.embed_positions.weight"][:Td]
    else:
        s = sinusoidal(cfg["max_positions"], cfg["n_embd"])
        pe, pd = s[:Te], s[:Td]
    key_ok = jnp.arange(Te)[None, :] < enc_lens[:, None]  # (B, Te)
    enc_mask = jnp.broadcast_to(key_ok[:, None, :], (B, Te, Te))
    emb = lambda tok: token_scale(p["shared.weight"][tok], cfg)  # input lookups only, not the head  # noqa: E731
    x = emb(enc_tok) + pe[None]
    for i in range(cfg["n_layer"]):
        pre = f"encoder.block.{i}.layer"
        x = sublayer(x, lambda z: attention(z, z, p, pre + ".0.SelfAttention", cfg, enc_mask), p, pre + ".0.layer_norm", cfg)
        x = sublayer(x, lambda z: linear(p, pre + ".1.DenseReluDense.wo", gelu_tanh(linear(p, pre + ".1.DenseReluDense.wi", z))), p, pre + ".1.layer_norm", cfg)
    enc = layer_norm(x, p["encoder.final_layer_norm.weight"], p["encoder.final_layer_norm.bias"], eps)
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((Td, Td), dtype=bool))[None], (B, Td, Td))
    cross_mask = jnp.broadcast_to(key_ok[:, None, :], (B, Td, Te))
    y = emb(dec_tok) + pd[None]
    for i in range(cfg["n_decoder_layer"]):
        pre = f"decoder.block.{i}.layer"
        y = sublayer(y, lambda z: attention(z, z, p, pre + ".0.SelfAttention", cfg, causal), p, pre + ".0.layer_norm", cfg)
        y = sublayer(y, lambda z: attention(z, enc, p, pre + ".1.EncDecAttention", cfg, cross_mask), p, pre + ".1.layer_norm", cfg)
        y = sublayer(y, lambda z: linear(p, pre + ".2.DenseReluDense.wo", gelu_tanh(linear(p, pre + ".2.DenseReluDense.wi", z))), p, pre + ".2.layer_norm", cfg)
    y = layer_norm(y, p["decoder.final_layer_norm.weight"], p["decoder.final_layer_norm.bias"], eps)
    # the tied head reads the decoder output times d_model^-0.5 (Mesh TensorFlow's T5;
    # transformers' T5ForConditionalGeneration with tie_word_embeddings)
    if cfg["scaled_head"]:
        y = y * cfg["n_embd"] ** -0.5
    return y @ p["shared.weight"].T, enc


def loss_fn(p, batch, cfg):
    logits, _ = forward(p, batch, cfg)
    y = batch["targets"]
    m = y >= 0
    nll = ce_rows(logits, jnp.where(m, y, 0))
    return jnp.sum(jnp.where(m, nll, 0.0)) / jnp.sum(m)


def self_check(params, batch, cfg, rs):
    p = {k: jnp.asarray(v) for k, v in params.items()}
    f = lambda q: loss_fn(q, batch, cfg)  # noqa: E731
    g = jax.grad(f)(p)
    worst, h = 0.0, 1e-6
    names = [n for n, _, _ in param_table(cfg)]
    for name in names[:: max(1, len(names) // 15)]:
        idx = tuple(rs.randint(0, n) for n in params[name].shape)
        up, dn = np.array(params[name]), np.array(params[name])
        up[idx] += h
        dn[idx] -= h
        fd = (float(f({**p, name: jnp.asarray(up)})) - float(f({**p, name: jnp.asarray(dn)}))) / (2 * h)
        an = float(g[name][idx])
        worst = max(worst, abs(fd - an) / max(1e-3, abs(fd) + abs(an)))
    assert worst < 1e-5, f"finite-difference mismatch: rel err {worst}"
    # causality: changing decoder input j leaves logits before j as they are
    l0 = np.asarray(forward(p, batch, cfg)[0])
    tok = np.array(batch["dec_tokens"])
    tok[:, 3] = (tok[:, 3] + 1) % cfg["vocab_size"]
    l1 = np.asarray(forward(p, {**batch, "dec_tokens": jnp.asarray(tok)}, cfg)[0])
    assert np.max(np.abs(l1[:, :3] - l0[:, :3])) < 1e-12 and np.max(np.abs(l1[:, 3] - l0[:, 3])) > 1e-9, "causal mask"
    # encoder padding is invisible to the decoder
    tok = np.array(batch["enc_tokens"])
    for b, n in enumerate(np.asarray(batch["enc_lens"])):
        tok[b, n:] = (tok[b, n:] + 3) % cfg["vocab_size"]
    l2 = np.asarray(forward(p, {**batch, "enc_tokens": jnp.asarray(tok)}, cfg)[0])
    assert np.max(np.abs(l2 - l0)) < 1e-12, "encoder padding leaked"
    return worst


def build(name, out_dir):
    cfg = dict(BASE)
    cfg.update(VARIANTS[name])
    params, raw = init(cfg)
    batch = {k: jnp.asarray(v) for k, v in raw.items()}
    fd = self_check(params, batch, cfg, np.random.RandomState(0))
    p = {k: jnp.asarray(v) for k, v in params.items()}
    logits, enc = forward(p, batch, cfg)
    loss, grads = jax.value_and_grad(lambda q: loss_fn(q, batch, cfg))(p)
    f32 = lambda a: np.ascontiguousarray(np.asarray(a, dtype=np.float64).astype(np.float32))  # noqa: E731
    tensors = {k: np.ascontiguousarray(np.asarray(v).astype(np.int32)) for k, v in raw.items()}
    tensors.update(loss=f32([float(loss)]), logits=f32(logits), encoder_output=f32(enc))
    for n, _, _ in param_table(cfg):
        tensors["param." + n] = f32(params[n])
        tensors["grad." + n] = f32(grads[n])
    meta = dict(cfg, generator="tools/golden/t5_jax.py (JAX float64, stored as float32)",
                jax_version=jax.__version__, numpy_version=np.__version__)
    path = os.path.join(out_dir, f"t5_tiny_{name}.safetensors")
    save_file(tensors, path, metadata={"config": json.dumps(meta, sort_keys=True)})
    os.chmod(path, 0o644)
    print(f"[{name}] -> {path}: loss {float(loss):.8f}; FD rel err {fd:.1e}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="engine/tests/fixtures")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for name in VARIANTS:
        build(name, args.out)


if __name__ == "__main__":
    sys.exit(main())
