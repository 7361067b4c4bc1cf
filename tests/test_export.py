"""Export to GGUF with llama.cpp's own tools, and serving with llama.cpp's server (``tokalign/llamacpp.py``,
``tokalign/stages/export.py``, ``tokalign/serve.py``).

These need llama-cpp-python and llama.cpp's converter (``bash scripts/install_llama_cpp.sh``). Without them they skip,
unless ``TOKALIGN_REQUIRE_LLAMA_CPP=1`` (set by ``.ci/run``, which installs both): then a missing install fails.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, SMALL, make_cfg, need_assets, tiny_llama, tokalign
from tokalign import llamacpp, refs
from tokalign.llamacpp import ExportError


def _llama_cpp_ready() -> str:
    try:
        import llama_cpp  # noqa: F401

        llamacpp.find_converter()
    except (ImportError, ExportError) as e:
        return str(e)
    return ""


_MISSING = _llama_cpp_ready()
if _MISSING and os.environ.get("TOKALIGN_REQUIRE_LLAMA_CPP") == "1":
    raise RuntimeError(f"TOKALIGN_REQUIRE_LLAMA_CPP=1 but llama.cpp is not usable: {_MISSING}")
needs_llama_cpp = pytest.mark.skipif(bool(_MISSING), reason=f"llama.cpp not installed: {_MISSING}")

VOCABS = {"qwen2": "ggml-vocab-qwen2.gguf", "llama-3": "ggml-vocab-llama-bpe.gguf", "llama-2": "ggml-vocab-llama-spm.gguf"}


def _tiny_export(vocab_file: Path, out: Path) -> tuple[torch.nn.Module, object, Path]:
    """A tiny random Llama on a real vocabulary, saved as an HF folder and converted to f16 by llama.cpp."""
    tok = refs.load_tokenizer(str(vocab_file))
    model = tiny_llama(vocab=len(tok), positions=256)
    hf = out / "hf"
    model.save_pretrained(hf)
    tok.save_pretrained(hf)
    return model, tok, llamacpp.convert(hf, out / "model-f16.gguf", "f16")


@needs_llama_cpp
def test_tiny_model_to_f16_gguf_and_back_logits_match(tmp_path):
    assets = need_assets()
    model, tok, gguf = _tiny_export(assets / "tokenizers" / VOCABS["qwen2"], tmp_path)
    text = "The patient was given 5 mg of aspirin twice daily."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    llm = llamacpp.load(gguf, n_ctx=64, logits_all=True)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)])
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max()
    # bits per byte in llama.cpp follows metrics.bits_per_byte's conventions: the same figure for an f16 copy
    from tokalign import metrics as M

    texts = [text, "Hypertension is common in older adults."]
    hf_r = M.bits_per_byte(model, tok, texts, seq_len=64, stride=32, progress=False)
    gg_r = llamacpp.gguf_bits_per_byte(llm, tok, texts, seq_len=64, stride=32)
    llm.close()
    assert gg_r["doc_bytes"] == hf_r["doc_bytes"]
    assert gg_r["bpb"] == pytest.approx(hf_r["bpb"], rel=2e-3)


@needs_llama_cpp
@pytest.mark.parametrize("family", sorted(VOCABS))
def test_gguf_tokenizes_like_hugging_face_on_llama_cpp_test_strings(tmp_path, family):
    """Qwen2 and Llama-3 (byte-level BPE) and Llama-2 (SentencePiece: scores rebuilt from the merges)."""
    vocab = need_assets() / "tokenizers" / VOCABS[family]
    _, tok, gguf = _tiny_export(vocab, tmp_path)
    strings = llamacpp.read_test_strings(Path(str(vocab) + ".inp"))
    assert len(strings) > 40
    llm = llamacpp.load(gguf, vocab_only=True)
    assert llamacpp.tokenization_mismatches(llm, tok, strings) == []
    llm.close()


def test_sentencepiece_vocab_from_gguf_splits_as_llama_cpp_expects(assets):
    """The HF tokenizer read from a SentencePiece vocab GGUF matches llama.cpp's expected ids (the .out files)."""
    for name in ("ggml-vocab-llama-spm.gguf", "ggml-vocab-phi-3.gguf"):
        f = assets / "tokenizers" / name
        tok = refs.load_tokenizer(str(f))
        cases = Path(str(f) + ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
        expected = Path(str(f) + ".out").read_text(encoding="utf-8").split("\n")
        for text, ids in zip(cases, expected):
            assert tok(text, add_special_tokens=False)["input_ids"] == [int(x) for x in ids.split()], (name, text)


def test_lora_merge_equals_the_unmerged_model(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from tokalign.refs import RefError, load_merged

    base = tiny_llama(vocab=64)
    base.save_pretrained(tmp_path / "base")
    peft = get_peft_model(tiny_llama(vocab=64), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # B starts at zero: make the adapter change something
    peft.save_pretrained(tmp_path / "adapter")
    x = torch.tensor([[1, 5, 9, 33, 7]])
    with torch.no_grad():
        unmerged = PeftModel.from_pretrained(tiny_llama(vocab=64), tmp_path / "adapter").eval()(x).logits
        plain = base(x).logits
    merged, _ = load_merged(tmp_path / "base", [str(tmp_path / "adapter")], what="export.adapter")
    with torch.no_grad():
        got = merged.eval()(x).logits
    assert not torch.allclose(plain, unmerged, atol=1e-3)  # the adapter matters
    assert torch.allclose(got, unmerged, atol=1e-5)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with pytest.raises(RefError, match="export.adapter="):
        load_merged(tmp_path / "base", [str(tmp_path / "base")], what="export.adapter")


def test_chat_template_specials_map_by_string_then_role(assets):
    from tokalign.chat import map_template, special_map

    src = refs.load_tokenizer(str(assets / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    qwen = refs.load_tokenizer(str(assets / "tokenizers" / VOCABS["qwen2"]))
    llama3 = refs.load_tokenizer(str(assets / "tokenizers" / VOCABS["llama-3"]))
    m, unmapped = special_map(src, qwen)
    assert m["<|im_start|>"] == "<|im_start|>" and m["<|im_end|>"] == "<|im_end|>"  # Qwen2 has them
    m3, _ = special_map(src, llama3)
    assert m3["<|im_start|>"] == "<|begin_of_text|>" and m3["<|im_end|>"] == "<|end_of_text|>"  # by role: bos, eos
    t = map_template(src.chat_template, m3)
    assert "<|im_start|>" not in t and "<|begin_of_text|>" in t


@needs_llama_cpp
def test_bad_export_input_gives_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(ExportError, match=r"export.gguf_types: 'q3_x' not known"):
        llamacpp.check_types(["f16", "q3_x"])
    with pytest.raises(ExportError, match="export.converter=.*no such file"):
        llamacpp.find_converter(str(tmp_path / "nope.py"))
    monkeypatch.setenv(llamacpp.CONVERTER_ENV, str(tmp_path))
    with pytest.raises(ExportError, match="scripts/install_llama_cpp.sh"):
        llamacpp.find_converter()
    msg = llamacpp._converter_error(tmp_path, "chkhsh: " + "ab" * 32 + "\nNotImplementedError: BPE pre-tokenizer "
                                    "was not recognized - update get_vocab_base_pre()")
    assert "tokenizer.json" in msg and "does not recognise this BPE pre-tokenizer" in msg and "\n" not in msg
    msg = llamacpp._converter_error(tmp_path, "ERROR: Model FooForCausalLM is not supported")
    assert "config.json" in msg and "FooForCausalLM" in msg and "export.gguf_types=[]" in msg


@needs_llama_cpp
def test_a_gguf_that_tokenizes_differently_is_refused(tmp_path):
    """A GGUF checked against another vocabulary's tokenizer: a one-line error naming the file and the kept HF export."""
    from tokalign.stages.export import check_tokenization

    assets = need_assets()
    _, qwen, gguf = _tiny_export(assets / "tokenizers" / VOCABS["qwen2"], tmp_path)
    strings = llamacpp.read_test_strings(assets / "tokenizers" / (VOCABS["qwen2"] + ".inp"))
    assert check_tokenization(gguf, qwen, strings, tmp_path / "hf") == len(strings)
    gpt2 = refs.load_tokenizer(str(assets / "tokenizers" / "ggml-vocab-gpt-2.gguf"))
    with pytest.raises(ExportError, match=r"model-f16.gguf: llama.cpp tokenizes \d+ of \d+ check strings differently.*"
                                          r"Hugging Face export is kept"):
        check_tokenization(gguf, gpt2, strings, tmp_path / "hf")


def _domain_export(tok, out: Path) -> Path:
    model = tiny_llama(vocab=len(tok), positions=256)
    model.save_pretrained(out / "hf")
    tok.save_pretrained(out / "hf")
    return llamacpp.convert(out / "hf", out / "model-f16.gguf", "f16")


@needs_llama_cpp
def test_a_words_only_domain_vocabulary_exports_to_a_gguf_that_tokenizes_like_hugging_face(tmp_path):
    """target_tokenizer=domain with domain_vocab.kinds=[words] keeps the source's pre-tokenizer: llama.cpp uses the new
    merges and splits held-out text exactly as Hugging Face, with no mismatch the source vocabulary does not have too."""
    from tokalign import domain_vocab as D

    assets = need_assets()
    src = refs.load_tokenizer(str(assets / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    data = json.loads((assets / "pubmedqa" / "ori_pqal.json").read_text())
    texts = [" ".join(v["CONTEXTS"]) for v in data.values()]
    built = D.build(D.backend_json(src), texts[:300], texts[300:330], size=200, min_freq=2, kinds=["words"],
                    max_phrase_words=3)
    assert not built.units and built.tokenizer_json["pre_tokenizer"] == D.backend_json(src)["pre_tokenizer"]
    tok = D.to_hf(src, built.tokenizer_json)
    strings = texts[900:950] + llamacpp.read_test_strings(assets / "tokenizers" / "ggml-vocab-llama-bpe.gguf.inp")
    found: dict = {}
    for name, t in (("domain", tok), ("source", src)):
        (tmp_path / name).mkdir()
        llm = llamacpp.load(_domain_export(t, tmp_path / name), vocab_only=True)
        found[name] = {b["text"] for b in llamacpp.tokenization_mismatches(llm, t, strings)}
        ids = [i for s in texts[900:950] for i in llm.tokenize(s.encode(), add_bos=False, special=False)]
        found[name + "_new_ids"] = sum(i >= len(src) for i in ids)
        llm.close()
    assert found["domain"] <= found["source"] and len(found["source"]) <= 2  # the source's own: 'ied 4 ½ months'
    assert found["domain_new_ids"] > 100  # llama.cpp does use the new tokens


def test_preflight_refuses_gguf_export_of_a_domain_vocabulary_with_numbers_or_phrases():
    from tokalign.config import DomainVocabConfig, ExportConfig
    from tokalign.stages.preflight import PreflightError, check_export

    cfg = make_cfg(target_tokenizer="domain", export=ExportConfig(enabled=True, gguf_types=["q8_0"]),
                   domain_vocab=DomainVocabConfig(kinds=["words", "numbers"]))
    with pytest.raises(PreflightError, match=r"domain_vocab.kinds=\['words', 'numbers'\]: numbers change the "
                                             r"pre-tokenizer.*set domain_vocab.kinds=\[words\]") as e:
        check_export(cfg)
    assert "\n" not in str(e.value)
    assert check_export(make_cfg(target_tokenizer="domain", export=ExportConfig(enabled=True, gguf_types=[]),
                                 domain_vocab=DomainVocabConfig(kinds=["phrases"]))) == {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


@needs_llama_cpp
def test_server_answers_completion_and_chat_then_stops(tmp_path):
    _, _, gguf = _tiny_export(need_assets() / "tokenizers" / VOCABS["qwen2"], tmp_path)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tokalign.serve", str(tmp_path), "--port", str(port), "--n-ctx", "256"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base, t0 = f"http://127.0.0.1:{port}/v1", time.time()
        while True:
            try:
                urllib.request.urlopen(base + "/models", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
                assert time.time() - t0 < 60, "server did not come up in 60 s"
                time.sleep(0.2)
        c = _post(base + "/completions", {"prompt": "The patient", "max_tokens": 4})
        assert c["object"] == "text_completion" and c["usage"]["completion_tokens"] > 0
        chat = _post(base + "/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert chat["choices"][0]["message"]["role"] == "assistant" and chat["usage"]["prompt_tokens"] > 2
        # a second server on the same port: refused with one line, before loading anything
        r = subprocess.run([sys.executable, "-m", "tokalign.serve", str(gguf), "--port", str(port)], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(f"error: --port {port}:")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode is not None


# its own init methods and threshold: it shares corpus, source, tokenize and embed with tests/test_integration.py through
# the session cache, not their align and init outputs (those tests check what a freshly computed align reports)
OWN = ("init_methods=[fvt,tokalign]", "similarity_threshold=0.29")


@needs_llama_cpp
@pytest.mark.slow
def test_pipeline_exports_the_demo_model_and_checks_each_gguf(shared_cache, tmp_path):
    """The real SmolLM2 initialised on Qwen2: HF folder with the source's chat template, q8_0 and q4_k_m made by
    llama.cpp, each tokenizing like HF on llama.cpp's test strings and scored in llama.cpp."""
    tokalign(*SMALL, *OWN, "export.enabled=true", "export.gguf_types=[q8_0,q4_k_m]",
             "export.eval_samples=6", "wandb.mode=disabled", cache=shared_cache, run_dir=tmp_path)
    rep = json.loads((tmp_path / "stages" / "export_gguf" / "report.json").read_text())
    assert set(rep["gguf"]) == {"q8_0", "q4_k_m"} and rep["test_strings"].endswith("ggml-vocab-qwen2.gguf.inp")
    for t, r in rep["gguf"].items():
        assert (tmp_path / "stages" / "export_gguf" / f"model-{t}.gguf").is_file()
        assert r["tokenization_checked"] > 45 and r["prompt_tokens_per_s"] > 0
    assert abs(rep["gguf"]["q8_0"]["bpb_vs_hf"]) < 0.01
    assert abs(rep["gguf"]["q4_k_m"]["bpb_vs_hf"]) < 0.1
    assert rep["gguf"]["q4_k_m"]["bytes"] < rep["gguf"]["q8_0"]["bytes"]
    hf = tmp_path / "stages" / "export" / "hf"
    cfg = json.loads((hf / "tokenizer_config.json").read_text())
    assert "SmolLM" in (cfg.get("chat_template") or (hf / "chat_template.jinja").read_text())
    gen = json.loads((hf / "generation_config.json").read_text())
    assert 151645 in (gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]])
    m = json.loads((tmp_path / "summary.json").read_text())["metrics"]
    assert m["export/q8_0/bpb"] == pytest.approx(rep["gguf"]["q8_0"]["bpb"])
    # a quant type llama.cpp does not know: refused by preflight, before any work, in one line printed last
    r = tokalign(*SMALL, "export.enabled=true", "export.gguf_types=[q3_x]", "wandb.mode=disabled",
                 cache=shared_cache, run_dir=tmp_path / "bad_type", check=False)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("tokalign: error: preflight: export.gguf_types: 'q3_x' not known"), last
    # a GGUF step that fails (here: a missing test-strings file): the HF export stays published and linked
    bad = tmp_path / "bad_strings"
    r = tokalign(*SMALL, *OWN, "export.enabled=true", "export.gguf_types=[q8_0]",
                 f"export.test_strings={tmp_path / 'nope.inp'}", "wandb.mode=disabled", cache=shared_cache, run_dir=bad,
                 check=False)
    assert r.returncode == 2 and "export.test_strings=" in r.stderr.strip().splitlines()[-1]
    assert (bad / "stages" / "export" / "hf" / "model.safetensors").is_file()
    summary = json.loads((bad / "summary.json").read_text())
    assert summary["stages"]["export"]["status"] == "cached" and summary["stages"]["export_gguf"]["status"] == "failed"


@needs_llama_cpp
def test_preflight_refuses_gguf_export_it_cannot_do(tmp_path, monkeypatch):
    from tokalign.config import ExportConfig
    from tokalign.stages.preflight import PreflightError, check_export

    cfg = make_cfg(export=ExportConfig(enabled=True, gguf_types=["q8_0", "q3_x"]))
    with pytest.raises(PreflightError, match="export.gguf_types: 'q3_x' not known"):
        check_export(cfg)
    assert check_export(make_cfg(export=ExportConfig(enabled=True, gguf_types=[]))) == {}  # HF folder only
    monkeypatch.setenv(llamacpp.CONVERTER_ENV, str(tmp_path))  # no converter there
    with pytest.raises(PreflightError, match="install_llama_cpp.sh"):
        check_export(make_cfg(export=ExportConfig(enabled=True)))


@needs_llama_cpp
def test_a_llama_cpp_built_with_amx_is_refused_before_any_work(monkeypatch):
    """A native build on an AMX CPU segfaulted in ggml_backend_amx_mul_mat on the demo model's quantized GGUFs (CI,
    llama-cpp-python 0.3.36): preflight names the rebuild instead of a crash after the export."""
    import llama_cpp

    from tokalign.config import ExportConfig
    from tokalign.stages.preflight import PreflightError, check_export

    info = llama_cpp.llama_print_system_info().replace(b"AVX2 = 1 |", b"AVX2 = 1 | AMX_INT8 = 1 |")
    monkeypatch.setattr(llama_cpp, "llama_print_system_info", lambda: info)
    monkeypatch.delenv(llamacpp.AMX_ENV, raising=False)
    with pytest.raises(PreflightError, match="built with AMX.*install_llama_cpp.sh"):
        check_export(make_cfg(export=ExportConfig(enabled=True, gguf_types=["q8_0"])))
    monkeypatch.setenv(llamacpp.AMX_ENV, "1")
    assert "llama_cpp_converter" in check_export(make_cfg(export=ExportConfig(enabled=True, gguf_types=["q8_0"])))
