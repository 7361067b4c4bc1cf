"""Benchmark the upstream stages: tokenization MB/s against worker count, fastText tokens/s against
threads, term mining MB/s, and each tokenizer's bytes per token (to turn a corpus budget into tokens).

    python scripts/bench_upstream.py                           # demo assets, prints the tables
    python scripts/bench_upstream.py --workers 1 2 4 8 16 --threads 1 4 16 --mb 32 --ft-dim 300 \\
        --out bench_upstream.json                              # what the H100 projection used

The corpus is the PubMedQA abstracts repeated to --mb megabytes; the tokenizers are SmolLM2's and
Qwen2's by default (both encoded per document, as the tokenize stage does; ``--source``/``--target``
take any tokenizer reference: a GGUF file, a saved folder or a hub id). fastText trains skipgram on
the target token stream of the first --ft-mb megabytes (``--ft-dim``, ``--ft-epoch``) with each thread
count, in a fresh process as the embed stage does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokalign import refs  # noqa: E402
from tokalign.artifacts import write_json  # noqa: E402
from tokalign.config import Config, default_assets_dir  # noqa: E402
from tokalign.stages.corpus import build as build_corpus  # noqa: E402
from tokalign.stages.corpus import iter_records  # noqa: E402
from tokalign.stages.embed import train_vectors_isolated  # noqa: E402
from tokalign.stages.terms import mine  # noqa: E402
from tokalign.stages.tokenize import encode_corpus  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def repeat_to(base: list[str], n_bytes: float) -> tuple[list[str], int]:
    texts, size = [], 0
    while size < n_bytes:
        for t in base:
            texts.append(t)
            size += len(t.encode())
            if size >= n_bytes:
                break
    return texts, size


def main(argv=None) -> dict:
    assets = default_assets_dir()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--mb", type=float, default=4.0, help="corpus size for the tokenization timing")
    ap.add_argument("--ft-mb", type=float, default=2.0, help="corpus size whose target stream fastText trains on")
    ap.add_argument("--ft-dim", type=int, default=100)
    ap.add_argument("--ft-epoch", type=int, default=1)
    ap.add_argument("--corpus", default=str(assets / "pubmedqa/ori_pqal.json"))
    ap.add_argument("--source", default=str(assets / "models/SmolLM2-135M-Instruct.Q4_1.gguf"),
                    help="source tokenizer reference")
    ap.add_argument("--target", default=str(assets / "tokenizers/ggml-vocab-qwen2.gguf"),
                    help="target tokenizer reference")
    ap.add_argument("--out", default="bench_upstream.json")
    args = ap.parse_args(argv)
    base = [t for _, t in iter_records(args.corpus)]
    texts, size = repeat_to(base, args.mb * 1e6)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = []
        for name, ref in (("source", args.source), ("target", args.target)):
            tok = refs.load_tokenizer(ref)
            tok.save_pretrained(Path(tmp) / name)
            dirs.append(str(Path(tmp) / name))
        tok_rows = []
        for w in args.workers:
            (s_ids, t_ids), _, secs = encode_corpus(texts, dirs, w)
            tok_rows.append({"workers": w, "mb": round(size / 1e6, 2), "seconds": round(secs, 2),
                             "mb_per_s": round(size / 1e6 / secs, 3),
                             "mb_per_s_per_worker": round(size / 1e6 / secs / w, 3), "cores": os.cpu_count()})
        bytes_per_token = {"source": size / max(len(s_ids), 1), "target": size / max(len(t_ids), 1)}

        ft_texts, ft_size = repeat_to(base, args.ft_mb * 1e6)
        (_, ft_ids), (_, ft_off), _ = encode_corpus(ft_texts, dirs, max(args.workers))
        ft_rows = []
        for th in args.threads:
            r = train_vectors_isolated(ft_ids, ft_off, Path(tmp), dim=args.ft_dim, epoch=args.ft_epoch, min_count=2,
                                       lr=0.05, thread=th, window=5, neg=5, side="target")
            tps = r["tokens"] * args.ft_epoch / r["seconds"]
            ft_rows.append({"threads": th, "tokens": r["tokens"], "epochs": args.ft_epoch, "dim": args.ft_dim,
                            "seconds": round(r["seconds"], 2), "tokens_per_s": round(tps),
                            "tokens_per_s_per_thread": round(tps / th)})

    with tempfile.TemporaryDirectory() as tmp:  # the corpus stage's read + dedup + split, on unique documents
        src = Path(tmp) / "corpus.jsonl"
        with open(src, "w", encoding="utf-8") as f:
            for i, t in enumerate(texts):
                f.write(json.dumps({"id": str(i), "text": f"{t} [{i}]"}) + "\n")
        t0 = time.perf_counter()
        train, held, _ = build_corpus(Config(source_model="-", target_tokenizer="-", corpus=str(src)))
        corpus_s = time.perf_counter() - t0
    corpus_row = {"mb": round(size / 1e6, 2), "docs": len(train) + len(held), "seconds": round(corpus_s, 2),
                  "mb_per_s": round(size / 1e6 / corpus_s, 3)}

    t0 = time.perf_counter()
    terms = mine(texts, top_k=2000, min_freq=3, scoring="tfidf")
    terms_s = time.perf_counter() - t0
    terms_row = {"mb": round(size / 1e6, 2), "seconds": round(terms_s, 2), "mb_per_s": round(size / 1e6 / terms_s, 3),
                 "terms": len(terms)}

    print(f"\nCPU: {cpu_name()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}")
    print("\nTokenization (both tokenizers per document)\n")
    print("| workers | MB | seconds | MB/s | MB/s per worker |\n|---|---|---|---|---|")
    for r in tok_rows:
        print(f"| {r['workers']} | {r['mb']} | {r['seconds']} | {r['mb_per_s']} | {r['mb_per_s_per_worker']} |")
    print(f"\nbytes per token: source {bytes_per_token['source']:.3f}, target {bytes_per_token['target']:.3f}")
    print(f"\nfastText skipgram (dim {args.ft_dim}, {args.ft_epoch} epoch(s), target token stream of "
          f"{ft_size / 1e6:.1f} MB)\n")
    print("| threads | tokens | seconds | tokens/s | tokens/s per thread |\n|---|---|---|---|---|")
    for r in ft_rows:
        print(f"| {r['threads']} | {r['tokens']} | {r['seconds']} | {r['tokens_per_s']} | {r['tokens_per_s_per_thread']} |")
    print(f"\ncorpus stage (read JSONL, de-duplicate, split): {corpus_row['mb']} MB in {corpus_row['seconds']} s = "
          f"{corpus_row['mb_per_s']} MB/s")
    print(f"\nterm mining (tf-idf, top 2000): {terms_row['mb']} MB in {terms_row['seconds']} s = "
          f"{terms_row['mb_per_s']} MB/s (one process)")
    report = {"info": {"cpu": cpu_name(), "cores": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
                       "source": args.source, "target": args.target, "corpus": args.corpus},
              "tokenize": tok_rows, "bytes_per_token": bytes_per_token, "fasttext": ft_rows, "terms": terms_row,
              "corpus": corpus_row}
    print(f"\nwrote {write_json(args.out, report)}")
    return report


if __name__ == "__main__":
    main()
