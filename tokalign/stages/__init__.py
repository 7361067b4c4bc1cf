"""Pipeline stages: one module each, ``run(cfg, ctx, out) -> dict`` of metrics. See ``tokalign/pipeline.py``."""
