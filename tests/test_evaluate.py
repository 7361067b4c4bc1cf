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
from tokalign.context import Context
from conftest import MarkerModel, RecordingTracker, byte_tokenizer, word_tokenizer

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


def StubContext(run_dir: Path, outputs: dict, metrics: Optional[dict] = None) -> Context:
    return Context(run_dir=run_dir, tracker=RecordingTracker(), outputs=outputs, metrics=dict(metrics or {}))


def make_cfg(**eval_kw) -> Config:
    ev = {"max_eval_samples": 4, "seq_len": 32, "stride": 16, "batch_size": 2, "pubmedqa_file": None,
          "pubmedqa_test_ids": None, "pubmedqa_samples": 0, **eval_kw}
    return Config(source_model="stub", target_tokenizer="stub", corpus="stub", eval=EvalConfig(**ev))


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> dict[str, Path]:
    """Stub outputs of corpus, source, init (tied, 2 methods), evaluate_source and train_stage1."""
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
    out = {"corpus": corpus, "source": root / "source", "init": root / "init", "train_stage1": root / "train_stage1"}
    (root / "evaluate_source").mkdir()
    E.run_source(make_cfg(), StubContext(run_dir=root / "run", outputs=dict(out)), root / "evaluate_source")
    return {**out, "evaluate_source": root / "evaluate_source"}


def _direct_bpb(model_dir: Path, texts=DOCS[:4], rows: Optional[Path] = None) -> dict:
    model = E.refs.load_model(str(model_dir))
    if rows is not None:
        E.apply_rows(model, rows)
    return M.bits_per_byte(model, byte_tokenizer(), texts, seq_len=32, stride=16, progress=False)


def test_run_source_and_run_init_score_every_model_with_intervals(stages, tmp_path):
    cfg = make_cfg()
    ctx = StubContext(run_dir=tmp_path / "run", outputs=dict(stages))
    src_m = E.run_source(cfg, ctx, _mk(tmp_path / "src"))
    ctx.metrics.update(src_m)
    m = E.run_init(cfg, ctx, _mk(tmp_path / "out"))

    n_bytes = sum(len(t.encode()) for t in DOCS[:4])
    assert src_m["eval/docs"] == 4 and src_m["eval/bytes"] == n_bytes
    assert src_m["eval/source_tokens"] == n_bytes and m["eval/target_tokens"] == n_bytes  # byte tokenizers
    src = _direct_bpb(stages["source"] / "model")
    assert src_m["bpb/source"] == pytest.approx(src["bpb"], rel=1e-5)
    lo, hi = src_m["bpb/source/ci95"]
    assert lo < src_m["bpb/source"] < hi
    # tokalign rows are the init model's own rows: its bpb is the saved model's
    own = _direct_bpb(stages["init"] / "model")
    rnd = _direct_bpb(stages["init"] / "model", rows=stages["init"] / "rows" / "random.safetensors")
    assert m["bpb/init/tokalign"] == pytest.approx(own["bpb"], rel=1e-5)
    assert m["bpb/init/random"] == pytest.approx(rnd["bpb"], rel=1e-5)
    assert m["bpb/init_best"] == min(m["bpb/init/random"], m["bpb/init/tokalign"])
    # every pair, and each method against the source, on the same documents
    for a, b, ra, rb in (("tokalign", "random", own, rnd), ("tokalign", "source", own, src), ("random", "source", rnd, src)):
        key = f"bpb/paired/{a}_vs_{b}"
        assert m[key] == pytest.approx(ra["bpb"] - rb["bpb"], rel=1e-5)
        lo, hi = m[f"{key}/ci95"]
        assert lo <= m[key] <= hi
        assert m[f"{key}/verdict"] == (f"{a} beats {b}" if hi < 0 else f"{b} beats {a}" if lo > 0
                                       else f"{a} and {b}: no difference detected")
    assert m["eval/roundtrip_mismatch/target"] == 0 and src_m["eval/roundtrip_mismatch/source"] == 0

    detail = json.loads((tmp_path / "out" / "bpb.json").read_text())
    assert set(detail["init"]) == {"tokalign", "random"} and len(detail["init"]["random"]["doc_bits"]) == 4
    assert (tmp_path / "out" / "bpb_by_method.png").stat().st_size > 1000
    assert (ctx.run_dir / "bpb_by_method.png").is_file()
    cols, rows = ctx.tracker.tables["bpb_by_method"]
    assert cols == ["method", "bpb", "ci95_low", "ci95_high"] and [r[0] for r in rows] == ["source", "tokalign", "random"]
    assert "bpb_by_method" in ctx.tracker.images


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def test_cross_tokenizer_scoring_counts_bytes_not_tokens(tmp_path):
    """Source and target split the text differently and start documents from different token ids; both are scored
    over the same bytes, and the paired difference is the difference of the two direct scores."""
    src_tok = byte_tokenizer()  # one token a byte, start token <s> = 1
    words = sorted({w for d in DOCS for w in d.split()})
    tgt_tok = word_tokenizer(words)  # one token a word, start token <s> = 1 ... so move it:
    tgt_tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})  # the target's separator
    assert M.start_token_id(tgt_tok) != M.start_token_id(src_tok)
    corpus = _mk(tmp_path / "corpus")
    texts = [" ".join(d.split()) for d in DOCS[:4]]
    (corpus / "eval.jsonl").write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
    save(tiny_llama(0), src_tok, tmp_path / "source" / "model")
    tgt_model = tiny_llama(1, vocab=len(tgt_tok))
    save(tgt_model, tgt_tok, tmp_path / "init" / "model")
    _mk(tmp_path / "init" / "rows")
    save_file({"embed": tgt_model.get_input_embeddings().weight.detach().clone()},
              str(tmp_path / "init" / "rows" / "tokalign.safetensors"))
    (tmp_path / "init" / "info.json").write_text(json.dumps({"primary": "tokalign", "methods": ["tokalign"], "tied": True}))
    outputs = {"corpus": corpus, "source": tmp_path / "source", "init": tmp_path / "init",
               "evaluate_source": _mk(tmp_path / "es")}
    ctx = StubContext(run_dir=tmp_path / "run", outputs=outputs)
    cfg = make_cfg()
    src_m = E.run_source(cfg, ctx, outputs["evaluate_source"])
    m = E.run_init(cfg, ctx, _mk(tmp_path / "ei"))
    assert src_m["eval/source_tokens"] == sum(len(t.encode()) for t in texts)
    assert m["eval/target_tokens"] == sum(len(t.split()) for t in texts)  # every word scored, the start token not
    s = M.bits_per_byte(E.refs.load_model(str(tmp_path / "source" / "model")), src_tok, texts, seq_len=32, stride=16,
                        progress=False)
    t = M.bits_per_byte(E.refs.load_model(str(tmp_path / "init" / "model")), tgt_tok, texts, seq_len=32, stride=16,
                        progress=False)
    assert s["start_token"] == 1 and t["start_token"] == tgt_tok.convert_tokens_to_ids("<|endoftext|>")
    assert s["doc_bytes"] == t["doc_bytes"]
    assert m["bpb/paired/tokalign_vs_source"] == pytest.approx(t["bpb"] - s["bpb"], rel=1e-6)


def test_run_init_reports_missing_eval_corpus(stages, tmp_path):
    ctx = StubContext(run_dir=tmp_path / "run", outputs={**stages, "corpus": tmp_path / "nocorpus"})
    with pytest.raises(E.EvalInputError, match=r"nocorpus/eval.jsonl: no such file"):
        E.run_init(make_cfg(), ctx, tmp_path)


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
    # the rest of the stage still ran: stage 1 scored and compared with the source on the same documents
    s1 = _direct_bpb(stages["train_stage1"] / "model")
    assert m["bpb/stage1"] == pytest.approx(s1["bpb"], rel=1e-5) and m["bpb/final"] == m["bpb/stage1"]
    src = _direct_bpb(stages["source"] / "model")
    assert m["bpb/paired/stage1_vs_source"] == pytest.approx(s1["bpb"] - src["bpb"], abs=1e-5 * src["bpb"])  # a difference: tolerance of its terms
    assert m["bpb/final/ci95"] == m["bpb/stage1/ci95"]
    assert m["eval/final_model"] == "stage1"
    assert (ctx.run_dir / "recovery.png").stat().st_size > 1000
    cols, rows = ctx.tracker.tables["samples"]
    assert cols == ["model", "prompt", "generation"]
    assert [r[0] for r in rows] == ["source"] * 3 + ["stage1"] * 3
    assert [r[1] for r in rows[:3]] == list(E.SAMPLE_PROMPTS)
    assert all(isinstance(r[2], str) for r in rows)
    assert json.loads((out / "final.json").read_text())["metrics"]["pubmedqa/error"] == m["pubmedqa/error"]


MARKER_WORDS = ["Context:", "Question:", "Answer:", "yes", "no", "maybe", "alpha", "beta", "gamma", "does", "it",
                "work?", "the", "drug"]


def test_run_final_a_model_that_knows_every_answer_scores_100_percent(stages, tmp_path, monkeypatch):
    """Through the stage: an oracle final model is right on every question, whatever the labels' shares."""
    labels = ["yes", "no", "maybe", "yes", "no", "yes", "yes", "no", "maybe", "yes"]
    marker = {"yes": "alpha", "no": "beta", "maybe": "gamma"}
    pqal = {str(i): {"QUESTION": "does it work?", "CONTEXTS": ["the drug", marker[lab]], "final_decision": lab}
            for i, lab in enumerate(labels)}
    (tmp_path / "ori_pqal.json").write_text(json.dumps(pqal))
    cfg = make_cfg(pubmedqa_file=str(tmp_path / "ori_pqal.json"), pubmedqa_samples=10)
    tok = word_tokenizer(MARKER_WORDS)
    real_load = E._load
    monkeypatch.setattr(E, "_load", lambda d, c: (MarkerModel(tok), tok) if "train_stage1" in str(d) else real_load(d, c))
    ctx = StubContext(run_dir=tmp_path / "run", outputs={**stages, "corpus": tmp_path / "nocorpus"})
    m = E.run_final(cfg, ctx, tmp_path / "out")
    assert m["pubmedqa/acc/stage1"] == 1.0 and m["pubmedqa/acc/final"] == 1.0
    assert m["pubmedqa/macro_f1/stage1"] == 1.0 and m["pubmedqa/n"] == 10
    assert m["pubmedqa/majority_rate"] == pytest.approx(0.5)
    lo, hi = m["pubmedqa/acc/stage1/ci95"]
    assert 0.6 < lo < 1.0 and hi == pytest.approx(1.0)
    assert "eval.jsonl: no such file" in m["bpb/error"] and "bpb/stage1" not in m  # recorded, not raised
    cols, rows = ctx.tracker.tables["pubmedqa"]
    assert cols == E.PUBMEDQA_COLUMNS and [r[0] for r in rows][-1] == "stage1"


def test_a_model_that_always_answers_maybe_scores_the_maybe_share(tmp_path):
    tok = word_tokenizer(MARKER_WORDS)
    labels = ["yes"] * 5 + ["no"] * 3 + ["maybe"] * 2
    examples = [{"id": str(i), "context": "the drug gamma", "question": "does it work?", "label": lab}
                for i, lab in enumerate(labels)]
    r = M.pubmedqa_accuracy(MarkerModel(tok), tok, examples, progress=False)
    assert r["pred_counts"] == {"yes": 0, "no": 0, "maybe": 10} and r["accuracy"] == pytest.approx(0.2)


def test_run_final_without_training_uses_init_as_final(stages, tmp_path):
    outputs = {k: v for k, v in stages.items() if k != "train_stage1"}
    ctx = StubContext(run_dir=tmp_path / "run", outputs=outputs)
    m = E.run_final(make_cfg(), ctx, tmp_path / "out")  # pubmedqa_file None: skipped silently
    assert m["eval/final_model"] == "init"
    assert not any(k.startswith(("pubmedqa/", "bpb/")) for k in m)
    assert "eval/errors" not in m
    assert [r[0] for r in ctx.tracker.tables["samples"][1]] == ["source"] * 3 + ["init"] * 3
    assert (ctx.run_dir / "recovery.png").is_file()
