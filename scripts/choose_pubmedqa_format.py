"""Choose the PubMedQA prompt format on TRAINING-split questions (never the test questions the app reports).

Scores every format of ``tokalign.metrics.PUBMEDQA_FORMATS`` (``context``, ``abstract`` = the
lm-evaluation-harness wording, ``chat`` = the model's chat template) with the source model on a
seeded, label-stratified sample of the PubMedQA-L questions that are not in the official test
split, prints a table and writes JSON. ``EvalConfig.pubmedqa_format``'s default comes from it.

    python scripts/choose_pubmedqa_format.py --n 90 --out scripts/results/pubmedqa_format.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokalign import metrics as M  # noqa: E402
from tokalign.artifacts import write_json  # noqa: E402
from tokalign import refs, stats  # noqa: E402
from tokalign.config import default_assets_dir  # noqa: E402


def main() -> None:
    assets = default_assets_dir()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(assets / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--pqal", default=str(assets / "pubmedqa" / "ori_pqal.json"))
    ap.add_argument("--test-ids", default=str(assets / "pubmedqa" / "test_ground_truth.json"))
    ap.add_argument("--n", type=int, default=90, help="training-split questions (stratified by label)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--formats", default=",".join(M.PUBMEDQA_FORMATS))
    ap.add_argument("--out", default="")
    a = ap.parse_args()

    examples = M.load_pubmedqa(a.pqal, a.test_ids, a.n, a.seed, split="train")
    model = refs.load_model(a.model, dtype="float32")
    tok = refs.load_tokenizer(a.model)
    labels = [e["label"] for e in examples]
    rows = []
    for fmt in a.formats.split(","):
        t0 = time.time()
        r = M.pubmedqa_accuracy(model, tok, examples, fmt=fmt, desc=f"pubmedqa {fmt}")
        preds = [p["pred"] for p in r["predictions"]]
        rows.append({"format": fmt, "n": r["n"], "accuracy": r["accuracy"],
                     "ci95": stats.proportion_interval(r["correct"], r["n"]),
                     "macro_f1": stats.macro_f1(labels, preds, M.PUBMEDQA_LABELS), "pred_counts": r["pred_counts"],
                     "seconds": round(time.time() - t0, 1)})
    out = {"model": a.model, "split": "train (not in the test ids)", "n": len(examples), "seed": a.seed,
           "label_counts": {lab: labels.count(lab) for lab in M.PUBMEDQA_LABELS},
           "majority_rate": stats.majority_rate(labels), "formats": rows}
    print(f"{'format':<10} {'accuracy':>9} {'95% interval':>16} {'macro-F1':>9}  predicted (yes/no/maybe)  seconds")
    for r in rows:
        pc = r["pred_counts"]
        print(f"{r['format']:<10} {r['accuracy']:>9.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] {r['macro_f1']:>9.3f}"
              f"  {pc['yes']}/{pc['no']}/{pc['maybe']:<19} {r['seconds']}")
    print(f"majority-class rate {out['majority_rate']:.3f} on {len(examples)} training-split questions")
    if a.out:
        write_json(a.out, out)


if __name__ == "__main__":
    main()
