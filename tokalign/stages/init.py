"""Stage `init` (being written)."""


def run(cfg, ctx, out):
    raise NotImplementedError("init")
