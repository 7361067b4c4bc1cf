"""Stage `evaluate` (being written)."""


def run_init(cfg, ctx, out):
    raise NotImplementedError("evaluate_init")


def run_final(cfg, ctx, out):
    raise NotImplementedError("evaluate")
