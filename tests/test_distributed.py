"""Training on several processes: 2 CPU ranks (gloo) match 1 process with the same global batch.

The launcher (tokalign/distributed.py) runs the stage as a child torchrun; the parent replays
the history into its one W&B run. GPU-only checks skip cleanly without a GPU.
"""

from __future__ import annotations

import json


from tokalign.config import HardwareConfig
from tokalign.distributed import launched
from tokalign.stages import train
from tokalign.tracking import make_tracker
from test_train import make_cfg, make_workspace


def _losses(out):
    return [h["loss"] for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]


def test_two_gloo_processes_match_one_process(tmp_path, monkeypatch):
    ctx = make_workspace(tmp_path)
    # one process, accumulation 2  vs  two processes, accumulation 1: global batch 4 both times
    one = make_cfg(train={"micro_batch_size": 2, "grad_accum": 2}, steps_stage1=4)
    out1 = tmp_path / "one"
    out1.mkdir()
    m1 = train.run_stage1(one, ctx, out1)

    two = make_cfg(train={"micro_batch_size": 2, "grad_accum": 1}, steps_stage1=4,
                   hardware=HardwareConfig(nproc_per_node=2, torch_threads=1))
    from types import SimpleNamespace

    run_dir = ctx.run_dir
    ctx.tracker = make_tracker(SimpleNamespace(mode="offline", project="t", entity=None, group=None, tags=[]),
                               config={}, run_dir=run_dir, job_type="test", name="ddp", group=None)
    out2 = tmp_path / "two"
    out2.mkdir()
    m2 = launched(train.run_stage1)(two, ctx, out2)
    ctx.tracker.finish()
    assert "gloo" in (out2 / "torchrun.log").read_text() or (out2 / "metrics.json").is_file()
    l1, l2 = _losses(out1), _losses(out2)
    assert len(l1) == len(l2) == 4
    for a, b in zip(l1, l2):
        assert abs(a - b) < 1e-4, (l1, l2)
    assert m1["stage1/steps"] == m2["stage1/steps"] == 4
    # one W&B run (the parent's), one metrics file written by rank 0
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    assert json.loads((out2 / "data_state.json").read_text())["global_batch"] == 4
