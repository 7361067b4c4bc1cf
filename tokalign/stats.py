"""Uncertainty of the evaluation figures: bootstrap intervals over documents and over questions.

Bits per byte of a set of documents is a ratio of sums (total bits / total bytes), so its
interval resamples *documents* (with their bytes), not tokens: two documents of the same text
kind are the unit a new reader would bring. A comparison of two models scored on the same
documents resamples the documents once for both (a paired bootstrap), which removes the
between-document variance that both models share; that is what makes differences of 0.01 bits
per byte visible on 40 documents. "A beats B" is said only when the paired interval of
``bpb(A) - bpb(B)`` lies wholly below 0.

Every interval is scipy's percentile bootstrap (``scipy.stats.bootstrap``, 95%, 2,000
resamples, seeded) so it can be checked by hand on small inputs. PubMedQA accuracy uses the
Wilson interval of a binomial proportion (``scipy.stats.binomtest``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000


def _interval(data: tuple[np.ndarray, ...], statistic, seed: int) -> list[float]:
    from scipy.stats import bootstrap

    n = len(data[0])
    point = float(statistic(*data, axis=-1))
    if n < 2 or all(np.all(d == d[0]) for d in data):
        return [point, point]
    res = bootstrap(data, statistic, paired=True, vectorized=True, confidence_level=LEVEL, n_resamples=RESAMPLES,
                    method="percentile", random_state=np.random.default_rng(seed))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (np.isfinite(lo) and np.isfinite(hi)):  # a degenerate resample distribution
        return [point, point]
    return [lo, hi]


def _ratio(bits, nbytes, axis=-1):
    return np.sum(bits, axis=axis) / np.sum(nbytes, axis=axis)


def _diff_ratio(bits_a, bits_b, nbytes, axis=-1):
    return (np.sum(bits_a, axis=axis) - np.sum(bits_b, axis=axis)) / np.sum(nbytes, axis=axis)


def bpb_interval(bits: Sequence[float], nbytes: Sequence[float], seed: int = 0) -> tuple[float, list[float]]:
    """(bits per byte, its 95% interval) of documents with ``bits[i]`` bits over ``nbytes[i]`` bytes."""
    b, n = np.asarray(bits, dtype=np.float64), np.asarray(nbytes, dtype=np.float64)
    _check_lengths(b, n)
    return float(_ratio(b, n)), _interval((b, n), _ratio, seed)


def paired_bpb_difference(bits_a: Sequence[float], bits_b: Sequence[float], nbytes: Sequence[float],
                          seed: int = 0) -> tuple[float, list[float]]:
    """(bpb(A) - bpb(B), its paired 95% interval) over the same documents (negative: A is better)."""
    a, b = np.asarray(bits_a, dtype=np.float64), np.asarray(bits_b, dtype=np.float64)
    n = np.asarray(nbytes, dtype=np.float64)
    _check_lengths(a, n)
    _check_lengths(b, n)
    return float(_diff_ratio(a, b, n)), _interval((a, b, n), _diff_ratio, seed)


def _mean_diff(a, b, axis=-1):
    return np.mean(a, axis=axis) - np.mean(b, axis=axis)


def paired_accuracy_difference(correct_a: Sequence[bool], correct_b: Sequence[bool],
                               seed: int = 0) -> tuple[float, list[float]]:
    """(accuracy(A) - accuracy(B), its paired 95% bootstrap interval) over the same questions, ``correct_x[i]``
    whether model X answered question ``i`` right (positive: A is better)."""
    a, b = np.asarray(correct_a, dtype=np.float64), np.asarray(correct_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"per-question arrays must be non-empty and of one length, got {a.shape} and {b.shape}")
    return float(_mean_diff(a, b)), _interval((a, b), _mean_diff, seed)


def verdict(a: str, b: str, ci: Sequence[float]) -> str:
    """What may be said of ``bpb(a) - bpb(b)`` with interval ``ci`` (lower bits per byte is better)."""
    if ci[1] < 0:
        return f"{a} beats {b}"
    if ci[0] > 0:
        return f"{b} beats {a}"
    return f"{a} and {b}: no difference detected"


def _check_lengths(x: np.ndarray, n: np.ndarray) -> None:
    if x.shape != n.shape or x.ndim != 1 or len(x) == 0:
        raise ValueError(f"per-document arrays must be non-empty and of one length, got {x.shape} and {n.shape}")
    if np.any(n <= 0):
        raise ValueError("every document needs a positive byte count")


def proportion_interval(k: int, n: int) -> list[float]:
    """Wilson 95% interval of ``k`` successes in ``n`` trials."""
    from scipy.stats import binomtest

    if n <= 0:
        return [float("nan"), float("nan")]
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=LEVEL, method="wilson")
    return [float(ci.low), float(ci.high)]


def macro_f1(labels: Sequence[str], preds: Sequence[str], classes: Optional[Sequence[str]] = None) -> float:
    """Unweighted mean of the per-class F1 over ``classes`` (default: the classes that occur in ``labels``).

    A class that is never predicted and never true is left out; one that is true but never predicted
    (or predicted but never true) has F1 0.
    """
    if len(labels) != len(preds) or not labels:
        raise ValueError("macro_f1 needs equally long, non-empty label and prediction lists")
    classes = list(classes) if classes is not None else sorted(set(labels))
    f1s = []
    for c in classes:
        tp = sum(1 for y, p in zip(labels, preds) if y == c and p == c)
        fp = sum(1 for y, p in zip(labels, preds) if y != c and p == c)
        fn = sum(1 for y, p in zip(labels, preds) if y == c and p != c)
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else 0.0


def majority_rate(labels: Sequence[str]) -> float:
    """Accuracy of always answering the most frequent label."""
    if not labels:
        raise ValueError("majority_rate needs labels")
    counts: dict[str, int] = {}
    for y in labels:
        counts[y] = counts.get(y, 0) + 1
    return max(counts.values()) / len(labels)
