"""Training data for the two training stages: packed constant-length blocks in a seeded, resumable order.

Packing: the documents of ``tokenize/target_ids.npy`` (split by ``target_offsets.npy``) are joined
into one stream with the target tokenizer's EOS after every document, then cut into blocks of
``seq_len`` tokens (the tail that does not fill a block is dropped). Labels are the input IDs;
the model shifts them itself.

Order: the training stream is an endless sequence of blocks. Global sequence index ``i`` lies in
pass ``p = i // n_blocks`` at position ``r = i % n_blocks`` and is block
``np.random.default_rng([seed, p]).permutation(n_blocks)[r]``. So what any global index holds is
a pure function of (seed, index): a resumed run never repeats or skips data, every pass is a
fresh shuffle, and offsets are counted in *sequences*, independent of the number of GPUs, the
micro-batch size and gradient accumulation. Stage 1 reads indices ``[0, steps1 * global_batch)``,
stage 2 by default continues at ``steps1 * global_batch``.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import Dataset
from tokalign.errors import TokalignError

log = logging.getLogger(__name__)


class DataError(TokalignError, ValueError):
    """The training token arrays are missing or malformed; the message names the file."""


def pack_documents(ids: np.ndarray, offsets: np.ndarray, eos_id: int) -> np.ndarray:
    """One token stream: every non-empty document followed by ``eos_id``."""
    ids = np.asarray(ids)
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    keep = lengths > 0
    if not keep.all():
        starts, ends = offsets[:-1][keep], offsets[1:][keep]
        ids = np.concatenate([ids[s:e] for s, e in zip(starts, ends)]) if keep.any() else ids[:0]
        lengths = lengths[keep]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
    dtype = np.int64 if eos_id > np.iinfo(np.uint32).max or eos_id < 0 else np.uint32
    out = np.empty(len(ids) + len(lengths), dtype=dtype)
    eos_pos = offsets[1:] + np.arange(len(lengths))  # position of the EOS after document k
    mask = np.ones(len(out), dtype=bool)
    mask[eos_pos] = False
    out[mask] = ids
    out[eos_pos] = eos_id
    return out


def pack_blocks(ids: np.ndarray, offsets: np.ndarray, eos_id: int, seq_len: int,
                source: str = "target_ids.npy") -> np.ndarray:
    """Packed stream cut into ``[n_blocks, seq_len]`` (the last partial block is dropped)."""
    if seq_len < 2:
        raise DataError(f"train.seq_len: expected >= 2, got {seq_len}")
    stream = pack_documents(ids, offsets, eos_id)
    n_blocks = len(stream) // seq_len
    if n_blocks == 0:
        raise DataError(f"{source}: {len(stream)} tokens (with EOS) make no full block of train.seq_len={seq_len} "
                        "tokens; use a bigger corpus or a smaller seq_len")
    return stream[: n_blocks * seq_len].reshape(n_blocks, seq_len)


def pass_permutation(n_blocks: int, seed: int, pass_idx: int) -> np.ndarray:
    """Block order of one pass: a pure function of (seed, pass number)."""
    return np.random.default_rng([int(seed), int(pass_idx)]).permutation(n_blocks)


def block_of(index: int, n_blocks: int, seed: int) -> int:
    """Block id held by global sequence ``index``."""
    p, r = divmod(int(index), n_blocks)
    return int(pass_permutation(n_blocks, seed, p)[r])


class PackedSequences(Dataset):
    """Map-style dataset: item ``k`` is global sequence ``start_idx + k`` (``{"input_ids", "labels"}``, int64).

    ``passes`` is how far into the data this stretch reaches, in passes: ``(start_idx + length) / n_blocks``.
    When the stretch crosses into a second pass (or further) a warning says so: later passes repeat the
    data in a fresh order.
    """

    def __init__(self, blocks: np.ndarray, seed: int, start_idx: int, length: int) -> None:
        if blocks.ndim != 2 or len(blocks) == 0:
            raise DataError(f"blocks: expected a non-empty [n_blocks, seq_len] array, got shape {blocks.shape}")
        if start_idx < 0 or length < 0:
            raise DataError(f"start_idx and length must be >= 0, got start_idx={start_idx}, length={length}")
        self.blocks = blocks
        self.seed = int(seed)
        self.start_idx = int(start_idx)
        self.length = int(length)
        self.n_blocks = int(len(blocks))
        self.seq_len = int(blocks.shape[1])
        end = self.start_idx + self.length
        self.passes = end / self.n_blocks
        self.first_pass = self.start_idx // self.n_blocks
        self.last_pass = (end - 1) // self.n_blocks if self.length else self.first_pass
        self._perm = lru_cache(maxsize=4)(self._permutation)
        if self.length and self.last_pass >= 1:
            log.warning(
                "training sequences %d..%d need %.2f passes over the %d packed blocks of %d tokens: the data repeats "
                "(passes %d..%d, each in a fresh seeded order); use a bigger corpus or fewer steps to avoid it",
                self.start_idx, end - 1, self.passes, self.n_blocks, self.seq_len, self.first_pass + 1,
                self.last_pass + 1)

    def _permutation(self, pass_idx: int) -> np.ndarray:
        return pass_permutation(self.n_blocks, self.seed, pass_idx)

    def global_index(self, k: int) -> int:
        return self.start_idx + int(k)

    def block_id(self, k: int) -> int:
        p, r = divmod(self.global_index(k), self.n_blocks)
        return int(self._perm(p)[r])

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        if not 0 <= k < self.length:
            raise IndexError(f"index {k} out of range for {self.length} sequences")
        ids = torch.from_numpy(np.asarray(self.blocks[self.block_id(k)], dtype=np.int64))
        return {"input_ids": ids, "labels": ids.clone()}
