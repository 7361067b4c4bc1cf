"""How much probability a tied head's new rows take from the tokens that actually come next, per init method.

With tied embeddings every new row (a token without a gold match) is also an output row, and a multi-piece
token's row sits near its own first piece: at a position where the next token is an old (gold) token, the
new rows together take some of the mass the source model would have given it. This measures, on the DEV split
of a finished run (never the evaluation documents):

* ``mass_new_at_gold``: mean total probability of all new tokens at positions whose next token is gold;
* ``new_beats_first_share``: at positions whose next token is a new multi-piece token, the share where that
  token outranks the old token equal to its first piece (the tied row must let the whole token win where it
  is right);
* bits per byte split into the positions predicting gold and new tokens.

    python scripts/stolen_mass.py --run outputs/<day>/<time> --methods fvt tokalign --out scripts/results/stolen_mass.json

``--run`` is a finished ``python -m tokalign`` run directory (its ``summary.json`` names the cached stages).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokalign import metrics as M  # noqa: E402
from tokalign import refs  # noqa: E402
from tokalign.artifacts import read_texts  # noqa: E402
from tokalign.stages.evaluate import apply_rows  # noqa: E402


def position_stats(model, tok, texts: list[str], new: np.ndarray, first: np.ndarray, seq_len: int) -> dict:
    """Sums over next-token positions of each document's first ``seq_len`` tokens (after the start token)."""
    start = M.start_token_id(tok)
    new_t = torch.from_numpy(new)
    acc = {"gold_pos": 0, "new_pos": 0, "sum_mass_new_at_gold": 0.0, "new_beats_first": 0, "new_multi_pos": 0,
           "bits_gold": 0.0, "bits_new": 0.0}
    with torch.no_grad():
        for text in texts:
            ids = ([start] if start is not None else []) + tok(text, add_special_tokens=False)["input_ids"][:seq_len]
            x = torch.tensor([ids])
            logp = torch.log_softmax(model(x).logits[0, :-1].float(), dim=-1)
            nxt = x[0, 1:]
            is_new = new_t[nxt]
            p_new = logp[:, new_t].exp().sum(-1)
            gold = ~is_new
            acc["gold_pos"] += int(gold.sum())
            acc["new_pos"] += int(is_new.sum())
            acc["sum_mass_new_at_gold"] += float(p_new[gold].sum())
            lp = logp.gather(1, nxt[:, None])[:, 0]
            acc["bits_gold"] += float(-lp[gold].sum()) / math.log(2)
            acc["bits_new"] += float(-lp[is_new].sum()) / math.log(2)
            fp = torch.from_numpy(first)[nxt]
            multi = is_new & (fp >= 0)
            if multi.any():
                rows = torch.nonzero(multi)[:, 0]
                acc["new_multi_pos"] += int(multi.sum())
                acc["new_beats_first"] += int((lp[rows] > logp[rows, fp[rows]]).sum())
    return acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--methods", nargs="+", default=["fvt", "tokalign"])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--docs", type=int, default=0, help="first N dev documents (0 = all)")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    stages = {k: Path(v["path"]) for k, v in json.loads((Path(a.run) / "summary.json").read_text())["stages"].items()
              if v.get("path")}
    tok = refs.load_tokenizer(str(stages["tokenize"] / "target_tokenizer"))
    z = np.load(stages["align"] / "alignment.npz")
    how, indptr, ind, gold = z["how"], z["fvt_indptr"], z["fvt_indices"], z["gold"]
    new = (gold < 0) & (how != 3)
    # the target token whose canonical form is the new token's first source piece (-1: none)
    src_to_tgt = {int(s): t for t, s in enumerate(gold) if s >= 0}
    lens = np.diff(indptr)
    first = np.array([src_to_tgt.get(int(ind[indptr[t]]), -1) if new[t] and lens[t] > 1 else -1
                      for t in range(len(how))], dtype=np.int64)
    texts = read_texts(stages["corpus"] / "dev.jsonl", a.docs)
    model = refs.load_model(str(stages["init"] / "model"), dtype="float32").eval()
    rows = {}
    for m in a.methods:
        apply_rows(model, stages["init"] / "rows" / f"{m}.safetensors")
        s = position_stats(model, tok, texts, new, first, a.seq_len)
        rows[m] = {"mass_new_at_gold": s["sum_mass_new_at_gold"] / max(s["gold_pos"], 1),
                   "new_beats_first_share": s["new_beats_first"] / max(s["new_multi_pos"], 1),
                   "bits_per_gold_position": s["bits_gold"] / max(s["gold_pos"], 1),
                   "bits_per_new_position": s["bits_new"] / max(s["new_pos"], 1), **s}
        print(f"{m}: {json.dumps({k: round(v, 4) for k, v in rows[m].items()})}", file=sys.stderr)
    print("\n| method | mass on new tokens where a gold token comes next | new multi-piece token outranks its first "
          "piece where it comes next | bits per gold position | bits per new position |")
    print("|---|---|---|---|---|")
    for m, r in rows.items():
        print(f"| {m} | {r['mass_new_at_gold']:.4f} | {r['new_beats_first_share']:.3f} ({r['new_multi_pos']} positions) "
              f"| {r['bits_per_gold_position']:.3f} ({r['gold_pos']}) | {r['bits_per_new_position']:.3f} ({r['new_pos']}) |")
    if a.out:
        Path(a.out).write_text(json.dumps({"run": a.run, "docs": len(texts), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
