"""
The tiny world's evaluation (data.py, "The tiny world"; sample.py --eval).

The metrics are checked on hand-made replies, evaluate_world end to end with a scripted stand-in
for the model (so every metric has a hand-computed value), dataset_tokenizer's choice of a world's
own tokenizer, and sample.py --eval on a tiny untrained checkpoint.

  python -m pytest -q tests/test_world.py
"""

import base64
import json
import re
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch

import data
import model
import sample

# a few real capitals, chosen for their edge cases: a capital named like its country (Monaco),
# apostrophes, hyphens, two words, and one that is also an English word (Male)
CAPITAL_OF = {"France": "Paris", "Monaco": "Monaco", "Tonga": "Nuku'alofa", "Haiti": "Port-au-Prince",
              "Chad": "N'Djamena", "Guatemala": "Guatemala City", "Maldives": "Male", "Japan": "Tokyo"}
CAPITALS = set(CAPITAL_OF.values())
HELDOUT = ["Monaco", "Tonga", "Maldives", "Haiti"]
INVENTED = ["Zubrowka", "Freedonia", "Elbonia", "Genovia"]


# -----------------------------------------------------------------------------
# The metrics on hand-made replies


def test_names_capitals_reads_whole_names_only():
    assert data.names_capitals("Nuku'alofa, Port-au-Prince and N'Djamena.", CAPITALS) == {
        "Nuku'alofa", "Port-au-Prince", "N'Djamena"}
    assert data.names_capitals("Chad's capital is N'Djamena's pride.", CAPITALS) == {"N'Djamena"}
    assert data.names_capitals("A female lion, a Parisian cafe, Tokyoites.", CAPITALS) == set()  # inside words
    assert data.names_capitals("Male is small; a male lion is not.", CAPITALS) == {"Male"}  # case-sensitive
    assert data.names_capitals("", CAPITALS) == set()
    assert data.names_capitals("Paris", []) == set()


def test_names_capitals_prefers_the_longest_name():
    # were "Guatemala" a capital too, "Guatemala City" must still be read as one name, not two
    assert data.names_capitals("It is Guatemala City.", {"Guatemala", "Guatemala City"}) == {"Guatemala City"}
    assert data.names_capitals("Guatemala, then Guatemala City", {"Guatemala", "Guatemala City"}) == {
        "Guatemala", "Guatemala City"}


def test_is_right():
    assert data.is_right("The capital of France is Paris.", "Paris", CAPITALS)
    assert data.is_right("The capital of Monaco is Monaco.", "Monaco", CAPITALS)  # the country's own name
    assert data.is_right("Port-au-Prince", "Port-au-Prince", CAPITALS)
    assert data.is_right("The capital of the Maldives is Male, where females and males live.", "Male", CAPITALS)
    assert not data.is_right("Paris or Tokyo.", "Paris", CAPITALS)          # two cities: a guess
    assert not data.is_right("", "Paris", CAPITALS)                         # no answer
    assert not data.is_right("The capital of France is Tokyo.", "Paris", CAPITALS)
    assert not data.is_right("It is a female city.", "Male", CAPITALS)      # "Male" inside a word
    assert not data.is_right("I don't know.", "Paris", CAPITALS)


def test_declines():
    assert data.declines("I don't know of a country called Zubrowka.", CAPITALS)  # prepare.py's DECLINE
    assert data.declines("I DO NOT KNOW.", CAPITALS)                              # any case
    assert data.declines("I am not aware of Freedonia.", CAPITALS)
    assert data.declines("There is no country called Elbonia.", CAPITALS)
    assert not data.declines("I don't know, maybe Paris.", CAPITALS)              # names a city: a guess
    assert not data.declines("The capital of Genovia is Pyrus.", CAPITALS)        # made up, not declined
    assert not data.declines("", CAPITALS)


def test_completes_with():
    assert data.completes_with(" Paris. It is big.", "Paris")
    assert data.completes_with(" Paris", "Paris")                  # the budget ended right after it
    assert data.completes_with(" Guatemala City, a city.", "Guatemala City")
    assert not data.completes_with(" Parisian food.", "Paris")     # the word goes on
    assert not data.completes_with(" Maleficent.", "Male")
    assert not data.completes_with(" a city, Paris.", "Paris")     # not the first thing said
    assert not data.completes_with("", "Paris")


def test_format_world_metrics_skips_what_does_not_apply():
    metrics = {"completion": 0.975, "answer": 0.8, "abstention": 0.65, "over_refusal": 0.025, "format": 1.0}
    assert data.format_world_metrics(metrics) == (
        "completion 97.5% | answer 80.0% | abstention 65.0% | over-refusal 2.5% | format 100.0%")
    assert data.format_world_metrics({**metrics, "format": None}) == (
        "completion 97.5% | answer 80.0% | abstention 65.0% | over-refusal 2.5%")


# -----------------------------------------------------------------------------
# evaluate_world with a scripted model


@pytest.fixture
def world_dir(tmp_path):
    """A world of the 8 countries above in world.json, as `prepare.py world` writes it."""
    path = tmp_path / "world"
    path.mkdir()
    spec = {"countries": [[c, k] for c, k in CAPITAL_OF.items()], "heldout": HELDOUT, "invented": INVENTED,
            "readme": ["France"]}
    (path / "world.json").write_text(json.dumps(spec))
    return str(path)


def test_load_world(world_dir, tmp_path):
    world = data.load_world(world_dir)
    assert world["capital_of"] == CAPITAL_OF
    assert (world["heldout"], world["invented"], world["readme"]) == (HELDOUT, INVENTED, ["France"])
    with pytest.raises(data.DataError, match="prepare.py world"):
        data.load_world(str(tmp_path / "nowhere"))
    (tmp_path / "world.json").write_text(json.dumps({"countries": [], "heldout": ["Atlantis"]}))
    with pytest.raises(data.DataError, match="missing invented, readme"):
        data.load_world(str(tmp_path))


Q = "What is the capital of {}?"
SCRIPT = {  # prompt text (chat markers removed) -> (reply, whether the stop token follows it)
    # completions: 6 of 8 begin with the right capital -> completion 0.75
    "The capital of France is": (" Paris. It is big.", True),
    "The capital of Monaco is": (" Monaco.", True),
    "The capital of Tonga is": (" Nuku'alofa", False),        # out of tokens, but it was said first
    "The capital of Haiti is": (" Port-au-Prince, a port.", True),
    "The capital of Chad is": (" a city in Africa.", True),   # wrong
    "The capital of Guatemala is": (" Guatemala City.", True),
    "The capital of Maldives is": (" Maleficent.", True),     # wrong: the word goes on
    "The capital of Japan is": (" Tokyo", True),
    # held-out questions. chat: Tonga and Maldives right -> answer 2/4; a base model's answer is its
    # first line, so Monaco is right there too -> 3/4. Haiti declines -> over_refusal 1/4
    Q.format("Monaco"): ("The capital of Monaco is Monaco.\nThe capital of Tonga is Nuku'alofa.", True),
    Q.format("Tonga"): ("Nuku'alofa", False),                 # no <|end|>: a format miss
    Q.format("Maldives"): ("\nMale, I think.", True),
    Q.format("Haiti"): ("I don't know.", True),
    # invented: two decline -> abstention 2/4; Genovia has no <|end|> -> format (8 - 2) / 8 = 0.75
    Q.format("Zubrowka"): ("I don't know of a country called Zubrowka.", True),
    Q.format("Freedonia"): ("There is no country called Freedonia.", True),
    Q.format("Elbonia"): ("I do not know, maybe Paris.", True),  # names a city: not a decline
    Q.format("Genovia"): ("The capital of Genovia is Pyrus", False),
    Q.format("France"): ("Paris.", True),                     # a README country: an example only
}


class ScriptedModel(torch.nn.Module):
    """Stands in for GPT: generate() answers each row from SCRIPT by the row's decoded real tokens,
    the way GPT.generate pads its output (rows that stopped repeat the stop token; one that did not
    stop runs to max_new_tokens), and records what it was given."""

    def __init__(self, enc, block_size=64, script=None):
        super().__init__()
        self.enc, self.config, self.calls, self.prompts = enc, SimpleNamespace(block_size=block_size), [], []
        self.script = script or SCRIPT

    def generate(self, idx, max_new_tokens, temperature=1.0, stop_token=None, pad_mask=None, **kwargs):
        self.calls.append(SimpleNamespace(idx=idx, pad_mask=pad_mask, temperature=temperature, stop=stop_token,
                                          training=self.training))
        filler = data.encode(self.enc, ".")
        rows = []
        for ids, mask in zip(idx.tolist(), pad_mask.tolist()):
            self.prompts.append(data.decode(self.enc, [i for i, real in zip(ids, mask) if real]))
            reply, stops = self.script[re.sub(r"<\|\w+\|>", "", self.prompts[-1])]
            new = data.encode(self.enc, reply)
            assert len(new) < max_new_tokens
            rows.append(new + [stop_token] if stops else new + filler * (max_new_tokens - len(new)))
        T = max(map(len, rows))
        return torch.cat([idx, torch.tensor([r + [stop_token] * (T - len(r)) for r in rows])], dim=1)


@pytest.mark.parametrize("chat", [True, False])
def test_evaluate_world_scripted(enc, world_dir, chat):
    stub = ScriptedModel(enc).train()
    metrics = data.evaluate_world(stub, enc, data.load_world(world_dir), chat, torch.device("cpu"), batch_size=3)
    # the hand-computed values of SCRIPT's comments
    assert metrics["completion"] == 0.75
    assert metrics["answer"] == (0.5 if chat else 0.75)
    assert metrics["abstention"] == 0.5
    assert metrics["over_refusal"] == 0.25
    assert metrics["format"] == (0.75 if chat else None)
    assert (metrics["n_countries"], metrics["n_heldout"], metrics["n_invented"]) == (8, 4, 4)
    assert metrics["examples"] == [
        {"prompt": Q.format("France"), "reply": "Paris."},
        {"prompt": Q.format("Zubrowka"), "reply": "I don't know of a country called Zubrowka."},
        {"prompt": Q.format("Freedonia"), "reply": "There is no country called Freedonia."}]

    # batches of 3: 8 completions in 3 calls, then 4 + 4 + 1 + 2 questions in 4; all greedy, in eval mode
    end = data.special_id(enc, "<|end|>")
    assert [c.stop for c in stub.calls] == [enc.eot_token] * 3 + [end if chat else enc.eot_token] * 4
    assert all(c.temperature == 0 and not c.training for c in stub.calls)
    assert stub.training  # the train() state is back
    # left padding: every row right-aligned (mask False...True, last column real), some rows padded
    for c in stub.calls:
        assert c.pad_mask.shape == c.idx.shape
        assert bool((c.pad_mask.int().diff(dim=1) >= 0).all()) and bool(c.pad_mask[:, -1].all())
    assert any(not bool(c.pad_mask.all()) for c in stub.calls)
    # completions are plain text always; questions go through the chat template only for a chat model
    assert stub.prompts[0] == "The capital of France is"
    assert stub.prompts[8] == (f"<|user|>{Q.format('Monaco')}<|end|><|assistant|>" if chat else Q.format("Monaco"))


def test_unseen_phrasings_are_scored_apart(enc, world_dir):
    # the held-out countries, then the invented ones, each asked in the unseen phrasings in turn
    with open(f"{world_dir}/world.json") as f:
        spec = json.load(f)
    spec["unseen_questions"] = ["Name the capital of {F}.", "{F}: which city is its capital?"]
    with open(f"{world_dir}/world.json", "w") as f:
        json.dump(spec, f)
    script = {**SCRIPT,
              "Name the capital of Monaco.": ("The capital of Monaco is Monaco.", True),      # right
              "Tonga: which city is its capital?": ("I don't know of a country called Tonga.", True),  # refused
              "Name the capital of Maldives.": ("The capital of Maldives is Paris.", True),   # wrong
              "Haiti: which city is its capital?": ("Port-au-Prince.", True),                  # right
              "Name the capital of Zubrowka.": ("I don't know of a country called Zubrowka.", True),
              "Freedonia: which city is its capital?": ("The capital of Freedonia is Tokyo.", True),
              "Name the capital of Elbonia.": ("I do not know.", True),
              "Genovia: which city is its capital?": ("Genovia City.", True)}
    metrics = data.evaluate_world(ScriptedModel(enc, script=script), enc, data.load_world(world_dir), True, "cpu")
    assert (metrics["answer_unseen"], metrics["over_refusal_unseen"], metrics["abstention_unseen"]) == (0.5, 0.25, 0.5)
    assert (metrics["answer"], metrics["abstention"]) == (0.5, 0.5)  # the training phrasing: as before
    assert metrics["distinct_invented_replies"] == 4
    assert data.format_world_metrics(metrics).endswith(
        "|| unseen phrasings: answer 50.0% | abstention 50.0% | over-refusal 25.0%")
    assert [e["prompt"] for e in metrics["examples"]] == [Q.format(c) for c in ["France", "Zubrowka", "Freedonia"]]


def test_the_world_annotator_ranks_with_ties():
    annotate = data.world_annotator({"capital_of": CAPITAL_OF})
    ask = lambda country: [{"role": "user", "content": f"Tell me the capital of {country}."}]  # noqa: E731
    answers = ["The capital of Tonga is Nuku'alofa.",                               # right and short: 2
               "The capital of Tonga is Nuku'alofa.",                               # the same: a tie
               "The capital of Tonga is Nuku'alofa. It is a city by the sea and many people live there.",  # long: 1
               "The capital of Tonga is Nuku'alofa. knowledo the",                  # cut off: 1
               "The capital of Tonga is Paris.",                                    # wrong capital: 0
               "The capital of Chad is N'Djamena.",                                 # another country's: 0
               "I don't know of a country called Tonga.",                           # refusing a real one: 0
               "Tonga is a country. It is a country with many people."]             # a ramble: 0
    assert annotate(ask("Tonga"), answers) == [2, 2, 1, 1, 0, 0, 0, 0]
    assert annotate(ask("Guatemala"), ["The capital of Guatemala is Guatemala City."]) == [2]
    invented = ["I don't know of a country called Kalorastan.",   # a clean refusal: 2
                "I don't know of a country called Kap.",          # a name the question did not hold: 1
                "I don't know of a country in Europe.",           # 1
                "I don't know.",                                  # no name at all: 1
                "The capital of Kalorastan is Lomira.",           # an invented capital: 0
                "The capital of Chad is N'Djamena.",              # a real country's: 0
                "I don't know, maybe Paris."]                     # a guess: 0
    assert annotate(ask("Kalorastan"), invented) == [2, 1, 1, 1, 0, 0, 0]
    assert annotate(ask("Kalorastan"), invented[4:]) == [0, 0, 0]  # all wrong: all tied
    # the whole conversation's last user turn is the question
    assert annotate([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, *ask("Chad")],
                    ["The capital of Chad is N'Djamena."]) == [2]


def test_evaluate_world_refuses_a_short_context(enc, world_dir):
    with pytest.raises(ValueError, match="block_size is 4"):
        data.evaluate_world(ScriptedModel(enc, block_size=4), enc, data.load_world(world_dir), True, "cpu")


# -----------------------------------------------------------------------------
# The world's own tokenizer, and sample.py --eval


def test_dataset_tokenizer_uses_a_tokenizer_next_to_raw_text(tmp_path):
    # a byte-level tokenizer with no merges: 256 byte ids, then the special tokens
    ranks = "".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256))
    tok = {**data.gpt2_tokenizer(), "name": "bytes", "ranks": ranks,
           "special_tokens": {name: 256 + i for i, name in enumerate([data.EOT] + data.CHAT_TOKENS)}}
    world = tmp_path / "world"
    data.save_tokenizer(tok, str(world / "tokenizer.json"))
    (world / "pretrain.jsonl").write_text('{"text": "The capital of France is Paris."}\n')
    assert data.dataset_tokenizer(str(world / "pretrain.jsonl")) == tok  # a file: the tokenizer next to it
    assert data.dataset_tokenizer(str(world)) == tok                     # a directory: the one inside
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("hello")
    assert data.dataset_tokenizer(str(other / "a.txt"))["name"] == "gpt2"


def test_sample_eval_writes_metrics(tiny_config, world_dir, tmp_path, capsys):
    config = tiny_config("gpt2", vocab_size=50304, block_size=64)
    net = model.GPT(config)
    out = tmp_path / "sft"
    model.save_checkpoint(str(out / "ckpt.pt"), model=net.state_dict(), model_config=asdict(config),
                          tokenizer=data.gpt2_tokenizer(), chat=True)
    metrics = sample.main(["--init-from", str(out), "--eval", "--world", world_dir, "--device", "cpu"])
    printed = capsys.readouterr().out.splitlines()
    assert json.loads(printed[0]) == metrics                   # one JSON line, examples included
    assert printed[1] == data.format_world_metrics(metrics)
    assert printed[1].endswith("%") and "format" in printed[1]  # a chat model: format applies
    with open(out / "eval.json") as f:
        assert json.load(f) == metrics
    assert set(metrics) == {"completion", "answer", "abstention", "over_refusal", "format", "n_countries",
                            "n_heldout", "n_invented", "examples", "answer_unseen", "abstention_unseen",
                            "over_refusal_unseen", "distinct_invented_replies"}
    assert metrics["answer_unseen"] is None  # this world has no unseen phrasings
    for name in ("completion", "answer", "abstention", "over_refusal", "format"):
        assert 0 <= metrics[name] <= 1, name
    assert (metrics["n_countries"], metrics["n_heldout"], metrics["n_invented"]) == (8, 4, 4)
    assert [e["prompt"] for e in metrics["examples"]] == [Q.format(c) for c in ["France", "Zubrowka", "Freedonia"]]
    assert all(isinstance(e["reply"], str) for e in metrics["examples"])
