"""What the training stages add to transformers' Trainer, in two modules.

This one is light (imported with the stages): ``TrainingDivergedError`` and ``checkpoints``.
``tokalign/hf_trainer.py`` imports torch and transformers at its top, so the training stage imports
it only when it runs; it holds:

* ``OrderedTrainer``: keeps the dataset's order (our ``PackedSequences`` is already a seeded
  permutation that a resume continues) and stops on a NaN/inf loss or gradient norm before the
  optimizer applies it, so the last checkpoint stays good (``TrainingDivergedError``).
* ``StageCallback``: logs ``<stage>/loss, lr, grad_norm, tokens_seen, tokens_per_s, passes`` to the
  tracker and runs the light in-training bits-per-byte evaluation every ``train.eval_steps``.
"""

from __future__ import annotations

import re
from pathlib import Path

from tokalign.errors import TokalignError

_CKPT = re.compile(r"^checkpoint-(\d+)$")


class TrainingDivergedError(TokalignError, RuntimeError):
    """The training loss or gradient norm became NaN/inf."""


def checkpoints(folder: Path) -> list[Path]:
    """Complete ``checkpoint-<step>`` folders under ``folder``, oldest first (a checkpoint without
    ``trainer_state.json`` was cut off while saving and is ignored)."""
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _CKPT.match(p.name)
        if m and p.is_dir() and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]
