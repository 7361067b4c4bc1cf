"""Training on several processes: 2 CPU ranks (gloo) match 1 process with the same global batch.

The launcher (tokalign/distributed.py) runs the stage as a child torchrun; the parent replays
the history into its one tracker. GPU-only checks skip cleanly without a GPU.

This test used to fail now and then. The cause was not the rendezvous port (``--standalone`` binds
port 0, so two runs never collide) but the stage itself: every rank ran the whole of
``train_stage`` on the same output folder, so both wrote ``log_history.json`` and
``data_state.json`` and both saved ``model/``, one rank's ``shutil.rmtree(model)`` racing the
other's ``save_pretrained`` (an ``OSError`` or a half-written model, depending on timing). Only
rank 0 writes now. The test also no longer starts a real W&B run, whose start-up time on a
loaded machine was a second source of timing trouble: a recording tracker checks the replay.
"""

from __future__ import annotations

import json

from conftest import RecordingTracker, make_cfg, make_workspace
from tokalign.config import HardwareConfig
from tokalign.distributed import launched
from tokalign.stages import train


def _losses(out):
    return [h["loss"] for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]


def test_two_gloo_processes_match_one_process(tmp_path):
    ctx = make_workspace(tmp_path)
    # one process, accumulation 2  vs  two processes, accumulation 1: global batch 4 both times
    one = make_cfg(train={"micro_batch_size": 2, "grad_accum": 2}, steps_stage1=4)
    out1 = tmp_path / "one"
    out1.mkdir()
    m1 = train.run_stage1(one, ctx, out1)

    two = make_cfg(train={"micro_batch_size": 2, "grad_accum": 1}, steps_stage1=4,
                   hardware=HardwareConfig(nproc_per_node=2, torch_threads=1))
    ctx.tracker = RecordingTracker()
    out2 = tmp_path / "two"
    out2.mkdir()
    m2 = launched(train.run_stage1)(two, ctx, out2)
    log = (out2 / "torchrun.log").read_text()
    assert "(global batch 4 = 2 x 1 x 2 processes)" in log, log[-2000:]
    assert (out2 / "metrics.json").is_file()  # written by rank 0, read by the parent
    l1, l2 = _losses(out1), _losses(out2)
    assert len(l1) == len(l2) == 4
    for a, b in zip(l1, l2):
        assert abs(a - b) < 1e-4, (l1, l2)
    assert m1["stage1/steps"] == m2["stage1/steps"] == 4
    # the parent replays the child's history into its own tracker: the same four losses
    assert [r["stage1/loss"] for r in ctx.tracker.logged if "stage1/loss" in r] == l2
    assert json.loads((out2 / "data_state.json").read_text())["global_batch"] == 4
