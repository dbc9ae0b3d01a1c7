"""Tests for model.py: shapes, the loss, norms, RoPE, attention, the KV cache, sampling,
GPT-2 import/export, checkpoints, the optimizer groups, FLOP counting and the runtime set-up.

Every test builds a tiny model (2 layers, width 32, context 16, vocabulary 100) on the CPU and
checks values: hand-computed cases (arithmetic in the comments), equivalence with torch or
Hugging Face, and invariants. Run: python -m pytest tests/test_model.py
"""

import dataclasses
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import data
import model
from model import GPT, IGNORE_INDEX

# (family, config overrides): the two families, and grouped-query attention (4 query heads share 2 k/v heads)
CASES = {"gpt2": ("gpt2", {}), "modern": ("modern", {}), "gqa": ("modern", dict(n_head=4, n_kv_head=2))}


def make_model(config, seed=0):
    """A GPT in eval mode whose weights are the usual init plus N(0, 0.1²) noise, so that biases and
    norm weights are not 0 and 1 and the logits are spread out (no near-ties in argmax)."""
    torch.manual_seed(seed)
    m = GPT(config).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def case_model(tiny_config, case, seed=0, **overrides):
    family, kw = CASES[case]
    return make_model(tiny_config(family, **{**kw, **overrides}), seed)


def twin(m, **changes):
    """A copy of m with the same weights and some config fields changed (e.g. attn_impl)."""
    other = GPT(dataclasses.replace(m.config, **changes)).eval()
    other.load_state_dict(m.state_dict())
    return other


def tokens(B, T, V=100, seed=0):
    return torch.randint(V, (B, T), generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# Shapes


@pytest.mark.parametrize("case", CASES)
def test_logits_and_loss_shapes(tiny_config, case):
    m = case_model(tiny_config, case)
    idx = tokens(3, 16)
    logits, loss = m(idx, targets=idx)
    assert logits.shape == (3, 16, 100)
    assert loss.shape == () and torch.isfinite(loss)
    assert m(idx)[1] is None
    # qkv has (H + 2*Hkv) * D outputs: 2 heads, D 16 -> (2+4)*16 = 96; GQA 4 q + 2 kv heads, D 8 -> (4+4)*8 = 64
    H, Hkv, D = m.config.n_head, m.config.n_kv_head, 32 // m.config.n_head
    assert m.blocks[0].attn.qkv.weight.shape == ((H + 2 * Hkv) * D, 32)
    assert (case == "gqa") == (Hkv < H)


# -----------------------------------------------------------------------------
# Loss


def test_cross_entropy_of_zero_logits_is_log_vocab():
    # uniform distribution over V = 100 ids: -log(1/100) = ln 100 ≈ 4.6052 at every position
    targets = tokens(2, 5)
    loss = model.cross_entropy(torch.zeros(2, 5, 100), targets)
    torch.testing.assert_close(loss, torch.tensor(math.log(100)))


def random_logits_and_targets(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(2, 6, 11, generator=g)).requires_grad_()
    targets = torch.randint(11, (2, 6), generator=g)
    targets[0, 2] = targets[1, 0] = targets[1, 5] = IGNORE_INDEX
    return logits, targets


def loss_and_grad(fn, logits, targets):
    logits = logits.detach().clone().requires_grad_()
    loss = fn(logits, targets)
    loss.backward()
    return loss.detach(), logits.grad


def test_cross_entropy_matches_torch_value_and_gradient():
    logits, targets = random_logits_and_targets()
    ours = loss_and_grad(model.cross_entropy, logits, targets)
    ref = loss_and_grad(lambda z, y: F.cross_entropy(z.view(-1, 11), y.view(-1), ignore_index=IGNORE_INDEX),
                        logits, targets)
    torch.testing.assert_close(ours, ref)


def test_cross_entropy_ignores_masked_positions():
    logits, targets = random_logits_and_targets()
    changed = logits.detach().clone()
    changed[0, 2] += 10 * torch.randn(11)  # position (0, 2) has target IGNORE_INDEX
    loss_a, grad_a = loss_and_grad(model.cross_entropy, logits, targets)
    loss_b, grad_b = loss_and_grad(model.cross_entropy, changed, targets)
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(grad_a, grad_b)
    # d(mean loss)/dz_t = (softmax(z_t) - onehot(y_t)) / 9 over the 12 - 3 = 9 real targets, 0 where ignored
    valid = (targets != IGNORE_INDEX).unsqueeze(-1)
    onehot = F.one_hot(targets.clamp(min=0), 11)
    torch.testing.assert_close(grad_a, (logits.detach().softmax(-1) - onehot) * valid / 9)


def test_cross_entropy_all_ignored_is_zero_not_nan():
    logits = torch.randn(2, 3, 7, requires_grad=True)
    loss = model.cross_entropy(logits, torch.full((2, 3), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(logits.grad) == 0


def test_cross_entropy_accepts_sliced_logits():
    logits, targets = random_logits_and_targets()
    sliced = logits.detach()[:, :-1]  # (B, T-1, V), what a loss over response tokens passes
    torch.testing.assert_close(model.cross_entropy(sliced, targets[:, 1:]),
                               model.cross_entropy(sliced.contiguous(), targets[:, 1:]))


# -----------------------------------------------------------------------------
# Norms


def test_norms_hand_computed():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    # LayerNorm: mean 2.5, var (2.25 + 0.25 + 0.25 + 2.25)/4 = 1.25, y = (x - 2.5)/√1.25
    ln = model.LayerNorm(4, eps=0.0, bias=True)
    torch.testing.assert_close(ln(x), torch.tensor([[-1.5, -0.5, 0.5, 1.5]]) / math.sqrt(1.25))
    # RMSNorm: mean(x²) = (1 + 4 + 9 + 16)/4 = 7.5, y = x/√7.5
    rms = model.RMSNorm(4, eps=0.0)
    torch.testing.assert_close(rms(x), x / math.sqrt(7.5))


def norm_input(dtype, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(4, 5, 32, generator=g)).to(dtype)


# fp16 with values ~1e4: x² ~ 1e8 overflows fp16 (max 65504) unless the statistics are computed in fp32
NORM_CASES = [(torch.float32, 1.0), (torch.float32, 1e4), (torch.bfloat16, 1.0), (torch.bfloat16, 1e4),
              (torch.float16, 1e4)]


def norm_tolerance(dtype):
    return {} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)  # the output is rounded to x's dtype


@pytest.mark.parametrize("dtype,scale", NORM_CASES)
def test_layernorm_matches_torch(dtype, scale):
    ln = model.LayerNorm(32, eps=1e-5, bias=True)
    with torch.no_grad():
        ln.weight.normal_(1.0, 0.3)
        ln.bias.normal_(0.0, 0.3)
    x = norm_input(dtype, scale)
    ref = F.layer_norm(x.float(), (32,), ln.weight, ln.bias, 1e-5)
    torch.testing.assert_close(ln(x).float(), ref, **norm_tolerance(dtype))


@pytest.mark.parametrize("dtype,scale", NORM_CASES)
def test_rmsnorm_matches_torch(dtype, scale):
    rms = model.RMSNorm(32, eps=1e-5)
    with torch.no_grad():
        rms.weight.normal_(1.0, 0.3)
    x = norm_input(dtype, scale)
    ref = F.rms_norm(x.float(), (32,), rms.weight, 1e-5)
    torch.testing.assert_close(rms(x).float(), ref, **norm_tolerance(dtype))


# -----------------------------------------------------------------------------
# Rotary position embeddings


def rotate(x, pos, tables):
    """apply_rope to one vector x (D,) as if it sat at position pos."""
    cos, sin = tables
    return model.apply_rope(x.view(1, 1, 1, -1), cos[pos:pos + 1], sin[pos:pos + 1]).view(-1)


def test_rope_tables_hand_computed_and_position_zero_is_identity():
    # D = 2: one frequency, theta^0 = 1, so position p rotates (x1, x2) by p radians
    cos, sin = model.rope_tables(3, 2, 10000.0)
    torch.testing.assert_close(cos[:, 0], torch.tensor([1.0, math.cos(1), math.cos(2)]))
    rotated = rotate(torch.tensor([1.0, 0.0]), 1, (cos, sin))
    torch.testing.assert_close(rotated, torch.tensor([math.cos(1), math.sin(1)]))
    tables = model.rope_tables(16, 8, 10000.0)
    x = torch.randn(2, 3, 16, 8)
    torch.testing.assert_close(model.apply_rope(x[:, :, :1], tables[0][:1], tables[1][:1]), x[:, :, :1])


def test_rope_preserves_norm():
    cos, sin = model.rope_tables(16, 8, 10000.0)
    x = torch.randn(2, 3, 16, 8)
    torch.testing.assert_close(model.apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))


def test_rope_dot_product_depends_only_on_distance():
    tables = model.rope_tables(16, 8, 10000.0)
    q, k = torch.randn(8), torch.randn(8)
    dots = [rotate(q, m, tables) @ rotate(k, n, tables) for m, n in [(3, 1), (7, 5), (15, 13)]]  # distance 2
    torch.testing.assert_close(dots[1], dots[0])
    torch.testing.assert_close(dots[2], dots[0])
    assert not torch.allclose(rotate(q, 4, tables) @ rotate(k, 1, tables), dots[0])  # distance 3 differs


# -----------------------------------------------------------------------------
# Attention


@pytest.mark.parametrize("case", CASES)
def test_manual_attention_matches_sdpa(tiny_config, case):
    sdpa = case_model(tiny_config, case, attn_impl="sdpa")
    manual = twin(sdpa, attn_impl="manual")
    idx = tokens(2, 16)
    for m in (sdpa, manual):
        m.zero_grad()
        m(idx, targets=idx.roll(-1, 1))[1].backward()
    torch.testing.assert_close(manual(idx)[0], sdpa(idx)[0], rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(manual.named_parameters(), sdpa.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
def test_grouped_query_attention_equals_mha_with_shared_kv_heads(tiny_config, attn_impl):
    # H 4 query heads, Hkv 2 k/v heads of D 8: query heads 0, 1 read k/v head 0 and heads 2, 3 read head 1.
    # An MHA model whose k/v heads are copies [k0, k0, k1, k1] must give the same logits.
    gqa = case_model(tiny_config, "gqa", attn_impl=attn_impl)
    mha = GPT(dataclasses.replace(gqa.config, n_kv_head=4)).eval()
    sd = gqa.state_dict()
    for i in range(2):
        q, k, v = sd[f"blocks.{i}.attn.qkv.weight"].split([32, 16, 16])  # rows: (H + 2·Hkv)·D = 64
        k, v = (w.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32) for w in (k, v))
        sd[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, k, v])
    mha.load_state_dict(sd)
    idx = tokens(2, 16)
    torch.testing.assert_close(gqa(idx)[0], mha(idx)[0])


@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
@pytest.mark.parametrize("case", CASES)
def test_future_tokens_do_not_change_past_logits(tiny_config, case, attn_impl):
    m = case_model(tiny_config, case, attn_impl=attn_impl)
    idx = tokens(2, 16)
    changed = idx.clone()
    changed[:, 9] = (idx[:, 9] + 1) % 100  # change only position j = 9
    before, after = m(idx)[0], m(changed)[0]
    torch.testing.assert_close(after[:, :9], before[:, :9])
    assert not torch.allclose(after[:, 9:], before[:, 9:])


# -----------------------------------------------------------------------------
# KV cache and generation


@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
@pytest.mark.parametrize("case", CASES)
def test_kv_cache_steps_match_full_forward(tiny_config, case, attn_impl):
    m = case_model(tiny_config, case, attn_impl=attn_impl)
    idx = tokens(2, 16)
    cache = model.KVCache(m.config, 2, "cpu", torch.float32)
    steps = [m(idx[:, :5], cache=cache)[0]]                   # prefill 5 tokens ...
    steps += [m(idx[:, t:t + 1], cache=cache)[0] for t in range(5, 16)]  # ... then one at a time
    assert cache.pos == 16
    torch.testing.assert_close(torch.cat(steps, dim=1), m(idx)[0], rtol=1e-5, atol=1e-5)


# (prompt length, new tokens): inside block_size 16, and 10 + 12 = 22 tokens running past it
@pytest.mark.parametrize("prompt_len,new", [(4, 8), (10, 12)])
@pytest.mark.parametrize("case", CASES)
def test_greedy_generate_with_cache_equals_without(tiny_config, case, prompt_len, new):
    m = case_model(tiny_config, case)
    idx = tokens(2, prompt_len)
    cached = m.generate(idx, new, temperature=0, use_cache=True)
    assert cached.shape == (2, prompt_len + new)
    assert torch.equal(cached, m.generate(idx, new, temperature=0, use_cache=False))


def test_temperature_zero_is_deterministic_argmax(tiny_config):
    m = case_model(tiny_config, "modern")
    idx = tokens(2, 4)
    out = m.generate(idx, 6, temperature=0)
    assert torch.equal(out, m.generate(idx, 6, temperature=0))
    assert torch.equal(out[:, :4], idx)
    for t in range(4, 10):  # each new token is the argmax of the model's logits on the prefix before it
        assert torch.equal(out[:, t], m(out[:, :t])[0][:, -1].argmax(-1))


@pytest.mark.parametrize("kwargs", [dict(top_k=1), dict(top_p=1e-6)], ids=["top_k=1", "top_p=1e-6"])
def test_sampling_with_one_candidate_equals_greedy(tiny_config, kwargs):
    m = case_model(tiny_config, "gpt2")
    idx = tokens(3, 4)
    sampled = m.generate(idx, 8, temperature=1.0, generator=torch.Generator().manual_seed(1), **kwargs)
    assert torch.equal(sampled, m.generate(idx, 8, temperature=0))


def draw(logits, n=4000, seed=0, **kwargs):
    """n draws of sample_next from the same logits row: a (n,) tensor of ids."""
    rows = logits.unsqueeze(0).repeat(n, 1)
    return model.sample_next(rows, generator=torch.Generator().manual_seed(seed), **kwargs).view(-1)


# probs 0.5, 0.3, 0.15, 0.05; mass before each id: 0, 0.5, 0.8, 0.95. The nucleus keeps an id while
# the mass before it is < p: p 0.4 -> {0}; 0.7 -> {0, 1} (0.5 + 0.3 = 0.8 >= 0.7); 0.9 -> {0, 1, 2}
@pytest.mark.parametrize("top_p,kept", [(0.4, {0}), (0.7, {0, 1}), (0.9, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_sample_next_top_p_keeps_smallest_set_reaching_p(top_p, kept):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    ids = draw(probs.log(), top_p=top_p)
    assert set(ids.tolist()) == kept
    # renormalised over the kept set: P(id 0) = 0.5 / sum(kept probs), e.g. 0.5/0.8 = 0.625 for p = 0.7
    expected = 0.5 / probs[sorted(kept)].sum().item()
    assert abs((ids == 0).float().mean().item() - expected) < 0.04


def test_sample_next_top_k_masks_all_but_k_largest():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5, 2.5])
    ids = draw(logits, top_k=2)
    assert set(ids.tolist()) == {1, 4}
    # softmax over the kept logits 3.0 and 2.5: P(id 1) = 1/(1 + e^-0.5) ≈ 0.6225
    assert abs((ids == 1).float().mean().item() - 1 / (1 + math.exp(-0.5))) < 0.04


def successor_model(tiny_config):
    """A gpt2-family model that always predicts (last token + 1) mod 32.

    Every block outputs 0 (all its weights are 0), so the final state is tok_emb[i] = 10·e_i. LayerNorm
    maps it to a·e_i + b with a > 0, and lm_head row j is e_{j-1}, so logit j = a·[j - 1 = i] + b.
    """
    m = GPT(tiny_config("gpt2", vocab_size=32, tie_embeddings=False)).eval()  # V = C = 32
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.fill_(1.0 if name.endswith(("ln1.weight", "ln2.weight", "ln_f.weight")) else 0.0)
        m.tok_emb.weight.copy_(10 * torch.eye(32))
        m.lm_head.weight.copy_(torch.eye(32).roll(1, dims=0))  # row j holds its 1 in column j - 1
    return m


def test_stop_token_ends_generation_and_pads_finished_rows(tiny_config):
    m = successor_model(tiny_config)
    prompt = torch.tensor([[5], [3]])
    assert m.generate(prompt, 4, temperature=0)[:, 1:].tolist() == [[6, 7, 8, 9], [4, 5, 6, 7]]
    assert m.generate(torch.tensor([[30]]), 3, temperature=0).tolist() == [[30, 31, 0, 1]]  # wraps mod 32
    # stop at 7: row 0 emits it 2nd and is padded with 7; row 1 emits it 4th, so 4 of the 10 steps run
    steps = list(m.stream(prompt, 10, temperature=0, stop_token=7))
    assert len(steps) == 4 and all(s.shape == (2, 1) for s in steps)
    out = m.generate(prompt, 10, temperature=0, stop_token=7)
    assert out.tolist() == [[5, 6, 7, 7, 7], [3, 4, 5, 6, 7]]


# -----------------------------------------------------------------------------
# Hugging Face GPT-2 format


def random_hf_gpt2(transformers, seed=0):
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=100)
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # HF initialises biases to 0 and LayerNorm weights to 1: randomise every tensor
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hf


@pytest.mark.slow  # importing transformers takes seconds
def test_from_pretrained_matches_hugging_face(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = random_hf_gpt2(transformers)
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    assert (ours.config.block_size, ours.config.n_layer, ours.config.n_embd) == (64, 2, 32)
    idx = tokens(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_save_pretrained_loads_in_hugging_face(tiny_config, tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = case_model(tiny_config, "gpt2")
    ours.save_pretrained(str(tmp_path))
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    idx = tokens(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0], rtol=1e-4, atol=1e-4)


def test_save_pretrained_round_trip_and_file_format(tiny_config, tmp_path):
    ours = case_model(tiny_config, "gpt2")
    ours.save_pretrained(str(tmp_path))
    with open(tmp_path / "config.json") as f:
        hf_config = json.load(f)
    assert (hf_config["model_type"], hf_config["n_embd"], hf_config["n_positions"]) == ("gpt2", 32, 16)
    try:  # model.safetensors with the optional package, pytorch_model.bin without it
        from safetensors.torch import load_file
    except ImportError:
        assert sorted(os.listdir(tmp_path)) == ["config.json", "pytorch_model.bin"]
        sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    else:
        assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
        sd = load_file(str(tmp_path / "model.safetensors"))
    # Conv1D stores (in, out): c_attn (C, 3C) = (32, 96), c_fc (32, 128), mlp c_proj (128, 32)
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)
    assert sd["transformer.h.1.mlp.c_fc.weight"].shape == (32, 128)
    assert sd["transformer.h.1.mlp.c_proj.weight"].shape == (128, 32)
    assert torch.equal(sd["transformer.h.0.attn.c_attn.weight"], ours.blocks[0].attn.qkv.weight.t())
    loaded = GPT.from_pretrained(str(tmp_path)).eval()
    idx = tokens(2, 16)
    assert torch.equal(loaded(idx)[0], ours(idx)[0])
    # load_model on a Hugging Face directory: the same model, plus the bundled GPT-2 tokenizer
    via_load_model, ckpt = model.load_model(str(tmp_path))
    assert torch.equal(via_load_model(idx)[0], ours(idx)[0])
    assert (data.checkpoint_tokenizer(ckpt)["name"], ckpt["step"]) == ("gpt2", 0)


@pytest.mark.parametrize("family,overrides", [("modern", dict(score_head=True)), ("gpt2", dict(tie_embeddings=False)),
                                              ("gpt2", dict(n_kv_head=1))])
def test_save_pretrained_rejects_what_no_hf_format_holds(tiny_config, tmp_path, family, overrides):
    with pytest.raises(ValueError):
        GPT(tiny_config(family, **overrides)).save_pretrained(str(tmp_path))
    assert not os.listdir(tmp_path)


def test_from_pretrained_rejects_other_model_types(tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump(dict(model_type="falcon", n_positions=16, vocab_size=100, n_layer=2, n_head=2, n_embd=32), f)
    with pytest.raises(ValueError, match="config.json: model_type = \"falcon\""):  # the others: test_hf_*.py
        GPT.from_pretrained(str(tmp_path))


# -----------------------------------------------------------------------------
# Checkpoints


def assert_same(a, b):
    """Exact equality of nested dicts/lists/tuples of tensors and plain values, types included."""
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_checkpoint_round_trip_is_exact(tiny_config, tmp_path):
    m = case_model(tiny_config, "gqa")
    state = dict(model=m.state_dict(), model_config=dataclasses.asdict(m.config), step=7,
                 args={"lr": 3e-4, "betas": (0.9, 0.95), "name": "run", "flag": None},
                 sampler={"generator": torch.Generator().manual_seed(3).get_state()},
                 nested={"a": {"b": [torch.arange(3, dtype=torch.int16), torch.randn(2, 2).bfloat16()]}})
    path = str(tmp_path / "sub" / "ckpt.pt")  # save_checkpoint creates the directory
    model.save_checkpoint(path, **state)
    assert os.listdir(tmp_path / "sub") == ["ckpt.pt"]  # no .tmp left behind
    loaded = model.load_checkpoint(path)
    assert_same(loaded, state)
    # from_dict ignores keys a newer version might add
    assert model.GPTConfig.from_dict({**loaded["model_config"], "unknown_field": 1}) == m.config


_UNPICKLED = []


def _record_unpickle():
    _UNPICKLED.append("code ran")


class _Sneaky:
    """Unpickling this object calls _record_unpickle: stands in for arbitrary code in a checkpoint."""

    def __reduce__(self):
        return (_record_unpickle, ())


def test_load_checkpoint_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "step": 1, "payload": _Sneaky()}, path)
    _UNPICKLED.clear()
    with pytest.raises(SystemExit, match="objects other than tensors and plain data"):
        model.load_checkpoint(str(path))
    assert _UNPICKLED == []
    torch.load(path, weights_only=False)  # control: a full unpickle would have run the payload
    assert _UNPICKLED == ["code ran"]


def test_load_model_from_directory_and_file(tiny_config, tmp_path):
    m = case_model(tiny_config, "gqa", rope_theta=500.0)
    model.save_checkpoint(str(tmp_path / "ckpt.pt"), model=m.state_dict(),
                          model_config=dataclasses.asdict(m.config), step=5)
    idx = tokens(2, 16)
    for init_from in (str(tmp_path), str(tmp_path / "ckpt.pt")):
        loaded, ckpt = model.load_model(init_from)
        assert loaded.config == m.config and ckpt["step"] == 5
        assert torch.equal(loaded.eval()(idx)[0], m(idx)[0])
    with pytest.raises(FileNotFoundError):
        model.load_model(str(tmp_path / "missing"))


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    path = str(tmp_path / "file.bin")
    model.atomic_write(path, lambda f: f.write(b"old"))

    def failing_writer(f):
        f.write(b"new and half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        model.atomic_write(path, failing_writer)
    with open(path, "rb") as f:
        assert f.read() == b"old"
    model.atomic_write(path, lambda f: f.write(b"new"))
    with open(path, "rb") as f:
        assert f.read() == b"new"


# -----------------------------------------------------------------------------
# Optimizer, parameter and FLOP counts, runtime


@pytest.mark.parametrize("case", CASES)
def test_configure_optimizer_decays_matrices_only(tiny_config, case):
    m = case_model(tiny_config, case)
    m.ln_f.weight.requires_grad_(False)  # frozen parameters are left out
    decayed, plain = model.configure_optimizer(m, lr=1e-3, weight_decay=0.1).param_groups
    assert (decayed["weight_decay"], plain["weight_decay"]) == (0.1, 0.0)
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    ids = [id(p) for p in decayed["params"] + plain["params"]]
    trainable = {id(p) for p in m.parameters() if p.requires_grad}  # parameters() lists tied lm_head once
    assert len(ids) == len(set(ids)) and set(ids) == trainable
    assert id(m.ln_f.weight) not in ids


# gpt2, V 100, C 32, L 2, block 16. Per block: ln1 + ln2 2·2C = 128, qkv 3C² + 3C = 3168, attn proj
# C² + C = 1056, fc 4C² + 4C = 4224, mlp proj 4C² + C = 4128 -> 12704. N = 2·12704 + tok_emb V·C 3200
# (tied with lm_head) + ln_f 64 = 28672; the position table 16·32 = 512 is left out.
# modern, no biases: norms 2C = 64, qkv 3C² = 3072, proj C² = 1024, SwiGLU hidden 64·ceil(8·32/3/64) = 128:
# fc 32·256 = 8192, proj 128·32 = 4096 -> 16448 per block; N = 2·16448 + 3200 + ln_f 32 = 36128.
@pytest.mark.parametrize("family,n_params,n_pos", [("gpt2", 28672, 512), ("modern", 36128, 0)])
def test_num_params_and_flops_per_token_hand_computed(tiny_config, family, n_params, n_pos):
    m = GPT(tiny_config(family))
    assert m.num_params() == n_params
    assert m.num_params(non_embedding=False) == n_params + n_pos
    # 6N + 12·L·C·T, attention term 12·2·32·16 = 12288 at T = block_size, 12·2·32·8 = 6144 at T = 8
    assert m.flops_per_token() == 6 * n_params + 12288
    assert m.flops_per_token(T=8) == 6 * n_params + 6144
    untied = GPT(tiny_config(family, tie_embeddings=False))
    assert untied.num_params() == n_params + 3200  # a separate lm_head adds V·C = 3200


def test_cpu_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert model.cpu_has_native_bf16(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw\n")
    assert not model.cpu_has_native_bf16(str(info))
    info.write_text("flags\t\t: fpu amx_bf16 amx_tile\n")
    assert model.cpu_has_native_bf16(str(info))
    assert not model.cpu_has_native_bf16(str(tmp_path / "absent"))  # not Linux: no file, no claim


@pytest.mark.parametrize("native,expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_dtype_auto_on_cpu_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(model, "cpu_has_native_bf16", lambda: native)
    rt = model.setup_runtime(device="cpu")
    assert rt.dtype == expected and ("native bf16" in rt.why)
    assert not rt.scaler.is_enabled()


def test_setup_runtime_cpu_fp32():
    rt = model.setup_runtime(device="cpu", dtype="float32")
    assert (rt.device.type, rt.dtype, rt.world_size, rt.ddp, rt.master) == ("cpu", torch.float32, 1, False, True)
    assert not rt.scaler.is_enabled()
    with rt.autocast():
        assert not torch.is_autocast_enabled("cpu")
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32


def test_setup_runtime_rejects_one_fixed_gpu_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit, match="cuda:1 under torchrun"):  # both ranks would land on GPU 1
        model.setup_runtime(device="cuda:1")


def test_setup_runtime_cpu_bfloat16_autocast():
    rt = model.setup_runtime(device="cpu", dtype="bfloat16")
    assert rt.dtype == torch.bfloat16 and not rt.scaler.is_enabled()
    with rt.autocast():
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16


@pytest.mark.parametrize("family", ["gpt2", "modern"])
def test_tiny_model_overfits_one_batch(tiny_config, family):
    torch.manual_seed(0)
    m = GPT(tiny_config(family))
    batch = tokens(4, 17, seed=1)
    x, y = batch[:, :-1], batch[:, 1:]
    opt = model.configure_optimizer(m, lr=1e-2, weight_decay=0.1)
    losses = []
    for _ in range(40):
        loss = m(x, y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(100)) < 0.3  # a fresh model is near uniform: ln 100 ≈ 4.61
    assert losses[-1] < 0.5 * losses[0]


# -----------------------------------------------------------------------------
# Left padding: a batch of prompts of different lengths computes what each row computes alone

def left_padded(rows, pad_id=0):
    """rows of different lengths -> idx (B, T) right-aligned, pad_mask (B, T) True on real tokens."""
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        idx[i, T - len(r):], mask[i, T - len(r):] = torch.tensor(r), True
    return idx, mask


PROMPTS = [[5, 17, 3], [9, 2, 44, 61, 7, 30, 8], [12], [70, 71, 72, 73, 74]]  # lengths 3, 7, 1, 5


@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
@pytest.mark.parametrize("case", CASES)
def test_left_padded_logits_equal_each_row_alone(tiny_config, case, attn_impl):
    m = case_model(tiny_config, case, attn_impl=attn_impl)
    idx, mask = left_padded(PROMPTS, pad_id=99)
    logits, _ = m(idx, pad_mask=mask)
    assert torch.isfinite(logits).all()  # padded positions too: no NaN from an all-masked score row
    for i, row in enumerate(PROMPTS):
        alone, _ = m(torch.tensor([row]))
        torch.testing.assert_close(logits[i, mask[i]], alone[0], rtol=0, atol=1e-5)
    # without the mask, padding is attended to and shifts positions: the rows change
    unmasked, _ = m(idx)
    assert (unmasked[0, -1] - m(torch.tensor([PROMPTS[0]]))[0][0, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
@pytest.mark.parametrize("case", CASES)
def test_batched_greedy_generation_equals_one_row_at_a_time(tiny_config, case, attn_impl, use_cache):
    m = case_model(tiny_config, case, attn_impl=attn_impl)
    idx, mask = left_padded(PROMPTS, pad_id=99)
    new = 6  # 7 + 6 = 13 <= block_size 16
    out = m.generate(idx, new, temperature=0, use_cache=use_cache, pad_mask=mask)
    for i, row in enumerate(PROMPTS):
        alone = m.generate(torch.tensor([row]), new, temperature=0, use_cache=use_cache)
        assert out[i, idx.size(1):].tolist() == alone[0, len(row):].tolist()


@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
@pytest.mark.parametrize("case", CASES)
def test_batched_generation_with_stop_token_and_cache_logits(tiny_config, case, attn_impl):
    """The cache's decode steps give each row the logits its own full forward gives, and a stop token
    ends rows independently."""
    m = case_model(tiny_config, case, attn_impl=attn_impl)
    idx, mask = left_padded(PROMPTS, pad_id=99)
    greedy = m.generate(idx, 6, temperature=0, pad_mask=mask)
    stop = int(greedy[1, idx.size(1) + 2])  # row 1's third new token: that row stops there
    out = m.generate(idx, 6, temperature=0, pad_mask=mask, stop_token=stop)
    for i, row in enumerate(PROMPTS):
        alone = m.generate(torch.tensor([row]), 6, temperature=0, stop_token=stop)[0, len(row):].tolist()
        got = out[i, idx.size(1):].tolist()
        assert got[:len(alone)] == alone and all(t == stop for t in got[len(alone):])
    # step by step with a cache: logits at each new token equal the full forward of that row
    cache = model.KVCache(m.config, len(PROMPTS), idx.device, torch.float32)
    m.hidden_states(idx, cache, mask)
    seq = [list(r) for r in PROMPTS]
    for t in range(3):
        nxt = greedy[:, idx.size(1) + t:idx.size(1) + t + 1]
        step_logits = m.lm_head(m.hidden_states(nxt, cache))[:, -1]  # (B, V)
        for i in range(len(seq)):
            seq[i].append(int(nxt[i]))
            full = m(torch.tensor([seq[i]]))[0][0, -1]
            torch.testing.assert_close(step_logits[i], full, rtol=0, atol=1e-5)


def test_padding_branch_gives_no_nan_when_a_row_is_mostly_padding(tiny_config):
    m = case_model(tiny_config, "modern", attn_impl="manual")
    idx, mask = left_padded([[1], list(range(2, 16))])  # row 0: 14 pads, then one token
    h = m.hidden_states(idx, pad_mask=mask)
    assert torch.isfinite(h).all()
    torch.testing.assert_close(h[0, -1], m.hidden_states(torch.tensor([[1]]))[0, -1], rtol=0, atol=1e-5)


def test_kv_cache_takes_the_autocast_dtype(tiny_config):
    m = case_model(tiny_config, "modern")
    seen = []
    real_init = model.KVCache.__init__

    def spy(self, config, batch_size, device, dtype, *length):
        seen.append(dtype)
        real_init(self, config, batch_size, device, dtype, *length)

    model.KVCache.__init__ = spy
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m.generate(tokens(1, 4), 2, temperature=0)
        m.generate(tokens(1, 4), 2, temperature=0)
    finally:
        model.KVCache.__init__ = real_init
    assert seen == [torch.bfloat16, torch.float32]


def test_kv_cache_holds_what_the_call_feeds_not_block_size(tiny_config, monkeypatch):
    """A 4,096-position model generating 7 tokens after 5 allocates 5 + 7 - 1 = 11 cache slots per layer (the
    last new token is never fed), and no buffer of the model grows with block_size (no mask, no RoPE table)."""
    m = case_model(tiny_config, "gqa", block_size=4096)
    made = []
    real_init = model.KVCache.__init__
    monkeypatch.setattr(model.KVCache, "__init__", lambda self, *args: made.append(self) or real_init(self, *args))
    out = m.generate(tokens(3, 5), 7, temperature=0)
    (cache,) = made
    assert [tuple(k.shape) for k in cache.k + cache.v] == [(3, 2, 11, 8)] * 4 and cache.pos == 11  # (B, Hkv, T, D)
    assert list(m.buffers()) == []
    assert torch.equal(out, m.generate(tokens(3, 5), 7, temperature=0, use_cache=False))


def test_decode_step_passes_no_mask_to_sdpa(tiny_config, monkeypatch):
    """One new token with no padding may see every cached key: no mask, so fused kernels stay usable."""
    m = case_model(tiny_config, "modern")
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((q.size(2), attn_mask is None, kw.get("is_causal")))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(model.F, "scaled_dot_product_attention", spy)
    m.generate(tokens(1, 4), 3, temperature=0)
    n_layer = m.config.n_layer
    assert calls[:n_layer] == [(4, True, True)] * n_layer           # prefill: is_causal, no mask
    assert calls[n_layer:] == [(1, True, False)] * (2 * n_layer)   # decode: no mask at all


# -----------------------------------------------------------------------------
# Log-probabilities and masked primitives

def test_token_logprobs_match_log_softmax_gather_on_a_padded_batch():
    logits, targets = random_logits_and_targets()
    targets[0, -2:] = IGNORE_INDEX  # a right-padded row
    lp = model.token_logprobs(logits, targets)
    direct = F.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    direct = direct.masked_fill(targets == IGNORE_INDEX, 0.0)
    assert lp.shape == targets.shape and lp.dtype == torch.float32
    torch.testing.assert_close(lp, direct)
    assert (lp[0, -2:] == 0).all()
    # cross_entropy is its negative mean over the real targets
    n = (targets != IGNORE_INDEX).sum()
    torch.testing.assert_close(model.cross_entropy(logits, targets), -lp.sum() / n)


def test_token_logprobs_hand_computed():
    # logits (0, ln 3) over V = 2: p = (1/4, 3/4); log p(1) = ln 0.75 ≈ -0.2877
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    torch.testing.assert_close(model.token_logprobs(logits, torch.tensor([[1]])), torch.tensor([[math.log(0.75)]]))


def test_logprobs_of_equals_full_logits_and_skips_the_prompt(tiny_config):
    m = case_model(tiny_config, "gpt2")
    idx = tokens(3, 12)
    targets = torch.full((3, 12), IGNORE_INDEX)
    targets[:, 7:] = tokens(3, 5, seed=2)  # a 7-token prompt, then a 5-token response
    targets[2, 10:] = IGNORE_INDEX          # a row whose response is shorter
    full = model.token_logprobs(m(idx)[0], targets)
    lp, ent = m.logprobs_of(idx, targets, entropy=True)
    torch.testing.assert_close(lp, full, rtol=0, atol=1e-6)
    assert (lp[:, :7] == 0).all() and (ent[:, :7] == 0).all() and (ent[2, 10:] == 0).all()
    torch.testing.assert_close(ent[:, 7:9], model.entropy_from_logits(m(idx)[0])[:, 7:9], rtol=0, atol=1e-5)
    seen = []
    handle = m.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    m.logprobs_of(idx, targets)
    handle.remove()
    assert seen == [(3, 5, 32)]  # lm_head ran on the 5 response positions only


def test_entropy_hand_computed():
    uniform = torch.zeros(1, 1, 8)                              # ln 8 for 8 equal outcomes
    peaked = torch.tensor([[[0.0, 1000.0]]])                    # one certain outcome: 0
    two = torch.tensor([[[0.0, math.log(3.0)]]])                # p = (1/4, 3/4): −(¼ ln ¼ + ¾ ln ¾) ≈ 0.5623
    torch.testing.assert_close(model.entropy_from_logits(uniform), torch.tensor([[math.log(8)]]))
    torch.testing.assert_close(model.entropy_from_logits(peaked), torch.tensor([[0.0]]))
    torch.testing.assert_close(model.entropy_from_logits(two), torch.tensor([[-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]]))


def test_masked_mean_and_whiten_hand_computed():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [5.0, -7.0, 50.0, 60.0]])
    m = torch.tensor([[True, True, True, False], [True, False, False, False]])
    assert model.masked_mean(x, m).item() == pytest.approx((1 + 2 + 3 + 5) / 4)  # 2.75: padding left out
    torch.testing.assert_close(model.masked_mean(x, m, dim=1), torch.tensor([2.0, 5.0]))
    assert model.masked_mean(x, torch.zeros_like(m)).item() == 0  # nothing selected: 0, not NaN
    w = model.masked_whiten(x, m)
    # values 1, 2, 3, 5: mean 2.75, biased variance (3.0625 + 0.5625 + 0.0625 + 5.0625) / 4 = 2.1875
    expected = (torch.tensor([1.0, 2.0, 3.0, 5.0]) - 2.75) / math.sqrt(2.1875)
    torch.testing.assert_close(w[m], expected)
    assert (w[~m] == 0).all()
    assert model.masked_mean(w, m).abs().item() < 1e-6 and model.masked_mean(w ** 2, m).item() == pytest.approx(1, abs=1e-5)
    torch.testing.assert_close(model.masked_whiten(x, m, shift_mean=False)[m], expected + 2.75)


# -----------------------------------------------------------------------------
# Score head (reward and value models)

def test_score_is_read_at_each_rows_last_real_token(tiny_config):
    m = make_model(tiny_config("modern", score_head=True))
    rows = [[4, 8, 15], [16, 23, 42, 7, 1, 9], [3]]
    T = max(map(len, rows))
    idx = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.bool)
    for i, r in enumerate(rows):  # right padding: real tokens first
        idx[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), True
    scores = m.scores(idx)                        # (B, T): right padding needs no pad_mask
    last = model.last_token(scores, mask)         # (B,)
    for i, r in enumerate(rows):
        alone = m.scores(torch.tensor([r]))[0, -1]
        torch.testing.assert_close(last[i], alone, rtol=0, atol=1e-5)
    assert model.last_token(torch.arange(12.0).view(2, 6), torch.tensor([[1, 1, 0, 0, 0, 0], [1] * 6]).bool()).tolist() == [1.0, 11.0]


def test_score_head_checkpoint_round_trip_gives_a_scoring_model(tiny_config, tmp_path):
    lm = make_model(tiny_config("gpt2"))
    rm = lm.add_score_head()
    assert rm.config.score_head and rm.score_head.weight.shape == (1, 32)
    model.save_checkpoint(str(tmp_path / "ckpt.pt"), model=rm.state_dict(), model_config=dataclasses.asdict(rm.config))
    loaded, _ = model.load_model(str(tmp_path))
    assert loaded.score_head is not None
    idx = tokens(2, 8)
    torch.testing.assert_close(loaded.eval().scores(idx), rm.scores(idx), rtol=0, atol=0)
    assert GPT(tiny_config("gpt2")).score_head is None  # a plain language model has none


# -----------------------------------------------------------------------------
# Loop helpers

def test_autocast_contexts_nest_and_switch_off_after():
    rt = model.setup_runtime(device="cpu", dtype="bfloat16")
    with rt.autocast():
        with rt.autocast():
            assert torch.is_autocast_enabled("cpu")
        assert torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")


def test_optimizer_step_sets_lr_clips_and_returns_the_norm():
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=0.5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    w.grad = torch.tensor([3.0, 4.0])  # norm 5
    norm = model.optimizer_step(opt, scaler, lr=0.1, grad_clip=1.0)
    assert norm == pytest.approx(5.0) and opt.param_groups[0]["lr"] == 0.1
    torch.testing.assert_close(w.detach(), torch.tensor([-0.06, -0.08]))  # clipped to norm 1, times lr 0.1
    assert w.grad is None  # zeroed for the next step
    w.grad = torch.tensor([0.3, 0.4])
    assert model.optimizer_step(opt, scaler, lr=1.0) == pytest.approx(0.5)  # no clipping
    torch.testing.assert_close(w.detach(), torch.tensor([-0.36, -0.48]))


def test_resume_args_take_model_flags_from_the_checkpoint():
    import argparse
    args = argparse.Namespace(lora_r=8, lr=1e-3)
    said = []
    model.resume_args(args, {"lora_r": 16, "lr": 5e-4}, ["lora_r"], log=said.append)
    assert (args.lora_r, args.lr) == (16, 1e-3)  # only the named flags follow the checkpoint
    assert said == ["--resume: --lora-r 16 from the checkpoint (the command line gave 8)"]


def test_resize_vocab_new_rows_distinct_near_the_mean_and_deterministic(tiny_config):
    m = make_model(tiny_config("gpt2", vocab_size=100))
    old = m.tok_emb.weight.detach().clone()
    m.resize_vocab(110)
    new = m.tok_emb.weight[100:].detach()
    assert m.lm_head.weight is m.tok_emb.weight and m.config.vocab_size == 110
    torch.testing.assert_close(m.tok_emb.weight[:100].detach(), old, rtol=0, atol=0)
    assert torch.cdist(new, new).add(torch.eye(10)).min() > 0  # every new row differs from the others
    # near the mean: the noise has covariance 1e-5·Σ, so its size is ~0.3% of the rows' own spread
    spread = (old - old.mean(0)).norm(dim=1).mean()
    assert (new - old.mean(0)).norm(dim=1).max() < 0.05 * spread
    again = make_model(tiny_config("gpt2", vocab_size=100))
    again.resize_vocab(110)
    torch.testing.assert_close(again.tok_emb.weight, m.tok_emb.weight, rtol=0, atol=0)  # same base, same rows


# -----------------------------------------------------------------------------
# Robustness: errors that survive `python -O`, the schedule, resume warnings

def test_config_errors_are_exceptions_not_asserts():
    with pytest.raises(ValueError, match="divisible by n_head"):
        model.GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        model.GPTConfig(n_embd=32, n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="head size 5 must be even"):
        model.GPTConfig(n_embd=20, n_head=4, **model.FAMILIES["modern"])
    m = GPT(model.GPTConfig(block_size=8, vocab_size=50, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match="sequence of 9 tokens > block_size 8"):
        m(torch.zeros(1, 9, dtype=torch.long))


def test_get_lr_warmup_cosine_and_end():
    # warmup 10 to max_lr 1.0: step 0 -> 0.1, step 9 -> 1.0; cosine to 0.1 at max_steps 110
    assert model.get_lr(0, 1.0, 10, 110) == pytest.approx(0.1)
    assert model.get_lr(9, 1.0, 10, 110) == pytest.approx(1.0)
    assert model.get_lr(10, 1.0, 10, 110) == pytest.approx(1.0)          # cosine starts at the top
    assert model.get_lr(60, 1.0, 10, 110) == pytest.approx(0.55)         # half way: 0.1 + 0.5·0.9
    assert model.get_lr(110, 1.0, 10, 110) == pytest.approx(0.1)         # min_lr_ratio · max_lr
    assert model.get_lr(500, 1.0, 10, 110) == pytest.approx(0.1)         # and stays there
    assert model.get_lr(0, 2.0, 0, 100) == pytest.approx(2.0)            # no warmup: the peak at once


def test_resume_warns_when_the_schedule_flags_change():
    import argparse
    args = argparse.Namespace(lora_r=8, max_steps=500, lr=1e-3)
    said = []
    model.resume_args(args, {"lora_r": 8, "max_steps": 300, "lr": 1e-3}, ["lora_r"], log=said.append,
                      warn=("max_steps", "lr"))
    assert args.max_steps == 500  # kept, but said
    assert said == ["--resume: warning: --max-steps was 300, now 500: the schedule and batches differ from the "
                    "interrupted run's"]


def test_rope_tables_stay_fp32_in_a_bf16_model(tiny_config, monkeypatch):
    m = GPT(tiny_config("modern")).to(torch.bfloat16)
    seen = []
    real = model.apply_rope
    monkeypatch.setattr(model, "apply_rope", lambda x, cos, sin: seen.append(cos.dtype) or real(x, cos, sin))
    m(tokens(1, 8))
    assert seen and set(seen) == {torch.float32}
    # and their values: the angles of a model cast to bf16 are the fp32 ones (a cast buffer kept 8 bits)
    seen_values = []
    monkeypatch.setattr(model, "apply_rope", lambda x, cos, sin: seen_values.append(cos) or real(x, cos, sin))
    m(tokens(1, 16))
    want, _ = model.rope_tables(torch.arange(16), m.config.head_dim, m.config.rope_theta)
    assert torch.equal(seen_values[0].reshape(want.shape), want)
    assert not torch.equal(want.bfloat16().float(), want)  # bf16 would have changed them


def test_positive_int_rejects_zero():
    import argparse
    assert model.positive_int("3") == 3
    with pytest.raises(argparse.ArgumentTypeError, match="at least 1"):
        model.positive_int("0")


def test_a_missing_gpt2_directory_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="huggingface-cli download openai-community/gpt2 --local-dir gpt2"):
        model.load_model("gpt2")
    with pytest.raises(FileNotFoundError) as other:
        model.load_model("elsewhere")
    assert "huggingface-cli" not in str(other.value)


def test_the_docstring_table_of_contents_points_at_the_sections():
    """model.py's contents table: each range starts at a section banner and ends where the next begins."""
    import re
    path = model.__file__
    lines = open(path, encoding="utf-8").read().split("\n")
    banners = [i + 1 for i, line in enumerate(lines) if line.startswith("# ----")]
    ranges = [tuple(map(int, m)) for m in re.findall(r"^  [a-zA-Z ]+: (\d+)-(\d+)", model.__doc__, re.M)]
    assert [a for a, _ in ranges] == banners
    ends = [b - 3 for b in banners[1:]] + [len(lines) - 1]  # two blank lines before each banner; a final newline
    assert [b for _, b in ranges] == ends
