"""Shared fixtures and helpers of the test files (no test file imports another): W&B off in unit tests, the demo
assets, a recording tracker, and the toy training workspace (a tiny random Llama, a word-level tokenizer, token
streams and dev texts laid out as the upstream stages would)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from tokenizers.pre_tokenizers import ByteLevel  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from tokalign.config import Config, EvalConfig, LRScheduleConfig, TrainConfig, default_assets_dir  # noqa: E402
from tokalign.context import Context  # noqa: E402
from tokalign.tracking import NullTracker  # noqa: E402

ASSETS = default_assets_dir()
REPO = Path(__file__).resolve().parents[1]


def need_assets() -> Path:
    if not (ASSETS / "models").is_dir():
        pytest.skip(f"demo assets not found at {ASSETS} (set TOKALIGN_ASSETS)")
    return ASSETS


@pytest.fixture
def assets() -> Path:
    return need_assets()


class RecordingTracker(NullTracker):
    """A tracker that keeps what it is given: ``logged`` rows, ``tables`` and ``images`` by name."""

    def __init__(self) -> None:
        self.logged: list[dict] = []
        self.tables: dict[str, tuple[list, list]] = {}
        self.images: dict[str, Path] = {}

    def log(self, metrics: dict, step=None) -> None:
        self.logged.append(dict(metrics))

    def table(self, name, columns, rows) -> None:
        self.tables[name] = (columns, rows)

    def image(self, name, path) -> None:
        self.images[name] = Path(path)


# ----------------------------------------------------------------------------------------------------------------------
# the toy training workspace (tests of the training stages, the distributed launcher and the GPU paths)

V = 300
EOS_ID = 1


def toy_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": EOS_ID, **{f"w{i}": i for i in range(2, V)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")


def toy_model(tied: bool, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tied,
                      bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)


def toy_docs(n_docs=60, seed=0):
    """Documents that are arithmetic runs over the word ids: learnable structure, so the loss falls."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        start, step, n = rng.integers(2, V), rng.integers(1, 4), rng.integers(8, 30)
        docs.append(((start - 2 + step * np.arange(n)) % (V - 2) + 2).astype(np.uint32))
    return docs


def make_workspace(tmp: Path, tied: bool = True) -> Context:
    tok = toy_tokenizer()
    init = tmp / "init"
    toy_model(tied).save_pretrained(init / "model")
    tok.save_pretrained(init / "model")
    tokd = tmp / "tokenize"
    tokd.mkdir()
    docs = toy_docs()
    np.save(tokd / "target_ids.npy", np.concatenate(docs))
    np.save(tokd / "target_offsets.npy", np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64))
    corpus = tmp / "corpus"
    corpus.mkdir()
    with (corpus / "dev.jsonl").open("w") as f:
        for i, d in enumerate(toy_docs(4, seed=1)):
            f.write(json.dumps({"id": f"e{i}", "text": " ".join(f"w{t}" for t in d)}) + "\n")
    run = tmp / "run"
    run.mkdir()
    return Context(run_dir=run, outputs={"init": init, "tokenize": tokd, "corpus": corpus})


def make_cfg(**kw) -> Config:
    train_kw = dict(seq_len=16, micro_batch_size=2, grad_accum=2, save_steps=2, logging_steps=1, eval_steps=0)
    train_kw.update(kw.pop("train", {}))
    base = dict(source_model="x", target_tokenizer="y", corpus="z", steps_stage1=4, steps_stage2=3, lr_stage1=1e-2,
                lr_stage2=1e-2, seed=0, train=TrainConfig(**train_kw),
                eval=EvalConfig(max_eval_samples=2, seq_len=32, stride=16),
                lr_schedule=LRScheduleConfig(name="cosine", warmup_ratio=0.0))
    base.update(kw)
    return Config(**base)


def load_sd(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(folder))
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------------
# tiny tokenizers and models for the metrics and evaluation tests

def byte_tokenizer(bos: bool = True, eos: bool = True) -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte (ids 3..258); <unk>=0, <s>=1, </s>=2."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    kw = {"unk_token": "<unk>"}
    if bos:
        kw["bos_token"] = "<s>"
    if eos:
        kw["eos_token"] = "</s>"
    return PreTrainedTokenizerFast(tokenizer_object=tk, **kw)


def tiny_llama(vocab: int = 300, seed: int = 0, positions: int = 512) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    m = LlamaForCausalLM(cfg)
    # larger weights than the default init, so the model has real preferences
    with torch.no_grad():
        m.get_input_embeddings().weight.normal_(0, 1.0)
    return m.eval()


TEXTS = ["hello world", "Héllo, ünïcode — 5 µg/kg!", "abc", "The patient was treated with metformin."]


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


class MarkerModel(torch.nn.Module):
    """Prefers the answer tied to a marker word in the context: alpha -> yes, beta -> no, gamma -> maybe."""

    def __init__(self, tok):
        super().__init__()
        self.vocab = len(tok)
        self.pref = {tok.convert_tokens_to_ids(m): tok.convert_tokens_to_ids(a)
                     for m, a in [("alpha", "yes"), ("beta", "no"), ("gamma", "maybe")]}
        self.config = SimpleNamespace(vocab_size=self.vocab, max_position_embeddings=64)

    def forward(self, input_ids, attention_mask=None, **kw):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.vocab)
        for b in range(B):
            for m, a in self.pref.items():
                if (input_ids[b] == m).any():
                    logits[b, :, a] = 4.0
        return SimpleNamespace(logits=logits)


# ----------------------------------------------------------------------------------------------------------------------
# a small corpus and byte-level BPE tokenizers for the alignment and initialisation tests

CORPUS = [
    "The patients with hypertension were treated with beta blockers.",
    "Blood pressure was measured twice daily in all patients.",
    "Results: the treatment reduced the mean arterial pressure significantly.",
    "Café naïve coöperation — résumé: 血压 and 高血压 in Chinese.",
    "Methods\n\tWe enrolled 120 subjects; 60 received placebo.",
] * 4


def make_tokenizer(vocab_size, texts, specials, roles):
    """A small GPT-style byte-level BPE (every byte has a token), wrapped as a fast HF tokenizer with these roles."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, **{f"{r}_token": t for r, t in roles.items()})


# ----------------------------------------------------------------------------------------------------------------------
# the real `python -m tokalign` on the demo assets, small budgets, one cache for the whole session
# ----------------------------------------------------------------------------------------------------------------------

SMALL = [
    "corpus_bytes=300000", "eval.max_eval_samples=6", "eval.seq_len=256", "eval.stride=128",
    "eval.pubmedqa_samples=3", "embed.epoch=3", "pivot_count=200", "steps_stage1=0", "steps_stage2=0",
    "alignment.calibrate_positions=1000",  # ours' calibration on 1,000 positions, not 4,000: 4x less of its ~30 s
    "alignment.absorb_positions=2000",  # ours' absorption on 2,000 positions, not 20,000: 10x less of its ~60 s
]


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    need_assets()
    return tmp_path_factory.mktemp("cache")


# Stages whose cache entries hold model weights: 0.5-3 GB each on the Qwen2 vocabulary (every init method's rows).
WEIGHT_STAGES = ("init", "train_stage1", "train_stage2", "adapters", "export", "export_gguf")


@pytest.fixture(autouse=True)
def _drop_weights_from_shared_cache(request):
    """After each test that used the session cache, drop its entries that hold model weights, so the suite's disk use
    stays that of one run (about 5 GB), not the sum of all of them; the next test that needs one recomputes it."""
    root = request.getfixturevalue("shared_cache") if "shared_cache" in request.fixturenames else None
    yield
    if root is None:
        return
    for stage in WEIGHT_STAGES:
        for entry in (root / stage).glob("*"):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)


def tokalign(*args: str, cache: Path, run_dir: Path, env: dict | None = None, timeout: int = 1500,
             multirun: bool = False, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tokalign", *(["-m"] if multirun else []), f"cache_dir={cache}", *args]
    cmd.append(f"hydra.sweep.dir={run_dir}" if multirun else f"hydra.run.dir={run_dir}")
    e = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    e.pop("WANDB_API_KEY", None)
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=e)
    if check:
        assert r.returncode == 0, f"exit {r.returncode}\n{r.stderr[-4000:]}"
    return r
