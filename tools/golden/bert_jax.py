#!/usr/bin/env python3
"""Golden values for smelt's BERT: an independent JAX float64 implementation from the math.

Writes engine/tests/fixtures/bert_tiny_<variant>.safetensors: parameters, a padded batch,
logits of every head, each objective's loss and the gradient of the summed loss for every
parameter. See tools/golden/README.md for the definitions. Run from the repository root:

    python3 tools/golden/bert_jax.py --out engine/tests/fixtures
"""
import argparse
import json
import math
import os
import sys

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

BASE = dict(vocab_size=29, max_positions=12, n_layer=2, n_head=3, n_embd=12, n_inner=20,
            type_vocab_size=2, batch=4, seq_len=9, ln_eps=1e-5, temperature=0.5)

VARIANTS = {
    # BERT as published: post-LN, learned positions, dot scores; MLM + NSP + classification
    "post_dot": dict(seed=101, ln="post", positions="learned", scores="dot", additive_width=0,
                     nsp=True, num_labels=3, objectives=["mlm", "nsp", "cls"], pooling="mean"),
    # pre-LN, sinusoidal positions, additive scores; MLM + contrastive pairs (mean pooling)
    "pre_additive": dict(seed=202, ln="pre", positions="sinusoidal", scores="additive",
                         additive_width=5, nsp=False, num_labels=0,
                         objectives=["mlm", "contrastive"], pooling="mean"),
    # post-LN, learned positions, general scores; contrastive over [CLS] + classification
    "post_general": dict(seed=303, ln="post", positions="learned", scores="general",
                         additive_width=0, nsp=False, num_labels=2,
                         objectives=["cls", "contrastive"], pooling="cls"),
}


def param_table(cfg):
    V, P, C, F, H = cfg["vocab_size"], cfg["max_positions"], cfg["n_embd"], cfg["n_inner"], cfg["n_head"]
    D = C // H
    t = [("bert.embeddings.word_embeddings.weight", (V, C), "emb")]
    if cfg["positions"] == "learned":
        t.append(("bert.embeddings.position_embeddings.weight", (P, C), "emb"))
    t.append(("bert.embeddings.token_type_embeddings.weight", (cfg["type_vocab_size"], C), "emb"))
    t += [("bert.embeddings.LayerNorm.weight", (C,), "ln_w"), ("bert.embeddings.LayerNorm.bias", (C,), "ln_b")]
    for i in range(cfg["n_layer"]):
        p = f"bert.encoder.layer.{i}."
        for n in ["query", "key", "value"]:
            t.append((p + f"attention.self.{n}.weight", (C, C), "mat"))
            t.append((p + f"attention.self.{n}.bias", (C,), "bias"))
        if cfg["scores"] == "general":
            t.append((p + "attention.self.score.weight", (H, D, D), "general"))
        if cfg["scores"] == "additive":
            A = cfg["additive_width"]
            t += [(p + "attention.self.score.wq", (H, D, A), "add"),
                  (p + "attention.self.score.wk", (H, D, A), "add"),
                  (p + "attention.self.score.v", (H, A), "add")]
        t += [(p + "attention.output.dense.weight", (C, C), "mat"), (p + "attention.output.dense.bias", (C,), "bias"),
              (p + "attention.output.LayerNorm.weight", (C,), "ln_w"), (p + "attention.output.LayerNorm.bias", (C,), "ln_b"),
              (p + "intermediate.dense.weight", (F, C), "mat"), (p + "intermediate.dense.bias", (F,), "bias"),
              (p + "output.dense.weight", (C, F), "mat"), (p + "output.dense.bias", (C,), "bias"),
              (p + "output.LayerNorm.weight", (C,), "ln_w"), (p + "output.LayerNorm.bias", (C,), "ln_b")]
    if cfg["ln"] == "pre":
        t += [("bert.encoder.final_layer_norm.weight", (C,), "ln_w"), ("bert.encoder.final_layer_norm.bias", (C,), "ln_b")]
    if cfg["nsp"] or cfg["num_labels"] > 0:
        t += [("bert.pooler.dense.weight", (C, C), "mat"), ("bert.pooler.dense.bias", (C,), "bias")]
    t += [("cls.predictions.transform.dense.weight", (C, C), "mat"), ("cls.predictions.transform.dense.bias", (C,), "bias"),
          ("cls.predictions.transform.LayerNorm.weight", (C,), "ln_w"), ("cls.predictions.transform.LayerNorm.bias", (C,), "ln_b"),
          ("cls.predictions.bias", (V,), "bias")]
    if cfg["nsp"]:
        t += [("cls.seq_relationship.weight", (2, C), "mat"), ("cls.seq_relationship.bias", (2,), "bias")]
    if cfg["num_labels"] > 0:
        L = cfg["num_labels"]
        t += [("classifier.weight", (L, C), "mat"), ("classifier.bias", (L,), "bias")]
    return t


def init(cfg):
    rs = np.random.RandomState(cfg["seed"])
    params = {}
    for name, shape, kind in param_table(cfg):
        if kind == "emb":
            a = rs.normal(0.0, 0.5, size=shape)
        elif kind == "mat":
            a = rs.normal(0.0, 0.3, size=shape)
        elif kind == "bias":
            a = rs.normal(0.0, 0.1, size=shape)
        elif kind == "ln_w":
            a = 1.0 + rs.normal(0.0, 0.1, size=shape)
        elif kind == "ln_b":
            a = rs.normal(0.0, 0.1, size=shape)
        elif kind == "general":
            a = np.broadcast_to(np.eye(shape[1]), shape) + rs.normal(0.0, 0.3, size=shape)
        elif kind == "add":
            a = rs.normal(0.0, 0.6, size=shape)
        else:
            raise ValueError(kind)
        # rounded to float32 first: the stored params are exactly the float64 inputs
        params[name] = np.asarray(a, dtype=np.float32).astype(np.float64)
    B, T, V = cfg["batch"], cfg["seq_len"], cfg["vocab_size"]
    tokens = rs.randint(0, V, size=(B, T))
    segments = (np.arange(T)[None, :] >= rs.randint(2, T - 2, size=(B, 1))).astype(np.int64)
    lens = np.array([T, T - 3, T - 1, 4])[:B]
    mlm = np.where(rs.uniform(size=(B, T)) < 0.4, rs.randint(0, V, size=(B, T)), -1)
    mlm[:, 1] = rs.randint(0, V, size=B)  # at least one target per row
    for b in range(B):  # no targets on padding
        mlm[b, lens[b]:] = -1
    nsp = rs.randint(0, 2, size=B)
    labels = rs.randint(0, max(cfg["num_labels"], 1), size=B)
    return params, dict(tokens=tokens, segments=segments, lens=lens, mlm_targets=mlm, nsp_labels=nsp, labels=labels)


def layer_norm(x, w, b, eps):
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean((x - mu) ** 2, axis=-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + eps) * w + b


def gelu_tanh(x):
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def linear(p, name, x):
    return x @ p[name + ".weight"].T + p[name + ".bias"]


def sinusoidal(P, C):
    pos = np.arange(P)[:, None].astype(np.float64)
    i = np.arange(C // 2)[None, :].astype(np.float64)
    ang = pos / 10000.0 ** (2 * i / C)
    t = np.zeros((P, C))
    t[:, 0::2] = np.sin(ang)
    t[:, 1::2] = np.cos(ang)
    return jnp.asarray(t)


def token_scale(e, cfg):
    """Token lookups beside sinusoidal positions are multiplied by sqrt(C) (Vaswani et al. 3.4,
    fairseq's embed_scale); beside learned positions they are used as they are."""
    return e * math.sqrt(cfg["n_embd"]) if cfg["positions"] == "sinusoidal" else e


def scores_of(q, k, p, pre, cfg):
    """q (B,H,Tq,D), k (B,H,Tk,D) -> (B,H,Tq,Tk)"""
    D = q.shape[-1]
    if cfg["scores"] == "dot":
        return jnp.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(D)
    if cfg["scores"] == "general":
        w = p[pre + "score.weight"]  # (H, D, D)
        return jnp.einsum("bhid,hde,bhje->bhij", q, w, k) / math.sqrt(D)
    qa = jnp.einsum("bhid,hda->bhia", q, p[pre + "score.wq"])
    ka = jnp.einsum("bhjd,hda->bhja", k, p[pre + "score.wk"])
    t = jnp.tanh(qa[:, :, :, None, :] + ka[:, :, None, :, :])  # (B,H,Tq,Tk,A)
    return jnp.einsum("bhija,ha->bhij", t, p[pre + "score.v"])


def self_attention(x, p, pre, cfg, key_mask):
    B, T, C = x.shape
    H = cfg["n_head"]
    D = C // H
    split = lambda z: z.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # noqa: E731
    q, k, v = (split(linear(p, pre + n, x)) for n in ["query", "key", "value"])
    s = scores_of(q, k, p, pre, cfg)
    s = jnp.where(key_mask[:, None, None, :], s, -jnp.inf)
    a = jax.nn.softmax(s, axis=-1)
    y = jnp.einsum("bhij,bhjd->bhid", a, v).transpose(0, 2, 1, 3).reshape(B, T, C)
    return y


def encoder(p, batch, cfg):
    tok, seg, lens = batch["tokens"], batch["segments"], batch["lens"]
    B, T = tok.shape
    eps = cfg["ln_eps"]
    if cfg["positions"] == "learned":
        pos = p["bert.embeddings.position_embeddings.weight"][:T]
    else:
        pos = sinusoidal(cfg["max_positions"], cfg["n_embd"])[:T]
    x = token_scale(p["bert.embeddings.word_embeddings.weight"][tok], cfg) + pos[None] + p["bert.embeddings.token_type_embeddings.weight"][seg]
    x = layer_norm(x, p["bert.embeddings.LayerNorm.weight"], p["bert.embeddings.LayerNorm.bias"], eps)
    key_mask = jnp.arange(T)[None, :] < lens[:, None]
    for i in range(cfg["n_layer"]):
        pre = f"bert.encoder.layer.{i}."
        ln_a = lambda z: layer_norm(z, p[pre + "attention.output.LayerNorm.weight"], p[pre + "attention.output.LayerNorm.bias"], eps)  # noqa: E731
        ln_o = lambda z: layer_norm(z, p[pre + "output.LayerNorm.weight"], p[pre + "output.LayerNorm.bias"], eps)  # noqa: E731
        attn = lambda z: linear(p, pre + "attention.output.dense", self_attention(z, p, pre + "attention.self.", cfg, key_mask))  # noqa: E731
        ffn = lambda z: linear(p, pre + "output.dense", gelu_tanh(linear(p, pre + "intermediate.dense", z)))  # noqa: E731
        if cfg["ln"] == "pre":
            x = x + attn(ln_a(x))
            x = x + ffn(ln_o(x))
        else:
            x = ln_a(x + attn(x))
            x = ln_o(x + ffn(x))
    if cfg["ln"] == "pre":
        x = layer_norm(x, p["bert.encoder.final_layer_norm.weight"], p["bert.encoder.final_layer_norm.bias"], eps)
    return x


def ce_rows(logits, y):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]


def info_nce(za, zb, tau):
    ua = za / jnp.linalg.norm(za, axis=-1, keepdims=True)
    ub = zb / jnp.linalg.norm(zb, axis=-1, keepdims=True)
    s = ua @ ub.T / tau
    idx = jnp.arange(s.shape[0])
    return 0.5 * (jnp.mean(ce_rows(s, idx)) + jnp.mean(ce_rows(s.T, idx)))


def heads(p, batch, cfg):
    """Every head's logits and each objective's loss."""
    h = encoder(p, batch, cfg)
    B, T, C = h.shape
    eps = cfg["ln_eps"]
    out = {}
    t = layer_norm(gelu_tanh(linear(p, "cls.predictions.transform.dense", h)),
                   p["cls.predictions.transform.LayerNorm.weight"], p["cls.predictions.transform.LayerNorm.bias"], eps)
    out["mlm_logits"] = t @ p["bert.embeddings.word_embeddings.weight"].T + p["cls.predictions.bias"]
    if "bert.pooler.dense.weight" in p:
        pooled = jnp.tanh(linear(p, "bert.pooler.dense", h[:, 0]))
        if cfg["nsp"]:
            out["nsp_logits"] = linear(p, "cls.seq_relationship", pooled)
        if cfg["num_labels"] > 0:
            out["class_logits"] = linear(p, "classifier", pooled)
    losses = {}
    objs = cfg["objectives"]
    if "mlm" in objs:
        y = batch["mlm_targets"]
        m = y >= 0
        nll = ce_rows(out["mlm_logits"], jnp.where(m, y, 0))
        losses["mlm"] = jnp.sum(jnp.where(m, nll, 0.0)) / jnp.sum(m)
    if "nsp" in objs:
        losses["nsp"] = jnp.mean(ce_rows(out["nsp_logits"], batch["nsp_labels"]))
    if "cls" in objs:
        losses["cls"] = jnp.mean(ce_rows(out["class_logits"], batch["labels"]))
    if "contrastive" in objs:
        if cfg["pooling"] == "cls":
            z = h[:, 0]
        else:
            m = (jnp.arange(T)[None, :] < batch["lens"][:, None]).astype(h.dtype)
            z = jnp.sum(h * m[..., None], axis=1) / jnp.sum(m, axis=1, keepdims=True)
        out["embeddings"] = z
        half = B // 2
        losses["contrastive"] = info_nce(z[:half], z[half:], cfg["temperature"])
    return out, losses


def total_loss(p, batch, cfg):
    return sum(heads(p, batch, cfg)[1].values())


def self_check(params, batch, cfg, rs):
    p = {k: jnp.asarray(v) for k, v in params.items()}
    f = lambda q: total_loss(q, batch, cfg)  # noqa: E731
    g = jax.grad(f)(p)
    worst, h = 0.0, 1e-6
    names = [n for n, _, _ in param_table(cfg)]
    for name in names[:: max(1, len(names) // 12)]:
        idx = tuple(rs.randint(0, n) for n in params[name].shape)
        up, dn = np.array(params[name]), np.array(params[name])
        up[idx] += h
        dn[idx] -= h
        fd = (float(f({**p, name: jnp.asarray(up)})) - float(f({**p, name: jnp.asarray(dn)}))) / (2 * h)
        an = float(g[name][idx])
        worst = max(worst, abs(fd - an) / max(1e-3, abs(fd) + abs(an)))
    assert worst < 1e-5, f"finite-difference mismatch: rel err {worst}"
    # padding is invisible: changing padded tokens leaves every real position's hidden state as is
    h0 = np.asarray(encoder(p, batch, cfg))
    tok = np.array(batch["tokens"])
    for b, n in enumerate(np.asarray(batch["lens"])):
        tok[b, n:] = (tok[b, n:] + 5) % cfg["vocab_size"]
    h1 = np.asarray(encoder(p, {**batch, "tokens": jnp.asarray(tok)}, cfg))
    for b, n in enumerate(np.asarray(batch["lens"])):
        assert np.max(np.abs(h1[b, :n] - h0[b, :n])) < 1e-12, "padding leaked into real positions"
    return worst


def build(name, out_dir):
    cfg = dict(BASE)
    cfg.update(VARIANTS[name])
    params, raw = init(cfg)
    batch = {k: jnp.asarray(v) for k, v in raw.items()}
    fd = self_check(params, batch, cfg, np.random.RandomState(0))
    p = {k: jnp.asarray(v) for k, v in params.items()}
    out, losses = heads(p, batch, cfg)
    loss, grads = jax.value_and_grad(lambda q: total_loss(q, batch, cfg))(p)
    f32 = lambda a: np.ascontiguousarray(np.asarray(a, dtype=np.float64).astype(np.float32))  # noqa: E731
    tensors = {k: np.ascontiguousarray(np.asarray(v).astype(np.int32)) for k, v in raw.items()}
    tensors["loss"] = f32([float(loss)])
    for k, v in losses.items():
        tensors["loss." + k] = f32([float(v)])
    for k, v in out.items():
        tensors[k] = f32(v)
    for n, _, _ in param_table(cfg):
        tensors["param." + n] = f32(params[n])
        tensors["grad." + n] = f32(grads[n])
    meta = dict(cfg, generator="tools/golden/bert_jax.py (JAX float64, stored as float32)",
                jax_version=jax.__version__, numpy_version=np.__version__)
    path = os.path.join(out_dir, f"bert_tiny_{name}.safetensors")
    save_file(tensors, path, metadata={"config": json.dumps(meta, sort_keys=True)})
    os.chmod(path, 0o644)
    print(f"[{name}] -> {path}: loss {float(loss):.8f} "
          f"({', '.join(f'{k} {float(v):.6f}' for k, v in losses.items())}); FD rel err {fd:.1e}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="engine/tests/fixtures")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for name in VARIANTS:
        build(name, args.out)


if __name__ == "__main__":
    sys.exit(main())
