"""
Benchmark: full fine-tuning vs LoRA, and packing vs padding, for instruction tuning (sft.py).

1. Full fine-tuning, LoRA r=8 and LoRA r=64 on the same model and batch: trainable parameters,
   optimizer-state bytes (AdamW keeps two fp32 moments per trainable parameter, so LoRA should cut
   them by the ratio of trainable parameters), peak memory of the process (RSS on CPU, or
   torch.cuda.max_memory_allocated on a GPU), and tokens/s of full optimizer steps. Each configuration
   runs in a fresh process (peak memory is per process), alternating over --repeats rounds; medians.
2. Packing vs padding on the bundled Alpaca-Libre data: reply-and-prompt tokens (not padding) per
   second through full fine-tuning steps, and the share of each batch that is padding.

The model is pretrain.py's default shape with a 256-token context (random weights: speed and memory
do not depend on the values), or GPT-2 124M / 355M shapes with --gpt2 124m|355m (on a GPU).

  python bench/bench_sft.py                 # CPU, ~5 minutes on 2 cores
  python bench/bench_sft.py --gpt2 124m --device cuda
  python bench/bench_sft.py --quick         # seconds: checks the script runs
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

import data  # noqa: E402
import pretrain  # noqa: E402
from lora import apply_lora  # noqa: E402
from model import FAMILIES, GPT, GPTConfig, configure_optimizer, setup_runtime  # noqa: E402

GPT2_SHAPES = {"124m": dict(n_layer=12, n_head=12, n_embd=768), "355m": dict(n_layer=24, n_head=16, n_embd=1024)}


def build_model(args):
    if args.gpt2:
        cfg = GPTConfig(block_size=args.block_size, **GPT2_SHAPES[args.gpt2], **FAMILIES["gpt2"])
    else:
        d = pretrain.get_args([])
        size = dict(n_layer=2, n_head=2, n_embd=64) if args.quick else dict(n_layer=d.n_layer, n_head=d.n_head, n_embd=d.n_embd)
        cfg = GPTConfig(block_size=args.block_size, **size, **FAMILIES[d.family])
    return GPT(cfg)


def one_config(args):
    """Run one configuration (--mode) in this process and print its figures as one JSON line."""
    rt = setup_runtime(args.device, args.dtype)
    model = build_model(args)
    if args.mode != "full":
        apply_lora(model, r=int(args.mode.removeprefix("lora")), alpha=16)
    model.to(rt.device).train()
    optimizer = configure_optimizer(model, 1e-4, 0.0, device_type=rt.device.type)
    x = torch.randint(0, 50257, (args.batch_size, args.block_size), device=rt.device)

    def step():
        with rt.autocast():
            _, loss = model(x, x)
        rt.scaler.scale(loss).backward()
        rt.scaler.step(optimizer)
        rt.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    dt = (time.perf_counter() - t0) / args.steps
    opt_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                    if torch.is_tensor(t) and t.dim() > 0)
    peak_mb = (torch.cuda.max_memory_allocated() / 2 ** 20 if rt.device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # ru_maxrss is in kB on Linux
    print(json.dumps({"mode": args.mode, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                      "total": sum(p.numel() for p in model.parameters()), "opt_mb": opt_bytes / 2 ** 20,
                      "peak_mb": peak_mb, "tok_s": args.batch_size * args.block_size / dt}))


def packing_vs_padding(args):
    """Real (non-padding) tokens per second of full fine-tuning on Alpaca-Libre, padded vs packed."""
    rt = setup_runtime(args.device, args.dtype)
    enc = data.get_encoding(data.gpt2_tokenizer())
    model = build_model(args).to(rt.device).train()
    optimizer = configure_optimizer(model, 1e-4, 0.0, device_type=rt.device.type)
    examples = []
    for messages in data.read_chat_records(os.path.join(ROOT, "data", "alpaca_libre_2k.jsonl")):
        ids, labels, _ = data.fit_to_length(*data.render_chat(enc, messages), args.block_size + 1)
        if ids is not None:
            examples.append((ids, labels))
    examples = examples[:400 if not args.quick else 40]
    packed = data.pack_examples(examples, args.block_size, enc.eot_token)
    batches = {"padding": [examples[i:i + args.batch_size] for i in range(0, len(examples), args.batch_size)],
               "packing": [packed[i:i + args.batch_size] for i in range(0, len(packed), args.batch_size)]}
    real = sum(len(ids) - 1 for ids, _ in examples)  # tokens that carry data, the same for both
    rates = {name: [] for name in batches}
    for _ in range(args.repeats):
        for name, bs in batches.items():
            n_batches = min(len(bs), args.steps)
            t0 = time.perf_counter()
            slots = 0
            for batch in bs[:n_batches]:
                x, y = data.pad_batch(batch, enc.eot_token)
                slots += x.numel()
                with rt.autocast():
                    _, loss = model(x.to(rt.device), y.to(rt.device))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            real_done = real * n_batches / len(bs)  # this many examples' tokens went through
            rates[name].append((real_done / (time.perf_counter() - t0), 1 - real_done / slots))
    print(f"\npacking vs padding: {len(examples)} Alpaca-Libre examples, block {args.block_size}, batch {args.batch_size}")
    print(f"{'':10} {'real tok/s':>11} {'padding':>8}")
    for name, r in rates.items():
        print(f"{name:10} {statistics.median(v for v, _ in r):11,.0f} {statistics.median(p for _, p in r):8.1%}")
    ratio = statistics.median(p[0] / q[0] for p, q in zip(rates["packing"], rates["padding"]))
    print(f"packing / padding real-token throughput: {ratio:.2f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--gpt2", default="", choices=["", "124m", "355m"], help="GPT-2 shape instead of pretrain.py's default")
    p.add_argument("--block-size", type=int, default=256, help="context T")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--steps", type=int, default=4, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=2, help="rounds; figures are medians")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quick", action="store_true", help="tiny model and data: checks the script runs")
    p.add_argument("--mode", default="", help=argparse.SUPPRESS)  # internal: one configuration per process
    args = p.parse_args()
    if args.quick:
        args.block_size, args.batch_size, args.steps, args.repeats = 64, 4, 2, 1
    if args.mode:
        return one_config(args)

    print(f"# bench_sft  {time.strftime('%Y-%m-%d %H:%M')}  torch {torch.__version__}, {torch.get_num_threads()} threads")
    forwarded = [a for a in sys.argv[1:] if a != "--quick"] + (["--quick"] if args.quick else [])
    results = {m: [] for m in ("full", "lora8", "lora64")}
    for _ in range(args.repeats):
        for mode in results:
            out = subprocess.run([sys.executable, __file__, *forwarded, "--mode", mode], capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(out.stderr[-2000:])
            results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\nbatch {args.batch_size} x {args.block_size} tokens, {args.steps} timed steps, median of {args.repeats} rounds")
    print(f"{'':8} {'trainable':>12} {'share':>7} {'optim MB':>9} {'peak MB':>8} {'tok/s':>8}")
    for mode, rs in results.items():
        r = rs[0]
        print(f"{mode:8} {r['trainable']:12,} {r['trainable'] / r['total']:7.2%} {r['opt_mb']:9.2f} "
              f"{statistics.median(x['peak_mb'] for x in rs):8.0f} {statistics.median(x['tok_s'] for x in rs):8,.0f}")
    full, l8 = results["full"][0], results["lora8"][0]
    print(f"optimizer state full / LoRA r=8: {full['opt_mb'] / l8['opt_mb']:.0f}x; "
          f"trainable parameters full / LoRA r=8: {full['trainable'] / l8['trainable']:.0f}x")
    packing_vs_padding(args)
    print("command: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
