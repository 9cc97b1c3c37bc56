#!/usr/bin/env python3
"""The peer's kernel times: PyTorch's GPT-2 step (device/torch_gpt2.py's model, bf16 autocast,
flash SDPA, fused AdamW, torch.compile) under torch.profiler, one row per kernel name, in ms
per step, grouped the way bench/device/kernel_table.py groups smelt's Nsight table, so the two
tables can be read side by side (where the peer's step is faster than ours, kernel by kernel).

Run beside torch_gpt2.py (it imports its model). CUPTI reads the kernels' own durations: no
per-op synchronisation, so the sum is comparable with smelt's Nsight sum of the same step.

usage: peer_kernels.py [--B 16] [--T 1024] [--warmup 8] [--steps 3] [--no-compile]
       [--device cuda|cpu] (cpu: a dry run of the script itself on a small model)
"""
import argparse
import os
import re
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_gpt2 import GPT  # noqa: E402  (the anchor's own model)

# Kernel families, first match wins: the names cuBLAS, FlashAttention, Inductor and the fused
# optimizer give their kernels (the same families as kernel_table.py's smelt rows).
FAMILIES = [
    ("attention backward", r"flash_bwd|fmha.*bwd|attention.*backward|efficient.*backward"),
    ("attention forward", r"flash_fwd|fmha|attention|efficient"),
    ("gemm (cuBLAS/cuBLASLt)", r"nvjet|gemm|cutlass|xmma|sm90_|sm80_|ampere_|hopper_"),
    ("triton (Inductor's fusions: layer norm, gelu, cross-entropy, adds)", r"^triton_"),
    ("optimizer (fused AdamW)", r"adam"),
    ("norm of the gradients (clip)", r"lpnorm|norm_|foreach"),
    ("layer norm (eager)", r"layer_norm"),
    ("copies / fills", r"copy|fill|memset|memcpy|cat|elementwise_kernel|vectorized"),
    ("cross-entropy / softmax", r"softmax|nll|cross"),
    ("embedding", r"embedding|index"),
]


def family(name):
    for label, pattern in FAMILIES:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other"


def device_time_us(evt):
    # torch renamed cuda_time -> device_time (2.4); read whichever this version has
    for attr in ("self_device_time_total", "self_cuda_time_total", "device_time_total", "cuda_time_total"):
        v = getattr(evt, attr, None)
        if v is not None:
            return float(v)
    return 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--L", type=int, default=12)
    ap.add_argument("--C", type=int, default=768)
    ap.add_argument("--H", type=int, default=12)
    ap.add_argument("--V", type=int, default=50304)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--top", type=int, default=40)
    a = ap.parse_args()
    torch.manual_seed(0)
    dev = a.device
    cuda = dev == "cuda"
    m = GPT(a.V, a.T, a.L, a.C, a.H).to(dev)
    opt = torch.optim.AdamW(m.parameters(), lr=6e-4, weight_decay=0.1, fused=cuda)
    step_fn = m if a.no_compile else torch.compile(m)
    cast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if cuda
            else torch.autocast(device_type="cpu", enabled=False))
    data = torch.randint(0, a.V, (a.B, a.T + 1), device=dev)

    def step():
        with cast:
            loss = step_fn(data[:, :-1], data[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync():
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    for _ in range(a.warmup):
        step()
    sync()
    print(f"warmup: {a.warmup} steps in {time.perf_counter() - t0:.1f} s (compile included)", flush=True)
    # unprofiled steps for the step time, then the same number under the profiler
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync()
    step_ms = (time.perf_counter() - t0) / a.steps * 1e3
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(a.steps):
            step()
        sync()

    want = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    per_name = defaultdict(lambda: [0, 0.0])  # name -> [launches, us]
    for evt in prof.key_averages():
        if evt.device_type != want:
            continue
        t = device_time_us(evt) if cuda else float(evt.self_cpu_time_total)
        if t <= 0:
            continue
        per_name[evt.key][0] += evt.count
        per_name[evt.key][1] += t
    if not per_name:
        print("no kernel events recorded (is CUPTI available?)")
        return 1
    n = a.steps
    total = sum(t for _, t in per_name.values()) / n / 1e3
    what = "kernel" if cuda else "CPU op (dry run)"
    print(f"## peer (torch{'' if a.no_compile else '.compile'}, B={a.B} T={a.T}): one step {step_ms:.2f} ms, "
          f"{total:.2f} ms of {what} time per step, "
          f"{sum(c for c, _ in per_name.values()) // n} launches per step")
    fam = defaultdict(float)
    for name, (_, t) in per_name.items():
        fam[family(name)] += t / n / 1e3
    print("### by family, ms per step")
    for label, ms in sorted(fam.items(), key=lambda kv: -kv[1]):
        print(f"{ms:8.3f} ms  {label}")
    print(f"### by kernel, ms per step (top {a.top})")
    rows = sorted(per_name.items(), key=lambda kv: -kv[1][1])[: a.top]
    for name, (count, t) in rows:
        short = name if len(name) <= 90 else name[:87] + "..."
        print(f"{t / n / 1e3:8.3f} ms {count // n:4d}x {t / count:9.1f} us  {short}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
