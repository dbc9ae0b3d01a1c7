"""
The reward model (reward.py): the Bradley-Terry loss against hand-computed values and gradients, the
score read at each row's last real token, a learning test that can fail (a tiny model must learn which
answer has a property), `score` and `compare` as subprocesses, exact resume, and one-line errors.

  python -m pytest tests/test_reward.py
"""

import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

import model
import reward
from conftest import assert_resumed_exactly
from reward import bradley_terry_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -----------------------------------------------------------------------------
# The loss, by hand

def test_equal_rewards_give_log_2_and_a_gap_of_ln_3_gives_ln_4_3():
    r = torch.tensor([0.3, -1.2, 5.0])
    assert bradley_terry_loss(r, r).item() == pytest.approx(math.log(2))  # −log σ(0) = ln 2 ≈ 0.6931
    # −log σ(ln 3) = log(1 + 1/3) = ln(4/3) ≈ 0.2877
    assert bradley_terry_loss(torch.tensor([math.log(3)]), torch.tensor([0.0])).item() == pytest.approx(math.log(4 / 3))
    loss = bradley_terry_loss(r, r)
    assert loss.dim() == 0


def test_extreme_gaps_stay_finite_and_the_gradient_is_the_sigmoid():
    w = torch.tensor([1000.0, -1000.0], requires_grad=True)
    l = torch.zeros(2, requires_grad=True)
    loss = bradley_terry_loss(w, l)
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx((0 + 1000) / 2)  # −log σ(1000) ≈ 0, −log σ(−1000) ≈ 1000
    loss.backward()
    # d/dr_w of mean −log σ(r_w − r_l) = −(1 − σ(z)) / B: 0 for the easy pair, −1/2 for the wrong one
    torch.testing.assert_close(w.grad, torch.tensor([0.0, -0.5]))
    torch.testing.assert_close(l.grad, torch.tensor([0.0, 0.5]))


def test_margin_and_centering():
    w, l = torch.tensor([2.0]), torch.tensor([1.0])
    # a margin of 1 turns a gap of 1 into −log σ(0) = ln 2
    assert bradley_terry_loss(w, l, margin=1.0).item() == pytest.approx(math.log(2))
    # centering adds c·(r_w + r_l)² = 0.1 · 9 on top of −log σ(1) = 0.3133
    plain = -math.log(1 / (1 + math.exp(-1)))
    assert bradley_terry_loss(w, l, center_coef=0.1).item() == pytest.approx(plain + 0.9)


def test_scores_are_read_at_the_last_token_of_each_pair(tiny_config):
    torch.manual_seed(0)
    m = model.GPT(tiny_config("modern", score_head=True)).eval()
    rows = [([5, 6, 7], [8, 9]), ([10], [11, 12, 13, 14]), ([1, 2], [3])]
    got = reward.score_sequences(m, rows, 0, torch.device("cpu"))
    for i, (p, r) in enumerate(rows):
        alone = m.scores(torch.tensor([p + r]))[0, -1]
        torch.testing.assert_close(got[i], alone, rtol=0, atol=1e-5)


# -----------------------------------------------------------------------------
# The script

@pytest.fixture(scope="module")
def tiny_sft(tiny_chat_model):
    return tiny_chat_model


@pytest.fixture(scope="module")
def property_pairs(tmp_path_factory):
    """Pairs where the chosen answer says "yes" somewhere and the rejected one never does."""
    rng = random.Random(0)
    words = "the a cat dog sun tree runs sits red big small over under and blue green".split()
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    lines = []
    for i in range(160):
        filler = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(3, 7)))  # noqa: E731
        chosen = f"{filler()} yes {filler()}"
        lines.append(json.dumps({"prompt": f"Question {i}: {filler()}?", "chosen": chosen, "rejected": filler(),
                                 "kind": "odd" if i % 2 else "even"}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def rm_args(init, pairs, out, *extra):
    return ["--init-from", init, "--data", pairs, "--out", str(out), "--batch-size", "16", "--lr", "3e-3",
            "--eval-every", "40", "--log-every", "5", "--offset-prompts", "8", "--device", "cpu", "--dtype", "float32",
            *extra]


@pytest.mark.slow  # ~15 s on 2 CPU cores
def test_a_tiny_reward_model_learns_the_property(tiny_sft, property_pairs, tmp_path):
    metrics = reward.main(rm_args(tiny_sft, property_pairs, tmp_path / "rm", "--max-steps", "80",
                                  "--val-fraction", "0.25"))
    assert metrics["rm/accuracy"] >= 0.9 and metrics["rm/accuracy_odd"] >= 0.8 and metrics["rm/accuracy_even"] >= 0.8
    rm, ckpt = model.load_model(str(tmp_path / "rm"))
    assert rm.score_head is not None and ckpt["stage"] == "reward"
    assert ckpt["reward_offset"] == pytest.approx(metrics["reward_offset"])


def test_reward_resume_is_exact(tiny_sft, property_pairs, tmp_path):
    common = ["--max-steps", "6", "--eval-every", "100", "--offset-prompts", "0", "--log-every", "1"]
    reward.main(rm_args(tiny_sft, property_pairs, tmp_path / "straight", *common))
    reward.main(rm_args(tiny_sft, property_pairs, tmp_path / "resumed", *common, "--stop-at", "3"))
    reward.main(rm_args(tiny_sft, property_pairs, tmp_path / "resumed", *common, "--resume"))

    assert_resumed_exactly(tmp_path / "straight", tmp_path / "resumed", 6)


def test_lora_reward_model_saves_its_head_with_the_adapter(tiny_sft, property_pairs, tmp_path):
    out = tmp_path / "lora"
    reward.main(rm_args(tiny_sft, property_pairs, out, "--max-steps", "4", "--lora-r", "4", "--offset-prompts", "0"))
    adapter = model.load_checkpoint(str(out / "adapter.pt"))
    assert {"score_head.weight", "score_head.bias"} <= set(adapter["lora"])
    from_adapter, _ = model.load_model(str(out / "adapter.pt"))  # base + head + adapters, merged
    merged, _ = model.load_model(str(out))
    idx = torch.randint(0, 1000, (2, 10))
    torch.testing.assert_close(from_adapter.eval().scores(idx), merged.eval().scores(idx), rtol=0, atol=1e-5)


def run(*argv):
    return subprocess.run([sys.executable, os.path.join(ROOT, "reward.py"), *map(str, argv)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


@pytest.mark.slow  # subprocesses
def test_score_and_compare_from_the_command_line(tiny_sft, property_pairs, tmp_path):
    out = tmp_path / "rm"
    reward.main(rm_args(tiny_sft, property_pairs, out, "--max-steps", "2", "--offset-prompts", "0"))
    records = tmp_path / "answers.jsonl"
    records.write_text(json.dumps({"prompt": "Hi?", "response": "yes it is"}) + "\n"
                       + json.dumps({"prompt": "Hi?", "response": "no"}) + "\n")
    result = run("score", "--model", out, "--data", records, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    scores = [json.loads(line)["score"] for line in open(tmp_path / "answers.scores.jsonl")]
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores) and "2 records scored" in result.stdout
    one = run("score", "--model", out, "--prompt", "Hi?", "--response", "yes it is", "--device", "cpu")
    assert float(one.stdout.split()[-1]) == pytest.approx(scores[0], abs=1e-3)  # the same record, alone
    # a model against itself: every prompt a tie, so the win rate is exactly one half
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(6)))
    same = run("compare", "--model", out, "--a", tiny_sft, "--b", tiny_sft, "--prompts", prompts,
               "--max-new-tokens", "4", "--device", "cpu")
    assert same.returncode == 0, same.stderr
    verdict = json.loads(same.stdout.splitlines()[0])
    assert (verdict["win_rate"], verdict["ties"], verdict["n"]) == (0.5, 6, 6)


def test_bad_input_is_one_line(tiny_sft, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n{not json\n")
    with pytest.raises(SystemExit, match=rf"{bad}:2: not valid JSON"):
        reward.main(rm_args(tiny_sft, str(bad), tmp_path / "out", "--max-steps", "1"))
    result = run("score", "--model", tiny_sft, "--prompt", "a", "--response", "b", "--device", "cpu")
    assert result.returncode == 1 and "not a reward model" in result.stderr and "Traceback" not in result.stderr
