"""The recovery curve across both training stages and the tokens it takes to come near the source
(``tokalign/recovery.py``, stage ``evaluate``)."""

from __future__ import annotations

import json

from conftest import make_cfg, make_workspace
from tokalign import recovery as R


def _hist(points: list[tuple[int, float]], tokens_per_step: int = 100) -> list[dict]:
    return [{"step": s, "tokens_seen": s * tokens_per_step, "loss": 1.0, "eval_bpb": b, "eval_bpb_ci95": [b - .1, b + .1]}
            for s, b in points]


def test_stage2_tokens_continue_stage1s_and_thresholds_pick_the_first_point():
    pts = R.curve([("stage1", _hist([(2, 1.5), (4, 1.3)])), ("stage2", _hist([(2, 1.07), (4, 1.03)]))])
    assert [(p["stage"], p["tokens"]) for p in pts] == [("stage1", 200), ("stage1", 400), ("stage2", 600),
                                                        ("stage2", 800)]
    assert R.tokens_to_within(pts, 1.0, 0.05) == 800 and R.tokens_to_within(pts, 1.02, 0.05) == 600
    assert R.tokens_to_within(pts, 1.0, 0.02) is None  # never within 2%: null, not a number
    m = R.recovery_metrics(pts, 1.0)
    assert m["recovery/tokens_to_within_5pct"] == 800 and m["recovery/tokens_to_within_2pct"] is None
    assert m["recovery/last_ratio_to_source"] == 1.03 and m["recovery/points"] == 4
    assert R.recovery_metrics([], 1.0) == {} and R.recovery_metrics(pts, None) == {}


def test_training_then_evaluate_writes_the_curve_and_recovery_keys(tmp_path):
    """Stage 1 on the toy workspace with eval every 2 steps, then evaluate: one curve point per 2 steps, the
    source's dev line, recovery keys in the metrics and the curve in final.json."""
    from tokalign.stages import evaluate, train

    ctx = make_workspace(tmp_path)
    cfg = make_cfg(train={"eval_steps": 2})
    ctx.outputs["train_stage1"] = tmp_path / "s1"
    train.run_stage1(cfg, ctx, tmp_path / "s1")
    src_dev = 1e-9  # a source no model reaches: thresholds stay null
    ctx.metrics["bpb/source_dev"] = src_dev
    out = tmp_path / "evaluate"
    m = evaluate.run_final(cfg, ctx, out)
    final = json.loads((out / "final.json").read_text())
    pts = final["recovery"]["points"]
    assert m["recovery/points"] == 2 and m["recovery/tokens_to_within_5pct"] is None
    assert pts[0]["tokens"] < pts[1]["tokens"] and all(p["ci95"][0] <= p["bpb"] <= p["ci95"][1] for p in pts)
    assert (ctx.run_dir / "recovery.png").is_file()
    ctx.metrics["bpb/source_dev"] = 100.0  # a source every point is within 5% of: the first point's tokens
    m = evaluate.run_final(cfg, ctx, out)
    assert m["recovery/tokens_to_within_5pct"] == pts[0]["tokens"]
