"""Stage ``preflight``: check the machine before any work (always runs, never cached).

Records Python, torch and CUDA versions, the GPU and its free memory against
``hardware.min_gpu_memory_gb``, free disk at the run and cache directories against
``hardware.min_free_disk_gb``, whether fasttext and FlashAttention import, and, when GGUF export is on, that
llama.cpp's converter and runtime are installed and know every ``export.gguf_types`` (an error either way), and,
with domain adapters on QLoRA, a CUDA GPU and bitsandbytes (an error either way). With
``preflight.strict=true`` a shortfall is an error before any work; otherwise a warning.

Run alone:  python -m tokalign.stages.preflight hardware=h100
"""

from __future__ import annotations

import importlib.util
import json
import logging
import platform
import shutil
import sys
from pathlib import Path

from tokalign.config import Config
from tokalign.context import Context
from tokalign.errors import TokalignError

log = logging.getLogger(__name__)


class PreflightError(TokalignError, RuntimeError):
    """The machine cannot do this job; the message says which check failed."""


def check(cfg, run_dir: Path) -> tuple[dict, list[str]]:
    import torch

    info: dict = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "fasttext": importlib.util.find_spec("fasttext") is not None,
        "flash_attn": importlib.util.find_spec("flash_attn") is not None,
    }
    problems = []
    if not info["fasttext"]:
        problems.append("fasttext is not installed (pip install fasttext): the embed stage needs it")
    hw = cfg.hardware
    if hw.device == "cuda":
        if not torch.cuda.is_available():
            problems.append(f"hardware={hw.name} wants CUDA but torch sees no GPU")
        else:
            free, total = torch.cuda.mem_get_info()
            info.update(gpu=torch.cuda.get_device_name(0), gpu_free_gb=round(free / 2**30, 2),
                        gpu_total_gb=round(total / 2**30, 2), gpu_count=torch.cuda.device_count())
            if hw.nproc_per_node > torch.cuda.device_count():
                problems.append(f"hardware.nproc_per_node={hw.nproc_per_node} but {torch.cuda.device_count()} GPU(s) "
                                "are visible")
            if free / 2**30 < hw.min_gpu_memory_gb:
                problems.append(f"GPU has {free / 2**30:.1f} GB free; hardware.min_gpu_memory_gb="
                                f"{hw.min_gpu_memory_gb} wanted")
    for label, path in (("run_dir", run_dir), ("cache_dir", Path(cfg.cache_dir).expanduser())):
        path.mkdir(parents=True, exist_ok=True)
        free_gb = shutil.disk_usage(path).free / 2**30
        info[f"disk_free_gb/{label}"] = round(free_gb, 2)
        if free_gb < hw.min_free_disk_gb:
            problems.append(f"{path}: {free_gb:.1f} GB free disk; hardware.min_free_disk_gb={hw.min_free_disk_gb} wanted")
    return info, problems


def check_export(cfg: Config) -> dict:
    """With GGUF export asked for, llama.cpp's converter and runtime must be there and every type known to them:
    an error now, not after hours of training (``export.enabled=false`` or ``export.gguf_types=[]`` skip it)."""
    if not (cfg.export.enabled and cfg.export.gguf_types):
        return {}
    crossing = [k for k in cfg.domain_vocab.kinds if k != "words"] if cfg.is_domain_vocab() else []
    if crossing:
        raise PreflightError(f"preflight: export.gguf_types={list(cfg.export.gguf_types)} with target_tokenizer=domain "
                             f"and domain_vocab.kinds={list(cfg.domain_vocab.kinds)}: {' and '.join(crossing)} change "
                             "the pre-tokenizer, which llama.cpp fixes per model family, so a GGUF would tokenize "
                             "differently; set domain_vocab.kinds=[words] or export.gguf_types=[]")
    from tokalign import llamacpp

    try:
        converter = llamacpp.find_converter(cfg.export.converter)
        llamacpp.llama_cpp_module()  # installed, and not a build known to crash
        llamacpp.check_types(cfg.export.gguf_types)
    except llamacpp.ExportError as e:
        raise PreflightError(f"preflight: {e} (GGUF export is on: export.enabled=true)") from e
    return {"llama_cpp_converter": str(converter)}


def check_adapters(cfg: Config) -> dict:
    """QLoRA needs a CUDA GPU and bitsandbytes: an error now, not after the pipeline's other stages."""
    if not cfg.adapters.enabled:
        return {}
    import torch

    method = cfg.adapters.resolved_method(cfg.hardware.device)
    if method == "qlora" and not torch.cuda.is_available():
        raise PreflightError(f"preflight: adapters.method={cfg.adapters.method} means QLoRA here, which needs a CUDA "
                             "GPU and torch sees none (set adapters.method=lora)")
    if method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        raise PreflightError("preflight: QLoRA (adapters.method) needs bitsandbytes: pip install -e '.[gpu]' "
                             "(or set adapters.method=lora)")
    return {"adapters_method": method}


def run(cfg: Config, ctx: Context, out: Path) -> dict:
    info, problems = check(cfg, ctx.run_dir)
    info.update(check_export(cfg))
    info.update(check_adapters(cfg))
    info["problems"] = problems
    (out / "preflight.json").write_text(json.dumps(info, indent=1))
    for p in problems:
        if cfg.preflight.strict:
            raise PreflightError(f"preflight: {p} (preflight.strict=true)")
        log.warning("preflight: %s", p)
    metrics = {f"preflight/{k}": v for k, v in info.items() if isinstance(v, (int, float, str, bool))}
    metrics["preflight/problems"] = len(problems)
    return metrics


if __name__ == "__main__":  # pragma: no cover
    from tokalign.cli import compose_cli

    c = compose_cli(sys.argv[1:])
    print(json.dumps(check(c, Path("."))[0], indent=1))
