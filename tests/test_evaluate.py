"""Stages evaluate_init (run_init) and evaluate (run_final) on tiny models in stub stage folders."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from tokalign import metrics as M
from tokalign.config import Config, EvalConfig
from tokalign.stages import evaluate as E
from tokalign.pipeline import Context
from tokalign.tracking import NullTracker
from test_metrics import byte_tokenizer

os.environ.setdefault("WANDB_MODE", "disabled")

DOCS = [
    "Metformin is the first-line drug for type 2 diabetes mellitus.",
    "Randomized controlled trials show that statins lower cardiovascular events.",
    "The patient was treated with intravenous antibiotics for five days.",
    "Background: hypertension is common. Methods: we enrolled 120 adults. Results: blood pressure fell.",
    "This document is beyond max_eval_samples and must not be scored.",
]


def tiny_llama(seed: int, tied: bool = True, vocab: int = 300) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def save(model, tok, d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


class RecordingTracker(NullTracker):
    def __init__(self):
        self.tables: dict[str, tuple[list, list]] = {}
        self.images: dict[str, Path] = {}

    def table(self, name, columns, rows):
        self.tables[name] = (columns, rows)

    def image(self, name, path):
        self.images[name] = Path(path)


def StubContext(run_dir: Path, outputs: dict, metrics: Optional[dict] = None) -> Context:
    return Context(run_dir=run_dir, tracker=RecordingTracker(), outputs=outputs, metrics=dict(metrics or {}))


def make_cfg(**eval_kw) -> Config:
    ev = {"max_eval_samples": 4, "seq_len": 32, "stride": 16, "batch_size": 2, "pubmedqa_file": None,
          "pubmedqa_test_ids": None, "pubmedqa_samples": 0, **eval_kw}
    return Config(source_model="stub", target_tokenizer="stub", corpus="stub", eval=EvalConfig(**ev))


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> dict[str, Path]:
    """Stub outputs of corpus, source, init (tied, 2 methods) and train_stage1."""
    root = tmp_path_factory.mktemp("stages")
    tok = byte_tokenizer()
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "eval.jsonl").write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(DOCS)))
    save(tiny_llama(0), tok, root / "source" / "model")
    init_model = tiny_llama(1)
    save(init_model, tok, root / "init" / "model")
    rows = root / "init" / "rows"
    rows.mkdir()
    save_file({"embed": init_model.get_input_embeddings().weight.detach().clone()}, str(rows / "tokalign.safetensors"))
    torch.manual_seed(5)
    save_file({"embed": torch.randn(300, 32) * 0.5}, str(rows / "random.safetensors"))
    (root / "init" / "info.json").write_text(json.dumps({"primary": "tokalign", "methods": ["tokalign", "random"],
                                                         "tied": True}))
    save(tiny_llama(2), tok, root / "train_stage1" / "model")
    (root / "train_stage1" / "log_history.json").write_text(json.dumps(
        [{"step": s, "loss": 5.0 - 0.3 * s, "lr": 1e-3, "grad_norm": 1.0} for s in range(1, 8)]))
    return {"corpus": corpus, "source": root / "source", "init": root / "init", "train_stage1": root / "train_stage1"}


def test_run_init_scores_source_and_every_method(stages, tmp_path):
    cfg = make_cfg()
    ctx = StubContext(run_dir=tmp_path / "run", outputs=dict(stages))
    out = tmp_path / "out"
    out.mkdir()
    m = E.run_init(cfg, ctx, out)

    tok = byte_tokenizer()
    n_bytes = sum(len(t.encode()) for t in DOCS[:4])
    assert m["eval/docs"] == 4 and m["eval/bytes"] == n_bytes
    assert m["eval/source_tokens"] == n_bytes and m["eval/target_tokens"] == n_bytes  # byte tokenizers
    src = M.bits_per_byte(E.refs.load_model(str(stages["source"] / "model")), tok, DOCS[:4], seq_len=32, stride=16,
                          progress=False)
    assert m["bpb/source"] == pytest.approx(src["bpb"], rel=1e-5)
    # tokalign rows are the init model's own rows: its bpb is the saved model's
    init_model = E.refs.load_model(str(stages["init"] / "model"))
    own = M.bits_per_byte(init_model, tok, DOCS[:4], seq_len=32, stride=16, progress=False)
    assert m["bpb/init/tokalign"] == pytest.approx(own["bpb"], rel=1e-5)
    # random rows were swapped in: a different model, scored by the same rules
    E.apply_rows(init_model, stages["init"] / "rows" / "random.safetensors")
    rnd = M.bits_per_byte(init_model, tok, DOCS[:4], seq_len=32, stride=16, progress=False)
    assert m["bpb/init/random"] == pytest.approx(rnd["bpb"], rel=1e-5)
    assert m["bpb/init/random"] != pytest.approx(m["bpb/init/tokalign"], rel=1e-3)
    assert m["bpb/init_best"] == min(m["bpb/init/random"], m["bpb/init/tokalign"])

    detail = json.loads((out / "bpb.json").read_text())
    assert set(detail["init"]) == {"tokalign", "random"} and detail["source"]["tokens"] == n_bytes
    assert (out / "bpb_by_method.png").stat().st_size > 1000
    assert (ctx.run_dir / "bpb_by_method.png").is_file()
    cols, rows = ctx.tracker.tables["bpb_by_method"]
    assert cols == ["method", "bpb"] and [r[0] for r in rows] == ["source", "tokalign", "random"]
    assert "bpb_by_method" in ctx.tracker.images


def test_apply_rows_untied_copies_the_head_and_checks_shapes(tmp_path):
    model = tiny_llama(3, tied=False)
    emb, head = torch.randn(300, 32), torch.randn(300, 32)
    save_file({"embed": emb, "lm_head": head}, str(tmp_path / "m.safetensors"))
    E.apply_rows(model, tmp_path / "m.safetensors", tied=False)
    assert torch.equal(model.get_input_embeddings().weight, emb)
    assert torch.equal(model.get_output_embeddings().weight, head)
    save_file({"embed": emb}, str(tmp_path / "nohead.safetensors"))
    with pytest.raises(E.EvalInputError, match="nohead.safetensors: missing tensor 'lm_head'"):
        E.apply_rows(model, tmp_path / "nohead.safetensors", tied=False)
    save_file({"embed": torch.zeros(10, 32)}, str(tmp_path / "small.safetensors"))
    with pytest.raises(E.EvalInputError, match=r"shape \(10, 32\)"):
        E.apply_rows(model, tmp_path / "small.safetensors", tied=False)
    with pytest.raises(E.EvalInputError, match="no such file"):
        E.apply_rows(model, tmp_path / "absent.safetensors")


def test_run_init_reports_missing_eval_corpus(stages, tmp_path):
    ctx = StubContext(run_dir=tmp_path / "run", outputs={**stages, "corpus": tmp_path / "nocorpus"})
    with pytest.raises(E.EvalInputError, match=r"nocorpus/eval.jsonl: no such file"):
        E.run_init(make_cfg(), ctx, tmp_path)


def test_run_final_records_missing_pubmedqa_file_instead_of_raising(stages, tmp_path):
    missing = tmp_path / "absent" / "ori_pqal.json"
    cfg = make_cfg(pubmedqa_file=str(missing), pubmedqa_samples=10)
    ctx = StubContext(run_dir=tmp_path / "run", outputs=dict(stages),
                      metrics={"bpb/source": 7.5, "bpb/init/tokalign": 9.0, "bpb/init/random": 9.5})
    out = tmp_path / "run" / "evaluate"
    m = E.run_final(cfg, ctx, out)
    assert "no such file" in m["pubmedqa/error"] and str(missing) in m["pubmedqa/error"]
    assert any(e.startswith("pubmedqa/error") for e in m["eval/errors"])
    assert not any(k.startswith("pubmedqa/acc") for k in m)
    # the rest of the stage still ran
    tok = byte_tokenizer()
    s1 = M.bits_per_byte(E.refs.load_model(str(stages["train_stage1"] / "model")), tok, DOCS[:4], seq_len=32,
                         stride=16, progress=False)
    assert m["bpb/stage1"] == pytest.approx(s1["bpb"], rel=1e-5) and m["bpb/final"] == m["bpb/stage1"]
    assert m["eval/final_model"] == "stage1"
    assert (ctx.run_dir / "recovery.png").stat().st_size > 1000
    cols, rows = ctx.tracker.tables["samples"]
    assert cols == ["model", "prompt", "generation"]
    assert [r[0] for r in rows] == ["source"] * 3 + ["stage1"] * 3
    assert [r[1] for r in rows[:3]] == list(E.SAMPLE_PROMPTS)
    assert all(isinstance(r[2], str) for r in rows)
    assert json.loads((out / "final.json").read_text())["metrics"]["pubmedqa/error"] == m["pubmedqa/error"]


def test_run_final_pubmedqa_accuracy_and_missing_corpus(stages, tmp_path):
    pqal = {str(i): {"QUESTION": f"Does drug {i} work?", "CONTEXTS": [f"Drug {i} was tested.", "It helped."],
                     "final_decision": lab} for i, lab in enumerate(["yes", "no", "maybe", "yes", "no", "yes"])}
    (tmp_path / "ori_pqal.json").write_text(json.dumps(pqal))
    cfg = make_cfg(pubmedqa_file=str(tmp_path / "ori_pqal.json"), pubmedqa_samples=4)
    outputs = {**stages, "corpus": tmp_path / "nocorpus"}  # eval corpus missing: recorded, not raised
    ctx = StubContext(run_dir=tmp_path / "run", outputs=outputs)
    m = E.run_final(cfg, ctx, tmp_path / "out")
    assert "eval.jsonl: no such file" in m["bpb/error"]
    assert "bpb/stage1" not in m
    assert m["pubmedqa/n"] == 4
    for k in ("source", "init", "stage1", "final"):
        assert 0.0 <= m[f"pubmedqa/acc/{k}"] <= 1.0
    assert "pubmedqa/acc/stage2" not in m
    cols, rows = ctx.tracker.tables["pubmedqa"]
    assert [r[0] for r in rows] == ["source", "init", "stage1"] and all(r[2] == 4 for r in rows)
    detail = json.loads((tmp_path / "out" / "final.json").read_text())
    assert len(detail["pubmedqa"]["init"]["predictions"]) == 4


def test_run_final_without_training_uses_init_as_final(stages, tmp_path):
    outputs = {k: v for k, v in stages.items() if k != "train_stage1"}
    ctx = StubContext(run_dir=tmp_path / "run", outputs=outputs)
    m = E.run_final(make_cfg(), ctx, tmp_path / "out")  # pubmedqa_file None: skipped silently
    assert m["eval/final_model"] == "init"
    assert not any(k.startswith(("pubmedqa/", "bpb/")) for k in m)
    assert "eval/errors" not in m
    assert [r[0] for r in ctx.tracker.tables["samples"][1]] == ["source"] * 3 + ["init"] * 3
    assert (ctx.run_dir / "recovery.png").is_file()
