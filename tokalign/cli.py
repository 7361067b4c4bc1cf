"""The composed, validated config outside a Hydra app: for module-level CLIs (``python -m
tokalign.stages.corpus``), scripts and tests. ``python -m tokalign`` itself is ``tokalign/__main__.py``."""

from __future__ import annotations

from pathlib import Path

from tokalign.config import Config, register_configs, register_resolvers, to_config

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

register_configs()
register_resolvers()


def compose_cli(overrides: list[str]) -> Config:
    """The validated Config for these overrides, without running anything (for module-level CLIs and tests)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_config(compose(config_name="config", overrides=overrides))
