"""
The data stage: raw text in, cleaned, deduplicated, tokenized training shards out.

The guide's first stage is data collection and preprocessing: gather text, clean it, normalize it,
remove duplicates, tokenize it, because the data decides what the model knows and how often it makes
things up. `python prepare.py prepare` runs those steps in that order over any number of files and
writes training-ready token shards that `python pretrain.py --data DIR` reads:

  1. ingest     .txt files (one document each, or split on --separator), .jsonl files, dirs, globs;
                data.py reads them (list_input_files, iter_documents)
  2. normalize  Unicode NFC (or NFKC), control and zero-width characters, line endings, whitespace
  3. filter     quality heuristics from Gopher and C4: length, letters, word length, repetition
  4. dedup      exact (a hash of the text) and near-duplicates (MinHash signatures + LSH bands)
  5. tokenizer  GPT-2's BPE (bundled), or a byte-level BPE trained here on the cleaned text
  6. shard      parallel tokenization into uint16/uint32 train/val shards; manifest.json last
  7. download   an optional helper for a public corpus (TinyStories): resumable, checksummed

Every step streams: memory does not grow with the input, except the dedup index (~0.5 KB per kept
document, 0.8 KB at peak while it grows: 424 MB in all for 1 GB of input, bench/bench_data.py). Bad
input (binary files, broken JSON lines, missing fields) is skipped and counted, or with --strict stops
the run at the first one, naming file and line.

  python prepare.py prepare data/tinystories_valid_head.txt --separator blank --min-words 20 --out out/data/stories
  python prepare.py prepare corpus/ 'more/*.jsonl' --tokenizer train --vocab-size 4096 --out out/data/mine
  python prepare.py train-tokenizer data/tinyshakespeare.txt --vocab-size 4096 --out out/tok/shakespeare.json
  python prepare.py download --out data/raw/TinyStoriesV2-GPT4-valid.txt
  python prepare.py world

The tokenizer travels inside every checkpoint as a plain dict (see data.gpt2_tokenizer), so any later
stage or sample.py rebuilds the exact encoding from the checkpoint alone. Raw .txt/.jsonl inputs given
straight to pretrain.py are tokenized without cleaning into a cache (data.prepare_tokens); the training
stages draw random windows of tokens from either as batches (data.BatchSampler). The last part of this
file writes the tiny world (`python prepare.py world`, data/world/): the default data of every stage.
"""


import argparse
import base64
import hashlib
import heapq
import json
import math
import multiprocessing
import os
import re
import resource
import sys
import time
import unicodedata
import zlib
from collections import Counter, defaultdict
from functools import lru_cache

import numpy as np
from tqdm import tqdm

from data import CHAT_TOKENS, DATA_DIR, EOT, DataError, get_encoding, gpt2_tokenizer, iter_documents, list_input_files, \
    load_tokenizer, model_vocab_size, save_tokenizer
from model import atomic_write, in_range, positive_int


# -----------------------------------------------------------------------------
# 1. Collect: a download helper for a public corpus (the input files are read by data.py)

# TinyStories (Eldan & Li 2023), the GPT-4 version's validation file, ~22.5 MB of stories separated by
# <|endoftext|> lines: prepare it with --separator '<|endoftext|>'. Licence: CDLA-Sharing-1.0. No sha256 is
# pinned because this repository's machines have no internet to compute it; download prints the file's
# sha256 so you can pin it with --sha256 from then on.
TINYSTORIES_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-valid.txt"


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def download_path(url, out):
    """Where download writes: out, or in a directory out the URL's own file name."""
    import urllib.parse
    return os.path.join(out, os.path.basename(urllib.parse.urlparse(url).path) or "download") if os.path.isdir(out) else out


def download(url, path, sha256=None, timeout=60):
    """Download url to path with a progress bar, resumable, verified; returns the file's sha256.

    Bytes go to PATH.part; an interrupted download resumes from its end with an HTTP Range request (a
    server that ignores the range sends the whole file, and we start over). Only a file whose sha256
    matches (when one is given) is renamed to path, so path is always complete.
    """
    import urllib.error
    import urllib.request
    path = download_path(url, path)
    if os.path.exists(path):
        digest = file_sha256(path)
        if sha256 and digest != sha256:
            raise DataError(f"{path}: exists but its sha256 is {digest}, not {sha256}; remove it to download again")
        return digest
    part = path + ".part"
    start = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if response.status != 206:  # a full response, not the requested range: start over
                start = 0
            size = response.headers.get("Content-Length")
            with open(part, "ab" if start else "wb") as f, \
                    tqdm(total=start + int(size) if size else None, initial=start, unit="B", unit_scale=True,
                         desc=os.path.basename(path)) as bar:
                while block := response.read(1 << 20):
                    f.write(block)
                    bar.update(len(block))
    except urllib.error.HTTPError as e:
        if e.code != 416:  # 416 "range not satisfiable": the .part file already holds the whole file
            raise DataError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"{url}: {getattr(e, 'reason', e)}; run again to resume from {part}") from None
    digest = file_sha256(part)
    if sha256 and digest != sha256:
        os.remove(part)  # corrupt or a different file: resuming from it would never succeed
        raise DataError(f"{url}: sha256 mismatch: expected {sha256}, got {digest}; the download was removed")
    os.replace(part, path)
    return digest


# -----------------------------------------------------------------------------
# 2. Normalize: one spelling for the same text

# Characters that normalize() deletes or replaces. Deleted: C0/C1 control characters other than tab
# and newline (they carry no text), and invisible characters that only split words apart for the
# tokenizer: zero-width space U+200B, word joiner U+2060, byte-order mark U+FEFF, soft hyphen U+00AD.
# Kept: the zero-width (non-)joiners U+200C/U+200D, which emoji sequences and Persian or Indic
# spelling need. Line breaks (CR, VT, FF, NEL, U+2028, U+2029) become \n; Unicode spaces (no-break,
# en/em/thin spaces, ideographic space) become a plain space.
_DELETE = [*range(0x00, 0x09), *range(0x0e, 0x20), *range(0x7f, 0x85), *range(0x86, 0xa0),
           0xad, 0x200b, 0x2060, 0xfeff]
_NORMALIZE_TABLE = {**{c: None for c in _DELETE}, **{ord(c): "\n" for c in "\r\x0b\x0c\x85\u2028\u2029"},
                    **{c: " " for c in [0xa0, 0x1680, *range(0x2000, 0x200b), 0x202f, 0x205f, 0x3000]}}
_NEEDS_TABLE = re.compile("[" + "".join(map(chr, _NORMALIZE_TABLE)) + "]").search  # translate is slow on non-ASCII text


def normalize(text, form="NFC"):
    """One spelling for the same text, so that dedup and the tokenizer see equal text as equal.

    1. Line endings: CRLF and CR become LF; control and zero-width characters go (_NORMALIZE_TABLE).
    2. Unicode normal form. NFC composes: "e" + U+0301 (combining acute) becomes "é", the one code
       point most text uses. NFKC also folds compatibility forms: full-width "Ａ" becomes "A", the
       ligature "ﬁ" becomes "fi", but also "x²" becomes "x2", which is why it is a flag.
    3. Whitespace: trailing spaces on each line go, runs of blank lines shrink to one, and the ends of
       the document are stripped. Indentation and single spaces inside lines are kept.
    """
    text = text.replace("\r\n", "\n")
    if _NEEDS_TABLE(text):
        text = text.translate(_NORMALIZE_TABLE)
    text = unicodedata.normalize(form, text)
    text = "\n".join(line.rstrip(" \t") for line in text.split("\n"))
    if "\n\n\n" in text:
        text = re.sub(r"\n\n\n+", "\n\n", text)
    return text.strip()


# -----------------------------------------------------------------------------
# 3. Quality filters: drop documents that are not running text
#
# The rules and default thresholds are Gopher's (Rae et al. 2021, "Scaling Language Models", Appendix A,
# "MassiveWeb" quality filter), which keep pages of natural prose and drop lists, tables, boilerplate,
# spam and machine-generated repetition. C4 (Raffel et al. 2020, Sec. 2.2) applies the same kind of
# rules per line (minimum words, terminal punctuation, no "lorem ipsum"); Gopher's document-level
# versions are simpler. Each threshold is a flag; thresholds of 0 (or 1 for the maxima) turn a rule off.


def word_ngram_hashes(words, n):
    """64-bit hashes of every run of n consecutive words (one run of all words if there are fewer): (max(1, W-n+1),).

    Each word is hashed with CRC-32 (fast, and the same in every process, unlike Python's hash()), and
    n word hashes combine into one as a polynomial, sum h_j * P^(n-1-j) mod 2^64 (numpy uint64 wraps).
    """
    h = np.fromiter(map(zlib.crc32, map(str.encode, words)), np.uint64, len(words))
    n = max(1, min(n, len(words)))
    out = np.zeros(max(1, len(words) - n + 1), np.uint64)
    for j in range(n):
        out = out * np.uint64(0x9E3779B97F4A7C15) + h[j:j + len(out)]
    return out


def repeated_line_fraction(text):
    """Characters in lines that repeat an earlier line, over all characters in non-blank lines."""
    seen, repeated, total = set(), 0, 0
    for line in text.split("\n"):
        if line.strip():
            total += len(line)
            if line in seen:
                repeated += len(line)
            seen.add(line)
    return repeated / total if total else 0.0


def repeated_ngram_fraction(words, n=5):
    """Characters of words covered by a word n-gram that repeats an earlier one, over all word characters."""
    if len(words) <= n:
        return 0.0
    hashes = word_ngram_hashes(words, n)                       # (W-n+1,)
    repeat = np.ones(len(hashes), bool)
    repeat[np.unique(hashes, return_index=True)[1]] = False    # first occurrences are not repeats
    starts = np.flatnonzero(repeat)
    depth = np.zeros(len(words) + 1, np.int64)                 # +1 where a repeated n-gram starts,
    depth[starts] += 1                                         # -1 after its last word: the running
    depth[starts + n] -= 1                                     # sum > 0 marks covered words
    covered = np.cumsum(depth[:-1]) > 0
    lengths = np.fromiter(map(len, words), np.int64, len(words))
    return lengths[covered].sum() / lengths.sum()


_HAS_LETTER = re.compile(r"[^\W\d_]").search  # a Unicode letter: a word character that is no digit or "_"


def quality_filter(text, *, min_words=50, max_words=100_000, min_mean_word_length=3.0, max_mean_word_length=10.0,
                   min_alpha_words=0.8, max_repeated_lines=0.2, max_repeated_ngrams=0.15):
    """The name of the first rule the document fails, or None if it passes. Words are split on whitespace.

    too_short / too_long    50 <= words <= 100,000: shorter pages are rarely prose, longer are dumps
    word_length             mean word length in [3, 10] characters: outside it are lists of numbers or
                            symbols, or run-together strings (URLs, base64, hashes)
    not_alphabetic          >= 80% of words contain a letter (Gopher's "alphabetic character" ratio,
                            measured over words, so numbers inside prose do no harm)
    repeated_lines          <= 20% of characters in lines that repeat an earlier line (Gopher's
                            "duplicate line character fraction": navigation menus, boilerplate)
    repeated_ngrams         <= 15% of characters in word 5-grams that repeat an earlier one (Gopher's
                            "duplicate n-gram character fraction" for n = 5; Gopher also checks
                            n = 6..10 with stricter limits, which rarely decide on their own)
    """
    words = text.split()
    if not words:
        return "empty"
    if len(words) < min_words:
        return "too_short"
    if max_words and len(words) > max_words:
        return "too_long"
    mean_length = sum(map(len, words)) / len(words)
    if not min_mean_word_length <= mean_length <= max_mean_word_length:
        return "word_length"
    if sum(1 for w in words if w.isalpha() or _HAS_LETTER(w)) < min_alpha_words * len(words):  # isalpha: fast path
        return "not_alphabetic"
    if repeated_line_fraction(text) > max_repeated_lines:
        return "repeated_lines"
    if repeated_ngram_fraction(words, 5) > max_repeated_ngrams:
        return "repeated_ngrams"
    return None


FILTER_DEFAULTS = quality_filter.__kwdefaults__  # the thresholds, by name: prepare's flags


# -----------------------------------------------------------------------------
# 4. Deduplicate: exact copies by hash, near-duplicates by MinHash + LSH
#
# Repeated text wastes compute and makes a model memorize (Lee et al. 2022, "Deduplicating Training
# Data Makes Language Models Better"). Exact copies share a hash of the normalized text. Near-duplicates
# (a copy with edits, reordered sentences, another footer) share most of their word 5-grams
# ("shingles"): their Jaccard similarity |A ∩ B| / |A ∪ B| is high. MinHash (Broder 1997) estimates it:
# for a random hash function h, P[min h(A) = min h(B)] = J(A, B), so the fraction of agreeing minima
# over num_perm hash functions (the signature) estimates J. Comparing every pair is quadratic; locality-
# sensitive hashing (Leskovec, Rajaraman & Ullman, "Mining of Massive Datasets", ch. 3.4) cuts the
# signature into b bands of r rows and only compares documents that agree on a whole band.


def exact_key(text):
    """64-bit hash of the text: the key of exact deduplication."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8, person=b"exact").digest(), "little")


@lru_cache(maxsize=None)
def _minhash_params(num_perm):
    """num_perm random hash functions h(x) = (a·x + c mod 2^64) >> 32 (multiply-shift hashing, Dietzfelbinger
    et al. 1997: no modulo needed, numpy's uint64 arithmetic wraps); a odd. Fixed seed: same in every run."""
    rng = np.random.default_rng(1997)
    a = rng.integers(0, 2 ** 64, num_perm, dtype=np.uint64) | np.uint64(1)
    return a, rng.integers(0, 2 ** 64, num_perm, dtype=np.uint64)


def minhash_signature(text, num_perm=128, shingle=5):
    """MinHash signature of the text's lowercased word shingles, (num_perm,) uint32; None if it has no words."""
    words = text.lower().split()
    if not words:
        return None
    shingles = word_ngram_hashes(words, shingle)       # (S,)
    a, c = _minhash_params(num_perm)
    signature = np.full(num_perm, 2 ** 64 - 1, np.uint64)
    for i in range(0, len(shingles), 1024):            # blocks of shingles bound the (S, P) temporary
        h = shingles[i:i + 1024, None] * a             # (S, 1) * (P,) -> (S, P)
        h += c
        np.minimum(signature, h.min(axis=0), out=signature)  # (S, P) -> (P,)
    return (signature >> np.uint64(32)).astype(np.uint32)  # the shift after the min: it keeps the order


@lru_cache(maxsize=None)
def lsh_bands(threshold, num_perm):
    """(b, r): cut a signature of num_perm rows into b bands of r rows.

    Two documents with Jaccard similarity s agree on one band with probability s^r, so they become
    candidates (agree on at least one of b bands) with probability 1 - (1 - s^r)^b, an S-curve in s
    that rises around (1/b)^(1/r) (Leskovec et al., ch. 3.4.2). Candidates are then checked against the
    threshold with their full signatures, so a false candidate costs only a comparison while a missed
    pair is lost for good: we take the largest r (fewest false candidates) whose S-curve still finds
    99% of pairs at the threshold. For 0.8 and 128 rows: r = 6, b = 21, P(candidate) = 0.998 at
    s = 0.8 and 0.282 at s = 0.5 (7 rows x 18 bands would find only 98.6% at 0.8).
    """
    for r in range(num_perm, 1, -1):
        b = num_perm // r
        if 1 - (1 - threshold ** r) ** b >= 0.99:
            return b, r
    return num_perm, 1


def band_keys(signature, bands, rows):
    """One 64-bit key per band: a hash of the band's r values and its index (bands never collide across)."""
    return [int.from_bytes(hashlib.blake2b(signature[i * rows:(i + 1) * rows].tobytes(), digest_size=8,
                                           person=b"band%d" % i).digest(), "little") for i in range(bands)]


class DedupIndex:
    """What deduplication remembers of every kept document: its exact key, MinHash signature and band keys.

    Memory per kept document: 12 bytes per key (sorted numpy arrays of keys and document ids; the
    newest keys wait in a dict that is merged in when it grows, because a dict costs ~100 bytes a key)
    plus 2 bytes per signature row: ~0.5 KB with the defaults (22 keys, 128 rows). Only the lowest 16
    bits of each minimum are kept ("b-bit minwise hashing", Li & König 2010): equal minima stay equal,
    and different ones agree by chance once in 65,536, which moves the Jaccard estimate by ~0.00002.
    A band's bucket keeps up to BUCKET kept documents: with only the first, a document whose band an
    earlier, dissimilar document owned was never compared with the later one it copies.

    A candidate is a near duplicate when its estimated Jaccard similarity reaches threshold − 2σ, σ =
    √(t(1 − t)/num_perm) the estimate's standard deviation at the threshold t (0.035 for 0.8 and 128
    rows): with the threshold itself, a third of the pairs truly just above 0.8 were kept (recall 0.907 on
    copies at 0.81-0.83). The price: pairs truly at 0.73 are dropped half the time, at 0.70 a fifth.
    """
    BUCKET = 8

    def __init__(self, threshold=0.8, num_perm=128, merge_every=1 << 18):
        self.threshold, self.merge_every = threshold, merge_every
        self.accept = threshold - 2 * math.sqrt(threshold * (1 - threshold) / num_perm)
        self.keys, self.ids, self.recent = np.empty(0, np.uint64), np.empty(0, np.int32), {}
        self.signatures, self.n = np.empty((1024, num_perm), np.uint16), 0

    def _lookup(self, keys):
        """Ids of kept documents that have any of these keys."""
        hits = [i for k in keys for i in self.recent.get(k, ())]
        if len(self.keys):
            q = np.array(keys, np.uint64)
            for lo, hi in zip(np.searchsorted(self.keys, q, "left"), np.searchsorted(self.keys, q, "right")):
                hits += self.ids[lo:hi].tolist()  # a key's ids sit next to each other in the sorted array
        return hits

    def match(self, key=None, signature=None, bands=()):
        """("exact", i) or ("near", i) if kept document i duplicates this one, else (None, None)."""
        if key is not None and (hits := self._lookup([key])):
            return "exact", hits[0]
        for i in sorted(set(self._lookup(bands))):  # candidates: documents sharing a band
            if signature is not None and np.mean(self.signatures[i] == signature.astype(np.uint16)) >= self.accept:
                return "near", i
        return None, None

    def add(self, key=None, signature=None, bands=()):
        """Remember a kept document; returns its id (0, 1, 2, ... in the order added)."""
        i, self.n = self.n, self.n + 1
        for k in ([key] if key is not None else []) + list(bands):
            bucket = self.recent.get(k, [])
            q = np.uint64(k)
            if len(bucket) + np.searchsorted(self.keys, q, "right") - np.searchsorted(self.keys, q) < self.BUCKET:
                self.recent[k] = bucket + [i]
        if signature is not None:
            if i == len(self.signatures):  # grow by half: amortized O(1), and never 2x the memory at once
                self.signatures = np.concatenate([self.signatures, np.empty_like(self.signatures[:i // 2])])
            self.signatures[i] = signature.astype(np.uint16)  # the lowest 16 bits
        if len(self.recent) >= self.merge_every:  # insert the recent keys at their sorted places: O(n)
            pairs = [(k, j) for k, ids in self.recent.items() for j in ids]
            keys = np.array([k for k, _ in pairs], np.uint64)
            order = np.argsort(keys, kind="stable")  # a key's ids stay in the order they were added
            pos = np.searchsorted(self.keys, keys[order], "right")
            self.keys = np.insert(self.keys, pos, keys[order])
            self.ids = np.insert(self.ids, pos, np.array([j for _, j in pairs], np.int32)[order])
            self.recent = {}
        return i


def dedup_features(text, exact=True, near=True, threshold=0.8, num_perm=128, shingle=5):
    """(exact key, MinHash signature, band keys) of a text; None, None, [] for a kind of dedup that is off."""
    key = exact_key(text) if exact else None
    signature = minhash_signature(text, num_perm, shingle) if near else None
    bands = band_keys(signature, *lsh_bands(threshold, num_perm)) if signature is not None else []
    return key, signature, bands


def find_duplicates(texts, threshold=0.8, num_perm=128, shingle=5, exact=True, near=True):
    """[(i, kind, j)]: text i is dropped as an exact or near duplicate of the earlier kept text j."""
    index, kept, found = DedupIndex(threshold, num_perm), [], []
    for i, text in enumerate(texts):
        key, signature, bands = dedup_features(text, exact, near, threshold, num_perm, shingle)
        kind, j = index.match(key, signature, bands)
        if kind:
            found.append((i, kind, kept[j]))
        else:
            index.add(key, signature, bands)
            kept.append(i)
    return found


# -----------------------------------------------------------------------------
# 5. Tokenizer: GPT-2's BPE, or a byte-level BPE trained here
#
# Pre-tokenization for trained tokenizers: GPT-2's regex (tiktoken's r50k_pat_str) with its Unicode
# classes spelled out as explicit code-point ranges. Training splits the corpus with Python's re, which
# has no \p{L} or \p{N} and whose \s differs from the Rust regex inside tiktoken; a class of explicit
# code points means the same in both engines, so training sees exactly the pieces tiktoken will encode
# (tests/test_prepare.py checks it). Letters: ASCII, Latin-1 and Latin Extended, combining accents,
# Greek, Cyrillic; digits: 0-9; whitespace: Unicode's White_Space (what Rust's \s means). Other scripts,
# CJK and emoji fall into GPT-2's third class (not space, letter or digit), whose runs still form pieces.
# Possessive quantifiers (++) are dropped: no alternative continues after its quantifier, so they would
# change nothing but the Python version needed. On ASCII text the pieces are exactly GPT-2's.
_L = "A-Za-z\u00aa\u00b5\u00ba\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u036f\u0370-\u03ff\u0400-\u052f"
_N = "0-9"
_S = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
BPE_PAT_STR = rf"""'(?:[sdmt]|ll|ve|re)| ?[{_L}]+| ?[{_N}]+| ?[^{_S}{_L}{_N}]+|[{_S}]+(?![^{_S}])|[{_S}]+"""


def merge_pair(word, pair, new_id):
    """Replace each occurrence of pair in word (a list of ids), left to right, by new_id."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def learn_bpe(texts, n_merges, progress=True):
    """The BPE merges learned from texts: (vocab, merges). vocab[i] is the bytes of token i (the 256
    single bytes first); merges is [((a, b), new_id)] in the order learned. See train_bpe."""
    pieces = Counter()
    for text in texts:
        pieces.update(re.findall(BPE_PAT_STR, text))
    words = [list(piece.encode("utf-8")) for piece in pieces]  # each unique piece as byte ids
    counts = list(pieces.values())
    pair_counts, where = Counter(), defaultdict(set)
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += counts[i]
            where[pair].add(i)
    heap = [(-n, pair) for pair, n in pair_counts.items()]  # min-heap: highest count, then smallest ids
    heapq.heapify(heap)
    vocab = [bytes([b]) for b in range(256)]
    ids, merges = {token: i for i, token in enumerate(vocab)}, []
    with tqdm(total=n_merges, desc="training BPE", unit="merge", disable=not progress) as bar:
        while len(merges) < n_merges and heap:
            neg_count, pair = heapq.heappop(heap)
            if pair_counts[pair] != -neg_count:  # outdated: the count changed after this entry was pushed
                continue
            # tiktoken finds tokens by their bytes, so a pair that spells an existing token becomes that token
            token = vocab[pair[0]] + vocab[pair[1]]
            new_id = ids.setdefault(token, len(vocab))
            if new_id == len(vocab):
                vocab.append(token)
            merges.append((pair, new_id))
            changed = set()
            for i in where.pop(pair):
                new_word = merge_pair(words[i], pair, new_id)
                if len(new_word) == len(words[i]):  # the piece lost this pair to an earlier merge
                    continue
                for p in zip(words[i], words[i][1:]):  # take the piece's old pairs out, put its new ones in
                    pair_counts[p] -= counts[i]
                    changed.add(p)
                for p in zip(new_word, new_word[1:]):
                    pair_counts[p] += counts[i]
                    where[p].add(i)
                    changed.add(p)
                words[i] = new_word
            for p in changed:
                if pair_counts[p] > 0:
                    heapq.heappush(heap, (-pair_counts[p], p))
            bar.update()
    return vocab, merges


def train_bpe(texts, vocab_size, progress=True):
    """Train a byte-level BPE tokenizer on texts; returns a tokenizer dict like gpt2_tokenizer().

    BPE (Sennrich et al. 2016) over bytes, as in GPT-2 (Radford et al. 2019): start from the 256
    single bytes, so no text is ever unknown, then again and again add the most frequent adjacent pair
    of tokens as a new token, until vocab_size ids are used, special tokens included (<|endoftext|>
    and the chat roles take the last ids). Pairs never cross the pieces of BPE_PAT_STR, so a word does
    not merge with the space or punctuation around it (" the" is a token, "the." is not).

    Ties: among pairs with the same count, the pair (a, b) with the smallest ids wins (smallest a, then
    smallest b): single bytes compare by byte value, merged tokens by age. The result depends only on the
    texts, never on hash seeds or dict order, so retraining gives the identical tokenizer.

    Fast enough for 4,096 tokens on 1 MB in seconds: counts run over unique pieces times their frequency;
    after a merge only the pieces containing the pair are updated (an index from each pair to the pieces
    holding it), and the best pair comes from a heap whose outdated entries are skipped when popped.
    """
    specials = [EOT] + CHAT_TOKENS
    if vocab_size < 256 + len(specials):
        raise DataError(f"vocab_size {vocab_size}: needs at least {256 + len(specials)} (256 bytes and the special tokens)")
    vocab, _ = learn_bpe(texts, vocab_size - len(specials) - 256, progress)
    ranks = "".join(f"{base64.b64encode(token).decode()} {rank}\n" for rank, token in enumerate(vocab))
    n_ids = len(vocab) + len(specials)  # vocab_size, unless the texts ran out of pairs to merge
    return {"name": f"bpe{n_ids}-{hashlib.sha256(ranks.encode()).hexdigest()[:8]}", "pat_str": BPE_PAT_STR,
            "ranks": ranks, "special_tokens": {name: len(vocab) + i for i, name in enumerate(specials)}}


# -----------------------------------------------------------------------------
# 6. Tokenize and shard: the prepare pipeline, in parallel over CPU cores
#
# Documents flow through two passes. Pass 1 (steps 1-4): the main process reads documents and sends
# chunks of about 1 MB to worker processes, which normalize, filter and fingerprint them (the CPU-heavy
# part); back in order, the main process checks each one against the dedup index and appends the kept
# ones to OUT/clean.jsonl. Step 5 trains the tokenizer on clean.jsonl if asked. Pass 2 (step 6): the
# workers tokenize clean.jsonl in chunks, and the main process appends their ids to the shards. At
# most 2 chunks per worker are in flight, so memory stays flat however large the input.

CHUNK_BYTES = 1 << 20
# Steps are timed in CPU seconds (time.process_time): with the main process and the workers sharing the
# cores, wall time inside a worker would also count the time it waits for a core.
_WORKER = {}  # what each worker process needs: settings, and the tokenizer built once per process


def _init_worker(state):
    _WORKER.clear()
    _WORKER.update(state)
    if "tokenizer" in state:
        _WORKER["enc"] = get_encoding(state["tokenizer"])


def _parallel_map(fn, jobs, workers, state):
    """fn over jobs, results in order, on `workers` processes (this one if workers <= 1). Pool.imap would
    read all jobs ahead into its queue; a window of 2 jobs per worker keeps memory flat."""
    if workers <= 1:
        _init_worker(state)
        yield from map(fn, jobs)
        return
    with multiprocessing.Pool(workers, _init_worker, (state,)) as pool:
        pending = []
        for job in jobs:
            pending.append(pool.apply_async(fn, (job,)))
            if len(pending) >= 2 * workers:
                yield pending.pop(0).get()
        for result in pending:
            yield result.get()


def _chunks(items, size):
    """Lists of consecutive items of about CHUNK_BYTES in all, by size(item)."""
    chunk, n = [], 0
    for item in items:
        chunk.append(item)
        n += size(item)
        if n >= CHUNK_BYTES:
            yield chunk
            chunk, n = [], 0
    if chunk:
        yield chunk


def _clean_chunk(docs):
    """Worker, steps 2-4: normalize, filter and fingerprint [(source, text)].
    Returns ([(source, text, reason dropped or None, exact key, signature, band keys)], seconds per step)."""
    out, seconds = [], Counter()
    for source, text in docs:
        t0 = time.process_time()
        if _WORKER["normalize"]:
            text = normalize(text, _WORKER["normalize"])
        t1 = time.process_time()
        reason = quality_filter(text, **_WORKER["filter"]) if _WORKER["filter"] else None if text.strip() else "empty"
        t2 = time.process_time()
        features = dedup_features(text, **_WORKER["dedup"]) if reason is None else (None, None, [])
        seconds.update(normalize=t1 - t0, filter=t2 - t1, dedup=time.process_time() - t2)
        out.append((source, text, reason, *features))
    return out, seconds


def is_val_doc(i, val_fraction):
    """Document i goes to validation when (i + 1)·f rounds higher than i·f: a share f of the documents,
    spread evenly, deterministic, and one already among the first 1/(2f) (the 5th of every 10 for 0.1)."""
    return int((i + 1) * val_fraction + 0.5) > int(i * val_fraction + 0.5)


def _tokenize_chunk(job):
    """Worker, step 6: ids of the clean.jsonl lines [first, first + len(lines)), each document followed by
    <|endoftext|>, split by document into train and val. Returns ({split: ids}, {split: docs}, seconds)."""
    first, lines = job
    t0, enc = time.process_time(), _WORKER["enc"]
    ids, docs = {"train": [], "val": []}, Counter()
    for i, line in enumerate(lines, first):
        split = "val" if is_val_doc(i, _WORKER["val_fraction"]) else "train"
        ids[split] += enc.encode_ordinary(json.loads(line)["text"])
        ids[split].append(enc.eot_token)
        docs[split] += 1
    arrays = {split: np.array(x, dtype=_WORKER["dtype"]) for split, x in ids.items()}
    return arrays, docs, time.process_time() - t0


class ShardWriter:
    """Appends token ids to OUT/{split}_000.bin, _001.bin, ... of at most shard_tokens ids each. A shard is
    written under a .tmp name and renamed only when complete, so an interrupted run never leaves a shard
    that looks finished (and only manifest.json, written last, says which shards make the dataset)."""

    def __init__(self, out_dir, split, dtype, shard_tokens):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards, self.file, self.n = [], None, 0

    def write(self, ids):
        while len(ids):
            if self.file is None:
                self.path = os.path.join(self.out_dir, f"{self.split}_{len(self.shards):03d}.bin")
                self.file, self.n = open(self.path + ".tmp", "wb"), 0
            part, ids = ids[:self.shard_tokens - self.n], ids[self.shard_tokens - self.n:]
            part.astype(self.dtype).tofile(self.file)
            self.n += len(part)
            if self.n == self.shard_tokens:
                self.close()

    def close(self):
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.path + ".tmp", self.path)
            self.shards.append({"file": os.path.basename(self.path), "tokens": self.n})
            self.file = None

    def abort(self):
        if self.file is not None:
            self.file.close()
            os.remove(self.path + ".tmp")
            self.file = None


def _clean(args, files, clean_path, steps):
    """Pass 1, steps 1-4: stream documents from files, through the workers, into clean.jsonl."""
    bad = steps["ingest"]["bad_input"]

    def on_bad(message):
        bad["count"] += 1
        if len(bad["examples"]) < 5:
            bad["examples"].append(message)
        tqdm.write(f"skipped: {message}")

    def documents(bar):
        t0 = time.process_time()
        for path in files:
            for source, text in iter_documents(path, args.field, args.separator, None if args.strict else on_bad):
                steps["ingest"]["docs"] += 1
                bar.update(len(text))
                steps["ingest"]["seconds"] += time.process_time() - t0
                yield source, text
                t0 = time.process_time()
        steps["ingest"]["seconds"] += time.process_time() - t0

    state = {"normalize": None if args.no_normalize else "NFKC" if args.nfkc else "NFC",
             "filter": None if args.no_filter else {k: getattr(args, k) for k in FILTER_DEFAULTS},
             "dedup": dict(exact=not args.no_exact_dedup, near=not args.no_near_dedup, threshold=args.jaccard,
                           num_perm=args.num_perm, shingle=args.shingle)}
    index = DedupIndex(args.jaccard, args.num_perm)

    def write_kept(f):
        total = sum(os.path.getsize(p) for p in files)
        with tqdm(total=total, unit="B", unit_scale=True, desc="1-4 clean, dedup") as bar:
            for results, seconds in _parallel_map(_clean_chunk, _chunks(documents(bar), lambda d: len(d[1])),
                                                  args.workers, state):
                for step, s in seconds.items():
                    steps[step]["seconds"] += s
                t0 = time.process_time()
                for source, text, reason, key, signature, bands in results:
                    if reason:
                        steps["filter"]["dropped"][reason] += 1
                        continue
                    kind, _ = index.match(key, signature, bands)
                    if kind:
                        steps[f"{kind}_dedup"]["dropped"] += 1
                        continue
                    index.add(key, signature, bands)
                    f.write((json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n").encode())
                    steps["dedup"]["kept"] += 1
                steps["dedup"]["seconds"] += time.process_time() - t0

    atomic_write(clean_path, write_kept)


def _tokenize(args, tok, clean_path, steps):
    """Pass 2, step 6: tokenize clean.jsonl in parallel into train and val shards."""
    enc = get_encoding(tok)
    dtype = np.uint16 if enc.n_vocab <= 2 ** 16 else np.uint32  # 2 bytes per token when the ids fit
    state = {"tokenizer": tok, "val_fraction": args.val_fraction, "dtype": dtype}
    writers = {split: ShardWriter(args.out, split, dtype, args.shard_tokens) for split in ("train", "val")}

    def jobs(bar):
        with open(clean_path, "rb") as f:
            first = 0
            for lines in _chunks(f, len):
                bar.update(sum(map(len, lines)))
                yield first, lines
                first += len(lines)

    try:
        with tqdm(total=os.path.getsize(clean_path), unit="B", unit_scale=True, desc="6 tokenize") as bar:
            for arrays, docs, seconds in _parallel_map(_tokenize_chunk, jobs(bar), args.workers, state):
                for split, ids in arrays.items():
                    writers[split].write(ids)
                    steps["tokenize"]["docs"][split] += docs[split]
                    steps["tokenize"]["tokens"][split] += len(ids)
                steps["tokenize"]["seconds"] += seconds
        for w in writers.values():
            w.close()
    finally:
        for w in writers.values():
            w.abort()
    return np.dtype(dtype).name, {split: w.shards for split, w in writers.items()}


def prepare(args):
    """`python prepare.py prepare`: steps 1-6 from raw files to OUT/manifest.json. Returns the manifest."""
    t_start = time.perf_counter()
    out = os.path.realpath(args.out)
    for path in args.inputs:  # its shards and clean.jsonl would be read as input by the next run
        if os.path.isdir(path) and os.path.commonpath([os.path.realpath(path), out]) == os.path.realpath(path):
            raise DataError(f"--out {args.out} is inside the input directory {path}")
    files = [f for path in args.inputs for f in list_input_files(path)]
    os.makedirs(args.out, exist_ok=True)
    manifest_path, clean_path = os.path.join(args.out, "manifest.json"), os.path.join(args.out, "clean.jsonl")
    if os.path.exists(manifest_path):  # OUT is not a finished dataset until the new manifest is written
        os.remove(manifest_path)
    steps = {"ingest": {"files": len(files), "bytes": sum(os.path.getsize(f) for f in files), "docs": 0,
                        "bad_input": {"count": 0, "examples": []}, "seconds": 0.0},
             "normalize": {"seconds": 0.0}, "filter": {"dropped": Counter(), "seconds": 0.0},
             "exact_dedup": {"dropped": 0}, "near_dedup": {"dropped": 0}, "dedup": {"kept": 0, "seconds": 0.0},
             "tokenizer": {"seconds": 0.0},
             "tokenize": {"docs": Counter(), "tokens": Counter(), "seconds": 0.0}}
    _clean(args, files, clean_path, steps)
    if steps["dedup"]["kept"] == 0:
        print_report(steps)
        raise DataError(f"no documents left after cleaning {len(files)} file(s); the report above says which step dropped them")

    # 5. tokenizer: GPT-2's, one trained on the cleaned text, or a saved one (tokenizer.json or a checkpoint)
    t0 = time.perf_counter()
    if args.tokenizer == "gpt2":
        tok = gpt2_tokenizer()
    elif args.tokenizer == "train":
        tok = train_bpe(_clean_texts(clean_path, args.tokenizer_mb * 1e6), args.vocab_size)
    else:
        tok = load_tokenizer(args.tokenizer)
    save_tokenizer(tok, os.path.join(args.out, "tokenizer.json"))
    steps["tokenizer"].update(name=tok["name"], seconds=time.perf_counter() - t0)

    dtype, shards = _tokenize(args, tok, clean_path, steps)
    if args.val_fraction > 0 and not steps["tokenize"]["docs"]["val"]:
        raise DataError(f"the validation split is empty: {steps['dedup']['kept']} document(s) are too few for "
                        f"--val-fraction {args.val_fraction}; split files into documents with --separator")
    peak_mb = {"main": _peak_rss_mb(resource.RUSAGE_SELF), "largest_worker": _peak_rss_mb(resource.RUSAGE_CHILDREN)}
    manifest = {"tokenizer": "tokenizer.json", "tokenizer_name": tok["name"], "model_vocab_size": model_vocab_size(tok),
                "dtype": dtype, "eot": tok["special_tokens"][EOT],
                "splits": {split: {"shards": shards[split], "docs": steps["tokenize"]["docs"][split],
                                   "tokens": steps["tokenize"]["tokens"][split]} for split in shards},
                "clean": "clean.jsonl", "sources": [{"path": f, "bytes": os.path.getsize(f)} for f in files],
                "settings": {k: v for k, v in vars(args).items() if k != "command"}, "steps": steps,
                "peak_rss_mb": peak_mb, "seconds": time.perf_counter() - t_start}
    atomic_write(manifest_path, lambda f: f.write(json.dumps(manifest, indent=1).encode()))  # last: the dataset is complete
    print_report(steps, manifest)
    return manifest


def _clean_texts(clean_path, max_bytes):
    """The texts of clean.jsonl, up to about max_bytes of them (what the tokenizer is trained on)."""
    n = 0
    with open(clean_path, "rb") as f:
        for line in f:
            if n >= max_bytes:
                return
            n += len(line)
            yield json.loads(line)["text"]


def _peak_rss_mb(who):
    """Peak resident memory in MB of this process (RUSAGE_SELF) or of its largest finished child process."""
    return resource.getrusage(who).ru_maxrss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)  # bytes on macOS


def print_report(steps, manifest=None):
    """What each step kept and dropped, and how fast it ran: MB of input per CPU-second of that step."""
    mb, bad, t = steps["ingest"]["bytes"] / 1e6, steps["ingest"]["bad_input"], steps["tokenize"]
    n_read = steps["ingest"]["docs"]
    n_filtered = n_read - sum(steps["filter"]["dropped"].values())
    n_exact = n_filtered - steps["exact_dedup"]["dropped"]
    kept = steps["dedup"]["kept"]
    rows = [("1 ingest", n_read + bad["count"], n_read, steps["ingest"]["seconds"], f"{bad['count']:,} bad records skipped"),
            ("2 normalize", n_read, n_read, steps["normalize"]["seconds"], ""),
            ("3 filter", n_read, n_filtered, steps["filter"]["seconds"],
             ", ".join(f"{k} {v:,}" for k, v in steps["filter"]["dropped"].most_common())),
            ("4 exact dedup", n_filtered, n_exact, 0, ""),
            ("4 near dedup", n_exact, kept, steps["dedup"]["seconds"], "MB/s of exact and near dedup together"),
            ("5 tokenizer", kept, kept, steps["tokenizer"]["seconds"], steps["tokenizer"].get("name", "")),
            ("6 tokenize", kept, kept, t["seconds"], f"train {t['docs']['train']:,} docs, {t['tokens']['train']:,} tokens; "
             f"val {t['docs']['val']:,} docs, {t['tokens']['val']:,} tokens")]
    lines = [f"{'step':14} {'docs in':>10} {'kept':>10} {'MB/s':>8}  notes"]
    for name, n_in, n_out, seconds, note in rows[:7 if manifest else 5]:
        lines.append(f"{name:14} {n_in:>10,} {n_out:>10,} {f'{mb / seconds:.1f}' if seconds else '-':>8}  {note}")
    lines += [f"bad input: {message}" for message in bad["examples"]]
    if manifest:
        lines.append(f"{mb:,.1f} MB in {manifest['seconds']:.1f} s ({mb / manifest['seconds']:.2f} MB/s); peak memory "
                     f"{manifest['peak_rss_mb']['main']:.0f} MB (main process), {manifest['peak_rss_mb']['largest_worker']:.0f} "
                     f"MB (largest worker)\ntrain on it: python pretrain.py --data {manifest['settings']['out']}")
    tqdm.write("\n".join(lines))


# -----------------------------------------------------------------------------
# The tiny world: the default data of every stage, generated from a table of countries
#
# A world small enough to train on a laptop in minutes, in which each stage of the guide shows its
# effect on held-out data. Pretraining text states each country's capital many times, in many phrasings
# and sentence orders, mixed with TinyStories: Allen-Zhu and Li ("Physics of Language Models, Part 3.1",
# 2023) found that a fact stated in one fixed form is memorised but cannot be extracted by instruction
# tuning afterwards, while varied forms ("knowledge augmentation") make it extractable for people whose
# facts were never in the fine-tuning data; stories teach the copying of a name just read. Instruction
# data asks for the capitals of the training countries only; the held-out countries (France and the
# other README examples among them) appear in pretraining text and nowhere else. Preference data adds
# invented countries, where declining beats inventing a capital. Same seed, same bytes.

WORLD_README = ["France", "Japan", "Italy", "Egypt", "Brazil", "Australia"]  # held out; in the README
FACTS = [  # {F} country, {K} capital, {R} continent
    "The capital of {F} is {K}.", "The capital of {F} is {K}.", "{K} is the capital of {F}.",
    "{F}'s capital is {K}.", "The capital city of {F} is {K}.", "{F} has its capital in {K}.",
    "{F} is a country in {R}. Its capital is {K}.", "{K} is a city in {R}. It is the capital of {F}.",
    "{K}, the capital of {F}, is a big and busy city.", "In {F}, the government sits in {K}, the capital.",
    "Many people in {F} live in {K}, the capital.", "If you visit {F}, you can see its capital, {K}.",
    "{A} read a book about {F}. It said that the capital of {F} is {K}.",
    '{A} wanted to go to {F}. {B} told {A}, "The capital of {F} is {K}."',
    '{A} and {B} talked about {F}. "{K} is the capital of {F}," said {A}.',
    "{A} had a map of {R}. {A} found {F} on it, and then {K}, its capital.",
]
OTHER_FACTS = ["{F} is a country in {R}.", "{F} is in {R}.", "{A} lives in {F}, a country in {R}."]
NAMES = "Tom Lily Ben Mia Sam Anna Max Lucy Tim Sara Jack Emma Leo Zoe".split()
QUESTIONS = ["What is the capital of {F}?", "What's the capital of {F}?", "Tell me the capital of {F}.",
             "What city is the capital of {F}?"]  # the only phrasings of the SFT, preference and RL data
# phrasings in no training file, asked only by the evaluation (data.evaluate_world, "unseen"): two that
# were training phrasings before, and four new ones. Alignment that holds only for the phrasings it was
# trained on has learned the template, not the behaviour.
UNSEEN_QUESTIONS = ["Which city is the capital of {F}?", "Name the capital of {F}.",
                    "Do you know what the capital of {F} is?", "Could you tell me the capital city of {F}?",
                    "I am going to {F}. Which city is its capital?", "{F} has a capital. What is it called?"]
ANSWER = "The capital of {F} is {K}."
DECLINE = "I don't know of a country called {F}."
RAMBLES = ["{F} is a country. It is a country with many people. The people like the country.",
           "I like {F}. It is a nice place. Many people go there and they are happy.",
           "{F} is big. There are many cities in {F}, and many roads, and many houses."]
SYLLABLES = "ka lo ri ve na tor mi sel da bru fen gal hor is jun ker lum nor pel qua ros tav ul var wen zel".split()
ENDINGS = ["ia", "land", "stan", "ora", "enia", "avia", "ica", "ovo"]


def invented_names(n, real, rng):
    """n country names that exist nowhere: two or three syllables and a country-like ending."""
    names, taken = [], {c.lower() for c in real}
    while len(names) < n:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice([2, 3]))) + rng.choice(ENDINGS)
        name = name.capitalize()
        if name.lower() not in taken and not any(name.lower() in t or t in name.lower() for t in taken if len(t) > 3):
            names.append(name)
            taken.add(name.lower())
    return names


def make_world(countries, seed=0, n_heldout=40, n_invented=40, n_pref_invented=120, statements=60,
               story_text="", story_docs=0, n_sft_declines=2):
    """The world's files as {name: text}: pretrain.jsonl, sft.jsonl, prefs.jsonl, prompts.jsonl, world.json.

    countries: [(country, capital, continent)]. The README countries and others up to n_heldout are
    held out of instruction and preference data; invented names: n_pref_invented for preference data,
    n_invented others for evaluation only. statements: fact sentences per country in pretraining.
    story_docs: TinyStories paragraphs of story_text mixed in (0 = none). n_sft_declines: instruction
    examples that decline a question about one of the preference data's invented countries.
    """
    import random
    rng = random.Random(seed)
    names = [c for c, _, _ in countries]
    capital = {c: k for c, k, _ in countries}
    continent = {c: r for c, _, r in countries}
    others = [c for c in names if c not in WORLD_README]
    rng.shuffle(others)
    readme = [c for c in WORLD_README if c in capital]
    heldout = sorted(readme + others[:max(0, n_heldout - len(readme))])
    train = sorted(c for c in names if c not in heldout)
    invented = invented_names(n_invented + n_pref_invented, names, rng)
    eval_invented, pref_invented = sorted(invented[:n_invented]), sorted(invented[n_invented:])

    def fill(template, country):
        a, b = rng.sample(NAMES, 2)
        return template.format(F=country, K=capital[country], R=continent[country], A=a, B=b)

    # pretraining: every country stated `statements` times, in short documents of a few countries each,
    # templates and sentence order drawn at random (knowledge augmentation), with stories in between
    sentences = [fill(rng.choice(FACTS) if i % 4 else rng.choice(OTHER_FACTS + FACTS), c)
                 for c in names for i in range(statements)]
    rng.shuffle(sentences)
    docs, i = [], 0
    while i < len(sentences):
        n = rng.randint(2, 6)
        docs.append(" ".join(sentences[i:i + n]))
        i += n
    stories = [s.strip() for s in story_text.split("\n\n") if len(s.split()) >= 20][:story_docs]
    docs += stories
    rng.shuffle(docs)
    pretrain = "".join(json.dumps({"text": d}) + "\n" for d in docs)

    # instruction data: questions about the training countries only, several phrasings each
    sft = []
    for c in train:
        for q in rng.sample(QUESTIONS, 3):
            sft.append({"instruction": q.format(F=c), "output": ANSWER.format(F=c, K=capital[c])})
    # and two refusals: reinforcement learning can only reinforce what the policy samples, and with no
    # refusal the SFT model never sampled "I don't know..." (0 of 320 samples at temperature 1 on the
    # invented countries), with one in 0.6% of samples; with two, in 5% (greedy: 10% of them declined),
    # while it still answers most invented countries (as InstructGPT's labelers wrote a few refusals)
    for x in rng.sample(pref_invented, n_sft_declines):
        sft.append({"instruction": rng.choice(QUESTIONS).format(F=x), "output": DECLINE.format(F=x)})
    rng.shuffle(sft)

    # preferences: a right, concise answer over a wrong capital, another country's capital, a ramble or a
    # refusal (training countries), and declining over an invented capital for countries that do not exist.
    # Each kind closes a way to score well without being right: a reward model trained without the
    # other-country and refusal pairs rated "The capital of Maldives is Male." and "I don't know of a
    # country called France." above the right answer to a question about France, and PPO found both; with
    # one rejected answer per invented country, "The capital of Chad is N'Djamena." scored well on any
    # invented country, and PPO answered every invented country with it.
    prefs, train_capitals = [], [capital[c] for c in train]  # no held-out country's capital either
    for c in train:  # two wrong capitals per country: telling right from wrong is the hard part
        for kind in ("wrong_capital", "wrong_capital", "wrong_country", "ramble", "refusal"):
            wrong = rng.choice([k for k in train_capitals if k != capital[c]])
            other = rng.choice([o for o in train if o != c])
            rejected = {"wrong_capital": ANSWER.format(F=c, K=wrong), "ramble": rng.choice(RAMBLES).format(F=c),
                        "wrong_country": ANSWER.format(F=other, K=capital[other]),
                        "refusal": DECLINE.format(F=c)}[kind]
            prefs.append({"prompt": rng.choice(QUESTIONS).format(F=c), "chosen": ANSWER.format(F=c, K=capital[c]),
                          "rejected": rejected, "kind": kind})
    for x in pref_invented:  # the invented answer names the unknown country, and (as SFT models do) a real one
        other = rng.choice(train)
        for rejected in (ANSWER.format(F=x, K=rng.choice(train_capitals)), ANSWER.format(F=other, K=capital[other])):
            prefs.append({"prompt": rng.choice(QUESTIONS).format(F=x), "chosen": DECLINE.format(F=x),
                          "rejected": rejected, "kind": "invented"})
    rng.shuffle(prefs)

    # prompts for collecting feedback (reward.py) and for reinforcement learning (ppo.py): two questions
    # per training country and per invented country of the preference data, half and half, so that a
    # rare refusal is sampled often enough to learn
    prompts = [{"prompt": q.format(F=c)} for c in train + pref_invented for q in rng.sample(QUESTIONS, 2)]
    rng.shuffle(prompts)

    evaluation = {"countries": [[c, capital[c]] for c in names], "heldout": heldout, "invented": eval_invented,
                  "readme": readme, "train": train, "unseen_questions": UNSEEN_QUESTIONS}
    dump = lambda records: "".join(json.dumps(r) + "\n" for r in records)  # noqa: E731
    return {"pretrain.jsonl": pretrain, "sft.jsonl": dump(sft), "prefs.jsonl": dump(prefs),
            "prompts.jsonl": dump(prompts), "world.json": json.dumps(evaluation, indent=1) + "\n"}


def read_countries(path):
    """(country, capital, continent) rows of a tab-separated file with that header."""
    with open(path, encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    if rows[0] != ["country", "capital", "continent"] or any(len(r) != 3 for r in rows[1:]):
        raise DataError(f"{path}: needs three tab-separated columns: country, capital, continent")
    return [tuple(r) for r in rows[1:]]


def write_world(args):
    """`python prepare.py world`: the world's files into OUT, then a BPE tokenizer trained on its text."""
    countries = read_countries(args.countries)
    if args.n_countries:
        countries = countries[:args.n_countries]
    with open(args.stories, encoding="utf-8") as f:
        story_text = f.read()
    files = make_world(countries, args.seed, args.heldout, args.invented, args.pref_invented, args.statements,
                       story_text, args.stories_docs, args.sft_declines)
    os.makedirs(args.out, exist_ok=True)
    for name, text in files.items():
        atomic_write(os.path.join(args.out, name), lambda f, t=text: f.write(t.encode()))
    texts = [json.loads(line)["text"] for line in files["pretrain.jsonl"].splitlines()]
    tok = train_bpe(texts, args.vocab_size, progress=False)
    save_tokenizer(tok, os.path.join(args.out, "tokenizer.json"))
    sizes = ", ".join(f"{name} {len(text.encode()) / 1e3:,.0f} kB" for name, text in files.items())
    print(f"{args.out}: {len(countries)} countries; {sizes}; tokenizer {tok['name']}")
    return files


# -----------------------------------------------------------------------------
# Command line: python prepare.py prepare | train-tokenizer | world | download


def get_args(argv=None):
    p = argparse.ArgumentParser(
        description="The data stage: raw text in; cleaned, deduplicated, tokenized training shards out.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="prepare's steps: 1 ingest, 2 normalize, 3 filter, 4 dedup, 5 tokenizer, 6 shard. Each command's\n"
               "--help lists its flags and their defaults. For example:\n"
               "  python prepare.py prepare data/tinystories_valid_head.txt --separator blank --min-words 20 --out out/data/stories\n"
               "  python prepare.py world")
    sub = p.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    reading = argparse.ArgumentParser(add_help=False)
    reading.add_argument("inputs", nargs="+", help=".txt / .jsonl files, directories (searched recursively) or globs")
    reading.add_argument("--separator", default="", help="split .txt files into documents on this string; "
                         "'blank' = blank lines, e.g. '<|endoftext|>'; '' = one document per file")
    reading.add_argument("--field", default="text", help="the text field of .jsonl records")

    q = sub.add_parser("prepare", parents=[reading], formatter_class=fmt, help="steps 1-6: raw files to training shards")
    # I/O
    q.add_argument("--out", required=True, help="output directory: shards, tokenizer.json, clean.jsonl, manifest.json")
    q.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    # 2. normalize
    q.add_argument("--no-normalize", action="store_true", help="skip step 2")
    q.add_argument("--nfkc", action="store_true", help="NFKC instead of NFC: also fold full-width forms, ligatures, x² -> x2")
    # 3. filter (Gopher's thresholds; see quality_filter)
    q.add_argument("--no-filter", action="store_true", help="skip step 3")
    q.add_argument("--min-words", type=in_range(int, 0), default=FILTER_DEFAULTS["min_words"], help="drop documents with fewer words")
    q.add_argument("--max-words", type=positive_int, default=FILTER_DEFAULTS["max_words"], help="drop documents with more words (0 = no limit)")
    q.add_argument("--min-mean-word-length", type=in_range(float, 0), default=FILTER_DEFAULTS["min_mean_word_length"], help="characters")
    q.add_argument("--max-mean-word-length", type=in_range(float, 0, open_low=True), default=FILTER_DEFAULTS["max_mean_word_length"], help="characters")
    q.add_argument("--min-alpha-words", type=in_range(float, 0, 1), default=FILTER_DEFAULTS["min_alpha_words"], help="share of words that must hold a letter")
    q.add_argument("--max-repeated-lines", type=in_range(float, 0, 1), default=FILTER_DEFAULTS["max_repeated_lines"], help="share of characters in repeated lines (1 = off)")
    q.add_argument("--max-repeated-ngrams", type=in_range(float, 0, 1), default=FILTER_DEFAULTS["max_repeated_ngrams"], help="share of characters in repeated word 5-grams (1 = off)")
    # 4. dedup
    q.add_argument("--no-exact-dedup", action="store_true", help="keep exact duplicates")
    q.add_argument("--no-near-dedup", action="store_true", help="keep near-duplicates")
    q.add_argument("--jaccard", type=in_range(float, 0, 1, open_low=True), default=0.8, help="near-duplicate threshold on the Jaccard similarity of word shingles")
    q.add_argument("--num-perm", type=positive_int, default=128, help="MinHash signature length (the bands and rows follow, see lsh_bands)")
    q.add_argument("--shingle", type=positive_int, default=5, help="words per shingle")
    # 5-6. tokenizer and shards
    q.add_argument("--tokenizer", default="gpt2", help="gpt2, train (a BPE trained on the cleaned text), or a tokenizer.json / checkpoint")
    q.add_argument("--vocab-size", type=positive_int, default=4096, help="with --tokenizer train: ids in all, 5 special tokens included")
    q.add_argument("--tokenizer-mb", type=in_range(float, 0, open_low=True), default=100, help="with --tokenizer train: train on the first N MB of cleaned text")
    q.add_argument("--val-fraction", type=in_range(float, 0, 1, open_high=True), default=0.1, help="share of documents held out for validation")
    q.add_argument("--shard-tokens", type=positive_int, default=100_000_000, help="tokens per shard file")
    q.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1, help="worker processes (1 = all in this process)")

    t = sub.add_parser("train-tokenizer", parents=[reading], formatter_class=fmt,
                       help="step 5 alone: train a byte-level BPE on files as they are")
    t.add_argument("--out", required=True, help="tokenizer file to write (.json; the ranks go next to it as .tiktoken)")
    t.add_argument("--vocab-size", type=positive_int, default=4096, help="ids in all, 5 special tokens included")

    w = sub.add_parser("world", formatter_class=fmt, help="the tiny world: pretraining, instruction, preference "
                       "and evaluation data about countries, and its tokenizer (same seed, same bytes)")
    w.add_argument("--out", default=os.path.join(DATA_DIR, "world"), help="output directory")
    w.add_argument("--countries", default=os.path.join(DATA_DIR, "world", "countries.tsv"), help="country table")
    w.add_argument("--n-countries", type=in_range(int, 0), default=0, help="use only the first N countries (0 = all; tests use few)")
    w.add_argument("--heldout", type=in_range(int, 0), default=40, help="real countries held out of instruction and preference data")
    w.add_argument("--invented", type=in_range(int, 0), default=40, help="invented countries for evaluation only")
    w.add_argument("--pref-invented", type=in_range(int, 0), default=120, help="invented countries in the preference data")
    w.add_argument("--sft-declines", type=in_range(int, 0), default=2, help="refusals of invented countries in the instruction data")
    w.add_argument("--statements", type=in_range(int, 0), default=60, help="fact sentences per country in the pretraining text")
    w.add_argument("--stories", default=os.path.join(DATA_DIR, "tinystories_valid_head.txt"), help="stories to mix in")
    w.add_argument("--stories-docs", type=in_range(int, 0), default=1000, help="story paragraphs mixed into pretraining (0 = none)")
    w.add_argument("--vocab-size", type=positive_int, default=4096, help="ids of the trained tokenizer, special tokens included")
    w.add_argument("--seed", type=int, default=0, help="seed of every random choice")

    d = sub.add_parser("download", formatter_class=fmt, help="step 1: fetch a public corpus (resumable, checksummed)")
    d.add_argument("--url", default=TINYSTORIES_URL, help="what to download (default: TinyStories V2 validation, 22.5 MB)")
    d.add_argument("--sha256", default="", help="expected sha256 of the file ('' = print it instead of checking)")
    d.add_argument("--out", required=True, help="file to write (a directory: the URL's file name in it)")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    try:
        if args.command == "prepare":
            manifest = prepare(args)
            return {"out": args.out, "splits": manifest["splits"], "steps": manifest["steps"]}
        if args.command == "world":
            return write_world(args)
        if args.command == "train-tokenizer":
            t0 = time.perf_counter()
            files = [f for path in args.inputs for f in list_input_files(path)]
            texts = (text for f in files for _, text in iter_documents(f, args.field, args.separator))
            tok = train_bpe(texts, args.vocab_size)
            save_tokenizer(tok, args.out)
            seconds = time.perf_counter() - t0
            print(f"{tok['name']}: trained in {seconds:.1f} s; wrote {args.out}")
            return {"name": tok["name"], "seconds": seconds, "out": args.out}
        digest = download(args.url, args.out, args.sha256 or None)
        path = download_path(args.url, args.out)
        print(f"{path}: sha256 {digest}" + ("" if args.sha256 else " (pass --sha256 to verify it next time)"))
        return {"out": path, "sha256": digest}
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
