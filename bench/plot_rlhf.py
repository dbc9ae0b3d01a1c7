"""
Plots of reward over-optimization, from the runs' own logs (matplotlib: `pip install matplotlib`; bench only).

1. Proxy and gold against √KL (as Gao et al. 2022, "Scaling laws for reward model overoptimization", plot
   them): for each PPO/GRPO/RLOO run, the reward model's mean score of the rollouts (the proxy, ppo/score)
   and the world annotator's mean grade of the same rollouts (the gold, ppo/gold), each step, against the
   square root of KL(π‖π_ref) per response. When the reward model is exploited the proxy keeps rising
   while the gold turns down.
2. Best-of-n: for each reward model, the gold (mean grade) and the share of held-out real countries
   answered right, of the sample it picks out of n, against n (`sample.py --judge MODEL --best-of-n N`
   writes MODEL/best_of_n.json); the oracle's pick (the best grade of n) for reference.

  python bench/plot_rlhf.py --runs "off-policy RM=out/ppo_offpolicy" "on-policy RM=out/ppo" \
      --best-of-n "off-policy RM=out/reward_offpolicy" "on-policy RM=out/reward" --out bench/figures
"""

import argparse
import json
import math
import os


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def labelled(items):
    """["label=path", ...] -> [(label, path)]; a bare path is its own label."""
    return [tuple(item.split("=", 1)) if "=" in item else (item, item) for item in items]


def smooth(values, window=5):
    """A centred moving average (the per-step figures of 32 samples are noisy)."""
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window // 2):i + window // 2 + 1]
        out.append(sum(part) / len(part))
    return out


def save(fig, axes, path):
    """Grid and legend on each panel, then the figure to path."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--runs", nargs="*", default=[], help="LABEL=DIR of ppo.py runs (DIR/log.jsonl)")
    p.add_argument("--best-of-n", nargs="*", default=[], help="LABEL=DIR of reward models (DIR/best_of_n.json)")
    p.add_argument("--out", default="bench/figures", help="directory for the PNG files")
    args = p.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib (pip install matplotlib); it is not in requirements.txt")
    os.makedirs(args.out, exist_ok=True)

    if args.runs:
        fig, (ax_proxy, ax_gold) = plt.subplots(1, 2, figsize=(11, 4.2))
        for label, run in labelled(args.runs):
            steps = [r for r in read_jsonl(os.path.join(run, "log.jsonl")) if "ppo/gold" in r]
            if not steps:
                raise SystemExit(f"error: {run}/log.jsonl has no ppo/gold records (a run from before gold logging?)")
            kl = [math.sqrt(max(0.0, k)) for k in smooth([r["ppo/kl"] for r in steps])]
            line, = ax_proxy.plot(kl, smooth([r["ppo/score"] for r in steps]), label=label)
            ax_gold.plot(kl, smooth([r["ppo/gold"] for r in steps]), color=line.get_color(), label=label)
        ax_proxy.set(xlabel="√KL(π‖π_ref) per response (nats^½)", ylabel="proxy: reward model score",
                     title="what PPO optimises")
        ax_gold.set(xlabel="√KL(π‖π_ref) per response (nats^½)", ylabel="gold: annotator's grade (0-2)",
                    title="what the world says")
        save(fig, (ax_proxy, ax_gold), os.path.join(args.out, "overoptimization_kl.png"))

    if args.best_of_n:
        fig, (ax_gold, ax_right) = plt.subplots(1, 2, figsize=(11, 4.2))
        oracle = None
        for label, model_dir in labelled(args.best_of_n):
            with open(os.path.join(model_dir, "best_of_n.json")) as f:
                curve = json.load(f)["curve"]
            n = [c["n"] for c in curve]
            line, = ax_gold.plot(n, [c["gold"] for c in curve], marker="o", label=label)
            ax_right.plot(n, [c["right_real"] for c in curve], marker="o", color=line.get_color(), label=label)
            oracle = (n, [c["oracle_gold"] for c in curve])
        ax_gold.plot(*oracle, linestyle="--", color="grey", label="oracle (best grade of n)")
        ax_gold.set(xscale="log", xlabel="n (samples, the reward model keeps one)", ylabel="gold of the pick (0-2)",
                    title="best-of-n: gold of the pick")
        ax_right.set(xscale="log", xlabel="n", ylabel="share right", title="held-out real countries answered right")
        for ax in (ax_gold, ax_right):
            ax.set_xticks(oracle[0], [str(v) for v in oracle[0]])
        save(fig, (ax_gold, ax_right), os.path.join(args.out, "best_of_n.png"))


if __name__ == "__main__":
    main()
