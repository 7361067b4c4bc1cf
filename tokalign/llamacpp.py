"""llama.cpp's own tools, driven from Python: its converter (``convert_hf_to_gguf.py``), its quantizer and its
runtime (``llama-cpp-python``), for stage ``export`` and ``python -m tokalign.serve``.

Nothing here re-implements llama.cpp: a Hugging Face folder becomes a GGUF through the converter of the llama.cpp
that ``llama-cpp-python`` was built from (``scripts/install_llama_cpp.sh`` installs both from one source
distribution), k-quants come from ``llama_model_quantize``, and every check runs the GGUF in llama.cpp itself:

* ``tokenization_mismatches``: llama.cpp's tokens against the Hugging Face tokenizer's on the same strings;
* ``gguf_bits_per_byte``: bits per byte with exactly the conventions of ``tokalign.metrics.bits_per_byte`` (the same
  start token, the same strided windows), so a GGUF's figure compares with its Hugging Face model's document by
  document;
* ``speed``: prompt and generation tokens per second on this machine.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from tokalign import metrics as M
from tokalign.errors import TokalignError

log = logging.getLogger(__name__)

CONVERTER_ENV = "TOKALIGN_LLAMA_CPP"  # folder holding convert_hf_to_gguf.py (with its conversion/ and gguf-py/)
DEFAULT_HOME = Path("~/.cache/tokalign/llama.cpp")
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # what convert_hf_to_gguf.py writes itself
INSTALL_HINT = "bash scripts/install_llama_cpp.sh"
AMX_ENV = "TOKALIGN_LLAMA_CPP_AMX"  # 1: use a llama.cpp built with AMX despite the crash it had here


class ExportError(TokalignError, ValueError):
    """A model, tokenizer or setting llama.cpp's tools cannot take; the message names it and what to do."""


def llama_cpp_module() -> Any:
    try:
        import llama_cpp
    except ImportError as e:
        raise ExportError(f"llama-cpp-python is not installed (needed to quantize, check and serve GGUF files): "
                          f"run `{INSTALL_HINT}`") from e
    if b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info() and os.environ.get(AMX_ENV) != "1":
        raise ExportError(f"llama-cpp-python {llama_cpp.__version__} was built with AMX (a native build on an AMX CPU), "
                          f"whose quantized matmul crashes (SIGSEGV) on the demo model's GGUFs: rebuild it with "
                          f"`{INSTALL_HINT}` (GGML_NATIVE=OFF), or set {AMX_ENV}=1 to use it anyway")
    return llama_cpp


def find_converter(explicit: Optional[str] = None) -> Path:
    """``convert_hf_to_gguf.py``: ``explicit``, else ``$TOKALIGN_LLAMA_CPP/``, else ``~/.cache/tokalign/llama.cpp/``."""
    if explicit:
        p = Path(explicit).expanduser()
        if not p.is_file():
            raise ExportError(f"export.converter={explicit}: no such file (expected llama.cpp's convert_hf_to_gguf.py)")
        return p
    home = Path(os.environ.get(CONVERTER_ENV) or DEFAULT_HOME).expanduser()
    p = home / "convert_hf_to_gguf.py"
    if not p.is_file():
        raise ExportError(f"{p}: llama.cpp's converter not found: run `{INSTALL_HINT}` (or set export.converter="
                          f"/path/to/convert_hf_to_gguf.py, or ${CONVERTER_ENV})")
    return p


def _converter_error(hf_dir: Path, stderr: str) -> str:
    """The one line a user needs from a failed conversion."""
    if "BPE pre-tokenizer was not recognized" in stderr:
        h = re.search(r"chkhsh:\s*([0-9a-f]{64})", stderr)
        return (f"{hf_dir / 'tokenizer.json'}: llama.cpp's converter does not recognise this BPE pre-tokenizer"
                f"{f' (hash {h.group(1)[:12]})' if h else ''}, so a GGUF would tokenize differently from Hugging Face: "
                "use a target tokenizer of a family llama.cpp knows (its convert_hf_to_gguf_update.py lists them), or "
                "set export.gguf_types=[] to keep only the Hugging Face export")
    m = re.search(r"Architecture '?([\w]+)'? not supported", stderr) or re.search(r"Model (\w+) is not supported", stderr)
    if m:
        return (f"{hf_dir / 'config.json'}: architecture {m.group(1)} is not supported by llama.cpp's converter; "
                "set export.gguf_types=[] to keep only the Hugging Face export")
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    return f"{hf_dir}: llama.cpp's converter failed: {lines[-1] if lines else 'no message'}"


def convert(hf_dir: Path, out_file: Path, outtype: str = "f16", converter: Optional[str] = None,
            timeout: int = 1800) -> Path:
    """``convert_hf_to_gguf.py hf_dir --outfile out_file --outtype outtype`` (a subprocess: the converter imports its
    own ``gguf`` package); the output is written beside and renamed into place only when complete."""
    if outtype not in CONVERTER_TYPES:
        raise ExportError(f"convert: outtype {outtype!r} is not one the converter writes ({', '.join(CONVERTER_TYPES)})")
    script = find_converter(converter)
    tmp = out_file.with_name(out_file.name + ".partial")
    cmd = [sys.executable, str(script), str(hf_dir), "--outfile", str(tmp), "--outtype", outtype]
    log.info("export: %s", " ".join(cmd))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(script.parent / "gguf-py"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise ExportError(_converter_error(hf_dir, r.stderr + r.stdout))
    spm_scores_from_merges(tmp, hf_dir / "tokenizer.json")
    os.replace(tmp, out_file)
    return out_file


def spm_scores_from_merges(gguf_path: Path, tokenizer_json: Path) -> int:
    """Give a SentencePiece-style vocabulary (``tokenizer.ggml.model = llama``) the piece scores llama.cpp merges by.

    A folder with only a ``tokenizer.json`` (no ``tokenizer.model``: what a tokenizer read from a GGUF saves) goes
    through the converter's ``tokenizer.json`` path, which writes the same score for every piece, so llama.cpp would
    merge in the wrong order. Each normal piece gets minus the rank of the merge that makes it (earlier merges
    first, as in the BPE model), edited in place in the GGUF. Returns the number of scores set (0: not needed)."""
    import json

    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path), "r+")
    f = reader.fields
    model = f.get("tokenizer.ggml.model")
    if model is None or bytes(model.parts[model.data[0]]).decode() != "llama" or not tokenizer_json.is_file():
        return 0
    scores, types = f["tokenizer.ggml.scores"], f["tokenizer.ggml.token_type"]
    values = np.array([scores.parts[i][0] for i in scores.data])
    if len(np.unique(values[values > -1e4])) > 1:  # real scores already (a tokenizer.model was there)
        return 0
    bpe = json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]
    vocab, merges = bpe.get("vocab", {}), bpe.get("merges", [])
    rank: dict[int, float] = {}
    for r, m in enumerate(merges):
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        rank.setdefault(vocab.get(a + b, -1), -float(r))
    n = 0
    for i, idx in enumerate(scores.data):
        if int(types.parts[types.data[i]][0]) == 1:  # a normal piece (not control, byte or user-defined)
            scores.parts[idx][0] = rank.get(i, -float(len(merges)))
            n += 1
    reader.data.flush()
    return n


def quant_types() -> dict[str, int]:
    """llama.cpp's file types by lower-case name (``q4_k_m`` -> ``LLAMA_FTYPE_MOSTLY_Q4_K_M``)."""
    lc = llama_cpp_module()
    prefix = "LLAMA_FTYPE_MOSTLY_"
    return {k[len(prefix):].lower(): int(getattr(lc, k)) for k in dir(lc) if k.startswith(prefix)}


def check_types(types: Sequence[str]) -> None:
    """Every requested type is one the converter writes or llama.cpp's quantizer knows (a one-line error otherwise)."""
    known = set(CONVERTER_TYPES) | set(quant_types())
    bad = [t for t in types if t not in known]
    if bad:
        raise ExportError(f"export.gguf_types: {', '.join(map(repr, bad))} not known to llama.cpp (expected some of "
                          f"{', '.join(sorted(known))})")


def quantize(src: Path, dst: Path, qtype: str, threads: int = 0) -> Path:
    """``llama_model_quantize(src -> dst)`` to ``qtype`` (e.g. ``q4_k_m``); written beside, renamed when complete."""
    lc = llama_cpp_module()
    types = quant_types()
    if qtype not in types:
        raise ExportError(f"export.gguf_types: {qtype!r} is not a llama.cpp quant type (expected one of "
                          f"{', '.join(sorted(types))})")
    params = lc.llama_model_quantize_default_params()
    params.ftype = types[qtype]
    params.nthread = threads
    tmp = dst.with_name(dst.name + ".partial")
    rc = lc.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise ExportError(f"{src}: llama.cpp's quantizer failed for {qtype} (return code {rc})")
    os.replace(tmp, dst)
    return dst


def load(path: Path, n_ctx: int = 512, threads: int = 0, vocab_only: bool = False, logits_all: bool = False) -> Any:
    """A ``llama_cpp.Llama`` on ``path`` (quiet)."""
    lc = llama_cpp_module()
    if not Path(path).is_file():
        raise ExportError(f"{path}: no such GGUF file")
    kw: dict[str, Any] = dict(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, verbose=False,
                              vocab_only=vocab_only, logits_all=logits_all)
    if threads > 0:
        kw.update(n_threads=threads, n_threads_batch=threads)
    try:
        return lc.Llama(**kw)
    except ValueError as e:
        raise ExportError(f"{path}: llama.cpp cannot load it ({e})") from e


def tokenization_mismatches(llm: Any, tokenizer: Any, texts: Sequence[str]) -> list[dict]:
    """Texts that llama.cpp and the Hugging Face tokenizer split differently (no special tokens added, none parsed)."""
    bad = []
    for i, t in enumerate(texts):
        hf = list(tokenizer(t, add_special_tokens=False)["input_ids"])
        lc = list(llm.tokenize(t.encode("utf-8"), add_bos=False, special=False))
        if hf != lc:
            bad.append({"index": i, "text": t[:80], "hf": hf[:16], "llama.cpp": lc[:16]})
    return bad


def read_test_strings(path: Path) -> list[str]:
    """llama.cpp's tokenizer test strings: the ``.inp`` file beside a vocab GGUF, cases separated by
    ``__ggml_vocab_test__`` lines (the format of llama.cpp's ``tests/test-tokenizer-0``)."""
    raw = Path(path).read_text(encoding="utf-8")
    cases = raw.split("\n__ggml_vocab_test__\n")
    cases[-1] = cases[-1].removesuffix("\n__ggml_vocab_test__\n").removesuffix("\n__ggml_vocab_test__")
    return [c for c in cases if c != ""]


def _window_nll(llm: Any, window: Sequence[int], first: int) -> float:
    """Negative log-likelihood (nats) of ``window[first:]`` given what precedes it in the window."""
    from scipy.special import logsumexp

    llm.reset()
    llm.eval(list(window))
    logits = np.asarray(llm.scores[first - 1 : len(window) - 1], dtype=np.float64)
    targets = np.asarray(window[first:])
    return float((logsumexp(logits, axis=1) - logits[np.arange(len(targets)), targets]).sum())


def gguf_bits_per_byte(llm: Any, tokenizer: Any, texts: Sequence[str], *, seq_len: int, stride: int) -> dict:
    """Bits per byte of ``texts`` under a GGUF model (``load(..., logits_all=True)``, ``n_ctx >= seq_len``), with the
    Hugging Face ``tokenizer``'s tokens and ``metrics.bits_per_byte``'s start token and windows: the result has the
    same ``doc_bits``/``doc_bytes`` fields, so intervals and paired differences use ``tokalign.stats`` as for HF."""
    start = M.start_token_id(tokenizer)
    seq_len = min(seq_len, llm.n_ctx())
    stride = min(stride, seq_len)
    doc_bits, doc_bytes, scored = [], [], 0
    t0 = time.time()
    for t in texts:
        ids = list(tokenizer(t, add_special_tokens=False)["input_ids"])
        s = ([start] if start is not None else []) + ids
        nll = sum(_window_nll(llm, s[b:e], f - b) for b, e, f in M.make_windows(s, seq_len, stride))
        scored += max(len(s) - 1, 0)
        doc_bits.append(nll / M.LN2)
        doc_bytes.append(len(t.encode("utf-8")))
    secs = time.time() - t0
    return {"doc_bits": doc_bits, "doc_bytes": doc_bytes, "bpb": sum(doc_bits) / max(sum(doc_bytes), 1),
            "tokens": scored, "docs": len(texts), "seconds": secs, "tokens_per_s": scored / max(secs, 1e-9)}


def speed(llm: Any, tokenizer: Any, text: str, prompt_tokens: int = 256, gen_tokens: int = 32) -> dict:
    """Prompt-processing and generation tokens per second of a loaded GGUF model on ``text`` (greedy decoding;
    generation is timed from the first new token on, so it excludes the prompt)."""
    prompt_tokens = max(1, min(prompt_tokens, llm.n_ctx() - gen_tokens - 2))  # prompt and answer fit the context
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])[:prompt_tokens]
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    t_prompt = time.perf_counter() - t0
    llm.reset()
    n, t1 = 0, None
    for tok in llm.generate(ids, temp=0.0, reset=True):
        if t1 is None:
            t1 = time.perf_counter()
        n += 1
        if n > gen_tokens:
            break
    t_gen = time.perf_counter() - t1 if t1 is not None else 0.0
    return {"prompt_tokens_per_s": len(ids) / max(t_prompt, 1e-9),
            "gen_tokens_per_s": (n - 1) / t_gen if n > 1 and t_gen > 0 else None,
            "prompt_tokens": len(ids), "gen_tokens": max(n - 1, 0)}
