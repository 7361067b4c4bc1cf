"""Serve an exported model with llama.cpp's OpenAI-compatible server (``llama-cpp-python[server]``); no server of ours.

    python -m tokalign.serve outputs/2026-12-02/18-00-00     # a run directory: its stages/export_gguf/model-q8_0.gguf
    python -m tokalign.serve path/to/model-q4_k_m.gguf --port 8080
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "What is hypertension?"}], "max_tokens": 64}'

The chat template is the one stage ``export`` wrote into the GGUF (the source model's, mapped to the new vocabulary);
the server reads it from the file. On a GPU, serve the Hugging Face export with vLLM instead:
``vllm serve <run dir>/stages/export/hf --served-model-name tokalign``.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from typing import Optional, Sequence

from tokalign.llamacpp import ExportError, llama_cpp_module

PREFERRED_TYPES = ("q8_0", "f16", "q5_k_m", "q4_k_m", "bf16", "f32")


def resolve_gguf(path: str, gguf_type: Optional[str] = None) -> Path:
    """A GGUF file: ``path`` itself, or in a run directory's ``stages/export_gguf/`` (or any folder holding
    ``model-<type>.gguf``), of ``gguf_type`` (else the first of ``PREFERRED_TYPES`` there)."""
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise ExportError(f"{p}: not a .gguf file (pass a GGUF file, or a run directory with stages/export_gguf/)")
        return p
    if not p.is_dir():
        raise ExportError(f"{p}: no such file or directory (pass a GGUF file, or a run directory with "
                          "stages/export_gguf/)")
    folder = p / "stages" / "export_gguf" if (p / "stages" / "export_gguf").is_dir() else p
    found = {f.name[len("model-"):-len(".gguf")]: f for f in sorted(folder.glob("model-*.gguf"))}
    if not found:
        raise ExportError(f"{folder}: no model-<type>.gguf here (run `python -m tokalign export.enabled=true` first)")
    if gguf_type is not None:
        if gguf_type not in found:
            raise ExportError(f"--type {gguf_type}: no model-{gguf_type}.gguf in {folder} (there: {', '.join(found)})")
        return found[gguf_type]
    return next((found[t] for t in PREFERRED_TYPES if t in found), next(iter(found.values())))


def check_port(host: str, port: int) -> None:
    """A one-line error when ``host:port`` is taken (checked before the server spends seconds loading the model)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ExportError(f"--port {port}: {host}:{port} is in use or not available ({e.strerror}); pass another "
                              "--port") from e


def server_command(gguf: Path, host: str, port: int, n_ctx: int, threads: int) -> list[str]:
    """The ``llama_cpp.server`` command line."""
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", host, "--port", str(port),
           "--n_ctx", str(n_ctx), "--model_alias", "tokalign"]
    return cmd + (["--n_threads", str(threads)] if threads > 0 else [])


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tokalign.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("path", help="a .gguf file, or a run directory (or a folder) holding model-<type>.gguf")
    ap.add_argument("--type", dest="gguf_type", default=None, help="which model-<type>.gguf (default: q8_0, then f16, ...)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    ap.add_argument("--n-ctx", type=int, default=2048, help="context length (default 2048)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: llama.cpp's choice)")
    args = ap.parse_args(argv)
    try:
        gguf = resolve_gguf(args.path, args.gguf_type)
        llama_cpp_module()
        check_port(args.host, args.port)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cmd = server_command(gguf, args.host, args.port, args.n_ctx, args.threads)
    print(f"serving {gguf} at http://{args.host}:{args.port}/v1 (llama.cpp's server: {' '.join(cmd[1:4])})", flush=True)
    os.execv(cmd[0], cmd)  # the server takes over this process: Ctrl-C and signals reach it directly
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
