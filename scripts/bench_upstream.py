"""Benchmark the upstream stages: tokenization MB/s against worker count, fastText tokens/s against threads.

    python scripts/bench_upstream.py                           # demo assets, prints two tables
    python scripts/bench_upstream.py --workers 1 2 4 8 --threads 1 2 4 --mb 8 --out bench_upstream.json

The corpus is the PubMedQA abstracts repeated to --mb megabytes; the tokenizers are SmolLM2's and
Qwen2's (both encoded per document, as the tokenize stage does). fastText trains skipgram on the
Qwen2 token stream (dim 100, 1 epoch) with each thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokalign import refs  # noqa: E402
from tokalign.config import default_assets_dir  # noqa: E402
from tokalign.stages.corpus import iter_records  # noqa: E402
from tokalign.stages.embed import train_vectors  # noqa: E402
from tokalign.stages.tokenize import encode_corpus  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--mb", type=float, default=4.0, help="corpus size for the tokenization timing")
    ap.add_argument("--out", default="bench_upstream.json")
    args = ap.parse_args()
    assets = default_assets_dir()
    base = [t for _, t in iter_records(str(assets / "pubmedqa/ori_pqal.json"))]
    texts, size = [], 0
    while size < args.mb * 1e6:
        for t in base:
            texts.append(t)
            size += len(t.encode())
    with tempfile.TemporaryDirectory() as tmp:
        dirs = []
        for name, ref in (("source", str(assets / "models/SmolLM2-135M-Instruct.Q4_1.gguf")),
                          ("target", str(assets / "tokenizers/ggml-vocab-qwen2.gguf"))):
            tok = refs.load_tokenizer(ref)
            tok.save_pretrained(Path(tmp) / name)
            dirs.append(str(Path(tmp) / name))
        tok_rows = []
        for w in args.workers:
            (ids, _), _, secs = encode_corpus(texts, dirs, w)
            tok_rows.append({"workers": w, "mb": round(size / 1e6, 2), "seconds": round(secs, 2),
                             "mb_per_s": round(size / 1e6 / secs, 3), "mb_per_s_per_worker": round(size / 1e6 / secs / w, 3),
                             "cores": os.cpu_count()})
        (_, t_ids), (_, t_off), _ = encode_corpus(texts, dirs, max(args.workers))
        ft_rows = []
        for th in args.threads:
            r = train_vectors(t_ids, t_off, Path(tmp), dim=100, epoch=1, min_count=2, lr=0.05, thread=th, window=5,
                              neg=5, side="target")
            ft_rows.append({"threads": th, "tokens": r["tokens"], "seconds": round(r["seconds"], 2),
                            "tokens_per_s": round(r["tokens"] / r["seconds"])})
    print("\nTokenization (both tokenizers per document)\n")
    print("| workers | MB | seconds | MB/s | MB/s per worker |\n|---|---|---|---|---|")
    for r in tok_rows:
        print(f"| {r['workers']} | {r['mb']} | {r['seconds']} | {r['mb_per_s']} | {r['mb_per_s_per_worker']} |")
    print("\nfastText skipgram (dim 100, 1 epoch, Qwen2 token stream)\n")
    print("| threads | tokens | seconds | tokens/s |\n|---|---|---|---|")
    for r in ft_rows:
        print(f"| {r['threads']} | {r['tokens']} | {r['seconds']} | {r['tokens_per_s']} |")
    Path(args.out).write_text(json.dumps({"tokenize": tok_rows, "fasttext": ft_rows}, indent=1))


if __name__ == "__main__":
    main()
