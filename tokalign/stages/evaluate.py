"""Stages ``evaluate_source``, ``evaluate_init`` and ``evaluate``: bits per byte with intervals, PubMedQA.

Every model is scored on the same eval documents (the first ``eval.max_eval_samples`` of
``corpus/eval.jsonl``), each under its own tokenizer, so bits per byte compare across tokenizers.
Every figure carries a 95% bootstrap interval over documents, and every comparison a paired one
on the same documents (``tokalign/stats.py``); "A beats B" is logged only when that interval
excludes 0.

* ``evaluate_source`` (``run_source``, cached: its key does not depend on the target tokenizer, so
  runs that share the source and the eval text score it once) scores the source model and its
  PubMedQA accuracy.
* ``evaluate_init`` (``run_init``, cached) scores every initialisation method, compares every pair
  and each against the source, and scores PubMedQA for the initialised (primary) model. Writes
  ``bpb.json`` and ``bpb_by_method.png``.
* ``evaluate`` (``run_final``, runs every time) scores the trained models, compares them with the
  initialised model and the source, scores PubMedQA for the final model, draws ``recovery.png``
  and logs a table of greedy generations. It is fail-soft about its data: a missing eval corpus
  or PubMedQA file is recorded as ``bpb/error`` / ``pubmedqa/error`` (and in ``eval/errors``)
  instead of raising, so a finished training run is never lost to an evaluation file.

Metrics: ``bpb/<model>`` and ``bpb/<model>/ci95`` (``source``, ``init/<method>``, ``stage1``,
``stage2``, ``final``), ``bpb/paired/<a>_vs_<b>`` (bpb(a) - bpb(b)) with ``/ci95`` and ``/verdict``,
``bpb/init_best``, ``eval/{docs,bytes,source_tokens,target_tokens}``, ``eval/roundtrip_mismatch/<side>``,
``pubmedqa/n``, ``pubmedqa/majority_rate``, ``pubmedqa/acc/<model>`` with ``/ci95``,
``pubmedqa/macro_f1/<model>``, ``eval/final_model``.

Run alone:  python -m tokalign   (the pipeline runs these after ``init`` and the training stages)
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from tokalign import metrics as M
from tokalign import refs, stats
from tokalign import recovery as R
from tokalign.artifacts import ArtifactError, curve_texts, scored_texts
from tokalign.config import Config
from tokalign.context import Context
from tokalign.errors import TokalignError
from tokalign.modelfacts import free_memory, is_tied, untie

log = logging.getLogger(__name__)

SAMPLE_PROMPTS = ("Diabetes mellitus is", "The patient was treated with", "Randomized controlled trials show that")
SAMPLE_NEW_TOKENS = 24


class EvalInputError(TokalignError, ValueError):
    """An input of the evaluation stages is missing or malformed; the message names the file."""


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------


def _setup_torch(cfg: Any) -> None:
    if cfg.hardware.torch_threads > 0:
        torch.set_num_threads(cfg.hardware.torch_threads)


def eval_texts(cfg: Any, ctx: Any) -> list[str]:
    """The documents every model is scored on: the first ``eval.max_eval_samples`` of ``corpus/eval.jsonl`` (or of
    ``dev.jsonl`` with ``eval.split=dev``, when choosing settings), each cut to its first ``eval.max_doc_bytes``
    bytes (at a space) when that is set."""
    try:
        return scored_texts(ctx.path("corpus") / f"{cfg.eval.split}.jsonl", cfg.eval.max_eval_samples,
                            cfg.eval.max_doc_bytes)
    except ArtifactError as e:
        raise EvalInputError(str(e)) from e


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise EvalInputError(f"{path}: no such file ({what})") from e
    except (OSError, json.JSONDecodeError) as e:
        raise EvalInputError(f"{path}: unreadable ({e})") from e


def _load(model_dir: Path, cfg: Any) -> tuple[Any, Any]:
    if not model_dir.is_dir():
        raise EvalInputError(f"{model_dir}: no such model folder")
    model = refs.load_model(str(model_dir), dtype=cfg.hardware.dtype, device=cfg.hardware.device,
                            attn_implementation=cfg.hardware.attn_implementation, allow_pickle=cfg.allow_pickle,
                            trust_remote_code=cfg.trust_remote_code)
    tok = refs.load_tokenizer(str(model_dir), trust_remote_code=cfg.trust_remote_code)
    model.eval()
    return model, tok


def _bpb(model: Any, tok: Any, texts: list[str], cfg: Any, desc: str) -> dict:
    return M.bits_per_byte(model, tok, texts, seq_len=cfg.eval.seq_len, stride=cfg.eval.stride,
                           batch_size=cfg.eval.batch_size, device=cfg.hardware.device, desc=desc)


def bpb_metrics(key: str, r: dict, seed: int = 0) -> dict:
    """``{key: bpb, key/ci95: [lo, hi]}`` from a ``bits_per_byte`` result with per-document figures."""
    value, ci = stats.bpb_interval(r["doc_bits"], r["doc_bytes"], seed)
    return {key: value, f"{key}/ci95": ci}


def paired_metrics(a: str, b: str, ra: dict, rb: dict, seed: int = 0) -> dict:
    """``bpb/paired/<a>_vs_<b>`` = bpb(a) - bpb(b) on the same documents, its paired interval and the verdict."""
    if ra["doc_bytes"] != rb["doc_bytes"]:
        raise EvalInputError(f"paired comparison {a} vs {b}: the two were scored on different documents")
    diff, ci = stats.paired_bpb_difference(ra["doc_bits"], rb["doc_bits"], ra["doc_bytes"], seed)
    key = f"bpb/paired/{a}_vs_{b}"
    say = stats.verdict(a, b, ci)
    log.info("bpb %s - %s = %+.4f [%+.4f, %+.4f]: %s", a, b, diff, ci[0], ci[1], say)
    return {key: diff, f"{key}/ci95": ci, f"{key}/verdict": say}


def roundtrip_metrics(tok: Any, texts: list[str], side: str) -> dict:
    """How many eval texts the tokenizer does not give back unchanged (their bits would cover other text)."""
    bad = M.roundtrip_mismatches(tok, texts)
    if bad:
        log.warning("eval: the %s tokenizer does not round-trip %d of %d eval documents (decode(encode(t)) != t): "
                    "its bits per byte is counted over slightly different text", side, bad, len(texts))
    return {f"eval/roundtrip_mismatch/{side}": bad}


def pubmedqa_examples(cfg: Any) -> tuple[Optional[list[dict]], dict]:
    """The seeded, stratified test questions, and metrics (``pubmedqa/n``, majority rate, or ``pubmedqa/error``)."""
    pq_file, n = cfg.eval.pubmedqa_file, cfg.eval.pubmedqa_samples
    if not pq_file or n <= 0:
        return None, {}
    try:
        ex = M.load_pubmedqa(pq_file, cfg.eval.pubmedqa_test_ids, n, cfg.seed)
    except M.PubMedQAError as e:
        log.warning("evaluate: pubmedqa/error: %s", e)
        return None, {"pubmedqa/error": str(e)}
    return ex, {"pubmedqa/n": len(ex), "pubmedqa/majority_rate": stats.majority_rate([e["label"] for e in ex])}


def pubmedqa_scores(model: Any, tok: Any, examples: list[dict], cfg: Any, name: str) -> tuple[dict, dict]:
    """(metrics, detail) of one model: accuracy with its Wilson interval and macro-F1 over yes/no/maybe."""
    r = M.pubmedqa_accuracy(model, tok, examples, device=cfg.hardware.device, batch_size=cfg.eval.batch_size,
                            fmt=cfg.eval.pubmedqa_format, desc=f"pubmedqa {name}")
    labels, preds = [p["label"] for p in r["predictions"]], [p["pred"] for p in r["predictions"]]
    r["ci95"] = stats.proportion_interval(r["correct"], r["n"])
    r["macro_f1"] = stats.macro_f1(labels, preds, M.PUBMEDQA_LABELS)
    log.info("pubmedqa %s: accuracy %.3f [%.3f, %.3f], macro-F1 %.3f (n=%d, predicted %s)", name, r["accuracy"],
             r["ci95"][0], r["ci95"][1], r["macro_f1"], r["n"], r["pred_counts"])
    return ({f"pubmedqa/acc/{name}": r["accuracy"], f"pubmedqa/acc/{name}/ci95": r["ci95"],
             f"pubmedqa/macro_f1/{name}": r["macro_f1"]}, r)


def _pubmedqa_row(name: str, r: dict) -> list:
    return [name, r["accuracy"], r["ci95"][0], r["ci95"][1], r["macro_f1"], r["n"]]


PUBMEDQA_COLUMNS = ["model", "accuracy", "ci95_low", "ci95_high", "macro_f1", "n"]


def apply_rows(model: Any, rows_path: Path, tied: Optional[bool] = None) -> None:
    """Copy a method's rows into ``model`` in place: ``embed``, and ``lm_head`` where the method wrote one (every
    method on an untied source; method ``extend`` always, on a model ``modelfacts.untie`` gave a head of its own).
    Rows without ``lm_head`` on a tied source (``tied``) fill a separate head with the embedding."""
    from safetensors.torch import load_file

    if not rows_path.is_file():
        raise EvalInputError(f"{rows_path}: no such file (rows of an init method written by stage 'init')")
    try:
        tensors = load_file(str(rows_path))
    except Exception as e:
        raise EvalInputError(f"{rows_path}: unreadable safetensors ({e})") from e
    emb = model.get_input_embeddings().weight
    head_mod = model.get_output_embeddings()
    head = head_mod.weight if head_mod is not None else None
    shared = head is None or head is emb or head.data_ptr() == emb.data_ptr()
    if tied is None:
        tied = is_tied(model)
    if "embed" not in tensors:
        raise EvalInputError(f"{rows_path}: missing tensor 'embed'")
    pairs = [(n, d) for n, d in (("embed", emb), ("lm_head", head)) if n in tensors and d is not None]
    for name, dst in pairs:
        if tuple(tensors[name].shape) != tuple(dst.shape):
            raise EvalInputError(f"{rows_path}: tensor '{name}' has shape {tuple(tensors[name].shape)}, "
                                 f"the model expects {tuple(dst.shape)}")
    if "lm_head" in tensors and shared:
        raise EvalInputError(f"{rows_path}: has output-head rows but the model's head is tied (untie it first)")
    if "lm_head" not in tensors and not tied and not shared:
        raise EvalInputError(f"{rows_path}: missing tensor 'lm_head' (the model's output head is untied)")
    with torch.no_grad():
        for name, dst in pairs:
            dst.copy_(tensors[name].to(dtype=dst.dtype, device=dst.device))
        if "lm_head" not in tensors and not shared:  # a tied method on a model whose head has its own tensor
            head.copy_(emb)


def _interval_plot(values: dict[str, tuple[float, list[float]]], ref: Optional[float], path: Path, title: str,
                   note: str = "") -> None:
    """Bars with 95% intervals (``values[name] = (bpb, [lo, hi])``), the source as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(values)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names) + 2), 3.8))
    ys = [values[n][0] for n in names]
    err = [[y - values[n][1][0] for n, y in zip(names, ys)], [values[n][1][1] - y for n, y in zip(names, ys)]]
    colors = ["#d65f5f" if n == "source" else "#4878d0" for n in names]
    bars = ax.bar(names, ys, yerr=err, capsize=4, color=colors)
    for b, n, y in zip(bars, names, ys):
        ax.annotate(f"{y:.3f}", (b.get_x() + b.get_width() / 2, values[n][1][1]), ha="center", va="bottom", fontsize=8)
    if max(ys) > 5 * min(ys):  # a random baseline would flatten the others
        ax.set_yscale("log")
    if ref is not None:
        ax.axhline(ref, color="#d65f5f", ls="--", lw=1, label=f"source {ref:.3f}")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_ylabel("bits per byte, 95% interval (lower is better)")
    ax.set_title(title, fontsize=10)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, va="bottom")
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout(rect=(0, 0.06 if note else 0, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _publish_plot(ctx: Any, path: Path, name: str) -> None:
    if ctx.run_dir is not None:
        Path(ctx.run_dir).mkdir(parents=True, exist_ok=True)
        if Path(ctx.run_dir) / path.name != path:
            shutil.copy2(path, Path(ctx.run_dir) / path.name)
    ctx.tracker.image(name, path)


# --------------------------------------------------------------------------------------------
# evaluate_source
# --------------------------------------------------------------------------------------------


def run_source(cfg: Config, ctx: Context, out: Path) -> dict:
    """Bits per byte (per document) and PubMedQA of the source model under its own tokenizer."""
    _setup_torch(cfg)
    texts = eval_texts(cfg, ctx)
    model, tok = _load(ctx.path("source") / "model", cfg)
    r = _bpb(model, tok, texts, cfg, "bpb source")
    metrics = {**bpb_metrics("bpb/source", r, cfg.seed), **roundtrip_metrics(tok, texts, "source"),
               "eval/docs": len(texts), "eval/bytes": r["bytes"], "eval/source_tokens": r["tokens"]}
    log.info("bpb source: %.4f [%.4f, %.4f] (%d docs, %d tokens, %.0f tok/s)", metrics["bpb/source"],
             *metrics["bpb/source/ci95"], len(texts), r["tokens"], r["tokens_per_s"])
    detail: dict[str, Any] = {"bpb": {"source": r}, "pubmedqa": {}}
    dev = curve_texts(ctx.path("corpus"), cfg.eval.max_eval_samples, cfg.eval.max_doc_bytes)
    if dev:  # the target line of the in-training recovery curve, on the dev documents that curve is scored on
        detail["bpb"]["source_dev"] = _bpb(model, tok, dev, cfg, "bpb source (dev)")
        metrics.update(bpb_metrics("bpb/source_dev", detail["bpb"]["source_dev"], cfg.seed))
    examples, pq = pubmedqa_examples(cfg)
    metrics.update(pq)
    if examples is not None:
        m, detail["pubmedqa"]["source"] = pubmedqa_scores(model, tok, examples, cfg, "source")
        metrics.update(m)
    try:  # the source's sample generations, shown next to the final model's by stage evaluate
        samples = dict(zip(SAMPLE_PROMPTS, generate_samples(model, tok, device=cfg.hardware.device)))
    except Exception as e:  # samples are illustrative; never fail the stage for them
        log.warning("evaluate_source: no sample generations: %s: %s", type(e).__name__, e)
        samples = {}
    (out / "bpb.json").write_text(json.dumps(detail["bpb"], indent=1))
    (out / "pubmedqa.json").write_text(json.dumps(detail["pubmedqa"], indent=1))
    (out / "samples.json").write_text(json.dumps(samples, indent=1))
    del model
    free_memory()
    return metrics


# --------------------------------------------------------------------------------------------
# evaluate_init
# --------------------------------------------------------------------------------------------


def _init_info(init_dir: Path) -> dict:
    info = _read_json(init_dir / "info.json", "written by stage 'init'")
    methods = info.get("methods") if isinstance(info, dict) else None
    if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods):
        raise EvalInputError(f"{init_dir / 'info.json'}: expected key 'methods' with a non-empty list of method names")
    return info


def _score_methods(cfg: Any, init_dir: Path, info: dict, texts: list[str]) -> tuple[dict[str, dict], dict, dict]:
    """Per-method bits-per-byte results (the rows of each method applied in turn), the round-trip check, and
    PubMedQA of the initialised model (the primary method's rows, as saved) on the same loaded model."""
    model, tok = _load(init_dir / "model", cfg)
    tied = info.get("tied")
    tied = tied if isinstance(tied, bool) else None
    if info.get("untied_methods") and is_tied(model):  # method extend writes a head of its own
        untie(model)
    per_method: dict[str, dict] = {}
    for m in info["methods"]:
        apply_rows(model, init_dir / "rows" / f"{m}.safetensors", tied)
        per_method[m] = _bpb(model, tok, texts, cfg, f"bpb init/{m}")
        log.info("bpb init/%s: %.4f (%d tokens, %.0f tok/s)", m, per_method[m]["bpb"], per_method[m]["tokens"],
                 per_method[m]["tokens_per_s"])
    metrics = roundtrip_metrics(tok, texts, "target")
    examples, pq = pubmedqa_examples(cfg)
    metrics.update(pq)
    pq_detail: dict[str, dict] = {}
    if examples is not None:
        primary = info.get("primary") or info["methods"][0]
        apply_rows(model, init_dir / "rows" / f"{primary}.safetensors", tied)
        m, pq_detail["init"] = pubmedqa_scores(model, tok, examples, cfg, "init")
        metrics.update(m)
    del model
    free_memory()
    return per_method, metrics, pq_detail


def run_init(cfg: Config, ctx: Context, out: Path) -> dict:
    """Bits per byte of every initialisation method on the source's documents, every pair compared."""
    _setup_torch(cfg)
    texts = eval_texts(cfg, ctx)
    init_dir = ctx.path("init")
    info = _init_info(init_dir)
    src = _read_json(ctx.path("evaluate_source") / "bpb.json", "written by stage 'evaluate_source'")["source"]
    per_method, metrics, pq_detail = _score_methods(cfg, init_dir, info, texts)
    for m, r in per_method.items():
        metrics.update(bpb_metrics(f"bpb/init/{m}", r, cfg.seed))
    methods = list(per_method)
    for i, a in enumerate(methods):
        metrics.update(paired_metrics(a, "source", per_method[a], src, cfg.seed))
        for b in methods[i + 1:]:
            metrics.update(paired_metrics(a, b, per_method[a], per_method[b], cfg.seed))
    if ctx.has("align") and ctx.has("tokenize"):
        metrics.update(alignment_bleu(cfg, ctx, texts))
    best = min(per_method, key=lambda m: per_method[m]["bpb"])
    metrics.update({"bpb/init_best": metrics[f"bpb/init/{best}"], "eval/target_tokens": per_method[best]["tokens"]})
    detail = {"init": per_method, "primary": info.get("primary"), "best_method": best, "docs": len(texts),
              "pubmedqa": pq_detail, "settings": {"seq_len": cfg.eval.seq_len, "stride": cfg.eval.stride,
                                                  "max_eval_samples": cfg.eval.max_eval_samples,
                                                  "dtype": cfg.hardware.dtype}}
    (out / "bpb.json").write_text(json.dumps(detail, indent=1))
    _init_report(ctx, out, metrics, methods, len(texts))
    return metrics


def alignment_bleu(cfg: Config, ctx: Context, texts: list[str]) -> dict:
    """TokAlign's figure of alignment quality, ``align/bleu1``: the evaluation text's target tokenization mapped
    through the published 1:1 alignment (``argmax_1to1``: gold pairs, else the nearest source token) into source
    ids, scored by BLEU-1 against the source tokenization of the same text, or against the target tokenization
    mapped through ``alignment.reference_pairs`` when that is given."""
    import numpy as np

    from tokalign.alignment import alignment_bleu1

    mapping = np.load(ctx.path("align") / "alignment.npz")["argmax_1to1"]
    tgt = refs.load_tokenizer(str(ctx.path("tokenize") / "target_tokenizer"))
    t_docs = tgt(texts, add_special_tokens=False)["input_ids"]
    if cfg.alignment.reference_pairs:
        ref_map = reference_map(Path(cfg.alignment.reference_pairs), len(mapping))
        ref_docs = [[int(ref_map[t]) for t in d if ref_map[t] >= 0] for d in t_docs]
    else:
        src = refs.load_tokenizer(str(ctx.path("source") / "model"))
        ref_docs = src(texts, add_special_tokens=False)["input_ids"]
    return {"align/bleu1": alignment_bleu1(t_docs, ref_docs, mapping)}


def reference_map(path: Path, target_vocab: int) -> Any:
    """target id -> source id (-1: no reference) from ``alignment.reference_pairs`` (JSON {target id: source id})."""
    import numpy as np

    pairs = _read_json(path, "given as alignment.reference_pairs")
    if not isinstance(pairs, dict):
        raise EvalInputError(f"{path}: expected a JSON object {{target id: source id}} (alignment.reference_pairs)")
    out = np.full(target_vocab, -1, dtype=np.int64)
    for k, v in pairs.items():
        if not (str(k).isdigit() and isinstance(v, int) and 0 <= int(k) < target_vocab and v >= 0):
            raise EvalInputError(f"{path}: entry {k!r}: {v!r} is not a target id below {target_vocab} mapped to a "
                                 "source id (alignment.reference_pairs)")
        out[int(k)] = v
    return out


def paired(metrics: dict, a: str, b: str) -> tuple[float, list[float]]:
    """bpb(a) - bpb(b) and its paired interval from the metrics, whichever order the pair was stored in."""
    if f"bpb/paired/{a}_vs_{b}" in metrics:
        return metrics[f"bpb/paired/{a}_vs_{b}"], metrics[f"bpb/paired/{a}_vs_{b}/ci95"]
    d, ci = metrics[f"bpb/paired/{b}_vs_{a}"], metrics[f"bpb/paired/{b}_vs_{a}/ci95"]
    return -d, [-ci[1], -ci[0]]


def _best_note(metrics: dict, methods: list[str]) -> str:
    """The best method against the runner-up, said as the paired interval allows."""
    if len(methods) < 2:
        return ""
    best, second = sorted(methods, key=lambda m: metrics[f"bpb/init/{m}"])[:2]
    d, ci = paired(metrics, best, second)
    return f"{stats.verdict(best, second, ci)}: {d:+.4f} bits per byte, paired 95% interval [{ci[0]:+.4f}, {ci[1]:+.4f}]"


def _init_report(ctx: Any, out: Path, metrics: dict, methods: list[str], n_docs: int) -> None:
    """``bpb_by_method.png`` with intervals and the W&B table (source figures come from ``evaluate_source``)."""
    src = (ctx.metrics.get("bpb/source"), ctx.metrics.get("bpb/source/ci95"))
    values = {m: (metrics[f"bpb/init/{m}"], metrics[f"bpb/init/{m}/ci95"]) for m in methods}
    plot = out / "bpb_by_method.png"
    try:
        _interval_plot(values, src[0], plot, f"bits per byte after initialisation ({n_docs} eval docs)",
                       note=_best_note(metrics, methods))
        _publish_plot(ctx, plot, "bpb_by_method")
    except Exception as e:  # a plot never fails the stage
        log.warning("bpb_by_method.png not written: %s", e)
    rows = [["source", src[0], *(src[1] or [None, None])]] if src[0] is not None else []
    ctx.tracker.table("bpb_by_method", ["method", "bpb", "ci95_low", "ci95_high"],
                      rows + [[m, v[0], v[1][0], v[1][1]] for m, v in values.items()])


# --------------------------------------------------------------------------------------------
# evaluate (final)
# --------------------------------------------------------------------------------------------


def generate_samples(model: Any, tok: Any, prompts=SAMPLE_PROMPTS, max_new_tokens: int = SAMPLE_NEW_TOKENS,
                     device: Any = None) -> list[str]:
    """Greedy continuations of ``prompts`` (start token + prompt, no other special tokens)."""
    from transformers import GenerationConfig

    dev = torch.device(device) if device is not None else next(model.parameters()).device
    start = M.start_token_id(tok)
    eos = getattr(tok, "eos_token_id", None)
    pad = getattr(tok, "pad_token_id", None)
    pad = pad if pad is not None else (eos if eos is not None else 0)
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=eos)
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = ([start] if start is not None else []) + list(tok(p, add_special_tokens=False)["input_ids"])
            M.check_token_range(ids, M.model_vocab_size(model), model, tok)
            x = torch.tensor([ids], device=dev)
            y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gen)
            outs.append(tok.decode(y[0, len(ids):].tolist(), skip_special_tokens=True))
    return outs


def _history_rows(path: Optional[Path]) -> list[dict]:
    """A training stage's ``log_history.json`` rows ([] when absent or unreadable)."""
    f = Path(path) / "log_history.json" if path is not None else None
    if f is None or not f.is_file():
        return []
    try:
        hist = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        log.warning("%s: unreadable (%s); no training curves", f, e)
        return []
    return [h for h in hist if isinstance(h, dict)] if isinstance(hist, list) else []


def _loss_history(rows: list[dict]) -> list[tuple[float, float]]:
    return [(float(h.get("step", i)), float(h["loss"])) for i, h in enumerate(rows)
            if isinstance(h.get("loss"), (int, float))]


def _curve_panel(ax: Any, points: list[dict], source_dev: Optional[float]) -> None:
    """Dev bits per byte (95% intervals) against training tokens, stage 2 after stage 1, the source as a line."""
    if not points:
        ax.text(0.5, 0.5, "no in-training evaluation (train.eval_steps=0)", ha="center", va="center",
                transform=ax.transAxes, fontsize=8)
    for stage in dict.fromkeys(p["stage"] for p in points):
        pts = [p for p in points if p["stage"] == stage]
        xs, ys = [p["tokens"] for p in pts], [p["bpb"] for p in pts]
        lo = [p["bpb"] - p["ci95"][0] if p.get("ci95") else 0.0 for p in pts]
        hi = [p["ci95"][1] - p["bpb"] if p.get("ci95") else 0.0 for p in pts]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", ms=3, capsize=2, lw=1.2, label=stage)
    if source_dev is not None:
        ax.axhline(source_dev, color="#d65f5f", ls="--", lw=1, label="source")
        ax.axhline(1.05 * source_dev, color="#d65f5f", ls=":", lw=0.8, label="source +5%")
    if points:
        ax.legend(fontsize=8)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("dev bits per byte, 95% interval")
    ax.set_title("recovery curve", fontsize=10)


def recovery_plot(bars: dict[str, tuple[float, list[float]]], curves: dict[str, list[tuple[float, float]]],
                  path: Path, points: Optional[list[dict]] = None, source_dev: Optional[float] = None) -> None:
    """Left: bits per byte by stage with 95% intervals; middle: the recovery curve (dev bits per byte against
    training tokens, the source's line); right: training loss curves (stage 2 continues stage 1's step axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a3, a2) = plt.subplots(1, 3, figsize=(16, 4))
    _curve_panel(a3, points or [], source_dev)
    if bars:
        names = list(bars)
        ys = [bars[n][0] for n in names]
        err = [[y - bars[n][1][0] for n, y in zip(names, ys)], [bars[n][1][1] - y for n, y in zip(names, ys)]]
        colors = ["#d65f5f" if n == "source" else "#4878d0" for n in names]
        bs = a1.bar(names, ys, yerr=err, capsize=4, color=colors)
        for b, n, y in zip(bs, names, ys):
            a1.annotate(f"{y:.3f}", (b.get_x() + b.get_width() / 2, bars[n][1][1]), ha="center", va="bottom",
                        fontsize=8)
        if "source" in bars:
            a1.axhline(bars["source"][0], color="#d65f5f", ls="--", lw=1)
        a1.tick_params(axis="x", labelrotation=20)
    else:
        a1.text(0.5, 0.5, "no bits-per-byte values", ha="center", va="center", transform=a1.transAxes)
    a1.set_ylabel("bits per byte, 95% interval (lower is better)")
    a1.set_title("recovery: bits per byte by stage", fontsize=10)
    offset, drawn = 0.0, False
    for name, pts in curves.items():
        if not pts:
            continue
        xs = [x + offset for x, _ in pts]
        a2.plot(xs, [y for _, y in pts], label=name, lw=1.2)
        offset, drawn = max(xs), True
    if drawn:
        a2.legend(fontsize=8)
    else:
        a2.text(0.5, 0.5, "no training logs", ha="center", va="center", transform=a2.transAxes)
    a2.set_xlabel("optimizer step")
    a2.set_ylabel("training loss (nats/token)")
    a2.set_title("training loss", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _upstream(ctx: Any) -> tuple[dict[str, dict], dict[str, dict], dict[str, str]]:
    """Per-document bits-per-byte results ({"source", "init"}), PubMedQA details and the source's sample
    generations, from the upstream evaluations."""
    bpb: dict[str, dict] = {}
    pq: dict[str, dict] = {}
    samples: dict[str, str] = {}
    src = ctx.path("evaluate_source") if ctx.has("evaluate_source") else None
    ini = ctx.path("evaluate_init") if ctx.has("evaluate_init") else None
    if src is not None and (Path(src) / "bpb.json").is_file():
        bpb["source"] = _read_json(Path(src) / "bpb.json", "evaluate_source")["source"]
        pq.update(_read_json(Path(src) / "pubmedqa.json", "evaluate_source"))
        if (Path(src) / "samples.json").is_file():
            samples = _read_json(Path(src) / "samples.json", "evaluate_source")
    if ini is not None and (Path(ini) / "bpb.json").is_file():
        d = _read_json(Path(ini) / "bpb.json", "evaluate_init")
        if d.get("primary") in d.get("init", {}):
            bpb["init"] = d["init"][d["primary"]]
        pq.update(d.get("pubmedqa", {}))
    return bpb, pq, samples


def _compare_trained(name: str, r: dict, upstream: dict[str, dict], seed: int) -> dict:
    """A trained model against every earlier model scored on the same documents."""
    out: dict[str, Any] = {}
    for other, ro in upstream.items():
        if ro["doc_bytes"] == r["doc_bytes"]:
            out.update(paired_metrics(name, other, r, ro, seed))
        else:
            log.warning("evaluate: %s vs %s not compared: scored on different documents", name, other)
    return out


def _final_model(ctx: Any) -> tuple[list[tuple[str, Path]], Optional[str]]:
    trained = [(n, ctx.path(f"train_{n}") / "model") for n in ("stage1", "stage2") if ctx.has(f"train_{n}")]
    final = trained[-1][0] if trained else ("init" if ctx.has("init") else None)
    return trained, final


@dataclass
class _FinalRun:
    """What stage ``evaluate`` gathers: its metrics, the fail-soft errors, what ``final.json`` records, sample rows."""

    metrics: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)
    sample_rows: list[list[str]] = field(default_factory=list)

    def record(self, key: str, msg: str) -> None:
        """A problem with a data file or a plot: kept as ``key`` and in ``eval/errors``, never raised."""
        self.metrics[key] = msg
        self.errors.append(f"{key}: {msg}")
        log.warning("evaluate: %s: %s", key, msg)


def _final_inputs(cfg: Config, ctx: Context, run: _FinalRun,
                  trained: list) -> tuple[Optional[list[str]], Optional[list[dict]], dict[str, dict]]:
    """The eval texts and PubMedQA questions (only when a trained model is scored; a missing file is recorded), and
    the upstream per-document results the trained models are compared with."""
    texts: Optional[list[str]] = None
    if trained:
        try:
            texts = eval_texts(cfg, ctx)
        except EvalInputError as e:
            run.record("bpb/error", str(e))
    upstream_bpb, pq_detail, source_samples = _upstream(ctx)
    examples, pq = pubmedqa_examples(cfg) if trained else (None, {})
    if "pubmedqa/error" in pq:
        run.record("pubmedqa/error", pq.pop("pubmedqa/error"))
    run.metrics.update(pq)
    run.detail.update({"bpb": {}, "pubmedqa": pq_detail, "samples": {"source": source_samples}})
    run.sample_rows += [["source", p, g] for p, g in source_samples.items()]
    return texts, examples, upstream_bpb


def _score_trained(name: str, model: Any, tok: Any, texts: list[str], cfg: Config, run: _FinalRun,
                   upstream_bpb: dict[str, dict]) -> None:
    """Bits per byte of a trained model, compared with every model scored before it on the same documents."""
    r = _bpb(model, tok, texts, cfg, f"bpb {name}")
    earlier = {**upstream_bpb, **{k: v for k, v in run.detail["bpb"].items() if k != name}}
    run.detail["bpb"][name] = r
    run.metrics.update(bpb_metrics(f"bpb/{name}", r, cfg.seed))
    run.metrics.update(_compare_trained(name, r, earlier, cfg.seed))
    log.info("bpb %s: %.4f [%.4f, %.4f]", name, run.metrics[f"bpb/{name}"], *run.metrics[f"bpb/{name}/ci95"])


def _score_final(name: str, model: Any, tok: Any, examples: Optional[list[dict]], cfg: Config,
                 run: _FinalRun) -> None:
    """PubMedQA and the sample generations of the final model (samples are illustrative: a failure is recorded)."""
    if examples is not None:
        m, run.detail["pubmedqa"][name] = pubmedqa_scores(model, tok, examples, cfg, name)
        run.metrics.update(m)
    try:
        gens = generate_samples(model, tok, device=cfg.hardware.device)
        run.detail["samples"][name] = dict(zip(SAMPLE_PROMPTS, gens))
        run.sample_rows += [[name, p, g] for p, g in zip(SAMPLE_PROMPTS, gens)]
    except Exception as e:  # never fail the stage for them
        run.record(f"samples/error/{name}", f"{type(e).__name__}: {e}")


def run_final(cfg: Config, ctx: Context, out: Path) -> dict:
    """Bits per byte of the trained models against init and source, PubMedQA of the final model, plots, samples."""
    _setup_torch(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run = _FinalRun()
    trained, final_name = _final_model(ctx)
    texts, examples, upstream_bpb = _final_inputs(cfg, ctx, run, trained)
    models = trained or ([("init", ctx.path("init") / "model")] if ctx.has("init") else [])
    for name, mdir in models:
        model, tok = _load(mdir, cfg)
        if texts is not None and name in ("stage1", "stage2"):
            _score_trained(name, model, tok, texts, cfg, run, upstream_bpb)
        if name == final_name:
            _score_final(name, model, tok, examples, cfg, run)
        del model, tok
        free_memory()
    _final_summary(run.metrics, final_name)
    _final_report(ctx, run.metrics, run.detail, run.sample_rows, run.record)
    if run.errors:
        run.metrics["eval/errors"] = run.errors
    run.detail["metrics"] = run.metrics
    (out / "final.json").write_text(json.dumps(run.detail, indent=1, default=str))
    return run.metrics


def _final_summary(metrics: dict, final_name: Optional[str]) -> None:
    if final_name is None:
        return
    metrics["eval/final_model"] = final_name
    for what in ("bpb", "pubmedqa/acc"):
        for suffix in ("", "/ci95"):
            if f"{what}/{final_name}{suffix}" in metrics:
                metrics[f"{what}/final{suffix}"] = metrics[f"{what}/{final_name}{suffix}"]


def _final_report(ctx: Any, metrics: dict, detail: dict, sample_rows: list, record) -> None:
    """``recovery.png`` (bits per byte by stage from every evaluate stage, loss curves), W&B tables."""
    allm = {**ctx.metrics, **metrics}
    bars: dict[str, tuple[float, list[float]]] = {}
    if isinstance(allm.get("bpb/source"), (int, float)):
        bars["source"] = (allm["bpb/source"], allm.get("bpb/source/ci95") or [allm["bpb/source"]] * 2)
    inits = {k.split("/", 2)[2]: v for k, v in allm.items()
             if k.startswith("bpb/init/") and k.count("/") == 2 and isinstance(v, (int, float))}
    if inits:
        best = min(inits, key=inits.get)
        bars[f"best init ({best})"] = (inits[best], allm.get(f"bpb/init/{best}/ci95") or [inits[best]] * 2)
        if "tokalign" in inits and best != "tokalign":
            bars["init tokalign"] = (inits["tokalign"], allm.get("bpb/init/tokalign/ci95") or [inits["tokalign"]] * 2)
    for n in ("stage1", "stage2"):
        if isinstance(allm.get(f"bpb/{n}"), (int, float)):
            bars[n] = (allm[f"bpb/{n}"], allm[f"bpb/{n}/ci95"])
    rows = {n: _history_rows(ctx.path(f"train_{n}") if ctx.has(f"train_{n}") else None) for n in ("stage1", "stage2")}
    curves = {n: _loss_history(r) for n, r in rows.items()}
    points = R.curve(list(rows.items()))
    source_dev = allm.get("bpb/source_dev") if isinstance(allm.get("bpb/source_dev"), (int, float)) else None
    metrics.update(R.recovery_metrics(points, source_dev))
    detail["recovery"] = {"points": points, "source_dev_bpb": source_dev}
    rec = Path(ctx.run_dir) / "recovery.png"
    try:
        Path(ctx.run_dir).mkdir(parents=True, exist_ok=True)
        recovery_plot(bars, curves, rec, points, source_dev)
        ctx.tracker.image("recovery", rec)
    except Exception as e:
        record("plot/error", f"recovery.png not written: {type(e).__name__}: {e}")
    if sample_rows:
        ctx.tracker.table("samples", ["model", "prompt", "generation"], sample_rows)
    if detail["pubmedqa"]:
        ctx.tracker.table("pubmedqa", PUBMEDQA_COLUMNS, [_pubmedqa_row(n, r) for n, r in detail["pubmedqa"].items()])
