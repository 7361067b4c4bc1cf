"""Stages `train_stage1` / `train_stage2` (being written)."""


def run_stage1(cfg, ctx, out):
    raise NotImplementedError("train_stage1")


def run_stage2(cfg, ctx, out):
    raise NotImplementedError("train_stage2")
