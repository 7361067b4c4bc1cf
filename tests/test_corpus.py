"""Corpus reading: every format, budget, de-duplication, the held-out split, and bad input."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from tokalign.stages.corpus import CorpusError, build, iter_records


def _cfg(corpus, **kw):
    base = dict(corpus=str(corpus), eval_corpus=None, corpus_text_field="text", corpus_bytes=0, holdout_ids=None,
                holdout_fraction=0.25)
    base.update(kw)
    return SimpleNamespace(**base)


DOCS = [f"document number {i} about insulin and diabetes" for i in range(40)]


def _write_all_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("\n".join(DOCS))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"id": i, "text": t}) for i, t in enumerate(DOCS)))
    (tmp_path / "a.json").write_text(json.dumps([{"text": t} for t in DOCS]))
    (tmp_path / "a.csv").write_text("id,text\n" + "\n".join(f'{i},"{t}"' for i, t in enumerate(DOCS)))
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "a.parquet")
    return ["a.txt", "a.jsonl", "a.json", "a.csv", "a.parquet"]


def test_every_format_reads_the_same_texts(tmp_path):
    for name in _write_all_formats(tmp_path):
        texts = [t for _, t in iter_records(str(tmp_path / name))]
        assert texts == DOCS, name


def test_pubmedqa_shape_joins_contexts(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({
        "1": {"QUESTION": "q?", "CONTEXTS": ["First part.", "Second part."], "final_decision": "yes"},
        "2": {"QUESTION": "q2?", "CONTEXTS": ["Other."], "final_decision": "no"}}))
    assert list(iter_records(str(tmp_path / "p.json"))) == [("1", "First part. Second part."), ("2", "Other.")]


def test_budget_dedup_empty_and_split(tmp_path):
    docs = DOCS + [DOCS[0], "", "   "]
    (tmp_path / "c.txt").write_text("\n".join(docs))
    train, held, rep = build(_cfg(tmp_path / "c.txt"))
    assert rep["duplicates"] == 1 and rep["empty"] == 2
    assert len(train) + len(held) == 40 and 0 < len(held) < 25
    # the split is a stable function of id and text
    train2, held2, _ = build(_cfg(tmp_path / "c.txt"))
    assert [r["id"] for r in held] == [r["id"] for r in held2]
    budget = sum(len(r["text"].encode()) for r in train[:5])
    t3, _, rep3 = build(_cfg(tmp_path / "c.txt", corpus_bytes=budget))
    assert sum(len(r["text"].encode()) for r in t3) <= budget and len(t3) == 5


def test_holdout_ids_file(tmp_path):
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"id": i, "text": t}) for i, t in enumerate(DOCS)))
    (tmp_path / "ids.json").write_text(json.dumps({"3": "yes", "7": "no"}))
    train, held, rep = build(_cfg(tmp_path / "c.jsonl", holdout_ids=str(tmp_path / "ids.json")))
    assert sorted(r["id"] for r in held) == ["3", "7"] and len(train) == 38
    assert rep["holdout"] == "holdout_ids"


def test_demo_holds_out_the_500_pubmedqa_test_ids(assets):
    train, held, rep = build(_cfg(assets / "pubmedqa/ori_pqal.json",
                                  holdout_ids=str(assets / "pubmedqa/test_ground_truth.json")))
    test_ids = set(json.loads((assets / "pubmedqa/test_ground_truth.json").read_text()))
    assert {r["id"] for r in held} == test_ids
    assert not test_ids & {r["id"] for r in train}
    assert len(train) == 500


# --- bad input: one clear error naming the file, or a counted skip for bad records -------------------

def test_invalid_utf8(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"good line\n\xff\xfe bad bytes\n")
    with pytest.raises(CorpusError, match=r"bad\.txt: invalid UTF-8"):
        build(_cfg(tmp_path / "bad.txt"))


def test_truncated_last_json_line_is_skipped_and_counted(tmp_path):
    lines = [json.dumps({"text": t}) for t in DOCS]
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + '\n{"text": "cut in the mid')
    train, held, rep = build(_cfg(tmp_path / "t.jsonl"))
    assert rep["bad_records_skipped"] == 1 and "truncated" in rep["bad_record_examples"][0]
    assert len(train) + len(held) == 40


def test_record_without_text_field_is_skipped_and_counted(tmp_path):
    lines = [json.dumps({"text": t}) for t in DOCS] + [json.dumps({"body": "x"})]
    (tmp_path / "f.jsonl").write_text("\n".join(lines))
    _, _, rep = build(_cfg(tmp_path / "f.jsonl"))
    assert rep["bad_records_skipped"] == 1 and "'text'" in rep["bad_record_examples"][0]


def test_empty_file(tmp_path):
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(CorpusError, match=r"e\.txt: no training documents"):
        build(_cfg(tmp_path / "e.txt"))


def test_missing_file_and_directory_without_corpus(tmp_path):
    with pytest.raises(CorpusError, match="nope.jsonl: no such file"):
        build(_cfg(tmp_path / "nope.jsonl"))
    (tmp_path / "d").mkdir()
    with pytest.raises(CorpusError, match="directory holds no corpus files"):
        build(_cfg(tmp_path / "d"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    p = tmp_path / "u.txt"
    p.write_text("x")
    p.chmod(0)
    with pytest.raises(CorpusError, match="not readable"):
        build(_cfg(p))


def test_unreadable_file_message(tmp_path, monkeypatch):
    p = tmp_path / "u.txt"
    p.write_text("x\n")
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(CorpusError, match=r"u\.txt: file is not readable"):
        build(_cfg(p))


def test_csv_without_text_column(tmp_path):
    (tmp_path / "c.csv").write_text("id,body\n1,hello\n")
    with pytest.raises(CorpusError, match="no 'text' column"):
        build(_cfg(tmp_path / "c.csv"))
