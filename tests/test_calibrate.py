"""Unigram calibration of ours' output rows (``tokalign/calibrate.py``): the one-nat direction and the fixed point of
the offsets (the init stage's use of them: ``tests/test_init.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokalign.calibrate import calibration_bias, logit_direction, mean_probs


def _hidden(n=600, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(n, d, generator=g) * 0.3
    H[:, 0] = 2.0 + 0.02 * H[:, 0]  # a shared component, as final hidden states have
    return H


def test_logit_direction_moves_every_logit_by_one_nat():
    H = _hidden()
    u = logit_direction(H, ridge=0.01)
    hu = H @ u
    assert abs(float(hu.mean()) - 1) < 0.01 and float(hu.std()) < 0.1


def test_offsets_reach_the_constrained_fixed_point():
    H, W = _hidden(), torch.randn(12, 8, generator=torch.Generator().manual_seed(1))
    q0 = mean_probs(H, W, np.zeros(12))
    counts = np.round(q0 * 1000)
    counts[[2, 5]] = 0  # the text never holds tokens 2 and 5
    counts[7] = 400  # and holds 7 far more often than the model predicts it
    keep = np.zeros(12, dtype=bool)
    keep[5] = True  # a special token: never calibrated
    b, q_before = calibration_bias(H, W, counts, k=1.0, keep=keep, steps=300)
    assert np.array_equal(q_before, q0)
    assert (b <= 0).all() and b[5] == 0 and b[7] == 0 and b[2] < -0.3
    n = counts.sum()
    f = (counts + n * q0) / (2 * n)
    q = mean_probs(H, W, b)
    low = b < 0
    np.testing.assert_allclose(q[low], f[low], rtol=1e-3)  # a lowered token: the model's mean probability is f
    assert (q[~low & ~keep] <= f[~low & ~keep] * (1 + 1e-3)).all()  # an untouched one: at most f
