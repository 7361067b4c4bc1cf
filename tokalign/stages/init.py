"""Stage ``init``: embedding rows of the source model for the whole target vocabulary, one set per
method in ``init_methods``, and the initialised model of the primary method.

Methods (``S`` = source input embedding; for an untied model the output head ``H`` gets the same
treatment from the source head's rows; a tied model stays tied):

* ``random``: N(0, std(S)^2) for every row (``H``: std(H)), seeded by ``seed``. Pure random, the
  special tokens included: it is the floor every other method must beat.
* ``mean``: every row is the mean source row.
* ``fvt``: Fast Vocabulary Transfer: the mean of the source rows of the token's pieces under the
  source tokenizer (gold tokens are their own single piece); tokens without a piece get the mean.
* ``focus``: FOCUS (Dobler & de Melo 2023): gold tokens copied; a new token with a target-side fastText vector
  takes sparsemax(cosines to the overlapping tokens' vectors, the ``alignment.focus_k`` nearest) times those
  tokens' source rows; a token without a vector takes its FVT row (never random).
* ``omp``: orthogonal matching pursuit (as in mergekit's tokensurgeon): the new token's target-side vector as a
  least-squares combination of ``alignment.omp_k`` overlapping tokens' vectors, the same coefficients on their
  source rows; FVT where there is no vector. Both combinations are computed by stage ``align``
  (``focus_src``/``omp_src`` and their weights in ``alignment.npz``).
* ``tokalign_1to1``: the published TokAlign rule: gold matches copy their row, every other token
  with a vector takes the row of its plain-cosine argmax, tokens never seen take a random
  (seeded) non-special source row.
* ``extend`` (only for a target that extends the source's vocabulary, ``target_tokenizer=domain``): every old
  row the source's, bit for bit, the head untied, new rows made with the source model itself
  (``tokalign/extend_rows.py``: input row of the last piece, output row fitted to the source's log-probability of
  the token's string, then a few steps on the new rows only); ``rows/extend.safetensors`` holds ``lm_head`` too.
* ``tokalign``: ours, from ``align/alignment.npz``: special tokens by role, gold copies, confident
  alignments (``src``/``weight`` rows, blended with FVT by ``blend``), FVT for the rest (or FOCUS/OMP rows
  where ``alignment.new_rows`` says so), new rows of tokens the corpus never produced scaled by
  ``alignment.unseen_scale``. Its piece compositions weigh each piece by its length in bytes
  (``alignment.piece_weights=bytes``): every byte of the new token counts the same, so a one-letter fragment
  does not weigh as much as the word stem it follows.
  With ``alignment.refine_steps`` (off by default: measured, no gain) the rows of new tokens the training text
  holds then take that many next-token steps through the frozen body.
  With ``alignment.calibrate`` (the default) every output row whose token the initialised model predicts more often
  than the training text holds it is then lowered by about the log of the ratio (``tokalign/calibrate.py``; special
  tokens never). With ``alignment.absorb`` (the default) the output rows of the target tokens that start the
  target's spelling of source tokens the target lacks (`` a`` of `` aortic``) then take those tokens' probability
  as well (``tokalign/absorb.py``). With a target tokenizer identical to the source one it is a bit-for-bit copy
  (nothing calibrated or absorbed).

Every method, the baselines included, gives the target's document-start token (``metrics.start_token_id``:
Qwen2's ``<|endoftext|>``) the source's document-start row (SmolLM2's ``<|endoftext|>``): that token is the
context every evaluated document starts from, so one convention for it makes the methods differ only in
their other rows (``same_start``).

The vocabulary is ``len(target tokenizer)`` rows, not padded to a multiple of 64.

Writes ``model/`` (the primary method: ``extend`` when listed, else ``tokalign`` when listed, else the first; safetensors, the
target tokenizer, ``vocab_size`` and BOS/EOS/PAD/UNK ids from the target tokenizer),
``rows/<method>.safetensors`` (``embed`` [V_t, hidden], plus ``lm_head`` where the method has a head of its own:
an untied source, ``extend``, ours with ``alignment.output_rows=fit``) and
``info.json`` {"primary", "methods", "tied", "vocab_size", "hidden_size", "counts": {...}}.

Run alone:  python -m tokalign init_methods=[fvt,tokalign]   (the pipeline caches this stage)
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from tokalign import alignment as A
from tokalign import metrics as M
from tokalign import refs
from tokalign.config import Config
from tokalign.context import Context
from tokalign.errors import TokalignError
from tokalign.artifacts import docs_of, load_stream
from tokalign.extend_rows import ExtendSettings, extend_rows, train_new_rows, windows
from tokalign.modelfacts import is_tied, untie
from tokalign.calibrate import calibrate_rows
from tokalign.absorb import absorb_rows, lost_tokens
from tokalign.output_rows import fit_output_rows

log = logging.getLogger(__name__)

ALIGN_KEYS = ("how", "src", "weight", "blend", "argmax_1to1", "fvt_indptr", "fvt_indices", "source_vocab")
OPTIONAL_KEYS = ("scale", "focus_src", "focus_weight", "omp_src", "omp_weight")  # scale: 1 where absent


class InitInputError(TokalignError, ValueError):
    """An input of stage init is missing or malformed; the message names the file or key."""


def load_alignment(path: Path, target_vocab: int) -> dict[str, np.ndarray]:
    """The arrays of ``alignment.npz`` that init uses, checked against the target vocabulary size."""
    if not path.is_file():
        raise InitInputError(f"{path}: no such file (expected the output of stage 'align')")
    try:
        z = np.load(path)
        missing = [k for k in ALIGN_KEYS if k not in z.files]
        arrays = {k: z[k] for k in ALIGN_KEYS + OPTIONAL_KEYS if k in z.files}
    except Exception as e:
        raise InitInputError(f"{path}: unreadable npz ({type(e).__name__}: {e})") from e
    if missing:
        raise InitInputError(f"{path}: missing key '{missing[0]}' (expected {', '.join(ALIGN_KEYS)})")
    n = arrays["how"].shape[0]
    if n != target_vocab:
        raise InitInputError(f"{path}: key 'how' has {n} rows but the target tokenizer has {target_vocab} tokens")
    if arrays["src"].shape != arrays["weight"].shape or arrays["src"].shape[0] != n:
        raise InitInputError(f"{path}: keys 'src' {arrays['src'].shape} and 'weight' {arrays['weight'].shape} must "
                             f"both be [{n}, K]")
    if "scale" in arrays and arrays["scale"].shape != (n,):
        raise InitInputError(f"{path}: key 'scale' has shape {arrays['scale'].shape}, expected ({n},)")
    if arrays["fvt_indptr"].shape != (n + 1,) or arrays["fvt_indptr"][-1] != len(arrays["fvt_indices"]):
        raise InitInputError(f"{path}: keys 'fvt_indptr'/'fvt_indices' are not a CSR over {n} target tokens")
    return arrays


def piece_byte_weights(src_tok: Any, v_s: int) -> np.ndarray:
    """Each source token's length in bytes (its canonical bytes; special tokens 0), the weights of ours' piece
    compositions under ``alignment.piece_weights=bytes``."""
    from tokalign.distill import token_bytes

    lengths = np.array([len(b) for b in token_bytes(src_tok)], dtype=np.float64)
    return np.pad(lengths, (0, max(0, v_s - len(lengths))))[:v_s]


def source_special_mask(source_vocab: int, roles: dict, special_ids: Optional[list] = None) -> np.ndarray:
    mask = np.zeros(source_vocab, dtype=bool)
    for i in list(roles.values()) + list(special_ids or []):
        if i is not None and 0 <= int(i) < source_vocab:
            mask[int(i)] = True
    return mask


def build_rows(method: str, matrix: np.ndarray, al: dict[str, np.ndarray], *, seed: int, salt: int = 0,
               source_special: Optional[np.ndarray] = None,
               piece_weight: Optional[np.ndarray] = None) -> tuple[np.ndarray, dict[str, int]]:
    """Rows [V_t, hidden] float32 of one method from one source matrix (input embedding or head).

    ``matrix`` may have more rows than the source vocabulary (a padded embedding); only the first
    ``source_vocab`` rows are used for means and random picks. ``salt`` separates the random streams
    of the input embedding (0) and the output head (1). ``piece_weight`` (one per source token): ours' piece
    compositions are means weighted by it (``alignment.piece_weights=bytes``); the published ``fvt`` never is.
    """
    n_t = al["how"].shape[0]
    v_s = int(al["source_vocab"])
    base = np.asarray(matrix[:v_s], dtype=np.float32)
    info: dict[str, int] = {}
    if method == "random":
        rng = np.random.default_rng([seed, 0, salt])
        rows = rng.standard_normal((n_t, base.shape[1]), dtype=np.float32) * np.float32(base.std())
        return rows, info
    mean_row = base.mean(axis=0, dtype=np.float64).astype(np.float32)
    if method == "mean":
        return np.broadcast_to(mean_row, (n_t, base.shape[1])).copy(), info
    weights = piece_weight if method == "tokalign" else None  # the published methods keep FVT's plain mean
    fvt, n_empty = A.fvt_rows(base, al["fvt_indptr"], al["fvt_indices"], fill=mean_row, piece_weight=weights)
    info["fvt_empty"] = n_empty
    if method == "fvt":
        return fvt, info
    if method in ("focus", "omp"):
        return sparse_rows(method, base, al, fvt), info
    if method == "tokalign_1to1":
        choice = np.asarray(al["argmax_1to1"], dtype=np.int64).copy()
        unseen = choice < 0
        pool = np.arange(v_s) if source_special is None else np.nonzero(~source_special[:v_s])[0]
        rng = np.random.default_rng([seed, 1])  # the same picks for the embedding and the head
        choice[unseen] = rng.choice(pool, size=int(unseen.sum()))
        info["random_rows"] = int(unseen.sum())
        return base[choice].copy(), info
    if method == "tokalign":
        rows = A.compose_rows(base, al["src"], al["weight"], al["blend"], fvt)
        scale = al.get("scale")
        if scale is not None:
            shrink = scale != 1.0
            rows[shrink] *= scale[shrink, None].astype(np.float32)
            info["scaled_rows"] = int(shrink.sum())
        return rows, info
    raise InitInputError(f"config key 'init_methods': unknown method {method!r}")  # a direct caller's typo


def sparse_rows(method: str, base: np.ndarray, al: dict[str, np.ndarray], fvt: np.ndarray) -> np.ndarray:
    """FOCUS or OMP rows: the stage-align combination of overlapping tokens' source rows where the token has
    one, the FVT row (gold tokens: their own row) everywhere else."""
    if f"{method}_src" not in al:
        raise InitInputError(f"alignment.npz: missing key '{method}_src' (written by stage 'align' since the "
                             f"{method} method exists; rerun align)")
    return A.compose_rows(base, al[f"{method}_src"], al[f"{method}_weight"], fvt=fvt)  # no weight: the FVT row


def same_start(rows: np.ndarray, matrix: np.ndarray, start: tuple[Optional[int], Optional[int]]) -> None:
    """The evaluation convention, for every method: the target's document-start token (``metrics.start_token_id``)
    takes the source's document-start row, so methods are compared on their new rows, not on the start context."""
    t, s = start
    if t is not None and s is not None and 0 <= t < rows.shape[0] and 0 <= s < matrix.shape[0]:
        rows[t] = matrix[s]


def build_model(model: Any, tok: Any, embed_rows: np.ndarray, head_rows: Optional[np.ndarray]) -> Any:
    """Resize ``model`` to the target vocabulary in place, set the rows and the special-token ids (a tied model
    given head rows, method ``extend``'s, is untied first)."""
    import torch

    if head_rows is not None and is_tied(model):
        untie(model)
    tied = is_tied(model)
    n_t, hidden = embed_rows.shape
    model.resize_token_embeddings(n_t, mean_resizing=False)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        emb.copy_(torch.from_numpy(embed_rows).to(emb.dtype))
        head = model.get_output_embeddings()
        if not tied:
            if head_rows is None:
                raise InitInputError("untied source model: output-head rows are required")
            head.weight.copy_(torch.from_numpy(head_rows).to(head.weight.dtype))
        elif head is not None and head.weight.data_ptr() != emb.data_ptr():
            model.tie_weights()
    cfg = model.config
    cfg.vocab_size = n_t
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if text_cfg is not cfg:
        text_cfg.vocab_size = n_t
    for r in ("bos", "eos", "pad", "unk"):
        setattr(cfg, f"{r}_token_id", getattr(tok, f"{r}_token_id", None))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        for r in ("bos", "eos", "pad"):
            setattr(gen, f"{r}_token_id", getattr(tok, f"{r}_token_id", None))
    return model


def verify_saved(path: Path, embed_rows: np.ndarray) -> None:
    """The saved folder loads with the Auto classes and holds the rows we set."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    m = AutoModelForCausalLM.from_pretrained(str(path), dtype="float32")
    w = m.get_input_embeddings().weight.detach().numpy()
    if w.shape != embed_rows.shape or len(tok) != embed_rows.shape[0]:
        raise InitInputError(f"{path}: saved model has embedding {tuple(w.shape)} and tokenizer of {len(tok)}, "
                             f"expected {embed_rows.shape}")
    probe = np.linspace(0, embed_rows.shape[0] - 1, num=min(64, embed_rows.shape[0])).astype(np.int64)
    if not np.array_equal(w[probe], embed_rows[probe]):
        raise InitInputError(f"{path}: saved embedding rows differ from the rows that were set")


def _extend(cfg: Config, ctx: Context, model: Any, tok: Any, src_tok: Any, start: Optional[int]) -> tuple:
    """Method ``extend``'s rows from the source model and the training streams of stage ``tokenize``."""
    dv = cfg.domain_vocab
    s_ids, s_off = load_stream(ctx.path("tokenize"), "source")
    t_ids, t_off = load_stream(ctx.path("tokenize"), "target")
    settings = ExtendSettings(fit_tokens=dv.init_fit_tokens, steps=dv.init_steps, lr=dv.init_lr, seed=cfg.seed,
                              output=dv.init_output, objective=dv.init_objective, schedule=dv.init_schedule)
    bos = start if start is not None else int(tok.eos_token_id or 0)
    e, h, info = extend_rows(model, tok, src_tok, [[bos, *d.tolist()] for d in docs_of(s_ids, s_off)],
                             [d.tolist() for d in docs_of(t_ids, t_off)], bos, settings)
    log.info("init: extend rows for %d new tokens (%s)", len(tok) - len(src_tok), info)
    return e, h, info


def fit_targets(al: dict) -> np.ndarray:
    """The target tokens whose output rows ``alignment.output_rows=fit`` sets: new tokens (rows from their pieces or
    FOCUS/OMP) that the source spells with two or more pieces."""
    how = al["how"]
    return np.nonzero(((how == A.HOW_FVT) | (how == A.HOW_SPARSE)) & (np.diff(al["fvt_indptr"]) >= 2))[0]


def _fit_output(cfg: Config, ctx: Context, model: Any, al: dict, h_rows: np.ndarray, source_start: Optional[int]) -> dict:
    """Ours with ``alignment.output_rows=fit``: the output rows of the new multi-piece tokens (set from their pieces
    or FOCUS/OMP) become their first piece's source output row plus a ridge fit to the source model's
    log-probability of the rest (``tokalign/output_rows.py``), in ``h_rows`` in place."""
    indptr, indices, new = al["fvt_indptr"], al["fvt_indices"], fit_targets(al)
    pieces = [indices[indptr[t]:indptr[t + 1]].tolist() for t in new]
    s_ids, s_off = load_stream(ctx.path("tokenize"), "source")
    prefix = [] if source_start is None else [source_start]
    docs = [prefix + d.tolist() for d in docs_of(s_ids, s_off)]
    for p in model.parameters():
        p.requires_grad_(False)
    src_head = model.get_output_embeddings().weight.detach().float()
    rows, info = fit_output_rows(model, docs, pieces, src_head, fit_tokens=cfg.alignment.output_fit_tokens,
                                 ridge=cfg.alignment.output_ridge)
    h_rows[new] = rows.numpy()
    return {**info, "rows": int(len(new))}


def new_token_mask(al: dict) -> np.ndarray:
    """The target tokens that are neither gold nor special: the rows a rule other than a copy sets."""
    return (al["how"] != A.HOW_GOLD) & (al["how"] != A.HOW_SPECIAL)


def has_new_tokens(al: dict) -> bool:
    """Whether the target has tokens that are neither gold nor special (an identical tokenizer has none: its model is
    the source's, bit for bit, and nothing is calibrated)."""
    return bool(new_token_mask(al).any())


def _refine(cfg: Config, ctx: Context, x: "Inputs", e_rows: np.ndarray, h_rows: Optional[np.ndarray]) -> dict:
    """Ours with ``alignment.refine_steps``: the rows of the new tokens that the training text holds (target
    tokenization) take that many Adam steps of the next-token loss through the source model's frozen body, on
    windows of the text that hold one (``extend_rows.train_new_rows``); every gold and special row, and every new
    token the text never shows, stays as the rules set it. The rows change in place (a tied head: one change for both
    roles)."""
    import torch

    a, is_new = cfg.alignment, new_token_mask(x.al)
    t_ids, t_off = load_stream(ctx.path("tokenize"), "target")
    bos = x.start[0] if x.start[0] is not None else int(x.tok.eos_token_id or 0)
    wins = windows([d.tolist() for d in docs_of(t_ids, t_off)], is_new, bos, 64, cfg.seed)
    rows = np.unique([t for w in wins for t in w if is_new[t]]).astype(np.int64)
    if not len(rows):
        return {"rows": 0, "windows": 0}
    for p in x.model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    s = ExtendSettings(fit_tokens=0, steps=a.refine_steps, lr=a.refine_lr, seed=cfg.seed)
    head = None if h_rows is None else torch.from_numpy(h_rows)  # from_numpy: the steps write into the arrays
    info = train_new_rows(x.model, torch.from_numpy(e_rows), head, rows, wins, s, name="refine")
    return {**info, "rows": int(len(rows)), "windows": len(wins)}


def extends_source(tok: Any, src_tok: Any) -> bool:
    """Whether the target vocabulary is the source's plus new tokens (``target_tokenizer=domain``)."""
    sv, tv = src_tok.get_vocab(), tok.get_vocab()
    return len(tok) > len(src_tok) and all(tv.get(t) == i for t, i in sv.items())


def special_rows(x: "Inputs") -> np.ndarray:
    """The target tokens that ours' calibration and absorption leave alone: special by the alignment or the
    tokenizer."""
    keep = x.al["how"] == A.HOW_SPECIAL
    keep[[i for i in x.tok.all_special_ids if 0 <= i < len(x.tok)]] = True
    return keep


def initialised(ctx: Context, x: "Inputs", e_rows: np.ndarray, h_rows: Optional[np.ndarray]) -> tuple[Any, list]:
    """``(model, docs)``: a fresh copy of the source model with these rows (eval mode), and the training text's
    target token ids, each document behind the document-start token."""
    t_ids, t_off = load_stream(ctx.path("tokenize"), "target")
    model = build_model(refs.load_model(str(x.src_dir / "model"), dtype="float32"), x.tok, e_rows, h_rows)
    model.eval()
    prefix = [] if x.start[0] is None else [x.start[0]]
    return model, [prefix + d.tolist() for d in docs_of(t_ids, t_off)]


def _calibrate(cfg: Config, ctx: Context, x: "Inputs", e_rows: np.ndarray, h_rows: Optional[np.ndarray]) -> dict:
    """Ours with ``alignment.calibrate``: every output row (``h_rows``, else the tied ``e_rows``) lowered where the
    initialised model predicts its token more often than the training text holds it (``tokalign/calibrate.py``),
    special tokens left alone, and a domain vocabulary's old rows too; the rows change in place."""
    tok, src_tok = x.tok, x.src_tok
    t_ids, _ = load_stream(ctx.path("tokenize"), "target")
    counts = np.bincount(np.asarray(t_ids, dtype=np.int64), minlength=len(tok))[:len(tok)]
    keep = special_rows(x)
    if extends_source(tok, src_tok):  # a domain vocabulary: the old rows stay the source's, bit for bit
        keep[:len(src_tok)] = True
    model, docs = initialised(ctx, x, e_rows, h_rows)
    a = cfg.alignment
    offsets, info = calibrate_rows(model, docs, counts, positions=a.calibrate_positions, k=a.calibrate_k, keep=keep)
    (e_rows if h_rows is None else h_rows)[...] += offsets
    return info


def _absorb(cfg: Config, ctx: Context, x: "Inputs", e_rows: np.ndarray, h_rows: Optional[np.ndarray]) -> dict:
    """Ours with ``alignment.absorb``: the output rows (``h_rows``, else the tied ``e_rows``) of the target tokens
    that start the spelling of source tokens the target lacks take those tokens' probability too
    (``tokalign/absorb.py``); special tokens are left alone; the rows change in place."""
    lost, first = lost_tokens(x.tok, x.src_tok)
    if not len(lost):
        return {"lost": 0, "rows": 0}
    model, docs = initialised(ctx, x, e_rows, h_rows)
    src_rows = x.emb if x.head is None else x.head
    rows, delta, info = absorb_rows(model, docs, src_rows, lost, first, positions=cfg.alignment.absorb_positions,
                                    ridge=cfg.alignment.absorb_ridge, keep=special_rows(x))
    (e_rows if h_rows is None else h_rows)[rows] += delta
    return info


@dataclass
class Inputs:
    """What every method's rows are built from: the target tokenizer, the source model and its matrices, the
    alignment, and the rules' shared facts."""

    tok: Any
    src_tok: Any
    src_dir: Path
    al: dict
    model: Any
    emb: np.ndarray
    head: Optional[np.ndarray]  # None: tied
    special: np.ndarray  # source special-token mask
    weights: Optional[np.ndarray]  # ours' piece weights (alignment.piece_weights=bytes)
    start: tuple[Optional[int], Optional[int]]  # (target, source) document-start tokens


def load_inputs(cfg: Config, ctx: Context) -> Inputs:
    src_dir, align_dir, tok_dir = ctx.path("source"), ctx.path("align"), ctx.path("tokenize")
    tok = refs.load_tokenizer(str(tok_dir / "target_tokenizer"))
    src_tok = refs.load_tokenizer(str(src_dir / "model"))
    al = load_alignment(align_dir / "alignment.npz", len(tok))
    model = refs.load_model(str(src_dir / "model"), dtype="float32")
    emb = model.get_input_embeddings().weight.detach().cpu().numpy()
    head = None if is_tied(model) else model.get_output_embeddings().weight.detach().cpu().numpy()
    v_s = int(al["source_vocab"])
    if emb.shape[0] < v_s:
        raise InitInputError(f"{align_dir / 'alignment.npz'}: key 'source_vocab' is {v_s} but the source model "
                             f"has only {emb.shape[0]} embedding rows")
    special = source_special_mask(v_s, refs.special_token_roles(src_tok), getattr(src_tok, "all_special_ids", []))
    weights = piece_byte_weights(src_tok, v_s) if cfg.alignment.piece_weights == "bytes" else None
    return Inputs(tok, src_tok, src_dir, al, model, emb, head, special, weights,
                  (M.start_token_id(tok), M.start_token_id(src_tok)))


def method_rows(m: str, cfg: Config, ctx: Context, x: Inputs) -> tuple[np.ndarray, Optional[np.ndarray], dict]:
    """``(input rows, output rows or None where the head stays tied, info)`` of one method."""
    if m == "extend":
        return _extend(cfg, ctx, x.model, x.tok, x.src_tok, x.start[0])
    kw = dict(seed=cfg.seed, source_special=x.special, piece_weight=x.weights)
    e_rows, info = build_rows(m, x.emb, x.al, salt=0, **kw)
    same_start(e_rows, x.emb, x.start)
    h_rows = None
    fit = m == "tokalign" and cfg.alignment.output_rows == "fit" and len(fit_targets(x.al)) > 0
    if x.head is not None or fit:
        base = x.emb if x.head is None else x.head
        h_rows, _ = build_rows(m, base, x.al, salt=1, **kw)
        same_start(h_rows, base, x.start)
        if fit:
            info["output_fit"] = _fit_output(cfg, ctx, x.model, x.al, h_rows, x.start[1])
    if m == "tokalign" and cfg.alignment.refine_steps > 0 and has_new_tokens(x.al):
        info["refine"] = _refine(cfg, ctx, x, e_rows, h_rows)
    if m == "tokalign" and cfg.alignment.calibrate and has_new_tokens(x.al):
        info["calibration"] = _calibrate(cfg, ctx, x, e_rows, h_rows)
    if m == "tokalign" and cfg.alignment.absorb:  # no lost source token (identical, a domain vocabulary): no change
        info["absorption"] = _absorb(cfg, ctx, x, e_rows, h_rows)
    return e_rows, h_rows, info


def _metrics(counts: dict, seconds: float, vocab: int, tied: bool) -> dict[str, Any]:
    metrics: dict[str, Any] = {"init/seconds": seconds, "init/vocab_size": vocab, "init/tied": int(tied)}
    if "fvt_empty" in counts.get("fvt", {}):
        metrics["init/fvt_empty"] = counts["fvt"]["fvt_empty"]
    cal = counts.get("tokalign", {}).get("calibration")
    if cal:
        metrics.update({"init/calibrated_rows": cal["rows_lowered"], "init/calibrated_mass": cal["mass_lowered"],
                        "init/calibration_h_dot_u_std": cal["h_dot_u_std"]})
    ab = counts.get("tokalign", {}).get("absorption")
    if ab:
        metrics.update({"init/absorbed_rows": ab["rows"], "init/absorbed_lost_tokens": ab["lost"]})
    if "random_rows" in counts.get("tokalign_1to1", {}):
        metrics["init/tokalign_1to1_random_rows"] = counts["tokalign_1to1"]["random_rows"]
    return metrics


def run(cfg: Config, ctx: Context, out: Path) -> dict:
    from safetensors.numpy import save_file

    t0 = time.time()
    methods = list(dict.fromkeys(cfg.init_methods))  # non-empty, known names: Config.__post_init__
    primary = next((m for m in ("extend", "tokalign") if m in methods), methods[0])
    x = load_inputs(cfg, ctx)
    tied, tok, start = x.head is None, x.tok, x.start
    (out / "rows").mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict] = {}
    untied_methods = []  # methods that give a tied source a head of its own
    primary_rows: tuple[np.ndarray, Optional[np.ndarray]] = (np.empty(0), None)
    for m in methods:
        e_rows, h_rows, counts[m] = method_rows(m, cfg, ctx, x)
        tensors = {"embed": np.ascontiguousarray(e_rows)}
        if h_rows is not None:
            tensors["lm_head"] = np.ascontiguousarray(h_rows)
            untied_methods += [m] if tied else []
        save_file(tensors, str(out / "rows" / f"{m}.safetensors"))
        if m == primary:
            primary_rows = (e_rows, h_rows)
        log.info("init: rows for %s written", m)
    model = build_model(x.model, tok, primary_rows[0], primary_rows[1])
    model.save_pretrained(out / "model", safe_serialization=True)
    tok.save_pretrained(out / "model")
    verify_saved(out / "model", primary_rows[0])

    how = x.al["how"]
    info = {"primary": primary, "methods": methods, "tied": tied, "vocab_size": int(len(tok)),
            "untied_methods": untied_methods,
            "start_token": {"target": start[0], "source": start[1]},
            "hidden_size": int(x.emb.shape[1]), "source_vocab": int(x.al["source_vocab"]), "padded_to": None,
            "counts": counts, "how": {name: int((how == code).sum()) for code, name in A.HOW_NAMES.items()}}
    (out / "info.json").write_text(json.dumps(info, indent=1))
    seconds = round(time.time() - t0, 3)
    ctx.tracker.summary({"init/primary": primary})
    log.info("init: %s (%d rows, tied=%s) in %.1fs", ", ".join(methods), len(tok), tied, seconds)
    return _metrics(counts, seconds, int(len(tok)), tied)
