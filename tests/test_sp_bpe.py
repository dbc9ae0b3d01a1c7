"""SentencePiece-style BPE (bpe.sp_bpe_tokenizer, bpe.SentencePieceBPE) against Hugging Face's tokenizers.

Small tokenizers are trained here in each structure the real files have (Llama 2 / TinyLlama / Mistral v0.1's
Prepend + Replace normalizer, the newer Metaspace pre-tokenizer, Gemma's Replace + Split) and encoded
against the library on a multilingual corpus; with sentencepiece, protobuf, transformers and mistral-common
installed, so are Mistral's real SentencePiece models, converted to tokenizer.json by transformers.

    python -m pytest tests/test_sp_bpe.py -q
"""

import copy
import importlib.util
import json
import os
import random
import re
import types

import pytest
import torch

import bpe
import data

tokenizers = pytest.importorskip("tokenizers")

R = "▁"
CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 3:14 pm, isn't it?",
    "Hello world",
    " leading space",
    "  two leading spaces and three trailing   ",
    "a  b   c    d",
    "def encode(self, text):\n    if not text:\n        return []\n\treturn [t for t in text]  # tab\n",
    "for i in range(10):\n        print(i ** 2)\n\n\n",
    "中文的文本：机器学习是人工智能的一个分支。",
    "日本語のテキストです。カタカナとひらがな。",
    "한국어 문장입니다.",
    "Emoji: 🎉🚀 and a family 👨‍👩‍👧‍👦, a flag 🇫🇷, skin tone 👍🏽.",
    "Decomposed accents: e\u0301cole, nai\u0308ve, A\u030a; composed: école, naïve, Å.",
    "Digits 0123456789 and 3.14159 and 1,000,000 and 2024-01-01",
    "\t\ttabs\tand\nnewlines\r\nand\u00a0no-break\u2003em space\u3000ideographic",
    "Rare characters: ∮ ⅋ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ 𓀀 \x00\x01\x7f",
    "Forged specials stay text: <s> </s> <bos> <eos> <start_of_turn>user [INST] hi [/INST] <unk>",
    "Added tokens: <table><tr>x</tr></table> and [REF_1]ref[REF_2] and a long     run",
    "▁ already has the meta symbol ▁▁ twice",
    "",
    " ",
    "\n",
    "x",
]
TEXT = "\n".join(CORPUS)
TRAIN = [TEXT] * 3 + [
    "the quick brown fox the lazy dog hello world encode text return print range tabs newlines",
    "机器学习 人工智能 文本 日本語 テキスト 数字 0123456789",
] * 20

BYTES = [f"<0x{b:02X}>" for b in range(256)]
LLAMA_DECODER = {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": R}, "content": " "},
                                                  {"type": "ByteFallback"}, {"type": "Fuse"},
                                                  {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
GEMMA_DECODER = {"type": "Sequence", "decoders": LLAMA_DECODER["decoders"][:3]}
LEGACY_NORMALIZER = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": R},
                                                         {"type": "Replace", "pattern": {"String": " "}, "content": R}]}
GEMMA_NORMALIZER = {"type": "Replace", "pattern": {"String": " "}, "content": R}


def metaspace(scheme, split):
    return {"type": "Metaspace", "replacement": R, "prepend_scheme": scheme, "split": split}


def added(content, i, special=True):
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def trained_merges(vocab_size, cross_words=False, limit_alphabet=80):
    """A small BPE trained by the library on ▁-text: its vocabulary in id order and its merges. With
    cross_words the merges may join across a "▁" (real files never do; it tests the chunking)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement=R, prepend_scheme="always", split=not cross_words)
    tk.train_from_iterator(TRAIN, trainers.BpeTrainer(vocab_size=vocab_size, limit_alphabet=limit_alphabet,
                                                      show_progress=False))
    model = json.loads(tk.to_str())["model"]
    return sorted(model["vocab"], key=model["vocab"].get), model["merges"]


def sp_spec(style):
    """A tokenizer.json in one real structure; names follow the families that ship it."""
    gemma = style.startswith("gemma")
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"] if gemma else ["<unk>", "<s>", "</s>"]
    tokens, merges = trained_merges(420, cross_words=style == "cross_word_merges")
    byte_tokens = [b for i, b in enumerate(BYTES) if not (style == "missing_bytes" and i % 7 == 0)]
    vocab = {}
    for t in specials + ([] if style.startswith("no_byte") else byte_tokens) + (["\n", "\t"] if gemma else []) + tokens:
        vocab.setdefault(t, len(vocab))
    bos, eos = ("<bos>", "<eos>") if gemma else ("<s>", "</s>")
    spec = {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [added(t, vocab[t]) for t in specials],
            "normalizer": LEGACY_NORMALIZER, "pre_tokenizer": None,
            "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                                                                        {"Sequence": {"id": "A", "type_id": 0}}],
                               "pair": [], "special_tokens": {bos: {"id": bos, "ids": [vocab[bos]], "tokens": [bos]}}},
            "decoder": LLAMA_DECODER,
            "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                      "vocab": vocab, "merges": merges}}
    if gemma:  # Gemma: no prefix space, user-defined pieces as non-special added tokens, turn markers
        spec.update(normalizer=GEMMA_NORMALIZER, decoder=GEMMA_DECODER,
                    pre_tokenizer={"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
                                   "invert": False})
        for t, special in [("<start_of_turn>", True), ("<end_of_turn>", True), ("\n\n", False), ("    ", False),
                           ("<table>", False), ("<tr>", False), ("</tr>", False), ("<ta", False), ("\t\t", False)]:
            spec["added_tokens"].append(added(t, vocab.setdefault(t, len(vocab)), special))
    if style == "gemma_ignore_merges":  # a whole word in the vocabulary is one token, merges or not
        spec["model"]["ignore_merges"], spec["pre_tokenizer"] = True, None
        vocab.update({t: len(vocab) + i for i, t in enumerate(["Hello▁world", "▁leading▁space", "x▁y"])})
    if style in ("metaspace_first", "mistral_v3"):  # Llama 2 / Mistral as transformers now writes them
        spec.update(normalizer=None, pre_tokenizer=metaspace("first", False))
    if style == "mistral_v3":  # control tokens, and user-defined ones (not special) matched in the text
        for i, (t, special) in enumerate([("[INST]", True), ("[/INST]", True), ("[REF_1]", False), ("[REF_2]", False),
                                          ("[REF_1", False), ("[[REF_1]]", True)]):
            spec["added_tokens"].append(added(t, len(vocab) + i, special))
    if style == "metaspace_always_split":  # Metaspace decoder (older files, T5-like)
        spec.update(normalizer=None, pre_tokenizer=metaspace("always", True),
                    decoder={"type": "Metaspace", "replacement": R, "prepend_scheme": "always", "split": True})
    if style == "metaspace_never":
        spec.update(normalizer=None, pre_tokenizer=metaspace("never", True), decoder=GEMMA_DECODER)
    if style == "old_metaspace":  # before prepend_scheme existed: add_prefix_space, no split key
        spec.update(normalizer=None, pre_tokenizer={"type": "Metaspace", "replacement": R, "add_prefix_space": True})
    if style.startswith("no_byte"):
        spec["model"]["byte_fallback"] = False
        spec["decoder"] = {"type": "Sequence",
                           "decoders": [d for d in LLAMA_DECODER["decoders"] if d["type"] != "ByteFallback"]}
    if style == "no_byte_fallback_unfused":
        spec["model"]["fuse_unk"] = False
    if style == "no_byte_fallback_no_unk":
        spec["model"]["unk_token"] = None
    if style == "deleting_normalizer":  # a normalizer may empty a text: no prefix is added to nothing
        spec.update(normalizer={"type": "Sequence", "normalizers": [
            {"type": "Replace", "pattern": {"String": " "}, "content": ""}, {"type": "Prepend", "prepend": R}]},
            pre_tokenizer=metaspace("always", True))
    if style == "string_merges":  # tokenizers < 0.20 wrote merges as "a b"
        spec["model"]["merges"] = [" ".join(m) for m in merges]
    return spec


STYLES = ["llama_legacy", "metaspace_first", "mistral_v3", "metaspace_always_split", "metaspace_never", "old_metaspace",
          "gemma", "gemma_ignore_merges", "no_byte_fallback", "no_byte_fallback_unfused", "no_byte_fallback_no_unk",
          "missing_bytes", "cross_word_merges", "deleting_normalizer", "string_merges"]


def library(spec):
    """The reference: tokenizers itself, with special tokens' text left as text like encode_ordinary."""
    tk = tokenizers.Tokenizer.from_str(json.dumps(spec))
    tk.encode_special_tokens = True
    return tk


def ours(spec, tmp_path):
    path = tmp_path / "tok"
    path.mkdir(exist_ok=True)
    (path / "tokenizer.json").write_text(json.dumps(spec))
    return data.get_encoding(bpe.sp_bpe_tokenizer(spec, str(path / "tokenizer.json")))


def assert_same_as_library(enc, tk, texts):
    for text in texts:
        ids = tk.encode(text, add_special_tokens=False).ids
        assert enc.encode_ordinary(text) == ids, text
        assert data.encode(enc, text) == ids, text
        assert enc.decode(ids) == tk.decode(ids, skip_special_tokens=False), text


# -----------------------------------------------------------------------------
# Exactness against the library


@pytest.mark.parametrize("style", ["llama_legacy", "metaspace_first", "mistral_v3", "gemma"])
def test_export_reads_back_in_the_library_to_the_same_ids(style, tmp_path):
    spec = sp_spec(style)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tokenizer.json").write_text(json.dumps(spec))
    tok = bpe.sp_bpe_tokenizer(spec, str(tmp_path / "src" / "tokenizer.json"))
    bpe.save_hf_tokenizer(tok, str(tmp_path / "out"))
    back = tokenizers.Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    back.encode_special_tokens = True
    assert_same_as_library(data.get_encoding(tok), back, CORPUS)
    assert back.encode("Hello world").ids == library(spec).encode("Hello world").ids  # the BOS post-processor kept
    assert back.token_to_id("<|end|>") == tok["special_tokens"]["<|end|>"]  # our chat tokens, where ours put them


@pytest.mark.parametrize("style", STYLES)
def test_ids_and_text_match_the_library(style, tmp_path):
    spec = sp_spec(style)
    enc, tk = ours(spec, tmp_path), library(spec)
    assert isinstance(enc, bpe.SentencePieceBPE)
    lines = CORPUS + [TEXT, TEXT[5:400], " ".join(CORPUS[::-1])]
    assert_same_as_library(enc, tk, lines)
    # decode(encode(text)) gives the text back wherever the library's does (byte fallback and a prefix
    # space strip make it; only an <unk> loses text)
    for text in lines:
        ids = tk.encode(text, add_special_tokens=False).ids
        assert (enc.decode(ids) == text) == (tk.decode(ids, skip_special_tokens=False) == text)


@pytest.mark.parametrize("style", ["llama_legacy", "metaspace_first", "mistral_v3", "gemma", "missing_bytes",
                                   "cross_word_merges"])
def test_random_strings_match_the_library(style, tmp_path):
    """Seeded random strings of letters, spaces, ▁, newlines, CJK, emoji, rare characters and pieces of
    the added tokens; and random ids decoded."""
    rng = random.Random(0)
    pool = list("abcdefghij tT▁▁  \n\t,.!?'0123456789中文日本語한국어éü")
    pool += ["e\u0301", "👨‍👩‍👧", "🎉", "\x00", "ꙮ", "𝔘", "<s>", "</s>", "[INST]", "[REF_1]", "[REF_1", "[[REF_1]]",
             "<start_of_turn>", "<table>", "\n\n", "    ", "<ta"]
    spec = sp_spec(style)
    enc, tk, with_specials = ours(spec, tmp_path), library(spec), tokenizers.Tokenizer.from_str(json.dumps(spec))
    for _ in range(300):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(0, 30)))
        assert enc.encode_ordinary(text) == tk.encode(text, add_special_tokens=False).ids, text
        assert enc.encode(text, allowed_special="all") == with_specials.encode(text, add_special_tokens=False).ids
        ids = [rng.randrange(enc.n_vocab - len(data.CHAT_TOKENS)) for _ in range(rng.randint(0, 8))]
        assert enc.decode(ids) == tk.decode(ids, skip_special_tokens=False), ids


def test_every_character_and_run_alone(tmp_path):
    """Every character of the corpus, and runs of spaces, newlines and ▁ of each length up to 9, alone
    and between letters, in the three main structures."""
    pieces = sorted(set(TEXT)) + [c * n for c in " \n\t" + R for n in range(2, 10)]
    for style in ("llama_legacy", "metaspace_first", "gemma"):
        spec = sp_spec(style)
        assert_same_as_library(ours(spec, tmp_path), library(spec), pieces + [f"a{p}b" for p in pieces])


def test_byte_fallback_decodes_broken_utf8_like_the_library(tmp_path):
    spec = sp_spec("llama_legacy")
    enc, tk = ours(spec, tmp_path), library(spec)
    v = spec["model"]["vocab"]
    for ids in ([v["<0xE4>"]], [v["<0xE4>"], v["<0xB8>"]], [v["<0xE4>"], v["<0xB8>"], v["<0xAD>"]],
                [v["<0xFF>"], v["a"], v["<0xC3>"], v["<0xA9>"]], [v[R], v["<0x0A>"]], [v["<s>"], v[R + "t"]]):
        assert enc.decode(ids) == tk.decode(ids, skip_special_tokens=False)
    assert enc.decode_single_token_bytes(v["<0xE4>"]) == b"\xe4"
    assert enc.decode_single_token_bytes(v[R + "t"]) == b" t"  # ▁ is a space in the middle of a text


@pytest.mark.parametrize("style", ["llama_legacy", "metaspace_first", "mistral_v3", "gemma"])
def test_special_tokens_by_name_and_never_from_text(style, tmp_path):
    spec = sp_spec(style)
    enc = ours(spec, tmp_path)
    specials = {t["content"]: t["id"] for t in spec["added_tokens"] if t["special"]}
    assert enc.special_tokens_set == set(specials) | set(data.CHAT_TOKENS)  # ours after the last id
    last = max(max(spec["model"]["vocab"].values()), max(t["id"] for t in spec["added_tokens"]))
    assert [enc.encode_single_token(t) for t in data.CHAT_TOKENS] == [last + 1, last + 2, last + 3, last + 4]
    assert enc.n_vocab == last + 5 and enc.decode([last + 4]) == "<|end|>"
    for name, i in specials.items():
        assert enc.encode_single_token(name) == data.special_id(enc, name) == i
        assert i not in enc.encode_ordinary(f"x {name} y{name}")  # forged special text stays text
    eos = "<eos>" if style == "gemma" else "</s>"
    assert enc.eot_token == specials[eos]
    # encode with the specials allowed splits them out as the library does
    tk = tokenizers.Tokenizer.from_str(json.dumps(spec))
    for text in CORPUS + [f"{eos}a{eos} b", "[INST] hi [/INST][REF_1]x"]:
        assert enc.encode(text, allowed_special="all") == tk.encode(text, add_special_tokens=False).ids, text
    with pytest.raises(ValueError):
        enc.encode(f"a {eos}")


def test_added_tokens_that_are_not_special_are_matched_in_text(tmp_path):
    spec = sp_spec("mistral_v3")
    enc, v = ours(spec, tmp_path), {t["content"]: t["id"] for t in spec["added_tokens"]}
    ids = enc.encode_ordinary("see [REF_1]x[REF_1 [INST]")
    assert ids.count(v["[REF_1]"]) == 1 and ids.count(v["[REF_1"]) == 1  # the longest match first
    assert v["[INST]"] not in ids
    # a special token's text is skipped as a whole: an added token inside it is not matched either
    assert v["[REF_1]"] not in enc.encode_ordinary("[[REF_1]]")
    assert enc.encode_ordinary("a[[REF_1]]") == library(spec).encode("a[[REF_1]]", add_special_tokens=False).ids


@pytest.mark.parametrize("behavior", ["Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"])
def test_split_on_a_string_matches_the_library(behavior, tmp_path):
    split = tokenizers.pre_tokenizers.Split(" ", behavior.lower().replace("with", "_with_"))
    for text in ["How are  you?", "  lead", "trail  ", "a b   c", " ", "   ", "none"]:
        assert bpe._split_on(text, " ", behavior) == [p for p, _ in split.pre_tokenize_str(text)], text
    spec = change(sp_spec("llama_legacy"), ("pre_tokenizer",), {"type": "Split", "pattern": {"String": " "},
                                                                 "behavior": behavior, "invert": False})
    spec["normalizer"] = None  # so that the spaces reach the pre-tokenizer (they become byte tokens)
    assert_same_as_library(ours(spec, tmp_path), library(spec), CORPUS)


def test_the_dict_survives_json_and_a_checkpoint(tmp_path):
    spec = sp_spec("mistral_v3")
    tok = bpe.sp_bpe_tokenizer(spec, str(tmp_path))
    assert json.loads(json.dumps(tok)) == tok
    torch.save({"tokenizer": tok}, tmp_path / "ckpt.pt")
    again = torch.load(tmp_path / "ckpt.pt", weights_only=True)["tokenizer"]
    assert again == tok
    assert tok["type"] == "sp_bpe" and tok["bos_token"] == "<s>" and tok["eos_token"] == "</s>"
    enc = data.get_encoding(again)
    assert enc.encode_ordinary(TEXT) == library(spec).encode(TEXT, add_special_tokens=False).ids


def test_data_helpers_take_the_encoding(tmp_path):
    spec = sp_spec("llama_legacy")
    enc, v = ours(spec, tmp_path), spec["model"]["vocab"]
    assert enc.n_vocab == len(v) + len(data.CHAT_TOKENS) and enc.name == "tok"
    text = "Hello world, 中文 🎉"
    assert data.decode(enc, data.encode(enc, text) + [enc.n_vocab + 5]) == text  # padded ids are skipped
    lengths = data.token_byte_lengths(enc, enc.n_vocab + 3)
    assert lengths[v["<s>"]] == lengths[v["</s>"]] == lengths[v["<unk>"]] == 0 and not lengths[len(v):].any()
    assert lengths[v["<0xE4>"]] == 1 and lengths[v[R + "t"]] == 2
    # the bytes of a text's tokens add up to its UTF-8 bytes, plus the one prefix space of the legacy normalizer
    assert sum(lengths[i] for i in data.encode(enc, text)) == len(text.encode()) + 1


# -----------------------------------------------------------------------------
# Refusals: every option not implemented exactly is a DataError naming the field


def change(spec, where, value):
    spec = copy.deepcopy(spec)
    node = spec
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    return spec


REFUSED = [
    (("model", "type"), "Unigram", "model.type"),
    (("model", "dropout"), 0.1, "model.dropout"),
    (("model", "continuing_subword_prefix"), "##", "model.continuing_subword_prefix"),
    (("model", "unk_token"), "<nope>", "model.unk_token"),
    (("model", "merges"), [["▁t", "no-such-token"]], "model.merges"),
    (("normalizer",), {"type": "NFKC"}, "normalizer"),
    (("normalizer",), {"type": "Replace", "pattern": {"Regex": " +"}, "content": R}, "normalizer Replace pattern"),
    (("pre_tokenizer",), {"type": "ByteLevel", "add_prefix_space": False}, "pre_tokenizer"),
    (("pre_tokenizer",), {"type": "Split", "pattern": {"Regex": "\\s"}, "behavior": "Isolated", "invert": False},
     "pre_tokenizer Split pattern"),
    (("pre_tokenizer",), {"type": "Split", "pattern": {"String": " "}, "behavior": "Isolated", "invert": True},
     "pre_tokenizer"),
    (("pre_tokenizer",), {"type": "Sequence", "pretokenizers": [metaspace("first", False), metaspace("first", False)]},
     "pre_tokenizer"),
    (("decoder",), None, "decoder"),
    (("decoder",), {"type": "WordPiece", "prefix": "##"}, "decoder"),
    (("added_tokens",), [added("</s>", 2), {**added("<x>", 5, False), "normalized": True}], "added token"),
    (("added_tokens",), [added("</s>", 2), {**added("<x>", 5, False), "lstrip": True}], "added token"),
    (("added_tokens",), [added("<s>", 1)], "added_tokens"),  # no end-of-sequence token
    (("added_tokens",), [added("</s>", 2), {**added("<s>", 1), "normalized": True}, added("<x>", 5, False)],
     "added tokens"),
]


@pytest.mark.parametrize("where,value,field", REFUSED, ids=[r[2] + ":" + json.dumps(r[1])[:30] for r in REFUSED])
def test_unsupported_options_are_refused_by_name(where, value, field, tmp_path):
    with pytest.raises(data.DataError, match=f"^{re.escape(str(tmp_path))}: {field}"):
        bpe.sp_bpe_tokenizer(change(sp_spec("llama_legacy"), where, value), str(tmp_path))


# -----------------------------------------------------------------------------
# Real files: Mistral's SentencePiece models (the mistral-common package), converted to tokenizer.json by
# transformers in the legacy structure of the Llama 2 / TinyLlama / Mistral v0.1 files and in the Metaspace
# structure it writes now. Mistral 7B's first tokenizer is a Llama 2-style 32,000-piece model; v3 adds
# 768 control tokens, some user-defined (not special).


def mistral_tokenizer_json(model_name, legacy, out_dir):
    for module in ("sentencepiece", "google.protobuf", "transformers"):
        pytest.importorskip(module)
    found = importlib.util.find_spec("mistral_common")
    model_file = found and os.path.join(found.submodule_search_locations[0], "data", model_name)
    if not model_file or not os.path.isfile(model_file):
        pytest.skip(f"mistral-common with data/{model_name} is not installed")
    import sentencepiece
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import LlamaConverter, SentencePieceExtractor

    class Extractor(SentencePieceExtractor):  # transformers 5's LlamaConverter passes vocab_scores alone
        def extract(self, vocab_scores=None):
            try:
                from transformers.tokenization_utils_base import generate_merges
            except ImportError:  # transformers 4
                return super().extract(vocab_scores)
            vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
            return vocab, generate_merges(vocab, dict(vocab_scores) if vocab_scores else None)

    sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
    slow = types.SimpleNamespace(vocab_file=model_file, legacy=legacy, add_prefix_space=True,  # what the converter
                                 convert_ids_to_tokens=sp.id_to_piece)                        # reads of a slow one
    tk = type("Converter", (LlamaConverter,), {"SpmExtractor": Extractor})(slow).converted()
    tk.post_processor = processors.TemplateProcessing(single="<s>:0 $A:0", special_tokens=[("<s>", 1)])
    spec = json.loads(tk.to_str())  # as on the Hub: <unk> too is a special added token
    spec["added_tokens"].insert(0, added("<unk>", 0))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False)
    return spec


@pytest.mark.parametrize("model_name", ["tokenizer.model.v1", "mistral_instruct_tokenizer_240323.model.v3"])
@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "metaspace"])
def test_real_mistral_tokenizers_match_the_library(model_name, legacy, tmp_path):
    spec = mistral_tokenizer_json(model_name, legacy, str(tmp_path / "mistral"))
    if legacy:
        assert spec["pre_tokenizer"] is None
        assert [n["type"] for n in spec["normalizer"]["normalizers"]] == ["Prepend", "Replace"]
    else:
        assert spec["normalizer"] is None and spec["pre_tokenizer"]["prepend_scheme"] == "first"
    tok = bpe.sp_bpe_tokenizer(spec, str(tmp_path / "mistral" / "tokenizer.json"))
    assert (tok["bos_token"], tok["eos_token"], tok["name"]) == ("<s>", "</s>", "mistral")
    enc, tk = data.get_encoding(tok), library(spec)
    controls = [t["content"] for t in spec["added_tokens"]][:40]
    assert_same_as_library(enc, tk, CORPUS + [TEXT, "".join(controls), " ".join(controls) + " x"])
    with open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert_same_as_library(enc, tk, [readme, readme[:5000].replace(" ", "  ")])
