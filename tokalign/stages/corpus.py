"""Stage ``corpus``: read the training text, de-duplicate, apply the byte budget, split off held-out text.

Formats: ``.txt`` (a document a line), ``.jsonl`` / ``.json`` (records with ``corpus_text_field``),
PubMedQA's ``ori_pqal.json`` (id -> record; text = the joined ``CONTEXTS``), ``.csv``, ``.parquet``,
a folder of such files, or a hub dataset id (streamed through ``datasets``; ``name:split`` picks
a split). Held out for evaluation: the IDs listed in ``holdout_ids`` (the demo holds out the 500
PubMedQA test IDs), else a stable-hash ``holdout_fraction``; or all of ``eval_corpus`` when given.

Writes ``train.jsonl``, ``eval.jsonl`` ({"id", "text"} a line) and ``report.json``.

Run alone:  python -m tokalign.stages.corpus corpus=/data/med.jsonl  (prints the report)
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Iterator, Optional

from tqdm import tqdm
from tokalign.errors import TokalignError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")


class CorpusError(TokalignError, ValueError):
    """The corpus cannot be read; the message names the file and what was expected."""


class _Counts:
    def __init__(self) -> None:
        self.bad_records = 0
        self.bad_examples: list[str] = []

    def bad(self, where: str) -> None:
        self.bad_records += 1
        if len(self.bad_examples) < 5:
            self.bad_examples.append(where)


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except PermissionError as e:
        raise CorpusError(f"{path}: file is not readable (permission denied)") from e
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: invalid UTF-8 at byte {e.start} (expected UTF-8 text)") from e


def _records_json(path: Path, field: str, counts: _Counts) -> Iterator[tuple[str, str]]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}); expected a list of records, "
                          "a PubMedQA id->record object, or use .jsonl for one record a line") from e
    if isinstance(data, dict) and data and all(isinstance(v, dict) and "CONTEXTS" in v for v in data.values()):
        for pid, rec in data.items():  # PubMedQA ori_pqal.json: abstract = the joined CONTEXTS
            yield str(pid), " ".join(rec["CONTEXTS"])
        return
    if isinstance(data, dict):
        data = data.get("data", data.get("rows", [data]))
    if not isinstance(data, list):
        raise CorpusError(f"{path}: expected a JSON list of records with a '{field}' field")
    for i, rec in enumerate(data):
        if isinstance(rec, dict) and isinstance(rec.get(field), str):
            yield str(rec.get("id", i)), rec[field]
        else:
            counts.bad(f"{path}: record {i} has no string '{field}' field")


def _records_jsonl(path: Path, field: str, counts: _Counts) -> Iterator[tuple[str, str]]:
    lines = _read_text(path).split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            counts.bad(f"{path}:{i + 1}: not valid JSON" + (" (truncated last line)" if i >= len(lines) - 2 else ""))
            continue
        if isinstance(rec, dict) and isinstance(rec.get(field), str):
            yield str(rec.get("id", i)), rec[field]
        else:
            counts.bad(f"{path}:{i + 1}: no string '{field}' field")


def _records_file(path: Path, field: str, counts: _Counts) -> Iterator[tuple[str, str]]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        for i, line in enumerate(_read_text(path).split("\n")):
            yield f"{path.name}:{i}", line
    elif suffix == ".jsonl":
        yield from _records_jsonl(path, field, counts)
    elif suffix == ".json":
        yield from _records_json(path, field, counts)
    elif suffix == ".csv":
        text = _read_text(path)
        reader = csv.DictReader(text.splitlines())
        if reader.fieldnames is None or field not in reader.fieldnames:
            raise CorpusError(f"{path}: CSV has no '{field}' column (columns: {reader.fieldnames}); set corpus_text_field")
        for i, row in enumerate(reader):
            yield str(row.get("id") or i), row[field] or ""
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise CorpusError(f"{path}: not a readable parquet file ({e})") from e
        if field not in table.column_names:
            raise CorpusError(f"{path}: parquet has no '{field}' column (columns: {table.column_names}); set corpus_text_field")
        ids = table.column("id").to_pylist() if "id" in table.column_names else range(table.num_rows)
        for i, t in zip(ids, table.column(field).to_pylist()):
            yield str(i), t or ""
    else:
        raise CorpusError(f"{path}: unsupported corpus file type '{suffix}' (expected one of {TEXT_SUFFIXES})")


def _records_hub(ref: str, field: str, counts: _Counts) -> Iterator[tuple[str, str]]:
    from datasets import load_dataset

    name, _, split = ref.partition(":")
    from tokalign.refs import retry

    try:
        ds = retry(lambda: load_dataset(name, split=split or "train", streaming=True), f"hub dataset '{ref}'")
    except (ConnectionError, TimeoutError, OSError) as e:
        raise CorpusError(f"hub dataset '{ref}': could not be read after retries: {type(e).__name__}: {e}") from e
    for i, rec in enumerate(ds):
        if isinstance(rec.get(field), str):
            yield str(rec.get("id", i)), rec[field]
        else:
            counts.bad(f"{ref}: record {i} has no string '{field}' field")


def iter_records(ref: str, field: str = "text", counts: Optional[_Counts] = None) -> Iterator[tuple[str, str]]:
    """(id, text) pairs from a file, a folder of files, or a hub dataset id."""
    counts = counts if counts is not None else _Counts()
    p = Path(os.path.expanduser(ref))
    looks_local = ref.startswith((".", "/", "~")) or p.suffix.lower() in TEXT_SUFFIXES or p.exists()
    if not looks_local:
        yield from _records_hub(ref, field, counts)
        return
    if not p.exists():
        raise CorpusError(f"{ref}: no such file or directory (expected a corpus file {TEXT_SUFFIXES}, a folder, or a hub dataset id)")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise CorpusError(f"{ref}: directory holds no corpus files (expected {TEXT_SUFFIXES})")
        for f in files:
            yield from _records_file(f, field, counts)
        return
    if not os.access(p, os.R_OK):
        raise CorpusError(f"{ref}: file is not readable (permission denied)")
    yield from _records_file(p, field, counts)


def _stable_fraction(doc_id: str, text: str) -> float:
    h = hashlib.sha256(f"{doc_id}\0{text}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def _load_holdout_ids(path: str) -> set[str]:
    p = Path(path)
    if not p.is_file():
        raise CorpusError(f"holdout_ids: {path}: no such file (expected a JSON object or list of document IDs)")
    data = json.loads(_read_text(p))
    return {str(k) for k in (data.keys() if isinstance(data, dict) else data)}


def build(cfg) -> tuple[list[dict], list[dict], dict]:
    """Read, clean and split the corpus; returns (train records, eval records, report)."""
    counts = _Counts()
    holdout = _load_holdout_ids(cfg.holdout_ids) if cfg.holdout_ids and not cfg.eval_corpus else set()
    seen: set[bytes] = set()
    train, held = [], []
    stats = {"documents_read": 0, "empty": 0, "duplicates": 0, "over_budget": 0}
    train_bytes = 0
    for doc_id, text in tqdm(iter_records(cfg.corpus, cfg.corpus_text_field, counts), desc="corpus", unit=" docs",
                             mininterval=2):
        stats["documents_read"] += 1
        text = text.strip()
        if not text:
            stats["empty"] += 1
            continue
        digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
        if digest in seen:
            stats["duplicates"] += 1
            continue
        seen.add(digest)
        is_eval = not cfg.eval_corpus and (
            doc_id in holdout if holdout else _stable_fraction(doc_id, text) < cfg.holdout_fraction)
        if is_eval:
            held.append({"id": doc_id, "text": text})
            continue
        nbytes = len(text.encode())
        if cfg.corpus_bytes and train_bytes + nbytes > cfg.corpus_bytes:
            stats["over_budget"] += 1
            if train_bytes >= cfg.corpus_bytes:
                break
            continue
        train_bytes += nbytes
        train.append({"id": doc_id, "text": text})
    if cfg.eval_corpus:
        for doc_id, text in iter_records(cfg.eval_corpus, cfg.corpus_text_field, counts):
            if text.strip():
                held.append({"id": doc_id, "text": text.strip()})
    if not train:
        raise CorpusError(f"{cfg.corpus}: no training documents left after filtering ({stats}; "
                          f"{counts.bad_records} bad records); expected non-empty text")
    if not held:
        raise CorpusError(f"{cfg.eval_corpus or cfg.corpus}: no evaluation documents (set eval_corpus, holdout_ids "
                          "or a holdout_fraction > 0)")
    report = {
        **stats,
        "bad_records_skipped": counts.bad_records,
        "bad_record_examples": counts.bad_examples,
        "train_documents": len(train),
        "train_bytes": train_bytes,
        "eval_documents": len(held),
        "eval_bytes": sum(len(r["text"].encode()) for r in held),
        "holdout": "eval_corpus" if cfg.eval_corpus else ("holdout_ids" if holdout else "hash_fraction"),
    }
    if counts.bad_records:
        log.warning("corpus: skipped %d bad records, e.g. %s", counts.bad_records, counts.bad_examples[0])
    return train, held, report


def _write_jsonl(path: Path, recs: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def run(cfg, ctx, out: Path) -> dict:
    train, held, report = build(cfg)
    _write_jsonl(out / "train.jsonl", train)
    _write_jsonl(out / "eval.jsonl", held)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    log.info("corpus: %s", {k: v for k, v in report.items() if k != "bad_record_examples"})
    return {f"corpus/{k}": v for k, v in report.items() if isinstance(v, (int, float))}


if __name__ == "__main__":  # pragma: no cover
    from tokalign.__main__ import compose_cli

    c = compose_cli(sys.argv[1:])
    print(json.dumps(build(c)[2], indent=1))
