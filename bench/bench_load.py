"""
Benchmark: loading a SmolLM2-135M-shaped Llama checkpoint with GPT.from_pretrained, time and peak memory.

What it measures: a LlamaForCausalLM with SmolLM2-135M's shape (30 layers, width 576, 9 heads, 3 key/value
heads, MLP 1536, vocabulary 49,152, tied embeddings) and random weights is built by transformers and saved as
model.safetensors (fp32); then a fresh process loads it with GPT.from_pretrained and reports the load time
and its peak resident memory against the size of the weights, which says how many copies of the weights
loading holds at once (an empty Python process with torch imported is measured too, as the baseline).
Needs transformers and safetensors (not run by CI).

  python bench/bench_load.py
"""

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench_pretrain import command_line, print_header  # noqa: E402

WORKER = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
import torch
from model import GPT
t0 = time.perf_counter()
model = GPT.from_pretrained({path!r}) if {path!r} else None
seconds = time.perf_counter() - t0
print(json.dumps({{"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "params": sum(p.numel() for p in model.parameters()) if model else 0}}))
"""


def run(path):
    out = subprocess.run([sys.executable, "-c", WORKER.format(root=ROOT, path=path)], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    import torch
    import transformers
    print_header("bench_load: GPT.from_pretrained on a SmolLM2-135M-shaped checkpoint", torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        config = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                          num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                          max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                                          tie_word_embeddings=True)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(tmp)
        size_mb = os.path.getsize(os.path.join(tmp, "model.safetensors")) / 2 ** 20
        base, loaded = run(""), run(tmp)
    extra = loaded["peak_mb"] - base["peak_mb"]
    print(f"\n{loaded['params'] / 1e6:.1f}M parameters, model.safetensors {size_mb:,.0f} MB (fp32)")
    print(f"load time {loaded['seconds']:.2f} s; peak RSS {loaded['peak_mb']:,.0f} MB, "
          f"{extra:,.0f} MB above a process that only imported torch ({base['peak_mb']:,.0f} MB): "
          f"{extra / size_mb:.2f}x the weights")
    print(f"\ncommand: {command_line('bench/bench_load.py', None)}")


if __name__ == "__main__":
    main()
