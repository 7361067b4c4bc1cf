"""Training throughput through the real training stages (tokens/s, and MFU on CUDA).

Runs ``tokalign.stages.train.train_stage`` (transformers' Trainer, our data order, NaN guard,
checkpointing off) for stage 1 (embeddings + head), full stage 2 and optionally LoRA stage 2, on
random token data, and times the optimizer steps after ``--warmup-steps`` (start-up, the first step
and compilation are excluded). Weights are a random init with SmolLM2-135M's config (``--weights
random``, the default: throughput does not depend on the values) or the real ones from the GGUF
(``--weights gguf``, ~30 s to load).

``--model llama-1b`` is a randomly initialised Llama-3.2-1B-shaped model (1.24B parameters, vocab
128,256, tied head) for the MFU target; ``--vocab-size`` gives the SmolLM2 model another vocabulary
(151,936 for a Qwen2 target), as the init stage does.

MFU (CUDA only) = model FLOPs per token * tokens/s / peak FLOP/s (H100 SXM dense bf16: 989e12).
Model FLOPs per token, N = parameters used in matrix products (a tied embedding counted once, as the
head), L layers, d width, T sequence length (PaLM's accounting, attention included):
full training 6N + 12·L·d·T; stage 1 and LoRA 4N + 2·N_head + 8·L·d·T (every layer's activation
gradients are computed, weight gradients only for the head/embedding). ``mfu_6n`` leaves attention out.

The CPU numbers in the project report came from (2 cores):

    python scripts/bench_train.py --seq-len 256 --micro-batch 4 --steps 5 --warmup-steps 1 --out bench_train_cpu.json

On an H100:

    python scripts/bench_train.py --device cuda --dtype bfloat16 --seq-len 2048 --micro-batch 16 --steps 20 \\
        --warmup-steps 3 --stages stage1,stage2,stage2_lora --peak-flops 989e12 --out bench_train_h100.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("WANDB_MODE", "disabled")

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
               rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"


def _toy_tokenizer(vocab: int, eos_id: int = 2):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = {0: "<unk>", 1: "<bos>", eos_id: "<eos>"}
    vocab_map = {names.get(i, f"t{i}"): i for i in range(vocab)}
    tk = Tokenizer(models.WordLevel(vocab=vocab_map, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
                                   pad_token="<eos>")


MODELS = {"smollm2-135m": SMOLLM2, "llama-1b": LLAMA_1B}


def build_init(folder: Path, weights: str, gguf: Path, arch: dict = SMOLLM2):
    """``folder/model``: a random init of ``arch`` or SmolLM2-135M's real weights, saved with a tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tokalign import refs

    if weights == "gguf":
        model = refs.plain_copy(refs.load_model(str(gguf)))
        tok = refs.load_tokenizer(str(gguf))
    else:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**arch))
        tok = _toy_tokenizer(arch["vocab_size"], arch["eos_token_id"])
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    return model


def make_tokens(folder: Path, n_tokens: int, vocab: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(100, 600, size=n_tokens // 300 + 2)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), n_tokens) + 1]
    ids = rng.integers(3, vocab, size=int(lengths.sum()), dtype=np.uint32)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "target_ids.npy", ids)
    np.save(folder / "target_offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))


def flops_per_token(arch: dict, n_matmul: int, seq_len: int, stage: str) -> tuple[float, float]:
    """(model FLOPs per token with attention, without attention) for one training step of ``stage``."""
    L, d = arch["num_hidden_layers"], arch["hidden_size"]
    if stage == "stage2":
        return 6 * n_matmul + 12 * L * d * seq_len, 6 * n_matmul
    n_head = arch["vocab_size"] * d
    return 4 * n_matmul + 2 * n_head + 8 * L * d * seq_len, 4 * n_matmul + 2 * n_head


def timing_callback(warmup: int):
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.marks: list[tuple[int, float]] = []

        def on_step_end(self, args, state, control, **kw):
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append((state.global_step, time.perf_counter()))

        def steps_per_s(self) -> tuple[float, int]:
            ms = [m for m in self.marks if m[0] >= warmup]
            if len(ms) < 2:
                ms = self.marks
            if len(ms) < 2:
                return float("nan"), 0
            return (ms[-1][0] - ms[0][0]) / (ms[-1][1] - ms[0][1]), ms[-1][0] - ms[0][0]

    return Timer()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", default="stage1,stage2", help="comma list of stage1, stage2, stage2_lora")
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2-135m", help="architecture (random init)")
    ap.add_argument("--vocab-size", type=int, default=0, help="override the architecture's vocabulary size")
    ap.add_argument("--weights", choices=["random", "gguf"], default="random")
    ap.add_argument("--gguf", type=Path, default=ASSETS / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bfloat16 on cuda")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps (after the warm-up steps)")
    ap.add_argument("--warmup-steps", type=int, default=1, help="untimed first steps")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--attn", default="sdpa", choices=["eager", "sdpa", "flash_attention_2"])
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--peak-flops", type=float, default=989e12, help="peak FLOP/s for MFU (H100 dense bf16: 989e12)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)

    import torch

    logging.basicConfig(level=logging.WARNING)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = a.dtype or ("bfloat16" if device == "cuda" else "float32")

    from tokalign.config import Config, HardwareConfig, LRScheduleConfig, TrainConfig
    from tokalign.context import Context
    from tokalign.stages import train

    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    total_steps = a.warmup_steps + a.steps
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        tmp = Path(tmp)
        t0 = time.time()
        arch = dict(MODELS[a.model], **({"vocab_size": a.vocab_size} if a.vocab_size else {}))
        if a.weights == "gguf" and (a.model != "smollm2-135m" or a.vocab_size):
            ap.error("--weights gguf is SmolLM2-135M with its own vocabulary")
        model = build_init(tmp / "init", a.weights, a.gguf, arch)
        n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        tied = model.get_output_embeddings() is None or (
            model.get_output_embeddings().weight is model.get_input_embeddings().weight)
        n_matmul = n_params - (0 if tied else model.get_input_embeddings().weight.numel())
        vocab = model.get_input_embeddings().weight.shape[0]
        del model
        load_s = time.time() - t0
        gb = a.micro_batch * a.grad_accum
        make_tokens(tmp / "tokenize", int(total_steps * gb * a.seq_len * 1.2) + 10 * a.seq_len, vocab)
        ctx = Context(run_dir=tmp / "run", outputs={"init": tmp / "init", "tokenize": tmp / "tokenize"})
        ctx.run_dir.mkdir()
        for st in stages:
            cfg = Config(
                source_model="bench", target_tokenizer="bench", corpus="bench", seed=0,
                steps_stage1=total_steps, steps_stage2=total_steps, train_start_idx_stage2=0,
                stage2_use_lora=(st == "stage2_lora"),
                train=TrainConfig(seq_len=a.seq_len, micro_batch_size=a.micro_batch, grad_accum=a.grad_accum,
                                  save_steps=10 ** 9, logging_steps=1, compile=a.compile,
                                  gradient_checkpointing=a.gradient_checkpointing),
                hardware=HardwareConfig(device=device, dtype=dtype, attn_implementation=a.attn,
                                        tf32=device == "cuda"),
                lr_schedule=LRScheduleConfig(name="constant", warmup_ratio=0.0),
            )
            timer = timing_callback(a.warmup_steps)
            stage_no = 1 if st == "stage1" else 2
            if stage_no == 2:
                ctx.outputs.pop("train_stage1", None)  # each row starts from the same init model
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            m = train.train_stage(cfg, ctx, tmp / st, train.SPECS[stage_no], callbacks=[timer])
            sps, timed = timer.steps_per_s()
            tps = sps * gb * a.seq_len
            row = {"stage": st, "tokens_per_s": tps, "steps_per_s": sps, "timed_steps": timed,
                   "trainable_params": m[f"stage{stage_no}/trainable_params"],
                   "final_loss": m[f"stage{stage_no}/final_loss"]}
            fpt, fpt_6n = flops_per_token(arch, n_matmul, a.seq_len, "stage2" if st == "stage2" else st)
            row["flops_per_token"] = fpt
            if device == "cuda":
                row["mfu"] = fpt * tps / a.peak_flops
                row["mfu_6n"] = fpt_6n * tps / a.peak_flops
                row["achieved_tflops"] = fpt * tps / 1e12
                row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
            results.append(row)

    info = {
        "model": ("SmolLM2-135M (real weights)" if a.weights == "gguf" else
                  f"{a.model} architecture, random init, vocab {arch['vocab_size']}"),
        "params": n_params, "matmul_params": n_matmul, "arch": arch, "device": device, "dtype": dtype,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
        "seq_len": a.seq_len, "micro_batch": a.micro_batch, "grad_accum": a.grad_accum,
        "tokens_per_step": gb * a.seq_len, "timed_steps": a.steps, "warmup_steps": a.warmup_steps,
        "compile": a.compile, "gradient_checkpointing": a.gradient_checkpointing, "attn": a.attn,
        "peak_flops": a.peak_flops if device == "cuda" else None, "model_setup_s": load_s,
        "load_avg_1m_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cpu_count": os.cpu_count(),
    }
    report = {"info": info, "results": results}

    cols = ["stage", "tokens/s", "steps/s", "trainable params", "loss"] + (["TFLOP/s", "MFU", "MFU (6N)", "peak mem GB"]
                                                                           if device == "cuda"
                                                                          else [])
    print(f"\n{info['model']}, {n_params / 1e6:.1f}M params, {device} ({info['device_name']}, {dtype}), "
          f"seq_len {a.seq_len} x micro-batch {a.micro_batch} x accum {a.grad_accum}, {a.steps} timed steps; "
          f"load average {info['load_avg_1m_at_end']} on {info['cpu_count']} CPUs\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        cells = [r["stage"], f"{r['tokens_per_s']:,.0f}", f"{r['steps_per_s']:.3f}", f"{r['trainable_params']:,}",
                 f"{r['final_loss']:.3f}"]
        if device == "cuda":
            cells += [f"{r['achieved_tflops']:.0f}", f"{100 * r['mfu']:.1f}%", f"{100 * r['mfu_6n']:.1f}%",
                      f"{r['peak_mem_gb']:.1f}"]
        print("| " + " | ".join(cells) + " |")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=1))
        print(f"\nwrote {a.out}")
    return report


if __name__ == "__main__":
    main()
