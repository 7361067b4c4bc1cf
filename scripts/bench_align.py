"""Benchmark of the alignment core: relative representations + blocked scoring + top-k.

For each target vocabulary size (default 32k, 50k, 128k, 152k, 256k) against a 49,152-token
source, with random fastText-like vectors (dim 100, fixed seed) and 300 pivots, it times
``relative_factors`` + ``score_alignment`` with plain cosine and with CSLS (csls_k=10, top_k=2 as
the ``align`` stage uses it with ``alignment.top_k=1``: the runner-up gives the confidence margin;
block_size=4096) and measures peak memory two ways:

* ``traced_peak_mb``: tracemalloc's peak of Python/numpy allocations made by the core (numpy
  reports its buffers to tracemalloc; BLAS scratch space is not included), above what existed
  before the core started (the input vectors);
* ``maxrss_mb``: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of the child process that ran
  that one case (each case runs in a fresh process, so it is that case's whole-process peak,
  interpreter, numpy and the inputs included).

Run (2 cores, about 3 minutes):

    python scripts/bench_align.py --out bench_align.json

    python scripts/bench_align.py --sizes 32000 152064 --scorings csls --out /tmp/b.json   # a subset
    python scripts/bench_align.py --sizes 256000 --scorings csls --sparse-atoms 40000 --out scripts/results/bench_align_sparse.json

Prints a markdown table and writes the rows as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_SIZES = [32000, 50257, 128256, 152064, 256000]


def run_case(n_target: int, n_source: int, dim: int, pivots: int, scoring: str, block: int, seed: int,
             top_k: int = 2, sparse_atoms: int = 0, sparse_candidates: int = 256) -> dict:
    """One case, in this process."""
    from tokalign import alignment as A

    rng = np.random.default_rng(seed)
    t = rng.standard_normal((n_target, dim), dtype=np.float32)
    s = rng.standard_normal((n_source, dim), dtype=np.float32)
    pt = rng.choice(n_target, pivots, replace=False)
    ps = rng.choice(n_source, pivots, replace=False)
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    t0 = time.perf_counter()
    a, b = A.relative_factors(t, s, t[pt], s[ps])
    t1 = time.perf_counter()
    sc = A.score_alignment(a, b, scoring=scoring, top_k=top_k, csls_k=10, block_size=block)
    t2 = time.perf_counter()
    if sparse_atoms:  # FOCUS + OMP: the other target tokens over the first sparse_atoms as overlapping tokens
        A.sparse_combinations(t[sparse_atoms:], t[:sparse_atoms], focus_k=64, omp_k=8, candidates=sparse_candidates,
                              block_size=block)
    t3 = time.perf_counter()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    hub = A.hub_stats(sc.top_idx[:, 0], n_source)
    return {
        "target_vocab": n_target, "source_vocab": n_source, "dim": dim, "pivots": pivots, "scoring": scoring,
        "top_k": top_k,
        "block_size": block, "factor_s": round(t1 - t0, 3), "score_s": round(t2 - t1, 3),
        "sparse_atoms": sparse_atoms, "sparse_candidates": sparse_candidates, "sparse_s": round(t3 - t2, 3),
        "total_s": round(t3 - t0, 3), "traced_peak_mb": round((peak - base) / 2**20, 1),
        "maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "max_hub_size": hub["max_hub_size"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES, help="target vocabulary sizes")
    p.add_argument("--source", type=int, default=49152, help="source vocabulary size")
    p.add_argument("--dim", type=int, default=100)
    p.add_argument("--pivots", type=int, default=300)
    p.add_argument("--block", type=int, default=4096)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--scorings", nargs="+", default=["cos", "csls"], choices=["cos", "csls"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sparse-atoms", type=int, default=0,
                   help="also time FOCUS + OMP (stage align) with this many overlapping tokens, the rest as new tokens")
    p.add_argument("--sparse-candidates", type=int, default=256, help="alignment.sparse_candidates")
    p.add_argument("--out", default="bench_align.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:  # one case, result as JSON on stdout
        res = run_case(args.sizes[0], args.source, args.dim, args.pivots, args.scorings[0], args.block, args.seed,
                       args.top_k, args.sparse_atoms, args.sparse_candidates)
        print(json.dumps(res))
        return 0

    load_start = os.getloadavg()  # other processes on the machine skew the timings: recorded with them
    rows = []
    for n in args.sizes:
        for sc in args.scorings:
            cmd = [sys.executable, __file__, "--child", "--sizes", str(n), "--source", str(args.source), "--dim",
                   str(args.dim), "--pivots", str(args.pivots), "--block", str(args.block), "--top-k", str(args.top_k),
                   "--scorings", sc, "--sparse-atoms", str(args.sparse_atoms),
                   "--sparse-candidates", str(args.sparse_candidates),
                   "--seed", str(args.seed)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=str(ROOT))
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"  {n:>7} {sc:4s} {row['total_s']:7.1f} s  traced {row['traced_peak_mb']:7.1f} MB  "
                  f"maxrss {row['maxrss_mb']:7.1f} MB", file=sys.stderr, flush=True)

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    threads = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS") if k in os.environ}
    env = {"cpus": os.cpu_count(), "affinity": affinity, "python": platform.python_version(), "numpy": np.__version__,
           "machine": platform.machine(), "threads_env": threads, "load_avg_start": load_start,
           "load_avg_end": os.getloadavg()}
    print(f"\nalignment core, source {args.source}, dim {args.dim}, pivots {args.pivots}, block {args.block}, "
          f"top_k {args.top_k}, "
          f"{env['affinity']} CPUs\n")
    print("| target vocab | scoring | factors s | scoring s | FOCUS+OMP s | total s | traced peak MB | maxrss MB | max hub |")
    print("|---:|:---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['target_vocab']:,} | {r['scoring']} | {r['factor_s']:.2f} | {r['score_s']:.1f} | {r['sparse_s']:.1f} "
              f"| {r['total_s']:.1f} | {r['traced_peak_mb']:.0f} | {r['maxrss_mb']:.0f} | {r['max_hub_size']} |")
    Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
