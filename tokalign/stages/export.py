"""Stages ``export`` and ``export_gguf``: ship the run's final model where people already run models.

``export`` (a plain Hugging Face folder) takes the final model of the run: stage 2, else stage 1, else the
initialisation. A PEFT adapter folder (``export.adapter``, or a final model saved as one) is merged into its base with
peft's ``merge_and_unload``. The source model's chat template is carried over with its special tokens mapped to the
new vocabulary (the same string when the target has it, else the target's token of the same role: bos, eos, pad, unk),
and the generation config's stop tokens with it. Writes ``hf/`` (safetensors, tokenizer, generation config) and
``export.json`` (what was mapped, what could not be).

``export_gguf`` converts ``hf/`` with llama.cpp's own ``convert_hf_to_gguf.py`` (f32/f16/bf16/q8_0) and quantizes the
rest (q4_k_m, q5_k_m, ...) from f16 with llama.cpp's quantizer (``tokalign/llamacpp.py``). Every file is checked in
llama.cpp before it is reported: its tokenization must equal the Hugging Face tokenizer's on llama.cpp's test strings
for the vocabulary and on held-out text (else a one-line error; the Hugging Face export stays published), and its
bits per byte on held-out text is compared with the Hugging Face export's, document by document (paired interval).
Writes ``model-<type>.gguf`` and ``report.json`` (size, bits per byte and its change, tokens per second).

A run directory links them as ``stages/export/hf/`` and ``stages/export_gguf/model-<type>.gguf`` (cached or not).

Run:   python -m tokalign export.enabled=true                        (the demo, f16 + q8_0 + q4_k_m)
       python -m tokalign export.enabled=true 'export.gguf_types=[q5_k_m]'
Serve: python -m tokalign.serve outputs/<date>/<time>                (llama.cpp's OpenAI-compatible server)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from tokalign import llamacpp, refs, stats
from tokalign.chat import carry_chat
from tokalign import metrics as M
from tokalign.artifacts import ArtifactError, final_model, scored_texts, write_json
from tokalign.config import Config
from tokalign.context import Context
from tokalign.llamacpp import ExportError
from tokalign.modelfacts import free_memory

log = logging.getLogger(__name__)

def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _adapter_dir(cfg: Config, ctx: Context) -> Optional[str]:
    """``export.adapter``: a domain adapter of this run (``adapters/<domain>/`` of stage ``adapters``), else a folder."""
    name = cfg.export.adapter
    if name and name in cfg.adapters.domains:
        if not ctx.has("adapters"):
            raise ExportError(f"export.adapter={name}: a domain of adapters.domains, but stage 'adapters' did not run "
                              "(set adapters.enabled=true)")
        return str(ctx.path("adapters") / name)
    return name


def run_hf(cfg: Config, ctx: Context, out: Path) -> dict:
    """The final model, merged, with the source's chat template, as a plain Hugging Face folder ``hf/``."""
    name, mdir = final_model(ctx)
    adapter = _adapter_dir(cfg, ctx)
    model, tok_dir = refs.load_merged(mdir, [adapter] if adapter else [], what="export.adapter",
                                      allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code)
    tok = refs.load_tokenizer(str(tok_dir), trust_remote_code=cfg.trust_remote_code)
    info = {"from": name, "model_dir": str(mdir), "adapter": adapter, **carry_chat(model, tok, ctx.path("source") / "model")}
    hf = out / "hf"
    model.save_pretrained(str(hf), safe_serialization=True)
    tok.save_pretrained(str(hf))
    write_json(out / "export.json", info)
    if cfg.wandb.log_model:
        ctx.tracker.artifact("export_hf", "model", [hf])
    log.info("export: %s model -> %s (chat template: %s)", name, hf, info["chat_template"])
    return {"export/from": name, "export/hf_bytes": _folder_bytes(hf), "export/unmapped_specials": len(info["unmapped"])}


# --------------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------------


def make_ggufs(hf: Path, out: Path, types: list[str], converter: Optional[str], threads: int) -> dict[str, Path]:
    """``model-<type>.gguf`` for every type: the converter's own types directly, the others quantized from f16."""
    files: dict[str, Path] = {}
    for t in [t for t in types if t in llamacpp.CONVERTER_TYPES]:
        files[t] = llamacpp.convert(hf, out / f"model-{t}.gguf", t, converter)
    quants = [t for t in types if t not in llamacpp.CONVERTER_TYPES]
    if quants:
        base = files.get("f16") or llamacpp.convert(hf, out / "base-f16.gguf", "f16", converter)
        for t in quants:
            log.info("export: quantizing %s -> %s", base.name, t)
            files[t] = llamacpp.quantize(base, out / f"model-{t}.gguf", t, threads)
        if "f16" not in files:
            base.unlink()
    return {t: files[t] for t in types}


def check_strings(cfg: Config) -> tuple[list[str], Optional[str]]:
    """llama.cpp's tokenizer test strings for the target vocabulary: ``export.test_strings``, else the ``.inp`` file
    beside a ``.gguf`` target tokenizer (llama.cpp's vocab files ship with one), else none."""
    path = cfg.export.test_strings or (cfg.target_tokenizer + ".inp" if str(cfg.target_tokenizer).endswith(".gguf")
                                       else None)
    if cfg.export.test_strings and not Path(path).is_file():
        raise ExportError(f"export.test_strings={path}: no such file (expected llama.cpp's .inp test strings)")
    if not path or not Path(path).is_file():
        return [], None
    return llamacpp.read_test_strings(Path(path)), str(path)


def heldout_texts(cfg: Config, ctx: Context) -> list[str]:
    try:
        return scored_texts(ctx.path("corpus") / "eval.jsonl", cfg.export.eval_samples, cfg.eval.max_doc_bytes)
    except ArtifactError as e:
        raise ExportError(str(e)) from e


def check_tokenization(path: Path, tok: Any, strings: list[str], hf: Path) -> int:
    """A one-line error when llama.cpp splits any check string differently from the Hugging Face tokenizer."""
    vocab = llamacpp.load(path, vocab_only=True)
    bad = llamacpp.tokenization_mismatches(vocab, tok, strings)
    vocab.close()
    if bad:
        raise ExportError(f"{path}: llama.cpp tokenizes {len(bad)} of {len(strings)} check strings differently from "
                          f"the Hugging Face tokenizer (first: {bad[0]['text']!r}: {bad[0]['llama.cpp']} vs "
                          f"{bad[0]['hf']}), so the file is not reported; the Hugging Face export is kept at {hf}")
    return len(strings)


def score_gguf(path: Path, tok: Any, texts: list[str], hf_r: dict, cfg: Config) -> dict:
    """Bits per byte in llama.cpp (paired against the Hugging Face export on the same documents) and speed."""
    llm = llamacpp.load(path, n_ctx=cfg.eval.seq_len, threads=cfg.hardware.torch_threads, logits_all=True)
    r = llamacpp.gguf_bits_per_byte(llm, tok, texts, seq_len=cfg.eval.seq_len, stride=cfg.eval.stride)
    value, ci = stats.bpb_interval(r["doc_bits"], r["doc_bytes"], cfg.seed)
    diff, dci = stats.paired_bpb_difference(r["doc_bits"], hf_r["doc_bits"], r["doc_bytes"], cfg.seed)
    sp = llamacpp.speed(llm, tok, " ".join(texts))
    llm.close()
    return {"file": path.name, "bytes": path.stat().st_size, "bpb": value, "bpb_ci95": ci, "bpb_vs_hf": diff,
            "bpb_vs_hf_ci95": dci, **sp}


def _report_rows(report: dict) -> list[list]:
    return [[t, r["bytes"] / 1e6, r["bpb"], r["bpb_vs_hf"], r["bpb_vs_hf_ci95"][0], r["bpb_vs_hf_ci95"][1],
             r["prompt_tokens_per_s"], r["gen_tokens_per_s"]] for t, r in report["gguf"].items()]


REPORT_COLUMNS = ["type", "MB", "bpb", "bpb_vs_hf", "ci95_low", "ci95_high", "prompt_tok_s", "gen_tok_s"]


def run_gguf(cfg: Config, ctx: Context, out: Path) -> dict:
    """GGUF files of ``export/hf`` by llama.cpp's tools, each checked in llama.cpp; ``report.json``."""
    llamacpp.check_types(cfg.export.gguf_types)
    hf = ctx.path("export") / "hf"
    tok = refs.load_tokenizer(str(hf))
    strings, strings_file = check_strings(cfg)
    texts = heldout_texts(cfg, ctx)
    model = refs.load_model(str(hf), dtype="float32")
    hf_r = M.bits_per_byte(model, tok, texts, seq_len=cfg.eval.seq_len, stride=cfg.eval.stride,
                           batch_size=cfg.eval.batch_size, desc="bpb export/hf")
    del model
    free_memory()
    files = make_ggufs(hf, out, list(cfg.export.gguf_types), cfg.export.converter, cfg.hardware.torch_threads)
    report: dict[str, Any] = {"hf": {"bpb": hf_r["bpb"], "docs": len(texts)}, "test_strings": strings_file, "gguf": {}}
    for t, path in files.items():
        n = check_tokenization(path, tok, strings + texts, hf)
        report["gguf"][t] = {**score_gguf(path, tok, texts, hf_r, cfg), "tokenization_checked": n}
        log.info("export: %s %.1f MB, bpb %.4f (%+.4f vs HF)", t, report["gguf"][t]["bytes"] / 1e6,
                 report["gguf"][t]["bpb"], report["gguf"][t]["bpb_vs_hf"])
    write_json(out / "report.json", report)
    ctx.tracker.table("export", REPORT_COLUMNS, _report_rows(report))
    if cfg.wandb.log_model and files:
        ctx.tracker.artifact("export_gguf", "model", list(files.values()))
    metrics: dict[str, Any] = {"export/hf/bpb": hf_r["bpb"]}
    for t, r in report["gguf"].items():
        metrics.update({f"export/{t}/bpb": r["bpb"], f"export/{t}/bpb_vs_hf": r["bpb_vs_hf"],
                        f"export/{t}/bpb_vs_hf/ci95": r["bpb_vs_hf_ci95"], f"export/{t}/bytes": r["bytes"],
                        f"export/{t}/gen_tokens_per_s": r["gen_tokens_per_s"]})
    return metrics
