"""Stage `tokenize` (being written)."""


def run(cfg, ctx, out):
    raise NotImplementedError("tokenize")
