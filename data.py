"""
Text to batches: what every training stage needs from text.

The library every stage imports (the data stage itself, cleaning and deduplicating raw text, is
prepare.py). In the order a stage uses it:

  tokenizer      GPT-2's BPE from the bundled ranks file (offline), or a trained one; it travels inside
                 every checkpoint as a plain dict, so any stage rebuilds the exact encoding from it
                 (Hugging Face tokenizer files, byte-level or SentencePiece-style, are read and written
                 by bpe.py)
  reading text   .txt / .jsonl files streamed line by line; bad input names file and line
  token arrays   a prepared directory's shards, or raw text tokenized once into a cache (pretraining)
  chat data      records (Alpaca, chat messages, prompt/completion) rendered with the chat template,
                 the prompt's labels masked with IGNORE_INDEX (SFT)
  preferences    chosen/rejected pairs (plain, Anthropic HH-RLHF, OpenAI formats) for the reward model
                 and DPO; prompts alone for PPO; left-padded prompts and right-padded responses
  batches        random windows of a token stream (pretraining), padded examples (SFT)
  the tiny world the capitals evaluation of data/world: greedy replies scored right, declined or wrong
                 (generate_replies), and a reward model's scores of replies (score_answers)
"""

import contextlib
import glob
import hashlib
import importlib
import importlib.util
import json
import os
import re
import time

import numpy as np
import torch
from tqdm import tqdm

import bpe
from bpe import CHAT_TOKENS, EOT, DataError  # defined there: bpe.py cannot import data.py
from model import IGNORE_INDEX, atomic_write, last_token, load_checkpoint

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


# -----------------------------------------------------------------------------
# Tokenizer: a plain dict in every checkpoint, and its encoding (tokenizer files in and out: bpe.py)


def gpt2_tokenizer():
    """GPT-2's BPE as a plain dict: pre-tokenization regex, ranks (the tiktoken file's text), specials.

    GPT-2 has 50,257 ids: 50,256 byte-level merge ranks plus <|endoftext|> at 50256. Our chat tokens
    take 50257..50260, inside the model's vocabulary padded to 50,304 (a GPT-2 checkpoint from
    Hugging Face has only 50,257 rows; fine-tuning grows its embedding to make room).
    """
    from tiktoken_ext.openai_public import r50k_pat_str  # the regex string only; downloads nothing
    with open(bpe.GPT2_RANKS) as f:
        ranks = f.read()
    specials = {name: 50256 + i for i, name in enumerate([EOT] + CHAT_TOKENS)}
    return {"name": "gpt2", "pat_str": r50k_pat_str, "ranks": ranks, "special_tokens": specials}


def checkpoint_tokenizer(ckpt):
    """The tokenizer dict of a checkpoint dict from model.load_model. A Hugging Face GPT-2 directory
    carries none (model.py knows nothing of tokenizers): it gets the bundled GPT-2 one; any other Hugging
    Face directory, its own tokenizer (bpe.hf_bpe_tokenizer) and chat format (hf_chat_format). A model with
    a chat format of its own does not get ours: the chat tokens appended after its last id are dropped."""
    if ckpt.get("tokenizer") or ckpt.get("hf_model_type", "gpt2") == "gpt2":
        return ckpt.get("tokenizer") or gpt2_tokenizer()
    tok = bpe.hf_bpe_tokenizer(ckpt["hf_path"])
    tok["chat_format"] = hf_chat_format(ckpt["hf_path"], tok["special_tokens"])
    if tok["chat_format"]["name"] != "ours":
        specials = tok["special_tokens"]
        theirs = max(i for name, i in specials.items() if name not in CHAT_TOKENS)
        tok["special_tokens"] = {name: i for name, i in specials.items() if name not in CHAT_TOKENS or i <= theirs}
    return tok


def get_encoding(tok):
    """The encoding of a tokenizer dict (gpt2_tokenizer() or a checkpoint's "tokenizer"): a tiktoken.Encoding
    for byte-level BPE (bpe.HFByteLevelBPE around it where a tokenizer.json needs more), a
    bpe.SentencePieceBPE for a SentencePiece-style one (bpe.sp_bpe_tokenizer). It carries the tokenizer's
    chat format, which render_chat reads (this project's own unless the dict names the model's:
    hf_chat_format)."""
    enc = bpe.SentencePieceBPE(tok) if tok.get("type") == "sp_bpe" else bpe.tiktoken_encoding(tok)
    enc.chat_format = tok.get("chat_format") or {"name": "ours"}
    return enc


def encode(enc, text):
    """Encode user or dataset text. encode_ordinary never emits special tokens: a literal
    "<|endoftext|>" in the text becomes ordinary tokens, so data cannot forge a document boundary."""
    return enc.encode_ordinary(text)


def decode(enc, ids):
    """Decode ids to text, skipping ids the tokenizer does not know (the padded vocabulary tail)."""
    return enc.decode([i for i in ids if i < enc.n_vocab])


def special_id(enc, name):
    """The id of a special token such as "<|end|>", through tiktoken's public API (its table,
    enc._special_tokens, is private). A tokenizer without it, say a checkpoint trained before the
    chat tokens existed, is a DataError rather than a KeyError deep inside a loop."""
    if name not in enc.special_tokens_set:
        raise DataError(f"tokenizer {enc.name!r} has no special token {name}; it has {sorted(enc.special_tokens_set)}")
    return enc.encode_single_token(name)


def token_byte_lengths(enc, vocab_size):
    """Bytes each token id stands for, (V,); 0 for special and unused ids. Used for bits per byte."""
    lengths = np.zeros(vocab_size, dtype=np.int64)
    specials = {special_id(enc, name) for name in enc.special_tokens_set}
    for i in range(min(enc.n_vocab, vocab_size)):
        if i not in specials:
            lengths[i] = len(enc.decode_single_token_bytes(i))
    return lengths


def model_vocab_size(tok):
    """Rows of the model's embedding for this tokenizer: its ids rounded up to a multiple of 64, which
    keeps the output matmul fast (GPT-2: 50,261 ids -> 50,304; a trained 4,096 vocabulary -> 4,096)."""
    n_ids = max([*tok["special_tokens"].values(), *tok.get("added_tokens", {}).values()]) + 1
    return -(-n_ids // 64) * 64


def save_tokenizer(tok, path):
    """Write the tokenizer dict as JSON, plus its ranks as PATH.tiktoken (tiktoken's own file format)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(tok).encode()))
    if "ranks" in tok:  # a SentencePiece-style dict (bpe.sp_bpe_tokenizer) has a vocabulary instead
        atomic_write(os.path.splitext(path)[0] + ".tiktoken", lambda f: f.write(tok["ranks"].encode()))


def load_tokenizer(path):
    """A tokenizer dict from a file written by save_tokenizer, or from a checkpoint (file or directory)."""
    if path.endswith(".json"):
        with open(path) as f:
            tok = json.load(f)
    else:
        tok = load_checkpoint(os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path)["tokenizer"]
    need = ["name", "vocab", "merges", "special_tokens"] if tok.get("type") == "sp_bpe" else \
        ["name", "pat_str", "ranks", "special_tokens"]
    if not set(need) <= set(tok):
        raise DataError(f"{path}: not a tokenizer (needs {', '.join(need)})")
    return tok


# -----------------------------------------------------------------------------
# Reading text: the input files, and the documents or JSON records streamed out of them line by line

def list_input_files(path):
    """The .txt and .jsonl files at path (a file, a glob, or a directory searched recursively), sorted."""
    if glob.has_magic(path):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise DataError(f"{path}: no file matches this pattern")
        return files
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        return [path]
    if os.path.exists(os.path.join(path, "clean.jsonl")) and not is_prepared(path):
        raise DataError(f"{path}: an unfinished `prepare.py prepare` output (no manifest.json); run prepare again")
    files = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                   if name.endswith((".txt", ".jsonl")))
    if not files:
        raise DataError(f"{path}: directory holds no .txt or .jsonl files")
    return files


def iter_documents(path, field="text", separator="", on_bad=None):
    """Yield ("file:line", text) for each document of one file, streaming; the line is where it starts.

    A .jsonl file holds one document per line, in its `field` (the lines are read by iter_jsonl). A
    .txt file is one document, or many split on `separator`: "blank" for blank lines, any other string
    (e.g. "<|endoftext|>") literally. Bad input (a binary file, invalid UTF-8, a line that is not JSON
    or lacks the field, a file with no text) raises DataError naming file and line; given on_bad, the
    message goes to on_bad(message) instead and the document is skipped.
    """
    bad = on_bad or _raise
    if path.endswith(".jsonl"):
        for where, record in iter_jsonl(path, bad):
            if (text := _json_field(record, field, where, bad)) is not None:
                yield where, text
        return
    n_docs, doc, doc_line, doc_ok = 0, [], 1, True
    for lineno, line in _text_lines(path, bad):
        if line is None:  # unreadable and reported: the document holding it is dropped
            doc_ok = False
            continue
        if not separator:
            parts = [line]
        elif separator == "blank":
            parts = [line] if line.strip() else ["", ""]  # a blank line ends the document
        else:
            parts = line.split(separator)
        doc.append(parts[0])
        for part in parts[1:]:  # each separator ends the document so far
            if doc_ok and "".join(doc).strip():
                n_docs += 1
                yield f"{path}:{doc_line}", "".join(doc)
            doc, doc_line, doc_ok = [part], lineno + (separator == "blank"), True
    if doc_ok and "".join(doc).strip():
        n_docs += 1
        yield f"{path}:{doc_line}", "".join(doc)
    if n_docs == 0 and doc_ok:
        bad(f"{path}: file is empty")


def iter_jsonl(path, on_bad=None):
    """Yield ("file:line", record) for each non-blank line of a .jsonl file: the one JSON-lines reader of
    documents, chat, preference and prompt data, so bad input names its file and line the same way
    everywhere. Bad input raises DataError; given on_bad, the message goes to on_bad(message) instead
    and the line is skipped."""
    bad = on_bad or _raise
    if not path.endswith(".jsonl"):
        raise DataError(f"{path}: must be a .jsonl file (one JSON record per line)")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    empty = True  # only blank lines so far (an unreadable line, reported already, is not blank)
    for lineno, line in _text_lines(path, bad):
        empty = empty and line is not None and not line.strip()
        if not line or not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            bad(f"{path}:{lineno}: not valid JSON ({e.msg})")
            continue
        yield f"{path}:{lineno}", record
    if empty:
        bad(f"{path}: file is empty")


def _raise(message):
    """What bad input does without an on_bad: stop with a DataError."""
    raise DataError(message)


BOM = b"\xef\xbb\xbf"


def _text_lines(path, bad):
    """Yield (line number, line) of a UTF-8 text file, streaming: what both readers above read.

    Bad input goes to bad(message) and comes out as a line of None, so the caller drops what holds
    it: a line of invalid UTF-8, or a compressed or binary file (one None, at line 0, and no more).
    A UTF-8 byte-order mark (Windows editors write one) is not text and is skipped.
    """
    with open(path, "rb") as f:
        head = f.read(8192)
        if compressed := _compression(head):
            bad(f"{path}: a {compressed} file, not text: decompress it first")
            yield 0, None
            return
        if b"\0" in head:  # text never holds NUL bytes; images, archives and models nearly always do
            bad(f"{path}: binary file (NUL bytes), not text")
            yield 0, None
            return
        f.seek(3 if head.startswith(BOM) else 0)
        for lineno, raw in enumerate(f, 1):  # splits on b"\n" only: JSON strings may hold U+2028
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad(f"{path}:{lineno}: invalid UTF-8 (byte {e.start} of the line); is this a text file?")
                line = None
            yield lineno, line


def _compression(head):
    """The name of the compressed format a file's first bytes announce, or None."""
    magic = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd", b"PK\x03\x04": "zip"}
    return next((name for m, name in magic.items() if head.startswith(m)), None)


def _json_field(record, field, where, bad):
    """The string `field` of one JSON record, or None after reporting why it is missing."""
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        return bad(f"{where}: record has no string field {field!r}")
    try:
        record[field].encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's \ud800 escape: a half of a surrogate pair, which no text holds
        return bad(f"{where}: {field!r} holds a lone surrogate ({record[field][e.start]!r}), not valid Unicode")
    return record[field]


def read_documents(path, field="text"):
    """Yield the texts of one file (see iter_documents); bad input raises DataError."""
    for _, text in iter_documents(path, field):
        yield text


# -----------------------------------------------------------------------------
# Token arrays for pretraining: a prepared directory, or raw text tokenized once into a cache


def is_prepared(path):
    """True for a directory that `prepare.py prepare` finished: it holds manifest.json (written last)."""
    return os.path.isfile(os.path.join(path, "manifest.json"))


def read_manifest(data_dir):
    with open(os.path.join(data_dir, "manifest.json")) as f:
        return json.load(f)


def dataset_tokenizer(data_path):
    """The tokenizer a model trained from scratch on data_path uses: a prepared dataset's own; for raw
    text, a tokenizer.json in its directory (next to it, for a file), so `--data data/world/pretrain.jsonl`
    trains with the world's small vocabulary (a smaller embedding, and names in fewer tokens); else GPT-2's."""
    if is_prepared(data_path):
        return load_tokenizer(os.path.join(data_path, read_manifest(data_path)["tokenizer"]))
    folder = data_path if os.path.isdir(data_path) else os.path.dirname(data_path)
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return load_tokenizer(os.path.join(folder, "tokenizer.json"))
    return gpt2_tokenizer()


def load_prepared(data_dir, tok):
    """(train, val) token arrays of a prepared directory, checked against the model's tokenizer tok."""
    manifest = read_manifest(data_dir)
    if load_tokenizer(os.path.join(data_dir, manifest["tokenizer"])) != tok:
        raise DataError(f"{data_dir} was tokenized with {manifest['tokenizer_name']} but the model uses {tok['name']}; "
                        f"prepare it again with --tokenizer pointing at the checkpoint")
    splits = []
    for split in ("train", "val"):
        arrays = [np.memmap(os.path.join(data_dir, s["file"]), dtype=manifest["dtype"], mode="r")
                  for s in manifest["splits"][split]["shards"]]
        # one shard maps from disk; several are concatenated in memory (a sampler over shards would not need to)
        splits.append(arrays[0] if len(arrays) == 1 else np.concatenate(arrays or [np.empty(0, manifest["dtype"])]))
    return splits


def prepare_tokens(data_path, enc, cache_dir, val_fraction=0.1):
    """Tokenize data_path once into cache_dir/tokens.bin and return (train, val) memmaps.

    Each document is followed by <|endoftext|>. The last val_fraction of the token stream is the
    validation split (for a single text file: its end, as nanoGPT does for Shakespeare). A cache
    whose inputs (paths and contents: a SHA-256 of each file), tokenizer and split are unchanged, and
    whose tokens.bin holds every token meta.json counts, is reused.
    """
    files = list_input_files(data_path)
    digests = []
    for path in files:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digests.append([os.path.abspath(path), h.hexdigest()])
    key = hashlib.sha256(json.dumps(digests + [enc.name, enc.n_vocab, val_fraction]).encode()).hexdigest()
    meta_path, bin_path = os.path.join(cache_dir, "meta.json"), os.path.join(cache_dir, "tokens.bin")
    meta = None
    if os.path.exists(meta_path) and os.path.exists(bin_path):
        with open(meta_path) as f:
            meta = json.load(f)
        whole = meta.get("n_tokens", -1) * np.dtype(meta.get("dtype", "uint16")).itemsize == os.path.getsize(bin_path)
        if meta.get("key") != key or not whole:
            meta = None
    if meta is None:
        meta = _tokenize_files(files, enc, bin_path, key, val_fraction)
        # written last: a meta.json with the right key means tokens.bin is complete
        atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    tokens = np.memmap(bin_path, dtype=meta["dtype"], mode="r")
    return tokens[:meta["n_train"]], tokens[meta["n_train"]:]


def _tokenize_files(files, enc, bin_path, key, val_fraction):
    dtype = np.uint16 if enc.n_vocab <= 2 ** 16 else np.uint32  # 2 bytes per token when ids fit
    counts = {"tokens": 0, "docs": 0}

    def write_tokens(out):
        with tqdm(total=sum(os.path.getsize(f) for f in files), unit="B", unit_scale=True, desc="tokenizing") as bar:
            for path in files:
                # one document at a time: tiktoken's encode_ordinary_batch was 4x slower than this loop on
                # Shakespeare's 7,222 speeches (thread start-up per document; bench/bench_data.py)
                for text in read_documents(path):
                    ids = enc.encode_ordinary(text)
                    out.write(np.asarray(ids + [enc.eot_token], dtype=dtype).tobytes())  # raises when the disk
                    counts["tokens"] += len(ids) + 1                                    # is full (tofile did not)
                    counts["docs"] += 1
                bar.update(os.path.getsize(path))
        out.flush()
        written, want = os.fstat(out.fileno()).st_size, counts["tokens"] * np.dtype(dtype).itemsize
        if written != want:
            raise DataError(f"{bin_path}: wrote {written:,} of {want:,} bytes of tokens (disk full?)")

    os.makedirs(os.path.dirname(bin_path), exist_ok=True)
    try:
        atomic_write(bin_path, write_tokens)  # a temporary file renamed when whole: never a truncated cache
    except OSError as e:
        raise DataError(f"{bin_path}: cannot write the token cache: {e.strerror or e}") from None
    return {"key": key, "dtype": np.dtype(dtype).name, "n_tokens": counts["tokens"],
            "n_train": int(counts["tokens"] * (1 - val_fraction)), "n_docs": counts["docs"], "files": files,
            "tokenizer": enc.name}


# -----------------------------------------------------------------------------
# Instruction data: records -> chat messages -> token ids with the prompt masked

ROLES = ("system", "user", "assistant")


def _json_type(value):
    """The JSON name of a parsed value's type, for messages: null, a number, an object..."""
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _messages(value, where, field):
    """value as a list of {"role", "content"} messages (other keys dropped), or a DataError naming field."""
    if not isinstance(value, list) or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in value):
        raise DataError(f"{where}: {field!r} must be a list of {{role: system|user|assistant, content: str}}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _prompt(value, where, field="prompt"):
    """A prompt (a string: one user turn, or a message list) as messages ending with the user turn to answer."""
    if not isinstance(value, (str, list)):
        raise DataError(f"{where}: {field!r} must be a string or a list of messages, not {_json_type(value)}")
    messages = [{"role": "user", "content": value}] if isinstance(value, str) else _messages(value, where, field)
    if not messages or messages[-1]["role"] != "user":
        raise DataError(f"{where}: {field!r} must end with a user turn (the one a reply answers)")
    return messages


def to_messages(record, where, need_reply=True):
    """One training record as a list of {"role", "content"} messages. Three formats are read:
    Alpaca {"instruction", "input", "output"}, chat {"messages": [...]}, and {"prompt", "completion"}
    (the prompt a string or a message list). need_reply=False accepts a record that stops before
    the reply (no output, no completion, no assistant turn): a prompt to generate from."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: record is not a JSON object")
    if "messages" in record:
        messages = _messages(record["messages"], where, "messages")
    elif isinstance(record.get("instruction"), str):
        user = record["instruction"]
        if record.get("input") is not None and not isinstance(record["input"], str):
            raise DataError(f"{where}: 'input' must be a string, not {_json_type(record['input'])}")
        if isinstance(record.get("input"), str) and record["input"].strip():
            user += "\n\n" + record["input"]  # Alpaca's optional context follows the instruction
        messages = [{"role": "user", "content": user}] + _reply(record, "output", where)
    elif isinstance(record.get("prompt"), (str, list)):
        messages = _prompt(record["prompt"], where) + _reply(record, "completion", where)
    else:
        raise DataError(f"{where}: record fits none of Alpaca (instruction/input/output), chat (messages) "
                        "or prompt/completion")
    if need_reply and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: conversation has no assistant message to learn from")
    return messages


def _reply(record, field, where):
    """The assistant message of a record's reply field (Alpaca's output, a completion), or none."""
    if record.get(field) is not None and not isinstance(record[field], str):
        raise DataError(f"{where}: {field!r} must be a string, not {_json_type(record[field])}")
    return [{"role": "assistant", "content": record[field]}] if isinstance(record.get(field), str) else []


def read_chat_records(path):
    """All conversations of a .jsonl file, each a list of messages; errors name the file and line."""
    return [to_messages(record, where) for where, record in iter_jsonl(path)]


def render_chat(enc, messages, add_generation_prompt=False):
    """The chat template, and which tokens the model learns from.

    The template is the tokenizer's chat format (chat_format): this project's own for a model that has
    none (GPT-2, the world, a trained tokenizer): each message <|role|> content <|end|>; or the format an
    instruct model was trained with: ChatML (Qwen, SmolLM2), Llama 3's headers, Gemma's turns. ids are
    the tokens; labels[i] = ids[i] where the token belongs to an assistant reply (its content and the
    token that ends the turn, so the model learns to stop) and IGNORE_INDEX elsewhere: system and user
    text, and the role markers, are read, not predicted. With add_generation_prompt the ids end with
    the assistant's opening marker, where a reply should begin.

    Each piece of text is tokenized on its own, so a reply is the same tokens in any context (DPO and
    PPO split prompt and reply there). Hugging Face tokenizes the template as one string: the two agree
    (tested) except where a reply begins with a space or newline that BPE would join to the marker's
    last character, in ChatML (Llama 3 and Gemma strip each message).
    """
    ids, labels = [], []
    for piece, learn in _template_pieces(enc.chat_format, messages, add_generation_prompt):
        piece_ids = [special_id(enc, piece[1])] if isinstance(piece, tuple) else encode(enc, piece)
        ids += piece_ids
        labels += piece_ids if learn else [IGNORE_INDEX] * len(piece_ids)
    return ids, labels


def _template_pieces(fmt, messages, add_generation_prompt):
    """The chat template as (piece, learned) pairs: a piece is text, or ("special", name) for a special
    token. fmt is a tokenizer's "chat_format" dict (hf_chat_format)."""
    name, pieces = fmt["name"], []
    special = lambda t: (("special", t), False)  # noqa: E731
    if name == "unsupported":
        raise DataError(fmt["why"])
    if name == "llama3" or (name == "gemma" and fmt.get("bos")):
        pieces.append(special(fmt["bos"]))
    messages, first_user_prefix = list(messages), ""
    if name == "chatml" and fmt.get("default_system") is not None and messages and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": fmt["default_system"]})
    if name == "llama3":  # Llama 3 strips every message; 3.1+ always open with a system turn that dates itself
        messages = [{**m, "content": m["content"].strip()} for m in messages]
        if fmt.get("date"):
            system = messages.pop(0)["content"] if messages and messages[0]["role"] == "system" else ""
            date = fmt["date"] if fmt["date"] != "today" else time.strftime("%d %b %Y")  # as transformers' strftime_now
            messages.insert(0, {"role": "system",
                                "content": f"Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n{system}"})
    if name == "gemma" and messages and messages[0]["role"] == "system":  # Gemma has no system turn:
        if not fmt.get("system_in_first_user"):                            # Gemma 3 prepends it to the first
            raise DataError("this Gemma chat template has no system role (Gemma 2); drop the system message")
        first_user_prefix = messages.pop(0)["content"] + "\n\n"
    for i, m in enumerate(messages):
        reply = m["role"] == "assistant"
        if name == "ours":
            pieces += [special(f"<|{m['role']}|>"), (m["content"], reply), (("special", "<|end|>"), reply)]
        elif name == "chatml":
            pieces += [special("<|im_start|>"), (m["role"] + "\n", False), (m["content"], reply),
                       (("special", "<|im_end|>"), reply), ("\n", False)]
        elif name == "llama3":
            pieces += [special("<|start_header_id|>"), (m["role"], False), special("<|end_header_id|>"),
                       ("\n\n", False), (m["content"], reply), (("special", "<|eot_id|>"), reply)]
        elif name == "gemma":
            pieces += [special("<start_of_turn>"), ("model\n" if reply else "user\n", False),
                       ((first_user_prefix if i == 0 else "") + m["content"].strip(), reply),
                       (("special", "<end_of_turn>"), reply), ("\n", False)]
    if add_generation_prompt:
        pieces += {"ours": [special("<|assistant|>")],
                   "chatml": [special("<|im_start|>"), ("assistant\n", False)],
                   "llama3": [special("<|start_header_id|>"), ("assistant", False), special("<|end_header_id|>"),
                              ("\n\n", False)],
                   "gemma": [special("<start_of_turn>"), ("model\n", False)]}[name]
    return [(p, learn) for p, learn in pieces if p != ""]


CHAT_FORMATS = {  # name: (the special tokens it needs, the one that ends a turn)
    "ours": (CHAT_TOKENS, "<|end|>"),
    "chatml": (["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    "llama3": (["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>"),
    "gemma": (["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>"),
}


def end_of_turn(enc):
    """The id of the token that ends an assistant reply in this tokenizer's chat format: the stop token
    of every chat generation (<|end|>, ChatML's <|im_end|>, Llama 3's <|eot_id|>, Gemma's <end_of_turn>)."""
    fmt = enc.chat_format
    if fmt["name"] == "unsupported":
        raise DataError(fmt["why"])
    return special_id(enc, CHAT_FORMATS[fmt["name"]][1])


def start_error(ckpt, enc, path, want_chat):
    """Why a checkpoint is the wrong start for a stage, or None. A reward model starts no stage but
    reward.py; DPO and PPO (want_chat) start from a chat model: a stage after sft.py, or a Hugging Face
    directory whose tokenizer has a chat template (an instruct model), not from a base model."""
    stage = ckpt.get("stage") or ("instruct" if "source" in enc.chat_format else "base")
    if stage == "reward":
        return f"{path} is a reward model (stage reward): it scores answers; start from the policy it was trained for"
    if want_chat and not (ckpt.get("chat") or "source" in enc.chat_format):
        return f"{path} is a {stage} model, not a chat model: instruction-tune it first (python sft.py --init-from {path})"
    return None


def chat_token_ids(enc):
    """The ids of the chat format's special tokens (the rows LoRA fine-tuning trains too)."""
    fmt = enc.chat_format
    if fmt["name"] == "unsupported":
        raise DataError(fmt["why"])
    return [special_id(enc, t) for t in CHAT_FORMATS[fmt["name"]][0]]


def hf_chat_format(path, specials):
    """The chat format of a Hugging Face model directory, as a dict {"name", ...} for render_chat: read
    from the chat_template of tokenizer_config.json (or chat_template.jinja) by the markers it writes,
    else from the tokenizer's special tokens; "ours" when it has neither (a base model such as GPT-2).
    No Jinja here: a template that is none of ChatML, Llama 3 and Gemma 2/3 is "unsupported", with the
    reason render_chat gives (pretraining and plain sampling still work)."""
    template = None
    config = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            template = json.load(f).get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and os.path.isfile(os.path.join(path, "chat_template.jinja")):
        with open(os.path.join(path, "chat_template.jinja"), encoding="utf-8") as f:
            template = f.read()
    has = lambda name: all(t in specials for t in CHAT_FORMATS[name][0])  # noqa: E731
    if template is None:
        return {"name": next((n for n in ("chatml", "llama3", "gemma") if has(n)), "ours")}
    where = f"{config if os.path.isfile(config) else path}: chat_template"
    unsupported = lambda why: {"name": "unsupported", "why": f"{where}: {why}"}  # noqa: E731
    if "<think>" in template:
        return unsupported("a reasoning template (<think>, Qwen3) is not supported; fine-tune the base model, "
                           "or remove chat_template to use plain ChatML")
    nl = r"(?:\\n|\n)"  # a newline, written as \n in a Jinja string or as a real one
    if "<|im_start|>" in template and has("chatml"):
        default = re.search(r"<\|im_start\|>system" + nl + r"([^'\"{}<]+)<\|im_end\|>", template)
        return {"name": "chatml", "default_system": default.group(1).replace("\\n", "\n") if default else None,
                "source": where, "template": template}
    if "<|start_header_id|>" in template and has("llama3") and "<|begin_of_text|>" in specials:
        date = None
        if "Cutting Knowledge Date" in template:
            fixed = re.search(r"date_string\s*=\s*[\"']([^\"']+)[\"']", template)
            date = "today" if "strftime_now" in template else (fixed.group(1) if fixed else None)
            if date is None:
                return unsupported("a Llama 3 template whose date this renderer cannot read")
        return {"name": "llama3", "bos": "<|begin_of_text|>", "date": date, "source": where, "template": template}
    if "<start_of_turn>" in template and has("gemma"):
        return {"name": "gemma", "bos": "<bos>" if "<bos>" in specials and "bos_token" in template else None,
                "system_in_first_user": "first_user_prefix" in template, "source": where, "template": template}
    return unsupported("a template this project has no renderer for (it knows ChatML, Llama 3 and "
                       "Gemma 2/3); no Jinja is run here")


def fit_to_length(ids, labels, max_len, policy="truncate"):
    """Make an example at most max_len tokens, or return None to drop it.

    "truncate" cuts tokens from the left (the oldest turns of the prompt) and keeps the last reply
    whole; an example whose last reply alone does not fit is dropped. "drop" drops every example
    that is too long. Returns (ids, labels, what) with what in {"kept", "truncated", "dropped"}.
    """
    if len(ids) <= max_len:
        return ids, labels, "kept"
    if policy == "truncate":
        # one scan from the end: past any trailing prompt tokens, through the last reply, to the
        # <|assistant|> marker that opens it (the last prompt token before the last reply)
        i = len(labels) - 1
        while i >= 0 and labels[i] == IGNORE_INDEX:
            i -= 1
        while i >= 0 and labels[i] != IGNORE_INDEX:
            i -= 1
        if i >= 0 and len(ids) - i <= max_len:
            return ids[-max_len:], labels[-max_len:], "truncated"
    return None, None, "dropped"


def fit_pair(prompt, chosen, rejected, max_len):
    """A preference pair's token ids fitted to max_len tokens: the prompt cut from the left so that prompt
    + the longer response fits (the end of the prompt, the question, matters most); None when a
    response alone does not fit. Returns (prompt, chosen, rejected)."""
    room = max_len - max(len(chosen), len(rejected))
    if room < 1:
        return None
    return prompt[-room:], chosen, rejected


def pad_batch(examples, pad_id):
    """Right-pad (ids, labels) pairs into x, y tensors (B, T): y is labels shifted left by one, so
    y[t] is the token that should follow x[t]; padding gets IGNORE_INDEX and adds nothing to the loss."""
    T = max(len(ids) for ids, _ in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, labels) in enumerate(examples):
        n = len(ids) - 1
        x[row, :n] = torch.tensor(ids[:-1])
        y[row, :n] = torch.tensor(labels[1:])
    return x, y


def pack_examples(examples, block_size, pad_id):
    """Greedily concatenate (ids, labels) examples into rows of block_size + 1 tokens (an example is
    never split; a row that cannot take the next example is padded). Fewer pad tokens, so more of
    each batch is learning; the cost is that an example may attend to the one before it in its row
    (no cross-example mask), which is common practice for short examples."""
    rows, ids_row, labels_row = [], [], []
    for ids, labels in examples:
        if len(ids_row) + len(ids) > block_size + 1 and ids_row:
            rows.append((ids_row, labels_row))
            ids_row, labels_row = [], []
        ids_row, labels_row = ids_row + ids, labels_row + labels
    if ids_row:
        rows.append((ids_row, labels_row))
    full = block_size + 1
    return [(i + [pad_id] * (full - len(i)), lab + [IGNORE_INDEX] * (full - len(lab))) for i, lab in rows]


# -----------------------------------------------------------------------------
# Preference pairs and prompts: {"prompt": messages, "chosen": str, "rejected": str} (reward model, DPO),
# prompts alone (PPO), and the padded batches both need

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"  # the turn markers of Anthropic's HH-RLHF transcripts


def hh_messages(transcript):
    """An HH-RLHF transcript "\n\nHuman: q\n\nAssistant: a..." as chat messages, each turn's text stripped."""
    parts = re.split(r"\n\n(Human|Assistant):", transcript)  # ["", "Human", " q", "Assistant", " a", ...]
    return [{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
            for who, text in zip(parts[1::2], parts[2::2])]


def _response(value, where, field):
    """A reply given as a string, or as a list of one assistant message, as its text."""
    if isinstance(value, str):
        return value
    if (isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)
            and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str)):
        return value[0]["content"]
    raise DataError(f"{where}: {field!r} must be a string or a list of one assistant message")


def to_pair(record, where):
    """One preference record as {"prompt": messages ending with a user turn, "chosen": str, "rejected": str}.

    Three formats are read: plain {"prompt", "chosen", "rejected"} (prompt a string or message list,
    replies strings or one assistant message each); Anthropic HH-RLHF transcripts, either split
    ({"prompt": "\n\nHuman: q\n\nAssistant:", "chosen": " a", ...}) or whole ({"chosen", "rejected"},
    two transcripts that differ only after the last "\n\nAssistant:"); and OpenAI's preference format
    {"input": {"messages"}, "preferred_output": [message], "non_preferred_output": [message]}.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: record is not a JSON object")
    if "preferred_output" in record:
        inp = record.get("input")
        return {"prompt": _prompt(inp.get("messages") if isinstance(inp, dict) else None, where, "input.messages"),
                "chosen": _response(record["preferred_output"], where, "preferred_output"),
                "rejected": _response(record.get("non_preferred_output"), where, "non_preferred_output")}
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if "prompt" not in record and isinstance(chosen, str) and chosen.startswith(HUMAN):
        # whole transcripts: the prompt is their shared text up to and including the last "\n\nAssistant:"
        cut = chosen.rfind(ASSISTANT) + len(ASSISTANT)
        if (cut < len(ASSISTANT) or not isinstance(rejected, str) or rejected[:cut] != chosen[:cut]
                or rejected.rfind(ASSISTANT) + len(ASSISTANT) != cut):
            raise DataError(f"{where}: 'chosen' and 'rejected' transcripts do not share the prompt up to "
                            "the last '\\n\\nAssistant:'")
        record = {"prompt": chosen[:cut], "chosen": chosen[cut:], "rejected": rejected[cut:]}
    if not {"prompt", "chosen", "rejected"} <= record.keys():
        raise DataError(f"{where}: record fits none of prompt/chosen/rejected, HH-RLHF transcripts (chosen/rejected) "
                        "or OpenAI (input/preferred_output/non_preferred_output)")
    prompt, chosen, rejected = (record["prompt"], _response(record["chosen"], where, "chosen"),
                                _response(record["rejected"], where, "rejected"))
    if isinstance(prompt, str) and prompt.startswith(HUMAN):
        messages = hh_messages(prompt)
        if messages[-1] == {"role": "assistant", "content": ""}:
            messages.pop()  # the empty "\n\nAssistant:" the replies complete
        prompt, chosen, rejected = messages, chosen.strip(), rejected.strip()  # HH replies begin with a space
    pair = {"prompt": _prompt(prompt, where), "chosen": chosen, "rejected": rejected}
    if isinstance(record.get("kind"), str):  # a label to report accuracy by (the world's pairs have one)
        pair["kind"] = record["kind"]
    if isinstance(record.get("group"), (int, str)):  # comparisons of one prompt's ranked answers (reward.py)
        pair["group"] = record["group"]
    return pair


def read_preference_pairs(path):
    """The preference pairs of a .jsonl file (formats: see to_pair), and counts of what was skipped.

    A pair with an empty reply (HH-RLHF has chosen replies of one space) or two identical replies
    says nothing about which answer is better (identical ones give the DPO and reward losses a zero
    gradient), so it is skipped and counted, not an error. Returns (pairs, counts) with counts
    {"read", "kept", "identical", "empty"}.
    """
    pairs, counts = [], {"read": 0, "kept": 0, "identical": 0, "empty": 0}
    for where, record in iter_jsonl(path):
        pair = to_pair(record, where)
        chosen, rejected = pair["chosen"].strip(), pair["rejected"].strip()
        kind = "empty" if not chosen or not rejected else "identical" if chosen == rejected else "kept"
        counts["read"] += 1
        counts[kind] += 1
        if kind == "kept":
            pairs.append(pair)
    return pairs, counts


def group_comparisons(rows):
    """Preference rows (prompt_ids, chosen_ids, rejected_ids, kind, key) as prompts with their answers:
    [{"prompt", "answers": [ids, ...] each distinct answer once, "comparisons": [(winner, loser, kind)]}],
    rows with the same key (a file and its "group") together; a row with no group is its own prompt."""
    groups = {}
    for prompt, chosen, rejected, kind, key in rows:
        g = groups.setdefault(key, {"prompt": prompt, "answers": [], "index": {}, "comparisons": []})
        if len(prompt) < len(g["prompt"]):  # prompts cut to fit differently: keep the shortest for all
            g["prompt"] = prompt
        for answer in (chosen, rejected):
            if tuple(answer) not in g["index"]:
                g["index"][tuple(answer)] = len(g["answers"])
                g["answers"].append(answer)
        g["comparisons"].append((g["index"][tuple(chosen)], g["index"][tuple(rejected)], kind))
    return [{k: v for k, v in g.items() if k != "index"} for g in groups.values()]


def render_pair(enc, pair):
    """(prompt_ids, chosen_ids, rejected_ids) of a pair: the prompt through the chat template, ending
    with the assistant's marker, and each reply's tokens followed by the end of the turn (end_of_turn).
    prompt_ids + chosen_ids is exactly render_chat of the prompt plus the chosen assistant message."""
    prompt_ids, _ = render_chat(enc, pair["prompt"], add_generation_prompt=True)
    n = len(prompt_ids)

    def reply(text):  # the learned tokens of the conversation's last turn
        ids, labels = render_chat(enc, pair["prompt"] + [{"role": "assistant", "content": text}])
        return [i for i, label in zip(ids[n:], labels[n:]) if label != IGNORE_INDEX]
    return prompt_ids, reply(pair["chosen"]), reply(pair["rejected"])


def read_prompts(path):
    """The prompts of a .jsonl file for PPO rollouts, each a message list ending with a user turn.

    Any record read_chat_records or read_preference_pairs reads will do, and a conversation with no
    reply at all; a trailing assistant message (the dataset's own answer) is dropped.
    """
    prompts = []
    for where, record in iter_jsonl(path):
        if isinstance(record, dict) and ("chosen" in record or "preferred_output" in record):
            prompts.append(to_pair(record, where)["prompt"])
            continue
        messages = to_messages(record, where, need_reply=False)
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        prompts.append(_prompt(messages, where, "messages"))
    return prompts


def left_pad(seqs, pad_id):
    """Right-align token lists into (ids, pad_mask), both (B, T), T the longest; pad_mask is True on
    real tokens. Batched generation appends every row's next token in the same column, so the
    prompts must all end at the last one; the mask keeps attention off the padding."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)   # (B, T)
    pad_mask = torch.zeros((len(seqs), T), dtype=torch.bool)     # (B, T)
    for row, s in enumerate(seqs):
        ids[row, T - len(s):] = torch.tensor(s, dtype=torch.long)
        pad_mask[row, T - len(s):] = True
    return ids, pad_mask


def pad_responses(pairs, pad_id):
    """Right-pad (prompt_ids, response_ids) pairs into (ids, pad_mask, response_mask), each (B, T).

    ids is prompt + response; pad_mask is True on real tokens, response_mask on response tokens only
    (the ones whose log-probabilities the reward model, DPO and PPO score; the logits predicting the
    token at t sit at t - 1). Right padding keeps each prompt at position 0, as in training.
    """
    T = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(pairs), T), pad_id, dtype=torch.long)     # (B, T)
    pad_mask = torch.zeros((len(pairs), T), dtype=torch.bool)       # (B, T)
    response_mask = torch.zeros((len(pairs), T), dtype=torch.bool)  # (B, T)
    for row, (p, r) in enumerate(pairs):
        ids[row, :len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        pad_mask[row, :len(p) + len(r)] = True
        response_mask[row, len(p):len(p) + len(r)] = True
    return ids, pad_mask, response_mask


# -----------------------------------------------------------------------------
# Batches


class ExampleSampler:
    """Shuffled passes over a list of examples (SFT rows, preference pairs); the state (epoch,
    position) is saved in checkpoints, so --resume draws exactly the batches the run would have drawn."""

    def __init__(self, rows, batch_size, seed):
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.epoch, self.pos = 0, 0
        # the rows' fingerprint: a position means nothing on other rows (data edited in place, then --resume)
        self.digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()

    def next(self):
        order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        batch = []
        while len(batch) < self.batch_size:
            if self.pos == len(self.rows):  # a new epoch, a new order
                self.epoch, self.pos = self.epoch + 1, 0
                order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed + self.epoch))
            batch.append(self.rows[order[self.pos]])
            self.pos += 1
        return batch

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos, "digest": self.digest}

    def load_state_dict(self, state):
        if state.get("digest", self.digest) != self.digest:  # (checkpoints from before digests: unchecked)
            raise SystemExit("error: --resume: the training data is not what the checkpoint's run trained on "
                             "(the data changed), so the run cannot continue where it stopped")
        self.epoch, self.pos = state["epoch"], state["pos"]


class BatchSampler:
    """Random windows of block_size + 1 tokens: x is the window's first T tokens, y the last T.

    Reproducible: offsets come from a seeded torch.Generator whose state is saved in checkpoints.
    Every rank of a DDP job draws the same offsets for the whole global batch and keeps its own
    slice, so N processes see exactly the micro-batches one process would with N times the
    gradient accumulation.
    """

    def __init__(self, tokens, block_size, batch_size, seed, device):
        if len(tokens) < block_size + 1:
            raise DataError(f"only {len(tokens)} tokens in this split, need at least block_size + 1 = {block_size + 1}")
        self.tokens, self.block_size, self.batch_size, self.device = tokens, block_size, batch_size, device
        self.generator = torch.Generator().manual_seed(seed)

    def next(self, n_micro, rank=0, world_size=1):
        """This rank's n_micro (x, y) batches of the next optimizer step, each (B, T)."""
        offsets = torch.randint(len(self.tokens) - self.block_size, (world_size * n_micro, self.batch_size),
                                generator=self.generator)
        return [self.window_batch(o) for o in offsets[rank * n_micro:(rank + 1) * n_micro].tolist()]

    def window_batch(self, offsets):
        T = self.block_size
        w = torch.from_numpy(np.stack([self.tokens[o:o + T + 1] for o in offsets]).astype(np.int64))  # (B, T+1)
        x, y = w[:, :-1], w[:, 1:]  # the target at position t is the token at t + 1
        if self.device.type == "cuda":  # pinned memory lets the copy overlap with compute
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def eval_batches(self, n_batches):
        """n_batches fixed windows spread evenly over the split: the same ones at every evaluation."""
        span = len(self.tokens) - self.block_size - 1  # last valid start
        starts = np.linspace(0, span, n_batches * self.batch_size, dtype=np.int64).tolist()
        return [self.window_batch(starts[i:i + self.batch_size]) for i in range(0, len(starts), self.batch_size)]

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])




# -----------------------------------------------------------------------------
# The tiny world: does the model know the capitals, and does it say so when it does not?
#
# data/world (written by `python prepare.py world`) is a synthetic world of real countries: pretraining
# text states every capital, instruction data asks about some countries only, and world.json names the
# held-out ones (asked about nowhere in training) and invented ones (in no training data at all).
# Greedy replies are scored by which capitals they name, so no judge model is needed:
#   completion    "The capital of France is" continues with Paris: pretraining stored the fact
#   answer        a question about a held-out country is answered right: the fact can be extracted (SFT)
#   abstention    a question about an invented country is declined, not given a made-up capital
#   over_refusal  a question about a real held-out country is declined: what abstention costs
#   format        a chat reply ends with <|end|> within the token budget: the model learned to stop

# What a refusal says, matched in lower case. Short on purpose: prepare.py's DECLINE ("I don't know of
# a country called X.") and the usual ways a model rephrases it, nothing that a real answer would say.
DECLINE_PHRASES = ("don't know", "do not know", "not aware of", "no country called")


def load_world(path=os.path.join(DATA_DIR, "world")):
    """A world's world.json as a dict (countries, heldout, invented, readme), plus "capital_of":
    {country: capital}, the lookup every metric needs."""
    file = os.path.join(path, "world.json")
    if not os.path.isfile(file):
        raise DataError(f"{file}: no such file; write the world with `python prepare.py world`")
    with open(file) as f:
        world = json.load(f)
    missing = {"countries", "heldout", "invented", "readme"} - set(world)
    if missing:
        raise DataError(f"{file}: missing {', '.join(sorted(missing))}")
    world["capital_of"] = dict(world["countries"])
    unknown = set(world["heldout"] + world["readme"]) - world["capital_of"].keys()
    if unknown:
        raise DataError(f"{file}: heldout/readme countries not in countries: {', '.join(sorted(unknown))}")
    return world


def world_of(data_path):
    """The world directory a stage's --data belongs to (world.json beside the file, or in the
    directory), or None: a stage trained on the world reports the world's metrics at its end."""
    folder = data_path if os.path.isdir(data_path) else os.path.dirname(os.path.abspath(data_path))
    return folder if os.path.isfile(os.path.join(folder, "world.json")) else None


def names_capitals(text, capitals):
    """The set of capitals named in text. Whole names only ("Male" is not in "female"; a name ends at
    a non-word character, so "Nuku'alofa" and "Port-au-Prince" are whole names), case-sensitive (capitals
    are proper nouns), and longest first: regex alternatives are tried in order at each position, so
    "Guatemala City" is read whole before any shorter name could match inside it."""
    names = sorted(set(capitals), key=len, reverse=True)
    if not names:
        return set()
    return set(re.findall(r"(?<!\w)(?:" + "|".join(map(re.escape, names)) + r")(?!\w)", text))


def is_right(reply, capital, capitals):
    """True when the reply names the right capital and no other (two cities are a guess, not an
    answer). Where a capital shares its country's name, repeating the country is fine: "The capital
    of Monaco is Monaco." names one capital."""
    return names_capitals(reply, {capital, *capitals}) == {capital}


def declines(reply, capitals):
    """True when the reply declines (one of DECLINE_PHRASES, any case) and names no capital:
    "I don't know, maybe Paris" is a guess, not a refusal."""
    text = reply.lower()
    return any(phrase in text for phrase in DECLINE_PHRASES) and not names_capitals(reply, capitals)


def one_short_sentence(text, max_words=16):
    """True when text, stripped, is a single sentence of at most max_words words that ends with . ! or ?
    ("The capital of Peru is Lima." yes; "... is Lima. It is big." and a reply cut off mid-sentence no)."""
    text = text.strip()
    end = re.search(r"[.!?](?=\s|$)", text)
    return end is not None and end.end() == len(text) and len(text.split()) <= max_words


def world_annotator(world):
    """The world's annotator: a function (prompt messages, answers) -> grades, one per answer, higher is
    better and equal grades are ties (a ranking with ties). It is the person of the guide's RLHF step 1 who
    compares the model's answers, and it knows every capital and which countries do not exist:

      a question about a real country (the last user turn names one):
        2  its capital and no other city, in one short sentence     "The capital of Peru is Lima."
        1  its capital and no other city, said at length or cut off
        0  anything else: a wrong capital, another country's, a ramble, a refusal of a real country
      a question about a country that does not exist (it names no real country):
        2  a refusal that names no city and no name the question did not hold
                                                                    "I don't know of a country called Kalora."
        1  another refusal                                          "I don't know of a country in Europe."
        0  anything else: an invented capital, a real country's capital, a ramble

    reward.py collects its rankings of the policy's own answers and trains the reward model on them;
    ppo.py logs its mean grade as the gold reward next to the reward model's score (and --reward world
    uses it as the reward). Any function of this shape can take its place (reward.py --annotator).
    """
    capital_of = world["capital_of"]
    capitals = set(capital_of.values())

    def grade(question, answer):
        named = names_capitals(question, capital_of)  # the real countries asked about
        if named:
            country = max(named, key=len)  # "Niger" inside "Nigeria" is not a whole word; the longest is the country
            if not is_right(answer, capital_of[country], capitals):
                return 0
            return 2 if one_short_sentence(answer) else 1
        if not declines(answer, capitals):
            return 0
        names = set(re.findall(r"[A-Z][\w'-]*", answer)) - {"I"}  # the proper nouns of the refusal
        return 2 if names and names <= set(re.findall(r"[\w'-]+", question)) else 1

    return lambda messages, answers: [grade(messages[-1]["content"], answer) for answer in answers]


def load_annotator(spec, prompts_path):
    """reward.py's --annotator: "world" (world_annotator of the world the prompts belong to) or "file.py:name" /
    "module:name", a function (prompt messages, answers) -> one grade per answer, higher is better."""
    if spec == "world":
        world_dir = world_of(prompts_path)
        if world_dir is None:
            raise ValueError(f"--annotator world needs the world's prompts (world.json beside {prompts_path}); "
                             "give --annotator FILE.py:FUNCTION for other prompts")
        return world_annotator(load_world(world_dir))
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ValueError(f"--annotator {spec!r}: give 'world', FILE.py:FUNCTION or MODULE:FUNCTION")
    if where.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location("annotator", where)
        if module_spec is None or not os.path.isfile(where):
            raise ValueError(f"--annotator: no such file {where}")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    if not callable(getattr(module, name, None)):
        raise ValueError(f"--annotator: {where} has no function {name}")
    return getattr(module, name)


def completes_with(text, capital):
    """True when a continuation, stripped, begins with the capital as a whole word (" Paris." yes,
    " Parisian" no): the first thing a base model says is its answer; what follows is free text."""
    text = text.strip()
    return text.startswith(capital) and not text[len(capital):len(capital) + 1].isalpha()


def _share(flags):
    """The fraction of True in flags; None for no flags (a world with no invented names, say)."""
    return sum(flags) / len(flags) if flags else None


def generate_reply_ids(model, prompts, stop, device, autocast, batch_size, max_new_tokens, temperature=0.0,
                       generator=None):
    """Continuations of token prompts, batch_size per generate call, greedy (temperature 0) or sampled
    (with generator: the same generator state, the same replies): (the token ids before stop, whether
    stop came within max_new_tokens) for each prompt, in order."""
    replies = []
    for i in range(0, len(prompts), batch_size):
        idx, pad_mask = left_pad(prompts[i:i + batch_size], stop)  # (B, Tp); any pad id, the mask hides it
        with autocast():
            out = model.generate(idx.to(device), max_new_tokens, temperature=temperature, stop_token=stop,
                                 pad_mask=pad_mask.to(device), generator=generator)  # (B, Tp + new)
        for row in out[:, idx.size(1):].tolist():
            n = row.index(stop) if stop in row else len(row)
            replies.append((row[:n], n < len(row)))
    return replies


def generate_replies(model, enc, prompts, stop, device, autocast, batch_size, max_new_tokens, temperature=0.0,
                     generator=None):
    """generate_reply_ids' replies as text: (the text before stop, whether stop came) for each prompt."""
    return [(decode(enc, ids), stopped) for ids, stopped in generate_reply_ids(
        model, prompts, stop, device, autocast, batch_size, max_new_tokens, temperature, generator)]


def score_sequences(scores_of, rows, pad_id, device):
    """A reward model's scores of (prompt_ids, response_ids) rows: the score head at each row's last real
    token, (N,). One forward pass for all rows, right-padded (causal attention never sees the padding).
    scores_of: the reward model's model.scores, or its data-parallel wrapper (model.data_parallel)."""
    ids, pad_mask, _ = pad_responses(rows, pad_id)                       # (N, T) each
    return last_token(scores_of(ids.to(device)), pad_mask.to(device))   # (N, T) -> (N,)


def score_answers(model, prompts, answers, enc, rt, batch_size=128):
    """A reward model's scores (N,), fp32, of answer texts to prompt token lists: each answer ends with
    <|end|> as in training, each prompt is cut to fit (fit_pair), batch_size rows per forward pass.
    rt: model.setup_runtime's device and autocast."""
    end, rows = end_of_turn(enc), []
    for p, a in zip(prompts, answers):
        fit = fit_pair(p, encode(enc, a) + [end], [], model.config.block_size)
        if fit is None:
            raise ValueError(f"an answer of {len(encode(enc, a)) + 1} tokens does not fit the reward model's "
                             f"context of {model.config.block_size}: {a[:40]!r}...")
        rows.append(fit[:2])
    with torch.no_grad(), rt.autocast():
        return torch.cat([score_sequences(model.scores, rows[i:i + batch_size], enc.eot_token, rt.device).float()
                          for i in range(0, len(rows), batch_size)])


def _world_prompts(enc, world, chat):
    """evaluate_world's prompts: (questions, their ids, the completion prompts' ids, the stop token). A chat
    model gets each question as one user turn of its template; a base model, as plain text."""
    heldout, invented = world["heldout"], world["invented"]
    unseen = world.get("unseen_questions", [])  # phrasings in no training file, one per country in turn
    asked = heldout + invented + world["readme"] + invented[:2]  # the questions, in this order
    questions = [f"What is the capital of {c}?" for c in asked]
    if unseen:
        questions += [unseen[i % len(unseen)].format(F=c) for i, c in enumerate(heldout + invented)]
    if chat:
        question_ids = [render_chat(enc, [{"role": "user", "content": q}], add_generation_prompt=True)[0]
                        for q in questions]
    else:
        question_ids = [encode(enc, q) for q in questions]
    completion_ids = [encode(enc, f"The capital of {c} is") for c in world["capital_of"]]
    return questions, question_ids, completion_ids, end_of_turn(enc) if chat else enc.eot_token


def world_context_error(enc, data_path, chat, block_size):
    """Why a model of block_size positions could not take the world evaluation that ends a stage trained on
    data_path, or None: checked before training, so that a short context fails at once, not at the end."""
    world_dir = world_of(data_path)
    if world_dir is None:
        return None
    _, question_ids, completion_ids, _ = _world_prompts(enc, load_world(world_dir), chat)
    longest = max(map(len, completion_ids + question_ids), default=0)
    if longest > block_size:
        return f"the world's evaluation prompts take up to {longest} tokens, more than the context of {block_size}"
    return None


def evaluate_world(model, enc, world, chat, device, autocast=contextlib.nullcontext, batch_size=64,
                   max_new_tokens=24):
    """The world's metrics (see the top of this section) from greedy replies, and a few examples.

    completion: every country's "The capital of {country} is" as plain text (never the chat template:
    it tests what pretraining stored), continued until <|endoftext|>. The other metrics ask "What is
    the capital of {country}?": a chat model (chat=True) as one user turn of the chat template, its
    reply ending at <|end|>; a base model as plain text, its answer the first line it writes. "format"
    is None for a base model. examples: the replies to the README countries and two invented ones.
    autocast: a function returning a fresh context (Runtime.autocast).
    """
    capital_of, heldout, invented = world["capital_of"], world["heldout"], world["invented"]
    capitals = set(capital_of.values())
    questions, question_ids, completion_ids, stop = _world_prompts(enc, world, chat)
    longest = max(map(len, completion_ids + question_ids), default=0)
    if longest > model.config.block_size:
        raise ValueError(f"world prompts take up to {longest} tokens but the model's block_size is "
                         f"{model.config.block_size}; evaluate a model with a longer context")

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            completions = generate_replies(model, enc, completion_ids, enc.eot_token, device, autocast,
                                           batch_size, max_new_tokens)
            answers = generate_replies(model, enc, question_ids, stop, device, autocast, batch_size, max_new_tokens)
    finally:
        model.train(was_training)
    if not chat:  # a base model writes on after its answer: keep the first line (past leading blanks)
        answers = [(text.lstrip().split("\n")[0], stopped) for text, stopped in answers]

    n_h, n_i = len(heldout), len(invented)
    real, fake, shown = answers[:n_h], answers[n_h:n_h + n_i], n_h + n_i  # shown: where examples start
    n_shown = len(world["readme"]) + len(invented[:2])
    real_unseen = answers[shown + n_shown:shown + n_shown + n_h]
    fake_unseen = answers[shown + n_shown + n_h:]
    return {
        "completion": _share([completes_with(text, capital_of[c]) for (text, _), c in zip(completions, capital_of)]),
        "answer": _share([is_right(text, capital_of[c], capitals) for (text, _), c in zip(real, heldout)]),
        "abstention": _share([declines(text, capitals) for text, _ in fake]),
        "over_refusal": _share([declines(text, capitals) for text, _ in real]),
        "format": _share([stopped for _, stopped in real + fake]) if chat else None,
        # the same questions in the phrasings no training file uses (None for a world without them)
        "answer_unseen": _share([is_right(text, capital_of[c], capitals) for (text, _), c in zip(real_unseen, heldout)]),
        "abstention_unseen": _share([declines(text, capitals) for text, _ in fake_unseen]),
        "over_refusal_unseen": _share([declines(text, capitals) for text, _ in real_unseen]),
        "distinct_invented_replies": len({text for text, _ in fake}),  # one fixed reply to all is an exploit
        "n_countries": len(capital_of), "n_heldout": n_h, "n_invented": n_i,
        "examples": [{"prompt": q, "reply": text} for q, (text, _) in
                     zip(questions[shown:shown + n_shown], answers[shown:shown + n_shown])],
    }


def world_report(model, enc, data_path, chat, device, autocast, out_dir):
    """A stage's closing evaluation: when its --data belongs to a world (world_of), evaluate_world on it,
    written to OUT/eval.json; returns the metrics, or None for other data."""
    world_dir = world_of(data_path)
    if world_dir is None:
        return None
    scores = evaluate_world(model, enc, load_world(world_dir), chat, device, autocast)
    atomic_write(os.path.join(out_dir, "eval.json"), lambda f: f.write(json.dumps(scores, indent=1).encode()))
    return scores


def format_world_metrics(metrics):
    """evaluate_world's metrics on one line, e.g. "completion 97.5% | answer 80.0% | abstention 65.0% |
    over-refusal 2.5% | format 100.0%", then the unseen phrasings' "unseen: answer 75.0% | ..."; a metric
    that does not apply (None or absent) is left out."""
    names = ("completion", "answer", "abstention", "over_refusal", "format")
    line = " | ".join(f"{name.replace('_', '-')} {100 * metrics[name]:.1f}%" for name in names
                      if metrics.get(name) is not None)
    unseen = " | ".join(f"{name.replace('_', '-')} {100 * metrics[name + '_unseen']:.1f}%"
                        for name in names[1:4] if metrics.get(name + "_unseen") is not None)
    return line + (f" || unseen phrasings: {unseen}" if unseen else "")
