"""Initialisation quality against the amount of corpus text: every method's bits per byte at init on the same
held-out abstracts when the training corpus is 25%, 50% and 100% of the demo corpus, and 100% plus the PubMedQA
questions and long answers of the training records as extra text. Plots ``quality_vs_corpus.png``.

    python scripts/bench_corpus_scale.py --out scripts/results/quality_vs_corpus.json

The extra-text corpus is written to a temporary JSONL: training records carry abstract + question + long answer,
the 500 held-out test records their abstract alone, so the evaluation documents are the same in every run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quality import REPO, run_once  # noqa: E402

METHODS = ["fvt", "focus", "omp", "tokalign_1to1", "tokalign"]  # random and mean do not read the corpus

ASSETS = REPO.parent / "shared" / "assets"


def extra_text_corpus(path: Path) -> Path:
    """ori_pqal.json as JSONL, training records with their question and long answer appended."""
    pqal = json.loads((ASSETS / "pubmedqa" / "ori_pqal.json").read_text())
    test = set(json.loads((ASSETS / "pubmedqa" / "test_ground_truth.json").read_text()))
    with open(path, "w") as f:
        for pid, rec in pqal.items():
            parts = [" ".join(rec["CONTEXTS"])]
            if pid not in test:
                parts += [rec.get("QUESTION", ""), rec.get("LONG_ANSWER", "")]
            f.write(json.dumps({"id": pid, "text": " ".join(p for p in parts if p)}) + "\n")
    return path


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.8, 4.2))
    x = [r["train_bytes"] / 1e6 for r in rows]
    for m in METHODS:
        ys = [r[m] for r in rows]
        lo = [r[m] - r[f"{m}_ci95"][0] for r in rows]
        hi = [r[f"{m}_ci95"][1] - r[m] for r in rows]
        ax.errorbar(x, ys, yerr=[lo, hi], marker="o", capsize=3, label=m)
    ax.axhline(rows[0]["source"], color="k", ls="--", lw=1, label="source model")
    ax.set_xlabel("training text (MB)")
    ax.set_ylabel("bits per byte at init (held-out abstracts)")
    ax.set_title("initialisation quality vs corpus size (Qwen2 target)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="qwen2")
    ap.add_argument("--docs", type=int, default=40)
    ap.add_argument("--cache", default=str(REPO / ".cache" / "tokalign"))
    ap.add_argument("--out", default="scripts/results/quality_vs_corpus.json")
    ap.add_argument("--full-bytes", type=int, default=577965, help="training bytes of the whole demo corpus")
    a = ap.parse_args()
    from bench_quality import TARGETS

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        extra = extra_text_corpus(Path(tmp) / "pqal_extra.jsonl")
        runs = [(f"{int(f * 100)}%", [f"corpus_bytes={int(f * a.full_bytes)}"]) for f in (0.25, 0.5)]
        runs += [("100%", ["corpus_bytes=0"]), ("100% + questions and answers", [f"corpus={extra}"])]
        for label, ov in runs:
            row = run_once(a.target, TARGETS[a.target], a.docs, a.cache, ov + [f"init_methods=[{','.join(METHODS)}]"])
            rows.append({"corpus": label, **row})
            print(f"{label}: {row['train_bytes']} bytes, tokalign {row['tokalign']:.4f}", file=sys.stderr)
    print("\n| corpus | training bytes | " + " | ".join(METHODS) + " | BLEU-1 | gold p@1 (csls) | FOCUS/OMP rows |")
    print("|---|---|" + "---|" * len(METHODS) + "---|---|---|")
    for r in rows:
        print(f"| {r['corpus']} | {r['train_bytes']:,} | " + " | ".join(f"{r[m]:.4f}" for m in METHODS)
              + f" | {r['bleu1']:.4f} | {r['gold_p1_csls'] or 0:.4f} | {r['sparse_queries']} |")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    plot(rows, out.with_name("quality_vs_corpus.png"))


if __name__ == "__main__":
    main()
