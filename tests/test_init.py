"""Stages ``align`` and ``init`` on tiny synthetic inputs in the contract formats: role mapping,
gold copies, aligned rows, FVT fallback, tied and untied heads, and the identical-tokenizer copy."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tokalign import metrics as M
from tokalign import alignment as A
from tokalign.config import AlignmentConfig, Config
from tokalign.context import Context
from tokalign.stages import align, init

from conftest import CORPUS, make_tokenizer  # noqa: E402
EXTRA = ["hypertension hypertension pressure measured significantly treated patients"] * 3


def source_tokenizer():
    # like SmolLM2: unk=<|endoftext|> (0), bos=<|im_start|> (1), eos=pad=<|im_end|> (2)
    return make_tokenizer(300, CORPUS, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                          {"unk": "<|endoftext|>", "bos": "<|im_start|>", "eos": "<|im_end|>", "pad": "<|im_end|>"})


def target_tokenizer():
    # like Qwen2: bos=eos=pad=<|endoftext|>, no unk; more merges than the source
    return make_tokenizer(420, CORPUS + EXTRA, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                          {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": "<|endoftext|>"})


def toy_model(vocab, tied, seed=0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg)
    if not tied:
        with torch.no_grad():
            model.lm_head.weight.copy_(torch.randn_like(model.lm_head.weight) * 0.5 + 0.1)
    return model


def encode(tok, texts):
    enc = tok(texts, add_special_tokens=False)["input_ids"]
    ids = np.concatenate([np.asarray(e, dtype=np.uint32) for e in enc])
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in enc])]).astype(np.int64)
    return ids, offsets


def write_inputs(root: Path, src_tok, tgt_tok, tied: bool, vectors: str = "planted", seed: int = 0) -> Context:
    """source/, tokenize/ and embed/ folders in the contract formats; returns a Context over them."""
    src_dir, tok_dir, emb_dir = root / "source", root / "tokenize", root / "embed"
    for d in (src_dir, tok_dir, emb_dir):
        d.mkdir(parents=True)
    model = toy_model(len(src_tok), tied, seed)
    model.save_pretrained(src_dir / "model", safe_serialization=True)
    src_tok.save_pretrained(src_dir / "model")
    tgt_tok.save_pretrained(tok_dir / "target_tokenizer")
    texts = CORPUS + EXTRA
    s_ids, s_off = encode(src_tok, texts)
    t_ids, t_off = encode(tgt_tok, texts)
    np.save(tok_dir / "source_ids.npy", s_ids)
    np.save(tok_dir / "source_offsets.npy", s_off)
    np.save(tok_dir / "target_ids.npy", t_ids)
    np.save(tok_dir / "target_offsets.npy", t_off)
    (tok_dir / "info.json").write_text(json.dumps({"source_vocab": len(src_tok), "target_vocab": len(tgt_tok)}))

    rng = np.random.default_rng(seed)
    dim = 16
    everything = vectors.endswith("_all")  # vectors for the whole vocabulary, not only the tokens seen
    s_seen = np.arange(len(src_tok)) if everything else np.unique(s_ids).astype(np.int64)
    s_vec = rng.normal(size=(len(s_seen), dim)).astype(np.float32)
    s_counts = np.bincount(s_ids.astype(np.int64), minlength=len(src_tok))[s_seen]
    np.savez(emb_dir / "source.npz", ids=s_seen, vectors=s_vec, counts=s_counts)
    source, target = A.vocab_from_tokenizer(src_tok), A.vocab_from_tokenizer(tgt_tok)
    gold = A.gold_map(target, source)
    fvt = A.fvt_decompose(target, source, src_tok, gold)
    s_row = {int(s): i for i, s in enumerate(s_seen)}
    t_seen = np.arange(len(tgt_tok)) if everything else np.unique(t_ids).astype(np.int64)
    keep, t_vec = [], []
    for t in t_seen:
        if target.special[t] or fvt.indptr[t] == fvt.indptr[t + 1]:
            continue
        first = int(fvt.indices[fvt.indptr[t]])  # gold -> itself; otherwise the first source piece
        if first not in s_row:
            continue
        if vectors.startswith("planted"):  # the target token "means" its first piece (plus a little noise)
            t_vec.append(s_vec[s_row[first]] + 0.05 * rng.normal(size=dim))
        elif vectors.startswith("noise"):  # unrelated spaces: similarity says nothing
            t_vec.append(rng.normal(size=dim))
        else:
            t_vec.append(s_vec[s_row[first]])
        keep.append(t)
    keep = np.asarray(keep, dtype=np.int64)
    t_counts = np.bincount(t_ids.astype(np.int64), minlength=len(tgt_tok))[keep]
    np.savez(emb_dir / "target.npz", ids=keep, vectors=np.asarray(t_vec, dtype=np.float32), counts=t_counts)
    ctx = Context(run_dir=root / "run")
    ctx.outputs.update({"source": src_dir, "tokenize": tok_dir, "embed": emb_dir})
    return ctx


def config(**kw) -> Config:
    return Config(source_model="unused", target_tokenizer="unused", corpus="unused",
                  pivot_count=kw.pop("pivot_count", 40), similarity_threshold=kw.pop("similarity_threshold", 0.5),
                  alignment=AlignmentConfig(**{"calibrate": False, "absorb": False, **kw.pop("alignment", {})}), **kw)


def run_align_init(root: Path, ctx: Context, cfg: Config) -> tuple[dict, dict]:
    (root / "align").mkdir()
    m_align = align.run(cfg, ctx, root / "align")
    ctx.outputs["align"] = root / "align"
    (root / "init").mkdir()
    m_init = init.run(cfg, ctx, root / "init")
    ctx.outputs["init"] = root / "init"
    return m_align, m_init


def ours_on_off(root: Path, src_tok, tgt_tok, tied: bool, on: dict, off: dict) -> dict:
    """Ours' rows (``rows/tokalign.safetensors``) on the toy inputs with two alignment settings, as ``{"on", "off"}``."""
    from safetensors.numpy import load_file

    rows = {}
    for name, extra in (("on", on), ("off", off)):
        ctx = write_inputs(root / name, src_tok, tgt_tok, tied)
        run_align_init(root / name, ctx, config(pivot_count=12, init_methods=["tokalign"],
                                                alignment={"min_precision": 0.0, **extra}))
        rows[name] = load_file(str(root / name / "init" / "rows" / "tokalign.safetensors"))
    return rows


@pytest.mark.parametrize("tied", [True, False])
def test_align_and_init_stages_on_synthetic_inputs(tmp_path, tied):
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_tok, tgt_tok = source_tokenizer(), target_tokenizer()
    ctx = write_inputs(tmp_path, src_tok, tgt_tok, tied)
    cfg = config(pivot_count=12, alignment={"scoring": "csls", "csls_k": 5, "block_size": 16, "min_precision": 0.0,
                                            "unseen_scale": 1.0, "piece_weights": "mean"})  # ours' fallback = FVT
    m_align, m_init = run_align_init(tmp_path, ctx, cfg)

    # --- align artifacts
    z = np.load(tmp_path / "align" / "alignment.npz")
    v_t, v_s = len(tgt_tok), len(src_tok)
    for key in ("how", "src", "weight", "best_score", "argmax_1to1", "fvt_indptr", "fvt_indices", "pivot_target",
                "pivot_source", "blend", "gold"):
        assert key in z.files, key
    how, src, weight, gold = z["how"], z["src"], z["weight"], z["gold"]
    assert how.dtype == np.int8 and how.shape == (v_t,)
    assert src.dtype == np.int64 and weight.dtype == np.float32 and src.shape == weight.shape == (v_t, 1)
    assert z["fvt_indptr"].shape == (v_t + 1,)
    # special by role: target <|endoftext|> (bos=eos=pad) -> source bos <|im_start|>, not the same-named token
    eot = tgt_tok.convert_tokens_to_ids("<|endoftext|>")
    assert how[eot] == align.HOW_SPECIAL and src[eot, 0] == src_tok.bos_token_id
    # other specials match by name
    ims = tgt_tok.convert_tokens_to_ids("<|im_end|>")
    assert how[ims] == align.HOW_GOLD and src[ims, 0] == src_tok.convert_tokens_to_ids("<|im_end|>")
    # gold tokens copy their source twin
    g = how == align.HOW_GOLD
    assert g.sum() > 200 and (src[g, 0] == gold[g]).all() and (weight[g, 0] == 1).all()
    # non-gold tokens with a planted vector are aligned to their first FVT piece
    al = how == align.HOW_ALIGNED
    assert al.sum() >= 10
    first = z["fvt_indices"][z["fvt_indptr"][:-1][al]]
    assert (src[al, 0] == first).mean() > 0.8
    assert (z["best_score"][al] >= cfg.similarity_threshold).all()
    # non-gold tokens the corpus never produced fall back to FVT, with pieces
    unseen = (gold < 0) & ~z["has_vector"]
    assert unseen.sum() > 0 and (how[unseen] == align.HOW_FVT).all()
    assert (np.diff(z["fvt_indptr"])[how == align.HOW_FVT] > 0).all()
    assert np.isnan(z["best_score"][unseen]).all() and (z["argmax_1to1"][unseen] == -1).all()
    assert (z["argmax_1to1"][gold >= 0] == gold[gold >= 0]).all()
    shares = sum(m_align[f"align/{k}_share"] for k in ("exact", "aligned", "fallback", "special"))
    assert abs(shares - 1.0) < 1e-9
    assert m_align["align/pivots"] == 12 and m_align["align/seconds"] > 0 and m_align["align/max_hub_size"] >= 1
    with open(tmp_path / "align" / "alignment.csv", newline="", encoding="utf-8") as f:
        table = list(csv.reader(f))
    assert len(table) == v_t + 1 and table[0][:4] == ["target_id", "target_token", "target_text", "how"]
    assert [r[3] for r in table[1:]] == [align.HOW_NAMES[int(h)] for h in how]
    nl = tgt_tok.convert_tokens_to_ids("Ċ")
    assert table[1 + nl][2] == "\\n"
    assert table[1 + eot][3] == "special" and table[1 + eot][4] == str(src_tok.bos_token_id)
    assert (tmp_path / "align" / "similarity_hist.png").stat().st_size > 1000
    assert (ctx.run_dir / "similarity_hist.png").is_file()

    # --- init artifacts
    info = json.loads((tmp_path / "init" / "info.json").read_text())
    assert info["primary"] == "tokalign" and info["tied"] is tied
    assert info["methods"] == list(cfg.init_methods)
    src_model = toy_model(v_s, tied)  # same seed: the source weights
    s_emb = src_model.get_input_embeddings().weight.detach().numpy()
    s_head = src_model.get_output_embeddings().weight.detach().numpy()
    rows = {m: load_file(str(tmp_path / "init" / "rows" / f"{m}.safetensors")) for m in cfg.init_methods}
    for m, t in rows.items():
        assert t["embed"].shape == (v_t, 32)
        assert ("lm_head" in t) is (not tied), m
    ta = rows["tokalign"]
    assert np.array_equal(ta["embed"][g], s_emb[gold[g]])
    # the evaluation convention: every method starts documents from the source's document-start row
    for m, t in rows.items():
        assert np.array_equal(t["embed"][eot], s_emb[M.start_token_id(src_tok)]), m
    assert info["start_token"] == {"target": eot, "source": M.start_token_id(src_tok)}
    np.testing.assert_allclose(ta["embed"][al], s_emb[src[al, 0]], rtol=1e-6)
    fb = how == align.HOW_FVT
    np.testing.assert_allclose(ta["embed"][fb], rows["fvt"]["embed"][fb], rtol=1e-6)
    if not tied:  # output rows come from the source head with the same mapping
        assert not np.allclose(s_head, s_emb)
        assert np.array_equal(ta["lm_head"][g], s_head[gold[g]])
        np.testing.assert_allclose(ta["lm_head"][al], s_head[src[al, 0]], rtol=1e-6)
        one = rows["tokalign_1to1"]
        seen = z["argmax_1to1"] >= 0
        assert np.array_equal(one["lm_head"][seen], s_head[z["argmax_1to1"][seen]])
    rest = np.arange(v_t) != eot
    np.testing.assert_allclose(rows["mean"]["embed"][rest], np.broadcast_to(s_emb.mean(0), (v_t - 1, 32)), rtol=1e-5,
                               atol=1e-7)
    assert abs(rows["random"]["embed"][rest].std() / s_emb.std() - 1) < 0.05

    # --- the saved model: loads with the Auto classes, target vocabulary and special ids
    mdir = tmp_path / "init" / "model"
    model = AutoModelForCausalLM.from_pretrained(mdir)
    tok = AutoTokenizer.from_pretrained(mdir)
    assert len(tok) == v_t and model.config.vocab_size == v_t
    assert model.config.bos_token_id == model.config.eos_token_id == eot
    assert np.array_equal(model.get_input_embeddings().weight.detach().numpy(), ta["embed"])
    head = model.get_output_embeddings().weight
    if tied:
        assert head.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    else:
        assert np.array_equal(head.detach().numpy(), ta["lm_head"])
    out = model(input_ids=__import__("torch").tensor([[eot, 5, 6]]))
    assert out.logits.shape == (1, 3, v_t)


@pytest.mark.parametrize("tied", [True, False])
def test_identical_tokenizer_gives_exact_copy(tmp_path, tied):
    from safetensors.numpy import load_file

    tok = source_tokenizer()
    ctx = write_inputs(tmp_path, tok, source_tokenizer(), tied, vectors="same")
    cfg = config(alignment={"scoring": "cos", "top_k": 3, "blend_fvt": 0.3})
    m_align, _ = run_align_init(tmp_path, ctx, cfg)
    assert m_align["align/exact_share"] + m_align["align/special_share"] == 1.0
    src_model = toy_model(len(tok), tied)
    t = load_file(str(tmp_path / "init" / "rows" / "tokalign.safetensors"))
    s_emb = src_model.get_input_embeddings().weight.detach().numpy()
    assert t["embed"].tobytes() == s_emb.tobytes()  # bit for bit
    if not tied:
        assert t["lm_head"].tobytes() == src_model.get_output_embeddings().weight.detach().numpy().tobytes()
    # the published 1:1 rule and FVT are exact copies too (every token is gold)
    one = load_file(str(tmp_path / "init" / "rows" / "tokalign_1to1.safetensors"))["embed"]
    assert one.tobytes() == s_emb.tobytes()
    for m in ("fvt", "focus", "omp"):  # no new token: FOCUS and OMP have nothing to combine
        assert np.array_equal(load_file(str(tmp_path / "init" / "rows" / f"{m}.safetensors"))["embed"], s_emb)


def _toy_alignment(v_t=6, v_s=5):
    return {
        "how": np.array([0, 1, 2, 3, 2, 0], dtype=np.int8)[:v_t],
        "src": np.array([[4, -1], [1, 2], [-1, -1], [0, -1], [-1, -1], [2, -1]]),
        "weight": np.array([[1, 0], [0.6, 0.4], [0, 0], [1, 0], [0, 0], [1, 0]], dtype=np.float32),
        "blend": np.array([0, 0.5, 1, 0, 1, 0], dtype=np.float32),
        "argmax_1to1": np.array([4, 3, -1, 0, -1, 2]),
        "fvt_indptr": np.array([0, 1, 3, 5, 6, 6, 7]),
        "fvt_indices": np.array([4, 1, 3, 0, 2, 0, 2]),
        "source_vocab": np.int64(v_s),
    }


def test_build_rows_methods():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(7, 4)).astype(np.float32)  # 7 rows: a padded embedding for a 5-token vocabulary
    al = _toy_alignment()
    base = e[:5]
    fvt, info = init.build_rows("fvt", e, al, seed=0)
    assert info["fvt_empty"] == 1
    np.testing.assert_allclose(fvt[1], (base[1] + base[3]) / 2, rtol=1e-6)
    np.testing.assert_allclose(fvt[4], base.mean(0), rtol=1e-6)  # no pieces: mean row
    ta, _ = init.build_rows("tokalign", e, al, seed=0)
    assert np.array_equal(ta[0], base[4]) and np.array_equal(ta[3], base[0]) and np.array_equal(ta[5], base[2])
    np.testing.assert_allclose(ta[1], 0.5 * (0.6 * base[1] + 0.4 * base[2]) + 0.5 * fvt[1], rtol=1e-5)
    np.testing.assert_allclose(ta[2], fvt[2], rtol=1e-6)
    byte_len = np.array([1.0, 3.0, 2.0, 4.0, 0.0])  # per source token
    lean, _ = init.build_rows("tokalign", e, al, seed=0, piece_weight=byte_len)  # ours' FVT rows weigh pieces by bytes
    np.testing.assert_allclose(lean[2], (1 * base[0] + 2 * base[2]) / 3, rtol=1e-5)
    np.testing.assert_allclose(lean[1], 0.5 * (0.6 * base[1] + 0.4 * base[2]) + 0.5 * (3 * base[1] + 4 * base[3]) / 7,
                               rtol=1e-5)  # an aligned row's FVT blend is weighted too
    assert np.array_equal(lean[[0, 3, 5]], ta[[0, 3, 5]])  # gold and special rows are untouched
    lean_fvt, _ = init.build_rows("fvt", e, al, seed=0, piece_weight=byte_len)
    assert np.array_equal(lean_fvt, fvt)  # the published FVT is never changed
    one, info = init.build_rows("tokalign_1to1", e, al, seed=0, source_special=np.array([1, 0, 0, 0, 0], bool))
    assert info["random_rows"] == 2
    assert np.array_equal(one[[0, 1, 3, 5]], base[[4, 3, 0, 2]])
    picks = [int(np.nonzero((base == one[i]).all(1))[0][0]) for i in (2, 4)]
    assert all(1 <= p < 5 for p in picks)  # a random non-special row of the real vocabulary
    again, _ = init.build_rows("tokalign_1to1", e, al, seed=0, source_special=np.array([1, 0, 0, 0, 0], bool))
    assert np.array_equal(again, one)  # seeded
    mean, _ = init.build_rows("mean", e, al, seed=0)
    np.testing.assert_allclose(mean, np.broadcast_to(base.mean(0), (6, 4)), rtol=1e-6)
    r0, _ = init.build_rows("random", e, al, seed=0)
    r1, _ = init.build_rows("random", e, al, seed=1)
    assert r0.shape == (6, 4) and not np.array_equal(r0, r1)
    assert np.array_equal(r0, init.build_rows("random", e, al, seed=0)[0])
    with pytest.raises(init.InitInputError):
        init.build_rows("nope", e, al, seed=0)


def test_load_alignment_rejects_bad_inputs(tmp_path):
    al = _toy_alignment()
    np.savez(tmp_path / "a.npz", **al)
    assert init.load_alignment(tmp_path / "a.npz", 6)["how"].shape == (6,)
    with pytest.raises(init.InitInputError, match="target tokenizer has 7"):
        init.load_alignment(tmp_path / "a.npz", 7)
    bad = dict(al)
    del bad["weight"]
    np.savez(tmp_path / "b.npz", **bad)
    with pytest.raises(init.InitInputError, match="missing key 'weight'"):
        init.load_alignment(tmp_path / "b.npz", 6)
    with pytest.raises(init.InitInputError, match="no such file"):
        init.load_alignment(tmp_path / "none.npz", 6)


def test_align_rejects_bad_vectors(tmp_path):
    np.savez(tmp_path / "v.npz", ids=np.array([0, 5]), vectors=np.zeros((2, 3), np.float32), counts=np.array([1, 1]))
    with pytest.raises(align.AlignInputError, match="outside"):
        align.load_vectors(tmp_path / "v.npz", 5)
    np.savez(tmp_path / "w.npz", ids=np.array([0, 1]), vectors=np.zeros((3, 3), np.float32), counts=np.array([1, 1]))
    with pytest.raises(align.AlignInputError, match="expected 'ids'"):
        align.load_vectors(tmp_path / "w.npz", 5)
    np.savez(tmp_path / "x.npz", ids=np.array([0, 1]), counts=np.array([1, 1]))
    with pytest.raises(align.AlignInputError, match="missing key 'vectors'"):
        align.load_vectors(tmp_path / "x.npz", 5)


def test_role_map_priority():
    smol = {"bos": 1, "eos": 2, "pad": 2, "unk": 0}
    assert align.role_map({"bos": 7, "eos": 7, "pad": 7, "unk": None}, smol) == {7: 1}
    assert align.role_map({"bos": None, "eos": 3, "pad": 3, "unk": 4}, {"bos": 1, "eos": 2, "pad": None, "unk": 0}) == \
        {3: 2, 4: 0}
    # a role the source lacks falls to the token's next role
    assert align.role_map({"bos": 5, "eos": 5, "pad": None, "unk": None}, {"bos": None, "eos": 2}) == {5: 2}


def test_precision_guard_and_row_scale(tmp_path):
    """Similarity only replaces FVT where held-out gold pairs show it is reliable; new rows are shrunk."""
    from safetensors.numpy import load_file

    src_tok, tgt_tok = source_tokenizer(), target_tokenizer()
    results = {}
    for mode in ("planted_all", "noise_all"):
        root = tmp_path / mode
        ctx = write_inputs(root, src_tok, tgt_tok, tied=True, vectors=mode)
        cfg = config(pivot_count=40, similarity_threshold=-1.0,
                     alignment={"scoring": "csls", "csls_k": 5, "min_precision": 0.6, "unseen_scale": 0.5,
                                "seen_scale": 0.9, "special_match": "name", "piece_weights": "mean"})
        m_align, _ = run_align_init(root, ctx, cfg)
        results[mode] = (m_align, dict(np.load(root / "align" / "alignment.npz")), root)
    m, z, root = results["planted_all"]
    assert m["align/gold_p1_csls"] > 0.8  # planted: the search finds the gold twins
    assert np.isfinite(z["margin_threshold"]) and m["align/aligned_share"] > 0
    m, z, root = results["noise_all"]
    assert m["align/gold_p1_csls"] < 0.2 and m["align/above_threshold"] > 50  # threshold -1: all pass it ...
    assert m["align/aligned_share"] == 0 and not np.isfinite(z["margin_threshold"])  # ... but none is trusted
    assert (z["how"][(z["gold"] < 0)] != align.HOW_ALIGNED).all()
    # special_match=name: <|endoftext|> has a same-named source special, so it keeps the name match
    eot = tgt_tok.convert_tokens_to_ids("<|endoftext|>")
    assert z["how"][eot] == align.HOW_GOLD and z["src"][eot, 0] == src_tok.convert_tokens_to_ids("<|endoftext|>")
    # scale: gold/special rows 1, new rows 0.9 (seen) or 0.5 (unseen); tokalign rows are FVT rows times that
    how, scale = z["how"], z["scale"]
    assert (scale[how == align.HOW_GOLD] == 1).all()
    new = (how == align.HOW_FVT)
    assert set(np.unique(scale[new]).tolist()) <= {float(np.float32(0.9)), 0.5}
    assert (scale[new & z["has_vector"]] == np.float32(0.9)).all() and (scale[new & ~z["has_vector"]] == 0.5).all()
    ta = load_file(str(root / "init" / "rows" / "tokalign.safetensors"))["embed"]
    fvt = load_file(str(root / "init" / "rows" / "fvt.safetensors"))["embed"]
    np.testing.assert_allclose(ta[new], fvt[new] * scale[new, None], rtol=1e-6)
    assert np.array_equal(ta[how == align.HOW_GOLD], fvt[how == align.HOW_GOLD])


@pytest.mark.slow
def test_align_init_real_smollm2_to_qwen2(tmp_path, assets):
    """The demo pair end to end through align and init (synthetic vectors stand in for fastText)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    from tokalign import refs

    gguf = assets / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    src_model = refs.plain_copy(refs.load_model(str(gguf)))
    src_tok = refs.load_tokenizer(str(gguf))
    tgt_tok = refs.load_tokenizer(str(assets / "tokenizers" / "ggml-vocab-qwen2.gguf"))
    src_dir, tok_dir, emb_dir = tmp_path / "source", tmp_path / "tokenize", tmp_path / "embed"
    src_model.save_pretrained(src_dir / "model", safe_serialization=True)
    src_tok.save_pretrained(src_dir / "model")
    tgt_tok.save_pretrained(tok_dir / "target_tokenizer")
    (tok_dir / "info.json").write_text(json.dumps({"source_vocab": len(src_tok), "target_vocab": len(tgt_tok)}))
    s_emb = src_model.get_input_embeddings().weight.detach().numpy().copy()
    del src_model
    # vectors: 3000 frequent-ish source tokens; their Qwen2 twins get the same vector plus noise
    rng = np.random.default_rng(0)
    source, target = A.vocab_from_tokenizer(src_tok), A.vocab_from_tokenizer(tgt_tok)
    gold = A.gold_map(target, source)
    s_ids = np.arange(100, 3100)
    s_vec = rng.normal(size=(len(s_ids), 32)).astype(np.float32)
    emb_dir.mkdir()
    np.savez(emb_dir / "source.npz", ids=s_ids, vectors=s_vec, counts=np.arange(len(s_ids), 0, -1) + 2)
    inv = {int(s): i for i, s in enumerate(s_ids)}
    t_ids = np.array([t for t in np.nonzero(gold >= 0)[0] if int(gold[t]) in inv], dtype=np.int64)
    t_vec = s_vec[[inv[int(gold[t])] for t in t_ids]] + 0.1 * rng.normal(size=(len(t_ids), 32)).astype(np.float32)
    np.savez(emb_dir / "target.npz", ids=t_ids, vectors=t_vec, counts=np.full(len(t_ids), 5))
    ctx = Context(run_dir=tmp_path / "run")
    ctx.outputs.update({"source": src_dir, "tokenize": tok_dir, "embed": emb_dir})
    cfg = config(pivot_count=300, init_methods=["fvt", "tokalign"], alignment={"scoring": "csls"})
    m_align, m_init = run_align_init(tmp_path, ctx, cfg)

    z = np.load(tmp_path / "align" / "alignment.npz")
    assert z["how"].shape == (151936,)
    assert 0.25 < m_align["align/exact_share"] < 0.27  # 39k of Qwen2's 152k tokens exist in SmolLM2
    assert m_align["align/gold_p1_csls"] > 0.9 and m_align["align/fvt_empty"] < 30
    eot = 151643  # Qwen2 <|endoftext|>: bos = eos = pad -> SmolLM2's bos <|im_start|> (1) by role
    assert z["how"][eot] == align.HOW_SPECIAL and z["src"][eot, 0] == 1
    assert (np.diff(z["fvt_indptr"])[z["how"] == align.HOW_FVT] > 0).mean() > 0.999
    rows = load_file(str(tmp_path / "init" / "rows" / "tokalign.safetensors"))["embed"]
    g = np.nonzero(z["how"] == align.HOW_GOLD)[0]
    assert np.array_equal(rows[g], s_emb[z["gold"][g]])
    info = json.loads((tmp_path / "init" / "info.json").read_text())
    assert info["tied"] is True and info["vocab_size"] == 151936
    from transformers import AutoConfig

    conf = AutoConfig.from_pretrained(tmp_path / "init" / "model")
    assert conf.vocab_size == 151936 and conf.tie_word_embeddings and conf.bos_token_id == conf.eos_token_id == eot
    with safe_open(str(tmp_path / "init" / "model" / "model.safetensors"), "np") as f:
        assert not any("lm_head" in k for k in f.keys())  # tied: one matrix saved


@pytest.mark.parametrize("new_rows", ["omp", "focus"])
def test_tokalign_new_rows_take_the_sparse_combination(tmp_path, new_rows):
    from safetensors.numpy import load_file

    ctx = write_inputs(tmp_path, source_tokenizer(), target_tokenizer(), tied=True, vectors="planted")
    cfg = config(alignment={"min_precision": 1.0, "new_rows": new_rows, "omp_k": 3, "focus_k": 4,
                            "sparse_candidates": 8, "unseen_scale": 1.0})
    run_align_init(tmp_path, ctx, cfg)
    z = np.load(tmp_path / "align" / "alignment.npz")
    sparse = np.nonzero(z["how"] == align.HOW_SPARSE)[0]
    assert len(sparse) > 0
    assert np.array_equal(sparse, np.nonzero((z[f"{new_rows}_src"] >= 0).any(1) & (z["how"] != 0))[0])
    e = toy_model(len(source_tokenizer()), True).get_input_embeddings().weight.detach().numpy()
    rows = load_file(str(tmp_path / "init" / "rows" / "tokalign.safetensors"))["embed"]
    own = load_file(str(tmp_path / "init" / "rows" / f"{new_rows}.safetensors"))["embed"]
    s_src, s_w = z[f"{new_rows}_src"][sparse], z[f"{new_rows}_weight"][sparse]
    want = np.einsum("nk,nkh->nh", np.where(s_src >= 0, s_w, 0.0), e[np.maximum(s_src, 0)])
    np.testing.assert_allclose(rows[sparse], want, rtol=1e-5, atol=1e-6)  # seen_scale is 1
    np.testing.assert_allclose(own[sparse], want, rtol=1e-5, atol=1e-6)  # the baseline method: the same rows



def test_stage_alignment_bleu_on_identical_tokenizers_is_one(tmp_path):
    """The stage-level figure: the identity alignment of a tokenizer onto itself scores 1.0; a reference
    alignment that disagrees on every token scores 0."""
    import json

    from tokalign.config import Config
    from tokalign.context import Context
    from tokalign.stages import evaluate as E

    tok = source_tokenizer()
    tok.save_pretrained(tmp_path / "source" / "model")
    tok.save_pretrained(tmp_path / "tokenize" / "target_tokenizer")
    (tmp_path / "align").mkdir()
    np.savez(tmp_path / "align" / "alignment.npz", argmax_1to1=np.arange(len(tok)))
    ctx = Context(run_dir=tmp_path, outputs={k: tmp_path / k for k in ("source", "tokenize", "align")})
    texts = ["patients with hypertension were treated", "blood pressure measured"]
    cfg = Config(source_model="x", target_tokenizer="x", corpus="x")
    assert E.alignment_bleu(cfg, ctx, texts)["align/bleu1"] == pytest.approx(1.0)
    (tmp_path / "ref.json").write_text(json.dumps({str(i): 10 ** 6 for i in range(len(tok))}))  # disjoint ids
    cfg.alignment.reference_pairs = str(tmp_path / "ref.json")
    assert E.alignment_bleu(cfg, ctx, texts)["align/bleu1"] == pytest.approx(0.0)
    (tmp_path / "bad.json").write_text(json.dumps({"x": 1}))
    cfg.alignment.reference_pairs = str(tmp_path / "bad.json")
    with pytest.raises(E.EvalInputError, match="bad.json"):
        E.alignment_bleu(cfg, ctx, texts)


@pytest.mark.parametrize("tied", [True, False])
def test_fitted_output_rows_untie_a_tied_head_and_keep_every_other_row(tmp_path, tied):
    """alignment.output_rows=fit: the new multi-piece tokens' output rows are the fit of tokalign/output_rows.py,
    every other output row is what output_rows=tied gives; a tied source is untied; identical tokenizers stay tied."""
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    from tokalign.artifacts import docs_of, load_stream
    from tokalign.output_rows import fit_output_rows

    src_tok, tgt_tok = source_tokenizer(), target_tokenizer()
    ctx = write_inputs(tmp_path / "a", src_tok, tgt_tok, tied)
    base = {"min_precision": 0.0, "block_size": 16}
    run_align_init(tmp_path / "a", ctx, config(pivot_count=12, init_methods=["fvt", "tokalign"],
                                               alignment={**base, "output_rows": "fit", "output_fit_tokens": 300}))
    ctx_b = write_inputs(tmp_path / "b", src_tok, tgt_tok, tied)
    run_align_init(tmp_path / "b", ctx_b, config(pivot_count=12, init_methods=["fvt", "tokalign"], alignment=base))
    fit = load_file(str(tmp_path / "a" / "init" / "rows" / "tokalign.safetensors"))
    plain = load_file(str(tmp_path / "b" / "init" / "rows" / "tokalign.safetensors"))
    info = json.loads((tmp_path / "a" / "init" / "info.json").read_text())
    assert info["untied_methods"] == (["tokalign"] if tied else [])
    assert info["counts"]["tokalign"]["output_fit"]["fit_positions"] == 300
    assert np.array_equal(fit["embed"], plain["embed"])  # input rows untouched
    z = dict(np.load(tmp_path / "a" / "align" / "alignment.npz"))
    new = init.fit_targets(z)
    assert len(new) > 10
    other = np.setdiff1d(np.arange(len(tgt_tok)), new)
    want_other = plain["embed"] if tied else plain["lm_head"]
    assert np.array_equal(fit["lm_head"][other], want_other[other])
    src_model = toy_model(len(src_tok), tied)
    s_ids, s_off = load_stream(tmp_path / "a" / "tokenize", "source")
    docs = [[M.start_token_id(src_tok)] + d.tolist() for d in docs_of(s_ids, s_off)]
    pieces = [z["fvt_indices"][z["fvt_indptr"][t]:z["fvt_indptr"][t + 1]].tolist() for t in new]
    with torch.no_grad():
        want, _ = fit_output_rows(src_model, docs, pieces, src_model.get_output_embeddings().weight.detach(),
                                  fit_tokens=300, ridge=10.0)
    np.testing.assert_allclose(fit["lm_head"][new], want.numpy(), rtol=1e-4, atol=1e-4)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "init" / "model")
    assert not model.config.tie_word_embeddings
    assert np.array_equal(model.get_output_embeddings().weight.detach().numpy(), fit["lm_head"])

    same = write_inputs(tmp_path / "c", src_tok, source_tokenizer(), tied, vectors="same")
    run_align_init(tmp_path / "c", same, config(alignment={"output_rows": "fit"}))
    rows = load_file(str(tmp_path / "c" / "init" / "rows" / "tokalign.safetensors"))
    assert ("lm_head" in rows) is (not tied)  # nothing to fit: a tied source stays tied


@pytest.mark.parametrize("tied", [True, False])
def test_calibration_lowers_output_rows_along_one_direction_and_leaves_specials(tmp_path, tied):
    """alignment.calibrate: ours' output rows (the tied embedding, else the head) move along one direction only,
    special tokens do not move, the input rows of an untied model do not either; identical tokenizers are not
    calibrated (the model stays the source's, bit for bit)."""
    from safetensors.numpy import load_file

    src_tok, tgt_tok = source_tokenizer(), target_tokenizer()
    rows = ours_on_off(tmp_path, src_tok, tgt_tok, tied, {"calibrate": True, "calibrate_positions": 200},
                       {"calibrate": False})
    key = "embed" if tied else "lm_head"
    delta = rows["on"][key].astype(np.float64) - rows["off"][key]
    moved = np.abs(delta).max(1) > 0
    assert moved.sum() > 10
    s = np.linalg.svd(delta[moved], compute_uv=False)
    assert s[1] < 1e-4 * s[0]  # every change is a multiple of one direction
    assert not moved[np.asarray(tgt_tok.all_special_ids)].any()
    if not tied:
        assert np.array_equal(rows["on"]["embed"], rows["off"]["embed"])
    info = json.loads((tmp_path / "on" / "init" / "info.json").read_text())["counts"]["tokalign"]["calibration"]
    assert info["rows_lowered"] == int(moved.sum()) and info["min_offset"] < 0 and info["positions"] == 200

    same = write_inputs(tmp_path / "same", src_tok, source_tokenizer(), tied, vectors="same")
    run_align_init(tmp_path / "same", same, config(alignment={"calibrate": True}))
    t = load_file(str(tmp_path / "same" / "init" / "rows" / "tokalign.safetensors"))
    assert t["embed"].tobytes() == toy_model(len(src_tok), tied).get_input_embeddings().weight.detach().numpy().tobytes()


@pytest.mark.parametrize("tied", [True, False])
def test_refine_steps_move_only_the_rows_of_new_tokens_the_text_holds_and_lower_the_loss(tmp_path, tied):
    """alignment.refine_steps: only rows of new (not gold, not special) tokens that occur in the training stream move
    (those in its windows of more than 8 tokens), in the input rows and (untied) the head; the next-token loss on their
    windows falls; off, nothing moves."""
    from safetensors.numpy import load_file

    src_tok, tgt_tok = source_tokenizer(), target_tokenizer()
    rows = ours_on_off(tmp_path, src_tok, tgt_tok, tied, {"refine_steps": 30, "refine_lr": 1e-2}, {"refine_steps": 0})
    how = np.load(tmp_path / "on" / "align" / "alignment.npz")["how"]
    seen = np.zeros(len(tgt_tok), bool)
    seen[np.load(tmp_path / "on" / "tokenize" / "target_ids.npy").astype(np.int64)] = True
    expected = seen & (how != A.HOW_GOLD) & (how != A.HOW_SPECIAL)
    assert expected.sum() >= 5
    info = json.loads((tmp_path / "on" / "init" / "info.json").read_text())["counts"]["tokalign"]["refine"]
    for key in ("embed",) + (() if tied else ("lm_head",)):
        moved = np.abs(rows["on"][key] - rows["off"][key]).max(1) > 0
        assert not (moved & ~expected).any() and moved.sum() >= 0.9 * expected.sum(), key
        assert info["rows"] == int(moved.sum())
    assert info["steps"] == 30 and info["windows"] > 0
    assert info["last_loss"] < info["first_loss"]
    off = json.loads((tmp_path / "off" / "init" / "info.json").read_text())["counts"]["tokalign"]
    assert "refine" not in off


@pytest.mark.parametrize("tied", [True, False])
def test_absorption_moves_only_the_output_rows_of_first_pieces_of_lost_source_tokens(tmp_path, tied):
    """alignment.absorb: the rows that move are exactly the output rows (the tied embedding, else the head) of the
    target tokens that start the spelling of a source token the target lacks; special tokens and an untied model's
    input rows do not move; identical tokenizers lose nothing, so nothing moves."""
    from safetensors.numpy import load_file

    from tokalign.absorb import lost_tokens

    src_tok = source_tokenizer()
    tgt_tok = make_tokenizer(280, CORPUS + EXTRA, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                             {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": "<|endoftext|>"})  # fewer merges
    rows = ours_on_off(tmp_path, src_tok, tgt_tok, tied, {"absorb": True, "absorb_positions": 300}, {"absorb": False})
    lost, first = lost_tokens(tgt_tok, src_tok)
    expected = np.zeros(len(tgt_tok), bool)
    expected[first] = True
    expected[np.asarray(tgt_tok.all_special_ids)] = False
    assert expected.sum() >= 10
    key = "embed" if tied else "lm_head"
    moved = np.abs(rows["on"][key] - rows["off"][key]).max(1) > 0
    assert np.array_equal(moved, expected)
    if not tied:
        assert np.array_equal(rows["on"]["embed"], rows["off"]["embed"])
    info = json.loads((tmp_path / "on" / "init" / "info.json").read_text())["counts"]["tokalign"]["absorption"]
    assert info["rows"] == int(expected.sum()) and info["lost"] >= info["rows"] and info["positions"] > 0

    same = write_inputs(tmp_path / "same", src_tok, source_tokenizer(), tied, vectors="same")
    run_align_init(tmp_path / "same", same, config(alignment={"absorb": True}))
    t = load_file(str(tmp_path / "same" / "init" / "rows" / "tokalign.safetensors"))
    assert t["embed"].tobytes() == toy_model(len(src_tok), tied).get_input_embeddings().weight.detach().numpy().tobytes()
