"""Shared pytest set-up: the repository root on sys.path, the `slow` marker, tiny model configs.

Run the whole suite with `python -m pytest tests`; skip the slow tests with `-m "not slow"`.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402  (needs the path above)
import model  # noqa: E402

torch.set_num_threads(1)  # tiny tensors gain nothing from threads, and the CPU is shared


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds on CPU (still runs by default)")


@pytest.fixture
def tiny_config():
    """tiny_config(family, **overrides) -> a GPTConfig small enough for CPU tests in milliseconds."""
    def make(family="gpt2", **overrides):
        kw = dict(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embd=32, **model.FAMILIES[family])
        kw.update(overrides)
        return model.GPTConfig(**kw)
    return make


@pytest.fixture(scope="session")
def enc():
    """GPT-2's tiktoken encoding, built offline from data/tokenizer/gpt2.tiktoken (once per session)."""
    return data.get_encoding(data.gpt2_tokenizer())


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    """An untrained tiny chat checkpoint with GPT-2's tokenizer (directory path): what the reward model
    and DPO start from in their tests."""
    from dataclasses import asdict
    path = tmp_path_factory.mktemp("sft")
    torch.manual_seed(0)
    config = model.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=50304, **model.FAMILIES["modern"])
    model.save_checkpoint(str(path / "ckpt.pt"), model=model.GPT(config).state_dict(), model_config=asdict(config),
                          tokenizer=data.gpt2_tokenizer(), chat=True, step=0)
    return str(path)


def train_losses(out):
    """{step: train loss} from a run's OUT/log.jsonl."""
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def assert_resumed_exactly(straight, resumed, steps):
    """A run stopped and resumed logs the same train losses, to 1e-6, as one that ran straight through."""
    a, b = train_losses(straight), train_losses(resumed)
    assert sorted(b) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert b[step] == pytest.approx(a[step], abs=1e-6), step


def torchrun(script, *args, processes=2):
    """Run a stage script under torchrun: `processes` CPU processes (gloo), one thread each."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={processes}", script, *args], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def assert_same_training(single, ddp, steps, tol=1e-4):
    """A data-parallel run and a one-process run with the same global batch: one log line per step (rank 1
    wrote none), the same train losses and the same final weights, to tol (sums in another order)."""
    a, b = train_losses(single), train_losses(ddp)
    assert sorted(b) == list(range(1, steps + 1))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=tol), step
    wa, wb = (model.load_checkpoint(os.path.join(out, "ckpt.pt"))["model"] for out in (single, ddp))
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=tol, rtol=tol)
