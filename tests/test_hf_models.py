"""
Llama and Qwen2 checkpoints into the modern family (GPT.from_pretrained): tiny random LlamaForCausalLM
(grouped-query attention, tied and untied embeddings, a head size other than n_embd / n_head) and
Qwen2ForCausalLM (biases on q, k, v) built by transformers, saved, loaded here: logits equal to
transformers' to 1e-4 and the same greedy tokens with the KV cache; a sharded checkpoint; one-line errors
for configs this loader does not support. Skipped when transformers is not installed (CI installs it).

  python -m pytest tests/test_hf_models.py
"""

import json

import pytest
import torch

from model import GPT

transformers = pytest.importorskip("transformers")


def tiny(kind, **overrides):
    kw = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
              tie_word_embeddings=False)
    kw.update(overrides)
    torch.manual_seed(0)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw)).eval()


def check_same(theirs, ours):
    idx = torch.randint(0, 160, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], theirs(idx).logits, atol=1e-4, rtol=1e-4)
        want = theirs.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=10, do_sample=False,
                               pad_token_id=0)  # without the mask, HF takes every id 0 for padding
        got = ours.generate(idx, 10, temperature=0, use_cache=True)
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("kind,overrides", [
    ("llama", {}),                                   # GQA, untied
    ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    ("llama", {"head_dim": 32}),                     # 4 heads of 32 in a width of 64
    ("qwen2", {}),                                   # biases on q, k, v
    ("qwen2", {"tie_word_embeddings": True, "rope_theta": 1e6}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,  # Llama 3.1's,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),  # inside 64
])
def test_logits_and_greedy_tokens_match_transformers(tmp_path, kind, overrides):
    theirs = tiny(kind, **overrides)
    theirs.save_pretrained(str(tmp_path))
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    assert ours.config.tie_embeddings == overrides.get("tie_word_embeddings", False)
    assert ours.config.qkv_bias == (kind == "qwen2")
    check_same(theirs, ours)


def test_sharded_checkpoint(tmp_path):
    theirs = tiny("llama")
    theirs.save_pretrained(str(tmp_path), max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    check_same(theirs, GPT.from_pretrained(str(tmp_path)).eval())


@pytest.mark.parametrize("field,value", [("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
                                         ("hidden_act", "gelu"), ("use_sliding_window", True)])
def test_unsupported_configs_name_the_field(tmp_path, field, value):
    tiny("qwen2").save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    config[field] = value
    config.pop("rope_parameters", None) if field == "rope_scaling" else None
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=field):
        GPT.from_pretrained(str(tmp_path))


def test_load_model_takes_the_weights_and_refuses_to_guess_the_tokenizer(tmp_path):
    import data
    import model
    tiny("llama").save_pretrained(str(tmp_path))
    loaded, ckpt = model.load_model(str(tmp_path))
    assert loaded.config.n_kv_head == 2 and ckpt["hf_model_type"] == "llama"
    with pytest.raises(data.DataError, match="no tokenizer.json"):  # never GPT-2's ids for a Llama vocabulary
        data.checkpoint_tokenizer(ckpt)


MULTILINGUAL = ["The capital of France is Paris.", "Ça coûte 12,50 € — déjà vu?", "Größe, Straße; naïve café",
                "Москва — столица России.", "東京は日本の首都です。", "emoji 🙂👍🏽 and tabs\tand\n\nnewlines  ",
                "don't won't I'm you're 1234567 3.14159", "   leading spaces", "mixed-CASE Words ALLCAPS"]


def bpe_tokenizer_json(tmp_path, split_regex=None):
    """A tiny byte-level BPE trained by the tokenizers library on the sample, saved as tokenizer.json;
    split_regex: a Split pre-tokenizer before ByteLevel, as Qwen2 and Llama 3 have."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    if split_regex:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(split_regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(MULTILINGUAL * 20, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    return tok


@pytest.mark.parametrize("split_regex", [None, r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"])
def test_byte_level_bpe_encodes_as_the_tokenizers_library(tmp_path, split_regex):
    import bpe
    import data
    reference = bpe_tokenizer_json(tmp_path, split_regex)
    tok = bpe.hf_bpe_tokenizer(str(tmp_path))
    enc = data.get_encoding(tok)
    for text in MULTILINGUAL + ["unseen: Wörterbuch ĳ ∑ 你好 \u200d"]:
        assert data.encode(enc, text) == reference.encode(text).ids, text
        assert data.decode(enc, data.encode(enc, text)) == text
    specials = tok["special_tokens"]
    assert specials["<|endoftext|>"] == reference.token_to_id("<|endoftext|>")  # the model's own id kept
    assert specials["<|im_start|>"] == reference.token_to_id("<|im_start|>")
    n = reference.get_vocab_size()
    assert [specials[t] for t in data.CHAT_TOKENS] == list(range(n, n + 4))  # ours appended after the vocabulary


def test_llama_directory_loads_with_its_tokenizer_and_sentencepiece_is_refused(tmp_path):
    import data
    import model
    tiny("llama", vocab_size=640).save_pretrained(str(tmp_path))
    bpe_tokenizer_json(tmp_path)
    loaded, ckpt = model.load_model(str(tmp_path))
    enc = data.get_encoding(data.checkpoint_tokenizer(ckpt))
    assert data.special_id(enc, "<|end|>") == enc.n_vocab - 1 and loaded.config.vocab_size == 640
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["model"]["type"] = "Unigram"
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(data.DataError, match="SentencePiece"):
        data.checkpoint_tokenizer(ckpt)


@pytest.mark.parametrize("overrides", [dict(), dict(tie_embeddings=False, n_kv_head=1), dict(qkv_bias=True)])
def test_the_modern_family_exports_to_transformers(tiny_config, tmp_path, overrides):
    from model import FAMILIES, GPTConfig
    torch.manual_seed(0)
    ours = GPT(GPTConfig(block_size=32, vocab_size=160, n_layer=2, n_head=4, n_embd=64, **FAMILIES["modern"],
                         **overrides)).eval()
    if ours.config.qkv_bias:  # non-zero biases, so that losing them would show
        for block in ours.blocks:
            torch.nn.init.normal_(block.attn.qkv.bias, std=0.1)
    ours.save_pretrained(str(tmp_path))
    cls = transformers.Qwen2ForCausalLM if ours.config.qkv_bias else transformers.LlamaForCausalLM
    theirs = cls.from_pretrained(str(tmp_path)).eval()
    check_same(theirs, ours)
    check_same(theirs, GPT.from_pretrained(str(tmp_path)).eval())  # and back


def test_llama3_rope_scaling_round_trips_through_export(tmp_path):
    theirs = tiny("llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    theirs.save_pretrained(str(tmp_path / "a"))
    ours = GPT.from_pretrained(str(tmp_path / "a")).eval()
    assert tuple(ours.config.rope_llama3) == (8.0, 1.0, 4.0, 16)
    plain = GPT.from_pretrained(str(tmp_path / "a")).eval()
    plain.config.rope_llama3 = ()  # RoPE is computed from the config at each call
    idx = torch.randint(0, 160, (1, 40))
    assert not torch.allclose(plain(idx)[0], ours(idx)[0], atol=1e-3)  # the scaling matters in this context
    ours.save_pretrained(str(tmp_path / "b"))
    check_same(transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "b")).eval(), ours)


@pytest.mark.parametrize("which", ["world", "gpt2"])
def test_exported_tokenizer_json_encodes_as_ours(tmp_path, which):
    import os
    import bpe
    import data
    tokenizers = pytest.importorskip("tokenizers")
    tok = data.gpt2_tokenizer() if which == "gpt2" else data.load_tokenizer(os.path.join(data.DATA_DIR, "world", "tokenizer.json"))
    bpe.save_hf_tokenizer(tok, str(tmp_path))
    theirs = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    enc = data.get_encoding(tok)
    for text in MULTILINGUAL + ["The capital of France is Paris.", "  two  spaces\n\nand a line"]:
        assert theirs.encode(text, add_special_tokens=False).ids == data.encode(enc, text), text
        assert theirs.decode(data.encode(enc, text)) == text
    # and back: the exported file read as a model directory's tokenizer gives the same encoding
    again = data.get_encoding(bpe.hf_bpe_tokenizer(str(tmp_path)))
    assert again.encode_ordinary(MULTILINGUAL[3]) == data.encode(enc, MULTILINGUAL[3])
