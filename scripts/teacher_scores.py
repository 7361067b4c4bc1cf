"""Fill the teacher-score cache of ``train.teacher_cache=true`` ahead of training: the source model's log-probabilities
of every packed training block, scored once (e.g. on a CPU machine), then read by every training run with the same
source, target tokenizer, precision and ``train.seq_len`` instead of running the teacher. Takes the same overrides
as the run it prepares; runs (or reuses) the stages up to ``tokenize``; resumes where it stopped (stored blocks
are skipped). Prints a table and writes JSON.

    python scripts/teacher_scores.py train.seq_len=256 --out scripts/results/teacher_scores_smoke.json
    python -m tokalign train.objective=distill train.teacher_cache=true train.seq_len=256     # then reads them
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokalign.cli import compose_cli  # noqa: E402
from tokalign.pipeline import STAGES, run_pipeline  # noqa: E402


def fill(cfg, paths: dict[str, Path], limit: int = 0, progress: bool = True) -> dict:
    """Score every packed block (the first ``limit`` when > 0) not yet stored; returns counts and timings."""
    import torch
    from tqdm import tqdm

    from tokalign import distill, refs
    from tokalign.artifacts import load_stream
    from tokalign.data import pack_blocks
    from tokalign.metrics import start_token_id

    tok = refs.load_tokenizer(str(paths["tokenize"] / "target_tokenizer"))
    ids, offsets = load_stream(paths["tokenize"], "target")
    blocks = pack_blocks(ids, offsets, tok.eos_token_id, cfg.train.seq_len)
    n = len(blocks) if limit <= 0 else min(limit, len(blocks))
    src = paths["source"] / "model"
    teacher = refs.load_model(str(src), dtype=cfg.hardware.dtype, device=cfg.hardware.device).eval()
    teacher_tok = refs.load_tokenizer(str(src))
    store = distill.TeacherScores(distill.teacher_scores_root(cfg.cache_dir, paths["source"], paths["tokenize"],
                                                              cfg.hardware.dtype))
    tb, start = distill.token_bytes(tok), start_token_id(teacher_tok)
    t0, teacher_tokens = time.time(), 0
    with torch.inference_mode():
        for row in tqdm(blocks[:n], desc="teacher scores", unit="block", disable=not progress):
            block = row.tolist()
            segs = distill.align_chunks(block, tb, teacher_tok).teacher_ids
            before = store.misses
            store.scores(teacher, block, segs, start, cfg.hardware.device)
            teacher_tokens += sum(len(s) for s in segs) if store.misses > before else 0
    secs = time.time() - t0
    return {"root": str(store.root), "blocks": n, "of_blocks": int(len(blocks)), "seq_len": cfg.train.seq_len,
            "scored": store.misses, "already_stored": store.hits, "teacher_tokens": teacher_tokens,
            "seconds": round(secs, 1), "teacher_tokens_per_s": round(teacher_tokens / secs, 1) if secs > 0 else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="the training run's overrides (Hydra syntax)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N blocks (0 = all)")
    ap.add_argument("--out", default="", help="write the result as JSON here")
    a = ap.parse_args()
    cfg = compose_cli(list(a.overrides))
    with tempfile.TemporaryDirectory() as run:
        summary = run_pipeline(cfg, Path(run), stages=[s for s in STAGES if s.name in ("corpus", "source",
                                                                                          "domain_vocab", "tokenize")])
    paths = {k: Path(v["path"]) for k, v in summary["stages"].items() if v.get("path")}
    r = {"command": " ".join(["scripts/teacher_scores.py", *sys.argv[1:]]), **fill(cfg, paths, a.limit)}
    print(f"{'blocks':>8} {'scored':>8} {'stored before':>14} {'teacher tokens':>15} {'seconds':>8} {'tok/s':>8}")
    print(f"{r['blocks']:>8} {r['scored']:>8} {r['already_stored']:>14} {r['teacher_tokens']:>15} {r['seconds']:>8} "
          f"{r['teacher_tokens_per_s'] or 0:>8}")
    print(f"stored in {r['root']}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(r, indent=1))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
