"""
Direct Preference Optimization: align the SFT model on preference pairs, with no reward model.

The guide's simpler alternative to RLHF. The same preference pairs (x, y_w preferred, y_l rejected), but
no reward model and no reinforcement learning: Rafailov et al. (2023) show that the policy that maximises
a reward under a KL penalty to a reference π_ref satisfies r(x, y) = β·log π(y|x)/π_ref(y|x) + const, so
the Bradley-Terry loss of the reward model can be written on the policy itself (DPO, Eq. 7):

    L = −log σ(β·[(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))])

The policy learns to raise the chosen answer's probability relative to the reference more than the
rejected one's; β sets how far it may move from π_ref. π_ref is the SFT model, frozen: its log-
probabilities are computed once before training and cached (no second model held), or, with LoRA and
--ref lora, on the fly as the same model with its adapters disabled (lora.lora_disabled).

What trains by default is RPO (Pang et al. 2024): the DPO loss plus --sft-coef 1 times the chosen
answers' negative log-likelihood per token. Pure DPO (--sft-coef 0, the guide's DPO) did not reach the
world's targets, on the hand-written pairs (abstention 67.5%) nor on the policy's own ranked answers
(out/reward/feedback.jsonl: over-refusal 42.5%); the README's DPO section has the table.

Departures from the paper: the added NLL term above; sequence log-probabilities are sums over response
tokens (as the reference code does; rasbt's notebook averages instead, which removes the length effect);
--loss ipo and --label-smoothing give IPO (Azar et al. 2023) and conservative DPO (Mitchell 2023). IPO
sums too, as its Eq. 17 is written (log π(y|x) of the whole answer); its authors later advised averaging
per token, which TRL's IPO does (TRL PR #1265; Hugging Face's "pref-tuning" blog post, January 2024).
With sums the target gap 1/(2β) is one for the whole answer, so a β tuned on short answers asks less per
token of long ones; to average, divide the four log-probs by their answers' lengths in pair_metrics.

Reads:  --init-from the SFT checkpoint (default out/sft); --data preference pairs (default the world's).
Writes: OUT/ckpt.pt (a chat model, as sft.py writes), OUT/adapter.pt (LoRA), OUT/log.jsonl, OUT/eval.json.

  python dpo.py                                      # out/sft -> out/dpo on the world's pairs
  python dpo.py --lora-r 8 --ref lora                # LoRA; the reference is the model with adapters off
  python dpo.py --data out/reward/feedback.jsonl --world data/world   # on the policy's own ranked answers
  python dpo.py --loss ipo --beta 0.5
  python dpo.py --max-steps 10 --eval-every 5 --device cpu   # seconds
"""

import argparse
import json
import os
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
from lora import DEFAULT_TARGETS, lora_disabled, prepare_to_train
from model import IGNORE_INDEX, GracefulStop, append_jsonl, check_finite, claim_out_dir, configure_optimizer, \
    data_parallel, get_lr, in_range, load_model, load_resume, optimizer_step, positive_int, \
    restore_training_state, resume_args, save_stage, set_rng_state, setup_runtime, training_state


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1,
             loss_type="sigmoid", label_smoothing=0.0):
    """Per-pair DPO losses and implicit rewards.

    h = (log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))   the two log-ratios' difference
    sigmoid: L = −(1 − ε)·log σ(β·h) − ε·log σ(−β·h)     (DPO, Eq. 7; ε > 0 is conservative DPO: a pair is
             taken to be mislabelled with probability ε, so the flipped pair's loss is mixed in)
    ipo:     L = (h − 1/(2β))²                            (Azar et al. 2023, Eq. 17: a target gap, not "more")
    rewards: r = β·(log π(y|x) − log π_ref(y|x)), detached: what DPO's policy implies as a reward model.

    Shape: every argument (B,), sequence log-probabilities (sums over response tokens). Returns
    (losses, chosen_rewards, rejected_rewards), each (B,). log σ is F.logsigmoid: finite for any h.
    """
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = ref_chosen_logps - ref_rejected_logps
    h = pi_logratios - ref_logratios                                     # (B,)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type {loss_type!r}: choose sigmoid or ipo")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def sequence_logps(logprobs_of, rows, pad_id, device):
    """Σ_t log π(y_t | x, y_<t) over the response tokens of each (prompt_ids, response_ids) row, (N,).

    Rows are right-padded; the target at position t is the token at t + 1 where that token belongs to
    the response, IGNORE_INDEX elsewhere (prompt and padding add nothing). logprobs_of: the policy's
    model.logprobs_of (lm_head on the response positions only), or its data-parallel wrapper.
    """
    ids, _, response_mask = data.pad_responses(rows, pad_id)                 # (N, T) each
    targets = ids[:, 1:].masked_fill(~response_mask[:, 1:], IGNORE_INDEX)    # (N, T-1)
    return logprobs_of(ids[:, :-1].to(device), targets.to(device)).sum(-1)  # (N, T-1) -> (N,)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # I/O
    p.add_argument("--init-from", default="out/sft", help="the SFT checkpoint: the policy's start and the reference π_ref")
    p.add_argument("--data", default=os.path.join(data.DATA_DIR, "world", "prefs.jsonl"),
                   help="preference pairs .jsonl: prompt/chosen/rejected, HH-RLHF transcripts, or OpenAI's format")
    p.add_argument("--world", default="", help="the world whose evaluation runs at the end ('' = the one --data belongs to, if any)")
    p.add_argument("--out", default="out/dpo", help="output directory")
    p.add_argument("--resume", action="store_true", help="continue the run saved in OUT/ckpt.pt")
    p.add_argument("--val-fraction", type=in_range(float, 0, 1, open_high=True), default=0.1, help="share of pairs held out for the metrics")
    # DPO
    p.add_argument("--loss", default="sigmoid", choices=["sigmoid", "ipo"], help="DPO's −log σ(βh), or IPO's (h − 1/2β)²")
    p.add_argument("--beta", type=in_range(float, 0, open_low=True), default=0.1, help="β: how far the policy may move from π_ref (0.1-0.5 typical)")
    p.add_argument("--label-smoothing", type=in_range(float, 0, 0.5, open_high=True), default=0.0, help="ε of conservative DPO: assumed share of flipped labels (0 = off)")
    p.add_argument("--sft-coef", type=in_range(float, 0), default=1.0,
                   help="α of an added NLL term on the chosen answers, α·(−log π(y_w|x))/|y_w| (RPO, Pang et al. 2024; 0 = pure DPO)")
    p.add_argument("--ref", default="cached", choices=["cached", "lora"],
                   help="π_ref's log-probs: cached once before training, or on the fly with LoRA adapters disabled")
    # LoRA (--lora-r 0 = full fine-tuning)
    p.add_argument("--lora-r", type=in_range(int, 0), default=0, help="LoRA rank r (0 = full fine-tuning)")
    p.add_argument("--lora-alpha", type=in_range(float, 0, open_low=True), default=16.0, help="LoRA α: the update is scaled by α/r")
    p.add_argument("--lora-dropout", type=in_range(float, 0, 1, open_high=True), default=0.0, help="dropout on the LoRA path's input")
    p.add_argument("--lora-targets", nargs="+", default=list(DEFAULT_TARGETS), help="module name suffixes to adapt")
    # optimization
    p.add_argument("--max-steps", type=positive_int, default=150, help="optimizer steps")
    p.add_argument("--batch-size", type=positive_int, default=16, help="pairs per step (2x sequences per forward pass)")
    p.add_argument("--lr", type=in_range(float, 0), default=0.0, help="peak learning rate (0 = 2e-5 full, 5e-4 LoRA)")
    p.add_argument("--warmup-steps", type=in_range(int, 0), default=10, help="linear warmup steps")
    p.add_argument("--weight-decay", type=in_range(float, 0), default=0.0, help="AdamW weight decay on matrices")
    p.add_argument("--grad-clip", type=in_range(float, 0), default=1.0, help="clip the global gradient norm (0 = off)")
    # evaluation and logging
    p.add_argument("--eval-every", type=positive_int, default=50, help="steps between held-out metrics and checkpoints")
    p.add_argument("--log-every", type=positive_int, default=10, help="steps between log lines")
    p.add_argument("--stop-at", type=in_range(int, -1), default=-1, help="save and exit after this step (-1 = off)")
    # system
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="auto: see model.setup_runtime")
    p.add_argument("--seed", type=int, default=1337, help="seed for the split and shuffling")
    args = p.parse_args(argv)
    if args.ref == "lora" and not args.lora_r:
        p.error("--ref lora needs --lora-r: the reference is the model with its adapters disabled")
    return args


def main(argv=None):
    args = get_args(argv)
    lr = args.lr or (5e-4 if args.lora_r else 2e-5)

    # ---- setup -----------------------------------------------------------------------------------
    claim_out_dir(args.out)  # OUT/.lock: a second run on the same --out is refused
    rt = setup_runtime(args.device, args.dtype, args.seed)  # under torchrun: one process per GPU, data-parallel
    log = tqdm.write if rt.master else (lambda *a, **k: None)
    if args.batch_size < rt.world_size:
        sys.exit(f"error: --batch-size {args.batch_size}: each of the {rt.world_size} processes needs a pair a step")
    ckpt_path, log_path = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "log.jsonl")
    resume = load_resume(args.out, args.resume)  # its checkpoint, or None
    if resume:  # the model, the pairs and the loss must be the ones that were trained, whatever the command line says
        resume_args(args, resume["args"], ["init_from", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "ref",
                                           "data", "val_fraction", "loss", "beta", "label_smoothing", "sft_coef",
                                           "seed"], log, warn=("max_steps", "batch_size", "lr"))

    # ---- model: the SFT model, the reference π_ref and the policy's start ------------------------
    try:
        model, src = load_model(args.init_from)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: --init-from: {e}")
    tokenizer = data.checkpoint_tokenizer(src)
    enc = data.get_encoding(tokenizer)
    config = model.config
    model.to(rt.device)
    # a base or reward model is refused, with what to do instead
    if why := data.start_error(src, enc, args.init_from, want_chat=True):
        sys.exit(f"error: --init-from: {why}")

    # ---- data: pairs -> token ids; a held-out split ------------------------------------------------
    try:
        pairs, counts = data.read_preference_pairs(args.data)
    except data.DataError as e:
        sys.exit(f"error: {e}")
    rows, n_dropped = [], 0
    for pair in pairs:
        fitted = data.fit_pair(*data.render_pair(enc, pair), config.block_size + 1)  # + 1: the last token is only a target
        if fitted is None:
            n_dropped += 1
            continue
        prompt, chosen, rejected = fitted
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "kind": pair.get("kind", "all")})
    log(f"{counts['read']:,} pairs from {args.data}: {len(rows):,} used, {counts['identical'] + counts['empty']:,} "
        f"identical or empty skipped, {n_dropped:,} dropped (a response over the context)")
    if len(rows) < 2:
        sys.exit(f"error: {args.data}: fewer than 2 usable pairs")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed)).tolist()
    n_val = max(1, int(len(rows) * args.val_fraction))
    val_rows, train_rows = [rows[i] for i in order[:n_val]], [rows[i] for i in order[n_val:]]
    train = data.ExampleSampler(train_rows, args.batch_size, args.seed)  # fingerprints the pairs (π_ref comes later)
    pad = enc.eot_token

    def policy_logps(batch, logprobs_of=model.logprobs_of):
        """(chosen, rejected) sequence log-probs, each (B,): both halves in one forward pass."""
        both = [(r["prompt"], r["chosen"]) for r in batch] + [(r["prompt"], r["rejected"]) for r in batch]
        logps = sequence_logps(logprobs_of, both, pad, rt.device)            # (2B,)
        return logps[:len(batch)], logps[len(batch):]

    @torch.no_grad()
    def reference_logps(batch):
        """π_ref's (chosen, rejected): the cached numbers, or the model with its adapters disabled."""
        if args.ref == "cached":
            return (torch.tensor([r["ref_chosen"] for r in batch], device=rt.device),
                    torch.tensor([r["ref_rejected"] for r in batch], device=rt.device))
        was_training = model.training
        model.eval()
        with lora_disabled(model), rt.autocast():
            out = policy_logps(batch)
        model.train(was_training)
        return out[0].float(), out[1].float()

    if args.ref == "cached":  # π_ref = the model as loaded, run once over every pair (eval mode: no dropout)
        model.eval()
        with torch.no_grad():
            for i in tqdm(range(0, len(rows), args.batch_size), desc="reference log-probs", leave=False):
                batch = rows[i:i + args.batch_size]
                with rt.autocast():
                    chosen, rejected = policy_logps(batch)
                for r, c, j in zip(batch, chosen.float().tolist(), rejected.float().tolist()):
                    r["ref_chosen"], r["ref_rejected"] = c, j

    # ---- the policy: LoRA on the reference, or all of it trains; the state of a run we resume ---
    try:  # LoRA on the reference, or all of it trains (lora.prepare_to_train); errors in one line
        fingerprint = prepare_to_train(model, args, resume)
    except ValueError as e:
        sys.exit(f"error: {e}")
    model.to(rt.device)
    log(f"model_config: {json.dumps(asdict(config))}\nargs: {json.dumps(vars(args))}")
    trained = (f"RPO: DPO ({args.loss}, β={args.beta}) + {args.sft_coef:g} x the chosen answers' NLL per token"
               if args.sft_coef > 0 else f"pure DPO ({args.loss}, β={args.beta})")
    log(f"{trained} on {args.data} from {args.init_from}: "
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters on {rt.device} ({rt.why})")

    def pair_metrics(batch, logprobs_of=model.logprobs_of):
        """Per-pair losses (for backward) and DPO's implicit-reward statistics (per pair, detached)."""
        chosen, rejected = policy_logps(batch, logprobs_of)
        ref_chosen, ref_rejected = reference_logps(batch)
        losses, chosen_rewards, rejected_rewards = dpo_loss(chosen.float(), rejected.float(), ref_chosen, ref_rejected,
                                                            args.beta, args.loss, args.label_smoothing)
        if args.sft_coef > 0:  # keep the chosen answers likely, token by token, not only likelier than the rejected
            n_tokens = torch.tensor([len(r["chosen"]) for r in batch], device=rt.device)
            losses = losses + args.sft_coef * (-chosen.float() / n_tokens)
        return losses, {"loss": losses.detach(), "accuracy": (chosen_rewards > rejected_rewards).float(),
                        "margin": (chosen_rewards - rejected_rewards), "chosen_reward": chosen_rewards,
                        "rejected_reward": rejected_rewards, "chosen_logp": chosen.detach().float(),
                        "rejected_logp": rejected.detach().float()}

    @torch.no_grad()
    def evaluate():
        """The held-out pairs' loss, reward accuracy (overall and per kind), margin, rewards and log-probs."""
        model.eval()
        parts = []
        for i in range(0, len(val_rows), args.batch_size):
            with rt.autocast():
                parts.append(pair_metrics(val_rows[i:i + args.batch_size])[1])
        model.train()
        joined = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        result = {f"val/{k}": v.mean().item() for k, v in joined.items()}
        kinds = [r["kind"] for r in val_rows]
        for kind in sorted(set(kinds)):
            result[f"val/accuracy_{kind}"] = joined["accuracy"][torch.tensor([k == kind for k in kinds])].mean().item()
        return result

    # ---- optimizer ---------------------------------------------------------------------------------
    optimizer = configure_optimizer(model, lr, args.weight_decay, device_type=rt.device.type)
    step = 0
    if resume:
        step = restore_training_state(resume, optimizer, rt.scaler, train)
        log(f"resuming from {ckpt_path} at step {step}")

    def checkpoint():
        if not rt.master:  # the ranks hold the same weights; rank 0 writes them
            return
        save_stage(args.out, model, args.init_from if args.lora_r else None, fingerprint, model_config=asdict(config),
                   tokenizer=tokenizer, args=vars(args), step=step, stage="dpo", chat=True,
                   **training_state(optimizer, rt.scaler, train, rt.device))

    if resume:
        set_rng_state(resume["rng"], rt.device)
    # torchrun: DDP averages the ranks' gradients. It hooks a module's forward, and the loss runs through
    # model.logprobs_of: data_parallel wraps that method as a forward (no torchrun: the method itself)
    logprobs_of = data_parallel(model, rt, "logprobs_of")

    # ---- training loop: evaluate -> checkpoint -> step -> log --------------------------------------
    metrics, stopped_early, first_val = {}, False, None
    model.train()
    t_last = time.perf_counter()
    with GracefulStop(log) as stop, tqdm(total=args.max_steps, initial=step, desc="dpo", dynamic_ncols=True,
                                         disable=not rt.master) as bar:
        while True:
            last = step >= args.max_steps  # >=: a --resume past --max-steps ends too
            if (step % args.eval_every == 0 or last) and rt.master:  # the others wait at the next all-reduce
                metrics.update(evaluate())
                first_val = metrics["val/chosen_logp"] if first_val is None else first_val
                log(f"step {step}/{args.max_steps} | val loss {metrics['val/loss']:.4f} | reward accuracy "
                    f"{metrics['val/accuracy']:.1%} | margin {metrics['val/margin']:.3f} | chosen log-prob "
                    f"{metrics['val/chosen_logp']:.2f} | rejected {metrics['val/rejected_logp']:.2f} | "
                    + ", ".join(f"{k.removeprefix('val/accuracy_')} {v:.0%}" for k, v in metrics.items()
                                if k.startswith("val/accuracy_")))
                append_jsonl(log_path, {"step": step, **{k: v for k, v in metrics.items() if k.startswith("val/")}})
                if step > 0:
                    checkpoint()
                t_last = time.perf_counter()
            if last:
                break

            # every rank draws the step's pairs (one sampler, one seed) and trains on its share: the loss is
            # the mean over all of them, so this rank's part is its sum / the batch (x world: DDP averages)
            batch = train.next()
            with rt.autocast():
                losses, stats = pair_metrics(batch[rt.rank::rt.world_size], logprobs_of)
            rt.scaler.scale(losses.sum() / len(batch) * rt.world_size).backward()
            grad_norm = optimizer_step(optimizer, rt.scaler, get_lr(step, lr, args.warmup_steps, args.max_steps),
                                       args.grad_clip)
            sums = torch.stack([v.float().sum() for v in stats.values()])  # the step's statistics, all ranks
            if rt.ddp:
                dist.all_reduce(sums)
            record = {f"train/{k}": v / len(batch) for k, v in zip(stats, sums.tolist())}
            check_finite(record["train/loss"], step, ckpt_path)
            step += 1

            t_now = time.perf_counter()
            dt, t_last = t_now - t_last, t_now
            bar.update(1)
            bar.set_postfix(loss=f"{record['train/loss']:.3f}", acc=f"{record['train/accuracy']:.0%}",
                            pairs_s=f"{len(batch) / dt:,.1f}")
            if (step % args.log_every == 0 or step == 1) and rt.master:
                log(f"step {step}/{args.max_steps} | loss {record['train/loss']:.4f} | reward accuracy "
                    f"{record['train/accuracy']:.1%} | margin {record['train/margin']:.3f} | grad norm {grad_norm:.2f}"
                    f" | {dt * 1000:.0f} ms | {len(batch) / dt:,.1f} pairs/s")
                append_jsonl(log_path, {"step": step, **record, "grad_norm": grad_norm, "dt_ms": dt * 1000,
                                        "pairs_per_s": len(batch) / dt})
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
    # the chosen answers' log-probability should not collapse while the margin grows (a known DPO failure)
    metrics["dpo/chosen_logp_drift"] = metrics["val/chosen_logp"] - first_val
    log(f"done: step {step}, held-out reward accuracy {metrics['val/accuracy']:.1%}; chosen log-prob "
        f"{first_val:.2f} -> {metrics['val/chosen_logp']:.2f}")

    # ---- the world's held-out evaluation (data.evaluate_world), when trained on the world -------
    scores = data.world_report(model, enc, args.world or args.data, True, rt.device, rt.autocast, args.out)
    if scores:
        log(f"world: {data.format_world_metrics(scores)}")
        metrics["world"] = scores
    log(f"checkpoint: {ckpt_path}\nagainst SFT: python sample.py --judge out/reward --init-from {args.out} "
        f"--compare {args.init_from}")
    return {"step": step, **metrics}


if __name__ == "__main__":
    main()
