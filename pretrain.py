"""
Pretraining: next-token prediction with the causal-LM cross-entropy loss.

The guide's pretraining stage. A decoder reads a window of tokens x_1..x_T and at every position t
predicts x_{t+1}; the loss is the mean over positions of −log p(x_{t+1} | x_1..x_t), and AdamW
adjusts the parameters to make it smaller (Radford et al. 2019, Eq. 1: maximise Σ log p(x_t | x_<t)).
The loss itself is model.cross_entropy, called from GPT.forward.

Reads:  --data: a directory written by `python prepare.py prepare` (cleaned, deduplicated, tokenized
        shards, maybe with its own trained tokenizer), or raw .txt / .jsonl / a directory of them, with
        the tokenizer.json beside them if there is one (default: the tiny world's pretraining text,
        data/world/pretrain.jsonl: facts about 159 countries in many phrasings, and stories, with its
        own 4,096-id tokenizer); --init-from a checkpoint or Hugging Face GPT-2 directory to continue from.
Writes: OUT/ckpt.pt (model, config, tokenizer, optimizer, step, RNG and data state),
        OUT/log.jsonl (one JSON line per log step and evaluation), OUT/tokens/ (token cache),
        OUT/eval.json (on the world: how many capitals the model completes, data.evaluate_world).

Departures from GPT-2's recipe: a much smaller model and context by default so that CPU training
takes minutes; no dropout and no weight decay (decay fights the memorising of facts that the world
asks for); cosine learning-rate decay to lr/10 (GPT-3's schedule, not GPT-2's).

  python pretrain.py                                   # default: the tiny world, ~6 min on 2 CPU cores
  python pretrain.py --data data/tinyshakespeare.txt   # Tiny Shakespeare, GPT-2's tokenizer
  python pretrain.py --max-steps 20 --n-layer 2 --n-embd 64 --block-size 64 --eval-every 10  # seconds
  torchrun --nproc_per_node=8 pretrain.py --n-layer 12 --n-head 12 --n-embd 768 --block-size 1024 --dtype bfloat16
"""

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from model import FAMILIES, GPT, GPTConfig, GracefulStop, append_jsonl, check_finite, claim_out_dir, \
    configure_optimizer, get_lr, in_range, load_checkpoint, load_model, peak_flops, positive_int, \
    restore_training_state, resume_args, save_checkpoint, set_rng_state, setup_runtime, training_state


def text_loss(loss, targets, byte_lengths):
    """(Σ loss over the targets that are text, Σ their bytes): bits per byte = the first / ln 2 / the second.
    A token of no bytes (<|endoftext|>) is left out of both, as nanochat does: its loss is not text's."""
    text = byte_lengths[targets] > 0
    return loss[text].sum().item(), byte_lengths[targets].sum().item()


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # I/O
    p.add_argument("--data", default=os.path.join(data.DATA_DIR, "world", "pretrain.jsonl"),
                   help="a `prepare.py prepare` output directory, or a .txt file, .jsonl file (field 'text') or a directory of them")
    p.add_argument("--out", default="out/pretrain", help="output directory for ckpt.pt, log.jsonl and the token cache")
    p.add_argument("--init-from", default="", help="checkpoint or Hugging Face GPT-2 directory to start from ('' = random init)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in OUT/ckpt.pt exactly where it stopped")
    p.add_argument("--val-fraction", type=in_range(float, 0, 1, open_high=True), default=0.1, help="share of the token stream held out for validation (raw text only)")
    # model (ignored with --init-from or --resume: the checkpoint's config is used)
    p.add_argument("--family", default="modern", choices=list(FAMILIES), help="gpt2: learned positions, LayerNorm, GELU; modern: RoPE, RMSNorm, SwiGLU")
    p.add_argument("--n-layer", type=positive_int, default=4, help="Transformer blocks")
    p.add_argument("--n-head", type=positive_int, default=4, help="attention heads (H)")
    p.add_argument("--n-kv-head", type=in_range(int, 0), default=0, help="key/value heads for grouped-query attention (0 = n_head)")
    p.add_argument("--n-embd", type=positive_int, default=256, help="width C; head size D = C / H")
    p.add_argument("--block-size", type=in_range(int, 0), default=0,
                   help="context length T in tokens (0 = 128 for a new model; with --init-from, the model's context "
                        "up to 2,048: a Llama 3 allows 131,072); with --init-from, the training window")
    p.add_argument("--dropout", type=in_range(float, 0, 1, open_high=True), default=0.0, help="dropout probability (0 = off)")
    # optimization
    p.add_argument("--max-steps", type=positive_int, default=800, help="optimizer steps; the learning-rate schedule ends here")
    p.add_argument("--batch-size", type=positive_int, default=16, help="sequences per micro-batch, per process")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches summed into one optimizer step")
    p.add_argument("--lr", type=in_range(float, 0, open_low=True), default=2e-3, help="peak learning rate (small models tolerate 1e-3..3e-3; GPT-2 124M: 6e-4)")
    p.add_argument("--warmup-steps", type=in_range(int, 0), default=50, help="linear warmup steps")
    p.add_argument("--weight-decay", type=in_range(float, 0), default=0.0,
                   help="AdamW decoupled weight decay on matrices (GPT-2/3 used 0.1; on the world it kept the "
                        "capitals from being memorised)")
    p.add_argument("--grad-clip", type=in_range(float, 0), default=1.0, help="clip the global gradient norm to this (0 = off)")
    # evaluation and logging
    p.add_argument("--eval-every", type=positive_int, default=200, help="steps between validation runs and checkpoints")
    p.add_argument("--eval-batches", type=positive_int, default=10, help="validation batches per evaluation")
    p.add_argument("--log-every", type=positive_int, default=25, help="steps between log lines")
    p.add_argument("--sample-prompt", default="The capital of France is", help="prompt for the sample printed at each evaluation")
    p.add_argument("--stop-at", type=in_range(int, -1), default=-1, help="save and exit after this step, as if interrupted (-1 = off)")
    # system
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bf16 on recent GPUs, fp16 on older CUDA GPUs, bf16 on CPUs with native bf16 (AVX512-BF16/AMX), fp32 on other CPUs and MPS")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA/CPU; slower start, faster steps)")
    p.add_argument("--seed", type=int, default=1337, help="seed for initialisation and batch sampling")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)

    # ---- setup: device, precision, DDP, output directory --------------------------------------
    rt = setup_runtime(args.device, args.dtype, args.seed)
    log = tqdm.write if rt.master else (lambda *a, **k: None)
    ckpt_path, log_path = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "log.jsonl")
    data_dir, out_dir = os.path.realpath(args.data), os.path.realpath(args.out)
    if os.path.isdir(data_dir) and os.path.commonpath([data_dir, out_dir]) == data_dir:
        sys.exit(f"error: --out {args.out} is inside --data {args.data}: its log and cache would be read as data")
    claim_out_dir(args.out)  # OUT/.lock: a second run on the same --out is refused
    if args.resume and not os.path.exists(ckpt_path):
        sys.exit(f"error: --resume: no checkpoint at {ckpt_path}")

    # ---- model: fresh, from --init-from, or from the checkpoint we resume ---------------------
    ckpt = None
    if args.resume:  # the model is the checkpoint's, whatever the shape flags say now
        ckpt = load_checkpoint(ckpt_path)
        resume_args(args, ckpt["args"], ["family", "n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "dropout"],
                    log, warn=("max_steps", "batch_size", "grad_accum", "lr"))
        model = GPT(GPTConfig.from_dict(ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        tokenizer = ckpt["tokenizer"]
    elif args.init_from:
        try:
            model, src = load_model(args.init_from)
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: --init-from: {e}")
        tokenizer = data.checkpoint_tokenizer(src)
    else:
        tokenizer = data.dataset_tokenizer(args.data)  # a prepared dataset's own tokenizer, else GPT-2's
        try:
            config = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_kv_head=args.n_kv_head, n_embd=args.n_embd,
                               block_size=args.block_size or 128, dropout=args.dropout,
                               vocab_size=data.model_vocab_size(tokenizer), **FAMILIES[args.family])
        except ValueError as e:  # a shape that does not fit together (heads that do not divide the width)
            sys.exit(f"error: {e}")
        model = GPT(config)
    config = model.config
    T = args.block_size or min(config.block_size, 2048)  # the training window: the model's context, or less
    if T > config.block_size:
        sys.exit(f"error: --block-size {T} is longer than the model's context of {config.block_size} positions")
    model.to(rt.device)
    if rt.ddp:  # each rank its own dropout masks (DDP copies rank 0's weights to all, so init may differ)
        torch.manual_seed(args.seed + rt.rank)
    log(f"model_config: {json.dumps(asdict(config))}")
    log(f"args: {json.dumps(vars(args))}")
    log(f"{model.num_params() / 1e6:.2f}M parameters on {rt.device} in {str(rt.dtype).removeprefix('torch.')}"
        f" ({rt.why})" + (f", {rt.world_size} processes" if rt.ddp else ""))

    # ---- data: a prepared directory's shards, or raw text tokenized once (rank 0) into a cache --
    enc = data.get_encoding(tokenizer)
    if why := data.world_context_error(enc, args.data, False, config.block_size):
        sys.exit(f"error: --block-size {config.block_size}: {why}")
    cache_dir = os.path.join(args.out, "tokens")
    try:
        if data.is_prepared(args.data):  # written by `python prepare.py prepare`; its tokenizer must be the model's
            train_tokens, val_tokens = data.load_prepared(args.data, tokenizer)
        else:
            if rt.master:
                data.prepare_tokens(args.data, enc, cache_dir, args.val_fraction)
            if rt.ddp:
                dist.barrier()
            train_tokens, val_tokens = data.prepare_tokens(args.data, enc, cache_dir, args.val_fraction)
        train = data.BatchSampler(train_tokens, T, args.batch_size, args.seed, rt.device)
        val = data.BatchSampler(val_tokens, T, args.batch_size, args.seed, rt.device)
    except data.DataError as e:
        sys.exit(f"error: {e}")
    byte_lengths = torch.from_numpy(data.token_byte_lengths(enc, config.vocab_size)).to(rt.device)
    tokens_per_step = args.batch_size * T * args.grad_accum * rt.world_size
    log(f"{len(train_tokens):,} train / {len(val_tokens):,} val tokens; windows of {T} tokens, {tokens_per_step:,} per step")

    # ---- optimizer and schedule ---------------------------------------------------------------
    optimizer = configure_optimizer(model, args.lr, args.weight_decay, device_type=rt.device.type)
    params = [p for group in optimizer.param_groups for p in group["params"]]  # what the update changes
    step = 0
    if ckpt is not None:  # everything that decides the next step: weights, moments, RNGs, data position
        step = restore_training_state(ckpt, optimizer, rt.scaler, train)
        log(f"resuming from {ckpt_path} at step {step}")
    raw_model = model  # saved and evaluated; the compiled / DDP wrappers below only train
    if args.compile and rt.device.type != "mps":  # MPS has no compile backend worth using yet
        model = torch.compile(model)
    if rt.ddp:
        model = DDP(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)
    flops_per_step = raw_model.flops_per_token(T) * tokens_per_step
    peak = peak_flops(rt.device, rt.dtype) * rt.world_size

    def checkpoint():
        state = training_state(optimizer, rt.scaler, train, rt.device)
        if rt.ddp:  # every rank's random stream, so that each resumes its own dropout masks
            state["rng_per_rank"] = [None] * rt.world_size
            dist.all_gather_object(state["rng_per_rank"], state["rng"])
        if rt.master:
            save_checkpoint(ckpt_path, model=raw_model.state_dict(), model_config=asdict(config), tokenizer=tokenizer,
                            args=vars(args), step=step, stage="pretrain", **state)

    def write_log(record):
        if rt.master:
            append_jsonl(log_path, record)

    @torch.no_grad()
    def evaluate():
        """Mean validation loss in nats per token, and in bits per byte: Σ loss / ln 2 / Σ bytes of the
        target tokens, which does not depend on the tokenizer, so runs with different vocabularies compare.
        Tokens of no bytes (<|endoftext|>) count in neither sum, as in nanochat: their loss is not text."""
        raw_model.eval()
        nats, n_tokens, text_nats, n_bytes = 0.0, 0, 0.0, 0
        for x, y in val.eval_batches(args.eval_batches):
            with rt.autocast():
                logits, _ = raw_model(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")  # (B*T,)
            nats += loss.sum().item()
            n_tokens += y.numel()
            batch_nats, batch_bytes = text_loss(loss, y.flatten(), byte_lengths)
            text_nats, n_bytes = text_nats + batch_nats, n_bytes + batch_bytes
        prompt = torch.tensor([data.encode(enc, args.sample_prompt) or [enc.eot_token]], device=rt.device)
        g = torch.Generator(device=rt.device).manual_seed(0)  # its own RNG: sampling must not move training's
        with rt.autocast():
            out = raw_model.generate(prompt, 64, temperature=0.8, top_k=200, generator=g)
        raw_model.train()
        return nats / n_tokens, text_nats / math.log(2) / n_bytes, data.decode(enc, out[0].tolist())

    if ckpt is not None:  # restored last, so that no set-up work above draws from the restored stream
        per_rank = ckpt.get("rng_per_rank") or []
        set_rng_state(per_rank[rt.rank] if len(per_rank) == rt.world_size else ckpt["rng"], rt.device)

    # ---- training loop: evaluate -> checkpoint -> step -> log ---------------------------------
    metrics, stopped_early = {}, False
    bar = tqdm(total=args.max_steps, initial=step, desc="pretrain", disable=not rt.master, dynamic_ncols=True)
    t_last = time.perf_counter()
    with GracefulStop(log) as stop, bar:  # Ctrl-C / SIGTERM: finish the step, save, exit
        while True:
            last = step >= args.max_steps  # >=: a --resume past --max-steps ends too
            if step % args.eval_every == 0 or last:
                val_loss, val_bpb, sample = evaluate()
                metrics.update({"val/loss": val_loss, "val/bpb": val_bpb})
                log(f"step {step}/{args.max_steps} | val loss {val_loss:.4f} | val bpb {val_bpb:.4f}\n---\n{sample}\n---")
                write_log({"step": step, "val/loss": val_loss, "val/bpb": val_bpb, "sample": sample})
                if step > 0:
                    checkpoint()
                t_last = time.perf_counter()  # evaluation time does not count towards throughput
            if last:
                break

            # the update: set this step's learning rate, then forward and backward grad_accum micro-batches
            lr = get_lr(step, args.lr, args.warmup_steps, args.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=rt.device)
            for micro, (x, y) in enumerate(train.next(args.grad_accum, rt.rank, rt.world_size)):
                # DDP averages gradients across processes during backward; doing that on every
                # micro-batch would waste bandwidth, so only the last one synchronises
                sync = micro == args.grad_accum - 1
                with model.no_sync() if rt.ddp and not sync else nullcontext():
                    with rt.autocast():  # the forward pass only: PyTorch advises backward outside autocast
                        logits, loss = model(x, y)  # (B, T) -> (B, T, V), and the mean cross-entropy over B*T
                    # the gradient of a mean over all micro-batches: divide each one's loss (the scaler
                    # multiplies it by the fp16 loss scale first, so small gradients do not underflow)
                    rt.scaler.scale(loss / args.grad_accum).backward()
                loss_sum += loss.detach()
            rt.scaler.unscale_(optimizer)  # fp16: divide the loss scale back out before measuring the gradients
            # clip the global gradient norm to --grad-clip; with 0 the max is inf: the norm is measured, nothing clipped
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
            rt.scaler.step(optimizer)  # AdamW's step; fp16: skipped when a gradient is inf or NaN
            rt.scaler.update()         # fp16: lower the loss scale after a skipped step, raise it after many good ones
            optimizer.zero_grad(set_to_none=True)  # free the gradients' memory until the next backward
            if rt.ddp:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            train_loss, grad_norm = loss_sum.item() / args.grad_accum, grad_norm.item()
            check_finite(train_loss, step, ckpt_path)
            step += 1
            metrics["train/loss"] = train_loss

            t_now = time.perf_counter()
            dt, t_last = t_now - t_last, t_now
            tok_s, mfu = tokens_per_step / dt, flops_per_step / dt / peak
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.1%}")
            if step % args.log_every == 0 or step == 1:
                log(f"step {step}/{args.max_steps} | loss {train_loss:.4f} | lr {lr:.1e} | grad norm {grad_norm:.2f}"
                    f" | {dt * 1000:.0f} ms | {tok_s:,.0f} tok/s | mfu {mfu:.1%}")
                write_log({"step": step, "train/loss": train_loss, "lr": lr, "grad_norm": grad_norm,
                           "dt_ms": dt * 1000, "tok_per_s": tok_s, "mfu": mfu})
            if rt.anyone(stop.requested or step == args.stop_at):  # under torchrun all ranks stop together
                checkpoint()
                stopped_early = True
                break
    if rt.ddp:
        dist.destroy_process_group()

    if stopped_early:
        log(f"stopped at step {step}; checkpoint saved to {ckpt_path}; continue with the same command plus --resume")
        return {"step": step, **metrics}
    log(f"done: step {step}, val loss {metrics['val/loss']:.4f} ({metrics['val/bpb']:.3f} bits/byte)")

    # ---- the world's held-out evaluation (data.evaluate_world), when trained on the world -------
    scores = None
    if rt.master:  # a base model: plain-text prompts (chat=False)
        scores = data.world_report(raw_model, enc, args.data, False, rt.device, rt.autocast, args.out)
    if scores:
        log(f"world: {data.format_world_metrics(scores)} (a base model: it completes facts, it does not answer)")
        metrics["world"] = scores
    log(f"checkpoint: {ckpt_path}\nsample from it: python sample.py --init-from {args.out} --prompt "
        f"\"{args.sample_prompt}\" --greedy")
    return {"step": step, **metrics}


if __name__ == "__main__":
    main()
