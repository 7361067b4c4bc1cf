"""scripts/excess_bits.py: chunks where both tokenizations end a token, and their kinds (no model runs here)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import excess_bits as X  # noqa: E402


def test_chunk_kinds_by_hand():
    # bytes: "ab" "c" | source: [ab][c] ; target [a][b][c]  -> one source token split in two, then the same token
    assert X.chunk_kinds([2, 3], [1, 2, 3], [False, False, False]) == [("src1:tgt2", 2, 1, 2), ("same", 1, 1, 1)]
    # source [a][b][cd], target [ab] (new) [c][d]: a merge into a new token, then a split
    assert X.chunk_kinds([1, 2, 4], [2, 3, 4], [True, False, False]) == [("src2:tgt1:new", 2, 2, 1),
                                                                        ("src1:tgt2", 2, 1, 2)]
    # a new single token with the same bytes as one source token is not "same"; long runs are capped at 3
    assert X.chunk_kinds([1, 5], [1, 2, 3, 4, 5], [True, False, False, False, False]) == [
        ("src1:tgt1:new", 1, 1, 1), ("src1:tgt3", 4, 1, 4)]


def test_tally_sums_bits_per_kind():
    src = [(np.array([1.0, 2.0]), [7, 8], [2, 3])]
    tgt = [(np.array([0.5, 4.0, 2.5]), [0, 1, 2], [1, 2, 3])]
    acc = X.tally(["abc"], src, tgt, np.array([False, False, False]))
    assert acc["src1:tgt2"] == {"chunks": 1, "bytes": 2, "source_bits": 1.0, "target_bits": 4.5}
    assert acc["same"] == {"chunks": 1, "bytes": 1, "source_bits": 2.0, "target_bits": 2.5}
