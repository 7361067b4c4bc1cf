"""Where an initialised model's extra bits go: the dev text cut into chunks at the byte offsets where the source
and the target tokenizations both have a token boundary, each chunk's bits under the source model (source
tokenizer) and under an init method (target tokenizer), summed by the chunk's kind.

Kinds: ``same`` (one token on each side, a gold token: the same bytes in both vocabularies), ``src1:tgt2`` (one
source token split by the target into two gold tokens), ``src2:tgt1:new`` (two source tokens merged into one new
target token), and so on (counts above 3 are written 3; ``:new`` when a target token of the chunk is new). The
excess of a kind is its target bits minus its source bits. Scored on the DEV split of a finished run (never the
evaluation documents), each document's first ``--max-tokens`` tokens after the start token on both sides.

    python scripts/excess_bits.py --run <run dir> --methods fvt tokalign --out scripts/results/excess_bits.json

``--run`` is a finished ``python -m tokalign`` run directory (its ``summary.json`` names the cached stages).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokalign import metrics as M  # noqa: E402
from tokalign import refs  # noqa: E402
from tokalign.artifacts import read_texts  # noqa: E402
from tokalign.alignment import HOW_SPECIAL  # noqa: E402
from tokalign.stages.evaluate import apply_rows  # noqa: E402


def chunk_kinds(src_ends: Sequence[int], tgt_ends: Sequence[int], tgt_new: Sequence[bool]) -> list[tuple[str, int, int, int]]:
    """Chunks of one text from both sides' token end offsets (bytes, increasing): ``(kind, bytes, number of source
    tokens, number of target tokens)`` per chunk, in order; a chunk ends where both sides end a token."""
    common = sorted(set(src_ends) & set(tgt_ends))
    out, i, j, prev = [], 0, 0, 0
    for end in common:
        i0, j0 = i, j
        while i < len(src_ends) and src_ends[i] <= end:
            i += 1
        while j < len(tgt_ends) and tgt_ends[j] <= end:
            j += 1
        ns, nt, new = i - i0, j - j0, any(tgt_new[j0:j])
        kind = "same" if ns == 1 and nt == 1 and not new else f"src{min(ns, 3)}:tgt{min(nt, 3)}{':new' if new else ''}"
        out.append((kind, end - prev, ns, nt))
        prev = end
    return out


def start_of(tok) -> int:
    """The token every document is scored after; without one the first token has no prediction to score."""
    start = M.start_token_id(tok)
    if start is None:
        sys.exit(f"excess_bits: {getattr(tok, 'name_or_path', 'tokenizer')} has no start token to score after")
    return start


def token_bits(model, tok, text: str, max_tokens: int, start: int) -> tuple[np.ndarray, list[int], list[int]]:
    """Bits of each token of ``text`` after ``start``, the token ids and their end offsets in bytes."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"][:max_tokens]
    ends = [len(text[:e].encode("utf-8")) for _, e in enc["offset_mapping"][:max_tokens]]
    x = torch.tensor([[start] + ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(x).logits[0].float(), dim=-1)[-len(ids) - 1:-1]
    bits = -logp.gather(1, torch.tensor(ids)[:, None])[:, 0].numpy() / math.log(2)
    return bits, ids, ends


def tally(texts: list[str], src_scored: list, tgt_scored: list, new: np.ndarray) -> dict[str, dict]:
    acc: dict[str, dict] = defaultdict(lambda: {"chunks": 0, "bytes": 0, "source_bits": 0.0, "target_bits": 0.0})
    for (sb, _, se), (tb, tids, te) in zip(src_scored, tgt_scored):
        limit = min(se[-1] if se else 0, te[-1] if te else 0)  # both sides scored up to here
        i = j = 0
        for kind, nbytes, ns, nt in chunk_kinds([e for e in se if e <= limit], [e for e in te if e <= limit],
                                                [bool(new[t]) for t in tids]):
            a = acc[kind]
            a["chunks"] += 1
            a["bytes"] += nbytes
            a["source_bits"] += float(sb[i:i + ns].sum())
            a["target_bits"] += float(tb[j:j + nt].sum())
            i, j = i + ns, j + nt
    return dict(acc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--methods", nargs="+", default=["fvt", "tokalign"])
    ap.add_argument("--docs", type=int, default=0, help="first N dev documents (0 = all)")
    ap.add_argument("--max-tokens", type=int, default=1000)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    stages = {k: Path(v["path"]) for k, v in json.loads((Path(a.run) / "summary.json").read_text())["stages"].items()
              if v.get("path")}
    texts = read_texts(stages["corpus"] / "dev.jsonl", a.docs)
    src_tok = refs.load_tokenizer(str(stages["source"] / "model"))
    src = refs.load_model(str(stages["source"] / "model"), dtype="float32").eval()
    src_start = start_of(src_tok)
    src_scored = [token_bits(src, src_tok, t, a.max_tokens, src_start) for t in texts]
    tok = refs.load_tokenizer(str(stages["tokenize"] / "target_tokenizer"))
    tgt_start = start_of(tok)
    z = np.load(stages["align"] / "alignment.npz")
    new = (z["gold"] < 0) & (z["how"] != HOW_SPECIAL)
    model = refs.load_model(str(stages["init"] / "model"), dtype="float32").eval()
    result = {"run": a.run, "docs": len(texts), "methods": {}}
    for m in a.methods:
        apply_rows(model, stages["init"] / "rows" / f"{m}.safetensors")
        acc = tally(texts, src_scored, [token_bits(model, tok, t, a.max_tokens, tgt_start) for t in texts], new)
        excess = sum(k["target_bits"] - k["source_bits"] for k in acc.values())
        nbytes = sum(k["bytes"] for k in acc.values())
        result["methods"][m] = {"bytes": nbytes, "excess_bits": excess, "kinds": acc,
                                "source_bpb": sum(k["source_bits"] for k in acc.values()) / nbytes,
                                "target_bpb": sum(k["target_bits"] for k in acc.values()) / nbytes}
        print(f"\n{m}: source {result['methods'][m]['source_bpb']:.4f}, {m} {result['methods'][m]['target_bpb']:.4f} "
              f"bits per byte on {nbytes} bytes ({len(texts)} dev documents)")
        print("| chunk kind | chunks | bytes | source bits | target bits | excess bits | share of the excess | excess per chunk |")
        print("|---|---|---|---|---|---|---|---|")
        for kind, k in sorted(acc.items(), key=lambda kv: kv[1]["source_bits"] - kv[1]["target_bits"]):
            d = k["target_bits"] - k["source_bits"]
            print(f"| {kind} | {k['chunks']} | {k['bytes']} | {k['source_bits']:.0f} | {k['target_bits']:.0f} | {d:+.0f} "
                  f"| {d / excess:.1%} | {d / k['chunks']:+.2f} |")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
