"""A domain vocabulary: the source tokenizer plus new tokens learned from the user's own corpus.

The new tokens are BPE merges appended after the source's own (``learn``), chosen one at a time by the tokens
they save on the training split (the most frequent adjacent pair under the current tokenization, exactly as BPE
training itself chooses), then counted on the dev split. Three kinds, by what the merged token spells:

* ``words``: pieces of one word (``' endot' + 'ra'``); unseen words that share the pieces use them too.
* ``numbers``: anything with a digit: digit groups inside one pre-token (``' 2009'`` from ``' '`` ``'2'`` ``'0'``
  ``'0'`` ``'9'``) and decimals listed as numeric units (``' 0.001'``, which the source splits in three
  pre-tokens).
* ``phrases``: two or more whole words (``' of the'``, and hyphenated compounds: ``' follow-up'``).

With ``kinds=[words]`` nothing crosses a source pre-token, so the pre-tokenizer is the source's and llama.cpp (whose
pre-tokenizers are fixed per model family) tokenizes the exported GGUF as Hugging Face does; numbers and phrases
need the pre-tokenizer below, which llama.cpp cannot express.

Phrases and decimals cross the source's pre-token boundaries, so the domain tokenizer's pre-tokenizer isolates
the listed units first: the source's split regex with ``(?:' of the'|' 0.001'|…)(?![\\p{L}\\p{N}])`` put before
it. The look-ahead means a unit never fires inside a longer word or number (``' of theory'`` keeps ``' of'``
``' theory'``). Merges rank after every source merge and the units are only those whose source pieces equal
the pieces of their words, so text that contains none of the new tokens' strings tokenizes exactly as under the
source. A source without a split regex (SentencePiece: the whole text is one pre-token) gets words and numbers
but no units (``reasons`` says so).

Used by stage ``domain_vocab`` (``tokalign/stages/domain_vocab.py``); ``python scripts/bench_domain_vocab.py``
measures it.
"""

from __future__ import annotations

import heapq
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

from tokalign.errors import TokalignError

KINDS = ("words", "numbers", "phrases")
BOUNDARY = r"(?![\p{L}\p{N}])"  # a unit ends where no letter or digit follows
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
WORD_GRAM = re.compile(r"(?:^| )[^\W\d_]+")  # a pre-token that is one word after a space
DECIMAL = re.compile(r"(?: [<>=≤≥])? ?\d+(?:[.,]\d+)*%|(?: [<>=≤≥])? ?\d+(?:[.,]\d+)+")  # ' 0.001', ' < 0.05', ' 95%'
PUNCT_WORD = re.compile(r"[.,;:] [^\W\d_]+")  # a phrase unit across punctuation: '. The', ', and'
HYPHENATED = re.compile(r"(?:^| )[^\W\d_]+(?:-[^\W\d_]+)+")  # a phrase unit: follow-up, non-small-cell
SPACE_MARKS = ("Ġ", "▁", " ")


class DomainVocabError(TokalignError, ValueError):
    """The corpus or the ``domain_vocab`` settings cannot give a vocabulary (one line, naming the key)."""


# ----------------------------------------------------------------------------------------------------------------------
# the source tokenizer's pieces


def backend_json(tokenizer: Any) -> dict:
    return json.loads(tokenizer.backend_tokenizer.to_str())


def split_regex(pre: Optional[dict]) -> Optional[str]:
    """The regex that cuts text into pre-tokens: a ``Split`` pre-tokenizer's, or byte-level's own (GPT-2's)."""
    if not pre:
        return None
    if pre.get("type") == "Sequence":
        for p in pre.get("pretokenizers", []):
            r = split_regex(p)
            if r:
                return r
        return None
    if pre.get("type") == "Split" and pre.get("behavior") == "Isolated" and "Regex" in pre.get("pattern", {}):
        return pre["pattern"]["Regex"]
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return GPT2_SPLIT
    return None


def splits_digits(pre: Optional[dict]) -> bool:
    """The source cuts every digit into a pre-token of its own (``Digits(individual_digits=True)``, as in SmolLM2's
    ``tokenizer.json`` on the hub; the tokenizer read from its GGUF has none): no digit group can be one token."""
    if not pre:
        return False
    if pre.get("type") == "Sequence":
        return any(splits_digits(p) for p in pre.get("pretokenizers", []))
    return pre.get("type") == "Digits" and bool(pre.get("individual_digits"))


def with_units(pre: dict, units: Sequence[str]) -> dict:
    """The pre-tokenizer with ``units`` isolated before the source's own split (longest first)."""
    alt = "|".join(re.escape(u) for u in sorted(units, key=lambda u: (-len(u), u)))

    def patch(p: dict) -> dict:
        if p.get("type") == "Sequence":
            return {**p, "pretokenizers": [patch(q) for q in p["pretokenizers"]]}
        if p.get("type") == "Split" and p.get("behavior") == "Isolated" and "Regex" in p.get("pattern", {}):
            return {**p, "pattern": {"Regex": f"(?:{alt}){BOUNDARY}|{p['pattern']['Regex']}"}}
        if p.get("type") == "ByteLevel" and p.get("use_regex", True):
            split = {"type": "Split", "pattern": {"Regex": f"(?:{alt}){BOUNDARY}|{GPT2_SPLIT}"},
                     "behavior": "Isolated", "invert": False}
            return {"type": "Sequence", "pretokenizers": [split, {**p, "use_regex": False}]}
        return p

    return patch(pre) if units else pre


def _backend(tokenizer_json: dict) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(json.dumps(tokenizer_json))


class Pieces:
    """Pre-tokens of texts (in the BPE model's alphabet) and their pieces under a tokenizer's own merges."""

    def __init__(self, tokenizer_json: dict):
        self.backend = _backend(tokenizer_json)
        self.has_split = split_regex(tokenizer_json.get("pre_tokenizer")) is not None
        self._cache: dict[str, tuple[str, ...]] = {}

    def pretokens(self, text: str) -> list[tuple[str, tuple[int, int]]]:
        bt = self.backend
        norm = bt.normalizer.normalize_str(text) if bt.normalizer else text
        if bt.pre_tokenizer is not None:
            return bt.pre_tokenizer.pre_tokenize_str(norm)
        # no pre-tokenizer (SentencePiece): count within words, a word starting at its space mark
        return [(m.group(), m.span()) for m in re.finditer(r"▁?[^▁]+|▁+", norm)]

    def pieces(self, pretoken: str) -> tuple[str, ...]:
        got = self._cache.get(pretoken)
        if got is None:
            got = self._cache[pretoken] = tuple(t.value for t in self.backend.model.tokenize(pretoken))
        return got

    def count(self, texts: Iterable[str]) -> Counter:
        """How often each pre-token occurs."""
        c: Counter = Counter()
        for t in texts:
            c.update(p for p, _ in self.pretokens(t))
        return c


# ----------------------------------------------------------------------------------------------------------------------
# candidates that cross pre-tokens: phrases and decimals


def unit_candidates(texts: Iterable[str], kinds: Sequence[str], max_phrase_words: int, keep: int) -> dict[str, str]:
    """Raw strings to isolate as one pre-token, ``{text: kind}``: the ``keep`` most frequent word n-grams
    (2..``max_phrase_words`` words, each after one space) and decimals, each followed by a boundary."""
    counts: dict[str, Counter] = {"phrases": Counter(), "numbers": Counter(), "words": Counter()}
    for t in texts:
        if "phrases" in kinds:
            words = [m for m in WORD_GRAM.finditer(t)]
            for i in range(len(words)):
                for n in range(2, max_phrase_words + 1):
                    if i + n > len(words):
                        break
                    run = words[i:i + n]
                    if any(run[k].end() != run[k + 1].start() for k in range(n - 1)) or not run[0].group().startswith(" "):
                        break
                    end = run[-1].end()
                    if end < len(t) and (t[end].isalnum()):
                        break
                    counts["phrases"][t[run[0].start():end]] += 1
        for kind, pattern in (("numbers", DECIMAL), ("phrases", HYPHENATED), ("phrases", PUNCT_WORD)):
            if kind in kinds:
                for m in pattern.finditer(t):
                    e = m.end()
                    if e >= len(t) or not t[e].isalnum():
                        counts[kind][m.group()] += 1
    out: dict[str, str] = {}
    for kind, c in counts.items():
        for s, n in c.most_common(keep):
            if n >= 2:
                out[s] = kind
    return out


def consistent_units(source_json: dict, units: dict[str, str]) -> dict[str, str]:
    """The units whose pieces under the source's merges, isolated, equal the pieces the source gives them
    (so isolating them changes nothing until a new merge fires)."""
    src = Pieces(source_json)
    iso = Pieces({**source_json, "pre_tokenizer": with_units(source_json["pre_tokenizer"], list(units))})
    keep = {}
    for u, kind in units.items():
        parts = iso.pretokens(u)
        if len(parts) != 1:
            continue
        if iso.pieces(parts[0][0]) == tuple(p for q, _ in src.pretokens(u) for p in src.pieces(q)):
            keep[u] = kind
    return keep


# ----------------------------------------------------------------------------------------------------------------------
# BPE continued


def kind_of(a: str, b: str) -> str:
    """What the merge of pieces ``a`` and ``b`` spells: a number (a digit), a phrase (a space mark inside, or a
    hyphen next to a letter: part of a hyphenated unit), or a word."""
    s = a + b
    if any(ch.isdigit() for ch in s):
        return "numbers"
    if any(m in s[1:] for m in SPACE_MARKS) or re.search(r"[^\W\d_]-|-[^\W\d_]", s):
        return "phrases"
    return "words"


class Corpus:
    """Distinct pre-tokens as piece lists with counts, and an index from each adjacent pair to where it occurs:
    merging a pair touches only the pre-tokens that hold it."""

    def __init__(self, counts: Counter, pieces: Pieces):
        self.words = [list(pieces.pieces(p)) for p in counts]
        self.freq = list(counts.values())
        self.pairs: Counter = Counter()
        self.where: dict[tuple[str, str], set[int]] = defaultdict(set)
        for i, w in enumerate(self.words):
            self._add(i, w, 1)

    def _add(self, i: int, w: list[str], sign: int) -> None:
        f = self.freq[i] * sign
        for pair in zip(w, w[1:]):
            self.pairs[pair] += f
            if sign > 0:
                self.where[pair].add(i)

    def merge(self, pair: tuple[str, str]) -> int:
        """Apply one merge everywhere; returns the tokens it saved (``touched``: the pairs of the changed pieces)."""
        a, b = pair
        saved = 0
        self.touched: set[tuple[str, str]] = set()
        for i in list(self.where.pop(pair, ())):
            w = self.words[i]
            out, j, n = [], 0, 0
            while j < len(w):
                if j + 1 < len(w) and w[j] == a and w[j + 1] == b:
                    out.append(a + b)
                    j, n = j + 2, n + 1
                else:
                    out.append(w[j])
                    j += 1
            if n:
                self._add(i, w, -1)
                self.words[i] = out
                self._add(i, out, 1)
                self.touched.update(zip(out, out[1:]))
                saved += n * self.freq[i]
        self.pairs.pop(pair, None)
        return saved

    def tokens(self) -> int:
        return sum(len(w) * f for w, f in zip(self.words, self.freq))


@dataclass
class Merge:
    a: str
    b: str
    kind: str
    saved_train: int
    saved_dev: int = 0


def learn(train: Corpus, size: int, kinds: Sequence[str], min_freq: int, taken: set[str]) -> list[Merge]:
    """Up to ``size`` merges, each the allowed pair that saves the most tokens on ``train`` now (at least
    ``min_freq``); a pair whose merged string is already a token (``taken``) is skipped."""
    heap = [(-n, p) for p, n in train.pairs.items() if n >= min_freq]
    heapq.heapify(heap)
    merges: list[Merge] = []
    while heap and len(merges) < size:
        neg, pair = heapq.heappop(heap)
        now = train.pairs.get(pair, 0)
        if now != -neg:  # stale: re-queue with its current count
            if now >= min_freq:
                heapq.heappush(heap, (-now, pair))
            continue
        kind = kind_of(*pair)
        if kind not in kinds or pair[0] + pair[1] in taken:
            continue
        merges.append(Merge(pair[0], pair[1], kind, train.merge(pair)))
        taken.add(pair[0] + pair[1])
        for p in train.touched:  # pairs the merge created (and old ones, whose stale entries are re-queued)
            if train.pairs.get(p, 0) >= min_freq:
                heapq.heappush(heap, (-train.pairs[p], p))
    return merges


def replay(corpus: Corpus, merges: Sequence[Merge]) -> list[int]:
    """Tokens each merge saves on another split, merges applied in order."""
    return [corpus.merge((m.a, m.b)) for m in merges]


# ----------------------------------------------------------------------------------------------------------------------
# the whole build


@dataclass
class Built:
    tokenizer_json: dict
    merges: list[Merge]
    units: dict[str, str]  # isolated unit -> kind
    reasons: list[str] = field(default_factory=list)  # kinds asked for that this source cannot have


def build(source_json: dict, train_texts: Sequence[str], dev_texts: Sequence[str], *, size: int, min_freq: int,
          kinds: Sequence[str], max_phrase_words: int) -> Built:
    """The domain tokenizer's ``tokenizer.json`` and the merges it added, counted on train and dev."""
    if source_json.get("model", {}).get("type") != "BPE":
        raise DomainVocabError(f"target_tokenizer=domain: the source tokenizer is {source_json.get('model', {}).get('type')}, "
                               "expected BPE (byte-level or SentencePiece-converted)")
    reasons: list[str] = []
    units: dict[str, str] = {}
    if "numbers" in kinds and splits_digits(source_json.get("pre_tokenizer")):
        kinds = [k for k in kinds if k != "numbers"]
        reasons.append("numbers: the source splits every digit into a pre-token of its own (a Digits pre-tokenizer), "
                       "so no digit group can become one token")
    if split_regex(source_json.get("pre_tokenizer")) is not None:
        units = consistent_units(source_json, unit_candidates(train_texts, kinds, max_phrase_words, keep=2 * size))
    elif "phrases" in kinds:
        reasons.append("phrases: the source has no split pre-tokenizer (SentencePiece), so no unit can be isolated")
    tj = {**source_json, "pre_tokenizer": with_units(source_json["pre_tokenizer"], list(units))}
    pieces = Pieces(tj)
    train = Corpus(pieces.count(train_texts), pieces)
    merges = learn(train, size, kinds, min_freq, set(source_json["model"]["vocab"]))
    if not merges:
        raise DomainVocabError(f"domain_vocab.min_freq={min_freq}: no pair of pieces of kinds {list(kinds)} occurs that "
                               f"often in the {len(train_texts)} training documents (expected a lower min_freq or a "
                               "larger corpus)")
    for m, n in zip(merges, replay(Corpus(pieces.count(dev_texts), pieces), merges)):
        m.saved_dev = n
    final = extend(source_json, merges, [])
    units = used_units(final, units)
    return Built(extend(source_json, merges, list(units)), merges, units, reasons)


def extend(source_json: dict, merges: Sequence[Merge], units: Sequence[str]) -> dict:
    """``tokenizer.json`` with the merges' tokens appended to the vocabulary, the merges after the source's
    and the units isolated by the pre-tokenizer."""
    tj = json.loads(json.dumps(source_json))
    vocab, model = tj["model"]["vocab"], tj["model"]
    next_id = max([*vocab.values(), *(t["id"] for t in tj.get("added_tokens", []))]) + 1
    as_lists = bool(model["merges"]) and isinstance(model["merges"][0], list)
    for m in merges:
        vocab[m.a + m.b] = next_id
        next_id += 1
        model["merges"].append([m.a, m.b] if as_lists else f"{m.a} {m.b}")
    tj["pre_tokenizer"] = with_units(source_json["pre_tokenizer"], units)
    return tj


def used_units(final_json: dict, units: dict[str, str]) -> dict[str, str]:
    """The units a new merge joins across their pre-tokens (the others tokenize the same isolated or not)."""
    if not units:
        return {}
    plain = Pieces(final_json)
    iso = Pieces({**final_json, "pre_tokenizer": with_units(final_json["pre_tokenizer"], list(units))})
    keep = {}
    for u, kind in units.items():
        joined = iso.pieces(iso.pretokens(u)[0][0])
        if len(joined) < len([p for q, _ in plain.pretokens(u) for p in plain.pieces(q)]):
            keep[u] = kind
    return keep


def to_hf(source_tokenizer: Any, tokenizer_json: dict) -> Any:
    """A transformers fast tokenizer: the source's settings and special tokens, this ``tokenizer.json``."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=_backend(tokenizer_json))
    for k in ("bos_token", "eos_token", "unk_token", "pad_token"):
        v = getattr(source_tokenizer, k, None)
        if v is not None:
            setattr(tok, k, v)
    tok.chat_template = getattr(source_tokenizer, "chat_template", None)
    tok.add_bos_token = getattr(source_tokenizer, "add_bos_token", False)
    tok.model_max_length = source_tokenizer.model_max_length
    return tok
