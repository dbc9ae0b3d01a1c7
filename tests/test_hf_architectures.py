"""
Qwen3, Mistral, Phi-3, Gemma 2 and Gemma 3 (text) as switches of the one decoder (model.HF_ARCHITECTURES), and
the loader's safety and memory: tiny random models built by transformers from config fields like the real
ones' (Gemma 2's query_pre_attn_scalar other than the head size, soft-caps, alternating layers; Gemma 3's 5:1
local:global layers, two RoPE bases, linear scaling; Phi-3's fused projections), with EVERY norm weight and
bias redrawn at random so that a (1 + w) mistaken for w shows, and sequences longer than the sliding window
so that the band matters. Each loads with logits within 1e-4 of transformers', gives its greedy tokens with
and without the KV cache, exports back to its own architecture, and each switch changes the logits of these
models (so that the comparisons could fail). Also: a Qwen3 directory relabelled llama is refused, GPT-2's
n_inner is honoured, exports carry bos/eos/pad and a generation_config.json, and loading builds no random
weights. Skipped when transformers is not installed.

  python -m pytest tests/test_hf_architectures.py
"""

import dataclasses
import json

import pytest
import torch

import model
from model import GPT

transformers = pytest.importorskip("transformers")

WINDOW = 6  # sliding window of the tiny models; prompts are 20 tokens, so the band cuts into every one
SMALL = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1)
# (config class, model class, fields): the real model each imitates in a comment
FAMILIES = {
    # Qwen3-0.6B: q/k norms, head size 128 in a width of 1,024 with 16 heads (here 32 in 64 with 4), tied
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=True, rope_theta=1e6)),
    # Mistral-7B-v0.1: every layer slides (4,096 of 32,768 positions), untied
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW, head_dim=16)),
    # Phi-3-mini-4k: q|k|v and gate|up fused, no GQA, every layer slides (2,047 of 4,096 positions)
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=4, sliding_window=WINDOW, pad_token_id=0,
                                                   bos_token_id=1, eos_token_id=2)),
    # gemma-2-2b-it: 8 heads of 256 in a width of 2,304; soft-caps 50 and 30 (smaller here, so that they bite
    # on tiny random weights); query_pre_attn_scalar (256 there, 24 here: not the head size); layers alternate
    # sliding and global; eos [1, 107]
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(num_hidden_layers=3, head_dim=32, query_pre_attn_scalar=24,
                                                         sliding_window=WINDOW, attn_logit_softcapping=2.0,
                                                         final_logit_softcapping=3.0, eos_token_id=[1, 7])),
    # gemma-3-1b-it: 5 sliding layers to 1 global, 1 key/value head, RoPE bases 10,000 (local), 1e6 (global)
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(num_hidden_layers=6, num_key_value_heads=1, head_dim=32,
                                                                  query_pre_attn_scalar=32, sliding_window=WINDOW,
                                                                  sliding_window_pattern=6, rope_theta=1e6,
                                                                  rope_local_base_freq=1e4)),
}
# gemma-3-4b-it's global layers add linear RoPE scaling, factor 8
CASES = [(kind, {}) for kind in FAMILIES] + [("gemma3_text", dict(rope_scaling={"rope_type": "linear", "factor": 8.0}))]


def tiny(kind, **overrides):
    """A random transformers model of this family in eval mode, every 1-D weight (norms, biases) ~ U(0.5, 1.5)."""
    config_cls, model_cls, fields = FAMILIES[kind]
    torch.manual_seed(0)
    theirs = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**SMALL, **fields, **overrides}))
    with torch.no_grad():
        for p in theirs.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    theirs.generation_config.eos_token_id = None  # greedy runs their full length, as ours do
    return theirs.eval()


def load(theirs, path):
    theirs.save_pretrained(str(path))
    return GPT.from_pretrained(str(path)).eval()


def prompts(n=2, T=20, seed=1):
    return torch.randint(0, 160, (n, T), generator=torch.Generator().manual_seed(seed))


def check_same(theirs, ours, new=10):
    """Logits within 1e-4 of transformers' on sequences longer than the window, and their greedy tokens with
    and without our KV cache."""
    idx = prompts()
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], theirs(idx).logits, atol=1e-4, rtol=1e-4)
        want = theirs.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=new, do_sample=False,
                               pad_token_id=0)
    for use_cache in (True, False):
        assert ours.generate(idx, new, temperature=0, use_cache=use_cache).tolist() == want.tolist(), use_cache


@pytest.mark.parametrize("kind,overrides", CASES, ids=[k + ("-linear" if o else "") for k, o in CASES])
def test_logits_greedy_tokens_and_export_match_transformers(tmp_path, kind, overrides):
    theirs = tiny(kind, **overrides)
    ours = load(theirs, tmp_path / "theirs")
    assert ours.config.hf_model_type == kind and ours.hf_architecture() == kind
    check_same(theirs, ours)
    # and back: the family's own config.json and names, which transformers loads to the same logits
    ours.save_pretrained(str(tmp_path / "ours"))
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == (kind, [FAMILIES[kind][1]])
    assert config["max_position_embeddings"] == 64
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()
    assert type(again).__name__ == FAMILIES[kind][1]
    assert sorted(again.state_dict()) == sorted(theirs.state_dict())  # fused on disk where Phi-3 fuses
    again.generation_config.eos_token_id = None
    check_same(again, ours)
    reloaded = GPT.from_pretrained(str(tmp_path / "ours")).eval()
    assert torch.equal(reloaded(prompts())[0], ours(prompts())[0])


# each switch turned off in turn, on the loaded tiny model: the logits move, so the tests above would notice
SWITCHES = [("qwen3", "qk_norm", False), ("mistral", "sliding_window", 0), ("phi3", "sliding_window", 0),
            ("gemma2", "attn_softcap", 0.0), ("gemma2", "final_softcap", 0.0), ("gemma2", "query_pre_attn_scalar", 0.0),
            ("gemma2", "global_every", 0), ("gemma2", "norm_plus_one", False), ("gemma2", "embed_scale", False),
            ("gemma2", "mlp", "swiglu"), ("gemma3_text", "rope_local_theta", 0.0), ("gemma3_text", "global_every", 0)]


@pytest.mark.parametrize("kind,field,off", SWITCHES, ids=[f"{k}-{f}" for k, f, _ in SWITCHES])
def test_each_switch_changes_the_logits(tmp_path, kind, field, off):
    ours = load(tiny(kind), tmp_path)
    sd = ours.state_dict()
    if field == "qk_norm":
        sd = {k: v for k, v in sd.items() if "_norm" not in k}
    other = GPT(dataclasses.replace(ours.config, **{field: off})).eval()
    other.load_state_dict(sd)
    idx = prompts()
    assert (other(idx)[0] - ours(idx)[0]).abs().max() > 1e-3


def test_gemma3_rope_scaling_bites_on_global_layers_only(tmp_path):
    """Linear scaling on the local layers too, or on none, gives other logits than transformers' (which the
    test above matches)."""
    ours = load(tiny("gemma3_text", rope_scaling={"rope_type": "linear", "factor": 8.0}), tmp_path)
    assert (ours.config.rope_linear, ours.config.rope_local_theta, ours.config.global_every) == (8.0, 1e4, 6)
    idx = prompts()
    plain = GPT(dataclasses.replace(ours.config, rope_linear=1.0)).eval()
    plain.load_state_dict(ours.state_dict())
    assert (plain(idx)[0] - ours(idx)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["mistral", "gemma2"])
@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
def test_sliding_window_with_left_padding_and_cache_equals_each_row_alone(tmp_path, kind, attn_impl):
    """Rows of 20, 9 and 14 tokens (longer than the window of 6) batched with left padding: each row's logits
    and greedy tokens, with and without the KV cache, are those it gets alone."""
    ours = load(tiny(kind), tmp_path)
    ours.config.attn_impl = attn_impl
    for block in ours.blocks:
        block.attn.attn_impl = attn_impl
    rows = [prompts(1, n, seed=n)[0].tolist() for n in (20, 9, 14)]
    T = max(map(len, rows))
    idx = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[False] * (T - len(r)) + [True] * len(r) for r in rows])
    logits = ours(idx, pad_mask=mask)[0]
    assert torch.isfinite(logits).all()
    for i, r in enumerate(rows):
        torch.testing.assert_close(logits[i, mask[i]], ours(torch.tensor([r]))[0][0], rtol=0, atol=1e-5)
    for use_cache in (True, False):
        out = ours.generate(idx, 10, temperature=0, use_cache=use_cache, pad_mask=mask)
        for i, r in enumerate(rows):
            assert out[i, T:].tolist() == ours.generate(torch.tensor([r]), 10, temperature=0)[0, len(r):].tolist()


@pytest.mark.parametrize("kind", ["mistral", "gemma3_text"])
def test_kv_cache_steps_match_the_full_forward_past_the_window(tmp_path, kind):
    ours = load(tiny(kind), tmp_path)
    idx = prompts(2, 24)
    cache = model.KVCache(ours.config, 2, "cpu", torch.float32)  # no length: it grows as it is fed
    steps = [ours(idx[:, :4], cache=cache)[0]] + [ours(idx[:, t:t + 1], cache=cache)[0] for t in range(4, 24)]
    torch.testing.assert_close(torch.cat(steps, dim=1), ours(idx)[0], rtol=1e-4, atol=1e-4)  # other sum orders


# -----------------------------------------------------------------------------
# What the loader refuses, and what it keeps


def write_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not ...}))


def test_a_qwen3_directory_relabelled_llama_is_refused_naming_the_unread_tensors(tmp_path):
    tiny("qwen3").save_pretrained(str(tmp_path))
    write_config(tmp_path, model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(ValueError, match=r"4 tensors .* model_type 'llama', e\.g\. model\.layers\.0\.self_attn\.k_norm"):
        GPT.from_pretrained(str(tmp_path))


def test_gpt2_files_may_carry_mask_buffers_but_no_unknown_tensor(tmp_path):
    from safetensors.torch import load_file, save_file
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64,
                                                              vocab_size=100)).eval()
    hf.save_pretrained(str(tmp_path))
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["transformer.h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()  # what older GPT-2 files hold
    save_file(sd, str(tmp_path / "model.safetensors"), {"format": "pt"})
    GPT.from_pretrained(str(tmp_path))
    sd["transformer.h.0.attn.extra.weight"] = torch.zeros(3)
    save_file(sd, str(tmp_path / "model.safetensors"), {"format": "pt"})
    with pytest.raises(ValueError, match="h.0.attn.extra.weight"):
        GPT.from_pretrained(str(tmp_path))


def test_gpt2_n_inner_is_honoured_both_ways(tmp_path):
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64,
                                                              vocab_size=100, n_inner=48)).eval()
    ours = load(hf, tmp_path / "a")
    assert ours.blocks[0].mlp.fc.out_features == 48
    idx = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, atol=1e-4, rtol=1e-4)
    ours.save_pretrained(str(tmp_path / "b"))
    assert json.loads((tmp_path / "b" / "config.json").read_text())["n_inner"] == 48
    back = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "b")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, ours(idx)[0], atol=1e-4, rtol=1e-4)


REFUSED = [
    ("phi3", dict(rope_parameters=None, rope_scaling={"type": "longrope", "short_factor": [1.0] * 8,
                                                      "long_factor": [2.0] * 8}), "longrope"),
    ("phi3", dict(rope_parameters=None, rope_scaling={"type": "su", "short_factor": [1.0] * 8,
                                                      "long_factor": [2.0] * 8}), "'su'"),
    ("phi3", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor"),
    ("gemma3_text", dict(rope_parameters=None, rope_scaling={"rope_type": "yarn", "factor": 8.0}), "'yarn'"),
    ("gemma3_text", dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    ("gemma3_text", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    ("gemma2", dict(layer_types=["full_attention", "sliding_attention", "sliding_attention"]), "layer_types"),
    ("gemma2", dict(hidden_activation="gelu"), "hidden_activation"),
    ("qwen3", dict(attention_bias=True), "attention_bias"),
    ("mistral", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "'linear'"),
]


@pytest.mark.parametrize("kind,changes,named", REFUSED, ids=[f"{k}-{n}" for k, _, n in REFUSED])
def test_unsupported_configs_are_refused_by_name(tmp_path, kind, changes, named):
    tiny(kind).save_pretrained(str(tmp_path))
    write_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=f"config.json: .*{named}"):
        GPT.from_pretrained(str(tmp_path))


def test_the_gemma3_image_text_model_is_refused_with_the_text_model_named(tmp_path):
    config = transformers.Gemma3Config(text_config=dict(vocab_size=160, hidden_size=64, num_hidden_layers=2))
    (tmp_path / "config.json").write_text(config.to_json_string())
    with pytest.raises(ValueError, match="config.json: model_type = \"gemma3\" is Gemma 3's image-text .*gemma3_text"):
        GPT.from_pretrained(str(tmp_path))


def test_gemma3_hub_style_config_json_loads_the_same(tmp_path):
    """gemma-3-1b-it's config.json (transformers 4.50) names the RoPE bases rope_theta and rope_local_base_freq
    and the layer pattern sliding_window_pattern, where transformers 5 writes rope_parameters and layer_types."""
    theirs = tiny("gemma3_text")
    ours = load(theirs, tmp_path)
    write_config(tmp_path, rope_parameters=..., layer_types=..., _sliding_window_pattern=..., rope_theta=1e6,
                 rope_local_base_freq=1e4, rope_scaling=None, sliding_window_pattern=6)
    hub = GPT.from_pretrained(str(tmp_path)).eval()
    assert dataclasses.asdict(hub.config) == dataclasses.asdict(ours.config)


def test_export_writes_special_ids_and_transformers_stops_at_eos(tmp_path):
    ours = load(tiny("gemma2"), tmp_path / "a")
    assert ours.config.special_ids == {"bos_token_id": 2, "eos_token_id": [1, 7], "pad_token_id": 0}
    idx = prompts(1)
    greedy = ours.generate(idx, 10, temperature=0)[0, 20:].tolist()
    eos = greedy[3]  # make the 4th new token the end of text (with 7: generate stops at either)
    ours.config.special_ids = {"bos_token_id": 2, "eos_token_id": [eos, 7], "pad_token_id": 0}
    ours.save_pretrained(str(tmp_path / "b"))
    assert json.loads((tmp_path / "b" / "generation_config.json").read_text()) == ours.config.special_ids
    assert json.loads((tmp_path / "b" / "config.json").read_text())["eos_token_id"] == [eos, 7]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "b")).eval()
    with torch.no_grad():
        out = theirs.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=10, do_sample=False)
    stop = next(i for i, t in enumerate(greedy) if t in (eos, 7))
    assert out[0, 20:].tolist() == greedy[:stop + 1]  # generate stopped at the EOS


def test_loading_builds_no_random_weights_keeps_the_context_and_ties(tmp_path, monkeypatch):
    """A Llama-3-like context of 131,072 positions loads whole (no cap, no buffer sized by it), the model is
    built on the meta device, tied embeddings stay one tensor, and generation allocates what it uses."""
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**SMALL, "max_position_embeddings": 131072,
                                                                       "tie_word_embeddings": True})).eval()
    theirs.save_pretrained(str(tmp_path))
    devices = []
    real_init = GPT.init_weights
    monkeypatch.setattr(GPT, "init_weights", lambda self: devices.append(self.tok_emb.weight.device.type) or real_init(self))
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    assert devices == ["meta"]
    assert ours.config.block_size == 131072 and list(ours.buffers()) == []
    assert ours.lm_head.weight is ours.tok_emb.weight
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in ours.parameters())
    idx = prompts()
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], theirs(idx).logits, atol=1e-4, rtol=1e-4)
    made = []
    monkeypatch.setattr(model.KVCache, "make_room", lambda self, n: made.append(self.k[0].size(2)) or None)
    ours.generate(idx, 5, temperature=0)
    assert set(made) == {20 + 5 - 1}  # prompt + new tokens - 1 slots, not 131,072


def test_bf16_files_load_as_fp32_and_sharded_files_load(tmp_path):
    theirs = tiny("qwen3")
    theirs.to(torch.bfloat16).save_pretrained(str(tmp_path), max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    for name, p in theirs.named_parameters():
        if name == "model.embed_tokens.weight":
            assert torch.equal(ours.tok_emb.weight, p.float())
