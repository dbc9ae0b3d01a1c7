"""
End-to-end runs of the stage scripts on tiny configs: pretrain.py, sft.py and sample.py.

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

import data
from conftest import assert_resumed_exactly, train_losses
import model
import pretrain
import sample
import sft
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
            "--log-every", "1", "--warmup-steps", "2", "--lr", "3e-3", "--device", "cpu", "--dtype", "float32", *extra]


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
    assert_resumed_exactly(tmp_path / "straight", tmp_path / "resumed", 8)


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
    no_prompt = run_script("sample.py", "--prompt-file", str(tmp_path / "absent.txt"))
    assert no_prompt.returncode == 1 and "Traceback" not in no_prompt.stderr
    assert no_prompt.stderr.strip() == f"error: --prompt-file {tmp_path / 'absent.txt'}: No such file or directory"


def test_help_lists_flags_with_defaults():
    result = run_script("pretrain.py", "--help")
    assert result.returncode == 0
    for flag in ["--data", "--out", "--init-from", "--max-steps", "--batch-size", "--grad-accum", "--lr", "--device",
                 "--dtype", "--compile", "--seed", "--resume", "--n-layer", "--n-head", "--n-embd", "--block-size",
                 "--family"]:
        assert flag in result.stdout
    assert "(default: 800)" in result.stdout  # argparse shows every default


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


def worker_pid(launcher_pid, rank):
    """The pid of the torchrun worker with RANK=rank among the launcher's children (Linux /proc)."""
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == launcher_pid and f"RANK={rank}".encode() in env:
            return int(pid)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker processes through /proc")
def test_ddp_sigterm_to_one_rank_stops_both_then_resume_is_exact(text_file, tmp_path):
    """SIGTERM to rank 1 of 2 gloo processes: both stop at the same step (an all-reduce of the stop flag),
    rank 0 saves, both exit 0, and --resume logs the same losses as a run that was never stopped."""
    steps = ["--max-steps", "300", "--eval-every", "100000", "--dropout", "0.1"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "pretrain.py"]
    out = tmp_path / "stopped"
    proc = subprocess.Popen([*launch, *tiny_args(text_file, out, *steps)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not ((out / "log.jsonl").exists() and len(train_losses(out)) >= 3):
        assert time.time() < deadline and proc.poll() is None, "training did not start"
        time.sleep(0.2)
    os.kill(worker_pid(proc.pid, 1), signal.SIGTERM)  # the rank that does not save
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    step = load_checkpoint(out / "ckpt.pt")["step"]
    assert 3 <= step < 300 and max(train_losses(out)) == step
    assert len(load_checkpoint(out / "ckpt.pt")["rng_per_rank"]) == 2
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "pretrain.py",
                        *tiny_args(text_file, out, *steps, "--resume"))
    assert result.returncode == 0, result.stderr[-3000:]
    straight = tmp_path / "straight"
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "pretrain.py",
                        *tiny_args(text_file, straight, *steps))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_resumed_exactly(straight, out, 300)


# -----------------------------------------------------------------------------
# Instruction fine-tuning


@pytest.fixture(scope="module")
def base_model(text_file, tmp_path_factory):
    """A tiny pretrained model with a 64-token context, long enough for short instructions."""
    out = tmp_path_factory.mktemp("base")
    pretrain.main(tiny_args(text_file, out, "--max-steps", "2", "--block-size", "64"))
    return str(out)


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    """40 short Alpaca-Libre records (bundled, CC0/MIT)."""
    path = tmp_path_factory.mktemp("sft") / "small.jsonl"
    with open(os.path.join(ROOT, "data", "alpaca_libre_2k.jsonl")) as f:
        records = [json.loads(line) for line in f]
    short = [r for r in records if len(r["instruction"] + r["input"] + r["output"]) < 120][:40]
    path.write_text("".join(json.dumps(r) + "\n" for r in short))
    return str(path)


def sft_args(base, data_file, out, *extra):
    return ["--init-from", base, "--data", data_file, "--out", str(out), "--max-steps", "6", "--batch-size", "4",
            "--eval-every", "3", "--log-every", "1", "--warmup-steps", "2", "--device", "cpu", "--dtype", "float32", *extra]


def test_sft_full_then_chat(base_model, sft_file, tmp_path):
    out = tmp_path / "sft"
    metrics = sft.main(sft_args(base_model, sft_file, out, "--lr", "1e-3"))
    assert metrics["step"] == 6 and torch.isfinite(torch.tensor(metrics["val/loss"]))
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["stage"] == "sft" and ckpt["chat"] is True
    with open(out / "samples.jsonl") as f:
        samples = [json.loads(line) for line in f]
    assert [s["step"] for s in samples] == [0] * 4 + [3] * 4 + [6] * 4  # 4 fixed prompts per evaluation
    assert losses_fell(out)

    # --prompt on a chat model answers one user turn; --chat holds a conversation read from stdin
    answer = sample.main(["--init-from", str(out), "--prompt", "Say hi.", "--greedy", "--max-new-tokens", "5",
                          "--device", "cpu"])
    assert len(answer) == 1
    result = run_script("sample.py", "--init-from", str(out), "--chat", "--greedy", "--max-new-tokens", "5",
                        "--device", "cpu", input="Hello\nWhat is 2+2?\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("assistant> ") == 2
    plain = run_script("sample.py", "--init-from", base_model, "--chat", "--device", "cpu", input="")
    assert plain.returncode == 1 and "not a chat model" in plain.stderr


def losses_fell(out):
    losses = train_losses(out)
    return sum(losses[s] for s in (5, 6)) / 2 < sum(losses[s] for s in (1, 2)) / 2


def test_sft_lora_trains_only_adapters_and_writes_small_adapter(base_model, sft_file, tmp_path):
    out = tmp_path / "lora"
    sft.main(sft_args(base_model, sft_file, out, "--lora-r", "4", "--lr", "1e-2"))
    base, tuned = load_checkpoint(os.path.join(base_model, "ckpt.pt"))["model"], load_checkpoint(out / "ckpt.pt")
    assert tuned["adapter"]["lora_config"]["r"] == 4
    weights = tuned["model"]  # LoRA merged: plain names, as any checkpoint
    assert set(weights) == set(base)
    assert not torch.equal(weights["blocks.0.attn.qkv.weight"], base["blocks.0.attn.qkv.weight"])  # adapted
    torch.testing.assert_close(weights["blocks.0.mlp.fc.weight"], base["blocks.0.mlp.fc.weight"], rtol=0, atol=0)
    chat = tuned["adapter"]["lora_config"]["train_rows"]  # the chat tokens' rows train, the others stay
    assert chat == [data.special_id(data.get_encoding(tuned["tokenizer"]), t) for t in data.CHAT_TOKENS]
    others = torch.ones(len(base["tok_emb.weight"]), dtype=torch.bool)
    others[chat] = False
    torch.testing.assert_close(weights["tok_emb.weight"][others], base["tok_emb.weight"][others], rtol=0, atol=0)
    assert not torch.equal(weights["tok_emb.weight"][chat], base["tok_emb.weight"][chat])
    assert os.path.getsize(out / "ckpt.pt") > 20 * os.path.getsize(out / "adapter.pt")
    assert losses_fell(out)
    # the adapter file alone, put back onto its base, is the same model as the merged checkpoint
    from_adapter, info = model.load_model(str(out / "adapter.pt"))
    assert info["chat"] is True and info["step"] == 6
    for name, tensor in from_adapter.state_dict().items():
        torch.testing.assert_close(tensor, weights[name], rtol=0, atol=1e-7)
    answer = sample.main(["--init-from", str(out / "adapter.pt"), "--prompt", "Hi", "--greedy", "--max-new-tokens", "4",
                          "--device", "cpu"])
    assert answer == sample.main(["--init-from", str(out), "--prompt", "Hi", "--greedy", "--max-new-tokens", "4",
                                  "--device", "cpu"])


def test_sft_lora_resume_is_exact(base_model, sft_file, tmp_path):
    """LoRA with dropout on: 6 steps straight == 3 steps, stop, --resume, 3 more. The resumed command
    asks for another rank: the checkpoint's rank wins, and the run says so."""
    common = ["--lora-r", "4", "--lora-dropout", "0.1"]
    sft.main(sft_args(base_model, sft_file, tmp_path / "straight", *common))
    sft.main(sft_args(base_model, sft_file, tmp_path / "resumed", *common, "--stop-at", "3"))
    said = []
    real_write = sft.tqdm.write
    sft.tqdm.write = lambda s, *a, **k: said.append(s)
    try:
        sft.main(sft_args(base_model, sft_file, tmp_path / "resumed", "--lora-r", "8", "--lora-dropout", "0.1", "--resume"))
    finally:
        sft.tqdm.write = real_write
    assert "--resume: --lora-r 4 from the checkpoint (the command line gave 8)" in said
    assert_resumed_exactly(tmp_path / "straight", tmp_path / "resumed", 6)


def test_sft_empty_after_length_policy_is_an_error(base_model, sft_file, tmp_path):
    with pytest.raises(SystemExit, match="fewer than 2 usable examples"):
        sft.main(sft_args(base_model, sft_file, tmp_path / "empty", "--max-len", "2"))  # <|assistant|> + reply + <|end|> > 2


@pytest.mark.slow  # two processes
def test_sft_ddp_matches_grad_accum(base_model, sft_file, tmp_path):
    """torchrun with 2 CPU processes (gloo), batch 2 each == 1 process, batch 2, --grad-accum 2: the same
    micro-batches, the same reply-token weighting, the same steps; only rank 0 logs and writes."""
    common = ["--batch-size", "2", "--max-steps", "4", "--eval-every", "4", "--lr", "1e-3"]
    sft.main(sft_args(base_model, sft_file, tmp_path / "single", *common, "--grad-accum", "2"))
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "sft.py",
                        *sft_args(base_model, sft_file, tmp_path / "ddp", *common))
    assert result.returncode == 0, result.stderr[-2000:]
    single, ddp = train_losses(tmp_path / "single"), train_losses(tmp_path / "ddp")
    assert sorted(ddp) == [1, 2, 3, 4]  # one line per step: rank 1 wrote nothing
    for step in single:
        assert ddp[step] == pytest.approx(single[step], abs=1e-4), step
    a, b = load_checkpoint(tmp_path / "single" / "ckpt.pt"), load_checkpoint(tmp_path / "ddp" / "ckpt.pt")
    for name in a["model"]:
        torch.testing.assert_close(b["model"][name], a["model"][name], atol=1e-4, rtol=1e-4)


def test_sft_from_hugging_face_gpt2_grows_the_vocabulary(sft_file, tmp_path):
    torch.manual_seed(0)
    cfg = model.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=50257, **model.FAMILIES["gpt2"])
    model.GPT(cfg).save_pretrained(str(tmp_path / "hf"))
    out = tmp_path / "sft"
    sft.main(sft_args(str(tmp_path / "hf"), sft_file, out, "--max-steps", "2", "--export-hf"))
    assert load_checkpoint(out / "ckpt.pt")["model_config"]["vocab_size"] == 50304  # room for the chat tokens
    exported = model.GPT.from_pretrained(str(out / "hf")).eval()
    tuned, _ = model.load_model(str(out))
    assert exported.config.vocab_size == 50304
    x = torch.randint(0, 50304, (2, 16))
    with torch.no_grad():  # the export is the fine-tuned model itself, not only its shape
        torch.testing.assert_close(exported(x)[0], tuned.eval()(x)[0], atol=1e-5, rtol=1e-5)


def test_zero_eval_every_is_a_usage_error_and_the_modern_family_exports_as_llama(base_model, sft_file, tmp_path):
    with pytest.raises(SystemExit):
        pretrain.get_args(["--eval-every", "0"])
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "x"
    sft.main(sft_args(base_model, sft_file, out, "--max-steps", "2", "--export-hf"))  # base_model: modern family
    theirs = transformers.LlamaForCausalLM.from_pretrained(str(out / "hf")).eval()
    tuned, _ = model.load_model(str(out))
    x = torch.randint(0, 50304, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, tuned.eval()(x)[0], atol=1e-4, rtol=1e-4)
    from tokenizers import Tokenizer  # and the tokenizer, chat tokens included
    enc = data.get_encoding(data.checkpoint_tokenizer(load_checkpoint(out / "ckpt.pt")))
    text = "What is the capital of France?"
    assert Tokenizer.from_file(str(out / "hf" / "tokenizer.json")).encode(text).ids == data.encode(enc, text)
    # and the chat template: transformers renders what sft.py trained on, and generate stops at <|end|>
    theirs_tok = transformers.AutoTokenizer.from_pretrained(str(out / "hf"))
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    assert list(theirs_tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False)) == \
        data.render_chat(enc, chat, add_generation_prompt=True)[0]
    generation = json.loads((out / "hf" / "generation_config.json").read_text())
    assert data.special_id(enc, "<|end|>") in generation["eos_token_id"]
    assert Tokenizer.from_file(str(out / "hf" / "tokenizer.json")).token_to_id("<|end|>") == data.special_id(enc, "<|end|>")


def test_sft_full_fine_tuning_resume_is_exact(base_model, sft_file, tmp_path):
    """Full fine-tuning: 6 steps straight == 3 steps, stop, --resume, 3 more (optimizer, scaler, sampler, RNG).
    The resumed command names other data (3 records, where the sampler stood past the 12th): the
    checkpoint's data is used, not an IndexError."""
    sft.main(sft_args(base_model, sft_file, tmp_path / "straight"))
    sft.main(sft_args(base_model, sft_file, tmp_path / "resumed", "--stop-at", "3"))
    other = tmp_path / "other.jsonl"
    other.write_text("".join(open(sft_file).readlines()[:3]))
    sft.main(sft_args(base_model, str(other), tmp_path / "resumed", "--resume"))
    assert_resumed_exactly(tmp_path / "straight", tmp_path / "resumed", 6)
    assert load_checkpoint(tmp_path / "resumed" / "ckpt.pt")["args"]["data"] == sft_file


def test_sft_resume_on_data_changed_in_place_is_a_one_line_error(base_model, sft_file, tmp_path):
    data_file = tmp_path / "data.jsonl"
    data_file.write_text(open(sft_file).read())
    sft.main(sft_args(base_model, str(data_file), tmp_path / "run", "--stop-at", "3"))
    data_file.write_text("".join(open(sft_file).readlines()[:10]))  # the same path, fewer records
    with pytest.raises(SystemExit, match="the data changed"):
        sft.main(sft_args(base_model, str(data_file), tmp_path / "run", "--resume"))


def test_sft_grad_accum_weighs_every_reply_token_as_one_big_batch(base_model, tmp_path, monkeypatch):
    """--batch-size 2 --grad-accum 2 gives the gradient of --batch-size 4 to 1e-6, although one micro-batch
    holds several times the reply tokens of the other; the mean of the two micro-batches' mean losses (how
    sft.py accumulated before) is far from it."""
    replies = ["Yes.", "It is blue and green.", "The river runs past the old mill and into the sea near the town of Bree.",
               "One, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, thirteen, fourteen, fifteen.",
               "Paris, I think."]  # 3, 7, 18, 33 and 6 reply tokens: any two pairs of four differ
    path = tmp_path / "uneven.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Question {i}?", "input": "", "output": r}) + "\n"
                            for i, r in enumerate(replies)))  # 1 held out, 4 trained on: one batch of 4 is all of them
    grads, real_step = [], sft.optimizer_step

    def recording_step(optimizer, *args, **kwargs):  # the gradient the step is about to take, before clipping
        grads.append([p.grad.clone() for group in optimizer.param_groups for p in group["params"]])
        return real_step(optimizer, *args, **kwargs)

    monkeypatch.setattr(sft, "optimizer_step", recording_step)
    run = lambda name, *extra: sft.main(sft_args(base_model, str(path), tmp_path / name, "--eval-every", "100",  # noqa: E731
                                                 *extra))
    run("big", "--batch-size", "4", "--max-steps", "1")
    run("accumulated", "--batch-size", "2", "--grad-accum", "2", "--max-steps", "1")
    run("apart", "--batch-size", "2", "--max-steps", "2", "--lr", "1e-12")  # the same two micro-batches, one a step
    big, accumulated, first, second = grads
    for a, b in zip(accumulated, big):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    mean_of_means = [(f + s) / 2 for f, s in zip(first, second)]  # the old way, on a model that has not moved
    assert max((m - b).abs().max().item() for m, b in zip(mean_of_means, big)) > 1e-3


def test_sft_pack_end_to_end(base_model, sft_file, tmp_path):
    out = tmp_path / "packed"
    metrics = sft.main(sft_args(base_model, sft_file, out, "--pack", "--lr", "1e-3"))
    assert metrics["step"] == 6 and losses_fell(out)
