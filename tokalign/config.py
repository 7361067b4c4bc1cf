"""Typed configuration: the schema every YAML file in ``conf/`` is checked against.

Each dataclass field carries a one-line docstring-style comment; ``__post_init__`` validates
values so a wrong setting fails at start with a message naming the key. The schemas are
registered in Hydra's ConfigStore (``register_configs``) and ``conf/config.yaml`` lists the
schema first in its defaults, so an unknown key or a wrong type is rejected by OmegaConf
before any stage runs.

How the defaults that affect quality were chosen (none on the evaluation documents):

* measured on the dev split (``eval.split=dev``: a stable-hash share of the training corpus kept out
  of training) with ``scripts/tune_dev.py``, results in ``scripts/results/``:
  ``alignment.unseen_scale=0.8`` (best of 0.6-1.0 on the demo's 66 dev abstracts: 1.1413 bits per byte,
  0.7 and 0.9 worse by +0.0049 and +0.0077 with paired intervals excluding 0; ``python scripts/tune_dev.py --key
  alignment.unseen_scale --values 0.6,0.7,0.8,0.9,1.0``, ``scripts/results/tune_unseen_scale.json``);
  ``alignment.piece_weights="bytes"`` (ours' piece compositions weigh each piece by its length in bytes; FVT's plain
  mean against it on the 66 dev abstracts of three target families, mean minus bytes: Qwen2 1.1413 - 1.1264 = +0.0150
  [+0.0118, +0.0184], Llama-3 +0.0157 [+0.0122, +0.0195], Llama-2 SPM +0.0026 [+0.0006, +0.0047]
  bits per byte; a rule with no constant, taken because it held on all three; ``new_rows`` below was chosen earlier,
  with the plain mean; ``unseen_scale`` above was, and rechecked with the byte weights: 0.8 stays best, 0.7 and 0.9
  worse by +0.0062 [+0.0037, +0.0091] and +0.0044 [+0.0015, +0.0070], ``scripts/results/tune_unseen_scale_bytes.json``;
  ``python scripts/tune_dev.py --key alignment.piece_weights
  --values mean,bytes --overrides "target_tokenizer=${assets:tokenizers/ggml-vocab-<family>.gguf}"``,
  ``scripts/results/tune_piece_weights_*.json``);
  ``alignment.new_rows="fvt"`` (ours keeps FVT rows for new tokens with a vector: on the 66 dev abstracts fvt
  1.1413, focus +0.0408 [+0.0315, +0.0507], omp +0.1981 [+0.1727, +0.2280] bits per byte; ``python
  scripts/tune_dev.py --key alignment.new_rows --values fvt,focus,omp``, ``scripts/results/tune_new_rows.json``;
  with 0.58 MB of text the target-side fastText space is too noisy for either; rerun it on your corpus);
  ``alignment.output_rows="tied"`` (ours' output rows of new multi-piece tokens follow the input rows; ``fit``, the
  first piece's output row plus a ridge fit to the source's log-probability of the rest, on an untied head, lost on
  the 66 dev abstracts of the Qwen2 run: 1.6957 against 1.1264 bits per byte, +0.5693 [+0.5348, +0.6052]; ``python
  scripts/tune_dev.py --key alignment.output_rows --values tied,fit``, ``scripts/results/tune_output_rows.json``;
  ``output_fit_tokens`` and ``output_ridge`` are ``extend``'s hand-set values, not tuned);
  ``alignment.calibrate=true`` and ``alignment.calibrate_k=1.0`` (the unigram calibration of ours' output rows,
  ``tokalign/calibrate.py``: on the 66 dev abstracts of the Qwen2 run off 1.1264, on 1.1120, off minus on +0.0144
  [+0.0125, +0.0164] bits per byte; ``python scripts/tune_dev.py --key alignment.calibrate --values false,true``,
  ``scripts/results/tune_calibrate.json``; ``calibrate_k`` 0.5 +0.0009 [-0.0001, +0.0019], 1.0 best, 3.0 +0.0050
  [+0.0039, +0.0061]; ``python scripts/tune_dev.py --key alignment.calibrate_k --values 0.5,1.0,3.0``,
  ``scripts/results/tune_calibrate_k.json``; checked on a second family, the Llama-3 dev split: off minus on +0.0423
  [+0.0367, +0.0481], ``scripts/results/tune_calibrate_llama3.json``; ``calibrate_positions=4000`` sized for time;
  16,000 is better on the dev splits, 4000 minus 16000 Qwen2 +0.0037 [+0.0029, +0.0045], Llama-3 +0.0035 [+0.0026,
  +0.0044] (``python scripts/tune_dev.py --key alignment.calibrate_positions --values 4000,16000``, with the Llama-3
  override for the second, ``scripts/results/tune_calibrate_positions*.json``), for 55 s instead of about 14 s on 2
  cores, so research mode sets 16,000 and the default stays 4,000 for the smoke run's time);
  ``alignment.absorb=true`` and ``alignment.absorb_ridge=1000`` (each target token that starts the target's spelling
  of source tokens it lacks takes their probability too, ``tokalign/absorb.py``: on the 66 dev abstracts of the Qwen2
  run off 1.1120, on 1.1015, off minus on +0.0104 [+0.0078, +0.0134]; ``python scripts/tune_dev.py --key
  alignment.absorb --values false,true``, ``scripts/results/tune_absorb.json``; ridge 300 +0.0020 [+0.0006,
  +0.0037], 1000 best, 3000 +0.0015 [+0.0005, +0.0025], ``--key alignment.absorb_ridge --values 300,1000,3000``,
  ``scripts/results/tune_absorb_ridge.json``; checked on a second family, the Llama-3 dev split: off minus on
  +0.0101 [+0.0073, +0.0130], ``scripts/results/tune_absorb_llama3.json``; ``absorb_positions=20000`` sized for
  time, not tuned);
  ``alignment.refine_steps=0`` (off: Adam steps of the next-token loss on the rows of the new tokens the training
  text holds, before the calibration, did not help on the 66 dev abstracts of the Qwen2 run: 100 steps at 6e-3
  1.1270 against 1.1120 with none, +0.0151 [+0.0079, +0.0225], ``python scripts/tune_dev.py --key
  alignment.refine_steps --values 0,100``, ``scripts/results/tune_refine_steps.json``; at 1.5e-3 1.1165, at 3e-4
  1.1120, +0.0045 [+0.0021, +0.0070] between them (``--key alignment.refine_lr --values 3e-4,1.5e-3 --overrides
  alignment.refine_steps=100``, ``scripts/results/tune_refine_lr.json``), and 3e-4 minus none +0.0000 [-0.0013,
  +0.0014]: a tie at best; ``refine_lr=6e-3`` is ``extend``'s rate, kept as the key's default);
  ``domain_vocab.init_steps=400`` (method ``extend``, ``experiment=domain_vocab``, 300 new tokens: on the 66 dev
  abstracts, whole, 0 steps 1.1911, 50 steps 1.1054, 150 steps 1.0753 bits per byte, the paired differences to 150
  +0.1159 [+0.1063, +0.1255] and +0.0301 [+0.0245, +0.0364], ``python scripts/tune_dev.py --key
  domain_vocab.init_steps --values 0,50,150 --method extend --overrides "experiment=domain_vocab
  init_methods=[extend]"``, ``scripts/results/tune_extend_steps.json``; then 150 steps 1.0763, 400 steps 1.0552,
  150 minus 400 +0.0210 [+0.0173, +0.0247], the same command with ``--values 150,400``,
  ``scripts/results/tune_extend_steps_400.json``; the source scores 0.9587 there; then 400 steps 1.0554, 800 steps
  1.0526, 400 minus 800 +0.0028 [-0.0011, +0.0072], ``--values 400,800``,
  ``scripts/results/tune_extend_steps_800.json``: no gain the interval shows, for twice the time (each 100 steps
  cost about 3 minutes on 2 cores), so 400 stays; all of these with a constant learning rate);
  ``domain_vocab.init_schedule="cosine"`` (the same 66 dev abstracts, 400 steps: constant 1.0554, cosine 1.0411,
  constant minus cosine +0.0143 [+0.0109, +0.0181]; ``python scripts/tune_dev.py --key
  domain_vocab.init_schedule --values constant,cosine --method extend --overrides "experiment=domain_vocab
  init_methods=[extend]"``, ``scripts/results/tune_extend_schedule.json``);
  ``domain_vocab.init_objective="awedist_lm"`` (the steps' next-token loss plus, for the input rows, AweDist's
  hidden-state loss; first the next-token loss alone, ``lm``, against
  ``distill``, each chunk's likelihood pulled to the source model's, lost on the same 66 dev abstracts: lm 1.0763,
  distill 1.0841, +0.0079 [+0.0045, +0.0115]; ``python scripts/tune_dev.py --key domain_vocab.init_objective
  --values lm,distill --method extend --overrides "experiment=domain_vocab init_methods=[extend]
  domain_vocab.init_steps=150"``,
  ``scripts/results/tune_extend_objective.json``; then with 400 cosine steps at 6e-3 against ``awedist``, AweDist's
  hidden-state distillation for the input rows: lm 1.0359, awedist 1.0359, +0.0001 [-0.0023, +0.0024], a tie
  (``--values lm,awedist``, ``scripts/results/tune_extend_awedist.json``); then ``awedist_lm``, both losses for the
  input rows: lm 1.0359, awedist_lm 1.0300, lm minus awedist_lm +0.0059 [+0.0043, +0.0076], so awedist_lm is the
  default (``--values lm,awedist_lm``, ``scripts/results/tune_extend_awedist_lm.json``; the steps, rate and
  schedule below were chosen with lm and kept)); ``domain_vocab.init_lr=6e-3`` (the same 66 dev abstracts, 400
  steps; with a constant rate 3e-3 1.0554, 1e-2 1.1753, +0.1199 [+0.1099, +0.1306], ``python scripts/tune_dev.py
  --key domain_vocab.init_lr --values 3e-3,1e-2 --method extend --overrides "experiment=domain_vocab
  init_methods=[extend]"``, ``scripts/results/tune_extend_lr.json``; then with the cosine decay 3e-3 1.0411, 6e-3
  1.0359, 3e-3 minus 6e-3 +0.0052 [+0.0035, +0.0070], ``--values 3e-3,6e-3`` with
  ``domain_vocab.init_schedule=cosine`` added to the overrides, ``scripts/results/tune_extend_lr_cosine.json``;
  and 6e-3 1.0359, 1e-2 1.0502, 1e-2 minus 6e-3 +0.0143 [+0.0116, +0.0171], ``--values 6e-3,1e-2``,
  ``scripts/results/tune_extend_lr_cosine_1e-2.json``); ``init_fit_tokens`` was set by hand, not tuned;
* taken from the published methods, not tuned here: ``alignment.focus_k=64`` (FOCUS's sparsemax is exact up to
  64 neighbours; the demo's supports fill all 64, logged as ``focus_truncated``), ``alignment.omp_k=8`` (a small sparse
  support, not tuned), ``alignment.sparse_candidates=256`` (sized for time: one top-256 search per new token);
* measured on PubMedQA *training*-split questions with ``scripts/choose_pubmedqa_format.py``:
  ``eval.pubmedqa_format="context"`` (highest macro-F1 of the three formats on 90 questions; ``chat``
  had higher accuracy only by answering "yes" to 88 of 90, the majority class);
* taken from the TokAlign paper, not tuned here: ``similarity_threshold``, ``pivot_count`` (research),
  ``lr_stage2`` (research), the fastText settings of the research modes;
* ``lr_stage1=5e-5`` in ``mode=research`` (the paper's 6.4e-4 before): the dev split's recovery curve of the sweep
  ``lr_stage1=2e-5,5e-5,6.4e-4 train.objective=lm,distill`` (32 CPU steps; README "The stage-1 learning rate",
  ``scripts/results/lr_sweep_cpu.json``);
* rules stated up front, not tuned: ``alignment.min_precision=0.5`` (align a token only where held-out
  gold pairs are found at least half the time), ``alignment.special_match="role"`` (asked for by an
  earlier issue), ``alignment.seen_scale=1.0`` (no scaling), CSLS scoring (less hubness, measured on
  random and training-corpus vectors, ``scripts/bench_align.py``);
* sized for time, not quality: smoke mode's ``eval.max_eval_samples=40``, ``eval.max_doc_bytes=400``,
  ``eval.pubmedqa_samples=30`` and training steps (the default run must take minutes on 2 cores).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from tokalign.errors import TokalignError

INIT_METHODS = ("random", "mean", "fvt", "focus", "omp", "tokalign_1to1", "tokalign", "extend")
CROSS_FAMILY_METHODS = INIT_METHODS[:-1]  # the default list: `extend` needs target_tokenizer=domain
LR_SCHEDULES = ("cosine", "linear", "constant", "wsd")
WANDB_MODES = ("online", "offline", "disabled")
SCORINGS = ("cos", "csls")
PUBMEDQA_FORMATS = ("context", "abstract", "chat")  # tokalign.metrics.pubmedqa_prompt


class ConfigError(TokalignError, ValueError):
    """A configuration value is invalid; the message names the key."""


def _check(cond: bool, key: str, expected: str, got: Any) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': expected {expected}, got {got!r}")


@dataclass
class EmbedConfig:
    """fastText skipgram settings for the token-ID streams (stage ``embed``)."""

    dim: int = 100  # embedding dimension
    epoch: int = 5  # passes over each token stream
    min_count: int = 2  # tokens seen fewer times get no vector (they fall back at alignment)
    lr: float = 0.05  # fastText learning rate
    thread: int = 1  # fastText threads; 1 makes the vectors bit-for-bit reproducible
    window: int = 5  # skipgram context window
    neg: int = 5  # negative samples
    max_tokens: int = 0  # tokens per stream fed to fastText (whole documents in a seeded random order); 0 = all

    def __post_init__(self) -> None:
        _check(self.max_tokens >= 0, "embed.max_tokens", ">= 0 (0 = the whole stream)", self.max_tokens)
        _check(self.dim > 0, "embed.dim", "> 0", self.dim)
        _check(self.epoch > 0, "embed.epoch", "> 0", self.epoch)
        _check(self.min_count >= 1, "embed.min_count", ">= 1", self.min_count)
        _check(self.lr > 0, "embed.lr", "> 0", self.lr)
        _check(self.thread >= 1, "embed.thread", ">= 1", self.thread)


@dataclass
class AlignmentConfig:
    """How target rows are chosen from source rows (stage ``align``)."""

    name: str = "tokalign"  # label of this alignment preset
    scoring: str = "csls"  # cos: plain cosine of relative representations; csls: hub-penalised
    csls_k: int = 10  # neighbourhood size for the CSLS hubness penalty
    top_k: int = 1  # aligned rows combined per target token (1 = best match only)
    temperature: float = 0.05  # softmax temperature over the top-k scores when top_k > 1
    block_size: int = 4096  # target rows scored per block (bounds peak memory)
    blend_fvt: float = 0.0  # weight of the piece composition mixed into aligned rows (0 = none)
    min_precision: float = 0.5  # align a token only above the margin at which held-out gold pairs are found this often (0 = off)
    seen_scale: float = 1.0  # scale of new (non-gold) rows for tokens the corpus produced
    unseen_scale: float = 0.8  # scale of new rows for tokens the corpus never produced (tied heads: less stolen mass); chosen on the dev split (module docstring)
    piece_weights: str = "bytes"  # ours' piece compositions: "mean" (FVT's plain mean) or "bytes" (each piece weighted by its length in bytes); chosen on the dev split (module docstring)
    special_match: str = "role"  # special tokens matched by role (bos->bos, eos->eos...), by name, or none (ablation)
    new_rows: str = "fvt"  # tokalign's rows for new tokens with a vector the similarity alignment left alone: fvt, focus or omp
    focus_k: int = 64  # FOCUS: sparsemax over the cosines to this many nearest overlapping tokens (target fastText space)
    omp_k: int = 8  # OMP: overlapping tokens combined per new token (orthogonal matching pursuit, least squares)
    sparse_candidates: int = 256  # FOCUS/OMP: nearest overlapping tokens searched per new token (bounds time and memory)
    output_rows: str = "tied"  # ours' output rows of new multi-piece tokens: "tied" (the rule of the input rows; a tied head stays tied) or "fit" (the first piece's output row plus a ridge fit to the source's log-probability of the rest, tokalign/output_rows.py; a tied head is untied); tied chosen on the dev split (module docstring)
    output_fit_tokens: int = 20000  # output_rows=fit: training positions (source tokenization) whose hidden states fit the rows
    output_ridge: float = 10.0  # output_rows=fit: ridge strength per 1,000 fitted positions
    calibrate: bool = True  # ours: lower each output row whose token the initialised model predicts more often than the training text (target tokenizer) holds it, by about the log of the ratio (tokalign/calibrate.py); chosen on the dev split (module docstring)
    calibrate_k: float = 1.0  # calibrate: the text's token frequencies are smoothed towards the model's own with this many pseudo-counts per text token; chosen on the dev split (module docstring)
    calibrate_positions: int = 4000  # calibrate: training positions (target tokenization) whose hidden states it reads
    absorb: bool = True  # ours: each target token that starts the target's spelling of source tokens it lacks takes their probability too (a ridge fit of the log-sum-exp, tokalign/absorb.py), after the calibration; chosen on the dev split (module docstring)
    absorb_ridge: float = 1000.0  # absorb: ridge strength per 1,000 positions, towards the row as it was; chosen on the dev split (module docstring)
    absorb_positions: int = 20000  # absorb: training positions (target tokenization) whose hidden states it reads
    refine_steps: int = 0  # ours: Adam steps, before the calibration, on the rows of new tokens the training text holds (every other row and the body frozen; next-token loss on 8 windows of 64 target tokens that hold one; tokalign/extend_rows.py's loop); 0 = off, chosen on the dev split (module docstring)
    refine_lr: float = 6e-3  # refine_steps: their peak learning rate, decayed to 0 along a cosine (extend's rate; 3e-4 ties with no steps on the dev split)
    reference_pairs: Optional[str] = None  # JSON {target id: source id} a reference alignment; align/bleu1 then scores against it instead of the source tokenization

    def __post_init__(self) -> None:
        _check(self.scoring in SCORINGS, "alignment.scoring", f"one of {SCORINGS}", self.scoring)
        _check(self.csls_k >= 1, "alignment.csls_k", ">= 1", self.csls_k)
        _check(self.top_k >= 1, "alignment.top_k", ">= 1", self.top_k)
        _check(self.temperature > 0, "alignment.temperature", "> 0", self.temperature)
        _check(self.block_size >= 1, "alignment.block_size", ">= 1", self.block_size)
        _check(0.0 <= self.blend_fvt <= 1.0, "alignment.blend_fvt", "in [0, 1]", self.blend_fvt)
        _check(0.0 <= self.min_precision <= 1.0, "alignment.min_precision", "in [0, 1]", self.min_precision)
        _check(self.seen_scale > 0 and self.unseen_scale > 0, "alignment.seen_scale/unseen_scale", "> 0",
               (self.seen_scale, self.unseen_scale))
        _check(self.piece_weights in ("mean", "bytes"), "alignment.piece_weights", "mean or bytes", self.piece_weights)
        _check(self.special_match in ("role", "name", "none"), "alignment.special_match", "role, name or none",
               self.special_match)
        _check(self.new_rows in ("fvt", "focus", "omp"), "alignment.new_rows", "fvt, focus or omp", self.new_rows)
        _check(self.output_rows in ("tied", "fit"), "alignment.output_rows", "tied or fit", self.output_rows)
        _check(self.output_fit_tokens >= 0, "alignment.output_fit_tokens", ">= 0", self.output_fit_tokens)
        _check(self.output_ridge > 0, "alignment.output_ridge", "> 0", self.output_ridge)
        _check(self.calibrate_k > 0, "alignment.calibrate_k", "> 0", self.calibrate_k)
        _check(self.calibrate_positions >= 1, "alignment.calibrate_positions", ">= 1", self.calibrate_positions)
        _check(self.absorb_ridge > 0, "alignment.absorb_ridge", "> 0", self.absorb_ridge)
        _check(self.absorb_positions >= 1, "alignment.absorb_positions", ">= 1", self.absorb_positions)
        _check(self.refine_steps >= 0, "alignment.refine_steps", ">= 0", self.refine_steps)
        _check(self.refine_lr > 0, "alignment.refine_lr", "> 0", self.refine_lr)
        _check(self.focus_k >= 1 and self.omp_k >= 1, "alignment.focus_k/omp_k", ">= 1", (self.focus_k, self.omp_k))
        _check(self.sparse_candidates >= max(self.focus_k, self.omp_k), "alignment.sparse_candidates",
               ">= alignment.focus_k and alignment.omp_k", self.sparse_candidates)


@dataclass
class HardwareConfig:
    """Where and how tensors are computed; applied before torch touches CUDA."""

    name: str = "cpu"  # profile label
    device: str = "cpu"  # torch device for model work: cpu or cuda
    dtype: str = "float32"  # training/eval precision: float32 or bfloat16
    tf32: bool = False  # allow TF32 matmuls on Ampere+ GPUs
    torch_threads: int = 2  # intra-op CPU threads (0 = torch default)
    tokenizer_workers: int = 2  # processes for the tokenize stage
    attn_implementation: str = "sdpa"  # eager, sdpa or flash_attention_2 (used when installed)
    min_gpu_memory_gb: float = 0.0  # preflight: free GPU memory wanted
    min_free_disk_gb: float = 2.0  # preflight: free disk wanted at the run and cache directories
    cuda_alloc_conf: str = ""  # PYTORCH_CUDA_ALLOC_CONF, set before CUDA initialises
    nproc_per_node: int = 1  # >1: training stages run as a child torchrun with this many processes
    distributed: str = "ddp"  # ddp, fsdp or deepspeed_zero3 (with nproc_per_node > 1)

    def __post_init__(self) -> None:
        _check(self.device in ("cpu", "cuda"), "hardware.device", "cpu or cuda", self.device)
        _check(self.dtype in ("float32", "bfloat16"), "hardware.dtype", "float32 or bfloat16", self.dtype)
        _check(self.tokenizer_workers >= 1, "hardware.tokenizer_workers", ">= 1", self.tokenizer_workers)
        _check(self.nproc_per_node >= 1, "hardware.nproc_per_node", ">= 1", self.nproc_per_node)
        _check(self.distributed in ("ddp", "fsdp", "deepspeed_zero3"), "hardware.distributed",
               "ddp, fsdp or deepspeed_zero3", self.distributed)
        _check(
            self.attn_implementation in ("eager", "sdpa", "flash_attention_2"),
            "hardware.attn_implementation",
            "eager, sdpa or flash_attention_2",
            self.attn_implementation,
        )


@dataclass
class LRScheduleConfig:
    """Learning-rate schedule shared by both training stages."""

    name: str = "cosine"  # cosine, linear, constant or wsd (warmup-stable-decay)
    warmup_ratio: float = 0.05  # share of a stage's steps spent warming up
    decay_ratio: float = 0.2  # wsd only: share of steps spent decaying at the end
    min_lr_ratio: float = 0.0  # cosine/wsd: final learning rate as a share of the peak

    def __post_init__(self) -> None:
        _check(self.name in LR_SCHEDULES, "lr_schedule.name", f"one of {LR_SCHEDULES}", self.name)
        _check(0.0 <= self.warmup_ratio < 1.0, "lr_schedule.warmup_ratio", "in [0, 1)", self.warmup_ratio)
        _check(0.0 <= self.decay_ratio <= 1.0, "lr_schedule.decay_ratio", "in [0, 1]", self.decay_ratio)


@dataclass
class TrainConfig:
    """Settings shared by the two training stages (the learning rates and steps are top level)."""

    seq_len: int = 256  # tokens per packed training sequence
    micro_batch_size: int = 4  # sequences per forward pass
    grad_accum: int = 1  # micro-batches per optimizer step
    weight_decay: float = 0.01  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    save_steps: int = 20  # checkpoint every N optimizer steps
    eval_steps: int = 0  # the recovery curve: bits per byte (95% interval) on up to 8 dev documents every N steps and at each stage's end, against training tokens in recovery.png, recovery/tokens_to_within_{5,2}pct in the summary (0 = none; smoke: 4, research: 500)
    logging_steps: int = 1  # log loss, lr, grad norm every N steps
    gradient_checkpointing: bool = False  # trade compute for activation memory
    compile: bool = False  # torch.compile the model
    keep_checkpoints: bool = False  # keep checkpoints in the cache after a stage succeeds (else deleted: ~2 x model size)
    resume_from_checkpoint: Optional[str] = None  # resume from this checkpoint folder (None = the latest in the stage output)
    lora_r: int = 16  # LoRA rank (stage 2 with stage2_use_lora)
    lora_alpha: int = 32  # LoRA scaling
    lora_dropout: float = 0.05  # LoRA dropout
    objective: str = "lm"  # lm: next-token loss; distill: match the source model's chunk log-likelihoods (tokalign/distill.py); mix: (1 - distill_weight) * lm + distill_weight * distill. lm chosen on the dev curve at the smoke budget: last dev point 1.203 x the source (lm) vs 1.207 (distill) (scripts/bench_recovery.py, scripts/results/recovery_smoke.json)
    distill_weight: float = 0.5  # mix only: the distillation share of the loss (not tuned)
    teacher_cache: bool = False  # distill/mix: keep the teacher's scores of every block under cache_dir/teacher_scores, read back by later epochs, stage 2 and other jobs (scripts/teacher_scores.py fills it ahead)
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )  # module names that get LoRA adapters

    def __post_init__(self) -> None:
        _check(self.seq_len >= 8, "train.seq_len", ">= 8", self.seq_len)
        _check(self.objective in ("lm", "distill", "mix"), "train.objective", "lm, distill or mix", self.objective)
        _check(0.0 <= self.distill_weight <= 1.0, "train.distill_weight", "in [0, 1]", self.distill_weight)
        _check(self.micro_batch_size >= 1, "train.micro_batch_size", ">= 1", self.micro_batch_size)
        _check(self.grad_accum >= 1, "train.grad_accum", ">= 1", self.grad_accum)
        _check(self.save_steps >= 1, "train.save_steps", ">= 1", self.save_steps)
        _check(self.eval_steps >= 0, "train.eval_steps", ">= 0", self.eval_steps)
        _check(self.lora_r >= 1, "train.lora_r", ">= 1", self.lora_r)


@dataclass
class WandbConfig:
    """Weights & Biases tracking; files go under ``<run dir>/wandb``."""

    mode: str = "offline"  # online, offline (sync later with `wandb sync`) or disabled
    project: str = "tokalign"  # W&B project
    entity: Optional[str] = None  # W&B team or user (None = your default)
    group: Optional[str] = None  # run group (None = the sweep directory in a multirun)
    tags: list[str] = field(default_factory=list)  # extra run tags
    log_model: bool = False  # upload the adapted model as an artifact

    def __post_init__(self) -> None:
        _check(self.mode in WANDB_MODES, "wandb.mode", f"one of {WANDB_MODES}", self.mode)


@dataclass
class EvalConfig:
    """Evaluation settings (bits per byte and PubMedQA)."""

    split: str = "eval"  # what the evaluate stages score: eval (the reported held-out text) or dev (for choosing settings)
    max_eval_samples: int = 100  # eval documents scored for bits per byte (0 = all)
    max_doc_bytes: int = 0  # score only the first N bytes of each eval document, cut at a space (0 = whole documents)
    seq_len: int = 1024  # window length for scoring; longer documents use overlapping windows
    stride: int = 512  # window stride for long documents
    batch_size: int = 4  # documents per forward pass
    pubmedqa_file: Optional[str] = None  # ori_pqal.json for PubMedQA accuracy (None = skip)
    pubmedqa_test_ids: Optional[str] = None  # test_ground_truth.json: the IDs scored
    pubmedqa_samples: int = 500  # test questions scored (stratified by label, seeded)
    pubmedqa_format: str = "context"  # prompt: context, abstract (lm-eval-harness wording) or chat (the model's template); chosen on training-split questions (module docstring)

    def __post_init__(self) -> None:
        _check(self.split in ("eval", "dev"), "eval.split", "eval or dev", self.split)
        _check(self.max_eval_samples >= 0, "eval.max_eval_samples", ">= 0", self.max_eval_samples)
        _check(self.max_doc_bytes == 0 or self.max_doc_bytes >= 64, "eval.max_doc_bytes", "0 or >= 64",
               self.max_doc_bytes)
        _check(self.seq_len >= 16, "eval.seq_len", ">= 16", self.seq_len)
        _check(0 < self.stride <= self.seq_len, "eval.stride", f"in (0, eval.seq_len={self.seq_len}]", self.stride)
        _check(self.batch_size >= 1, "eval.batch_size", ">= 1", self.batch_size)
        _check(self.pubmedqa_samples >= 0, "eval.pubmedqa_samples", ">= 0", self.pubmedqa_samples)
        _check(self.pubmedqa_format in PUBMEDQA_FORMATS, "eval.pubmedqa_format", f"one of {PUBMEDQA_FORMATS}",
               self.pubmedqa_format)


@dataclass
class TermsConfig:
    """Domain-term mining (stage ``terms``): which words the corpus is about, and how each tokenizer splits them."""

    top_k: int = 200  # terms kept
    min_freq: int = 3  # a word seen fewer times is never a term
    scoring: str = "tfidf"  # frequency, or tfidf (document frequency from `reference`, else from the corpus)
    reference: Optional[str] = None  # a general-domain corpus (any corpus format) for the idf (None = the corpus itself)

    def __post_init__(self) -> None:
        _check(self.top_k >= 1, "terms.top_k", ">= 1", self.top_k)
        _check(self.min_freq >= 1, "terms.min_freq", ">= 1", self.min_freq)
        _check(self.scoring in ("frequency", "tfidf"), "terms.scoring", "frequency or tfidf", self.scoring)


GGUF_TYPES_DEFAULT = ["f16", "q8_0", "q4_k_m"]


@dataclass
class ExportConfig:
    """Stages ``export`` and ``export_gguf``: the final model as a plain Hugging Face folder and as GGUF files made by
    llama.cpp's own converter and quantizer, each checked in llama.cpp (tokenization, bits per byte, speed)."""

    enabled: bool = False  # run the export stages (on in the research modes; python -m tokalign export.enabled=true)
    gguf_types: list[str] = field(default_factory=lambda: list(GGUF_TYPES_DEFAULT))  # GGUF files written: f32/f16/bf16/q8_0 by the converter, the rest (q4_k_m, q5_k_m...) by llama.cpp's quantizer from f16; [] = the Hugging Face folder only
    converter: Optional[str] = None  # llama.cpp's convert_hf_to_gguf.py (None = $TOKALIGN_LLAMA_CPP/, else ~/.cache/tokalign/llama.cpp/, where scripts/install_llama_cpp.sh puts it)
    eval_samples: int = 40  # held-out documents (cut like the evaluation's, eval.max_doc_bytes) scored by each GGUF and by the Hugging Face export
    test_strings: Optional[str] = None  # llama.cpp tokenizer test strings (.inp) checked on every GGUF (None = the .inp beside a .gguf target_tokenizer, when there is one)
    adapter: Optional[str] = None  # merged into the final model before export: a PEFT adapter folder, or a domain name of adapters.domains (its adapter of this run); None = the final model as it is

    def __post_init__(self) -> None:
        _check(self.eval_samples >= 1, "export.eval_samples", ">= 1", self.eval_samples)
        _check(len(set(self.gguf_types)) == len(self.gguf_types), "export.gguf_types", "no repeated type",
               list(self.gguf_types))


DOMAIN_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # a domain is a folder name: adapters/<domain>/


@dataclass
class InstructSourceConfig:
    """One file of instruction data for the domain adapters (``tokalign/instruct.py``)."""

    path: str = MISSING  # .jsonl/.json/.csv/.parquet of records, or (kind=pubmedqa) PubMedQA's ori_pqal.json
    kind: str = "records"  # records: Alpaca-style fields below; pubmedqa: QUESTION + CONTEXTS -> decision + LONG_ANSWER
    instruction_field: str = "instruction"  # records: the task or question
    input_field: str = "input"  # records: the material it is about (may be empty or absent)
    output_field: str = "output"  # records: the wanted response
    tags_field: Optional[str] = None  # records: a string or list of subject tags the domains' `match` filters on (pubmedqa: MESHES)
    decision_field: Optional[str] = None  # records: a class label (e.g. yes/no/maybe) the output starts with; scored as decision accuracy and macro-F1 (pubmedqa: final_decision)
    id_field: Optional[str] = None  # records: a stable record id for the split (None = a hash of the record's text)

    def __post_init__(self) -> None:
        _check(self.kind in ("records", "pubmedqa"), "adapters.sources.<name>.kind", "records or pubmedqa", self.kind)


@dataclass
class DomainConfig:
    """A domain: which sources feed it and which of their records belong to it."""

    sources: list[str] = field(default_factory=list)  # source names (empty = every source)
    match: list[str] = field(default_factory=list)  # case-insensitive substrings of a record's tags, any of which puts it in the domain (empty = every record: a general domain)


@dataclass
class AdaptersConfig:
    """Stages ``instruct`` and ``adapters``: one LoRA (CPU) or QLoRA (CUDA) adapter per domain on the run's final
    model, trained on validated instruction data split by stable hash (``tokalign/instruct.py``,
    ``tokalign/adapters.py``)."""

    enabled: bool = False  # run the two stages (python -m tokalign experiment=domain_adapters)
    sources: dict[str, InstructSourceConfig] = field(default_factory=dict)  # name -> instruction data file
    domains: dict[str, DomainConfig] = field(default_factory=dict)  # name (a folder name) -> its sources and filter
    max_records_per_source: int = 0  # keep at most this many records of each source, lowest stable hash first (0 = all)
    max_records_per_domain: int = 0  # the same cap per domain (0 = all)
    min_words: int = 10  # a record with fewer words (instruction + input + output) is dropped and counted
    max_words: int = 2048  # a record with more words is dropped and counted
    split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])  # train/validation/test shares by stable hash of the record id
    split_seed: int = 42  # the split's hash seed (research notes' value)
    method: str = "auto"  # lora (any device), qlora (4-bit NF4 base through bitsandbytes, CUDA only), auto (qlora when hardware.device=cuda, else lora)
    lora_r: int = 8  # adapter rank
    lora_alpha: int = 16  # adapter scaling
    lora_dropout: float = 0.05  # adapter dropout
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])  # modules that get adapters
    lr: float = 2e-4  # peak learning rate (linear decay, no warm-up); the usual LoRA value, not tuned
    epochs: float = 1.0  # passes over each domain's train split (ignored when max_steps > 0)
    max_steps: int = 0  # optimizer steps per adapter (0 = `epochs` passes)
    micro_batch_size: int = 1  # records per forward pass
    grad_accum: int = 1  # micro-batches per optimizer step
    max_seq_len: int = 512  # prompt + response tokens; a longer record loses the end of its input, never its response
    gen_samples: int = 16  # test records of each domain whose greedy generation is scored (ROUGE-L, BLEU)
    max_new_tokens: int = 64  # generated tokens per scored record

    def __post_init__(self) -> None:
        import re

        for name in self.domains:
            _check(bool(re.match(DOMAIN_NAME, str(name))), f"adapters.domains.{name}", "a folder name (letters, digits, _ . -)", name)
        for name, d in self.domains.items():
            unknown = [s for s in d.sources if s not in self.sources]
            _check(not unknown, f"adapters.domains.{name}.sources", f"names of adapters.sources ({sorted(self.sources)})", unknown)
        _check(not self.enabled or bool(self.domains), "adapters.domains", "at least one domain when adapters.enabled=true", {})
        _check(not self.enabled or bool(self.sources), "adapters.sources", "at least one source when adapters.enabled=true", {})
        _check(len(self.split) == 3 and all(x >= 0 for x in self.split) and abs(sum(self.split) - 1) < 1e-6
               and self.split[0] > 0 and self.split[2] > 0, "adapters.split", "three shares (train, validation, test) summing to 1, train and test > 0", list(self.split))
        _check(self.method in ("auto", "lora", "qlora"), "adapters.method", "auto, lora or qlora", self.method)
        _check(0 < self.min_words <= self.max_words, "adapters.min_words", f"in (0, adapters.max_words={self.max_words}]", self.min_words)
        _check(self.max_records_per_source >= 0, "adapters.max_records_per_source", ">= 0", self.max_records_per_source)
        _check(self.max_records_per_domain >= 0, "adapters.max_records_per_domain", ">= 0", self.max_records_per_domain)
        _check(self.lora_r >= 1, "adapters.lora_r", ">= 1", self.lora_r)
        _check(self.lr > 0, "adapters.lr", "> 0", self.lr)
        _check(self.epochs > 0 or self.max_steps > 0, "adapters.epochs", "> 0 (or adapters.max_steps > 0)", self.epochs)
        _check(self.max_seq_len >= 32, "adapters.max_seq_len", ">= 32", self.max_seq_len)
        _check(self.gen_samples >= 0, "adapters.gen_samples", ">= 0", self.gen_samples)

    def resolved_method(self, device: str) -> str:
        """lora or qlora: ``auto`` is qlora on a CUDA hardware profile, lora elsewhere."""
        return ("qlora" if device == "cuda" else "lora") if self.method == "auto" else self.method


DOMAIN_VOCAB_KINDS = ("words", "numbers", "phrases")  # tokalign.domain_vocab.KINDS


@dataclass
class DomainVocabConfig:
    """``target_tokenizer=domain``: the source tokenizer plus new tokens learned from the training split."""

    size: int = 300  # new tokens (BPE merges appended after the source's); research modes: 2000
    min_freq: int = 2  # a merge must save at least this many tokens on the training split
    kinds: list[str] = field(default_factory=lambda: list(DOMAIN_VOCAB_KINDS))  # which new tokens: words, numbers, phrases
    max_phrase_words: int = 3  # longest phrase token, in words
    report_top: int = 50  # candidates listed in report.json with their savings
    init_fit_tokens: int = 20000  # init method extend: source tokens whose hidden states fit the new output rows
    init_steps: int = 400  # init method extend: Adam steps on the new rows only (8 windows of 64 tokens each); chosen on the dev split (module docstring)
    init_lr: float = 6e-3  # init method extend: their (peak) learning rate; chosen on the dev split (module docstring)
    init_output: str = "fit"  # init method extend, output rows before the steps: fit (the first piece's row plus a ridge fit to the source's log-probability of the rest) or first (the first piece's row: the ablation)
    init_schedule: str = "cosine"  # init method extend, the steps' learning rate: cosine (decayed to 0 at the last step) or constant; chosen on the dev split (module docstring)
    init_objective: str = "awedist_lm"  # init method extend, the steps' loss: lm (next-token), distill (each chunk's likelihood matched to the source model's on the same bytes, tokalign/distill.py), awedist (input rows from the source's hidden states on the pieces, AweDist; output rows from the next token) or awedist_lm (input rows from both); chosen on the dev split (module docstring)

    def __post_init__(self) -> None:
        _check(self.size >= 1, "domain_vocab.size", ">= 1", self.size)
        _check(self.min_freq >= 1, "domain_vocab.min_freq", ">= 1", self.min_freq)
        bad = [k for k in self.kinds if k not in DOMAIN_VOCAB_KINDS]
        _check(not bad and len(self.kinds) > 0, "domain_vocab.kinds", f"a non-empty list from {DOMAIN_VOCAB_KINDS}",
               list(self.kinds))
        _check(self.max_phrase_words >= 2, "domain_vocab.max_phrase_words", ">= 2", self.max_phrase_words)
        _check(self.report_top >= 0, "domain_vocab.report_top", ">= 0", self.report_top)
        _check(self.init_fit_tokens >= 0, "domain_vocab.init_fit_tokens", ">= 0", self.init_fit_tokens)
        _check(self.init_steps >= 0, "domain_vocab.init_steps", ">= 0", self.init_steps)
        _check(self.init_lr > 0, "domain_vocab.init_lr", "> 0", self.init_lr)
        _check(self.init_output in ("fit", "first"), "domain_vocab.init_output", "fit or first", self.init_output)
        _check(self.init_schedule in ("constant", "cosine"), "domain_vocab.init_schedule", "constant or cosine",
               self.init_schedule)
        _check(self.init_objective in ("lm", "distill", "awedist", "awedist_lm"), "domain_vocab.init_objective",
               "lm, distill, awedist or awedist_lm", self.init_objective)


@dataclass
class PreflightConfig:
    """Checks run before any work."""

    strict: bool = False  # a shortfall is an error (True) or a warning (False)


@dataclass
class Config:
    """The whole run. Top-level keys are the ones users override most often."""

    source_model: str = MISSING  # hub id, local HF directory, or .gguf file of the source model
    target_tokenizer: str = MISSING  # hub id, local directory, (vocabulary-only) .gguf file, or "domain" (the source's plus new tokens learned from the corpus: `domain_vocab`)
    corpus: str = MISSING  # training text: .txt/.jsonl/.json/.csv/.parquet, PubMedQA json, or a hub dataset id
    eval_corpus: Optional[str] = None  # evaluation text (None = the held-out part of `corpus`)
    corpus_text_field: str = "text"  # field holding the text in .jsonl/.json/.csv/.parquet/hub records
    corpus_bytes: int = 0  # byte budget of training text read from `corpus` (0 = no limit)
    holdout_ids: Optional[str] = None  # JSON file whose keys are document IDs held out for evaluation
    holdout_fraction: float = 0.05  # share held out by stable hash when `holdout_ids` is None or names no document
    dev_fraction: float = 0.1  # share of the non-held-out corpus kept out of training to choose settings on (stable hash)
    allow_eval_overlap: bool = False  # let training documents that are evaluation texts through (the summary counts them)
    corpus_max_bad_share: float = 0.01  # corpus records that cannot be decoded or parsed are skipped and counted (corpus/bad_records_skipped, first places in corpus/report.json); more than this share of them is an error naming the file
    pivot_count: int = 300  # shared tokens used as pivots of the relative representations
    similarity_threshold: float = 0.3  # best similarity below this falls back to piece composition
    init_methods: list[str] = field(default_factory=lambda: list(CROSS_FAMILY_METHODS))  # initialisations built and scored (`extend` only with target_tokenizer=domain)
    seed: int = 0  # seed for every random choice (data order, fastText, baselines)
    lr_stage1: float = 6.4e-4  # stage 1 (embeddings + head) peak learning rate
    lr_stage2: float = 5e-5  # stage 2 (whole model or LoRA) peak learning rate
    steps_stage1: int = 0  # stage 1 optimizer steps (0 = skip the stage)
    steps_stage2: int = 0  # stage 2 optimizer steps (0 = skip the stage)
    train_start_idx_stage2: int = -1  # first training sequence of stage 2 (-1 = where stage 1 stopped)
    stage2_use_lora: bool = False  # stage 2 trains LoRA adapters (plus embedding rows) instead of all weights
    resume: bool = True  # reuse complete, verified stage outputs and continue training from checkpoints
    cache_dir: str = ".cache/tokalign"  # content-addressed stage outputs, shared by the jobs of a sweep
    allow_pickle: bool = False  # allow loading .bin/.pt pickle weights (unsafe: runs code from the file)
    trust_remote_code: bool = False  # allow model code from the hub (unsafe)
    optimized_metric: list[str] = field(default_factory=lambda: ["bpb/stage2", "bpb/stage1", "bpb/init/tokalign"])  # what a sweep optimises (the value `python -m tokalign` returns): the first of these metrics the run produced
    embed: EmbedConfig = field(default_factory=EmbedConfig)  # fastText settings
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)  # alignment preset
    hardware: HardwareConfig = field(default_factory=HardwareConfig)  # hardware profile
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)  # learning-rate schedule
    train: TrainConfig = field(default_factory=TrainConfig)  # training-loop settings
    eval: EvalConfig = field(default_factory=EvalConfig)  # evaluation settings
    wandb: WandbConfig = field(default_factory=WandbConfig)  # experiment tracking
    terms: TermsConfig = field(default_factory=TermsConfig)  # domain-term mining
    preflight: PreflightConfig = field(default_factory=PreflightConfig)  # start-up checks
    export: ExportConfig = field(default_factory=ExportConfig)  # Hugging Face and GGUF export
    adapters: AdaptersConfig = field(default_factory=AdaptersConfig)  # domain adapters on the final model
    domain_vocab: DomainVocabConfig = field(default_factory=DomainVocabConfig)  # target_tokenizer=domain

    def is_domain_vocab(self) -> bool:
        """The target is the source's tokenizer extended on the corpus (stage ``domain_vocab``)."""
        return self.target_tokenizer == "domain"

    def __post_init__(self) -> None:
        _check(self.corpus_bytes >= 0, "corpus_bytes", ">= 0", self.corpus_bytes)
        _check(0.0 <= self.holdout_fraction < 1.0, "holdout_fraction", "in [0, 1)", self.holdout_fraction)
        _check(0.0 <= self.dev_fraction < 0.5, "dev_fraction", "in [0, 0.5)", self.dev_fraction)
        _check(0.0 <= self.corpus_max_bad_share <= 1.0, "corpus_max_bad_share", "in [0, 1]", self.corpus_max_bad_share)
        _check(self.pivot_count >= 2, "pivot_count", ">= 2", self.pivot_count)
        _check(-1.0 <= self.similarity_threshold <= 1.0, "similarity_threshold", "in [-1, 1]", self.similarity_threshold)
        bad = [m for m in self.init_methods if m not in INIT_METHODS]
        _check(not bad and len(self.init_methods) > 0, "init_methods", f"a non-empty list from {INIT_METHODS}", list(self.init_methods))
        _check(self.lr_stage1 > 0, "lr_stage1", "> 0", self.lr_stage1)
        _check(self.lr_stage2 > 0, "lr_stage2", "> 0", self.lr_stage2)
        _check(self.steps_stage1 >= 0, "steps_stage1", ">= 0", self.steps_stage1)
        _check(self.steps_stage2 >= 0, "steps_stage2", ">= 0", self.steps_stage2)
        _check(self.train_start_idx_stage2 >= -1, "train_start_idx_stage2", ">= -1 (-1 = after stage 1)", self.train_start_idx_stage2)
        _check("extend" not in self.init_methods or self.is_domain_vocab(), "init_methods",
               "'extend' only with target_tokenizer=domain (a vocabulary that extends the source's)",
               list(self.init_methods))
        _check(len(self.optimized_metric) > 0, "optimized_metric", "a non-empty list of metric names", list(self.optimized_metric))


def register_configs() -> None:
    """Register the schema so ``conf/config.yaml`` can name ``tokalign_schema`` first in its defaults. The group
    options (``conf/hardware/*.yaml``, ...) merge into its typed nodes, so they are checked without a schema of
    their own (one stored in a group would be listed by ``--help`` as an option of that group)."""
    cs = ConfigStore.instance()
    cs.store(name="tokalign_schema", node=Config)


def to_config(cfg: DictConfig) -> Config:
    """Turn the composed DictConfig into a validated ``Config`` (runs every ``__post_init__``)."""
    plain = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}
    merged = OmegaConf.merge(OmegaConf.structured(Config), plain)
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, Config)
    return obj


def default_assets_dir() -> Path:
    """``$TOKALIGN_ASSETS``, else ``../shared/assets`` beside the checkout (the demo's model, tokenizers and data)."""
    env = os.environ.get("TOKALIGN_ASSETS")
    if env:
        return Path(env).expanduser().resolve()
    return (Path(__file__).resolve().parents[2] / "shared" / "assets").resolve()


def _assets_resolver(sub: str = "") -> str:
    base = default_assets_dir()
    if not base.is_dir():
        raise ConfigError(
            f"demo assets not found at {base}: set TOKALIGN_ASSETS to a folder holding models/, tokenizers/ and "
            "pubmedqa/ (see README 'Demo assets'), or pass source_model=, target_tokenizer= and corpus= yourself"
        )
    return str(base / sub) if sub else str(base)


def register_resolvers() -> None:
    """``${assets:pubmedqa/ori_pqal.json}`` resolves under the demo assets folder."""
    if not OmegaConf.has_resolver("assets"):
        OmegaConf.register_new_resolver("assets", _assets_resolver)
