"""
Sampling: continue a prompt with a trained model, streaming tokens to the terminal.

The guide's last step, using the model: the decoder predicts a distribution over the next token,
we draw one (greedy, temperature, top-k, top-p), append it and repeat (model.GPT.generate, with a
KV cache). Works with any checkpoint of this project and with a Hugging Face model directory.

Reads: --init-from OUT_DIR (holding ckpt.pt), a ckpt.pt file, or a Hugging Face directory (config.json,
       model.safetensors or pytorch_model.bin, and its tokenizer files) of a family model.py loads.

A checkpoint from instruction tuning (sft.py and later stages), or a Hugging Face directory whose tokenizer
has a chat template (an instruct model), is a chat model: --prompt is then sent as one user turn in its
chat template (data.render_chat: ours, or the model's own), and --chat holds a conversation.
The guide's two examples (weights downloaded beforehand; nothing is fetched here):

  python sample.py --init-from ~/models/gpt2 --prompt "The capital of France is" --greedy
  python sample.py --init-from ~/models/gemma-2-2b-it --prompt "What is the capital of France?" --greedy
--eval scores the model on the tiny world's capitals instead (data.evaluate_world) and writes the
metrics to eval.json next to the checkpoint.

  python sample.py --init-from out/pretrain --prompt "ROMEO:"
  echo "Once upon a time" | python sample.py --init-from out/pretrain --prompt - --num-samples 3
  python sample.py --init-from out/sft --chat
  python sample.py --init-from out/sft --eval
"""

import argparse
import codecs
import json
import os
import sys

import torch

import data
from model import atomic_write, in_range, load_model, positive_int, setup_runtime


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # I/O
    p.add_argument("--init-from", default="out/pretrain", help="checkpoint directory or file, or a Hugging Face model directory")
    p.add_argument("--prompt", default="\n", help="text to continue; '-' reads it from standard input")
    p.add_argument("--prompt-file", default="", help="read the prompt from this file instead")
    p.add_argument("--chat", action="store_true", help="a multi-turn conversation on the terminal (chat models; /exit to quit)")
    p.add_argument("--system", default="", help="system message for chat models ('' = none)")
    # evaluation
    p.add_argument("--eval", action="store_true", help="score greedy answers on the world's capitals (completion, "
                   "answer, abstention, over-refusal, format) and write eval.json next to the checkpoint")
    p.add_argument("--world", default=os.path.join(data.DATA_DIR, "world"), help="world directory holding world.json")
    # sampling
    p.add_argument("--num-samples", type=positive_int, default=1, help="independent continuations of the prompt")
    p.add_argument("--max-new-tokens", type=positive_int, default=200, help="tokens to generate per sample")
    p.add_argument("--temperature", type=in_range(float, 0), default=0.8, help="divides the logits: <1 sharper, >1 flatter, 0 = greedy")
    p.add_argument("--top-k", type=in_range(int, 0), default=200, help="sample only among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=in_range(float, 0, 1, open_low=True), default=1.0, help="nucleus sampling: smallest set with this total probability (1 = off)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token (same as --temperature 0)")
    p.add_argument("--ignore-eot", action="store_true", help="keep going after <|endoftext|> instead of stopping")
    # system
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="auto: bf16 or fp16 on GPUs, bf16 on CPUs with native bf16, else fp32 (model.setup_runtime)")
    p.add_argument("--seed", type=int, default=1337, help="random seed; the same seed gives the same samples")
    return p.parse_args(argv)


def fit_conversation(enc, messages, room):
    """The conversation rendered for a reply in at most room tokens: the oldest exchanges (a user turn and
    its reply) are dropped whole, the system prompt and the template's markers kept. Returns the ids and
    how many messages were dropped; a system prompt and last user turn that alone do not fit is an error."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest = messages[len(system):]
    while True:
        ids, _ = data.render_chat(enc, system + rest, add_generation_prompt=True)
        if len(ids) <= room:
            return ids, len(messages) - len(system) - len(rest)
        if len(rest) <= 1:
            sys.exit(f"error: the prompt takes {len(ids)} tokens in the chat template, more than the {room} the model's "
                     f"context leaves for it; shorten it (or the system prompt, or --max-new-tokens)")
        rest = rest[2:]


def stream_reply(model, enc, ids, args, temperature, stop):
    """Generate after ids, printing each piece as it comes; returns the generated text (decoded whole, as
    the tokenizer decodes: the printed stream may show a broken UTF-8 sequence differently)."""
    idx = torch.tensor([ids[-model.config.block_size:]], device=next(model.parameters()).device)
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # one character may span two tokens
    new = []
    for tok in model.stream(idx, args.max_new_tokens, temperature, args.top_k or None, args.top_p, stop):
        t = tok.item()
        if t == stop or t >= enc.n_vocab:  # the end, or an unused padded id
            continue
        new.append(t)
        print(utf8.decode(enc.decode_single_token_bytes(t)), end="", flush=True)
    print(utf8.decode(b"", final=True))
    return data.decode(enc, new)


def main(argv=None):
    args = get_args(argv)
    prompt = args.prompt
    if args.prompt_file:  # read before the model loads, so a wrong path fails at once
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            sys.exit(f"error: --prompt-file {args.prompt_file}: {getattr(e, 'strerror', None) or e}")
    elif prompt == "-" and not args.chat:
        prompt = sys.stdin.read()
    if args.eval:  # read before the model loads, so a missing world fails at once
        try:
            world = data.load_world(args.world)
        except data.DataError as e:
            sys.exit(f"error: {e}")
    rt = setup_runtime(args.device, args.dtype, args.seed)
    try:
        model, ckpt = load_model(args.init_from)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    model.to(rt.device).eval()
    enc = data.get_encoding(data.checkpoint_tokenizer(ckpt))
    is_chat = ckpt.get("chat", False) or "source" in enc.chat_format  # ours, or a HF model's chat template
    temperature = 0.0 if args.greedy else args.temperature
    if args.chat and not is_chat:
        sys.exit(f"error: {args.init_from} is not a chat model (train one with sft.py)")
    system = [{"role": "system", "content": args.system}] if args.system else []
    # a chat prompt must fit with room to answer: the template's structure is never cut (fit_conversation)
    room = max(model.config.block_size - args.max_new_tokens, model.config.block_size // 2)

    if args.eval:  # one JSON line for machines, one summary line for people, eval.json for later
        metrics = data.evaluate_world(model, enc, world, is_chat, rt.device, rt.autocast)
        print(json.dumps(metrics))
        print(data.format_world_metrics(metrics))
        out_dir = args.init_from if os.path.isdir(args.init_from) else os.path.dirname(args.init_from)
        atomic_write(os.path.join(out_dir, "eval.json"), lambda f: f.write(json.dumps(metrics, indent=1).encode()))
        return metrics

    if args.chat:  # the conversation so far is re-rendered each turn with the training template
        messages, replies = list(system), []
        while True:
            try:
                user = input("you> ")
            except EOFError:
                break
            if user.strip() == "/exit":
                break
            messages.append({"role": "user", "content": user})
            ids, dropped = fit_conversation(enc, messages, room)
            if dropped:
                print(f"(the {dropped} oldest messages no longer fit the context and were left out)", file=sys.stderr)
            print("assistant> ", end="", flush=True)
            with rt.autocast():
                replies.append(stream_reply(model, enc, ids, args, temperature, data.end_of_turn(enc)))
            messages.append({"role": "assistant", "content": replies[-1]})
        return replies

    if is_chat:  # one user turn; the reply ends at the end of the turn (<|end|>, <|im_end|>, ...)
        ids, _ = fit_conversation(enc, system + [{"role": "user", "content": prompt}], room)
        stop = data.end_of_turn(enc)
    else:        # plain continuation; an empty prompt starts a new document
        ids, stop = data.encode(enc, prompt) or [enc.eot_token], enc.eot_token
        if len(ids) > model.config.block_size:
            print(f"(the prompt's first {len(ids) - model.config.block_size} tokens do not fit the context of "
                  f"{model.config.block_size} and are left out)", file=sys.stderr)
    if args.ignore_eot:
        stop = None

    completions = []
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}/{args.num_samples}")
        print(prompt if not is_chat else f"{prompt}\n> ", end="", flush=True)
        with rt.autocast():
            completions.append(stream_reply(model, enc, ids, args, temperature, stop))
    return completions


if __name__ == "__main__":
    main()
