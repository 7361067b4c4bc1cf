"""Stage ``source``: load the source model once (hub id, folder or GGUF) and keep it as a plain
safetensors Hugging Face folder, so every later stage loads it in seconds.

Writes ``model/`` (config, model.safetensors, tokenizer) and ``info.json``.

Run alone:  python -m tokalign source_model=/path/model.gguf   (the pipeline caches this stage)
"""

from __future__ import annotations

import json
from pathlib import Path

from tokalign import refs
from tokalign.config import Config
from tokalign.context import Context
from tokalign.modelfacts import is_tied


def run(cfg: Config, ctx: Context, out: Path) -> dict:
    model = refs.load_model(cfg.source_model, dtype="float32", allow_pickle=cfg.allow_pickle,
                            trust_remote_code=cfg.trust_remote_code)
    tok = refs.load_tokenizer(cfg.source_model, trust_remote_code=cfg.trust_remote_code)
    n_rows = model.get_input_embeddings().weight.shape[0]
    if len(tok) > n_rows:
        raise refs.RefError(f"source_model '{cfg.source_model}': tokenizer has {len(tok)} tokens but the model's "
                            f"embedding has {n_rows} rows (expected a tokenizer no larger than the model's vocabulary)")
    if getattr(model.config, "quantization_config", None) is not None:
        model = refs.plain_copy(model)
    model.save_pretrained(out / "model", safe_serialization=True)
    tok.save_pretrained(out / "model")
    info = {
        "ref": cfg.source_model,
        "vocab_size": len(tok),
        "embedding_rows": n_rows,
        "tied": is_tied(model),
        "hidden_size": int(model.get_input_embeddings().weight.shape[1]),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "roles": refs.special_token_roles(tok),
    }
    (out / "info.json").write_text(json.dumps(info, indent=1))
    return {"source/vocab_size": info["vocab_size"], "source/parameters": info["parameters"]}
