"""Stage ``adapters``: one LoRA (CPU) or QLoRA (CUDA) adapter per domain on the run's final model, each scored
against the model without it.

The base is the run's final model (stage 2, else stage 1, else the initialisation; a stage-2 LoRA merged in), with
the source model's chat template mapped onto the new vocabulary (``tokalign/chat.py``: the template ``export``
ships, so an adapter merged by ``export.adapter=<domain>`` is served with the prompts it was trained on). For
QLoRA the merged base is saved once (``_base/``) and reloaded in 4-bit NF4. Per domain of stage ``instruct``:

* trains an adapter on the train split, loss on response tokens only (``tokalign/adapters.py``), and writes
  ``<domain>/`` (``adapter_config.json``, ``adapter_model.safetensors``, the tokenizer) and ``<domain>/report.json``:
  split sizes, train loss and tokens, validation and test loss and perplexity of the adapter and of the base, the
  test loss change with a paired 95% interval over test records, decision accuracy and macro-F1 (PubMedQA's
  yes/no/maybe: the label whose first token ranks highest) and the accuracy change with a paired bootstrap interval
  over the test questions, ROUGE-L and BLEU of greedy generations on the first
  ``adapters.gen_samples`` test records, and the adapter's test loss on every domain (its row of the matrix);
* logs each adapter as its own W&B run (job type ``adapter``, name ``adapter-<domain>``, in the main run's group)
  with its loss curve and results, the adapter folder as an artifact when ``wandb.log_model``.

Then ``matrix.json`` and ``adapters_matrix.png``: every model (no adapter, each adapter) on every domain's test
split. A domain whose ``report.json`` exists is not trained again (the stage resumes); a domain that fails is
reported and the others still run, then the stage fails naming it.

Run:  python -m tokalign experiment=domain_adapters
"""

from __future__ import annotations

import logging
import math
import shutil
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional


from tokalign import adapters as A
from tokalign import refs, stats
from tokalign.artifacts import final_model, read_json, read_jsonl, write_json
from tokalign.chat import carry_chat
from tokalign.config import Config
from tokalign.context import Context
from tokalign.modelfacts import device_and_precision, free_memory
from tokalign.tracking import make_tracker

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


def _ppl(loss: float) -> float:
    return math.exp(loss) if math.isfinite(loss) and loss < 50 else float("inf")


def setup(cfg: Config, ctx: Context, out: Path) -> tuple[Any, Any, str, dict]:
    """(base model, tokenizer, method, info): the final model merged, with the source's chat template."""
    method = cfg.adapters.resolved_method(cfg.hardware.device)
    name, mdir = final_model(ctx)
    model, tok_dir = refs.load_merged(mdir, what="adapters base", allow_pickle=cfg.allow_pickle,
                                      trust_remote_code=cfg.trust_remote_code)
    tok = refs.load_tokenizer(str(tok_dir), trust_remote_code=cfg.trust_remote_code)
    info = {"base": name, "base_dir": str(mdir), "method": method,
            "chat": carry_chat(model, tok, ctx.path("source") / "model")}
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    base_dir = None
    if method == "qlora":
        base_dir = out / "_base"
        model.save_pretrained(str(base_dir), safe_serialization=True)
        tok.save_pretrained(str(base_dir))
        del model
        free_memory()
        model = None
    model = A.load_base(model, method, base_dir, cfg.hardware.dtype)
    return (model.to("cuda") if method == "lora" and device_and_precision(cfg.hardware)[0] else model), tok, method, info


def load_data(cfg: Config, ctx: Context, tok: Any) -> dict[str, dict[str, Any]]:
    """Per domain: its records and their encodings per split, and the decision labels' first tokens."""
    data = {}
    for d in cfg.adapters.domains:
        recs = {s: read_jsonl(ctx.path("instruct") / d / f"{s}.jsonl") for s in SPLITS}
        enc = {s: [A.encode(tok, r, cfg.adapters.max_seq_len) for r in recs[s]] for s in SPLITS}
        data[d] = {"records": recs, "encoded": enc,
                   "first_ids": A.decision_tokens(tok, enc["train"], recs["train"])}
    return data


def evaluate(model: Any, tok: Any, data: dict, domain: str, cfg: Config) -> dict:
    """Validation and test scores, decisions and generations of ``model`` on one domain."""
    d = data[domain]
    res = {s: A.score(model, d["encoded"][s], d["first_ids"]) for s in ("validation", "test")}
    n_gen = min(cfg.adapters.gen_samples, len(d["encoded"]["test"]))
    hyps = A.generate(model, tok, d["encoded"]["test"][:n_gen], cfg.adapters.max_new_tokens) if n_gen else []
    refs_ = [r["output"] for r in d["records"]["test"][:n_gen]]
    return {"scores": res, "loss": {s: A.loss(v) for s, v in res.items()},
            "decisions": A.decision_scores([r.get("decision") for r in d["records"]["test"]],
                                           [x["pred"] for x in res["test"]]),
            "generation": A.generation_scores(hyps, refs_), "samples": list(zip(refs_, hyps))}


def compare(adapter: dict, base: dict, seed: int) -> dict:
    """The adapter's test loss change against the base, paired over test records."""
    a, b = adapter["scores"]["test"], base["scores"]["test"]
    delta, ci = stats.paired_bpb_difference([x["nll"] for x in a], [x["nll"] for x in b], [x["n"] for x in a], seed)
    return {"delta": delta, "ci95": ci, "verdict": stats.verdict("adapter", "base", ci)}


def compare_decisions(labels: list, adapter: dict, base: dict, seed: int) -> Optional[dict]:
    """The adapter's decision accuracy change against the base, paired over the test questions both answered
    (None when the domain has no decisions)."""
    rows = [(y, x["pred"], z["pred"]) for y, x, z in zip(labels, adapter["scores"]["test"], base["scores"]["test"])
            if y is not None and x["pred"] is not None and z["pred"] is not None]
    if not rows:
        return None
    delta, ci = stats.paired_accuracy_difference([y == p for y, p, _ in rows], [y == q for y, _, q in rows], seed)
    return {"delta": delta, "ci95": ci, "n": len(rows), "verdict": stats.verdict("base", "adapter", ci)}  # higher is better


def domain_report(domain: str, data: dict, trained: dict, own: dict, base: dict, row: dict, seed: int) -> dict:
    d = data[domain]
    return {
        "domain": domain, "sizes": {s: len(d["records"][s]) for s in SPLITS},
        "truncated": sum(e["truncated"] for s in SPLITS for e in d["encoded"][s]), "train": trained,
        "adapter": {"loss": own["loss"], "ppl": {s: _ppl(v) for s, v in own["loss"].items()},
                    "decisions": own["decisions"], "generation": own["generation"]},
        "base": {"loss": base["loss"], "ppl": {s: _ppl(v) for s, v in base["loss"].items()},
                 "decisions": base["decisions"], "generation": base["generation"]},
        "test_loss_change": compare(own, base, seed), "matrix_row": row,
        "decision_accuracy_change": compare_decisions([r.get("decision") for r in d["records"]["test"]], own, base, seed),
        "samples": [{"reference": r, "adapter": h, "base": b} for (r, h), (_, b) in zip(own["samples"], base["samples"])],
    }


def domain_metrics(rep: dict) -> dict:
    """``adapters/<domain>/...``: the numbers a sweep or W&B compares."""
    p, a, b = f"adapters/{rep['domain']}", rep["adapter"], rep["base"]
    m = {f"{p}/test_loss": a["loss"]["test"], f"{p}/base_test_loss": b["loss"]["test"],
         f"{p}/validation_loss": a["loss"]["validation"], f"{p}/test_ppl": a["ppl"]["test"],
         f"{p}/test_loss_change": rep["test_loss_change"]["delta"], f"{p}/test_loss_change/ci95": rep["test_loss_change"]["ci95"],
         f"{p}/test_loss_change/verdict": rep["test_loss_change"]["verdict"],
         f"{p}/train_loss": rep["train"]["train_loss"], f"{p}/train_tokens": rep["train"]["train_tokens"]}
    if rep.get("decision_accuracy_change"):
        c = rep["decision_accuracy_change"]
        m[f"{p}/decision_accuracy_change"], m[f"{p}/decision_accuracy_change/ci95"] = c["delta"], c["ci95"]
        m[f"{p}/decision_accuracy_change/verdict"] = c["verdict"]
    for who, r in (("", a), ("base_", b)):
        if r["decisions"]:
            m[f"{p}/{who}decision_accuracy"], m[f"{p}/{who}decision_macro_f1"] = r["decisions"]["accuracy"], r["decisions"]["macro_f1"]
        if r["generation"]:
            m[f"{p}/{who}rougeL"], m[f"{p}/{who}bleu"] = r["generation"]["rougeL"], r["generation"]["bleu"]
    return m


def train_domain(cfg: Config, ctx: Context, out: Path, base: Any, tok: Any, data: dict, domain: str,
                 base_eval: dict) -> dict:
    """Train, save and score one domain's adapter (``base`` is given back without it, in place); its report."""
    ddir, acfg = out / domain, cfg.adapters
    tracker = make_tracker(cfg.wandb, config={"domain": domain, "adapters": asdict(acfg)}, run_dir=ctx.run_dir,
                           job_type="adapter", name=f"adapter-{domain}", group=ctx.tracker.group or str(ctx.run_dir),
                           beside=True)
    tracker.define_step("adapter")
    model = A.with_lora(base, acfg)
    ok, (use_cuda, bf16) = False, device_and_precision(cfg.hardware)
    try:
        trained = A.train(model, tok, data[domain]["encoded"]["train"], acfg, ddir / "_trainer", seed=cfg.seed,
                          cuda=use_cuda, bf16=bf16,
                          on_log=lambda r: tracker.log({"adapter/step": r["step"], "adapter/loss": r["loss"],
                                                        "adapter/lr": r["lr"]}))
        shutil.rmtree(ddir / "_trainer", ignore_errors=True)
        model.save_pretrained(str(ddir), safe_serialization=True)
        tok.save_pretrained(str(ddir))
        own = evaluate(model, tok, data, domain, cfg)
        row = {d: own["loss"]["test"] if d == domain else A.loss(A.score(model, data[d]["encoded"]["test"], {}))
               for d in data}
        rep = domain_report(domain, data, trained, own, base_eval[domain], row, cfg.seed)
        write_json(ddir / "report.json", rep)
        tracker.stage_done(domain_metrics(rep))
        tracker.table("adapter/samples", ["reference", "adapter", "base"],
                      [[s["reference"], s["adapter"], s["base"]] for s in rep["samples"]])
        if cfg.wandb.log_model:
            tracker.artifact(f"adapter-{domain}", "model", [ddir])
        ok = True
        return rep
    finally:
        model.unload()  # the LoRA layers out of ``base`` again, success or not
        tracker.finish(exit_code=0 if ok else 1)


def write_matrix(out: Path, ctx: Context, base_eval: dict, reports: dict, domains: list[str]) -> None:
    matrix = {"none": {d: base_eval[d]["loss"]["test"] for d in domains},
              **{n: reports[n]["matrix_row"] for n in domains if n in reports}}
    write_json(out / "matrix.json", {"rows": "model (none = no adapter)", "columns": "domain test split",
                                     "value": "response-token loss (nats)", "matrix": matrix})
    A.plot_matrix(matrix, domains, out / "adapters_matrix.png")
    shutil.copy(out / "adapters_matrix.png", ctx.run_dir / "adapters_matrix.png")
    ctx.tracker.image("adapters/matrix", out / "adapters_matrix.png")


def run(cfg: Config, ctx: Context, out: Path) -> dict:
    base, tok, method, info = setup(cfg, ctx, out)
    data = load_data(cfg, ctx, tok)
    domains = list(cfg.adapters.domains)
    log.info("adapters: %s on the %s model, domains %s", method, info["base"],
             {d: {s: len(data[d]["records"][s]) for s in SPLITS} for d in domains})
    base_eval = {d: evaluate(base, tok, data, d, cfg) for d in domains}
    reports, failed = {}, {}
    for d in domains:
        if (out / d / "report.json").is_file():
            reports[d] = read_json(out / d / "report.json")
            log.info("adapters: %s already trained (%s)", d, out / d)
            continue
        log.info("adapters: training %s (%d records)", d, len(data[d]["records"]["train"]))
        try:
            reports[d] = train_domain(cfg, ctx, out, base, tok, data, d, base_eval)
        except Exception as e:  # one domain's failure keeps the others' adapters
            log.error("adapters: %s failed: %s\n%s", d, e, traceback.format_exc())
            failed[d] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    write_json(out / "adapters.json", {**info, "domains": domains, "failed": failed})
    write_matrix(out, ctx, base_eval, reports, domains)
    if failed:
        d, why = next(iter(failed.items()))
        raise A.AdapterError(f"adapters.domains.{d}: {why} ({len(reports)} other adapters kept in {out}; rerun to retry)")
    metrics = {"adapters/method": method, "adapters/base": info["base"]}
    for rep in reports.values():
        metrics.update(domain_metrics(rep))
    return metrics
