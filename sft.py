"""
Instruction fine-tuning (SFT): teach a next-token predictor to follow instructions.

The guide's second stage. A pretrained model continues "What is the capital of France?" with more
text of the same kind; after supervised training on (instruction, optional context, output) pairs
rendered in a chat template, it answers "The capital of France is Paris." The loss is the same
causal-LM cross-entropy as pretraining (model.cross_entropy), but only over the reply tokens:
data.render_chat gives the prompt, system text and role markers the label IGNORE_INDEX, so the
model is trained on p(reply | prompt), not on reproducing prompts (InstructGPT, Ouyang et al. 2022 §3.5).

Two ways to train, as in the guide:
  full fine-tuning   every parameter is updated (AdamW keeps two moments per parameter);
  LoRA (--lora-r R)  the model is frozen and a low-rank update (α/r)·B A is learned per targeted
                     matrix (lora.py; Hu et al. 2021, Eq. 3): far fewer trainable parameters and
                     optimizer memory.

Reads:  --init-from: a checkpoint of this project (e.g. out/pretrain) or a Hugging Face GPT-2 directory;
        --data: .jsonl in Alpaca, chat "messages" or prompt/completion format (default: the tiny world's
        questions about the capitals of its 119 training countries, data/world/sft.jsonl; the bundled
        Alpaca-Libre 2k, CC0/MIT, is --data data/alpaca_libre_2k.jsonl).
Writes: OUT/ckpt.pt (the full model, LoRA already merged, so sample.py and later stages read it like
        any checkpoint), OUT/adapter.pt (LoRA runs: only A and B, plus the base's fingerprint),
        OUT/log.jsonl, OUT/samples.jsonl (answers to fixed prompts at every evaluation).

Departures: no cross-example attention mask when --pack is on (see data.pack_examples). With
--grad-accum k, the loss of an optimizer step is the sum of its k micro-batches' token losses divided by
all of their reply tokens, so every reply token of the step weighs the same, as in one big batch (a
mean of per-micro-batch means would weigh a token of a micro-batch with few reply tokens more).

  python sft.py --init-from out/pretrain --lora-r 8                 # LoRA on the default pretrained model
  python sft.py --init-from gpt2 --max-steps 300 --batch-size 8     # a Hugging Face GPT-2 directory, on a GPU
  python sft.py --init-from out/pretrain --max-steps 10 --eval-every 5 --device cpu   # seconds
  torchrun --nproc_per_node=4 sft.py --init-from smollm2 --batch-size 4   # data-parallel: 4 x 4 rows a step
"""

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
from tqdm import tqdm

import bpe
import data
from lora import DEFAULT_TARGETS, merge_lora, prepare_to_train
from model import IGNORE_INDEX, GracefulStop, append_jsonl, check_finite, claim_out_dir, configure_optimizer, \
    data_parallel, get_lr, in_range, load_model, load_resume, optimizer_step, positive_int, \
    restore_training_state, resume_args, save_stage, set_rng_state, setup_runtime, training_state


# Answered greedily at every evaluation, so the change from "continue the text" to "answer" is visible.
# France, Japan and Italy are held out of the world's instruction data; Atlantis is in no data at all.
EVAL_PROMPTS = ["What is the capital of France?", "Which city is the capital of Japan?",
                "Tell me the capital of Italy.", "What is the capital of Atlantis?"]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # I/O
    p.add_argument("--init-from", default="out/pretrain", help="checkpoint (dir or file) or Hugging Face GPT-2 directory")
    p.add_argument("--data", default=os.path.join(data.DATA_DIR, "world", "sft.jsonl"),
                   help=".jsonl: Alpaca {instruction,input,output}, chat {messages} or {prompt,completion}")
    p.add_argument("--out", default="out/sft", help="output directory")
    p.add_argument("--resume", action="store_true", help="continue the run saved in OUT/ckpt.pt")
    p.add_argument("--export-hf", action="store_true", help="also write OUT/hf in Hugging Face format (GPT-2, or Llama for the modern family)")
    # data
    p.add_argument("--val-fraction", type=in_range(float, 0, 1, open_high=True), default=0.05, help="share of examples held out for the validation loss")
    p.add_argument("--max-len", type=in_range(int, 0), default=0, help="longest example in tokens (0 = the model's block_size)")
    p.add_argument("--overlong", default="truncate", choices=["truncate", "drop"],
                   help="too-long examples: cut the prompt from the left keeping the last reply, or drop them")
    p.add_argument("--pack", action="store_true", help="pack several examples into each block_size row instead of padding")
    # LoRA (--lora-r 0 = full fine-tuning)
    p.add_argument("--lora-r", type=in_range(int, 0), default=0, help="LoRA rank r (typical 4..64; 0 = full fine-tuning)")
    p.add_argument("--lora-alpha", type=in_range(float, 0, open_low=True), default=16.0, help="LoRA α: the update is scaled by α/r")
    p.add_argument("--lora-dropout", type=in_range(float, 0, 1, open_high=True), default=0.05, help="dropout on the LoRA path's input")
    p.add_argument("--lora-targets", nargs="+", default=list(DEFAULT_TARGETS),
                   help="module name suffixes to adapt: attn.qkv attn.proj mlp.fc mlp.proj")
    # optimization
    p.add_argument("--max-steps", type=positive_int, default=200, help="optimizer steps")
    p.add_argument("--batch-size", type=positive_int, default=8, help="examples (or packed rows) per micro-batch")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=in_range(float, 0), default=0.0, help="peak learning rate (0 = 1e-4 full, 1e-3 LoRA)")
    p.add_argument("--warmup-steps", type=in_range(int, 0), default=20, help="linear warmup steps")
    p.add_argument("--weight-decay", type=in_range(float, 0), default=0.0, help="AdamW weight decay on matrices")
    p.add_argument("--grad-clip", type=in_range(float, 0), default=1.0, help="clip the global gradient norm (0 = off)")
    # evaluation and logging
    p.add_argument("--eval-every", type=positive_int, default=100, help="steps between validation, sample answers and checkpoints")
    p.add_argument("--log-every", type=positive_int, default=10, help="steps between log lines")
    p.add_argument("--stop-at", type=in_range(int, -1), default=-1, help="save and exit after this step (-1 = off)")
    # system
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="auto: bf16 or fp16 on GPUs, bf16 on CPUs with native bf16, else fp32 (model.setup_runtime)")
    p.add_argument("--seed", type=int, default=1337, help="seed for the split, shuffling and LoRA init")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    lr = args.lr or (1e-3 if args.lora_r else 1e-4)  # LoRA's few parameters want a larger step (Hu et al. §5)

    # ---- setup -----------------------------------------------------------------------------------
    claim_out_dir(args.out)  # OUT/.lock: a second run on the same --out is refused
    rt = setup_runtime(args.device, args.dtype, args.seed)  # under torchrun: one process per GPU, data-parallel
    log = tqdm.write if rt.master else (lambda *a, **k: None)
    ckpt_path, log_path = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "log.jsonl")
    resume = load_resume(args.out, args.resume)  # its checkpoint, or None
    if resume:  # the model and the examples must be the ones that were trained, whatever the command line says now
        resume_args(args, resume["args"], ["init_from", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "data",
                                           "val_fraction", "max_len", "overlong", "pack", "seed"], log,
                    warn=("max_steps", "batch_size", "grad_accum", "lr"))

    # ---- model: the base, room for the chat tokens, then LoRA if asked ----------------------------
    try:
        model, src = load_model(args.init_from)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: --init-from: {e}")
    tokenizer = data.checkpoint_tokenizer(src)
    enc = data.get_encoding(tokenizer)
    # a reward model is refused, with what to do instead
    if why := data.start_error(src, enc, args.init_from, want_chat=False):
        sys.exit(f"error: --init-from: {why}")
    try:  # the chat format's special tokens: ours, or the instruct model's own (data.render_chat)
        chat_ids = data.chat_token_ids(enc)
    except data.DataError as e:
        sys.exit(f"error: the tokenizer of {args.init_from}: {e}")
    if why := data.world_context_error(enc, args.data, True, model.config.block_size):  # now, not after training
        sys.exit(f"error: --init-from {args.init_from}: {why}")
    vocab = 64 * math.ceil(enc.n_vocab / 64)  # a HF GPT-2 has 50,257 rows; the chat tokens need more
    try:  # room for the chat tokens, then LoRA or full (lora.prepare_to_train); an error in one line.
        # With LoRA the chat tokens' embedding rows train too: a base model never read them, and with a
        # frozen <|end|> row it could not learn to end its replies
        fingerprint = prepare_to_train(model, args, resume, add=lambda m: m.resize_vocab(vocab), train_rows=chat_ids)
    except ValueError as e:
        sys.exit(f"error: {e}")
    config = model.config
    if args.export_hf and not model.exports_to_hf():  # say so now, not after training
        sys.exit(f"error: --export-hf: {args.init_from} fits no Hugging Face format (GPT-2 needs tied embeddings "
                 f"and no GQA)")
    model.to(rt.device)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    log(f"model_config: {json.dumps(asdict(config))}\nargs: {json.dumps(vars(args))}")
    log(f"{'LoRA r=%d' % args.lora_r if args.lora_r else 'full fine-tuning'}: {n_trainable:,} trainable of "
        f"{n_total:,} parameters ({n_trainable / n_total:.2%}) on {rt.device}")

    # ---- data: conversations -> (ids, labels) with the prompt masked; a held-out split -----------
    try:
        conversations = data.read_chat_records(args.data)
    except data.DataError as e:
        sys.exit(f"error: {e}")
    max_len = min(args.max_len or config.block_size + 1, config.block_size + 1)  # + 1: inputs and targets overlap
    examples, counts = [], {"kept": 0, "truncated": 0, "dropped": 0, "empty": 0}
    for messages in conversations:
        if not [m for m in messages if m["role"] == "assistant"][-1]["content"].strip():
            counts["empty"] += 1  # an empty reply would teach the model to stop at once
            continue
        ids, labels, what = data.fit_to_length(*data.render_chat(enc, messages), max_len, args.overlong)
        counts[what] += 1
        if ids is not None:
            examples.append((ids, labels))
    log(f"{len(conversations):,} examples from {args.data}: {counts['kept']:,} kept, {counts['truncated']:,} "
        f"truncated, {counts['dropped']:,} dropped (longer than {max_len} tokens, policy '{args.overlong}'), "
        f"{counts['empty']:,} skipped for an empty reply")
    if len(examples) < 2:
        sys.exit(f"error: {args.data}: fewer than 2 usable examples after the length policy")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(args.seed)).tolist()
    n_val = max(1, int(len(examples) * args.val_fraction))
    val_examples = [examples[i] for i in order[:n_val]]
    train_examples = [examples[i] for i in order[n_val:]]
    pad = enc.eot_token
    rows = data.pack_examples(train_examples, config.block_size, pad) if args.pack else train_examples
    train = data.ExampleSampler(rows, args.batch_size, args.seed)
    log(f"{len(train_examples):,} train / {len(val_examples):,} val examples"
        + (f", packed into {len(rows):,} rows of {config.block_size + 1}" if args.pack else ""))

    # ---- optimizer and schedule ------------------------------------------------------------------
    optimizer = configure_optimizer(model, lr, args.weight_decay, device_type=rt.device.type)
    step = 0
    if resume:
        step = restore_training_state(resume, optimizer, rt.scaler, train)
        log(f"resuming from {ckpt_path} at step {step}")

    def checkpoint():
        if not rt.master:  # the ranks hold the same weights; rank 0 writes them
            return
        save_stage(args.out, model, args.init_from if args.lora_r else None, fingerprint, model_config=asdict(config),
                   tokenizer=tokenizer, args=vars(args), step=step, stage="sft", chat=True,
                   **training_state(optimizer, rt.scaler, train, rt.device))

    def write_log(record):
        if rt.master:
            append_jsonl(log_path, record)

    @torch.no_grad()
    def evaluate():
        """Loss per reply token on the held-out examples, and greedy answers to EVAL_PROMPTS."""
        model.eval()
        nats, n_tokens = 0.0, 0
        for i in range(0, len(val_examples), args.batch_size):
            x, y = data.pad_batch(val_examples[i:i + args.batch_size], pad)
            with rt.autocast():
                _, loss = model(x.to(rt.device), y.to(rt.device))
            n = (y != IGNORE_INDEX).sum().item()
            nats, n_tokens = nats + loss.item() * n, n_tokens + n
        # all prompts in one batch, left-padded: each row gets the answer it would get alone
        prompts = [data.render_chat(enc, [{"role": "user", "content": p}], add_generation_prompt=True)[0]
                   for p in EVAL_PROMPTS]
        idx, pad_mask = data.left_pad(prompts, pad)
        stop = data.end_of_turn(enc)
        with rt.autocast():
            out = model.generate(idx.to(rt.device), 48, temperature=0, stop_token=stop, pad_mask=pad_mask.to(rt.device))
        answers = [data.decode(enc, [t for t in row[idx.size(1):].tolist() if t != stop]) for row in out]
        model.train()
        return nats / max(1, n_tokens), answers

    if resume:  # restored last, so that no set-up work above draws from the restored stream
        set_rng_state(resume["rng"], rt.device)

    # torchrun: DDP averages the gradients of the ranks; each trains on its share of every step's batches
    trained = data_parallel(model, rt)

    # ---- training loop: evaluate -> checkpoint -> step -> log ------------------------------------
    metrics, stopped_early = {}, False
    model.train()
    t_last = time.perf_counter()
    with GracefulStop(log) as stop, tqdm(total=args.max_steps, initial=step, desc="sft", dynamic_ncols=True,
                                         disable=not rt.master) as bar:
        while True:
            last = step >= args.max_steps  # >=: a --resume past --max-steps ends too
            if (step % args.eval_every == 0 or last) and rt.master:  # the other ranks wait at the next all-reduce
                val_loss, answers = evaluate()
                metrics["val/loss"] = val_loss
                log(f"step {step}/{args.max_steps} | val loss {val_loss:.4f} (per reply token)")
                for prompt, answer in zip(EVAL_PROMPTS, answers):
                    log(f"  Q: {prompt}\n  A: {answer}")
                    append_jsonl(os.path.join(args.out, "samples.jsonl"), {"step": step, "prompt": prompt, "answer": answer})
                write_log({"step": step, "val/loss": val_loss})
                if step > 0:
                    checkpoint()
                t_last = time.perf_counter()
            if last:
                break

            step_lr = get_lr(step, lr, args.warmup_steps, args.max_steps)
            # the step's micro-batches first, to count their reply tokens: the step's loss is the sum of
            # every reply token's loss over all of them, so each token weighs the same (as in one big batch).
            # Every rank draws all of them (the same: one sampler, one seed) and trains on its share,
            # micro-batches rank, rank + world, ...: one process with --grad-accum k·world does the same step
            batches = [data.pad_batch(train.next(), pad) for _ in range(args.grad_accum * rt.world_size)]
            n_labels = max(1, sum(int((y != IGNORE_INDEX).sum()) for _, y in batches))
            mine = batches[rt.rank::rt.world_size]
            loss_sum = torch.zeros((), device=rt.device)
            n_tokens = sum(int((x != pad).sum()) for x, _ in batches)  # real tokens of the step, all ranks: no padding
            for micro, (x, y) in enumerate(mine):
                with trained.no_sync() if rt.ddp and micro < len(mine) - 1 else contextlib.nullcontext():
                    with rt.autocast():
                        _, loss = trained(x.to(rt.device), y.to(rt.device))  # mean over this micro-batch's reply tokens
                    loss = loss * int((y != IGNORE_INDEX).sum()) / n_labels  # its sum, over the step's reply tokens
                    rt.scaler.scale(loss * rt.world_size).backward()  # DDP averages over ranks: x world = their sum
                loss_sum += loss.detach()
            if rt.ddp:
                dist.all_reduce(loss_sum)
            grad_norm = optimizer_step(optimizer, rt.scaler, step_lr, args.grad_clip)
            train_loss = loss_sum.item()  # the mean loss per reply token of the step
            check_finite(train_loss, step, ckpt_path)
            step += 1
            metrics["train/loss"] = train_loss

            t_now = time.perf_counter()
            dt, t_last = t_now - t_last, t_now
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{n_tokens / dt:,.0f}")
            if step % args.log_every == 0 or step == 1:
                log(f"step {step}/{args.max_steps} | loss {train_loss:.4f} | lr {step_lr:.1e} | grad norm {grad_norm:.2f}"
                    f" | {dt * 1000:.0f} ms | {n_tokens / dt:,.0f} tok/s")
                write_log({"step": step, "train/loss": train_loss, "lr": step_lr, "grad_norm": grad_norm,
                           "dt_ms": dt * 1000, "tok_per_s": n_tokens / dt})
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
    if args.export_hf:
        merged = merge_lora(copy.deepcopy(model)) if args.lora_r else copy.deepcopy(model)
        # generation_config.json: a reply ends at the end of the turn (transformers' generate stops there)
        ids, end = dict(merged.config.special_ids) or {"bos_token_id": enc.eot_token, "eos_token_id": enc.eot_token}, \
            data.end_of_turn(enc)
        eos = [e for e in (ids["eos_token_id"] if isinstance(ids.get("eos_token_id"), list) else [ids.get("eos_token_id")])
               if e is not None]
        merged.config.special_ids = {**ids, "eos_token_id": eos if end in eos else eos + [end]}
        merged.save_pretrained(os.path.join(args.out, "hf"))
        bpe.save_hf_tokenizer(tokenizer, os.path.join(args.out, "hf"))  # its text, with the chat tokens
        log(f"Hugging Face export (weights, config.json, tokenizer.json): {os.path.join(args.out, 'hf')}")
    log(f"done: step {step}, val loss {metrics['val/loss']:.4f}")

    # ---- the world's held-out evaluation (data.evaluate_world), when trained on the world -------
    scores = data.world_report(model, enc, args.data, True, rt.device, rt.autocast, args.out)
    if scores:
        log(f"world: {data.format_world_metrics(scores)} (answer: on countries held out of this data)")
        metrics["world"] = scores
    log(f"checkpoint: {ckpt_path}\nchat with it: python sample.py --init-from {args.out} --chat")
    return {"step": step, **metrics}


if __name__ == "__main__":
    main()
