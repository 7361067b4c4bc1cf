"""End to end on the real assets (SmolLM2-135M GGUF, GGUF tokenizers, PubMedQA), with small budgets.

All tests here share one cache (session scope), so the source model is converted and the corpus
tokenized once; each test still runs the real `python -m tokalign` in a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, SMALL, need_assets, tokalign

pytestmark = pytest.mark.slow

def test_pipeline_on_real_assets_beats_random_and_mean(shared_cache, tmp_path):
    tokalign(*SMALL, "wandb.mode=offline", cache=shared_cache, run_dir=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    m = summary["metrics"]
    for k in ("bpb/source", "bpb/init/random", "bpb/init/mean", "bpb/init/fvt", "bpb/init/tokalign_1to1",
              "bpb/init/tokalign", "align/exact_share", "align/aligned_share", "align/fallback_share"):
        assert isinstance(m.get(k), float), k
    assert m["bpb/init/tokalign"] < m["bpb/init/random"]
    assert m["bpb/init/tokalign"] < m["bpb/init/mean"]
    assert abs(m["align/exact_share"] + m["align/aligned_share"] + m["align/fallback_share"]
               + m.get("align/special_share", 0.0) - 1.0) < 1e-6
    for name, rec in summary["stages"].items():
        assert rec["status"] in ("computed", "cached", "skipped"), (name, rec)
        assert "seconds" in rec
    for f in ("bpb_by_method.png", "similarity_hist.png"):
        assert (tmp_path / f).is_file(), f
    model_dir = tmp_path / "stages" / "init" / "model"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert model.get_input_embeddings().weight.shape[0] >= len(tok) == 151936
    assert any((tmp_path / "wandb").glob("offline-run-*"))


def test_identical_tokenizer_reproduces_source_bpb(shared_cache, tmp_path):
    src = str(need_assets() / "models/SmolLM2-135M-Instruct.Q4_1.gguf")
    tokalign(*SMALL, f"target_tokenizer={src}", "init_methods=[tokalign]", "wandb.mode=disabled",
             cache=shared_cache, run_dir=tmp_path)
    m = json.loads((tmp_path / "summary.json").read_text())["metrics"]
    assert abs(m["bpb/init/tokalign"] - m["bpb/source"]) < 1e-3
    assert m["align/exact_share"] + m.get("align/special_share", 0.0) > 0.999


def test_a_users_txt_corpus_runs_as_given_on_its_stable_hash_holdout(shared_cache, tmp_path):
    """The README's own-corpus command with a .txt corpus that is not PubMedQA: the default holdout_ids (PubMedQA's
    test IDs) name none of its documents, so a stable-hash share is held out and scored, and the log says so."""
    assets = need_assets()
    pqal = json.loads((assets / "pubmedqa/ori_pqal.json").read_text())
    test = set(json.loads((assets / "pubmedqa/test_ground_truth.json").read_text()))
    notes = tmp_path / "notes.txt"  # the long answers of the training questions: another kind of medical text
    notes.write_text("\n".join(r["LONG_ANSWER"] for k, r in pqal.items() if k not in test))
    run = tmp_path / "run"
    r = tokalign(f"corpus={notes}", f"target_tokenizer={assets}/tokenizers/ggml-vocab-gpt-2.gguf",
                 "init_methods=[fvt,tokalign]", "eval.max_eval_samples=8", "eval.pubmedqa_samples=0", "embed.epoch=3",
                 "pivot_count=200", "steps_stage1=0", "steps_stage2=0", "wandb.mode=disabled",
                 cache=shared_cache, run_dir=run)
    assert "named none of the corpus's documents" in r.stdout + r.stderr
    report = json.loads((run / "stages" / "corpus" / "report.json").read_text())
    assert report["holdout"].startswith("hash_fraction (holdout_ids named none")
    assert report["eval_documents"] > 8 and report["dev_documents"] > 0 and report["overlap_with_eval"] == 0
    evaluated = [json.loads(line)["id"] for line in (run / "stages" / "corpus" / "eval.jsonl").read_text().splitlines()]
    assert all(i.startswith("notes.txt:") for i in evaluated)
    m = json.loads((run / "summary.json").read_text())["metrics"]
    assert m["eval/docs"] == 8 and m["corpus/eval_docs"] == report["eval_documents"]
    for k in ("bpb/source", "bpb/init/fvt", "bpb/init/tokalign"):
        lo, hi = m[f"{k}/ci95"]
        assert lo <= m[k] <= hi
    assert "bpb/paired/fvt_vs_tokalign/ci95" in m


def test_sweep_shares_cache_and_groups_wandb_runs(shared_cache, tmp_path):
    sweep = tmp_path / "sweep"
    tokalign(*SMALL, "init_methods=[mean,tokalign]", "steps_stage1=2", "train.seq_len=64", "train.micro_batch_size=2",
             "train.save_steps=1", "eval.max_eval_samples=2", "eval.pubmedqa_samples=0", "lr_stage1=1e-4,2e-4",
             "wandb.mode=offline", cache=shared_cache, run_dir=sweep, multirun=True)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == 2
    s0, s1 = (json.loads((j / "summary.json").read_text()) for j in jobs)
    for stage in ("corpus", "source", "tokenize", "embed", "align", "init"):
        assert s1["stages"][stage]["status"] == "cached", stage
    assert s0["stages"]["train_stage1"]["status"] == s1["stages"]["train_stage1"]["status"] == "computed"
    assert s0["stages"]["train_stage1"]["key"] != s1["stages"]["train_stage1"]["key"]
    assert all((j / "similarity_hist.png").is_file() for j in jobs)  # job 1 reused align: its plot is copied too
    runs = [r for j in jobs for r in (j / "wandb").glob("offline-run-*")]
    assert len(runs) == 2
    for r in runs:
        blob = b"".join(p.read_bytes() for p in r.rglob("*.wandb"))
        assert str(sweep).encode() in blob  # the group is the sweep directory
    r = subprocess.run([sys.executable, "-m", "tokalign.compare", str(sweep)], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "lr_stage1=0.0001" in r.stdout and "lr_stage1=0.0002" in r.stdout
    assert (sweep / "compare.csv").is_file() and (sweep / "compare.png").is_file()
