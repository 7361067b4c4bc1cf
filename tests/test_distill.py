"""Cross-tokenizer distillation: chunks of shared byte boundaries and the chunk-likelihood loss (``tokalign/distill.py``)."""

from __future__ import annotations

import torch

from conftest import need_assets, tiny_llama
from tokalign import distill as D
from tokalign import refs


def _chunk_bytes(ids, tb, ch, teacher_tok):
    s = [b"".join(tb[ids[i]] for i in toks) for toks in ch.student]
    flat = [t for seg in ch.teacher_ids for t in seg]
    t = [teacher_tok.decode([flat[j] for j in toks]).encode("utf-8") for toks in ch.teacher]
    return s, t


def test_chunks_of_byte_level_bpe_against_sentencepiece_cover_the_same_bytes():
    assets = need_assets()
    student = refs.load_tokenizer(str(assets / "tokenizers" / "ggml-vocab-qwen2.gguf"))
    teacher = refs.load_tokenizer(str(assets / "tokenizers" / "ggml-vocab-llama-spm.gguf"))
    text = "The patient's BP was 120/80 mmHg; endotracheal intubation followed."
    ids = student(text, add_special_tokens=False)["input_ids"]
    tb = D.token_bytes(student)
    assert b"".join(tb[i] for i in ids) == text.encode("utf-8")  # the student's bytes are exact
    ch = D.align_chunks(ids, tb, teacher)
    s, t = _chunk_bytes(ids, tb, ch, teacher)
    assert len(ch.student) >= 5
    # hand-checked: ' patient' is one token on both sides; "'s" is one Qwen2 token and two pieces ("'", "s");
    # ' endotracheal' is ' end'+'otr'+'ache'+'al' in Qwen2 and '▁end'+'ot'+'rache'+'al' in SentencePiece, so
    # 'otrache' is one chunk of two tokens on each side
    flat = [t for seg in ch.teacher_ids for t in seg]
    pairs = {a: ([student.convert_ids_to_tokens(ids[i]) for i in st], teacher.convert_ids_to_tokens([flat[j] for j in tt]))
             for a, st, tt in zip(s, ch.student, ch.teacher)}
    assert pairs[b" patient"] == (["Ġpatient"], ["▁patient"])
    assert pairs[b"'s"] == (["'s"], ["'", "s"])
    assert pairs[b"otrache"] == (["otr", "ache"], ["ot", "rache"])
    for a, b in zip(s, t):
        assert a.strip() == b.strip()  # SentencePiece decodes a chunk without its leading space
    assert ch.student[0][0] > 0  # the block's first token has no context: never scored


def test_a_special_token_splits_the_teacher_text_and_a_cut_character_is_left_out():
    assets = need_assets()
    student = refs.load_tokenizer(str(assets / "tokenizers" / "ggml-vocab-qwen2.gguf"))
    teacher = refs.load_tokenizer(str(assets / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    tb = D.token_bytes(student)
    eos = student.convert_tokens_to_ids("<|endoftext|>")
    ids = student("dose 5 µg daily", add_special_tokens=False)["input_ids"] + [eos] + \
        student("next note", add_special_tokens=False)["input_ids"]
    segs = D.teacher_segments(ids, tb)
    assert [raw for _, raw in segs] == [b"dose 5 \xc2\xb5g daily", b"next note"]
    assert D._valid_utf8(b"\xb5g daily") == (1, 8) and D._valid_utf8(b"dose \xc2") == (0, 5)
    ch = D.align_chunks(ids, tb, teacher)
    assert len(ch.teacher_ids) == 2 and all(i != ids.index(eos) for toks in ch.student for i in toks)


def test_loss_is_zero_for_the_same_model_and_tokenizer_and_positive_otherwise():
    assets = need_assets()
    tok = refs.load_tokenizer(str(assets / "tokenizers" / "ggml-vocab-gpt-2.gguf"))
    tb = D.token_bytes(tok)
    teacher, other = tiny_llama(vocab=len(tok), seed=0), tiny_llama(vocab=len(tok), seed=1)
    texts = ["The patient was given aspirin.", "Blood pressure fell after treatment."]
    ids = [tok(t, add_special_tokens=False)["input_ids"][:7] for t in texts]
    x = torch.tensor(ids)
    chunks = [D.align_chunks(i, tb, tok) for i in ids]
    assert all(len(c.student) == len(i) - 1 for c, i in zip(chunks, ids))  # one tokenizer: every token a chunk
    start = tok.convert_tokens_to_ids("<|endoftext|>")
    t_lp = [D.teacher_logprobs(teacher, c.teacher_ids, None, "cpu") for c in chunks]
    same, n = D.chunk_loss(teacher(input_ids=x).logits, x, chunks, t_lp)
    assert n == sum(len(c.student) for c in chunks) and abs(float(same)) < 1e-5
    diff, _ = D.chunk_loss(other(input_ids=x).logits, x, chunks, t_lp)
    assert float(diff) > 1e-3
    assert start is not None


def test_a_few_distillation_steps_lower_the_loss():
    assets = need_assets()
    tok = refs.load_tokenizer(str(assets / "tokenizers" / "ggml-vocab-gpt-2.gguf"))
    tb = D.token_bytes(tok)
    teacher, student = tiny_llama(vocab=len(tok), seed=0), tiny_llama(vocab=len(tok), seed=1)
    ids = [tok("Hypertension is common in older adults with diabetes.", add_special_tokens=False)["input_ids"][:9]]
    x = torch.tensor(ids)
    chunks = [D.align_chunks(ids[0], tb, tok)]
    t_lp = [D.teacher_logprobs(teacher, chunks[0].teacher_ids, None, "cpu")]
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss, _ = D.chunk_loss(student(input_ids=x).logits, x, chunks, t_lp)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


def _distill_workspace(tmp_path):
    """A tiny init model on the GPT-2 vocabulary, a tiny teacher on SmolLM2's, and 40 short documents."""
    import numpy as np

    from tokalign.context import Context

    assets = need_assets()
    tok = refs.load_tokenizer(str(assets / "tokenizers" / "ggml-vocab-gpt-2.gguf"))
    teacher_tok = refs.load_tokenizer(str(assets / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    texts = [f"Patient {i} had blood pressure {120 + i}/80 and was given aspirin daily." for i in range(40)]
    tiny_llama(vocab=len(tok), seed=1).save_pretrained(tmp_path / "init" / "model")
    tok.save_pretrained(tmp_path / "init" / "model")
    tiny_llama(vocab=len(teacher_tok), seed=0).save_pretrained(tmp_path / "source" / "model")
    teacher_tok.save_pretrained(tmp_path / "source" / "model")
    docs = [np.array(tok(t, add_special_tokens=False)["input_ids"], dtype=np.uint32) for t in texts]
    (tmp_path / "tokenize").mkdir()
    np.save(tmp_path / "tokenize" / "target_ids.npy", np.concatenate(docs))
    np.save(tmp_path / "tokenize" / "target_offsets.npy", np.concatenate([[0], np.cumsum([len(d) for d in docs])]))
    (tmp_path / "corpus").mkdir()
    (tmp_path / "run").mkdir()
    return Context(run_dir=tmp_path / "run", outputs={k: tmp_path / k for k in ("init", "tokenize", "corpus", "source")})


def _losses(out):
    import json

    return [h["loss"] for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]


def test_stage1_trains_on_the_distillation_objective(tmp_path):
    """``train.objective=distill`` through the training stage: the teacher is the ``source`` output (its own
    tokenizer), the logged loss is the chunk loss and it falls; ``mix`` logs both parts."""
    from conftest import make_cfg
    from tokalign.stages import train

    ctx = _distill_workspace(tmp_path)
    cfg = make_cfg(steps_stage1=6, train={"objective": "distill", "seq_len": 24})
    m = train.run_stage1(cfg, ctx, tmp_path / "s1")
    assert m["stage1/chunks"] > 10 and m["stage1/lm_loss"] > 0
    losses = _losses(tmp_path / "s1")
    assert losses[-1] == m["stage1/final_loss"] and losses[-1] < losses[0]
    mixed = train.run_stage1(make_cfg(steps_stage1=2, train={"objective": "mix", "seq_len": 24}), ctx, tmp_path / "s2")
    lm, d = mixed["stage1/lm_loss"], mixed["stage1/distill_loss"]
    assert mixed["stage1/final_loss"] > 0 and lm > 0 and d > 0


def test_the_teacher_cache_trains_the_same_and_spares_the_teacher_the_second_time(tmp_path, monkeypatch):
    """``train.teacher_cache=true``: the first run scores and stores every block it trains on and trains exactly as
    without the cache; a second run (as another job of a sweep would) reads every block, never runs the teacher,
    and trains exactly the same again."""
    from conftest import make_cfg
    from tokalign.stages import train

    ctx = _distill_workspace(tmp_path)
    kw = dict(steps_stage1=4, cache_dir=str(tmp_path / "cache"))
    plain = train.run_stage1(make_cfg(**kw, train={"objective": "distill", "seq_len": 24}), ctx, tmp_path / "plain")
    first = train.run_stage1(make_cfg(**kw, train={"objective": "distill", "seq_len": 24, "teacher_cache": True}), ctx,
                             tmp_path / "first")
    assert _losses(tmp_path / "first") == _losses(tmp_path / "plain") and first["stage1/final_loss"] == plain["stage1/final_loss"]
    sequences = 4 * 2 * 2  # steps x micro-batch x accumulation
    assert first["stage1/teacher_cache_misses"] + first["stage1/teacher_cache_hits"] == sequences
    assert first["stage1/teacher_cache_misses"] > 0
    root = D.teacher_scores_root(tmp_path / "cache", ctx.path("source"), ctx.path("tokenize"), "float32")
    assert len(list(root.rglob("*.safetensors"))) == first["stage1/teacher_cache_misses"]

    def no_teacher(*a, **k):
        raise AssertionError("the teacher ran although its scores were stored")

    monkeypatch.setattr(D, "teacher_logprobs", no_teacher)
    second = train.run_stage1(make_cfg(**kw, train={"objective": "distill", "seq_len": 24, "teacher_cache": True}), ctx,
                              tmp_path / "second")
    assert second["stage1/teacher_cache_hits"] == sequences and second["stage1/teacher_cache_misses"] == 0
    assert _losses(tmp_path / "second") == _losses(tmp_path / "plain")  # the stored scores are the teacher's


def test_a_stored_block_that_does_not_fit_is_scored_again(tmp_path):
    assets = need_assets()
    tok = refs.load_tokenizer(str(assets / "tokenizers" / "ggml-vocab-gpt-2.gguf"))
    teacher = tiny_llama(vocab=len(tok), seed=0)
    ids = tok("Hypertension is common in older adults.", add_special_tokens=False)["input_ids"]
    segs = D.align_chunks(ids, D.token_bytes(tok), tok).teacher_ids
    store = D.TeacherScores(tmp_path)
    want = D.teacher_logprobs(teacher, segs, None, "cpu")
    got = store.scores(teacher, ids, segs, None, "cpu")
    assert store.misses == 1 and all(torch.allclose(a, b, equal_nan=True) for a, b in zip(got, want))
    again = store.get(ids, [len(s) for s in segs])
    assert again is not None and all(torch.allclose(a, b, equal_nan=True) for a, b in zip(again, want))
    assert store.get(ids, [len(s) + 1 for s in segs]) is None  # other segments: not this block's scores
    store.path(ids).write_bytes(b"not a safetensors file")
    assert store.get(ids, [len(s) for s in segs]) is None
    store.scores(teacher, ids, segs, None, "cpu")
    assert store.misses == 2 and store.get(ids, [len(s) for s in segs]) is not None  # scored again and rewritten


def test_scores_filled_ahead_serve_a_whole_training_run(tmp_path, monkeypatch):
    """``scripts/teacher_scores.py``'s ``fill`` scores every packed block once (a rerun stores nothing new); a
    training run on the same source, tokenization and ``train.seq_len`` then never runs the teacher."""
    import sys
    from pathlib import Path

    from conftest import make_cfg
    from tokalign.stages import train

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import teacher_scores

    ctx = _distill_workspace(tmp_path)
    refs.load_tokenizer(str(tmp_path / "init" / "model")).save_pretrained(tmp_path / "tokenize" / "target_tokenizer")
    cfg = make_cfg(steps_stage1=4, cache_dir=str(tmp_path / "cache"),
                   train={"objective": "distill", "seq_len": 24, "teacher_cache": True})
    paths = {"source": tmp_path / "source", "tokenize": tmp_path / "tokenize"}
    r = teacher_scores.fill(cfg, paths, progress=False)
    assert r["scored"] == r["blocks"] == r["of_blocks"] > 16 and r["already_stored"] == 0 and r["teacher_tokens"] > 0
    assert teacher_scores.fill(cfg, paths, progress=False)["already_stored"] == r["blocks"]
    monkeypatch.setattr(D, "teacher_logprobs", lambda *a, **k: (_ for _ in ()).throw(AssertionError("teacher ran")))
    m = train.run_stage1(cfg, ctx, tmp_path / "s1")
    assert m["stage1/teacher_cache_misses"] == 0 and m["stage1/teacher_cache_hits"] == 16
