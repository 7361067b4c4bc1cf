"""Recovery by training objective: held-out bits per byte after each stage, paired against the initialisation and
between objectives on the same documents, and the recovery curve's tokens to within 5% / 2% of the source.

    python scripts/bench_recovery.py                                   # smoke budget: lm vs distill, one shared cache
    python scripts/bench_recovery.py --objectives lm distill mix -- steps_stage1=200 steps_stage2=0 train.eval_steps=25
    python scripts/bench_recovery.py --runs lm=/tmp/runA distill=/tmp/runB     # tabulate runs already made

Runs ``python -m tokalign train.objective=<o>`` per objective (the stages before training are shared through the
cache), prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokalign import stats  # noqa: E402
from tokalign.artifacts import write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run(objective: str, cache: str, run_dir: Path, overrides: list[str]) -> Path:
    cmd = [sys.executable, "-m", "tokalign", f"cache_dir={cache}", f"train.objective={objective}",
           f"hydra.run.dir={run_dir}", "wandb.mode=disabled", *overrides]
    print("+", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    return run_dir


def read(run_dir: Path) -> dict:
    m = json.loads((run_dir / "summary.json").read_text())["metrics"]
    final = json.loads((run_dir / "evaluate" / "final.json").read_text())  # evaluate is not cached: in the run
    return {"metrics": m, "docs": final.get("bpb", {}), "curve": final.get("recovery", {})}


def row(name: str, r: dict) -> dict:
    m = r["metrics"]
    keys = ["bpb/source", "bpb/init/tokalign", "bpb/stage1", "bpb/stage1/ci95", "bpb/paired/stage1_vs_init",
            "bpb/paired/stage1_vs_init/ci95", "bpb/stage2", "bpb/paired/stage2_vs_init/ci95", "bpb/source_dev",
            "recovery/tokens_to_within_5pct", "recovery/tokens_to_within_2pct", "recovery/last_ratio_to_source",
            "stage1/tokens_seen", "stage1/tokens_per_s", "stage1/seconds"]
    return {"objective": name, **{k: m.get(k) for k in keys}, "curve": r["curve"].get("points", [])}


def between(a: str, b: str, ra: dict, rb: dict, stage: str) -> dict:
    """bpb(a) - bpb(b) of one stage's model, paired over the same evaluation documents."""
    da, db = ra["docs"].get(stage), rb["docs"].get(stage)
    if not da or not db or da["doc_bytes"] != db["doc_bytes"]:
        return {}
    diff, ci = stats.paired_bpb_difference(da["doc_bits"], db["doc_bits"], da["doc_bytes"])
    return {"pair": f"{a} - {b}", "stage": stage, "diff": diff, "ci95": ci, "verdict": stats.verdict(a, b, ci)}


def fmt(x, spec=".4f"):
    return "—" if x is None else (f"[{x[0]:{spec}}, {x[1]:{spec}}]" if isinstance(x, list) else format(x, spec)
                                  if isinstance(x, float) else str(x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objectives", nargs="+", default=["lm", "distill"], choices=["lm", "distill", "mix"])
    ap.add_argument("--runs", nargs="*", default=None, help="name=run_dir of runs already made (no new runs)")
    ap.add_argument("--cache", default=str(REPO / ".cache" / "tokalign"))
    ap.add_argument("--out", type=Path, default=REPO / "scripts" / "results" / "recovery.json")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. steps_stage1=200")
    args = ap.parse_args()
    if args.runs:
        dirs = {n: Path(d) for n, d in (s.split("=", 1) for s in args.runs)}
    else:
        tmp = Path(tempfile.mkdtemp(prefix="bench_recovery_"))
        dirs = {o: run(o, args.cache, tmp / o, args.overrides) for o in args.objectives}
    results = {n: read(d) for n, d in dirs.items()}
    rows = [row(n, r) for n, r in results.items()]
    print("| objective | bpb stage 1 [95%] | stage 1 - init [95%] | stage 2 - init [95%] | tokens to 5% / 2% of "
          "source | last / source (dev) | stage-1 tokens/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['objective']} | {fmt(r['bpb/stage1'])} {fmt(r['bpb/stage1/ci95'])} | "
              f"{fmt(r['bpb/paired/stage1_vs_init'], '+.4f')} {fmt(r['bpb/paired/stage1_vs_init/ci95'], '+.4f')} | "
              f"{fmt(r['bpb/paired/stage2_vs_init/ci95'], '+.4f')} | {fmt(r['recovery/tokens_to_within_5pct'])} / "
              f"{fmt(r['recovery/tokens_to_within_2pct'])} | {fmt(r['recovery/last_ratio_to_source'], '.3f')} | "
              f"{fmt(r['stage1/tokens_per_s'], '.0f')} |")
    names = list(results)
    pairs = [between(a, b, results[a], results[b], s) for i, a in enumerate(names) for b in names[i + 1:]
             for s in ("stage1", "stage2")]
    for p in (p for p in pairs if p):
        print(f"{p['stage']}: {p['pair']} = {p['diff']:+.4f} {fmt(p['ci95'], '+.4f')}: {p['verdict']}")
    write_json(args.out, {"runs": {n: str(d) for n, d in dirs.items()}, "overrides": args.overrides, "rows": rows,
                          "pairs": [p for p in pairs if p]})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
