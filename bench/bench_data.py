"""
The data stage's figures: prepare's throughput and memory, BPE training time, tiktoken encoding speed,
and whether a small trained vocabulary beats GPT-2's for a tiny model trained for the same wall time.

1. pipeline   `python prepare.py prepare` on a synthetic corpus that this script writes (pseudo-words with
              Zipf frequencies; 4% exact copies, 4% near-copies, 3% junk for the filters), at two
              sizes: MB/s of the whole run (wall clock) and of each step (per CPU core), peak memory
              of the main process and of the largest worker. Flat memory: the bigger run may only
              add the dedup index (~0.5 KB per kept document).
2. tokenizer  train_bpe to 4,096 ids on the bundled Tiny Shakespeare (1.1 MB); tiktoken's encoding
              speed with it and with GPT-2's, on one thread and in batches on all cores.
3. bpb        pretrain.py's default model on Tiny Shakespeare, prepared once with GPT-2's tokenizer
              and once with the 4,096-id one, each trained for the same wall time (step counts set
              from each one's measured step time): validation bits per byte, which does not depend
              on the tokenizer, says which vocabulary makes the better model per second of CPU.

  python bench/bench_data.py                       # all three, ~15 minutes on 2 CPU cores
  python bench/bench_data.py --part pipeline       # or tokenizer, or bpb
  python bench/bench_data.py --quick               # seconds: does it still run?
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import numpy as np  # noqa: E402
import tiktoken  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
import prepare  # noqa: E402
import pretrain  # noqa: E402
from model import load_model  # noqa: E402

SHAKESPEARE = os.path.join(data.DATA_DIR, "tinyshakespeare.txt")


def machine():
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return (f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu}, {os.cpu_count()} cores, "
            f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
            f"tiktoken {tiktoken.__version__}")


# -----------------------------------------------------------------------------
# 1. pipeline


def write_corpus(out_dir, total_mb, file_mb=64, seed=0):
    """Synthetic .jsonl files of about file_mb MB each, total_mb in all; returns the paths in order.
    Documents of 100-1,500 pseudo-words (Zipf-distributed, 1 in 12 ending a sentence); 4% are exact
    copies of a recent document, 4% near-copies (1% of words replaced), 3% junk the filters drop."""
    rng = np.random.default_rng(seed)
    syllables = [c + v for c in "bdfghklmnprstvwz" for v in ["a", "e", "i", "o", "u", "ai", "ou"]]
    vocab = sorted({"".join(rng.choice(syllables, rng.integers(1, 4))) for _ in range(20_000)})
    vocab = np.array(vocab + [w + "." for w in vocab], dtype=object)
    p = 1.0 / np.arange(1, len(vocab) // 2 + 1)  # Zipf
    cdf = np.cumsum(np.concatenate([p * 11, p]) / (12 * p.sum()))
    recent, paths, written = [], [], 0
    menu = "\n".join(["Home | About us | Products | Contact | Privacy policy"] * 20)
    while written < total_mb * 1e6:
        path = os.path.join(out_dir, f"part_{len(paths):03d}.jsonl")
        with open(path, "w") as f:
            size = 0
            while size < file_mb * 1e6 and written + size < total_mb * 1e6:
                r = rng.random()
                if r < 0.04 and recent:
                    text = recent[rng.integers(len(recent))]
                elif r < 0.08 and recent:
                    words = recent[rng.integers(len(recent))].split(" ")
                    for i in rng.integers(0, len(words), len(words) // 100):
                        words[i] = vocab[rng.integers(len(vocab))]
                    text = " ".join(words)
                elif r < 0.11:
                    text = [menu, " ".join(vocab[:20]), " ".join(map(str, rng.integers(0, 99999, 300)))][int(r * 100) % 3]
                else:
                    text = " ".join(vocab[np.searchsorted(cdf, rng.random(int(rng.integers(100, 1500))), "right")])
                    recent = (recent + [text])[-500:]
                line = json.dumps({"text": text}) + "\n"
                f.write(line)
                size += len(line)
        written += size
        paths.append(path)
    return paths


def bench_pipeline(args, tmp):
    sizes = [2, 8] if args.quick else args.sizes_mb
    t0 = time.perf_counter()
    os.makedirs(os.path.join(tmp, "corpus"))
    files = write_corpus(os.path.join(tmp, "corpus"), max(sizes), file_mb=1 if args.quick else 64)
    print(f"wrote a {max(sizes):,} MB synthetic corpus in {time.perf_counter() - t0:.0f} s ({len(files)} files)")
    rows = []
    for size in sizes:
        inputs = files[:max(1, round(len(files) * size / max(sizes)))]
        out = os.path.join(tmp, f"prepared_{size}")
        command = [sys.executable, os.path.join(ROOT, "prepare.py"), "prepare", *inputs, "--out", out,
                   "--workers", str(args.workers)]
        t0 = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        m = data.read_manifest(out)
        s, mb = m["steps"], m["steps"]["ingest"]["bytes"] / 1e6
        per_step = {name: mb / s[name]["seconds"] for name in ("ingest", "normalize", "filter", "dedup", "tokenize")}
        dropped = (sum(s["filter"]["dropped"].values()), s["exact_dedup"]["dropped"], s["near_dedup"]["dropped"])
        rows.append((mb, wall, mb / wall, per_step, m["peak_rss_mb"], s["ingest"]["docs"], dropped, s["dedup"]["kept"],
                     sum(x["tokens"] for x in m["splits"].values())))
        for name in ("train", "val"):  # the shards alone can be large
            for shard in m["splits"][name]["shards"]:
                os.remove(os.path.join(out, shard["file"]))
        os.remove(os.path.join(out, "clean.jsonl"))
    print(f"\n{'input MB':>9} {'wall s':>7} {'MB/s':>6} | MB/s per CPU-second: {'ingest':>7} {'normalize':>9} {'filter':>7} "
          f"{'dedup':>6} {'tokenize':>8} | peak MB: {'main':>5} {'worker':>6} | {'docs in':>9} "
          f"{'filtered/exact/near':>22} {'kept':>9} {'tokens':>12}")
    for mb, wall, rate, step, rss, n_in, dropped, kept, tokens in rows:
        print(f"{mb:9,.0f} {wall:7.1f} {rate:6.2f} | {'':14}{step['ingest']:7.1f} {step['normalize']:9.1f} "
              f"{step['filter']:7.1f} {step['dedup']:6.1f} {step['tokenize']:8.1f} | {'':9}{rss['main']:5.0f} "
              f"{rss['largest_worker']:6.0f} | {n_in:9,} {'/'.join(f'{n:,}' for n in dropped):>22} {kept:9,} {tokens:12,}")
    print(f"command per size: python prepare.py prepare FILES --out DIR --workers {args.workers}")


# -----------------------------------------------------------------------------
# 2. tokenizer


def bench_tokenizer(args, tmp):
    with open(SHAKESPEARE) as f:
        text = f.read(100_000 if args.quick else None)
    vocab_size = 1024 if args.quick else 4096
    t0 = time.perf_counter()
    tok = prepare.train_bpe([text], vocab_size, progress=False)
    train_s = time.perf_counter() - t0
    data.save_tokenizer(tok, os.path.join(tmp, "bpe.json"))
    print(f"\ntrain_bpe: {vocab_size:,} ids on {len(text.encode()) / 1e6:.2f} MB in {train_s:.1f} s")
    mb = len(text.encode()) / 1e6
    docs = text.split("\n\n")
    print(f"{'tokenizer':12} {'tokens':>9} {'bytes/token':>11} {'1 thread MB/s':>13} {f'batch, {os.cpu_count()} threads':>18}")
    for name, t in [("gpt2", data.gpt2_tokenizer()), (tok["name"], tok)]:
        enc = data.get_encoding(t)
        enc.encode_ordinary(text[:1000])  # warm up
        one = [timed(lambda: enc.encode_ordinary(text)) for _ in range(3)]
        batch = [timed(lambda: enc.encode_ordinary_batch(docs, num_threads=os.cpu_count())) for _ in range(3)]
        n = len(enc.encode_ordinary(text))
        print(f"{name:12} {n:9,} {mb * 1e6 / n:11.2f} {mb / statistics.median(one):13.1f} {mb / statistics.median(batch):18.1f}")
    print("command: python bench/bench_data.py --part tokenizer")
    return tok


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# -----------------------------------------------------------------------------
# 3. bits per byte: trained 4,096 ids vs GPT-2's, same model, same wall time


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def quiet(fn, argv):
    """fn(argv) with its printing and progress bars sent to /dev/null."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        return fn(argv)


def bench_bpb(args, tmp, tok_path):
    shape = ["--n-layer", "2", "--n-embd", "64", "--block-size", "64"] if args.quick else []
    prepared = {}
    for name, tokenizer in [("gpt2", "gpt2"), ("bpe4096", tok_path)]:
        prepared[name] = os.path.join(tmp, f"shakespeare_{name}")
        # speeches (blank-line separated) as documents, so that validation is every 10th speech; no
        # filtering or dedup: the comparison is about the tokenizer, on the whole text
        quiet(prepare.main, ["prepare", SHAKESPEARE, "--separator", "blank", "--no-filter", "--no-exact-dedup", "--no-near-dedup",
                   "--tokenizer", tokenizer, "--out", prepared[name], "--workers", "1"])
    results = []
    for name, path in prepared.items():
        common = ["--data", path, "--device", "cpu", *shape]
        # 1. this vocabulary's step time: 12 steps, median of the last 8
        quiet(pretrain.main, common + ["--out", os.path.join(tmp, f"cal_{name}"), "--max-steps", "12", "--log-every", "1",
                                       "--eval-every", "1000", "--eval-batches", "1"])
        step_s = statistics.median([r["dt_ms"] for r in read_log(os.path.join(tmp, f"cal_{name}")) if "dt_ms" in r][-8:]) / 1000
        # 2. as many steps as fit in the budget, evaluating only at the end
        steps = max(10, int(args.minutes * 60 / step_s))
        out = os.path.join(tmp, f"run_{name}")
        t0 = time.perf_counter()
        m = quiet(pretrain.main, common + ["--out", out, "--max-steps", str(steps), "--eval-every", str(steps),
                                           "--log-every", str(max(1, steps // 10))])
        params = load_model(out)[0].num_params() / 1e6  # the tied embedding counted once
        results.append((name, params, steps, step_s * 1000, time.perf_counter() - t0, m["val/loss"], m["val/bpb"]))
    print(f"\n{'tokenizer':10} {'params M':>8} {'steps':>6} {'ms/step':>8} {'wall s':>7} {'val loss':>9} {'val bpb':>8}")
    for name, params, steps, ms, wall, loss, bpb in results:
        print(f"{name:10} {params:8.2f} {steps:6d} {ms:8.0f} {wall:7.0f} {loss:9.4f} {bpb:8.4f}")
    print(f"lower bits per byte: {min(results, key=lambda r: r[-1])[0]}")
    print(f"command: python bench/bench_data.py --part bpb --minutes {args.minutes}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--part", default="all", choices=["all", "pipeline", "tokenizer", "bpb"])
    p.add_argument("--sizes-mb", type=int, nargs="+", default=[256, 1024], help="synthetic corpus sizes for the pipeline")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="prepare's worker processes")
    p.add_argument("--minutes", type=float, default=3.0, help="training wall time per tokenizer in the bpb comparison")
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check that the script runs")
    args = p.parse_args()
    if args.quick:
        args.minutes = min(args.minutes, 0.1)
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("all", "pipeline"):
            bench_pipeline(args, tmp)
        if args.part in ("all", "tokenizer", "bpb"):
            bench_tokenizer(args, tmp)
        if args.part in ("all", "bpb"):
            bench_bpb(args, tmp, os.path.join(tmp, "bpe.json"))
    print("command: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
