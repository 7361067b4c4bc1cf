"""Stage-1 distillation speed without and with ``train.teacher_cache``: the pipeline's own stages up to
``train_stage1`` (cached ones reused), three runs in one cache: cache off; cache on and cold (the teacher runs
and its scores are stored); cache on and warm (another learning rate, as a sweep's next job: the scores are
read). Prints a table and writes JSON.

    python scripts/bench_teacher_cache.py --out scripts/results/bench_teacher_cache.json      # the smoke settings
    python scripts/bench_teacher_cache.py --overrides "hardware=h100 mode=research steps_stage1=50"
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokalign.cli import compose_cli  # noqa: E402
from tokalign.pipeline import STAGES, run_pipeline  # noqa: E402

UPTO = ("corpus", "source", "domain_vocab", "tokenize", "embed", "align", "init", "train_stage1")
RUNS = (("off", ["train.teacher_cache=false"]), ("cold", ["train.teacher_cache=true"]),
        ("warm", ["train.teacher_cache=true", "lr_stage1=5e-5"]))


def one(overrides: list[str]) -> dict:
    cfg = compose_cli(overrides)
    with tempfile.TemporaryDirectory() as run:
        summary = run_pipeline(cfg, Path(run), stages=[s for s in STAGES if s.name in UPTO])
    m, rec = summary["metrics"], summary["stages"]["train_stage1"]
    return {"status": rec["status"], "tokens_per_s": m.get("stage1/tokens_per_s"), "seconds": m.get("stage1/seconds"),
            "hits": m.get("stage1/teacher_cache_hits"), "misses": m.get("stage1/teacher_cache_misses"),
            "final_loss": m.get("stage1/final_loss"), "steps": cfg.steps_stage1,
            "tokens": cfg.steps_stage1 * cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.train.seq_len}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--overrides", default="", help="extra overrides for every run (Hydra syntax, one string)")
    ap.add_argument("--cache", default="", help="cache_dir (default: the config's)")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    base = ["train.objective=distill", "steps_stage2=0", "train.eval_steps=0", *shlex.split(a.overrides)]
    base += [f"cache_dir={a.cache}"] if a.cache else []
    rows = {name: one(base + extra) for name, extra in RUNS}
    print(f"{'teacher cache':<14} {'stage 1':>9} {'tokens/s':>9} {'seconds':>8} {'hits':>6} {'misses':>7} {'final loss':>11}")
    for name, r in rows.items():
        print(f"{name:<14} {r['status']:>9} {r['tokens_per_s'] or 0:>9.1f} {r['seconds'] or 0:>8.1f} "
              f"{r['hits'] if r['hits'] is not None else '-':>6} {r['misses'] if r['misses'] is not None else '-':>7} "
              f"{r['final_loss'] or 0:>11.4f}")
    if a.out:
        cmd = " ".join(["scripts/bench_teacher_cache.py", *map(shlex.quote, sys.argv[1:])])
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"command": cmd, "overrides": base, "runs": rows}, indent=1))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
