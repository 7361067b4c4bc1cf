"""Tokens a domain vocabulary saves: the pipeline's own stages ``corpus``, ``source`` and ``domain_vocab`` once per
(size, kinds), counted on the evaluation text (the demo: the PubMedQA test abstracts; a corpus of your own: its
stable-hash holdout) and on the dev split. Prints a table and writes JSON.

    python scripts/bench_domain_vocab.py                                  # demo, sizes 300,1000,2000,5000
    python scripts/bench_domain_vocab.py --overrides "corpus=/data/notes.jsonl holdout_ids=null" \\
        --out scripts/results/bench_domain_vocab_notes.json               # your own corpus

Text of another kind, from the demo assets (PubMedQA's conclusions as a corpus of one's own):

    python -c "import json; d = json.load(open('../shared/assets/pubmedqa/ori_pqal.json')); open('/tmp/long_answers.jsonl', 'w').writelines(json.dumps({'text': v['LONG_ANSWER']}) + '\\n' for v in d.values())"
    python scripts/bench_domain_vocab.py --sizes 300,2000 --overrides "corpus=/tmp/long_answers.jsonl holdout_ids=null" \\
        --out scripts/results/bench_domain_vocab_long_answers.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokalign.cli import compose_cli  # noqa: E402
from tokalign.pipeline import STAGES, run_pipeline  # noqa: E402

PROBES = (" 2009", " p < 0.001", " patients with", " follow-up", " preoperative", " of theory", " 0.051", " endotracheal",
          " PREOPERATIVE DIAGNOSIS")  # strings shown split by the source and by each domain tokenizer
KINDS = {"all": "[words,numbers,phrases]", "words": "[words]", "numbers": "[numbers]", "phrases": "[phrases]"}


def _probes(source_dir: Path, domain_dir: Path) -> list[dict]:
    from tokalign.refs import load_tokenizer

    src, dom = load_tokenizer(str(source_dir)), load_tokenizer(str(domain_dir))
    return [{"text": t, "source": src.tokenize(t), "domain": dom.tokenize(t)} for t in PROBES]


def one(size: int, kinds: str, overrides: list[str], cache: str) -> dict:
    cfg = compose_cli(["experiment=domain_vocab", f"domain_vocab.size={size}", f"domain_vocab.kinds={KINDS[kinds]}",
                       f"cache_dir={cache}", "wandb.mode=disabled", *overrides])
    stages = [s for s in STAGES if s.name in ("corpus", "source", "domain_vocab")]
    t0 = time.time()
    with tempfile.TemporaryDirectory() as run:
        summary = run_pipeline(cfg, Path(run), stages=stages)
        report = json.loads((Path(summary["stages"]["domain_vocab"]["path"]) / "report.json").read_text())
        probes = _probes(Path(summary["stages"]["source"]["path"]) / "model",
                         Path(summary["stages"]["domain_vocab"]["path"]) / "tokenizer")
    return {"size": size, "kinds": kinds, "added": report["added"], "saved_eval": report["saved_share"]["eval"],
            "saved_dev": report["saved_share"]["dev"], "by_kind_eval": report["saved_share_by_kind"]["eval"],
            "tokens_per_document_eval": report["tokens_per_document"].get("eval"),
            "documents": report["documents"], "examples": report["examples"], "probes": probes, "seconds": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="300,1000,2000,5000")
    ap.add_argument("--kinds", default="all,words", help=f"comma-separated, from {', '.join(KINDS)}")
    ap.add_argument("--overrides", default="", help="extra config overrides, space-separated")
    ap.add_argument("--cache", default=".cache/tokalign")
    ap.add_argument("--out", default="scripts/results/bench_domain_vocab.json")
    a = ap.parse_args()
    rows = [one(int(n), k, a.overrides.split(), a.cache) for k in a.kinds.split(",") for n in a.sizes.split(",")]
    print(f"{'kinds':8} {'size':>6} {'saved (eval)':>13} {'saved (dev)':>12} {'tokens/doc before -> after':>28}")
    for r in rows:
        t = r["tokens_per_document_eval"] or {"before": float("nan"), "after": float("nan")}
        print(f"{r['kinds']:8} {r['size']:>6} {100 * r['saved_eval']:>12.1f}% {100 * (r['saved_dev'] or 0):>11.1f}% "
              f"{t['before']:>15.1f} -> {t['after']:.1f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"command": " ".join(sys.argv), "overrides": a.overrides, "rows": rows}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
