"""Domain vocabulary (target_tokenizer=domain): the tokenizer it builds and the rows method ``extend`` makes.

    python -m pytest -q tests/test_domain_vocab.py
"""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest

from conftest import ASSETS, SMALL, need_assets, tiny_llama, tokalign
from tokalign import domain_vocab as D
from tokalign import refs
from tokalign.extend_rows import ExtendError, ExtendSettings, extend_rows

SMOL = ASSETS / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SPM = ASSETS / "tokenizers" / "ggml-vocab-llama-spm.gguf"
# a planted phrase after a different word each time: units are isolated left to right, so a frequent n-gram that
# ends inside it (' mg as per') would take its place
WORDS = [a + b for a in ("ka", "lo", "mi", "nu", "pe", "ro", "su", "ti") for b in ("ber", "dan", "gol", "vin", "zet")]
PLANTED = [f"The patient received zorbatide 31415 mg and was {w} as per protocol before the scan.\n"
           f"Afterwards zorbatide 31415 mg was given, {w[::-1]} as per protocol at night.\n" for w in WORDS]


def _pubmedqa(n: int, offset: int = 0) -> list[str]:
    need_assets()
    d = json.loads((ASSETS / "pubmedqa" / "ori_pqal.json").read_text())
    return [" ".join(v["CONTEXTS"]) for v in list(d.values())[offset:offset + n]]


def _build(src, texts, **kw):
    args = dict(size=200, min_freq=2, kinds=list(D.KINDS), max_phrase_words=3)
    args.update(kw)
    built = D.build(D.backend_json(src), texts, texts[:5], **args)
    return built, D.to_hf(src, built.tokenizer_json)


def _free_of_new_strings(tok, src, texts: list[str]) -> list[str]:
    """Pieces of ``texts`` (cut at spaces into 1-4 word runs) that contain no new token's string."""
    new = [tok.convert_tokens_to_string([tok.convert_ids_to_tokens(i)]) for i in range(len(src), len(tok))]
    out = []
    for t in texts:
        words = t.split(" ")
        for i in range(0, len(words), 4):
            piece = " " + " ".join(words[i:i + 4])
            if not any(s in piece for s in new):
                out.append(piece)
    return out


@pytest.fixture(scope="module")
def smol_built():
    src = refs.load_tokenizer(str(SMOL)) if (ASSETS / "models").is_dir() else pytest.skip("no demo assets")
    built, tok = _build(src, _pubmedqa(150), size=400)
    return src, built, tok


@pytest.mark.parametrize("which", ["byte-level", "sentencepiece"])
def test_text_without_new_strings_tokenizes_as_the_source(which, smol_built):
    if which == "byte-level":
        src, built, tok = smol_built
    else:
        src = refs.load_tokenizer(str(SPM))
        built, tok = _build(src, _pubmedqa(150), size=300)
        assert built.reasons and "phrases" in built.reasons[0]  # SentencePiece: no unit can be isolated
    assert len(tok) == len(src) + len(built.merges)
    held_out = _pubmedqa(60, offset=900)
    inp = ASSETS / "tokenizers" / "ggml-vocab-llama-bpe.gguf.inp"
    held_out += [s for s in inp.read_text().split("\n__ggml_vocab_test__\n") if s.strip()]
    pieces = _free_of_new_strings(tok, src, held_out)
    assert len(pieces) > 200
    for p in pieces:
        assert tok(p, add_special_tokens=False).input_ids == src(p, add_special_tokens=False).input_ids, p
    # and text with them is shorter, and decodes to itself
    text = held_out[0]
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) < len(src(text, add_special_tokens=False).input_ids)
    assert tok.decode(ids) == text


def test_a_planted_word_number_and_phrase_each_become_one_token():
    need_assets()
    src = refs.load_tokenizer(str(SMOL))
    built, tok = _build(src, PLANTED + _pubmedqa(20), size=80)
    for s in (" zorbatide", " 31415", " as per protocol"):
        assert len(tok.tokenize(s)) == 1, (s, tok.tokenize(s))
        assert len(src.tokenize(s)) > 1
    kinds = {m.a + m.b: m.kind for m in built.merges}
    assert kinds["Ġzorbatide"] == "words" and kinds["Ġ31415"] == "numbers" and kinds["ĠasĠperĠprotocol"] == "phrases"
    # a phrase never fires inside a longer word or number: the source's split there
    phrase = tok.convert_tokens_to_ids("ĠasĠperĠprotocol")
    for s in (" as per protocols", " as per protocol9", " as per protocolised"):
        assert phrase not in tok(s, add_special_tokens=False).input_ids, s
    assert tok(" as per protocol.", add_special_tokens=False).input_ids[0] == phrase


def test_no_candidate_above_min_freq_is_a_one_line_error_naming_the_key():
    need_assets()
    src = refs.load_tokenizer(str(SMOL))
    with pytest.raises(D.DomainVocabError, match=r"domain_vocab\.min_freq=1000000: no pair") as e:
        _build(src, _pubmedqa(5), min_freq=10 ** 6)
    assert "\n" not in str(e.value)


def test_kinds_choose_what_is_learned(smol_built):
    src, built, _ = smol_built
    assert {m.kind for m in built.merges} == set(D.KINDS)
    words, _ = _build(src, _pubmedqa(150), size=100, kinds=["words"])
    assert {m.kind for m in words.merges} == {"words"}
    assert all(not re.search(r"\d", m.a + m.b) for m in words.merges)
    # each merge saved what it says on the training split: the sum is the real tokenizer's saving
    texts = _pubmedqa(150)
    tok = D.to_hf(src, words.tokenizer_json)
    real = sum(len(src.tokenize(t)) - len(tok.tokenize(t)) for t in texts)
    assert real == sum(m.saved_train for m in words.merges)


def test_extend_rows_keep_old_rows_and_fit_new_output_rows():
    """A tiny tied model on a byte tokenizer extended by one merge: old rows bit-identical, head untied, the new
    output row gives the new token about the logit of its string (the source's log-probability of both pieces)."""
    from conftest import byte_tokenizer

    src = byte_tokenizer()
    sj = D.backend_json(src)
    built = D.build(sj, ["ab ab ab abc"] * 30, ["ab"], size=1, min_freq=2, kinds=["words"], max_phrase_words=2)
    tok = D.to_hf(src, built.tokenizer_json)
    assert len(tok) == len(src) + 1
    model = tiny_llama(vocab=len(src))
    before = model.get_input_embeddings().weight.detach().clone()
    docs = [[1] + src("ab ab abc ab ab ab abc ab", add_special_tokens=False).input_ids for _ in range(20)]
    tdocs = [tok("ab ab abc ab ab ab abc ab", add_special_tokens=False).input_ids for _ in range(20)]
    s = ExtendSettings(fit_tokens=200, steps=3, lr=1e-2, window=16, batch=2)
    e, h, info = extend_rows(model, tok, src, docs, tdocs, 1, s)
    assert np.array_equal(e[:len(src)], before.numpy()) and np.array_equal(h[:len(src)], before.numpy())
    assert info["steps"] == 3 and info["windows"] > 0 and info["fit_positions"] > 0
    assert info["schedule"] == "cosine"
    _, _, cos = extend_rows(model, tok, src, docs, tdocs, 1, dataclasses.replace(s, steps=10))
    assert cos["last_lr"] == pytest.approx(s.lr * 0.5 * (1 + np.cos(np.pi * 9 / 10)))  # decayed: 2.4% of lr
    _, _, const = extend_rows(model, tok, src, docs, tdocs, 1, dataclasses.replace(s, schedule="constant"))
    assert const["last_lr"] == s.lr
    assert not np.array_equal(e[-1], h[-1])  # input and output rows differ: the head is untied
    with pytest.raises(ExtendError, match="extend"):
        extend_rows(model, src, tok, docs, tdocs, 1, s)  # the "target" does not extend the "source"
    # ours' calibration leaves the old rows of such a vocabulary alone (stage init asks this)
    from tokalign.stages.init import extends_source

    assert extends_source(tok, src) and not extends_source(src, tok) and not extends_source(src, src)


def _extend_case() -> tuple:
    """A byte tokenizer extended by one merged word ``ab``, a tiny model, the same text under both tokenizers."""
    import torch

    from conftest import byte_tokenizer

    src = byte_tokenizer()
    built = D.build(D.backend_json(src), ["ab ab ab abc"] * 30, ["ab"], size=1, min_freq=2, kinds=["words"],
                    max_phrase_words=2)
    tok = D.to_hf(src, built.tokenizer_json)
    torch.manual_seed(0)
    model = tiny_llama(vocab=len(src))
    text = "ab ab abc ab ab ab abc ab"
    docs = [[1] + src(text, add_special_tokens=False).input_ids for _ in range(20)]
    tdocs = [tok(text, add_special_tokens=False).input_ids for _ in range(20)]
    return src, tok, model, docs, tdocs


def test_extend_distill_steps_pull_chunk_likelihoods_to_the_sources():
    """``domain_vocab.init_objective=distill``: the steps lower the chunk loss against the source model (teacher =
    the model itself under the source tokenization), move only the new rows, and start from the same rows as lm."""
    import torch

    from tokalign import distill
    from tokalign.extend_rows import ChunkTeacher

    src, tok, model, docs, tdocs = _extend_case()
    window = [1] + tdocs[0]

    def chunk_gap(e, h) -> float:
        with torch.no_grad():
            x = torch.nn.functional.embedding(torch.tensor([window]), torch.from_numpy(e))
            logits = model.base_model(inputs_embeds=x).last_hidden_state @ torch.from_numpy(h).T
            return float(ChunkTeacher(model, tok, src, 1).loss(logits, torch.tensor([window]), [window]))

    base = dict(fit_tokens=200, lr=0.1, window=32, batch=2, output="first")  # from the first piece's row
    e0, h0, _ = extend_rows(model, tok, src, docs, tdocs, 1, ExtendSettings(steps=0, **base))
    e1, h1, info = extend_rows(model, tok, src, docs, tdocs, 1, ExtendSettings(steps=40, objective="distill", **base))
    assert info["objective"] == "distill" and info["steps"] == 40
    assert np.array_equal(e1[:len(src)], e0[:len(src)]) and np.array_equal(h1[:len(src)], h0[:len(src)])
    assert not np.array_equal(h1[-1], h0[-1])
    assert chunk_gap(e1, h1) < 0.5 * chunk_gap(e0, h0)
    assert len(distill.align_chunks(window, distill.token_bytes(tok), src).student) > 0
    from tokalign.config import ConfigError, DomainVocabConfig

    with pytest.raises(ConfigError, match="domain_vocab.init_objective"):
        DomainVocabConfig(init_objective="kl")
    with pytest.raises(ConfigError, match="domain_vocab.init_schedule"):
        DomainVocabConfig(init_schedule="linear")


def test_extend_awedist_steps_pull_hidden_states_to_the_sources_on_the_pieces():
    """``domain_vocab.init_objective=awedist``: the source reads each window with new tokens spelled in their pieces;
    a window without new tokens has a gap of exactly 0; the steps lower the gap on windows with them, move only the
    new rows, and the output rows (trained by the next-token loss alone) move too."""
    import torch

    from tokalign.extend_rows import HiddenTeacher, new_token_pieces

    src, tok, model, docs, tdocs = _extend_case()
    window = [1] + tdocs[0]
    v_s, pieces = len(src), new_token_pieces(tok, src)
    teacher = HiddenTeacher(model, pieces, v_s)
    ids, last = teacher.spelled(window)
    assert ids == docs[0]  # the pieces spell the source's tokenization
    new_at = [i for i, t in enumerate(window) if t >= v_s]
    assert new_at and all(last[i] - last[i - 1] == len(pieces[window[i] - v_s]) for i in new_at)

    def gap(e) -> float:
        with torch.no_grad():
            x = torch.nn.functional.embedding(torch.tensor([window]), torch.from_numpy(e))
            h = model.base_model(inputs_embeds=x).last_hidden_state
            return float(teacher.loss(h, [window], torch.ones(1, len(window))))

    plain = [1] + src("c c c", add_special_tokens=False).input_ids
    with torch.no_grad():
        h = model.base_model(input_ids=torch.tensor([plain])).last_hidden_state
    assert float(teacher.loss(h, [plain], torch.ones(1, len(plain)))) == 0.0
    base = dict(fit_tokens=200, lr=0.1, window=32, batch=2, output="first")
    e0, h0, _ = extend_rows(model, tok, src, docs, tdocs, 1, ExtendSettings(steps=0, **base))
    e1, h1, info = extend_rows(model, tok, src, docs, tdocs, 1, ExtendSettings(steps=100, objective="awedist", **base))
    assert info["objective"] == "awedist"
    assert np.array_equal(e1[:v_s], e0[:v_s]) and np.array_equal(h1[:v_s], h0[:v_s])
    assert not np.array_equal(h1[-1], h0[-1])
    assert gap(e1) < 0.5 * gap(e0)
    e2, h2, info = extend_rows(model, tok, src, docs, tdocs, 1, ExtendSettings(steps=100, objective="awedist_lm", **base))
    assert info["objective"] == "awedist_lm" and not np.array_equal(e2[v_s:], e1[v_s:])  # lm reaches the inputs too
    assert np.array_equal(e2[:v_s], e0[:v_s]) and np.array_equal(h2[:v_s], h0[:v_s])


def test_extend_is_refused_for_a_cross_family_target():
    from tokalign.config import ConfigError
    from tokalign.cli import compose_cli

    with pytest.raises(ConfigError, match="init_methods"):
        compose_cli(["init_methods=[fvt,extend]"])


def test_domain_vocab_end_to_end_on_the_demo(tmp_path, shared_cache):
    """``python -m tokalign experiment=domain_vocab`` at small budgets: the tokenizer is used by every stage, the
    summary holds the savings, old rows are the source's bit for bit, extend beats FVT at init."""
    from safetensors.numpy import load_file

    run = tmp_path / "run"
    tokalign("experiment=domain_vocab", *SMALL, "domain_vocab.size=150", "domain_vocab.init_steps=4",
             "domain_vocab.init_fit_tokens=3000", "init_methods=[fvt,extend]", cache=shared_cache, run_dir=run)
    s = json.loads((run / "summary.json").read_text())
    m = s["metrics"]
    assert m["domain_vocab/added"] == 150 == sum(m[f"domain_vocab/added/{k}"] for k in D.KINDS)
    assert 0.05 < m["domain_vocab/tokens_saved_share"] < 0.5
    assert m["domain_vocab/tokens_per_term/after"] <= m["domain_vocab/tokens_per_term/before"]
    assert (run / "domain_vocab_savings.png").is_file()
    stages = run / "stages"
    tok_info = json.loads((stages / "tokenize" / "info.json").read_text())
    assert tok_info["target_vocab"] == tok_info["source_vocab"] + 150
    src = load_file(str(stages / "source" / "model" / "model.safetensors"))
    src_emb = next(v for k, v in src.items() if k.endswith("embed_tokens.weight"))
    rows = load_file(str(stages / "init" / "rows" / "extend.safetensors"))
    v_s = src_emb.shape[0]
    assert np.array_equal(rows["embed"][:v_s], src_emb.astype(np.float32))
    assert np.array_equal(rows["lm_head"][:v_s], src_emb.astype(np.float32))  # tied source: head = embedding
    init_cfg = json.loads((stages / "init" / "model" / "config.json").read_text())
    assert init_cfg["tie_word_embeddings"] is False and init_cfg["vocab_size"] == v_s + 150
    assert m["bpb/init/extend"] < m["bpb/init/fvt"]


def test_a_source_that_splits_every_digit_gets_no_numbers_and_keeps_its_tokenization():
    """SmolLM2's own tokenizer.json cuts digits one by one (Digits pre-tokenizer): numbers are refused with a reason,
    phrases still work, and text without new strings tokenizes as the source."""
    need_assets()
    src = refs.load_tokenizer(str(SMOL))
    sj = D.backend_json(src)
    sj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                                 sj["pre_tokenizer"]]}
    texts = _pubmedqa(150)
    built = D.build(sj, texts, texts[:5], size=200, min_freq=2, kinds=list(D.KINDS), max_phrase_words=3)
    assert any(r.startswith("numbers:") for r in built.reasons)
    assert {m.kind for m in built.merges} == {"words", "phrases"}
    plain, tok = D.to_hf(src, sj), D.to_hf(src, built.tokenizer_json)
    assert tok(" 2009 and p < 0.001").input_ids == plain(" 2009 and p < 0.001").input_ids
    pieces = _free_of_new_strings(tok, plain, _pubmedqa(30, offset=900))
    assert len(pieces) > 100
    for p in pieces:
        assert tok(p, add_special_tokens=False).input_ids == plain(p, add_special_tokens=False).input_ids, p
