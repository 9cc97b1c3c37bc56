#!/usr/bin/env python3
"""Per-kernel time of one training step from Nsight Compute CSVs (gpu__time_duration, one row
per launch), as written by bench/device/cuda_kernel_times.sh.

One step is the launches after the second-to-last AdamW launch up to and including the last one
(the bench runs warmup + measured steps; each ends with the fused AdamW over the flat buffer).
Rows are grouped by kernel name and grid; GEMMs keep cuBLAS's kernel names.

usage: kernel_table.py A.csv [B.csv ...]
"""
import csv
import sys
from collections import OrderedDict


def launches(path):
    rows = []
    with open(path, newline="", errors="replace") as f:
        lines = [l for l in f if l.startswith('"')]
    for r in csv.DictReader(lines):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        name = r["Kernel Name"]
        value = float(r["Metric Value"].replace(",", ""))
        unit = r.get("Metric Unit", "nsecond")
        scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "second": 1e3}.get(unit, 1e-6)
        rows.append((name, r.get("Grid Size", ""), r.get("Block Size", ""), value * scale))
    return rows


def one_step(rows):
    ends = [i for i, r in enumerate(rows) if "adamw" in r[0]]
    if len(ends) >= 2:
        return rows[ends[-2] + 1 : ends[-1] + 1]
    return rows


def short(name):
    name = name.split("(")[0]
    return name if len(name) <= 70 else name[:67] + "..."


def table(path):
    step = one_step(launches(path))
    groups = OrderedDict()
    for name, grid, block, ms in step:
        key = (short(name), grid, block)
        n, t = groups.get(key, (0, 0.0))
        groups[key] = (n + 1, t + ms)
    total = sum(t for _, t in groups.values())
    print(f"## {path}: one step, {len(step)} launches, {total:.2f} ms of kernel time")
    for (name, grid, block), (n, t) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        print(f"{t:8.3f} ms {n:4d}x {t / n * 1e3:9.1f} us  {name}  grid {grid} block {block}")
    print()


# Families matching bench/device/peer_kernels.py's rows for the peer (first match wins), so the
# two steps can be compared family by family.
FAMILIES = [
    ("attention backward", r"attention_backward|attention_dq_from_acc"),
    ("attention forward", r"attention_forward"),
    ("gemm (cuBLAS/cuBLASLt)", r"nvjet|gemm|cutlass|xmma|sm90_|sm80_|ampere_|hopper_"),
    ("optimizer (fused AdamW)", r"adamw"),
    ("norm of the gradients (clip)", r"sum_squares"),
    ("layer norm", r"layernorm"),
    ("gelu", r"gelu"),
    ("cross-entropy", r"cross_entropy"),
    ("bias / column sums", r"column_sum|bias"),
    ("conversions / copies / fills", r"f32_to_bf16|bf16_rows|unpad|fill|copy|memset|scale_f32|add_bf16"),
    ("embedding", r"embedding"),
    ("residual", r"residual"),
]


def families(path):
    """ms per step by kernel family (the peer's families, see peer_kernels.py)."""
    import re

    step = one_step(launches(path))
    fam = {}
    for name, _, _, ms in step:
        label = next((l for l, pat in FAMILIES if re.search(pat, name, re.IGNORECASE)), "other")
        fam[label] = fam.get(label, 0.0) + ms
    print(f"## {path}: by family, ms per step ({sum(fam.values()):.2f} ms)")
    for label, ms in sorted(fam.items(), key=lambda kv: -kv[1]):
        print(f"{ms:8.3f} ms  {label}")
    print()


def compare(paths):
    """Side by side: time per kernel name (all grids) in each file's step, largest first."""
    cols = []
    for p in paths:
        try:
            step = one_step(launches(p))
        except (OSError, KeyError, ValueError) as e:
            print(f"## {p}: unreadable ({e})")
            return
        t = {}
        for name, _, _, ms in step:
            t[short(name)] = t.get(short(name), 0.0) + ms
        cols.append(t)
    names = sorted(set().union(*cols), key=lambda n: -max(c.get(n, 0.0) for c in cols))
    print("## per kernel, ms per step: " + " | ".join(paths))
    print("  ".join(f"{sum(c.values()):8.3f}" for c in cols) + "  (total)")
    for n in names[:40]:
        print("  ".join(f"{c.get(n, 0.0):8.3f}" for c in cols) + f"  {n}")
    print()


if len(sys.argv) > 2:
    compare(sys.argv[1:])
for p in sys.argv[1:]:
    try:
        families(p)
        table(p)
    except (OSError, KeyError, ValueError) as e:
        print(f"## {p}: unreadable ({e})")
