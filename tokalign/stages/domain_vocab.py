"""Stage ``domain_vocab`` (only with ``target_tokenizer=domain``): the source tokenizer plus ``domain_vocab.size`` new
tokens learned from the training split (``tokalign/domain_vocab.py``: BPE merges after the source's, words,
numbers and phrases), counted on the dev split and on the evaluation text.

Writes ``tokenizer/`` (a Hugging Face tokenizer folder; stage ``tokenize`` takes it as the target, so every later
stage uses it), ``report.json`` (new tokens per kind, the top candidates with the tokens each saves on train and
dev, savings per kind on train/dev/evaluation text, tokens per document before and after, examples split before
and after) and ``domain_vocab_savings.png`` (the evaluation text's tokens saved against the number of new tokens).

Run alone:  python -m tokalign experiment=domain_vocab   (the pipeline caches this stage)
"""

from __future__ import annotations

import logging
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tokalign import domain_vocab as D
from tokalign import refs
from tokalign.artifacts import read_texts, training_docs, write_json
from tokalign.config import Config
from tokalign.context import Context

log = logging.getLogger("tokalign")

TERM = re.compile(r"[a-z][a-z\-]{4,}")  # a domain term: a lower-case word of 5 letters or more
TERMS = 500  # the most frequent training-split terms whose tokens are counted


def _terms(texts: Sequence[str]) -> list[str]:
    c: Counter = Counter(w for t in texts for w in TERM.findall(t.lower()))
    return [w for w, _ in c.most_common(TERMS)]


def _count(tok: Any, texts: Sequence[str]) -> int:
    return sum(len(tok(t, add_special_tokens=False).input_ids) for t in texts)


def _per_kind(saved: Sequence[int], merges: Sequence[D.Merge], total: int) -> dict[str, float]:
    by: Counter = Counter()
    for m, n in zip(merges, saved):
        by[m.kind] += n
    return {k: by[k] / max(total, 1) for k in D.KINDS}


def _examples(src: Any, tok: Any, built: D.Built, k: int = 4) -> list[dict]:
    """The ``k`` new tokens of each kind that save the most on the training split and are one token on their own
    (a piece of a longer unit, ``'0.'`` of ``' 0.05'``, is not), as the source and the domain tokenizer split them."""
    rows = []
    for kind in D.KINDS:
        shown = 0
        for m in sorted((m for m in built.merges if m.kind == kind), key=lambda m: -m.saved_train):
            text = tok.convert_tokens_to_string([m.a + m.b])
            if shown < k and len(tok.tokenize(text)) == 1 < len(src.tokenize(text)):
                rows.append({"kind": kind, "text": text, "source": src.tokenize(text), "domain": tok.tokenize(text),
                             "saved_train": m.saved_train})
                shown += 1
    return rows


def _plot(path: Path, curves: dict[str, np.ndarray]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, share in curves.items():
        ax.plot(np.arange(1, len(share) + 1), 100 * share, label=name)
    ax.set_xlabel("new tokens")
    ax.set_ylabel("tokens saved (%)")
    ax.set_title("domain vocabulary: tokens saved vs new tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: Config, ctx: Context, out: Path) -> dict:
    dv, corpus_dir = cfg.domain_vocab, ctx.path("corpus")
    src = refs.load_tokenizer(str(ctx.path("source") / "model"))
    train = [d["text"] for d in training_docs(corpus_dir)]
    dev = read_texts(corpus_dir / "dev.jsonl", required=False)
    evals = read_texts(corpus_dir / "eval.jsonl", required=False)
    source_json = D.backend_json(src)
    built = D.build(source_json, train, dev, size=dv.size, min_freq=dv.min_freq, kinds=dv.kinds,
                    max_phrase_words=dv.max_phrase_words)
    tok = D.to_hf(src, built.tokenizer_json)
    tok.save_pretrained(out / "tokenizer")
    for reason in built.reasons:
        log.warning("domain_vocab: %s", reason)

    # savings: the real tokenizers' counts, split by kind by replaying the merges on each text
    seen = D.Pieces({**source_json, "pre_tokenizer": built.tokenizer_json["pre_tokenizer"]})
    splits = {"train": train, "dev": dev, "eval": evals}
    before = {k: _count(src, v) for k, v in splits.items()}
    after = {k: _count(tok, v) for k, v in splits.items()}
    saved = {k: D.replay(D.Corpus(seen.count(v), seen), built.merges) for k, v in splits.items()}
    kinds = Counter(m.kind for m in built.merges)
    terms = _terms(train)
    per_term = {name: float(np.mean([len(t.tokenize(" " + w)) for w in terms])) if terms else None
                for name, t in (("before", src), ("after", tok))}
    share = {k: 1 - after[k] / before[k] if before[k] else None for k in splits}
    metrics: dict[str, Any] = {
        "domain_vocab/added": len(built.merges),
        **{f"domain_vocab/added/{k}": kinds.get(k, 0) for k in D.KINDS},
        "domain_vocab/tokens_saved_share": share["eval"],
        **{f"domain_vocab/tokens_saved_share/{k}": v for k, v in _per_kind(saved["eval"], built.merges,
                                                                           before["eval"]).items()},
        "domain_vocab/tokens_saved_share_dev": share["dev"],
        "domain_vocab/tokens_per_term/before": per_term["before"],
        "domain_vocab/tokens_per_term/after": per_term["after"],
        "domain_vocab/units": len(built.units),
    }
    curves = {k: np.cumsum(saved[k]) / before[k] for k in splits if before[k]}
    _plot(out / "domain_vocab_savings.png", curves)
    run_dir = Path(ctx.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "domain_vocab_savings.png", run_dir / "domain_vocab_savings.png")
    top = sorted(built.merges, key=lambda m: -m.saved_train)[:dv.report_top]
    report = {
        "settings": {"size": dv.size, "min_freq": dv.min_freq, "kinds": list(dv.kinds),
                     "max_phrase_words": dv.max_phrase_words},
        "added": dict(kinds), "units": len(built.units), "reasons": built.reasons,
        "documents": {k: len(v) for k, v in splits.items()},
        "tokens": {"before": before, "after": after},
        "tokens_per_document": {k: {"before": before[k] / len(v), "after": after[k] / len(v)}
                                for k, v in splits.items() if v},
        "saved_share": share,
        "saved_share_by_kind": {k: _per_kind(saved[k], built.merges, before[k]) for k in splits},
        "tokens_per_term": {**per_term, "terms": len(terms)},
        "top": [{"token": tok.convert_tokens_to_string([m.a + m.b]), "kind": m.kind, "saved_train": m.saved_train,
                 "saved_dev": m.saved_dev} for m in top],
        "examples": _examples(src, tok, built),
        "curves": {k: v.round(5).tolist() for k, v in curves.items()},
    }
    write_json(out / "report.json", report)
    ctx.tracker.image("domain_vocab/savings", out / "domain_vocab_savings.png")
    ctx.tracker.table("domain_vocab/top", ["token", "kind", "saved_train", "saved_dev"],
                      [[r["token"], r["kind"], r["saved_train"], r["saved_dev"]] for r in report["top"]])
    log.info("domain_vocab: %d new tokens (%s); evaluation text %d -> %d tokens (%.1f%% fewer)", len(built.merges),
             dict(kinds), before["eval"], after["eval"], 100 * (share["eval"] or 0))
    return metrics
