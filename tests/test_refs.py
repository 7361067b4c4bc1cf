"""Model/tokenizer references: GGUF vocabularies (GPT-NeoX rebuilt), clear errors, safe loading."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tokalign import refs


def test_vocab_gguf_matches_llama_cpp_vectors(assets):
    tok = refs.load_tokenizer(str(assets / "tokenizers/ggml-vocab-gpt-2.gguf"))
    inp = (assets / "tokenizers/ggml-vocab-gpt-2.gguf.inp").read_text().split("\n__ggml_vocab_test__\n")
    out = (assets / "tokenizers/ggml-vocab-gpt-2.gguf.out").read_text().split("\n")
    agree = sum(tok(s, add_special_tokens=False)["input_ids"] == [int(x) for x in o.split()]
                for s, o in zip(inp, out))
    assert agree >= 45


def test_gpt_neox_gguf_is_rebuilt_from_tokens_and_merges(assets):
    tok = refs.load_tokenizer(str(assets / "tokenizers/ggml-vocab-gpt-neox.gguf"))
    assert len(tok) >= 50277
    text = "Hello world, the patient's insulin dose was 12 mg.\nNext line"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[:3] == ["Hello", "Ġworld", ","]
    assert tok.decode(ids) == text
    assert tok.eos_token == "<|endoftext|>"


def test_missing_reference_is_a_clear_error(tmp_path):
    with pytest.raises(refs.RefError, match="no such file or directory"):
        refs.load_tokenizer(str(tmp_path / "nope.gguf"))
    with pytest.raises(refs.RefError, match="nope_model: no such file"):
        refs.load_model(str(tmp_path / "nope_model"))


def _tiny():
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))


def test_pickle_weights_refused_unless_allowed(tmp_path):
    model = _tiny()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    assert any(tmp_path.glob("*.bin")) and not any(tmp_path.glob("*.safetensors"))
    with pytest.raises(refs.RefError, match="allow_pickle=true"):
        refs.load_model(str(tmp_path))
    loaded = refs.load_model(str(tmp_path), allow_pickle=True)
    assert torch.equal(loaded.get_input_embeddings().weight, model.get_input_embeddings().weight)


def test_safetensors_folder_loads(tmp_path):
    model = _tiny()
    model.save_pretrained(tmp_path)
    loaded = refs.load_model(str(tmp_path))
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_retry_backs_off_then_succeeds_or_reraises(monkeypatch):
    import time

    monkeypatch.setattr(time, "sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("reset by peer")
        return "ok"

    assert refs.retry(flaky, "hub") == "ok" and len(calls) == 3
    with pytest.raises(TimeoutError):
        refs.retry(lambda: (_ for _ in ()).throw(TimeoutError("slow")), "hub", attempts=2)
    with pytest.raises(ValueError):  # not transient: no retry
        refs.retry(lambda: (_ for _ in ()).throw(ValueError("bad")), "hub")
