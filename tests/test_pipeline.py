"""
The default chain on a tiny world, as a user runs it: `prepare.py world`, then `pretrain.py` and `sft.py`
`reward.py`, `dpo.py` and `ppo.py` as subprocesses, each on a tiny configuration (40 countries, a 2-layer model, seconds per stage).
Each stage's own metric must move the right way on held-out data:
  pretraining lowers the validation loss and raises completion accuracy ("The capital of X is" -> X's
  capital) from the 0% of an untrained model;
  SFT raises answer accuracy on countries held out of its data, in the chat template, above the base
  model's plain-text answer accuracy, and its replies end with <|end|>;
  the reward model's accuracy on held-out preference pairs rises from chance to at least 75%; the reward
  model trained on feedback collected on the SFT model's own answers (reward.py's default) prefers the
  annotator's choice among that model's samples to prompts held out of its training at least 70% of the time;
  DPO raises abstention on invented countries while keeping held-out answers;
  PPO and GRPO each raise the reward model's score over training.

  python -m pytest tests/test_pipeline.py
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_WORLD = ["--n-countries", "40", "--heldout", "10", "--invented", "10", "--pref-invented", "60",
              "--statements", "40", "--stories-docs", "0", "--vocab-size", "512"]
TINY_MODEL = ["--n-layer", "2", "--n-head", "4", "--n-embd", "128", "--block-size", "64"]
SYSTEM = ["--device", "cpu", "--dtype", "float32"]


def run(script, *argv):
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, argv)], capture_output=True,
                            text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def read(path):
    with open(path) as f:
        return json.load(f)


@pytest.mark.slow
def test_world_chain_each_stage_moves_its_metric(tmp_path):
    world, pre, sft = tmp_path / "world", tmp_path / "pretrain", tmp_path / "sft"
    run("prepare.py", "world", "--out", world, *TINY_WORLD)

    run("pretrain.py", "--data", world / "pretrain.jsonl", "--out", pre, *TINY_MODEL, "--max-steps", 400,
        "--batch-size", 16, "--lr", "3e-3", "--eval-every", 400, "--warmup-steps", 20, *SYSTEM)
    vals = [r["val/loss"] for r in map(json.loads, open(pre / "log.jsonl")) if "val/loss" in r]
    base = read(pre / "eval.json")
    assert vals[-1] < 0.5 * vals[0]  # step 0: ln(512) ≈ 6.2
    assert base["completion"] >= 0.8 and base["n_countries"] == 40  # an untrained model completes none

    run("sft.py", "--init-from", pre, "--data", world / "sft.jsonl", "--out", sft, "--max-steps", 150,
        "--batch-size", 8, "--eval-every", 150, *SYSTEM)
    tuned = read(sft / "eval.json")
    assert tuned["n_heldout"] == 10
    assert tuned["answer"] >= 0.5 and tuned["answer"] >= base["answer"] + 0.3  # on the held-out countries
    assert tuned["format"] >= 0.9

    # the reward model on the hand-written pairs, and on feedback collected on the SFT model's own answers
    # (reward.py's default): the annotator ranks 4 samples per prompt of prompts.jsonl
    off = tmp_path / "reward_offpolicy"
    run("reward.py", "--init-from", sft, "--data", world / "prefs.jsonl", "--out", off, "--max-steps", 100,
        "--val-fraction", "0.2", "--eval-every", 100, "--offset-prompts", 16, *SYSTEM)
    scores = [r for r in map(json.loads, open(off / "log.jsonl")) if "rm/accuracy" in r]
    assert scores[0]["rm/accuracy"] < 0.75 <= scores[-1]["rm/accuracy"]  # held-out pairs, before and after
    rm = tmp_path / "reward"
    run("reward.py", "--init-from", sft, "--prompts", world / "prompts.jsonl", "--out", rm, "--max-steps", 100,
        "--val-fraction", "0.2", "--eval-every", 100, "--offset-prompts", 16, *SYSTEM)
    collected = [json.loads(line) for line in open(rm / "feedback.jsonl")]
    assert len(collected) >= 20 and all(r["policy"] == [str(sft)] * 2 and r["round"] == 1 for r in collected)
    # on the prompts held out of its training (a fifth of them), the reward model prefers the answer the
    # annotator preferred among the policy's own samples: from chance before training to at least 70%
    scores = [r for r in map(json.loads, open(rm / "log.jsonl")) if "rm/accuracy" in r]
    print("on-policy held-out accuracy", scores[0]["rm/accuracy"], scores[-1]["rm/accuracy"])
    assert scores[-1]["rm/accuracy"] >= 0.7 and scores[-1]["rm/accuracy"] > scores[0]["rm/accuracy"]
    run("sample.py", "--judge", rm, "--init-from", sft, "--world", world, "--best-of-n", 4,
        "--device", "cpu", "--dtype", "float32")
    curve = read(rm / "best_of_n.json")["curve"]
    assert [c["n"] for c in curve] == [1, 2, 4] and all(c["oracle_gold"] >= c["gold"] for c in curve)

    aligned = tmp_path / "dpo"
    run("dpo.py", "--init-from", sft, "--data", world / "prefs.jsonl", "--out", aligned, "--max-steps", 100,
        "--eval-every", 100, "--lr", "1e-4", *SYSTEM)
    after = read(aligned / "eval.json")
    pairs = [r for r in map(json.loads, open(aligned / "log.jsonl")) if "val/accuracy" in r]
    assert pairs[-1]["val/accuracy"] >= 0.8  # DPO's implicit reward ranks the held-out pairs
    assert after["abstention"] > tuned["abstention"]  # invented countries in no training file: now declined

    # PPO and GRPO against the reward model: each raises it (the world's rule is too sparse for a 2-layer
    # model's 30 steps: nearly every group of 4 scores the same)
    for name, extra in (("ppo", ["--reward-model", rm]), ("grpo", ["--algo", "grpo", "--reward-model", rm])):
        out = tmp_path / name
        run("ppo.py", "--policy", sft, "--prompts", world / "prompts.jsonl", "--out", out, "--max-steps", 30,
            "--batch-size", 16, "--lr", "1e-4", "--eval-every", 30, "--log-every", 1, *extra, *SYSTEM)
        steps = [r for r in map(json.loads, open(out / "log.jsonl")) if "ppo/score" in r]
        early, late = (sum(r["ppo/score"] for r in part) / len(part) for part in (steps[:8], steps[-8:]))
        assert late > early, (name, early, late)
        assert read(out / "eval.json")["n_invented"] == 10  # the world's metrics, written at the end
