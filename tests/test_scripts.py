"""
End-to-end runs of the stage scripts on tiny configs: pretrain.py and sample.py.

Checks that a run trains (loss falls, checkpoint written), that --resume continues exactly,
that 2 DDP processes match 1 process with twice the gradient accumulation, that Ctrl-C/SIGTERM
and NaN losses are handled as documented, and that bad input ends in a one-line error.

  python -m pytest tests/test_scripts.py          # about a minute on 2 cores
  python -m pytest tests/test_scripts.py -m "not slow"
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import model
import pretrain
import sample
from model import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(ROOT, "data", "tinyshakespeare.txt")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """The first 30 kB of Tiny Shakespeare: enough for a train and a val split of a 16-token context."""
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    with open(SHAKESPEARE) as f:
        path.write_text(f.read(30_000))
    return str(path)


def tiny_args(data, out, *extra):
    return ["--data", data, "--out", str(out), "--n-layer", "2", "--n-head", "2", "--n-embd", "32",
            "--block-size", "16", "--batch-size", "4", "--eval-every", "4", "--eval-batches", "2",
            "--log-every", "1", "--warmup-steps", "2", "--lr", "3e-3", "--device", "cpu", *extra]


def train_losses(out):
    """{step: train loss} from a run's log.jsonl."""
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def run_script(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300, **kw)


def test_pretrain_then_sample(text_file, tmp_path):
    out = tmp_path / "run"
    metrics = pretrain.main(tiny_args(text_file, out, "--max-steps", "30", "--eval-every", "30"))
    assert metrics["step"] == 30
    losses = train_losses(out)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    # from ln(50304) ≈ 10.8 at random init, 30 steps on a 30 kB text must bring the loss well down
    assert sum(losses[s] for s in range(26, 31)) / 5 < losses[1] - 1.0, losses
    with open(out / "log.jsonl") as f:
        val = [json.loads(line)["val/loss"] for line in f if "val/loss" in line]
    assert len(val) == 2 and val[1] < val[0] - 1.0, val  # evaluated at steps 0 and 30
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["step"] == 30 and ckpt["stage"] == "pretrain"
    assert ckpt["model_config"]["n_embd"] == 32 and ckpt["tokenizer"]["name"] == "gpt2"

    # greedy sampling is deterministic and continues the prompt
    argv = ["--init-from", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "8", "--greedy", "--device", "cpu"]
    first, second = sample.main(argv), sample.main(argv)
    assert first == second and len(first) == 1 and len(first[0]) > 0


def test_resume_is_exact(text_file, tmp_path):
    """8 steps straight == 4 steps, stop, --resume, 4 more: same losses (dropout on, so RNG state matters)."""
    common = ["--max-steps", "8", "--dropout", "0.1"]
    pretrain.main(tiny_args(text_file, tmp_path / "straight", *common))
    stopped = pretrain.main(tiny_args(text_file, tmp_path / "resumed", *common, "--stop-at", "4"))
    assert stopped["step"] == 4
    pretrain.main(tiny_args(text_file, tmp_path / "resumed", *common, "--resume"))
    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), step


def test_nan_loss_stops_and_keeps_last_checkpoint(text_file, tmp_path, monkeypatch):
    """A NaN loss from step 6 on: the run exits with a message; the step-4 checkpoint survives."""
    real_loss, calls = model.cross_entropy, {"train": 0}

    def loss_turning_nan(logits, targets):
        loss = real_loss(logits, targets)
        if torch.is_grad_enabled():  # training forward passes only, not evaluation
            calls["train"] += 1
            if calls["train"] > 5:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(model, "cross_entropy", loss_turning_nan)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as exc:
        pretrain.main(tiny_args(text_file, out, "--max-steps", "10"))
    assert "loss is nan at step 5" in str(exc.value)
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["step"] == 4
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_bad_data_gives_one_line_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    result = run_script("pretrain.py", *tiny_args(str(bad), tmp_path / "out", "--max-steps", "1"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"error: {bad}:2: record has no string field 'text'"
    assert "Traceback" not in result.stderr
    missing = run_script("sample.py", "--init-from", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "neither a checkpoint" in missing.stderr


def test_help_lists_flags_with_defaults():
    result = run_script("pretrain.py", "--help")
    assert result.returncode == 0
    for flag in ["--data", "--out", "--init-from", "--max-steps", "--batch-size", "--grad-accum", "--lr", "--device",
                 "--dtype", "--compile", "--seed", "--resume", "--n-layer", "--n-head", "--n-embd", "--block-size",
                 "--family"]:
        assert flag in result.stdout
    assert "(default: 400)" in result.stdout  # argparse shows every default


def test_sample_reads_stdin_and_hf_directories(tmp_path):
    """sample.py on an exported Hugging Face GPT-2 directory, with the prompt piped in."""
    torch.manual_seed(0)
    cfg = model.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=50257, **model.FAMILIES["gpt2"])
    model.GPT(cfg).save_pretrained(str(tmp_path / "hf"))
    result = run_script("sample.py", "--init-from", str(tmp_path / "hf"), "--prompt", "-", "--greedy",
                        "--max-new-tokens", "5", "--ignore-eot", "--device", "cpu", input="The capital of France is")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The capital of France is")
    assert len(result.stdout) > len("The capital of France is")


@pytest.mark.slow
def test_ddp_matches_grad_accum(text_file, tmp_path):
    """torchrun with 2 CPU processes (gloo) and batch 4 each == 1 process, batch 4, --grad-accum 2."""
    steps = ["--max-steps", "6"]
    pretrain.main(tiny_args(text_file, tmp_path / "single", *steps, "--grad-accum", "2"))
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "pretrain.py",
                        *tiny_args(text_file, tmp_path / "ddp", *steps))
    assert result.returncode == 0, result.stderr[-3000:]
    single, ddp = train_losses(tmp_path / "single"), train_losses(tmp_path / "ddp")
    assert sorted(ddp) == list(range(1, 7))
    for step in range(1, 7):
        assert ddp[step] == pytest.approx(single[step], abs=1e-4), step


@pytest.mark.slow
def test_sigterm_saves_checkpoint_then_resume(text_file, tmp_path):
    """SIGTERM mid-run: the step in flight finishes, a checkpoint is saved, the process exits 0, and --resume goes on."""
    out = tmp_path / "sig"
    args = tiny_args(text_file, out, "--max-steps", "100000", "--eval-every", "100000")
    proc = subprocess.Popen([sys.executable, "pretrain.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and len(train_losses(out)) >= 3):
        assert time.time() < deadline and proc.poll() is None, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    step = load_checkpoint(out / "ckpt.pt")["step"]
    assert step >= 3 and max(train_losses(out)) == step
    assert "--resume" in stdout + stderr
    metrics = pretrain.main(tiny_args(text_file, out, "--max-steps", str(step + 2), "--eval-every", "100000", "--resume"))
    assert metrics["step"] == step + 2
