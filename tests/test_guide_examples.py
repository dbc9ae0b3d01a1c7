"""
The guide's two examples, as the README runs them, on tiny random models (no weights can be downloaded
here): GPT-2 continuing "The capital of France is" (`sample.py --init-from GPT2_DIR --prompt ... --greedy`),
and Gemma 2 2B-it answering "What is the capital of France?" (`sample.py --init-from GEMMA_DIR --prompt ...
--greedy`). Each model directory is built by transformers from the real config's fields (smaller), with
the real tokenizer's structure: GPT-2's own byte-level BPE (bundled), and for Gemma a SentencePiece-style
tokenizer.json (byte fallback, ▁) with <start_of_turn>/<end_of_turn> and a chat template in Gemma 2's shape.
sample.py's greedy text must be transformers' greedy text, token for token: the whole path (tokenizer,
chat template, architecture, KV-cache generation, stop token, decoding) is exact. With real weights the
answers are Paris; here they are noise, which is as good a test. Skipped without transformers.

  python -m pytest tests/test_guide_examples.py
"""

import json

import pytest
import torch

import data
import sample

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def randomize_norms(model):
    with torch.no_grad():  # every 1-D weight off its default, so that a (1 + w) read as w would show
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model.eval()


def test_gpt2_continues_the_capital_of_france_as_transformers_does(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128)  # GPT-2's vocab of 50,257
    theirs = randomize_norms(transformers.GPT2LMHeadModel(config))
    theirs.save_pretrained(str(tmp_path))
    got = sample.main(["--init-from", str(tmp_path), "--prompt", "The capital of France is", "--greedy",
                       "--max-new-tokens", "8", "--device", "cpu", "--dtype", "float32"])
    enc = data.get_encoding(data.gpt2_tokenizer())
    prompt = torch.tensor([data.encode(enc, "The capital of France is")])
    want = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                           pad_token_id=50256)[0, prompt.size(1):].tolist()
    assert got == [data.decode(enc, [t for t in want if t != 50256])]


GEMMA2_TEMPLATE = (  # Gemma 2's shape: <bos>, no system role, assistant -> model, each message stripped
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for m in messages %}{% if m['role'] == 'assistant' %}{% set role = 'model' %}{% else %}"
    "{% set role = m['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + m['content'] | trim + "
    "'<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}")


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_gemma2_it_answers_what_is_the_capital_of_france_as_transformers_does(tmp_path, seed):
    from test_sp_bpe import sp_spec
    spec = sp_spec("gemma")  # normalizer ' ' -> ▁, Split on ' ', byte fallback, <bos>/<eos>, turn markers
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), bos_token="<bos>",
                                               eos_token="<eos>", pad_token="<pad>")
    tok.chat_template = GEMMA2_TEMPLATE
    tok.save_pretrained(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))  # the file as written, not re-serialised
    n_vocab = max(t["id"] for t in spec["added_tokens"]) + 1
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    torch.manual_seed(seed)
    config = transformers.Gemma2Config(  # gemma-2-2b-it's fields, smaller: soft-caps, (1 + w) norms, GeGLU,
        vocab_size=n_vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=3,  # √C embeddings, local
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,  # and global layers
        sliding_window=6, attn_logit_softcapping=5.0, final_logit_softcapping=3.0, max_position_embeddings=128,
        bos_token_id=tok.bos_token_id, eos_token_id=[tok.eos_token_id, eot], pad_token_id=tok.pad_token_id)
    theirs = randomize_norms(transformers.Gemma2ForCausalLM(config))
    theirs.save_pretrained(str(tmp_path))

    question = [{"role": "user", "content": "What is the capital of France?"}]
    got = sample.main(["--init-from", str(tmp_path), "--prompt", question[0]["content"], "--greedy",
                       "--max-new-tokens", "12", "--device", "cpu", "--dtype", "float32"])
    prompt = torch.tensor([tok.apply_chat_template(question, tokenize=True, add_generation_prompt=True,
                                                   return_dict=False)])
    assert prompt[0, 0].item() == tok.bos_token_id and prompt.size(1) > 8  # <bos><start_of_turn>user\n...
    want = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                           eos_token_id=eot, pad_token_id=tok.pad_token_id)[0, prompt.size(1):].tolist()
    assert got == [tok.decode([t for t in want if t != eot])]
