"""Initialisation quality across target tokenizers: bits per byte on held-out PubMedQA abstracts.

    python scripts/bench_quality.py                      # Qwen2, Llama-3, Llama-2; smoke mode's 40 docs x 400 bytes
    python scripts/bench_quality.py --targets qwen2 gpt-2 phi-3 --docs 40 --out scripts/results/bench_quality.json

Runs `python -m tokalign` (no training) once per target with the demo source (SmolLM2-135M) and
corpus, all seven initialisations, sharing one cache; prints a markdown table (bits per byte, then the
alignment's own figures: held-out gold precision@1, BLEU-1, rows each rule set) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokalign.stages.evaluate import paired  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METHODS = ["random", "mean", "fvt", "focus", "omp", "tokalign_1to1", "tokalign"]
TARGETS = {"qwen2": "ggml-vocab-qwen2.gguf", "llama-3": "ggml-vocab-llama-bpe.gguf",
           "llama-2": "ggml-vocab-llama-spm.gguf", "gpt-2": "ggml-vocab-gpt-2.gguf", "phi-3": "ggml-vocab-phi-3.gguf"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", nargs="+", default=["qwen2", "llama-3", "llama-2"], choices=sorted(TARGETS))
    ap.add_argument("--docs", type=int, default=40, help="held-out abstracts scored")
    ap.add_argument("--cache", default=str(REPO / ".cache" / "tokalign"))
    ap.add_argument("--out", default="scripts/results/bench_quality.json")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. similarity_threshold=0.4")
    args = ap.parse_args()
    rows = []
    for name in args.targets:
        rows.append(run_once(name, TARGETS[name], args.docs, args.cache, args.overrides))
        print(f"{name}: done", file=sys.stderr)
    print_table(rows)
    Path(args.out).write_text(json.dumps(rows, indent=1))


def run_once(name: str, tokenizer_file: str, docs: int, cache: str, overrides: list[str]) -> dict:
    """One ``python -m tokalign`` run without training onto one target; its init figures as a row."""
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [sys.executable, "-m", "tokalign", f"target_tokenizer=${{assets:tokenizers/{tokenizer_file}}}",
               "steps_stage1=0", "steps_stage2=0", f"eval.max_eval_samples={docs}", "eval.pubmedqa_samples=0",
               "wandb.mode=disabled", f"cache_dir={cache}", f"hydra.run.dir={run_dir}", *overrides]
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"{name}: tokalign failed:\n{r.stderr[-3000:]}")
        m = json.loads((Path(run_dir) / "summary.json").read_text())["metrics"]
    return {"target": name, "vocab": m.get("init/vocab_size"), "docs": m["eval/docs"],
            "source": m["bpb/source"], "source_ci95": m["bpb/source/ci95"],
            **{k: m[f"bpb/init/{k}"] for k in METHODS if f"bpb/init/{k}" in m},
            **{f"{k}_ci95": m[f"bpb/init/{k}/ci95"] for k in METHODS if f"bpb/init/{k}" in m},
            "paired": {k: v for k, v in m.items() if k.startswith("bpb/paired/")},
            "exact": m.get("align/exact_share"), "aligned": m.get("align/aligned_share"),
            "fallback": m.get("align/fallback_share"), "bleu1": m.get("align/bleu1"),
            "gold_p1_cos": m.get("align/gold_p1_cos"), "gold_p1_csls": m.get("align/gold_p1_csls"),
            "sparse_queries": m.get("align/sparse_queries"), "align_seconds": m.get("align/seconds"),
            "train_bytes": m.get("corpus/train_bytes")}


def print_table(rows: list[dict]) -> None:
    """Bits per byte with 95% intervals; the best method is bold only where its paired interval against the
    runner-up excludes 0 (tokalign.stats)."""
    print("\nbits per byte on held-out PubMedQA abstracts (lower is better; 95% bootstrap intervals over documents), "
          "source SmolLM2-135M\n")
    print("| target | docs | source model | " + " | ".join(METHODS) + " | best - runner-up (paired 95%) | ours / source |")
    print("|---|---|---|" + "---|" * len(METHODS) + "---|---|")
    for r in rows:
        best, second = sorted(METHODS, key=lambda k: r[k])[:2]
        d, ci = paired(r["paired"], best, second)
        sure = ci[1] < 0
        cells = [(f"**{r[k]:.4f}**" if k == best and sure else f"{r[k]:.4f}") + f" [{r[k + '_ci95'][0]:.3f}, "
                 f"{r[k + '_ci95'][1]:.3f}]" for k in METHODS]
        print(f"| {r['target']} | {r['docs']} | {r['source']:.4f} | " + " | ".join(cells)
              + f" | {best} - {second} = {d:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}] | {r['tokalign'] / r['source']:.3f} |")
    print("\n| target | gold p@1 (cos) | gold p@1 (csls) | BLEU-1 (1:1 map) | exact share | aligned share | "
          "new tokens with a vector (FOCUS/OMP rows) | align seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = [r.get(k) for k in ("gold_p1_cos", "gold_p1_csls", "bleu1", "exact", "aligned")]
        print(f"| {r['target']} | " + " | ".join("" if v is None else f"{v:.4f}" for v in f)
              + f" | {r.get('sparse_queries')} | {r.get('align_seconds')} |")


if __name__ == "__main__":
    main()
