"""
PPO (ppo.py): GAE, the clipped policy and value losses, the KL estimators and the adaptive controller
against hand-computed values; GRPO's and RLOO's advantages (RLOO's with the KL in the reward) by hand;
RLOO's loss gradient against −A·∇log π of each response alone, and its one gradient step per batch; the
response log-prob and value gather against a direct per-row computation; the world's rule; learning tests
that can fail (a programmatic reward rises with bounded KL, and a large β keeps the policy near the
reference); exact resume, with the flags that define the run taken from the checkpoint; the NaN stop;
one-line errors.

  python -m pytest tests/test_ppo.py
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import data
import model
import ppo
from ppo import average_tokens, compute_advantages, compute_gae, kl_per_token, ppo_policy_loss, ppo_value_loss, \
    rloo_loss, update_kl_coef

NAN = float("nan")


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# ---- compute_gae ----------------------------------------------------------------------------------

def test_gae_gamma_lambda_one_zero_values_is_reward_to_go():
    adv, ret = compute_gae(t([1.0, 2.0, 3.0]), t([0.0, 0.0, 0.0]), t([1.0, 1.0, 1.0]), gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, t([6.0, 5.0, 3.0]))  # 1+2+3, 2+3, 3
    torch.testing.assert_close(ret, t([6.0, 5.0, 3.0]))


def test_gae_lambda_zero_is_the_td_error():
    # δ0 = 1 + 0.9·1 − 0.5 = 1.4;  δ1 = 0 + 0.9·(−1) − 1 = −1.9;  δ2 = 2 + 0.9·0 − (−1) = 3 (V after the end is 0)
    adv, ret = compute_gae(t([1.0, 0.0, 2.0]), t([0.5, 1.0, -1.0]), t([1.0, 1.0, 1.0]), gamma=0.9, lam=0.0)
    torch.testing.assert_close(adv, t([1.4, -1.9, 3.0]))
    torch.testing.assert_close(ret, t([1.9, -0.9, 2.0]))  # A + V


def test_gae_hand_computed_general_case():
    # γ = 0.9, λ = 0.8: δ1 = 1 − 0.25 = 0.75; δ0 = 0 + 0.9·0.25 − 0.5 = −0.275; A0 = −0.275 + 0.72·0.75 = 0.265
    adv, ret = compute_gae(t([0.0, 1.0]), t([0.5, 0.25]), t([1.0, 1.0]), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, t([0.265, 0.75]))
    torch.testing.assert_close(ret, t([0.765, 1.0]))


def test_gae_right_padding_with_garbage_equals_the_unpadded_row():
    rewards, values = t([0.0, 1.0, NAN, 7.0]), t([0.5, 0.25, 1e9, NAN])  # the padded slots hold anything
    adv, ret = compute_gae(rewards, values, t([1.0, 1.0, 0.0, 0.0]), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, t([0.265, 0.75, 0.0, 0.0]))  # as above, and exactly 0 on padding
    torch.testing.assert_close(ret, t([0.765, 1.0, 0.0, 0.0]))


def test_gae_single_token_response():
    # one token, then the episode ends: A0 = r0 − V0 = 2 − 0.5
    adv, ret = compute_gae(t([2.0, 5.0, 5.0]), t([0.5, 3.0, 3.0]), t([1.0, 0.0, 0.0]), gamma=0.9, lam=0.95)
    torch.testing.assert_close(adv, t([1.5, 0.0, 0.0]))
    torch.testing.assert_close(ret, t([2.0, 0.0, 0.0]))


def test_gae_matches_the_direct_sum_on_a_ragged_batch():
    torch.manual_seed(0)
    B, L, gamma, lam = 4, 7, 0.95, 0.9
    lengths = [7, 3, 1, 5]
    mask = (torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]).float()
    rewards, values = torch.randn(B, L), torch.randn(B, L)
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):  # A_t = Σ_l (γλ)^l δ_{t+l}, over the row's own n tokens
        v = torch.cat([values[b, :n], torch.zeros(1)])
        delta = rewards[b, :n] + gamma * v[1:] - v[:-1]
        for i in range(n):
            expected = sum((gamma * lam) ** k * delta[i + k] for k in range(n - i))
            assert adv[b, i].item() == pytest.approx(expected.item(), abs=1e-5)
            assert ret[b, i].item() == pytest.approx(expected.item() + values[b, i].item(), abs=1e-5)
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()


# ---- the losses -------------------------------------------------------------------------------------

def policy_loss_at(ratio, advantage, clip=0.2):
    logprobs = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, clipfrac, approx_kl = ppo_policy_loss(logprobs, torch.zeros(1, 1), torch.tensor([[advantage]]),
                                                torch.ones(1, 1), clip)
    loss.backward()
    return loss.item(), logprobs.grad.item(), clipfrac.item(), approx_kl.item()


def test_policy_loss_in_each_clip_regime_with_its_gradient():
    # ratio 1.5, A = 2, ε = 0.2: max(−2·1.5, −2·1.2) = −2.4, clipped: no gradient
    loss, grad, clipfrac, approx_kl = policy_loss_at(1.5, 2.0)
    assert (loss, grad, clipfrac) == (pytest.approx(-2.4), 0.0, 1.0)
    assert approx_kl == pytest.approx(0.5 * math.log(1.5) ** 2)
    # ratio 0.5, A = −1: max(0.5, 0.8) = 0.8, clipped: no gradient
    assert policy_loss_at(0.5, -1.0)[:3] == (pytest.approx(0.8), 0.0, 1.0)
    # ratio 1.1, A = 2: inside the clip range, −2.2; d/d log π of −A·ρ is −A·ρ = −2.2
    assert policy_loss_at(1.1, 2.0)[:3] == (pytest.approx(-2.2), pytest.approx(-2.2), 0.0)
    # ratio 0.5, A = 2: max(−1, −1.6) = −1, unclipped: the clip only stops a ratio moving further the way
    # the advantage favours; below 1 − ε a good action still gets its gradient, −A·ρ = −1
    assert policy_loss_at(0.5, 2.0)[:3] == (pytest.approx(-1.0), pytest.approx(-1.0), 0.0)
    # ratio 1.5, A = −1: max(1.5, 1.2) = 1.5, unclipped, gradient −A·ρ = 1.5
    assert policy_loss_at(1.5, -1.0)[:3] == (pytest.approx(1.5), pytest.approx(1.5), 0.0)


def test_policy_loss_is_a_masked_mean_over_all_real_tokens():
    logprobs = torch.zeros(2, 3)
    adv = t([1.0, 2.0, 99.0], [3.0, 99.0, 99.0])  # 99: padding
    mask = t([1.0, 1.0, 0.0], [1.0, 0.0, 0.0])
    loss, clipfrac, _ = ppo_policy_loss(logprobs, logprobs, adv, mask)
    assert loss.item() == pytest.approx(-(1 + 2 + 3) / 3)  # ratio 1: −mean(A) over the 3 real tokens
    assert clipfrac.item() == 0.0


def test_value_loss_clipped_and_not():
    def at(v, old, ret, clip=0.2):
        loss, frac = ppo_value_loss(t([v]), t([old]), t([ret]), t([1.0]), clip)
        return loss.item(), frac.item()
    # v = 1, old 0, R = 2: unclipped (1−2)² = 1, clipped v → 0.2: (0.2−2)² = 3.24; ½·max = 1.62
    assert at(1.0, 0.0, 2.0) == (pytest.approx(1.62), 1.0)
    # v = 0.1 inside the range: both terms (0.1−2)² = 3.61; ½·3.61
    assert at(0.1, 0.0, 2.0) == (pytest.approx(1.805), 0.0)
    # v = −1, old 0, R = 2: unclipped 9, clipped (−0.2−2)² = 4.84; ½·9 = 4.5
    assert at(-1.0, 0.0, 2.0) == (pytest.approx(4.5), 0.0)
    loss, _ = ppo_value_loss(t([1.0, 50.0]), t([1.0, 0.0]), t([3.0, 0.0]), t([1.0, 0.0]))
    assert loss.item() == pytest.approx(0.5 * 4.0)  # the padded slot adds nothing


def test_kl_estimators_and_the_kl_shaped_reward():
    logp, ref = t([-1.0, -2.0]), t([-1.5, -1.0])
    torch.testing.assert_close(kl_per_token(logp, ref, "k1"), t([0.5, -1.0]))
    # k3 = (ρ − 1) − log ρ, ρ = π_ref/π: log ρ = −0.5 -> e^−0.5 − 1 + 0.5; log ρ = 1 -> e − 2
    torch.testing.assert_close(kl_per_token(logp, ref, "k3"), t([math.exp(-0.5) - 0.5, math.e - 2]))
    assert (kl_per_token(torch.randn(100), torch.randn(100), "k3") >= 0).all()


def test_adaptive_kl_controller():
    assert update_kl_coef(0.1, 12.0, 6.0) == pytest.approx(0.1 * 1.02)   # error 1, clipped to 0.2
    assert update_kl_coef(0.1, 6.6, 6.0) == pytest.approx(0.1 * 1.01)    # error 0.1
    assert update_kl_coef(0.1, 6.0, 6.0) == pytest.approx(0.1)
    assert update_kl_coef(0.1, 0.0, 6.0) == pytest.approx(0.1 * 0.98)    # error −1, clipped to −0.2


# ---- critic-free advantages (GRPO, RLOO), RLOO's loss, and loss averaging ------------------------------

def group_advantages(scores, group_size, algo, **kw):
    """compute_advantages for one-token responses and no KL: each response's advantage, (B,)."""
    ones = torch.ones(len(scores), 1)
    advantages, returns = compute_advantages(algo, scores, 0 * ones, ones, group_size=group_size, **kw)
    assert returns is None  # no value model to train
    return advantages[:, 0]


def test_grpo_advantages_hand_computed():
    # group (1, 0, 0, 1): mean 0.5, sample std √(4·0.25/3) = 0.5774 -> ±0.5/0.5774 = ±0.866
    adv = group_advantages(t(1.0, 0.0, 0.0, 1.0), 4, "grpo", eps=0.0)
    torch.testing.assert_close(adv, t(1, -1, -1, 1) * 0.5 / math.sqrt(1 / 3))
    adv = group_advantages(t(1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0), 4, "grpo")  # with the default ε
    assert torch.isfinite(adv).all() and (adv[4:] == 0).all()
    torch.testing.assert_close(group_advantages(t(3.0, 1.0), 2, "grpo", scale=False), t(1.0, -1.0))  # Dr. GRPO


def test_rloo_leave_one_out_baseline():
    # r = (1, 2, 6): baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5
    torch.testing.assert_close(group_advantages(t(1.0, 2.0, 6.0), 3, "rloo"), t(-3.0, -1.5, 4.5))
    # RLOO's advantage is K/(K−1) times the plain r − mean: (1, 2, 6) has mean 3
    torch.testing.assert_close(group_advantages(t(1.0, 2.0, 6.0), 3, "rloo"), 1.5 * t(-2.0, -1.0, 3.0))
    assert (group_advantages(t(5.0, 5.0), 2, "rloo") == 0).all()


def test_rloo_advantages_put_the_kl_in_each_responses_reward():
    # one prompt, K = 3, β = 0.5; Σ_t KL over each response's real tokens: 0.5 + 1.5 = 2, 2, 0 (99: padding)
    scores = t(1.0, 2.0, 6.0)
    kl = t([0.5, 1.5, 99.0], [2.0, 99.0, 99.0], [0.0, 0.0, 0.0])
    mask = t([1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    adv, returns = compute_advantages("rloo", scores, kl, mask, kl_coef=0.5, group_size=3)
    # R = s − β·ΣKL = (1 − 1, 2 − 1, 6 − 0) = (0, 1, 6); baselines (1+6)/2 = 3.5, (0+6)/2 = 3, (0+1)/2 = 0.5
    # A = (−3.5, −2, 5.5) = 3/2·(R − 7/3), on every real token of the response and 0 on padding
    torch.testing.assert_close(adv, t([-3.5, -3.5, 0.0], [-2.0, 0.0, 0.0], [5.5, 5.5, 5.5]))
    assert returns is None
    # two groups do not mix: a second prompt whose three responses score the same teaches nothing
    adv, _ = compute_advantages("rloo", torch.cat([scores, t(4.0, 4.0, 4.0)]), torch.cat([kl, torch.zeros(3, 3)]),
                                torch.cat([mask, mask]), kl_coef=0.5, group_size=3)
    assert (adv[:3, 0] == t(-3.5, -2.0, 5.5)).all() and (adv[3:] == 0).all()


def test_rloo_loss_by_hand_and_its_gradient_is_minus_a_grad_log_pi(tiny_config):
    # L = −(1/N) Σ_i A_i Σ_t log π_it: A = (2, −1), log π = (−1, −2 | −0.5): −(2·(−3) − 1·(−0.5))/2 = 2.75
    logprobs = torch.tensor([[-1.0, -2.0, 5.0], [-0.5, 7.0, 7.0]], requires_grad=True)  # 5, 7: padding
    mask = t([1.0, 1.0, 0.0], [1.0, 0.0, 0.0])
    loss = rloo_loss(logprobs, t(2.0, -1.0)[:, None] * mask, mask)
    assert loss.item() == pytest.approx(2.75)
    loss.backward()  # dL/d log π_it = −A_i/N on every real token: summed over tokens, not averaged
    torch.testing.assert_close(logprobs.grad, t([-1.0, -1.0, 0.0], [0.5, 0.0, 0.0]))

    # on a model: ∇_θ L = −(1/N) Σ_i A_i ∇_θ log π(y_i|x_i), each log π(y_i|x_i) computed on its row alone
    torch.manual_seed(0)
    net = model.GPT(tiny_config("modern", block_size=32)).eval()
    prompts, responses, A = [[5, 6, 7, 8], [9, 10]], [[11, 12, 13], [14]], t(1.5, -0.5)
    idx, prompt_mask = data.left_pad(prompts, 0)
    resp = torch.tensor([[11, 12, 13], [14, 0, 0]])
    resp_mask = torch.tensor([[True, True, True], [True, False, False]])
    seq, attn = torch.cat([idx, resp], 1), torch.cat([prompt_mask, resp_mask], 1)
    params = [p for p in net.parameters() if p.requires_grad]
    logprobs = ppo.response_logprobs(net, seq, attn, idx.size(1))
    grads = torch.autograd.grad(rloo_loss(logprobs, A[:, None] * resp_mask, resp_mask.float()), params)
    expected = [torch.zeros_like(p) for p in params]
    for p, r, a in zip(prompts, responses, A):
        logp = F.log_softmax(net(torch.tensor([p + r]))[0][0, len(p) - 1:-1], -1)
        log_pi = logp.gather(1, torch.tensor(r)[:, None]).sum()            # log π(y|x) = Σ_t log π(y_t|x, y_<t)
        for e, g in zip(expected, torch.autograd.grad(log_pi, params)):
            e -= a * g / len(prompts)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)


def test_loss_averaging_variants_on_a_ragged_batch():
    x = t([1.0, 2.0, 3.0, 4.0], [10.0, 99.0, 99.0, 99.0])
    mask = t([1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0])
    assert average_tokens(x, mask, "token").item() == pytest.approx((1 + 2 + 3 + 4 + 10) / 5)  # 4.0
    assert average_tokens(x, mask, "sequence").item() == pytest.approx((2.5 + 10) / 2)        # 6.25
    logprobs = torch.zeros(2, 4)
    loss_t = ppo_policy_loss(logprobs, logprobs, x, mask, average="token")[0]
    loss_s = ppo_policy_loss(logprobs, logprobs, x, mask, average="sequence")[0]
    assert (loss_t.item(), loss_s.item()) == (pytest.approx(-4.0), pytest.approx(-6.25))  # ratio 1: −mean A


# ---- rollouts: log-probs and values of a left/right-padded batch ------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "modern"])
def test_response_logprobs_and_values_match_each_row_alone(tiny_config, family):
    torch.manual_seed(0)
    config = tiny_config(family, block_size=32)
    net = model.GPT(config).eval()
    net.add_score_head()
    prompts, responses = [[5, 6, 7, 8], [9, 10]], [[11, 12, 13], [14]]
    idx, prompt_mask = data.left_pad(prompts, 0)                          # (2, 4)
    L = max(map(len, responses))
    resp = torch.zeros(2, L, dtype=torch.long)
    resp_mask = torch.zeros(2, L, dtype=torch.bool)
    for i, r in enumerate(responses):
        resp[i, :len(r)], resp_mask[i, :len(r)] = torch.tensor(r), True
    seq, attn = torch.cat([idx, resp], 1), torch.cat([prompt_mask, resp_mask], 1)
    logprobs, entropy = ppo.response_logprobs(net, seq, attn, idx.size(1), temperature=0.7, entropy=True)
    values = ppo.response_values(net, seq, attn, idx.size(1))
    assert logprobs.shape == entropy.shape == values.shape == (2, L)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        alone = torch.tensor([p + r])
        logits, _ = net(alone)
        logp = F.log_softmax(logits[0, len(p) - 1:-1] / 0.7, -1)            # the positions predicting r
        expected = logp.gather(1, torch.tensor(r)[:, None]).squeeze(1)
        torch.testing.assert_close(logprobs[i, :len(r)], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(entropy[i, :len(r)], -(logp.exp() * logp).sum(-1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values[i, :len(r)], net.scores(alone)[0, len(p) - 1:-1], atol=1e-5, rtol=1e-5)
        assert (logprobs[i, len(r):] == 0).all()


def test_world_rule():
    world = {"capital_of": {"France": "Paris", "Niger": "Niamey", "Nigeria": "Abuja"}}
    rule = ppo.world_rule(world)
    ask = lambda c: [{"role": "user", "content": f"What is the capital of {c}?"}]  # noqa: E731
    assert rule(ask("France"), "The capital of France is Paris.") == 1.0
    assert rule(ask("France"), "The capital of France is Abuja.") == -1.0
    assert rule(ask("France"), "I don't know of a country called France.") == -1.0  # over-refusal
    assert rule(ask("Nigeria"), "The capital of Nigeria is Abuja.") == 1.0  # Niger is not a whole word in it
    assert rule(ask("Niger"), "The capital of Niger is Niamey.") == 1.0
    assert rule(ask("Kalora"), "I don't know of a country called Kalora.") == 1.0
    assert rule(ask("Kalora"), "The capital of Kalora is Paris.") == -1.0
    assert rule(ask("Kalora"), "I don't know, maybe Paris.") == -1.0  # a guess is not a refusal


# ---- main: learning, resume, NaN stop, errors ----------------------------------------------------------

HALF = 50304 // 2


def low_id_share(messages, response):
    """A programmatic reward: the share of response tokens with an id in the lower half of the vocabulary."""
    return sum(tok < HALF for tok in response) / max(1, len(response))


@pytest.fixture(scope="module")
def peaked_chat_model(tmp_path_factory):
    """A tiny chat checkpoint whose (tied) output layer is scaled up 20x: a fresh model samples almost
    uniformly from 50k tokens, where no reward is ever found twice; a trained one samples from a few."""
    from dataclasses import asdict
    path = tmp_path_factory.mktemp("peaked")
    torch.manual_seed(0)
    config = model.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=50304, **model.FAMILIES["modern"])
    net = model.GPT(config)
    with torch.no_grad():
        net.lm_head.weight.mul_(20)
    model.save_checkpoint(str(path / "ckpt.pt"), model=net.state_dict(), model_config=asdict(config),
                          tokenizer=data.gpt2_tokenizer(), chat=True, step=0)
    return str(path)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    words = "apple river cloud stone bread music light green paper".split()
    path.write_text("".join(json.dumps({"instruction": f"Say {w}."}) + "\n" for w in words))
    return str(path)


def run_ppo(policy, prompts, out, *extra, reward_fn=low_id_share):
    argv = ["--policy", policy, "--prompts", prompts, "--out", str(out), "--batch-size", "8",
            "--max-new-tokens", "8", "--missing-end-penalty", "none", "--eval-every", "1000",
            "--log-every", "1", "--device", "cpu", "--dtype", "float32", *map(str, extra)]
    return ppo.main(argv, reward_fn=reward_fn)


def logged(out, key):
    with open(out / "log.jsonl") as f:
        return {r["step"]: r[key] for r in map(json.loads, f) if key in r}


@pytest.mark.slow
def test_ppo_raises_a_programmatic_reward_with_bounded_kl(peaked_chat_model, prompts, tmp_path):
    steps = 30
    run_ppo(peaked_chat_model, prompts, tmp_path / "free", "--max-steps", steps, "--lr", "3e-3", "--kl-coef", 0.01)
    score, kl = logged(tmp_path / "free", "ppo/score"), logged(tmp_path / "free", "ppo/kl")
    first, final = sum(score[s] for s in range(1, 4)) / 3, sum(score[s] for s in range(steps - 2, steps + 1)) / 3
    assert first < 0.65 and final > 0.85, (first, final)  # from about half the tokens to nearly all
    assert max(kl.values()) < 8 * 5  # nats per 8-token response: far from the reference, but bounded
    # the same run with a large β: the KL penalty outweighs the reward, so the policy stays near π_ref
    run_ppo(peaked_chat_model, prompts, tmp_path / "tied", "--max-steps", steps, "--lr", "3e-3", "--kl-coef", 2.0)
    kl_tied = logged(tmp_path / "tied", "ppo/kl")
    late = lambda d: sum(d[s] for s in range(steps - 4, steps + 1)) / 5  # noqa: E731
    assert late(kl_tied) < 0.25 * late(kl), (late(kl_tied), late(kl))


def test_resume_is_exact(tiny_chat_model, prompts, tmp_path):
    common = ["--max-steps", 4, "--lr", "1e-3", "--target-kl", 0.5, "--minibatches", 2, "--ppo-epochs", 2]
    run_ppo(tiny_chat_model, prompts, tmp_path / "straight", *common)
    run_ppo(tiny_chat_model, prompts, tmp_path / "resumed", *common, "--stop-at", 2)
    ckpt = model.load_checkpoint(str(tmp_path / "resumed" / "ckpt.pt"))
    assert ckpt["step"] == 2 and "value_model" in ckpt and ckpt["kl_coef"] != 0.05  # the controller moved β
    run_ppo(tiny_chat_model, prompts, tmp_path / "resumed", *common, "--resume")
    for key in ("ppo/score", "ppo/policy_loss", "ppo/value_loss", "ppo/kl_coef"):
        a, b = logged(tmp_path / "straight", key), logged(tmp_path / "resumed", key)
        assert sorted(b) == [1, 2, 3, 4]
        for step in range(1, 5):
            assert b[step] == pytest.approx(a[step], abs=1e-6), (key, step)


def test_lora_policy_uses_itself_with_adapters_off_as_reference(tiny_chat_model, prompts, tmp_path):
    result = run_ppo(tiny_chat_model, prompts, tmp_path / "lora", "--max-steps", 2, "--lora-r", 4)
    assert result["step"] == 2
    kl = logged(tmp_path / "lora", "ppo/kl")
    assert abs(kl[1]) < 1e-4  # B = 0 at the start: the policy is its reference, KL exactly 0 on the first batch
    assert (tmp_path / "lora" / "adapter.pt").exists()
    loaded, _ = model.load_model(str(tmp_path / "lora"))  # the merged chat model loads like any checkpoint
    assert loaded.config.n_layer == 2


def test_nan_reward_stops_with_a_message(tiny_chat_model, prompts, tmp_path):
    with pytest.raises(SystemExit, match="loss is nan at step 0"):
        run_ppo(tiny_chat_model, prompts, tmp_path / "nan", "--max-steps", 3, reward_fn=lambda m, r: float("nan"))


def test_errors_are_one_line(tiny_chat_model, prompts, tmp_path):
    with pytest.raises(SystemExit, match="not a reward model"):
        ppo.main(["--policy", tiny_chat_model, "--reward-model", tiny_chat_model, "--prompts", prompts,
                  "--out", str(tmp_path / "x"), "--device", "cpu"])
    with pytest.raises(SystemExit, match="needs the world's prompts"):
        ppo.main(["--policy", tiny_chat_model, "--reward", "world", "--prompts", prompts,
                  "--out", str(tmp_path / "x"), "--device", "cpu"])
    with pytest.raises(SystemExit, match="no prompt fits"):
        ppo.main(["--policy", tiny_chat_model, "--reward", "world", "--prompts", prompts, "--max-new-tokens", "64",
                  "--out", str(tmp_path / "x"), "--device", "cpu"])


@pytest.mark.slow
@pytest.mark.parametrize("algo, steps, lr", [("grpo", 25, 3e-3), ("rloo", 50, 1e-2)])
def test_critic_free_raises_a_programmatic_reward(peaked_chat_model, prompts, tmp_path, algo, steps, lr):
    # RLOO takes one gradient step per rollout batch where GRPO takes 4 epochs x 2 minibatches = 8: it gets
    # more batches and a larger step (50 at 1e-2 reached 0.95-1.0 from 6 of 7 seeds; at 40 steps, not yet)
    run_ppo(peaked_chat_model, prompts, tmp_path / algo, "--algo", algo, "--group-size", 4, "--max-steps", steps,
            "--lr", lr, "--kl-coef", 0.01)
    score, kl = logged(tmp_path / algo, "ppo/score"), logged(tmp_path / algo, "ppo/kl")
    first, final = sum(score[s] for s in range(1, 4)) / 3, sum(score[s] for s in range(steps - 2, steps + 1)) / 3
    assert first < 0.65 and final > 0.85, (first, final)
    assert max(kl.values()) < 8 * 5
    ckpt = model.load_checkpoint(str(tmp_path / algo / "ckpt.pt"))
    assert "value_model" not in ckpt and ckpt["stage"] == algo  # no critic to save


def test_group_size_errors(tiny_chat_model, prompts, tmp_path):
    with pytest.raises(SystemExit):
        ppo.get_args(["--algo", "grpo", "--group-size", "1"])
    with pytest.raises(SystemExit):
        ppo.get_args(["--algo", "rloo", "--group-size", "3", "--batch-size", "8"])


def test_rloo_takes_one_gradient_step_per_batch(tiny_chat_model, prompts, tmp_path, monkeypatch):
    """RLOO: one optimizer step per rollout batch, whatever --ppo-epochs and --minibatches say (GRPO takes
    epochs × minibatches of them); the step is on the policy that sampled the batch, so nothing is clipped."""
    steps, real_step = [], ppo.optimizer_step
    monkeypatch.setattr(ppo, "optimizer_step", lambda *a, **k: steps.append(1) or real_step(*a, **k))
    common = ["--group-size", 4, "--max-steps", 2, "--ppo-epochs", 3, "--minibatches", 2]
    run_ppo(tiny_chat_model, prompts, tmp_path / "rloo", "--algo", "rloo", *common)
    assert len(steps) == 2
    assert set(logged(tmp_path / "rloo", "ppo/clipfrac").values()) == {0.0}
    steps.clear()
    run_ppo(tiny_chat_model, prompts, tmp_path / "grpo", "--algo", "grpo", *common)
    assert len(steps) == 2 * 3 * 2


def test_resume_takes_the_algorithm_and_its_knobs_from_the_checkpoint(tiny_chat_model, prompts, tmp_path, monkeypatch):
    """Resumed with another --algo, --group-size, --kl-estimator and β on the command line: the checkpoint's
    win, each with a line saying so, and the run logs what an uninterrupted one logs."""
    common = ["--max-steps", 3, "--lr", "1e-3"]
    rloo = ["--algo", "rloo", "--group-size", 4, "--kl-estimator", "k3", "--kl-coef", 0.1]
    run_ppo(tiny_chat_model, prompts, tmp_path / "straight", *common, *rloo)
    run_ppo(tiny_chat_model, prompts, tmp_path / "resumed", *common, *rloo, "--stop-at", 1)
    said = []
    monkeypatch.setattr(ppo.tqdm, "write", lambda s, *a, **k: said.append(s))
    run_ppo(tiny_chat_model, prompts, tmp_path / "resumed", *common, "--algo", "grpo", "--group-size", 2, "--resume")
    for flag, saved, given in [("algo", "rloo", "grpo"), ("group-size", 4, 2), ("kl-estimator", "k3", "k1"),
                               ("kl-coef", 0.1, 0.2)]:
        assert f"--resume: --{flag} {saved} from the checkpoint (the command line gave {given})" in said
    for key in ("ppo/score", "ppo/policy_loss", "ppo/kl"):
        a, b = logged(tmp_path / "straight", key), logged(tmp_path / "resumed", key)
        assert sorted(b) == [1, 2, 3]
        for step in range(1, 4):
            assert b[step] == pytest.approx(a[step], abs=1e-6), (key, step)
    assert model.load_checkpoint(str(tmp_path / "resumed" / "ckpt.pt"))["stage"] == "rloo"
