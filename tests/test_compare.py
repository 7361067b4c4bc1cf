"""`python -m tokalign.compare` on a fake sweep folder: one row per job, varying overrides only, csv and png."""

from __future__ import annotations

import json

from tokalign.compare import main


def test_compare_rows_csv_png(tmp_path, capsys):
    for i, lr in enumerate(("0.0001", "0.0002")):
        job = tmp_path / str(i)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- steps_stage1=2\n- lr_stage1={lr}\n")
        (job / "summary.json").write_text(json.dumps({
            "metrics": {"bpb/source": 1.0, "bpb/init/tokalign": 1.2, "bpb/stage1": 1.1 + i / 100,
                        "stage1/eval_bpb": 1.05 - i / 100},
            "stages": {"align": {"status": "cached" if i else "computed", "seconds": 3.0 - 3 * i}}}))
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "lr_stage1=0.0001" in out[1] and "1.1000" in out[1]
    assert "lr_stage1=0.0002" in out[2] and "1.1100" in out[2]
    assert "stage1/eval_bpb" in out[0] and "1.0500" in out[1] and "1.0400" in out[2]  # the dev split's last point
    assert "steps_stage1=2" not in out[1]  # shared by every job
    assert (tmp_path / "compare.csv").read_text().count("\n") == 3
    assert (tmp_path / "compare.png").stat().st_size > 1000


def test_compare_missing_dir_is_clear(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "no such sweep directory" in capsys.readouterr().err
