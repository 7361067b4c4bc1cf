"""Training stages (tokalign/stages/train.py) on a tiny random Llama, plus one slow test on the real SmolLM2."""

from __future__ import annotations

import functools
import json
import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")

from tokalign.config import Config, EvalConfig, LRScheduleConfig, TrainConfig  # noqa: E402
from tokalign.data import PackedSequences  # noqa: E402
from tokalign.context import Context  # noqa: E402
from tokalign.stages import train  # noqa: E402
from conftest import EOS_ID, V, load_sd, make_cfg, make_workspace, toy_docs, toy_model, toy_tokenizer  # noqa: E402,F401

class RecordIndices:
    """Monkeypatches PackedSequences.__getitem__ to record the global sequence indices fetched."""

    def __init__(self, monkeypatch):
        self.seen: list[int] = []
        orig = PackedSequences.__getitem__

        def getitem(ds, k):
            self.seen.append(ds.global_index(k))
            return orig(ds, k)

        monkeypatch.setattr(PackedSequences, "__getitem__", getitem)


class Crash(Exception):
    pass


def crash_after(step: int):
    from transformers import TrainerCallback

    class _Cb(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == step:
                raise Crash(f"simulated crash after step {step}")

    return _Cb()


# ----------------------------------------------------------------------------------------------------------------------
# stage 1

@pytest.mark.parametrize("tied", [True, False])
def test_stage1_changes_only_embeddings_and_head(tmp_path, tied):
    ctx = make_workspace(tmp_path, tied=tied)
    out = tmp_path / "s1"
    metrics = train.run_stage1(make_cfg(train={"eval_steps": 4}), ctx, out)

    before = load_sd(tmp_path / "init" / "model")
    after = load_sd(out / "model")
    assert before.keys() == after.keys()
    trainable = {"model.embed_tokens.weight", "lm_head.weight"}
    for k in before:
        if k in trainable:
            assert not torch.equal(before[k], after[k]), f"{k} did not train"
        else:
            assert torch.equal(before[k], after[k]), f"{k} changed in stage 1"
    if tied:
        assert torch.equal(after["model.embed_tokens.weight"], after["lm_head.weight"])
    else:
        assert not torch.equal(after["model.embed_tokens.weight"], after["lm_head.weight"])

    # artifacts and metrics
    hist = json.loads((out / "log_history.json").read_text())
    assert [h["step"] for h in hist] == [1, 2, 3, 4]
    for h in hist:
        assert {"loss", "lr", "grad_norm", "tokens_seen"} <= h.keys()
        assert h["tokens_seen"] == h["step"] * 4 * 16
    assert "eval_bpb" in hist[-1] and math.isfinite(hist[-1]["eval_bpb"])
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert metrics["stage1/steps"] == 4
    assert metrics["stage1/final_loss"] == pytest.approx(hist[-1]["loss"])
    for k in ("stage1/tokens_per_s", "stage1/passes", "stage1/seconds", "stage1/eval_bpb"):
        assert metrics[k] > 0
    state = json.loads((out / "data_state.json").read_text())
    assert (state["start_idx"], state["end_idx"], state["global_batch"]) == (0, 16, 4)
    assert not (out / "checkpoints").exists()  # removed after success
    assert (out / "model" / "model.safetensors").is_file()
    assert (out / "model" / "tokenizer.json").is_file()


def test_tracker_gets_namespaced_metrics(tmp_path):
    class Rec:
        def __init__(self):
            self.logs, self.steps = [], []

        def log(self, d, step=None):
            self.logs.append(dict(d))

        def define_step(self, ns):
            self.steps.append(ns)

        def artifact(self, *a):
            self.art = a

    ctx = make_workspace(tmp_path)
    ctx.tracker = Rec()
    train.run_stage1(make_cfg(train={"eval_steps": 2}), ctx, tmp_path / "s1")
    assert ctx.tracker.steps == ["stage1"]
    step_logs = [d for d in ctx.tracker.logs if "stage1/loss" in d]
    assert [d["stage1/step"] for d in step_logs] == [1, 2, 3, 4]
    for k in ("stage1/lr", "stage1/grad_norm", "stage1/tokens_seen", "stage1/tokens_per_s", "stage1/passes"):
        assert all(k in d for d in step_logs), k
    evals = [d for d in ctx.tracker.logs if "stage1/eval_bpb" in d]
    assert [d["stage1/step"] for d in evals] == [2, 4]  # every eval_steps, the last one also the end-of-stage eval
    hist = json.loads((tmp_path / "s1" / "log_history.json").read_text())
    assert [h["step"] for h in hist if "eval_bpb" in h] == [2, 4]
    for h in (h for h in hist if "eval_bpb" in h):  # each curve point carries its 95% interval
        lo, hi = h["eval_bpb_ci95"]
        assert lo <= h["eval_bpb"] <= hi and lo < hi
    assert all(d["stage1/eval_bpb_ci95_low"] <= d["stage1/eval_bpb"] <= d["stage1/eval_bpb_ci95_high"] for d in evals)


# ----------------------------------------------------------------------------------------------------------------------
# learning-rate schedules

def _lrs_at(name, out, steps=20, warmup=0.1, **kw):
    """The learning rate at each step as the stage sets it up: the stage's own TrainingArguments (schedule, its
    kwargs and the warmup share, as ``train_stage`` passes them) and the scheduler transformers' Trainer builds
    from them (``create_scheduler``: the warmup steps come from the arguments, not from this test)."""
    from transformers import Trainer

    cfg = make_cfg(steps_stage1=steps, lr_stage1=1.0, lr_schedule=LRScheduleConfig(name=name, warmup_ratio=warmup,
                                                                                     **kw))
    args = train.training_arguments(cfg, train.STAGE1, out)
    assert args.max_steps == steps and args.learning_rate == 1.0
    trainer = Trainer(model=toy_model(True), args=args)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    s = trainer.create_scheduler(num_training_steps=steps, optimizer=opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    return np.array(lrs)


def test_lr_schedules_follow_the_config(tmp_path):
    _lrs = functools.partial(_lrs_at, out=tmp_path)
    cos = _lrs("cosine")
    assert cos[0] == 0 and cos[2] == pytest.approx(1.0) and cos[-1] < 0.02 and np.all(np.diff(cos[2:]) <= 0)
    cos_min = _lrs("cosine", min_lr_ratio=0.1)
    assert cos_min[2] == pytest.approx(1.0) and 0.1 <= cos_min[-1] < 0.12
    lin = _lrs("linear")
    assert lin[2] == pytest.approx(1.0) and np.allclose(np.diff(lin[2:]), np.diff(lin[2:])[0])
    const = _lrs("constant")
    assert const[0] == 0 and np.allclose(const[2:], 1.0)
    wsd = _lrs("wsd", decay_ratio=0.25, min_lr_ratio=0.1)
    assert np.allclose(wsd[2:15], 1.0)  # stable until the last 25% (5 of 20 steps)
    assert np.all(np.diff(wsd[15:]) < 0) and wsd[-1] >= 0.1


# ----------------------------------------------------------------------------------------------------------------------
# data order: offsets in sequences, independent of the batch split

def test_same_sequences_for_any_micro_batch_split_and_stage2_continues(tmp_path, monkeypatch):
    rec = RecordIndices(monkeypatch)
    ctx = make_workspace(tmp_path)
    finals = []
    for micro, accum in [(4, 1), (2, 2), (1, 4)]:
        rec.seen.clear()
        out = tmp_path / f"s1_{micro}x{accum}"
        m = train.run_stage1(make_cfg(train={"micro_batch_size": micro, "grad_accum": accum}), ctx, out)
        assert rec.seen == list(range(16)), (micro, accum)
        finals.append((load_sd(out / "model")["model.embed_tokens.weight"], m))
    for w, _ in finals[1:]:
        torch.testing.assert_close(w, finals[0][0], atol=1e-5, rtol=1e-4)

    # stage 2 continues where stage 1 stopped (4 steps x 4 sequences), in sequences
    ctx.outputs["train_stage1"] = tmp_path / "s1_2x2"
    rec.seen.clear()
    m2 = train.run_stage2(make_cfg(), ctx, tmp_path / "s2")
    assert rec.seen == list(range(16, 28))
    assert m2["stage2/start_idx"] == 16
    rec.seen.clear()
    train.run_stage2(make_cfg(train_start_idx_stage2=5, steps_stage2=1), ctx, tmp_path / "s2b")
    assert rec.seen == list(range(5, 9))


# ----------------------------------------------------------------------------------------------------------------------
# resume

def _run_with_crash(cfg, ctx, out, stage, crash_step, rec):
    with pytest.raises(Crash):
        train.train_stage(cfg, ctx, out, train.SPECS[stage], callbacks=[crash_after(crash_step)])
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    rec.seen.clear()
    return train.train_stage(cfg, ctx, out, train.SPECS[stage])


@pytest.mark.parametrize("lora", [False, True])
def test_resume_sees_the_same_batches_and_ends_identically(tmp_path, monkeypatch, lora):
    rec = RecordIndices(monkeypatch)
    ctx = make_workspace(tmp_path, tied=True)
    stage = 2 if lora else 1
    cfg = make_cfg(steps_stage1=6, steps_stage2=6, stage2_use_lora=lora,
                   train={"lora_r": 4, "lora_dropout": 0.1, "lora_target_modules": ["q_proj", "v_proj"]})
    gb = 4
    start = 6 * gb if stage == 2 else 0  # stage 2 without stage 1 output: steps_stage1 x global batch

    straight = tmp_path / "straight"
    train.train_stage(cfg, ctx, straight, train.SPECS[stage])
    straight_seen = list(rec.seen)
    assert straight_seen == list(range(start, start + 6 * gb))

    resumed = tmp_path / "resumed"
    rec.seen.clear()
    _run_with_crash(cfg, ctx, resumed, stage, crash_step=3, rec=rec)
    assert json.loads((resumed / "resume.json").read_text()) == {"resumed": True, "step": 2,
                                                                  "checkpoint": "checkpoint-2"}
    assert json.loads((straight / "resume.json").read_text())["resumed"] is False
    # the resumed run fetches exactly the sequences of steps 3..6, nothing before
    assert rec.seen == straight_seen[2 * gb:]

    a, b = load_sd(straight / "model"), load_sd(resumed / "model")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5, msg=k)
    ha = json.loads((straight / "log_history.json").read_text())
    hb = json.loads((resumed / "log_history.json").read_text())
    assert [h["step"] for h in hb] == [h["step"] for h in ha] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([h["loss"] for h in hb], [h["loss"] for h in ha], rtol=1e-5)


def test_explicit_missing_checkpoint_is_a_clear_error(tmp_path):
    ctx = make_workspace(tmp_path)
    with pytest.raises(train.TrainInputError, match="nope: no such checkpoint"):
        train.train_stage(make_cfg(), ctx, tmp_path / "s1", train.STAGE1, resume_from_checkpoint=str(tmp_path / "nope"))


# ----------------------------------------------------------------------------------------------------------------------
# NaN guard

def test_nan_loss_stops_the_stage_and_keeps_the_last_good_checkpoint(tmp_path):
    from transformers import TrainerCallback

    class Poison(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            if state.global_step == 2:  # checkpoint-2 is saved; poison the weights used by step 3
                with torch.no_grad():
                    model.get_input_embeddings().weight.fill_(float("nan"))

    ctx = make_workspace(tmp_path)
    out = tmp_path / "s1"
    with pytest.raises(train.TrainingDivergedError, match=r"train_stage1: .*nan at optimizer step 3 of 4"):
        train.train_stage(make_cfg(), ctx, out, train.STAGE1, callbacks=[Poison()])
    ckpts = train.checkpoints(out / "checkpoints")
    assert [c.name for c in ckpts] == ["checkpoint-2"]
    sd = load_sd(ckpts[0])
    assert all(torch.isfinite(v).all() for v in sd.values())
    assert not (out / "model").exists()


# ----------------------------------------------------------------------------------------------------------------------
# stage 2 with LoRA

@pytest.mark.parametrize("tied", [True, False])
def test_lora_stage2_changes_only_adapted_modules_and_embeddings(tmp_path, tied):
    from transformers import AutoModelForCausalLM

    from tokalign.config import WandbConfig

    class Rec:
        def __init__(self):
            self.artifacts = []

        def log(self, d, step=None):
            pass

        def define_step(self, ns):
            pass

        def artifact(self, name, type_, paths):
            self.artifacts.append((name, type_, list(paths)))

    ctx = make_workspace(tmp_path, tied=tied)
    ctx.tracker = Rec()
    cfg = make_cfg(stage2_use_lora=True, train={"lora_r": 4, "lora_target_modules": ["q_proj", "v_proj"]},
                   wandb=WandbConfig(mode="disabled", log_model=True))
    out = tmp_path / "s2"
    metrics = train.run_stage2(cfg, ctx, out)
    assert ctx.tracker.artifacts == [("adapted_model", "model", [ctx.run_dir / "adapted_model"])]
    before = load_sd(tmp_path / "init" / "model")
    after = load_sd(out / "model")
    assert before.keys() == after.keys()  # merged: no lora_ or modules_to_save keys
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    expected = {"model.embed_tokens.weight", "lm_head.weight"} | {
        f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")}
    assert changed == expected
    if tied:
        assert torch.equal(after["model.embed_tokens.weight"], after["lm_head.weight"])
    # the merged model loads as a plain causal LM, and the run dir has the adapted model
    m = AutoModelForCausalLM.from_pretrained(str(ctx.run_dir / "adapted_model"))
    assert m.config.tie_word_embeddings == tied
    with torch.no_grad():
        logits = m(input_ids=torch.tensor([[2, 3, 4]])).logits
    assert torch.isfinite(logits).all()
    assert metrics["stage2/trainable_params"] < sum(v.numel() for v in before.values())
    assert (out / "model" / "tokenizer.json").is_file()


# ----------------------------------------------------------------------------------------------------------------------
# slow: the real SmolLM2

@pytest.mark.slow
def test_stage1_on_real_smollm2_lowers_the_loss(tmp_path, assets):
    gguf = assets / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    pqa = assets / "pubmedqa" / "ori_pqal.json"
    from tokalign import refs

    model = refs.plain_copy(refs.load_model(str(gguf)))
    tok = refs.load_tokenizer(str(gguf))
    init = tmp_path / "init" / "model"
    model.save_pretrained(init)
    tok.save_pretrained(init)
    del model

    records = list(json.loads(pqa.read_text()).values())
    texts = [" ".join(r["CONTEXTS"]) for r in records[:6]]  # ~1,800 tokens: a few passes memorise them
    docs = [np.asarray(tok(t, add_special_tokens=False)["input_ids"], dtype=np.uint32) for t in texts]
    tokd = tmp_path / "tokenize"
    tokd.mkdir()
    ids = np.concatenate(docs)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    np.save(tokd / "target_ids.npy", ids)
    np.save(tokd / "target_offsets.npy", offsets)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "dev.jsonl").write_text(json.dumps({"id": "e", "text": " ".join(records[6]["CONTEXTS"])}) + "\n")
    ctx = Context(run_dir=tmp_path, outputs={"init": init.parent, "tokenize": tokd, "corpus": corpus})
    cfg = make_cfg(steps_stage1=6, lr_stage1=3e-4, train={"seq_len": 64, "micro_batch_size": 4, "grad_accum": 1,
                                                          "save_steps": 100, "eval_steps": 6},
                   eval=EvalConfig(max_eval_samples=1, seq_len=256, stride=128),
                   lr_schedule=LRScheduleConfig(name="constant", warmup_ratio=0.0))
    metrics = train.run_stage1(cfg, ctx, tmp_path / "s1")
    hist = json.loads((tmp_path / "s1" / "log_history.json").read_text())
    assert len([h for h in hist if "loss" in h]) == 6
    assert all(math.isfinite(h["loss"]) for h in hist if "loss" in h)
    assert math.isfinite(metrics["stage1/eval_bpb"])

    # the training loss over all packed blocks, before and after
    from transformers import AutoModelForCausalLM

    from tokalign.data import pack_blocks

    blocks = torch.from_numpy(pack_blocks(ids, offsets, tok.eos_token_id, 64).astype(np.int64))

    def mean_loss(folder):
        m = AutoModelForCausalLM.from_pretrained(str(folder))
        with torch.no_grad():
            return float(np.mean([m(input_ids=b, labels=b).loss.item() for b in blocks.split(8)]))

    before, after = mean_loss(init), mean_loss(tmp_path / "s1" / "model")
    print(f"slow stage-1 test: loss over the training blocks {before:.4f} -> {after:.4f}")
    assert after < before - 0.02, (before, after)
