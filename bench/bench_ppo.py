"""
Benchmark: where a PPO step's time goes (generation, scoring, training), and peak memory, full and LoRA.

What it measures: ppo.py itself, run for --steps steps on the tiny world's prompts, from a policy and a
reward model of pretrain.py's default shape with random weights (so every response runs to
--max-new-tokens: the longest rollouts), or from --policy / --reward-model checkpoints. From its
log.jsonl: rollout tokens/s (response tokens sampled per second of generation, batched with the KV cache),
training tokens/s (response tokens through PPO's forward and backward passes, all epochs, per second of
training), and the share of the step spent generating. Each setting runs in its own process, whose peak
resident memory (ru_maxrss) is reported. Medians over the steps after the first (the warm-up).

  python bench/bench_ppo.py                  # CPU, about a minute on 2 cores
  python bench/bench_ppo.py --quick          # seconds
  python bench/bench_ppo.py --n-layer 12 --n-head 12 --n-embd 768 --block-size 1024 --vocab-size 50304 \
      --batch-size 64 --max-new-tokens 64    # the GPT-2 124M shape (on a GPU)
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import ppo  # noqa: E402
from bench_pretrain import command_line, print_header  # noqa: E402
from model import FAMILIES, GPT, GPTConfig, save_checkpoint, setup_runtime  # noqa: E402

SETTINGS = {"full": [], "LoRA r=8": ["--lora-r", "8"]}


def get_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="PPO steps per setting (the first is a warm-up)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per rollout batch (ppo.py's default)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="response length (ppo.py's default)")
    p.add_argument("--policy", default="", help="a chat checkpoint ('' = random weights, default shape)")
    p.add_argument("--reward-model", default="", help="a reward model ('' = random weights, default shape)")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=0, help="0 = the world tokenizer's")
    p.add_argument("--quick", action="store_true", help="3 steps, batch 8")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="as the stages")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # internal: run one setting, print JSON
    args = p.parse_args()
    if args.quick:
        args.steps, args.batch_size = 3, 8
    return args


def random_checkpoints(args, tmp, tok):
    """A chat policy and a reward model with random weights, of the benchmark's shape, in tmp."""
    config = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
                       vocab_size=args.vocab_size or data.model_vocab_size(tok), **FAMILIES["modern"])
    torch.manual_seed(0)
    policy = GPT(config)
    rm = GPT(GPTConfig(**{**asdict(config), "score_head": True}))
    paths = []
    for name, net in (("policy", policy), ("rm", rm)):
        save_checkpoint(os.path.join(tmp, name, "ckpt.pt"), model=net.state_dict(), model_config=asdict(net.config),
                        tokenizer=tok, chat=True, step=0)
        paths.append(os.path.join(tmp, name))
    return paths


def worker(args):
    """One setting, in this process: ppo.main for --steps steps, then the figures as one JSON line."""
    name, policy, rm, prompts, out = json.loads(args.worker)
    ppo.main(["--policy", policy, "--reward-model", rm, "--prompts", prompts, "--out", out,
              "--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens),
              "--max-steps", str(args.steps), "--eval-every", "100000", "--log-every", "1",
              "--device", args.device, "--dtype", args.dtype, *SETTINGS[name]])
    with open(os.path.join(out, "log.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "time/train" in r][1:]  # the first step warms up
    tokens = [r["ppo/length"] * args.batch_size for r in steps]
    epochs = 4  # ppo.py's default --ppo-epochs: each response token goes through 4 forward/backward passes
    figures = {
        "rollout_tok_s": statistics.median(n / r["time/generate"] for n, r in zip(tokens, steps)),
        "train_tok_s": statistics.median(epochs * n / r["time/train"] for n, r in zip(tokens, steps)),
        "generate_share": statistics.median(r["time/generate"] / (r["time/generate"] + r["time/score"] + r["time/train"])
                                            for r in steps),
        "score_share": statistics.median(r["time/score"] / (r["time/generate"] + r["time/score"] + r["time/train"])
                                         for r in steps),
        "step_s": statistics.median(r["time/generate"] + r["time/score"] + r["time/train"] for r in steps),
        "length": statistics.mean(r["ppo/length"] for r in steps),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: kB
    }
    if torch.cuda.is_available():
        figures["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    print("RESULT " + json.dumps(figures))


def main():
    args = get_args()
    if args.worker:
        return worker(args)
    rt = setup_runtime(args.device, args.dtype)
    print_header("bench_ppo: a PPO step's time split, tokens/s and peak memory, full and LoRA", rt.device)
    world = os.path.join(data.DATA_DIR, "world")
    tok = data.load_tokenizer(os.path.join(world, "tokenizer.json"))
    tmp = tempfile.mkdtemp(prefix="bench_ppo_")
    try:
        prompts = os.path.join(tmp, "prompts.jsonl")  # a copy: no world.json beside it, so no world evaluation
        shutil.copy(os.path.join(world, "prefs.jsonl"), prompts)
        policy, rm = (args.policy, args.reward_model) if args.policy else random_checkpoints(args, tmp, tok)
        rm = args.reward_model or rm
        results = {}
        for name in SETTINGS:
            spec = json.dumps([name, policy, rm, prompts, os.path.join(tmp, name.replace(" ", "_"))])
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", spec, "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens),
                   "--device", args.device, "--dtype", args.dtype]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[name] = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
            print(f"{name}: {results[name]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n{args.batch_size} prompts per step, responses up to {args.max_new_tokens} tokens, "
          f"{args.steps - 1} timed steps; {str(rt.dtype).removeprefix('torch.')} ({rt.why})")
    print(f"{'':10} {'step':>7} {'generate':>9} {'score':>6} {'rollout tok/s':>14} {'train tok/s':>12} {'peak RSS':>10}")
    for name, r in results.items():
        print(f"{name:10} {r['step_s']:6.2f}s {r['generate_share']:9.0%} {r['score_share']:6.0%} "
              f"{r['rollout_tok_s']:14,.0f} {r['train_tok_s']:12,.0f} {r['peak_rss_mb']:7,.0f} MB"
              + (f"  (CUDA peak {r['peak_cuda_mb']:,.0f} MB)" if "peak_cuda_mb" in r else ""))
    print(f"\ncommand: {command_line('bench/bench_ppo.py', None)}")


if __name__ == "__main__":
    main()
