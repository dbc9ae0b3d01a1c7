"""
Benchmark: generation speed with and without the KV cache.

What it measures: tokens/s of model.GPT.generate producing --new-tokens tokens after a 5-token
prompt, greedy (temperature 0), batch 1, fp32, with use_cache=True and use_cache=False. Without the
cache every new token reruns the network over the whole sequence so far, so the cost of step t
grows with t; with it, only the newest token goes through the network and attends to the stored
keys and values. The two settings alternate, --repeats times each, and the median is reported.
Greedy decoding is deterministic, so both must return the same tokens; the script checks that.

The model is pretrain.py's default width and depth with randomly initialised weights (the speed
does not depend on the weights) and a 1024-token context, so 500 new tokens fit without sliding.

Target: the KV cache is at least 10x faster on CPU at 500 new tokens.

  python bench/bench_generate.py                 # CPU figures, a few minutes on 2 cores
  python bench/bench_generate.py --device cuda
  python bench/bench_generate.py --quick         # smaller model and 100 tokens, seconds
"""

import argparse
import os
import statistics
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import data  # noqa: E402  (needs REPO_ROOT on the path)
import pretrain  # noqa: E402
from bench_pretrain import command_line, print_header, sync  # noqa: E402  (this folder: sys.path[0])
from model import FAMILIES, GPT, GPTConfig, setup_runtime  # noqa: E402

PROMPT = "To be or not to"  # 5 GPT-2 tokens
QUICK = dict(n_layer=2, n_head=2, n_embd=64, block_size=256, new_tokens=100, repeats=2)


def get_args(argv=None):
    d = pretrain.get_args([])  # the defaults pretrain.py trains with
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # model (width and depth: pretrain.py's defaults)
    p.add_argument("--family", default=d.family, choices=list(FAMILIES), help="gpt2 or modern (see model.FAMILIES)")
    p.add_argument("--n-layer", type=int, default=d.n_layer, help="Transformer blocks")
    p.add_argument("--n-head", type=int, default=d.n_head, help="attention heads (H); must divide --n-embd")
    p.add_argument("--n-embd", type=int, default=d.n_embd, help="width C")
    p.add_argument("--block-size", type=int, default=1024, help="context length; at least prompt + --new-tokens")
    # measurement
    p.add_argument("--new-tokens", type=int, default=500, help="tokens generated per run")
    p.add_argument("--repeats", type=int, default=3, help="runs of each setting; figures are medians")
    p.add_argument("--quick", action="store_true", help=f"smaller model and fewer tokens, seconds on a CPU: {QUICK}")
    # system
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    args = p.parse_args(argv)
    if args.quick:  # changes the defaults, so flags given explicitly still win
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    return args


def main(argv=None):
    args = get_args(argv)

    # ---- setup: fp32, so that the cached and uncached paths can be compared token for token -----
    rt = setup_runtime(args.device, "float32")
    print_header("bench_generate: generation with and without the KV cache", rt.device)
    enc = data.get_encoding(data.gpt2_tokenizer())
    prompt = torch.tensor([data.encode(enc, PROMPT)], device=rt.device)  # (1, Tp)
    if prompt.size(1) + args.new_tokens > args.block_size:
        sys.exit(f"--block-size {args.block_size} < prompt ({prompt.size(1)}) + --new-tokens ({args.new_tokens}): "
                 "generation would slide the window and stop using the cache")
    config = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
                       **FAMILIES[args.family])
    model = GPT(config).to(rt.device).eval()

    # ---- warmup, then alternate the two settings --------------------------------------------
    for use_cache in (True, False):
        model.generate(prompt, 8, temperature=0, use_cache=use_cache)
    seconds = {True: [], False: []}
    outputs = {}
    for r in range(args.repeats):
        for use_cache in (True, False):
            sync(rt.device)
            t0 = time.perf_counter()
            outputs[use_cache] = model.generate(prompt, args.new_tokens, temperature=0,
                                                use_cache=use_cache)  # (1, Tp) -> (1, Tp + new)
            sync(rt.device)
            seconds[use_cache].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.repeats}: cache {seconds[True][-1]:.2f} s, no cache {seconds[False][-1]:.2f} s")

    # ---- report ------------------------------------------------------------------------------
    print(f"\nmodel: {args.family}, {args.n_layer} layers, {args.n_head} heads, width {args.n_embd}, "
          f"context {args.block_size}, vocab {config.vocab_size}, {model.num_params() / 1e6:.2f}M params; "
          "fp32, batch 1, greedy")
    print(f"generating {args.new_tokens} tokens after a {prompt.size(1)}-token prompt ({PROMPT!r}), "
          f"median of {args.repeats} runs")
    print(f"{'KV cache':<10}{'seconds':>10}{'ms/token':>10}{'tok/s':>10}")
    tok_s = {}
    for use_cache in (True, False):
        s = statistics.median(seconds[use_cache])
        tok_s[use_cache] = args.new_tokens / s
        print(f"{'on' if use_cache else 'off':<10}{s:>10.2f}{1000 * s / args.new_tokens:>10.2f}"
              f"{tok_s[use_cache]:>10,.1f}")
    speedup = statistics.median(off / on for on, off in zip(seconds[True], seconds[False]))  # per-round ratios
    print(f"speed-up with the cache: {speedup:.1f}x (median of the per-round ratios)")
    new_on, new_off = outputs[True][0, prompt.size(1):], outputs[False][0, prompt.size(1):]
    same = torch.equal(new_on, new_off)
    first_diff = "" if same else f"; first difference at new token {int((new_on != new_off).nonzero()[0])}"
    print(f"same tokens with and without the cache: {'yes' if same else 'NO'} "
          f"({int((new_on == new_off).sum())}/{args.new_tokens} equal{first_diff})")
    if rt.device.type == "cpu":
        note = "" if args.new_tokens == 500 and not args.quick else " (--quick or not 500 tokens: not the figure)"
        print(f"target: speed-up >= 10x on CPU at 500 new tokens: {speedup:.1f}x, "
              f"{'met' if speedup >= 10 else 'not met'}{note}")
    print(f"\ncommand: {command_line('bench/bench_generate.py', argv)}")
    return {"tok_s_cache": tok_s[True], "tok_s_no_cache": tok_s[False], "speedup": speedup, "same_tokens": same}


if __name__ == "__main__":
    main()
