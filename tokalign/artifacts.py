"""Readers and writers of the files several stages share, so no stage imports another.

Corpus files (``iter_records``): ``.txt`` (a document a line), ``.jsonl`` / ``.json`` (records with a
text field), PubMedQA's ``ori_pqal.json``, ``.csv``, ``.parquet``, a folder of such files, or a hub
dataset id; the corpus stage reads the training text with it, the terms stage its reference corpus.

Token streams (``save_stream`` / ``load_stream`` / ``docs_of``): the tokenize stage writes
``<side>_ids.npy`` (uint32) and ``<side>_offsets.npy`` (int64, n_docs + 1) for ``side`` in
``source`` and ``target``; embed and the training stages read them.

The corpus stage writes, as ``{"id", "text"}`` JSON lines:

* ``train.jsonl``: what tokenize, terms, embed and training may learn from;
* ``dev.jsonl``: a stable-hash share of the training corpus kept out of training, for choosing
  settings (in-training bits per byte, ``scripts/tune_dev.py``);
* ``eval.jsonl``: the documents bits per byte is reported on (the corpus's held-out part, or
  ``eval_corpus``); only the evaluate stages read it;
* ``eval_hashes.json``: hashes of every text that belongs to an evaluation set (the eval
  documents, the held-out documents, the PubMedQA test questions' contexts).

``training_docs`` is the one way to read ``train.jsonl``: it refuses a training document whose
text hash is an evaluation hash, so no stage that learns from text can see evaluation text even
if the corpus output was edited or produced by another version.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

import numpy as np

from tokalign.errors import TokalignError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")


class ArtifactError(TokalignError, ValueError):
    """A shared artifact is missing or malformed, or breaks the train/eval separation; the message names the file."""


# ----------------------------------------------------------------------------------------------------------------------
# corpus files (the user's input)

class CorpusError(TokalignError, ValueError):
    """The corpus cannot be read; the message names the file and what was expected."""


class BadRecords:
    """Records of a corpus that were skipped because they cannot be decoded or parsed: how many in all and per
    file, and the first few places (``file:line: why``)."""

    EXAMPLES = 5

    def __init__(self) -> None:
        self.bad_records = 0
        self.bad_examples: list[str] = []
        self.by_source: dict[str, int] = {}

    def bad(self, source: Any, where: str) -> None:
        self.bad_records += 1
        self.by_source[str(source)] = self.by_source.get(str(source), 0) + 1
        if len(self.bad_examples) < self.EXAMPLES:
            self.bad_examples.append(where)

    def worst(self) -> tuple[str, int]:
        """The file (or hub dataset) with the most bad records, and how many."""
        return max(self.by_source.items(), key=lambda kv: kv[1])


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except PermissionError as e:
        raise CorpusError(f"{path}: file is not readable (permission denied)") from e


def read_utf8(path: Path) -> str:
    """A text file's contents; unreadable or non-UTF-8 is a ``CorpusError`` naming the file."""
    raw = _read_bytes(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: invalid UTF-8 at byte {e.start} (expected UTF-8 text)") from e


def _records_json(path: Path, field: str, counts: BadRecords) -> Iterator[tuple[str, str]]:
    text = read_utf8(path)
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
            counts.bad(path, f"{path}: record {i} has no string '{field}' field")


def _lines(path: Path, counts: BadRecords) -> tuple[list[tuple[int, str]], int]:
    """The decoded lines of a file that holds a record a line, as (0-based index, text), and the number of lines;
    a line that is not UTF-8 is a bad record (counted, with its line and file byte offset)."""
    raw_lines = _read_bytes(path).split(b"\n")
    lines, offset = [], 0
    for i, raw in enumerate(raw_lines):
        try:
            lines.append((i, raw.decode("utf-8")))
        except UnicodeDecodeError as e:
            counts.bad(path, f"{path}:{i + 1}: invalid UTF-8 at byte {offset + e.start}")
        offset += len(raw) + 1
    return lines, len(raw_lines)


def _records_jsonl(path: Path, field: str, counts: BadRecords) -> Iterator[tuple[str, str]]:
    lines, n_lines = _lines(path, counts)
    for i, line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            counts.bad(path, f"{path}:{i + 1}: not valid JSON" + (" (truncated last line)" if i >= n_lines - 2 else ""))
            continue
        if isinstance(rec, dict) and isinstance(rec.get(field), str):
            yield str(rec.get("id", i)), rec[field]
        else:
            counts.bad(path, f"{path}:{i + 1}: no string '{field}' field")


def _records_file(path: Path, field: str, counts: BadRecords) -> Iterator[tuple[str, str]]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        for i, line in _lines(path, counts)[0]:
            yield f"{path.name}:{i}", line
    elif suffix == ".jsonl":
        yield from _records_jsonl(path, field, counts)
    elif suffix == ".json":
        yield from _records_json(path, field, counts)
    elif suffix == ".csv":
        text = read_utf8(path)
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


def _records_hub(ref: str, field: str, counts: BadRecords) -> Iterator[tuple[str, str]]:
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
            counts.bad(ref, f"{ref}: record {i} has no string '{field}' field")


ROW_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def iter_rows(path: Path, counts: BadRecords) -> Iterator[tuple[str, dict]]:
    """(place, record) for every record of a ``.jsonl``/``.json`` (a list, or an id -> record object)/``.csv``/
    ``.parquet`` file of records (instruction data); a line that is not UTF-8 or JSON, or a record that is not an
    object, is a bad record (counted, with its place)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise CorpusError(f"{path}: no such file (expected a data file {ROW_SUFFIXES})")
    if suffix == ".jsonl":
        lines, _ = _lines(path, counts)
        for i, line in lines:
            if line.strip():
                try:
                    yield from _object(f"{path}:{i + 1}", json.loads(line), counts, path)
                except json.JSONDecodeError:
                    counts.bad(path, f"{path}:{i + 1}: not valid JSON")
        return
    if suffix == ".json":
        try:
            data = json.loads(read_utf8(path))
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}); expected a list of records") from e
        rows = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else None
        if rows is None:
            raise CorpusError(f"{path}: expected a JSON list of records or an id -> record object")
        for key, rec in rows:
            yield from _object(f"{path}:{key}", rec, counts, path, default_id=str(key))
    elif suffix == ".csv":
        for i, row in enumerate(csv.DictReader(read_utf8(path).splitlines())):
            yield f"{path}:{i + 2}", dict(row)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise CorpusError(f"{path}: not a readable parquet file ({e})") from e
        for i, row in enumerate(table.to_pylist()):
            yield f"{path}:row {i}", row
    else:
        raise CorpusError(f"{path}: unsupported data file type '{suffix}' (expected one of {ROW_SUFFIXES})")


def _object(where: str, rec: Any, counts: BadRecords, path: Path, default_id: Optional[str] = None):
    if isinstance(rec, dict):
        yield where, ({"id": default_id, **rec} if default_id is not None and "id" not in rec else rec)
    else:
        counts.bad(path, f"{where}: not a JSON object")


def iter_records(ref: str, field: str = "text", counts: Optional[BadRecords] = None) -> Iterator[tuple[str, str]]:
    """(id, text) pairs from a file, a folder of files, or a hub dataset id."""
    counts = counts if counts is not None else BadRecords()
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


# ----------------------------------------------------------------------------------------------------------------------
# the corpus stage's output: {"id", "text"} JSON lines

def text_hash(text: str) -> str:
    """Identity of a document's text (whitespace at the ends ignored)."""
    return hashlib.blake2b(text.strip().encode("utf-8"), digest_size=16).hexdigest()


def write_jsonl(path: Path, recs: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_json(path: Path | str, obj: Any) -> Path:
    """``obj`` as indented JSON at ``path``, its folder created; written whole or not at all (a report whose presence
    marks finished work)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
    return path


def read_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text())


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).is_file():
        raise ArtifactError(f"{path}: no such file (written by stage 'corpus')")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _hash_meta(corpus_dir: Path) -> dict:
    p = Path(corpus_dir) / "eval_hashes.json"
    if not p.is_file():
        raise ArtifactError(f"{p}: no such file (written by stage 'corpus': the hashes of evaluation texts)")
    return json.loads(p.read_text())


def eval_hashes(corpus_dir: Path) -> set[str]:
    """Hashes (``text_hash``) of every evaluation text: what nothing that learns may train on."""
    return set(_hash_meta(corpus_dir).get("hashes", []))


def training_docs(corpus_dir: Path) -> list[dict]:
    """The training documents, refused if any is an evaluation text (unless the corpus stage was told to allow it)."""
    corpus_dir = Path(corpus_dir)
    docs = read_jsonl(corpus_dir / "train.jsonl")
    meta = _hash_meta(corpus_dir)
    if not meta.get("overlap_allowed", False):
        bad = set(meta.get("hashes", []))
        n = sum(1 for d in docs if text_hash(d["text"]) in bad)
        if n:
            raise ArtifactError(f"{corpus_dir / 'train.jsonl'}: {n} training documents are evaluation texts "
                                f"({', '.join(meta.get('sources', []))}); set allow_eval_overlap=true to train on them")
    return docs


def read_texts(path: Path, max_docs: int = 0, required: bool = True) -> list[str]:
    """Texts of the first ``max_docs`` records (0 = all) of a ``{"id", "text"}`` JSONL file, in file order.
    ``required=False``: a missing file or one without text gives ``[]`` instead of an error."""
    return [r["text"] for r in read_records(path, max_docs, required)]


def read_records(path: Path, max_docs: int = 0, required: bool = True) -> list[dict]:
    """Like ``read_texts``, with the records' ``id`` kept."""
    path = Path(path)
    if not path.is_file():
        if not required:
            return []
        raise ArtifactError(f"{path}: no such file (written by stage 'corpus')")
    recs: list[dict] = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if max_docs and len(recs) >= max_docs:
                    break
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ArtifactError(f"{path}:{n}: not valid JSON ({e.msg})") from e
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise ArtifactError(f"{path}:{n}: expected an object with a string 'text'")
                recs.append({"id": str(rec.get("id", n)), "text": rec["text"]})
    except (OSError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable ({e})") from e
    if not recs or not any(r["text"] for r in recs):
        if not required:
            return []
        raise ArtifactError(f"{path}: no non-empty documents to score")
    return recs


# ----------------------------------------------------------------------------------------------------------------------
# token streams (the tokenize stage's output)

def save_stream(tokenize_dir: Path, side: str, ids: np.ndarray, offsets: np.ndarray) -> None:
    """Write ``<side>_ids.npy`` and ``<side>_offsets.npy`` into the tokenize stage's folder."""
    np.save(Path(tokenize_dir) / f"{side}_ids.npy", ids)
    np.save(Path(tokenize_dir) / f"{side}_offsets.npy", offsets)


def load_stream(tokenize_dir: Union[str, Path], side: str = "target") -> tuple[np.ndarray, np.ndarray]:
    """(ids, offsets) of one side (``source`` or ``target``) of the tokenize stage's folder, checked."""
    d = Path(tokenize_dir)
    ids_path, off_path = d / f"{side}_ids.npy", d / f"{side}_offsets.npy"
    for p in (ids_path, off_path):
        if not p.is_file():
            raise ArtifactError(f"{p}: missing (expected the tokenize stage's output)")
    ids = np.load(ids_path, mmap_mode="r")
    offsets = np.load(off_path)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ArtifactError(f"{ids_path}: expected a flat integer array, got shape {ids.shape} dtype {ids.dtype}")
    if offsets.ndim != 1 or len(offsets) < 1 or not np.issubdtype(offsets.dtype, np.integer):
        raise ArtifactError(f"{off_path}: expected a flat integer array of n_docs+1 boundaries, got shape "
                            f"{offsets.shape}")
    if offsets[0] != 0 or offsets[-1] != len(ids) or np.any(np.diff(offsets) < 0):
        raise ArtifactError(f"{off_path}: boundaries must start at 0, be non-decreasing and end at len(ids)={len(ids)} "
                            f"(got first {int(offsets[0])}, last {int(offsets[-1])})")
    return np.asarray(ids), offsets.astype(np.int64)


def docs_of(ids: np.ndarray, offsets: np.ndarray, limit: Optional[int] = None) -> Iterator[np.ndarray]:
    """Iterate the documents of a flat stream."""
    n = len(offsets) - 1 if limit is None else min(limit, len(offsets) - 1)
    for i in range(n):
        yield ids[offsets[i]:offsets[i + 1]]


def link_or_copy_tree(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of the files of ``src`` made of hard links where the filesystem allows (no extra disk)."""
    if dst.is_symlink() or dst.is_file():
        dst.unlink()
    elif dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)


CURVE_DOCS_CAP = 8  # the in-training bits-per-byte curve scores at most this many dev documents


def head_bytes(text: str, max_bytes: int) -> str:
    """The longest start of ``text`` of at most ``max_bytes`` UTF-8 bytes that ends before a space (whole words)."""
    raw = text.encode("utf-8")
    if len(raw) <= max_bytes:
        return text
    cut = raw[:max_bytes].decode("utf-8", errors="ignore")
    space = cut.rfind(" ")
    return cut[:space] if space > 0 else cut


def scored_texts(path: Path, max_docs: int, max_doc_bytes: int = 0, required: bool = True) -> list[str]:
    """The first ``max_docs`` texts of a corpus-stage JSONL, each cut to its first ``max_doc_bytes`` bytes at a space
    (0 = whole): the documents a model is scored on (evaluation, the recovery curve, the export's checks)."""
    texts = read_texts(path, max_docs, required=required)
    return [head_bytes(t, max_doc_bytes) for t in texts] if max_doc_bytes else texts


def curve_texts(corpus_dir: Path, max_eval_samples: int, max_doc_bytes: int = 0) -> list[str]:
    """The dev documents of the in-training recovery curve (stage training scores its model on them every
    ``train.eval_steps``; ``evaluate_source`` scores the source on the same ones, the curve's target line): the first
    ``min(eval.max_eval_samples, CURVE_DOCS_CAP)`` of ``dev.jsonl``, cut like the evaluation's documents
    (``eval.max_doc_bytes``), never evaluation documents; none without a dev split."""
    n = max_eval_samples if max_eval_samples > 0 else CURVE_DOCS_CAP
    return scored_texts(Path(corpus_dir) / "dev.jsonl", min(n, CURVE_DOCS_CAP), max_doc_bytes, required=False)


# ----------------------------------------------------------------------------------------------------------------------
# the run's final model (the training stages' or the initialisation's output)

def final_model(ctx: Any) -> tuple[str, Path]:
    """(name, folder) of the run's final model: stage 2, else stage 1, else the initialisation (the stage asking
    declares ``init``, ``train_stage1`` and ``train_stage2`` as inputs). Stage 2 with LoRA saves an adapter folder
    whose base is stage 1's model (``refs.load_merged`` merges it)."""
    for n in ("stage2", "stage1"):
        if ctx.has(f"train_{n}"):
            return n, ctx.path(f"train_{n}") / "model"
    return "init", ctx.path("init") / "model"
