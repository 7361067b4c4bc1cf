"""Crash resistance: SIGKILL during `embed` and during stage-1 training, rerun, same results.

The reference run goes first; the crashed run gets a copy of its corpus/source/tokenize cache
entries (so the test does not pay for them twice) and recomputes everything from `embed` on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ASSETS, REPO, need_assets

pytestmark = pytest.mark.slow

ARGS = [
    "corpus_bytes=200000", "eval.max_eval_samples=3", "eval.seq_len=128", "eval.stride=64", "eval.pubmedqa_samples=0",
    "embed.epoch=8", "embed.dim=64", "pivot_count=150", "init_methods=[tokalign]", "steps_stage1=8", "steps_stage2=0",
    "train.seq_len=64", "train.micro_batch_size=2", "train.save_steps=2", "train.eval_steps=0", "wandb.mode=disabled",
    # GPT-2's 50k vocabulary, not the default Qwen2's 152k: what is tested is crash and resume, and every stage from
    # init on has a third of the rows to set, score and train
    f"target_tokenizer={ASSETS / 'tokenizers' / 'ggml-vocab-gpt-2.gguf'}", "alignment.calibrate_positions=1000",
    "alignment.absorb_positions=2000",
]


def _cmd(cache: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "tokalign", f"cache_dir={cache}", f"hydra.run.dir={run_dir}", *ARGS]


def _env():
    return {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def _run(cache: Path, run_dir: Path) -> subprocess.CompletedProcess:
    r = subprocess.run(_cmd(cache, run_dir), cwd=REPO, capture_output=True, text=True, timeout=1200, env=_env())
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def _kill_when(cache: Path, run_dir: Path, ready, what: str, timeout: float = 900) -> None:
    log = open(run_dir.parent / f"{run_dir.name}-{what}.log", "w")
    p = subprocess.Popen(_cmd(cache, run_dir), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=_env())
    t0 = time.time()
    try:
        while time.time() - t0 < timeout:
            if p.poll() is not None:
                pytest.fail(f"the run ended (exit {p.returncode}) before it could be killed during {what}")
            if ready():
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
                return
            time.sleep(0.05)
        pytest.fail(f"never reached {what}")
    finally:
        if p.poll() is None:
            p.kill()


def _partials(cache: Path, stage: str) -> list[Path]:
    d = cache / stage
    return [p for p in d.glob("*.partial")] if d.is_dir() else []


def test_sigkill_during_embed_and_training_then_resume(tmp_path):
    need_assets()
    ref_cache, crash_cache = tmp_path / "ref_cache", tmp_path / "crash_cache"
    _run(ref_cache, tmp_path / "ref")
    ref = json.loads((tmp_path / "ref" / "summary.json").read_text())
    for stage in ("corpus", "source", "tokenize"):
        shutil.copytree(ref_cache / stage, crash_cache / stage)

    # 1. killed while fastText trains
    _kill_when(crash_cache, tmp_path / "crash1", lambda: bool(_partials(crash_cache, "embed")), "embed")
    assert not any(p for p in (crash_cache / "embed").iterdir() if p.is_dir() and not p.name.endswith(".partial"))

    # 2. killed during stage 1, after at least one checkpoint
    def has_checkpoint():
        return any(list(p.glob("checkpoints/checkpoint-*/trainer_state.json")) for p in _partials(crash_cache, "train_stage1"))

    _kill_when(crash_cache, tmp_path / "crash2", has_checkpoint, "train_stage1")
    ckpts = [c for p in _partials(crash_cache, "train_stage1") for c in p.glob("checkpoints/checkpoint-*")]
    last_saved = max(int(c.name.split("-")[1]) for c in ckpts if (c / "trainer_state.json").is_file())

    # 3. rerun: resumes, finishes, same results
    _run(crash_cache, tmp_path / "resumed")
    out = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert out["stages"]["embed"]["status"] == "cached"  # finished during crash2's run, verified, reused
    assert out["stages"]["train_stage1"]["status"] == "computed"
    a = np.load(tmp_path / "ref" / "stages" / "align" / "alignment.npz")
    b = np.load(tmp_path / "resumed" / "stages" / "align" / "alignment.npz")
    for k in ("how", "src", "weight"):
        assert np.array_equal(a[k], b[k]), k
    for k in ("bpb/init/tokalign", "bpb/stage1"):
        assert abs(ref["metrics"][k] - out["metrics"][k]) < 1e-3, (k, ref["metrics"][k], out["metrics"][k])
    hist = json.loads((tmp_path / "resumed" / "stages" / "train_stage1" / "log_history.json").read_text())
    resumed_from = json.loads((tmp_path / "resumed" / "stages" / "train_stage1" / "resume.json").read_text())
    assert resumed_from["step"] == last_saved >= 2
    # steps redone after the kill: at most save_steps (the kill came before the next checkpoint)
    assert max(h["step"] for h in hist) == 8
