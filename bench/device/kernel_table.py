#!/usr/bin/env python3
"""Per-kernel time of one training step from Nsight Compute CSVs (gpu__time_duration, one row
per launch), as written by bench/device/cuda_kernel_times.sh.

One step is the launches after the second-to-last AdamW launch up to and including the last one
(the bench runs warmup + measured steps; each ends with the fused AdamW over the flat buffer).
Rows are grouped by kernel name and grid; GEMMs keep cuBLAS's kernel names.

usage: kernel_table.py A.csv [B.csv ...] [--peer PEER_KERNELS.txt]
  (--peer: A.csv's families beside the peer's, from bench/device/peer_kernels.py's output)
"""
import csv
import signal
import sys
from collections import OrderedDict

# piped into `head` by the device scripts: end quietly when the reader has had enough
signal.signal(signal.SIGPIPE, signal.SIG_DFL)


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


def family_times(path):
    """ms per step by kernel family (the peer's families, see peer_kernels.py)."""
    import re

    fam = {}
    for name, _, _, ms in one_step(launches(path)):
        label = next((l for l, pat in FAMILIES if re.search(pat, name, re.IGNORECASE)), "other")
        fam[label] = fam.get(label, 0.0) + ms
    return fam


def families(path):
    fam = family_times(path)
    print(f"## {path}: by family, ms per step ({sum(fam.values()):.2f} ms)")
    for label, ms in sorted(fam.items(), key=lambda kv: -kv[1]):
        print(f"{ms:8.3f} ms  {label}")
    print()


# The families both steps have under the same name; the rest (Inductor's Triton fusions on the
# peer's side, our LayerNorm, GELU, cross-entropy, ... kernels) compare as one row.
SHARED = ["gemm (cuBLAS/cuBLASLt)", "attention forward", "attention backward", "optimizer (fused AdamW)", "norm of the gradients (clip)"]


def peer_families(path):
    """The peer's `### by family` rows from peer_kernels.py's output."""
    import re

    fam, inside = {}, False
    for line in open(path, errors="replace"):
        if line.startswith("### by family"):
            inside = True
            continue
        if inside:
            m = re.match(r"\s*([\d.]+) ms  (.+)", line.rstrip("\n"))
            if not m:
                break
            fam[m.group(2)] = float(m.group(1))
    return fam


def versus_peer(ours_path, peer_path):
    """Ours beside the peer's, family by family, in ms per step."""
    ours, peer = family_times(ours_path), peer_families(peer_path)
    if not peer:
        print(f"## {peer_path}: no family table")
        return
    print(f"## ms per step, ours ({ours_path}) beside the peer's ({peer_path})")
    print(f"{'ours':>8} {'peer':>8} {'ours-peer':>9}  family")
    rest_ours, rest_peer = sum(ours.values()), sum(peer.values())
    for label in SHARED:
        o, q = ours.get(label, 0.0), peer.get(label, 0.0)
        rest_ours -= o
        rest_peer -= q
        print(f"{o:8.3f} {q:8.3f} {o - q:+9.3f}  {label}")
    print(f"{rest_ours:8.3f} {rest_peer:8.3f} {rest_ours - rest_peer:+9.3f}  everything else (elementwise, norms, loss, copies)")
    print(f"{sum(ours.values()):8.3f} {sum(peer.values()):8.3f} {sum(ours.values()) - sum(peer.values()):+9.3f}  total kernel time")
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


args = sys.argv[1:]
peer = None
if "--peer" in args:  # --peer PEER_KERNELS.txt: the first CSV beside the peer's families
    i = args.index("--peer")
    peer = args[i + 1]
    args = args[:i] + args[i + 2 :]
if peer and args:
    try:
        versus_peer(args[0], peer)
    except (OSError, KeyError, ValueError) as e:
        print(f"## versus the peer: unreadable ({e})")
if len(args) > 1:
    compare(args)
for p in args:
    try:
        families(p)
        table(p)
    except (OSError, KeyError, ValueError) as e:
        print(f"## {p}: unreadable ({e})")
