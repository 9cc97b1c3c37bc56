#!/usr/bin/env python3
"""Writes the Parquet fixtures of `corpus prepare` (corpus/tests/parquet.rs) with pyarrow, an
independent Parquet writer (Apache Arrow's C++ implementation), as Hugging Face datasets are
written:

- `docs.snappy.parquet`: columns id (int64), text (string), url (string); snappy pages, row
  groups of 4 rows; one text is null and one empty (both skipped as empty documents), others
  hold non-ASCII text, astral-plane characters and newlines.
- `docs.zstd.parquet`: the same rows, text as `large_string`, zstd pages, one row group.
- `docs.jsonl`: the same documents as JSONL (null written as ""), which `corpus prepare` must
  tokenize to exactly the same stream.
- `binary.parquet`: a `text` column of plain binary (not annotated as UTF-8), refused.

    python3 tools/golden/parquet_fixture.py [--out corpus/tests/fixtures/parquet]
"""

import argparse
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="corpus/tests/fixtures/parquet")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    docs = [
        "The first document: about foxes, and the lazy dogs they jump over.",
        "Zweites Dokument — ünïcödé, naïve café, 東京, and a checkmark ✓.",
        None,
        "",
        "Fourth: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 letters and\nnewlines\n\ninside one row.",
        "fifth " * 40,
        "Sixth and last, with <|endoftext|> written as plain text.",
    ]
    table = pa.table({
        "id": list(range(len(docs))),
        "text": docs,
        "url": [f"https://example.com/{i}" for i in range(len(docs))],
    })
    pq.write_table(table, os.path.join(args.out, "docs.snappy.parquet"), compression="snappy", row_group_size=4)
    large = pa.table({"text": pa.array(docs, type=pa.large_string()), "id": list(range(len(docs)))})
    pq.write_table(large, os.path.join(args.out, "docs.zstd.parquet"), compression="zstd")
    with open(os.path.join(args.out, "docs.jsonl"), "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d if d is not None else ""}, ensure_ascii=False) + "\n")
    binary = pa.table({"text": pa.array([b"raw bytes", b"more"], type=pa.binary())})
    pq.write_table(binary, os.path.join(args.out, "binary.parquet"))
    print(sorted(os.listdir(args.out)), pa.__version__)


if __name__ == "__main__":
    main()
