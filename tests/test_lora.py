"""
LoRA (lora.py): the wrapped layer computes W x + (α/r)·B A x; a fresh adapter changes nothing; only A
and B learn; merging, unmerging and disabling are exact; adapter files are small and refuse a
different base model.

  python -m pytest tests/test_lora.py
"""

import copy
import os

import pytest
import torch

import lora
from lora import LoRALinear, apply_lora, base_fingerprint, load_lora, lora_config, lora_disabled, lora_state_dict, \
    merge_lora
from model import GPT, GPTConfig, FAMILIES, configure_optimizer, save_checkpoint


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100, **FAMILIES["gpt2"])
    cfg.update(overrides)
    return GPT(GPTConfig(**cfg)).eval()


def train_a_few_steps(model, steps=5, lr=1e-2, batch=None):
    """Train the adapters so that B != 0 and merging really changes the weights (on batch, or on random
    tokens)."""
    model.train()
    opt = configure_optimizer(model, lr, 0.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = batch if batch is not None else torch.randint(0, 100, (4, 16), generator=g)
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_lora_linear_is_the_paper_equation():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    layer = LoRALinear(base, r=2, alpha=8.0)
    torch.nn.init.normal_(layer.lora_B)  # B starts at 0; give it values so the update shows
    x = torch.randn(3, 6)
    expected = x @ base.weight.t() + base.bias + (8.0 / 2) * (x @ layer.lora_A.t() @ layer.lora_B.t())  # W x + b + (α/r) B A x
    torch.testing.assert_close(layer(x), expected)
    assert layer.lora_A.shape == (2, 6) and layer.lora_B.shape == (5, 2)  # A: r × d_in, B: d_out × r


def test_fresh_adapter_changes_no_output():
    model = tiny_model()
    x = torch.randint(0, 100, (2, 16))
    before = model(x)[0]
    apply_lora(model, r=4, alpha=8)
    torch.testing.assert_close(model(x)[0], before, rtol=0, atol=0)  # B = 0, so (α/r)·B A x = 0 exactly


def test_only_lora_parameters_are_trainable_and_get_gradients():
    model = apply_lora(tiny_model(), r=4, alpha=8, targets=("attn.qkv", "attn.proj", "mlp.fc"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(trainable) == 2 * 3 * 2  # (A, B) × 3 targets × 2 layers
    x = torch.randint(0, 100, (2, 16))
    model(x, x)[1].backward()
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            assert p.grad is not None and p.grad.abs().sum() > 0
        elif not name.endswith("lora_A"):  # dL/dA = 0 while B = 0, so A's gradient may be all zeros
            assert p.grad is None, name


def test_merged_and_unmerged_outputs_match_after_training():
    model = train_a_few_steps(apply_lora(tiny_model(), r=4, alpha=8))
    x = torch.randint(0, 100, (2, 16))
    adapted = model(x)[0]
    assert (adapted - tiny_model()(x)[0]).abs().max() > 1e-3  # training really moved the outputs
    merged = merge_lora(copy.deepcopy(model))
    assert not lora.lora_layers(merged)
    assert set(merged.state_dict()) == set(tiny_model().state_dict())  # plain model again: same keys
    torch.testing.assert_close(merged(x)[0], adapted, rtol=0, atol=1e-5)


def test_unmerge_and_disable_give_back_the_base():
    base = tiny_model()
    model = train_a_few_steps(apply_lora(copy.deepcopy(base), r=4, alpha=8))
    x = torch.randint(0, 100, (2, 16))
    with lora_disabled(model):
        torch.testing.assert_close(model(x)[0], base(x)[0], rtol=0, atol=0)
    adapted = model(x)[0]
    for layer in lora.lora_layers(model):
        layer.merge()
    torch.testing.assert_close(model(x)[0], adapted, rtol=0, atol=1e-5)  # merged: the update sits in W
    for layer in lora.lora_layers(model):
        layer.unmerge()
    for i in range(2):  # unmerged: every base weight is back to what it was
        for name in ("qkv", "proj"):
            torch.testing.assert_close(getattr(model.blocks[i].attn, name).base.weight,
                                       getattr(base.blocks[i].attn, name).weight, rtol=0, atol=1e-6)


def test_adapter_file_is_orders_of_magnitude_smaller(tmp_path):
    model = tiny_model(n_embd=128, n_head=4, vocab_size=50304, block_size=64)
    full_path, adapter_path = str(tmp_path / "full.pt"), str(tmp_path / "adapter.pt")
    save_checkpoint(full_path, model=model.state_dict())
    apply_lora(model, r=8, alpha=16)
    save_checkpoint(adapter_path, lora=lora_state_dict(model), lora_config=lora_config(model),
                    base_fingerprint="x" * 64)
    # per layer: qkv A 8×128 + B 384×8, proj A 8×128 + B 128×8 = 6,144 numbers, ×2 layers ≈ 49 kB
    # against ~6.5M numbers (the 50304×128 embedding dominates) ≈ 26 MB
    assert os.path.getsize(full_path) > 100 * os.path.getsize(adapter_path)


def test_adapter_round_trip_and_fingerprint_check():
    base = tiny_model()
    fingerprint = base_fingerprint(base)  # of the base as loaded, before any change
    assert base_fingerprint(copy.deepcopy(base)) == fingerprint and base_fingerprint(tiny_model(seed=1)) != fingerprint
    model = train_a_few_steps(apply_lora(copy.deepcopy(base), r=4, alpha=8))
    adapter = lora.adapter_checkpoint(model, "base/dir", fingerprint)
    assert adapter["lora_config"] == {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["attn.proj", "attn.qkv"],
                                      "train_rows": [], "modules_to_save": []}
    x = torch.randint(0, 100, (2, 16))
    restored = load_lora(copy.deepcopy(base), adapter).eval()
    torch.testing.assert_close(restored(x)[0], model(x)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="fingerprint"):
        load_lora(tiny_model(seed=1), adapter)  # other base weights


def test_targets_must_match_something():
    with pytest.raises(ValueError, match="match no linear layer"):
        apply_lora(tiny_model(), r=4, alpha=8, targets=("attn.nonexistent",))


def test_shared_weight_is_refused_as_a_target():
    """lm_head's weight is the token embedding: merging B A into it would move every input embedding."""
    with pytest.raises(ValueError, match="lm_head.*shared with.*tok_emb"):
        apply_lora(tiny_model(), r=4, alpha=8, targets=("attn.qkv", "lm_head"))
    untied = apply_lora(tiny_model(tie_embeddings=False), r=4, alpha=8, targets=("lm_head",))
    assert isinstance(untied.lm_head, LoRALinear)  # a weight of its own may be adapted


def test_lora_disabled_refuses_a_model_without_active_adapters():
    with pytest.raises(ValueError, match="no active LoRA adapters"):
        with lora_disabled(tiny_model()):
            pass
    merged = merge_lora(apply_lora(tiny_model(), r=4, alpha=8))
    with pytest.raises(ValueError, match="no active LoRA adapters"):
        with lora_disabled(merged):
            pass


def test_train_rows_only_those_rows_learn_and_round_trip(tmp_path):
    base = tiny_model()
    rows = [96, 97, 98, 99]  # say, the chat tokens
    fingerprint = base_fingerprint(base)
    model = apply_lora(copy.deepcopy(base), r=4, alpha=8, train_rows=rows)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if n.endswith(("lora_A", "lora_B"))} | {"tok_emb.rows"}
    assert model.lm_head.rows is model.tok_emb.rows  # tied: one set of rows for input and output
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randint(0, 96, (4, 8), generator=g), torch.randint(96, 100, (4, 8), generator=g)], 1)
    model = train_a_few_steps(model, batch=x)
    # the embedding itself never moved; the rows did
    torch.testing.assert_close(model.tok_emb.base.weight, base.tok_emb.weight, rtol=0, atol=0)
    assert (model.tok_emb.rows - base.tok_emb.weight[rows]).abs().max() > 1e-3
    with lora_disabled(model):  # the reference model has the base rows too
        torch.testing.assert_close(model(x)[0], base(x)[0], rtol=0, atol=0)
    adapted = model(x)[0]
    adapter = lora.adapter_checkpoint(model, "base/dir", fingerprint)
    assert set(adapter["lora"]) >= {"tok_emb.rows"} and adapter["lora_config"]["train_rows"] == rows
    restored = load_lora(copy.deepcopy(base), adapter).eval()
    torch.testing.assert_close(restored(x)[0], adapted, rtol=0, atol=0)
    merged = merge_lora(copy.deepcopy(model))
    assert set(merged.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(merged(x)[0], adapted, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged.tok_emb.weight[:96], base.tok_emb.weight[:96], rtol=0, atol=0)


def test_score_head_stays_trainable_and_is_saved_with_the_adapter():
    base = tiny_model()
    fingerprint = base_fingerprint(base)
    rm = copy.deepcopy(base).add_score_head()
    apply_lora(rm, r=4, alpha=8, modules_to_save=("score_head",))
    assert rm.score_head.weight.requires_grad and rm.score_head.bias.requires_grad
    opt = configure_optimizer(rm, 1e-2, 0.0)
    x = torch.randint(0, 100, (4, 8))
    for _ in range(3):
        (rm.scores(x)[:, -1] - torch.tensor([1.0, -1.0, 2.0, 0.0])).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    adapter = lora.adapter_checkpoint(rm, "base/dir", fingerprint, model_config={"score_head": True})
    assert {"score_head.weight", "score_head.bias"} <= set(adapter["lora"])
    restored = load_lora(copy.deepcopy(base), adapter)  # the base has no head: load_lora adds it
    torch.testing.assert_close(restored.scores(x), rm.scores(x), rtol=0, atol=0)


@pytest.mark.slow  # a few seconds: sft.py trains a tiny model
def test_lora_on_a_hugging_face_gpt2_learns_to_end_its_replies(tmp_path):
    """A HF GPT-2 has 50,257 rows, so the chat tokens are new rows: they must start distinct and train
    under LoRA, or <|end|> keeps the logit of every other new id and greedy decoding never emits it."""
    import json

    import data
    import sft
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=50257, **FAMILIES["gpt2"])
    hf = GPT(cfg)
    with torch.no_grad():  # rows of a real GPT-2's size (norm ~3-4): at std 0.02 no logit could stand out
        hf.tok_emb.weight.normal_(0, 1.0)
    hf.save_pretrained(str(tmp_path / "hf"))
    questions = [f"Is {w} here?" for w in ["the cat", "a dog", "my hat", "the sun", "our car", "his pen"]]
    path = tmp_path / "chat.jsonl"  # one short reply, so that the test is about stopping, not answering
    path.write_text("".join(json.dumps({"instruction": q, "output": "Yes."}) + "\n" for q in questions * 4))
    out = str(tmp_path / "sft")
    sft.main(["--init-from", str(tmp_path / "hf"), "--data", str(path), "--out", out, "--lora-r", "8",
              "--lora-targets", "attn.qkv", "attn.proj", "mlp.fc", "mlp.proj", "--lr", "3e-2", "--max-steps", "120",
              "--batch-size", "8", "--eval-every", "120", "--val-fraction", "0.05", "--device", "cpu", "--dtype", "float32", "--seed", "0"])
    model, ckpt = __import__("model").load_model(out)
    enc = data.get_encoding(data.checkpoint_tokenizer(ckpt))
    end = data.special_id(enc, "<|end|>")
    for q in questions:
        ids, _ = data.render_chat(enc, [{"role": "user", "content": q}], add_generation_prompt=True)
        out_ids = model.eval().generate(torch.tensor([ids]), 8, temperature=0, stop_token=end)[0, len(ids):].tolist()
        assert out_ids == data.encode(enc, "Yes.") + [end]
