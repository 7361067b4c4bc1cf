"""scripts/bench_sweep.py: the split of one job into upstream and training, and the sweep's ratio (no pipeline run)."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import REPO

_spec = importlib.util.spec_from_file_location("bench_sweep", REPO / "scripts" / "bench_sweep.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _summary(statuses: dict[str, tuple[str, float, str]]) -> dict:
    return {"metrics": {}, "stages": {n: {"status": st, "seconds": s, "key": k} for n, (st, s, k) in statuses.items()}}


SINGLE = _summary({
    "preflight": ("computed", 0.5, "p"), "corpus": ("computed", 1.0, "c"), "source": ("computed", 20.0, "s"),
    "tokenize": ("computed", 19.0, "t"), "embed": ("computed", 10.0, "e"), "align": ("computed", 5.0, "a"),
    "init": ("computed", 14.5, "i"), "evaluate_init": ("computed", 60.0, "ei"),
    "train_stage1": ("computed", 70.0, "t1-a"), "train_stage2": ("computed", 40.0, "t2-a"),
    "evaluate": ("computed", 50.0, "ev-a"),
})


def _job(lr: str, cached: bool) -> dict:
    st = "cached" if cached else "computed"
    up = {n: (("computed" if n == "preflight" else st), 0.3 if cached else r["seconds"], r["key"])
          for n, r in SINGLE["stages"].items() if not n.startswith(("train", "evaluate"))}
    up["evaluate_init"] = (st, 0.2 if cached else 60.0, "ei")
    return _summary({**up, "train_stage1": ("computed", 70.0, f"t1-{lr}"), "train_stage2": ("computed", 40.0, f"t2-{lr}"),
                     "evaluate": ("computed", 50.0, f"ev-{lr}")})


def test_split_counts_startup_as_upstream():
    split = bench.split_single(SINGLE, wall_s=320.0)
    assert split["training_s"] == pytest.approx(160.0)
    assert split["upstream_s"] == pytest.approx(160.0)  # 320 - 160: start-up and W&B counted once, as upstream
    assert split["upstream_stage_s"] == pytest.approx(130.0)
    assert split["overhead_s"] == pytest.approx(30.0)


def test_split_rejects_wall_shorter_than_training():
    with pytest.raises(ValueError):
        bench.split_single(SINGLE, wall_s=100.0)


def test_verdict_budget_and_ratio():
    v = bench.sweep_verdict(upstream_s=160.0, training_s=160.0, sweep_wall_s=700.0, n_jobs=3)
    assert v["ideal_s"] == pytest.approx(640.0)
    assert v["budget_s"] == pytest.approx(1.3 * 160 + 3 * 160)  # 688
    assert v["naive_s"] == pytest.approx(960.0)
    assert v["ratio"] == pytest.approx(700.0 / 640.0)
    assert v["upstream_factor"] == pytest.approx((700.0 - 480.0) / 160.0)
    assert not v["meets_budget"]  # 700 > 688: the sweep paid the upstream 1.375 times
    assert v["ratio_below_target"]  # the looser reading, sweep / ideal < 1.3, holds
    ok = bench.sweep_verdict(upstream_s=160.0, training_s=160.0, sweep_wall_s=680.0, n_jobs=3)
    assert ok["meets_budget"] and ok["upstream_factor"] < 1.3
    # a sweep that recomputed everything three times misses both readings
    bad = bench.sweep_verdict(upstream_s=160.0, training_s=160.0, sweep_wall_s=960.0, n_jobs=3)
    assert not bad["meets_budget"] and not bad["ratio_below_target"]
    assert bad["upstream_factor"] == pytest.approx(3.0)


def test_verdict_rejects_nonsense():
    with pytest.raises(ValueError):
        bench.sweep_verdict(upstream_s=0.0, training_s=10.0, sweep_wall_s=30.0, n_jobs=3)


def test_lr_dependent_stages_and_cache_misses():
    jobs = [_job("a", cached=False), _job("b", cached=True), _job("c", cached=True)]
    jobs[1]["stages"]["preflight"]["key"] = "p2"  # preflight's key fingerprints cache_dir's mtime: ignored
    assert bench.lr_dependent_stages(jobs) == ["train_stage1", "train_stage2", "evaluate"]
    assert bench.cache_misses(jobs, bench.TRAINING_STAGES) == []  # preflight is uncached: computed every job
    jobs[2]["stages"]["init"]["status"] = "computed"
    assert bench.cache_misses(jobs, bench.TRAINING_STAGES) == ["job2/init:computed"]
