"""
Which decoder family to train from scratch: GPT-2 or modern, for the same wall time.

The default of pretrain.py's --family is decided by this measurement: each family trains on the
bundled corpus with the default shape (pretrain.py's defaults) for the same number of seconds, and
the one with the lower validation loss wins. The step count for each is set from its own measured
step time, so each run completes its full warmup + cosine schedule inside the budget.

  python bench/bench_family.py --minutes 4           # ~9 minutes on 2 CPU cores
  python bench/bench_family.py --minutes 0.3 --quick # seconds, to check that it runs
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

import pretrain  # noqa: E402


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--minutes", type=float, default=4.0, help="training wall time per family")
    p.add_argument("--families", nargs="+", default=["gpt2", "modern"])
    p.add_argument("--quick", action="store_true", help="tiny model, to check the script runs")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    shape = ["--n-layer", "2", "--n-embd", "64", "--block-size", "64"] if args.quick else []

    print(f"# bench_family  {datetime.datetime.now():%Y-%m-%d %H:%M}  {platform.platform()}")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {args.minutes} min per family")
    results = []
    for family in args.families:
        with tempfile.TemporaryDirectory() as tmp:
            common = ["--family", family, "--device", args.device, *shape]
            # 1. step time of this family: 12 steps, median of the last 8
            pretrain.main(common + ["--out", os.path.join(tmp, "cal"), "--max-steps", "12", "--log-every", "1",
                                    "--eval-every", "1000", "--eval-batches", "1"])
            step_s = statistics.median(r["dt_ms"] for r in read_log(os.path.join(tmp, "cal")) if "dt_ms" in r) / 1000
            # 2. the run: as many steps as fit in the budget, evaluating only at the end
            steps = max(10, int(args.minutes * 60 / step_s))
            t0 = time.perf_counter()
            m = pretrain.main(common + ["--out", os.path.join(tmp, "run"), "--max-steps", str(steps),
                                        "--eval-every", str(steps), "--log-every", str(max(1, steps // 10))])
            results.append((family, steps, time.perf_counter() - t0, m["val/loss"], m["val/bpb"]))

    print(f"\n{'family':8} {'steps':>6} {'wall s':>7} {'val loss':>9} {'val bpb':>8}")
    for family, steps, wall, loss, bpb in results:
        print(f"{family:8} {steps:6d} {wall:7.0f} {loss:9.4f} {bpb:8.4f}")
    print(f"lower validation loss: {min(results, key=lambda r: r[3])[0]}")
    print("command: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
