"""Stage ``instruct``: the domain adapters' instruction data, validated, sorted into domains, capped and split.

Reads every ``adapters.sources`` file, checks each record (``tokalign/instruct.py``: schema errors, empty fields,
duplicates, records outside ``adapters.min_words``-``max_words``, evaluation texts of the run, which stay held out)
and writes, per domain, ``<domain>/{train,validation,test}.jsonl`` (a stable-hash split by ``adapters.split_seed``)
and ``report.json``: per source the records read and kept and each kind of fault with a count and its first places,
per domain the records matched, capped and in each split, and the decisions' counts.

A source file without the configured fields, or a domain that no record reaches, is a one-line error naming the
file or the domain.

Run:  python -m tokalign experiment=domain_adapters        (stages instruct and adapters on the demo)
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from tokalign import instruct
from tokalign.artifacts import eval_hashes, write_json, write_jsonl
from tokalign.config import Config
from tokalign.context import Context

log = logging.getLogger(__name__)


def run(cfg: Config, ctx: Context, out: Path) -> dict:
    domains, report = instruct.build(cfg.adapters, eval_hashes(ctx.path("corpus")))
    for name, splits in domains.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        for split, recs in splits.items():
            write_jsonl(out / name / f"{split}.jsonl", [asdict(r) for r in recs])
    write_json(out / "report.json", report)
    metrics: dict = {}
    for name, v in report["sources"].items():
        metrics[f"instruct/source/{name}/read"], metrics[f"instruct/source/{name}/kept"] = v["read"], v["kept"]
        metrics.update({f"instruct/source/{name}/{k}": n for k, n in v["faults"].items()})
        bad = {k: n for k, n in v["faults"].items() if n}
        if bad:
            log.warning("instruct: source %s: %s skipped (e.g. %s)", name, bad,
                        next(iter(v["examples"].values()))[0])
    for name, d in report["domains"].items():
        metrics.update({f"instruct/domain/{name}/{s}": d[s] for s in instruct.SPLITS})
    log.info("instruct: %s", {n: {s: d[s] for s in instruct.SPLITS} for n, d in report["domains"].items()})
    return metrics
