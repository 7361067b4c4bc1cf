"""Training stages on several processes: the Hydra app runs the upstream stages once, then launches
each training stage as a child ``torchrun`` over the resolved config.

``hardware.nproc_per_node > 1`` (e.g. ``hardware=h100x8``) turns this on. Every rank uses the same
run directory and the same stage output folder; transformers' Trainer (through accelerate) runs
DDP, or FSDP / DeepSpeed ZeRO-3 when ``hardware.distributed`` says so; only rank 0 writes the
model, the history and ``metrics.json``. The parent process, which owns the one W&B run, replays
the training history into W&B and writes ``summary.json``. The global batch
(micro-batch x accumulation x processes) and the stage-2 offset (in sequences) mean the same
whatever the process count.

The child entry point (used by ``launched``; not for people):
    torchrun --nproc_per_node 8 -m tokalign.distributed --stage tokalign.stages.train:run_stage1 --spec out/launch.json
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from omegaconf import OmegaConf
from tokalign.errors import TokalignError

log = logging.getLogger(__name__)


class LaunchError(TokalignError, RuntimeError):
    """A child torchrun failed; the message gives its exit code and log file."""


def in_child() -> bool:
    return os.environ.get("TOKALIGN_CHILD") == "1"


def torchrun_command(cfg, spec: Path, target: str) -> list[str]:
    hw = cfg.hardware
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={hw.nproc_per_node}",
           "-m", "tokalign.distributed", "--stage", target, "--spec", str(spec)]
    return cmd


def launched(fn: Callable) -> Callable:
    """Wrap a stage function so it runs under torchrun when ``hardware.nproc_per_node > 1``."""

    @functools.wraps(fn)
    def run(cfg, ctx, out: Path) -> dict:
        if cfg.hardware.nproc_per_node <= 1 or in_child():
            return fn(cfg, ctx, out)
        spec = out / "launch.json"
        spec.write_text(json.dumps({
            "config": OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
            "run_dir": str(ctx.run_dir),
            "outputs": {k: str(v) for k, v in ctx.outputs.items()},
            "stage": ctx.stage,
            "inputs": None if ctx.inputs is None else list(ctx.inputs),
            "metrics": {k: v for k, v in ctx.metrics.items() if isinstance(v, (int, float, str, bool))},
            "out": str(out),
        }))
        target = f"{fn.__module__}:{fn.__name__}"
        env = {**os.environ, "TOKALIGN_CHILD": "1"}
        if cfg.hardware.device == "cpu":
            env.setdefault("ACCELERATE_USE_CPU", "true")
        logfile = out / "torchrun.log"
        log.info("[%s] launching %d processes: %s (log: %s)", fn.__name__, cfg.hardware.nproc_per_node,
                 " ".join(torchrun_command(cfg, spec, target)), logfile)
        with open(logfile, "ab") as lf:
            rc = subprocess.call(torchrun_command(cfg, spec, target), env=env, stdout=lf, stderr=subprocess.STDOUT)
        if rc != 0:
            tail = logfile.read_text(errors="replace").strip().splitlines()[-5:]
            raise LaunchError(f"{fn.__name__}: torchrun exited with {rc}; see {logfile}: " + " | ".join(tail))
        metrics = json.loads((out / "metrics.json").read_text())
        history = out / "log_history.json"
        if history.is_file():  # the one W&B run lives in this (parent) process
            ns = "stage1" if "stage1" in fn.__name__ else "stage2"
            ctx.tracker.define_step(ns)
            for row in json.loads(history.read_text()):
                ctx.tracker.log({f"{ns}/{k}": v for k, v in row.items() if isinstance(v, (int, float))})
        return metrics

    return run


def _child(stage: str, spec_path: Path) -> int:
    from tokalign.config import Config
    from tokalign.context import Context

    spec = json.loads(spec_path.read_text())
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), spec["config"]))
    ctx = Context(run_dir=Path(spec["run_dir"]), outputs={k: Path(v) for k, v in spec["outputs"].items()},
                  metrics=dict(spec["metrics"]), stage=spec.get("stage"),
                  inputs=None if spec.get("inputs") is None else tuple(spec["inputs"]))
    module, name = stage.split(":")
    fn = getattr(importlib.import_module(module), name)
    fn = getattr(fn, "__wrapped__", fn)
    metrics = fn(cfg, ctx, Path(spec["out"]))
    if int(os.environ.get("RANK", "0")) == 0:
        tmp = Path(spec["out"]) / "metrics.json.tmp"
        tmp.write_text(json.dumps(metrics))
        os.replace(tmp, Path(spec["out"]) / "metrics.json")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tokalign.distributed")
    ap.add_argument("--stage", required=True, help="module:function of the stage")
    ap.add_argument("--spec", required=True, type=Path, help="launch.json written by the parent")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING)
    return _child(args.stage, args.spec)


if __name__ == "__main__":
    sys.exit(main())
