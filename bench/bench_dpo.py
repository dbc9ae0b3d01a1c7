"""
Benchmark: DPO training throughput and memory, with the reference cached or computed on the fly.

What it measures: pairs per second of dpo.py's training step (policy log-probs of chosen and rejected
in one forward pass, dpo_loss, backward, AdamW) in three settings: full fine-tuning with the reference's
log-probs cached before training; LoRA r=8 with them cached; LoRA r=8 with the reference computed on the
fly as the same model with its adapters disabled (one more forward pass per step, no gradient). Memory:
what each setting holds for π_ref (cached: 2 numbers per pair; on the fly: nothing; a second model copy,
which neither needs: its weights) and the AdamW state of what trains. The pairs are the tiny world's;
the model has pretrain.py's default shape with random weights. Medians over --repeats rounds.

  python bench/bench_dpo.py                  # CPU, about a minute on 2 cores
  python bench/bench_dpo.py --quick          # seconds
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
import dpo  # noqa: E402
from bench_pretrain import command_line, print_header, sync  # noqa: E402
from lora import apply_lora, lora_disabled  # noqa: E402
from model import FAMILIES, GPT, GPTConfig, configure_optimizer, setup_runtime  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch-size", type=int, default=16, help="pairs per step (dpo.py's default)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per setting and round")
    p.add_argument("--repeats", type=int, default=3, help="rounds; figures are medians")
    p.add_argument("--quick", action="store_true", help="2 steps, 1 round")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="as the stages")
    args = p.parse_args()
    if args.quick:
        args.steps, args.repeats = 2, 1
    rt = setup_runtime(args.device, args.dtype)
    print_header("bench_dpo: pairs per second and memory, reference cached or on the fly", rt.device)
    world = os.path.join(data.DATA_DIR, "world")
    tok = data.load_tokenizer(os.path.join(world, "tokenizer.json"))
    enc = data.get_encoding(tok)
    pairs, _ = data.read_preference_pairs(os.path.join(world, "prefs.jsonl"))
    rows = [data.render_pair(enc, pair) for pair in pairs]
    batches = [rows[i:i + args.batch_size] for i in range(0, len(rows) - args.batch_size + 1, args.batch_size)]

    def build(lora_r):
        torch.manual_seed(0)
        config = GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=128, vocab_size=data.model_vocab_size(tok),
                           **FAMILIES["modern"])
        model = GPT(config).to(rt.device).train()
        if lora_r:
            apply_lora(model, lora_r, 16.0, 0.0, ("attn.qkv", "attn.proj"))
        return model, configure_optimizer(model, 1e-5, 0.0, device_type=rt.device.type)

    def logps(model, batch):
        both = [(q, c) for q, c, _ in batch] + [(q, r) for q, _, r in batch]
        out = dpo.sequence_logps(model.logprobs_of, both, enc.eot_token, rt.device)
        return out[:len(batch)], out[len(batch):]

    settings = {"full, cached": (build(0), "cached"), "LoRA r=8, cached": (build(8), "cached"),
                "LoRA r=8, on the fly": (build(8), "lora")}
    cached = {}  # the reference's log-probs of every pair, as dpo.py computes them before training
    with torch.no_grad(), rt.autocast():
        for i, batch in enumerate(batches):
            cached[i] = tuple(t.float() for t in logps(settings["full, cached"][0][0], batch))

    def step(model, optimizer, ref, i):
        batch = batches[i % len(batches)]
        if ref == "cached":
            ref_c, ref_r = cached[i % len(batches)]
        else:
            with torch.no_grad(), lora_disabled(model), rt.autocast():
                ref_c, ref_r = (t.float() for t in logps(model, batch))
        with rt.autocast():
            c, r = logps(model, batch)
            losses, _, _ = dpo.dpo_loss(c.float(), r.float(), ref_c, ref_r)
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    rates = {name: [] for name in settings}
    for rnd in range(args.repeats):
        for name, ((model, optimizer), ref) in settings.items():
            step(model, optimizer, ref, 0)  # warm-up
            sync(rt.device)
            t0 = time.perf_counter()
            for i in range(args.steps):
                step(model, optimizer, ref, i)
            sync(rt.device)
            rates[name].append(args.steps * args.batch_size / (time.perf_counter() - t0))
        print(f"round {rnd + 1}/{args.repeats}: " + ", ".join(f"{n} {v[-1]:,.0f}" for n, v in rates.items()))

    print(f"\n{len(rows)} world pairs, batch {args.batch_size}; {str(rt.dtype).removeprefix('torch.')} ({rt.why})")
    print(f"{'':22} {'pairs/s':>8} {'π_ref memory':>14} {'AdamW state':>12}")
    for name, ((model, optimizer), ref) in settings.items():
        opt_mb = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                     if torch.is_tensor(t) and t.dim() > 0) / 2 ** 20
        ref_mb = 2 * 4 * len(rows) / 2 ** 20 if ref == "cached" else 0.0
        print(f"{name:22} {statistics.median(rates[name]):8,.0f} {ref_mb:11.3f} MB {opt_mb:9.2f} MB")
    second = sum(p.numel() * p.element_size() for p in settings["full, cached"][0][0].parameters()) / 2 ** 20
    print(f"a second model as π_ref (which neither needs) would hold {second:.1f} MB of weights")
    print(f"\ncommand: {command_line('bench/bench_dpo.py', None)}")


if __name__ == "__main__":
    main()
