"""Stage `preflight` (being written)."""


def run(cfg, ctx, out):
    raise NotImplementedError("preflight")
