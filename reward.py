"""
Reward model: collect people's rankings of the model's own answers, and learn to score answers the same way.

The guide's alignment stage, steps 1 and 2 of RLHF (InstructGPT, Ouyang et al. 2022, §3.4-3.5):

  1. Feedback. For each prompt the SFT model writes K answers (--samples-per-prompt, sampled at a
     temperature), an annotator ranks them (ties allowed), and each ranking becomes its comparisons:
     every pair of answers whose ranks differ, better first. They are written to OUT/feedback.jsonl
     (prompt, chosen, rejected, kind, plus the group of answers, the round and the policy they came
     from). The answers are the policy's own, so the reward model learns to judge the text PPO will
     show it; pairs written off the policy's distribution leave gaps that PPO finds and exploits (Gao
     et al. 2022; the README measures both). The annotator is a function (prompt messages, answers)
     -> grades, higher better (data.world_annotator for the tiny world; --annotator file.py:function
     for your own, e.g. one that asks a person at the terminal).
  2. Reward model. r(x, y) is the SFT decoder with a linear score head (model.GPT.scores) read at the
     last real token of prompt + response. Under the Bradley-Terry model the probability that y_w is
     preferred to y_l is σ(r(x, y_w) − r(x, y_l)); InstructGPT's loss (Eq. 1) over the C(K,2)
     comparisons of K ranked answers to prompt x is

         loss(θ) = −1/C(K,2) · E_(x, y_w, y_l) [ log σ(r(x, y_w) − r(x, y_l)) ]

     with all comparisons of one prompt in the same batch, each answer scored once (K forward rows,
     not 2·C(K,2)): a prompt's comparisons share answers, and as separate examples they overfit.

PPO (ppo.py) then optimises the policy against r; sample.py --judge uses r to score answers, to pick
among samples (--best-of-n) and to judge two models (--compare). Iterated RLHF (Llama 2 §3.2.2; Bai et
al. 2022): collect again on the new policy and train on the union: `python reward.py --collect-from
out/ppo --data out/reward/feedback.jsonl --out out/reward2`.

Departures from InstructGPT: ties give no comparison, so a prompt's loss is the mean over the
comparisons it has (C(K,2) without ties); the score head starts from std 1/√(C+1) (Huang et al. 2024);
after training the head is rescaled so that the SFT model's own sampled answers to training prompts score
mean 0 and std 1 (Ziegler et al. 2019; stored as reward_offset and reward_scale): PPO's KL coefficient β
then means the same whatever scale training left the scores at. An answer that
did not end within --max-new-tokens is kept as written (the annotator sees it cut off).

Reads:  --init-from an SFT (or pretrained) checkpoint, default out/sft; --collect-from the policy whose
        answers are ranked (default: --init-from, unless --data is given); --prompts for collection
        (default the world's); --data preference files to train on as well (prompt/chosen/rejected, with
        an optional group; HH-RLHF transcripts or OpenAI's format).
Writes: OUT/feedback.jsonl (collected comparisons), OUT/ckpt.pt (a scoring model: model_config.score_head
        is set), OUT/adapter.pt (LoRA runs), OUT/log.jsonl.

  python reward.py                                             # collect on out/sft's answers, train
  python reward.py --data data/world/prefs.jsonl --out out/reward_offpolicy   # hand-written pairs only
  python reward.py --collect-from out/ppo --data out/reward/feedback.jsonl --out out/reward2   # round 2
  python reward.py --label-noise 0.25                          # annotators who disagree a quarter of the time
  python reward.py --max-steps 10 --eval-every 5 --device cpu  # seconds
"""

import argparse
import json
import os
import random
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
from lora import DEFAULT_TARGETS, prepare_to_train
from model import GracefulStop, append_jsonl, atomic_write, check_finite, claim_out_dir, configure_optimizer, \
    data_parallel, get_lr, in_range, load_model, load_resume, optimizer_step, positive_int, \
    restore_training_state, resume_args, save_stage, set_rng_state, setup_runtime, training_state


def bradley_terry_loss(chosen_rewards, rejected_rewards, margin=0.0, center_coef=0.0, group=None, totals=None):
    """InstructGPT's reward-model loss (Eq. 1), under the Bradley-Terry model (Bradley and Terry 1952):

        loss = mean over prompts x of  −1/C_x · Σ_(y_w, y_l) log σ(r(x, y_w) − r(x, y_l) − m)

    the inner sum over the C_x comparisons of prompt x: all C(K,2) pairs of K ranked answers with no
    ties, so a prompt is one batch element however many comparisons it has.
    Shape: chosen_rewards r_w, rejected_rewards r_l (M,), one per comparison; group (M,) long, the
    prompt of each comparison, numbered 0..P-1 (None: each comparison its own prompt, the plain mean
    over pairs). margin m > 0 asks for a gap of at least m (Llama 2 uses a margin that grows with how
    strongly people preferred the answer). center_coef adds c · mean((r_w + r_l)²): the loss sees only
    differences, so scores may drift as a whole; this keeps them near 0 (reward centering, Eisenstein
    et al. 2023). −log σ(z) is computed as −logsigmoid(z), finite for any z. Returns a 0-dim tensor.
    totals (P, M) of the whole batch, when this call sees one data-parallel rank's share of it: the two
    means are then taken over the whole batch, and the ranks' losses sum to the batch's.
    """
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - margin)    # (M,)
    if group is None:
        group = torch.arange(len(losses), device=losses.device)
    n = int(group.max()) + 1
    per_prompt = torch.zeros(n, device=losses.device).index_add(0, group, losses) / torch.bincount(group, minlength=n)
    n_prompts, n_comparisons = totals or (n, len(losses))
    loss = per_prompt.sum() / n_prompts                                                   # (P,) -> mean
    if center_coef > 0:
        loss = loss + center_coef * (chosen_rewards + rejected_rewards).pow(2).sum() / n_comparisons
    return loss


# -----------------------------------------------------------------------------
# Step 1: feedback on the policy's own answers


def comparisons_of(grades):
    """A ranking with ties as its comparisons: (winner, loser) index pairs for every two answers whose
    grades differ, pairs (i, j), i < j, in order: [2, 0, 2, 1] -> (0, 1), (0, 3), (2, 1), (3, 1), (2, 3); a tie gives none."""
    pairs = []
    for i in range(len(grades)):
        for j in range(i + 1, len(grades)):
            if grades[i] != grades[j]:
                pairs.append((i, j) if grades[i] > grades[j] else (j, i))
    return pairs


def collect_feedback(policies, enc, prompts, annotate, k, temperature, max_new_tokens, rt, seed, label_noise=0.0,
                     batch_size=64, round_=1):
    """RLHF step 1 on the policies' own answers: K sampled answers per prompt from each policy, all of a
    prompt's answers ranked together by annotate, the ranking turned into its comparisons (comparisons_of),
    a share label_noise of them flipped (people disagree: InstructGPT's labelers agreed with each other
    about 73% of the time). Answers of two policies side by side (the new policy's next to the old one's,
    as Llama 2 §3.2.1 samples from two model variants) show the annotator what changed.

    policies: [(name, model)]; prompts: message lists ending with a user turn. Returns (records, stats):
    preference records in read_preference_pairs' format, {"prompt", "chosen", "rejected", "kind": "2>0" (the
    grades), "group": the prompt's number, "round", "policy": [the chosen answer's, the rejected one's]},
    and counts. Deterministic for a seed: the samples come from a generator seeded with it, the flips from
    a second one, so noise changes labels, never answers.
    """
    end = data.end_of_turn(enc)
    ids = [data.render_chat(enc, m, add_generation_prompt=True)[0] for m in prompts]
    generator = torch.Generator(device=rt.device).manual_seed(seed)
    flip = random.Random(seed + 1)
    records, grades_seen, n_distinct, n_ended = [], [], 0, 0
    chunk = max(1, batch_size // k)  # prompts per generate call, each repeated K times
    for start in tqdm(range(0, len(prompts), chunk), desc="feedback", leave=False):
        rows = [p for p in ids[start:start + chunk] for _ in range(k)]
        replies = []  # per policy, K per prompt of the chunk
        for _, policy in policies:
            policy.eval()
            with torch.no_grad():
                replies.append(data.generate_replies(policy, enc, rows, end, rt.device, rt.autocast, len(rows),
                                                     max_new_tokens, temperature, generator))
        for g, messages in enumerate(prompts[start:start + chunk], start):
            source = {}  # distinct answer -> the first policy that wrote it
            for (name, _), answers in zip(policies, replies):
                for text, stopped in answers[(g - start) * k:(g - start + 1) * k]:
                    source.setdefault(text.strip(), name)
                    n_ended += stopped
            answers = list(source)
            grades = list(annotate(messages, answers))
            if len(grades) != len(answers) or not all(isinstance(x, (int, float)) for x in grades):
                raise ValueError(f"the annotator gave {grades!r} for {len(answers)} answers: one number per answer")
            n_distinct += len(answers)
            grades_seen += grades
            for w, l in comparisons_of(grades):
                if flip.random() < label_noise:
                    w, l = l, w
                records.append({"prompt": messages, "chosen": answers[w], "rejected": answers[l],
                                "kind": f"{grades[w]:g}>{grades[l]:g}", "group": g, "round": round_,
                                "policy": [source[answers[w]], source[answers[l]]]})
    n_samples = len(prompts) * k * len(policies)
    histogram = {f"{x:g}": grades_seen.count(x) for x in sorted(set(grades_seen), reverse=True)}
    stats = {"prompts": len(prompts), "samples": n_samples, "distinct": n_distinct, "ended": n_ended / max(1, n_samples),
             "comparisons": len(records), "prompts_with_comparisons": len({r["group"] for r in records}),
             "mean_grade": sum(grades_seen) / max(1, len(grades_seen)), "grades": histogram}
    return records, stats


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # I/O
    p.add_argument("--init-from", default="out/sft", help="SFT (or pretrained) checkpoint the reward model starts from")
    p.add_argument("--data", nargs="*", default=[],
                   help="preference files to train on too (.jsonl: prompt/chosen/rejected [+ group], HH-RLHF, OpenAI's); "
                        "given alone, nothing is collected")
    p.add_argument("--out", default="out/reward", help="output directory")
    p.add_argument("--resume", action="store_true", help="continue the run saved in OUT/ckpt.pt")
    p.add_argument("--val-fraction", type=in_range(float, 0, 1, open_high=True), default=0.1, help="share of prompts held out for accuracy")
    # feedback on the policy's own answers (step 1)
    p.add_argument("--collect-from", nargs="*", default=None,
                   help="the policies whose answers are ranked together (default: --init-from, unless --data is given; "
                        "the flag with no policy: none)")
    p.add_argument("--prompts", default=os.path.join(data.DATA_DIR, "world", "prompts.jsonl"),
                   help="prompts to collect answers to (.jsonl, any format ppo.py reads)")
    p.add_argument("--annotator", default="world", help="'world' (data.world_annotator) or FILE.py:FUNCTION ranking answers")
    p.add_argument("--samples-per-prompt", type=positive_int, default=4, help="K answers ranked per prompt")
    p.add_argument("--temperature", type=in_range(float, 0), default=1.0, help="sampling temperature of the collected answers")
    p.add_argument("--max-new-tokens", type=positive_int, default=24, help="the longest collected answer")
    p.add_argument("--label-noise", type=in_range(float, 0, 1), default=0.0, help="share of comparisons flipped (annotator disagreement; 0-0.5)")
    # LoRA (--lora-r 0 = the whole body trains)
    p.add_argument("--lora-r", type=in_range(int, 0), default=0, help="LoRA rank r (0 = full fine-tuning); the score head always trains")
    p.add_argument("--lora-alpha", type=in_range(float, 0, open_low=True), default=16.0, help="LoRA α: the update is scaled by α/r")
    p.add_argument("--lora-dropout", type=in_range(float, 0, 1, open_high=True), default=0.0, help="dropout on the LoRA path's input")
    p.add_argument("--lora-targets", nargs="+", default=list(DEFAULT_TARGETS), help="module name suffixes to adapt")
    # optimization
    p.add_argument("--max-steps", type=positive_int, default=300, help="optimizer steps")
    p.add_argument("--batch-size", type=positive_int, default=16, help="prompts per step, each with all its comparisons")
    p.add_argument("--lr", type=in_range(float, 0), default=0.0, help="peak learning rate (0 = 1e-4 full, 1e-3 LoRA)")
    p.add_argument("--warmup-steps", type=in_range(int, 0), default=10, help="linear warmup steps")
    p.add_argument("--weight-decay", type=in_range(float, 0), default=0.0, help="AdamW weight decay on matrices")
    p.add_argument("--grad-clip", type=in_range(float, 0), default=1.0, help="clip the global gradient norm (0 = off)")
    # the loss
    p.add_argument("--margin", type=in_range(float, 0), default=0.0, help="m in −log σ(r_w − r_l − m) (0 = the plain Bradley-Terry loss)")
    p.add_argument("--center-coef", type=in_range(float, 0), default=0.0, help="c of the reward-centering penalty c·(r_w + r_l)² (0 = off)")
    p.add_argument("--offset-prompts", type=in_range(int, 0), default=128,
                   help="training prompts the SFT model answers (4 samples each) to set the score's mean 0 and std 1 (0 = off)")
    # evaluation and logging
    p.add_argument("--eval-every", type=positive_int, default=50, help="steps between held-out accuracy and checkpoints")
    p.add_argument("--log-every", type=positive_int, default=10, help="steps between log lines")
    p.add_argument("--stop-at", type=in_range(int, -1), default=-1, help="save and exit after this step (-1 = off)")
    # system
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="auto: see model.setup_runtime")
    p.add_argument("--seed", type=int, default=1337, help="seed for sampling, label noise, the split, shuffling and the head's init")
    args = p.parse_args(argv)
    if not 0 <= args.label_noise <= 0.5:
        p.error("--label-noise must be in [0, 0.5]: above one half the labels say the opposite")
    if args.temperature <= 0:
        p.error("--temperature must be > 0: K greedy answers would all be the same")
    if args.collect_from is None:
        args.collect_from = [] if args.data else [args.init_from]
    if not args.collect_from and not args.data:
        p.error("nothing to train on: give --data, or policies to --collect-from")
    return args


def main(argv=None):
    args = get_args(argv)
    lr = args.lr or (1e-3 if args.lora_r else 1e-4)

    # ---- setup -----------------------------------------------------------------------------------
    claim_out_dir(args.out)  # OUT/.lock: a second run on the same --out is refused
    rt = setup_runtime(args.device, args.dtype, args.seed)  # under torchrun: one process per GPU, data-parallel
    log = tqdm.write if rt.master else (lambda *a, **k: None)
    if args.batch_size < rt.world_size:
        sys.exit(f"error: --batch-size {args.batch_size}: each of the {rt.world_size} processes needs a prompt a step")
    ckpt_path, log_path = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "log.jsonl")
    feedback_path = os.path.join(args.out, "feedback.jsonl")
    resume = load_resume(args.out, args.resume)  # its checkpoint, or None
    if resume:
        resume_args(args, resume["args"], ["init_from", "data", "collect_from", "lora_r", "lora_alpha", "lora_dropout",
                                           "lora_targets"], log, warn=("max_steps", "batch_size", "lr"))

    # ---- model: the SFT body, a score head, LoRA if asked -----------------------------------------
    try:
        model, src = load_model(args.init_from)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: --init-from: {e}")
    tokenizer = data.checkpoint_tokenizer(src)
    enc = data.get_encoding(tokenizer)
    model.to(rt.device)

    # ---- step 1: feedback on the policy's own answers (once; --resume reads what was written) -------
    # under torchrun rank 0 collects while the others wait (the process group's timeout bounds it)
    files = list(args.data)
    if args.collect_from:
        if not resume and rt.master:
            try:
                annotate = data.load_annotator(args.annotator, args.prompts)
                prompts = data.read_prompts(args.prompts)
                policies = []
                for path in args.collect_from:
                    policy, policy_src = load_model(path)
                    if data.checkpoint_tokenizer(policy_src) != tokenizer:
                        raise ValueError(f"{path} uses another tokenizer than {args.init_from}")
                    policies.append((path, policy.to(rt.device)))
                earlier = [r.get("round", 0) for f in args.data for _, r in data.iter_jsonl(f) if isinstance(r, dict)]
            except (FileNotFoundError, ValueError, data.DataError) as e:
                sys.exit(f"error: {e}")
            fits = [m for m in prompts if len(data.render_chat(enc, m, add_generation_prompt=True)[0])
                    + args.max_new_tokens <= model.config.block_size]
            t0 = time.perf_counter()
            records, stats = collect_feedback(policies, enc, fits, annotate, args.samples_per_prompt, args.temperature,
                                              args.max_new_tokens, rt, args.seed, args.label_noise,
                                              round_=max(earlier, default=0) + 1)
            del policies
            atomic_write(feedback_path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in records).encode()))
            stats["seconds"] = time.perf_counter() - t0
            log(f"feedback on the answers of {' and '.join(args.collect_from)}: {stats['prompts']:,} prompts x "
                f"{args.samples_per_prompt} samples each at temperature {args.temperature} -> {stats['distinct']:,} "
                f"distinct answers (grades {stats['grades']}, mean {stats['mean_grade']:.3f}; {stats['ended']:.1%} "
                f"ended) -> {stats['comparisons']:,} comparisons from {stats['prompts_with_comparisons']:,} prompts "
                f"(the rest all tied), label noise {args.label_noise:g}; {stats['seconds']:.1f} s; wrote {feedback_path}")
            append_jsonl(log_path, {"step": 0, **{f"feedback/{k}": v for k, v in stats.items()}})
        if rt.ddp:
            dist.barrier()
        files.append(feedback_path)

    # ---- data: comparisons -> token ids, grouped by prompt; a held-out split of prompts --------------
    rows, n_cut, n_dropped, read = [], 0, 0, 0
    for f, path in enumerate(files):
        try:
            pairs, counts = data.read_preference_pairs(path)
        except data.DataError as e:
            sys.exit(f"error: {e}")
        read += counts["read"]
        for i, pair in enumerate(pairs):
            ids = data.render_pair(enc, pair)
            fitted = data.fit_pair(*ids, model.config.block_size)
            n_cut += fitted is not None and len(fitted[0]) < len(ids[0])
            n_dropped += fitted is None
            if fitted is not None:
                rows.append((*fitted, pair.get("kind", "all"), (f, pair.get("group", ("pair", i)))))
    groups = data.group_comparisons(rows)
    log(f"{read:,} comparisons from {', '.join(files)}: {len(rows):,} used in {len(groups):,} prompts, {n_cut:,} "
        f"prompts cut, {n_dropped:,} dropped (a response over {model.config.block_size} tokens)")
    if len(groups) < 2:
        sys.exit(f"error: {', '.join(files)}: fewer than 2 prompts with a comparison")
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(args.seed)).tolist()
    n_val = max(1, int(len(groups) * args.val_fraction))
    val_groups, train_groups = [groups[i] for i in order[:n_val]], [groups[i] for i in order[n_val:]]
    train = data.ExampleSampler(train_groups, args.batch_size, args.seed)
    pad = enc.eot_token

    # ---- the reward model: a score head on the SFT body, LoRA if asked ------------------------------
    def add_head(m):
        if m.score_head is None:
            m.add_score_head()

    try:  # a score head, then LoRA (the head trains whole) or full (lora.prepare_to_train); errors in one line
        fingerprint = prepare_to_train(model, args, resume, add=add_head, modules_to_save=("score_head",))
    except ValueError as e:
        sys.exit(f"error: {e}")
    config = model.config
    model.to(rt.device)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"model_config: {json.dumps(asdict(config))}\nargs: {json.dumps(vars(args))}")
    log(f"reward model from {args.init_from}: {n_trainable:,} trainable parameters"
        f"{' (LoRA r=%d + score head)' % args.lora_r if args.lora_r else ''} on {rt.device} ({rt.why})")

    def comparison_scores(batch, scores_of=model.scores):
        """(r_w, r_l, group, kinds) of every comparison of a batch of prompts: each distinct answer is
        one row of one forward pass, and a comparison reads its two answers' scores."""
        rows = [(g["prompt"], a) for g in batch for a in g["answers"]]
        scores = data.score_sequences(scores_of, rows, pad, rt.device).float()  # (N,) one per answer
        winners, losers, group, kinds, first = [], [], [], [], 0
        for i, g in enumerate(batch):
            for w, l, kind in g["comparisons"]:
                winners.append(first + w)
                losers.append(first + l)
                group.append(i)
                kinds.append(kind)
            first += len(g["answers"])
        return scores[winners], scores[losers], torch.tensor(group, device=rt.device), kinds  # (M,) each

    # ---- optimizer ---------------------------------------------------------------------------------
    optimizer = configure_optimizer(model, lr, args.weight_decay, device_type=rt.device.type)
    step = 0
    if resume:
        step = restore_training_state(resume, optimizer, rt.scaler, train)
        log(f"resuming from {ckpt_path} at step {step}")

    def checkpoint(offset=0.0, scale=1.0):
        if not rt.master:  # the ranks hold the same weights; rank 0 writes them
            return
        save_stage(args.out, model, args.init_from if args.lora_r else None, fingerprint, model_config=asdict(config),
                   tokenizer=tokenizer, args=vars(args), step=step, stage="reward", chat=True, reward_offset=offset,
                   reward_scale=scale,
                   **training_state(optimizer, rt.scaler, train, rt.device))

    @torch.no_grad()
    def evaluate():
        """Held-out prompts' comparison accuracy, mean margin r_w − r_l, and the chosen and rejected scores; per kind."""
        model.eval()
        chosen, rejected, kinds = [], [], []
        for i in range(0, len(val_groups), args.batch_size):
            with rt.autocast():
                c, r, _, k = comparison_scores(val_groups[i:i + args.batch_size])
            chosen.append(c.float())
            rejected.append(r.float())
            kinds += k
        model.train()
        chosen, rejected = torch.cat(chosen), torch.cat(rejected)
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
    # torchrun: DDP averages the ranks' gradients; it hooks forward, and the loss runs through model.scores.
    # find_unused: scores never reach lm_head (an untied one would wait for a gradient forever)
    scores_of = data_parallel(model, rt, "scores", find_unused=True)

    # ---- training loop: evaluate -> checkpoint -> step -> log --------------------------------------
    metrics, stopped_early = {}, False
    model.train()
    t_last = time.perf_counter()
    with GracefulStop(log) as stop, tqdm(total=args.max_steps, initial=step, desc="reward", dynamic_ncols=True,
                                         disable=not rt.master) as bar:
        while True:
            last = step >= args.max_steps  # >=: a --resume past --max-steps ends too
            if (step % args.eval_every == 0 or last) and rt.master:  # the others wait at the next all-reduce
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

            # every rank draws the step's prompts (one sampler, one seed) and trains on its share; its loss
            # takes the means over the whole batch (totals), so the ranks' losses sum to it (x world: DDP averages)
            batch = train.next()
            n = sum(len(g["comparisons"]) for g in batch)
            with rt.autocast():
                chosen, rejected, group, _ = comparison_scores(batch[rt.rank::rt.world_size], scores_of)
                loss = bradley_terry_loss(chosen, rejected, args.margin, args.center_coef, group, (len(batch), n))
            rt.scaler.scale(loss * rt.world_size).backward()
            grad_norm = optimizer_step(optimizer, rt.scaler, get_lr(step, lr, args.warmup_steps, args.max_steps),
                                       args.grad_clip)
            sums = torch.stack([loss.detach().float(), (chosen > rejected).float().sum()])  # all ranks' share
            if rt.ddp:
                dist.all_reduce(sums)
            train_loss, train_acc = sums[0].item(), sums[1].item() / n
            check_finite(train_loss, step, ckpt_path)
            step += 1

            t_now = time.perf_counter()
            dt, t_last = t_now - t_last, t_now
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.3f}", acc=f"{train_acc:.0%}", pairs_s=f"{n / dt:,.1f}")
            if (step % args.log_every == 0 or step == 1) and rt.master:
                log(f"step {step}/{args.max_steps} | loss {train_loss:.4f} | accuracy {train_acc:.1%} | grad norm "
                    f"{grad_norm:.2f} | {dt * 1000:.0f} ms | {n / dt:,.1f} comparisons/s")
                append_jsonl(log_path, {"step": step, "train/loss": train_loss, "train/accuracy": train_acc,
                                        "grad_norm": grad_norm, "dt_ms": dt * 1000, "pairs_per_s": n / dt})
            if rt.anyone(stop.requested or step == args.stop_at):  # under torchrun all ranks stop together
                checkpoint()
                stopped_early = True
                break

    if rt.ddp:
        dist.destroy_process_group()
    if not rt.master:
        return {"step": step, **metrics}
    if stopped_early:
        log(f"stopped at step {step}; checkpoint saved to {ckpt_path}; continue with the same command plus --resume")
        return {"step": step, **metrics}

    # ---- normalisation: the SFT model's own sampled answers score mean 0, std 1 (Ziegler et al. 2019) ----
    offset, scale = 0.0, 1.0
    if args.offset_prompts > 0:
        policy, _ = load_model(args.init_from)
        policy.to(rt.device).eval()
        prompts = [g["prompt"] for g in train_groups[:args.offset_prompts] for _ in range(4)]  # 4 samples each
        generator = torch.Generator(device=rt.device).manual_seed(args.seed + 2)
        replies = data.generate_replies(policy, enc, prompts, data.end_of_turn(enc), rt.device, rt.autocast,
                                        64, args.max_new_tokens, args.temperature, generator)
        model.eval()
        scores = data.score_answers(model, prompts, [text.strip() for text, _ in replies], enc, rt)
        offset, scale = scores.mean().item(), max(scores.std().item(), 1e-3)
        with torch.no_grad():  # r' = (r − μ)/σ: the head's w/σ and (b − μ)/σ; every comparison keeps its sign
            model.score_head.bias.sub_(offset).div_(scale)
            model.score_head.weight.div_(scale)
        log(f"reward normalisation: the SFT model's {len(prompts)} sampled answers to {len(prompts) // 4} training prompts "
            f"scored {offset:+.3f} ± {scale:.3f}; the head is rescaled so that they score 0 ± 1")
    checkpoint(offset, scale)
    log(f"done: step {step}, held-out accuracy {metrics['rm/accuracy']:.1%}\ncheckpoint: {ckpt_path}\n"
        f"best-of-n with it: python sample.py --judge {args.out} --init-from {args.init_from} --best-of-n 16\n"
        f"judge two models with it: python sample.py --judge {args.out} --init-from MODEL_A --compare MODEL_B")
    return {"step": step, "reward_offset": offset, "reward_scale": scale, **metrics}


if __name__ == "__main__":
    main()
