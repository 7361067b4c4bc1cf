"""The source model's chat template and stop tokens carried onto a model with a new vocabulary.

The template's special-token strings are mapped to the target vocabulary (the same string when the target has it,
else the target's token of the same role: bos, eos, pad, unk), and the generation config's stop tokens with them.
Stage ``export`` writes the result into ``hf/``; stage ``adapters`` trains with the same template, so an adapter
merged by ``export.adapter`` is served with the prompts it was trained on.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Optional

from tokalign import refs

log = logging.getLogger(__name__)

ROLES = ("bos", "eos", "pad", "unk")


def special_map(src_tok: Any, tgt_tok: Any) -> tuple[dict[str, str], list[str]]:
    """Source special-token string -> target string (same string if the target has it, else the target's token of
    the same role), and the source specials with neither."""
    vocab = tgt_tok.get_vocab()
    role_of: dict[Any, str] = {}
    for r in ROLES:  # a token with two roles (SmolLM2's <|im_end|>: eos and pad) keeps the first
        role_of.setdefault(getattr(src_tok, f"{r}_token", None), r)
    mapping, unmapped = {}, []
    for s in dict.fromkeys(list(src_tok.all_special_tokens) + [str(t) for t in src_tok.added_tokens_decoder.values()]):
        if s in vocab:
            mapping[s] = s
        elif role_of.get(s) and getattr(tgt_tok, f"{role_of[s]}_token", None):
            mapping[s] = getattr(tgt_tok, f"{role_of[s]}_token")
        else:
            unmapped.append(s)
    return mapping, unmapped


def map_template(template: str, mapping: dict[str, str]) -> str:
    """``template`` with every mapped special-token string replaced (longest first, one pass)."""
    keys = sorted((k for k, v in mapping.items() if k != v), key=len, reverse=True)
    if not keys:
        return template
    return re.sub("|".join(map(re.escape, keys)), lambda m: mapping[m.group(0)], template)


def _map_id(i: Any, src_tok: Any, tgt_tok: Any, mapping: dict[str, str]) -> Optional[int]:
    s = src_tok.convert_ids_to_tokens(int(i)) if isinstance(i, int) else None
    return tgt_tok.convert_tokens_to_ids(mapping[s]) if s in mapping else None


def stop_ids(gen: Any, src_tok: Any, tgt_tok: Any, mapping: dict[str, str]) -> list[int]:
    """The target ids of the source's stop tokens (its generation config's eos ids), then the target's own eos."""
    eos = getattr(gen, "eos_token_id", None)
    eos = eos if isinstance(eos, list) else [eos if eos is not None else src_tok.eos_token_id]
    ids = [_map_id(e, src_tok, tgt_tok, mapping) for e in eos] + [tgt_tok.eos_token_id]
    return list(dict.fromkeys(i for i in ids if i is not None))


def carry_chat(model: Any, tok: Any, src_dir: Path) -> dict:
    """The source's chat template and stop tokens onto ``model``/``tok`` (mapped to the target vocabulary)."""
    src_tok = refs.load_tokenizer(str(src_dir))
    mapping, unmapped = special_map(src_tok, tok)
    info: dict[str, Any] = {"special_map": {k: v for k, v in mapping.items() if k != v}, "unmapped": unmapped}
    if getattr(src_tok, "chat_template", None):
        tok.chat_template = map_template(src_tok.chat_template, mapping)
        info["chat_template"] = "source"
        used = [s for s in unmapped if s in src_tok.chat_template]
        if used:
            log.warning("export: the chat template uses %s, which the target vocabulary has no token for", used)
            info["template_unmapped"] = used
    else:
        info["chat_template"] = "target" if getattr(tok, "chat_template", None) else None
    from transformers import AutoConfig, GenerationConfig

    try:
        src_gen = GenerationConfig.from_pretrained(str(src_dir))
    except OSError:  # no generation_config.json: the one transformers derives from config.json
        src_gen = GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(src_dir)))
    stops = stop_ids(src_gen, src_tok, tok, mapping)
    gen = model.generation_config
    gen.eos_token_id = stops[0] if len(stops) == 1 else stops
    gen.bos_token_id, gen.pad_token_id = tok.bos_token_id, tok.pad_token_id
    info["eos_token_id"] = gen.eos_token_id
    return info
