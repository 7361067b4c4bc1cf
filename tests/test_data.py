"""Packing and ordering of the training data (tokalign/data.py)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from tokalign.artifacts import ArtifactError, load_stream
from tokalign.data import (
    DataError,
    PackedSequences,
    block_of,
    pack_blocks,
    pack_documents,
    pass_permutation,
)

EOS = 99


def _docs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 50, size=n).astype(np.uint32) for n in lengths]
    ids = np.concatenate(docs) if docs else np.zeros(0, np.uint32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return docs, ids, offsets


def test_eos_separates_every_document_and_empty_docs_are_dropped():
    docs, ids, offsets = _docs([3, 0, 5, 1, 4])
    stream = pack_documents(ids, offsets, EOS)
    expected = np.concatenate([np.append(d, EOS) for d in docs if len(d)])
    np.testing.assert_array_equal(stream, expected)
    assert (stream == EOS).sum() == 4  # one per non-empty document, none for the empty one
    # splitting the stream at EOS gives back the documents
    pieces = np.split(stream, np.flatnonzero(stream == EOS) + 1)[:-1]
    assert [list(p[:-1]) for p in pieces] == [list(d) for d in docs if len(d)]


def test_pack_blocks_cuts_constant_length_blocks_and_drops_the_tail():
    _, ids, offsets = _docs([7, 9, 5, 11])  # 32 tokens + 4 EOS = 36
    blocks = pack_blocks(ids, offsets, EOS, seq_len=8)
    assert blocks.shape == (4, 8)
    np.testing.assert_array_equal(blocks.reshape(-1), pack_documents(ids, offsets, EOS)[:32])


def test_pack_blocks_too_little_data_names_the_file():
    _, ids, offsets = _docs([3])
    with pytest.raises(DataError, match="target_ids.npy.*seq_len=16"):
        pack_blocks(ids, offsets, EOS, seq_len=16)


def test_load_stream_checks_offsets(tmp_path):
    _, ids, offsets = _docs([4, 6])
    np.save(tmp_path / "target_ids.npy", ids)
    np.save(tmp_path / "target_offsets.npy", offsets)
    got_ids, got_off = load_stream(tmp_path, "target")
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_off, offsets)
    np.save(tmp_path / "target_offsets.npy", np.array([0, 4, 7]))  # does not end at len(ids)=10
    with pytest.raises(ArtifactError, match="target_offsets.npy"):
        load_stream(tmp_path, "target")
    (tmp_path / "target_ids.npy").unlink()
    with pytest.raises(ArtifactError, match="target_ids.npy: missing"):
        load_stream(tmp_path, "target")


def _blocks(n=10, seq_len=4):
    return np.arange(n * seq_len, dtype=np.uint32).reshape(n, seq_len)


def _seq_ids(ds):
    return [int(ds[k]["input_ids"][0]) // ds.seq_len for k in range(len(ds))]


def test_order_is_a_pure_function_of_seed_and_index():
    blocks = _blocks()
    a = PackedSequences(blocks, seed=3, start_idx=0, length=10)
    b = PackedSequences(blocks, seed=3, start_idx=0, length=10)
    c = PackedSequences(blocks, seed=4, start_idx=0, length=10)
    assert _seq_ids(a) == _seq_ids(b)
    assert _seq_ids(a) != _seq_ids(c)
    assert sorted(_seq_ids(a)) == list(range(10))  # one pass = every block exactly once
    assert _seq_ids(a) != list(range(10))  # shuffled
    assert _seq_ids(a) == [block_of(i, 10, 3) for i in range(10)]
    item = a[0]
    assert item["input_ids"].dtype.is_floating_point is False and str(item["input_ids"].dtype) == "torch.int64"
    assert (item["labels"] == item["input_ids"]).all()


def test_start_offset_is_in_global_sequences():
    blocks = _blocks()
    whole = PackedSequences(blocks, seed=1, start_idx=0, length=25)
    part = PackedSequences(blocks, seed=1, start_idx=7, length=18)
    assert _seq_ids(part) == _seq_ids(whole)[7:]
    # consecutive stretches (stage 1 then stage 2) never repeat or skip
    s1 = PackedSequences(blocks, seed=1, start_idx=0, length=6)
    s2 = PackedSequences(blocks, seed=1, start_idx=6, length=19)
    assert _seq_ids(s1) + _seq_ids(s2) == _seq_ids(whole)


def test_wrap_around_warns_with_pass_count_and_reshuffles(caplog):
    blocks = _blocks()
    with caplog.at_level(logging.WARNING, logger="tokalign.data"):
        ds = PackedSequences(blocks, seed=0, start_idx=5, length=20)
    assert ds.passes == pytest.approx(2.5)
    assert (ds.first_pass, ds.last_pass) == (0, 2)
    msgs = [r.getMessage() for r in caplog.records]
    assert any("2.50 passes" in m and "repeats" in m for m in msgs), msgs
    ids = _seq_ids(PackedSequences(blocks, seed=0, start_idx=0, length=30))
    assert sorted(ids[10:20]) == list(range(10)) and sorted(ids[20:30]) == list(range(10))
    assert ids[:10] != ids[10:20]  # each pass is a fresh permutation
    np.testing.assert_array_equal(ids[10:20], pass_permutation(10, 0, 1))


def test_no_warning_within_one_pass(caplog):
    with caplog.at_level(logging.WARNING, logger="tokalign.data"):
        ds = PackedSequences(_blocks(), seed=0, start_idx=2, length=8)
    assert ds.passes == pytest.approx(1.0)
    assert not caplog.records
    with pytest.raises(IndexError):
        ds[8]
