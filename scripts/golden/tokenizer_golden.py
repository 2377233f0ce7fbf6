#!/usr/bin/env python3
"""Golden token ids from the Hugging Face `tokenizers` package, for tests/formats/test_tokenizer.cpp.

For each tokenizer.json (the three llama2.c fixtures, qwen3-tiny-trained, and the Qwen3 / Llama-3 files fetched by
scripts/fetch-tokenizers.sh) it encodes, with add_special_tokens=True:
  * line samples of every fixtures/text/*.txt file, stored by index, not by text: the file's bytes are decoded as
    UTF-8 and split on "\\n" only (a "\\r" stays in its line); a sample [start, count] is
    "\\n".join(lines[start:start + count]). Samples: lines 0..N-1 one by one, plus CHUNKS runs of CHUNK_LINES
    lines starting at (k + 1) * len(lines) // (CHUNKS + 2);
  * the edge cases of tokenizer_edge_cases.json (stored inline, with decode(ids, skip_special_tokens=True)).
N starts at 300 and is halved until the output file is under 1.9 MB.

Usage (on a machine with `pip install tokenizers`):
  python3 scripts/golden/tokenizer_golden.py --fixtures ../shared/fixtures --cache .cache/tokenizers --out OUT
then copy OUT/*.json to tests/data/tokenizer/. scripts/golden/tokenizer_golden.mjs writes the same files with the
`tokenizers` npm package (same Rust core) where only npm is reachable.
"""
import argparse
import hashlib
import json
import os
import sys

from tokenizers import Tokenizer, __version__ as tokenizers_version

TOKENIZERS = [
    # (name, root key, path of tokenizer.json relative to that root)
    ("aidreams-llama2c-260k-hf", "fixtures", "models/aidreams-llama2c-260k-hf/tokenizer.json"),
    ("tinystories-llama2c-280k-hf", "fixtures", "models/tinystories-llama2c-280k-hf/tokenizer.json"),
    ("karpathy-stories-llama2c-260k-hf", "fixtures", "models/karpathy-stories-llama2c-260k-hf/tokenizer.json"),
    ("qwen3-tiny-trained", "fixtures", "models/qwen3-tiny-trained/tokenizer.json"),
    ("qwen3", "cache", "qwen3/tokenizer.json"),
    ("llama3", "cache", "llama3/tokenizer.json"),
]
FIRST_LINES = 300
CHUNKS = 16
CHUNK_LINES = 8
MAX_BYTES = 1_900_000


def read_lines(path):
    with open(path, "rb") as f:
        return f.read().decode("utf-8").split("\n")


def samples_for(lines, first_lines):
    ranges = [[i, 1] for i in range(min(first_lines, len(lines)))]
    for k in range(CHUNKS):
        start = (k + 1) * len(lines) // (CHUNKS + 2)
        if start + CHUNK_LINES <= len(lines):
            ranges.append([start, CHUNK_LINES])
    return ranges


def build(name, root_key, rel, roots, text_files, edge_cases, first_lines):
    path = os.path.join(roots[root_key], rel)
    tok = Tokenizer.from_file(path)
    with open(path, "rb") as f:
        blob = f.read()
    out = {
        "tokenizer": name,
        "tokenizer_file": {"root": root_key, "path": rel, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()},
        "produced_by": "scripts/golden/tokenizer_golden.py",
        "tokenizers_version": tokenizers_version,
        "add_special_tokens": True,
        "line_split": "file bytes decoded as UTF-8, split on \\n; sample [start, count] = \\n.join(lines[start:start+count])",
        "line_samples": [],
        "edge_cases": [],
    }
    for rel_text in text_files:
        lines = read_lines(os.path.join(roots["fixtures"], rel_text))
        ranges = samples_for(lines, first_lines)
        texts = ["\n".join(lines[s:s + c]) for s, c in ranges]
        ids = [e.ids for e in tok.encode_batch(texts, add_special_tokens=True)]
        out["line_samples"].append({"file": rel_text, "ranges": ranges, "ids": ids})
    for text in edge_cases:
        ids = tok.encode(text, add_special_tokens=True).ids
        out["edge_cases"].append({"text": text, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=True)})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", required=True, help="shared fixtures folder (holds models/ and text/)")
    ap.add_argument("--cache", required=True, help="folder filled by scripts/fetch-tokenizers.sh")
    ap.add_argument("--out", required=True, help="output folder for <tokenizer>.json")
    args = ap.parse_args()

    roots = {"fixtures": args.fixtures, "cache": args.cache}
    text_dir = os.path.join(args.fixtures, "text")
    text_files = sorted("text/" + f for f in os.listdir(text_dir) if f.endswith(".txt"))
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer_edge_cases.json")) as f:
        edge_cases = json.load(f)["texts"]
    os.makedirs(args.out, exist_ok=True)

    missing = 0
    for name, root_key, rel in TOKENIZERS:
        if not os.path.exists(os.path.join(roots[root_key], rel)):
            print(f"tokenizer_golden: {name}: {rel} not found under {roots[root_key]}, skipped", file=sys.stderr)
            missing += 1
            continue
        first_lines = FIRST_LINES
        while True:
            data = build(name, root_key, rel, roots, text_files, edge_cases, first_lines)
            text = json.dumps(data, ensure_ascii=True, separators=(",", ":"))
            if len(text) < MAX_BYTES or first_lines <= 10:
                break
            first_lines //= 2
        # Atomic write: a partial golden file must never look valid.
        dest = os.path.join(args.out, name + ".json")
        with open(dest + ".tmp", "w") as f:
            f.write(text)
        os.replace(dest + ".tmp", dest)
        n = sum(len(s["ranges"]) for s in data["line_samples"]) + len(data["edge_cases"])
        print(f"tokenizer_golden: {name}: {n} texts, first_lines={first_lines}, {len(text)} bytes -> {dest}")
    return 1 if missing == len(TOKENIZERS) else 0


if __name__ == "__main__":
    sys.exit(main())
