"""The export of a finished run, measured: per GGUF type its size, bits per byte in llama.cpp against the Hugging Face
export (paired 95% interval over the same held-out documents), prompt and generation tokens per second, the export
stages' wall time, and how long llama.cpp's server takes from start to its first chat answer.

    python -m tokalign export.enabled=true hydra.run.dir=/tmp/run      # the demo, exported (stages export, export_gguf)
    python scripts/bench_export.py /tmp/run                            # table + scripts/results/export.json

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tokalign.artifacts import write_json
from tokalign.serve import resolve_gguf

RESULTS = Path(__file__).resolve().parent / "results"


def first_answer_seconds(gguf: Path, timeout: float = 120.0) -> dict:
    """Start ``python -m tokalign.serve`` on ``gguf`` and time it until ``/v1/chat/completions`` answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    body = json.dumps({"messages": [{"role": "user", "content": "What is hypertension?"}], "max_tokens": 32}).encode()
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "tokalign.serve", str(gguf), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.time() - t0 < timeout:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=60) as r:
                    answer = json.loads(r.read())
                return {"file": gguf.name, "seconds_to_first_answer": time.time() - t0,
                        "answer": answer["choices"][0]["message"]["content"], "usage": answer["usage"]}
            except OSError:
                time.sleep(0.1)
        raise SystemExit(f"{gguf}: the server did not answer within {timeout:.0f} s")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path, help="a run directory whose stages export and export_gguf ran")
    ap.add_argument("--serve-type", default="q8_0", help="GGUF type the server is timed on (default q8_0)")
    ap.add_argument("--out", type=Path, default=RESULTS / "export.json")
    args = ap.parse_args()
    stages = args.run_dir / "stages"
    report = json.loads((stages / "export_gguf" / "report.json").read_text())
    seconds = {s: json.loads((args.run_dir / f"{s}.json").read_text()).get("seconds") for s in ("export", "export_gguf")}
    serve = first_answer_seconds(resolve_gguf(str(args.run_dir), args.serve_type))
    print(f"Hugging Face export: bpb {report['hf']['bpb']:.4f} on {report['hf']['docs']} held-out documents")
    print(f"{'type':8} {'MB':>7} {'bpb':>7} {'vs HF':>8} {'95% interval':>20} {'prompt t/s':>10} {'gen t/s':>8}")
    for t, r in report["gguf"].items():
        lo, hi = r["bpb_vs_hf_ci95"]
        print(f"{t:8} {r['bytes'] / 1e6:7.1f} {r['bpb']:7.4f} {r['bpb_vs_hf']:+8.4f} {f'[{lo:+.4f}, {hi:+.4f}]':>20} "
              f"{r['prompt_tokens_per_s']:10.0f} {r['gen_tokens_per_s'] or 0:8.1f}")
    print(f"export stages: {seconds}; server on {serve['file']}: first chat answer after "
          f"{serve['seconds_to_first_answer']:.1f} s")
    write_json(args.out, {"run_dir": str(args.run_dir), "report": report, "stage_seconds": seconds, "serve": serve})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
