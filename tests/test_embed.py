"""Stage ``embed``: the fastText token budget (embed.max_tokens) and what the stage writes."""

from __future__ import annotations

import numpy as np
import pytest

from tokalign.config import Config, EmbedConfig
from tokalign.context import Context
from tokalign.stages import embed


def stream(n_docs=200, seed=0, vocab=50):
    rng = np.random.default_rng(seed)
    lens = rng.integers(5, 40, n_docs)
    ids = rng.integers(0, vocab, int(lens.sum())).astype(np.uint32)
    return ids, np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)


def docs(ids, offsets):
    return [tuple(ids[a:b].tolist()) for a, b in zip(offsets[:-1], offsets[1:])]


def test_sample_docs_takes_whole_documents_under_the_budget_deterministically():
    ids, off = stream()
    s_ids, s_off = embed.sample_docs(ids, off, 1000, seed=3)
    assert 1000 - 40 < len(s_ids) <= 1000 and s_off[-1] == len(s_ids)
    original = docs(ids, off)
    picked = docs(s_ids, s_off)
    positions = [original.index(d) for d in picked]
    assert positions == sorted(positions)  # whole documents, file order kept
    again = embed.sample_docs(ids, off, 1000, seed=3)
    assert np.array_equal(again[0], s_ids) and np.array_equal(again[1], s_off)
    other = embed.sample_docs(ids, off, 1000, seed=4)[0]
    assert not np.array_equal(other, s_ids)  # the seed picks the documents, not the file order
    for budget in (0, len(ids), len(ids) + 1):
        same = embed.sample_docs(ids, off, budget, seed=3)
        assert same[0] is ids and same[1] is off
    one = embed.sample_docs(ids, off, 1, seed=0)  # below the shortest document: still one document
    assert len(docs(*one)) == 1


def test_embed_stage_respects_max_tokens_and_keeps_whole_stream_counts(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    for side, seed in (("source", 0), ("target", 1)):
        ids, off = stream(seed=seed)
        np.save(tok / f"{side}_ids.npy", ids)
        np.save(tok / f"{side}_offsets.npy", off)
    cfg = Config(source_model="x", target_tokenizer="y", corpus="z",
                 embed=EmbedConfig(dim=8, epoch=1, min_count=1, max_tokens=1500))
    out = tmp_path / "out"
    out.mkdir()
    m = embed.run(cfg, Context(run_dir=tmp_path, outputs={"tokenize": tok}), out)
    for side, seed in (("source", 0), ("target", 1)):
        ids, _ = stream(seed=seed)
        assert 0 < m[f"embed/{side}_tokens"] <= 1500 < len(ids)
        z = np.load(out / f"{side}.npz")
        assert z["vectors"].shape == (len(z["ids"]), 8)
        assert np.array_equal(z["counts"], np.bincount(ids.astype(np.int64))[z["ids"]])


def test_negative_max_tokens_is_a_config_error():
    from tokalign.config import ConfigError

    with pytest.raises(ConfigError, match="embed.max_tokens"):
        EmbedConfig(max_tokens=-1)


def test_fasttext_nan_is_retried_in_fresh_processes_then_reported(monkeypatch, tmp_path):
    ids, off = stream()
    calls = []

    def flaky(kwargs, env):
        calls.append(env["TOKALIGN_FASTTEXT_ATTEMPT"])
        if len(calls) < 3:
            raise RuntimeError("Encountered NaN.")
        return {"ids": np.arange(3), "vectors": np.zeros((3, 4), np.float32), "counts": np.ones(3), "seconds": 0.1,
                "tokens": len(kwargs["ids"])}

    monkeypatch.setattr(embed, "_train_in_fresh_process", flaky)
    res = embed.train_vectors_isolated(ids, off, tmp_path, dim=4, epoch=1, min_count=1, lr=0.05, thread=1, window=5,
                                       neg=5, side="target")
    assert res["attempts"] == 3 and len(set(calls)) == 3  # each attempt in a differently laid-out process

    def always_nan(kwargs, env):
        raise RuntimeError("Encountered NaN.")

    monkeypatch.setattr(embed, "_train_in_fresh_process", always_nan)
    with pytest.raises(embed.EmbedError, match=rf"target token stream: fastText raised 'Encountered NaN' in {embed.FASTTEXT_ATTEMPTS}"):
        embed.train_vectors_isolated(ids, off, tmp_path, dim=4, epoch=1, min_count=1, lr=0.05, thread=1, window=5,
                                     neg=5, side="target")

    def other_error(kwargs, env):
        raise RuntimeError("something else")

    monkeypatch.setattr(embed, "_train_in_fresh_process", other_error)
    with pytest.raises(RuntimeError, match="something else"):  # only the NaN is retried
        embed.train_vectors_isolated(ids, off, tmp_path, dim=4, epoch=1, min_count=1, lr=0.05, thread=1, window=5,
                                     neg=5, side="target")
