"""Evaluation throughput: bits-per-byte scoring (bytes/s, tokens/s) and PubMedQA questions/s.

Times ``tokalign.metrics.bits_per_byte`` and ``tokalign.metrics.pubmedqa_accuracy`` -- the functions
the evaluate stages call -- on PubMedQA abstracts and questions, with a randomly initialised model
of SmolLM2-135M's architecture whose vocabulary is the given tokenizer's (speed does not depend on
the weights' values). The first batch is a warm-up and is not timed.

    python scripts/bench_eval.py --docs 16 --questions 8                    # CPU, float32
    python scripts/bench_eval.py --device cuda --dtype bfloat16 --docs 400 --questions 200 \\
        --seq-len 2048 --stride 1024 --batch-size 8 --out bench_eval_h100.json   # research settings
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("WANDB_MODE", "disabled")

from tokalign.config import default_assets_dir  # noqa: E402
from tokalign.artifacts import write_json  # noqa: E402


def main(argv=None) -> dict:
    assets = default_assets_dir()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", default=str(assets / "tokenizers/ggml-vocab-qwen2.gguf"),
                    help="tokenizer reference (GGUF, folder or hub id); the model gets its vocabulary")
    ap.add_argument("--pubmedqa", default=str(assets / "pubmedqa/ori_pqal.json"))
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bfloat16 on cuda")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tokalign import metrics as M
    from tokalign import refs
    from tokalign.artifacts import iter_records

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_train import SMOLLM2  # noqa: E402

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = a.dtype or ("bfloat16" if device == "cuda" else "float32")
    tok = refs.load_tokenizer(a.tokenizer)
    vocab = len(tok)
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**SMOLLM2, "vocab_size": vocab})
    cfg._attn_implementation = a.attn
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype)).to(device).eval()
    texts = [t for _, t in iter_records(a.pubmedqa)][: a.docs + 4]
    warm, texts = texts[:4], texts[4:]
    examples = M.load_pubmedqa(a.pubmedqa, None, a.questions + 4, seed=0)
    kw = dict(seq_len=a.seq_len, stride=a.stride, batch_size=a.batch_size, device=device, progress=False)
    M.bits_per_byte(model, tok, warm, **kw)
    if device == "cuda":
        torch.cuda.synchronize()
    r = M.bits_per_byte(model, tok, texts, **kw)
    bpb_row = {"docs": r["docs"], "bytes": r["bytes"], "tokens": r["tokens"], "seconds": r["seconds"],
               "bytes_per_s": r["bytes"] / r["seconds"], "tokens_per_s": r["tokens_per_s"],
               "bytes_per_doc": r["bytes"] / r["docs"]}
    M.pubmedqa_accuracy(model, tok, examples[:4], device=device, batch_size=a.batch_size, progress=False)
    t0 = time.perf_counter()
    q = M.pubmedqa_accuracy(model, tok, examples[4:], device=device, batch_size=a.batch_size, progress=False)
    if device == "cuda":
        torch.cuda.synchronize()
    qs = time.perf_counter() - t0
    pq_row = {"questions": q["n"], "seconds": qs, "questions_per_s": q["n"] / qs}
    info = {"model": f"SmolLM2-135M architecture, random init, vocab {vocab}", "tokenizer": a.tokenizer,
            "device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "dtype": dtype, "seq_len": a.seq_len, "stride": a.stride, "batch_size": a.batch_size,
            "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
            "load_avg_1m": os.getloadavg()[0]}
    report = {"info": info, "bpb": bpb_row, "pubmedqa": pq_row}
    print(f"\n{info['model']}, {device} ({info['device_name']}, {dtype}), seq_len {a.seq_len}, stride {a.stride}, "
          f"batch {a.batch_size}\n")
    print("| what | n | seconds | rate |\n|---|---|---|---|")
    print(f"| bits per byte | {bpb_row['docs']} docs, {bpb_row['bytes']:,} bytes | {bpb_row['seconds']:.2f} | "
          f"{bpb_row['bytes_per_s']:,.0f} bytes/s ({bpb_row['tokens_per_s']:,.0f} tokens/s) |")
    print(f"| PubMedQA | {pq_row['questions']} questions | {qs:.2f} | {pq_row['questions_per_s']:.2f} questions/s |")
    if a.out:
        print(f"\nwrote {write_json(a.out, report)}")
    return report


if __name__ == "__main__":
    main()
