"""
Benchmark: generation speed: the KV cache, batched prompts, and decoding against memory bandwidth.

Three parts, picked with --part (default all). Settings alternate round by round, --repeats rounds,
and every figure is a median over rounds. Models have random weights: the speed does not depend on them.

cache: tokens/s of model.GPT.generate producing --new-tokens tokens after a 5-token prompt, greedy
  (temperature 0), batch 1, fp32, with use_cache=True and use_cache=False. Without the cache every
  new token reruns the network over the whole sequence so far, so the cost of step t grows with t;
  with it, only the newest token goes through the network and attends to the stored keys and
  values. Greedy decoding is deterministic, so both must return the same tokens; the script checks
  that. Model: pretrain.py's default width and depth, GPT-2's vocabulary (50,304) and a 1024-token
  context, so 500 new tokens fit without sliding.

batched: tokens/s of --batch prompts of 8 to 64 random tokens (lengths and ids from a seeded
  generator), 64 new tokens each, greedy, fp32, with the KV cache: all at once, left-padded
  (data.left_pad) with pad_mask, against one prompt at a time. Tokens/s counts generated tokens only
  (batch · 64 / seconds). A decode step at batch 1 is a matrix-vector product per weight matrix,
  bound by reading the weights; at batch 32 the same read serves 32 rows. Each row of the batch must
  produce the tokens it produces alone; the script counts the rows that do and prints the largest
  difference of the first position's logits. Model: as in cache, with a 256-token context.

bandwidth: decoding one sequence against its physical limit. The read bandwidth is the best of
  several x.sum() over a --bandwidth-mb MiB fp32 tensor (it reads every byte once and writes one
  number). Then, for pretrain.py's default shape (vocabulary 4,096, as the default data chain
  trains it; context 256) and GPT-2 124M's (12 layers, 12 heads, width 768, vocabulary 50,304,
  context 1024, gpt2 family), in fp32 and bf16, tokens/s of --decode-steps steps of model.stream
  after an untimed 8-token prefill. bf16 converts the weights (model.to(torch.bfloat16)), not
  autocast, so the bytes read per token really halve. Bytes per token: every weight but the
  embeddings, lm_head's V×C matrix (tied: the embedding, counted once), one embedding row (and one
  position row), and the keys and values attended to (at the mean length of the timed steps).
  Roofline tokens/s = bandwidth / bytes per token. The default shape's 17.6 MB of fp32 weights could
  sit in a 32 MB L3 cache and its steps are short enough for per-operation overhead to matter, so
  the target is set at GPT-2 124M's shape, whose 0.5 GB per token must come from memory.

Targets (CPU): cache at least 10x faster at 500 new tokens; batched at least 8x faster than one at
a time on 2 cores; bandwidth at least 50% of the roofline at the GPT-2 124M shape.

  python bench/bench_generate.py                 # CPU figures, several minutes on 2 cores
  python bench/bench_generate.py --part batched  # one part: cache, batched or bandwidth
  python bench/bench_generate.py --device cuda
  python bench/bench_generate.py --quick         # small models, fewer tokens, seconds
"""

import argparse
import copy
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
PROMPT_LENGTHS, BATCHED_NEW = (8, 64), 64  # batched: prompt lengths drawn from [8, 64]; new tokens per row
GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304, block_size=1024, **FAMILIES["gpt2"])
QUICK = dict(n_layer=2, n_head=2, n_embd=64, block_size=256, new_tokens=100, repeats=2, batch=8,
             decode_steps=16, bandwidth_mb=64)
GPT2_QUICK = dict(GPT2_124M, n_layer=2, n_head=2, n_embd=128, vocab_size=4096, block_size=256)  # --quick's stand-in


def timed(device, fn, *args, **kwargs):
    """(seconds, result) of fn(*args, **kwargs), waiting for queued GPU work on both sides."""
    sync(device)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    sync(device)
    return time.perf_counter() - t0, out


def part_cache(args, rt, model_config):
    """KV cache on and off at batch 1."""
    enc = data.get_encoding(data.gpt2_tokenizer())
    prompt = torch.tensor([data.encode(enc, PROMPT)], device=rt.device)  # (1, Tp)
    if prompt.size(1) + args.new_tokens > args.block_size:
        sys.exit(f"--block-size {args.block_size} < prompt ({prompt.size(1)}) + --new-tokens ({args.new_tokens}): "
                 "generation would slide the window and stop using the cache")
    model = GPT(model_config(block_size=args.block_size)).to(rt.device).eval()
    for use_cache in (True, False):  # warmup
        model.generate(prompt, 8, temperature=0, use_cache=use_cache)
    seconds, outputs = {True: [], False: []}, {}
    for r in range(args.repeats):
        for use_cache in (True, False):
            s, outputs[use_cache] = timed(rt.device, model.generate, prompt, args.new_tokens, temperature=0,
                                          use_cache=use_cache)  # (1, Tp) -> (1, Tp + new)
            seconds[use_cache].append(s)
        print(f"round {r + 1}/{args.repeats}: cache {seconds[True][-1]:.2f} s, no cache {seconds[False][-1]:.2f} s")

    c = model.config
    print(f"\nmodel: {args.family}, {c.n_layer} layers, {c.n_head} heads, width {c.n_embd}, context {c.block_size}, "
          f"vocab {c.vocab_size}, {model.num_params() / 1e6:.2f}M params; fp32, batch 1, greedy")
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
    return {"tok_s_cache": tok_s[True], "tok_s_no_cache": tok_s[False], "speedup": speedup, "same_tokens": same}


def part_batched(args, rt, model_config):
    """--batch prompts of mixed lengths: all at once (left-padded) against one at a time."""
    model = GPT(model_config(block_size=256)).to(rt.device).eval()
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(PROMPT_LENGTHS[0], PROMPT_LENGTHS[1] + 1, (args.batch,), generator=g).tolist()
    prompts = [torch.randint(model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]
    ids, pad_mask = (t.to(rt.device) for t in data.left_pad(prompts, pad_id=0))  # (B, T) each
    alone = [torch.tensor([p], device=rt.device) for p in prompts]              # (1, Tp) each
    def batched(n):  # all rows at once -> (B, n) new tokens
        return model.generate(ids, n, temperature=0, pad_mask=pad_mask)[:, ids.size(1):]

    def one_at_a_time(n):  # the same rows, one generate call each -> (B, n)
        return torch.cat([model.generate(p, n, temperature=0)[:, p.size(1):] for p in alone])

    run = {"batched": batched, "one at a time": one_at_a_time}
    for fn in run.values():  # warmup
        fn(4)
    seconds, outputs = {k: [] for k in run}, {}
    for r in range(args.repeats):
        for name, fn in run.items():
            s, outputs[name] = timed(rt.device, fn, BATCHED_NEW)
            seconds[name].append(s)
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in seconds.items()))

    c, n_new = model.config, args.batch * BATCHED_NEW
    print(f"\nmodel: {args.family}, {c.n_layer} layers, {c.n_head} heads, width {c.n_embd}, context {c.block_size}, "
          f"vocab {c.vocab_size}, {model.num_params() / 1e6:.2f}M params; fp32, greedy, KV cache")
    print(f"{args.batch} prompts of {min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.1f}), "
          f"{BATCHED_NEW} new tokens each, median of {args.repeats} runs")
    print(f"{'prompts':<15}{'seconds':>10}{'tok/s':>10}")
    for name in run:
        s = statistics.median(seconds[name])
        print(f"{name:<15}{s:>10.2f}{n_new / s:>10,.1f}")
    speedup = statistics.median(a / b for a, b in zip(seconds["one at a time"], seconds["batched"]))
    print(f"speed-up of the batch: {speedup:.1f}x (median of the per-round ratios)")
    rows_same = int((outputs["batched"] == outputs["one at a time"]).all(1).sum())
    with torch.no_grad():  # the logits predicting the first new token, padded batch against alone
        first_b = model.lm_head(model.hidden_states(ids, pad_mask=pad_mask)[:, -1])          # (B, V)
        first_a = torch.cat([model.lm_head(model.hidden_states(p)[:, -1]) for p in alone])  # (B, V)
    diff = float((first_b - first_a).abs().max())
    print(f"rows with the same tokens batched and alone: {rows_same}/{args.batch}; first-position logits: "
          f"max |difference| {diff:.1e} ({'within' if diff <= 1e-4 else 'OVER'} 1e-4)")
    if rt.device.type == "cpu":
        note = " (--quick: not the figure)" if args.quick else ""
        print(f"target: batch of 32 >= 8x faster than one at a time on 2 CPU cores: {speedup:.1f}x, "
              f"{'met' if speedup >= 8 else 'not met'}{note}")
    return {"tok_s": {k: n_new / statistics.median(v) for k, v in seconds.items()}, "speedup": speedup,
            "rows_same": rows_same, "first_logit_diff": diff}


def bytes_per_token(model, kv_len):
    """Bytes one decode step reads: every weight but the embeddings, lm_head's V×C matrix (the tied
    embedding counted once), one embedding row (and position row), the keys and values of kv_len tokens."""
    c = model.config
    n = sum(p.numel() for name, p in model.named_parameters() if not name.endswith("_emb.weight"))
    n += model.lm_head.weight.numel() if c.tie_embeddings else 0  # tied: listed above as tok_emb.weight
    n += c.n_embd * (2 if model.pos_emb is not None else 1)
    n += 2 * c.n_layer * c.n_kv_head * (c.n_embd // c.n_head) * kv_len
    return n * model.lm_head.weight.element_size()


def decode_seconds(model, prompt, steps, device):
    """Seconds of `steps` decode steps of model.stream, after the prompt's prefill (untimed)."""
    tokens = model.stream(prompt, steps + 1, temperature=0)
    next(tokens)  # prefill, and the first new token
    return timed(device, list, tokens)[0]


def part_bandwidth(args, rt, model_config):
    """Batch-1 decoding tokens/s against memory read bandwidth / bytes read per token."""
    shapes = {"default": model_config(vocab_size=4096, block_size=256),
              "gpt2-124m": GPTConfig(**(GPT2_QUICK if args.quick else GPT2_124M))}
    runs = {}  # (shape, dtype) -> model
    for shape, config in shapes.items():
        model = GPT(config).to(rt.device).eval()
        runs[shape, "fp32"], runs[shape, "bf16"] = model, copy.deepcopy(model).to(torch.bfloat16)
    prompt = torch.randint(4096, (1, 8), generator=torch.Generator().manual_seed(0)).to(rt.device)  # (1, 8)
    x = torch.ones(args.bandwidth_mb * 2 ** 20 // 4, device=rt.device)  # fp32
    with torch.inference_mode():
        for model in runs.values():  # warmup
            decode_seconds(model, prompt, 4, rt.device)
        bandwidth, seconds = [], {k: [] for k in runs}
        for r in range(args.repeats):
            bandwidth.append(max(x.numel() * 4 / timed(rt.device, x.sum)[0] for _ in range(5)))
            for key, model in runs.items():
                seconds[key].append(decode_seconds(model, prompt, args.decode_steps, rt.device))
            ms = ", ".join(f"{s} {d} {1000 * v[-1] / args.decode_steps:.1f}" for (s, d), v in seconds.items())
            print(f"round {r + 1}/{args.repeats}: read {bandwidth[-1] / 1e9:.1f} GB/s; ms/token: {ms}")

    bw = max(bandwidth)
    print(f"\nread bandwidth: {bw / 1e9:.1f} GB/s (best x.sum() over {args.bandwidth_mb} MiB of fp32, 5 per round)")
    print(f"batch 1, greedy, KV cache: {args.decode_steps} decode steps after an 8-token prompt, "
          f"median of {args.repeats} runs; bf16 = weights in bf16")
    print(f"{'shape':<11}{'dtype':<6}{'params':>9}{'MB/token':>10}{'ms/token':>10}{'tok/s':>9}"
          f"{'roofline':>10}{'achieved':>10}")
    fraction = {}
    kv_len = prompt.size(1) + (args.decode_steps + 1) / 2  # mean keys attended to over the timed steps
    for (shape, dtype), model in runs.items():
        s = statistics.median(seconds[shape, dtype]) / args.decode_steps
        nbytes = bytes_per_token(model, kv_len)
        fraction[shape, dtype] = (1 / s) / (bw / nbytes)
        print(f"{shape:<11}{dtype:<6}{model.num_params() / 1e6:>8.1f}M{nbytes / 1e6:>10.1f}{1000 * s:>10.2f}"
              f"{1 / s:>9,.1f}{bw / nbytes:>10,.1f}{fraction[shape, dtype]:>10.0%}")
    print("roofline = read bandwidth / bytes per token (tok/s); achieved = tok/s / roofline")
    if rt.device.type == "cpu":
        got = ", ".join(f"{d} {fraction['gpt2-124m', d]:.0%}" for d in ("fp32", "bf16"))
        met = all(fraction["gpt2-124m", d] >= 0.5 for d in ("fp32", "bf16"))
        note = " (--quick: shrunk shape, not the figure)" if args.quick else ""
        print(f"target: >= 50% of the roofline at the GPT-2 124M shape: {got}, {'met' if met else 'not met'}{note}")
    return {"bandwidth": bw, "fraction": fraction}


PARTS = {"cache": part_cache, "batched": part_batched, "bandwidth": part_bandwidth}


def get_args(argv=None):
    d = pretrain.get_args([])  # the defaults pretrain.py trains with
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--part", default="all", choices=[*PARTS, "all"], help="which measurement to run")
    # model (width and depth: pretrain.py's defaults)
    p.add_argument("--family", default=d.family, choices=list(FAMILIES), help="gpt2 or modern (see model.FAMILIES)")
    p.add_argument("--n-layer", type=int, default=d.n_layer, help="Transformer blocks")
    p.add_argument("--n-head", type=int, default=d.n_head, help="attention heads (H); must divide --n-embd")
    p.add_argument("--n-embd", type=int, default=d.n_embd, help="width C")
    p.add_argument("--block-size", type=int, default=1024, help="cache part: context length; >= prompt + --new-tokens")
    # measurement
    p.add_argument("--new-tokens", type=int, default=500, help="cache part: tokens generated per run")
    p.add_argument("--batch", type=int, default=32, help="batched part: prompts, generated together or one by one")
    p.add_argument("--decode-steps", type=int, default=128, help="bandwidth part: timed decode steps per run")
    p.add_argument("--bandwidth-mb", type=int, default=1024, help="bandwidth part: MiB of fp32 summed to measure reads")
    p.add_argument("--repeats", type=int, default=3, help="runs of each setting; figures are medians")
    p.add_argument("--quick", action="store_true", help=f"smaller models and fewer tokens, seconds on a CPU: {QUICK}")
    # system
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    args = p.parse_args(argv)
    if args.quick:  # changes the defaults, so flags given explicitly still win
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    return args


def main(argv=None):
    args = get_args(argv)
    # fp32 runtime, no autocast: cached, uncached, batched and alone can be compared token for token
    rt = setup_runtime(args.device, "float32")
    print_header("bench_generate: the KV cache, batched prompts, decoding against memory bandwidth", rt.device)

    def model_config(**kw):  # pretrain.py's width and depth; GPT-2's vocabulary unless kw says otherwise
        return GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, **FAMILIES[args.family], **kw)

    results = {}
    for name, part in PARTS.items():
        if args.part in (name, "all"):
            print(f"\n---- {name} " + "-" * 60)
            results[name] = part(args, rt, model_config)
            print(f"\ncommand: {command_line('bench/bench_generate.py', argv)}")
    return results


if __name__ == "__main__":
    main()
