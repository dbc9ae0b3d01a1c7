"""
Benchmark: pretraining throughput (tokens/s) and model FLOPs utilisation (MFU).

What it measures, in one run, with the configurations interleaved round by round (machines are
noisy, so only figures taken side by side are compared) and the median of --repeats rounds reported:
  1. the matmul peak of each dtype on this machine: FLOP/s of an (n, n) @ (n, n) product, 2n³ FLOPs,
     in fp32 and bf16 (and fp16 on CUDA). fp32 on CUDA runs as TF32, as setup_runtime asks for.
  2. training throughput of pretrain.py's default model: full optimizer steps (forward with targets,
     backward, gradient clipping, AdamW step, zero_grad) on random token batches after --warmup
     untimed steps, in fp32 and under bf16 autocast. The model, optimizer and runtime are built as
     pretrain.main builds them; data loading is left out.
  MFU = flops_per_token() · tokens/s / peak of the training dtype (PaLM paper, Appendix B), against
  the peak measured in step 1. The last column is the MFU pretrain.py itself prints: against
  model.peak_flops (a vendor datasheet figure on known GPUs, a short 1024-wide matmul elsewhere).

With --gpt2-124m it trains GPT-2 124M (12 layers, 12 heads, width 768, context 1024, vocabulary
50304) in bf16 with torch.compile on CUDA instead, and the MFU to read is the last column.

Targets:
  CPU, default config: fp32 MFU >= 50% of the fp32 matmul peak measured in the same run.
  H100, --gpt2-124m:    MFU >= 45% of the 989 TFLOP/s bf16 datasheet peak.
On CPUs without AVX512-BF16 or AMX, bf16 matmuls are emulated and may be several times slower
than fp32; the bf16 rows report what is measured.

  python bench/bench_pretrain.py                 # CPU figures, a few minutes on 2 cores
  python bench/bench_pretrain.py --gpt2-124m     # one CUDA GPU
  python bench/bench_pretrain.py --quick         # tiny shapes, no compile, seconds: checks the script runs
"""

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import pretrain  # noqa: E402  (needs REPO_ROOT on the path)
from model import FAMILIES, GPT, GPTConfig, configure_optimizer, peak_flops, setup_runtime  # noqa: E402

# --quick: shapes small enough that every row finishes in seconds, even bf16 on a 2-core CPU; no
# compilation, which alone takes a minute there (an explicit --compile still turns it on)
QUICK = dict(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=4, steps=2, warmup=1, repeats=2,
             matmul_size=512, compile=False)
# --gpt2-124m: GPT-2 small's shape; a compiled step takes tens of ms on an H100, so more of them
GPT2_124M = dict(family="gpt2", n_layer=12, n_head=12, n_embd=768, block_size=1024, compile=True, steps=20, warmup=3)


# -----------------------------------------------------------------------------
# Measurements, shared with bench_generate.py


def sync(device):
    """Wait for queued GPU work, so that the host's clock measures the computation."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def print_header(title, device):
    """The facts that decide a figure: date, platform, CPU, threads, torch version, GPU."""
    cpu, flags = platform.processor() or "unknown", []
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            pairs = (line.split(":", 1) for line in f if ":" in line)
            info = {k.strip(): v.strip() for k, v in pairs}  # later cores overwrite earlier ones; all alike
        cpu = info.get("model name", cpu)
        flags = info.get("flags", "").split()
    print(title)
    print(f"date      {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"platform  {platform.platform()}, Python {platform.python_version()}")
    bf16_isa = ", ".join(f for f in ("avx512_bf16", "amx_bf16") if f in flags) or "none"
    print(f"cpu       {cpu}; {os.cpu_count()} logical cores" + (f"; bf16 instructions: {bf16_isa}" if flags else ""))
    print(f"torch     {torch.__version__}, {torch.get_num_threads()} threads"
          + (f", CUDA {torch.version.cuda}" if torch.version.cuda else ""))
    if device.type == "cuda":
        print(f"gpu       {torch.cuda.get_device_name(device)}")
    print(f"device    {device}")


def command_line(script, argv):
    """The command that reproduces this run."""
    return "python " + " ".join(shlex.quote(a) for a in [script, *(sys.argv[1:] if argv is None else argv)])


def matmul_flops(n, dtype, device, min_seconds=0.2):
    """FLOP/s of an (n, n) @ (n, n) product in dtype: 2n³ FLOPs each, repeated for at least min_seconds."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=c)  # first call picks kernels and touches memory
    sync(device)
    count, t0 = 0, time.perf_counter()
    while count == 0 or time.perf_counter() - t0 < min_seconds:
        torch.matmul(a, b, out=c)
        count += 1
    sync(device)
    return 2 * n ** 3 * count / (time.perf_counter() - t0)


# -----------------------------------------------------------------------------
# Training steps, as pretrain.py's loop runs them


def train_steps(run, n_steps, grad_clip):
    """Time n_steps full optimizer steps of one configuration; returns seconds per step."""
    model, optimizer, rt, x, y = run["model"], run["optimizer"], run["rt"], run["x"], run["y"]
    sync(rt.device)
    t0 = time.perf_counter()
    for _ in range(n_steps):
        with rt.autocast():
            _, loss = model(x, y)
        rt.scaler.scale(loss).backward()
        if grad_clip > 0:
            rt.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(run["raw_model"].parameters(), grad_clip)
        rt.scaler.step(optimizer)
        rt.scaler.update()
        optimizer.zero_grad(set_to_none=True)
    sync(rt.device)
    dt = (time.perf_counter() - t0) / n_steps
    assert torch.isfinite(loss), f"{run['name']}: loss is {loss.item()}"
    return dt


def get_args(argv=None):
    d = pretrain.get_args([])  # the defaults pretrain.py trains with
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # model and batch (defaults: pretrain.py's)
    p.add_argument("--family", default=d.family, choices=list(FAMILIES), help="gpt2 or modern (see model.FAMILIES)")
    p.add_argument("--n-layer", type=int, default=d.n_layer, help="Transformer blocks")
    p.add_argument("--n-head", type=int, default=d.n_head, help="attention heads (H); must divide --n-embd")
    p.add_argument("--n-embd", type=int, default=d.n_embd, help="width C")
    p.add_argument("--block-size", type=int, default=d.block_size, help="context length T in tokens")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step (B)")
    # measurement
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per round and configuration")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed steps per configuration first (compilation, allocator)")
    p.add_argument("--repeats", type=int, default=3, help="rounds; every figure is the median over rounds")
    p.add_argument("--matmul-size", type=int, default=2048,
                   help="n of the (n, n) @ (n, n) peak matmul (8192 is fairer on big GPUs)")
    # modes
    p.add_argument("--gpt2-124m", action="store_true", help=f"GPT-2 124M in bf16, the CUDA MFU figure: {GPT2_124M}")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (implied by --gpt2-124m)")
    p.add_argument("--quick", action="store_true", help=f"tiny shapes and few steps, seconds on a CPU: {QUICK}")
    # system
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    args = p.parse_args(argv)
    # the modes change defaults, so flags given explicitly still win (--quick shrinks --gpt2-124m too)
    if args.gpt2_124m:
        p.set_defaults(**GPT2_124M)
    if args.quick:
        p.set_defaults(**QUICK)
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)

    # ---- setup: the device, and which dtypes to measure ------------------------------------------
    device = setup_runtime(args.device, "float32").device  # auto -> cuda:0 / mps / cpu, as pretrain.py picks
    if args.gpt2_124m and device.type != "cuda" and not args.quick:
        sys.exit("--gpt2-124m needs a CUDA GPU; add --quick for a tiny run of the same code path on this device")
    peak_dtypes = ["float32", "bfloat16"] + (["float16"] if device.type == "cuda" else [])
    train_dtypes = ["bfloat16"] if args.gpt2_124m else ["float32", "bfloat16"]
    print_header("bench_pretrain: training throughput and MFU", device)

    # ---- each configuration: runtime (autocast, scaler), model and optimizer as pretrain.main builds them
    d = pretrain.get_args([])
    runs = []
    for dtype in train_dtypes:
        rt = setup_runtime(str(device), dtype, d.seed)  # same seed: identical initial weights
        config = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_kv_head=d.n_kv_head, n_embd=args.n_embd,
                           block_size=args.block_size, dropout=d.dropout, **FAMILIES[args.family])
        raw_model = GPT(config).to(rt.device)
        optimizer = configure_optimizer(raw_model, d.lr, d.weight_decay, device_type=rt.device.type)
        model = torch.compile(raw_model) if args.compile else raw_model
        # random tokens: the work per step does not depend on the token values
        g = torch.Generator().manual_seed(0)
        w = torch.randint(50257, (args.batch_size, args.block_size + 1), generator=g).to(rt.device)  # (B, T+1)
        runs.append(dict(name=dtype, rt=rt, raw_model=raw_model, model=model, optimizer=optimizer,
                         x=w[:, :-1], y=w[:, 1:], peak_flops=peak_flops(rt.device, rt.dtype)))
    flops_per_token = runs[0]["raw_model"].flops_per_token()
    tokens_per_step = args.batch_size * args.block_size

    # ---- warmup: compilation, kernel choice, the allocator's first pass over the logits ---------
    for run in runs:
        t0 = time.perf_counter()
        train_steps(run, args.warmup, d.grad_clip)
        print(f"warmup    {run['name']}: {args.warmup} steps in {time.perf_counter() - t0:.1f} s")

    # ---- rounds: every peak and every configuration once per round, side by side ----------------
    peaks = {dt: [] for dt in peak_dtypes}
    step_s = {run["name"]: [] for run in runs}
    for r in range(args.repeats):
        for dtype in peak_dtypes:
            peaks[dtype].append(matmul_flops(args.matmul_size, getattr(torch, dtype), device))
        for run in runs:
            step_s[run["name"]].append(train_steps(run, args.steps, d.grad_clip))
        print(f"round {r + 1}/{args.repeats}: "
              + ", ".join(f"{name} {1000 * s[-1]:.0f} ms/step" for name, s in step_s.items()))

    # ---- report ------------------------------------------------------------------------------
    print(f"\nmatmul peak: ({args.matmul_size}, {args.matmul_size}) @ ({args.matmul_size}, {args.matmul_size}), "
          f"median of {args.repeats}" + (" (float32 runs as TF32)" if device.type == "cuda" else ""))
    print(f"{'dtype':<10}{'GFLOP/s':>12}")
    for dtype in peak_dtypes:
        print(f"{dtype:<10}{statistics.median(peaks[dtype]) / 1e9:>12,.1f}")

    print(f"\ntraining: {args.family}, {args.n_layer} layers, {args.n_head} heads, width {args.n_embd}, "
          f"context {args.block_size}, vocab {config.vocab_size}, batch {args.batch_size}, "
          f"{runs[0]['raw_model'].num_params() / 1e6:.2f}M params, "
          f"{flops_per_token / 1e6:.1f} MFLOP/token; compile {'on' if args.compile else 'off'}; "
          f"median of {args.repeats} rounds of {args.steps} steps")
    print(f"{'dtype':<10}{'ms/step':>10}{'tok/s':>12}{'MFU':>8}{'MFU (pretrain.py)':>19}")
    tok_s, mfu = {}, {}
    for run in runs:
        name = run["name"]
        tok_s[name] = tokens_per_step / statistics.median(step_s[name])
        mfu[name] = flops_per_token * tok_s[name] / statistics.median(peaks[name])
        print(f"{name:<10}{1000 * statistics.median(step_s[name]):>10,.1f}{tok_s[name]:>12,.0f}{mfu[name]:>8.1%}"
              f"{flops_per_token * tok_s[name] / run['peak_flops']:>19.1%}")
    print("MFU: against the measured matmul peak of the row's dtype; MFU (pretrain.py): against model.peak_flops "
          + ("(datasheet, for known GPUs)" if device.type == "cuda" else "(a 0.5 s 1024-wide matmul)"))
    if "float32" in step_s:  # the ratio of each round's two figures, then their median
        ratio = statistics.median(a / b for a, b in zip(step_s["float32"], step_s["bfloat16"]))
        print(f"bf16 / fp32 training speed: {ratio:.2f}x")
    note = " (--quick shapes: not the figure)" if args.quick else ""
    if args.gpt2_124m and device.type == "cuda":
        target = flops_per_token * tok_s["bfloat16"] / runs[0]["peak_flops"]
        print(f"target: MFU >= 45% of the datasheet peak on an H100: {target:.1%}, "
              f"{'met' if target >= 0.45 else 'not met'}{note}")
    elif not args.gpt2_124m and device.type == "cpu":
        print(f"target: fp32 MFU >= 50% of the fp32 matmul peak on CPU: {mfu['float32']:.1%}, "
              f"{'met' if mfu['float32'] >= 0.5 else 'not met'}{note}")
    print(f"\ncommand: {command_line('bench/bench_pretrain.py', argv)}")
    return {"tok_s": tok_s, "mfu": mfu}


if __name__ == "__main__":
    main()
