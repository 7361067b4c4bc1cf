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


@pytest.mark.parametrize("name", ["tokenizers/ggml-vocab-llama-spm.gguf", "tokenizers/ggml-vocab-gpt-neox.gguf",
                                  "models/SmolLM2-135M-Instruct.Q4_1.gguf"])
def test_a_gguf_tokenizer_is_converted_once_and_then_read_back_the_same(assets, tmp_path, monkeypatch, name):
    """The kept folder gives the same tokenizer as the conversion (SentencePiece prefix, the GPT-NeoX rebuild, a
    model's chat template); a changed file is converted again; ``off`` keeps nothing."""
    monkeypatch.setenv(refs.TOKENIZER_CACHE_ENV, str(tmp_path / "kept"))
    path = assets / name
    fresh = refs.load_tokenizer(str(path))
    [kept_dir] = (tmp_path / "kept").iterdir()

    def no_conversion(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(refs, "_convert_gguf_tokenizer", no_conversion)
    kept = refs.load_tokenizer(str(path))
    inp = path.with_name(path.name + ".inp")
    texts = ["Hello world", "  two spaces", " leading space", "\n\ttabs\n", "<|im_start|>user\nhi<|im_end|>",
             "p < 0.001, 95% CI", "数字 123 4567 🦙", ""]
    texts += inp.read_text().split("\n__ggml_vocab_test__\n") if inp.is_file() else []
    for text in texts:
        for special in (True, False):
            assert kept(text, add_special_tokens=special).input_ids == fresh(text, add_special_tokens=special).input_ids, text
        assert kept.decode(fresh(text).input_ids) == fresh.decode(fresh(text).input_ids)
    assert len(kept) == len(fresh) and kept.all_special_tokens == fresh.all_special_tokens
    assert (kept.bos_token_id, kept.eos_token_id, kept.chat_template) == (fresh.bos_token_id, fresh.eos_token_id, fresh.chat_template)
    assert kept.name_or_path == str(path)

    # another file (a copy: another path, another modification time) is converted, not read back
    copy = tmp_path / path.name
    copy.write_bytes(path.read_bytes())
    with pytest.raises(refs.RefError, match="converted again"):
        refs.load_tokenizer(str(copy))
    monkeypatch.undo()
    monkeypatch.setenv(refs.TOKENIZER_CACHE_ENV, "off")
    refs.load_tokenizer(str(copy))
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == [kept_dir.name]
