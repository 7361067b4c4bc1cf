"""Pipeline stages: one module each, ``run(cfg: Config, ctx: Context, out: Path) -> dict`` of metrics; no stage
imports another (``tests/test_layout.py``). See ``tokalign/pipeline.py``."""
