"""The whole flow on one screen: the ordered stages, what each reads, and which config keys it uses.

Every stage is a module under ``tokalign/stages`` with ``run(cfg: Config, ctx: Context, out: Path) -> dict`` of
metrics: it reads its inputs from ``ctx.path(<upstream stage>)`` (``tokalign/context.py``: an error for a stage it
does not list in ``inputs``, or one that did not run; ``ctx.has`` asks whether an optional one ran), writes its
artifacts into ``out`` and never imports another stage (files several stages share are read and written by
``tokalign/artifacts.py``; ``tests/test_layout.py`` checks the rule). Outputs are cached by content
(``tokalign/cache.py``): the key of a stage hashes the values of its ``keys`` (and of ``keys_if(cfg)``, keys it
depends on only in some configs), and the keys of its ``inputs``, so a sweep over ``lr_stage1`` reuses
tokenization, embeddings, alignment and initialisation, and a sweep over ``similarity_threshold`` recomputes from
``align`` on.

Run it:  python -m tokalign            (smoke mode on the demo assets)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import traceback
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import OmegaConf

from tokalign import cache
from tokalign.context import Context
from tokalign.distributed import launched
from tokalign.modelfacts import free_memory
from tokalign.config import AlignmentConfig, Config
from tokalign.stages import (adapters, align, corpus, domain_vocab, embed, evaluate, export, init, instruct, preflight,
                             source, terms, tokenize, train)
from tokalign.tracking import NullTracker

log = logging.getLogger("tokalign")


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline."""

    name: str
    run: Callable[[Config, Context, Path], dict]
    inputs: tuple[str, ...] = ()  # upstream stages whose outputs it reads (ctx.path(name))
    keys: tuple[str, ...] = ()  # config keys its output depends on: part of its cache key
    keys_if: Callable[[Config], tuple[str, ...]] = lambda cfg: ()  # keys the output depends on only in this config
    cached: bool = True  # False: runs every time, writes into the run directory
    resumable: bool = False  # True: a half-finished output (checkpoints) is continued, not wiped
    when: Callable[[Config], bool] = lambda cfg: True  # skip the stage when False


def _curve_keys(cfg: Config) -> tuple[str, ...]:
    """With an in-training recovery curve (``train.eval_steps > 0``) a training stage's log also depends on how
    the curve's dev documents are chosen and scored."""
    return ("eval.max_eval_samples", "eval.max_doc_bytes", "eval.seq_len", "eval.stride") if cfg.train.eval_steps > 0 else ()


# Alignment keys that only stage init reads: changing one rebuilds the rows, never the alignment itself.
INIT_ONLY_ALIGNMENT_KEYS = ("piece_weights", "output_rows", "output_fit_tokens", "output_ridge", "calibrate",
                            "calibrate_k", "calibrate_positions", "refine_steps", "refine_lr", "absorb", "absorb_ridge",
                            "absorb_positions")
ALIGN_KEYS = tuple(f"alignment.{f.name}" for f in fields(AlignmentConfig) if f.name not in INIT_ONLY_ALIGNMENT_KEYS)

# name            run                     reads                               config keys (the cache key)
STAGES: list[Stage] = [
    Stage("preflight", preflight.run, (), ("hardware", "preflight", "cache_dir", "export",
                                                "adapters"), cached=False),
    Stage("corpus", corpus.run, (), ("corpus", "eval_corpus", "corpus_text_field", "corpus_bytes", "holdout_ids",
                                     "holdout_fraction", "dev_fraction", "allow_eval_overlap", "eval.pubmedqa_file",
                                     "eval.pubmedqa_test_ids")),  # not corpus_max_bad_share: it only decides failure
    Stage("source", source.run, (), ("source_model", "allow_pickle", "trust_remote_code")),
    Stage("instruct", instruct.run, ("corpus",), ("adapters.sources", "adapters.domains", "adapters.min_words",
                                                "adapters.max_words", "adapters.max_records_per_source",
                                                "adapters.max_records_per_domain", "adapters.split", "adapters.split_seed"),
          when=lambda cfg: cfg.adapters.enabled),  # early: bad instruction data stops the run before any training
    Stage("domain_vocab", domain_vocab.run, ("corpus", "source"), ("domain_vocab.size", "domain_vocab.min_freq",
                                                                  "domain_vocab.kinds", "domain_vocab.max_phrase_words",
                                                                  "domain_vocab.report_top"),  # the target, learned
          when=lambda cfg: cfg.is_domain_vocab()),
    Stage("tokenize", tokenize.run, ("corpus", "source", "domain_vocab"), ("target_tokenizer", "trust_remote_code")),
    Stage("terms", terms.run, ("corpus", "source", "tokenize"), ("terms", "corpus_text_field")),
    Stage("embed", embed.run, ("tokenize",), ("embed",),  # seed: the documents sampled under embed.max_tokens
          keys_if=lambda cfg: ("seed",) if cfg.embed.max_tokens > 0 else ()),
    Stage("align", align.run, ("tokenize", "embed", "source"), ("pivot_count", "similarity_threshold", *ALIGN_KEYS,
                                                                 "seed")),
    Stage("init", init.run, ("tokenize", "align", "source"), ("init_methods", "seed",
                                                               *(f"alignment.{k}" for k in INIT_ONLY_ALIGNMENT_KEYS)),
          keys_if=lambda cfg: ("domain_vocab.init_fit_tokens", "domain_vocab.init_steps", "domain_vocab.init_lr",
                             "domain_vocab.init_output", "domain_vocab.init_objective",
                             # only when not constant: rows cached before the key existed stay valid
                             *(("domain_vocab.init_schedule",) if cfg.domain_vocab.init_schedule != "constant" else ()))
          if "extend" in cfg.init_methods else ()),
    Stage("evaluate_source", evaluate.run_source, ("corpus", "source"), ("eval", "hardware.dtype", "seed")),
    Stage("evaluate_init", evaluate.run_init, ("corpus", "source", "tokenize", "align", "init", "evaluate_source"),
          ("eval", "init_methods", "alignment.reference_pairs", "hardware.dtype", "seed")),
    Stage("train_stage1", launched(train.run_stage1), ("corpus", "source", "tokenize", "init"),  # source: the teacher
          ("lr_stage1", "steps_stage1", "train", "lr_schedule", "seed", "hardware.dtype"), keys_if=_curve_keys,
          resumable=True, when=lambda cfg: cfg.steps_stage1 > 0),
    Stage("train_stage2", launched(train.run_stage2), ("corpus", "source", "tokenize", "init", "train_stage1"),
          ("lr_stage2", "steps_stage2", "train_start_idx_stage2", "stage2_use_lora", "train", "lr_schedule", "seed",
           "hardware.dtype", "steps_stage1"), keys_if=_curve_keys,
          resumable=True, when=lambda cfg: cfg.steps_stage2 > 0),
    Stage("evaluate", evaluate.run_final, ("corpus", "source", "tokenize", "init", "evaluate_source", "evaluate_init",
                                           "train_stage1", "train_stage2"), ("eval", "hardware.dtype", "seed"),
          cached=False),
    Stage("adapters", adapters.run, ("instruct", "source", "init", "train_stage1", "train_stage2"),
          ("adapters", "hardware.device", "hardware.dtype", "seed", "allow_pickle", "trust_remote_code"),
          resumable=True, when=lambda cfg: cfg.adapters.enabled),
    Stage("export", export.run_hf, ("source", "init", "train_stage1", "train_stage2", "adapters"), ("export.adapter",),
          when=lambda cfg: cfg.export.enabled),
    Stage("export_gguf", export.run_gguf, ("corpus", "export"), ("export", "target_tokenizer", "eval.max_doc_bytes",
                                                                 "eval.seq_len", "eval.stride", "seed"),
          when=lambda cfg: cfg.export.enabled and len(cfg.export.gguf_types) > 0),
]


def _select(cfg: Config, keys: tuple[str, ...]) -> dict:
    conf = OmegaConf.structured(cfg)
    out = {}
    for k in keys:
        v = OmegaConf.select(conf, k)
        out[k] = OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
    return out


def _fingerprint(value: Any) -> Any:
    """A path's identity for cache keys: a file's size and mtime, so an edited corpus invalidates the cache."""
    if isinstance(value, str) and value and os.path.exists(value):
        p = Path(value)
        st = p.stat()
        return {"path": str(p.resolve()), "bytes": st.st_size, "mtime": int(st.st_mtime)}
    return value


def stage_key(stage: Stage, cfg: Config, input_keys: dict[str, str]) -> str:
    selected = {k: _fingerprint(v) for k, v in _select(cfg, stage.keys + stage.keys_if(cfg)).items()}
    return cache.stable_hash({"stage": stage.name, "v": 1, "config": selected,
                              "inputs": {n: input_keys.get(n) for n in stage.inputs}})


def _json_safe(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool, list, dict)) or v is None}


def write_summary(run_dir: Path, metrics: dict, stages: dict, extra: Optional[dict] = None) -> Path:
    path = run_dir / "summary.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"metrics": _json_safe(metrics), "stages": stages, **(extra or {})}, indent=2))
    os.replace(tmp, path)
    return path


def release_memory() -> None:
    """Drop what a finished stage left behind (host garbage, the CUDA allocator's cached blocks), so a long
    run or the next job of a serial multirun starts from a clean GPU."""
    free_memory()


def run_pipeline(cfg: Config, run_dir: Path, tracker: Any = None, stages: Optional[list[Stage]] = None) -> dict:
    """Run every stage in order, reusing verified cached outputs; returns the summary dict.

    A stage that raises stops the run; ``summary.json`` is written after every stage, so what
    was computed stays recorded, and cached outputs stay for the next run.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = Context(run_dir=run_dir, tracker=tracker or NullTracker())
    cache_root = Path(cfg.cache_dir).expanduser()
    keys: dict[str, str] = {}
    records: dict[str, dict] = {}
    for stage in stages or STAGES:
        if not stage.when(cfg):
            records[stage.name] = {"status": "skipped", "seconds": 0.0}
            continue
        t0 = time.time()
        key = stage_key(stage, cfg, keys)
        keys[stage.name] = key
        record: dict[str, Any] = {"key": key}
        ctx.stage, ctx.inputs = stage.name, stage.inputs
        try:
            if not stage.cached:
                out = run_dir / stage.name
                out.mkdir(parents=True, exist_ok=True)
                metrics = stage.run(cfg, ctx, out) or {}
                record["status"] = "computed"
            else:
                final = cache_root / stage.name / key
                with cache.locked(cache_root / stage.name / f"{key}.lock"):
                    if cfg.resume and cache.verify(final):
                        metrics = cache.read_manifest(final).get("metrics", {})
                        record["status"] = "cached"
                        log.info("[%s] cached: %s", stage.name, final)
                        for png in sorted(final.glob("*.png")):  # its plots, as the stage copies them when computed
                            shutil.copy2(png, run_dir / png.name)
                    else:
                        partial = final.with_name(key + ".partial")
                        if final.exists():
                            log.warning("[%s] cache entry %s failed verification: recomputing", stage.name, final)
                            shutil.rmtree(final)
                        if (not cfg.resume or not stage.resumable) and partial.exists():
                            shutil.rmtree(partial)
                        partial.mkdir(parents=True, exist_ok=True)
                        log.info("[%s] computing into %s", stage.name, partial)
                        metrics = stage.run(cfg, ctx, partial) or {}
                        cache.publish(partial, final, {"metrics": _json_safe(metrics), "stage": stage.name})
                        record["status"] = "computed"
                out = final
                link = run_dir / "stages" / stage.name
                link.parent.mkdir(exist_ok=True)
                if link.is_symlink() or link.exists():
                    link.unlink()
                link.symlink_to(out.resolve(), target_is_directory=True)
            ctx.outputs[stage.name] = out
            ctx.metrics.update(metrics)
            record["path"] = str(out)
        except Exception as e:
            record.update(status="failed", error=f"{type(e).__name__}: {e}")
            record["seconds"] = round(time.time() - t0, 3)
            records[stage.name] = record
            (run_dir / "error.txt").write_text(traceback.format_exc())
            write_summary(run_dir, ctx.metrics, records)
            raise
        finally:
            if record.get("status") != "cached":  # a cached stage loaded nothing worth releasing
                release_memory()
        record["seconds"] = round(time.time() - t0, 3)
        records[stage.name] = record
        (run_dir / f"{stage.name}.json").write_text(json.dumps({**record, "metrics": _json_safe(metrics)}, indent=1))
        ctx.tracker.stage_done({**metrics, f"time/{stage.name}_s": record["seconds"]})
        write_summary(run_dir, ctx.metrics, records)
        log.info("[%s] %s in %.1fs", stage.name, record["status"], record["seconds"])
    return json.loads((run_dir / "summary.json").read_text())
