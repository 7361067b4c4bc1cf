"""``python -m tokalign``: compose the config, validate it, run the pipeline, return the sweep objective
(``optimized_metric``: the first of its metrics the run produced).

    python -m tokalign                                   # smoke mode on the demo assets
    python -m tokalign mode=research hardware=h100
    python -m tokalign -m lr_stage1=2e-5,5e-5,6.4e-4     # a sweep; compare with python -m tokalign.compare
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import hydra
from omegaconf import DictConfig, OmegaConf

from tokalign.cli import CONF_DIR
from tokalign.config import Config, ConfigError, to_config
from tokalign.errors import TokalignError

log = logging.getLogger("tokalign")


def apply_hardware(cfg: Config) -> None:
    """Settings that must be in place before torch initialises CUDA."""
    hw = cfg.hardware
    if hw.cuda_alloc_conf:
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", hw.cuda_alloc_conf)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if hw.torch_threads > 0:
        torch.set_num_threads(hw.torch_threads)
    if hw.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by input, configuration or the machine: reported in one line (the traceback goes to
    ``<run dir>/error.txt``)."""
    return (TokalignError, FileNotFoundError, PermissionError)


def _hydra_info() -> tuple[Path, str, str, Optional[str]]:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    mode = hc.runtime.choices.get("mode") or "custom"
    name = hc.job.override_dirname or mode
    group = hc.sweep.dir if str(hc.mode) == "RunMode.MULTIRUN" else None
    return run_dir, mode, name, group


def validate_sweep() -> None:
    """In a multirun's first job, before anything runs: every job of the sweep must compose and validate
    (types and value ranges), so that a bad value in job 3 does not surface after jobs 0-2 have run.
    Hydra itself rejects wrong types up front; this adds our ``__post_init__`` checks. Search spaces that
    are not plain lists (an Optuna sweeper's ranges) are left to their sweeper."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    if str(hc.mode) != "RunMode.MULTIRUN" or int(hc.job.num) != 0:
        return
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        args = [a for a in sys.argv[1:]
                if "=" in a and not a.startswith("-") and not a.lstrip("+~").startswith("hydra")]
        jobs = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(args), None)[0]
    except Exception:  # not a list sweep (or not launched from this command line): nothing to pre-check
        return
    for i, job in enumerate(jobs):
        try:
            to_config(compose(config_name="config", overrides=list(job)))
        except Exception as e:
            raise ConfigError(f"sweep job {i} ({' '.join(job)}): {str(e).splitlines()[0]}; no job was run") from e


def finish_tracking(tracker: Any, run_dir: Path, exit_code: int) -> None:
    """The run summary and ``summary.json`` to the tracker, then close it (W&B prints its closing lines here)."""
    summary_file = run_dir / "summary.json"
    if summary_file.is_file():
        metrics = json.loads(summary_file.read_text())["metrics"]
        tracker.summary({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})
        tracker.artifact(f"summary-{tracker.run.id if tracker.run else 'run'}", "summary", [summary_file])
    tracker.finish(exit_code=exit_code)


def objective(cfg: Config, metrics: dict) -> Optional[float]:
    """The value a sweep optimises: the first metric of ``cfg.optimized_metric`` the run produced (None if none)."""
    for k in cfg.optimized_metric:
        if isinstance(metrics.get(k), (int, float)):
            return float(metrics[k])
    return None


def main_task(dcfg: DictConfig) -> Optional[float]:
    from tokalign.pipeline import run_pipeline
    from tokalign.tracking import make_tracker

    try:
        cfg = to_config(dcfg)
        validate_sweep()
    except Exception as e:  # OmegaConf validation or our __post_init__ checks
        msg = str(e).splitlines()[0]
        print(f"tokalign: config error: {msg}", file=sys.stderr)
        raise SystemExit(2)
    apply_hardware(cfg)
    run_dir, mode, name, group = _hydra_info()
    plain = OmegaConf.to_container(dcfg, resolve=True)
    tracker = make_tracker(cfg.wandb, config=plain, run_dir=run_dir, job_type=mode, name=name, group=group)
    summary: Optional[dict] = None
    error: Optional[BaseException] = None
    try:
        summary = run_pipeline(cfg, run_dir, tracker)
    except user_errors() as e:
        error = e
    finally:  # before any message of ours: W&B's closing lines must not follow (and bury) the error
        finish_tracking(tracker, run_dir, exit_code=0 if summary is not None else 1)
    if error is not None:
        print(f"tokalign: finished stages stay cached under {cfg.cache_dir}; details in {run_dir}/summary.json",
              file=sys.stderr)
        print(f"tokalign: error: {str(error).splitlines()[0] if str(error) else type(error).__name__}",
              file=sys.stderr)
        raise SystemExit(2)
    assert summary is not None
    log.info("summary: %s", run_dir / "summary.json")
    return objective(cfg, summary["metrics"])


def check_group_choices(argv: list[str]) -> None:
    """``group=name`` on the command line for a config group of ``conf/`` whose ``name`` has no YAML file:
    one line naming the group and its options, before Hydra composes anything (Hydra's own message ends in
    a hint about ``HYDRA_FULL_ERROR``, so the options were not the last thing printed)."""
    for arg in argv:
        key, sep, value = arg.lstrip("+").partition("=")
        group = Path(CONF_DIR) / key
        if not sep or arg.startswith("-") or key.startswith("hydra") or not group.is_dir():
            continue
        options = sorted(f.stem for f in group.glob("*.yaml"))
        for name in value.split(","):  # a sweep over choices: -m mode=smoke,research
            if name and name != "null" and name not in options:
                print(f"tokalign: config error: {key}={name}: no such option in conf/{key}/; "
                      f"expected one of {', '.join(options)}", file=sys.stderr)
                raise SystemExit(2)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(dcfg: DictConfig) -> Optional[float]:
    return main_task(dcfg)


if __name__ == "__main__":
    check_group_choices(sys.argv[1:])
    main()
