"""Bad input answered clearly: one line naming the input, non-zero exit, nothing computed lost.

The corpus rows of the README's bad-input table are in test_corpus.py, the tokenizer path in
test_refs.py, the missing PubMedQA file in test_evaluate.py; the rest are here.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from tokalign.config import Config, HardwareConfig, PreflightConfig
from tokalign.context import Context
from tokalign.refs import RefError
from tokalign.stages import preflight, source
from tokalign.stages.embed import EmbedError, train_vectors
from tokalign.stages.preflight import PreflightError


def _cfg(tmp_path, **kw):
    base = dict(source_model="s", target_tokenizer="t", corpus="c", cache_dir=str(tmp_path / "cache"))
    return Config(**{**base, **kw})


def test_model_vocab_smaller_than_tokenizer(tmp_path, assets):
    from tokalign.refs import load_tokenizer

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    model.save_pretrained(tmp_path / "m")
    load_tokenizer(str(assets / "tokenizers/ggml-vocab-gpt-2.gguf")).save_pretrained(tmp_path / "m")
    cfg = _cfg(tmp_path, source_model=str(tmp_path / "m"))
    (tmp_path / "out").mkdir()
    with pytest.raises(RefError, match=r"tokenizer has 50257 tokens but the model's embedding has 64 rows"):
        source.run(cfg, Context(run_dir=tmp_path), tmp_path / "out")


def test_disk_shortfall_strict_is_an_error_else_a_warning(tmp_path, caplog):
    cfg = _cfg(tmp_path, hardware=HardwareConfig(min_free_disk_gb=1e9), preflight=PreflightConfig(strict=True))
    (tmp_path / "pf").mkdir()
    with pytest.raises(PreflightError, match=r"GB free disk; hardware.min_free_disk_gb=1000000000.0 wanted"):
        preflight.run(cfg, Context(run_dir=tmp_path), tmp_path / "pf")
    cfg.preflight.strict = False
    m = preflight.run(cfg, Context(run_dir=tmp_path), tmp_path / "pf")
    assert m["preflight/problems"] >= 1
    assert "min_free_disk_gb" in caplog.text


def test_cuda_profile_without_gpu_is_reported(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    cfg = _cfg(tmp_path, hardware=HardwareConfig(device="cuda"), preflight=PreflightConfig(strict=True))
    (tmp_path / "pf").mkdir()
    with pytest.raises(PreflightError, match="wants CUDA but torch sees no GPU"):
        preflight.run(cfg, Context(run_dir=tmp_path), tmp_path / "pf")


def test_corpus_too_small_for_fasttext(tmp_path):
    ids = np.arange(50, dtype=np.uint32)  # every token once
    with pytest.raises(EmbedError, match="no token occurs embed.min_count=2 times"):
        train_vectors(ids, np.array([0, 50]), tmp_path, dim=8, epoch=1, min_count=2, lr=0.05, thread=1, window=2,
                      neg=2, side="target")


def _cli(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "tokalign", "wandb.mode=disabled", f"cache_dir={tmp_path}/cache",
                           f"hydra.run.dir={tmp_path}/run", *args], capture_output=True, text=True, timeout=300)


def test_cli_missing_corpus_is_one_line_and_exit_2(tmp_path):
    r = _cli(tmp_path, f"corpus={tmp_path}/missing.jsonl")
    assert r.returncode == 2, r.stderr[-2000:]
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("tokalign: error:")]
    assert err == [f"tokalign: error: {tmp_path}/missing.jsonl: no such file or directory (expected a corpus file "
                   "('.txt', '.jsonl', '.json', '.csv', '.parquet'), a folder, or a hub dataset id)"]
    assert "Traceback" not in r.stderr
    assert (tmp_path / "run" / "summary.json").is_file()  # what was computed stays recorded


def test_cli_invalid_utf8_corpus_error_is_the_last_line_even_with_wandb(tmp_path):
    """W&B's closing summary (30+ lines in offline mode) comes before the error, not after it."""
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xff\xfe\n")
    r = subprocess.run([sys.executable, "-m", "tokalign", "wandb.mode=offline", f"cache_dir={tmp_path}/cache",
                        f"hydra.run.dir={tmp_path}/run", f"corpus={bad}"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert r.returncode == 2, r.stdout[-2000:]
    last = [ln for ln in r.stdout.splitlines() if ln.strip()][-1]
    assert last.startswith(f"tokalign: error: {bad}: 1 records cannot be decoded or parsed"), r.stdout[-2000:]
    assert last.endswith(f"{bad}:2: invalid UTF-8 at byte 5"), last
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))  # W&B did run


def test_every_tokalign_error_class_is_reported_in_one_line():
    """A new error class that does not derive from TokalignError would escape the one-line report."""
    import importlib
    import inspect
    import pkgutil

    import tokalign
    from tokalign.__main__ import user_errors
    from tokalign.errors import TokalignError

    found = []
    for mod in pkgutil.walk_packages(tokalign.__path__, "tokalign."):
        if mod.name.endswith("__main__"):
            continue
        m = importlib.import_module(mod.name)
        for name, obj in vars(m).items():
            if inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__ == m.__name__:
                found.append(obj)
                assert issubclass(obj, TokalignError), f"{m.__name__}.{name} does not derive from TokalignError"
    assert len(found) >= 14
    assert all(issubclass(e, user_errors()) for e in found)
