"""Output rows of new tokens fitted with the source model (``tokalign/output_rows.py``): the occurrences against a
hand-made example, the vectorised rows against the ridge regression written out token by token."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokalign.output_rows import fit_output_rows, next_token_logprobs, occurrences

from conftest import tiny_llama


def test_occurrences_by_hand():
    docs = [[0, 5, 6, 7, 5, 6]]
    g = [np.array([-1.0, -2.0, -3.0, -4.0, -5.0])]  # row j predicts docs[0][j + 1]
    toks, pos, val = occurrences(docs, g, [[5, 6], [5, 6, 7], [9], [7, 5]])
    got = sorted(zip(toks.tolist(), pos.tolist(), val.tolist()))
    # [5, 6] follows rows 0 and 3 (P(6 | 5) = g[1], g[4]); [5, 6, 7] row 0 (g[1] + g[2]); [7, 5] row 2 (g[3])
    assert got == [(0, 0, -2.0), (0, 3, -5.0), (1, 0, -5.0), (3, 2, -4.0)]


def _ridge_rows(model, docs, pieces, head, ridge, prior):
    """The definition, one token at a time: y = the teacher-forced log P(rest) where the string follows, c_t
    (its mean; ``prior`` when never seen) elsewhere; delta = (H'H + lambda I)^-1 H'y."""
    hs, ys = [], [[] for _ in pieces]
    for ids in docs:
        h, _ = next_token_logprobs(model, ids)
        lp = torch.log_softmax(model.get_output_embeddings()(h), -1).double()
        hs.append(h.double())
        for t, p in enumerate(pieces):
            y = []
            for j in range(len(ids) - 1):
                k = len(p)
                y.append(float(sum(lp[j + q, p[q]] for q in range(1, k))) if ids[j + 1:j + 1 + k] == p else None)
            ys[t].extend(y)
    H = torch.cat(hs)
    inv = torch.linalg.inv(H.T @ H + ridge * len(H) / 1000 * torch.eye(H.shape[1], dtype=torch.float64))
    rows = []
    for t, p in enumerate(pieces):
        seen = [v for v in ys[t] if v is not None]
        c = float(np.mean(seen)) if seen else prior
        y = torch.tensor([c if v is None else v for v in ys[t]], dtype=torch.float64)
        rows.append(head[p[0]].double() + inv @ (H.T @ y))
    return torch.stack(rows)


def test_fitted_rows_are_the_ridge_regression_token_by_token():
    model = tiny_llama(vocab=40, seed=3)
    rng = np.random.default_rng(0)
    docs = [[1] + rng.integers(3, 7, size=n).tolist() for n in (30, 25, 40)]  # small alphabet: pairs recur
    pieces = [docs[0][5:7], docs[1][3:6], docs[2][10:12], [30, 31], [33, 34, 35]]  # the last two never occur
    assert len({tuple(p) for p in pieces}) == 5
    head = model.get_output_embeddings().weight.detach().float()
    with torch.no_grad():
        rows, info = fit_output_rows(model, docs, pieces, head, fit_tokens=10_000, ridge=10.0)
    assert info["fit_positions"] == sum(len(d) - 1 for d in docs)
    assert info["tokens_seen"] == 3
    toks, _, val = occurrences(docs, [next_token_logprobs(model, d)[1].numpy() for d in docs], pieces)
    prior = float(np.mean([val[toks == t].mean() for t in np.unique(toks)]))
    assert info["unseen_logprob"] == pytest.approx(prior, abs=1e-4)
    with torch.no_grad():
        want = _ridge_rows(model, docs, pieces, head, 10.0, prior)
    assert torch.allclose(rows.double(), want, rtol=1e-4, atol=1e-3)  # float32 against float64
    # a string that occurs gets a lower logit than its first piece where it is improbable (prior < 0)
    assert prior < 0
    h, _ = next_token_logprobs(model, docs[0])
    gap = (h @ rows[3] - h @ head[30]).mean()
    assert gap < 0


def test_single_piece_tokens_take_their_piece_row():
    model = tiny_llama(vocab=20, seed=1)
    head = model.get_output_embeddings().weight.detach().float()
    with torch.no_grad():
        rows, _ = fit_output_rows(model, [[1, 4, 5, 4, 5]], [[7], [4, 5]], head, fit_tokens=100, ridge=1.0)
    assert torch.equal(rows[0], head[7])
    assert not torch.equal(rows[1], head[4])
