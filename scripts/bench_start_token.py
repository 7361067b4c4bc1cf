"""How much the document-start token moves bits per byte: the evaluation's convention against the old one.

The convention (``tokalign.metrics.start_token_id``, stage ``init``): every document starts after the
separator the model saw between documents, SmolLM2's ``<|endoftext|>``; a target model starts after its
own separator (Qwen2's ``<|endoftext|>``), whose row every init method sets to the source's
``<|endoftext|>`` row. Before it, the source started after its ``bos_token`` (the chat token
``<|im_start|>``) and each method gave the target's start token a row of its own (``tokalign``: the
source's ``<|im_start|>`` by role). This scores the smoke mode's eval documents both ways.

    python scripts/bench_start_token.py --out scripts/results/start_token.json [overrides...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tokalign import metrics as M  # noqa: E402
from tokalign import refs, stats  # noqa: E402
from tokalign.artifacts import head_bytes  # noqa: E402
from tokalign.__main__ import apply_hardware  # noqa: E402
from tokalign.cli import compose_cli  # noqa: E402
from tokalign.artifacts import read_texts  # noqa: E402
from tokalign.pipeline import STAGES, run_pipeline  # noqa: E402
from tokalign.stages.evaluate import apply_rows  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="fvt,tokalign")
    ap.add_argument("--out", default="")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    cfg = compose_cli(a.overrides + ["wandb.mode=disabled"])
    apply_hardware(cfg)
    upto = [s for s in STAGES[: [s.name for s in STAGES].index("init") + 1]]
    with tempfile.TemporaryDirectory() as tmp:
        paths = {k: Path(v["path"]) for k, v in run_pipeline(cfg, Path(tmp), stages=upto)["stages"].items()
                 if "path" in v}
    texts = [head_bytes(t, cfg.eval.max_doc_bytes) if cfg.eval.max_doc_bytes else t
             for t in read_texts(paths["corpus"] / "eval.jsonl", cfg.eval.max_eval_samples)]
    kw = dict(seq_len=cfg.eval.seq_len, stride=cfg.eval.stride, batch_size=cfg.eval.batch_size)
    src_model = refs.load_model(str(paths["source"] / "model"))
    src_tok = refs.load_tokenizer(str(paths["source"] / "model"))
    conv_id, old_id = M.start_token_id(src_tok), src_tok.bos_token_id
    rows = {"source": {"convention": M.bits_per_byte(src_model, src_tok, texts, desc="source", **kw),
                       "old": M.bits_per_byte(src_model, src_tok, texts, start=old_id, desc="source old", **kw)}}
    emb = src_model.get_input_embeddings().weight.detach().clone()
    del src_model
    model = refs.load_model(str(paths["init"] / "model"))
    tok = refs.load_tokenizer(str(paths["init"] / "model"))
    t_start = M.start_token_id(tok)
    old_rows = json.loads((paths["init"] / "info.json").read_text())
    for m in a.methods.split(","):
        apply_rows(model, paths["init"] / "rows" / f"{m}.safetensors")
        conv = M.bits_per_byte(model, tok, texts, desc=m, **kw)
        with torch.no_grad():  # the old convention: the target's start token takes the source's BOS (chat) row
            model.get_input_embeddings().weight[t_start] = emb[old_id]
        rows[m] = {"convention": conv, "old": M.bits_per_byte(model, tok, texts, desc=f"{m} old", **kw)}
    table = {}
    print(f"{len(texts)} eval documents; source start: convention id {conv_id} "
          f"({src_tok.convert_ids_to_tokens(conv_id)}), old id {old_id} ({src_tok.convert_ids_to_tokens(old_id)})")
    print("| model | convention | start from the source's <|im_start|> row | old - convention (paired 95%) |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        d, ci = stats.paired_bpb_difference(r["old"]["doc_bits"], r["convention"]["doc_bits"], r["old"]["doc_bytes"])
        table[name] = {"convention": r["convention"]["bpb"], "old": r["old"]["bpb"], "old_minus_convention": d,
                       "ci95": ci}
        print(f"| {name} | {r['convention']['bpb']:.4f} | {r['old']['bpb']:.4f} | {d:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}] |")
    if a.out:
        Path(a.out).write_text(json.dumps({"docs": len(texts), "init_info": old_rows.get("start_token"),
                                           "rows": table}, indent=1))


if __name__ == "__main__":
    main()
