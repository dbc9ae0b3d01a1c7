"""Tests for the data stage in prepare.py (`python prepare.py prepare | train-tokenizer | world | download`):
reading and bad input, normalization, quality filters, deduplication (precision and recall on planted near-
duplicates), the trained BPE tokenizer (hand-computed merges, agreement with tiktoken, round trips,
determinism), shards and manifest (atomic writes, an interrupted run), pretraining on a prepared
directory, the download helper against a local HTTP server, the tiny world, and --help.

Everything runs offline on tiny inputs under tmp_path. Run: python -m pytest tests/test_prepare.py
"""

import http.server
import json
import os
import re
import threading

import numpy as np
import pytest
import tiktoken

import data
import model
import prepare
import pretrain
from data import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(ROOT, "data", "tinyshakespeare.txt")
WORDS = ("time day girl boy dog cat tree park ball sun moon river house friend mother father garden bird fish "
         "apple bread water stone light dream song story road hill cloud rain snow flower door window table "
         "chair book letter king queen ship sea star forest field farm horse wolf fox bear mouse cake milk").split()
VERBS = "saw found liked wanted made took gave heard kept found painted carried followed watched".split()


def sentence(rng, n=None):
    """A sentence of ordinary words: 'The girl saw a red ball near the river.' style, 9-16 words."""
    n = n or int(rng.integers(6, 12))
    words = [rng.choice(WORDS) if i % 3 else rng.choice(["the", "a", "one", "every"]) for i in range(n)]
    words.insert(2, rng.choice(VERBS))
    return " ".join(words).capitalize() + "."


def document(rng, n_sentences=25):
    return " ".join(sentence(rng) for _ in range(n_sentences))


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return str(path)


def jsonl(*texts):
    return "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)


def run_prepare(*argv):
    """prepare.main(["prepare", ...]) with 1 worker (no process start-up) unless argv says otherwise."""
    return prepare.main(["prepare", *argv] + ([] if "--workers" in argv else ["--workers", "1"]))


# -----------------------------------------------------------------------------
# 1. Ingest


def test_txt_separators_and_jsonl(tmp_path):
    txt = write(tmp_path / "a.txt", "one\ntwo\n\n\nthree<|endoftext|>four\n<|endoftext|>\n")
    assert [t for _, t in data.iter_documents(txt)] == ["one\ntwo\n\n\nthree<|endoftext|>four\n<|endoftext|>\n"]
    assert [t for _, t in data.iter_documents(txt, separator="blank")] == ["one\ntwo\n", "three<|endoftext|>four\n<|endoftext|>\n"]
    # the separator may sit inside a line; whitespace-only pieces are not documents
    assert [t for _, t in data.iter_documents(txt, separator="<|endoftext|>")] == ["one\ntwo\n\n\nthree", "four\n"]
    assert [w for w, _ in data.iter_documents(txt, separator="blank")] == [f"{txt}:1", f"{txt}:5"]  # where each starts
    js = write(tmp_path / "b.jsonl", jsonl("x", "y\u2028z") + "\n" + json.dumps({"body": "w"}) + "\n")
    assert list(data.iter_documents(js, on_bad=lambda m: None)) == [(f"{js}:1", "x"), (f"{js}:2", "y\u2028z")]
    assert list(data.iter_documents(js, field="body", on_bad=lambda m: None)) == [(f"{js}:4", "w")]


def test_documents_and_records_come_from_one_jsonl_reader(tmp_path):
    """iter_documents reads .jsonl through iter_jsonl: the same lines, skipped with the same messages."""
    js = write(tmp_path / "c.jsonl", b'{"text": "a"}\n{"text": \n\xe9\n\n{"text": "b"}\n')
    for read in (data.iter_documents, data.iter_jsonl):
        messages = []
        assert [w for w, _ in read(js, on_bad=messages.append)] == [f"{js}:1", f"{js}:5"]
        assert messages == [f"{js}:2: not valid JSON (Expecting value)",
                            f"{js}:3: invalid UTF-8 (byte 0 of the line); is this a text file?"]
        with pytest.raises(DataError, match=f"^{re.escape(js)}:2: not valid JSON"):
            list(read(js))


def test_inputs_expand_directories_and_globs(tmp_path):
    for name in ["d/a.txt", "d/sub/b.jsonl", "d/notes.md", "e/c.txt"]:
        write(tmp_path / name, "x")
    assert data.list_input_files(str(tmp_path / "d")) == [str(tmp_path / "d/a.txt"), str(tmp_path / "d/sub/b.jsonl")]
    assert data.list_input_files(str(tmp_path / "*" / "*.txt")) == [str(tmp_path / "d/a.txt"), str(tmp_path / "e/c.txt")]
    with pytest.raises(DataError, match="no file matches"):
        data.list_input_files(str(tmp_path / "*.parquet"))


def bad_corpus(root, rng):
    """Two good documents among bad input of every kind; returns (directory, good texts, first bad message)."""
    good = [document(rng, 8), document(rng, 8)]
    write(root / "a.jsonl", jsonl(good[0]) + '{"text": \n' + '{"content": "no text field"}\n' + jsonl(good[1]))
    write(root / "b.txt", b"caf\xe9 is Latin-1, not UTF-8\n")
    write(root / "c.txt", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    write(root / "d.txt", b"")
    return str(root), good, f"{root / 'a.jsonl'}:2: not valid JSON"


def test_bad_input_is_skipped_and_counted(tmp_path, capsys):
    root, good, _ = bad_corpus(tmp_path / "in", np.random.default_rng(0))
    out = run_prepare(root, "--out", str(tmp_path / "out"), "--min-words", "10", "--val-fraction", "0")
    bad = out["steps"]["ingest"]["bad_input"]
    # broken JSON, missing field, invalid UTF-8, binary file, empty file
    assert bad["count"] == 5 and out["steps"]["dedup"]["kept"] == 2
    assert bad["examples"][0].startswith(f"{root}/a.jsonl:2: not valid JSON")
    assert any(m.startswith(f"{root}/b.txt:1: invalid UTF-8") for m in bad["examples"])
    assert any(m.startswith(f"{root}/c.txt: binary file") for m in bad["examples"])
    with open(tmp_path / "out" / "clean.jsonl") as f:
        assert [json.loads(line)["text"] for line in f] == good
    assert "5 bad records skipped" in capsys.readouterr().out


def test_strict_stops_at_the_first_bad_record(tmp_path):
    root, _, first = bad_corpus(tmp_path / "in", np.random.default_rng(0))
    with pytest.raises(SystemExit) as e:
        run_prepare(root, "--out", str(tmp_path / "out"), "--strict")
    assert str(e.value.code).startswith(f"error: {first}") and "\n" not in str(e.value.code)
    assert not data.is_prepared(str(tmp_path / "out"))


def test_nothing_left_after_filtering_is_a_clear_error(tmp_path):
    path = write(tmp_path / "short.jsonl", jsonl("too short", "also too short"))
    with pytest.raises(SystemExit, match="no documents left after cleaning 1 file"):
        run_prepare(path, "--out", str(tmp_path / "out"))


# -----------------------------------------------------------------------------
# 2. Normalize

NORMALIZE_CASES = [
    ("e\u0301te\u0301", "NFC", "été"),                       # combining acute accents compose
    ("ｆｕｌｌ－ｗｉｄｔｈ　ＡＢＣ１２", "NFC", "ｆｕｌｌ－ｗｉｄｔｈ ＡＢＣ１２"),  # NFC keeps them (ideographic space -> space)
    ("ｆｕｌｌ－ｗｉｄｔｈ ＡＢＣ１２", "NFKC", "full-width ABC12"),  # NFKC folds them
    ("ﬁne x²", "NFKC", "fine x2"),                           # and ligatures, and superscripts (lossy)
    ("zero\u200bwidth\u2060joined\ufeff soft\u00adhyphen", "NFC", "zerowidthjoined softhyphen"),
    ("family 👩\u200d👩\u200d👧 and \u200cZWNJ", "NFC", "family 👩\u200d👩\u200d👧 and \u200cZWNJ"),  # joiners stay
    ("windows\r\nold mac\rnext\x85line\u2028sep", "NFC", "windows\nold mac\nnext\nline\nsep"),
    ("bell\x07 null\x00 esc\x1b[0m del\x7f", "NFC", "bell null esc[0m del"),
    ("no\xa0break\u2003em\u3000ideographic", "NFC", "no break em ideographic"),
    ("  trailing   \n\n\n\n\tindent kept  \n\n", "NFC", "trailing\n\n\tindent kept"),
]


@pytest.mark.parametrize("text,form,expected", NORMALIZE_CASES)
def test_normalize(text, form, expected):
    assert prepare.normalize(text, form) == expected
    assert prepare.normalize(expected, form) == expected  # idempotent


# -----------------------------------------------------------------------------
# 3. Quality filters


def test_repetition_fractions_by_hand():
    # lines "aaaa", "bb", "aaaa", "cc": the second "aaaa" repeats, 4 of 4 + 2 + 4 + 2 = 12 characters
    assert prepare.repeated_line_fraction("aaaa\nbb\naaaa\n\ncc") == pytest.approx(4 / 12)
    # words a b c d e a b c d e: the 5-gram at position 5 (a b c d e) repeats position 0's; it covers
    # words 5..9, 5 of 10 one-letter words
    assert prepare.repeated_ngram_fraction("a b c d e a b c d e".split()) == pytest.approx(0.5)
    assert prepare.repeated_ngram_fraction("a b c d e f g h i j".split()) == 0.0


def test_quality_filter_rules():
    rng = np.random.default_rng(0)
    prose = " ".join(sentence(rng, 9) for _ in range(12)).split()[:60]  # 60 words of prose
    assert prepare.quality_filter(" ".join(prose)) is None
    assert prepare.quality_filter(" ".join(prose[:49])) == "too_short"  # Gopher: at least 50 words
    assert prepare.quality_filter(" ".join(prose[:50])) is None
    assert prepare.quality_filter(" ".join(prose), max_words=59) == "too_long"
    assert prepare.quality_filter(" ".join(["a", "b", "c"] * 20)) == "word_length"  # mean 1 character
    assert prepare.quality_filter(" ".join(["abcdefghijk"] * 60)) == "word_length"  # mean 11 characters
    # 13 of 60 words are numbers: 47/60 = 0.78 < 0.8 hold a letter; with 12, 48/60 = 0.8 passes
    numbers = [str(1900 + k) for k in range(13)]
    assert prepare.quality_filter(" ".join(prose[:47] + numbers[:13])) == "not_alphabetic"
    assert prepare.quality_filter(" ".join(prose[:48] + numbers[:12])) is None
    menu = "\n".join([" ".join(prose[i:i + 10]) for i in range(0, 60, 10)] + ["Home | About | Contact"] * 6)
    assert prepare.quality_filter(menu) == "repeated_lines"  # 5 of 6 menu lines repeat: 110 of ~430 characters > 20%
    assert prepare.quality_filter(" ".join(prose[:30] * 2)) == "repeated_ngrams"  # the second half repeats the first


# -----------------------------------------------------------------------------
# 4. Deduplicate


def planted_corpus(seed=0, n=300, n_planted=80):
    """n random documents of ~250 words, then near-copies of n_planted of them (a few words edited, or two
    sentences swapped), at random positions after their original. Returns (texts, {(copy, original)})."""
    rng = np.random.default_rng(seed)
    docs = [[sentence(rng, 11) for _ in range(22)] for _ in range(n)]
    copies = []
    for k, i in enumerate(rng.choice(n, n_planted, replace=False)):
        s = list(docs[i])
        if k % 2:  # reorder: swap two sentences
            a, b = rng.choice(len(s), 2, replace=False)
            s[a], s[b] = s[b], s[a]
        else:      # edit: change one word in each of 2 sentences, delete one word in another
            for j in rng.choice(len(s), 3, replace=False)[:2]:
                w = s[j].split()
                w[3] = "changed"
                s[j] = " ".join(w)
            w = s[0].split()
            s[0] = " ".join(w[:2] + w[3:])
        copies.append((int(i), s))
    texts, planted = [" ".join(s) for s in docs], set()
    for i, s in copies:  # insert each copy somewhere after its original
        pos = int(rng.integers(texts.index(" ".join(docs[i])) + 1, len(texts) + 1))
        texts.insert(pos, " ".join(s))
    for i, s in copies:
        planted.add((texts.index(" ".join(s)), texts.index(" ".join(docs[i]))))
    return texts, planted


def jaccard(a, b, n=5):
    sa, sb = [set(zip(*[t.lower().split()[k:] for k in range(n)])) for t in (a, b)]
    return len(sa & sb) / len(sa | sb)


def test_near_duplicates_precision_and_recall():
    texts, planted = planted_corpus()
    assert min(jaccard(texts[c], texts[o]) for c, o in planted) > 0.83  # every planted pair is above 0.8
    found = {(i, j) for i, kind, j in prepare.find_duplicates(texts)}
    precision = len(found & planted) / len(found)
    recall = len(found & planted) / len(planted)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    assert {i for i, _ in found} <= {c for c, _ in planted}  # no document dropped without a planted duplicate


def test_near_duplicates_just_above_the_threshold_are_found():
    # copies with about 2% of their words replaced: true 5-gram Jaccard 0.80-0.84, where the 128-row
    # estimate's standard deviation (~0.035) used to reject a third of them (recall 0.907 at 0.81-0.83)
    rng = np.random.default_rng(3)
    pairs = []
    while len(pairs) < 150:
        words = document(rng, 40).split()
        copy = list(words)
        for j in rng.choice(len(words), 8, replace=False):
            copy[j] = "replaced"
        original, near = " ".join(words), " ".join(copy)
        if 0.80 <= jaccard(original, near) <= 0.84:
            pairs.append((original, near))
    found = sum(bool(prepare.find_duplicates([a, b])) for a, b in pairs)
    assert found / len(pairs) >= 0.95, found


def test_a_band_bucket_remembers_more_than_its_first_document():
    index = prepare.DedupIndex(threshold=0.8, num_perm=8)
    a, b = np.arange(8, dtype=np.uint32), np.arange(100, 108, dtype=np.uint32)  # two unrelated signatures
    assert index.add(signature=a, bands=[1, 2]) == 0
    assert index.match(signature=b, bands=[1, 3]) == (None, None)  # shares band 1 with a, but is not like it
    assert index.add(signature=b, bands=[1, 3]) == 1
    # a copy of b whose only band in common with b is 1, the band a was first to own: still found
    assert index.match(signature=b.copy(), bands=[1, 4]) == ("near", 1)
    index.recent, index.keys, index.ids = {}, np.array([1, 1, 2, 3], np.uint64), np.array([0, 1, 0, 1], np.int32)
    assert index.match(signature=b.copy(), bands=[1]) == ("near", 1)  # the same once merged into the arrays


def test_similar_but_distinct_documents_are_all_kept():
    # 200 documents that share a long opening and closing and differ in their middle: J ~ 0.4
    rng = np.random.default_rng(1)
    head, tail = document(rng, 6), document(rng, 6)
    texts = [f"{head} {document(rng, 10)} {tail}" for _ in range(200)]
    assert max(jaccard(texts[0], t) for t in texts[1:]) < 0.6
    assert prepare.find_duplicates(texts) == []


def test_exact_duplicates_and_index_merging():
    texts, planted = planted_corpus(seed=2, n=60, n_planted=20)
    texts = texts + texts[:5]  # exact copies of the first five
    found = prepare.find_duplicates(texts)
    assert [(i, j) for i, kind, j in found if kind == "exact"] == [(len(texts) - 5 + k, k) for k in range(5)]
    # the same decisions when the index merges its recent keys into the sorted arrays every 50 keys
    index, kept, small = prepare.DedupIndex(merge_every=50), [], []
    for i, text in enumerate(texts):
        features = prepare.dedup_features(text)
        kind, j = index.match(*features)
        if kind:
            small.append((i, kind, kept[j]))
        else:
            index.add(*features)
            kept.append(i)
    assert small == found and len(index.keys) > 0


def test_lsh_band_choice():
    # threshold 0.8, 128 rows: r = 7 (18 bands) finds 1 - (1 - 0.8^7)^18 = 98.6% of pairs at 0.8, too few;
    # r = 6 (21 bands) finds 1 - (1 - 0.8^6)^21 = 99.8%
    assert prepare.lsh_bands(0.8, 128) == (21, 6)
    assert 1 - (1 - 0.8 ** 7) ** 18 < 0.99 < 1 - (1 - 0.8 ** 6) ** 21
    assert prepare.lsh_bands(0.5, 128) == (42, 3)


def test_minhash_estimates_jaccard():
    rng = np.random.default_rng(3)
    a = document(rng, 30)
    b = " ".join(a.split()[:200] + document(rng, 8).split())  # shares a long prefix with a
    estimate = np.mean(prepare.minhash_signature(a, 256) == prepare.minhash_signature(b, 256))
    assert abs(estimate - jaccard(a, b)) < 0.1  # standard error sqrt(J(1-J)/256) < 0.032


# -----------------------------------------------------------------------------
# 5. Tokenizer


def trained_ids(tok):
    """The trained tokens in rank order, as bytes."""
    enc = data.get_encoding(tok)
    return [enc.decode_single_token_bytes(i) for i in range(256, min(tok["special_tokens"].values()))]


def test_bpe_merges_by_hand():
    # "aaabdaaabac" (one piece). Pair counts: aa 4 (overlapping runs count twice), ab 2, bd, da, ba, ac 1.
    # 1. aa (4)            -> [aa a b d aa a b a c]; now (aa, a) 2 and (a, b) 2: the tie goes to the
    # 2. ab                   smaller ids, (97, 98) before (256, 97)   -> [aa ab d aa ab a c]
    # 3. aa+ab = "aaab" (2) -> [aaab d aaab a c]; all remaining pairs count 1, smallest ids first:
    # 4. ac (97, 99), then 5. d+aaab (100, 258)
    tok = prepare.train_bpe(["aaabdaaabac"], 256 + 5 + 5, progress=False)
    assert trained_ids(tok) == [b"aa", b"ab", b"aaab", b"ac", b"daaab"]
    assert tok["special_tokens"] == {data.EOT: 261, **{t: 262 + i for i, t in enumerate(data.CHAT_TOKENS)}}
    # pieces "ab", " ab", " ab": (a, b) 3 times, (" ", a) twice; no pair across pieces ("b", " ")
    # 1. ab (3) -> pieces [ab], [" ", ab] x2; 2. " ab" (2); then no pair is left: the vocabulary stops short
    tok = prepare.train_bpe(["ab ab ab"], 256 + 5 + 10, progress=False)
    assert trained_ids(tok) == [b"ab", b" ab"]
    assert data.model_vocab_size(tok) == 320  # 258 ranks + 5 specials = 263 ids, padded to a multiple of 64


TRICKY = ("Hello  world!! don't I'LL we've 12345 3.14 café naïve e\u0301 Ἀθῆναι Москва 日本語のテキスト。 "
          "🙂👩\u200d👩\u200d👧 “curly” — dash… \t tab\x1c \x85x\u2028y ٣ ² ｆｕｌｌ \xa0nbsp\u3000ideo\n\n\n end  \n ")


def piece_encoding(pieces, pat_str):
    """A tiktoken encoding whose vocabulary holds every piece whole: it encodes text to one id per piece
    exactly when its regex (pat_str, in Rust) splits the text into the same pieces as Python's re."""
    ranks = {bytes([b]): b for b in range(256)}
    for p in sorted({p.encode() for p in pieces} - set(ranks)):
        ranks[p] = len(ranks)
    return tiktoken.Encoding("pieces", pat_str=pat_str, mergeable_ranks=ranks, special_tokens={}), ranks


def test_python_re_and_tiktoken_split_alike():
    rng = np.random.default_rng(0)
    # random text from letters, digits, punctuation, spaces of every kind, CJK, emoji, control characters
    alphabet = list("aZé ñ日9٣²,.'s\n\t\r\x0b\x85\xa0\u2028\u3000\u200b🙂-_") + ["'ll", "'re", " "] * 3
    texts = [TRICKY] + ["".join(rng.choice(alphabet, 400)) for _ in range(20)]
    for text in texts:
        pieces = re.findall(prepare.BPE_PAT_STR, text)
        assert "".join(pieces) == text
        enc, ranks = piece_encoding(pieces, prepare.BPE_PAT_STR)
        assert enc.encode_ordinary(text) == [ranks[p.encode()] for p in pieces]


def test_pieces_are_gpt2s_on_ascii_text():
    from tiktoken_ext.openai_public import r50k_pat_str
    with open(SHAKESPEARE) as f:
        text = f.read(20_000) + " 1999 $3.50 x2 it's THEY'RE a  b\t\tc   \n\n d \n"
    pieces = re.findall(prepare.BPE_PAT_STR, text)
    enc, ranks = piece_encoding(pieces, r50k_pat_str)  # GPT-2's own regex, run by tiktoken
    assert enc.encode_ordinary(text) == [ranks[p.encode()] for p in pieces]


def apply_merges(piece, merges):
    """Reference BPE: apply the learned merges to one piece, lowest (earliest) merge first."""
    order = {pair: (k, new_id) for k, (pair, new_id) in reversed(list(enumerate(merges)))}
    word = list(piece.encode())
    while True:
        candidates = [order[p] for p in zip(word, word[1:]) if p in order]
        if not candidates:
            return word
        k, new_id = min(candidates)
        word = prepare.merge_pair(word, merges[k][0], new_id)


@pytest.fixture(scope="module")
def shakespeare_bpe():
    with open(SHAKESPEARE) as f:
        text = f.read(100_000)
    return text, prepare.train_bpe([text], 1024, progress=False)


def test_tiktoken_encodes_as_the_learned_merges(shakespeare_bpe):
    text, tok = shakespeare_bpe
    _, merges = prepare.learn_bpe([text], 1024 - 256 - 5, progress=False)
    with open(SHAKESPEARE) as f:
        f.seek(500_000)
        unseen = f.read(30_000)
    enc = data.get_encoding(tok)
    for t in (text[:30_000], unseen, TRICKY):
        assert enc.encode_ordinary(t) == [i for piece in re.findall(prepare.BPE_PAT_STR, t) for i in apply_merges(piece, merges)]


def test_retraining_gives_the_identical_tokenizer(shakespeare_bpe):
    text, tok = shakespeare_bpe
    assert prepare.train_bpe([text], 1024, progress=False) == tok
    assert prepare.train_bpe([text[:50_000], text[50_000:]], 1024, progress=False) != tok  # pieces across the cut differ


def test_round_trips(shakespeare_bpe):
    _, tok = shakespeare_bpe
    enc = data.get_encoding(tok)
    rng = np.random.default_rng(0)
    code_points = [c for c in rng.integers(0, 0x30000, 3000).tolist() if not 0xd800 <= c < 0xe000]  # no surrogates
    for text in [TRICKY, "".join(map(chr, code_points)), data.EOT + " <|user|>"]:
        assert enc.decode(enc.encode_ordinary(text)) == text
    # byte level: any bytes at all, UTF-8 or not, encode and decode exactly
    for raw in [b"\xc3\x28 \xff\xfe \xed\xa0\x80 \xe2\x82 \xf0\x9f\x99", "🙂 é".encode(), rng.bytes(2000)]:
        assert enc.decode_bytes(enc._encode_bytes(raw)) == raw
    assert all(enc.decode_single_token_bytes(b) == bytes([b]) for b in range(256))


# -----------------------------------------------------------------------------
# 6. Shards, manifest, pretraining


def small_corpus(root, n=40, seed=0):
    """n documents of ~100 words in a .jsonl and a .txt split on <|endoftext|>, plus 3 exact copies."""
    rng = np.random.default_rng(seed)
    docs = [document(rng, 10) for _ in range(n)]
    write(root / "a.jsonl", jsonl(*docs[:n // 2], *docs[:3]))
    write(root / "b.txt", "\n<|endoftext|>\n".join(docs[n // 2:]))
    return docs


def read_clean(out):
    with open(os.path.join(out, "clean.jsonl")) as f:
        return [json.loads(line)["text"] for line in f]


def test_prepare_writes_shards_and_manifest(tmp_path):
    docs = small_corpus(tmp_path / "in")
    out = str(tmp_path / "out")
    result = run_prepare(str(tmp_path / "in"), "--out", out, "--separator", "<|endoftext|>", "--workers", "2")
    assert read_clean(out) == docs  # in input order, minus the 3 exact copies
    assert result["steps"]["exact_dedup"]["dropped"] == 3
    manifest = data.read_manifest(out)
    assert manifest["dtype"] == "uint16" and manifest["tokenizer_name"] == "gpt2"
    assert manifest["settings"]["separator"] == "<|endoftext|>" and manifest["sources"][0]["path"].endswith("a.jsonl")
    enc = data.get_encoding(data.gpt2_tokenizer())
    expected = {"train": [], "val": []}
    for i, doc in enumerate(docs):  # every 10th document (the 5th, 15th, ...) is validation
        expected["val" if prepare.is_val_doc(i, 0.1) else "train"] += enc.encode_ordinary(doc) + [enc.eot_token]
    train, val = data.load_prepared(out, data.gpt2_tokenizer())
    assert train.tolist() == expected["train"] and val.tolist() == expected["val"]
    assert manifest["splits"]["val"]["docs"] == 4 and manifest["splits"]["val"]["tokens"] == len(expected["val"])
    assert sorted(os.listdir(out)) == ["clean.jsonl", "manifest.json", "tokenizer.json", "tokenizer.tiktoken",
                                       "train_000.bin", "val_000.bin"]
    # one worker writes the same bytes; small shards concatenate to the same stream
    again = str(tmp_path / "again")
    run_prepare(str(tmp_path / "in"), "--out", again, "--separator", "<|endoftext|>", "--shard-tokens", "1000")
    assert data.read_manifest(again)["splits"]["train"]["shards"][1] == {"file": "train_001.bin", "tokens": 1000}
    assert data.load_prepared(again, data.gpt2_tokenizer())[0].tolist() == expected["train"]


def test_interrupted_run_leaves_no_dataset(tmp_path, monkeypatch):
    small_corpus(tmp_path / "in")
    out = str(tmp_path / "out")
    run_prepare(str(tmp_path / "in"), "--out", out)
    assert data.is_prepared(out)
    write_ids = prepare.ShardWriter.write

    def crash_after_first_write(self, ids):
        write_ids(self, ids[:10])
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of a shard

    monkeypatch.setattr(prepare.ShardWriter, "write", crash_after_first_write)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(str(tmp_path / "in"), "--out", out)
    assert not data.is_prepared(out)  # the old manifest went first; the new one is never written
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    with pytest.raises(DataError, match="unfinished"):
        data.list_input_files(out)  # nor does pretrain.py take the directory for raw text


def tiny_pretrain(data_dir, out, *extra):
    return pretrain.main(["--data", data_dir, "--out", str(out), "--n-layer", "2", "--n-head", "2", "--n-embd", "32",
                          "--block-size", "16", "--batch-size", "4", "--max-steps", "3", "--eval-every", "3",
                          "--eval-batches", "1", "--warmup-steps", "1", "--device", "cpu", "--dtype", "float32", *extra])


def test_pretrain_on_a_prepared_directory_with_a_trained_tokenizer(tmp_path):
    small_corpus(tmp_path / "in")
    out = str(tmp_path / "prepared")
    run_prepare(str(tmp_path / "in"), "--out", out, "--separator", "<|endoftext|>", "--tokenizer", "train",
            "--vocab-size", "300")
    tok = data.load_tokenizer(os.path.join(out, "tokenizer.json"))
    assert data.read_manifest(out)["tokenizer_name"] == tok["name"] and tok["name"].startswith("bpe300-")
    metrics = tiny_pretrain(out, tmp_path / "run")
    assert np.isfinite(metrics["val/loss"])
    ckpt = model.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    assert ckpt["tokenizer"] == tok and ckpt["model_config"]["vocab_size"] == 320  # 300 ids padded to 64
    # the same data prepared with GPT-2's tokenizer cannot continue this checkpoint
    run_prepare(str(tmp_path / "in"), "--out", str(tmp_path / "gpt2"), "--separator", "<|endoftext|>")
    with pytest.raises(SystemExit, match=r"tokenized with gpt2 but the model uses bpe300-") as e:
        tiny_pretrain(str(tmp_path / "gpt2"), tmp_path / "run2", "--init-from", str(tmp_path / "run"))
    assert "\n" not in str(e.value.code)
    # prepared with the checkpoint's tokenizer, it can
    run_prepare(str(tmp_path / "in"), "--out", str(tmp_path / "same"), "--separator", "<|endoftext|>",
            "--tokenizer", str(tmp_path / "run"))
    assert tiny_pretrain(str(tmp_path / "same"), tmp_path / "run3", "--init-from", str(tmp_path / "run"))["step"] == 3


def test_train_tokenizer_command(tmp_path):
    with open(SHAKESPEARE) as f:
        path = write(tmp_path / "a.txt", f.read(5000))
    result = prepare.main(["train-tokenizer", path, "--vocab-size", "270", "--out", str(tmp_path / "tok.json")])
    tok = data.load_tokenizer(str(tmp_path / "tok.json"))
    assert result["name"] == tok["name"] and len(trained_ids(tok)) == 270 - 256 - 5
    from tiktoken.load import load_tiktoken_bpe  # the ranks file is in tiktoken's own format
    assert load_tiktoken_bpe(str(tmp_path / "tok.tiktoken")) == data.get_encoding(tok)._mergeable_ranks


# -----------------------------------------------------------------------------
# 7. Download, against a local HTTP server


class FileServer(http.server.BaseHTTPRequestHandler):
    """Serves `payload` at any path, honouring "Range: bytes=N-" unless ignore_range is set."""
    payload, ignore_range, ranges = b"", False, []

    def do_GET(self):
        start = int(self.headers["Range"][6:-1]) if "Range" in self.headers and not self.ignore_range else 0
        FileServer.ranges.append(self.headers.get("Range"))
        if start >= len(self.payload) and start:
            self.send_response(416)
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(self.payload) - start))
        self.end_headers()
        self.wfile.write(self.payload[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    FileServer.payload, FileServer.ignore_range, FileServer.ranges = np.random.default_rng(0).bytes(300_000), False, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FileServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/corpus.txt"
    httpd.shutdown()


def sha256_of(payload):
    import hashlib
    return hashlib.sha256(payload).hexdigest()


def test_download_verifies_and_resumes(server, tmp_path):
    path, payload = str(tmp_path / "corpus.txt"), FileServer.payload
    assert prepare.download(server, path, sha256_of(payload)) == sha256_of(payload)
    with open(path, "rb") as f:
        assert f.read() == payload
    # an interrupted download: 100,000 bytes in the .part file; only the rest is requested
    path2 = str(tmp_path / "resumed.txt")
    write(tmp_path / "resumed.txt.part", payload[:100_000])
    prepare.download(server, path2, sha256_of(payload))
    assert FileServer.ranges[-1] == "bytes=100000-" and open(path2, "rb").read() == payload
    assert not os.path.exists(path2 + ".part")
    # a complete .part file: the server answers 416 and the file is verified as it is
    write(tmp_path / "done.txt.part", payload)
    prepare.download(server, str(tmp_path / "done.txt"), sha256_of(payload))
    assert open(tmp_path / "done.txt", "rb").read() == payload


def test_download_into_a_directory_takes_the_urls_file_name(server, tmp_path):
    result = prepare.main(["download", "--url", server, "--out", str(tmp_path)])
    assert result["out"] == str(tmp_path / "corpus.txt") and open(tmp_path / "corpus.txt", "rb").read() == FileServer.payload


def test_a_lone_surrogate_is_a_bad_record_not_a_crash(tmp_path):
    (tmp_path / "in").mkdir()
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "tinyshakespeare.txt")) as f:
        text = f.read(20_000)
    docs = [text[:2000], "\ud800 " + text[2000:4000]] + [text[i:i + 2000] for i in range(4000, 20000, 2000)]
    (tmp_path / "in" / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    result = prepare.main(["prepare", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--workers", "1",
                           "--vocab-size", "300"])
    ingest = result["steps"]["ingest"]
    assert ingest["docs"] == 9 and ingest["bad_input"]["count"] == 1, ingest


def test_download_restarts_when_the_server_ignores_ranges(server, tmp_path):
    FileServer.ignore_range = True
    write(tmp_path / "c.txt.part", b"stale bytes that must not stay in front")
    prepare.download(server, str(tmp_path / "c.txt"), sha256_of(FileServer.payload))
    assert open(tmp_path / "c.txt", "rb").read() == FileServer.payload


def test_download_checksum_mismatch(server, tmp_path):
    path = str(tmp_path / "corpus.txt")
    with pytest.raises(DataError, match="sha256 mismatch"):
        prepare.download(server, path, "0" * 64)
    assert not os.path.exists(path) and not os.path.exists(path + ".part")
    with pytest.raises(SystemExit, match="sha256 mismatch"):  # the command line says it in one line
        prepare.main(["download", "--url", server, "--sha256", "0" * 64, "--out", path])


# -----------------------------------------------------------------------------
# The tiny world (`python prepare.py world`)

def world_files(tmp_path, name, *argv):
    out = str(tmp_path / name)
    prepare.main(["world", "--out", out, *argv])
    return {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out))}


def test_help_is_text_of_its_own_and_shows_defaults(monkeypatch, capsys):
    monkeypatch.setattr(prepare, "__doc__", "")  # --help is not cut out of the module docstring
    for argv in (["--help"], ["prepare", "--help"], ["world", "--help"]):
        with pytest.raises(SystemExit) as e:
            prepare.get_args(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "python prepare.py world" in out and "(default: 0.8)" in out and "(default: 4096)" in out


def test_world_is_byte_identical_for_a_seed_and_matches_the_bundled_files(tmp_path):
    small = ["--n-countries", "30", "--heldout", "8", "--invented", "5", "--pref-invented", "10", "--statements", "5",
             "--stories-docs", "20", "--vocab-size", "400"]
    a, b = world_files(tmp_path, "a", *small), world_files(tmp_path, "b", *small)
    assert a == b and set(a) == {"world.json", "prefs.jsonl", "prompts.jsonl", "pretrain.jsonl", "sft.jsonl",
                                 "tokenizer.json", "tokenizer.tiktoken"}
    assert world_files(tmp_path, "c", *small, "--seed", "1") != a  # another seed, another world
    bundled = os.path.join(ROOT, "data", "world")  # `python prepare.py world` regenerates exactly these bytes
    full = world_files(tmp_path, "full")
    for name, content in full.items():
        with open(os.path.join(bundled, name), "rb") as f:
            assert f.read() == content, f"data/world/{name} differs from a fresh `python prepare.py world`"


def test_world_held_out_sets_never_reach_the_training_data(tmp_path):
    files = world_files(tmp_path, "w")
    ev = json.loads(files["world.json"])
    countries = {c for c, _ in ev["countries"]}
    heldout, invented, train = set(ev["heldout"]), set(ev["invented"]), set(ev["train"])
    assert len(countries) == 159 and len(heldout) == 40 and len(invented) == 40
    assert heldout | train == countries and not heldout & train
    assert set(ev["readme"]) <= heldout and "France" in ev["readme"]
    sft_text, pref_text = files["sft.jsonl"].decode(), files["prefs.jsonl"].decode()
    pretrain_text = files["pretrain.jsonl"].decode()
    asked = lambda text: {m.group(1) for m in re.finditer(r"capital of ([^?.]+)[?.]", text)}  # noqa: E731
    sft_asked = asked("\n".join(json.loads(line)["instruction"] for line in sft_text.splitlines()))
    pref_asked = asked("\n".join(json.loads(line)["prompt"] for line in pref_text.splitlines()))
    pref_invented = pref_asked - countries
    assert pref_asked & countries == train and len(pref_invented) == 120  # and 120 invented ones
    # questions about the training countries, and two refusals of invented countries of the preference data
    assert sft_asked & countries == train and len(sft_asked - countries) == 2 and sft_asked - countries <= pref_invented
    prompts_asked = asked("\n".join(json.loads(line)["prompt"] for line in files["prompts.jsonl"].decode().splitlines()))
    assert prompts_asked == train | pref_invented  # RL prompts: two per training and preference-data invented country
    # the unseen phrasings of the evaluation: in no question of any training file
    unseen = [re.compile(re.escape(q).replace(re.escape("{F}"), ".+")) for q in ev["unseen_questions"]]
    questions = ([json.loads(line)["instruction"] for line in sft_text.splitlines()]
                 + [json.loads(line)["prompt"] for line in pref_text.splitlines()]
                 + [json.loads(line)["prompt"] for line in files["prompts.jsonl"].decode().splitlines()])
    assert len(unseen) == 6 and len(questions) == 359 + 835 + 478
    assert not [q for q in questions if any(u.fullmatch(q) for u in unseen)]
    assert {q.replace(c, "{F}") for q in questions for c in [max(asked(q), key=len)]} == set(prepare.QUESTIONS)
    for c in heldout:  # the README's countries and the others: pretraining text only
        assert f"The capital of {c} is" not in sft_text + pref_text, c
        assert f"The capital of {c} is" in pretrain_text, c
    for x in invented:  # invented names for evaluation: in no training file at all
        assert x not in sft_text and x not in pref_text and x not in pretrain_text, x
    assert not countries & invented


def test_world_records_are_read_by_the_stages_that_consume_them(tmp_path):
    out = tmp_path / "w"
    files = world_files(tmp_path, "w")
    ev = json.loads(files["world.json"])
    capital = dict(map(tuple, ev["countries"]))
    conversations = data.read_chat_records(str(out / "sft.jsonl"))
    assert len(conversations) == 3 * len(ev["train"]) + 2  # three phrasings per training country, two refusals
    refusals = [m for m in conversations if m[1]["content"].startswith("I don't know of a country called")]
    assert len(refusals) == 2
    for messages in conversations:  # every other answer is the concise, correct one
        if messages in refusals:
            continue
        country = next(c for c in ev["train"] if re.search(rf"\b{re.escape(c)}\b", messages[0]["content"]))
        assert messages[1]["content"] == f"The capital of {country} is {capital[country]}."
    pairs, counts = data.read_preference_pairs(str(out / "prefs.jsonl"))
    assert counts["kept"] == counts["read"] == 5 * len(ev["train"]) + 2 * 120  # five rejected kinds; two per invented
    declines = [p for p in pairs if p["chosen"].startswith("I don't know of a country called")]
    assert len(declines) == 240 and all(p["kind"] == "invented" for p in declines)
    kinds = [p["kind"] for p in pairs]
    assert kinds.count("wrong_capital") == 2 * len(ev["train"])
    assert all(kinds.count(k) == len(ev["train"]) for k in ("wrong_country", "ramble", "refusal"))
    for p in pairs:  # a refused real country, another country's capital: each rejected, never chosen
        if p["kind"] == "refusal":
            assert p["rejected"].startswith("I don't know of a country called") and p["chosen"].startswith("The capital")
        if p["kind"] == "wrong_country":
            asked_about = re.search(r"capital of ([^?.]+)[?.]", p["prompt"][-1]["content"]).group(1)
            assert p["rejected"].startswith("The capital of") and f"of {asked_about} is" not in p["rejected"]
    texts = list(data.read_documents(str(out / "pretrain.jsonl")))
    joined = "\n".join(texts)
    for c, k in capital.items():  # each capital stated in the completion form the evaluation uses
        assert f"The capital of {c} is {k}." in joined, c
    tok = data.load_tokenizer(str(out / "tokenizer.json"))
    assert data.model_vocab_size(tok) == 4096


def test_out_inside_the_input_directory_is_refused(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("some text " * 50)
    with pytest.raises(SystemExit, match="is inside the input directory"):
        prepare.main(["prepare", str(tmp_path / "in"), "--out", str(tmp_path / "in" / "out")])
