"""Compare the jobs of a sweep without a browser.

    python -m tokalign.compare multirun/2026-11-22/10-00-00            # table + compare.csv + compare.png
    python -m tokalign.compare multirun/2026-11-22/10-00-00 --wandb offline   # also a wandb.Table in the sweep's group

One row per job: its overrides, bits per byte at every stage, PubMedQA accuracy, the dev split's recovery-curve
points (``stage<k>/eval_bpb``, ``recovery/last_ratio_to_source``: choose on these), seconds per stage. Paired
intervals between jobs on the evaluation documents: ``python scripts/bench_recovery.py --runs a=<job dir> b=...``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Optional

METRIC_COLUMNS = ("bpb/source", "bpb/init/tokalign", "bpb/init/fvt", "bpb/stage1", "bpb/stage2",
                  "pubmedqa/acc/source", "pubmedqa/acc/stage2",
                  # the dev split (choose settings on these, not on the evaluation documents): the recovery curve's
                  # last point of each stage and its ratio to the source on the same dev documents
                  "stage1/eval_bpb", "stage2/eval_bpb", "recovery/last_ratio_to_source")


def _overrides(job: Path) -> str:
    f = job / ".hydra" / "overrides.yaml"
    if not f.is_file():
        return job.name
    lines = [ln.strip()[2:] for ln in f.read_text().splitlines() if ln.strip().startswith("- ")]
    return " ".join(lines) or "(defaults)"


def collect(sweep_dir: Path) -> list[dict]:
    """One dict per job folder that has a summary.json, sorted by job number."""
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir}: no such sweep directory (expected multirun/<date>/<time>)")
    jobs = sorted((p.parent for p in sweep_dir.glob("*/summary.json")),
                  key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))
    rows = []
    for job in jobs:
        summary = json.loads((job / "summary.json").read_text())
        m, stages = summary.get("metrics", {}), summary.get("stages", {})
        row: dict = {"job": job.name, "overrides": _overrides(job)}
        for k in METRIC_COLUMNS:
            row[k] = m.get(k)
        for name, rec in stages.items():
            row[f"s/{name}"] = rec.get("seconds")
            row[f"status/{name}"] = rec.get("status")
        rows.append(row)
    if len(rows) > 1:  # show what varies between the jobs, not the overrides they share
        common = set.intersection(*(set(r["overrides"].split()) for r in rows))
        for r in rows:
            r["overrides"] = " ".join(t for t in r["overrides"].split() if t not in common) or "(shared overrides only)"
    return rows


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def render(rows: list[dict]) -> str:
    cols = ["job", "overrides", *METRIC_COLUMNS]
    time_cols = sorted({k for r in rows for k in r if k.startswith("s/")},
                       key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
    cols += time_cols
    table = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    out = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    out += ["  ".join(v.ljust(w) for v, w in zip(t, widths)) for t in table]
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [k for k in ("bpb/source", "bpb/init/tokalign", "bpb/stage1", "bpb/stage2")
              if any(isinstance(r.get(k), (int, float)) for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4))
    width = 0.8 / max(1, len(stages))
    for j, k in enumerate(stages):
        xs = [i + j * width for i in range(len(rows))]
        ax.bar(xs, [r.get(k) or 0 for r in rows], width, label=k)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([r["overrides"][:40] for r in rows], rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("bits per byte (lower is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tokalign.compare", description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--wandb", choices=("online", "offline", "disabled"), default="disabled",
                    help="also log the table as a wandb.Table (run in the sweep's group)")
    ap.add_argument("--project", default="tokalign")
    args = ap.parse_args(argv)
    try:
        rows = collect(args.sweep_dir)
    except FileNotFoundError as e:
        print(f"tokalign.compare: error: {e}", file=sys.stderr)
        return 2
    if not rows:
        print(f"tokalign.compare: error: {args.sweep_dir}: no job folder with a summary.json", file=sys.stderr)
        return 2
    print(render(rows))
    with open(args.sweep_dir / "compare.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    plot(rows, args.sweep_dir / "compare.png")
    print(f"\nwrote {args.sweep_dir / 'compare.csv'} and {args.sweep_dir / 'compare.png'}")
    if args.wandb != "disabled":
        from tokalign.tracking import make_tracker
        from types import SimpleNamespace

        wcfg = SimpleNamespace(mode=args.wandb, project=args.project, entity=None, group=None, tags=["compare"])
        tr = make_tracker(wcfg, config={"sweep_dir": str(args.sweep_dir)}, run_dir=args.sweep_dir,
                          job_type="compare", name="compare", group=str(args.sweep_dir))
        cols = list(dict.fromkeys(k for r in rows for k in r))
        tr.table("compare", cols, [[r.get(c) if not isinstance(r.get(c), (dict, list)) else str(r.get(c))
                                    for c in cols] for r in rows])
        tr.image("compare_plot", args.sweep_dir / "compare.png")
        tr.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
