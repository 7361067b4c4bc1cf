"""Benchmark a learning-rate sweep against one job: does the cache make a 3-job sweep cheap (issue #4)?

    python scripts/bench_sweep.py                              # smoke mode, demo assets, lr_stage1 2e-5,5e-5,6.4e-4
    python scripts/bench_sweep.py --lrs 1e-4,3e-4 --extra steps_stage1=2 steps_stage2=1 --keep --out sweep.json

Two timed runs of the real CLI, each from its own fresh, empty cache directory under --workdir:

1. one job, ``python -m tokalign lr_stage1=<first lr> cache_dir=<workdir>/single/cache hydra.run.dir=...``;
2. the sweep, ``python -m tokalign -m lr_stage1=<lrs> cache_dir=<workdir>/sweep/cache hydra.sweep.dir=...``.

The single job is split with its ``summary.json``: "training" is the stages whose cache key depends on
``lr_stage1`` (found by comparing the keys of the sweep's jobs; train_stage1, train_stage2 and evaluate),
"upstream" is everything else, *including process start-up and W&B set-up*: upstream = single wall clock
minus the training stages' seconds, so the overhead outside the stages is counted once, as upstream.
The issue's target is ``sweep wall < 1.3 x upstream + N x training``; also printed is
``ratio = sweep wall / (upstream + N x training)`` (1.0 = a sweep that costs exactly the ideal). The sweep's
jobs 2..N must report every cached upstream stage as "cached" (``preflight`` is never cached: it runs per job).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional

REPO = Path(__file__).resolve().parents[1]
TRAINING_STAGES = ("train_stage1", "train_stage2", "evaluate")  # what an lr_stage1 sweep recomputes per job
UNCACHED_STAGES = ("preflight", "evaluate")  # Stage(cached=False) in tokalign/pipeline.py: they run every job
TARGET = 1.3


# ----------------------------------------------------------------------------------------- pure computation
def lr_dependent_stages(job_summaries: list[dict], ignore: Iterable[str] = ("preflight",)) -> list[str]:
    """Stages whose cache key differs between the sweep's jobs (so they depend on the swept key), in order.

    ``preflight`` is ignored: it is never cached, and its key fingerprints ``cache_dir`` (a path that exists,
    so its mtime counts), which changes between jobs as the cache fills."""
    ignore = set(ignore)
    names: list[str] = []
    for s in job_summaries:
        for n in s["stages"]:
            if n not in names and n not in ignore:
                names.append(n)
    out = []
    for n in names:
        keys = {s["stages"].get(n, {}).get("key") for s in job_summaries}
        if len(keys) > 1:
            out.append(n)
    return out


def split_single(summary: dict, wall_s: float, training: Iterable[str] = TRAINING_STAGES) -> dict:
    """Split one job's wall clock into training (the named stages' seconds) and upstream (all the rest,
    process start-up and W&B included)."""
    training = list(training)
    stages = summary["stages"]
    training_s = sum(float(stages[n].get("seconds", 0.0)) for n in training if n in stages)
    upstream_stage_s = sum(float(r.get("seconds", 0.0)) for n, r in stages.items() if n not in training)
    upstream_s = wall_s - training_s
    if upstream_s < 0:
        raise ValueError(f"training stages take {training_s:.1f} s, more than the job's wall clock {wall_s:.1f} s")
    return {"wall_s": wall_s, "training_s": training_s, "upstream_s": upstream_s,
            "upstream_stage_s": upstream_stage_s, "overhead_s": upstream_s - upstream_stage_s,
            "training_stages": training}


def sweep_verdict(upstream_s: float, training_s: float, sweep_wall_s: float, n_jobs: int,
                  target: float = TARGET) -> dict:
    """The issue's budget and ratios for a sweep of ``n_jobs`` that shares one job's upstream stages.

    budget = target x upstream + n_jobs x training (the issue's target: sweep wall < budget);
    ratio = sweep wall / (upstream + n_jobs x training), the cost against the ideal (upstream paid once);
    upstream_factor = (sweep wall - n_jobs x training) / upstream: how many times the upstream was paid.
    """
    if upstream_s <= 0 or training_s < 0 or n_jobs < 1:
        raise ValueError(f"bad inputs: upstream {upstream_s}, training {training_s}, jobs {n_jobs}")
    ideal = upstream_s + n_jobs * training_s
    budget = target * upstream_s + n_jobs * training_s
    naive = n_jobs * (upstream_s + training_s)
    return {"n_jobs": n_jobs, "target": target, "ideal_s": ideal, "budget_s": budget, "naive_s": naive,
            "sweep_wall_s": sweep_wall_s, "ratio": sweep_wall_s / ideal,
            "upstream_factor": (sweep_wall_s - n_jobs * training_s) / upstream_s,
            "meets_budget": sweep_wall_s < budget, "ratio_below_target": sweep_wall_s / ideal < target}


def cache_misses(job_summaries: list[dict], training: Iterable[str],
                 uncached: Iterable[str] = UNCACHED_STAGES) -> list[str]:
    """``job<i>/<stage>`` for every upstream, cacheable stage that jobs 2..N did not take from the cache."""
    skip = set(training) | set(uncached)
    bad = []
    for i, s in enumerate(job_summaries[1:], start=1):
        for n, r in s["stages"].items():
            if n not in skip and r.get("status") not in ("cached", "skipped"):
                bad.append(f"job{i}/{n}:{r.get('status')}")
    return bad


# ------------------------------------------------------------------------------------------------- running
def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run ``cmd`` with its output in ``log``; (wall seconds, CPU seconds of it and its children)."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    env.pop("WANDB_API_KEY", None)
    print("+", " ".join(cmd), flush=True)
    t0, c0 = time.perf_counter(), _cpu_children()
    with open(log, "w") as fh:
        r = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env)
    wall, cpu = time.perf_counter() - t0, _cpu_children() - c0
    if r.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"exit {r.returncode} after {wall:.0f} s: {' '.join(cmd)}\n{tail}")
    print(f"  {wall:.1f} s wall, {cpu:.1f} s CPU (log {log})", flush=True)
    return wall, cpu


def _job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def _job_spans(jobs: list[Path], sweep_end: float) -> list[Optional[float]]:
    """Approximate wall clock of each sweep job: from its .hydra/config.yaml (written at job start) to the next
    job's (the last one: to the end of the sweep process); the sweep's own start-up is in none of them."""
    starts = []
    for j in jobs:
        f = j / ".hydra" / "config.yaml"
        starts.append(f.stat().st_mtime if f.exists() else None)
    ends = starts[1:] + [sweep_end]
    return [round(e - s, 1) if s is not None and e is not None else None for s, e in zip(starts, ends)]


def _fmt(x: float) -> str:
    return f"{x:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lrs", default="2e-5,5e-5,6.4e-4", help="lr_stage1 values of the sweep (comma-separated); "
                    "the single job uses the first")
    ap.add_argument("--workdir", default=None, help="where the caches and run directories go (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the workdir (caches, run dirs, logs) afterwards")
    ap.add_argument("--extra", nargs="*", default=[], help="extra Hydra overrides for both runs, e.g. steps_stage1=2")
    ap.add_argument("--out", default="bench_sweep.json")
    args = ap.parse_args()

    lrs = [s.strip() for s in args.lrs.split(",") if s.strip()]
    for s in lrs:
        float(s)  # fail early on a typo; Hydra parses 2e-5 and 6.4e-4 as floats
    if len(lrs) < 2:
        ap.error("--lrs needs at least two values")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_sweep_")).resolve()
    single, sweep = workdir / "single", workdir / "sweep"
    for d in (single, sweep):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    py = [sys.executable, "-m", "tokalign"]
    extra = list(args.extra)
    single_cmd = [*py, f"lr_stage1={lrs[0]}", f"cache_dir={single / 'cache'}", f"hydra.run.dir={single / 'run'}", *extra]
    sweep_cmd = [*py, "-m", f"lr_stage1={','.join(lrs)}", f"cache_dir={sweep / 'cache'}",
                 f"hydra.sweep.dir={sweep / 'runs'}", *extra]
    load_before = os.getloadavg()
    try:
        single_wall, single_cpu = _run(single_cmd, single / "log.txt")
        sweep_wall, sweep_cpu = _run(sweep_cmd, sweep / "log.txt")
        sweep_end = time.time()
        load_after = os.getloadavg()
        s_summary = json.loads((single / "run" / "summary.json").read_text())
        jobs = _job_dirs(sweep / "runs")
        j_summaries = [json.loads((j / "summary.json").read_text()) for j in jobs]
        spans = _job_spans(jobs, sweep_end)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if len(jobs) != len(lrs):
        raise SystemExit(f"expected {len(lrs)} sweep jobs, found {len(jobs)}")

    dependent = lr_dependent_stages(j_summaries)
    training = list(TRAINING_STAGES) + [n for n in dependent if n not in TRAINING_STAGES]
    split = split_single(s_summary, single_wall, training)
    verdict = sweep_verdict(split["upstream_s"], split["training_s"], sweep_wall, len(jobs))
    misses = cache_misses(j_summaries, training)
    same_keys = [n for n in s_summary["stages"] if n not in training and n != "preflight"
                 and s_summary["stages"][n].get("key") != j_summaries[0]["stages"].get(n, {}).get("key")]

    n = len(jobs)
    print()
    print(f"| single upstream s | single training s | sweep wall s ({n} jobs) | ideal (upstream + {n} x training) "
          f"| budget ({TARGET} x upstream + {n} x training) | ratio sweep / ideal | meets budget |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {_fmt(split['upstream_s'])} | {_fmt(split['training_s'])} | {_fmt(sweep_wall)} | {_fmt(verdict['ideal_s'])} "
          f"| {_fmt(verdict['budget_s'])} | {verdict['ratio']:.3f} | {'yes' if verdict['meets_budget'] else 'NO'} |")
    print()
    print(f"single job {_fmt(single_wall)} s = upstream stages {_fmt(split['upstream_stage_s'])} s + training stages "
          f"{_fmt(split['training_s'])} s + start-up/W&B/outside stages {_fmt(split['overhead_s'])} s; "
          f"upstream paid {verdict['upstream_factor']:.2f} times in the sweep (target < {TARGET}); "
          f"a sweep without the cache would cost about {_fmt(verdict['naive_s'])} s")
    print()
    print("| stage | single | " + " | ".join(f"job {i} (lr {lr})" for i, lr in enumerate(lrs)) + " |")
    print("|---|---|" + "---|" * n)
    for name, rec in s_summary["stages"].items():
        cells = [f"{r['stages'].get(name, {}).get('status', '-')} {float(r['stages'].get(name, {}).get('seconds', 0)):.1f}"
                 for r in j_summaries]
        tag = " (lr-dependent)" if name in training else ""
        print(f"| {name}{tag} | {rec.get('status')} {float(rec.get('seconds', 0)):.1f} | " + " | ".join(cells) + " |")
    print("| job wall (approx.) | " + _fmt(single_wall) + " | " + " | ".join(_fmt(s) if s else "-" for s in spans) + " |")
    print()
    if misses:
        print("CACHE MISSES in jobs 2..N: " + ", ".join(misses))
    else:
        print(f"jobs 2..{n}: every cacheable upstream stage was cached")
    if same_keys:
        print("upstream keys differ between the single job and sweep job 0: " + ", ".join(same_keys))
    print(f"CPU seconds: single {_fmt(single_cpu)} ({single_cpu / single_wall:.2f} cores busy), sweep {_fmt(sweep_cpu)} "
          f"({sweep_cpu / sweep_wall:.2f} cores busy), sweep/single CPU {sweep_cpu / single_cpu:.2f} x; "
          f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
          f"({os.cpu_count()} cores; other work on them slows the training stages and voids the comparison)")

    result = {"command": {"single": single_cmd, "sweep": sweep_cmd}, "lrs": lrs, "extra": extra,
              "single": {**split, "cpu_s": single_cpu, "summary_stages": s_summary["stages"]},
              "sweep": {**verdict, "cpu_s": sweep_cpu, "job_walls_approx_s": spans, "lr_dependent_stages": dependent,
                        "cache_misses": misses, "upstream_keys_differ": same_keys,
                        "jobs": [{"dir": j.name, "stages": s["stages"]} for j, s in zip(jobs, j_summaries)]},
              "loadavg": {"before": load_before, "after": load_after}, "cores": os.cpu_count(),
              "workdir": str(workdir) if args.keep else None}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    if misses:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
