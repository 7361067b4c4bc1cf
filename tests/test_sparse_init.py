"""FOCUS and OMP: the math (sparsemax, orthogonal matching pursuit) and the rows stage init builds from them."""

from __future__ import annotations

import numpy as np
import pytest

from tokalign import alignment as A
from tokalign.stages import align, init


def test_sparsemax_matches_hand_computation():
    # z = [0.5, 0.3, 0.1]: all three in the support, tau = (0.9 - 1) / 3
    np.testing.assert_allclose(A.sparsemax(np.array([[0.5, 0.3, 0.1]]))[0], [0.5 + 0.1 / 3, 0.3 + 0.1 / 3,
                                                                               0.1 + 0.1 / 3], rtol=1e-6)
    # z = [2, 0, 0]: the first entry alone (a gap of more than 1)
    np.testing.assert_array_equal(A.sparsemax(np.array([[2.0, 0.0, 0.0]]))[0], [1.0, 0.0, 0.0])
    # z = [0.9, 0.8, 0.1]: tau = (1.7 - 1) / 2 = 0.35 -> [0.55, 0.45, 0]
    np.testing.assert_allclose(A.sparsemax(np.array([[0.9, 0.8, 0.1]]))[0], [0.55, 0.45, 0.0], atol=1e-6)
    rows = A.sparsemax(np.random.default_rng(0).normal(size=(50, 30)))
    np.testing.assert_allclose(rows.sum(1), 1.0, rtol=1e-5)
    assert (rows >= 0).all()


@pytest.mark.parametrize("restricted", [False, True])
def test_omp_recovers_a_planted_sparse_combination(restricted):
    rng = np.random.default_rng(1)
    atoms = rng.normal(size=(400, 48))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    idx = np.stack([rng.choice(400, size=3, replace=False) for _ in range(20)])
    coef = rng.uniform(0.5, 1.5, size=(20, 3)) * rng.choice([-1, 1], size=(20, 3))
    q = np.einsum("nk,nkd->nd", coef, atoms[idx])
    cand = None
    if restricted:  # the prefilter: the true atoms among 30 candidates
        cand = np.stack([np.concatenate([i, rng.choice(np.setdiff1d(np.arange(400), i), 27, replace=False)])
                         for i in idx])
    got_idx, got_coef = A.omp(q, atoms, 6, candidates=cand)
    for n in range(20):
        used = got_idx[n] >= 0
        assert sorted(got_idx[n][used]) == sorted(idx[n])  # exactly the planted atoms, nothing else
        found = dict(zip(got_idx[n][used], got_coef[n][used]))
        np.testing.assert_allclose([found[i] for i in idx[n]], coef[n], atol=1e-4)


def test_sparse_combinations_use_overlapping_tokens_only():
    rng = np.random.default_rng(2)
    v_t, dim = 40, 8
    gold = np.full(v_t, -1)
    gold[:20] = np.arange(100, 120)  # target 0..19 overlap source 100..119
    special = np.zeros(v_t, bool)
    special[39] = True
    t_ids = np.arange(0, 40, dtype=np.int64)
    t_ids = t_ids[t_ids != 30]  # token 30 has no vector
    vecs = rng.normal(size=(len(t_ids), dim)).astype(np.float32)
    arrays, stats = align.sparse_combinations(gold, special, t_ids, vecs, focus_k=8, omp_k=3, candidates=16)
    assert stats["sparse_queries"] == 18 and stats["sparse_atoms"] == 20  # 20..38 minus 30; 0..19
    for name in ("focus", "omp"):
        s, w = arrays[f"{name}_src"], arrays[f"{name}_weight"]
        assert ((s[20:39] >= 100) | (s[20:39] == -1)).all() and (s[20:39] < 120).all()
        assert (s[:20] == -1).all() and (s[30] == -1).all() and (s[39] == -1).all()  # gold, unseen, special
        assert (w[s < 0] == 0).all()
    np.testing.assert_allclose(arrays["focus_weight"][20:30].sum(1), 1.0, rtol=1e-5)


def test_focus_and_omp_rows_are_combinations_of_overlapping_source_rows():
    rng = np.random.default_rng(3)
    e = rng.normal(size=(6, 4)).astype(np.float32)
    al = {"how": np.array([0, 2, 2], np.int8), "src": np.array([[3], [-1], [-1]]),
          "weight": np.array([[1], [0], [0]], np.float32), "blend": np.array([0, 1, 1], np.float32),
          "argmax_1to1": np.array([3, -1, -1]), "fvt_indptr": np.array([0, 1, 3, 4]),
          "fvt_indices": np.array([3, 1, 2, 5]), "source_vocab": np.int64(6),
          "focus_src": np.array([[-1, -1], [3, 4], [-1, -1]]), "focus_weight": np.array([[0, 0], [0.7, 0.3], [0, 0]],
                                                                                       np.float32),
          "omp_src": np.array([[-1, -1], [3, 4], [-1, -1]]), "omp_weight": np.array([[0, 0], [1.5, -0.5], [0, 0]],
                                                                                   np.float32)}
    focus, _ = init.build_rows("focus", e, al, seed=0)
    omp, _ = init.build_rows("omp", e, al, seed=0)
    for rows, (a, b) in ((focus, (0.7, 0.3)), (omp, (1.5, -0.5))):
        assert np.array_equal(rows[0], e[3])  # gold: copied
        np.testing.assert_allclose(rows[1], a * e[3] + b * e[4], rtol=1e-6)  # the combination
        np.testing.assert_allclose(rows[2], e[5], rtol=1e-6)  # no combination: its FVT pieces
    del al["omp_src"]
    with pytest.raises(init.InitInputError, match="omp_src"):
        init.build_rows("omp", e, al, seed=0)


def test_alignment_bleu1():
    docs = [[0, 1, 2, 3], [4, 4, 1]]
    assert A.alignment_bleu1(docs, docs, np.arange(5)) == pytest.approx(1.0)  # identical tokenizers
    # half the tokens mapped wrong: unigram precision 1/2, same length (no brevity penalty)
    wrong = np.array([0, 9, 2, 9, 4])
    assert A.alignment_bleu1([[0, 1, 2, 3]], [[0, 1, 2, 3]], wrong) == pytest.approx(0.5)
    # unmapped tokens are dropped: precision 1, but the brevity penalty exp(1 - 4/2)
    drop = np.array([0, -1, 2, -1, 4])
    assert A.alignment_bleu1([[0, 1, 2, 3]], [[0, 1, 2, 3]], drop) == pytest.approx(np.exp(1 - 2.0), rel=1e-4)
    with pytest.raises(A.AlignmentError):
        A.alignment_bleu1([], [], drop)
