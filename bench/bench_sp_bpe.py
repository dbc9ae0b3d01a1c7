"""
Encoding speed of the hand-written SentencePiece-style BPE (bpe.SentencePieceBPE) against Hugging Face's
tokenizers (Rust) on about 1 MB of text, and that both give the same ids.

The text: Tiny Shakespeare and the repo's own Python source (English, code with indentation) and the
multilingual lines of tests/test_sp_bpe.py repeated (Chinese, Japanese, Korean, emoji, byte fallback),
split into documents at blank lines. Tokenizers: Mistral 7B's real SentencePiece model (mistral-common)
converted to tokenizer.json in the legacy Llama 2 structure (no pre-tokenizer: a whole document is one
BPE word) and in the Metaspace structure, when sentencepiece, protobuf, transformers and mistral-common
are installed; and tests/test_sp_bpe.py's small trained Gemma-style one. The library runs one document
at a time (one thread, as ours) and as one batch (all cores). Rounds alternate; figures are medians.
Ours caches chunks, so repeated words are cheap after their first time; the cache is cleared per round.

  python bench/bench_sp_bpe.py             # ~1 minute on 2 CPU cores
  python bench/bench_sp_bpe.py --quick     # seconds: does it still run?
"""

import argparse
import glob
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "bench")]
import bench_data  # noqa: E402
import pytest  # noqa: E402
import tokenizers  # noqa: E402

import bpe  # noqa: E402
import data  # noqa: E402
import test_sp_bpe as t  # noqa: E402  (its tokenizer builders)


def machine():  # bench_data's line, plus the library compared against and how busy the machine was
    return f"{bench_data.machine()}, tokenizers {tokenizers.__version__}, load average {os.getloadavg()[0]:.1f}"


def corpus(n_bytes):
    """About n_bytes of UTF-8 text as documents (split at blank lines): half English, a quarter code, a
    quarter the multilingual lines."""
    with open(os.path.join(ROOT, "data", "tinyshakespeare.txt"), encoding="utf-8") as f:
        text = f.read(n_bytes // 2)
    code = ""
    for path in sorted(glob.glob(os.path.join(ROOT, "*.py"))):
        with open(path, encoding="utf-8") as f:
            code += "\n\n" + f.read()
    text += code[:n_bytes // 4]
    multilingual = "\n\n".join(t.CORPUS)
    while len(text.encode()) < n_bytes:
        text += "\n\n" + multilingual
    return [d for d in text.split("\n\n") if d]


def tokenizers_to_time(tmp):
    """(name, tokenizer.json spec, its path) of each tokenizer measured."""
    out = []
    for legacy in (True, False):
        try:
            folder = os.path.join(tmp, f"mistral-{'legacy' if legacy else 'metaspace'}")
            spec = t.mistral_tokenizer_json("tokenizer.model.v1", legacy, folder)
            out.append((f"Mistral 7B v0.1, {'legacy (Llama 2)' if legacy else 'Metaspace'}", spec, folder))
        except pytest.skip.Exception as e:  # a package is missing
            print(f"# skipped Mistral: {e}")
            break
    out.append(("trained Gemma-style (~700 ids)", t.sp_spec("gemma"), os.path.join(tmp, "gemma")))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=1.0, help="text size in MB (1 MB ≈ 300k tokens)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    p.add_argument("--quick", action="store_true", help="50 KB, one round, to check that the script runs")
    args = p.parse_args()
    if args.quick:
        args.mb, args.rounds = 0.05, 1
    print(machine())
    docs = corpus(int(args.mb * 1e6))
    print(f"# {len(docs):,} documents, {sum(len(d.encode()) for d in docs) / 1e6:.2f} MB")
    print(f"{'tokenizer':<34} {'tokens':>9} {'ours tok/s':>11} {'lib tok/s':>10} {'lib batch':>10} "
          f"{'lib/ours':>8} {'same ids':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec, folder in tokenizers_to_time(tmp):
            os.makedirs(folder, exist_ok=True)
            enc = data.get_encoding(bpe.sp_bpe_tokenizer(spec, folder))
            lib = t.library(spec)
            times = {"ours": [], "lib": [], "batch": []}
            for _ in range(args.rounds):
                enc._cache.clear()
                t0 = time.perf_counter()
                ours = [enc.encode_ordinary(d) for d in docs]
                t1 = time.perf_counter()
                one = [lib.encode(d, add_special_tokens=False).ids for d in docs]
                t2 = time.perf_counter()
                batch = [e.ids for e in lib.encode_batch(docs, add_special_tokens=False)]
                t3 = time.perf_counter()
                times["ours"].append(t1 - t0), times["lib"].append(t2 - t1), times["batch"].append(t3 - t2)
            n = sum(map(len, one))
            rate = {k: n / statistics.median(v) for k, v in times.items()}
            print(f"{name:<34} {n:>9,} {rate['ours']:>11,.0f} {rate['lib']:>10,.0f} {rate['batch']:>10,.0f} "
                  f"{rate['lib'] / rate['ours']:>8.2f} {str(ours == one == batch):>8}")
    print(f"# python bench/bench_sp_bpe.py --mb {args.mb} --rounds {args.rounds}")


if __name__ == "__main__":
    main()
