"""
The reward model (reward.py): the Bradley-Terry loss against hand-computed values and gradients, the
score read at each row's last real token, a learning test that can fail (a tiny model must learn which
answer has a property), exact resume, and one-line errors; the reward model as a judge (sample.py --judge:
scores, --compare, best-of-n selection) with its scores and win rate as subprocesses.

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

import data
import model
import reward
from conftest import assert_resumed_exactly, assert_same_training, torchrun
from data import group_comparisons
from reward import bradley_terry_loss
from sample import best_of_n

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
    got = data.score_sequences(m.scores, rows, 0, torch.device("cpu"))
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


def test_resume_on_comparisons_changed_in_place_is_a_one_line_error(tiny_sft, property_pairs, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    lines = open(property_pairs).readlines()
    pairs.write_text("".join(lines))
    common = ["--max-steps", "4", "--offset-prompts", "0"]
    reward.main(rm_args(tiny_sft, str(pairs), tmp_path / "run", *common, "--stop-at", "2"))
    pairs.write_text("".join(lines[:-1] + [lines[-1].replace("Question", "Query")]))  # one prompt edited
    with pytest.raises(SystemExit, match="the data changed"):
        reward.main(rm_args(tiny_sft, str(pairs), tmp_path / "run", *common, "--resume"))


@pytest.mark.slow  # two processes
def test_ddp_matches_one_process(tiny_sft, tmp_path):
    """torchrun, 2 gloo processes, 4 prompts a step (2 each) == 1 process, 4 prompts a step, with rankings of
    2 to 4 answers (1 to 6 comparisons a prompt) and the centering term on: each rank's loss takes the
    means over the whole batch, so the ranks' gradients sum to the one process's. The model's lm_head is
    untied and never in the loss (DDP must be told)."""
    rng = random.Random(1)
    words = "the a cat dog sun tree runs sits red big small over under and blue green".split()
    lines = []
    for g in range(40):
        answers = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 6))) + (" yes" * (3 - j))
                   for j in range(rng.randint(2, 4))]  # best first
        lines += [json.dumps({"prompt": f"Question {g}?", "chosen": a, "rejected": b, "group": g})
                  for i, a in enumerate(answers) for b in answers[i + 1:]]
    pairs = tmp_path / "ranked.jsonl"
    pairs.write_text("\n".join(lines) + "\n")
    common = ["--batch-size", "4", "--max-steps", "4", "--log-every", "1", "--offset-prompts", "0",
              "--center-coef", "0.1"]
    reward.main(rm_args(tiny_sft, str(pairs), tmp_path / "single", *common))
    result = torchrun("reward.py", *rm_args(tiny_sft, str(pairs), tmp_path / "ddp", *common))
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_training(tmp_path / "single", tmp_path / "ddp", 4)


def test_lora_reward_model_saves_its_head_with_the_adapter(tiny_sft, property_pairs, tmp_path):
    out = tmp_path / "lora"
    reward.main(rm_args(tiny_sft, property_pairs, out, "--max-steps", "4", "--lora-r", "4", "--offset-prompts", "0"))
    adapter = model.load_checkpoint(str(out / "adapter.pt"))
    assert {"score_head.weight", "score_head.bias"} <= set(adapter["lora"])
    from_adapter, _ = model.load_model(str(out / "adapter.pt"))  # base + head + adapters, merged
    merged, _ = model.load_model(str(out))
    idx = torch.randint(0, 1000, (2, 10))
    torch.testing.assert_close(from_adapter.eval().scores(idx), merged.eval().scores(idx), rtol=0, atol=1e-5)


def run_sample(*argv):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *map(str, argv)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


@pytest.mark.slow  # subprocesses
def test_the_judge_scores_and_compares_from_the_command_line(tiny_sft, property_pairs, tmp_path):
    out = tmp_path / "rm"
    reward.main(rm_args(tiny_sft, property_pairs, out, "--max-steps", "2", "--offset-prompts", "0"))
    records = tmp_path / "answers.jsonl"
    records.write_text(json.dumps({"prompt": "Hi?", "response": "yes it is"}) + "\n"
                       + json.dumps({"prompt": "Hi?", "response": "no"}) + "\n")
    result = run_sample("--judge", out, "--responses", records, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    scores = [json.loads(line)["score"] for line in open(tmp_path / "answers.scores.jsonl")]
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores) and "2 records scored" in result.stdout
    one = run_sample("--judge", out, "--prompt", "Hi?", "--response", "yes it is", "--device", "cpu")
    assert float(one.stdout.split()[-1]) == pytest.approx(scores[0], abs=1e-3)  # the same record, alone
    # a model against itself: every prompt a tie, so the win rate is exactly one half
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(6)))
    same = run_sample("--judge", out, "--init-from", tiny_sft, "--compare", tiny_sft, "--prompts", prompts,
                      "--max-new-tokens", "4", "--device", "cpu")
    assert same.returncode == 0, same.stderr
    verdict = json.loads(same.stdout.splitlines()[0])
    assert (verdict["win_rate"], verdict["ties"], verdict["n"]) == (0.5, 6, 6)
    # answers longer than the reward model's context (64): one line, and for compare before any generation
    long = run_sample("--judge", out, "--prompt", "Hi?", "--response", "word " * 100, "--device", "cpu")
    assert long.returncode == 1 and "does not fit the reward model's context of 64" in long.stderr
    assert "Traceback" not in long.stderr
    long = run_sample("--judge", out, "--init-from", tiny_sft, "--compare", tiny_sft, "--prompts", prompts,
                      "--max-new-tokens", "80", "--device", "cpu")
    assert long.returncode == 1 and "--max-new-tokens 80: an answer that long would not fit" in long.stderr


def test_the_judges_flags_without_a_judge_are_one_line():
    result = run_sample("--compare", "out/sft")  # refused by the argument parser, before any model loads
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "sample.py: error: --compare needs --judge RM, the reward model that judges"


def test_bad_input_is_one_line(tiny_sft, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n{not json\n")
    with pytest.raises(SystemExit, match=rf"{bad}:2: not valid JSON"):
        reward.main(rm_args(tiny_sft, str(bad), tmp_path / "out", "--max-steps", "1"))
    result = run_sample("--judge", tiny_sft, "--prompt", "a", "--response", "b", "--device", "cpu")
    assert result.returncode == 1 and "not a reward model" in result.stderr and "Traceback" not in result.stderr


# -----------------------------------------------------------------------------
# Rankings: K answers per prompt, all C(K,2) comparisons in one batch element


def test_comparisons_of_a_ranking_with_ties():
    assert reward.comparisons_of([2, 0, 2, 1]) == [(0, 1), (0, 3), (2, 1), (3, 1), (2, 3)]  # 0 and 2 tie
    assert reward.comparisons_of([1, 1, 1]) == []                      # all tied: nothing to learn
    assert reward.comparisons_of([0, 1, 2, 3]) == [(1, 0), (2, 0), (3, 0), (2, 1), (3, 1), (3, 2)]  # C(4,2) = 6
    assert reward.comparisons_of([5]) == []


def test_the_k_wise_loss_is_the_mean_of_the_pairwise_losses_per_prompt():
    # prompt 0: K = 3 answers scored 2, 1, 0 and ranked in that order -> C(3,2) = 3 comparisons with gaps
    # 1, 2, 1: −1/3 · (log σ(1) + log σ(2) + log σ(1)) = (0.31326 + 0.12693 + 0.31326) / 3 = 0.25115
    # prompt 1: one comparison with gap 0: ln 2 = 0.69315. The mean over the two prompts: 0.47215
    scores = torch.tensor([2.0, 1.0, 0.0, 0.5, 0.5])
    winners, losers, group = torch.tensor([0, 0, 1, 3]), torch.tensor([1, 2, 2, 4]), torch.tensor([0, 0, 0, 1])
    loss = bradley_terry_loss(scores[winners], scores[losers], group=group)
    sp = lambda z: math.log(1 + math.exp(-z))  # noqa: E731  −log σ(z)
    assert loss.item() == pytest.approx(((sp(1) + sp(2) + sp(1)) / 3 + math.log(2)) / 2)
    assert loss.item() == pytest.approx(0.47215, abs=1e-5)
    # one prompt: exactly the mean of the pairwise Bradley-Terry losses over its C(K,2) pairs
    k_wise = bradley_terry_loss(scores[winners[:3]], scores[losers[:3]], group=group[:3])
    pairwise = torch.stack([bradley_terry_loss(scores[w:w + 1], scores[l:l + 1]) for w, l in [(0, 1), (0, 2), (1, 2)]])
    torch.testing.assert_close(k_wise, pairwise.mean())
    # one comparison per prompt: the plain pairwise loss
    torch.testing.assert_close(bradley_terry_loss(scores[winners], scores[losers], group=torch.arange(4)),
                               bradley_terry_loss(scores[winners], scores[losers]))


def test_group_comparisons_keeps_each_answer_once():
    rows = [([1, 2], [3], [4], "2>0", (0, 7)), ([1, 2], [3], [5], "2>0", (0, 7)), ([1, 2], [5], [4], "1>0", (0, 7)),
            ([9], [3], [4], "x", (0, ("pair", 3)))]
    groups = group_comparisons(rows)
    assert len(groups) == 2
    assert groups[0] == {"prompt": [1, 2], "answers": [[3], [4], [5]],
                         "comparisons": [(0, 1, "2>0"), (0, 2, "2>0"), (2, 1, "1>0")]}
    assert groups[1]["answers"] == [[3], [4]] and groups[1]["comparisons"] == [(0, 1, "x")]


def test_best_of_n_picks_the_highest_scored_sample():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.2], [3.0, 1.0, 2.0, 4.0]])     # (Q = 2, N = 4)
    gold = torch.tensor([[0.0, 1.0, 2.0, 3.0], [10.0, 11.0, 12.0, 13.0]])
    assert best_of_n(scores, gold, 1).tolist() == gold.tolist()             # n = 1: every sample
    assert best_of_n(scores, gold, 2).tolist() == [[1.0, 2.0], [10.0, 13.0]]  # sets {0,1}, {2,3}
    assert best_of_n(scores, gold, 4).tolist() == [[1.0], [13.0]]
    torch.testing.assert_close(best_of_n(scores, scores, 4), torch.tensor([[0.9], [4.0]]))  # the pick: the max score
    assert best_of_n(torch.zeros(1, 4), gold[:1], 4).tolist() == [[0.0]]     # a tie: the first


def length_grader(messages, answers):
    """A stand-in annotator: longer answers are better (a random model's answers differ in length)."""
    return [len(a) for a in answers]


@pytest.fixture(scope="module")
def world_prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Question {i}: is it {w}?"}) + "\n"
                            for i, w in enumerate("red blue green big small sun tree cat dog run sit over".split())))
    return str(path)


def test_collection_is_deterministic_and_writes_pairs_the_readers_load(tiny_sft, world_prompts, tmp_path):
    rt = model.setup_runtime("cpu", "float32", 0)
    policy, ckpt = model.load_model(tiny_sft)
    enc = data.get_encoding(data.checkpoint_tokenizer(ckpt))
    prompts = data.read_prompts(world_prompts)
    runs = [reward.collect_feedback([("p", policy)], enc, prompts, length_grader, 4, 1.0, 6, rt, seed=5,
                                    round_=2)[0] for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) > 0
    other = reward.collect_feedback([("p", policy)], enc, prompts, length_grader, 4, 1.0, 6, rt, seed=6)[0]
    assert other != runs[0]
    for r in runs[0]:
        assert len(r["chosen"]) > len(r["rejected"]) and r["round"] == 2 and r["policy"] == ["p", "p"]
        assert r["kind"] == f"{len(r['chosen'])}>{len(r['rejected'])}" and 0 <= r["group"] < len(prompts)
    assert max(sum(r["group"] == g for r in runs[0]) for g in range(len(prompts))) <= 6  # at most C(4,2)
    path = tmp_path / "feedback.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in runs[0]))
    pairs, counts = data.read_preference_pairs(str(path))
    assert counts["kept"] == len(runs[0]) and pairs[0]["group"] == runs[0][0]["group"]
    assert data.read_prompts(str(path))[0] == runs[0][0]["prompt"]


def test_label_noise_flips_the_expected_share(tiny_sft, world_prompts):
    rt = model.setup_runtime("cpu", "float32", 0)
    policy, ckpt = model.load_model(tiny_sft)
    enc = data.get_encoding(data.checkpoint_tokenizer(ckpt))
    prompts = data.read_prompts(world_prompts) * 8  # 96 prompts, about 5 comparisons each
    clean = reward.collect_feedback([("p", policy)], enc, prompts, length_grader, 4, 1.0, 6, rt, seed=1)[0]
    noisy = reward.collect_feedback([("p", policy)], enc, prompts, length_grader, 4, 1.0, 6, rt, seed=1,
                                    label_noise=0.3)[0]
    assert len(clean) == len(noisy) > 300  # the same answers: noise changes labels, never samples
    flipped = [c["chosen"] == n["rejected"] and c["rejected"] == n["chosen"] for c, n in zip(clean, noisy)]
    assert all(f or c == n for f, c, n in zip(flipped, clean, noisy))
    # a binomial share of 0.3 over n > 300 comparisons: sd = sqrt(0.21 / n) < 0.027; 4 sd either side
    assert abs(sum(flipped) / len(flipped) - 0.3) < 0.11


def test_one_forward_row_per_answer_and_collection_by_default(tiny_sft, world_prompts, tmp_path, monkeypatch):
    rows_per_call = []
    real = data.score_sequences

    def counting(m, rows, pad_id, device):
        rows_per_call.append(len(rows))
        return real(m, rows, pad_id, device)
    monkeypatch.setattr(data, "score_sequences", counting)
    grader = tmp_path / "grader.py"
    grader.write_text("def grade(messages, answers):\n    return [len(a) for a in answers]\n")
    out = tmp_path / "rm"
    reward.main(["--init-from", tiny_sft, "--prompts", world_prompts, "--annotator", f"{grader}:grade", "--out",
                 str(out), "--max-new-tokens", "6", "--batch-size", "4", "--max-steps", "3", "--eval-every", "100",
                 "--offset-prompts", "0", "--val-fraction", "0.25", "--device", "cpu", "--dtype", "float32"])
    records = [json.loads(line) for line in open(out / "feedback.jsonl")]
    answers = {}
    for r in records:  # the distinct answers of each prompt
        answers.setdefault(r["group"], set()).update([r["chosen"], r["rejected"]])
    # every call scores the distinct answers of whole prompts, at most K = 4 each: never 2 rows per comparison
    assert max(rows_per_call) <= 4 * 4 and sum(rows_per_call) <= sum(map(len, answers.values())) + 4 * 4 * 3
    n_comparisons = len(records)
    assert sum(rows_per_call) < 2 * n_comparisons
    assert records[0]["policy"] == [tiny_sft, tiny_sft] and records[0]["round"] == 1
    with open(out / "log.jsonl") as f:
        assert json.loads(f.readline())["feedback/comparisons"] == n_comparisons


def test_annotator_errors_are_one_line(tiny_sft, world_prompts, tmp_path, capsys):
    with pytest.raises(SystemExit, match="world.json beside"):
        reward.main(["--init-from", tiny_sft, "--prompts", world_prompts, "--out", str(tmp_path / "a"), "--device", "cpu"])
    with pytest.raises(SystemExit, match="no such file"):
        reward.main(["--init-from", tiny_sft, "--prompts", world_prompts, "--annotator", "nowhere.py:f",
                     "--out", str(tmp_path / "b"), "--device", "cpu"])
    with pytest.raises(SystemExit):
        reward.get_args(["--label-noise", "0.7"])
    assert "--label-noise must be in [0, 0.5]" in capsys.readouterr().err


def test_answers_of_two_policies_are_ranked_together(tiny_sft, world_prompts):
    rt = model.setup_runtime("cpu", "float32", 0)
    a, ckpt = model.load_model(tiny_sft)
    b, _ = model.load_model(tiny_sft)
    with torch.no_grad():
        b.lm_head.weight.mul_(3.0)  # another policy: sharper, so it writes other answers
    enc = data.get_encoding(data.checkpoint_tokenizer(ckpt))
    records, stats = reward.collect_feedback([("a", a), ("b", b)], enc, data.read_prompts(world_prompts),
                                             length_grader, 2, 1.0, 6, rt, seed=3)
    assert stats["samples"] == 12 * 2 * 2 and stats["distinct"] <= 12 * 4
    sources = {tuple(r["policy"]) for r in records}
    assert ("a", "b") in sources or ("b", "a") in sources  # one policy's answer against the other's
    assert max(sum(r["group"] == g for r in records) for g in range(12)) <= 6  # C(4,2): one ranking per prompt


def test_resume_after_collection_reuses_the_feedback_and_is_exact(tiny_sft, world_prompts, tmp_path):
    grader = tmp_path / "grader.py"
    grader.write_text("def grade(messages, answers):\n    return [len(a) for a in answers]\n")
    common = ["--init-from", tiny_sft, "--prompts", world_prompts, "--annotator", f"{grader}:grade",
              "--max-new-tokens", "6", "--batch-size", "4", "--max-steps", "6", "--eval-every", "100", "--log-every",
              "1", "--offset-prompts", "0", "--device", "cpu", "--dtype", "float32"]
    reward.main([*common, "--out", str(tmp_path / "straight")])
    reward.main([*common, "--out", str(tmp_path / "resumed"), "--stop-at", "3"])
    written = (tmp_path / "resumed" / "feedback.jsonl").read_bytes()
    (tmp_path / "grader.py").write_text("def grade(messages, answers):\n    raise RuntimeError('asked again')\n")
    reward.main([*common, "--out", str(tmp_path / "resumed"), "--resume"])  # would raise if it collected again
    assert (tmp_path / "resumed" / "feedback.jsonl").read_bytes() == written
    assert written == (tmp_path / "straight" / "feedback.jsonl").read_bytes()
    assert_resumed_exactly(tmp_path / "straight", tmp_path / "resumed", 6)
