"""Every shipped config composes and validates; bad values fail naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tokalign.cli import CONF_DIR, compose_cli
from tokalign.config import Config, ConfigError, EmbedConfig, TrainConfig

GROUPS = ["mode", "hardware", "alignment", "lr_schedule"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def test_every_group_option_composes_and_validates():
    combos = [[]]
    combos += [[f"{g}={o}"] for g in GROUPS for o in _options(g)]
    combos += [[f"experiment={o}"] for o in _options("experiment")]
    assert len(combos) > 10
    for overrides in combos:
        cfg = compose_cli(overrides)
        assert isinstance(cfg, Config), overrides
        for g in ("hardware", "alignment", "lr_schedule"):
            o = [x.split("=")[1] for x in overrides if x.startswith(g + "=")]
            if o:
                assert getattr(cfg, g).name == o[0]


def test_default_is_smoke_on_demo_assets():
    cfg = compose_cli([])
    assert cfg.source_model.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert cfg.target_tokenizer.endswith("ggml-vocab-qwen2.gguf")
    assert cfg.corpus.endswith("ori_pqal.json")
    assert set(cfg.init_methods) == {"random", "mean", "fvt", "tokalign_1to1", "tokalign"}
    assert cfg.wandb.mode == "offline"


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["pivot_count=1"], "pivot_count"),
        (["similarity_threshold=3"], "similarity_threshold"),
        (["init_methods=[random,bogus]"], "init_methods"),
        (["embed.dim=0"], "embed.dim"),
        (["eval.stride=4096"], "eval.stride"),
        (["wandb.mode=sometimes"], "wandb.mode"),
    ],
)
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose_cli(overrides)


def test_wrong_type_and_unknown_key_rejected_by_schema():
    with pytest.raises(Exception, match="pivot_count"):
        compose_cli(["pivot_count=many"])
    with pytest.raises(Exception, match="no_such_key"):
        compose_cli(["no_such_key=1"])


def test_dataclass_validation_direct():
    with pytest.raises(ConfigError, match="embed.thread"):
        EmbedConfig(thread=0)
    with pytest.raises(ConfigError, match="train.micro_batch_size"):
        TrainConfig(micro_batch_size=0)


@pytest.mark.parametrize("group", ["mode", "experiment", "hardware"])
def test_a_group_option_that_does_not_exist_is_refused_with_the_options(group):
    """``experiment`` was ``optional`` in the defaults list, so ``experiment=<typo>`` ran the default job."""
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match=f"Could not find '{group}/nope'") as e:
        compose_cli([f"{group}=nope"])
    assert all(o in str(e.value) for o in _options(group))


def test_cli_unknown_key_and_mode_exit_nonzero(tmp_path):
    for args, needle in ((["no_such_key=1"], "no_such_key"), (["mode=nope"], "smoke"),
                         (["experiment=llama3_targt"], "llama3_target")):
        r = subprocess.run([sys.executable, "-m", "tokalign", *args, f"hydra.run.dir={tmp_path}"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode != 0
        assert needle in r.stderr, r.stderr[-2000:]


def test_cli_bad_value_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tokalign", "pivot_count=1", f"hydra.run.dir={tmp_path}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "config error: config key 'pivot_count'" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("override", ["hydra/launcher=slurm", "hydra/sweeper=optuna_bpb"])
def test_hydra_plugin_configs_compose(override):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[override], return_hydra_config=True)
    if "launcher" in override:
        assert cfg.hydra.launcher.gpus_per_node == 1 and "submitit" in cfg.hydra.launcher._target_
    else:
        assert cfg.hydra.sweeper.direction == "minimize" and "lr_stage1" in cfg.hydra.sweeper.params


@pytest.mark.parametrize("sweep, needle", [("pivot_count=300,1", "sweep job 1 (pivot_count=1"),
                                           ("pivot_count=300,many", "pivot_count")])
def test_a_bad_sweep_value_fails_before_any_job_runs(tmp_path, sweep, needle):
    r = subprocess.run([sys.executable, "-m", "tokalign", "-m", sweep, f"cache_dir={tmp_path}/cache",
                        f"hydra.sweep.dir={tmp_path}/runs", "wandb.mode=disabled"],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode != 0
    assert needle in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "cache").exists()  # no stage ran, not even job 0's
    assert not list((tmp_path / "runs").glob("*/summary.json"))
