"""Bits per byte and PubMedQA scoring (tokalign/metrics.py) on tiny models with known answers."""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import TEXTS, MarkerModel, byte_tokenizer, tiny_llama, word_tokenizer
from tokalign import metrics as M
from tokalign.config import default_assets_dir

os.environ.setdefault("WANDB_MODE", "disabled")
ASSETS = default_assets_dir()


# ---------------------------------------------------------------------------- tiny fixtures


def manual_nll(model, seq: list[int]) -> float:
    """NLL (nats) of seq[1:] given its prefix, one plain full-context forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return -sum(float(lp[t - 1, seq[t]]) for t in range(1, len(seq)))


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


# ---------------------------------------------------------------------------- bits per byte


def test_bpb_matches_hand_computation(tok, llama):
    r = M.bits_per_byte(llama, tok, TEXTS, seq_len=512, stride=256, batch_size=3, progress=False)
    nll = sum(manual_nll(llama, [tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"]) for t in TEXTS)
    n_bytes = sum(len(t.encode("utf-8")) for t in TEXTS)
    assert r["bytes"] == n_bytes
    assert r["tokens"] == n_bytes  # one token per byte, all scored, the start token never
    assert r["docs"] == len(TEXTS)
    assert r["start_token"] == 1
    assert r["nll"] == pytest.approx(nll, rel=1e-5)
    assert r["bits"] == pytest.approx(nll / math.log(2), rel=1e-5)
    assert r["bpb"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    assert math.isfinite(r["bpb"]) and r["bpb"] > 1.0  # a random model is far from predicting bytes


def test_bpb_batching_and_padding_do_not_change_the_result(tok, llama):
    a = M.bits_per_byte(llama, tok, TEXTS, seq_len=16, stride=8, batch_size=1, progress=False)
    b = M.bits_per_byte(llama, tok, TEXTS, seq_len=16, stride=8, batch_size=5, progress=False)
    assert a["tokens"] == b["tokens"] and a["windows"] == b["windows"]
    assert b["nll"] == pytest.approx(a["nll"], rel=1e-5)


def test_decoder_head_path_equals_plain_forward(tok, llama):
    rows = [[1, 5, 9, 40, 7, 3], [1, 8, 8]]
    queries = [([0, 2, 4], [5, 40, 3]), ([1], [8])]
    assert M._head_path_ok(llama, torch.device("cpu"))
    fast = M.score_rows(llama, rows, queries, device=torch.device("cpu"))
    M._HEAD_OK[llama] = False
    try:
        slow = M.score_rows(llama, rows, queries, device=torch.device("cpu"))
    finally:
        del M._HEAD_OK[llama]
    for f, s in zip(fast, slow):
        assert torch.allclose(f, s, atol=1e-5)
    with torch.no_grad():
        lp = torch.log_softmax(llama(torch.tensor([rows[0]])).logits[0].double(), -1)
    assert fast[0].tolist() == pytest.approx([float(lp[0, 5]), float(lp[2, 40]), float(lp[4, 3])], rel=1e-5)


def test_window_covering_the_document_equals_full_context(tok, llama):
    text = "Metformin lowers hepatic glucose output in type 2 diabetes. " * 3  # 183 bytes
    seq = [1] + tok(text, add_special_tokens=False)["input_ids"]
    r = M.bits_per_byte(llama, tok, [text], seq_len=len(seq), stride=7, batch_size=2, progress=False)
    assert r["windows"] == 1
    assert r["nll"] == pytest.approx(manual_nll(llama, seq), rel=1e-5)


def test_sliding_windows_score_every_token_exactly_once(tok, llama):
    text = "Randomized controlled trials show that aspirin reduces stroke risk. " * 3
    n = len(text.encode())
    seq = list(range(n + 1))
    for seq_len, stride in [(32, 8), (32, 32), (17, 5), (16, 15)]:
        wins = M.make_windows(seq, seq_len, stride)
        scored = [p for b, e, f in wins for p in range(f, e)]
        assert sorted(scored) == list(range(1, n + 1))  # each position once, position 0 never
        for b, e, f in wins:
            assert e - b <= seq_len and b <= f - 1  # a window fits; each token has >= 1 context token
            assert all(p - b <= seq_len - 1 for p in range(f, e))
        for (b0, e0, _), (b1, e1, f1) in zip(wins, wins[1:]):
            assert b1 == b0 + min(stride, seq_len - 1) and f1 == e0
        r = M.bits_per_byte(llama, tok, [text, "short"], seq_len=seq_len, stride=stride, batch_size=4,
                            progress=False)
        assert r["tokens"] == n + 5
        assert r["windows"] == len(wins) + 1
    # more context can only be given to tokens than the full-context score... check the windowed score is close
    full = M.bits_per_byte(llama, tok, [text], seq_len=512, stride=512, progress=False)
    win = M.bits_per_byte(llama, tok, [text], seq_len=32, stride=8, progress=False)
    assert win["tokens"] == full["tokens"] and win["nll"] != full["nll"]
    assert win["bpb"] == pytest.approx(full["bpb"], rel=0.2)


def test_start_token_fallbacks():
    eos_only = byte_tokenizer(bos=False, eos=True)
    assert M.start_token_id(eos_only) == 2
    neither = byte_tokenizer(bos=False, eos=False)
    assert M.start_token_id(neither) is None
    llama = tiny_llama(seed=1)
    texts = ["abcdef", "xyz"]
    r = M.bits_per_byte(llama, neither, texts, seq_len=64, stride=32, progress=False)
    assert r["start_token"] is None
    assert r["bytes"] == 9 and r["tokens"] == 9 - 2  # first token of each document is context only
    ids = [neither(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert r["nll"] == pytest.approx(sum(manual_nll(llama, s) for s in ids), rel=1e-5)


class CountingModel(torch.nn.Module):
    """Fixed logits: the same log-distribution at every position; counts forward calls."""

    def __init__(self, vocab: int, logits: torch.Tensor | None = None, positions: int = 4096):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab, max_position_embeddings=positions, _name_or_path="fake-lm")
        self.logits = logits if logits is not None else torch.zeros(vocab)
        self.calls: list[torch.Tensor] = []

    def forward(self, input_ids, attention_mask=None, **kw):
        self.calls.append(input_ids.clone())
        B, T = input_ids.shape
        return SimpleNamespace(logits=self.logits.expand(B, T, -1).clone())


def test_out_of_range_token_raises_before_the_model_runs(tok):
    small = CountingModel(vocab=100)
    with pytest.raises(M.TokenRangeError) as ei:
        M.bits_per_byte(small, tok, ["hello ~~~"], seq_len=32, stride=16, progress=False)
    msg = str(ei.value)
    worst = max(tok("hello ~~~", add_special_tokens=False)["input_ids"])
    assert worst >= 100 and f"token id {worst} " in msg  # the largest offending id is named
    assert "100 rows" in msg and "fake-lm" in msg
    assert small.calls == []


def test_uniform_model_gives_log2_vocab_bits_per_token(tok):
    """A model with constant logits is uniform: every byte-token costs exactly log2(V) bits."""
    fake = CountingModel(vocab=259)
    r = M.bits_per_byte(fake, tok, TEXTS, seq_len=8, stride=3, batch_size=2, progress=False)
    assert r["bpb"] == pytest.approx(math.log2(259), rel=1e-6)  # float32 log-softmax


def test_empty_input_is_rejected(tok, llama):
    with pytest.raises(M.MetricsError, match="no text"):
        M.bits_per_byte(llama, tok, ["", ""], seq_len=16, stride=8, progress=False)


# ---------------------------------------------------------------------------- PubMedQA


def test_pubmedqa_picks_the_answer_the_model_prefers():
    tok = word_tokenizer(["Context:", "Question:", "Answer:", "yes", "no", "maybe", "alpha", "beta", "gamma",
                          "does", "it", "work?", "the", "drug"])
    model = MarkerModel(tok)
    rows = [("alpha", "yes"), ("beta", "no"), ("gamma", "maybe"), ("alpha", "no"), ("beta", "no"), ("gamma", "yes")]
    examples = [{"id": str(i), "context": ["the drug", marker], "question": "does it work?", "label": label}
                for i, (marker, label) in enumerate(rows)]
    r = M.pubmedqa_accuracy(model, tok, examples, batch_size=4, progress=False)
    assert [p["pred"] for p in r["predictions"]] == ["yes", "no", "maybe", "yes", "no", "maybe"]
    assert r["correct"] == 4 and r["accuracy"] == pytest.approx(4 / 6)
    assert r["n"] == 6
    assert r["label_counts"] == {"yes": 2, "no": 3, "maybe": 1}
    assert r["pred_counts"] == {"yes": 2, "no": 2, "maybe": 2}
    assert r["per_label_accuracy"]["no"] == pytest.approx(2 / 3)
    assert r["answer_tokens"] == {"yes": [tok.convert_tokens_to_ids("yes")], "no": [tok.convert_tokens_to_ids("no")],
                                  "maybe": [tok.convert_tokens_to_ids("maybe")]}
    # the prompt format
    assert M.pubmedqa_prompt(examples[0]) == ("Context: the drug alpha\nQuestion: does it work?\nAnswer:",
                                              [" yes", " no", " maybe"], True)


def test_pubmedqa_multi_token_answers_sum_log_probs(tok):
    """With a byte tokenizer every answer is several tokens: the score is the sum of their log-probs."""
    torch.manual_seed(3)
    logits = torch.randn(259) * 2
    lp = torch.log_softmax(logits.double(), -1)
    fake = CountingModel(vocab=259, logits=logits)
    examples = [{"id": "a", "context": "Some context.", "question": "Works?", "label": "no"},
                {"id": "b", "context": ["two", "parts"], "question": "Really?", "label": "maybe"}]
    r = M.pubmedqa_accuracy(fake, tok, examples, batch_size=2, progress=False)
    expected = {a: sum(float(lp[i]) for i in tok(" " + a, add_special_tokens=False)["input_ids"])
                for a in M.PUBMEDQA_LABELS}
    best = max(expected, key=expected.get)
    for p in r["predictions"]:
        assert p["logprobs"] == pytest.approx(expected, rel=1e-6)
        assert p["pred"] == best
    # " maybe" (6 tokens) is the longest answer: one row per example carries it, plus one for each other multi-token answer
    assert sum(c.shape[0] for c in fake.calls) == 2 * 3


def test_pubmedqa_truncates_the_prompt_from_the_left(tok):
    fake = CountingModel(vocab=259, positions=40)
    ex = [{"id": "x", "context": "A" * 200, "question": "Q?", "label": "yes"}]
    r = M.pubmedqa_accuracy(fake, tok, ex, batch_size=4, progress=False)
    assert r["truncated"] == 1
    end = tok("\nQuestion: Q?\nAnswer:", add_special_tokens=False)["input_ids"]
    for row in fake.calls[0]:
        row = row.tolist()
        assert len(row) <= 40 and row[0] == tok.bos_token_id
        ans_len = len(row) - 1 - (40 - 1 - 6)  # row = start + kept prompt + answer tokens
        kept = row[1 : len(row) - ans_len]
        assert kept[-len(end) :] == end  # the question survives, the abstract's start is cut


def test_pubmedqa_rejects_bad_labels(tok):
    with pytest.raises(M.MetricsError, match="label"):
        M.pubmedqa_accuracy(CountingModel(259), tok, [{"context": "c", "question": "q", "label": "perhaps"}],
                            progress=False)


# ---------------------------------------------------------------------------- loading and sampling


def _write_pubmedqa(tmp: Path, counts: dict[str, int]) -> tuple[Path, Path]:
    pqal, truth, k = {}, {}, 0
    for lab, n in counts.items():
        for _ in range(n):
            qid = str(10000 + k)
            pqal[qid] = {"QUESTION": f"question {k}?", "CONTEXTS": [f"context {k} a.", "part b."],
                         "final_decision": lab, "LONG_ANSWER": "x"}
            truth[qid] = lab
            k += 1
    (tmp / "ori_pqal.json").write_text(json.dumps(pqal))
    (tmp / "test_ground_truth.json").write_text(json.dumps(truth))  # sorted by label, like the real file
    return tmp / "ori_pqal.json", tmp / "test_ground_truth.json"


def test_load_pubmedqa_stratified_and_seeded(tmp_path):
    pqal, truth = _write_pubmedqa(tmp_path, {"yes": 30, "no": 20, "maybe": 10})
    a = M.load_pubmedqa(pqal, truth, n=12, seed=0)
    assert Counter(e["label"] for e in a) == {"yes": 6, "no": 4, "maybe": 2}
    assert a == M.load_pubmedqa(pqal, truth, n=12, seed=0)
    others = [M.load_pubmedqa(pqal, truth, n=12, seed=s) for s in (1, 2, 3)]
    assert any([e["id"] for e in o] != [e["id"] for e in a] for o in others)
    for o in others:
        assert Counter(e["label"] for e in o) == {"yes": 6, "no": 4, "maybe": 2}
    assert a[0].keys() >= {"id", "question", "context", "label"}
    assert a[0]["context"].endswith("a. part b.")
    assert len(M.load_pubmedqa(pqal, truth, n=0, seed=0)) == 60
    assert len(M.load_pubmedqa(pqal, truth, n=999, seed=0)) == 60
    assert len(M.load_pubmedqa(pqal, None, n=7, seed=0)) == 7


def test_load_pubmedqa_real_test_split_is_balanced():
    pqal, truth = ASSETS / "pubmedqa" / "ori_pqal.json", ASSETS / "pubmedqa" / "test_ground_truth.json"
    if not pqal.is_file():
        pytest.skip("demo assets not present")
    ex = M.load_pubmedqa(pqal, truth, n=50, seed=0)
    assert Counter(e["label"] for e in ex) == {"yes": 28, "no": 17, "maybe": 5}  # 276/169/55 of 500
    assert len({e["id"] for e in ex}) == 50
    assert len(M.load_pubmedqa(pqal, truth, n=500, seed=0)) == 500


def test_load_pubmedqa_errors_name_the_file(tmp_path):
    with pytest.raises(M.PubMedQAError, match=r"nope\.json: no such file"):
        M.load_pubmedqa(tmp_path / "nope.json", None)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(M.PubMedQAError, match="bad.json: not valid JSON"):
        M.load_pubmedqa(bad, None)
    pqal, _ = _write_pubmedqa(tmp_path, {"yes": 2})
    (tmp_path / "ids.json").write_text(json.dumps({"999": "yes"}))
    with pytest.raises(M.PubMedQAError, match="no record for id 999"):
        M.load_pubmedqa(pqal, tmp_path / "ids.json")


# ---------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_bits_per_byte_on_pubmedqa_abstracts():
    gguf = ASSETS / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    pqal = ASSETS / "pubmedqa" / "ori_pqal.json"
    if not gguf.is_file() or not pqal.is_file():
        pytest.skip("demo assets not present")
    from tokalign import refs

    torch.set_num_threads(2)
    model = refs.load_model(str(gguf)).eval()
    tok = refs.load_tokenizer(str(gguf))
    ex = M.load_pubmedqa(pqal, ASSETS / "pubmedqa" / "test_ground_truth.json", n=3, seed=0)
    texts = [e["context"] for e in ex]
    t0 = time.time()
    r = M.bits_per_byte(model, tok, texts, seq_len=256, stride=128, batch_size=4, progress=False)
    dt = time.time() - t0
    print(f"\nSmolLM2-135M bpb on 3 PubMedQA abstracts: {r['bpb']:.4f} ({r['tokens']} tokens, {r['bytes']} bytes, "
          f"{r['windows']} windows, {r['tokens'] / dt:.0f} tokens/s)")
    assert r["tokens"] > 100 and r["bytes"] > 500
    assert 0.5 < r["bpb"] < 2.0
    # the fast decoder/head path is the one used for the real model
    assert M._head_path_ok(model, torch.device("cpu"))
    # and PubMedQA on the smoke mode's 30 stratified test questions reproduces the README's source figures
    # (accuracy 0.467 = 14 of 30, macro-F1 0.328, majority rate 0.567: "Smoke mode" results)
    from tokalign import stats

    ex30 = M.load_pubmedqa(pqal, ASSETS / "pubmedqa" / "test_ground_truth.json", n=30, seed=0)
    q = M.pubmedqa_accuracy(model, tok, ex30, batch_size=4, progress=False, fmt="context")
    labels, preds = [p["label"] for p in q["predictions"]], [p["pred"] for p in q["predictions"]]
    assert all(len(v) == 1 for v in q["answer_tokens"].values())  # single-token answers under this tokenizer
    assert q["n"] == 30 and q["correct"] == sum(a == b for a, b in zip(labels, preds)) == 14
    assert q["accuracy"] == pytest.approx(14 / 30)
    assert stats.macro_f1(labels, preds, M.PUBMEDQA_LABELS) == pytest.approx(0.328, abs=5e-4)
    assert stats.majority_rate(labels) == pytest.approx(17 / 30)
