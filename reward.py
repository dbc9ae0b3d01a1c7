"""
Reward model: learn which of two answers people prefer, and give every answer a score.

The guide's alignment stage, step a. People compare two responses to the same prompt; a reward model
r(x, y) learns to give the preferred one the higher score. Under the Bradley-Terry model (Bradley and
Terry 1952) the probability that y_w is preferred to y_l is σ(r(x, y_w) − r(x, y_l)), so training
minimises −log σ(r(x, y_w) − r(x, y_l)) over the pairs (InstructGPT, Ouyang et al. 2022, Eq. 1). The
model is the SFT decoder with a linear score head on the last hidden state (model.GPT.scores), read at
the last real token of prompt + response. PPO optimises against this score, and `compare` uses it as a
judge of two models.

Departures from InstructGPT: one pair per prompt instead of all K-choose-2 pairs of K ranked answers (the
world's data has two answers per prompt); the score head starts from std 1/√(C+1) (Huang et al. 2024).
After training, the head's bias is shifted so that the SFT model's own answers to the training prompts
score 0 on average (the offset is stored as reward_offset), which keeps PPO's rewards on a sane scale.

Reads:  --init-from an SFT (or pretrained) checkpoint, default out/sft; --data preference pairs (.jsonl:
        prompt/chosen/rejected, HH-RLHF transcripts or OpenAI's format; default the tiny world's).
Writes: OUT/ckpt.pt (a scoring model: model_config.score_head is set), OUT/adapter.pt (LoRA runs),
        OUT/log.jsonl.

  python reward.py                                             # the world's pairs, from out/sft
  python reward.py --lora-r 8                                  # LoRA; the score head trains in full
  python reward.py score --model out/reward --prompt "What is the capital of France?" --response "Paris."
  python reward.py compare --model out/reward --a out/dpo --b out/sft   # win rate of A over B
  python reward.py --max-steps 10 --eval-every 5 --device cpu  # seconds
"""

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
from lora import DEFAULT_TARGETS, apply_lora, base_fingerprint, load_lora
from model import GracefulStop, append_jsonl, atomic_write, check_finite, configure_optimizer, get_lr, last_token, \
    load_checkpoint, load_model, optimizer_step, positive_int, restore_training_state, resume_args, save_stage, \
    set_rng_state, setup_runtime, training_state
def bradley_terry_loss(chosen_rewards, rejected_rewards, margin=0.0, center_coef=0.0):
    """L = mean over pairs of −log σ(r_w − r_l − m)        (Bradley-Terry; InstructGPT, Eq. 1)

    Shape: chosen_rewards r_w, rejected_rewards r_l (B,). margin m > 0 asks for a gap of at least m
    (Llama 2 uses a margin that grows with how strongly people preferred the answer). center_coef adds
    c · mean((r_w + r_l)²): the loss sees only differences, so scores may drift as a whole; this keeps
    them near 0 (reward centering, Eisenstein et al. 2023). −log σ(z) is computed as −logsigmoid(z),
    finite for any z (log(sigmoid(z)) is −inf below z ≈ −100 in fp32). Returns a 0-dim tensor.
    """
    z = chosen_rewards - rejected_rewards - margin                       # (B,)
    loss = -F.logsigmoid(z).mean()
    if center_coef > 0:
        loss = loss + center_coef * (chosen_rewards + rejected_rewards).pow(2).mean()
    return loss


def score_sequences(model, rows, pad_id, device):
    """Scores of (prompt_ids, response_ids) rows: the score head at each row's last real token, (N,).
    One forward pass for all rows, right-padded (causal attention never sees the padding)."""
    ids, pad_mask, _ = data.pad_responses(rows, pad_id)                    # (N, T) each
    return last_token(model.scores(ids.to(device)), pad_mask.to(device))  # (N, T) -> (N,)


def fit_pair(prompt, chosen, rejected, max_len):
    """Cut the prompt from the left so that prompt + the longer response fits max_len tokens (the SFT
    policy); None when a response alone does not fit."""
    room = max_len - max(len(chosen), len(rejected))
    if room < 1:
        return None
    return prompt[-room:], chosen, rejected


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # I/O
    p.add_argument("--init-from", default="out/sft", help="SFT (or pretrained) checkpoint the reward model starts from")
    p.add_argument("--data", default=os.path.join(data.DATA_DIR, "world", "prefs.jsonl"),
                   help="preference pairs .jsonl: prompt/chosen/rejected, HH-RLHF transcripts, or OpenAI's format")
    p.add_argument("--out", default="out/reward", help="output directory")
    p.add_argument("--resume", action="store_true", help="continue the run saved in OUT/ckpt.pt")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of pairs held out for accuracy")
    # LoRA (--lora-r 0 = the whole body trains)
    p.add_argument("--lora-r", type=int, default=0, help="LoRA rank r (0 = full fine-tuning); the score head always trains")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA α: the update is scaled by α/r")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA path's input")
    p.add_argument("--lora-targets", nargs="+", default=list(DEFAULT_TARGETS), help="module name suffixes to adapt")
    # optimization
    p.add_argument("--max-steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--batch-size", type=positive_int, default=16, help="pairs per step (2x sequences per forward pass)")
    p.add_argument("--lr", type=float, default=0.0, help="peak learning rate (0 = 1e-4 full, 1e-3 LoRA)")
    p.add_argument("--warmup-steps", type=int, default=10, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on matrices")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0 = off)")
    # the loss
    p.add_argument("--margin", type=float, default=0.0, help="m in −log σ(r_w − r_l − m) (0 = the plain Bradley-Terry loss)")
    p.add_argument("--center-coef", type=float, default=0.0, help="c of the reward-centering penalty c·(r_w + r_l)² (0 = off)")
    p.add_argument("--offset-prompts", type=int, default=128, help="training prompts the SFT model answers to set the score's zero (0 = no shift)")
    # evaluation and logging
    p.add_argument("--eval-every", type=positive_int, default=50, help="steps between held-out accuracy and checkpoints")
    p.add_argument("--log-every", type=positive_int, default=10, help="steps between log lines")
    p.add_argument("--stop-at", type=int, default=-1, help="save and exit after this step (-1 = off)")
    # system
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="auto: see model.setup_runtime")
    p.add_argument("--seed", type=int, default=1337, help="seed for the split, shuffling and the head's init")
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("score", "compare"):
        return judge(argv)
    args = get_args(argv)
    lr = args.lr or (1e-3 if args.lora_r else 1e-4)

    # ---- setup -----------------------------------------------------------------------------------
    rt = setup_runtime(args.device, args.dtype, args.seed)
    log = tqdm.write
    os.makedirs(args.out, exist_ok=True)
    ckpt_path, log_path = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "log.jsonl")
    if args.resume and not os.path.exists(ckpt_path):
        sys.exit(f"error: --resume: no checkpoint at {ckpt_path}")
    resume = load_checkpoint(ckpt_path) if args.resume else None
    if resume:
        resume_args(args, resume["args"], ["init_from", "lora_r", "lora_alpha", "lora_dropout", "lora_targets"], log,
                    warn=("max_steps", "batch_size", "lr"))

    # ---- model: the SFT body, a score head, LoRA if asked -----------------------------------------
    try:
        model, src = load_model(args.init_from)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: --init-from: {e}")
    tokenizer = data.checkpoint_tokenizer(src)
    enc = data.get_encoding(tokenizer)
    fingerprint = base_fingerprint(model) if args.lora_r else None  # the base as loaded
    if args.lora_r and resume:
        load_lora(model, resume["adapter"])
    else:
        if model.score_head is None:
            model.add_score_head()
        if args.lora_r:
            apply_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets,
                       modules_to_save=("score_head",))
        elif resume:
            model.load_state_dict(resume["model"])
    config = model.config
    model.to(rt.device)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"model_config: {json.dumps(asdict(config))}\nargs: {json.dumps(vars(args))}")
    log(f"reward model from {args.init_from}: {n_trainable:,} trainable parameters"
        f"{' (LoRA r=%d + score head)' % args.lora_r if args.lora_r else ''} on {rt.device} ({rt.why})")

    # ---- data: pairs -> token ids; a held-out split ------------------------------------------------
    try:
        pairs, counts = data.read_preference_pairs(args.data)
    except data.DataError as e:
        sys.exit(f"error: {e}")
    rows, n_cut, n_dropped = [], 0, 0
    for pair in pairs:
        ids = data.render_pair(enc, pair)
        fitted = fit_pair(*ids, config.block_size)
        n_cut += fitted is not None and len(fitted[0]) < len(ids[0])
        n_dropped += fitted is None
        if fitted is not None:
            rows.append((*fitted, pair.get("kind", "all"), pair["prompt"]))
    log(f"{counts['read']:,} pairs from {args.data}: {len(rows):,} used, {counts['identical']:,} identical and "
        f"{counts['empty']:,} empty skipped, {n_cut:,} prompts cut, {n_dropped:,} dropped (a response over "
        f"{config.block_size} tokens)")
    if len(rows) < 2:
        sys.exit(f"error: {args.data}: fewer than 2 usable pairs")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed)).tolist()
    n_val = max(1, int(len(rows) * args.val_fraction))
    val_rows, train_rows = [rows[i] for i in order[:n_val]], [rows[i] for i in order[n_val:]]
    train = data.ExampleSampler(train_rows, args.batch_size, args.seed)
    pad = enc.eot_token

    def pair_scores(batch):
        """(r_chosen, r_rejected), each (B,): chosen and rejected rows go through in one forward pass."""
        both = [(p, c) for p, c, _, _, _ in batch] + [(p, r) for p, _, r, _, _ in batch]
        scores = score_sequences(model, both, pad, rt.device)                  # (2B,)
        return scores[:len(batch)], scores[len(batch):]

    # ---- optimizer ---------------------------------------------------------------------------------
    optimizer = configure_optimizer(model, lr, args.weight_decay, device_type=rt.device.type)
    step = 0
    if resume:
        step = restore_training_state(resume, optimizer, rt.scaler, train)
        log(f"resuming from {ckpt_path} at step {step}")

    def checkpoint(offset=0.0):
        save_stage(args.out, model, args.init_from if args.lora_r else None, fingerprint, model_config=asdict(config),
                   tokenizer=tokenizer, args=vars(args), step=step, stage="reward", chat=True, reward_offset=offset,
                   **training_state(optimizer, rt.scaler, train, rt.device))

    @torch.no_grad()
    def evaluate():
        """Held-out pairwise accuracy, mean margin r_w − r_l, and the chosen and rejected scores; per kind."""
        model.eval()
        chosen, rejected = [], []
        for i in range(0, len(val_rows), args.batch_size):
            with rt.autocast():
                c, r = pair_scores(val_rows[i:i + args.batch_size])
            chosen.append(c.float())
            rejected.append(r.float())
        model.train()
        chosen, rejected = torch.cat(chosen), torch.cat(rejected)
        kinds = [kind for _, _, _, kind, _ in val_rows]
        result = {"rm/accuracy": (chosen > rejected).float().mean().item(),
                  "rm/margin": (chosen - rejected).mean().item(),
                  "rm/chosen_mean": chosen.mean().item(), "rm/chosen_std": chosen.std().item() if len(chosen) > 1 else 0.0,
                  "rm/rejected_mean": rejected.mean().item(),
                  "rm/rejected_std": rejected.std().item() if len(rejected) > 1 else 0.0}
        for kind in sorted(set(kinds)):
            idx = torch.tensor([k == kind for k in kinds])
            result[f"rm/accuracy_{kind}"] = (chosen[idx] > rejected[idx]).float().mean().item()
        return result

    if resume:
        set_rng_state(resume["rng"], rt.device)

    # ---- training loop: evaluate -> checkpoint -> step -> log --------------------------------------
    metrics, stopped_early = {}, False
    model.train()
    t_last = time.perf_counter()
    with GracefulStop(log) as stop, tqdm(total=args.max_steps, initial=step, desc="reward", dynamic_ncols=True) as bar:
        while True:
            last = step == args.max_steps
            if step % args.eval_every == 0 or last:
                metrics.update(evaluate())
                log(f"step {step}/{args.max_steps} | held-out accuracy {metrics['rm/accuracy']:.1%} | margin "
                    f"{metrics['rm/margin']:.3f} | chosen {metrics['rm/chosen_mean']:.2f} ± {metrics['rm/chosen_std']:.2f}"
                    f" | rejected {metrics['rm/rejected_mean']:.2f} ± {metrics['rm/rejected_std']:.2f} | "
                    + ", ".join(f"{k.removeprefix('rm/accuracy_')} {v:.1%}" for k, v in metrics.items()
                                if k.startswith("rm/accuracy_")))
                append_jsonl(log_path, {"step": step, **{k: v for k, v in metrics.items() if k.startswith("rm/")}})
                if step > 0 and not last:
                    checkpoint()
                t_last = time.perf_counter()
            if last:
                break

            batch = train.next()
            with rt.autocast():
                chosen, rejected = pair_scores(batch)
                loss = bradley_terry_loss(chosen.float(), rejected.float(), args.margin, args.center_coef)
            rt.scaler.scale(loss).backward()
            grad_norm = optimizer_step(optimizer, rt.scaler, get_lr(step, lr, args.warmup_steps, args.max_steps),
                                       args.grad_clip)
            train_loss, train_acc = loss.item(), (chosen > rejected).float().mean().item()
            check_finite(train_loss, step, ckpt_path)
            step += 1

            t_now = time.perf_counter()
            dt, t_last = t_now - t_last, t_now
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.3f}", acc=f"{train_acc:.0%}", pairs_s=f"{len(batch) / dt:,.1f}")
            if step % args.log_every == 0 or step == 1:
                log(f"step {step}/{args.max_steps} | loss {train_loss:.4f} | accuracy {train_acc:.1%} | grad norm "
                    f"{grad_norm:.2f} | {dt * 1000:.0f} ms | {len(batch) / dt:,.1f} pairs/s")
                append_jsonl(log_path, {"step": step, "train/loss": train_loss, "train/accuracy": train_acc,
                                        "grad_norm": grad_norm, "dt_ms": dt * 1000, "pairs_per_s": len(batch) / dt})
            if stop.requested or step == args.stop_at:
                checkpoint()
                stopped_early = True
                break

    if stopped_early:
        log(f"stopped at step {step}; checkpoint saved to {ckpt_path}; continue with the same command plus --resume")
        return {"step": step, **metrics}

    # ---- the score's zero: the SFT model's own answers to training prompts score 0 on average ----
    offset = 0.0
    if args.offset_prompts > 0:
        policy, _ = load_model(args.init_from)
        policy.to(rt.device).eval()
        prompts = [p for p, _, _, _, _ in train_rows[:args.offset_prompts]]
        answers = generate_answers(policy, enc, prompts, rt)
        model.eval()
        with torch.no_grad(), rt.autocast():
            offset = score_sequences(model, list(zip(prompts, answers)), pad, rt.device).float().mean().item()
        with torch.no_grad():
            model.score_head.bias -= offset  # every score moves by −offset; differences stay the same
        log(f"reward offset: the SFT model's answers to {len(prompts)} training prompts scored {offset:+.3f} "
            f"on average; the head's bias is shifted so that they score 0")
    checkpoint(offset)
    log(f"done: step {step}, held-out accuracy {metrics['rm/accuracy']:.1%}\ncheckpoint: {ckpt_path}\n"
        f"judge two models with it: python reward.py compare --model {args.out} --a MODEL_A --b MODEL_B")
    return {"step": step, "reward_offset": offset, **metrics}


def generate_answers(model, enc, prompts, rt, max_new_tokens=32, batch_size=64):
    """Greedy replies (token ids, each ending with <|end|> if it came) to prompt token lists, batched."""
    end, answers = data.special_id(enc, "<|end|>"), []
    for i in range(0, len(prompts), batch_size):
        idx, pad_mask = data.left_pad(prompts[i:i + batch_size], end)
        with torch.no_grad(), rt.autocast():
            out = model.generate(idx.to(rt.device), max_new_tokens, temperature=0, stop_token=end,
                                 pad_mask=pad_mask.to(rt.device))
        for row in out[:, idx.size(1):].tolist():
            answers.append(row[:row.index(end) + 1] if end in row else row)
    return answers


# -----------------------------------------------------------------------------
# The reward model as a judge: score responses, and compare two models


def get_judge_args(argv):
    p = argparse.ArgumentParser(prog="reward.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="score responses with a reward model, or compare two models with it")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="score prompt/response records (or one --prompt/--response)")
    s.add_argument("--data", default="", help=".jsonl of {prompt, response} records ('' = use --prompt/--response)")
    s.add_argument("--out", default="", help="scores .jsonl to write ('' = DATA with .scores.jsonl)")
    s.add_argument("--prompt", default="", help="one prompt (a user turn)")
    s.add_argument("--response", default="", help="the response to it")
    c = sub.add_parser("compare", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="win rate of model A over model B, judged by the reward model")
    c.add_argument("--a", required=True, help="checkpoint A (e.g. out/dpo)")
    c.add_argument("--b", required=True, help="checkpoint B (e.g. out/sft)")
    c.add_argument("--prompts", default="", help="prompts .jsonl (any read_prompts format; '' = the world's held-out questions)")
    c.add_argument("--max-new-tokens", type=int, default=32, help="tokens per answer")
    for q in (s, c):
        q.add_argument("--model", default="out/reward", help="reward model checkpoint")
        q.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
        q.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="auto: see model.setup_runtime")
    return p.parse_args(argv)


def judge(argv):
    args = get_judge_args(argv)
    rt = setup_runtime(args.device, args.dtype)
    try:
        rm, ckpt = load_model(args.model)
        if rm.score_head is None:
            raise ValueError(f"{args.model} is not a reward model (no score head); train one with reward.py")
        enc = data.get_encoding(data.checkpoint_tokenizer(ckpt))
        rm.to(rt.device).eval()

        def render(messages, response_ids):
            prompt_ids = data.render_chat(enc, messages, add_generation_prompt=True)[0]
            return fit_pair(prompt_ids, response_ids, response_ids, rm.config.block_size)[:2]

        end = data.special_id(enc, "<|end|>")
        if args.command == "score":
            if args.data:
                records = [(data.to_messages(r, where, need_reply=False), r.get("response"), where)
                           for where, r in data.iter_jsonl(args.data)]
                for messages, response, where in records:
                    if not isinstance(response, str):
                        raise data.DataError(f"{where}: record has no string field 'response'")
            else:
                records = [([{"role": "user", "content": args.prompt}], args.response, "--prompt")]
            rows = [render(m, data.encode(enc, r) + [end]) for m, r, _ in records]
            with torch.no_grad(), rt.autocast():
                scores = torch.cat([score_sequences(rm, rows[i:i + 64], enc.eot_token, rt.device).float()
                                    for i in range(0, len(rows), 64)]).tolist()
            if args.data:
                out = args.out or args.data.removesuffix(".jsonl") + ".scores.jsonl"
                atomic_write(out, lambda f: f.write("".join(json.dumps({"score": s}) + "\n" for s in scores).encode()))
                t = torch.tensor(scores)
                print(f"{len(scores):,} records scored: mean {t.mean():.3f}, std {t.std() if len(t) > 1 else 0:.3f}, "
                      f"min {t.min():.3f}, max {t.max():.3f}; wrote {out}")
            else:
                print(f"score {scores[0]:.4f}")
            return scores

        # compare: A and B answer the same prompts greedily; the reward model judges each pair
        if args.prompts:
            questions = data.read_prompts(args.prompts)
        else:
            world = data.load_world()
            questions = [[{"role": "user", "content": f"What is the capital of {c}?"}]
                         for c in world["heldout"] + world["invented"]]
        prompt_ids = [data.render_chat(enc, q, add_generation_prompt=True)[0] for q in questions]
        replies = {}
        for name, path in (("a", args.a), ("b", args.b)):
            policy, pckpt = load_model(path)
            if data.checkpoint_tokenizer(pckpt) != data.checkpoint_tokenizer(ckpt):
                raise ValueError(f"{path} uses another tokenizer than the reward model {args.model}")
            replies[name] = generate_answers(policy.to(rt.device).eval(), enc, prompt_ids, rt, args.max_new_tokens)
        with torch.no_grad(), rt.autocast():
            score = {name: score_sequences(rm, [fit_pair(p, r, r, rm.config.block_size)[:2]
                                                for p, r in zip(prompt_ids, replies[name])],
                                           enc.eot_token, rt.device).float() for name in replies}
    except (FileNotFoundError, ValueError, data.DataError) as e:
        sys.exit(f"error: {e}")
    # each prompt: 1 if A scores higher, 0.5 for a tie, 0 if B does; the win rate is their mean, and its
    # 95% interval the normal approximation mean ± 1.96·s/√n
    outcome = (score["a"] > score["b"]).float() + 0.5 * (score["a"] == score["b"]).float()
    n, rate = len(outcome), outcome.mean().item()
    half = 1.96 * outcome.std().item() / math.sqrt(n) if n > 1 else float("nan")
    result = {"win_rate": rate, "ci95": [max(0.0, rate - half), min(1.0, rate + half)], "n": n,
              "ties": int((score["a"] == score["b"]).sum()), "mean_score_a": score["a"].mean().item(),
              "mean_score_b": score["b"].mean().item()}
    print(json.dumps(result))
    print(f"{args.a} beats {args.b} on {rate:.1%} of {n} prompts (95% CI {result['ci95'][0]:.1%}-"
          f"{result['ci95'][1]:.1%}); mean reward {result['mean_score_a']:.3f} against {result['mean_score_b']:.3f}")
    return result


if __name__ == "__main__":
    main()
