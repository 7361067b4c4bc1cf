"""Stage `embed` (being written)."""


def run(cfg, ctx, out):
    raise NotImplementedError("embed")
