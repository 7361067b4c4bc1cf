"""GPU checks (bf16, CUDA): skipped cleanly where torch sees no CUDA device. Run on a GPU machine:

    python -m pytest -q -m gpu
"""

from __future__ import annotations

import pytest
import torch

from tokalign import metrics as M
from tokalign.config import HardwareConfig
from tokalign.stages import train
from conftest import TEXTS, byte_tokenizer, load_sd, make_cfg, make_workspace, tiny_llama

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

H100 = HardwareConfig(device="cuda", dtype="bfloat16", tf32=True)


def test_bf16_bits_per_byte_on_gpu_matches_float32_on_cpu():
    tok = byte_tokenizer()
    texts = TEXTS * 4
    ref = M.bits_per_byte(tiny_llama(), tok, texts, seq_len=16, stride=8, batch_size=3, progress=False)
    gpu = tiny_llama().to(device="cuda", dtype=torch.bfloat16)
    got = M.bits_per_byte(gpu, tok, texts, seq_len=16, stride=8, batch_size=3, device="cuda", progress=False)
    assert got["tokens"] == ref["tokens"] and got["bytes"] == ref["bytes"]
    assert got["bpb"] == pytest.approx(ref["bpb"], rel=2e-2)  # bf16 logits: about 3 significant digits


@pytest.mark.parametrize("tied", [True, False])
def test_bf16_stage1_on_gpu_changes_only_embeddings_and_head(tmp_path, tied):
    ctx = make_workspace(tmp_path, tied=tied)
    out = tmp_path / "s1"
    out.mkdir()
    m = train.run_stage1(make_cfg(hardware=H100), ctx, out)
    assert m["stage1/steps"] == 4 and m["stage1/final_loss"] == m["stage1/final_loss"]  # finite, not NaN
    before, after = load_sd(tmp_path / "init" / "model"), load_sd(out / "model")
    for k in before:
        changed = not torch.equal(before[k], after[k])
        assert changed == (k in {"model.embed_tokens.weight", "lm_head.weight"}), k
    assert after["model.embed_tokens.weight"].dtype == torch.float32  # fp32 master weights, bf16 compute


def test_bf16_full_stage2_on_gpu_trains_and_lowers_the_loss(tmp_path):
    ctx = make_workspace(tmp_path)
    out = tmp_path / "s2"
    out.mkdir()
    m = train.run_stage2(make_cfg(hardware=H100, steps_stage2=6, train={"eval_steps": 6}), ctx, out)
    assert m["stage2/steps"] == 6
    import json

    hist = [h for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
    assert hist[-1]["loss"] < hist[0]["loss"]
