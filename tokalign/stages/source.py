"""Stage `source` (being written)."""


def run(cfg, ctx, out):
    raise NotImplementedError("source")
