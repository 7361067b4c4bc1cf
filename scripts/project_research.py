"""Projected wall time of a research-mode run (1 GiB corpus) on one H100, from measured rates.

Reads the research settings from the shipped configs (``mode=research hardware=h100``, or any
overrides given after ``--``) and the JSON files the benchmarks wrote, then multiplies each stage's
work by its measured rate. Nothing here is timed or assumed except where the table says so.

    python scripts/project_research.py --measured benchmarks/h100          # the README's table
    python scripts/project_research.py --measured benchmarks/h100 -- mode=research_optimal

Inputs in ``--measured`` (each written by the script named):
  upstream.json  scripts/bench_upstream.py  corpus, term mining, tokenization (MB/s by workers),
                                            bytes per token, fastText tokens/s by threads
  align.json     scripts/bench_align.py     alignment seconds by target vocabulary size
  train_eager.json, train_compile.json
                 scripts/bench_train.py     training tokens/s per stage (SmolLM2 shape, target vocab),
                                            without and with torch.compile (train.compile picks one)
  eval.json      scripts/bench_eval.py      bits-per-byte bytes/s, PubMedQA questions/s
  --fixed-from (optional)                   a real run's summary.json (default: the smoke run kept in
                                            benchmarks/cpu2/): seconds of the stages whose cost does not
                                            grow with the corpus (source load, init for the same vocabularies)

Method: a rate measured at N workers/threads is used for a config asking for more than N (the
machine had N cores); the eval set is ``eval.max_eval_samples`` documents of the benchmark's mean
size; each fastText stream has corpus_bytes / bytes-per-token tokens; training tokens are
steps x micro-batch x grad-accum x seq_len per stage. Writes the table as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _rate_at(rows: list[dict], key: str, want: int, rate: str) -> tuple[float, int]:
    """The rate measured at the largest ``key`` <= want (or the smallest measured): (rate, key used)."""
    rows = sorted(rows, key=lambda r: r[key])
    usable = [r for r in rows if r[key] <= want] or rows[:1]
    r = usable[-1]
    return float(r[rate]), int(r[key])


def _align_seconds(rows: list[dict], vocab: int, scoring: str) -> tuple[float, int]:
    rows = [r for r in rows if r.get("scoring", scoring) == scoring] or rows
    r = min(rows, key=lambda r: abs(r["target_vocab"] - vocab))
    secs = float(r["total_s"]) * vocab / r["target_vocab"]  # near linear in the target vocabulary
    return secs, int(r["target_vocab"])


def project(cfg, m: dict) -> list[dict]:
    """Rows {stage, work, rate, seconds} for ``cfg`` (a tokalign Config) and measured results ``m``."""
    up, ev = m["upstream"], m["eval"]
    tr = m["train_compile" if cfg.train.compile else "train_eager"]
    gib = cfg.corpus_bytes or 2 ** 30
    rows = []

    def add(stage, work, rate, seconds):
        rows.append({"stage": stage, "work": work, "rate": rate, "seconds": float(seconds)})

    add("corpus", f"{gib / 2**30:.2f} GiB read, de-duplicated", f"{up['corpus']['mb_per_s']:.1f} MB/s",
        gib / 1e6 / up["corpus"]["mb_per_s"])
    fixed = m.get("fixed_seconds") or {}
    if "source" in fixed:
        add("source", "load + convert the source model", m["fixed_label"], fixed["source"])
    workers = int(cfg.hardware.tokenizer_workers)
    mbps, w_used = _rate_at(up["tokenize"], "workers", workers, "mb_per_s")
    add("tokenize", f"{gib / 2**30:.2f} GiB x 2 tokenizers, {workers} workers",
        f"{mbps:.2f} MB/s at {w_used} workers", gib / 1e6 / mbps)
    if cfg.terms.top_k > 0:
        add("terms", f"top {cfg.terms.top_k} ({cfg.terms.scoring})", f"{up['terms']['mb_per_s']:.1f} MB/s",
            gib / 1e6 / up["terms"]["mb_per_s"])
    e = cfg.embed
    ft_rows = [r for r in up["fasttext"] if r["dim"] == e.dim] or up["fasttext"]
    tps, th_used = _rate_at(ft_rows, "threads", int(e.thread), "tokens_per_s")
    dim_note = "" if ft_rows[0]["dim"] == e.dim else f" (measured at dim {ft_rows[0]['dim']})"
    for side in ("source", "target"):
        tokens = gib / up["bytes_per_token"][side]
        if e.max_tokens:
            tokens = min(tokens, e.max_tokens)
        add(f"embed ({side})", f"{tokens / 1e6:,.0f}M tokens x {e.epoch} epochs, dim {e.dim}",
            f"{tps / 1e3:,.0f}k tokens/s at {th_used} threads{dim_note}", tokens * e.epoch / tps)
    target_vocab = int(m.get("target_vocab") or tr["info"]["arch"]["vocab_size"])
    al_rows = m["align"]["rows"]
    secs, v_used = _align_seconds(al_rows, target_vocab, cfg.alignment.scoring)
    piv = al_rows[0].get("pivots")
    add("align", f"{target_vocab:,} target tokens, {cfg.alignment.scoring}, {cfg.pivot_count} pivots",
        f"measured at {v_used:,} tokens, {piv} pivots", secs)
    if "init" in fixed:
        add("init", "build and save rows for every init method", m["fixed_label"], fixed["init"])
    bytes_per_doc = ev["bpb"]["bytes_per_doc"]
    eval_bytes = cfg.eval.max_eval_samples * bytes_per_doc
    bps = ev["bpb"]["bytes_per_s"]
    n_init = 1 + len(cfg.init_methods)
    add("evaluate_init", f"{n_init} models x {eval_bytes / 1e6:.1f} MB", f"{bps / 1e3:,.0f} kB/s",
        n_init * eval_bytes / bps)
    t = cfg.train
    by_stage = {r["stage"]: r["tokens_per_s"] for r in tr["results"]}
    tok_per_step = t.micro_batch_size * t.grad_accum * t.seq_len
    for stage, steps, key in (("train_stage1", cfg.steps_stage1, "stage1"),
                              ("train_stage2", cfg.steps_stage2, "stage2_lora" if cfg.stage2_use_lora else "stage2")):
        rate = by_stage[key]
        add(stage, f"{steps} steps x {tok_per_step:,} tokens", f"{rate / 1e3:,.1f}k tokens/s ({key})",
            steps * tok_per_step / rate)
    if t.compile:
        add("torch.compile warm-up", "2 training stages", "assumed (see --compile-warmup-s)", 2 * m["compile_warmup_s"])
    n_ckpt = cfg.steps_stage1 // t.save_steps + cfg.steps_stage2 // t.save_steps
    params = tr["info"]["params"]
    ckpt_gb = params * (4 + 8) / 1e9  # float32 weights + AdamW's two moments (stage 2 trains all weights)
    add("checkpoints", f"{n_ckpt} saves x {ckpt_gb:.1f} GB", f"assumed {m['disk_gbps']:g} GB/s",
        n_ckpt * ckpt_gb / m["disk_gbps"])
    qps = ev["pubmedqa"]["questions_per_s"]
    n_q = cfg.eval.pubmedqa_samples
    add("evaluate", f"2 models x {eval_bytes / 1e6:.1f} MB + 3 x {n_q} PubMedQA questions",
        f"{bps / 1e3:,.0f} kB/s, {qps:.1f} q/s", 2 * eval_bytes / bps + 3 * n_q / qps)
    return rows


def load_measured(folder: Path) -> dict:
    m = {}
    for key, name in (("upstream", "upstream.json"), ("align", "align.json"), ("train_compile", "train_compile.json"),
                      ("train_eager", "train_eager.json"), ("eval", "eval.json")):
        p = folder / name
        if not p.is_file():
            raise SystemExit(f"{p}: missing (written by scripts/bench_{key}.py; see this script's docstring)")
        m[key] = json.loads(p.read_text())
    return m


def load_fixed(path: Path) -> dict:
    """Seconds per stage of a finished run's summary.json."""
    if not path.is_file():
        raise SystemExit(f"{path}: missing (a run's summary.json, for --fixed-from)")
    stages = json.loads(path.read_text()).get("stages", {})
    return {k: v["seconds"] for k, v in stages.items() if isinstance(v, dict) and v.get("status") == "computed"}


def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--measured", type=Path, default=REPO / "benchmarks" / "h100")
    ap.add_argument("--budget-hours", type=float, default=3.0)
    ap.add_argument("--compile-warmup-s", type=float, default=70.0,
                    help="seconds torch.compile adds to a training stage's first steps (70: Llama-1B on the H100, "
                         "78.6 s for 9 steps of which 6 ran at 0.846 steps/s)")
    ap.add_argument("--disk-gbps", type=float, default=1.0, help="checkpoint write speed, GB/s (an assumption)")
    ap.add_argument("--fixed-from", type=Path, default=REPO / "benchmarks" / "cpu2" / "smoke_summary.json",
                    help="summary.json of a real run (same source model and target tokenizer): source and init "
                         "seconds; 'none' leaves those two rows out")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)

    from tokalign.cli import compose_cli

    overrides = overrides or ["mode=research", "hardware=h100"]
    cfg = compose_cli(overrides)
    m = load_measured(a.measured)
    m.update(compile_warmup_s=a.compile_warmup_s, disk_gbps=a.disk_gbps)
    if str(a.fixed_from) != "none":
        m["fixed_seconds"] = load_fixed(a.fixed_from)
        m["fixed_label"] = f"measured: {a.fixed_from.name}"
    rows = project(cfg, m)
    total = sum(r["seconds"] for r in rows)
    print(f"\nProjected wall time, {' '.join(overrides)}, corpus {cfg.corpus_bytes / 2**30:.2f} GiB; rates from "
          f"{a.measured} ({m['train_eager']['info'].get('device_name', '?')})\n")
    print("| stage | work | measured rate | projected |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['work']} | {r['rate']} | {r['seconds'] / 60:,.1f} min |")
    verdict = "under" if total < a.budget_hours * 3600 else "OVER"
    print(f"| **total** | | | **{total / 3600:.2f} h** ({verdict} the {a.budget_hours:g} h target) |")
    if a.out:
        a.out.write_text(json.dumps({"overrides": overrides, "rows": rows, "total_s": total}, indent=1))
    return rows


if __name__ == "__main__":
    main()
