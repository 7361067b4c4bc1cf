"""Stages ``evaluate_init`` and ``evaluate``: bits per byte and PubMedQA accuracy.

``evaluate_init`` (``run_init``, cached) scores the source model under its own tokenizer and
every initialisation method under the target tokenizer on the same eval texts, so the bpb
values compare across tokenizers. Writes ``bpb.json`` and ``bpb_by_method.png``.

``evaluate`` (``run_final``, runs every time) scores the trained models (stage 1, stage 2),
measures PubMedQA accuracy of the source, the primary init and the final adapted model, draws
``recovery.png`` in the run directory and logs a table of greedy generations. It is fail-soft
about its data: a missing eval corpus or PubMedQA file is recorded as ``bpb/error`` /
``pubmedqa/error`` (and in the list ``eval/errors``) instead of raising, so a finished training
run is never lost to an evaluation file.

Metrics: ``bpb/source``, ``bpb/init/<method>``, ``bpb/init_best``, ``eval/bytes``,
``eval/docs``, ``eval/source_tokens``, ``eval/target_tokens`` (init); ``bpb/stage1``,
``bpb/stage2``, ``bpb/final``, ``pubmedqa/acc/{source,init,stage1|stage2,final}``,
``pubmedqa/n`` (final).
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from tokalign import metrics as M
from tokalign import refs
from tokalign.errors import TokalignError

log = logging.getLogger(__name__)

SAMPLE_PROMPTS = ("Diabetes mellitus is", "The patient was treated with", "Randomized controlled trials show that")
SAMPLE_NEW_TOKENS = 24


class EvalInputError(TokalignError, ValueError):
    """An input of the evaluation stages is missing or malformed; the message names the file."""


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------


def _setup_torch(cfg: Any) -> None:
    threads = int(getattr(cfg.hardware, "torch_threads", 0) or 0)
    if threads > 0:
        torch.set_num_threads(threads)


def read_eval_texts(path: Path, max_docs: int = 0, required: bool = True) -> list[str]:
    """Texts of the first ``max_docs`` records (0 = all) of a ``{"id", "text"}`` JSONL file, in file order.
    ``required=False``: a missing file or one without text gives ``[]`` instead of an error."""
    if not path.is_file():
        if not required:
            return []
        raise EvalInputError(f"{path}: no such file (the eval corpus written by stage 'corpus')")
    texts: list[str] = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if max_docs and len(texts) >= max_docs:
                    break
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EvalInputError(f"{path}:{n}: not valid JSON ({e.msg})") from e
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise EvalInputError(f"{path}:{n}: expected an object with a string 'text'")
                texts.append(rec["text"])
    except (OSError, UnicodeDecodeError) as e:
        raise EvalInputError(f"{path}: unreadable ({e})") from e
    if not texts or not any(texts):
        if not required:
            return []
        raise EvalInputError(f"{path}: no non-empty documents to score")
    return texts


def _load(model_dir: Path, cfg: Any) -> tuple[Any, Any]:
    if not model_dir.is_dir():
        raise EvalInputError(f"{model_dir}: no such model folder")
    model = refs.load_model(str(model_dir), dtype=cfg.hardware.dtype, device=cfg.hardware.device,
                            attn_implementation=getattr(cfg.hardware, "attn_implementation", None),
                            allow_pickle=getattr(cfg, "allow_pickle", False),
                            trust_remote_code=getattr(cfg, "trust_remote_code", False))
    tok = refs.load_tokenizer(str(model_dir), trust_remote_code=getattr(cfg, "trust_remote_code", False))
    model.eval()
    return model, tok


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _bpb(model: Any, tok: Any, texts: list[str], cfg: Any, desc: str) -> dict:
    return M.bits_per_byte(model, tok, texts, seq_len=cfg.eval.seq_len, stride=cfg.eval.stride,
                           batch_size=cfg.eval.batch_size, device=cfg.hardware.device, desc=desc)


def apply_rows(model: Any, rows_path: Path, tied: Optional[bool] = None) -> None:
    """Copy a method's rows (``embed`` and, for untied models, ``lm_head``) into ``model`` in place."""
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
    if tied is None:
        tied = head is None or head is emb
    if "embed" not in tensors:
        raise EvalInputError(f"{rows_path}: missing tensor 'embed'")
    with torch.no_grad():
        for name, dst in (("embed", emb), ("lm_head", head)):
            if name == "lm_head" and (tied or dst is None):
                continue
            if name not in tensors:
                raise EvalInputError(f"{rows_path}: missing tensor '{name}' (the model's output head is untied)")
            src = tensors[name]
            if tuple(src.shape) != tuple(dst.shape):
                raise EvalInputError(f"{rows_path}: tensor '{name}' has shape {tuple(src.shape)}, "
                                     f"the model expects {tuple(dst.shape)}")
            dst.copy_(src.to(dtype=dst.dtype, device=dst.device))
        if tied and head is not None and head is not emb:  # a tied model whose tensors were not shared
            head.copy_(emb)


def _bar_plot(values: dict[str, float], ref: Optional[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(values) + 2), 3.6))
    names = list(values)
    bars = ax.bar(names, [values[n] for n in names], color="#4878d0")
    for b, n in zip(bars, names):
        ax.annotate(f"{values[n]:.3f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                    fontsize=8)
    if ref is not None:
        ax.axhline(ref, color="#d65f5f", ls="--", label=f"source {ref:.3f}")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# evaluate_init
# --------------------------------------------------------------------------------------------


def run_init(cfg: Any, ctx: Any, out: Path) -> dict:
    """Bits per byte of the source model and of every initialisation method, on the same eval texts."""
    _setup_torch(cfg)
    corpus_dir, source_dir, init_dir = ctx.path("corpus"), ctx.path("source"), ctx.path("init")
    for name, p in (("corpus", corpus_dir), ("source", source_dir), ("init", init_dir)):
        if p is None:
            raise EvalInputError(f"evaluate_init needs the output of stage '{name}', which did not run")
    texts = read_eval_texts(Path(corpus_dir) / "eval.jsonl", cfg.eval.max_eval_samples)
    info_path = Path(init_dir) / "info.json"
    try:
        info = json.loads(info_path.read_text())
    except FileNotFoundError as e:
        raise EvalInputError(f"{info_path}: no such file (written by stage 'init')") from e
    except (OSError, json.JSONDecodeError) as e:
        raise EvalInputError(f"{info_path}: unreadable ({e})") from e
    methods = info.get("methods") if isinstance(info, dict) else None
    if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods):
        raise EvalInputError(f"{info_path}: expected key 'methods' with a non-empty list of method names")

    model, tok = _load(Path(source_dir) / "model", cfg)
    src = _bpb(model, tok, texts, cfg, "bpb source")
    log.info("bpb source: %.4f (%d tokens, %.0f tok/s)", src["bpb"], src["tokens"], src["tokens_per_s"])
    del model
    _free()

    model, tok = _load(Path(init_dir) / "model", cfg)
    tied = info.get("tied")
    per_method: dict[str, dict] = {}
    for m in methods:
        apply_rows(model, Path(init_dir) / "rows" / f"{m}.safetensors", tied if isinstance(tied, bool) else None)
        per_method[m] = _bpb(model, tok, texts, cfg, f"bpb init/{m}")
        log.info("bpb init/%s: %.4f", m, per_method[m]["bpb"])
    del model
    _free()

    metrics: dict[str, Any] = {"bpb/source": src["bpb"]}
    for m, r in per_method.items():
        metrics[f"bpb/init/{m}"] = r["bpb"]
    best = min(per_method, key=lambda m: per_method[m]["bpb"])
    metrics["bpb/init_best"] = per_method[best]["bpb"]
    any_target = next(iter(per_method.values()))
    metrics.update({"eval/bytes": src["bytes"], "eval/docs": len(texts), "eval/source_tokens": src["tokens"],
                    "eval/target_tokens": any_target["tokens"]})

    detail = {"source": src, "init": per_method, "primary": info.get("primary"), "best_method": best,
              "docs": len(texts), "bytes": src["bytes"],
              "settings": {"seq_len": cfg.eval.seq_len, "stride": cfg.eval.stride, "batch_size": cfg.eval.batch_size,
                           "max_eval_samples": cfg.eval.max_eval_samples, "dtype": cfg.hardware.dtype}}
    (out / "bpb.json").write_text(json.dumps(detail, indent=1))

    plot = out / "bpb_by_method.png"
    try:
        _bar_plot({m: r["bpb"] for m, r in per_method.items()}, src["bpb"], plot,
                  f"bits per byte after initialisation ({len(texts)} eval docs)")
        if ctx.run_dir is not None:
            Path(ctx.run_dir).mkdir(parents=True, exist_ok=True)
            shutil.copy2(plot, Path(ctx.run_dir) / plot.name)
        ctx.tracker.image("bpb_by_method", plot)
    except Exception as e:  # a plot never fails the stage
        log.warning("bpb_by_method.png not written: %s", e)
    ctx.tracker.table("bpb_by_method", ["method", "bpb"],
                      [["source", src["bpb"]]] + [[m, r["bpb"]] for m, r in per_method.items()])
    return metrics


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


def _loss_history(path: Optional[Path]) -> list[tuple[float, float]]:
    if path is None:
        return []
    f = Path(path) / "log_history.json"
    if not f.is_file():
        return []
    try:
        hist = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        log.warning("%s: unreadable (%s); no loss curve", f, e)
        return []
    pts = []
    for i, h in enumerate(hist if isinstance(hist, list) else []):
        if isinstance(h, dict) and isinstance(h.get("loss"), (int, float)):
            pts.append((float(h.get("step", i)), float(h["loss"])))
    return pts


def recovery_plot(bars: dict[str, float], curves: dict[str, list[tuple[float, float]]], path: Path) -> None:
    """Left: bits per byte by stage; right: training loss curves (stage 2 continues stage 1's step axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    if bars:
        names = list(bars)
        colors = ["#d65f5f" if n == "source" else "#4878d0" for n in names]
        bs = a1.bar(names, [bars[n] for n in names], color=colors)
        for b, n in zip(bs, names):
            a1.annotate(f"{bars[n]:.3f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                        va="bottom", fontsize=8)
        if "source" in bars:
            a1.axhline(bars["source"], color="#d65f5f", ls="--", lw=1)
        a1.tick_params(axis="x", labelrotation=20)
    else:
        a1.text(0.5, 0.5, "no bits-per-byte values", ha="center", va="center", transform=a1.transAxes)
    a1.set_ylabel("bits per byte (lower is better)")
    a1.set_title("recovery: bits per byte by stage", fontsize=10)
    offset = 0.0
    drawn = False
    for name, pts in curves.items():
        if not pts:
            continue
        xs = [x + offset for x, _ in pts]
        a2.plot(xs, [y for _, y in pts], label=name, lw=1.2)
        offset = max(xs)
        drawn = True
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


def run_final(cfg: Any, ctx: Any, out: Path) -> dict:
    """Bits per byte of the trained models, PubMedQA accuracy, the recovery plot and sample generations."""
    _setup_torch(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {}
    errors: list[str] = []
    detail: dict[str, Any] = {"bpb": {}, "pubmedqa": {}, "samples": {}}

    def record(key: str, msg: str) -> None:
        metrics[key] = msg
        errors.append(f"{key}: {msg}")
        log.warning("evaluate: %s: %s", key, msg)

    src_dir = ctx.path("source")
    init_dir = ctx.path("init")
    s1, s2 = ctx.path("train_stage1"), ctx.path("train_stage2")
    models: list[tuple[str, Path]] = []  # (name, model folder) in evaluation order
    if src_dir is not None:
        models.append(("source", Path(src_dir) / "model"))
    if init_dir is not None:
        models.append(("init", Path(init_dir) / "model"))
    if s1 is not None:
        models.append(("stage1", Path(s1) / "model"))
    if s2 is not None:
        models.append(("stage2", Path(s2) / "model"))
    final_name = next((n for n in ("stage2", "stage1", "init") if any(m == n for m, _ in models)), None)

    # eval texts: only the trained models need scoring here (source and init were scored by evaluate_init)
    texts: Optional[list[str]] = None
    if s1 is not None or s2 is not None:
        corpus_dir = ctx.path("corpus")
        try:
            if corpus_dir is None:
                raise EvalInputError("stage 'corpus' did not run: no eval texts")
            texts = read_eval_texts(Path(corpus_dir) / "eval.jsonl", cfg.eval.max_eval_samples)
        except EvalInputError as e:
            record("bpb/error", str(e))

    # PubMedQA examples
    examples: Optional[list[dict]] = None
    pq_file, pq_n = cfg.eval.pubmedqa_file, cfg.eval.pubmedqa_samples
    if pq_file and pq_n > 0:
        try:
            examples = M.load_pubmedqa(pq_file, cfg.eval.pubmedqa_test_ids, pq_n, getattr(cfg, "seed", 0))
            metrics["pubmedqa/n"] = len(examples)
        except M.PubMedQAError as e:
            record("pubmedqa/error", str(e))
    else:
        log.info("evaluate: PubMedQA skipped (eval.pubmedqa_file is unset or eval.pubmedqa_samples is 0)")

    pq_models = {"source", "init", final_name}
    sample_rows: list[list[str]] = []
    for name, mdir in models:
        need_bpb = texts is not None and name in ("stage1", "stage2")
        need_pq = examples is not None and name in pq_models
        need_gen = name in ("source", final_name)
        if not (need_bpb or need_pq or need_gen):
            continue
        model, tok = _load(mdir, cfg)
        if need_bpb:
            r = _bpb(model, tok, texts, cfg, f"bpb {name}")
            metrics[f"bpb/{name}"] = r["bpb"]
            detail["bpb"][name] = r
            log.info("bpb %s: %.4f", name, r["bpb"])
        if need_pq:
            r = M.pubmedqa_accuracy(model, tok, examples, device=cfg.hardware.device, batch_size=cfg.eval.batch_size,
                                    desc=f"pubmedqa {name}")
            metrics[f"pubmedqa/acc/{name}"] = r["accuracy"]
            detail["pubmedqa"][name] = r
            log.info("pubmedqa %s: %.3f (n=%d, predicted %s)", name, r["accuracy"], r["n"], r["pred_counts"])
        if need_gen:
            try:
                gens = generate_samples(model, tok, device=cfg.hardware.device)
                detail["samples"][name] = dict(zip(SAMPLE_PROMPTS, gens))
                sample_rows += [[name, p, g] for p, g in zip(SAMPLE_PROMPTS, gens)]
            except Exception as e:  # samples are illustrative; never fail the stage for them
                record(f"samples/error/{name}", f"{type(e).__name__}: {e}")
        del model, tok
        _free()

    if final_name is not None:
        metrics["eval/final_model"] = final_name
        if f"bpb/{final_name}" in metrics:
            metrics["bpb/final"] = metrics[f"bpb/{final_name}"]
        if f"pubmedqa/acc/{final_name}" in metrics:
            metrics["pubmedqa/acc/final"] = metrics[f"pubmedqa/acc/{final_name}"]

    # recovery plot: bpb from evaluate_init (ctx.metrics) plus ours, loss curves from the training logs
    allm = {**getattr(ctx, "metrics", {}), **metrics}
    bars: dict[str, float] = {}
    if isinstance(allm.get("bpb/source"), (int, float)):
        bars["source"] = float(allm["bpb/source"])
    inits = {k.split("/", 2)[2]: float(v) for k, v in allm.items()
             if k.startswith("bpb/init/") and isinstance(v, (int, float))}
    if inits:
        best = min(inits, key=inits.get)
        bars[f"best init ({best})"] = inits[best]
        if "tokalign" in inits and best != "tokalign":
            bars["init tokalign"] = inits["tokalign"]
    for n in ("stage1", "stage2"):
        if isinstance(allm.get(f"bpb/{n}"), (int, float)):
            bars[n] = float(allm[f"bpb/{n}"])
    curves = {"stage1": _loss_history(s1), "stage2": _loss_history(s2)}
    rec = Path(ctx.run_dir) / "recovery.png"
    try:
        Path(ctx.run_dir).mkdir(parents=True, exist_ok=True)
        recovery_plot(bars, curves, rec)
        ctx.tracker.image("recovery", rec)
    except Exception as e:
        record("plot/error", f"recovery.png not written: {type(e).__name__}: {e}")

    if sample_rows:
        ctx.tracker.table("samples", ["model", "prompt", "generation"], sample_rows)
    if detail["pubmedqa"]:
        ctx.tracker.table("pubmedqa", ["model", "accuracy", "n"],
                          [[n, r["accuracy"], r["n"]] for n, r in detail["pubmedqa"].items()])
    if errors:
        metrics["eval/errors"] = errors
    detail["metrics"] = metrics
    (out / "final.json").write_text(json.dumps(detail, indent=1, default=str))
    return metrics
