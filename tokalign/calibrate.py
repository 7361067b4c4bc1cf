"""Unigram calibration of ours' output rows (init method ``tokalign`` with ``alignment.calibrate=true``).

A freshly initialised model predicts some tokens far more often than the new tokenizer ever produces them: a gold
token such as `` hyp`` that the source emitted before ``ertension`` but the target, which has `` hypertension``,
rarely does, or a new token whose string the text never holds. Each such prediction takes probability from the
token that does come next. The rule, with the training text under the target tokenizer and the initialised
model's final hidden states ``h`` on ``positions`` of it:

1. ``u``: the direction that raises every logit by one nat, the ridge regression of the constant 1 on ``h``
   (measured on the demo run onto Qwen2: ``h · u`` = 0.998 ± 0.035), so adding ``b_t · u`` to token ``t``'s output
   row adds about ``b_t`` to its logit everywhere, a bias the architecture has no tensor for;
2. ``q_t``: the model's mean probability of ``t`` over those positions; ``f_t = (c_t + k N q_t) / (N + k N)``:
   the text's frequency of ``t`` (``c_t`` of ``N`` tokens) smoothed towards ``q_t`` with ``k N`` pseudo-counts
   (``alignment.calibrate_k``, chosen on the dev split);
3. ``b_t = min(0, b_t + log(f_t / q_t(b)))``, three fixed-point steps from 0: a token is only ever lowered, never
   raised, and special tokens (end of text, chat markers) are left alone so generation still stops.

On a tied head the row is also the token's input row; the tokens it lowers are the ones the text rarely holds.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import numpy as np

log = logging.getLogger("tokalign")


def logit_direction(H: Any, ridge: float = 10.0) -> Any:
    """``u`` with ``h · u ≈ 1`` for the rows ``h`` of ``H``: ridge regression of the constant 1 (``ridge`` per
    1,000 rows)."""
    import torch

    from tokalign.output_rows import ridge_gram

    return torch.linalg.solve(ridge_gram(H, ridge), H.double().sum(0)).float()


def mean_probs(H: Any, W: Any, b: np.ndarray, chunk: int = 500) -> np.ndarray:
    """The mean over the rows of ``H`` of ``softmax(h @ W.T + b)`` (float64)."""
    import torch

    bias = torch.from_numpy(b).float()
    q = torch.zeros(W.shape[0], dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, len(H), chunk):
            z = torch.addmm(bias, H[i:i + chunk], W.T)  # in place from here on: one [chunk, V] buffer
            z.sub_(z.amax(1, keepdim=True)).exp_()
            q += (z.sum(1).reciprocal() @ z).double()  # each row's softmax, summed over the rows
    return (q / max(len(H), 1)).numpy()


def calibration_bias(H: Any, W: Any, counts: np.ndarray, k: float, keep: np.ndarray, steps: int = 3
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``(b, q0)``: the non-positive logit offsets of steps 2-3 of the module docstring (0 where ``keep``) and the
    model's mean probabilities before them."""
    counts = np.asarray(counts, dtype=np.float64)
    n = max(counts.sum(), 1.0)
    q0 = mean_probs(H, W, np.zeros(W.shape[0]))
    f = (counts + k * n * q0) / (n + k * n)
    b, q = np.zeros(W.shape[0]), q0
    for step in range(steps):
        b = np.minimum(0.0, b + np.log(np.maximum(f, 1e-300) / np.maximum(q, 1e-300)))
        b[keep] = 0.0
        if step < steps - 1:
            q = mean_probs(H, W, b)
    return b, q0


def calibrate_rows(model: Any, docs: Sequence[Sequence[int]], counts: np.ndarray, *, positions: int, k: float,
                   keep: np.ndarray) -> tuple[np.ndarray, dict]:
    """``b · u`` for every output row ([V, hidden] float32), to add to the initialised ``model``'s output rows, and
    what it did; ``docs`` target token ids of training text, each starting with the document-start token."""
    from tokalign.output_rows import hidden_states

    t0 = time.time()
    H, _, _ = hidden_states(model, docs, positions, with_gains=False)
    W = model.get_output_embeddings().weight.detach().float()
    u = logit_direction(H)
    hu = (H @ u).numpy()
    b, q0 = calibration_bias(H, W, counts, k, keep)
    low = b < 0
    info = {"positions": int(len(H)), "h_dot_u_mean": round(float(hu.mean()), 4), "h_dot_u_std": round(float(hu.std()), 4),
            "rows_lowered": int(low.sum()), "mean_offset": round(float(b[low].mean()), 4) if low.any() else 0.0,
            "min_offset": round(float(b.min()), 4), "mass_lowered": round(float(q0[low].sum()), 4),
            "seconds": round(time.time() - t0, 1)}
    log.info("calibration: %d rows lowered (mean %.2f nats; they held %.1f%% of the probability) in %.1fs",
             info["rows_lowered"], info["mean_offset"], 100 * info["mass_lowered"], info["seconds"])
    return (b[:, None] * u.numpy()[None, :]).astype(np.float32), info
