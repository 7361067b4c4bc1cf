"""Stage ``align``: which source embedding rows each target token starts from (TokAlign).

Reads the source tokenizer (``source/model``), the target tokenizer (``tokenize/target_tokenizer``)
and the fastText vectors of both token streams (``embed/source.npz``, ``embed/target.npz``).
For every target token it decides, in this order:

* ``how = 3`` special token by role: the target's BOS/EOS/PAD/UNK token takes the source token of
  the same role (a token with several roles: BOS wins, then EOS, PAD, UNK), never by name;
* ``how = 0`` gold match: the same canonical bytes exist in the source vocabulary -> copy that row;
* ``how = 1`` aligned: the token has a vector, the plain cosine of its relative representation
  to the best source candidate (chosen by ``alignment.scoring``: cos or CSLS) is at least
  ``similarity_threshold``, AND the candidate is trustworthy: its margin over the runner-up
  (in the chosen scoring) is at least the margin at which held-out gold pairs (gold tokens that
  are not pivots) are found with precision ``alignment.min_precision`` -> the best row, or a
  softmax(score / temperature) mix of the ``alignment.top_k`` best rows whose cosine also
  passes the threshold, optionally blended with the FVT composition (``alignment.blend_fvt``);
* ``how = 2`` fallback: everything else (below the threshold or the margin, or never seen by the
  corpus) -> the mean of the rows of its pieces under the SOURCE tokenizer (FVT).

The precision guard matters: fastText vectors from a small corpus (the 0.7 MB smoke corpus with
``embed.epoch=5``) give relative representations whose cosines are all ~0.99, so a plain
threshold lets noise through (the published 1:1 rule is far worse than FVT there); the guard
measures how often the search is right on gold pairs and aligns nothing when it is not.

New rows (aligned and FVT, not gold or special) are multiplied by ``alignment.seen_scale`` (tokens
the corpus produced) or ``alignment.unseen_scale`` (tokens it never produced): with tied
embeddings every new row is also an output row competing with the copied ones in the softmax,
and shrinking the ~110k rows of tokens the domain never uses takes that probability back.
``alignment.special_match=name`` lets a role token with a same-named source special (Qwen2's
``<|endoftext|>`` and SmolLM2's) keep the name match instead of the role rule.
Config keys: ``alignment.min_precision``, ``seen_scale``, ``unseen_scale``, ``special_match`` (``tokalign/config.py``).

Writes ``alignment.npz``:

=====================  =====================  ==================================================
key                    dtype [shape]          meaning
=====================  =====================  ==================================================
how                    int8 [V_t]             0 gold, 1 aligned, 2 FVT fallback, 3 special by role
src                    int64 [V_t, K]         source ids combined per row (-1 = unused slot)
weight                 float32 [V_t, K]       their weights (0 = unused); rows sum to 1 or 0
blend                  float32 [V_t]          share of the FVT row mixed in (1 for how = 2)
scale                  float32 [V_t]          factor applied to the tokalign row (1 for gold/special)
margin                 float32 [V_t]          best minus runner-up score (NaN: no vector)
margin_threshold       float32                margin needed to align (inf: nothing trusted)
best_score             float32 [V_t]          cosine of the best candidate (NaN: no vector)
best_source            int64 [V_t]            best candidate by the chosen scoring (-1: no vector)
best_csls              float32 [V_t]          its CSLS score (NaN unless scoring = csls)
argmax_1to1            int64 [V_t]            published rule: plain-cosine argmax; gold -> itself;
                                              -1 for tokens without a vector
gold                   int64 [V_t]            source id with the same canonical form, -1 if none
gold_score             float32 [V_t]          cosine of a gold pair's relative reps (NaN if n/a)
fvt_indptr/indices     int64                  FVT pieces (CSR over target ids; gold -> itself)
pivot_target/source    int64 [P]              the pivot pairs
has_vector             bool [V_t]             the target token got a fastText vector
hist_counts/edges      int64/float32          histogram of best_score of non-gold tokens
source_vocab, target_vocab, threshold, blend_fvt, top_k   scalars
=====================  =====================  ==================================================

plus ``alignment.csv`` (one line per target token), ``similarity_hist.png`` (also copied into
the run directory) and ``info.json`` (counts, hub statistics, timings).

Run alone:  python -m tokalign similarity_threshold=0.5 alignment=topk   (the pipeline caches this stage)
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokalign import alignment as A
from tokalign.alignment import HOW_ALIGNED, HOW_FVT, HOW_GOLD, HOW_NAMES, HOW_SPARSE, HOW_SPECIAL  # noqa: F401
from tokalign import refs
from tokalign.config import AlignmentConfig, Config
from tokalign.context import Context
from tokalign.errors import TokalignError

log = logging.getLogger(__name__)

COUNT_NAMES = {"gold": "exact", "fvt": "fallback"}  # the names of the counts in info.json and the metrics
ROLE_ORDER = ("bos", "eos", "pad", "unk")


class AlignInputError(TokalignError, ValueError):
    """An input of stage align is missing or malformed; the message names the file or key."""


def load_vectors(path: Path, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, vectors, counts) from an ``embed`` npz, checked against the vocabulary size."""
    if not path.is_file():
        raise AlignInputError(f"{path}: no such file (expected the fastText vectors written by stage 'embed')")
    try:
        z = np.load(path)
        missing = [k for k in ("ids", "vectors", "counts") if k not in z.files]
        if not missing:
            ids, vectors, counts = z["ids"], z["vectors"], z["counts"]
    except Exception as e:
        raise AlignInputError(f"{path}: unreadable npz ({type(e).__name__}: {e})") from e
    if missing:
        raise AlignInputError(f"{path}: missing key '{missing[0]}' (expected 'ids', 'vectors', 'counts')")
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 1 or vectors.ndim != 2 or vectors.shape[0] != len(ids) or np.shape(counts) != ids.shape:
        raise AlignInputError(f"{path}: expected 'ids' [n], 'vectors' [n, dim] and 'counts' [n], got "
                              f"{ids.shape}, {vectors.shape}, {np.shape(counts)}")
    if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
        raise AlignInputError(f"{path}: key 'ids' has ids outside [0, {vocab_size}) (vocabulary of {vocab_size})")
    if len(np.unique(ids)) != len(ids):
        raise AlignInputError(f"{path}: key 'ids' has duplicate token ids")
    if not np.isfinite(vectors).all():
        raise AlignInputError(f"{path}: key 'vectors' has NaN or inf entries")
    return ids, np.asarray(vectors, dtype=np.float32), np.asarray(counts, dtype=np.int64)


def role_map(target_roles: dict, source_roles: dict) -> dict[int, int]:
    """target id -> source id for special tokens by role (BOS wins, then EOS, PAD, UNK)."""
    out: dict[int, int] = {}
    roles_of: dict[int, list[str]] = {}
    for r in ROLE_ORDER:
        t = target_roles.get(r)
        if t is not None:
            roles_of.setdefault(int(t), []).append(r)
    for t, roles in roles_of.items():
        for r in roles:  # already in priority order
            s = source_roles.get(r)
            if s is not None:
                out[t] = int(s)
                break
    return out


def sparse_combinations(gold: np.ndarray, target_special: np.ndarray, t_ids: np.ndarray, t_vecs: np.ndarray, *,
                        focus_k: int, omp_k: int, candidates: int, block_size: int = 4096,
                        progress: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """FOCUS and OMP combinations for every new target token (no gold match, not special, with a vector),
    in the target-side fastText space, over the overlapping tokens (gold, with a vector) as the dictionary.

    Returns ``focus_src``/``focus_weight`` [V_t, focus_k] and ``omp_src``/``omp_weight`` [V_t, omp_k]: SOURCE
    ids (the gold partners of the chosen overlapping tokens) and their weights; rows of other tokens are
    -1 / 0. The weights are applied to the source model's rows by stage init."""
    v_t = len(gold)
    t_row = np.full(v_t, -1, dtype=np.int64)
    t_row[t_ids] = np.arange(len(t_ids))
    has = t_row >= 0
    atoms = np.nonzero(has & (gold >= 0) & ~target_special)[0]
    queries = np.nonzero(has & (gold < 0) & ~target_special)[0]
    arrays = {"focus_src": np.full((v_t, focus_k), -1, dtype=np.int64),
              "focus_weight": np.zeros((v_t, focus_k), dtype=np.float32),
              "omp_src": np.full((v_t, omp_k), -1, dtype=np.int64),
              "omp_weight": np.zeros((v_t, omp_k), dtype=np.float32)}
    stats: dict[str, Any] = {"sparse_queries": int(len(queries)), "sparse_atoms": int(len(atoms))}
    if len(atoms) < 2 or not len(queries):
        log.warning("align: no FOCUS/OMP combinations (%d overlapping tokens with vectors, %d new tokens with "
                    "vectors); those rows fall back to FVT", len(atoms), len(queries))
        return arrays, stats
    t0 = time.time()
    sc = A.sparse_combinations(t_vecs[t_row[queries]], t_vecs[t_row[atoms]], focus_k=focus_k, omp_k=omp_k,
                               candidates=candidates, block_size=block_size, progress=progress)
    partner = gold[atoms]
    for name, idx, w in (("focus", sc.focus_idx, sc.focus_weight), ("omp", sc.omp_idx, sc.omp_coef)):
        arrays[f"{name}_src"][queries, :idx.shape[1]] = np.where(idx >= 0, partner[np.maximum(idx, 0)], -1)
        arrays[f"{name}_weight"][queries, :idx.shape[1]] = w
    stats.update(sparse_seconds=round(time.time() - t0, 3), focus_truncated=sc.focus_truncated,
                 focus_support_mean=float((sc.focus_idx >= 0).sum(axis=1).mean()))
    return arrays, stats


def use_sparse_rows(how: np.ndarray, src: np.ndarray, weight: np.ndarray, s_src: np.ndarray,
                    s_weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FVT-fallback rows that have a FOCUS/OMP combination take it (``how = 4``); ``src``/``weight`` widen to fit."""
    use = (how == HOW_FVT) & (s_src >= 0).any(axis=1)
    width = max(src.shape[1], s_src.shape[1])
    if width > src.shape[1]:
        pad = width - src.shape[1]
        src = np.pad(src, ((0, 0), (0, pad)), constant_values=-1)
        weight = np.pad(weight, ((0, 0), (0, pad)))
    src[use] = -1
    weight[use] = 0.0
    src[use, :s_src.shape[1]] = s_src[use]
    weight[use, :s_src.shape[1]] = s_weight[use]
    how = how.copy()
    how[use] = HOW_SPARSE
    return how, src, weight


@dataclass
class Search:
    """What the similarity search found for every target token (-1 / NaN / -inf where it had nothing)."""

    best_score: np.ndarray  # float32 [V_t]: plain cosine of the best candidate
    best_csls: np.ndarray  # float32 [V_t]: its CSLS score (NaN unless scoring = csls)
    margin: np.ndarray  # float32 [V_t]: best minus runner-up score in the chosen scoring
    best_source: np.ndarray  # int64 [V_t]: best candidate by the chosen scoring
    argmax: np.ndarray  # int64 [V_t]: plain-cosine argmax (the published 1:1 rule)
    gold_score: np.ndarray  # float32 [V_t]: cosine of a gold pair's relative representations
    top_src: np.ndarray  # int64 [V_t, k]: the best candidates
    top_rank: np.ndarray  # float32 [V_t, k]: their scores in the chosen scoring
    top_cos: np.ndarray  # float32 [V_t, k]: their plain cosines
    margin_min: float = np.inf  # margin needed to align (inf: nothing trusted)

    @classmethod
    def empty(cls, v_t: int, k: int) -> "Search":
        nan = lambda: np.full(v_t, np.nan, dtype=np.float32)  # noqa: E731
        none = lambda: np.full(v_t, -1, dtype=np.int64)  # noqa: E731
        return cls(nan(), nan(), nan(), none(), none(), nan(), np.full((v_t, k), -1, dtype=np.int64),
                   np.full((v_t, k), -np.inf, dtype=np.float32), np.full((v_t, k), -np.inf, dtype=np.float32))


@dataclass
class Vectors:
    """The fastText vectors of both streams, indexed by token id (row -1: the token has no vector)."""

    t_ids: np.ndarray
    t_vecs: np.ndarray
    t_row: np.ndarray
    s_ids: np.ndarray
    s_vecs: np.ndarray
    s_row: np.ndarray

    @classmethod
    def index(cls, target_vec: tuple, source_vec: tuple, v_t: int, v_s: int) -> "Vectors":
        (t_ids, t_vecs, _), (s_ids, s_vecs, _) = target_vec, source_vec
        t_row = np.full(v_t, -1, dtype=np.int64)
        t_row[t_ids] = np.arange(len(t_ids))
        s_row = np.full(v_s, -1, dtype=np.int64)
        s_row[s_ids] = np.arange(len(s_ids))
        return cls(t_ids, t_vecs, t_row, s_ids, s_vecs, s_row)


def _counts(ids: np.ndarray, counts: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.int64)
    out[ids] = np.maximum(counts, 1)
    return out


def similarity_search(target: A.Vocab, source: A.Vocab, gold: np.ndarray, vec: Vectors, piv: tuple,
                      ac: AlignmentConfig,
                      stats: dict, progress: bool) -> Search:
    """Relative representations over the pivots, then the best source candidates of every target token with a
    vector (``alignment.scoring``), and the margin the held-out gold pairs say can be trusted."""
    v_t, v_s = len(target), len(source)
    k_search = max(ac.top_k, 2)  # the runner-up gives the confidence margin
    found = Search.empty(v_t, k_search)
    t_sel = vec.t_ids[~target.special[vec.t_ids]] if len(vec.t_ids) else vec.t_ids
    s_sel = vec.s_ids[~source.special[vec.s_ids]] if len(vec.s_ids) else vec.s_ids
    piv_t, piv_s = piv
    if len(piv_t) < 2 or not len(t_sel) or not len(s_sel):
        log.warning("align: no similarity alignment (%d pivots, %d target and %d source tokens with vectors); "
                    "non-gold tokens fall back to FVT", len(piv_t), len(t_sel), len(s_sel))
        return found
    fa, fb = A.relative_factors(vec.t_vecs[vec.t_row[t_sel]], vec.s_vecs[vec.s_row[s_sel]],
                                vec.t_vecs[vec.t_row[piv_t]], vec.s_vecs[vec.s_row[piv_s]])
    t0 = time.time()
    sc = A.score_alignment(fa, fb, scoring=ac.scoring, top_k=k_search, csls_k=ac.csls_k, block_size=ac.block_size,
                           progress=progress)
    stats["scoring_seconds"] = round(time.time() - t0, 3)
    kk = sc.top_idx.shape[1]
    found.top_src[t_sel, :kk] = s_sel[sc.top_idx]
    found.top_rank[t_sel, :kk] = sc.top_score
    found.top_cos[t_sel, :kk] = sc.top_cos
    found.best_score[t_sel] = sc.top_cos[:, 0]
    found.best_source[t_sel] = s_sel[sc.top_idx[:, 0]]
    found.margin[t_sel] = sc.top_score[:, 0] - sc.top_score[:, 1] if kk > 1 else np.inf
    if ac.scoring == "csls":
        found.best_csls[t_sel] = sc.top_score[:, 0]
    found.argmax[t_sel] = s_sel[sc.argmax_cos]
    _check_on_gold(found, gold, t_sel, s_sel, fa, fb, piv_t, v_s, ac, stats)
    dec = t_sel[gold[t_sel] < 0]  # hubness over the tokens the alignment decides for (non-gold, with a vector)
    stats["hub_cos"] = A.hub_stats(found.argmax[dec], len(s_sel))
    if ac.scoring == "csls":
        stats["hub_csls"] = A.hub_stats(found.best_source[dec], len(s_sel))
    return found


def _check_on_gold(found: Search, gold: np.ndarray, t_sel: np.ndarray, s_sel: np.ndarray, fa: np.ndarray,
                   fb: np.ndarray, piv_t: np.ndarray, v_s: int, ac: AlignmentConfig, stats: dict) -> None:
    """Gold pairs with vectors on both sides: their own similarity, how often the search finds them (held-out
    pairs: not pivots), and from that the margin above which a candidate is right ``min_precision`` of the time."""
    v_t = len(gold)
    s_pos = np.full(v_s, -1, dtype=np.int64)
    s_pos[s_sel] = np.arange(len(s_sel))
    t_pos = np.full(v_t, -1, dtype=np.int64)
    t_pos[t_sel] = np.arange(len(t_sel))
    gp = np.nonzero((gold >= 0) & (t_pos >= 0))[0]
    gp = gp[s_pos[gold[gp]] >= 0]
    held = np.zeros(0, dtype=np.int64)
    if len(gp):
        found.gold_score[gp] = np.einsum("ij,ij->i", fa[t_pos[gp]], fb[s_pos[gold[gp]]])
        is_pivot = np.zeros(v_t, dtype=bool)
        is_pivot[piv_t] = True
        held = gp[~is_pivot[gp]]
        if len(held):
            stats["gold_p1_cos"] = float((found.argmax[held] == gold[held]).mean())
            stats[f"gold_p1_{ac.scoring}"] = float((found.best_source[held] == gold[held]).mean())
            stats["gold_heldout_pairs"] = int(len(held))
    right = found.best_source[held] == gold[held]
    found.margin_min, prec, n_at = A.calibrate_margin(found.margin[held], right, ac.min_precision)
    stats.update(margin_threshold=found.margin_min, margin_precision=prec, margin_heldout_above=n_at)


def special_rows(target: A.Vocab, source: A.Vocab, gold: np.ndarray, special_match: str) -> dict[int, int]:
    """target id -> source id for special tokens set by role (``alignment.special_match``)."""
    if special_match == "none":  # ablation: special tokens are gold matches or FVT compositions like any other
        return {}
    roles = role_map(target.roles, source.roles)
    v_t, v_s = len(target), len(source)
    if special_match == "name":  # a role token with a same-named source special keeps the name match
        roles = {t: s for t, s in roles.items() if not (0 <= t < v_t and gold[t] >= 0)}
    return {t: s for t, s in roles.items() if 0 <= t < v_t and 0 <= s < v_s}


def decide_rows(gold: np.ndarray, candidate: np.ndarray, found: Search, roles: dict[int, int], threshold: float,
                ac: AlignmentConfig, stats: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(how, src, weight, blend): which rule sets each row, and the source rows it combines."""
    v_t, k = len(gold), max(1, int(ac.top_k))
    passes_sim = candidate & (found.best_score >= threshold)
    aligned = passes_sim & (found.margin >= found.margin_min)
    stats["above_threshold"] = int(passes_sim.sum())
    stats["below_margin"] = int((passes_sim & ~aligned).sum())
    how = np.full(v_t, HOW_FVT, dtype=np.int8)
    how[aligned] = HOW_ALIGNED
    how[gold >= 0] = HOW_GOLD
    src = np.full((v_t, k), -1, dtype=np.int64)
    weight = np.zeros((v_t, k), dtype=np.float32)
    blend = np.zeros(v_t, dtype=np.float32)
    g = how == HOW_GOLD
    src[g, 0] = gold[g]
    weight[g, 0] = 1.0
    for t, s in roles.items():
        how[t] = HOW_SPECIAL
        src[t, :] = -1
        weight[t, :] = 0.0
        src[t, 0] = s
        weight[t, 0] = 1.0
    al = how == HOW_ALIGNED
    if al.any():
        keep = found.top_cos[al, :k] >= threshold
        keep[:, 0] = True
        w = A.topk_weights(found.top_rank[al, :k], ac.temperature, keep)
        src[al] = np.where(w > 0, found.top_src[al, :k], -1)
        weight[al] = w
        blend[al] = ac.blend_fvt
    return how, src, weight, blend


def row_scale(how: np.ndarray, has_vec: np.ndarray, ac: AlignmentConfig) -> np.ndarray:
    """New rows (neither gold nor special) are shrunk: with a tied head they compete with the copied rows."""
    scale = np.ones(len(how), dtype=np.float32)
    new = (how == HOW_ALIGNED) | (how == HOW_FVT) | (how == HOW_SPARSE)
    scale[new & has_vec] = ac.seen_scale
    scale[new & ~has_vec] = ac.unseen_scale
    return scale


def compute_alignment(target: A.Vocab, source: A.Vocab, source_tok: Any, target_vec: tuple, source_vec: tuple, *,
                      pivot_count: int, threshold: float, ac: AlignmentConfig,
                      progress: bool = True) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The whole alignment as arrays (see the module docstring) plus statistics; ``ac`` is the
    ``AlignmentConfig`` (validated there)."""
    v_t, v_s = len(target), len(source)
    stats: dict[str, Any] = {}
    timer = time.time()
    gold = A.gold_map(target, source)
    vec = Vectors.index(target_vec, source_vec, v_t, v_s)
    has_vec = vec.t_row >= 0
    piv = A.select_pivots(gold, _counts(vec.t_ids, target_vec[2], v_t), _counts(vec.s_ids, source_vec[2], v_s),
                          pivot_count, exclude_target=target.special)
    stats["pivots"] = int(len(piv[0]))
    if len(piv[0]) < pivot_count:
        log.warning("align: only %d gold pairs with vectors on both sides (pivot_count=%d)", len(piv[0]), pivot_count)
    found = similarity_search(target, source, gold, vec, piv, ac, stats, progress)
    argmax_1to1 = np.where(gold >= 0, gold, found.argmax)

    candidate = has_vec & (gold < 0) & ~target.special & np.isfinite(found.best_score)
    roles = special_rows(target, source, gold, ac.special_match)
    how, src, weight, blend = decide_rows(gold, candidate, found, roles, threshold, ac, stats)
    aligned = how == HOW_ALIGNED
    sparse, sparse_stats = sparse_combinations(gold, target.special, vec.t_ids, vec.t_vecs, focus_k=ac.focus_k,
                                               omp_k=ac.omp_k, candidates=ac.sparse_candidates,
                                               block_size=ac.block_size, progress=progress)
    stats.update(sparse_stats)
    if ac.new_rows != "fvt":  # new tokens with a vector that the similarity alignment left alone: FOCUS/OMP rows
        how, src, weight = use_sparse_rows(how, src, weight, sparse[f"{ac.new_rows}_src"],
                                           sparse[f"{ac.new_rows}_weight"])
    blend[how == HOW_FVT] = 1.0
    scale = row_scale(how, has_vec, ac)

    fvt = A.fvt_decompose(target, source, source_tok, gold)
    stats.update(fvt_seconds=round(fvt.seconds, 3), fvt_empty=fvt.n_empty, fvt_inexact=fvt.n_inexact,
                 fvt_pieces_mean=float(np.diff(fvt.indptr)[gold < 0].mean()) if (gold < 0).any() else 0.0)
    counts, edges = np.histogram(found.best_score[candidate], bins=40, range=(-1.0, 1.0))
    for code, name in HOW_NAMES.items():
        stats[f"{COUNT_NAMES.get(name, name)}_count"] = int((how == code).sum())
    stats.update(target_with_vector=int(has_vec.sum()), source_with_vector=int(len(vec.s_ids)),
                 unseen_non_gold=int(((gold < 0) & ~has_vec).sum()),
                 max_hub_size=int(A.hub_stats(src[aligned, 0], v_s)["max_hub_size"]) if aligned.any() else 0,
                 seconds=round(time.time() - timer, 3))
    arrays = {
        "how": how, "src": src, "weight": weight, "blend": blend, "scale": scale, "best_score": found.best_score,
        "best_source": found.best_source, "best_csls": found.best_csls, "margin": found.margin,
        "argmax_1to1": argmax_1to1, "gold": gold, "gold_score": found.gold_score, "fvt_indptr": fvt.indptr,
        "fvt_indices": fvt.indices, "pivot_target": piv[0].astype(np.int64), "pivot_source": piv[1].astype(np.int64),
        "has_vector": has_vec, "hist_counts": counts.astype(np.int64), "hist_edges": edges.astype(np.float32),
        "source_vocab": np.int64(v_s), "target_vocab": np.int64(v_t), "threshold": np.float32(threshold),
        "margin_threshold": np.float32(found.margin_min), "blend_fvt": np.float32(ac.blend_fvt),
        "top_k": np.int64(max(1, int(ac.top_k))), **sparse,
    }
    return arrays, stats


_ESCAPES = str.maketrans({"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x00": "\\0"})


def _visible(text: str) -> str:
    """One-line form of a token's text for the CSV (newline, CR, tab, NUL escaped)."""
    return text.translate(_ESCAPES)


def write_csv(path: Path, arrays: dict, target: A.Vocab, source: A.Vocab) -> None:
    how, src, best, score = arrays["how"], arrays["src"], arrays["best_source"], arrays["best_score"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["target_id", "target_token", "target_text", "how", "source_id", "source_token", "score"])
        for i in range(len(how)):
            sid = int(src[i, 0]) if how[i] != HOW_FVT else int(best[i])
            stok = source.tokens[sid] if 0 <= sid < len(source) else ""
            sc = "" if not np.isfinite(score[i]) else f"{score[i]:.4f}"
            text = target.canon[i] if target.special[i] else A.canon_text(target.canon[i])
            w.writerow([i, target.tokens[i], _visible(text), HOW_NAMES[int(how[i])], sid, stok, sc])


def plot_hist(path: Path, arrays: dict, threshold: float, scoring: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    edges = arrays["hist_edges"]
    ax.stairs(arrays["hist_counts"], edges, fill=True, alpha=0.6, label="non-gold tokens: best candidate")
    gs = arrays["gold_score"]
    gs = gs[np.isfinite(gs)]
    if len(gs):
        gc, _ = np.histogram(gs, bins=edges)
        ax.stairs(gc, edges, label="gold pairs (for reference)", color="#d65f5f", lw=1.5)
    ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax.set_xlabel(f"cosine of relative representations (candidate chosen by {scoring})")
    ax.set_ylabel("target tokens")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _finite(obj: Any) -> Any:
    """JSON-safe copy: inf/NaN floats become null."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _tokenizers(ctx: Context) -> tuple[Any, Any]:
    """The source's and the target's tokenizers, checked against the sizes the corpus was encoded with."""
    tok_dir = ctx.path("tokenize")
    source_tok = refs.load_tokenizer(str(ctx.path("source") / "model"))
    target_tok = refs.load_tokenizer(str(tok_dir / "target_tokenizer"))
    info_path = tok_dir / "info.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        for side, tok in (("source", source_tok), ("target", target_tok)):
            want = info.get(f"{side}_vocab")
            if isinstance(want, int) and want != len(tok):
                raise AlignInputError(f"{info_path}: key '{side}_vocab' is {want} but the {side} tokenizer has "
                                      f"{len(tok)} tokens (expected the tokenizer the corpus was encoded with)")
    return source_tok, target_tok


def _metrics(stats: dict, v_t: int, seconds: float) -> dict[str, Any]:
    """``align/…``: each rule's share of target rows, and the search's diagnostics."""
    metrics: dict[str, Any] = {f"align/{k}_share": stats[f"{k}_count"] / v_t
                               for k in ("exact", "aligned", "fallback", "special", "sparse")}
    metrics.update({f"align/{k}": stats[k] for k in ("pivots", "max_hub_size", "target_with_vector", "fvt_empty",
                                                     "sparse_queries", "sparse_atoms", "above_threshold")})
    metrics["align/seconds"] = seconds
    metrics["align/focus_truncated"] = stats.get("focus_truncated", 0)
    if np.isfinite(stats.get("margin_threshold", np.nan)):
        metrics["align/margin_threshold"] = stats["margin_threshold"]
    metrics.update({f"align/{k}": stats[k] for k in ("gold_p1_cos", "gold_p1_csls") if k in stats})
    for name in ("cos", "csls"):
        h = stats.get(f"hub_{name}")
        if h:
            metrics[f"align/hub_{name}_max"] = h["max_hub_size"]
            metrics[f"align/hub_{name}_top1pct_share"] = h["top1pct_share"]
    return metrics


def _track(ctx: Context, out: Path, hist: Path, arrays: dict, target: A.Vocab, source: A.Vocab, seed: int) -> None:
    """The histogram, the artifact and 100 aligned pairs drawn at random to the tracker."""
    tr = ctx.tracker
    tr.image("align/similarity_hist", hist)
    tr.artifact("alignment", "alignment", [out / "alignment.npz", hist, out / "info.json"])
    shown = np.nonzero(arrays["how"] == HOW_ALIGNED)[0]
    if len(shown):
        shown = np.sort(np.random.default_rng(seed).choice(shown, size=min(100, len(shown)), replace=False))
        rows = [[int(i), A.canon_text(target.canon[i]), int(arrays["src"][i, 0]),
                 A.canon_text(source.canon[int(arrays["src"][i, 0])]), float(arrays["best_score"][i])] for i in shown]
        tr.table("align/examples", ["target_id", "target", "source_id", "source", "score"], rows)


def run(cfg: Config, ctx: Context, out: Path) -> dict:
    t_start = time.time()
    source_tok, target_tok = _tokenizers(ctx)
    source, target = A.vocab_from_tokenizer(source_tok), A.vocab_from_tokenizer(target_tok)
    log.info("align: source %d tokens (%s), target %d tokens (%s)", len(source), source.style, len(target),
             target.style)
    emb_dir = ctx.path("embed")
    t_vec = load_vectors(emb_dir / "target.npz", len(target))
    s_vec = load_vectors(emb_dir / "source.npz", len(source))
    if t_vec[1].shape[1] != s_vec[1].shape[1]:
        log.info("align: target vectors have %d dims, source %d (fine: only cosines to pivots are compared)",
                 t_vec[1].shape[1], s_vec[1].shape[1])
    ac = cfg.alignment
    arrays, stats = compute_alignment(target, source, source_tok, t_vec, s_vec, pivot_count=cfg.pivot_count,
                                      threshold=cfg.similarity_threshold, ac=ac)

    np.savez(out / "alignment.npz", **arrays)
    write_csv(out / "alignment.csv", arrays, target, source)
    hist = out / "similarity_hist.png"
    plot_hist(hist, arrays, cfg.similarity_threshold, ac.scoring)
    run_dir = Path(ctx.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(hist, run_dir / "similarity_hist.png")

    seconds = round(time.time() - t_start, 3)
    summary = {**stats, "seconds": seconds, "threshold": cfg.similarity_threshold,
               **{f.name: getattr(ac, f.name) for f in dataclasses.fields(AlignmentConfig)},
               "pivot_count": cfg.pivot_count, "source_style": source.style, "target_style": target.style,
               "sim_hist": {"counts": arrays["hist_counts"].tolist(), "edges": arrays["hist_edges"].tolist()}}
    (out / "info.json").write_text(json.dumps(_finite(summary), indent=1))
    _track(ctx, out, hist, arrays, target, source, cfg.seed)
    log.info("align: %d gold, %d aligned, %d FVT, %d special of %d target tokens; %d pivots; %.1fs",
             stats["exact_count"], stats["aligned_count"], stats["fallback_count"], stats["special_count"],
             len(target), stats["pivots"], seconds)
    return _metrics(stats, len(target), seconds)
