"""
Benchmark: reward-model throughput, training and scoring, full and LoRA.

What it measures: pairs per second of reward.py's training step (chosen and rejected of a batch in one
forward pass, the Bradley-Terry loss, backward, AdamW) and of scoring alone (no gradient), for full
fine-tuning and for LoRA r=8 (the score head trains in both). The pairs are the tiny world's
(data/world/prefs.jsonl, rendered with its tokenizer); the model has pretrain.py's default shape with
random weights and a score head (speed does not depend on the weights). Settings alternate over
--repeats rounds; figures are medians.

  python bench/bench_reward.py                 # CPU, about a minute on 2 cores
  python bench/bench_reward.py --device cuda --dtype bfloat16
  python bench/bench_reward.py --quick         # seconds
"""

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import reward  # noqa: E402
from bench_pretrain import command_line, print_header, sync  # noqa: E402
from lora import apply_lora  # noqa: E402
from model import FAMILIES, GPT, GPTConfig, configure_optimizer, setup_runtime  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch-size", type=int, default=16, help="pairs per step (reward.py's default)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per setting and round")
    p.add_argument("--repeats", type=int, default=3, help="rounds; figures are medians")
    p.add_argument("--quick", action="store_true", help="2 steps, 1 round")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="as the stages")
    args = p.parse_args()
    if args.quick:
        args.steps, args.repeats = 2, 1
    rt = setup_runtime(args.device, args.dtype)
    print_header("bench_reward: pairs per second, training and scoring, full and LoRA", rt.device)
    world = os.path.join(data.DATA_DIR, "world")
    tok = data.load_tokenizer(os.path.join(world, "tokenizer.json"))
    enc = data.get_encoding(tok)
    pairs, _ = data.read_preference_pairs(os.path.join(world, "prefs.jsonl"))
    rows = [data.render_pair(enc, pair) for pair in pairs]
    batches = [rows[i:i + args.batch_size] for i in range(0, len(rows) - args.batch_size + 1, args.batch_size)]
    d = reward.get_args([])

    def build(lora_r):
        torch.manual_seed(0)
        config = GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=128, vocab_size=data.model_vocab_size(tok),
                           score_head=True, **FAMILIES["modern"])
        model = GPT(config).to(rt.device)
        if lora_r:
            apply_lora(model, lora_r, d.lora_alpha, 0.0, d.lora_targets, modules_to_save=("score_head",))
        return model, configure_optimizer(model, 1e-4, 0.0, device_type=rt.device.type)

    def scores(model, batch):
        both = [(p, c) for p, c, _ in batch] + [(p, r) for p, _, r in batch]
        s = data.score_sequences(model.scores, both, enc.eot_token, rt.device)
        return s[:len(batch)], s[len(batch):]

    def train_step(model, optimizer, batch):
        with rt.autocast():
            chosen, rejected = scores(model, batch)
            loss = reward.bradley_terry_loss(chosen.float(), rejected.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def score_step(model, optimizer, batch):
        with rt.autocast():
            scores(model, batch)

    settings = {(mode, kind): (build(8 if mode == "LoRA r=8" else 0), fn)
                for mode in ("full", "LoRA r=8") for kind, fn in (("train", train_step), ("score", score_step))}
    rates = {key: [] for key in settings}
    for r in range(args.repeats):
        for key, ((model, optimizer), fn) in settings.items():
            model.train(key[1] == "train")
            fn(model, optimizer, batches[0])  # warm-up
            sync(rt.device)
            t0 = time.perf_counter()
            for i in range(args.steps):
                fn(model, optimizer, batches[i % len(batches)])
            sync(rt.device)
            rates[key].append(args.steps * args.batch_size / (time.perf_counter() - t0))
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{m} {k} {v[-1]:,.0f}" for (m, k), v in rates.items()))
    mean_len = statistics.mean(len(p) + (len(c) + len(r_)) / 2 for p, c, r_ in rows)
    print(f"\n{len(rows)} world pairs, batch {args.batch_size} pairs, mean prompt + response {mean_len:.1f} tokens; "
          f"{str(rt.dtype).removeprefix('torch.')} ({rt.why})")
    print(f"{'':10} {'train pairs/s':>14} {'score pairs/s':>14} {'trainable':>12}")
    for mode in ("full", "LoRA r=8"):
        model = settings[(mode, "train")][0][0]
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{mode:10} {statistics.median(rates[(mode, 'train')]):14,.0f} "
              f"{statistics.median(rates[(mode, 'score')]):14,.0f} {n:12,}")
    print(f"\ncommand: {command_line('bench/bench_reward.py', None)}")


if __name__ == "__main__":
    main()
