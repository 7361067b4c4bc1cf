"""Initialisation quality across target tokenizers: bits per byte on held-out PubMedQA abstracts.

    python scripts/bench_quality.py                                  # Qwen2, Llama-3, Llama-2; 10 eval abstracts
    python scripts/bench_quality.py --targets qwen2 --docs 40 --out bench_quality.json

Runs `python -m tokalign` (no training) once per target with the demo source (SmolLM2-135M) and
corpus, all five initialisations, sharing one cache; prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ["random", "mean", "fvt", "tokalign_1to1", "tokalign"]
TARGETS = {"qwen2": "ggml-vocab-qwen2.gguf", "llama-3": "ggml-vocab-llama-bpe.gguf",
           "llama-2": "ggml-vocab-llama-spm.gguf", "gpt-2": "ggml-vocab-gpt-2.gguf", "phi-3": "ggml-vocab-phi-3.gguf"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", nargs="+", default=["qwen2", "llama-3", "llama-2"], choices=sorted(TARGETS))
    ap.add_argument("--docs", type=int, default=10, help="held-out abstracts scored")
    ap.add_argument("--cache", default=str(REPO / ".cache" / "tokalign"))
    ap.add_argument("--out", default="bench_quality.json")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. similarity_threshold=0.4")
    args = ap.parse_args()
    rows = []
    for name in args.targets:
        with tempfile.TemporaryDirectory() as run_dir:
            cmd = [sys.executable, "-m", "tokalign", f"target_tokenizer=${{assets:tokenizers/{TARGETS[name]}}}",
                   "steps_stage1=0", "steps_stage2=0", f"eval.max_eval_samples={args.docs}", "eval.pubmedqa_samples=0",
                   "wandb.mode=disabled", f"cache_dir={args.cache}", f"hydra.run.dir={run_dir}", *args.overrides]
            r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"{name}: tokalign failed:\n{r.stderr[-3000:]}")
            m = json.loads((Path(run_dir) / "summary.json").read_text())["metrics"]
        rows.append({"target": name, "vocab": m.get("tokenize/target_vocab") or m.get("align/target_vocab"),
                     "source": m["bpb/source"], **{k: m[f"bpb/init/{k}"] for k in METHODS},
                     "exact": m.get("align/exact_share"), "aligned": m.get("align/aligned_share"),
                     "fallback": m.get("align/fallback_share")})
        print(f"{name}: done", file=sys.stderr)
    print(f"\nbits per byte on {args.docs} held-out PubMedQA abstracts (lower is better), source SmolLM2-135M\n")
    print("| target | source model | " + " | ".join(METHODS) + " | exact / aligned / fallback rows |")
    print("|---|---|" + "---|" * len(METHODS) + "---|")
    for r in rows:
        best = min(METHODS, key=lambda k: r[k])
        cells = [f"**{r[k]:.4f}**" if k == best else f"{r[k]:.4f}" for k in METHODS]
        print(f"| {r['target']} | {r['source']:.4f} | " + " | ".join(cells)
              + f" | {r['exact']:.3f} / {r['aligned']:.3f} / {r['fallback']:.3f} |")
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
