"""Domain adapters: instruction data (``tokalign/instruct.py``), the model side (``tokalign/adapters.py``) and the
stages ``instruct`` and ``adapters`` (tiny models in-process, then the demo end to end)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import SMALL, byte_tokenizer, make_cfg, need_assets, tiny_llama, tokalign
from tokalign import adapters as A
from tokalign import instruct
from tokalign.config import AdaptersConfig, DomainConfig, InstructSourceConfig
from tokalign.context import Context
from tokalign.stages import adapters as adapters_stage
from tokalign.stages import preflight


def _row(i: int, tag: str = "general", words: int = 12, **kw) -> dict:
    body = " ".join(f"w{i}x{j}" for j in range(words))
    return {"id": f"r{i}", "instruction": f"Question {i}?", "input": body, "output": f"Answer {i} is this.",
            "tags": [tag], **kw}


def _write(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _acfg(path: Path, **kw) -> AdaptersConfig:
    src = InstructSourceConfig(path=str(path), tags_field="tags", id_field="id")
    domains = kw.pop("domains", {"all": DomainConfig()})
    return AdaptersConfig(enabled=True, sources={"s": src}, domains=domains, min_words=8, max_words=60, **kw)


# ----------------------------------------------------------------------------------------------------------------------
# instruction data

def test_split_of_a_record_never_moves_when_records_are_added_or_capped(tmp_path):
    small = _write(tmp_path / "a.jsonl", [_row(i) for i in range(60)])
    big = _write(tmp_path / "b.jsonl", [_row(i) for i in range(300)])
    where = {}
    for path, cap in ((small, 0), (big, 0), (big, 120)):
        splits, _ = instruct.build(_acfg(path, max_records_per_domain=cap), set())
        for s, recs in splits["all"].items():
            for r in recs:
                assert where.setdefault(r.key, s) == s, f"{r.key} moved to {s}"
    capped, _ = instruct.build(_acfg(big, max_records_per_domain=100), set())
    sizes = {s: len(v) for s, v in capped["all"].items()}
    assert sum(sizes.values()) == 100
    # the cap does not pick records by the split's own hash: every split keeps roughly its share
    assert 65 <= sizes["train"] <= 95 and sizes["validation"] >= 2 and sizes["test"] >= 2, sizes


def test_faulty_records_are_skipped_and_counted_by_kind(tmp_path):
    rows = [_row(i) for i in range(20)] + [
        "{not json",  # schema error (unparseable line)
        {"id": "m1", "instruction": "Q?", "input": "x " * 10},  # no output field
        {**_row(90), "output": "   "},  # empty field
        _row(3),  # duplicate of record 3
        _row(91, words=1),  # too short
        _row(92, words=80),  # too long
        {**_row(93), "input": "a held out evaluation text of the run"},
    ]
    from tokalign.artifacts import text_hash

    held = {text_hash("a held out evaluation text of the run")}
    _, report = instruct.build(_acfg(_write(tmp_path / "d.jsonl", rows)), held)
    v = report["sources"]["s"]
    assert v["read"] == 27 and v["kept"] == 20
    assert v["faults"] == {"schema_errors": 2, "empty_fields": 1, "duplicates": 1, "too_short": 1, "too_long": 1,
                           "eval_texts": 1}
    assert any("d.jsonl" in e and ":21" in e for e in v["examples"]["schema_errors"]), v["examples"]


def test_domains_filter_by_tag_and_bad_data_names_the_file_or_domain(tmp_path):
    path = _write(tmp_path / "d.jsonl", [_row(i, tag="Neoplasms" if i % 2 else "Heart") for i in range(80)])
    splits, report = instruct.build(_acfg(path, domains={"onc": DomainConfig(match=["neoplasm"])}), set())
    assert report["domains"]["onc"]["matched"] == 40
    assert all("Neoplasms" in r.tags for recs in splits["onc"].values() for r in recs)
    with pytest.raises(instruct.InstructError, match=r"adapters.domains.none: no records"):
        instruct.build(_acfg(path, domains={"none": DomainConfig(match=["dermatology"])}), set())
    wrong = _write(tmp_path / "w.jsonl", [{"prompt": "a", "completion": "b"}] * 3)
    with pytest.raises(instruct.InstructError, match=r"w.jsonl: no record has the fields adapters.sources.s"):
        instruct.build(_acfg(wrong), set())
    with pytest.raises(ValueError, match=r"adapters.domains.a/b"):
        _acfg(path, domains={"a/b": DomainConfig()})


def test_pubmedqa_questions_become_records_with_decisions(tmp_path):
    assets = need_assets()
    src = InstructSourceConfig(path=str(assets / "pubmedqa" / "ori_pqal.json"), kind="pubmedqa")
    acfg = AdaptersConfig(enabled=True, sources={"pq": src}, domains={"g": DomainConfig()})
    splits, report = instruct.build(acfg, set())
    recs = [r for v in splits["g"].values() for r in v]
    assert report["sources"]["pq"]["read"] == 1000 and len(recs) == 1000
    assert set(report["domains"]["g"]["decisions"]) == {"yes", "no", "maybe"}
    r = recs[0]
    assert r.output.lower().startswith(r.decision) and r.tags and r.instruction.endswith("?")


# ----------------------------------------------------------------------------------------------------------------------
# the model side

def test_loss_covers_response_tokens_only_and_truncation_keeps_the_response():
    tok = byte_tokenizer()
    rec = {"instruction": "Is it?", "input": "some context " * 20, "output": "Yes. Because."}
    e = A.encode(tok, rec, max_len=400)
    resp = [t for t, lab in zip(e["input_ids"], e["labels"]) if lab != -100]
    assert tok.decode(resp) == "Yes. Because.</s>"
    assert e["labels"][: e["prompt_len"]] == [-100] * e["prompt_len"] and not e["truncated"]
    short = A.encode(tok, rec, max_len=120)
    assert len(short["input_ids"]) <= 120 and short["truncated"]
    assert tok.decode([t for t in short["labels"] if t != -100]) == "Yes. Because.</s>"
    assert tok.decode(short["input_ids"]).startswith("### Instruction:\nIs it?")


def _tiny_data(n: int) -> list[dict]:
    return [{"instruction": f"Say {w}", "input": "", "output": f"{w} {w} {w}.", "decision": None}
            for w in ("alpha", "beta", "gamma", "delta")[: n]]


def test_a_tiny_adapter_learns_saves_and_reloads_with_the_same_outputs(tmp_path):
    from peft import PeftModel

    tok = byte_tokenizer()
    tok.pad_token = tok.eos_token
    recs = _tiny_data(4)
    enc = [A.encode(tok, r, 64) for r in recs]
    acfg = AdaptersConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0, lr=2e-2, max_steps=30, micro_batch_size=2)
    model = A.with_lora(tiny_llama(vocab=len(tok)), acfg)
    before = A.loss(A.score(model, enc, {}))
    stats = A.train(model, tok, enc, acfg, tmp_path / "t", seed=0, cuda=False, bf16=False, on_log=lambda r: None)
    after = A.loss(A.score(model, enc, {}))
    assert stats["steps"] == 30 and after < before - 0.5, (before, after)
    model.save_pretrained(str(tmp_path / "ad"))
    assert (tmp_path / "ad" / "adapter_model.safetensors").is_file()
    again = PeftModel.from_pretrained(tiny_llama(vocab=len(tok)), str(tmp_path / "ad"))
    assert A.loss(A.score(again, enc, {})) == pytest.approx(after, rel=1e-5)
    with model.disable_adapter():
        assert A.loss(A.score(model, enc, {})) == pytest.approx(before, rel=1e-5)


def test_decisions_are_read_at_the_first_response_token_and_scored():
    tok = byte_tokenizer()
    recs = [{"instruction": "Q", "input": "", "output": o, "decision": d} for o, d in (("Yes.", "yes"), ("No.", "no"))]
    enc = [A.encode(tok, r, 64) for r in recs]
    first = A.decision_tokens(tok, enc, recs)
    assert first == {"yes": tok.convert_tokens_to_ids("Y"), "no": tok.convert_tokens_to_ids("N")}
    s = A.decision_scores(["yes", "no", "yes", "no"], ["yes", "yes", "yes", "no"])
    assert s["accuracy"] == 0.75 and s["correct"] == 3 and 0 < s["accuracy_ci95"][0] < 0.75 < s["accuracy_ci95"][1]
    g = A.generation_scores(["the cat sat on the mat today"], ["the cat sat on the mat today"])
    assert g["rougeL"] == pytest.approx(1.0) and g["bleu"] == pytest.approx(100.0)


def test_the_accuracy_change_is_paired_over_the_questions_both_models_answered():
    labels = ["yes", "no", None, "yes", "maybe", "no"] * 5
    base = {"scores": {"test": [{"pred": p} for p in ["no", "no", "yes", "no", "yes", None] * 5]}}
    adapter = {"scores": {"test": [{"pred": p} for p in ["yes", "no", "no", "yes", "yes", "no"] * 5]}}
    c = adapters_stage.compare_decisions(labels, adapter, base, seed=0)
    assert c["n"] == 20  # no label or no base prediction: left out
    assert c["delta"] == pytest.approx((15 - 5) / 20)  # adapter right on 15 of 20, base on 5
    assert 0 < c["ci95"][0] <= c["delta"] <= c["ci95"][1] and c["verdict"] == "adapter beats base"
    assert adapters_stage.compare_decisions([None] * 3, adapter, base, seed=0) is None
    m = adapters_stage.domain_metrics({"domain": "d", "adapter": {"loss": {"test": 1.0, "validation": 1.0},
                                                                   "ppl": {"test": 2.7}, "decisions": {}, "generation": {}},
                                       "base": {"loss": {"test": 1.1}, "decisions": {}, "generation": {}},
                                       "test_loss_change": {"delta": -0.1, "ci95": [-0.2, -0.05], "verdict": "v"},
                                       "train": {"train_loss": 1.0, "train_tokens": 10},
                                       "decision_accuracy_change": c})
    assert m["adapters/d/decision_accuracy_change"] == c["delta"] and m["adapters/d/decision_accuracy_change/ci95"] == c["ci95"]


# ----------------------------------------------------------------------------------------------------------------------
# the stage, in-process on a tiny model

def _workspace(tmp: Path) -> tuple[Context, Path]:
    tok = byte_tokenizer()
    for name in ("init", "source"):
        tiny_llama(vocab=len(tok)).save_pretrained(tmp / name / "model")
        tok.save_pretrained(tmp / name / "model")
    for d in ("a", "b"):
        for split, n in (("train", 4), ("validation", 1), ("test", 2)):
            rows = [{"key": f"{d}{i}", "source": "s", "tags": [], **r} for i, r in enumerate(_tiny_data(n))]
            (tmp / "instruct" / d).mkdir(parents=True, exist_ok=True)
            _write(tmp / "instruct" / d / f"{split}.jsonl", rows)
    (tmp / "run").mkdir()
    return Context(run_dir=tmp / "run", outputs={n: tmp / n for n in ("init", "source", "instruct")}), tmp / "out"


def test_stage_keeps_finished_domains_when_one_fails_and_resumes(tmp_path, monkeypatch):
    ctx, out = _workspace(tmp_path)
    out.mkdir()
    acfg = AdaptersConfig(enabled=True, sources={"s": InstructSourceConfig(path="x")},
                          domains={"a": DomainConfig(), "b": DomainConfig()}, method="lora", lora_r=2, lr=1e-2,
                          max_steps=3, gen_samples=1, max_new_tokens=4, max_seq_len=64)
    cfg = make_cfg(adapters=acfg)
    trained, real_train = [], A.train

    def flaky(model, tok, data, acfg, out_dir, **kw):
        trained.append(out_dir.parent.name)
        if out_dir.parent.name == "b" and trained.count("b") == 1:
            raise RuntimeError("simulated out of memory")
        return real_train(model, tok, data, acfg, out_dir, **kw)

    monkeypatch.setattr(A, "train", flaky)
    with pytest.raises(A.AdapterError, match=r"adapters.domains.b: RuntimeError: simulated out of memory"):
        adapters_stage.run(cfg, ctx, out)
    assert (out / "a" / "report.json").is_file() and not (out / "b" / "report.json").exists()
    metrics = adapters_stage.run(cfg, ctx, out)
    assert trained == ["a", "b", "b"]  # a was not trained again
    rep = json.loads((out / "b" / "report.json").read_text())
    assert rep["sizes"] == {"train": 4, "validation": 1, "test": 2} and len(rep["samples"]) == 1
    assert set(rep["matrix_row"]) == {"a", "b"}
    assert metrics["adapters/b/test_loss"] == pytest.approx(rep["adapter"]["loss"]["test"])
    lo, hi = metrics["adapters/b/test_loss_change/ci95"]
    assert lo <= metrics["adapters/b/test_loss_change"] <= hi
    matrix = json.loads((out / "matrix.json").read_text())["matrix"]
    assert set(matrix) == {"none", "a", "b"} and (ctx.run_dir / "adapters_matrix.png").is_file()
    assert (out / "a" / "adapter_model.safetensors").is_file() and not (out / "a" / "_trainer").exists()


def test_qlora_without_cuda_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    acfg = AdaptersConfig(enabled=True, sources={"s": InstructSourceConfig(path="x")}, domains={"a": DomainConfig()},
                          method="qlora")
    with pytest.raises(preflight.PreflightError, match=r"adapters.method=qlora .* needs a CUDA GPU"):
        preflight.check_adapters(make_cfg(adapters=acfg))
    assert AdaptersConfig(method="auto").resolved_method("cpu") == "lora"
    assert AdaptersConfig(method="auto").resolved_method("cuda") == "qlora"


# ----------------------------------------------------------------------------------------------------------------------
# the demo end to end

ADAPT = [
    "experiment=domain_adapters", "adapters.max_records_per_domain=40", "adapters.max_steps=4",
    "adapters.gen_samples=2", "adapters.max_new_tokens=8", "adapters.max_seq_len=160",
    "++adapters.domains={oncology: {match: [neoplasm, carcinoma, cancer, tumor]}, general: {}}",
]


def test_demo_trains_one_adapter_per_domain_and_exports_one_merged(shared_cache, tmp_path):
    run = tmp_path / "run"
    tokalign(*SMALL, *ADAPT, "export.enabled=true", "export.adapter=oncology", "export.gguf_types=[]",
             cache=shared_cache, run_dir=run)
    summary = json.loads((run / "summary.json").read_text())
    m = summary["metrics"]
    assert m["adapters/method"] == "lora" and m["adapters/base"] == "init"
    rep = json.loads((run / "stages" / "instruct" / "report.json").read_text())
    assert rep["sources"]["pubmedqa"]["faults"]["eval_texts"] == 500  # the 500 held-out test questions
    for d in ("oncology", "general"):
        r = json.loads((run / "stages" / "adapters" / d / "report.json").read_text())
        assert r["train"]["steps"] == 4 and r["sizes"]["test"] >= 2
        assert r["adapter"]["loss"]["test"] == pytest.approx(m[f"adapters/{d}/test_loss"])
        assert r["base"]["decisions"]["n"] == r["sizes"]["test"] == r["decision_accuracy_change"]["n"]
        lo, hi = r["decision_accuracy_change"]["ci95"]
        assert lo <= r["decision_accuracy_change"]["delta"] <= hi
        assert (run / "stages" / "adapters" / d / "adapter_config.json").is_file()
    assert (run / "adapters_matrix.png").is_file()
    export = json.loads((run / "stages" / "export" / "export.json").read_text())
    assert export["adapter"].endswith("adapters/oncology") or "oncology" in export["adapter"]
    assert (run / "stages" / "export" / "hf" / "model.safetensors").is_file()


def test_a_bad_adapter_source_is_a_one_line_error_naming_it(shared_cache, tmp_path):
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}] * 3)
    r = tokalign(*SMALL, *ADAPT, f"++adapters.sources={{mine: {{path: {bad}}}}}", cache=shared_cache,
                 run_dir=tmp_path / "run", check=False)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "bad.jsonl: no record has the fields adapters.sources.mine" in last, last
