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

--judge RM evaluates with a reward model (reward.py) as the judge: it scores a response (--response) or
a file of them (--responses), measures how often --init-from's answers beat another model's (--compare;
both answer the same prompts greedily), or samples N answers per held-out question and keeps the one it
scores highest (--best-of-n; the world's annotator grades the picks, which shows when the reward model
is fooled: Gao et al. 2022).

  python sample.py --judge out/reward --prompt "What is the capital of France?" --response "Paris."
  python sample.py --judge out/reward --responses answers.jsonl   # {prompt, response} -> answers.scores.jsonl
  python sample.py --judge out/reward --init-from out/dpo --compare out/sft   # win rate of out/dpo over out/sft
  python sample.py --judge out/reward --init-from out/sft --best-of-n 16     # -> out/reward/best_of_n.json
"""

import argparse
import codecs
import json
import math
import os
import sys

import torch

import data
from model import atomic_write, in_range, load_model, positive_int, setup_runtime


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # I/O
    p.add_argument("--init-from", default=None, help="checkpoint directory or file, or a Hugging Face model directory "
                   "(None: out/pretrain; out/sft with --best-of-n)")
    p.add_argument("--prompt", default=None, help="text to continue (with --response: the question it answers); '-' reads "
                   "it from standard input (None: a new line, a new document; '' with --response)")
    p.add_argument("--prompt-file", default="", help="read the prompt from this file instead")
    p.add_argument("--chat", action="store_true", help="a multi-turn conversation on the terminal (chat models; /exit to quit)")
    p.add_argument("--system", default="", help="system message for chat models ('' = none)")
    # evaluation
    p.add_argument("--eval", action="store_true", help="score greedy answers on the world's capitals (completion, "
                   "answer, abstention, over-refusal, format) and write eval.json next to the checkpoint")
    p.add_argument("--world", default=os.path.join(data.DATA_DIR, "world"),
                   help="world directory holding world.json (--eval; the questions of --compare and --best-of-n)")
    # judging with a reward model
    p.add_argument("--judge", default="", metavar="RM", help="reward model checkpoint (reward.py) that judges: with --response, "
                   "--responses, --compare or --best-of-n")
    p.add_argument("--response", default=None, metavar="R", help="print the judge's score of this response to --prompt")
    p.add_argument("--responses", default="", metavar="F", help="score the {prompt, response} records of this .jsonl")
    p.add_argument("--compare", default="", metavar="B", help="win rate of --init-from over checkpoint B, both "
                   "answering greedily (a tie counts one half)")
    p.add_argument("--best-of-n", type=positive_int, nargs="?", const=16, default=None, metavar="N",
                   help="N samples per question (the flag alone: 16); the judge's pick of n = 1, 2, 4, ..., N, graded "
                        "by the world's annotator")
    p.add_argument("--prompts", default="", metavar="F", help="ask --compare and --best-of-n these prompts instead (.jsonl, any "
                   "format ppo.py reads; '' = the world's held-out questions)")
    p.add_argument("--out", default="", help="what to write: --responses' scores ('' = F.scores.jsonl), --best-of-n's "
                   "results ('' = JUDGE/best_of_n.json, or best_of_n_train.json with --prompts)")
    # sampling
    p.add_argument("--num-samples", type=positive_int, default=1, help="independent continuations of the prompt")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="tokens to generate per sample (None: 200; 32 with --compare, 24 with --best-of-n)")
    p.add_argument("--temperature", type=in_range(float, 0), default=None,
                   help="divides the logits: <1 sharper, >1 flatter, 0 = greedy (None: 0.8; 1.0 with --best-of-n)")
    p.add_argument("--top-k", type=in_range(int, 0), default=200, help="sample only among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=in_range(float, 0, 1, open_low=True), default=1.0, help="nucleus sampling: smallest set with this total probability (1 = off)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token (same as --temperature 0)")
    p.add_argument("--ignore-eot", action="store_true", help="keep going after <|endoftext|> instead of stopping")
    # system
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="auto: bf16 or fp16 on GPUs, bf16 on CPUs with native bf16, else fp32 (model.setup_runtime)")
    p.add_argument("--seed", type=int, default=1337, help="random seed; the same seed gives the same samples")
    args = p.parse_args(argv)
    # the judge's flags: one mode at a time, and only with --judge
    modes = [flag for flag, given in (("--response", args.response is not None), ("--responses", args.responses),
                                      ("--compare", args.compare), ("--best-of-n", args.best_of_n)) if given]
    extras = [flag for flag, given in (("--prompts", args.prompts), ("--out", args.out)) if given]
    if not args.judge and modes + extras:
        p.error(f"{(modes + extras)[0]} needs --judge RM, the reward model that judges")
    if args.judge and len(modes) != 1:
        p.error("--judge RM needs one of --response R, --responses F, --compare B, --best-of-n N")
    if args.judge and (args.eval or args.chat):
        p.error("--judge does not go with --eval or --chat")
    if "--prompts" in extras and modes[0] not in ("--compare", "--best-of-n"):
        p.error("--prompts goes with --compare or --best-of-n")
    if "--out" in extras and modes[0] not in ("--responses", "--best-of-n"):
        p.error("--out goes with --responses or --best-of-n")
    if args.compare and args.init_from is None:
        p.error("--compare B needs --init-from A, the model whose win rate over B is measured")
    # the defaults that depend on the mode (None above): the judge's modes keep their own
    defaults = {"init_from": "out/pretrain", "prompt": "\n", "temperature": 0.8, "max_new_tokens": 200}
    if args.best_of_n:
        defaults.update(init_from="out/sft", temperature=1.0, max_new_tokens=24)
    elif args.compare:
        defaults.update(max_new_tokens=32)
    elif args.response is not None:
        defaults.update(prompt="")
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


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
    if args.judge:  # a reward model's verdict instead of samples (the judge's modes, after main)
        return judge(args, prompt)
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


# -----------------------------------------------------------------------------
# Judging with a reward model: score responses, compare two models, best-of-n


def judge(args, prompt):
    """--judge RM: load the reward model, then score (--response, --responses), --compare or --best-of-n;
    a wrong path, a model with no score head or bad input ends in one line."""
    rt = setup_runtime(args.device, args.dtype, args.seed)
    try:
        rm, ckpt = load_model(args.judge)
        if rm.score_head is None:
            raise ValueError(f"{args.judge} is not a reward model (no score head); train one with reward.py")
        enc = data.get_encoding(data.checkpoint_tokenizer(ckpt))
        rm.to(rt.device).eval()
        if args.best_of_n:
            return best_of_n_report(args, rm, ckpt, enc, rt)
        if args.compare:
            return compare(args, rm, ckpt, enc, rt)
        return score_responses(args, prompt, rm, enc, rt)
    except (FileNotFoundError, ValueError, data.DataError) as e:
        sys.exit(f"error: {e}")


def load_policy(path, judge_ckpt, args, rt):
    """A model to be judged, on the device in eval mode; it must share the judge's tokenizer."""
    policy, ckpt = load_model(path)
    if data.checkpoint_tokenizer(ckpt) != data.checkpoint_tokenizer(judge_ckpt):
        raise ValueError(f"{path} uses another tokenizer than the reward model {args.judge}")
    return policy.to(rt.device).eval()


def score_responses(args, prompt, rm, enc, rt):
    """--response: print the score of one response to --prompt (a user turn). --responses F: score F's
    {prompt, response} records, write one {"score"} line per record to --out (F.scores.jsonl) and print
    their mean, std, min and max."""
    if args.responses:
        records = [(data.to_messages(r, where, need_reply=False), r.get("response"), where)
                   for where, r in data.iter_jsonl(args.responses)]
        for messages, response, where in records:
            if not isinstance(response, str):
                raise data.DataError(f"{where}: record has no string field 'response'")
    else:
        records = [([{"role": "user", "content": prompt}], args.response, "--prompt")]
    prompts = [data.render_chat(enc, m, add_generation_prompt=True)[0] for m, _, _ in records]
    scores = data.score_answers(rm, prompts, [r for _, r, _ in records], enc, rt, 64).tolist()
    if not args.responses:
        print(f"score {scores[0]:.4f}")
        return scores
    out = args.out or args.responses.removesuffix(".jsonl") + ".scores.jsonl"
    atomic_write(out, lambda f: f.write("".join(json.dumps({"score": s}) + "\n" for s in scores).encode()))
    t = torch.tensor(scores)
    print(f"{len(scores):,} records scored: mean {t.mean():.3f}, std {t.std() if len(t) > 1 else 0:.3f}, "
          f"min {t.min():.3f}, max {t.max():.3f}; wrote {out}")
    return scores


def compare(args, rm, ckpt, enc, rt):
    """--compare B: A (--init-from) and B answer the same prompts (--prompts, or the world's held-out and
    invented countries) greedily; the reward model scores each answer. Prints A's win rate as JSON and
    as a sentence; returns it."""
    if args.prompts:
        questions = data.read_prompts(args.prompts)
    else:
        world = data.load_world(args.world)
        questions = [[{"role": "user", "content": f"What is the capital of {c}?"}]
                     for c in world["heldout"] + world["invented"]]
    prompt_ids = [data.render_chat(enc, q, add_generation_prompt=True)[0] for q in questions]
    if args.max_new_tokens + 1 >= rm.config.block_size:  # found now, not after all the generation
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: an answer that long would not fit the reward "
                         f"model's context of {rm.config.block_size}")
    end, replies, score = data.end_of_turn(enc), {}, {}
    for name, path in (("a", args.init_from), ("b", args.compare)):
        policy = load_policy(path, ckpt, args, rt)
        generated = data.generate_reply_ids(policy, prompt_ids, end, rt.device, rt.autocast, 64, args.max_new_tokens)
        replies[name] = [ids + [end] * stopped for ids, stopped in generated]  # <|end|> kept, as in training
    with torch.no_grad(), rt.autocast():
        for name, answers in replies.items():  # each answer after its prompt, the prompt cut to fit
            rows = [data.fit_pair(p, r, [], rm.config.block_size)[:2] for p, r in zip(prompt_ids, answers)]
            score[name] = data.score_sequences(rm.scores, rows, enc.eot_token, rt.device).float()  # (Q,)
    # each prompt: 1 if A scores higher, 0.5 for a tie, 0 if B does; the win rate is their mean, and its
    # 95% interval the normal approximation mean ± 1.96·s/√n
    outcome = (score["a"] > score["b"]).float() + 0.5 * (score["a"] == score["b"]).float()
    n, rate = len(outcome), outcome.mean().item()
    half = 1.96 * outcome.std().item() / math.sqrt(n) if n > 1 else float("nan")
    result = {"win_rate": rate, "ci95": [max(0.0, rate - half), min(1.0, rate + half)], "n": n,
              "ties": int((score["a"] == score["b"]).sum()), "mean_score_a": score["a"].mean().item(),
              "mean_score_b": score["b"].mean().item()}
    print(json.dumps(result))
    print(f"{args.init_from} beats {args.compare} on {rate:.1%} of {n} prompts (95% CI {result['ci95'][0]:.1%}-"
          f"{result['ci95'][1]:.1%}); mean reward {result['mean_score_a']:.3f} against {result['mean_score_b']:.3f}")
    return result


def best_of_n(scores, values, n):
    """Best-of-n selection, estimated from N samples per question with all of them used: the N samples
    are cut into N // n disjoint sets of n, and each set keeps the sample the reward model scores highest
    (the first on a tie). scores, values (Q, N): the reward model's scores and what is reported of the
    picks (the scores themselves for the proxy, the annotator's grades for the gold). Returns (Q, N // n)."""
    Q, N = scores.shape
    sets = N // n
    s, v = scores[:, :sets * n].view(Q, sets, n), values[:, :sets * n].view(Q, sets, n)  # (Q, N//n, n)
    return v.gather(-1, s.argmax(-1, keepdim=True)).squeeze(-1)                          # (Q, N//n)


def best_of_n_report(args, rm, ckpt, enc, rt):
    """--best-of-n N: the world's held-out questions (real and invented countries, the training phrasing
    and the unseen ones; or the --prompts given, written to best_of_n_train.json), N samples each from
    --init-from; for n = 1, 2, 4, ..., N the reward model's pick: its score (proxy), the annotator's grade
    (gold), the share of real countries answered right and of invented ones declined; the oracle's pick
    (the best grade of n); and the share of two differently graded samples of one question that the
    reward model orders as the annotator does."""
    world = data.load_world(args.world)
    annotate = data.world_annotator(world)
    unseen = world.get("unseen_questions", [])
    if args.prompts:
        questions = data.read_prompts(args.prompts)
    else:
        asked = [(c, "What is the capital of {F}?") for c in world["heldout"] + world["invented"]]
        asked += [(c, unseen[i % len(unseen)]) for i, c in enumerate(world["heldout"] + world["invented"]) if unseen]
        questions = [[{"role": "user", "content": q.format(F=c)}] for c, q in asked]
    is_real = torch.tensor([bool(data.names_capitals(q[-1]["content"], world["capital_of"])) for q in questions])
    policy = load_policy(args.init_from, ckpt, args, rt)
    N = args.best_of_n
    prompt_ids = [data.render_chat(enc, q, add_generation_prompt=True)[0] for q in questions]
    generator = torch.Generator(device=rt.device).manual_seed(args.seed)
    repeated = [p for p in prompt_ids for _ in range(N)]                    # N samples of each question
    replies = data.generate_replies(policy, enc, repeated, data.end_of_turn(enc), rt.device, rt.autocast, 256,
                                    args.max_new_tokens, args.temperature, generator)
    texts = [text.strip() for text, _ in replies]
    scores = data.score_answers(rm, repeated, texts, enc, rt).cpu().view(len(questions), N)  # (Q, N)
    grades = torch.tensor([float(g) for i, q in enumerate(questions)
                           for g in annotate(q, texts[i * N:(i + 1) * N])]).view(len(questions), N)
    good = (grades > 0).float()  # right capital, or a refusal of a country that does not exist
    result = {"policy": args.init_from, "model": args.judge, "n_questions": len(questions), "N": N, "curve": []}
    n = 1
    while n <= N:
        picked_good = best_of_n(scores, good, n)
        result["curve"].append({
            "n": n, "proxy": best_of_n(scores, scores, n).mean().item(), "gold": best_of_n(scores, grades, n).mean().item(),
            "right_real": picked_good[is_real].mean().item(), "declined_invented": picked_good[~is_real].mean().item(),
            "oracle_gold": best_of_n(grades, grades, n).mean().item()})
        n *= 2
    # pairwise agreement with the annotator on the held-out samples, over pairs whose grades differ
    agree, total = 0, 0
    for s, g in zip(scores, grades):
        differ = g[:, None] > g[None, :]                                # (N, N) i graded above j
        agree += (differ & (s[:, None] > s[None, :])).sum().item()
        total += differ.sum().item()
    result["heldout_accuracy"] = agree / total if total else float("nan")
    out = args.out or os.path.join(args.judge, "best_of_n_train.json" if args.prompts else "best_of_n.json")
    atomic_write(out, lambda f: f.write(json.dumps(result, indent=1).encode()))
    print(f"best-of-n: {args.init_from}'s answers to {len(questions)} "
          f"{'prompts of ' + args.prompts if args.prompts else 'held-out questions'}, picked by {args.judge}")
    print("   n |  proxy |  gold | right (real) | declined (invented) | oracle gold")
    for r in result["curve"]:
        print(f"{r['n']:4d} | {r['proxy']:6.2f} | {r['gold']:.3f} | {r['right_real']:12.1%} | "
              f"{r['declined_invented']:19.1%} | {r['oracle_gold']:.3f}")
    print(f"the reward model orders {result['heldout_accuracy']:.1%} of {total:,} differently graded sample pairs as "
          f"the annotator does; wrote {out}")
    return result


if __name__ == "__main__":
    main()
