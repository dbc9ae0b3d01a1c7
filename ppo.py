"""
RLHF with PPO: improve the SFT policy against the reward model, a small step at a time.

The guide's alignment stage, step b (InstructGPT, Ouyang et al. 2022, §3.5). The policy π answers
prompts x by sampling; the frozen reward model scores each answer y; PPO (Schulman et al. 2017) raises
the probability of answers that scored better than expected, clipped so that no update moves far.
A per-token KL penalty to the frozen SFT model π_ref keeps the policy close to what it was, so that it
cannot win by writing text the reward model was never trained to judge. The objective (InstructGPT,
Eq. 2, without its pretraining term) is

    maximise  E_{x, y ~ π} [ r(x, y) − β · log(π(y|x) / π_ref(y|x)) ]

and here each response token is one action: the reward is −β·KL per token plus the reward model's score
at the last token, a learned value model V estimates what is still to come, and generalized advantage
estimation (GAE; Schulman et al. 2016) turns both into each token's advantage. We minimise the negative
of the clipped surrogate objective (PPO, Eq. 7) and a clipped value loss.

Implementation details from "The N+ Implementation Details of RLHF with PPO" (Huang et al. 2024), each
where it happens in the code: [d1] prompts left-padded, responses right-padded, each row's positions
counted over its real tokens; [d2] sampling at a temperature with no top-k/top-p, and log-probs scored
under the same temperature; [d3] old log-probs and values recomputed in one forward pass after
generation; [d4] no dropout (eval mode throughout: the ratio is 1 before the first update); [d5] a
response that never ends gets a fixed penalty score; [d6] the score is read at the last response token;
[d7] KL per token, k1 or k3; [d8] the value model initialised from the reward model; [d9] GAE over
response tokens only, padding masked; [d10] advantages whitened over the batch's real tokens; [d11]
several epochs over shuffled minibatches of each rollout batch; [d12] the adaptive KL controller.

Beyond the guide, --algo grpo or rloo is critic-free RL: K = --group-size samples of each prompt, and a
sample's advantage is its score against its group's, the same for all of its tokens; no value model, no
GAE (compute_advantages has the three algorithms' equations side by side).
  grpo (Shao et al. 2024): (r − mean)/std of the group, PPO's clipped loss and epochs, and the KL to π_ref
       as a loss term (k3, GRPO Eq. 3) instead of a part of the reward.
  rloo (Ahmadian et al. 2024): REINFORCE with the leave-one-out baseline. Each response is one action: the
       KL penalty goes into its reward, R = r − β·Σ_t KL_t, its advantage is R minus the mean R of the
       other K − 1 samples, and the loss is −A·log π(y|x) (rloo_loss), one gradient step per rollout
       batch: no epochs and no clipping, as the samples come from the very policy being updated.
       (An earlier --algo rloo, PPO's clipped loss with this baseline and a k3 loss term, is --algo grpo
       --no-std-scale with β·(K − 1)/K, up to gradient clipping and Adam's ε.)

Reads:  --policy the SFT checkpoint (default out/sft); --reward-model the reward model (out/reward), or
        --reward world: the world's own rule instead; --prompts .jsonl (default data/world/prompts.jsonl).
Writes: OUT/ckpt.pt (a chat model, as sft.py writes; plus the value model for --resume), OUT/adapter.pt
        (LoRA), OUT/log.jsonl (every step; on the world also the gold reward, see main), OUT/eval.json.

  python ppo.py                                  # out/sft against out/reward -> out/ppo
  python ppo.py --reward world --out out/ppo_world   # the world's verifiable rule as the reward
  python ppo.py --lora-r 8                       # LoRA: the reference is the policy with adapters off
  python ppo.py --algo grpo --reward world --out out/grpo_world   # GRPO, 4 samples per prompt
  python ppo.py --algo rloo --reward world --out out/rloo_world   # RLOO, 4 samples per prompt
  python ppo.py --max-steps 4 --eval-every 2 --device cpu   # seconds
"""

import argparse
import contextlib
import copy
import json
import os
import sys
import time
from dataclasses import asdict

import torch
from tqdm import tqdm

import data
from lora import DEFAULT_TARGETS, apply_lora, lora_disabled, prepare_to_train
from model import IGNORE_INDEX, GracefulStop, append_jsonl, check_finite, claim_out_dir, configure_optimizer, get_lr, \
    in_range, last_token, load_model, load_resume, masked_mean, masked_whiten, optimizer_step, positive_int, \
    restore_training_state, resume_args, save_stage, set_rng_state, setup_runtime, training_state


def compute_gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalized advantage estimation (Schulman et al. 2016, Eqs. 11-16) over response tokens.

    δ_t = r_t + γ·V(s_{t+1}) − V(s_t)             the TD error of token t
    A_t = Σ_{l≥0} (γλ)^l · δ_{t+l} = δ_t + γλ·A_{t+1}    the advantage, computed backwards
    R_t = A_t + V(s_t)                             the return the value model is trained towards

    Shape: rewards, values, mask (B, L), mask a right-padded 0/1 float (1 on response tokens). V after
    a response's last token is 0 (the episode is over), and whatever padded slots of rewards and values
    hold (even NaN) never reaches a real token. Returns (advantages, returns), (B, L), 0 on padding.
    """
    real = mask.bool()
    rewards = torch.where(real, rewards, 0.0)
    values = torch.where(real, values, 0.0)
    B, L = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value, next_advantage = rewards.new_zeros(B), rewards.new_zeros(B)
    for t in reversed(range(L)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    advantages = advantages * mask  # a padded slot's δ is 0 + γ·0 − 0, so only the mask's own slots carry anything
    return advantages, (advantages + values) * mask


def average_tokens(x, mask, how="token"):
    """Reduce per-token losses x (B, L) over the real tokens of mask (B, L), one of two ways:
    token:    Σ_i Σ_t x_it·m_it / Σ_i Σ_t m_it      every token of the batch weighs the same (PPO here,
              DAPO, Dr. GRPO): a long response counts more
    sequence: (1/B) Σ_i (Σ_t x_it·m_it / Σ_t m_it)  each response's mean, then the batch's (GRPO, Eq. 3):
              a token of a short response counts more, which favours short right and long wrong answers
    """
    if how == "token":
        return masked_mean(x, mask)
    return masked_mean(x, mask, dim=1).mean()


def compute_advantages(algo, scores, kl, mask, values=None, kl_coef=0.0, group_size=1, gamma=1.0, lam=0.95,
                       scale=True, eps=1e-4):
    """One rollout batch's advantages (B, L), and the returns the value model learns (B, L) (ppo; else None):

    ppo   r_t = −β·KL_t + [t = last]·s    the KL-shaped reward: −β·KL per token and the score s at the last
                                         response token [d7]; GAE over r and V [d9], whitened [d10]
    grpo  A_i = (s_i − mean_j s_j) / (std_j s_j + ε)    (Shao et al. 2024, §4.1.2; std with K − 1, as TRL's);
          scale=False leaves out the division (Dr. GRPO, Liu et al. 2025: it overweights prompts that are
          almost always right or always wrong). The KL is a loss term instead (GRPO, Eq. 3).
    rloo  R_i = s_i − β·Σ_t KL_it                         the KL penalty in the whole response's reward
          A_i = R_i − 1/(K − 1)·Σ_{j≠i} R_j = K/(K − 1)·(R_i − mean_j R_j)    the leave-one-out baseline
          (Ahmadian et al. 2024; with k1, Σ_t KL_it = log π(y_i|x)/π_ref(y_i|x), their sequence-level KL)

    grpo and rloo give A_i to every token of response i; a group whose rewards (s, or R) are all equal gets
    0 (no NaN): it teaches nothing. Shape: scores (B,), K = group_size consecutive samples of each prompt;
    kl, mask, values (B, L), mask 1 on response tokens; β = kl_coef.
    """
    kl = kl * mask
    if algo == "ppo":
        rewards = -kl_coef * kl                                                  # (B, L)
        rewards[torch.arange(len(mask)), mask.sum(1).long() - 1] += scores       # s at each last response token
        advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
        return masked_whiten(advantages, mask), returns
    if algo == "grpo":
        r = scores.view(-1, group_size)                                          # (B,) -> (B/K, K)
        advantages = r - r.mean(1, keepdim=True)
        if scale:
            advantages = advantages / (r.std(1, keepdim=True) + eps)
    else:  # rloo
        r = (scores - kl_coef * kl.sum(1)).view(-1, group_size)                  # (B,) R_i -> (B/K, K)
        advantages = r - (r.sum(1, keepdim=True) - r) / (group_size - 1)
    return advantages.reshape(-1, 1) * mask, None                                # (B/K, K) -> (B, L)


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_range=0.2, average="token"):
    """The clipped surrogate loss (PPO, Eq. 7), negated to be minimised, per token:

    ρ_t = π(a_t|s_t) / π_old(a_t|s_t) = exp(log π − log π_old)
    L   = masked mean over the batch's real tokens of max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε, 1 + ε))

    (average="sequence": see average_tokens.) Shape: every argument (B, L); mask is 1 on response tokens.
    Also returns, detached: the clip fraction (the share of tokens where the clipped term is the larger, so
    its gradient is 0) and the approximate KL(π_old‖π) = mean of ½(log ρ)², a check that the update stayed small.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = average_tokens(torch.max(unclipped, clipped), mask, average)
    clipfrac = masked_mean((clipped > unclipped).float(), mask).detach()
    approx_kl = masked_mean(0.5 * log_ratio ** 2, mask).detach()
    return loss, clipfrac, approx_kl


def rloo_loss(logprobs, advantages, mask):
    """REINFORCE (Williams 1992) with RLOO's advantages, negated to be minimised, over N responses:

    L = −(1/N) Σ_i A_i · Σ_t log π(y_it | x_i, y_i,<t)        so  ∇L = −(1/N) Σ_i A_i · ∇log π(y_i|x_i)

    the RLOO estimator (1/K) Σ_i A_i·∇log π(y_i|x) of Ahmadian et al. 2024, averaged over the prompts.
    Summed over each response's tokens, not averaged: the paper's action is the whole response, and log π(y|x)
    is that sum; dividing by |y_i| would weigh a short response's tokens more, the length bias Dr. GRPO (Liu et
    al. 2025) takes out of GRPO's per-response mean (TRL's RLOOTrainer sums too). No ratio, no clip: ρ = 1.
    Shape: every argument (B, L); advantages A_i on every token of response i; mask 1 on response tokens.
    """
    return -(advantages * logprobs * mask).sum() / len(mask)


def ppo_value_loss(values, old_values, returns, mask, clip_range=0.2):
    """The clipped value loss (as in OpenAI's baselines and Huang et al. 2024):

    L_V = ½ · masked mean of max((V − R)², (clip(V, V_old − ε, V_old + ε) − R)²)

    The clip keeps the value from moving more than ε from the one the advantages were computed with.
    Shape: every argument (B, L). Also returns the share of tokens where the clipped term is the larger.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_loss, clipped_loss = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_loss, clipped_loss), mask)
    return loss, masked_mean((clipped_loss > unclipped_loss).float(), mask).detach()


def kl_per_token(logprobs, ref_logprobs, estimator="k1"):
    """Per-token estimates of KL(π‖π_ref) from the sampled token's log-probs (Schulman 2020, "Approximating
    KL divergence"), each (B, L): k1 = log π − log π_ref (unbiased, can be negative for one token);
    k3 = (ρ − 1) − log ρ with ρ = π_ref/π (unbiased and never negative)."""
    if estimator == "k1":
        return logprobs - ref_logprobs
    log_rho = ref_logprobs - logprobs
    return torch.expm1(log_rho) - log_rho


def update_kl_coef(kl_coef, kl, target, k_beta=0.1):
    """The adaptive KL controller (Ziegler et al. 2019, §2.2): e = clip(KL / KL_target − 1, −0.2, 0.2),
    β ← β·(1 + K_β·e). β grows while the policy's KL is above target and shrinks below it."""
    error = min(max(kl / target - 1, -0.2), 0.2)
    return kl_coef * (1 + k_beta * error)


def response_logprobs(model, seq, attn, n_prompt, temperature=1.0, entropy=False):
    """log π(y_t | x, y_<t) of each response token, (B, L), under the sampling temperature [d2] (and
    the entropy of each of those distributions with entropy=True).

    seq (B, Tp + L) is a rollout: prompts left-padded into columns < n_prompt, responses right-padded
    after it; attn (B, Tp + L) is True on real tokens. The logits that predict column n_prompt + t sit
    at n_prompt + t − 1, so the (B, L) result lines up with the response tokens; 0 on padding.
    """
    targets = seq[:, 1:].masked_fill(~attn[:, 1:], IGNORE_INDEX)
    targets[:, :n_prompt - 1] = IGNORE_INDEX  # the prompt is given, not chosen
    out = model.logprobs_of(seq[:, :-1], targets, attn[:, :-1], entropy=entropy, temperature=temperature)
    return tuple(o[:, n_prompt - 1:] for o in out) if entropy else out[:, n_prompt - 1:]


def response_values(value_model, seq, attn, n_prompt):
    """V(s_t) of the state before each response token, (B, L) in fp32: the value head at the position
    whose logits predict that token (a rollout's layout as in response_logprobs)."""
    return value_model.scores(seq[:, :-1], attn[:, :-1])[:, n_prompt - 1:]


def world_rule(world):
    """The world's verifiable reward, as a function (prompt messages, reply text) -> score: +1 for the
    right capital of a real country, or for declining a question about a country that does not exist
    (one that names no real country); −1 for anything else, a wrong city, a guess or a refusal of a real
    one. It is the world's annotator (data.world_annotator) with its grades 1 and 2 made one."""
    annotate = data.world_annotator(world)
    return lambda messages, reply: 1.0 if annotate(messages, [reply])[0] > 0 else -1.0


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # I/O
    p.add_argument("--policy", default="out/sft", help="the SFT checkpoint: the policy's start and the reference π_ref")
    p.add_argument("--reward", default="model", choices=["model", "world"],
                   help="the reward model's score, or the world's rule (right capital / declining an invented country)")
    p.add_argument("--reward-model", default="out/reward", help="the reward model checkpoint (reward.py)")
    p.add_argument("--prompts", default=os.path.join(data.DATA_DIR, "world", "prompts.jsonl"),
                   help="prompts .jsonl (chat, instruction, preference or prompt-only records)")
    p.add_argument("--out", default="out/ppo", help="output directory")
    p.add_argument("--resume", action="store_true", help="continue the run saved in OUT/ckpt.pt")
    # the algorithm (compute_advantages)
    p.add_argument("--algo", default="ppo", choices=["ppo", "grpo", "rloo"], help="PPO (value model, GAE), or critic-free: "
                   "GRPO (group baseline, clipped loss), RLOO (leave-one-out baseline, REINFORCE)")
    p.add_argument("--group-size", type=in_range(int, 0), default=0, help="samples per prompt K (0 = 1 for ppo, 4 else)")
    p.add_argument("--no-std-scale", action="store_true", help="grpo: advantages r − mean, not divided by the std (Dr. GRPO)")
    p.add_argument("--loss-average", default="token", choices=["token", "sequence"],
                   help="ppo/grpo: mean over the batch's response tokens, or per response then over responses (GRPO's)")
    # rollouts
    p.add_argument("--batch-size", type=positive_int, default=32, help="responses per rollout batch (one step)")
    p.add_argument("--max-new-tokens", type=positive_int, default=24, help="the longest response")
    p.add_argument("--temperature", type=in_range(float, 0, open_low=True), default=1.0, help="sampling temperature [d2]")
    p.add_argument("--missing-end-penalty", type=lambda v: None if v == "none" else float(v), default=-1.0,
                   help="the score of a response that never wrote <|end|> ('none' = keep its score) [d5]")
    # rewards and advantages
    p.add_argument("--kl-coef", type=in_range(float, 0), default=0.2,
                   help="β: the KL penalty in the reward (ppo, rloo; the start if adaptive) or loss (grpo), in reward std units")
    p.add_argument("--kl-estimator", default="k1", choices=["k1", "k3"], help="per-token KL estimate [d7]")
    p.add_argument("--target-kl", type=in_range(float, 0), default=0.0, help="ppo/rloo: β adapts to this KL (0 = off) [d12]")
    p.add_argument("--gamma", type=in_range(float, 0, 1), default=1.0, help="γ: discount over response tokens")
    p.add_argument("--lam", type=in_range(float, 0, 1), default=0.95, help="λ of GAE: bias (0) against variance (1)")
    # PPO and GRPO (RLOO takes one gradient step on each rollout batch)
    p.add_argument("--ppo-epochs", type=positive_int, default=4, help="passes over each rollout batch [d11]")
    p.add_argument("--minibatches", type=positive_int, default=2, help="minibatches per pass")
    p.add_argument("--clip-range", type=in_range(float, 0, open_low=True), default=0.2, help="ε of the policy's ratio clip")
    p.add_argument("--value-clip-range", type=in_range(float, 0), default=0.2, help="ε of the value clip")
    # LoRA (--lora-r 0 = full fine-tuning)
    p.add_argument("--lora-r", type=in_range(int, 0), default=0, help="LoRA rank r for policy and value model (0 = full)")
    p.add_argument("--lora-alpha", type=in_range(float, 0, open_low=True), default=16.0, help="LoRA α: updates scaled by α/r")
    p.add_argument("--lora-targets", nargs="+", default=list(DEFAULT_TARGETS), help="module name suffixes to adapt")
    # optimization
    p.add_argument("--max-steps", type=positive_int, default=100, help="PPO steps (rollout batches)")
    p.add_argument("--lr", type=in_range(float, 0), default=0.0, help="policy learning rate (0 = 2e-5 full, 3e-4 LoRA)")
    p.add_argument("--value-lr", type=in_range(float, 0), default=0.0, help="value model learning rate (0 = 5x the policy's)")
    p.add_argument("--warmup-steps", type=in_range(int, 0), default=5, help="linear warmup steps")
    p.add_argument("--grad-clip", type=in_range(float, 0), default=1.0, help="clip each model's gradient norm (0 = off)")
    # evaluation and logging
    p.add_argument("--eval-every", type=positive_int, default=25, help="steps between world metrics and checkpoints")
    p.add_argument("--log-every", type=positive_int, default=5, help="steps between log lines")
    p.add_argument("--stop-at", type=in_range(int, -1), default=-1, help="save and exit after this step (-1 = off)")
    # system
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="see setup_runtime")
    p.add_argument("--seed", type=int, default=1337, help="seed for prompt order and sampling")
    args = p.parse_args(argv)  # in_range already refuses a temperature <= 0 and a negative β or KL target
    args.group_size = args.group_size or (1 if args.algo == "ppo" else 4)
    if args.algo != "ppo" and args.group_size < 2:
        p.error(f"--algo {args.algo} needs --group-size of at least 2: the baseline is the group's other samples")
    if args.batch_size % args.group_size:
        p.error(f"--batch-size {args.batch_size} must be a multiple of --group-size {args.group_size}")
    return args


def main(argv=None, reward_fn=None):
    """reward_fn: a function (prompt messages, response token ids) -> float that replaces the reward
    model (a programmatic reward, as the tests use)."""
    args = get_args(argv)
    lr = args.lr or (3e-4 if args.lora_r else 2e-5)
    value_lr = args.value_lr or 5 * lr

    # ---- setup -----------------------------------------------------------------------------------
    claim_out_dir(args.out, single_process="ppo.py")  # OUT/.lock: a second run on the same --out is refused
    rt = setup_runtime(args.device, args.dtype, args.seed)
    log = tqdm.write
    ckpt_path, log_path = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "log.jsonl")
    resume = load_resume(args.out, args.resume)  # its checkpoint, or None
    if resume:  # what is trained, on what and towards what comes from the checkpoint; the step sizes may change
        resume_args(args, resume["args"], ["policy", "reward", "reward_model", "prompts", "lora_r", "lora_alpha",
                                           "lora_targets", "algo", "group_size", "no_std_scale", "loss_average",
                                           "kl_coef", "kl_estimator", "target_kl", "gamma", "lam", "temperature",
                                           "max_new_tokens", "missing_end_penalty", "seed"], log,
                    warn=("max_steps", "batch_size", "lr", "value_lr", "ppo_epochs", "minibatches", "clip_range"))
        if args.batch_size % args.group_size:
            sys.exit(f"error: --batch-size {args.batch_size} must be a multiple of the run's --group-size {args.group_size}")

    # ---- models: policy, reference, value model, reward model --------------------------------------
    try:
        policy, src = load_model(args.policy)
        rm = None
        if args.reward == "model" and reward_fn is None:
            rm, rm_src = load_model(args.reward_model)
            if rm.score_head is None:
                raise ValueError(f"{args.reward_model} is not a reward model (no score head); train one with reward.py")
            if data.checkpoint_tokenizer(rm_src) != data.checkpoint_tokenizer(src):
                raise ValueError(f"{args.reward_model} uses another tokenizer than the policy {args.policy}")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    tokenizer = data.checkpoint_tokenizer(src)
    enc = data.get_encoding(tokenizer)
    config = policy.config
    # a base or reward model is refused, with what to do instead
    if why := data.start_error(src, enc, args.policy, want_chat=True):
        sys.exit(f"error: --policy: {why}")
    end, pad = data.end_of_turn(enc), enc.eot_token
    # π_ref: a frozen copy of the SFT model, or with LoRA the policy itself with its adapters disabled
    reference = None if args.lora_r else copy.deepcopy(policy).requires_grad_(False)
    # the value model V(s_t) [d8]: a copy of the reward model, which already reads a whole answer at its last
    # token, so the first advantages are not noise (InstructGPT; Huang et al. 2024); with the world's rule, the SFT
    # model with a new score head. A network apart, so the value loss never pulls on the policy. GRPO, RLOO: none.
    value = None
    if args.algo == "ppo":
        value = copy.deepcopy(policy if rm is None else rm).requires_grad_(True)
        if rm is None:
            value.add_score_head()
    try:  # LoRA (lora.prepare_to_train; the value model's head trains whole) or full; errors in one line
        fingerprint = prepare_to_train(policy, args, resume, dropout=0.0)
        if args.lora_r and value is not None:
            apply_lora(value, args.lora_r, args.lora_alpha, 0.0, args.lora_targets, modules_to_save=("score_head",))
    except ValueError as e:
        sys.exit(f"error: {e}")
    if resume and value is not None:
        value.load_state_dict(resume["value_model"])
    for m in (policy, reference, value, rm):
        if m is not None:
            m.to(rt.device).eval()  # [d4] no dropout anywhere: old and new log-probs come from the same function
    log(f"model_config: {json.dumps(asdict(config))}\nargs: {json.dumps(vars(args))}")
    log(f"{args.algo.upper()} from {args.policy} against "
        f"{'a function' if reward_fn else args.reward_model if rm else 'the world rule'}: "
        f"{sum(p.numel() for p in policy.parameters() if p.requires_grad):,} trainable policy parameters, "
        f"{sum(p.numel() for p in value.parameters() if p.requires_grad) if value else 0:,} value parameters "
        f"on {rt.device} ({rt.why})")

    # ---- prompts: rendered once, those that leave no room for a response dropped ---------------------
    try:
        messages = data.read_prompts(args.prompts)
    except data.DataError as e:
        sys.exit(f"error: {e}")
    rows = {}  # rendered prompt -> its first record: each distinct prompt once
    for m in messages:
        ids = data.render_chat(enc, m, add_generation_prompt=True)[0]
        if len(ids) + args.max_new_tokens <= config.block_size:
            rows.setdefault(tuple(ids), {"messages": m, "ids": ids})
    rows = list(rows.values())
    log(f"{len(messages):,} prompts from {args.prompts}: {len(rows):,} distinct that fit "
        f"{config.block_size} - {args.max_new_tokens} tokens")
    if not rows:
        sys.exit(f"error: {args.prompts}: no prompt fits the context with --max-new-tokens {args.max_new_tokens}")
    sampler = data.ExampleSampler(rows, args.batch_size // args.group_size, args.seed)
    world_dir = data.world_of(args.prompts)
    world = data.load_world(world_dir) if world_dir else None
    reply_text = lambda ids: data.decode(enc, [t for t in ids if t != end])  # a response's text, without <|end|>
    if args.reward == "world" and reward_fn is None:
        if world is None:
            sys.exit(f"error: --reward world needs the world's prompts (world.json beside {args.prompts})")
        rule = world_rule(world)
        reward_fn = lambda m, response: rule(m, reply_text(response))
    # the gold reward: the world's annotator (the truth the reward model only estimates), logged next to
    # the score PPO optimises; when the score rises and the gold falls, the reward model is being
    # exploited (Gao et al. 2022, "Scaling laws for reward model overoptimization")
    annotate = data.world_annotator(world) if world else None

    @torch.no_grad()
    def rollout(batch):
        """Sample a response per prompt and score it: the tensors one PPO step trains on."""
        t0 = time.perf_counter()
        idx, prompt_mask = data.left_pad([r["ids"] for r in batch], pad)  # [d1] prompts end in one column
        idx, prompt_mask = idx.to(rt.device), prompt_mask.to(rt.device)
        n_prompt = idx.size(1)
        with rt.autocast():  # batched, with the KV cache: the prompt is computed once
            seq = policy.generate(idx, args.max_new_tokens, temperature=args.temperature, stop_token=end,
                                  pad_mask=prompt_mask)
        response = seq[:, n_prompt:]                                          # (B, L)
        L = response.size(1)
        ended = (response == end).any(1)                                      # (B,)
        length = torch.where(ended, (response == end).int().argmax(1) + 1, L)  # tokens up to and with <|end|>
        mask = torch.arange(L, device=rt.device)[None, :] < length[:, None]   # (B, L) response tokens [d1]
        seq = torch.cat([idx, response.masked_fill(~mask, pad)], 1)
        attn = torch.cat([prompt_mask, mask], 1)                              # (B, Tp + L) real tokens
        t1 = time.perf_counter()
        # [d3] old log-probs, π_ref's log-probs and values: one forward pass each, after generation
        with rt.autocast():
            logprobs = response_logprobs(policy, seq, attn, n_prompt, args.temperature)
            with lora_disabled(policy) if reference is None else contextlib.nullcontext():  # LoRA: π_ref = base
                ref_logprobs = response_logprobs(reference or policy, seq, attn, n_prompt, args.temperature)
            values = response_values(value, seq, attn, n_prompt) if value is not None else torch.zeros_like(logprobs)
            if rm is not None:  # [d6] the reward model's score at each sequence's last real token
                score = last_token(rm.scores(seq, attn), attn)
        replies = [ids[:n] for ids, n in zip(response.tolist(), length.tolist())]  # token ids, <|end|> included
        if rm is None:
            score = torch.tensor([reward_fn(r["messages"], ids) for r, ids in zip(batch, replies)], device=rt.device)
        if args.missing_end_penalty is not None:  # [d5]
            score = torch.where(ended, score.float(), args.missing_end_penalty)
        gold = [annotate(r["messages"], [reply_text(ids)])[0] for r, ids in zip(batch, replies)] if annotate else [float("nan")]
        return dict(seq=seq, attn=attn, n_prompt=n_prompt, mask=mask.float(), logprobs=logprobs, ref_logprobs=ref_logprobs,
                    values=values.float(), score=score, gold=torch.tensor(gold, dtype=torch.float), ended=ended.float(),
                    length=length.float(), t_generate=t1 - t0, t_score=time.perf_counter() - t1)

    # ---- optimizers: one per network -----------------------------------------------------------------
    optimizer = configure_optimizer(policy, lr, 0.0, device_type=rt.device.type)
    if value is not None:
        value_optimizer = configure_optimizer(value, value_lr, 0.0, device_type=rt.device.type)
        value_scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.scaler.is_enabled())  # fp16: a scale per loss
    step, kl_coef = 0, args.kl_coef
    if resume:
        step = restore_training_state(resume, optimizer, rt.scaler, sampler)
        if value is not None:
            value_optimizer.load_state_dict(resume["value_optimizer"])
            value_scaler.load_state_dict(resume["value_scaler"])
        kl_coef = resume["kl_coef"]
        set_rng_state(resume["rng"], rt.device)  # last: no set-up work draws from the random streams after it
        log(f"resuming from {ckpt_path} at step {step}, β {kl_coef:.4f}")

    def checkpoint():
        save_stage(args.out, policy, args.policy if args.lora_r else None, fingerprint, model_config=asdict(config),
                   tokenizer=tokenizer, args=vars(args), step=step, stage=args.algo, chat=True, kl_coef=kl_coef,
                   **({"value_model": value.state_dict(), "value_optimizer": value_optimizer.state_dict(),
                       "value_scaler": value_scaler.state_dict()} if value is not None else {}),
                   **training_state(optimizer, rt.scaler, sampler, rt.device))

    def evaluate():
        """The world's held-out metrics, when the prompts are the world's."""
        if world is None:
            return {}
        scores = data.evaluate_world(policy, enc, world, True, rt.device, rt.autocast)
        log(f"step {step}/{args.max_steps} | world: {data.format_world_metrics(scores)}")
        return {f"world/{k}": v for k, v in scores.items() if isinstance(v, float)}

    # ---- training loop: evaluate -> checkpoint -> rollout -> advantages -> updates -> log -------------
    # [d11] PPO and GRPO: epochs of minibatches, the ratio to the rollout's policy clipped; RLOO: one
    # gradient step on the whole batch, from the policy that sampled it (REINFORCE needs no ratio)
    epochs, minibatches = (1, 1) if args.algo == "rloo" else (args.ppo_epochs, args.minibatches)
    vf_loss = vf_clipfrac = torch.zeros(())  # stay 0 without a value model (GRPO, RLOO)
    names = ["policy_loss", "value_loss", "clipfrac", "approx_kl", "value_clipfrac", "entropy", "grad_norm"]
    stopped = False
    with GracefulStop(log) as stop, tqdm(total=args.max_steps, initial=step, desc=args.algo, dynamic_ncols=True) as bar:
        while step < args.max_steps and not stopped:  # a --resume past --max-steps ends at once
            if step % args.eval_every == 0:
                append_jsonl(log_path, {"step": step, **evaluate()})
                if step > 0:
                    checkpoint()

            r = rollout([row for row in sampler.next() for _ in range(args.group_size)])  # K samples of each prompt
            t0 = time.perf_counter()
            mask, n_prompt = r["mask"], r["n_prompt"]
            kl = kl_per_token(r["logprobs"], r["ref_logprobs"], args.kl_estimator) * mask       # (B, L)
            advantages, returns = compute_advantages(args.algo, r["score"], kl, mask, r["values"], kl_coef,
                                                     args.group_size, args.gamma, args.lam, not args.no_std_scale)
            step_lr, step_value_lr = (get_lr(step, x, args.warmup_steps, args.max_steps) for x in (lr, value_lr))
            stats = []
            for _ in range(epochs):
                for mb in torch.randperm(len(mask), device=rt.device).chunk(minibatches):
                    seq, attn, m = r["seq"][mb], r["attn"][mb], mask[mb]
                    with rt.autocast():
                        logprobs, entropy = response_logprobs(policy, seq, attn, n_prompt, args.temperature, True)
                    if args.algo == "rloo":  # ρ = 1: no clip fraction, and KL(π_old‖π) = 0
                        pg_loss, clipfrac, approx_kl = rloo_loss(logprobs, advantages[mb], m), *torch.zeros(2)
                    else:
                        pg_loss, clipfrac, approx_kl = ppo_policy_loss(logprobs, r["logprobs"][mb], advantages[mb], m,
                                                                       args.clip_range, args.loss_average)
                    loss = pg_loss
                    if args.algo == "grpo":  # GRPO, Eq. 3: + β·KL(π‖π_ref), k3 on the sampled tokens
                        k3 = kl_per_token(logprobs, r["ref_logprobs"][mb], "k3")
                        loss = loss + kl_coef * average_tokens(k3, m, args.loss_average)
                    rt.scaler.scale(loss).backward()
                    grad_norm = optimizer_step(optimizer, rt.scaler, step_lr, args.grad_clip)
                    if value is not None:
                        with rt.autocast():
                            values = response_values(value, seq, attn, n_prompt)
                        vf_loss, vf_clipfrac = ppo_value_loss(values, r["values"][mb], returns[mb], m, args.value_clip_range)
                        value_scaler.scale(vf_loss).backward()
                        optimizer_step(value_optimizer, value_scaler, step_value_lr, args.grad_clip)
                    stats.append([pg_loss.item(), vf_loss.item(), clipfrac.item(), approx_kl.item(), vf_clipfrac.item(),
                                  masked_mean(entropy, m).item(), grad_norm])
            check_finite(stats[-1][0] + stats[-1][1], step, ckpt_path)
            seq_kl = kl.sum(1).mean().item()  # KL(π‖π_ref) per response, the controller's input
            if args.target_kl > 0 and args.algo != "grpo":  # [d12] β of a KL in the reward
                kl_coef = update_kl_coef(kl_coef, seq_kl, args.target_kl)
            step += 1

            t_train = time.perf_counter() - t0
            mean = dict(zip(names, torch.tensor(stats).mean(0).tolist()))  # over the step's minibatches
            dt = r["t_generate"] + r["t_score"] + t_train
            # the spread of scores within each prompt's group of samples (0 everywhere for PPO's groups of 1)
            group_std = r["score"].view(-1, args.group_size).std(1) if args.group_size > 1 else torch.zeros(1)
            record = {"ppo/score": r["score"].mean().item(), "ppo/kl": seq_kl, "ppo/kl_coef": kl_coef,
                      "ppo/gold": r["gold"].mean().item(), "ppo/gold_good": (r["gold"] > 0).float().mean().item(),
                      **{f"ppo/{k}": v for k, v in mean.items()}, "ppo/length": r["length"].mean().item(),
                      "ppo/ended": r["ended"].mean().item(), "time/generate": r["t_generate"],
                      "ppo/score_std": group_std.mean().item(),
                      "ppo/zero_spread": (group_std == 0).float().mean().item() if args.group_size > 1 else 0.0,
                      "time/score": r["t_score"], "time/train": t_train}
            bar.update(1)
            bar.set_postfix(score=f"{record['ppo/score']:.2f}", gold=f"{record['ppo/gold']:.2f}", kl=f"{seq_kl:.2f}",
                            tok_s=f"{mask.sum().item() / dt:,.0f}")
            if step % args.log_every == 0 or step == 1:
                group = f"group std {record['ppo/score_std']:.3f} | zero spread {record['ppo/zero_spread']:.0%} | " \
                    if args.group_size > 1 else ""
                log(f"step {step}/{args.max_steps} | score {record['ppo/score']:.3f} | gold {record['ppo/gold']:.3f} | "
                    f"kl {seq_kl:.3f} | β {kl_coef:.4f} | {group}policy loss {mean['policy_loss']:.4f} | "
                    f"value loss {mean['value_loss']:.4f} | clipfrac {mean['clipfrac']:.3f} | approx kl "
                    f"{mean['approx_kl']:.4f} | entropy {mean['entropy']:.2f} | length {record['ppo/length']:.1f} | "
                    f"ended {record['ppo/ended']:.0%} | {dt * 1000:.0f} ms (generate {r['t_generate'] / dt:.0%}, "
                    f"score {r['t_score'] / dt:.0%}, train {t_train / dt:.0%})")
            append_jsonl(log_path, {"step": step, **record})  # every step: the curves of score, gold and KL
            stopped = stop.requested or step == args.stop_at
        checkpoint()

    if stopped:
        log(f"stopped at step {step}; checkpoint saved to {ckpt_path}; continue with the same command plus --resume")
        return {"step": step}
    result = {"step": step, "kl_coef": kl_coef}
    scores = data.world_report(policy, enc, args.prompts, True, rt.device, rt.autocast, args.out)
    if scores:
        log(f"world: {data.format_world_metrics(scores)}")
        append_jsonl(log_path, {"step": step, **{f"world/{k}": v for k, v in scores.items() if isinstance(v, float)}})
        result["world"] = scores
    log(f"checkpoint: {ckpt_path}\nagainst SFT: python sample.py --judge {args.reward_model} --init-from {args.out} "
        f"--compare {args.policy}")
    return result


if __name__ == "__main__":
    main()
