"""Intervals against hand computations: bits per byte as a ratio of sums, paired differences, Wilson, macro-F1."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tokalign import stats
from tokalign.metrics import stratified_sample


def _exact_percentiles(values: list[float], probs: list[float]) -> tuple[float, float]:
    """2.5th and 97.5th percentiles of a discrete distribution (value, probability), read off its CDF."""
    order = sorted(zip(values, probs))
    cdf = np.cumsum([p for _, p in order])
    lo = order[int(np.searchsorted(cdf, 0.025))][0]
    hi = order[int(np.searchsorted(cdf, 0.975))][0]
    return lo, hi


def test_bpb_interval_is_the_ratio_of_sums_with_the_hand_made_bootstrap_distribution():
    # two documents: resampling 2 of 2 gives {A,A} (1/4), {A,B} (1/2), {B,B} (1/4)
    bits, nbytes = [30.0, 10.0], [10.0, 10.0]  # 3 and 1 bits per byte
    value, (lo, hi) = stats.bpb_interval(bits, nbytes)
    assert value == pytest.approx(40 / 20)
    exact = _exact_percentiles([3.0, 2.0, 1.0], [0.25, 0.5, 0.25])
    assert (lo, hi) == pytest.approx(exact, abs=1e-9)


def test_bpb_interval_resamples_documents_with_their_bytes():
    """Three documents of unequal length: the percentiles of the exact 27-outcome resampling distribution."""
    bits, nbytes = [10.0, 40.0, 12.0], [10.0, 20.0, 4.0]
    outcomes = [sum(bits[i] for i in c) / sum(nbytes[i] for i in c) for c in itertools.product(range(3), repeat=3)]
    lo_exact, hi_exact = _exact_percentiles(outcomes, [1 / 27] * 27)
    value, (lo, hi) = stats.bpb_interval(bits, nbytes)
    assert value == pytest.approx(62 / 34)
    # the extreme outcomes each have probability 1/27 > 2.5%: 2,000 resamples find exactly them
    assert (lo, hi) == pytest.approx((lo_exact, hi_exact), abs=1e-9)
    assert min(outcomes) <= lo <= value <= hi <= max(outcomes)


def test_paired_difference_removes_what_both_models_share():
    rng = np.random.default_rng(0)
    nbytes = rng.integers(200, 2000, size=40).astype(float)
    hardness = rng.uniform(0.6, 1.6, size=40)  # documents differ a lot
    bits_b = hardness * nbytes
    bits_a = bits_b - 0.02 * nbytes + rng.normal(0, 0.002, size=40) * nbytes  # A is 0.02 bpb better everywhere
    diff, (lo, hi) = stats.paired_bpb_difference(bits_a, bits_b, nbytes)
    assert diff == pytest.approx((bits_a.sum() - bits_b.sum()) / nbytes.sum())
    assert hi < 0 and lo < diff < hi
    assert stats.verdict("A", "B", [lo, hi]) == "A beats B"
    # unpaired, the two intervals overlap: the shared document difficulty hides the gain
    _, ci_a = stats.bpb_interval(bits_a, nbytes)
    _, ci_b = stats.bpb_interval(bits_b, nbytes)
    assert ci_a[1] > ci_b[0]
    # a constant difference per byte has a zero-width interval
    d, ci = stats.paired_bpb_difference(bits_b - 0.1 * nbytes, bits_b, nbytes)
    assert d == pytest.approx(-0.1) and ci == pytest.approx([-0.1, -0.1])


def test_verdicts_need_the_interval_to_exclude_zero():
    assert stats.verdict("a", "b", [-0.3, -0.1]) == "a beats b"
    assert stats.verdict("a", "b", [0.1, 0.3]) == "b beats a"
    assert stats.verdict("a", "b", [-0.1, 0.2]) == "a and b: no difference detected"


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="one length"):
        stats.bpb_interval([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="positive byte count"):
        stats.bpb_interval([1.0], [0.0])


def test_wilson_interval_matches_the_formula():
    k, n, z = 12, 30, 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert stats.proportion_interval(k, n) == pytest.approx([centre - half, centre + half], rel=1e-9)
    assert stats.proportion_interval(0, 4)[0] == 0.0 and stats.proportion_interval(0, 4)[1] > 0.4


def test_macro_f1_and_majority_rate_by_hand():
    labels = ["yes", "yes", "no", "maybe", "no", "yes"]
    preds = ["yes", "no", "no", "no", "no", "yes"]
    # yes: tp 2 fp 0 fn 1 -> 0.8; no: tp 2 fp 2 fn 0 -> 2/3; maybe: tp 0 fn 1 -> 0
    assert stats.macro_f1(labels, preds, ["yes", "no", "maybe"]) == pytest.approx((0.8 + 2 / 3 + 0) / 3)
    assert stats.macro_f1(labels, labels) == 1.0
    assert stats.majority_rate(labels) == pytest.approx(0.5)


def test_stratified_sample_gives_each_label_its_share():
    ids = {"yes": [f"y{i}" for i in range(276)], "no": [f"n{i}" for i in range(169)],
           "maybe": [f"m{i}" for i in range(55)]}
    for n in (30, 100):
        got = stratified_sample(ids, n, seed=3)
        counts = {lab: sum(1 for g in got if g[0] == lab[0]) for lab in ids}
        assert sum(counts.values()) == n and len(set(got)) == n
        for lab, pool in ids.items():
            assert abs(counts[lab] - n * len(pool) / 500) < 1.0  # largest remainder: within one of the exact share
    assert stratified_sample(ids, 30, seed=3) == stratified_sample(ids, 30, seed=3)
    assert stratified_sample(ids, 30, seed=3) != stratified_sample(ids, 30, seed=4)


def test_paired_accuracy_difference_sees_a_consistent_gain_that_unpaired_intervals_miss():
    """60 questions: B right on 30, A right on the same 30 and 8 more. Unpaired Wilson intervals overlap; the paired
    interval of A - B excludes zero. Equal answers give a zero-width interval at 0."""
    b = np.array([True] * 30 + [False] * 30)
    a = b.copy()
    a[30:38] = True
    diff, (lo, hi) = stats.paired_accuracy_difference(a, b)
    assert diff == pytest.approx(8 / 60) and 0 < lo < diff < hi
    wa, wb = stats.proportion_interval(38, 60), stats.proportion_interval(30, 60)
    assert wa[0] < wb[1]  # the unpaired intervals overlap
    assert stats.verdict("B", "A", [lo, hi]) == "A beats B"
    assert stats.paired_accuracy_difference(b, b) == (0.0, [0.0, 0.0])
    with pytest.raises(ValueError, match="one length"):
        stats.paired_accuracy_difference(a, b[:5])
