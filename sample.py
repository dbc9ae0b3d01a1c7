"""
Sampling: continue a prompt with a trained model, streaming tokens to the terminal.

The guide's last step, using the model: the decoder predicts a distribution over the next token,
we draw one (greedy, temperature, top-k, top-p), append it and repeat (model.GPT.generate, with a
KV cache). Works with any checkpoint of this project and with a Hugging Face GPT-2 directory.

Reads: --init-from OUT_DIR (holding ckpt.pt), a ckpt.pt file, or a HF GPT-2 directory
       (config.json + model.safetensors / pytorch_model.bin).

  python sample.py --init-from out/pretrain --prompt "ROMEO:"
  python sample.py --init-from ~/models/gpt2 --prompt "The capital of France is" --greedy
  echo "Once upon a time" | python sample.py --init-from out/pretrain --prompt - --num-samples 3
"""

import argparse
import codecs
import sys

import torch

import data
from model import load_model, setup_runtime


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # I/O
    p.add_argument("--init-from", default="out/pretrain", help="checkpoint directory or file, or a Hugging Face GPT-2 directory")
    p.add_argument("--prompt", default="\n", help="text to continue; '-' reads it from standard input")
    p.add_argument("--prompt-file", default="", help="read the prompt from this file instead")
    # sampling
    p.add_argument("--num-samples", type=int, default=1, help="independent continuations of the prompt")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="divides the logits: <1 sharper, >1 flatter, 0 = greedy")
    p.add_argument("--top-k", type=int, default=200, help="sample only among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest set with this total probability (1 = off)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token (same as --temperature 0)")
    p.add_argument("--ignore-eot", action="store_true", help="keep going after <|endoftext|> instead of stopping")
    # system
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="auto: bf16/fp16 on GPUs, fp32 on CPU")
    p.add_argument("--seed", type=int, default=1337, help="random seed; the same seed gives the same samples")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    rt = setup_runtime(args.device, args.dtype, args.seed)
    try:
        model, ckpt = load_model(args.init_from)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    model.to(rt.device).eval()
    enc = data.get_encoding(ckpt["tokenizer"])

    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompt = f.read()
    else:
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    ids = data.encode(enc, prompt) or [enc.eot_token]  # an empty prompt starts a new document
    ids = ids[-model.config.block_size:]
    idx = torch.tensor([ids], device=rt.device)
    temperature = 0.0 if args.greedy else args.temperature
    stop = None if args.ignore_eot else enc.eot_token

    completions = []
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}/{args.num_samples}")
        print(prompt, end="", flush=True)
        # tokens are byte sequences and one character may span two tokens: decode incrementally
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = []
        with rt.autocast:
            for tok in model.stream(idx, args.max_new_tokens, temperature, args.top_k or None, args.top_p, stop):
                t = tok.item()
                if t == stop or t >= enc.n_vocab:  # end of document, or an unused padded id
                    continue
                piece = utf8.decode(enc.decode_single_token_bytes(t))
                text.append(piece)
                print(piece, end="", flush=True)
        text.append(utf8.decode(b"", final=True))
        print(text[-1])
        completions.append("".join(text))
    return completions


if __name__ == "__main__":
    main()
