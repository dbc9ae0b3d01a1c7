"""
Benchmark: peak memory of GPT.from_pretrained on SmolLM2-135M- and Qwen2.5-0.5B-shaped checkpoints.

What it measures: transformers builds each model with random weights from the real model's config (SmolLM2-135M:
llama, width 576, 30 layers, 9 heads, 3 key/value heads, MLP 1536, vocabulary 49,152, tied; Qwen2.5-0.5B: qwen2,
width 896, 24 layers, 14 heads, 2 key/value heads, MLP 4,864, vocabulary 151,936, tied, 32,768 positions) and
saves it in bf16, as those checkpoints are published. A fresh process then imports torch and model.py, notes its
peak resident memory (VmHWM in /proc/self/status: ru_maxrss would also count the parent's peak, which Linux
carries across exec), loads the directory with GPT.from_pretrained (fp32 weights) and notes the peak
again. The difference divided by the bytes of the loaded fp32 weights says how many copies of the weights
loading held at once: 1.0 is the floor, and a bf16 file read whole adds 0.5. --code imports model.py from another
directory, to compare with an older version. Needs transformers and safetensors (not run by CI).

  python bench/bench_load.py                       # both shapes, ~2 minutes on 2 CPU cores
  python bench/bench_load.py --code /tmp/before    # the same with model.py (and lora.py) from /tmp/before
  python bench/bench_load.py --quick               # a 2-layer shape, seconds: does it still run?
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from bench_pretrain import command_line, print_header  # noqa: E402

SHAPES = {  # name: (model_type, config fields of the real model)
    "SmolLM2-135M": ("llama", dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                   intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                                   max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5)),
    "Qwen2.5-0.5B": ("qwen2", dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                   intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                                   max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)),
}

WORKER = """
import json, sys, time
sys.path.insert(0, {code!r})
import torch
from model import GPT
def peak():  # VmHWM: this process's own peak RSS (ru_maxrss also counts the parent's, from before exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
base = peak()
t0 = time.perf_counter()
model = GPT.from_pretrained({path!r})
seconds = time.perf_counter() - t0
params = {{id(p): p for p in model.parameters()}}.values()  # a tied matrix once
buffers = sum(b.numel() * b.element_size() for b in model.buffers())
print(json.dumps(dict(seconds=seconds, base=base, peak=peak(), params=sum(p.numel() for p in params),
                      weight_bytes=sum(p.numel() * p.element_size() for p in params), buffer_bytes=buffers,
                      block_size=model.config.block_size)))
"""


def build_checkpoint(name, path, quick):
    """Save a random-weight model of the named shape to path (bf16 model.safetensors + config.json), once."""
    if os.path.exists(os.path.join(path, "config.json")):
        return
    import torch
    import transformers
    kind, fields = SHAPES[name]
    if quick:
        fields = {**fields, "num_hidden_layers": 2}
    Config, Model = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                     "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
    torch.manual_seed(0)
    Model(Config(**fields)).to(torch.bfloat16).save_pretrained(path)


def measure(code, path):
    """Run the loader in a fresh process: its peak memory is then the loader's alone."""
    out = subprocess.run([sys.executable, "-c", WORKER.format(code=code, path=path)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--code", default=ROOT, help="directory model.py is imported from (default: this checkout)")
    p.add_argument("--cache-dir", default=os.path.join("/tmp", "load_memory"), help="where the checkpoints are built once")
    p.add_argument("--quick", action="store_true", help="2-layer versions of the shapes: seconds, for a smoke run")
    args = p.parse_args(argv)
    import torch
    print_header("bench_load: peak RSS of GPT.from_pretrained", torch.device("cpu"))
    print(f"model.py  from {os.path.abspath(args.code)}; load average {os.getloadavg()[0]:.2f} (1 min)\n")
    print(f"{'checkpoint':<14} {'params':>8} {'file MB':>8} {'fp32 MB':>8} {'block':>6} {'peak MB':>8} "
          f"{'+ MB':>7} {'x fp32':>7} {'load s':>7}")
    for name in SHAPES:
        path = os.path.join(args.cache_dir, name + ("-quick" if args.quick else ""))
        build_checkpoint(name, path, args.quick)
        r = measure(os.path.abspath(args.code), path)
        mb = 2 ** 20
        file_mb = os.path.getsize(os.path.join(path, "model.safetensors")) / mb
        extra = (r["peak"] - r["base"]) / mb
        print(f"{name:<14} {r['params'] / 1e6:>7.1f}M {file_mb:>8,.0f} {r['weight_bytes'] / mb:>8,.0f} "
              f"{r['block_size']:>6} {r['peak'] / mb:>8,.0f} {extra:>7,.0f} {extra * mb / r['weight_bytes']:>7.2f} "
              f"{r['seconds']:>7.2f}")
    print("\npeak: the loading process's VmHWM; + MB: above its peak after importing torch and model.py; "
          "x fp32: that over the bytes of the loaded fp32 weights")
    print(f"\ncommand: {command_line('bench/bench_load.py', argv)}")


if __name__ == "__main__":
    main()
