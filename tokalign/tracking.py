"""One W&B run per job (files under ``<run dir>/wandb``), or a null tracker when disabled.

Stages call ``ctx.tracker.log({...})`` with namespaced keys (``align/exact_share``,
``stage1/loss``); each namespace that has its own step (``stage1/step``) is declared with
``define_step`` so W&B never warns that a step must increase.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

_SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password|passwd|credential)", re.I)


def scrub(obj: Any, env_secrets: Optional[set[str]] = None) -> Any:
    """Copy of a config with secret-looking keys and any value equal to a secret env var masked."""
    if env_secrets is None:
        env_secrets = {
            v for k, v in os.environ.items() if _SECRET_KEY.search(k) and v and len(v) >= 6
        }
    if isinstance(obj, dict):
        return {
            k: ("***" if _SECRET_KEY.search(str(k)) and v not in (None, "") else scrub(v, env_secrets))
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [scrub(v, env_secrets) for v in obj]
    if isinstance(obj, str):
        for s in env_secrets:
            if s in obj:
                obj = obj.replace(s, "***")
        return obj
    return obj


class NullTracker:
    """Accepts every call and records nothing (``wandb.mode=disabled``)."""

    run = None
    group: Optional[str] = None  # the W&B group of the run (runs beside it join it)

    def log(self, metrics: dict, step: Optional[int] = None) -> None:
        pass

    def define_step(self, namespace: str) -> None:
        pass

    def summary(self, metrics: dict) -> None:
        pass

    def table(self, name: str, columns: list[str], rows: list[list]) -> None:
        pass

    def artifact(self, name: str, type_: str, paths: list[Path]) -> None:
        pass

    def image(self, name: str, path: Path) -> None:
        pass

    def stage_done(self, metrics: dict) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker(NullTracker):
    """A real W&B run; offline runs are uploaded later with ``wandb sync <run dir>/wandb/offline-run-*``."""

    def __init__(self, *, mode: str, project: str, entity: Optional[str], group: Optional[str], job_type: str,
                 name: Optional[str], tags: list[str], config: dict, run_dir: Path, beside: bool = False) -> None:
        import wandb

        self._wandb = wandb
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            mode=mode, project=project, entity=entity, group=group, job_type=job_type, name=name,
            tags=tags or None, config=scrub(config), dir=str(run_dir), reinit="create_new" if beside else "finish_previous",
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        self._defined: set[str] = set()
        self.group = group

    def define_step(self, namespace: str) -> None:
        if namespace in self._defined:
            return
        self._defined.add(namespace)
        self.run.define_metric(f"{namespace}/step", hidden=True)
        self.run.define_metric(f"{namespace}/*", step_metric=f"{namespace}/step")

    def log(self, metrics: dict, step: Optional[int] = None) -> None:
        self.run.log(dict(metrics))

    def summary(self, metrics: dict) -> None:
        for k, v in metrics.items():
            self.run.summary[k] = v

    def stage_done(self, metrics: dict) -> None:
        """A finished stage's numbers: all into the run summary; logged as points too, except under a
        namespace with its own step metric (``stage1/...``), whose points the stage logged itself."""
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        for k, v in metrics.items():  # intervals as two numbers W&B can chart: bpb/source/ci95_low, ..._high
            if k.endswith("/ci95") and isinstance(v, (list, tuple)) and len(v) == 2:
                numeric[f"{k}_low"], numeric[f"{k}_high"] = float(v[0]), float(v[1])
        self.summary({**numeric, **{k: v for k, v in metrics.items() if k.endswith("/verdict")}})
        points = {k: v for k, v in numeric.items() if k.split("/", 1)[0] not in self._defined}
        if points:
            self.run.log(points)

    def table(self, name: str, columns: list[str], rows: list[list]) -> None:
        self.run.log({name: self._wandb.Table(columns=columns, data=rows)})

    def artifact(self, name: str, type_: str, paths: list[Path]) -> None:
        art = self._wandb.Artifact(name=re.sub(r"[^A-Za-z0-9_.-]", "-", name), type=type_)
        for p in paths:
            p = Path(p)
            if p.is_dir():
                art.add_dir(str(p), name=p.name)
            elif p.is_file():
                art.add_file(str(p))
        self.run.log_artifact(art)

    def image(self, name: str, path: Path) -> None:
        if Path(path).is_file():
            self.run.log({name: self._wandb.Image(str(path))})

    def finish(self, exit_code: int = 0) -> None:
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as e:  # never let tracking hide the real outcome
            log.warning("wandb finish failed: %s", e)


def make_tracker(wcfg: Any, *, config: dict, run_dir: Path, job_type: str, name: Optional[str],
                 group: Optional[str], beside: bool = False) -> NullTracker:
    """A ``WandbTracker`` unless ``wandb.mode=disabled`` (or W&B cannot start, which is logged). ``beside=True``:
    a second run next to the job's own, which stays open (one run per domain adapter)."""
    if wcfg.mode == "disabled":
        return NullTracker()
    try:
        return WandbTracker(mode=wcfg.mode, project=wcfg.project, entity=wcfg.entity, group=wcfg.group or group,
                            job_type=job_type, name=name, tags=list(wcfg.tags), config=config, run_dir=run_dir,
                            beside=beside)
    except Exception as e:
        log.warning("W&B could not start (%s); continuing without tracking", e)
        return NullTracker()
