"""The recovery curve: held-out bits per byte against training tokens, across both training stages, and how many
tokens it took to come within a given share of the source model.

Stage training scores its model every ``train.eval_steps`` steps (and at its end) on the dev documents of
``artifacts.curve_texts``; ``evaluate_source`` scores the source on the same documents. Stage 2's tokens continue
stage 1's. ``tokens_to_within(curve, source, 0.05)`` is the first point at or below 1.05 x the source's bits per byte
(``None`` when the curve never gets there): ``recovery/tokens_to_within_5pct`` and ``_2pct`` in ``summary.json``.
"""

from __future__ import annotations

from typing import Optional, Sequence

RECOVERY_SHARES = {"5pct": 0.05, "2pct": 0.02}


def curve(histories: Sequence[tuple[str, list[dict]]]) -> list[dict]:
    """``[{stage, tokens, bpb, ci95}]`` from the stages' ``log_history.json`` rows, in order, tokens cumulative."""
    points, offset = [], 0
    for stage, hist in histories:
        last = 0
        for h in hist:
            tokens = int(h.get("tokens_seen", 0))
            last = max(last, tokens)
            if isinstance(h.get("eval_bpb"), (int, float)):
                points.append({"stage": stage, "tokens": offset + tokens, "bpb": float(h["eval_bpb"]),
                               "ci95": h.get("eval_bpb_ci95")})
        offset += last
    return points


def tokens_to_within(points: list[dict], source_bpb: float, share: float) -> Optional[int]:
    """Training tokens at the first curve point within ``share`` of the source (bpb <= (1 + share) x source)."""
    for p in points:
        if p["bpb"] <= (1.0 + share) * source_bpb:
            return int(p["tokens"])
    return None


def recovery_metrics(points: list[dict], source_bpb: Optional[float]) -> dict:
    """``recovery/tokens_to_within_<share>`` (None when not reached), the last point's gap to the source."""
    if not points or source_bpb is None:
        return {}
    out: dict = {f"recovery/tokens_to_within_{k}": tokens_to_within(points, source_bpb, v)
                 for k, v in RECOVERY_SHARES.items()}
    out["recovery/points"] = len(points)
    out["recovery/last_ratio_to_source"] = points[-1]["bpb"] / source_bpb
    return out
