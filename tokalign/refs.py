"""Model and tokenizer references: a hub id, a local Hugging Face directory, or a ``.gguf`` file.

One loader for every stage. A full-model GGUF is de-quantized by transformers; a vocabulary-only
GGUF gives a tokenizer (the GPT-NeoX one, which transformers refuses, is rebuilt from its tokens
and merges with the ``tokenizers`` library). Weights load from safetensors only unless
``allow_pickle`` is set; ``trust_remote_code`` is off unless asked for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence
from tokalign.errors import TokalignError

log = logging.getLogger(__name__)


class RefError(TokalignError, ValueError):
    """A model or tokenizer reference cannot be loaded; the message names it."""


def retry(fn, what: str, attempts: int = 4, base_delay: float = 2.0, errors=(ConnectionError, TimeoutError, OSError)):
    """Call ``fn``; retry transient network/file-system errors with exponential backoff, then re-raise."""
    import time

    for i in range(attempts):
        try:
            return fn()
        except errors as e:
            if i == attempts - 1:
                raise
            delay = base_delay * 2**i
            log.warning("%s: %s; retrying in %.0fs (%d/%d)", what, e, delay, i + 1, attempts - 1)
            time.sleep(delay)


def _is_local(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(ref)) or ref.endswith(".gguf")


def _check_local(ref: str) -> Path:
    p = Path(os.path.expanduser(ref))
    if not p.exists():
        raise RefError(f"{ref}: no such file or directory (expected a hub id, a local model/tokenizer folder or a .gguf file)")
    if p.is_file() and not os.access(p, os.R_OK):
        raise RefError(f"{ref}: file is not readable")
    return p


def _gguf_fields(path: Path, *keys: str) -> list[Any]:
    """Scalar metadata values of a GGUF file, one reader for all (a string decoded; None where a key is absent)."""
    from gguf import GGUFReader

    fields, out = GGUFReader(str(path)).fields, []
    for key in keys:
        f = fields.get(key)
        v = f.parts[f.data[0]] if f is not None else None
        out.append(None if f is None else bytes(v).decode() if f.types and f.types[0].name == "STRING" else v[0].item())
    return out


def _gguf_arch(path: Path) -> str:
    return _gguf_fields(path, "general.architecture")[0] or ""


def _sentencepiece_prefix(tok: Any, path: Path) -> Any:
    """A SentencePiece (``tokenizer.ggml.model = llama``) vocabulary as SentencePiece and llama.cpp split text: a
    space prefix in front of every text, also one that starts with a space. transformers' GGUF reader gives a
    Metaspace pre-tokenizer that skips the prefix there (`' Hello'` -> `'▁Hello'`, not `'▁▁Hello'`); llama.cpp's
    tokenizer tests (the ``.out`` files beside the vocab GGUFs) and the original tokenizer.json files agree with this."""
    from tokenizers import normalizers

    model, space_prefix = _gguf_fields(path, "tokenizer.ggml.model", "tokenizer.ggml.add_space_prefix")
    if model != "llama" or space_prefix is False:
        return tok
    backend = tok.backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    backend.pre_tokenizer = None
    return tok


def _neox_tokenizer_from_gguf(path: Path):
    """Rebuild a byte-level BPE tokenizer (GPT-NeoX and friends) from a GGUF's tokens and merges."""
    from gguf import GGUFReader
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    reader = GGUFReader(str(path))

    def strings(key: str) -> list[str]:
        f = reader.fields[key]
        return [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]

    def scalar(key: str) -> Optional[int]:
        f = reader.fields.get(key)
        return int(f.parts[f.data[0]][0]) if f is not None else None

    tokens = strings("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in strings("tokenizer.ggml.merges")]
    types = reader.fields.get("tokenizer.ggml.token_type")
    ttypes = [int(types.parts[i][0]) for i in types.data] if types is not None else [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    # control (3) and user-defined (4) tokens are matched whole, never split
    specials = [t for t, ty in zip(tokens, ttypes) if ty in (3, 4)]
    tk.add_special_tokens(specials)
    ids = {k: scalar(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
    name = lambda i: tokens[i] if i is not None and 0 <= i < len(tokens) else None  # noqa: E731
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=name(ids["bos"]), eos_token=name(ids["eos"]),
                                   unk_token=name(ids["unknown"]), pad_token=name(ids["padding"]))


TOKENIZER_CACHE_ENV = "TOKALIGN_TOKENIZER_CACHE"  # where tokenizers read from GGUF files are kept ("off": nowhere)
TOKENIZER_CACHE_HOME = "~/.cache/tokalign/tokenizers"
CONVERSION_VERSION = 1  # part of the cache key: bump it when the GGUF conversion below changes


def _converted_dir(p: Path) -> Optional[Path]:
    """Where the tokenizer read from GGUF file ``p`` is kept as a Hugging Face folder: keyed by the file's path, size
    and modification time and by the transformers/tokenizers versions, as ``make`` would; None when switched off."""
    import tokenizers
    import transformers

    root = os.environ.get(TOKENIZER_CACHE_ENV, TOKENIZER_CACHE_HOME)
    if root == "off":
        return None
    st = p.stat()
    key = json.dumps([str(p.resolve()), st.st_size, st.st_mtime_ns, transformers.__version__, tokenizers.__version__,
                      CONVERSION_VERSION])
    return Path(root).expanduser() / f"{p.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _keep_converted(tok: Any, where: Path) -> None:
    """Save into a private folder, then rename it into place: a reader sees a whole folder or none."""
    tmp = where.with_name(f"{where.name}.tmp{os.getpid()}")
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(tmp))
        os.replace(tmp, where)
    except OSError as e:  # another process won the race, or the cache folder is not writable: convert next time
        log.info("%s: tokenizer not kept (%s)", where, e)
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf_tokenizer(p: Path, ref: str, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, trust_remote_code=trust_remote_code)
        return _sentencepiece_prefix(tok, p)
    except (ValueError, KeyError, NotImplementedError) as e:
        arch = _gguf_arch(p)
        if arch in ("gptneox", "gpt-neox") or "not supported" in str(e):
            log.info("%s: transformers cannot read this GGUF tokenizer (%s); rebuilding from its tokens "
                     "and merges", ref, e)
            return _neox_tokenizer_from_gguf(p)
        raise


def _gguf_tokenizer(p: Path, ref: str, trust_remote_code: bool) -> Any:
    """A GGUF's tokenizer: converted once (15-45 s for a 50k-150k vocabulary), then read from its saved folder (1 s)."""
    from transformers import AutoTokenizer

    where = _converted_dir(p)
    if where is not None and (where / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(where))
    else:
        tok = _convert_gguf_tokenizer(p, ref, trust_remote_code)
        if where is not None:
            _keep_converted(tok, where)
    tok.name_or_path = ref  # errors name the user's file, not the kept folder
    return tok


def load_tokenizer(ref: str, *, trust_remote_code: bool = False):
    """A fast tokenizer from a hub id, a folder, a full-model GGUF or a vocabulary-only GGUF (converted once, then
    kept under ``$TOKALIGN_TOKENIZER_CACHE``, default ``~/.cache/tokalign/tokenizers``)."""
    from transformers import AutoTokenizer

    try:
        if _is_local(ref):
            p = _check_local(ref)
            if p.is_file() and p.suffix == ".gguf":
                return _gguf_tokenizer(p, ref, trust_remote_code)
            if p.is_file():
                raise RefError(f"{ref}: a tokenizer file must be .gguf; otherwise pass its folder")
            return AutoTokenizer.from_pretrained(str(p), trust_remote_code=trust_remote_code)
        return retry(lambda: AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code),
                     f"tokenizer '{ref}'")
    except RefError:
        raise
    except Exception as e:
        raise RefError(f"tokenizer '{ref}' failed to load: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def _torch_dtype(dtype: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_model(ref: str, *, dtype: str = "float32", allow_pickle: bool = False, trust_remote_code: bool = False,
               attn_implementation: Optional[str] = None, device: str = "cpu") -> Any:
    """A causal LM from a hub id, a local folder or a full-model GGUF, safetensors-only unless allowed."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": _torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = _usable_attn(attn_implementation)
    try:
        if _is_local(ref):
            p = _check_local(ref)
            if p.is_file():
                if p.suffix != ".gguf":
                    raise RefError(f"{ref}: a model file must be .gguf; otherwise pass its folder")
                model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, **kwargs)
            else:
                has_st = any(p.glob("*.safetensors"))
                has_pickle = any(p.glob("*.bin")) or any(p.glob("*.pt"))
                if not has_st and has_pickle and not allow_pickle:
                    raise RefError(f"{ref}: only pickle weights (.bin/.pt) found; they can run code on load. "
                                   "Convert to safetensors, or set allow_pickle=true if you trust the file")
                model = AutoModelForCausalLM.from_pretrained(str(p), use_safetensors=not allow_pickle or has_st,
                                                             **kwargs)
        else:
            model = retry(lambda: AutoModelForCausalLM.from_pretrained(
                ref, use_safetensors=None if allow_pickle else True, **kwargs), f"model '{ref}'")
    except RefError:
        raise
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise RefError(f"model '{ref}' failed to load: {type(e).__name__}: {first}") from e
    return model.to(device)


def load_merged(model_dir: Path, adapters: Sequence[str] = (), *, what: str = "adapter", dtype: str = "float32",
                allow_pickle: bool = False, trust_remote_code: bool = False) -> tuple[Any, Path]:
    """The model in ``model_dir`` with PEFT adapters merged in by peft's ``merge_and_unload``, and the folder whose
    tokenizer goes with it. ``model_dir`` may itself be an adapter folder (``adapter_config.json``: a stage-2 LoRA
    run): its base (``base_model_name_or_path``) is loaded and it is merged first, then each of ``adapters`` in
    order. ``what`` names the setting an adapter came from in the error for a folder that is not an adapter."""
    from peft import PeftModel

    model_dir, chain = Path(model_dir), [str(a) for a in adapters]
    if (model_dir / "adapter_config.json").is_file():
        chain.insert(0, str(model_dir))
        model_dir = Path(json.loads((model_dir / "adapter_config.json").read_text())["base_model_name_or_path"])
    model = load_model(str(model_dir), dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    for a in chain:
        if not (Path(a) / "adapter_config.json").is_file():
            raise RefError(f"{what}={a}: not a PEFT adapter folder (expected adapter_config.json in it)")
        model = PeftModel.from_pretrained(model, a).merge_and_unload()
    return model, model_dir


def _usable_attn(name: str) -> str:
    if name == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            log.info("flash_attn is not installed: using SDPA attention")
            return "sdpa"
    return name


def plain_copy(model: Any) -> Any:
    """A plain (non-GGUF, serialisable) model with the same config and weights: GGUF-loaded models refuse save_pretrained."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        try:
            delattr(config, "quantization_config")
        except AttributeError:
            config.quantization_config = None
    fresh = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    missing = [m for m in missing if "lm_head" not in m or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RefError(f"could not copy the model's weights (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        fresh.tie_weights()
    return fresh


def special_token_roles(tok: Any) -> dict[str, Optional[int]]:
    """The IDs of a tokenizer's BOS, EOS, PAD and UNK tokens (None where it has none)."""
    return {r: getattr(tok, f"{r}_token_id", None) for r in ("bos", "eos", "pad", "unk")}
