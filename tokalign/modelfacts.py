"""Facts about a loaded model that several stages need, each decided by one rule here.

* ``is_tied``: whether the output head has no matrix of its own (init writes one matrix, training trains
  one, evaluation applies one);
* ``free_memory``: what a stage runs after dropping a model, so the next one starts from a clean allocator.
"""

from __future__ import annotations

import gc
import logging
import sys
from typing import Any


def device_and_precision(hw: Any) -> tuple[bool, bool]:
    """(train on CUDA, in bfloat16) for a hardware profile: CUDA only when asked for and present (else a warning
    and the CPU in float32), bfloat16 only on CUDA."""
    import torch

    want_cuda = hw.device == "cuda"
    use_cuda = want_cuda and torch.cuda.is_available()
    if want_cuda and not use_cuda:
        logging.getLogger("tokalign").warning("hardware.device=cuda but CUDA is not available: training on the CPU in float32")
    return use_cuda, use_cuda and hw.dtype == "bfloat16"


def is_tied(model: Any) -> bool:
    """True when the output head is the input embedding: there is no head, its weight is the embedding's (the same
    tensor or the same storage), or the model's config declares the two tied."""
    head = model.get_output_embeddings()
    if head is None:
        return True
    emb = model.get_input_embeddings().weight
    if head.weight is emb or head.weight.data_ptr() == emb.data_ptr():
        return True
    return bool(getattr(model.config, "tie_word_embeddings", False))


def untie(model: Any) -> None:
    """Give a tied model an output head of its own, a copy of the embedding (its outputs do not change)."""
    import torch

    head, emb = model.get_output_embeddings(), model.get_input_embeddings().weight
    for c in {id(model.config): model.config, id(model.config.get_text_config()): model.config.get_text_config()}.values():
        c.tie_word_embeddings = False
    head.weight = torch.nn.Parameter(emb.detach().clone(), requires_grad=emb.requires_grad)


def free_memory() -> None:
    """Collect host garbage and return the CUDA allocator's cached blocks (torch is not imported for this)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
