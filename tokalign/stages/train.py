"""Stages ``train_stage1`` (embeddings + output head only) and ``train_stage2`` (whole model or LoRA).

Both run transformers' ``Trainer`` over :class:`tokalign.data.PackedSequences`: the packed target-token
stream of the training corpus, in a seeded order that is a pure function of the global sequence index
(no shuffling in the dataloader: a ``SequentialSampler`` keeps the dataset's order). Stage 1 reads
sequences ``[0, steps_stage1 * global_batch)``; stage 2 starts at ``train_start_idx_stage2`` or, by
default, where stage 1 stopped (read from stage 1's ``data_state.json``), whatever the number of GPUs.

Outputs (``out``):
  ``model/``            the trained model (LoRA merged) with the target tokenizer, safetensors, float32
  ``log_history.json``  list of {step, loss, lr, grad_norm, tokens_seen, passes[, eval_bpb, eval_bpb_ci95]}
  ``data_state.json``   {start_idx, end_idx, n_blocks, seq_len, global_batch, passes, seed}
  ``resume.json``       {resumed, step, checkpoint}: the checkpoint this (last) run continued from, if any
  ``checkpoints/``      only while training: a crashed stage resumes from the latest ``checkpoint-*``;
                        removed after success unless ``train.keep_checkpoints`` is set
Stage 2 also hard-links (or copies) its model to ``<run dir>/adapted_model``.

The loss is ``train.objective``'s: next-token (``lm``), chunk-likelihood distillation from the source model under its
own tokenizer (``distill``: ``tokalign/distill.py``), or a mix of the two.

A loss or gradient norm that turns NaN/inf stops the stage with :class:`TrainingDivergedError`
before the optimizer applies it, so the last checkpoint stays good. The Trainer subclass and the
logging/eval callback that do this live in ``tokalign/hf_trainer.py``.

What differs between the stages is one ``TrainSpec`` each (``STAGE1``, ``STAGE2``: which model it
continues, what trains, where its data starts); ``train_stage`` reads like the steps it takes:
inputs, trainable parameters, arguments, data, in-training evaluation, train, save, metrics.

Run alone (the pipeline caches the stages before it):  python -m tokalign steps_stage1=200 lr_stage1=5e-5
                                                       python -m tokalign train.objective=distill
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from tokalign import refs
from tokalign.artifacts import curve_texts, link_or_copy_tree, load_stream
from tokalign.config import Config
from tokalign.context import Context
from tokalign.data import PackedSequences, pack_blocks
from tokalign.errors import TokalignError
from tokalign.metrics import bits_per_byte
from tokalign.stats import bpb_interval
from tokalign.modelfacts import device_and_precision, is_tied
from tokalign.trainer import TrainingDivergedError, checkpoints

__all__ = ["STAGE1", "STAGE2", "TrainInputError", "TrainSpec", "TrainingDivergedError", "checkpoints", "run_stage1",
           "run_stage2", "train_stage", "training_arguments"]

log = logging.getLogger(__name__)



class TrainInputError(TokalignError, ValueError):
    """A training stage's input (an upstream folder or a checkpoint) is missing or malformed."""


# ----------------------------------------------------------------------------------------------------------------------
# what differs between the two stages

def _embeddings_and_head(model: Any, cfg: Config) -> tuple[Any, str]:
    """Stage 1: only the input embeddings and the output head train (one matrix when tied)."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.get_input_embeddings().weight.requires_grad_(True)
    if model.get_output_embeddings() is not None:
        model.get_output_embeddings().weight.requires_grad_(True)
    return model, "embeddings + head"


def _whole_model_or_lora(model: Any, cfg: Config) -> tuple[Any, str]:
    """Stage 2: every weight, or (``stage2_use_lora``) LoRA adapters plus the embedding and head rows."""
    if not cfg.stage2_use_lora:
        for p in model.parameters():
            p.requires_grad_(True)
        return model, "all"
    from peft import LoraConfig, get_peft_model

    tc, tied = cfg.train, is_tied(model)
    to_save = [_module_name(model, model.get_input_embeddings()).split(".")[-1]]
    head = model.get_output_embeddings()
    if head is not None and not tied:
        to_save.append(_module_name(model, head).split(".")[-1])
    lora_kwargs = dict(r=tc.lora_r, lora_alpha=tc.lora_alpha, lora_dropout=tc.lora_dropout,
                       target_modules=list(tc.lora_target_modules), modules_to_save=to_save, task_type="CAUSAL_LM")
    if tied:
        lora_kwargs["ensure_weight_tying"] = True  # embedding and head stay one trainable matrix
    return get_peft_model(model, LoraConfig(**lora_kwargs)), "LoRA + embeddings"


def _stage1_start(cfg: Config, ctx: Context, global_batch: int) -> int:
    return 0


def _stage2_start(cfg: Config, ctx: Context, global_batch: int) -> int:
    """``train_start_idx_stage2``, else where stage 1 stopped (its ``data_state.json``), else after its steps."""
    if cfg.train_start_idx_stage2 >= 0:
        return int(cfg.train_start_idx_stage2)
    state = ctx.path("train_stage1") / "data_state.json" if ctx.has("train_stage1") else None
    if state is not None and state.is_file():
        return int(json.loads(state.read_text())["end_idx"])
    return int(cfg.steps_stage1) * global_batch


@dataclass(frozen=True)
class TrainSpec:
    """One training stage: its names, its budget in the config, the model it continues, what trains, where its data
    starts, and whether its model is the run's adapted model."""

    name: str  # pipeline stage: train_stage1
    ns: str  # metric namespace: stage1
    steps: Callable[[Config], int]  # optimizer steps
    lr: Callable[[Config], float]  # peak learning rate
    continues: tuple[str, ...]  # upstream stages whose model/ it starts from, the first that ran
    trainable: Callable[[Any, Config], tuple[Any, str]]  # sets requires_grad (may wrap the model); returns a label
    start: Callable[[Config, Context, int], int]  # first global sequence index, given the global batch
    adapted_model: bool  # its model is linked to <run dir>/adapted_model


STAGE1 = TrainSpec("train_stage1", "stage1", lambda c: c.steps_stage1, lambda c: c.lr_stage1, ("init",),
                   _embeddings_and_head, _stage1_start, adapted_model=False)
STAGE2 = TrainSpec("train_stage2", "stage2", lambda c: c.steps_stage2, lambda c: c.lr_stage2, ("train_stage1", "init"),
                   _whole_model_or_lora, _stage2_start, adapted_model=True)
SPECS = {1: STAGE1, 2: STAGE2}


# ----------------------------------------------------------------------------------------------------------------------
# helpers

def lr_scheduler_args(cfg: Config, steps: int) -> tuple[str, dict]:
    """transformers' ``lr_scheduler_type`` and ``lr_scheduler_kwargs`` for ``cfg.lr_schedule`` over ``steps``
    (the warmup, ``cfg.lr_schedule.warmup_ratio`` of the steps, is passed separately as ``warmup_steps``);
    ``lr_schedule.name`` is one of ``LR_SCHEDULES`` (checked by the config)."""
    s = cfg.lr_schedule
    min_ratio = float(s.min_lr_ratio)
    if s.name == "cosine":
        return ("cosine_with_min_lr", {"min_lr_rate": min_ratio}) if min_ratio > 0 else ("cosine", {})
    if s.name == "linear":
        if min_ratio > 0:
            log.info("lr_schedule.min_lr_ratio is not supported by the linear schedule: it decays to 0")
        return "linear", {}
    if s.name == "constant":
        return "constant_with_warmup", {}
    return "warmup_stable_decay", {"num_decay_steps": int(round(steps * s.decay_ratio)), "min_lr_ratio": min_ratio}


def _module_name(model, module) -> str:
    for name, mod in model.named_modules():
        if mod is module:
            return name
    raise RuntimeError("module not found in the model")


def _warmup_args(args_cls, ratio: float) -> dict:
    """Warmup as a share of the steps: ``warmup_ratio`` where this transformers version has it, else a float
    ``warmup_steps`` below 1 (transformers 5 reads that as a share)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(args_cls)}
    return {"warmup_ratio": float(ratio)} if "warmup_ratio" in names else {"warmup_steps": float(ratio)}


def _checkpointing_args(args_cls, on: bool) -> dict:
    """Activation checkpointing switches under the name this transformers version uses."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(args_cls)}
    key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {key: bool(on), f"{key}_kwargs": {"use_reentrant": False} if on else None}


def _distributed_args(cfg, model, use_cuda: bool) -> dict:
    """DDP (gloo on CPU, NCCL on GPU), FSDP full-shard, or DeepSpeed ZeRO-3, by ``hardware.distributed``;
    only used when this process is one of several (a child of torchrun, see ``tokalign/distributed.py``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return {}
    kind = cfg.hardware.distributed
    if kind == "fsdp":
        layers = sorted(getattr(model, "_no_split_modules", None) or [])
        return {"fsdp": "full_shard auto_wrap",
                "fsdp_config": {"transformer_layer_cls_to_wrap": layers, "use_orig_params": True}}
    if kind == "deepspeed_zero3":
        return {"deepspeed": {
            "zero_optimization": {"stage": 3, "overlap_comm": True, "stage3_gather_16bit_weights_on_model_save": True},
            "bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}}
    return {"ddp_backend": "nccl" if use_cuda else "gloo", "ddp_find_unused_parameters": False}


# ----------------------------------------------------------------------------------------------------------------------
# the steps of a training stage

@dataclass
class _Inputs:
    model_dir: Path  # the model it continues
    tok_dir: Path  # the tokenize stage's folder
    tokenizer: Any
    eos_id: int
    model: Any
    ids: np.ndarray  # the target token stream
    offsets: np.ndarray


def _inputs(cfg: Config, ctx: Context, spec: TrainSpec) -> _Inputs:
    """The model this stage continues, its tokenizer and the target token stream, checked against each other."""
    ran = [s for s in spec.continues if ctx.has(s)]
    model_dir = ctx.path(ran[0] if ran else spec.continues[-1]) / "model"  # none ran: the error names the last
    if not (model_dir / "config.json").is_file():
        raise TrainInputError(f"{model_dir}: expected a Hugging Face model folder (config.json missing)")
    tok_dir = ctx.path("tokenize")
    tokenizer = refs.load_tokenizer(str(model_dir))
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise TrainInputError(f"{model_dir}: the tokenizer has no EOS token (needed between packed documents)")
    model = refs.load_model(str(model_dir), dtype="float32", attn_implementation=cfg.hardware.attn_implementation)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids, offsets = load_stream(tok_dir, "target")
    if len(ids) and int(np.max(ids)) >= vocab:
        raise TrainInputError(f"{Path(tok_dir) / 'target_ids.npy'}: token id {int(np.max(ids))} is outside the "
                              f"model's vocabulary of {vocab} rows ({model_dir})")
    if eos_id >= vocab:
        raise TrainInputError(f"{model_dir}: EOS id {eos_id} is outside the model's vocabulary of {vocab} rows")
    return _Inputs(model_dir, Path(tok_dir), tokenizer, eos_id, model, ids, offsets)


def _distiller(cfg: Config, ctx: Context, tokenizer: Any, device: Any) -> Any:
    """The teacher and chunking of ``train.objective=distill``/``mix`` (None for ``lm``): the source model under its
    own tokenizer, frozen (``tokalign/distill.py``)."""
    if cfg.train.objective == "lm":
        return None
    from tokalign import distill
    from tokalign.metrics import start_token_id

    src = ctx.path("source") / "model"
    teacher = refs.load_model(str(src), dtype=cfg.hardware.dtype, device=str(device),
                              attn_implementation=cfg.hardware.attn_implementation).eval()
    teacher.requires_grad_(False)
    teacher_tok = refs.load_tokenizer(str(src))
    weight = 1.0 if cfg.train.objective == "distill" else cfg.train.distill_weight
    store = None
    if cfg.train.teacher_cache:
        root = distill.teacher_scores_root(cfg.cache_dir, ctx.path("source"), ctx.path("tokenize"), cfg.hardware.dtype)
        store = distill.TeacherScores(root)
        log.info("teacher scores kept in %s", root)
    return distill.Distiller(teacher, teacher_tok, distill.token_bytes(tokenizer), start_token_id(teacher_tok), weight,
                             store=store)


def _make_trainable(model: Any, cfg: Config, spec: TrainSpec) -> tuple[Any, int]:
    """The model with this stage's parameters trainable (wrapped for LoRA), and how many parameters train."""
    model, label = spec.trainable(model, cfg)
    n_train = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
    n_total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    log.info("[%s] %s trainable parameters of %s (%s)", spec.name, f"{n_train:,}", f"{n_total:,}", label)
    return model, n_train


def training_arguments(cfg: Config, spec: TrainSpec, out: Path, model: Any = None, use_cuda: bool = False,
                       bf16: bool = False):
    """transformers' ``TrainingArguments`` of this stage: schedule and warmup, precision, checkpoints every
    ``train.save_steps`` into ``out/checkpoints``, and the distributed backend when under torchrun."""
    from transformers import TrainingArguments

    tc, steps = cfg.train, int(spec.steps(cfg))
    sched, sched_kwargs = lr_scheduler_args(cfg, steps)
    return TrainingArguments(
        output_dir=str(Path(out) / "checkpoints"),
        max_steps=steps,
        per_device_train_batch_size=tc.micro_batch_size,
        gradient_accumulation_steps=tc.grad_accum,
        learning_rate=float(spec.lr(cfg)),
        weight_decay=tc.weight_decay,
        max_grad_norm=tc.max_grad_norm,
        lr_scheduler_type=sched,
        lr_scheduler_kwargs=sched_kwargs,
        **_warmup_args(TrainingArguments, cfg.lr_schedule.warmup_ratio),
        optim="adamw_torch_fused" if use_cuda else "adamw_torch",
        logging_steps=tc.logging_steps,
        logging_nan_inf_filter=False,
        save_strategy="steps",
        save_steps=tc.save_steps,
        save_total_limit=2,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=bf16,
        tf32=bool(cfg.hardware.tf32) if use_cuda else None,
        use_cpu=not use_cuda,
        **_checkpointing_args(TrainingArguments, tc.gradient_checkpointing),
        torch_compile=tc.compile,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=use_cuda,
        eval_strategy="no",
        disable_tqdm=False,
        **_distributed_args(cfg, model, use_cuda),
    )


def _data(cfg: Config, ctx: Context, spec: TrainSpec, inp: _Inputs, world_size: int) -> tuple[PackedSequences, dict]:
    """This stage's sequences of the packed stream (``spec.start`` on, ``steps x global batch`` of them) and the
    ``data_state.json`` record of them."""
    tc = cfg.train
    global_batch = tc.micro_batch_size * tc.grad_accum * world_size
    blocks = pack_blocks(inp.ids, inp.offsets, inp.eos_id, tc.seq_len, source=str(inp.tok_dir / "target_ids.npy"))
    start_idx = spec.start(cfg, ctx, global_batch)
    dataset = PackedSequences(blocks, cfg.seed, start_idx, int(spec.steps(cfg)) * global_batch)
    log.info("[%s] %d packed blocks of %d tokens; sequences %d..%d (global batch %d = %d x %d x %d processes); "
             "%.2f passes", spec.name, dataset.n_blocks, tc.seq_len, start_idx, start_idx + len(dataset) - 1,
             global_batch, tc.micro_batch_size, tc.grad_accum, world_size, dataset.passes)
    state = {"start_idx": start_idx, "end_idx": start_idx + len(dataset), "n_blocks": dataset.n_blocks,
             "seq_len": tc.seq_len, "global_batch": global_batch, "passes": dataset.passes, "seed": cfg.seed}
    return dataset, state


def _eval_fn(cfg: Config, ctx: Context, spec: TrainSpec, tokenizer: Any, args: Any,
             bf16: bool) -> Optional[Callable[[Any], dict]]:
    """Bits per byte (with its 95% interval) on a few dev documents, for the in-training recovery curve (None when
    there are none)."""
    import torch

    texts = curve_texts(ctx.path("corpus"), cfg.eval.max_eval_samples, cfg.eval.max_doc_bytes)
    if not texts:
        log.info("[%s] no dev texts (corpus/dev.jsonl missing or empty): no bits per byte during training", spec.name)
        return None

    def eval_fn(model: Any) -> float:
        device = args.device
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                res = bits_per_byte(model, tokenizer, texts, seq_len=cfg.eval.seq_len, stride=cfg.eval.stride,
                                    batch_size=cfg.eval.batch_size, device=device, progress=False)
            value, ci = bpb_interval(res["doc_bits"], res["doc_bytes"], cfg.seed)
            return {"bpb": float(value), "ci95": ci}
        finally:
            if was_training:
                model.train()

    return eval_fn


def _resume_point(ckpt_dir: Path, explicit: Optional[str]) -> Optional[str]:
    """The checkpoint to continue from: ``explicit`` (an error if it is not one), else the latest complete one."""
    if explicit is not None:
        if not (Path(explicit) / "trainer_state.json").is_file():
            raise TrainInputError(f"{explicit}: no such checkpoint (expected a checkpoint-<step> folder "
                                  "with trainer_state.json)")
        return str(explicit)
    found = checkpoints(ckpt_dir)
    return str(found[-1]) if found else None


def _save(model: Any, tokenizer: Any, out: Path, cfg: Config, ctx: Context, spec: TrainSpec,
          use_cache: Optional[bool]) -> None:
    """The trained model (LoRA merged, uncompiled, KV cache setting restored) and tokenizer into ``out/model``;
    the adapted model is linked to ``<run dir>/adapted_model``; the checkpoints go last (a crash before here
    resumes from them)."""
    if hasattr(model, "merge_and_unload"):  # a PEFT (LoRA) model
        model = model.merge_and_unload()
    if hasattr(model, "_orig_mod"):  # torch.compile's wrapper
        model = model._orig_mod
    model_out = out / "model"
    if model_out.exists():
        shutil.rmtree(model_out)
    if use_cache is not None:
        model.config.use_cache = use_cache
    model.save_pretrained(str(model_out))
    tokenizer.save_pretrained(str(model_out))
    if spec.adapted_model:
        adapted = Path(ctx.run_dir) / "adapted_model"
        link_or_copy_tree(model_out, adapted)
        if cfg.wandb.log_model:
            ctx.tracker.artifact("adapted_model", "model", [adapted])
    if not cfg.train.keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)


def _metrics(spec: TrainSpec, trainer: Any, cb: Any, hist: list[dict], data_state: dict, n_train: int,
             train_seconds: float, t_start: float) -> dict:
    """``<ns>/final_loss, steps, tokens_seen, tokens_per_s`` (eval time excluded), ``passes, start_idx,
    trainable_params, seconds`` and the last in-training ``eval_bpb``."""
    ns, tokens_per_step = spec.ns, data_state["global_batch"] * data_state["seq_len"]
    steps = int(trainer.state.global_step)
    losses = [h["loss"] for h in hist if "loss" in h]
    metrics = {
        f"{ns}/final_loss": float(losses[-1]) if losses else float("nan"),
        f"{ns}/steps": steps,
        f"{ns}/tokens_seen": int(steps * tokens_per_step),
        f"{ns}/tokens_per_s": (steps - cb.step_begin) * tokens_per_step / max(train_seconds - cb.eval_seconds, 1e-9),
        f"{ns}/passes": float(data_state["passes"]),
        f"{ns}/start_idx": int(data_state["start_idx"]),
        f"{ns}/trainable_params": int(n_train),
        f"{ns}/seconds": time.time() - t_start,
    }
    if cb.last_bpb is not None:
        metrics[f"{ns}/eval_bpb"] = float(cb.last_bpb)
    last = getattr(getattr(trainer, "distiller", None), "last", None)
    if last:  # the last batch's parts of a distill/mix loss
        metrics.update({f"{ns}/{k}": v for k, v in last.items() if v is not None})
    return metrics


# ----------------------------------------------------------------------------------------------------------------------
# the stage

def train_stage(cfg: Config, ctx: Context, out: Path, spec: TrainSpec, *, callbacks: Sequence[Any] = (),
                resume_from_checkpoint: Optional[str] = None) -> dict:
    """Run the training stage ``spec`` (``STAGE1`` or ``STAGE2``) into ``out``; returns ``stage<k>/…`` metrics.

    ``callbacks``: extra ``TrainerCallback`` objects (tests use them to interrupt a run).
    ``resume_from_checkpoint``: a checkpoint folder to continue from (an error if it does not exist);
    by default the latest complete ``out/checkpoints/checkpoint-*`` is resumed when there is one.
    """
    import transformers
    from transformers import default_data_collator

    from tokalign.hf_trainer import OrderedTrainer, StageCallback

    out, t_start = Path(out), time.time()
    out.mkdir(parents=True, exist_ok=True)
    use_cuda, bf16 = device_and_precision(cfg.hardware)
    transformers.set_seed(cfg.seed)
    inp = _inputs(cfg, ctx, spec)
    use_cache = getattr(inp.model.config, "use_cache", None)  # not every architecture has the flag
    if use_cache is not None:
        inp.model.config.use_cache = False  # no KV cache while training; restored in the saved config
    model, n_train = _make_trainable(inp.model, cfg, spec)
    args = training_arguments(cfg, spec, out, model, use_cuda, bf16)
    dataset, data_state = _data(cfg, ctx, spec, inp, args.world_size)
    tokens_per_step = data_state["global_batch"] * cfg.train.seq_len

    ctx.tracker.define_step(spec.ns)
    cb = StageCallback(ns=spec.ns, tracker=ctx.tracker, tokens_per_step=tokens_per_step,
                       start_idx=data_state["start_idx"], global_batch=data_state["global_batch"],
                       n_blocks=dataset.n_blocks, eval_fn=_eval_fn(cfg, ctx, spec, inp.tokenizer, args, bf16),
                       eval_steps=cfg.train.eval_steps)
    trainer = OrderedTrainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator,
                             callbacks=[cb, *callbacks])
    trainer.stage_name = spec.name
    trainer.distiller = _distiller(cfg, ctx, inp.tokenizer, args.device)
    # Under torchrun every rank runs this function on the same ``out``: only rank 0 writes there (two ranks
    # writing, and one removing ``model/`` while the other saves it, made the 2-process test fail at random).
    main = trainer.is_world_process_zero()
    resume = _resume_point(out / "checkpoints", resume_from_checkpoint)
    if resume:
        log.info("[%s] resuming from %s", spec.name, resume)
    if main:
        step = int(json.loads((Path(resume) / "trainer_state.json").read_text()).get("global_step", 0)) if resume else 0
        (out / "resume.json").write_text(json.dumps({"resumed": bool(resume), "step": step,
                                                     "checkpoint": Path(resume).name if resume else None}))

    def write_history() -> list[dict]:
        hist = _history(trainer.state.log_history, tokens_per_step, data_state["start_idx"],
                        data_state["global_batch"], dataset.n_blocks)
        if main:
            (out / "log_history.json").write_text(json.dumps(hist, indent=1))
        return hist

    t_train = time.time()
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        write_history()
    train_seconds = time.time() - t_train
    hist = write_history()
    if main:
        (out / "data_state.json").write_text(json.dumps(data_state, indent=1))
        _save(trainer.model, inp.tokenizer, out, cfg, ctx, spec, use_cache)
    trainer.accelerator.wait_for_everyone()  # no rank leaves before the model is saved

    metrics = _metrics(spec, trainer, cb, hist, data_state, n_train, train_seconds, t_start)
    log.info("[%s] done: %s", spec.name, {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
    return metrics


def _history(log_history: list[dict], tokens_per_step: int, start_idx: int, global_batch: int,
             n_blocks: int) -> list[dict]:
    """Trainer log entries merged per step into {step, loss, lr, grad_norm, tokens_seen, passes[, eval_bpb]}."""
    by_step: dict[int, dict] = {}
    for e in log_history:
        step = int(e.get("step", 0))
        rec = by_step.setdefault(step, {"step": step, "tokens_seen": step * tokens_per_step,
                                        "passes": (start_idx + step * global_batch) / n_blocks})
        if "loss" in e:
            rec["loss"] = float(e["loss"])
            rec["lr"] = float(e.get("learning_rate", float("nan")))
            if e.get("grad_norm") is not None:
                rec["grad_norm"] = float(e["grad_norm"])
        if "eval_bpb" in e:
            rec["eval_bpb"] = float(e["eval_bpb"])
            if e.get("eval_bpb_ci95") is not None:
                rec["eval_bpb_ci95"] = [float(x) for x in e["eval_bpb_ci95"]]
    return [by_step[s] for s in sorted(by_step) if len(by_step[s]) > 3]


def run_stage1(cfg: Config, ctx: Context, out: Path) -> dict:
    """Stage 1: train only the input embeddings and the output head (one matrix when tied)."""
    return train_stage(cfg, ctx, out, STAGE1, resume_from_checkpoint=cfg.train.resume_from_checkpoint)


def run_stage2(cfg: Config, ctx: Context, out: Path) -> dict:
    """Stage 2: train the whole model, or LoRA adapters plus the embedding/head rows (``stage2_use_lora``)."""
    return train_stage(cfg, ctx, out, STAGE2, resume_from_checkpoint=cfg.train.resume_from_checkpoint)
