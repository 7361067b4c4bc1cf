"""The cached pipeline runner: keys, cached/computed status, corrupt entries, half-written outputs."""

from __future__ import annotations

import json

import pytest

from tokalign import cache
from tokalign.config import Config
from tokalign.pipeline import STAGES, Stage, run_pipeline, stage_key


def _cfg(tmp_path, **kw):
    return Config(source_model="s", target_tokenizer="t", corpus="c", cache_dir=str(tmp_path / "cache"), **kw)


def _stages(calls):
    def make(name):
        def run(cfg, ctx, out):
            calls.append(name)
            for up in ctx.inputs:  # every declared input is there, with its data
                assert (ctx.path(up) / "data.txt").read_text()
            (out / "data.txt").write_text(f"{name}:{cfg.pivot_count}:{cfg.lr_stage1}")
            return {f"{name}/value": 1.0}
        return run
    return [
        Stage("a", make("a"), (), ("pivot_count",)),
        Stage("b", make("b"), ("a",), ("lr_stage1",)),
    ]


def test_second_run_is_cached_and_sweep_reuses_upstream(tmp_path):
    calls = []
    s1 = run_pipeline(_cfg(tmp_path), tmp_path / "r1", stages=_stages(calls))
    assert [s1["stages"][n]["status"] for n in "ab"] == ["computed", "computed"]
    s2 = run_pipeline(_cfg(tmp_path), tmp_path / "r2", stages=_stages(calls))
    assert [s2["stages"][n]["status"] for n in "ab"] == ["cached", "cached"]
    assert s2["metrics"]["b/value"] == 1.0
    s3 = run_pipeline(_cfg(tmp_path, lr_stage1=1e-3), tmp_path / "r3", stages=_stages(calls))
    assert [s3["stages"][n]["status"] for n in "ab"] == ["cached", "computed"]
    s4 = run_pipeline(_cfg(tmp_path, pivot_count=7), tmp_path / "r4", stages=_stages(calls))
    assert [s4["stages"][n]["status"] for n in "ab"] == ["computed", "computed"]  # downstream key changes too
    assert calls == ["a", "b", "b", "a", "b"]
    assert (tmp_path / "r4" / "stages" / "b" / "data.txt").read_text() == "b:7:0.00064"


def test_corrupt_entry_is_recomputed_not_used(tmp_path):
    calls = []
    run_pipeline(_cfg(tmp_path), tmp_path / "r1", stages=_stages(calls))
    entry = next(p for p in (tmp_path / "cache" / "a").iterdir() if p.is_dir())
    (entry / "data.txt").write_text("garbage!")  # same size? no: checksum differs either way
    s = run_pipeline(_cfg(tmp_path), tmp_path / "r2", stages=_stages(calls))
    assert s["stages"]["a"]["status"] == "computed"
    assert (entry / "data.txt").read_text() == "a:300:0.00064"


def test_half_written_output_is_recomputed(tmp_path):
    calls = []
    cfg = _cfg(tmp_path)
    key = stage_key(_stages(calls)[0], cfg, {})
    partial = tmp_path / "cache" / "a" / f"{key}.partial"
    partial.mkdir(parents=True)
    (partial / "data.txt").write_text("half")  # a killed run left this; no manifest
    s = run_pipeline(cfg, tmp_path / "r", stages=_stages(calls))
    assert s["stages"]["a"]["status"] == "computed" and calls[0] == "a"
    assert cache.verify(tmp_path / "cache" / "a" / key)
    assert not partial.exists()


def test_failure_keeps_finished_stages_and_records_error(tmp_path):
    def boom(cfg, ctx, out):
        raise ValueError("broken input")

    calls = []
    stages = _stages(calls)[:1] + [Stage("b", boom, ("a",), ())]
    with pytest.raises(ValueError):
        run_pipeline(_cfg(tmp_path), tmp_path / "r", stages=stages)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["stages"]["a"]["status"] == "computed"
    assert summary["stages"]["b"]["status"] == "failed" and "broken input" in summary["stages"]["b"]["error"]
    s = run_pipeline(_cfg(tmp_path), tmp_path / "r2", stages=_stages(calls))
    assert s["stages"]["a"]["status"] == "cached"


def test_stage_list_reads_only_earlier_stages():
    seen = set()
    for st in STAGES:
        assert set(st.inputs) <= seen, st.name
        seen.add(st.name)
    # instruct early: bad instruction data fails before any training
    assert [s.name for s in STAGES][:10] == ["preflight", "corpus", "source", "instruct", "domain_vocab", "tokenize",
                                             "terms", "embed", "align", "init"]


def test_cuda_cache_is_released_after_every_stage_that_ran_even_a_failing_one(tmp_path, monkeypatch):
    """A long run and the next job of a serial multirun start from a clean GPU allocator."""
    import torch

    released = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: released.append(True))
    calls = []
    run_pipeline(_cfg(tmp_path), tmp_path / "r1", stages=_stages(calls))
    assert len(released) == 2
    run_pipeline(_cfg(tmp_path), tmp_path / "r1b", stages=_stages(calls))  # both cached: nothing to release
    assert len(released) == 2

    def boom(cfg, ctx, out):
        raise RuntimeError("stage failed")

    with pytest.raises(RuntimeError):
        run_pipeline(_cfg(tmp_path), tmp_path / "r2", stages=[Stage("x", boom, (), ())])
    assert len(released) == 3


def _stage(name):
    return next(s for s in STAGES if s.name == name)


def test_embed_key_has_the_seed_exactly_when_it_samples_documents():
    """embed.max_tokens > 0 draws documents with cfg.seed: a seed sweep must not reuse another seed's vectors;
    with the whole stream (0) the seed changes nothing and the cached vectors are shared."""
    from tokalign.config import EmbedConfig

    embed = _stage("embed")
    ups = {"tokenize": "t0"}

    def key(seed, max_tokens):
        return stage_key(embed, Config(source_model="s", target_tokenizer="t", corpus="c", seed=seed,
                                       embed=EmbedConfig(max_tokens=max_tokens)), ups)

    assert key(0, 1000) != key(1, 1000)
    assert key(0, 1000) != key(0, 2000)
    assert key(0, 0) == key(1, 0)
    assert embed.keys_if(Config(source_model="s", target_tokenizer="t", corpus="c")) == ()


def test_extend_schedule_enters_the_init_key_only_when_not_constant():
    """``domain_vocab.init_schedule``: cosine (the default) and constant make different rows, so different keys;
    ``constant`` keeps the key that rows had before the setting existed (those cached rows stay valid)."""
    from tokalign.config import DomainVocabConfig

    init = _stage("init")
    ups = {n: f"{n}0" for n in init.inputs}

    def cfg(**dv):
        return Config(source_model="s", target_tokenizer="domain", corpus="c", init_methods=["extend"],
                      domain_vocab=DomainVocabConfig(**dv))

    const = cfg(init_schedule="constant")
    assert "domain_vocab.init_schedule" not in init.keys_if(const)
    assert "domain_vocab.init_schedule" in init.keys_if(cfg())
    assert stage_key(init, cfg(), ups) != stage_key(init, const, ups)
    assert stage_key(init, cfg(init_steps=10), ups) != stage_key(init, cfg(), ups)


def test_every_stage_key_is_a_config_key():
    """A misspelt key would silently drop out of the cache hash (OmegaConf.select gives None for it)."""
    import dataclasses

    from tokalign.config import EmbedConfig, TrainConfig

    def exists(cls, dotted):
        head, _, rest = dotted.partition(".")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if head not in fields:
            return False
        if not rest:
            return True
        sub = fields[head].default_factory() if fields[head].default_factory is not dataclasses.MISSING else None
        return dataclasses.is_dataclass(sub) and exists(type(sub), rest)

    cfg = Config(source_model="s", target_tokenizer="t", corpus="c", embed=EmbedConfig(max_tokens=1),
                 train=TrainConfig(eval_steps=1))  # every keys_if branch taken
    assert all(st.keys_if(cfg) or st.name not in ("embed", "train_stage1", "train_stage2") for st in STAGES)
    for st in STAGES:
        for k in st.keys + st.keys_if(cfg):
            assert exists(Config, k), f"stage {st.name}: key {k!r} is not a Config field"
    assert not exists(Config, "eval.no_such_field") and not exists(Config, "seeds")


def test_a_stage_reading_an_undeclared_or_skipped_input_gets_a_named_error(tmp_path):
    from tokalign.context import StageInputError

    def reads(name):
        def run(cfg, ctx, out):
            ctx.path(name)
            return {}
        return run

    calls = []
    with pytest.raises(StageInputError, match=r"stage 'b' reads the output of stage 'c' but does not declare it"):
        run_pipeline(_cfg(tmp_path), tmp_path / "r1", stages=_stages(calls)[:1] + [Stage("b", reads("c"), ("a",))])
    skipped = Stage("a", reads("a"), when=lambda cfg: False)
    with pytest.raises(StageInputError, match=r"stage 'b' needs the output of stage 'a', which did not run"):
        run_pipeline(_cfg(tmp_path), tmp_path / "r2", stages=[skipped, Stage("b", reads("a"), ("a",))])

    def optional(cfg, ctx, out):
        assert not ctx.has("a")
        return {"b/ok": 1}

    s = run_pipeline(_cfg(tmp_path), tmp_path / "r3", stages=[skipped, Stage("b", optional, ("a",))])
    assert s["metrics"]["b/ok"] == 1


def test_an_init_only_alignment_key_rebuilds_the_rows_not_the_alignment():
    """``alignment.piece_weights`` is read by stage init alone: changing it keeps align's cache key; every other
    alignment key (here the scoring and the unseen-row scale) still changes it."""
    from tokalign.config import AlignmentConfig

    stages = {st.name: st for st in STAGES}
    ups = {n: f"{n}0" for n in ("tokenize", "embed", "source")}

    def keys(**al):
        cfg = Config(source_model="s", target_tokenizer="t", corpus="c", alignment=AlignmentConfig(**al))
        a = stage_key(stages["align"], cfg, ups)
        return a, stage_key(stages["init"], cfg, {**ups, "align": a})

    base = keys()
    bytes_vs_mean = keys(piece_weights="mean")
    assert bytes_vs_mean[0] == base[0] and bytes_vs_mean[1] != base[1]
    for other in ({"scoring": "cos"}, {"unseen_scale": 0.5}):
        assert keys(**other)[0] != base[0], other
