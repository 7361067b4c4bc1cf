"""W&B tracking: offline runs land under the run directory, secrets never reach the logged config."""

from __future__ import annotations

import json
from types import SimpleNamespace

from tokalign.tracking import NullTracker, WandbTracker, make_tracker, scrub


def test_scrub_masks_secret_keys_and_env_values(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "abcd1234secretvalue")
    monkeypatch.setenv("HF_TOKEN", "hf_zzzzzzzzzzzzzzz")
    cfg = {"wandb": {"api_key": "abcd1234secretvalue", "project": "p"},
           "corpus": "https://user:hf_zzzzzzzzzzzzzzz@host/data", "hub_token": "x123456", "seed": 3}
    out = scrub(cfg)
    blob = json.dumps(out)
    assert "abcd1234secretvalue" not in blob and "hf_zzzzzzzzzzzzzzz" not in blob and "x123456" not in blob
    assert out["seed"] == 3 and out["wandb"]["project"] == "p"


def test_disabled_gives_null_tracker(tmp_path):
    w = SimpleNamespace(mode="disabled", project="p", entity=None, group=None, tags=[])
    assert type(make_tracker(w, config={}, run_dir=tmp_path, job_type="smoke", name="n", group=None)) is NullTracker


def test_offline_run_writes_under_run_dir_without_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok_supersecret_42")
    w = SimpleNamespace(mode="offline", project="tokalign-test", entity=None, group="g1", tags=["t"])
    tr = make_tracker(w, config={"source_model": "m", "note": "uses tok_supersecret_42"}, run_dir=tmp_path,
                      job_type="smoke", name="lr_stage1=2e-5", group=None)
    assert isinstance(tr, WandbTracker)
    tr.define_step("stage1")
    tr.log({"stage1/step": 1, "stage1/loss": 2.5})
    tr.log({"stage1/step": 2, "stage1/loss": 2.0})
    tr.table("bpb_by_method", ["method", "bpb"], [["fvt", 1.2], ["tokalign", 1.1]])
    tr.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = [p for p in runs[0].rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)
    for p in files:
        assert b"tok_supersecret_42" not in p.read_bytes(), p


def test_stage_metrics_with_intervals_reach_the_summary_as_numbers(tmp_path):
    w = SimpleNamespace(mode="offline", project="tokalign-test", entity=None, group=None, tags=[])
    tr = make_tracker(w, config={}, run_dir=tmp_path, job_type="smoke", name="n", group=None)
    tr.stage_done({"bpb/source": 1.08, "bpb/source/ci95": [1.04, 1.12],
                   "bpb/paired/tokalign_vs_fvt/verdict": "tokalign beats fvt", "eval/errors": ["x"]})
    summary = dict(tr.run.summary)
    tr.finish()
    assert summary["bpb/source"] == 1.08
    assert summary["bpb/source/ci95_low"] == 1.04 and summary["bpb/source/ci95_high"] == 1.12
    assert summary["bpb/paired/tokalign_vs_fvt/verdict"] == "tokalign beats fvt"
