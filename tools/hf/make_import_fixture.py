#!/usr/bin/env python3
"""Writes the fixtures of `smelt import hf` (cli/tests/cli_import.rs): tiny GPT-2 models as
Hugging Face transformers saves and publishes them, and the logits transformers computes
from them, so the test compares smelt's reading of these files with transformers' own.

    python3 tools/hf/make_import_fixture.py [--out cli/tests/fixtures/hf]

Needs torch and transformers (run with transformers 5.x, torch 2.15, CPU, float32).
Writes under --out:

- `saved/`: `GPT2LMHeadModel.save_pretrained` (config.json, model.safetensors: names with the
  `transformer.` prefix, float32, the tied `lm_head.weight` not stored).
- `hub/`: the same weights laid out as the `gpt2` repository on the Hub publishes them: names
  without the prefix and the causal-mask buffers `h.N.attn.bias` (1, 1, P, P) beside them.
- `bf16/`: the same model cast to bfloat16 and saved (`torch_dtype` bfloat16).
- `neox/`: `GPTNeoXForCausalLM.save_pretrained` of a model smelt's rotary GPT computes exactly:
  sequential residuals (`use_parallel_residual = False`), rotary over the whole head
  (`partial_rotary_factor = 1`, theta 10,000), tanh GELU, biases, LM head tied to the
  embeddings; 300 ids, 32 positions, 2 layers, 2 heads of 8 (seed 11, every tensor random).
  Its logits on `ids` are `logits_neox` in `expected.safetensors`.
- `gpt2_bytes_to_unicode.json`: transformers' `bytes_to_unicode` (byte -> the character standing
  for it in GPT-2's vocab.json), to which smelt's reading of vocab.json is held.
- `expected.safetensors`: `ids` (1, T) int64 and `logits_f32` (T, V) of the float32 model,
  `logits_bf16` (T, V) of the bfloat16 weights widened back to float32 (transformers
  computing in float32, as smelt imports bf16 weights to float32); for `smelt eval`,
  `eval_loss_w10` (1,): the float32 model's mean loss (`labels=` as in transformers) over the
  non-overlapping windows of 10 predictions of `eval_text.txt`'s UTF-8 bytes (ids < 256), every
  window weighted alike (5 windows of 11 bytes, each sharing its edge byte with the next; the tail left out);
  for generation with a key/value cache, `greedy_gpt2` and `greedy_neox` (32,) int64: the first 5
  `ids` and the 27 ids `generate(do_sample=False)` appends with the GPT-2 and the GPT-NeoX model,
  and `greedy_gpt2_logits` / `greedy_neox_logits` (27, V): the logits each of those ids was
  picked from (position 4 on); for `smelt eval --choices`, `choices_sum_loss` and
  `choices_mean_loss` (6, 4) float64: per example of `choices.jsonl` (HellaSwag's fields) and per
  ending, the summed and mean cross-entropy of the ending's bytes (`" " + ending`) after the
  context's, the row cut to its last 33 bytes; NaN past an example's endings.

The model: vocabulary 300 (not a multiple of 64, as GPT-2's 50,257), 32 positions, 2 layers,
2 heads, 16 wide, tanh GELU (`gelu_new`). Every tensor is drawn at random (seed 7), LayerNorm
weights and biases and all biases too, so a tensor read into the wrong place changes the logits.
"""

import argparse
import json
import os

import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="cli/tests/fixtures/hf")
    args = ap.parse_args()
    torch.manual_seed(7)
    cfg = GPT2Config(
        vocab_size=300, n_positions=32, n_embd=16, n_layer=2, n_head=2, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
    )
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    ids = torch.tensor([[5, 17, 299, 0, 42, 42, 128, 255, 7, 3, 1, 200, 64, 65, 31]], dtype=torch.long)

    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(os.path.join(args.out, "saved"), safe_serialization=True)
    with torch.no_grad():
        logits_f32 = model(ids).logits[0].float().contiguous()

    # The Hub's gpt2 layout: GPT2Model's own names and the attention mask buffers.
    hub = {}
    for name, t in model.transformer.state_dict().items():
        hub[name] = t.contiguous().clone()
    for i in range(cfg.n_layer):
        p = cfg.n_positions
        hub[f"h.{i}.attn.bias"] = torch.tril(torch.ones(p, p, dtype=torch.bool)).view(1, 1, p, p).float()
    hub_dir = os.path.join(args.out, "hub")
    os.makedirs(hub_dir, exist_ok=True)
    save_file(hub, os.path.join(hub_dir, "model.safetensors"), metadata={"format": "pt"})
    cfg_hub = cfg.to_dict()
    cfg_hub["architectures"] = ["GPT2LMHeadModel"]
    with open(os.path.join(hub_dir, "config.json"), "w") as f:
        json.dump(cfg_hub, f, indent=2)

    bf16 = GPT2LMHeadModel(cfg).eval()
    bf16.load_state_dict(model.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    bf16.save_pretrained(os.path.join(args.out, "bf16"), safe_serialization=True)
    with torch.no_grad():
        logits_bf16 = bf16.float()(ids).logits[0].float().contiguous()

    text = "Smelt pours: the quick brown fox jumps over the lazy dog!?"
    with open(os.path.join(args.out, "eval_text.txt"), "w") as f:
        f.write(text)
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    t = 10
    windows = (len(data) - 1) // t
    assert windows == 5, windows
    with torch.no_grad():
        losses = [model(data[i * t : i * t + t + 1].unsqueeze(0), labels=data[i * t : i * t + t + 1].unsqueeze(0)).loss for i in range(windows)]
    eval_loss = torch.stack(losses).mean().reshape(1).float()
    torch.manual_seed(11)
    neox_cfg = GPTNeoXConfig(
        vocab_size=300, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, use_parallel_residual=False, hidden_act="gelu_new", layer_norm_eps=1e-5,
        tie_word_embeddings=True, attention_bias=True, bos_token_id=None, eos_token_id=None,
        rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 1.0, "rope_type": "default"},
    )
    neox = GPTNeoXForCausalLM(neox_cfg).eval()
    with torch.no_grad():
        for name, p in neox.named_parameters():
            if "layernorm.weight" in name or "final_layer_norm.weight" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
        logits_neox = neox(ids).logits[0].float().contiguous()
    neox.save_pretrained(os.path.join(args.out, "neox"), safe_serialization=True)

    # Greedy generation (transformers' own key/value cache) from the first 5 ids up to the
    # models' 32 positions, over the whole vocabulary: what smelt's cached decoder must pick.
    prompt = ids[:, :5]
    greedy = {}
    with torch.no_grad():
        for name, m in (("gpt2", model), ("neox", neox)):
            out = m.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=27, do_sample=False, pad_token_id=0,
                return_dict_in_generate=True, output_logits=True,
            )
            greedy[f"greedy_{name}"] = out.sequences[0].contiguous()
            greedy[f"greedy_{name}_logits"] = torch.cat(out.logits).float().contiguous()

    # Multiple choice (`smelt eval --choices`): each ending's loss given the context, UTF-8
    # bytes as ids, the row ctx + " " + ending cut to its last 33 tokens (32 inputs).
    examples = [
        {"ctx": "The cat sat on", "endings": ["the mat.", "a hat that was red.", "it", "xyz"], "label": 2},
        {"ctx": "She opened the door and", "endings": ["walked in.", "sang.", "the door opened her back again", "left"], "label": "0"},
        {"ctx": "A very long context that goes on and on past the positions of the model, so", "endings": ["it is cut.", "no", "the start is dropped.", "ok"], "label": 1},
        {"ctx": "Rain", "endings": ["fell.", "rose up", "is wet", "dried"], "label": 0},
        {"ctx": "1 2 3", "endings": ["4 5", "four", "9", "3 2 1"], "label": 3},
        {"ctx": "He said", "endings": ["hello", "goodbye to all", "nothing"], "label": 1},
    ]
    with open(os.path.join(args.out, "choices.jsonl"), "w") as f:
        for i, ex in enumerate(examples):
            f.write(json.dumps(ex) + "\n")
            if i == 2:
                f.write("\n")  # a blank line, skipped
    sums, means = [], []
    with torch.no_grad():
        for ex in examples:
            ctx = list(ex["ctx"].encode("utf-8"))
            s_row, m_row = [], []
            for ending in ex["endings"]:
                end = list((" " + ending).encode("utf-8"))
                row = (ctx + end)[-(cfg.n_positions + 1):]
                x, y = torch.tensor([row[:-1]]), torch.tensor(row[1:])
                losses = torch.nn.functional.cross_entropy(model(x).logits[0], y, reduction="none")[-len(end):]
                s_row.append(losses.sum().item())
                m_row.append(losses.mean().item())
            sums.append(s_row + [float("nan")] * (4 - len(s_row)))
            means.append(m_row + [float("nan")] * (4 - len(m_row)))
    choices = {"choices_sum_loss": torch.tensor(sums, dtype=torch.float64), "choices_mean_loss": torch.tensor(means, dtype=torch.float64)}

    save_file(
        {"ids": ids.contiguous(), "logits_f32": logits_f32, "logits_bf16": logits_bf16, "eval_loss_w10": eval_loss, "logits_neox": logits_neox, **greedy, **choices},
        os.path.join(args.out, "expected.safetensors"),
        metadata={"made_by": f"transformers GPT2LMHeadModel, torch {torch.__version__}"},
    )
    with open(os.path.join(args.out, "gpt2_bytes_to_unicode.json"), "w") as f:
        json.dump({str(b): c for b, c in sorted(bytes_to_unicode().items())}, f, ensure_ascii=False)
    for d in ("saved", "hub", "bf16", "neox"):
        print(d, sorted(os.listdir(os.path.join(args.out, d))))


if __name__ == "__main__":
    main()
