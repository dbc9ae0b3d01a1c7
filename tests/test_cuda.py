"""
CUDA checks, skipped without a GPU (CI has none): a bf16 training step, an fp16 step with the gradient
scaler, `--compile` end to end, cached against uncached generation under autocast, and the dtype that
`--dtype auto` picks. Under 2 minutes on one GPU.

  python -m pytest tests/test_cuda.py
"""

import os
import sys

import pytest
import torch

import model
from model import FAMILIES, GPT, GPTConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(family="modern"):
    return GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=64, vocab_size=512, **FAMILIES[family])


def train_steps(dtype, steps=20):
    """Overfit one batch for a few steps in dtype; returns (first loss, last loss, scaler enabled)."""
    rt = model.setup_runtime("cuda", dtype)
    torch.manual_seed(0)
    net = GPT(config()).to(rt.device)
    optimizer = model.configure_optimizer(net, 3e-3, 0.0, device_type="cuda")
    x = torch.randint(0, 512, (8, 64), device=rt.device)
    losses = []
    for _ in range(steps):
        with rt.autocast():
            _, loss = net(x[:, :-1], x[:, 1:])
        rt.scaler.scale(loss).backward()
        model.optimizer_step(optimizer, rt.scaler, 3e-3, 1.0)
        losses.append(loss.item())
    return losses[0], losses[-1], rt.scaler.is_enabled()


@pytest.mark.skipif(torch.cuda.is_available() and not torch.cuda.is_bf16_supported(including_emulation=False),
                    reason="no native bf16 on this GPU")
def test_bf16_step_learns():
    first, last, scaled = train_steps("bfloat16")
    assert last < 0.5 * first and not scaled


def test_fp16_step_with_the_scaler_learns():
    first, last, scaled = train_steps("float16")
    assert last < 0.5 * first and scaled


def test_dtype_auto_is_native_bf16_or_fp16():
    rt = model.setup_runtime("cuda", "auto")
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    assert rt.dtype == expected and rt.scaler.is_enabled() == (expected == torch.float16)


@pytest.mark.parametrize("family", ["gpt2", "modern"])
def test_cached_generation_matches_uncached_under_autocast(family):
    rt = model.setup_runtime("cuda", "auto")
    torch.manual_seed(0)
    net = GPT(config(family)).to(rt.device).eval()
    idx = torch.randint(0, 512, (4, 10), device=rt.device)
    with rt.autocast():
        cached = net.generate(idx, 20, temperature=0, use_cache=True)
        uncached = net.generate(idx, 20, temperature=0, use_cache=False)
    # low precision can flip a near-tie; nearly all greedy tokens must agree
    assert (cached == uncached).float().mean().item() >= 0.95


def test_compile_smoke(tmp_path):
    import subprocess
    text = tmp_path / "t.txt"
    with open(os.path.join(ROOT, "data", "tinyshakespeare.txt")) as f:
        text.write_text(f.read(30_000))
    result = subprocess.run([sys.executable, "pretrain.py", "--data", str(text), "--out", str(tmp_path / "out"),
                             "--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "32",
                             "--max-steps", "10", "--eval-every", "10", "--compile", "--device", "cuda"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "ckpt.pt").exists()
