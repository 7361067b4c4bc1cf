"""Stage ``embed``: fastText skipgram vectors for each token-ID stream (a token ID is a "word").

Writes ``source.npz`` and ``target.npz`` with ``ids`` (token IDs that got a vector: seen at least
``embed.min_count`` times), ``vectors`` (float32 [n, dim]) and ``counts`` (over the whole stream).
``embed.max_tokens`` > 0 trains on whole documents drawn in a seeded random order until that many
tokens (the research modes use it: fastText's time grows with tokens x epochs and dominates a
1 GiB run; see the README's projection).
With ``embed.thread=1`` the vectors are reproducible bit for bit (fastText seeds itself with 0).

Run alone:  python -m tokalign embed.dim=300 embed.epoch=20   (the pipeline caches this stage)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from tokalign.artifacts import docs_of, load_stream
from tokalign.config import Config
from tokalign.context import Context
from tokalign.errors import TokalignError

log = logging.getLogger(__name__)


class EmbedError(TokalignError, ValueError):
    """fastText cannot be trained on this stream; the message says why."""


def write_stream(ids: np.ndarray, offsets: np.ndarray, path: Path) -> None:
    """One document a line, token IDs as space-separated words (fastText's input format)."""
    with open(path, "w") as f:
        for doc in docs_of(ids, offsets):
            if len(doc):
                f.write(" ".join(map(str, doc.tolist())))
                f.write("\n")


def sample_docs(ids: np.ndarray, offsets: np.ndarray, max_tokens: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Whole documents in a seeded random order, stopping before ``max_tokens`` tokens (at least one
    document); the stream unchanged when ``max_tokens`` is 0 or covers it."""
    if max_tokens <= 0 or len(ids) <= max_tokens:
        return ids, offsets
    lens = np.diff(offsets)
    order = np.random.default_rng(seed).permutation(len(lens))
    keep = order[: max(1, int(np.searchsorted(np.cumsum(lens[order]), max_tokens, side="right")))]
    keep.sort()  # file order within the sample
    parts = [ids[offsets[d]:offsets[d + 1]] for d in keep]
    new_off = np.concatenate([[0], np.cumsum(lens[keep])]).astype(np.int64)
    return np.concatenate(parts).astype(ids.dtype), new_off


def train_vectors(ids: np.ndarray, offsets: np.ndarray, work: Path, *, dim: int, epoch: int, min_count: int,
                  lr: float, thread: int, window: int, neg: int, side: str) -> dict:
    import fasttext

    counts = np.bincount(ids.astype(np.int64))
    if not (counts >= min_count).any():
        raise EmbedError(f"{side} token stream: no token occurs embed.min_count={min_count} times "
                         f"({len(ids)} tokens); expected a larger corpus or a lower embed.min_count")
    txt = work / f"{side}_stream.txt"
    write_stream(ids, offsets, txt)
    t0 = time.time()
    model = fasttext.train_unsupervised(
        str(txt), model="skipgram", dim=dim, epoch=epoch, minCount=min_count, lr=lr, thread=thread, ws=window,
        neg=neg, minn=0, maxn=0, wordNgrams=1, bucket=0, verbose=0)  # fastText seeds itself with 0
    seconds = time.time() - t0
    words = model.get_words()
    keep = [i for i, w in enumerate(words) if w.isdigit()]  # drop fastText's "</s>"
    tok_ids = np.array([int(words[i]) for i in keep], dtype=np.int64)
    matrix = model.get_input_matrix()[keep].astype(np.float32)
    txt.unlink()
    return {"ids": tok_ids, "vectors": matrix, "counts": counts[tok_ids].astype(np.int64), "seconds": seconds,
            "tokens": int(len(ids))}


def _train_in_fresh_process(kwargs: dict, env: dict) -> dict:
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # inherited by the spawned child only for this call
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as ex:
            try:
                return ex.submit(train_vectors, **kwargs).result()
            except BrokenProcessPool as e:
                raise EmbedError(f"{kwargs.get('side', '')} token stream: the fastText process died ({e})") from e
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


FASTTEXT_ATTEMPTS = 8


def train_vectors_isolated(ids: np.ndarray, offsets: np.ndarray, work: Path, **kwargs) -> dict:
    """``train_vectors`` in a fresh spawned process, retried in another fresh process on fastText's NaN.

    fastText (0.9.2 and 0.9.3, PyPI wheel and source build alike) raises "Encountered NaN" on some
    streams depending on the process it runs in, not on the settings: measured here on the
    ultra_quick_demo stream, the same call failed 7 of 8 times in one interpreter and 0 of 8 in the
    next, and at every learning rate down to 0.005 in the failing one, so it is not divergence
    (upstream: facebookresearch/fastText#1278, "not possible to reproduce with other corpus files").
    Each attempt is a new process (a new memory layout; its environment padded by a different
    amount); the settings, and so the vectors, are the configured ones. The result records the
    attempts; when all fail, an ``EmbedError`` names the stream. A crash inside fastText cannot take the
    pipeline down with it.
    """
    errors = []
    for attempt in range(1, FASTTEXT_ATTEMPTS + 1):
        env = {"TOKALIGN_FASTTEXT_ATTEMPT": str(attempt) + "." * (997 * (attempt - 1))}
        try:
            res = _train_in_fresh_process(dict(kwargs, ids=ids, offsets=offsets, work=work), env)
        except RuntimeError as e:
            if "NaN" not in str(e):
                raise
            errors.append(str(e))
            log.warning("embed[%s]: fastText attempt %d of %d: %s; retrying in a fresh process", kwargs.get("side"),
                        attempt, FASTTEXT_ATTEMPTS, e)
            continue
        if not np.isfinite(res["vectors"]).all():
            raise EmbedError(f"{kwargs.get('side')} token stream: fastText returned non-finite vectors")
        res["attempts"] = attempt
        return res
    raise EmbedError(f"{kwargs.get('side')} token stream: fastText raised 'Encountered NaN' in {FASTTEXT_ATTEMPTS} "
                     f"fresh processes (a fastText bug that depends on the stream); expected vectors: try other "
                     f"embed.dim / embed.min_count / embed.epoch values")


def run(cfg: Config, ctx: Context, out: Path) -> dict:
    tok_dir = ctx.path("tokenize")
    e = cfg.embed
    metrics = {}
    for side in ("source", "target"):
        ids, offsets = load_stream(tok_dir, side)
        counts = np.bincount(ids.astype(np.int64))
        ids, offsets = sample_docs(ids, offsets, e.max_tokens, cfg.seed)
        res = train_vectors_isolated(ids, offsets, out, dim=e.dim, epoch=e.epoch, min_count=e.min_count, lr=e.lr,
                            thread=e.thread, window=e.window, neg=e.neg, side=side)
        np.savez(out / f"{side}.npz", ids=res["ids"], vectors=res["vectors"], counts=counts[res["ids"]])
        tps = res["tokens"] * e.epoch / max(res["seconds"], 1e-9)
        log.info("embed[%s]: %d vectors of dim %d in %.1fs (%.0f tokens/s with %d threads)", side, len(res["ids"]),
                 e.dim, res["seconds"], tps, e.thread)
        metrics.update({f"embed/{side}_vectors": len(res["ids"]), f"embed/{side}_tokens": res["tokens"],
                        f"embed/{side}_attempts": res["attempts"],
                        f"embed/{side}_seconds": round(res["seconds"], 3),
                        f"embed/{side}_tokens_per_s": round(tps, 1)})
    return metrics
