"""Stage ``tokenize``: the training corpus under both tokenizers, in parallel workers, stored as
flat numpy arrays of token IDs (no special tokens) plus document offsets.

Writes ``source_ids.npy`` / ``target_ids.npy`` (uint32), ``source_offsets.npy`` /
``target_offsets.npy`` (int64, n_docs + 1), ``target_tokenizer/`` (the target tokenizer, or with
``target_tokenizer=domain`` stage ``domain_vocab``'s, saved
as a Hugging Face folder, so later stages load it fast) and ``info.json``.

Run alone:  python -m tokalign target_tokenizer=/path/tok.gguf   (the pipeline caches this stage)
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tokalign import refs
from tokalign.artifacts import save_stream, training_docs
from tokalign.config import Config
from tokalign.context import Context

log = logging.getLogger(__name__)

_WORKER: dict = {}


def _init_worker(dirs: list[str]) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["toks"] = [refs.load_tokenizer(d) for d in dirs]


def _ready(_: int) -> bool:
    return bool(_WORKER.get("toks"))


def _encode_chunk(texts: list[str]) -> list[list[np.ndarray]]:
    out = []
    for tok in _WORKER["toks"]:
        enc = tok(texts, add_special_tokens=False)["input_ids"]
        out.append([np.asarray(e, dtype=np.uint32) for e in enc])
    return out


def encode_corpus(texts: list[str], tokenizer_dirs: list[str], workers: int,
                  chunk_docs: int = 256) -> tuple[list[np.ndarray], list[np.ndarray], float]:
    """Token-ID arrays and offsets of ``texts`` under each tokenizer folder; returns (ids, offsets, seconds)."""
    chunks = [texts[i:i + chunk_docs] for i in range(0, len(texts), chunk_docs)]
    per_tok: list[list[np.ndarray]] = [[] for _ in tokenizer_dirs]
    if workers <= 1 or len(chunks) <= 1:
        _init_worker(tokenizer_dirs)
        t0 = time.time()
        results = (_encode_chunk(c) for c in chunks)
        pool = None
    else:
        n = min(workers, len(chunks))
        pool = mp.get_context("spawn").Pool(n, _init_worker, (tokenizer_dirs,))
        pool.map(_ready, range(n), chunksize=1)  # wait for every worker to load its tokenizers: time encoding only
        t0 = time.time()
        results = pool.imap(_encode_chunk, chunks)
    try:
        for res in tqdm(results, total=len(chunks), desc="tokenize", unit=" chunks", mininterval=2):
            for j, arrs in enumerate(res):
                per_tok[j].extend(arrs)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    seconds = time.time() - t0
    ids, offsets = [], []
    for arrs in per_tok:
        lens = np.fromiter((len(a) for a in arrs), dtype=np.int64, count=len(arrs))
        offsets.append(np.concatenate([[0], np.cumsum(lens)]).astype(np.int64))
        ids.append(np.concatenate(arrs).astype(np.uint32) if arrs else np.zeros(0, np.uint32))
    return ids, offsets, seconds


def run(cfg: Config, ctx: Context, out: Path) -> dict:
    src_dir = ctx.path("source") / "model"
    ref = str(ctx.path("domain_vocab") / "tokenizer") if cfg.is_domain_vocab() else cfg.target_tokenizer
    tgt = refs.load_tokenizer(ref, trust_remote_code=cfg.trust_remote_code)
    tgt.save_pretrained(out / "target_tokenizer")
    src = refs.load_tokenizer(str(src_dir))
    docs = training_docs(ctx.path("corpus"))
    texts = [d["text"] for d in docs]
    nbytes = sum(len(t.encode()) for t in texts)
    (s_ids, t_ids), (s_off, t_off), seconds = encode_corpus(
        texts, [str(src_dir), str(out / "target_tokenizer")], cfg.hardware.tokenizer_workers)
    save_stream(out, "source", s_ids, s_off)
    save_stream(out, "target", t_ids, t_off)
    info = {
        "source_vocab": len(src),
        "target_vocab": len(tgt),
        "documents": len(texts),
        "bytes": nbytes,
        "source_tokens": int(len(s_ids)),
        "target_tokens": int(len(t_ids)),
        "workers": cfg.hardware.tokenizer_workers,
        "seconds": round(seconds, 3),
        "mb_per_s": round(nbytes / 1e6 / max(seconds, 1e-9), 3),
        "source_roles": refs.special_token_roles(src),
        "target_roles": refs.special_token_roles(tgt),
        "identical_vocab": src.get_vocab() == tgt.get_vocab(),
    }
    (out / "info.json").write_text(json.dumps(info, indent=1))
    log.info("tokenize: %d docs, %.2f MB, %d source / %d target tokens, %.2f MB/s with %d workers", len(texts),
             nbytes / 1e6, len(s_ids), len(t_ids), info["mb_per_s"], info["workers"])
    return {
        "tokenize/source_tokens": info["source_tokens"],
        "tokenize/target_tokens": info["target_tokens"],
        "tokenize/source_bytes_per_token": nbytes / max(1, len(s_ids)),
        "tokenize/target_bytes_per_token": nbytes / max(1, len(t_ids)),
        "tokenize/mb_per_s": info["mb_per_s"],
    }
