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
    assert set(cfg.init_methods) == {"random", "mean", "fvt", "focus", "omp", "tokalign_1to1", "tokalign"}
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
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="Error merging override pivot_count=many") as e:
        compose_cli(["pivot_count=many"])
    assert "Value 'many' of type 'str' could not be converted to Integer" in str(e.value.__cause__)
    with pytest.raises(ConfigCompositionException, match="Could not override 'no_such_key'"):
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


@pytest.mark.parametrize("args", [["experiment=llama3_targt"], ["-m", "mode=smoke,resarch"]])
def test_cli_unknown_group_option_is_the_last_line_with_the_options(tmp_path, args):
    r = subprocess.run([sys.executable, "-m", "tokalign", *args, f"hydra.run.dir={tmp_path}"],
                       capture_output=True, text=True, timeout=120)
    group = args[-1].split("=")[0]
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2
    assert last.startswith(f"tokalign: config error: {group}=") and "no such option" in last, r.stderr[-2000:]
    assert all(o in last for o in _options(group))


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


def _yaml_leaves(d: dict, prefix: str = ""):
    for k, v in d.items():
        if k == "defaults":
            continue
        if isinstance(v, dict):
            yield from _yaml_leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _option_base(group: str, name: str, schema):
    """What an option file starts from: the dataclass defaults, under the options it lists as parents."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / group / f"{name}.yaml")) or {}
    node = OmegaConf.structured(schema)
    for parent in [d for d in raw.get("defaults", []) if isinstance(d, str) and d not in ("tokalign_schema", "_self_")]:
        node = OmegaConf.merge(_option_base(group, parent, schema), _without_defaults(group, parent))
    return node


def _without_defaults(group: str, name: str) -> dict:
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / group / f"{name}.yaml")) or {}
    return {k: v for k, v in raw.items() if k != "defaults"}


@pytest.mark.parametrize("group", ["hardware", "lr_schedule", "alignment", "mode"])
def test_yaml_options_hold_only_what_differs_from_the_defaults(group):
    """A value restated from the dataclass (or the parent option) hides what the option really changes. Modes may
    set ``hardware.*`` (applied over whichever hardware option is chosen); experiments are applied over any mode,
    so restating a default there is a real override and they are not checked."""
    from omegaconf import OmegaConf

    from tokalign.config import AlignmentConfig, HardwareConfig, LRScheduleConfig

    schema = {"hardware": HardwareConfig, "lr_schedule": LRScheduleConfig, "alignment": AlignmentConfig,
              "mode": Config}[group]
    restated = {}
    for name in _options(group):
        base = _option_base(group, name, schema)
        same = [k for k, v in _yaml_leaves(_without_defaults(group, name))
                if not k.startswith("hardware.") and OmegaConf.select(base, k, throw_on_missing=False) == v]
        if same:
            restated[name] = same
    assert not restated, restated


def test_help_lists_only_real_options():
    r = subprocess.run([sys.executable, "-m", "tokalign", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    groups = r.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    assert "tokalign_schema" not in groups, groups
    for g in ["alignment", "experiment", "hardware", "lr_schedule", "mode"]:
        assert f"{g}: {', '.join(_options(g))}" in groups, groups


def test_the_sweep_objective_is_the_config_key_optimized_metric():
    from tokalign.__main__ import objective

    metrics = {"bpb/stage1": 1.5, "bpb/init/tokalign": 2.0, "pubmedqa/acc/final": 0.4, "eval/final_model": "stage1"}
    assert objective(compose_cli([]), metrics) == 1.5  # bpb/stage2 missing: the next one
    assert objective(compose_cli(["optimized_metric=[pubmedqa/acc/final]"]), metrics) == 0.4
    assert objective(compose_cli(["optimized_metric=[eval/final_model,bpb/nope]"]), metrics) is None
    with pytest.raises(ConfigError, match="optimized_metric"):
        compose_cli(["optimized_metric=[]"])
