"""Stage ``terms``: the corpus's top domain terms and how many tokens each tokenizer spends on them.

Terms are lower-cased words (letters, digits, hyphens; at least 3 characters) seen at least
``terms.min_freq`` times, ranked by frequency or by tf-idf (document frequency taken from
``terms.reference``, a general-domain corpus, when given; else from the corpus's own documents).
Writes ``terms.json``: the ranked terms with their counts and their token counts under both
tokenizers (each encoded as a word after a space, as it appears mid-sentence).

Run alone:  python -m tokalign terms.scoring=frequency terms.top_k=2000   (cached like every stage)
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

from tokalign import refs
from tokalign.artifacts import iter_records, training_docs
from tokalign.config import Config
from tokalign.context import Context

WORD = re.compile(r"[a-z][a-z0-9\-]{2,}")


def doc_words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def mine(texts: list[str], *, top_k: int, min_freq: int, scoring: str, reference: list[str] | None = None) -> list[dict]:
    """Ranked terms: [{"term", "count", "score"}], best first."""
    tf: Counter = Counter()
    df: Counter = Counter()
    for t in texts:
        words = doc_words(t)
        tf.update(words)
        if reference is None:
            df.update(set(words))
    n_docs = len(texts)
    if reference is not None:
        for t in reference:
            df.update(set(doc_words(t)))
        n_docs = len(reference)
    scored = []
    for w, c in tf.items():
        if c < min_freq:
            continue
        score = float(c) if scoring == "frequency" else c * math.log((1 + n_docs) / (1 + df[w]))
        scored.append({"term": w, "count": c, "score": round(score, 4)})
    scored.sort(key=lambda r: (-r["score"], r["term"]))
    return scored[:top_k]


def tokens_per_term(tok, terms: list[str]) -> list[int]:
    enc = tok([" " + t for t in terms], add_special_tokens=False)["input_ids"]
    return [len(e) for e in enc]


def run(cfg: Config, ctx: Context, out: Path) -> dict:
    texts = [d["text"] for d in training_docs(ctx.path("corpus"))]
    reference = None
    if cfg.terms.reference:
        reference = [t for _, t in iter_records(cfg.terms.reference, cfg.corpus_text_field)]
    terms = mine(texts, top_k=cfg.terms.top_k, min_freq=cfg.terms.min_freq, scoring=cfg.terms.scoring,
                 reference=reference)
    if not terms:
        (out / "terms.json").write_text(json.dumps({"terms": []}))
        return {"terms/count": 0}
    src = refs.load_tokenizer(str(ctx.path("source") / "model"))
    tgt = refs.load_tokenizer(str(ctx.path("tokenize") / "target_tokenizer"))
    words = [t["term"] for t in terms]
    for t, s, g in zip(terms, tokens_per_term(src, words), tokens_per_term(tgt, words)):
        t["source_tokens"], t["target_tokens"] = s, g
    mean = lambda k: sum(t[k] for t in terms) / len(terms)  # noqa: E731
    result = {"scoring": cfg.terms.scoring, "reference": cfg.terms.reference, "terms": terms,
              "tokens_per_term": {"source": mean("source_tokens"), "target": mean("target_tokens")}}
    (out / "terms.json").write_text(json.dumps(result, indent=1))
    (ctx.run_dir / "terms.json").write_text(json.dumps(result, indent=1))
    ctx.tracker.table("terms", ["term", "count", "score", "source_tokens", "target_tokens"],
                      [[t["term"], t["count"], t["score"], t["source_tokens"], t["target_tokens"]] for t in terms[:200]])
    return {"terms/count": len(terms), "terms/tokens_per_term/source": round(mean("source_tokens"), 4),
            "terms/tokens_per_term/target": round(mean("target_tokens"), 4)}
