#!/usr/bin/env python3
"""Golden GPT-2 BPE encodings from OpenAI's tiktoken, for corpus/tests/gpt2_golden.rs.

Encodes a few varied strings with tiktoken's `gpt2` encoding (OpenAI's original GPT-2 release
files, encoder.json + vocab.bpe) and its `r50k_base` encoding (the same vocabulary in tiktoken's
own file format), checks that both agree, and writes the ids as JSON.

Offline use: tiktoken downloads its rank files from openaipublic.blob.core.windows.net on first
use. With `--ranks-dir DIR` (a folder holding r50k_base.tiktoken, encoder.json and vocab.bpe, e.g.
the `assets/` folder of the tiktoken-rs crate in ~/.cargo/registry/src/*/tiktoken-rs-*/) the files
are placed in a private TIKTOKEN_CACHE_DIR under the names tiktoken looks for; tiktoken still
checks each file against OpenAI's published sha256, so a wrong file is refused (tiktoken then
tries to download it), never used.

    pip install tiktoken
    python3 tools/golden/gpt2_tiktoken.py --ranks-dir ~/.cargo/registry/src/*/tiktoken-rs-0.12.1/assets \
        --out corpus/tests/fixtures/gpt2_golden.json
"""

import argparse
import hashlib
import json
import os
import shutil
import tempfile

URLS = {
    "r50k_base.tiktoken": "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
}

STRINGS = [
    "Hello, world!",
    "I'm sure they'll say we've done it, haven't we? You'd think we're done. I'M LOUD, O'Neil's",
    "  two leading spaces,   runs   of spaces\n\n\nnewlines\t\ttabs  \n trailing   ",
    "Numbers: 3.14159, 1,000,000 and 2024-06-01; 12345678901234567890 x2 0x7fff",
    "naïve café — Ελληνικά, русский, 日本語のテキスト, 한국어, emoji 🎉👩‍👩‍👧‍👦",
    "<|endoftext|> is plain text for encode_ordinary",
    'fn main() {\n    println!("{}", x += 1);\n}\n',
    "",
    "a",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    'Mr. Smith\'s dog—"Rex"—ran 5km in 00:21:09.\r\n',
    "e\u0301 \u00a0nbsp\u2003em-space\u3000ideographic \u200bzero-width",
    "   \n",
    "!!!???...,,,;;; ((()))[[[]]]",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--ranks-dir", help="folder with r50k_base.tiktoken, encoder.json, vocab.bpe")
    args = ap.parse_args()

    if args.ranks_dir:
        cache = tempfile.mkdtemp(prefix="tiktoken-cache-")
        for name, url in URLS.items():
            dst = os.path.join(cache, hashlib.sha1(url.encode()).hexdigest())
            if name == "encoder.json":
                # tiktoken-rs ships encoder.json pretty-printed; json.dumps with its defaults gives
                # back OpenAI's original bytes (tiktoken checks their sha256).
                with open(os.path.join(args.ranks_dir, name), encoding="utf-8") as f:
                    data = json.dumps(json.load(f)).encode()
                with open(dst, "wb") as f:
                    f.write(data)
            else:
                shutil.copy(os.path.join(args.ranks_dir, name), dst)
        os.environ["TIKTOKEN_CACHE_DIR"] = cache

    import tiktoken

    gpt2 = tiktoken.get_encoding("gpt2")
    r50k = tiktoken.get_encoding("r50k_base")
    cases = []
    for s in STRINGS:
        ids = gpt2.encode_ordinary(s)
        assert ids == r50k.encode_ordinary(s), f"gpt2 and r50k_base disagree on {s!r}"
        assert gpt2.decode(ids) == s
        cases.append({"text": s, "ids": ids})
    doc = {
        "source": f"tiktoken {tiktoken.__version__}, encodings gpt2 and r50k_base (identical), encode_ordinary",
        "eot": gpt2.eot_token,
        "n_vocab": gpt2.n_vocab,
        "cases": cases,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    # one case per line, so a diff shows which string changed
    head = {k: v for k, v in doc.items() if k != "cases"}
    lines = [json.dumps(c, ensure_ascii=False) for c in cases]
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(json.dumps(head, ensure_ascii=False)[:-1] + ', "cases": [\n ' + ",\n ".join(lines) + "\n]}\n")
    print(f"wrote {len(cases)} cases to {args.out}")


if __name__ == "__main__":
    main()
