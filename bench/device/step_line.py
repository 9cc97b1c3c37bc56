#!/usr/bin/env python3
"""One summary line per `smelt bench step --json` result, and its ratio to the PyTorch peer.

usage: step_line.py JSON_FILE [NAME] [--peer TORCH_OUTPUT]
  JSON_FILE: the bench's output (its last line is the JSON); NAME: the label (default: the arch);
  TORCH_OUTPUT: torch_gpt2.py's output, whose last line has tok/s=N (the ratio is smelt's
  tokens/s over that).
"""
import json
import re
import sys

args = sys.argv[1:]
peer = None
if "--peer" in args:
    i = args.index("--peer")
    peer = args[i + 1]
    args = args[:i] + args[i + 2 :]
try:
    r = json.loads(open(args[0]).read().strip().splitlines()[-1])
except (OSError, ValueError, IndexError) as e:
    print(f"{args[0]}: no result ({e})")
    sys.exit(0)
name = args[1] if len(args) > 1 else r.get("arch", "?")
line = f"{name:>10}: {r['ms_per_step']:.2f} ms, {r['tokens_per_s']:.0f} tok/s, MFU {100 * r['mfu']:.1f}%"
if peer:
    try:
        m = re.findall(r"tok/s=(\d+)", open(peer).read())
        line += f", {r['tokens_per_s'] / float(m[-1]):.3f}x the peer ({m[-1]} tok/s)"
    except (OSError, IndexError, ValueError) as e:
        line += f" (no peer figure: {e})"
print(line)
