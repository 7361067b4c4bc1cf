"""Stage `corpus` (being written)."""


def run(cfg, ctx, out):
    raise NotImplementedError("corpus")
