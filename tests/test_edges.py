"""
Correctness at the edges (issue 20): settings that would run silently wrong or never end are refused at
the command line with a one-line error; a loop stops at --max-steps even when resumed past it; a NaN
before the first checkpoint does not name a checkpoint that was never written.

  python -m pytest tests/test_edges.py
"""

import importlib
import pathlib

import pytest

from test_scripts import text_file, tiny_args  # noqa: F401  (the fixture)
import pretrain

BAD_FLAGS = [
    ("sample", ["--temperature", "-1"]), ("sample", ["--top-p", "2"]), ("sample", ["--top-p", "0"]),
    ("sample", ["--top-k", "-1"]), ("dpo", ["--beta", "-1"]), ("dpo", ["--beta", "0"]),
    ("pretrain", ["--val-fraction", "1.5"]), ("sft", ["--val-fraction", "1"]), ("pretrain", ["--n-embd", "0"]),
    ("pretrain", ["--max-steps", "-1"]), ("sft", ["--max-steps", "0"]), ("ppo", ["--max-steps", "-1"]),
    ("pretrain", ["--lr", "-1"]), ("pretrain", ["--grad-accum", "0"]), ("pretrain", ["--eval-batches", "0"]),
    ("pretrain", ["--dropout", "2"]), ("sft", ["--lora-r", "-1"]), ("reward", ["--label-noise", "1.5"]),
    ("ppo", ["--temperature", "0"]), ("ppo", ["--gamma", "1.1"]), ("pretrain", ["--lr", "nan"]),
    ("prepare", ["prepare", "in", "--shard-tokens", "0"]), ("prepare", ["prepare", "in", "--num-perm", "0"]),
]


@pytest.mark.parametrize("script,argv", BAD_FLAGS, ids=[f"{s} {' '.join(a)}" for s, a in BAD_FLAGS])
def test_meaningless_settings_are_refused_at_the_command_line(script, argv, capsys):
    module = importlib.import_module(script)
    parse = module.get_args if hasattr(module, "get_args") else module.parse_args
    with pytest.raises(SystemExit) as stop:
        parse(argv)
    assert stop.value.code == 2  # argparse's usage error, not a traceback
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert argv[-2] in err and ("must be" in err or "at least" in err), err


def test_a_resume_past_max_steps_ends_instead_of_training_forever(text_file, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    pretrain.main(tiny_args(text_file, out, "--max-steps", "4"))
    metrics = pretrain.main(tiny_args(text_file, out, "--max-steps", "2", "--resume"))
    assert metrics["step"] == 4


def test_nan_before_any_checkpoint_says_none_was_written(tmp_path):
    import model
    with pytest.raises(SystemExit, match="no checkpoint was written"):
        model.check_finite(float("nan"), 1, str(tmp_path / "ckpt.pt"))
    (tmp_path / "ckpt.pt").write_bytes(b"x")
    with pytest.raises(SystemExit, match="last good checkpoint is"):
        model.check_finite(float("inf"), 9, str(tmp_path / "ckpt.pt"))


@pytest.fixture
def checkpoints(tmp_path):
    """A base (pretrain) and a reward checkpoint, tiny, with GPT-2's tokenizer."""
    from dataclasses import asdict

    import torch

    import data
    import model
    paths = {}
    for stage in ["pretrain", "reward"]:
        config = model.GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=50304,
                                 score_head=stage == "reward", **model.FAMILIES["modern"])
        paths[stage] = str(tmp_path / stage / "ckpt.pt")
        model.save_checkpoint(paths[stage], model=model.GPT(config).state_dict(), model_config=asdict(config),
                              tokenizer=data.gpt2_tokenizer(), chat=stage == "reward", stage=stage, step=1)
        assert torch.load(paths[stage], weights_only=True)["stage"] == stage
    return paths


@pytest.mark.parametrize("script,flag,start,why", [
    ("dpo", "--init-from", "pretrain", "is a pretrain model, not a chat model"),
    ("ppo", "--policy", "pretrain", "is a pretrain model, not a chat model"),
    ("dpo", "--init-from", "reward", "is a reward model"), ("sft", "--init-from", "reward", "is a reward model"),
    ("ppo", "--policy", "reward", "is a reward model")])
def test_a_checkpoint_of_the_wrong_stage_is_refused(checkpoints, tmp_path, script, flag, start, why):
    module = importlib.import_module(script)
    argv = [flag, checkpoints[start], "--out", str(tmp_path / "out"), "--device", "cpu"]
    if script == "ppo":
        argv += ["--reward", "world"]
    with pytest.raises(SystemExit, match=why):
        module.main(argv)


def test_a_damaged_truncated_or_empty_checkpoint_is_refused_in_one_line(tmp_path):
    import torch

    import model
    path = str(tmp_path / "ckpt.pt")
    model.save_checkpoint(path, model={"w": torch.ones(1000)}, step=3, args={"lr": 1e-3})
    assert model.load_checkpoint(path)["step"] == 3 and "sha256" not in model.load_checkpoint(path)
    raw = open(path, "rb").read()
    i = raw.index(b"\x00\x00\x80\x3f" * 8)  # inside the tensor's bytes (1.0 in fp32)
    open(path, "wb").write(raw[:i + 2] + b"\x81" + raw[i + 3:])  # one bit pattern changed: 1.0 -> 1.0000153
    assert torch.load(path, weights_only=True)["model"]["w"][0] != 1.0  # torch itself loads it without a word
    with pytest.raises(SystemExit, match="do not match its SHA-256"):
        model.load_checkpoint(path)
    open(path, "wb").write(raw[:len(raw) // 2])
    with pytest.raises(SystemExit, match="truncated or damaged"):
        model.load_checkpoint(path)
    open(path, "wb").write(b"")
    with pytest.raises(SystemExit, match="empty"):
        model.load_checkpoint(path)


def test_a_second_run_on_the_same_out_is_refused(tmp_path):
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit, match="is in use by another run"):
            pretrain.main(["--out", str(out), "--device", "cpu"])
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    import model
    model.claim_out_dir(str(out))  # free again once the other run has ended
    model.claim_out_dir(str(out))  # and a process may claim its own directory twice (one test after another)


def test_ppo_refuses_torchrun(monkeypatch, checkpoints, tmp_path):
    """ppo.py is the one stage that does not split its work (sft, reward and dpo are data-parallel)."""
    import ppo
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="ppo.py runs in one process"):
        ppo.main(["--policy", checkpoints["pretrain"], "--out", str(tmp_path / "out"), "--device", "cpu"])


def test_the_token_cache_follows_content_and_is_never_kept_truncated(tmp_path, enc):
    import os

    import data
    text = tmp_path / "a.txt"
    text.write_text("alpha beta gamma\n" * 50)
    cache = str(tmp_path / "cache")
    train, val = data.prepare_tokens(str(text), enc, cache)
    first = list(train[:3])
    stat = os.stat(text)
    text.write_text("delta omega zeta\n" * 50)  # same size, same modification time: an edit all the same
    os.utime(text, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    train, val = data.prepare_tokens(str(text), enc, cache)
    assert list(train[:3]) != first and list(train[:3]) == data.encode(enc, "delta omega zeta\n")[:3]
    n = len(train) + len(val)
    with open(os.path.join(cache, "tokens.bin"), "r+b") as f:  # a cache cut short by an earlier failure
        f.truncate(n)  # half of the 2-byte tokens
    train, val = data.prepare_tokens(str(text), enc, cache)
    assert len(train) + len(val) == n  # rebuilt, not reused


def test_a_token_cache_that_cannot_be_written_whole_is_an_error_and_leaves_nothing(tmp_path):
    """A file-size limit stands in for a full disk: the write fails, and neither tokens.bin nor meta.json
    is left for the next run to trust (before: tofile failed silently and meta.json counted every token)."""
    import subprocess
    import sys
    text = tmp_path / "big.txt"
    text.write_text("some words for the cache " * 4000)
    script = (f"import resource, sys; sys.path.insert(0, {str(__import__('os').getcwd())!r}); "
              f"resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); import data; "
              f"data.prepare_tokens({str(text)!r}, data.get_encoding(data.gpt2_tokenizer()), {str(tmp_path / 'c')!r})")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "cannot write the token cache" in run.stderr, run.stderr[-500:]
    assert not (tmp_path / "c" / "meta.json").exists() and not (tmp_path / "c" / "tokens.bin").exists()


def test_a_chat_longer_than_the_context_drops_whole_old_turns_and_keeps_the_system_prompt(enc):
    import data
    import sample
    system = [{"role": "system", "content": "Be brief."}]
    turns = [{"role": r, "content": f"message number {i} " * 3} for i, r in enumerate(["user", "assistant"] * 4)]
    messages = system + turns + [{"role": "user", "content": "last question?"}]
    whole, _ = data.render_chat(enc, messages, add_generation_prompt=True)
    ids, dropped = sample.fit_conversation(enc, messages, len(whole) - 1)
    assert dropped == 2 and ids == data.render_chat(enc, system + turns[2:] + messages[-1:], True)[0]
    assert ids[:2] == whole[:2] == [data.special_id(enc, "<|system|>")] + data.encode(enc, "Be brief.")[:1]
    with pytest.raises(SystemExit, match="the prompt takes .* tokens in the chat template"):
        sample.fit_conversation(enc, system + [messages[-1]], 3)


@pytest.mark.parametrize("record,message", [
    ({"instruction": "Add.", "output": 5}, "'output' must be a string, not a number"),
    ({"instruction": "Add.", "input": 7, "output": "12"}, "'input' must be a string, not a number"),
    ({"prompt": None, "completion": "x"}, "fits none"),
])
def test_a_field_of_the_wrong_type_is_named_with_its_type(record, message):
    import data
    with pytest.raises(data.DataError, match=message):
        data.to_messages(record, "f.jsonl:1")


def test_a_preference_prompt_of_null_says_so():
    import data
    with pytest.raises(data.DataError, match="'prompt' must be a string or a list of messages, not null"):
        data.to_pair({"prompt": None, "chosen": "a", "rejected": "b"}, "p.jsonl:3")


def test_a_byte_order_mark_is_accepted_and_a_gzip_file_is_named(tmp_path):
    import gzip

    import data
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + b'{"text": "hello"}\n{"text": "world"}\n')
    assert [t for _, t in data.iter_documents(str(tmp_path / "bom.jsonl"))] == ["hello", "world"]
    assert [r for _, r in data.iter_jsonl(str(tmp_path / "bom.jsonl"))] == [{"text": "hello"}, {"text": "world"}]
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfplain text\n")
    assert [t for _, t in data.iter_documents(str(tmp_path / "bom.txt"))] == ["plain text\n"]
    (tmp_path / "z.jsonl").write_bytes(gzip.compress(b'{"text": "hello"}\n'))
    with pytest.raises(data.DataError, match="a gzip file, not text: decompress it first"):
        list(data.iter_documents(str(tmp_path / "z.jsonl")))
    with pytest.raises(data.DataError, match="gzip"):
        list(data.iter_jsonl(str(tmp_path / "z.jsonl")))


@pytest.mark.parametrize("device,message", [("foo", "not a device"), ("cuda", "none on this machine"),
                                            ("mps", "none on this machine")])
def test_an_unknown_or_absent_device_is_one_line(device, message):
    import torch

    import model
    if (device == "cuda" and torch.cuda.is_available()) or (device == "mps" and torch.backends.mps.is_available()):
        pytest.skip(f"this machine has {device}")
    with pytest.raises(SystemExit, match=message):
        model.setup_runtime(device)


def test_a_read_only_out_fails_at_once(tmp_path):
    import os

    import model
    if os.geteuid() == 0:  # root writes anywhere: stand in with a path under a file
        (tmp_path / "file").write_text("x")
        out = str(tmp_path / "file" / "out")
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        out = str(tmp_path / "ro" / "out")
    with pytest.raises(SystemExit, match="cannot write there"):
        model.claim_out_dir(out)


def test_a_full_disk_while_saving_says_so(tmp_path, monkeypatch):
    import shutil

    import torch

    import model

    def full(state, f):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4096 vs 2048")
    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 * 2**30, 10 * 2**30, 1000))
    with pytest.raises(SystemExit, match="no space left on the device"):
        model.save_checkpoint(str(tmp_path / "ckpt.pt"), model={"w": torch.zeros(1000)})
    assert not list(tmp_path.iterdir())  # no partial file left


def test_the_mps_random_stream_is_saved(monkeypatch):
    import torch

    import model
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    assert model.rng_state(torch.device("mps"))["mps"].tolist() == [7]


@pytest.mark.parametrize("argv,message", [
    (["--n-head", "3"], "must be divisible by n_head 3"),
    (["--init-from", str(pathlib.Path(__file__).parents[1] / "README.md")], "not a checkpoint"),
    (["--init-from", "no/such/dir"], "neither a checkpoint"),
    (["--block-size", "8"], "the world's evaluation prompts take up to"),  # at once, not after training
])
def test_pretrain_bad_starts_are_one_line(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        pretrain.main(argv + ["--out", str(tmp_path / "out"), "--device", "cpu", "--max-steps", "1"])


def test_out_inside_data_is_refused(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("text " * 100)
    with pytest.raises(SystemExit, match="is inside --data"):
        pretrain.main(["--data", str(tmp_path / "corpus"), "--out", str(tmp_path / "corpus" / "out"), "--device", "cpu"])


def test_bits_per_byte_leave_out_tokens_of_no_bytes():
    import torch
    loss, targets = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1, 2])
    byte_lengths = torch.tensor([2, 0, 4])  # token 1 is <|endoftext|>: no bytes
    assert pretrain.text_loss(loss, targets, byte_lengths) == (4.0, 6)  # 1 + 3 nats over 2 + 4 bytes, not 6 / 6


def test_lora_targets_that_match_nothing_are_named(tiny_config):
    import lora
    import model
    m = model.GPT(tiny_config("modern"))
    with pytest.raises(ValueError, match=r"LoRA targets \['atn.proj'\] match no linear layer; this model's are"):
        lora.apply_lora(m, 4, 8.0, targets=["attn.qkv", "atn.proj"])


def test_an_adapter_whose_base_is_itself_is_refused(tmp_path):
    import model
    path = str(tmp_path / "adapter.pt")
    model.save_checkpoint(path, lora={}, base=path, step=1)
    with pytest.raises(ValueError, match="is the adapter itself"):
        model.load_model(path)
    model.save_checkpoint(str(tmp_path / "a.pt"), lora={}, base=str(tmp_path / "b.pt"), step=1)  # a -> b -> a
    model.save_checkpoint(str(tmp_path / "b.pt"), lora={}, base=str(tmp_path / "a.pt"), step=1)
    with pytest.raises(ValueError, match="is the adapter itself"):
        model.load_model(str(tmp_path / "a.pt"))


def test_reward_lora_with_unknown_targets_is_one_line(tiny_chat_model, tmp_path):
    import reward
    pairs = tmp_path / "p.jsonl"
    pairs.write_text("".join('{"prompt": "q%d", "chosen": "a", "rejected": "b"}\n' % i for i in range(8)))
    with pytest.raises(SystemExit, match=r"error: LoRA targets \['attn.nope'\] match no linear layer"):
        reward.main(["--init-from", tiny_chat_model, "--data", str(pairs), "--out", str(tmp_path / "rm"), "--lora-r", "4",
                     "--lora-targets", "attn.nope", "--device", "cpu", "--max-steps", "1", "--offset-prompts", "0"])


@pytest.mark.parametrize("script,flag", [("sft", "--init-from"), ("dpo", "--init-from"), ("ppo", "--policy")])
def test_lora_targets_that_match_nothing_stop_every_stage_in_one_line(tiny_chat_model, tmp_path, script, flag):
    module = importlib.import_module(script)
    argv = [flag, tiny_chat_model, "--out", str(tmp_path / "out"), "--lora-r", "4", "--lora-targets", "attn.nope",
            "--device", "cpu", "--max-steps", "1"]
    if script == "ppo":
        argv += ["--reward", "world"]
    with pytest.raises(SystemExit, match=r"error: LoRA targets \['attn.nope'\] match no linear layer"):
        module.main(argv)


def test_a_lora_resume_whose_base_changed_is_one_line(tiny_chat_model, tmp_path):
    import json
    import shutil

    import torch

    import model
    import sft
    base = tmp_path / "base"
    shutil.copytree(tiny_chat_model, base)
    records = tmp_path / "sft.jsonl"
    records.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": f"{i}."}) + "\n" for i in range(12)))
    argv = ["--init-from", str(base), "--data", str(records), "--out", str(tmp_path / "out"), "--lora-r", "4",
            "--max-steps", "4", "--batch-size", "2", "--eval-every", "2", "--device", "cpu", "--dtype", "float32"]
    sft.main(argv + ["--stop-at", "2"])
    ckpt = model.load_checkpoint(str(base / "ckpt.pt"))
    ckpt["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in ckpt["model"].items()}  # the base moved
    model.save_checkpoint(str(base / "ckpt.pt"), **ckpt)
    with pytest.raises(SystemExit, match="trained on different base weights"):
        sft.main(argv + ["--resume"])
    assert torch.load(str(tmp_path / "out" / "ckpt.pt"), weights_only=True)["step"] == 2  # the run's checkpoint kept
