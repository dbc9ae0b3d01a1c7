"""
The model's own chat format (data.render_chat with a tokenizer's chat_format): ChatML, Llama 3 (3.0, and
3.1+ with its dated system turn) and Gemma 2/3, each read from a tokenizer_config.json's chat_template by
data.hf_chat_format and rendered without Jinja. Checked against transformers' apply_chat_template (which
runs the Jinja template) on the same tokenizer: identical ids; labels on the assistant replies and the
token that ends each of them only; DPO's prompt/reply split equal to the whole conversation; an unknown
template refused with a message. The templates here are written for these tests in the shape of each
family's (same markers, default system prompt, stripping and date rules); tests/test_tokenizers.py runs
the real files when a package provides them. Skipped when transformers is not installed.

  python -m pytest tests/test_chat_formats.py
"""

import json

import pytest

import bpe
import data
from model import IGNORE_INDEX

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEMPLATES = {
    "chatml": (["<|im_start|>", "<|im_end|>"], None, (
        "{%- if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a terse assistant.<|im_end|>\\n' }}"
        "{%- endif %}{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
        "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")),
    "llama3": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>", (
        "{%- for m in messages %}{%- set content = '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
        "m['content'] | trim + '<|eot_id|>' %}{%- if loop.index0 == 0 %}{%- set content = bos_token + content %}"
        "{%- endif %}{{- content }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")),
    "llama3.1": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>", (
        "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
        "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
        "{%- if not date_string is defined %}{%- set date_string = \"26 Jul 2024\" %}{%- endif %}"
        "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{{- 'Cutting Knowledge Date: December 2023\\n' }}"
        "{{- 'Today Date: ' + date_string + '\\n\\n' }}{{- system_message }}{{- '<|eot_id|>' }}"
        "{%- for m in messages %}{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim"
        " + '<|eot_id|>' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")),
    "gemma2": (["<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{% for m in messages %}{% if m['role'] == 'assistant' %}{% set role = 'model' %}{% else %}"
        "{% set role = m['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + m['content'] | trim + "
        "'<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}")),
    "gemma3": (["<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", (
        "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content']"
        " + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = '' -%}"
        "{%- set loop_messages = messages -%}{%- endif -%}{%- for m in loop_messages -%}{%- if m['role'] == 'assistant'"
        " -%}{%- set role = 'model' -%}{%- else -%}{%- set role = m['role'] -%}{%- endif -%}{{ '<start_of_turn>' + role"
        " + '\\n' + (first_user_prefix if loop.first else '') }}{{ m['content'] | trim }}{{ '<end_of_turn>\\n' }}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}")),
}
TEXTS = ["What is the capital of France?", "The capital of France is Paris.", "  Spaces around.  ",
         "Zwei Sätze. Deux phrases !", "def f(x):\n    return x + 1", "东京是日本的首都。🙂"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """{format: (directory with tokenizer.json and the tokenizer's files written by transformers, their tokenizer)}."""
    from tokenizers import decoders, models, pre_tokenizers, trainers
    dirs = {}
    for name, (specials, bos, template) in TEMPLATES.items():
        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>"] + specials,
                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(TEXTS * 10 + ["system user assistant model"] * 10, trainer)
        theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|endoftext|>")
        theirs.chat_template = template
        path = tmp_path_factory.mktemp(name)
        theirs.save_pretrained(str(path))
        tok.save(str(path / "tokenizer.json"))
        dirs[name] = (str(path), theirs)
    return dirs


def ours(path):
    tok = bpe.hf_bpe_tokenizer(path)
    tok["chat_format"] = data.hf_chat_format(path, tok["special_tokens"])
    return data.get_encoding(tok)


CONVERSATIONS = [
    [{"role": "user", "content": TEXTS[0]}, {"role": "assistant", "content": TEXTS[1]}],
    [{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": TEXTS[2]},
     {"role": "assistant", "content": TEXTS[3]}, {"role": "user", "content": TEXTS[4]},
     {"role": "assistant", "content": TEXTS[5]}],
]


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_the_rendering_is_transformers_apply_chat_template(model_dirs, name):
    path, theirs = model_dirs[name]
    enc = ours(path)
    assert enc.chat_format["name"] == {"llama3.1": "llama3", "gemma2": "gemma", "gemma3": "gemma"}.get(name, name)
    for conversation in CONVERSATIONS:
        if name == "gemma2" and conversation[0]["role"] == "system":
            with pytest.raises(data.DataError, match="no system role"):
                data.render_chat(enc, conversation)
            conversation = conversation[1:]
        for messages, gen in [(conversation, False), (conversation[:-1], True)]:
            want = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=False)
            ids, labels = data.render_chat(enc, messages, add_generation_prompt=gen)
            assert ids == list(want), (name, gen)
        # labels: every assistant reply and the token that ends it, nothing else
        ids, labels = data.render_chat(enc, conversation)
        learned = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
        end = data.end_of_turn(enc)
        replies = [data.encode(enc, m["content"].strip() if name != "chatml" else m["content"]) + [end]
                   for m in conversation if m["role"] == "assistant"]
        assert learned == [i for r in replies for i in r]
        assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels))


@pytest.mark.parametrize("name", ["chatml", "llama3.1", "gemma3"])
def test_dpo_split_is_the_whole_conversation(model_dirs, name):
    enc = ours(model_dirs[name][0])
    pair = {"prompt": CONVERSATIONS[1][:-1], "chosen": " Paris. ", "rejected": "Lyon."}
    prompt_ids, chosen, rejected = data.render_pair(enc, pair)
    whole, labels = data.render_chat(enc, pair["prompt"] + [{"role": "assistant", "content": pair["chosen"]}])
    assert whole[:len(prompt_ids) + len(chosen)] == prompt_ids + chosen
    assert chosen[-1] == rejected[-1] == data.end_of_turn(enc)
    assert [i for i, label in zip(whole[len(prompt_ids):], labels[len(prompt_ids):]) if label != IGNORE_INDEX] == chosen


def test_chat_format_from_special_tokens_without_a_template_and_ours_for_a_base_model(model_dirs, tmp_path):
    path, _ = model_dirs["chatml"]
    (tmp_path / "tokenizer.json").write_text(open(f"{path}/tokenizer.json").read())
    assert ours(str(tmp_path)).chat_format == {"name": "chatml"}  # no template, but ChatML's tokens
    gpt2 = data.get_encoding(data.gpt2_tokenizer())
    assert gpt2.chat_format == {"name": "ours"} and data.end_of_turn(gpt2) == data.special_id(gpt2, "<|end|>")


@pytest.mark.parametrize("template,why", [("{{ messages[0]['content'] }}", "no renderer"),
                                          ("<|im_start|>{{ '<think>' }}", "reasoning")])
def test_an_unknown_template_is_refused_when_rendered_not_when_loaded(model_dirs, tmp_path, template, why):
    path, _ = model_dirs["chatml"]
    (tmp_path / "tokenizer.json").write_text(open(f"{path}/tokenizer.json").read())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    enc = ours(str(tmp_path))
    assert data.encode(enc, "plain text still encodes")  # pretraining and plain sampling are unaffected
    with pytest.raises(data.DataError, match=f"tokenizer_config.json: chat_template: .*{why}"):
        data.render_chat(enc, CONVERSATIONS[0])
    with pytest.raises(data.DataError, match=why):
        data.end_of_turn(enc)


@pytest.mark.slow
def test_sft_of_an_instruct_model_learns_its_own_format_and_sample_stops_there(model_dirs, tmp_path):
    """A tiny random Llama with the ChatML tokenizer: sft.py trains on ChatML turns (no tokens of ours
    added), the checkpoint keeps the format, and sample.py answers in it and stops at <|im_end|>."""
    import shutil

    import torch

    import sample
    import sft
    from model import load_checkpoint
    path, theirs = model_dirs["chatml"]
    base = tmp_path / "base"
    shutil.copytree(path, base)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    transformers.LlamaForCausalLM(config).save_pretrained(str(base))
    records = tmp_path / "hi.jsonl"
    records.write_text((json.dumps({"instruction": "Say hi.", "output": "Hi."}) + "\n") * 2)
    out = tmp_path / "sft"
    sft.main(["--init-from", str(base), "--data", str(records), "--out", str(out), "--max-steps", "30",
              "--batch-size", "2", "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "30", "--val-fraction", "0",
              "--device", "cpu", "--dtype", "float32"])
    tok = load_checkpoint(out / "ckpt.pt")["tokenizer"]
    assert tok["chat_format"]["name"] == "chatml" and tok["chat_format"]["default_system"] == "You are a terse assistant."
    assert not set(data.CHAT_TOKENS) & set(tok["special_tokens"])  # its own format: none of our role tokens added
    answer = sample.main(["--init-from", str(out), "--prompt", "Say hi.", "--greedy", "--max-new-tokens", "8",
                          "--device", "cpu"])
    assert answer == ["Hi."]  # learned, and stopped at <|im_end|> (any other token would be printed)
    # the untrained instruct directory itself is a chat model too: its template renders the prompt
    rendered = data.render_chat(data.get_encoding(tok), [{"role": "user", "content": "Say hi."}], True)[0]
    assert rendered == list(theirs.apply_chat_template([{"role": "user", "content": "Say hi."}], tokenize=True,
                                                       add_generation_prompt=True, return_dict=False))
    assert len(sample.main(["--init-from", str(base), "--prompt", "Say hi.", "--greedy", "--max-new-tokens", "3",
                            "--device", "cpu"])) == 1
