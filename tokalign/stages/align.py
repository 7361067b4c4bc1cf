"""Stage `align` (being written)."""


def run(cfg, ctx, out):
    raise NotImplementedError("align")
