"""Ablation of our initialisation (``tokalign``): each ingredient removed (or a FOCUS/OMP rule added), scored on
held-out text with a paired interval against the full method.

    python scripts/ablate_init.py --out scripts/results/ablate_init.json
    python scripts/ablate_init.py --overrides "target_tokenizer=\\${assets:tokenizers/ggml-vocab-llama-bpe.gguf}"

Runs the app's own pipeline in-process once per variant (no training, no PubMedQA; upstream stages cached),
``init_methods=[tokalign]``, on the evaluation split as smoke mode scores it (40 held-out abstracts, first 400
bytes each). This REPORTS; defaults are chosen on the dev split (``scripts/tune_dev.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tokalign import stats  # noqa: E402
from tune_dev import score  # noqa: E402

HELD_OUT = ["eval.split=eval", "eval.pubmedqa_samples=0", "steps_stage1=0", "steps_stage2=0", "wandb.mode=disabled",
            "init_methods=[tokalign]"]
VARIANTS = {  # name: (what it changes, overrides)
    "ours": ("the default", []),
    "- special tokens by role": ("special tokens as gold matches or FVT, like other tokens",
                                 ["alignment.special_match=none"]),
    "- pieces weighed by bytes": ("new rows are FVT's plain mean of their pieces", ["alignment.piece_weights=mean"]),
    "- unseen row scale": ("no shrinking of rows of tokens the corpus never produced", ["alignment.unseen_scale=1.0"]),
    "- similarity alignment": ("nothing aligned by similarity (threshold 1)", ["similarity_threshold=1.0"]),
    "- precision guard": ("align by threshold alone, as the published rule", ["alignment.min_precision=0.0"]),
    "- calibration": ("no unigram calibration of the output rows", ["alignment.calibrate=false"]),
    "- absorption": ("no absorption of lost source tokens' probability", ["alignment.absorb=false"]),
    "+ FOCUS rows": ("new tokens with a vector take FOCUS rows instead of FVT", ["alignment.new_rows=focus"]),
    "+ OMP rows": ("new tokens with a vector take OMP rows instead of FVT", ["alignment.new_rows=omp"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--overrides", default="", help="extra overrides (space-separated), e.g. a target tokenizer")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    names = ["ours"] + [v for v in a.variants.split(",") if v != "ours"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names):
            results[name] = score(a.overrides.split() + HELD_OUT + VARIANTS[name][1], "tokalign", Path(tmp) / str(i))
            print(f"{name}: {stats.bpb_interval(results[name]['doc_bits'], results[name]['doc_bytes'])[0]:.4f}",
                  file=sys.stderr)
    ours = results["ours"]
    rows = []
    print(f"\n| variant | what changes | bits per byte [95%] | minus ours (paired 95%) | verdict |")
    print("|---|---|---|---|---|")
    for name in names:
        r = results[name]
        b, ci = stats.bpb_interval(r["doc_bits"], r["doc_bytes"])
        d, dci = stats.paired_bpb_difference(r["doc_bits"], ours["doc_bits"], r["doc_bytes"])
        verdict = "" if name == "ours" else stats.verdict(name, "ours", dci)
        rows.append({"variant": name, "overrides": VARIANTS[name][1], "bpb": b, "ci95": ci, "minus_ours": d,
                     "minus_ours_ci95": dci, "verdict": verdict})
        print(f"| {name} | {VARIANTS[name][0]} | {b:.4f} [{ci[0]:.4f}, {ci[1]:.4f}] | {d:+.4f} "
              f"[{dci[0]:+.4f}, {dci[1]:+.4f}] | {verdict} |")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"overrides": a.overrides.split() + HELD_OUT, "docs": len(ours["doc_bits"]),
                                           "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
