"""Choose a quality default on the DEV split (never the evaluation documents), with paired intervals.

Runs the app's own pipeline in-process once per value of one config key, with ``eval.split=dev``
(the evaluate stages score ``corpus/dev.jsonl``: a stable-hash share of the training corpus kept
out of training), no training stages and no PubMedQA; every upstream stage comes from the cache.
For each value it reads the per-document bits of ``init_method`` from ``evaluate_init`` and
prints bits per byte with its interval and the paired difference against the best value.
``tokalign/config.py`` cites the command and result for each default chosen this way.

    python scripts/tune_dev.py --key alignment.unseen_scale --values 0.6,0.7,0.8,0.9,1.0 \
        --out scripts/results/tune_unseen_scale.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokalign import stats  # noqa: E402
from tokalign.__main__ import apply_hardware  # noqa: E402
from tokalign.cli import compose_cli  # noqa: E402
from tokalign.pipeline import run_pipeline  # noqa: E402

DEV = ["eval.split=dev", "eval.max_eval_samples=0", "eval.max_doc_bytes=0", "eval.pubmedqa_samples=0",
       "steps_stage1=0", "steps_stage2=0", "wandb.mode=disabled"]


def score(overrides: list[str], method: str, run_dir: Path) -> dict:
    cfg = compose_cli(overrides)
    apply_hardware(cfg)
    summary = run_pipeline(cfg, run_dir)
    bpb = json.loads((Path(summary["stages"]["evaluate_init"]["path"]) / "bpb.json").read_text())
    return bpb["init"][method]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--key", required=True, help="config key to choose, e.g. alignment.unseen_scale")
    ap.add_argument("--values", required=True, help="comma-separated candidate values")
    ap.add_argument("--method", default="tokalign", help="init method whose rows the key changes")
    ap.add_argument("--overrides", default="", help="extra overrides (space-separated), e.g. a target tokenizer")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    extra = a.overrides.split() + DEV + [f"init_methods=[{a.method}]"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in a.values.split(","):
            results[v] = score(extra + [f"{a.key}={v}"], a.method, Path(tmp) / v)
    bpb = {v: stats.bpb_interval(r["doc_bits"], r["doc_bytes"]) for v, r in results.items()}
    best = min(bpb, key=lambda v: bpb[v][0])
    rows = []
    print(f"{a.key} on the dev split ({len(results[best]['doc_bits'])} documents, {results[best]['bytes']} bytes), "
          f"method {a.method}")
    print(f"{'value':>8} {'bpb':>8} {'95% interval':>18} {'minus best':>11} {'paired 95% interval':>22}")
    for v, r in results.items():
        d, ci = stats.paired_bpb_difference(r["doc_bits"], results[best]["doc_bits"], r["doc_bytes"])
        rows.append({"value": v, "bpb": bpb[v][0], "ci95": bpb[v][1], "minus_best": d, "minus_best_ci95": ci})
        print(f"{v:>8} {bpb[v][0]:>8.4f} [{bpb[v][1][0]:.4f}, {bpb[v][1][1]:.4f}] {d:>+11.4f} "
              f"[{ci[0]:+.4f}, {ci[1]:+.4f}]")
    print(f"best: {a.key}={best}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"key": a.key, "method": a.method, "overrides": extra, "best": best,
                                           "docs": len(results[best]["doc_bits"]), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
