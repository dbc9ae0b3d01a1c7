"""
DPO (dpo.py): dpo_loss against hand-computed values for each loss type, with gradients; the response-only
sequence log-probability against a direct computation with padding; a learning test that can fail
(held-out reward accuracy must rise from chance to 90% on a tiny model, without the chosen answers'
log-probability collapsing); cached and on-the-fly (LoRA disabled) references giving the same loss;
exact resume; one-line errors.

  python -m pytest tests/test_dpo.py
"""

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

import dpo
from conftest import assert_resumed_exactly, assert_same_training, torchrun, train_losses
import model
from dpo import dpo_loss


def logps(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_policy_equal_to_reference_gives_log_2():
    pc, pr = logps(-3.0, -10.0), logps(-5.0, -2.0)
    losses, cr, rr = dpo_loss(pc, pr, pc, pr, beta=0.1)
    torch.testing.assert_close(losses, torch.full((2,), math.log(2)))  # −log σ(0) = ln 2 ≈ 0.6931
    assert (cr == 0).all() and (rr == 0).all()


def test_sigmoid_loss_hand_computed_with_gradient():
    # h = (−1 − (−2)) − (−4 − (−3)) = 1 + 1 = 2; β h = ln 3 when β = ln 3 / 2: −log σ(ln 3) = ln(4/3) ≈ 0.2877
    beta = math.log(3) / 2
    pc = torch.tensor([-1.0], requires_grad=True)
    losses, cr, rr = dpo_loss(pc, logps(-4.0), logps(-2.0), logps(-3.0), beta=beta)
    assert losses.item() == pytest.approx(math.log(4 / 3))
    assert cr.item() == pytest.approx(beta * 1.0) and rr.item() == pytest.approx(beta * -1.0)  # β(π − π_ref)
    losses.sum().backward()
    # dL/dπ_w = −β (1 − σ(βh)) = −β · 1/4
    assert pc.grad.item() == pytest.approx(-beta / 4)


def test_label_smoothing_mixes_in_the_flipped_pair():
    z = 0.5 * 2.0  # β h with β = 0.5, h = 2
    losses, _, _ = dpo_loss(logps(-1.0), logps(-4.0), logps(-2.0), logps(-3.0), beta=0.5, label_smoothing=0.1)
    expected = -0.9 * math.log(1 / (1 + math.exp(-z))) - 0.1 * math.log(1 / (1 + math.exp(z)))
    assert losses.item() == pytest.approx(expected)


def test_ipo_loss_hand_computed():
    # (h − 1/(2β))² with h = 2, β = 0.25: (2 − 2)² = 0; with β = 0.5: (2 − 1)² = 1
    args = (logps(-1.0), logps(-4.0), logps(-2.0), logps(-3.0))
    assert dpo_loss(*args, beta=0.25, loss_type="ipo")[0].item() == pytest.approx(0.0)
    assert dpo_loss(*args, beta=0.5, loss_type="ipo")[0].item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="sigmoid or ipo"):
        dpo_loss(*args, loss_type="hinge")


def test_huge_log_ratio_differences_stay_finite():
    pc = torch.tensor([5000.0, -5000.0], requires_grad=True)
    zeros = torch.zeros(2)
    losses, _, _ = dpo_loss(pc, zeros, zeros, zeros, beta=0.5)
    assert torch.isfinite(losses).all() and losses[1].item() == pytest.approx(2500.0)  # −log σ(−2500) ≈ 2500
    losses.sum().backward()
    assert torch.isfinite(pc.grad).all()


def test_sequence_logps_sum_response_tokens_only(tiny_config):
    torch.manual_seed(0)
    m = model.GPT(tiny_config("gpt2")).eval()
    rows = [([1, 2, 3], [4, 5]), ([6], [7, 8, 9, 10]), ([11, 12, 13, 14], [15])]
    got = dpo.sequence_logps(m.logprobs_of, rows, 0, torch.device("cpu"))
    for i, (p, r) in enumerate(rows):  # directly: log_softmax at each position that predicts a response token
        ids = torch.tensor([p + r])
        lp = F.log_softmax(m(ids)[0][0].float(), -1)
        direct = sum(lp[len(p) - 1 + j, r[j]] for j in range(len(r)))
        assert got[i].item() == pytest.approx(direct.item(), abs=1e-4)


# -----------------------------------------------------------------------------
# The script

@pytest.fixture(scope="module")
def tiny_sft(tiny_chat_model):
    return tiny_chat_model


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """The chosen answer says "yes" where the rejected says "no"; the rest of the two is the same."""
    rng = random.Random(0)
    words = "the a cat dog sun tree runs sits red big small over under and blue green".split()
    lines = []
    for i in range(160):
        filler = " ".join(rng.choice(words) for _ in range(rng.randint(2, 5)))
        lines.append(json.dumps({"prompt": f"Question {i}: {filler}?", "chosen": f"yes {filler}",
                                 "rejected": f"no {filler}"}))
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def dpo_args(init, pairs, out, *extra):
    return ["--init-from", init, "--data", pairs, "--out", str(out), "--batch-size", "16", "--eval-every", "40",
            "--log-every", "1", "--device", "cpu", "--dtype", "float32", *extra]


def val_records(out):
    return [r for r in map(json.loads, open(out / "log.jsonl")) if "val/accuracy" in r]


@pytest.mark.slow  # ~10 s on 2 CPU cores
def test_a_tiny_model_learns_the_preference_and_keeps_the_chosen_answers(tiny_sft, pairs_file, tmp_path):
    out = tmp_path / "dpo"
    dpo.main(dpo_args(tiny_sft, pairs_file, out, "--max-steps", "80", "--lr", "1e-3", "--val-fraction", "0.2",
                      "--sft-coef", "0"))
    first, last = val_records(out)[0], val_records(out)[-1]
    assert first["val/accuracy"] <= 0.6 and last["val/accuracy"] >= 0.9  # chance (ties count as wrong) -> 90%
    assert last["val/margin"] > first["val/margin"]
    assert last["val/chosen_logp"] > first["val/chosen_logp"] - 5  # pushed apart, the chosen not thrown away


def test_cached_and_on_the_fly_references_give_the_same_loss(tiny_sft, pairs_file, tmp_path):
    """With LoRA, π_ref is either cached before training or the model with adapters disabled: the same
    numbers, so the same losses step by step."""
    common = ["--max-steps", "4", "--lora-r", "4", "--lr", "1e-3", "--eval-every", "100", "--sft-coef", "0"]
    dpo.main(dpo_args(tiny_sft, pairs_file, tmp_path / "cached", *common, "--ref", "cached"))
    dpo.main(dpo_args(tiny_sft, pairs_file, tmp_path / "lora", *common, "--ref", "lora"))

    cached, on_the_fly = (list(train_losses(tmp_path / name).values()) for name in ("cached", "lora"))
    assert len(cached) == 4 and cached[0] == pytest.approx(math.log(2), abs=1e-6)  # B = 0: the policy is π_ref
    for a, b in zip(cached, on_the_fly):
        assert a == pytest.approx(b, abs=1e-5)
    assert cached[-1] != pytest.approx(cached[0])  # they did train


def test_dpo_resume_is_exact(tiny_sft, pairs_file, tmp_path, monkeypatch):
    """6 steps straight == 3, stop, --resume, 3 more. The resumed command leaves out the loss, β, the NLL
    coefficient and the data (so the defaults, and a file that does not exist): the checkpoint's are used,
    each with a line saying so."""
    common = ["--max-steps", "6", "--eval-every", "100", "--lr", "1e-3"]
    ipo = ["--loss", "ipo", "--beta", "0.5", "--sft-coef", "0.5"]
    dpo.main(dpo_args(tiny_sft, pairs_file, tmp_path / "straight", *common, *ipo))
    dpo.main(dpo_args(tiny_sft, pairs_file, tmp_path / "resumed", *common, *ipo, "--stop-at", "3"))
    said = []
    monkeypatch.setattr(dpo.tqdm, "write", lambda s, *a, **k: said.append(s))
    dpo.main(dpo_args(tiny_sft, str(tmp_path / "absent.jsonl"), tmp_path / "resumed", *common, "--resume"))

    assert_resumed_exactly(tmp_path / "straight", tmp_path / "resumed", 6)
    for flag, saved, given in [("loss", "ipo", "sigmoid"), ("beta", 0.5, 0.1), ("sft-coef", 0.5, 1.0),
                               ("data", pairs_file, tmp_path / "absent.jsonl")]:
        assert f"--resume: --{flag} {saved} from the checkpoint (the command line gave {given})" in said


def test_resume_on_pairs_changed_in_place_is_a_one_line_error(tiny_sft, pairs_file, tmp_path):
    """The same path, other pairs (as many): the sampler's position means nothing on them."""
    pairs = tmp_path / "pairs.jsonl"
    lines = open(pairs_file).readlines()
    pairs.write_text("".join(lines))
    dpo.main(dpo_args(tiny_sft, str(pairs), tmp_path / "run", "--max-steps", "4", "--stop-at", "2"))
    pairs.write_text("".join(lines[1:] + lines[:1]))  # the same pairs in another order: other rows for each index
    with pytest.raises(SystemExit, match="the data changed"):
        dpo.main(dpo_args(tiny_sft, str(pairs), tmp_path / "run", "--max-steps", "4", "--resume"))


@pytest.mark.slow  # two processes
def test_ddp_matches_one_process(tiny_sft, pairs_file, tmp_path):
    """torchrun, 2 gloo processes, 4 pairs a step (2 each) == 1 process, 4 pairs a step: each rank's loss is
    its share's sum over the whole batch, so the averaged gradients are the one process's."""
    common = ["--batch-size", "4", "--max-steps", "4", "--eval-every", "4", "--lr", "1e-3"]
    dpo.main(dpo_args(tiny_sft, pairs_file, tmp_path / "single", *common))
    result = torchrun("dpo.py", *dpo_args(tiny_sft, pairs_file, tmp_path / "ddp", *common))
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_training(tmp_path / "single", tmp_path / "ddp", 4)


def test_bad_input_and_bad_flags(tiny_sft, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    with pytest.raises(SystemExit, match=rf"{bad}:1: record fits none"):
        dpo.main(dpo_args(tiny_sft, str(bad), tmp_path / "out", "--max-steps", "1"))
    with pytest.raises(SystemExit):
        dpo.get_args(["--ref", "lora"])  # the on-the-fly reference needs adapters to disable
