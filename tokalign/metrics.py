"""Scoring: bits per byte on plain text and PubMedQA accuracy, for any causal LM and its tokenizer.

Bits per byte (bpb) makes models with different tokenizers comparable: the summed negative
log-likelihood of a text (nats) divided by ln 2 and by the text's UTF-8 byte count.

Conventions (the same for every model, so numbers compare):

* each document is tokenized on its own, WITHOUT the tokenizer's special tokens;
* a start token is prepended as context and never scored: the separator the model saw between
  documents (``start_token_id``: the token the tokenizer prepends by itself, else ``<|endoftext|>``,
  else BOS, else EOS). A model initialised on a new vocabulary has that token's row set to the
  source's separator row by every init method (stage ``init``), so all methods are compared on
  the same start context. A tokenizer with none of these has its first document token used as
  context only: that token is not scored but its bytes still count, so such a model is slightly
  favoured (by one token per document) rather than silently measured on a different text;
* documents longer than ``seq_len`` tokens are scored with the standard strided sliding window
  (Hugging Face "perplexity of fixed-length models"): windows start every ``stride`` tokens,
  each token is scored exactly once, in the first window that reaches it, with up to
  ``seq_len - 1`` tokens of context (at least ``seq_len - stride`` after the first window);
* logits are computed in float32 (the final hidden state and the head cast up, so a bf16 model's logits
  are not rounded before the log-softmax); sums are kept in float64.

PubMedQA: the prompt is one of ``PUBMEDQA_FORMATS`` (``pubmedqa_prompt``; the default, and how it was
chosen, is in ``tokalign/config.py``: ``EvalConfig.pubmedqa_format``) and the prediction is the answer among " yes", " no", " maybe" with
the highest total log-likelihood (sum of its tokens' log-probs). We do NOT length-normalise:
the sum is the probability that the model writes that exact answer string, which is what a
choice between strings should compare; per-token averaging would favour an answer split into
several tokens (" may" + "be") because its later tokens are nearly certain. Long prompts are cut
from the left (the start of the abstract goes first; the question, at the end, stays).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
import weakref
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
from tqdm.auto import tqdm
from tokalign.errors import TokalignError

log = logging.getLogger(__name__)

LN2 = math.log(2.0)
PUBMEDQA_LABELS = ("yes", "no", "maybe")
# logits materialised at once when only some positions are scored: positions x vocab floats
_HEAD_ELEMENTS = 1 << 26


class MetricsError(TokalignError, ValueError):
    """Bad input to a scoring function; the message names what was expected."""


class TokenRangeError(MetricsError):
    """A token id is outside the model's embedding matrix."""


class PubMedQAError(MetricsError):
    """The PubMedQA files are missing, unreadable or not in the expected shape."""


# --------------------------------------------------------------------------------------------
# helpers shared by both metrics
# --------------------------------------------------------------------------------------------


def start_token_id(tokenizer: Any) -> Optional[int]:
    """The context-only token put before every document: the separator the model saw between documents.

    In order: the token the tokenizer adds in front of text by itself (Llama's ``<s>``, Llama-3's
    ``<|begin_of_text|>``); else a ``<|endoftext|>`` token (the document separator of GPT-2-style
    vocabularies: GPT-2, Qwen2, SmolLM2, whose ``bos_token`` is the chat token ``<|im_start|>``); else
    BOS, else EOS, else None.
    """
    try:
        plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
        full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
        if len(full) > len(plain) and full[len(full) - len(plain):] == plain:
            return int(full[0])
    except Exception:  # a tokenizer-like object without the usual call
        pass
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    if isinstance(vocab, dict) and "<|endoftext|>" in vocab:
        return int(vocab["<|endoftext|>"])
    for attr in ("bos_token_id", "eos_token_id"):
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            return int(tid)
    return None


def roundtrip_mismatches(tokenizer: Any, texts: Sequence[str]) -> int:
    """How many ``texts`` do not come back unchanged from ``decode(encode(t))`` (bits would be counted over other text)."""
    bad = 0
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        if tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) != t:
            bad += 1
    return bad


def model_vocab_size(model: Any) -> int:
    """Rows of the model's input embedding (what a token id must be below)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is not None and hasattr(emb, "num_embeddings"):
        return int(emb.num_embeddings)
    if emb is not None and hasattr(emb, "weight"):
        return int(emb.weight.shape[0])
    return int(model.config.vocab_size)


def model_max_positions(model: Any) -> Optional[int]:
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _names(model: Any, tokenizer: Any) -> str:
    tname = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    mcfg = getattr(model, "config", None)
    mname = getattr(mcfg, "_name_or_path", None) or getattr(mcfg, "name_or_path", None) or type(model).__name__
    return f"tokenizer '{tname}', model '{mname}'"


def check_token_range(ids: Iterable[int], vocab: int, model: Any, tokenizer: Any) -> None:
    """Raise ``TokenRangeError`` if any id is negative or >= the model's embedding rows."""
    bad = None
    for i in ids:
        if i >= vocab or i < 0:
            bad = i if bad is None else max(bad, i)
    if bad is not None:
        raise TokenRangeError(
            f"token id {bad} is outside the model's input embedding ({vocab} rows) for {_names(model, tokenizer)}: "
            "the tokenizer does not belong to this model (or the embedding was not resized)"
        )


def _device_of(model: Any, device: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


_HEAD_OK: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def _head_path_ok(model: Any, device: torch.device) -> bool:
    """Whether logits equal ``output_embeddings(decoder(x))`` for this model (checked once on a tiny input).

    Scoring through the decoder lets us project only the scored positions onto the vocabulary
    (a 152k vocabulary x 1024 positions x batch 4 of float32 logits would be 2.5 GB). Models with
    extra logit processing (soft-capping, scaling) fail the check and use the plain forward.
    """
    try:
        return _HEAD_OK[model]
    except (KeyError, TypeError):
        pass
    ok = False
    get_dec, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    if callable(get_dec) and callable(get_head):
        try:
            dec, head = get_dec(), get_head()
            if dec is not None and head is not None and dec is not model:
                ids = torch.arange(1, 7, device=device).unsqueeze(0) % model_vocab_size(model)
                mask = torch.ones_like(ids)
                full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
                mine = head(dec(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state).float()
                ok = full.shape == mine.shape and torch.allclose(full, mine, rtol=1e-3, atol=1e-3)
        except Exception as e:  # any mismatch in API: use the plain forward
            log.debug("decoder/head scoring path unavailable: %s", e)
            ok = False
    try:
        _HEAD_OK[model] = ok
    except TypeError:
        pass
    return ok


def score_rows(model: Any, rows: Sequence[Sequence[int]], queries: Sequence[tuple[Sequence[int], Sequence[int]]],
               *, device: torch.device, pad_id: int = 0) -> list[torch.Tensor]:
    """Log-probabilities (float64, CPU) of chosen next tokens, one padded forward pass for all rows.

    ``queries[i] = (positions, targets)``: the logits at ``positions`` of row ``i`` (which see
    ``rows[i][: p + 1]``) are asked for the probability of ``targets``. Rows are right-padded with
    an attention mask, so padding never influences a real position.
    """
    B = len(rows)
    T = max(len(r) for r in rows)
    ids = torch.full((B, T), int(pad_id), dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    b_idx = torch.cat([torch.full((len(q[0]),), i, dtype=torch.long) for i, q in enumerate(queries)])
    p_idx = torch.cat([torch.as_tensor(list(q[0]), dtype=torch.long) for q in queries])
    tgt = torch.cat([torch.as_tensor(list(q[1]), dtype=torch.long) for q in queries])
    ids, mask = ids.to(device), mask.to(device)
    b_idx, p_idx, tgt = b_idx.to(device), p_idx.to(device), tgt.to(device)

    if _head_path_ok(model, device):
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        sel = hidden[b_idx, p_idx]
        head = model.get_output_embeddings()
        step = max(1, _HEAD_ELEMENTS // max(1, model_vocab_size(model)))
        parts = []
        weight = head.weight.float()  # float32 logits whatever the model's dtype (no rounding before log-softmax)
        bias = head.bias.float() if getattr(head, "bias", None) is not None else None
        for s in range(0, sel.shape[0], step):
            logits = torch.nn.functional.linear(sel[s : s + step].float(), weight, bias)
            parts.append(logits.log_softmax(-1).gather(1, tgt[s : s + step, None]).squeeze(1))
        lp = torch.cat(parts) if parts else torch.zeros(0, device=device)
    else:
        logits = model(input_ids=ids, attention_mask=mask).logits
        sel = logits[b_idx, p_idx].float()
        lp = sel.log_softmax(-1).gather(1, tgt[:, None]).squeeze(1)
    lp = lp.double().cpu()
    out, k = [], 0
    for q in queries:
        n = len(q[0])
        out.append(lp[k : k + n])
        k += n
    return out


# --------------------------------------------------------------------------------------------
# bits per byte
# --------------------------------------------------------------------------------------------


def make_windows(seq: Sequence[int], seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Strided windows over ``seq``: ``(begin, end, first_scored)``, positions absolute.

    Position 0 (the start token) is never scored; every other position is scored exactly once,
    in window ``seq[begin:end]``, with ``1 <= p - begin <= seq_len - 1`` tokens of context. A
    stride equal to ``seq_len`` is used as ``seq_len - 1``: the first token of a window has
    nothing to be predicted from, so consecutive windows overlap by at least one token.
    """
    if seq_len < 2 or not 0 < stride <= seq_len:
        raise MetricsError(f"windows need seq_len >= 2 and 0 < stride <= seq_len, got seq_len={seq_len}, stride={stride}")
    stride = min(stride, seq_len - 1)
    L = len(seq)
    if L < 2:
        return []
    wins, begin, prev_end = [], 0, 1
    while True:
        end = min(begin + seq_len, L)
        wins.append((begin, end, prev_end))
        prev_end = end
        if end == L:
            return wins
        begin += stride


def _window_jobs(seqs: Sequence[list[int]], seq_len: int, stride: int) -> list[tuple]:
    """Scoring windows of every document, longest first (similar lengths together: less padding): (window tokens,
    positions in the window whose logits are used, their targets, document index)."""
    jobs = []
    for d, s in enumerate(seqs):
        for begin, end, first in make_windows(s, seq_len, stride):
            w = s[begin:end]
            jobs.append((w, range(first - begin - 1, end - begin - 1), w[first - begin :], d))
    jobs.sort(key=lambda j: -len(j[0]))
    return jobs


def _score_jobs(model: Any, jobs: list[tuple], n_docs: int, *, batch_size: int, device: Any, pad: int, desc: str,
                progress: bool) -> tuple[list[float], int]:
    """Nats per document over ``jobs`` (``_window_jobs``) in batches, and the tokens scored; the model is put in
    eval mode for it and back in training mode after, where it was."""
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    scored = 0
    doc_nll = [0.0] * n_docs
    bar = tqdm(total=sum(len(j[2]) for j in jobs), unit="tok", desc=desc, disable=not progress, leave=False)
    try:
        with torch.inference_mode():
            for b in range(0, len(jobs), batch_size):
                chunk = jobs[b : b + batch_size]
                lps = score_rows(model, [j[0] for j in chunk], [(j[1], j[2]) for j in chunk], device=device, pad_id=pad)
                for j, lp in zip(chunk, lps):
                    doc_nll[j[3]] -= float(lp.sum())
                    scored += lp.numel()
                bar.update(sum(len(j[2]) for j in chunk))
    finally:
        bar.close()
        if was_training and hasattr(model, "train"):
            model.train()
    return doc_nll, scored


def bits_per_byte(model: Any, tokenizer: Any, texts: Sequence[str], *, seq_len: int = 1024, stride: int = 512,
                  batch_size: int = 4, device: Any = None, desc: str = "bpb", progress: bool = True,
                  start: Optional[int] = -1) -> dict:
    """Bits per UTF-8 byte of ``texts`` under ``model`` with ``tokenizer`` (see the module docstring).

    ``start``: the context token put before every document (-1: ``start_token_id(tokenizer)``; None: none).

    Returns ``{"doc_bits", "doc_bytes" (per document, for intervals), "bpb", "nll" (nats, total), "bits",
    "bytes", "tokens" (scored), "docs", "windows", "seq_len", "stride", "start_token", "seconds",
    "tokens_per_s"}``.
    """
    if batch_size < 1:
        raise MetricsError(f"batch_size must be >= 1, got {batch_size}")
    texts = [t for t in texts]
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise MetricsError(f"bits_per_byte: text {i} is {type(t).__name__}, expected str")
    dev = _device_of(model, device)
    max_pos = model_max_positions(model)
    if max_pos is not None and seq_len > max_pos:
        log.info("%s: seq_len %d exceeds the model's %d positions; using %d", desc, seq_len, max_pos, max_pos)
        seq_len = max_pos
    stride = min(stride, seq_len)
    total_bytes = sum(len(t.encode("utf-8")) for t in texts)
    if total_bytes == 0:
        raise MetricsError("bits_per_byte: no text to score (all documents are empty)")

    start = start_token_id(tokenizer) if start == -1 else start
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    seqs = [([start] if start is not None else []) + list(ids) for ids in enc]
    vocab = model_vocab_size(model)
    check_token_range((i for s in seqs for i in s), vocab, model, tokenizer)

    jobs = _window_jobs(seqs, seq_len, stride)
    n_tokens = sum(len(j[2]) for j in jobs)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = int(pad) if pad is not None and 0 <= pad < vocab else 0
    t0 = time.time()
    doc_nll, scored = _score_jobs(model, jobs, len(texts), batch_size=batch_size, device=dev, pad=pad, desc=desc,
                                  progress=progress)
    secs = time.time() - t0
    assert scored == n_tokens
    nll = float(sum(doc_nll))
    return {
        "doc_bits": [x / LN2 for x in doc_nll],
        "doc_bytes": [len(t.encode("utf-8")) for t in texts],
        "bpb": nll / LN2 / total_bytes,
        "nll": nll,
        "bits": nll / LN2,
        "bytes": total_bytes,
        "tokens": scored,
        "docs": len(texts),
        "windows": len(jobs),
        "seq_len": seq_len,
        "stride": stride,
        "start_token": start,
        "seconds": secs,
        "tokens_per_s": scored / secs if secs > 0 else float("nan"),
    }


# --------------------------------------------------------------------------------------------
# PubMedQA
# --------------------------------------------------------------------------------------------


from tokalign.config import PUBMEDQA_FORMATS  # noqa: E402  (context, abstract, chat)


def pubmedqa_prompt(example: dict, fmt: str = "context", tokenizer: Any = None) -> tuple[str, list[str], bool]:
    """(prompt text, the answer strings in ``PUBMEDQA_LABELS`` order, whether the start token goes first).

    ``context``: ``Context: ...\nQuestion: ...\nAnswer:`` then `` yes``/`` no``/`` maybe``;
    ``abstract``: the same with ``Abstract:`` (lm-evaluation-harness's ``pubmedqa`` task wording);
    ``chat``: the tokenizer's chat template around ``Context: ...\nQuestion: ...\nAnswer with yes, no
    or maybe.``, the answer being the assistant's first word ``yes``/``no``/``maybe``.
    """
    ctx = example["context"]
    if not isinstance(ctx, str):
        ctx = " ".join(ctx)
    q = example["question"]
    if fmt == "context":
        return f"Context: {ctx}\nQuestion: {q}\nAnswer:", [" " + a for a in PUBMEDQA_LABELS], True
    if fmt == "abstract":
        return f"Abstract: {ctx}\nQuestion: {q}\nAnswer:", [" " + a for a in PUBMEDQA_LABELS], True
    if fmt == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise MetricsError("pubmedqa format 'chat': the tokenizer has no chat template (use eval.pubmedqa_format="
                               "context or abstract)")
        msg = f"Context: {ctx}\nQuestion: {q}\nAnswer with yes, no or maybe."
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": msg}], tokenize=False,
                                               add_generation_prompt=True)
        return prompt, list(PUBMEDQA_LABELS), False
    raise MetricsError(f"pubmedqa format {fmt!r}: expected one of {PUBMEDQA_FORMATS}")


def _answer_ids(tokenizer: Any, prompt: str, prompt_ids: list[int], answer: str) -> list[int]:
    """Tokens of ``answer`` as the tokenizer writes it after ``prompt`` (boundary-safe)."""
    full = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    if len(full) > len(prompt_ids) and list(full[: len(prompt_ids)]) == list(prompt_ids):
        return list(full[len(prompt_ids) :])
    return list(tokenizer(answer, add_special_tokens=False)["input_ids"])


def pubmedqa_accuracy(model: Any, tokenizer: Any, examples: Sequence[dict], *, device: Any = None,
                      batch_size: int = 4, max_len: Optional[int] = None, labels: Sequence[str] = PUBMEDQA_LABELS,
                      fmt: str = "context", desc: str = "pubmedqa", progress: bool = True) -> dict:
    """Zero-shot accuracy: the answer (" yes"/" no"/" maybe") with the highest summed log-likelihood wins.

    ``examples``: dicts with ``question``, ``context`` (str or list of str), ``label`` (one of
    ``labels``) and optionally ``id``. Prompt+answer tokens are capped at ``max_len`` and at the
    model's positions (whichever is smaller); longer prompts lose tokens from the left. Returns ``{"accuracy", "n",
    "correct", "label_counts", "pred_counts", "per_label_accuracy", "truncated",
    "answer_tokens", "predictions": [{"id", "label", "pred", "logprobs"}]}``.
    """
    if not examples:
        raise MetricsError("pubmedqa_accuracy: no examples")
    mp = model_max_positions(model)
    limit = min(max_len, mp) if (max_len and mp) else (max_len or mp or 2048)
    vocab = model_vocab_size(model)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = int(pad) if pad is not None and 0 <= pad < vocab else 0
    rows, truncated, answer_tokens = _pubmedqa_rows(model, tokenizer, examples, labels, fmt, limit, vocab)
    scores = _score_pubmedqa_rows(model, rows, len(examples), len(labels), _device_of(model, device), pad,
                                  batch_size, desc, progress)
    return {**_pubmedqa_tally(examples, scores, labels), "truncated": truncated, "answer_tokens": answer_tokens}


# a row of the PubMedQA scoring: (token ids, [(example, answer index, positions, targets)])
_QARow = tuple[list[int], list[tuple[int, int, list[int], list[int]]]]


def _pubmedqa_rows(model: Any, tokenizer: Any, examples: Sequence[dict], labels: Sequence[str], fmt: str, limit: int,
                   vocab: int) -> tuple[list[_QARow], int, dict]:
    """Rows to score: the prompt with the longest multi-token answer appended (single-token answers read at its last
    position), one more row per other multi-token answer; also how many prompts were cut and the answers' tokens."""
    start = start_token_id(tokenizer)
    rows: list[_QARow] = []
    truncated, answer_tokens = 0, {}
    for ei, ex in enumerate(examples):
        for key in ("question", "context", "label"):
            if key not in ex:
                raise MetricsError(f"pubmedqa example {ex.get('id', ei)}: missing key '{key}'")
        if ex["label"] not in labels:
            raise MetricsError(f"pubmedqa example {ex.get('id', ei)}: label {ex['label']!r} not in {tuple(labels)}")
        prompt, answers, use_start = pubmedqa_prompt(ex, fmt, tokenizer)
        answers = answers if tuple(labels) == PUBMEDQA_LABELS else [("" if fmt == "chat" else " ") + a for a in labels]
        p_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        a_ids = [_answer_ids(tokenizer, prompt, p_ids, a) for a in answers]
        if any(len(a) == 0 for a in a_ids):
            raise MetricsError(f"pubmedqa: the tokenizer gives no tokens for one of {answers}")
        if ei == 0:
            answer_tokens = {lab: ids for lab, ids in zip(labels, a_ids)}
        st = start if use_start else None  # a chat template brings its own start
        budget = limit - (1 if st is not None else 0) - max(len(a) for a in a_ids)
        if budget < 1:
            raise MetricsError(f"pubmedqa: max_len {limit} leaves no room for the prompt")
        if len(p_ids) > budget:
            p_ids = p_ids[-budget:]
            truncated += 1
        base = ([st] if st is not None else []) + p_ids
        if len(base) == 0:
            raise MetricsError(f"pubmedqa example {ex.get('id', ei)}: empty prompt")
        check_token_range(base + [t for a in a_ids for t in a], vocab, model, tokenizer)
        last = len(base) - 1
        multi = sorted((ai for ai in range(len(a_ids)) if len(a_ids[ai]) > 1), key=lambda ai: -len(a_ids[ai]))
        q0 = [(ei, ai, [last], a) for ai, a in enumerate(a_ids) if len(a) == 1]
        if multi:
            a = a_ids[multi[0]]
            q0.append((ei, multi[0], list(range(last, last + len(a))), a))
            rows.append((base + a, q0))
        else:
            rows.append((base, q0))
        for ai in multi[1:]:
            a = a_ids[ai]
            rows.append((base + a, [(ei, ai, list(range(last, last + len(a))), a)]))
    return rows, truncated, answer_tokens


def _score_pubmedqa_rows(model: Any, rows: list[_QARow], n_examples: int, n_answers: int, dev: Any, pad: int,
                         batch_size: int, desc: str, progress: bool) -> list[list[float]]:
    """Summed log-probability of every answer of every example (longest rows first, in batches)."""
    scores = [[0.0] * n_answers for _ in range(n_examples)]
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r][0]))
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    bar = tqdm(total=len(rows), unit="row", desc=desc, disable=not progress, leave=False)
    try:
        with torch.inference_mode():
            for b in range(0, len(order), batch_size):
                chunk = [rows[r] for r in order[b : b + batch_size]]
                # one query list per row: concatenate that row's answer queries
                per_row = [([p for q in qs for p in q[2]], [t for q in qs for t in q[3]]) for _, qs in chunk]
                lps = score_rows(model, [c[0] for c in chunk], per_row, device=dev, pad_id=pad)
                for (_, qs), lp in zip(chunk, lps):
                    k = 0
                    for ei, ai, pos, _t in qs:
                        scores[ei][ai] += float(lp[k : k + len(pos)].sum())
                        k += len(pos)
                bar.update(len(chunk))
    finally:
        bar.close()
        if was_training and hasattr(model, "train"):
            model.train()
    return scores


def _pubmedqa_tally(examples: Sequence[dict], scores: list[list[float]], labels: Sequence[str]) -> dict:
    """Predictions (ties: the earlier label), accuracy and the counts per label."""
    preds, correct = [], 0
    label_counts = {lab: 0 for lab in labels}
    pred_counts = {lab: 0 for lab in labels}
    label_correct = {lab: 0 for lab in labels}
    for ex, sc in zip(examples, scores):
        pred = labels[max(range(len(labels)), key=lambda i: (sc[i], -i))]
        ok = pred == ex["label"]
        correct += ok
        label_counts[ex["label"]] += 1
        pred_counts[pred] += 1
        label_correct[ex["label"]] += ok
        preds.append({"id": ex.get("id"), "label": ex["label"], "pred": pred,
                      "logprobs": {lab: s for lab, s in zip(labels, sc)}})
    return {"accuracy": correct / len(examples), "n": len(examples), "correct": correct, "label_counts": label_counts,
            "pred_counts": pred_counts, "predictions": preds,
            "per_label_accuracy": {lab: (label_correct[lab] / label_counts[lab] if label_counts[lab] else None)
                                   for lab in labels}}


def _read_json(path: Any, what: str) -> Any:
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise PubMedQAError(f"{p}: no such file ({what})")
    if not p.is_file():
        raise PubMedQAError(f"{p}: not a file ({what})")
    try:
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise PubMedQAError(f"{p}: not valid JSON ({what}): {e}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise PubMedQAError(f"{p}: unreadable ({what}): {e}") from e


def _id_key(x: str) -> tuple:
    return (0, int(x), "") if str(x).isdigit() else (1, 0, str(x))


def stratified_sample(ids_by_label: dict[str, list[str]], n: int, seed: int) -> list[str]:
    """``n`` ids drawn with ``random.Random(seed)``, each label getting its proportional share (largest remainder)."""
    total = sum(len(v) for v in ids_by_label.values())
    if n <= 0 or n >= total:
        return sorted((i for v in ids_by_label.values() for i in v), key=_id_key)
    labels = sorted(ids_by_label)
    exact = {lab: n * len(ids_by_label[lab]) / total for lab in labels}
    quota = {lab: int(math.floor(exact[lab])) for lab in labels}
    left = n - sum(quota.values())
    for lab in sorted(labels, key=lambda lab: (-(exact[lab] - quota[lab]), lab))[:left]:
        quota[lab] += 1
    rng = random.Random(seed)
    chosen = []
    for lab in labels:
        pool = sorted(ids_by_label[lab], key=_id_key)
        chosen += rng.sample(pool, quota[lab])
    return sorted(chosen, key=_id_key)


def load_pubmedqa(pqal_path: Any, test_ids_path: Any = None, n: int = 0, seed: int = 0,
                  split: str = "test") -> list[dict]:
    """PubMedQA-L examples ``{id, question, context, label}`` for the IDs of ``test_ids_path``.

    ``pqal_path``: ori_pqal.json (id -> {QUESTION, CONTEXTS: [str], final_decision, ...}).
    ``test_ids_path``: test_ground_truth.json (id -> label; a list of ids also works) or None for
    every id of ``pqal_path``. ``n`` > 0 and below the number of ids: a seeded sample stratified
    by label (the official file is sorted by label, so its first N ids would all be "yes").
    ``split="train"``: the ids of ``pqal_path`` that are NOT in ``test_ids_path`` (labels from
    ``final_decision``), for choosing settings without touching the test questions.
    Returned in id order. Raises ``PubMedQAError`` naming the file on any problem.
    """
    if split not in ("test", "train"):
        raise PubMedQAError(f"load_pubmedqa: split {split!r}, expected 'test' or 'train'")
    pqal = _read_json(pqal_path, "PubMedQA ori_pqal.json")
    if not isinstance(pqal, dict) or not pqal:
        raise PubMedQAError(f"{pqal_path}: expected a non-empty JSON object of id -> record")
    if test_ids_path is not None:
        test = _read_json(test_ids_path, "PubMedQA test ids")
        if isinstance(test, list):
            test = {str(i): None for i in test}
        if not isinstance(test, dict) or not test:
            raise PubMedQAError(f"{test_ids_path}: expected a non-empty JSON object of id -> label (or a list of ids)")
    else:
        test = {k: None for k in pqal}
    if split == "train":
        test = {k: None for k in pqal if k not in {str(i) for i in test}} if test_ids_path is not None else {}
        if not test:
            raise PubMedQAError(f"{pqal_path}: no training-split questions (every id is a test id, or no test ids given)")
    examples: dict[str, dict] = {}
    for qid, lab in test.items():
        qid = str(qid)
        rec = pqal.get(qid)
        if not isinstance(rec, dict):
            raise PubMedQAError(f"{pqal_path}: no record for id {qid} (listed in {test_ids_path})")
        label = lab if lab is not None else rec.get("final_decision")
        q, ctx = rec.get("QUESTION"), rec.get("CONTEXTS")
        if not isinstance(q, str) or not isinstance(ctx, list) or not all(isinstance(c, str) for c in ctx):
            raise PubMedQAError(f"{pqal_path}: record {qid} needs QUESTION (str) and CONTEXTS (list of str)")
        if label not in PUBMEDQA_LABELS:
            raise PubMedQAError(f"{test_ids_path or pqal_path}: id {qid} has label {label!r}, expected one of {PUBMEDQA_LABELS}")
        examples[qid] = {"id": qid, "question": q, "context": " ".join(ctx), "label": label}
    by_label: dict[str, list[str]] = {}
    for qid, ex in examples.items():
        by_label.setdefault(ex["label"], []).append(qid)
    return [examples[i] for i in stratified_sample(by_label, n, seed)]
