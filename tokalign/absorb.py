"""Lost-token absorption of ours' output rows (init method ``tokalign`` with ``alignment.absorb=true``).

A source token whose bytes the target vocabulary lacks (SmolLM2's `` aortic``, which Qwen2 writes `` a`` +
``ortic``) has no row in the initialised model. Where the source model would predict it, its probability goes to
no target token in particular (the softmax spreads it over all of them), while the target's first piece of its
spelling (`` a``) keeps only its own small share, though that piece is what comes next. So each target token ``g``
that starts the target spelling of lost source tokens ``L_g`` should take their probability as well:

    y_g(h) = log( exp(h · w_g) + Σ_{l ∈ L_g} exp(h · s_l) )

with ``w_g`` its output row and ``s_l`` the lost tokens' source output rows. No single row gives a log-sum-exp
of several, so ``w_g`` becomes the ridge regression of ``y_g`` on the initialised model's final hidden states ``h``
(training text, target tokenization), shrunk towards ``w_g`` itself:

    w_g ← w_g + (HᵀH + λI)⁻¹ Hᵀ (y_g − H w_g)

``λ`` is ``alignment.absorb_ridge`` per 1,000 positions (chosen on the dev split, ``config.py``). A target that
holds every source token (a domain vocabulary, an identical tokenizer) has no lost token and nothing changes.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import numpy as np

log = logging.getLogger("tokalign")


def lost_tokens(tok: Any, src_tok: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(source ids, first target id)`` of every non-special source token whose bytes are no target token, the
    target id being the first token of the target's spelling of those bytes."""
    from tokalign import alignment as A

    source, target = A.vocab_from_tokenizer(src_tok), A.vocab_from_tokenizer(tok)
    same = A.gold_map(source, target)  # source id -> target id of the same bytes, else -1
    spell = A.fvt_decompose(source, target, tok, same)
    n = np.diff(spell.indptr)
    lost = np.nonzero((same < 0) & ~np.asarray(source.special, dtype=bool) & ~source.byte_token & (n >= 2))[0]
    return lost.astype(np.int64), spell.indices[spell.indptr[lost]].astype(np.int64)


def absorbed_targets(H: Any, W: Any, S: Any, groups: Any, member_group: Any) -> Any:
    """``Y`` [positions, groups]: ``log(exp(h · W[g]) + Σ exp(h · S[l]))`` over the lost tokens ``l`` of each group,
    ``S`` holding the lost tokens' rows and ``member_group`` each one's group index (``absorb_rows`` passes ``H`` a
    chunk of positions at a time)."""
    import torch

    with torch.no_grad():
        own, lost = H @ W[groups].T, H @ S.T
        top = torch.maximum(own.amax(1), lost.amax(1))[:, None]
        total = torch.exp(own - top).index_add_(1, member_group, torch.exp(lost - top))
        return torch.log(total) + top


def absorb_rows(model: Any, docs: Sequence[Sequence[int]], src_rows: Any, lost: np.ndarray, first: np.ndarray, *,
                positions: int, ridge: float, keep: np.ndarray, chunk: int = 2000) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(target ids, row changes [ids, hidden] float32, info)``: what to add to the initialised ``model``'s output rows
    (module docstring); ``docs`` target token ids of training text, each starting with the document-start token;
    ``src_rows`` the source model's output rows; target tokens in ``keep`` (special) are left alone. The targets are
    made ``chunk`` positions at a time, so memory grows with ``chunk`` x rows, not positions x rows."""
    import torch

    from tokalign.output_rows import hidden_states, ridge_gram

    t0 = time.time()
    nothing = np.zeros(0, np.int64), np.zeros((0, src_rows.shape[1]), np.float32), {"lost": 0, "rows": 0}
    use = ~keep[first]
    lost, first = lost[use], first[use]
    if not len(lost):
        return nothing
    groups, member_group = np.unique(first, return_inverse=True)
    H, _, _ = hidden_states(model, docs, positions, with_gains=False)
    if not len(H):
        return nothing
    W = model.get_output_embeddings().weight.detach().float()
    g, member = torch.from_numpy(groups), torch.from_numpy(member_group)
    S = torch.as_tensor(src_rows).float()[torch.from_numpy(lost)]
    R = W[g]
    Hd = H.double()
    HtY = torch.zeros(H.shape[1], len(groups), dtype=torch.float64)  # Hᵀ Y, summed a chunk of positions at a time
    for i in range(0, len(H), chunk):
        HtY += Hd[i:i + chunk].T @ absorbed_targets(H[i:i + chunk], W, S, g, member).double()
    delta = torch.linalg.solve(ridge_gram(H, ridge), HtY - (Hd.T @ Hd) @ R.double().T).T.float()
    info = {"lost": int(len(lost)), "rows": int(len(groups)), "positions": int(len(H)),
            "mean_change": round(float((delta.norm(dim=1) / R.norm(dim=1).clamp_min(1e-12)).mean()), 4),
            "seconds": round(time.time() - t0, 1)}
    log.info("absorption: %d target rows take the probability of %d lost source tokens (%.1fs)", info["rows"],
             info["lost"], info["seconds"])
    return groups, delta.numpy(), info
