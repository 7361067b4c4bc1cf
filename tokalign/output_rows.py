"""Output-head rows of new tokens fitted with the source model itself (init methods ``tokalign`` and ``extend``).

A new token ``t`` that the source tokenizer spells ``p1 … pk`` (k >= 2) should, as an output, take about the
probability the source model gives its whole string: ``logit_t(h) ≈ logit_p1(h) + log P(p2 … pk | h, p1)``. The
mean of its pieces' rows (FVT) gives it instead the average of its pieces' logits, far above that, so its row
steals probability from the tokens that do come next; with a tied head one vector cannot serve as both its input
row and this output row. One linear row approximates it:

    out_t = head[p1] + δ_t

``δ_t`` is the ridge regression, over the source model's final hidden states ``h`` on training text (source
tokenization), of ``y_t(h)``: the teacher-forced ``log P(p2 … pk | h, p1)`` at the positions where the string
follows, and ``c_t`` everywhere else, ``c_t`` the mean of those values. A token whose string never occurs in the
text takes ``c_t = unseen`` (``None``: the mean ``c`` over the tokens that do occur, weighted by token). With
``c`` alone (no occurrence) the row is ``head[p1] + c * u``, ``u`` the direction that raises the logit by one nat at
the text's mean hidden state, i.e. the string's probability is that of its first piece times ``e^c``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional, Sequence

import numpy as np

log = logging.getLogger("tokalign")


def final_hidden(model: Any, ids: Sequence[int]) -> Any:
    """Final hidden states (the head's input) of one document's every position but the last."""
    import torch

    with torch.no_grad():
        return model.base_model(torch.tensor([list(ids)])).last_hidden_state[0, :-1].float()


def next_token_logprobs(model: Any, ids: Sequence[int]) -> tuple[Any, Any]:
    """``(h, g)`` of one document: ``final_hidden`` and the log-probability each position gives the token that
    follows."""
    import torch

    h = final_hidden(model, ids)
    with torch.no_grad():
        lp = torch.log_softmax(model.get_output_embeddings()(h).float(), -1)
        return h, lp.gather(1, torch.tensor(list(ids))[1:, None])[:, 0]


def occurrences(docs: Sequence[Sequence[int]], gains: Sequence[Any], pieces: Sequence[Sequence[int]]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each multi-piece string follows in the documents: ``(token, position, log P(rest))`` arrays, position
    counted over all documents' predicting positions (``h`` row), log P of pieces 2…k given the first."""
    index = {tuple(p): t for t, p in enumerate(pieces) if len(p) >= 2}
    k_max = max((len(p) for p in pieces), default=0)
    toks, pos, val, base = [], [], [], 0
    for ids, g in zip(docs, gains):
        ids, g = list(ids), np.asarray(g, dtype=np.float64)
        cum = np.concatenate([[0.0], np.cumsum(g)])
        for j in range(len(ids) - 1):  # row j predicts ids[j + 1]
            for k in range(2, min(k_max, len(ids) - 1 - j) + 1):
                t = index.get(tuple(ids[j + 1:j + 1 + k]))
                if t is not None:  # pieces 2..k are predicted by rows j+1 .. j+k-1
                    toks.append(t)
                    pos.append(base + j)
                    val.append(cum[j + k] - cum[j + 1])
        base += len(ids) - 1
    return np.asarray(toks, dtype=np.int64), np.asarray(pos, dtype=np.int64), np.asarray(val, dtype=np.float64)


def hidden_states(model: Any, docs: Sequence[Sequence[int]], fit_tokens: int, max_len: int = 512,
                  with_gains: bool = True) -> tuple[Any, list[list[int]], list[Any]]:
    """Hidden states of up to ``fit_tokens`` predicting positions, with the documents (cut to fit) and, unless
    ``with_gains`` is off (no pass through the head), the log-probability of each next token."""
    import torch

    hs, kept, gains, n = [], [], [], 0
    for ids in docs:
        if n >= fit_tokens:
            break
        ids = list(ids)[: min(max_len, fit_tokens - n + 1)]
        if len(ids) < 2:
            continue
        if with_gains:
            h, g = next_token_logprobs(model, ids)
            gains.append(g.numpy())
        else:
            h = final_hidden(model, ids)
        hs.append(h)
        kept.append(ids)
        n += len(ids) - 1
    d = model.get_output_embeddings().weight.shape[1]
    return (torch.cat(hs) if hs else torch.zeros(0, d)), kept, gains


def ridge_gram(H: Any, ridge: float) -> Any:
    """``HᵀH + λI`` in float64, ``λ`` = ``ridge`` per 1,000 rows of ``H``: the ridge regressions on hidden states
    here and in ``tokalign/calibrate.py``."""
    import torch

    Hd = H.double()
    return Hd.T @ Hd + ridge * max(len(H), 1) / 1000 * torch.eye(H.shape[1], dtype=torch.float64)


def fit_output_rows(model: Any, docs: Sequence[Sequence[int]], pieces: Sequence[Sequence[int]], head: Any, *,
                    fit_tokens: int, ridge: float, unseen: Optional[float] = None) -> tuple[Any, dict]:
    """``head[p1] + δ_t`` for every token of ``pieces`` (the module docstring); ``head`` the source's output rows
    (torch, [V_s, d]), ``docs`` source token ids, each starting with the document-start token. Single-piece
    tokens take their piece's row. ``ridge`` is the ridge strength per 1,000 fitted positions."""
    import torch

    t0 = time.time()
    H, kept, gains = hidden_states(model, docs, fit_tokens)
    toks, pos, val = occurrences(kept, gains, pieces)
    T = len(pieces)
    inv = torch.linalg.inv(ridge_gram(H, ridge))
    seen_n = np.bincount(toks, minlength=T)
    seen_sum = np.bincount(toks, weights=val, minlength=T)
    seen = seen_n > 0
    c = np.divide(seen_sum, np.maximum(seen_n, 1))
    prior = float(c[seen].mean()) if unseen is None and seen.any() else float(unseen or 0.0)
    c[~seen] = prior
    c_t = torch.from_numpy(c)
    B = c_t[:, None] * H.double().sum(0)[None, :]  # the constant target c_t at every position
    if len(toks):  # plus the deviations at the positions where the string follows
        dev = torch.from_numpy(val - c[toks])[:, None] * H.double()[torch.from_numpy(pos)]
        B.index_add_(0, torch.from_numpy(toks), dev)
    delta = (B @ inv).float()
    first = torch.tensor([p[0] if len(p) else 0 for p in pieces], dtype=torch.long)
    rows = head[first].float() + delta
    single = torch.tensor([len(p) < 2 for p in pieces])
    rows[single] = head[first[single]].float()
    info = {"fit_positions": int(len(H)), "tokens_seen": int((seen & ~single.numpy()).sum()),
            "occurrences": int(len(toks)), "unseen_logprob": round(prior, 4), "fit_seconds": round(time.time() - t0, 1)}
    log.info("output rows: %d tokens fitted on %d positions (%d seen, log P(rest) of unseen %.2f) in %.1fs",
             T, len(H), info["tokens_seen"], prior, info["fit_seconds"])
    return rows, info
