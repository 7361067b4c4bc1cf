"""Corpus reading: every format, budget, de-duplication, the held-out split, and bad input."""

from __future__ import annotations

import json
import os

import pytest

from tokalign.config import Config, EvalConfig
from tokalign.stages.corpus import CorpusError, build, iter_records


def _cfg(corpus, **kw) -> Config:
    base = dict(source_model="unused", target_tokenizer="unused", corpus=str(corpus), holdout_fraction=0.25,
                dev_fraction=0.0)
    base.update(kw)
    return Config(**base)


def split(cfg) -> tuple[list[dict], list[dict], dict]:
    """(train, eval, report) of the corpus stage."""
    parts, rep, _ = build(cfg)
    return parts["train"], parts["eval"], rep


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
    train, held, rep = split(_cfg(tmp_path / "c.txt"))
    assert rep["duplicates"] == 1 and rep["empty"] == 2
    assert len(train) + len(held) == 40 and 0 < len(held) < 25
    # the split is a stable function of id and text
    train2, held2, _ = split(_cfg(tmp_path / "c.txt"))
    assert [r["id"] for r in held] == [r["id"] for r in held2]
    budget = sum(len(r["text"].encode()) for r in train[:5])
    t3, _, rep3 = split(_cfg(tmp_path / "c.txt", corpus_bytes=budget))
    assert sum(len(r["text"].encode()) for r in t3) <= budget and len(t3) == 5


def test_holdout_ids_file(tmp_path):
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"id": i, "text": t}) for i, t in enumerate(DOCS)))
    (tmp_path / "ids.json").write_text(json.dumps({"3": "yes", "7": "no"}))
    train, held, rep = split(_cfg(tmp_path / "c.jsonl", holdout_ids=str(tmp_path / "ids.json")))
    assert sorted(r["id"] for r in held) == ["3", "7"] and len(train) == 38
    assert rep["holdout"] == "holdout_ids (2 of 2 ids found)"


def test_demo_holds_out_the_500_pubmedqa_test_ids(assets):
    train, held, rep = split(_cfg(assets / "pubmedqa/ori_pqal.json",
                                  holdout_ids=str(assets / "pubmedqa/test_ground_truth.json")))
    test_ids = set(json.loads((assets / "pubmedqa/test_ground_truth.json").read_text()))
    assert {r["id"] for r in held} == test_ids
    assert not test_ids & {r["id"] for r in train}
    assert len(train) == 500


# --- bad input: one clear error naming the file, or a counted skip for bad records -------------------

def test_invalid_utf8_line_over_the_bad_share_fails_naming_the_file(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"good line\n\xff\xfe bad bytes\n")
    with pytest.raises(CorpusError, match=r"bad\.txt: 1 records cannot be decoded or parsed \(1 of 3 read, more than "
                                          r"corpus_max_bad_share=0.01\), e.g. .*bad\.txt:2: invalid UTF-8 at byte 10"):
        build(_cfg(tmp_path / "bad.txt"))


def test_invalid_utf8_lines_under_the_bad_share_are_skipped_counted_and_located(tmp_path):
    raw = "\n".join(DOCS).encode().split(b"\n")
    raw[3] = b"\xff" + raw[3]
    raw[7] = raw[7] + b"\xc3"
    (tmp_path / "some_bad.txt").write_bytes(b"\n".join(raw))
    (tmp_path / "some_bad.jsonl").write_bytes(b"\n".join(json.dumps({"text": t}).encode() for t in DOCS[:10])
                                              + b'\n{"text": "caf\xe9"}')
    for name, where in (("some_bad.txt", ["some_bad.txt:4: invalid UTF-8", "some_bad.txt:8: invalid UTF-8"]),
                        ("some_bad.jsonl", ["some_bad.jsonl:11: invalid UTF-8 at byte"])):
        train, held, rep = split(_cfg(tmp_path / name, corpus_max_bad_share=0.1 if name.endswith("txt") else 0.2))
        assert rep["bad_records_skipped"] == len(where)
        assert [w.split(str(tmp_path) + "/")[1][:len(x)] for w, x in zip(rep["bad_record_examples"], where)] == where
        assert len(train) + len(held) == (38 if name.endswith("txt") else 10)


def test_corpus_stage_reports_bad_records_as_a_metric_and_in_report_json(tmp_path):
    from tokalign.context import Context
    from tokalign.stages import corpus

    lines = [json.dumps({"text": t}) for t in DOCS]
    lines.insert(5, "{not json")
    (tmp_path / "c.jsonl").write_text("\n".join(lines))
    out = tmp_path / "out"
    out.mkdir()
    m = corpus.run(_cfg(tmp_path / "c.jsonl", corpus_max_bad_share=0.05), Context(run_dir=tmp_path), out)
    assert m["corpus/bad_records_skipped"] == 1
    rep = json.loads((out / "report.json").read_text())
    assert rep["bad_record_examples"] == [f"{tmp_path / 'c.jsonl'}:6: not valid JSON"]


def test_bad_share_is_over_the_whole_corpus_and_a_config_key(tmp_path):
    from tokalign.config import ConfigError

    lines = [json.dumps({"text": t}) for t in DOCS[:30]] + ["{bad"] * 10  # 10 of 40 bad
    (tmp_path / "q.jsonl").write_text("\n".join(lines))
    with pytest.raises(CorpusError, match=r"q\.jsonl: 10 records .*\(10 of 40 read"):
        build(_cfg(tmp_path / "q.jsonl", corpus_max_bad_share=0.2))
    assert split(_cfg(tmp_path / "q.jsonl", corpus_max_bad_share=0.25))[2]["bad_records_skipped"] == 10
    with pytest.raises(ConfigError, match="corpus_max_bad_share"):
        _cfg(tmp_path / "q.jsonl", corpus_max_bad_share=1.5)


def test_truncated_last_json_line_is_skipped_and_counted(tmp_path):
    lines = [json.dumps({"text": t}) for t in DOCS]
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + '\n{"text": "cut in the mid')
    train, held, rep = split(_cfg(tmp_path / "t.jsonl", corpus_max_bad_share=0.05))
    assert rep["bad_records_skipped"] == 1 and "truncated" in rep["bad_record_examples"][0]
    assert len(train) + len(held) == 40


def test_record_without_text_field_is_skipped_and_counted(tmp_path):
    lines = [json.dumps({"text": t}) for t in DOCS] + [json.dumps({"body": "x"})]
    (tmp_path / "f.jsonl").write_text("\n".join(lines))
    _, _, rep = split(_cfg(tmp_path / "f.jsonl", corpus_max_bad_share=0.05))
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


# --- splits: dev, held out, eval_corpus, and the guard against training on evaluation text ----------------------


def test_dev_split_is_stable_disjoint_and_out_of_training(tmp_path):
    recs = [{"id": f"d{i}", "text": f"document {i} on statins and insulin"} for i in range(200)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    parts, rep, _ = build(_cfg(tmp_path / "c.jsonl", dev_fraction=0.2, holdout_fraction=0.1))
    ids = {k: {r["id"] for r in parts[k]} for k in ("train", "dev", "eval")}
    assert ids["dev"] and ids["eval"] and ids["train"]
    assert not ids["dev"] & ids["eval"] and not ids["dev"] & ids["train"] and not ids["eval"] & ids["train"]
    assert len(ids["dev"]) + len(ids["eval"]) + len(ids["train"]) == 200
    assert 0.1 < len(ids["dev"]) / 180 < 0.3 and rep["dev_documents"] == len(ids["dev"])
    # adding documents elsewhere moves no existing document between splits
    more = recs[:100] + [{"id": f"late{i}", "text": f"late document {i} about asthma"} for i in range(50)] + recs[100:]
    (tmp_path / "more.jsonl").write_text("\n".join(json.dumps(r) for r in more))
    parts2, _, _ = build(_cfg(tmp_path / "more.jsonl", dev_fraction=0.2, holdout_fraction=0.1))
    for k in ("train", "dev", "eval"):
        assert ids[k] <= {r["id"] for r in parts2[k]}


def test_holdout_ids_naming_no_document_falls_back_to_the_stable_hash(tmp_path, caplog):
    (tmp_path / "c.txt").write_text("\n".join(DOCS))
    (tmp_path / "ids.json").write_text(json.dumps({"999999": "yes"}))
    _, held, rep = split(_cfg(tmp_path / "c.txt", holdout_ids=str(tmp_path / "ids.json")))
    _, held_hash, _ = split(_cfg(tmp_path / "c.txt"))
    assert held and [r["id"] for r in held] == [r["id"] for r in held_hash]
    assert rep["holdout"].startswith("hash_fraction (holdout_ids named none")
    assert "named none of the corpus's documents" in caplog.text


def _demo_cfg(assets, **kw) -> Config:
    pq = assets / "pubmedqa"
    base = dict(corpus=pq / "ori_pqal.json", holdout_ids=str(pq / "test_ground_truth.json"), dev_fraction=0.1,
                eval=EvalConfig(pubmedqa_file=str(pq / "ori_pqal.json"),
                                pubmedqa_test_ids=str(pq / "test_ground_truth.json"), pubmedqa_samples=30))
    base.update(kw)
    return _cfg(**base)


def test_eval_corpus_keeps_the_pubmedqa_test_abstracts_out_of_training(assets, tmp_path):
    (tmp_path / "notes.txt").write_text("\n".join(f"Clinical note {i}: the patient reports chest pain." for i in range(30)))
    default, rep0, _ = build(_demo_cfg(assets))
    parts, rep, guard = build(_demo_cfg(assets, eval_corpus=str(tmp_path / "notes.txt")))
    test_ids = set(json.loads((assets / "pubmedqa/test_ground_truth.json").read_text()))
    trained = {r["id"] for r in parts["train"]} | {r["id"] for r in parts["dev"]}
    assert not trained & test_ids
    assert [r["id"] for r in parts["train"]] == [r["id"] for r in default["train"]]  # training text unchanged
    assert [r["text"] for r in parts["eval"]][0].startswith("Clinical note 0")
    assert rep["eval_documents"] == 30 and rep["held_out_documents"] == 500 and rep["overlap_with_eval"] == 0
    assert rep0["train_documents"] == rep["train_documents"] == len(parts["train"]) and rep0["eval_documents"] == 500
    assert len(guard["hashes"]) >= 530


def test_a_training_document_that_is_an_evaluation_text_is_refused(assets, tmp_path):
    pqal = json.loads((assets / "pubmedqa/ori_pqal.json").read_text())
    test_id = next(iter(json.loads((assets / "pubmedqa/test_ground_truth.json").read_text())))
    leaked = " ".join(pqal[test_id]["CONTEXTS"])
    recs = [{"id": f"n{i}", "text": f"note {i} on dialysis and renal failure"} for i in range(60)]
    recs.insert(20, {"id": "copied-under-another-id", "text": leaked})
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    cfg = _demo_cfg(assets, corpus=str(tmp_path / "c.jsonl"), holdout_ids=None)
    with pytest.raises(CorpusError) as ei:
        build(cfg)
    msg = str(ei.value)
    assert "1 training documents are verbatim evaluation texts" in msg and str(tmp_path / "c.jsonl") in msg
    assert "ori_pqal.json (test contexts)" in msg and "allow_eval_overlap" in msg and "\n" not in msg
    # an eval_corpus document copied into the corpus is refused the same way
    (tmp_path / "eval.txt").write_text(recs[3]["text"] + "\nsome other note")
    with pytest.raises(CorpusError, match=r"eval\.txt"):
        build(_cfg(tmp_path / "c.jsonl", eval_corpus=str(tmp_path / "eval.txt")))
    parts, rep, _ = build(_demo_cfg(assets, corpus=str(tmp_path / "c.jsonl"), holdout_ids=None,
                                    allow_eval_overlap=True))
    assert rep["overlap_with_eval"] == 1


def test_training_docs_reader_refuses_evaluation_text(tmp_path):
    from tokalign.artifacts import ArtifactError, text_hash, training_docs, write_jsonl

    write_jsonl(tmp_path / "train.jsonl", [{"id": "1", "text": "fine"}, {"id": "2", "text": "an eval document"}])
    (tmp_path / "eval_hashes.json").write_text(json.dumps({"hashes": [text_hash("an eval document")],
                                                           "sources": ["e.txt"], "overlap_allowed": False}))
    with pytest.raises(ArtifactError, match=r"1 training documents are evaluation texts \(e\.txt\)"):
        training_docs(tmp_path)
    (tmp_path / "eval_hashes.json").write_text(json.dumps({"hashes": [text_hash("other")], "sources": []}))
    assert [d["id"] for d in training_docs(tmp_path)] == ["1", "2"]
