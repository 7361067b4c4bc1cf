"""scripts/project_research.py and the FLOP accounting of scripts/bench_train.py (no benchmark runs here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import bench_train  # noqa: E402
import project_research as P  # noqa: E402

MEASURED = REPO / "benchmarks" / "h100"


def test_flops_per_token_follow_the_documented_formulas():
    arch = dict(bench_train.LLAMA_1B)
    n, T, L, d, V = 1_235_814_400, 2048, 16, 2048, 128256
    full, full_6n = bench_train.flops_per_token(arch, n, T, "stage2")
    assert full_6n == 6 * n and full == 6 * n + 12 * L * d * T
    s1, s1_4n = bench_train.flops_per_token(arch, n, T, "stage1")
    assert s1_4n == 4 * n + 2 * V * d and s1 == s1_4n + 8 * L * d * T
    assert bench_train.flops_per_token(arch, n, T, "stage2_lora") == (s1, s1_4n)


def test_projection_uses_the_config_and_the_measured_rates():
    from tokalign.cli import compose_cli

    m = P.load_measured(MEASURED)
    m.update(compile_warmup_s=70.0, disk_gbps=1.0)
    cfg = compose_cli(["mode=research", "hardware=h100"])
    rows = {r["stage"]: r for r in P.project(cfg, m)}
    for stage in ("corpus", "tokenize", "terms", "embed (source)", "embed (target)", "align", "evaluate_init",
                  "train_stage1", "train_stage2", "evaluate"):
        assert rows[stage]["seconds"] > 0, stage
    # training: steps x tokens per step / the measured rate of the compiled stage
    rate = {r["stage"]: r["tokens_per_s"] for r in m["train_compile"]["results"]}["stage1"]
    t = cfg.train
    assert rows["train_stage1"]["seconds"] == pytest.approx(
        cfg.steps_stage1 * t.micro_batch_size * t.grad_accum * t.seq_len / rate)
    # fastText: capped by embed.max_tokens, else the whole stream
    capped = rows["embed (target)"]["seconds"]
    full = {r["stage"]: r for r in P.project(compose_cli(["mode=research", "hardware=h100", "embed.max_tokens=0"]),
                                              m)}["embed (target)"]["seconds"]
    tokens = cfg.corpus_bytes / m["upstream"]["bytes_per_token"]["target"]
    assert full / capped == pytest.approx(tokens / cfg.embed.max_tokens)
    # LoRA stage 2 takes the LoRA rate
    lora = {r["stage"]: r for r in P.project(compose_cli(["mode=research_optimal"]), m)}
    lrate = {r["stage"]: r["tokens_per_s"] for r in m["train_compile"]["results"]}["stage2_lora"]
    assert "stage2_lora" in lora["train_stage2"]["rate"]
    assert lora["train_stage2"]["seconds"] == pytest.approx(2500 * 4 * 8 * 2048 / lrate)


def test_projection_cli_prints_the_total_and_a_missing_file_names_itself(tmp_path, capsys):
    out = tmp_path / "p.json"
    rows = P.main(["--measured", str(MEASURED), "--out", str(out)])
    text = capsys.readouterr().out
    total = json.loads(out.read_text())["total_s"]
    assert total == pytest.approx(sum(r["seconds"] for r in rows))
    assert f"{total / 3600:.2f} h" in text
    with pytest.raises(SystemExit, match="upstream.json: missing"):
        P.main(["--measured", str(tmp_path)])


def test_readme_modes_table_matches_the_shipped_configs(capsys):
    import modes_table

    modes_table.main()
    table = capsys.readouterr().out.strip()
    assert table in (REPO / "README.md").read_text(), "README's modes table is stale: python scripts/modes_table.py"
