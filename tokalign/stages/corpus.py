"""Stage ``corpus``: read the training text, de-duplicate, apply the byte budget, split off held-out text.

Formats: ``.txt`` (a document a line), ``.jsonl`` / ``.json`` (records with ``corpus_text_field``),
PubMedQA's ``ori_pqal.json`` (id -> record; text = the joined ``CONTEXTS``), ``.csv``, ``.parquet``,
a folder of such files, or a hub dataset id (streamed through ``datasets``; ``name:split`` picks
a split).

Splits, each a pure function of the document (stable hashes, so adding documents elsewhere moves none):

* held out: the IDs listed in ``holdout_ids`` (the demo holds out the 500 PubMedQA test IDs); when
  ``holdout_ids`` is unset or names no document of the corpus, a stable-hash ``holdout_fraction``
  (and the log says so). Held-out documents never reach training, whatever ``eval_corpus`` is.
* dev: a stable-hash ``dev_fraction`` of the rest, kept out of training; settings are chosen on it.
* train: everything else, up to ``corpus_bytes``.

Bits per byte is scored on ``eval_corpus`` when given, else on the held-out documents. A training
or dev document whose text is an evaluation text (the eval documents, the held-out ones, the
PubMedQA test questions' contexts) is a one-line error unless ``allow_eval_overlap=true``.

A record that cannot be decoded (a line that is not UTF-8) or parsed (bad JSON, no text field) is
skipped and counted (``corpus/bad_records_skipped``; the first few places, ``file:line: why``, in
``report.json``); more than ``corpus_max_bad_share`` of the records read being bad is an error
naming the file.

Writes ``train.jsonl``, ``dev.jsonl``, ``eval.jsonl`` ({"id", "text"} a line), ``eval_hashes.json``
(read through ``tokalign.artifacts.training_docs``) and ``report.json``.

Run alone:  python -m tokalign.stages.corpus corpus=/data/med.jsonl  (prints the report)
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from tokalign.artifacts import BadRecords, CorpusError, iter_records, read_utf8, text_hash, write_jsonl
from tokalign.config import Config
from tokalign.context import Context

log = logging.getLogger(__name__)

def _stable_fraction(doc_id: str, text: str, salt: str = "") -> float:
    h = hashlib.sha256(f"{salt}{doc_id}\0{text}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def _load_holdout_ids(path: str) -> set[str]:
    p = Path(path)
    if not p.is_file():
        raise CorpusError(f"holdout_ids: {path}: no such file (expected a JSON object or list of document IDs)")
    data = json.loads(read_utf8(p))
    return {str(k) for k in (data.keys() if isinstance(data, dict) else data)}


def pubmedqa_test_contexts(cfg) -> list[str]:
    """The contexts of the PubMedQA test questions the evaluate stages may score (none when no file is set)."""
    e = cfg.eval
    if not e.pubmedqa_file:
        return []
    try:
        pqal = json.loads(Path(e.pubmedqa_file).read_text(encoding="utf-8"))
        ids = json.loads(Path(e.pubmedqa_test_ids).read_text(encoding="utf-8")) if e.pubmedqa_test_ids else pqal
    except (OSError, ValueError) as err:  # evaluate reports the unreadable file; nothing to guard against here
        log.warning("corpus: PubMedQA files unreadable (%s): their contexts are not guarded", err)
        return []
    return [" ".join(pqal[str(i)]["CONTEXTS"]) for i in ids if isinstance(pqal.get(str(i)), dict)
            and isinstance(pqal[str(i)].get("CONTEXTS"), list)]


def _read_unique(ref: str, field: str, counts: BadRecords, stats: dict) -> Iterator[tuple[str, str, str]]:
    """(id, text, text hash) of the non-empty, first-seen documents of a corpus."""
    seen: set[str] = set()
    for doc_id, text in tqdm(iter_records(ref, field, counts), desc="corpus", unit=" docs", mininterval=2):
        stats["documents_read"] += 1
        text = text.strip()
        if not text:
            stats["empty"] += 1
            continue
        h = text_hash(text)
        if h in seen:
            stats["duplicates"] += 1
            continue
        seen.add(h)
        yield doc_id, text, h


def _split(cfg, counts: BadRecords, stats: dict) -> tuple[dict[str, list[dict]], str]:
    """Held-out (holdout_ids, else a stable-hash share), dev (a stable-hash share of the rest) and train documents."""
    ids = _load_holdout_ids(cfg.holdout_ids) if cfg.holdout_ids else set()
    parts: dict[str, list[dict]] = {"held": [], "dev": [], "train": []}
    train_bytes = 0
    for doc_id, text, h in _read_unique(cfg.corpus, cfg.corpus_text_field, counts, stats):
        rec = {"id": doc_id, "text": text}
        if doc_id in ids if ids else _stable_fraction(doc_id, text) < cfg.holdout_fraction:
            parts["held"].append(rec)
        elif _stable_fraction(doc_id, text, "dev:") < cfg.dev_fraction:
            parts["dev"].append(rec)
        else:
            nbytes = len(text.encode())
            if cfg.corpus_bytes and train_bytes + nbytes > cfg.corpus_bytes:
                stats["over_budget"] += 1
                if train_bytes >= cfg.corpus_bytes:
                    break
                continue
            train_bytes += nbytes
            parts["train"].append(rec)
    if not ids:
        return parts, "hash_fraction"
    if parts["held"]:
        return parts, f"holdout_ids ({len(parts['held'])} of {len(ids)} ids found)"
    how = f"hash_fraction (holdout_ids named none of the corpus's {stats['documents_read']} documents)"
    for name in ("dev", "train"):  # no id matched: hold out a stable-hash share instead
        keep = []
        for r in parts[name]:
            (parts["held"] if _stable_fraction(r["id"], r["text"]) < cfg.holdout_fraction else keep).append(r)
        parts[name] = keep
    log.warning("corpus: holdout_ids %s named none of the corpus's documents; holding out holdout_fraction=%s by "
                "stable hash instead (%d documents)", cfg.holdout_ids, cfg.holdout_fraction, len(parts["held"]))
    return parts, how


def _guard(cfg, parts: dict[str, list[dict]], eval_docs: list[dict]) -> dict:
    """Hashes of every evaluation text; training or dev documents among them are an error unless allowed."""
    sources = {"eval": (cfg.eval_corpus or f"{cfg.corpus} (held out)", [d["text"] for d in eval_docs]),
               "held": (f"{cfg.corpus} (held out)", [d["text"] for d in parts["held"]]),
               "pubmedqa": (f"{cfg.eval.pubmedqa_file} (test contexts)", pubmedqa_test_contexts(cfg))}
    hashes = {text_hash(t) for _, texts in sources.values() for t in texts}
    overlap = sum(1 for name in ("train", "dev") for r in parts[name] if text_hash(r["text"]) in hashes)
    named = sorted({label for label, texts in sources.values() if texts})
    if overlap and not cfg.allow_eval_overlap:
        raise CorpusError(f"{cfg.corpus}: {overlap} training documents are verbatim evaluation texts of "
                          f"{' and '.join(named)}; remove them or set allow_eval_overlap=true")
    if overlap:
        log.warning("corpus: %d training documents are evaluation texts (allow_eval_overlap=true)", overlap)
    return {"hashes": sorted(hashes), "sources": named, "overlap": overlap, "overlap_allowed": bool(cfg.allow_eval_overlap)}


def _check_bad_share(cfg, counts: BadRecords, good: int) -> None:
    """Bad records are skipped and counted; more than ``corpus_max_bad_share`` of them is an error naming the file
    with the most."""
    total = good + counts.bad_records
    if counts.bad_records and counts.bad_records > cfg.corpus_max_bad_share * total:
        source, n = counts.worst()
        raise CorpusError(f"{source}: {n} records cannot be decoded or parsed ({counts.bad_records} of {total} read, "
                          f"more than corpus_max_bad_share={cfg.corpus_max_bad_share}), e.g. {counts.bad_examples[0]}")


def build(cfg) -> tuple[dict[str, list[dict]], dict, dict]:
    """Read, clean and split the corpus; returns ({"train", "dev", "eval", "held"} records, report, eval hashes)."""
    counts = BadRecords()
    stats = {"documents_read": 0, "empty": 0, "duplicates": 0, "over_budget": 0}
    parts, how = _split(cfg, counts, stats)
    if cfg.eval_corpus:  # what bits per byte is scored on; the held-out documents stay out of training all the same
        eval_stats = {"documents_read": 0, "empty": 0, "duplicates": 0}
        eval_docs = [{"id": i, "text": t} for i, t, _ in
                     _read_unique(cfg.eval_corpus, cfg.corpus_text_field, counts, eval_stats)]
    else:
        eval_docs = parts["held"]
        eval_stats = {"documents_read": 0}
    _check_bad_share(cfg, counts, stats["documents_read"] + eval_stats["documents_read"])
    if not parts["train"]:
        raise CorpusError(f"{cfg.corpus}: no training documents left after filtering ({stats}; "
                          f"{counts.bad_records} bad records); expected non-empty text")
    if not eval_docs:
        raise CorpusError(f"{cfg.eval_corpus or cfg.corpus}: no evaluation documents (set eval_corpus, holdout_ids "
                          "or a holdout_fraction > 0)")
    guard = _guard(cfg, parts, eval_docs)
    report = {
        **stats,
        "bad_records_skipped": counts.bad_records,
        "bad_record_examples": counts.bad_examples,
        "train_documents": len(parts["train"]),
        "train_bytes": sum(len(r["text"].encode()) for r in parts["train"]),
        "dev_documents": len(parts["dev"]),
        "eval_documents": len(eval_docs),
        "eval_bytes": sum(len(r["text"].encode()) for r in eval_docs),
        "held_out_documents": len(parts["held"]),
        "holdout": how,
        "eval_source": cfg.eval_corpus or "held-out part of the corpus",
        "overlap_with_eval": guard["overlap"],
        "guarded_against": guard["sources"],
    }
    if counts.bad_records:
        log.warning("corpus: skipped %d bad records, e.g. %s", counts.bad_records, counts.bad_examples[0])
    return {**parts, "eval": eval_docs}, report, guard


def run(cfg: Config, ctx: Context, out: Path) -> dict:
    parts, report, guard = build(cfg)
    for name in ("train", "dev", "eval"):
        write_jsonl(out / f"{name}.jsonl", parts[name])
    (out / "eval_hashes.json").write_text(json.dumps(guard))
    (out / "report.json").write_text(json.dumps(report, indent=1))
    log.info("corpus: %s", {k: v for k, v in report.items() if k != "bad_record_examples"})
    metrics = {f"corpus/{k}": v for k, v in report.items() if isinstance(v, (int, float))}
    metrics.update({"corpus/train_docs": report["train_documents"], "corpus/eval_docs": report["eval_documents"],
                    "corpus/dev_docs": report["dev_documents"]})
    return metrics


if __name__ == "__main__":  # pragma: no cover
    from tokalign.cli import compose_cli

    c = compose_cli(sys.argv[1:])
    print(json.dumps(build(c)[2], indent=1))
