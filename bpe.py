"""
Byte-pair encoding: tokenizer files in and out.

Hugging Face's tokenizer files, read into and written from the plain tokenizer dict that travels inside
every checkpoint (data.gpt2_tokenizer() is one). Kept out of data.py so that it reads as the data path:
data.py keeps the small API every stage calls (gpt2_tokenizer, get_encoding, encode, decode,
checkpoint_tokenizer), and its get_encoding builds the encoders defined here. Reads a model directory's
tokenizer.json, or vocab.json + merges.txt (and tokenizer_config.json: added tokens, BOS, EOS); writes
tokenizer.json + tokenizer_config.json for an exported model. Imports only model.atomic_write of this
project (data.py imports bpe, so bpe cannot import data.py): data.py takes EOT, CHAT_TOKENS and DataError
from here.

  byte-level BPE     hf_bpe_tokenizer: GPT-2, Llama 3, Qwen, DeepSeek, SmolLM2 as a dict tiktoken runs,
                     refused by name where it would not encode exactly as tokenizers does (_check_bpe_rule)
  its encoding       tiktoken_encoding: tiktoken, wrapped in HFByteLevelBPE for the tokenizers steps around it
  export             save_hf_tokenizer: any tokenizer dict back to files that transformers loads
  SentencePiece BPE  sp_bpe_tokenizer and SentencePieceBPE: Llama 2, Mistral, TinyLlama, Gemma (byte
                     fallback, ▁ for spaces), encoded by a small hand-written BPE
"""

import base64
import glob
import heapq
import json
import os
import re
import unicodedata

import regex
import tiktoken

from model import atomic_write

EOT = "<|endoftext|>"
# Chat roles for instruction tuning, as special tokens. They live in ids no text can produce
# (encode_ordinary never emits them), so neither a dataset nor a chat user can forge a turn.
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# GPT-2's ranks in tiktoken's file format, bundled (data.gpt2_tokenizer reads them too)
GPT2_RANKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tokenizer", "gpt2.tiktoken")


class DataError(Exception):
    """Bad input data; the message names the file (and line) and fits on one line."""


# -----------------------------------------------------------------------------
# Hugging Face byte-level BPE in: tokenizer.json, or vocab.json + merges.txt


def _byte_of_char():
    """GPT-2's byte-level alphabet, reversed: the printable character each byte is written as in a
    byte-level BPE's vocabulary (printable ASCII and Latin-1 stand for themselves, the other bytes are
    shifted to 256 and up) -> the byte."""
    shown = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = dict(zip(shown, shown))
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + len(chars) - len(shown)
    return {chr(c): b for b, c in chars.items()}


def hf_bpe_tokenizer(path, pat_str=None):
    """A Hugging Face byte-level BPE (tokenizer.json, or vocab.json + merges.txt) as a tokenizer dict that
    encodes exactly as Hugging Face's tokenizers library does, or a DataError naming what it cannot do.

    tiktoken does the two steps that cost time, the last regex and BPE: each vocabulary string back to
    its bytes, its id as the rank. What a tokenizer.json adds around them is kept in the dict and run by
    HFByteLevelBPE (data.get_encoding): its normalizer ("normalizer", NFC for Qwen), the Split steps before
    the last ("pre_splits", DeepSeek V3 has three), added tokens that are not special ("added_tokens",
    cut out of the text as tokenizers does), and the tokens BPE never builds ("bpe_splits", below).
    Special added tokens, and this project's chat tokens (and <|endoftext|>) after the last id where
    the model has none, are special tokens: ordinary text never produces them. The rest of the file
    (merges, post-processor with its BOS, decoder) is kept under "hf" for save_hf_tokenizer.

    Two rules, one result (checked, see _check_bpe_rule): tiktoken merges the adjacent pair whose joined
    token has the lowest id, tokenizers the pair listed first in the merges. A SentencePiece-style BPE
    (byte fallback, ▁ for spaces: Llama 2, Mistral) goes to sp_bpe_tokenizer. vocab.json + merges.txt
    do not say the regex: pat_str gives it (GPT-2's own vocabulary needs none)."""
    file = os.path.join(path, "tokenizer.json")
    if os.path.isfile(file):
        with open(file, encoding="utf-8") as f:
            spec = json.load(f)
        bpe = spec.get("model") or {}
        pre = _hf_steps(spec.get("pre_tokenizer"), "pretokenizers")
        byte_level = any(p.get("type") == "ByteLevel" for p in pre)
        if bpe.get("type") == "BPE" and (bpe.get("byte_fallback") or not byte_level):
            return sp_bpe_tokenizer(spec, file)
        if bpe.get("type") != "BPE":
            raise DataError(f"{file}: model {bpe.get('type')!r} is not supported (a SentencePiece unigram or "
                            f"WordPiece model; only byte-level and SentencePiece-style BPE are)")
        return _byte_level_tokenizer(spec, file)
    vocab_file, merges_file = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    if os.path.isfile(vocab_file) and os.path.isfile(merges_file):
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
        with open(merges_file, encoding="utf-8") as f:
            merges = [line.rstrip("\n") for line in f if line.strip() and not line.startswith("#version")]
        config = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(config):
            with open(config, encoding="utf-8") as f:
                extra = [t["content"] for t in (json.load(f).get("added_tokens_decoder") or {}).values()]
            if set(extra) - set(vocab) or os.path.isfile(os.path.join(path, "added_tokens.json")):
                raise DataError(f"{config}: added tokens outside vocab.json, which this reader does not take; write "
                                f"a tokenizer.json (transformers: AutoTokenizer.from_pretrained(path)"
                                f".save_pretrained(path))")
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
        if pat_str is None and _gpt2_ranks() == _vocab_ranks(vocab, {EOT}, vocab_file):
            pre = {**byte_level, "use_regex": True}  # GPT-2's own vocabulary: its regex is ByteLevel's
        elif pat_str is None:
            raise DataError(f"{vocab_file}: vocab.json + merges.txt do not say the pre-tokenization regex; pass it "
                            f"(hf_bpe_tokenizer(path, pat_str=...)), or write a tokenizer.json (transformers: "
                            f"AutoTokenizer.from_pretrained(path).save_pretrained(path))")
        else:
            pre = {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pat_str}, "behavior": "Isolated", "invert": False}, byte_level]}
        eot = {"id": vocab.get(EOT), "content": EOT, "single_word": False, "lstrip": False, "rstrip": False,
               "normalized": False, "special": True}
        spec = {"added_tokens": [eot] if EOT in vocab else [], "pre_tokenizer": pre,
                "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
                "model": {"type": "BPE", "vocab": vocab, "merges": merges}}
        return _byte_level_tokenizer(spec, merges_file)
    if glob.glob(os.path.join(path, "*.model")):
        raise DataError(f"{path}: a SentencePiece .model without tokenizer.json; write one with transformers: "
                        f"AutoTokenizer.from_pretrained(path).save_pretrained(path)")
    raise DataError(f"{path}: no tokenizer.json, nor vocab.json and merges.txt")


# The regex of tokenizers' ByteLevel pre-tokenizer (GPT-2's; tiktoken's r50k_pat_str is the same with
# possessive quantifiers)
BYTE_LEVEL_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def _hf_steps(node, key):
    """The steps of a tokenizer.json normalizer or pre-tokenizer: none, one, or a Sequence's, flattened."""
    if node is None:
        return []
    return [s for n in node[key] for s in _hf_steps(n, key)] if node.get("type") == "Sequence" else [node]


def _vocab_ranks(vocab, skip, where):
    """A byte-level vocabulary {printable string: id} as tiktoken's ranks {bytes: id}, less the strings in skip."""
    byte_of = _byte_of_char()
    alphabet = "".join(byte_of)
    strange = next((t for t in vocab if t.strip(alphabet) and t not in skip), None)
    if strange is not None:
        raise DataError(f"{where}: vocabulary entry {strange!r} is not byte-level BPE")
    to_latin1 = str.maketrans({ch: chr(b) for ch, b in byte_of.items()})  # then each character is its byte
    return {t.translate(to_latin1).encode("latin-1"): i for t, i in vocab.items() if t not in skip}


def _byte_level_tokenizer(spec, where):
    """hf_bpe_tokenizer's dict from a parsed byte-level tokenizer.json; each field it cannot run exactly
    is refused by name."""
    refuse = lambda what, why="is not supported": DataError(f"{where}: {what} {why}")  # noqa: E731
    bpe = spec["model"]
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if bpe.get(key):
            raise refuse(f"model.{key} {bpe[key]!r}")
    # normalizer: Unicode normal forms (Qwen's NFC), in order; tokenizers applies them between added tokens
    normalizer = [n.get("type") for n in _hf_steps(spec.get("normalizer"), "normalizers")]
    unknown = sorted(set(normalizer) - {"NFC", "NFD", "NFKC", "NFKD"})
    if unknown:
        raise refuse(f"normalizer {unknown}", "is not supported (NFC, NFD, NFKC and NFKD are)")
    # pre-tokenizer: Split and Digits steps (regexes, each cutting the pieces of the one before), then ByteLevel
    *splits, byte_level = _hf_steps(spec.get("pre_tokenizer"), "pretokenizers") or [{}]
    if byte_level.get("type") != "ByteLevel":
        raise refuse(f"pre-tokenizer {byte_level.get('type')} after ByteLevel")
    use_regex = byte_level.get("use_regex", True)
    patterns, keep_gaps = [], True  # keep_gaps: tokenizers keeps the text between the last regex's matches
    for k, step in enumerate(splits):
        last = k == len(splits) - 1 and not use_regex
        if step.get("type") == "Digits":  # Rust's char::is_numeric is \p{N}
            patterns.append(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
            continue
        if step.get("type") != "Split":
            raise refuse(f"pre-tokenizer {step.get('type')} before ByteLevel")
        if "Regex" not in step.get("pattern", {}):
            raise refuse(f"Split on {step.get('pattern')}", "is not supported (a Regex pattern is)")
        # Isolated: the matches and the text between them are pieces (invert swaps which is which: the same
        # pieces). Removed with invert (MiniMax): only the matches are, as tiktoken's own regex gives them
        if step.get("behavior") == "Removed" and step.get("invert") and last:
            keep_gaps = False
        elif step.get("behavior") != "Isolated":
            raise refuse(f"Split {step.get('behavior')} (invert {step.get('invert')})", "is not supported here")
        patterns.append(step["pattern"]["Regex"])
    if use_regex:
        patterns.append(BYTE_LEVEL_REGEX)  # it matches every character: no text between matches
    prefix_space = byte_level.get("add_prefix_space", True)  # trim_offsets changes offsets only, never ids
    if prefix_space and splits:
        raise refuse("ByteLevel add_prefix_space after a Split", "is not supported (it adds a space to every piece)")
    if not patterns:
        pat_str = r"(?s:.+)"  # no regex: each text between added tokens is one piece
    elif keep_gaps and not use_regex:
        # tiktoken drops what its regex does not match, tokenizers keeps it: so the regex here also matches
        # the text up to the last regex's next match (or the end)
        pat_str = f"(?m){patterns[-1]}|(?s:.+?)(?=(?:{patterns[-1]})|\\z)"
    else:
        pat_str = patterns[-1] if use_regex else "(?m)" + patterns[-1]  # ^ and $ are line anchors in tokenizers
    # added tokens: special ones never come from text; the others are cut out of it before BPE
    specials, added, normalized = {}, {}, []
    for t in spec.get("added_tokens", []):
        if not t["content"]:
            raise refuse(f"added token {t['id']}", "is empty")
        if not t.get("special") and (t.get("lstrip") or t.get("rstrip") or t.get("single_word")):
            raise refuse(f"added token {t['content']!r} with lstrip, rstrip or single_word")
        (specials if t.get("special") else added)[t["content"]] = t["id"]
        if t.get("normalized", not t.get("special")):  # matched after the normalizer, in a second pass
            normalized.append(t["content"])
    vocab, merges = bpe["vocab"], [m.split(" ") if isinstance(m, str) else list(m) for m in bpe.get("merges", [])]
    ranks = _vocab_ranks(vocab, {**specials, **added}, where)
    missing = set(range(256)) - {b[0] for b in ranks if len(b) == 1}
    if missing - {0xC0, 0xC1, *range(0xF5, 0x100)}:  # bytes that UTF-8 text never has may be missing
        raise refuse("vocabulary", f"lacks the single bytes {sorted(missing)}")
    in_ranks = {t: i for t, i in vocab.items() if t not in specials and t not in added}
    bpe_splits = _check_bpe_rule(in_ranks, merges, bool(bpe.get("ignore_merges")), where)
    for name in [EOT] + CHAT_TOKENS:
        if name not in specials and name not in added:
            specials[name] = max([*ranks.values(), *specials.values(), *added.values()]) + 1
    lines = "".join(f"{base64.b64encode(b).decode()} {i}\n" for b, i in sorted(ranks.items(), key=lambda kv: kv[1]))
    tok = {"name": os.path.basename(os.path.dirname(os.path.abspath(where))), "pat_str": pat_str, "ranks": lines,
           "special_tokens": specials,
           "hf": {**{k: spec.get(k) for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder")},
                  "added_tokens": spec.get("added_tokens", []),
                  "model": {k: v for k, v in bpe.items() if k != "vocab"}}}
    extras = {"normalizer": normalizer, "pre_splits": patterns[:-1], "added_tokens": added,
              "normalized_added": normalized if added else [], "add_prefix_space": prefix_space,
              "bpe_splits": {str(i): ids for i, ids in bpe_splits.items()}}
    tok.update({k: v for k, v in extras.items() if v})
    return tok


def _check_bpe_rule(vocab, merges, ignore_merges, where):
    """Check that tiktoken's rule gives the tokens tokenizers' BPE gives, for every text; return the
    tokens BPE never builds from their own text, {id: the ids it builds instead}.

    tokenizers merges, again and again, the adjacent pair listed first in the merges; tiktoken the
    adjacent pair whose joined token has the lowest id; both take the leftmost of equals, and tiktoken
    takes a whole piece that is a token as that token (tokenizers does so with ignore_merges). No merge
    reaches into a token once made, so the steps inside it are the steps its own text takes. Checked:
      1. each merge joins two vocabulary tokens into a third, and the merges come in order of the id
         they make; several may make one id (Llama 3 lists every split of a token into two, " rozh" +
         "od" -> " rozhod" among them, though " rozh" has the higher id). Then of two listed pairs,
         tokenizers takes first the one tiktoken takes first, unless both make the same token.
      2. each token's own text gives the same tokens both ways. Were the rules to part on some text by
         tiktoken joining x and y, no merge, the text of x + y would reach x, y alike and part there
         too: one token one way, two the other.
      3. without ignore_merges, tokenizers gives a token whose own text BPE does not build as the
         tokens BPE does build; tiktoken gives the token (it is in its ranks): these are returned, and
         HFByteLevelBPE swaps them in (such a token is never built inside a longer text, only taken whole).
    Left open: two different pairs that make the same token, present at once (tiktoken takes the
    leftmost, tokenizers the one listed first). A search over 2,700 small random vocabularies, every
    text up to 8 to 11 characters (10 million texts), found none where that changes the result; the
    real files are compared with tokenizers in tests/test_tokenizers.py. About 2 s of CPU for 150,000
    tokens (one Python run of the rule per token)."""
    rank = {(a, b): i for i, (a, b) in enumerate(merges)}  # tokenizers keeps a repeated pair's last place
    made = []
    for i, (a, b) in enumerate(merges):
        if a not in vocab or b not in vocab or a + b not in vocab:
            raise DataError(f"{where}: merge {i} {a!r} + {b!r} is not of two vocabulary tokens into a third")
        made.append(vocab[a + b])
        if i and made[i] < made[i - 1]:
            raise DataError(f"{where}: merge {i} ({a!r} + {b!r}) makes id {made[i]} after merge {i - 1} made id "
                            f"{made[i - 1]}; tiktoken's rule (lowest id first) needs the merges in id order")
    bpe_splits = {}
    for token, i in vocab.items():
        if len(token) < 2 or len(token) == 2 and (token[0], token[1]) in rank:
            continue
        parts = _merge_by_id(token, vocab, rank)
        if parts is None:  # a step that tokenizers might take differently: run both rules to the end
            parts, theirs = _merge_by_id(token, vocab), _merge_by_rank(token, rank)
            if parts != theirs:
                raise DataError(f"{where}: token {token!r} is built as {theirs} by the merges but as {parts} by "
                                f"tiktoken's rule (lowest id first), so tiktoken cannot encode this tokenizer")
        if len(parts) > 1 and not ignore_merges:
            bpe_splits[i] = [vocab[p] for p in parts]
    return bpe_splits


def _merge_by_id(word, vocab, rank=None):
    """tiktoken's rule on one word without its whole-word shortcut: merge the adjacent pair whose join has
    the lowest id, leftmost first. Given the merges' rank, None as soon as a step is one tokenizers' rule
    might not take: a pair that is no merge, or a tie with another pair that makes the same token."""
    parts, never = list(word), float("inf")  # the "id" of a pair that joins into no token
    ids = [vocab.get(a + b, never) for a, b in zip(parts, parts[1:])]  # each adjacent pair's joined id
    while ids:
        best = min(ids)
        if best == never:
            break
        at = ids.index(best)  # the leftmost
        if rank is not None and ((parts[at], parts[at + 1]) not in rank or ids.count(best) > 1 and any(
                b == best and parts[k] != parts[at] for k, b in enumerate(ids))):
            return None
        joined = parts[at] + parts.pop(at + 1)
        parts[at] = joined
        del ids[at]
        if at:
            ids[at - 1] = vocab.get(parts[at - 1] + joined, never)
        if at < len(ids):
            ids[at] = vocab.get(joined + parts[at + 1], never)
    return parts


def _merge_by_rank(word, rank):
    """tokenizers' BPE on one word: merge the adjacent pair listed first in the merges, leftmost first."""
    parts = list(word)
    while len(parts) > 1:
        best, at = None, 0
        for k in range(len(parts) - 1):
            r = rank.get((parts[k], parts[k + 1]))
            if r is not None and (best is None or r < best):
                best, at = r, k
        if best is None:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return parts


# -----------------------------------------------------------------------------
# Encoding a byte-level dict: tiktoken, and the steps of a tokenizer.json around it

# What hf_bpe_tokenizer keeps of a tokenizer.json that tiktoken alone cannot run: a dict with any of them
# gets HFByteLevelBPE; the others (GPT-2, trained ones, Llama 3) stay a plain tiktoken.Encoding (fastest)
HF_STEPS = ("normalizer", "pre_splits", "added_tokens", "add_prefix_space", "bpe_splits")


def tiktoken_encoding(tok):
    """A byte-level dict's encoding (data.get_encoding's): tiktoken's, wrapped in HFByteLevelBPE when the
    dict has HF_STEPS."""
    return HFByteLevelBPE(tok) if any(k in tok for k in HF_STEPS) else _plain_tiktoken(tok, tok["special_tokens"])


def _plain_tiktoken(tok, special_tokens):
    return tiktoken.Encoding(name=tok["name"], pat_str=tok["pat_str"], mergeable_ranks=_ranks(tok),
                             special_tokens=special_tokens)


def _ranks(tok):
    """A byte-level dict's ranks, {token bytes: id}, from the text of its tiktoken file."""
    ranks = {}
    for line in tok["ranks"].splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _gpt2_ranks():
    """GPT-2's ranks, {token bytes: id}, from the bundled file."""
    with open(GPT2_RANKS) as f:
        return _ranks({"ranks": f.read()})


class HFByteLevelBPE:
    """A byte-level tokenizer.json's encoding (hf_bpe_tokenizer's dict): tiktoken for the last regex and
    BPE, and around it the steps of Hugging Face's tokenizers that tiktoken lacks, in its order; the
    methods of tiktoken.Encoding this repo uses."""

    def __init__(self, tok):
        self.added = tok.get("added_tokens", {})
        self.bpe = _plain_tiktoken(tok, {**tok["special_tokens"], **self.added})  # the added ones decode as text
        self.name, self.n_vocab, self.eot_token = self.bpe.name, self.bpe.n_vocab, self.bpe.eot_token
        self.special_tokens_set = set(tok["special_tokens"])
        self.decode, self.decode_bytes = self.bpe.decode, self.bpe.decode_bytes
        self.decode_single_token_bytes = self.bpe.decode_single_token_bytes
        self.encode_single_token = self.bpe.encode_single_token
        self.normalizer = tok.get("normalizer", [])
        self.pre_splits = [regex.compile(p, regex.MULTILINE) for p in tok.get("pre_splits", [])]  # as Oniguruma's
        self.prefix_space = tok.get("add_prefix_space", False)
        self.bpe_splits = {int(i): ids for i, ids in tok.get("bpe_splits", {}).items()}
        # added tokens are found together, special ones too (a special token's text hides any added token
        # inside it), first those matched in the raw text, then those matched in normalized text
        late = set(tok.get("normalized_added", []))
        names = [*self.special_tokens_set, *self.added] if self.added else []
        self.raw_re = _longest_match_pattern([n for n in names if n not in late]) if names else None
        self.normalized_re = _longest_match_pattern(late) if late else None

    def encode_ordinary(self, text):
        """Token ids of text: tokenizers' encode with encode_special_tokens=True (the text of a special
        token stays text) and add_special_tokens=False (no BOS)."""
        ids = []
        for raw, i in self._cut(text, self.raw_re):  # 1. added tokens in the raw text
            if i is not None:
                ids.append(i)
                continue
            for form in self.normalizer:  # 2. the normalizer, on the text between them
                raw = unicodedata.normalize(form, raw)
            for piece, j in self._cut(raw, self.normalized_re):  # 3. added tokens in normalized text
                ids += [j] if j is not None else self._encode_piece(piece)
        if self.bpe_splits and not self.bpe_splits.keys().isdisjoint(ids):
            ids = [j for i in ids for j in self.bpe_splits.get(i, (i,))]  # 6. tokens BPE does not build
        return ids

    def _cut(self, text, pattern):
        """text cut at the added tokens pattern finds, as [(text, None) or (token, id)]; special tokens
        are skipped, so their text stays in the text around them. Empty pieces are dropped."""
        out, start = [], 0
        for m in pattern.finditer(text) if pattern else ():
            if m.group() in self.added:
                out += [(text[start:m.start()], None), (m.group(), self.added[m.group()])]
                start = m.end()
        return [(t, i) for t, i in out + [(text[start:], None)] if t]

    def _encode_piece(self, text):
        """4. the pre-tokenizer: a space in front (ByteLevel's add_prefix_space), the Split steps before
        the last, each cutting every piece at its matches, matches and the text between both kept; then
        5. tiktoken: the last regex and BPE."""
        if self.prefix_space and not text.startswith(" "):
            text = " " + text
        pieces = [text]
        for pattern in self.pre_splits:
            pieces = [p for piece in pieces for p in _split_isolated(pattern, piece)]
        return [i for piece in pieces for i in self.bpe.encode_ordinary(piece)]

    def encode(self, text, allowed_special=frozenset(), disallowed_special="all"):
        """As tiktoken: allowed special tokens in text become their ids; a disallowed one is a ValueError."""
        allowed = self.special_tokens_set if allowed_special == "all" else set(allowed_special)
        disallowed = self.special_tokens_set - allowed if disallowed_special == "all" else set(disallowed_special)
        found = next((t for t in disallowed if t in text), None)
        if found:
            raise ValueError(f"text contains the special token {found!r}; pass allowed_special or use encode_ordinary")
        ids, start = [], 0
        for m in _longest_match_pattern(allowed).finditer(text) if allowed else ():
            ids += self.encode_ordinary(text[start:m.start()]) + [self.encode_single_token(m.group())]
            start = m.end()
        return ids + self.encode_ordinary(text[start:])


def _split_isolated(pattern, text):
    """tokenizers' Split with behavior Isolated: each match and each stretch between matches is a piece."""
    pieces, start = [], 0
    for m in pattern.finditer(text):
        pieces += [text[start:m.start()], m.group()]
        start = m.end()
    return [p for p in pieces + [text[start:]] if p]


# -----------------------------------------------------------------------------
# Hugging Face files out: tokenizer.json and tokenizer_config.json

# This project's template (data.render_chat's "ours") as Jinja, for tokenizer_config.json on export
# (transformers' apply_chat_template)
OUR_CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
                     "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def save_hf_tokenizer(tok, path):
    """Write a tokenizer dict as a Hugging Face tokenizer.json in path, which the tokenizers library reads
    back to the ids data.get_encoding gives, so that an exported model's text loads in transformers too. The
    vocabulary of a byte-level BPE is the ranks in GPT-2's printable byte alphabet (a SentencePiece-style
    one keeps its own); the special tokens (this project's chat tokens among them) are added tokens after
    the source's.

    From hf_bpe_tokenizer, the rest is the source file's, as it was: its merges and ignore_merges, its
    normalizer, pre-tokenizer, post-processor (Llama's BOS) and decoder, its added tokens. Otherwise
    (GPT-2, a BPE trained by prepare.py) the regex is a Split step, ignore_merges is tiktoken's rule
    (a whole piece that is a token is that token), and the merges are rebuilt from the ranks: BPE builds
    each token from the two parts it was last merged from, and running tiktoken's own rule (merge the
    adjacent pair of lowest rank) on the token's bytes with only lower ranks allowed stops at exactly
    those two parts. That needs ranks in merge order, as a trained BPE's are; the rebuilt merges are
    checked like an imported file's (_check_bpe_rule), and refused when they would encode differently."""
    if tok.get("type") == "sp_bpe":  # SentencePiece-style: the source file's steps around our vocabulary and merges
        if "hf" not in tok:
            raise DataError(f"{tok['name']}: a SentencePiece-style tokenizer saved before export existed; load it "
                            f"again from its tokenizer.json")
        vocab, hf = dict(tok["vocab"]), {**tok["hf"], "model": {
            "type": "BPE", "dropout": None, "unk_token": tok["unk_token"], "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": tok["fuse_unk"], "byte_fallback": tok["byte_fallback"],
            "ignore_merges": tok["ignore_merges"], "merges": tok["merges"]}}
    else:
        char_of = {b: c for c, b in _byte_of_char().items()}
        show = lambda b: "".join(char_of[x] for x in b)  # noqa: E731
        ranks = _ranks(tok)
        vocab, hf = {show(b): i for b, i in ranks.items()}, tok.get("hf")
    if hf is None:
        merges = _rebuilt_merges(ranks, show, tok["name"])
        _check_bpe_rule(vocab, merges, True, f"{tok['name']}: the rebuilt merges")
        hf = {"normalizer": None, "post_processor": None, "added_tokens": [],
              "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                  {"type": "Split", "pattern": {"Regex": tok["pat_str"]}, "behavior": "Isolated", "invert": False},
                  {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
              "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
              "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                        "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                        "merges": merges}}
    # tokenizers numbers added tokens itself, from the vocabulary's size on, in file order: ours go last
    added = list(hf["added_tokens"] or [])
    vocab.update({t["content"]: t["id"] for t in added if t["id"] < len(vocab)})  # inside the source's vocabulary
    have = {t["content"] for t in added}
    ours = sorted((i, name) for name, i in tok["special_tokens"].items() if name not in have)
    added += [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
               "special": True} for i, name in ours]
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            **{k: hf[k] for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder")},
            "model": {**hf["model"], "vocab": vocab}}
    os.makedirs(path, exist_ok=True)
    atomic_write(os.path.join(path, "tokenizer.json"),
                  lambda f: f.write(json.dumps(spec, ensure_ascii=False).encode()))
    # tokenizer_config.json: the chat template (ours in Jinja, or the model's own as it came), so that
    # transformers' apply_chat_template renders what data.render_chat does
    fmt = tok.get("chat_format") or {"name": "ours"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast",
              "chat_template": OUR_CHAT_TEMPLATE if fmt["name"] == "ours" else fmt.get("template"),
              "bos_token": tok.get("bos_token") or fmt.get("bos"),
              "eos_token": tok.get("eos_token") or (EOT if EOT in tok["special_tokens"] else None)}
    config = {k: v for k, v in config.items() if v}  # an unsupported template is not written
    atomic_write(os.path.join(path, "tokenizer_config.json"), lambda f: f.write(json.dumps(config, indent=1).encode()))


def _rebuilt_merges(ranks, show, name):
    """save_hf_tokenizer's merges for ranks without a merge list: each token's last two parts (above)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            joined = [ranks.get(a + b, rank) for a, b in zip(parts, parts[1:])]
            k = joined.index(min(joined))
            if joined[k] >= rank:
                raise DataError(f"{name}: token {token!r} is not built from tokens of lower rank, so no merge list "
                                f"can be rebuilt from the ranks; export from its tokenizer.json instead")
            parts[k:k + 2] = [parts[k] + parts[k + 1]]
        if len(parts) == 2:
            merges.append([show(parts[0]), show(parts[1])])
    return merges


# -----------------------------------------------------------------------------
# SentencePiece-style BPE (byte fallback, ▁)
#
# Llama 2, TinyLlama, Mistral and Gemma ship a BPE over characters, not bytes, in their tokenizer.json:
# a space is written "▁" (U+2581) inside tokens, and a character the vocabulary lacks becomes its UTF-8
# bytes as the tokens <0x00>..<0xFF> (byte fallback). tiktoken cannot hold that, so a small encoder
# here runs the pipeline of Hugging Face's tokenizers library, step by step and exactly:
#   1. added tokens   the text is split at added tokens (leftmost, longest first), matched in the raw text;
#                     special ones (<s>, <bos>, [INST]) are skipped, so their text stays text
#   2. normalizer     on each piece between them: Prepend("▁") (Llama 2, TinyLlama, Mistral v0.1: every
#                     piece gets one) and Replace(" ", "▁")
#   3. pre-tokenizer  none (the whole piece is one BPE word), Metaspace (newer files: spaces -> "▁", one
#                     "▁" before the text's first piece or every piece, optionally split before each "▁"),
#                     or Gemma's Split on " " (a no-op once the normalizer has replaced the spaces)
#   4. BPE            each character becomes its token, or its byte tokens, or <unk>; then the adjacent
#                     pair whose merge comes first in the merge list is merged, leftmost first, until
#                     none is left (tokenizers' Word::merge_all, a heap over pairs)
#   5. decoder        "▁" -> " ", byte tokens -> bytes (U+FFFD per byte of a bad run), joined, and one
#                     leading space stripped where step 2 or 3 added it
# Anything else a tokenizer.json can say is refused by name rather than approximated.
#
# Speed: one BPE word can be a whole document (step 3 "none"). It is cut where no merge can join two
# characters: between two characters in the vocabulary whose pair occurs inside no merged token (a merge
# across the cut would make a token containing that pair). The cuts fall between words and around
# punctuation, so most chunks repeat and come from a cache.

SP_BYTE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # a byte-fallback token, as tokenizers' ByteFallback reads it


def sp_bpe_tokenizer(spec, path):
    """A SentencePiece-style BPE tokenizer.json (spec, the parsed file at path) as a tokenizer dict that
    SentencePieceBPE encodes: the vocabulary, the merges in order, and the pipeline steps above as the
    file writes them (Sequences flattened). Added tokens go to "special_tokens" (special, with this
    project's chat tokens after the last id where the model has none) or "added_tokens"; "bos_token" is
    the one the post-processor (or tokenizer_config.json) puts first, which encode never adds; "eos_token"
    ends a document (the encoding's eot_token). A DataError names the first field it cannot run exactly."""
    def refuse(field, value, why="not supported by this SentencePiece-style BPE encoder"):
        raise DataError(f"{path}: {field} {json.dumps(value, ensure_ascii=False)[:100]} is {why}")

    def steps(node, key):  # None -> [], a Sequence -> its steps, flattened
        if node is None:
            return []
        return [s for n in node[key] for s in steps(n, key)] if node.get("type") == "Sequence" else [node]

    def string_pattern(step, field):
        if set(step.get("pattern") or {}) != {"String"} or not step["pattern"]["String"]:
            refuse(f"{field} pattern", step.get("pattern"), "not a plain string (regular expressions are refused)")
        return step["pattern"]["String"]

    def metaspace(step, field):  # old files say add_prefix_space instead of prepend_scheme, and no split
        scheme = step.get("prepend_scheme") or ("always" if step.get("add_prefix_space", True) else "never")
        if scheme not in ("first", "always", "never") or len(step.get("replacement", "")) != 1:
            refuse(field, step)
        return {"type": "Metaspace", "replacement": step["replacement"], "prepend_scheme": scheme,
                "split": step.get("split", True)}

    bpe = spec.get("model") or {}
    if bpe.get("type") != "BPE":
        refuse("model.type", bpe.get("type"))
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if bpe.get(key):
            refuse(f"model.{key}", bpe[key])
    vocab = bpe["vocab"]
    merges = [m.split(" ") if isinstance(m, str) else list(m) for m in bpe.get("merges", [])]
    for m in merges:
        if len(m) != 2 or m[0] not in vocab or m[1] not in vocab or m[0] + m[1] not in vocab:
            refuse("model.merges entry", m, "not two vocabulary tokens whose join is one")
    if bpe.get("unk_token") is not None and bpe["unk_token"] not in vocab:
        refuse("model.unk_token", bpe["unk_token"], "not in the vocabulary")

    normalizer = []
    for step in steps(spec.get("normalizer"), "normalizers"):
        if step.get("type") == "Prepend" and step.get("prepend"):
            normalizer.append({"type": "Prepend", "prepend": step["prepend"]})
        elif step.get("type") == "Replace":
            pattern = string_pattern(step, "normalizer Replace")
            normalizer.append({"type": "Replace", "pattern": pattern, "content": step["content"]})
        else:
            refuse("normalizer", step)
    pre = steps(spec.get("pre_tokenizer"), "pretokenizers")
    if len(pre) > 1:
        refuse("pre_tokenizer", spec["pre_tokenizer"], "more than one step")
    if pre and pre[0].get("type") == "Metaspace":
        pre = metaspace(pre[0], "pre_tokenizer")
    elif pre and pre[0].get("type") == "Split":
        if pre[0].get("invert") or pre[0].get("behavior") not in SPLIT_BEHAVIORS:
            refuse("pre_tokenizer", pre[0])
        pre = {"type": "Split", "pattern": string_pattern(pre[0], "pre_tokenizer Split"),
               "behavior": pre[0]["behavior"]}
    elif pre:
        refuse("pre_tokenizer", pre[0])
    else:
        pre = None
    decoder = []
    for step in steps(spec.get("decoder"), "decoders"):
        kind = step.get("type")
        if kind == "Replace":
            pattern = string_pattern(step, "decoder Replace")
            decoder.append({"type": kind, "pattern": pattern, "content": step["content"]})
        elif kind in ("ByteFallback", "Fuse"):
            decoder.append({"type": kind})
        elif kind == "Strip" and len(step.get("content", "")) == 1 and step["start"] >= 0 and step["stop"] >= 0:
            decoder.append({"type": kind, "content": step["content"], "start": step["start"], "stop": step["stop"]})
        elif kind == "Metaspace":
            decoder.append(metaspace(step, "decoder"))
        else:
            refuse("decoder", step)
    if not decoder:
        refuse("decoder", None, "missing (tokenizers would join the tokens with spaces)")

    special, added = {}, {}
    for t in spec.get("added_tokens", []):
        if not t["content"]:
            refuse("added token", t, "empty")
        if t.get("special"):  # never matched by encode_ordinary, so its flags change nothing there
            special[t["content"]] = t["id"]
        elif t.get("normalized", True) or t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
            refuse("added token", t, "matched in normalized text or with stripping, which is not implemented")
        else:
            added[t["content"]] = t["id"]
    normalized = [t["content"] for t in spec.get("added_tokens", []) if t.get("special") and t.get("normalized")]
    if normalized and added:  # the library matches those in normalized text, where they cannot hide an added one
        refuse("added tokens", normalized[:3], "special, normalized, and next to non-special added tokens")

    # The BOS the post-processor adds, and the EOS, by tokenizer_config.json or by the usual names
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    config = {}
    if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
            config = json.load(f)
    named = {key: v.get("content") if isinstance(v, dict) else v for key, v in config.items()}  # str or AddedToken
    processors = steps(spec.get("post_processor"), "processors")
    template = next((p for p in processors if p.get("type") == "TemplateProcessing"), {})
    first = (template.get("single") or [{}])[0].get("SpecialToken", {}).get("id")
    bos = next((t for t in (first, named.get("bos_token"), "<s>", "<bos>") if t in special), None)
    eos = next((t for t in (named.get("eos_token"), "</s>", "<eos>") if t in special), None)
    if eos is None:
        refuse("added_tokens", sorted(special), "without an end-of-sequence token (</s> or <eos>)")
    for name in CHAT_TOKENS:  # this project's chat roles after the last id, as for a byte-level BPE
        if name not in special:
            special[name] = max([*vocab.values(), *added.values(), *special.values()]) + 1
    return {"type": "sp_bpe", "name": os.path.basename(os.path.abspath(folder)),
            "vocab": vocab, "merges": merges, "unk_token": bpe.get("unk_token"), "fuse_unk": bool(bpe.get("fuse_unk")),
            "byte_fallback": bool(bpe.get("byte_fallback")), "ignore_merges": bool(bpe.get("ignore_merges")),
            "normalizer": normalizer, "pre_tokenizer": pre, "decoder": decoder,
            "added_tokens": added, "special_tokens": special, "bos_token": bos, "eos_token": eos,
            # the file's own steps and added tokens, as written, for save_hf_tokenizer
            "hf": {**{k: spec.get(k) for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder")},
                   "added_tokens": spec.get("added_tokens", [])}}


SPLIT_BEHAVIORS = ("Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous")


def _longest_match_pattern(words):
    """A regex that finds, at the leftmost place, the longest of words: the leftmost-longest match of
    tokenizers' Aho-Corasick automaton, as a trie so that thousands of added tokens stay fast."""
    trie = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}  # a word ends here

    def pattern(node):
        alts = [re.escape(ch) + pattern(child) for ch, child in node.items() if ch]
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")" if alts else ""
        return f"(?:{body})?" if "" in node and body else body  # greedy: the longer word first
    return re.compile(pattern(trie))


class SentencePieceBPE:
    """A SentencePiece-style BPE (sp_bpe_tokenizer's dict) with the tiktoken.Encoding methods this repo uses."""

    def __init__(self, tok):
        self.tok, self.name, self.vocab = tok, tok["name"], tok["vocab"]
        self.special_tokens_set = set(tok["special_tokens"])
        self.eot_token = tok["special_tokens"][tok["eos_token"]]
        self._token = {i: t for t, i in self.vocab.items()}  # id -> its text, the added tokens' over the vocabulary's
        self._token.update({i: t for t, i in {**tok["added_tokens"], **tok["special_tokens"]}.items()})
        self.n_vocab = max(self._token) + 1
        self._merges = {}  # (left id, right id) -> (merge rank, merged id); a repeated pair keeps its last rank
        for rank, (a, b) in enumerate(tok["merges"]):
            self._merges[self.vocab[a], self.vocab[b]] = (rank, self.vocab[a + b])
        self._joined = {a + b for a, b in tok["merges"]}
        self._joined = {t[i:i + 2] for t in self._joined for i in range(len(t) - 1)}  # pairs inside merged tokens
        self._byte_ids = [self.vocab.get(f"<0x{b:02X}>") for b in range(256)] if tok["byte_fallback"] else None
        self._unk_id = self.vocab.get(tok["unk_token"])
        all_added = {**tok["added_tokens"], **tok["special_tokens"]}
        self._added_re = _longest_match_pattern(all_added) if all_added else None
        self._byte_decoder = any(step["type"] == "ByteFallback" for step in tok["decoder"])
        self._cache = {}

    # -- encoding: steps 1-4

    def encode_ordinary(self, text):
        """Token ids of text; special tokens' text stays text (tokenizers with encode_special_tokens=True)."""
        return self._encode(text, frozenset())

    def encode(self, text, allowed_special=frozenset(), disallowed_special="all"):
        """As tiktoken: allowed special tokens in text become their ids; a disallowed one is a ValueError."""
        allowed = self.special_tokens_set if allowed_special == "all" else set(allowed_special)
        disallowed = self.special_tokens_set - allowed if disallowed_special == "all" else set(disallowed_special)
        found = disallowed and next((t for t in disallowed if t in text), None)
        if found:
            raise ValueError(f"text contains the special token {found!r}; pass allowed_special or use encode_ordinary")
        return self._encode(text, allowed)

    def encode_single_token(self, name):
        for table in (self.tok["special_tokens"], self.tok["added_tokens"]):
            if name in table:
                return table[name]
        return self.vocab[name]

    def _encode(self, text, allowed):
        """1. Split at added tokens; each piece of text between them goes through steps 2-4."""
        ids, start = [], 0
        for m in self._added_re.finditer(text) if self._added_re else ():
            name = m.group()
            if name in self.special_tokens_set and name not in allowed:
                continue  # tokenizers skips it, and the match still covers its characters
            ids += self._encode_piece(text[start:m.start()], start)
            ids.append(self.tok["added_tokens"].get(name, self.tok["special_tokens"].get(name)))
            start = m.end()
        return ids + self._encode_piece(text[start:], start)

    def _encode_piece(self, text, offset):
        """2. Normalize, 3. pre-tokenize, 4. BPE one piece of text that started at text offset `offset`."""
        if not text:
            return []
        for step in self.tok["normalizer"]:  # Prepend leaves an empty text empty
            if step["type"] == "Replace":
                text = text.replace(step["pattern"], step["content"])
            elif text:
                text = step["prepend"] + text
        pre, words = self.tok["pre_tokenizer"], [text]
        if pre and pre["type"] == "Metaspace":
            r, scheme = pre["replacement"], pre["prepend_scheme"]
            text = text.replace(" ", r)
            if text and not text.startswith(r) and (scheme == "always" or scheme == "first" and offset == 0):
                text = r + text
            words = re.split(f"(?={re.escape(r)})", text) if pre["split"] else [text]  # "▁" starts a word
        elif pre:
            words = _split_on(text, pre["pattern"], pre["behavior"])
        return [i for w in words if w for i in self._bpe(w)]

    def _bpe(self, word):
        """4. One BPE word, in chunks that no merge joins (see above), each cached."""
        if self.tok["ignore_merges"] and word in self.vocab:
            return [self.vocab[word]]
        known, joined = self.vocab, self._joined
        cuts = [i for i, (a, b) in enumerate(zip(word, word[1:]), 1)
                if a + b not in joined and a in known and b in known]
        ids, bounds = [], [0] + cuts + [len(word)]
        for start, end in zip(bounds, bounds[1:]):
            chunk = word[start:end]
            if chunk not in self._cache:
                if len(self._cache) >= 100_000:
                    self._cache.clear()
                self._cache[chunk] = self._merge(self._symbols(chunk))
            ids += self._cache[chunk]
        return ids

    def _symbols(self, chunk):
        """Each character's token; else its UTF-8 byte tokens; else <unk> (consecutive ones fused into one
        with fuse_unk), or nothing when there is no <unk>. As tokenizers does, a pending <unk> is written
        only before the next known character, so it can follow byte tokens that came after it."""
        ids, unk = [], False
        for ch in chunk:
            if ch in self.vocab:
                ids += [self._unk_id, self.vocab[ch]] if unk else [self.vocab[ch]]
                unk = False
            elif self._byte_ids and all(self._byte_ids[b] is not None for b in ch.encode()):
                ids += [self._byte_ids[b] for b in ch.encode()]
            elif self._unk_id is not None:
                if unk and not self.tok["fuse_unk"]:
                    ids.append(self._unk_id)
                unk = True
        return ids + [self._unk_id] if unk else ids

    def _merge(self, ids):
        """Apply merges: repeatedly merge the adjacent pair of lowest merge rank, leftmost on ties. A heap
        holds (rank, position, merged id) for every pair; an entry whose pair has changed is skipped."""
        n, merges = len(ids), self._merges
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))  # a linked list over positions
        heap = [(merges[p][0], i, merges[p][1]) for i, p in enumerate(zip(ids, ids[1:])) if p in merges]
        heapq.heapify(heap)

        def push(i, pair):  # the pair starting at position i, if it merges
            if pair in merges:
                heapq.heappush(heap, (merges[pair][0], i, merges[pair][1]))
        while heap:
            rank, i, new = heapq.heappop(heap)
            j = nxt[i]
            if ids[i] is None or j >= n or merges.get((ids[i], ids[j]), (0, None))[1] != new:
                continue  # merged away, or the pair changed since it was pushed
            ids[i], ids[j], nxt[i] = new, None, nxt[j]
            if nxt[i] < n:
                prv[nxt[i]] = i
            if prv[i] >= 0:
                push(prv[i], (ids[prv[i]], new))
            if nxt[i] < n:
                push(i, (new, ids[nxt[i]]))
        return [t for t in ids if t is not None]

    # -- decoding: step 5

    def decode(self, ids):
        """Text of ids, special tokens included, through the file's decoder (tokenizers' decode with
        skip_special_tokens=False)."""
        tokens = [self._token[i] for i in ids if i in self._token]
        for step in self.tok["decoder"]:
            kind = step["type"]
            if kind == "Replace":
                tokens = [t.replace(step["pattern"], step["content"]) for t in tokens]
            elif kind == "ByteFallback":
                tokens = _byte_fallback(tokens)
            elif kind == "Fuse":
                tokens = ["".join(tokens)]
            elif kind == "Strip":
                tokens = [_strip(t, step["content"], step["start"], step["stop"]) for t in tokens]
            else:  # Metaspace: "▁" -> " ", dropped in the first token when a prefix was prepended
                drop = step["prepend_scheme"] != "never"
                tokens = [t.replace(step["replacement"], "" if i == 0 and drop else " ") for i, t in enumerate(tokens)]
        return "".join(tokens)

    def decode_single_token_bytes(self, i):
        """The bytes token i adds in the middle of a text: a byte token's byte, else its text with "▁" as a
        space (the leading space the decoder strips at the start of a text is kept)."""
        text = self._token[i]
        if self._byte_decoder and SP_BYTE.fullmatch(text):
            return bytes([int(text[3:5], 16)])
        for step in self.tok["decoder"]:
            if step["type"] in ("Replace", "Metaspace"):
                text = text.replace(step.get("pattern", step.get("replacement")), step.get("content", " "))
        return text.encode()


def _split_on(text, pattern, behavior):
    """tokenizers' Split pre-tokenizer on a plain string, each behavior; empty pieces are dropped."""
    parts = re.split(f"((?:{re.escape(pattern)})+)" if behavior == "Contiguous" else f"({re.escape(pattern)})", text)
    if behavior == "Removed":
        parts = parts[::2]
    elif behavior == "MergedWithPrevious":
        parts = [a + b for a, b in zip(parts[::2], parts[1::2] + [""])]
    elif behavior == "MergedWithNext":
        parts = [parts[0]] + [a + b for a, b in zip(parts[1::2], parts[2::2])]
    return [p for p in parts if p]


def _byte_fallback(tokens):
    """tokenizers' ByteFallback decoder: a run of <0xXX> tokens becomes its bytes as UTF-8 text, or one
    U+FFFD per token when the run is not valid UTF-8."""
    out, run = [], []
    for t in tokens + [None]:
        if t is not None and SP_BYTE.fullmatch(t):
            run.append(int(t[3:5], 16))
            continue
        if run:
            try:
                out.append(bytes(run).decode())
            except UnicodeDecodeError:
                out += ["\ufffd"] * len(run)
            run = []
        if t is not None:
            out.append(t)
    return out


def _strip(token, content, start, stop):
    """tokenizers' Strip decoder: up to `start` leading and `stop` trailing `content` characters removed."""
    left = next((k for k in range(min(start, len(token))) if token[k] != content), min(start, len(token)))
    right = len(token) - next((k for k in range(min(stop, len(token) - left)) if token[-1 - k] != content),
                              min(stop, len(token) - left))
    return token[left:right]
