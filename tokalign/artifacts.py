"""Readers and writers of the artifacts several stages share, so no stage imports another.

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

import hashlib
import json
from pathlib import Path
from typing import Iterable

from tokalign.errors import TokalignError


class ArtifactError(TokalignError, ValueError):
    """A shared artifact is missing or malformed, or breaks the train/eval separation; the message names the file."""


def text_hash(text: str) -> str:
    """Identity of a document's text (whitespace at the ends ignored)."""
    return hashlib.blake2b(text.strip().encode("utf-8"), digest_size=16).hexdigest()


def write_jsonl(path: Path, recs: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


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
